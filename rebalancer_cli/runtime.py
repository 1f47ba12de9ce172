"""Wiring from a config to live collaborators (exchange, ledger, audit) and the core call of each command.

`cli.py` calls one function here per command and only renders; a Python caller gets every capability of the
CLI by calling the same functions. Heavy imports (ccxt, redis, psycopg) happen inside, only when needed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, default_state_dir, load_config
from .errors import RefusedError
from .exchange.profiles import require_proven
from .planner import Plan, PlannerState, plan
from .snapshot import Snapshot, load_snapshot

if TYPE_CHECKING:
    from .audit.base import AuditStore, ExecutionRecord
    from .exchange.base import Exchange
    from .executor import ExecutionReport, Listener
    from .ledger.base import Halt, ShadowLedger
    from .reconcile import ReconcileReport


def open_exchange(config: Config) -> Exchange:
    from .config import check_runnable

    check_runnable(config)  # the checks of `validate-config`, at the config's lines, before any request
    if config.exchange.is_paper:
        from .exchange.paper import PaperExchange

        path = config.snapshot_path()
        assert path is not None  # the config schema demands a snapshot for paper
        return PaperExchange(path, config.resolved_state_dir(), config.portfolio_id)
    from .exchange.ccxt_exchange import CcxtExchange

    return CcxtExchange.from_config(config)


def open_ledger_for(config: Config) -> ShadowLedger:
    from .ledger import open_ledger

    return open_ledger(config.redis_url, config.resolved_state_dir())


def load_planner_state(config: Config, ledger: ShadowLedger | None = None) -> PlannerState:
    """Hysteresis and cooldown memory; only the store can know it, so cron runs and the daemon share it."""
    if not config.hysteresis and not config.cooldown:
        return PlannerState()
    own = ledger is None
    store = ledger or open_ledger_for(config)
    try:
        return PlannerState.from_json(store.get_memory(config.portfolio_id))
    finally:
        if own:
            store.close()


def check_skew(config: Config, snapshot: Snapshot) -> None:
    limit = config.exchange.max_snapshot_skew
    if Decimal(str(snapshot.skew_seconds)) > limit:
        raise RefusedError(
            f"snapshot parts were read {snapshot.skew_seconds:.2f}s apart, more than max_snapshot_skew {limit}s: "
            "the picture is not consistent enough to trade on"
        )


def take_snapshot(config: Config, state: PlannerState | None = None, *, full_books: bool = False) -> Snapshot:
    """One consistent picture from the exchange; refused (exit 5) when its parts are too far apart in time.

    `full_books` reads every market's book, not only those the planner's screen selects, for a snapshot
    that is saved to replay any decision later."""
    exchange = open_exchange(config)
    try:
        snapshot = exchange.fetch_snapshot(config, state, full_books=full_books)
    finally:
        exchange.close()
    check_skew(config, snapshot)
    return snapshot


def save_live_snapshot(config_path: Path, out: Path) -> Snapshot:
    """`rebalance snapshot`: what the exchange shows now, with every market's full book, written atomically
    in the snapshot file format, so that `plan --snapshot` replays the decision exactly."""
    from .snapshot import save_snapshot

    config = load_config(config_path)
    snapshot = take_snapshot(config, full_books=True)
    save_snapshot(snapshot, out)
    return snapshot


def exchanges() -> list[dict[str, Any]]:
    """`rebalance exchanges`: every exchange profile and what the contract suite proves for it."""
    from .exchange.profiles import describe_profiles

    return describe_profiles()


def make_plan(
    config_path: Path,
    *,
    snapshot_path: Path | None = None,
    now: datetime | None = None,
) -> tuple[Config, Plan]:
    """`rebalance plan`: load, snapshot (or read a saved one), plan. Never trades."""
    config = load_config(config_path)
    state = load_planner_state(config)
    snapshot = load_snapshot(snapshot_path) if snapshot_path is not None else take_snapshot(config, state)
    return config, plan(config, snapshot, state, now=now)


@dataclass(frozen=True)
class PlanResult:
    """`rebalance plan`: the plan, and the kill switch, which `execute` would meet before sending anything."""

    config: Config
    plan: Plan
    halt: Halt | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = self.plan.to_dict()
        d["halted"] = halt_dict(self.halt)
        d["notes"] = [*d["notes"], *self.notes]
        return d


def halt_dict(h: Halt | None) -> dict[str, str] | None:
    return (
        {"reason": h.reason, "by": h.by, "at": h.at.astimezone(UTC).isoformat().replace("+00:00", "Z")} if h else None
    )


def plan_portfolio(
    config_path: Path,
    *,
    snapshot_path: Path | None = None,
    now: datetime | None = None,
) -> PlanResult:
    """`rebalance plan`: `make_plan`, and whether the portfolio is halted (a plan is still shown: it says
    what would be done once resumed)."""
    from .errors import StoreError

    config, p = make_plan(config_path, snapshot_path=snapshot_path, now=now)
    try:
        ledger = open_ledger_for(config)
        try:
            halted = ledger.halted(config.portfolio_id)
        finally:
            ledger.close()
    except StoreError as exc:
        return PlanResult(config, p, None, (f"kill switch state unknown: {exc}",))
    return PlanResult(config, p, halted)


# --- execution and the stores ----------------------------------------------------------------------


def open_audit_for(config: Config) -> AuditStore:
    """The audit store of a config, with write-behind (see `audit/writebehind.py`); a shared PostgreSQL
    store must already be at the current schema."""
    from .audit import open_audit
    from .audit.writebehind import WriteBehindAudit

    store = open_audit(config.database_url, config.resolved_state_dir())
    try:
        store.check()
    except BaseException:
        store.close()
        raise
    return WriteBehindAudit(store)


def operator() -> str:
    """Who is acting, for the kill switch and the audit trail: user@host."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def execute(
    config_path: Path,
    *,
    saved_plan: Path | None = None,
    listener: Listener | None = None,
    plan_only: bool = False,
    wait: float = 0.0,
) -> ExecutionReport:
    """`rebalance execute`: hold the portfolio's lease, recover, snapshot, plan (or check a saved plan),
    execute, record. Another writer holding the portfolio longer than `wait` seconds: PortfolioBusyError."""
    import threading

    from . import killswitch, writer
    from .executor import Executor

    config = load_config(config_path)
    require_proven(config, "execute")  # before anything is opened or sent
    plan_obj = load_saved_plan(saved_plan) if saved_plan is not None else None
    with contextlib.ExitStack() as stack:
        ledger = open_ledger_for(config)
        stack.callback(ledger.close)
        audit = open_audit_for(config)
        # the audit store closes last of the two that write: its queued writes are flushed on close, and a
        # failure there must neither hide the run's own error nor pass for "nothing was traded" (see below)
        closer = _AuditCloser(audit)
        stack.push(closer)
        exchange = open_exchange(config)
        stack.callback(exchange.close)
        if plan_only:  # a dry run writes nothing, so it needs no lease and never waits for one
            return Executor(config, exchange, ledger, audit).run(saved_plan=plan_obj, plan_only=True)
        stop = threading.Event()
        with writer.hold(config, ledger, "execute", wait=wait, on_lost=stop.set) as token:
            killswitch.verify(ledger, audit, config.portfolio_id)
            executor = Executor(config, exchange, ledger, audit, listener=listener, fence=token, stop=stop)
            report: ExecutionReport = executor.run(saved_plan=plan_obj, plan_only=plan_only)
            closer.report = report
            return report
    raise AssertionError("unreachable")  # pragma: no cover


class _AuditCloser:
    """Closes the audit store after a run (an ExitStack exit callback). Its error while another one propagates
    is dropped (the run's own error is what the operator must see); after a run that traded it is exit 4, not
    exit 3."""

    def __init__(self, audit: AuditStore) -> None:
        self.audit = audit
        self.report: ExecutionReport | None = None

    def __call__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        from .errors import ExecutionIncompleteError, RebalanceError

        try:
            self.audit.close()
        except RebalanceError as close_error:
            if exc is not None:
                return False  # the original error goes on; this one is secondary
            if self.report is not None and self.report.traded:
                raise ExecutionIncompleteError(
                    f"orders of this run filled, but the audit trail could not be completed: {close_error}; "
                    "`rebalance reconcile --repair` records them from the exchange"
                ) from close_error
            raise
        return False


def load_saved_plan(path: Path) -> Plan:
    from .plan_file import load_saved_plan as load

    return load(path)


class AlreadyHaltedError(RefusedError):
    """`halt` on a halted portfolio: the first reason is what the operators were told; replacing it silently
    would lose it."""

    def __init__(self, current: Halt) -> None:
        self.current = current
        super().__init__(
            f"already halted by {current.by} at {current.at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC: "
            f"{current.reason} (add --force to replace the reason; both stay in `history`)"
        )


@dataclass(frozen=True)
class HaltResult:
    halt: Halt
    replaced: Halt | None = None  # the halt whose reason --force replaced
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"halted": halt_dict(self.halt), "replaced": halt_dict(self.replaced), "notes": list(self.notes)}


@dataclass(frozen=True)
class ResumeResult:
    previous: Halt | None  # None: it was not halted
    by: str
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"resumed": self.previous is not None, "was": halt_dict(self.previous), "by": self.by,
                "notes": list(self.notes)}  # fmt: skip


def _record_kill_switch(config: Config, kind: str, detail: dict[str, Any], at: datetime) -> tuple[str, ...]:
    """Halt and resume go to the audit trail; the kill switch itself lives in the ledger and must work even
    while the audit store does not answer, so a failure here is a note, not an error."""
    from .errors import RebalanceError

    try:
        audit = open_audit_for(config)
        try:
            audit.record_event(config.portfolio_id, kind, detail, at)
        finally:
            audit.close()
    except RebalanceError as exc:
        return (f"not recorded in the audit trail: {exc}",)
    return ()


def halt(config_path: Path, reason: str, by: str | None = None, *, force: bool = False) -> HaltResult:
    """Pull the kill switch. A portfolio already halted keeps its reason (AlreadyHaltedError, exit 5) unless
    `force`; both halts are recorded in the audit trail."""
    from . import killswitch

    config = load_config(config_path)
    ledger = open_ledger_for(config)
    try:
        previous = ledger.halted(config.portfolio_id)
        if previous is not None and not force:
            raise AlreadyHaltedError(previous)
        ledger.halt(config.portfolio_id, reason, by or operator())
        halted = ledger.halted(config.portfolio_id)
        assert halted is not None
    finally:
        ledger.close()
    detail = {"reason": halted.reason, "by": halted.by, "replaced": previous.reason if previous else None}
    # the event killswitch.durable_halt reads back when the ledger has forgotten the halt
    return HaltResult(halted, previous, _record_kill_switch(config, killswitch.HALT, detail, halted.at))


def resume(config_path: Path, by: str | None = None) -> ResumeResult:
    """Lift the kill switch; says which halt was lifted (None when it was not set)."""
    from . import killswitch

    config = load_config(config_path)
    ledger = open_ledger_for(config)
    who = by or operator()
    try:
        previous = ledger.halted(config.portfolio_id)
        ledger.resume(config.portfolio_id)
    finally:
        ledger.close()
    if previous is None:
        return ResumeResult(None, who)
    detail = {"by": who, "reason": previous.reason}
    return ResumeResult(previous, who, _record_kill_switch(config, killswitch.RESUME, detail, datetime.now(UTC)))


def history(config_path: Path, limit: int = 20) -> list[ExecutionRecord]:
    config = load_config(config_path)
    audit = open_audit_for(config)
    try:
        return audit.history(config.portfolio_id, limit)
    finally:
        audit.close()


@dataclass(frozen=True)
class KillSwitchEvent:
    kind: str  # halt | resume
    at: datetime
    by: str
    reason: str  # why it was halted (for a resume: the halt it lifted)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "at": self.at.isoformat(), "by": self.by, "reason": self.reason}


@dataclass(frozen=True)
class AuditLog:
    """`rebalance history`: executions and kill-switch events, newest first."""

    executions: list[ExecutionRecord]
    events: list[KillSwitchEvent] = field(default_factory=list)


def audit_log(config_path: Path, limit: int = 20) -> AuditLog:
    config = load_config(config_path)
    audit = open_audit_for(config)
    try:
        executions = audit.history(config.portfolio_id, limit)
        # other events (recoveries, refusals) are many; read enough of them to find the kill switch's
        raw = audit.events(config.portfolio_id, min(10_000, max(100, limit * 20)))
    finally:
        audit.close()
    events = [
        KillSwitchEvent(kind, at, str(d.get("by", "")), str(d.get("reason", "")))
        for at, kind, d in raw
        if kind in ("halt", "resume")
    ][:limit]
    return AuditLog(executions, events)


def migrate(config_path: Path | None = None, database_url: str | None = None) -> list[str]:
    """`rebalance db migrate`: bring the audit store to the current schema (idempotent)."""
    from .audit import open_audit

    if config_path is not None:
        config = load_config(config_path)
        url, state_dir = database_url or config.database_url, config.resolved_state_dir()
    else:
        url, state_dir = database_url, default_state_dir()
    store = open_audit(url, state_dir)
    try:
        return store.migrate()
    finally:
        store.close()


def reconcile(config_path: Path, *, repair: bool = False, wait: float = 0.0) -> ReconcileReport:
    """`rebalance reconcile`: exchange vs ledger vs audit; `repair` aligns ledger and audit to the exchange,
    holding the portfolio's lease like any writer (a plain comparison only reads)."""
    import contextlib

    from . import writer
    from .executor import Executor
    from .reconcile import reconcile as run

    config = load_config(config_path)
    require_proven(config, "execute")  # it settles and cancels orders as execute does
    ledger = open_ledger_for(config)
    try:
        audit = open_audit_for(config)
        try:
            exchange = open_exchange(config)
            try:
                lease = writer.hold(config, ledger, "reconcile --repair", wait=wait) if repair else None
                with lease if lease is not None else contextlib.nullcontext(None) as token:
                    executor = Executor(config, exchange, ledger, audit, fence=token)
                    return run(config, exchange, ledger, audit, repair=repair, settle=executor.settle, fence=token)
            finally:
                exchange.close()
        finally:
            audit.close()
    finally:
        ledger.close()
