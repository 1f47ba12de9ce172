"""Wiring from a config to live collaborators (exchange, ledger, audit) and the core call of each command.

`cli.py` calls one function here per command and only renders; a Python caller gets every capability of the
CLI by calling the same functions. Heavy imports (ccxt, redis, psycopg) happen inside, only when needed.
"""

from __future__ import annotations

from datetime import datetime
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
) -> ExecutionReport:
    """`rebalance execute`: recover, snapshot, plan (or check a saved plan), execute, record."""
    from .executor import Executor

    config = load_config(config_path)
    require_proven(config, "execute")  # before anything is opened or sent
    plan_obj = load_saved_plan(saved_plan) if saved_plan is not None else None
    ledger = open_ledger_for(config)
    try:
        audit = open_audit_for(config)
        try:
            exchange = open_exchange(config)
            try:
                executor = Executor(config, exchange, ledger, audit, listener=listener)
                return executor.run(saved_plan=plan_obj, plan_only=plan_only)
            finally:
                exchange.close()
        finally:
            audit.close()
    finally:
        ledger.close()


def load_saved_plan(path: Path) -> Plan:
    import json

    from .errors import InputError
    from .yamlfile import read_text

    text = read_text(path, kind="plan", max_bytes=10_000_000)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a saved plan is a JSON object, as printed by `rebalance plan --json`")
    return Plan.from_dict(data)


def halt(config_path: Path, reason: str, by: str | None = None) -> Halt:
    config = load_config(config_path)
    ledger = open_ledger_for(config)
    try:
        ledger.halt(config.portfolio_id, reason, by or operator())
        halted = ledger.halted(config.portfolio_id)
        assert halted is not None
        return halted
    finally:
        ledger.close()


def resume(config_path: Path) -> Halt | None:
    """Lift the kill switch; returns the halt that was lifted (None when it was not set)."""
    config = load_config(config_path)
    ledger = open_ledger_for(config)
    try:
        previous = ledger.halted(config.portfolio_id)
        ledger.resume(config.portfolio_id)
        return previous
    finally:
        ledger.close()


def history(config_path: Path, limit: int = 20) -> list[ExecutionRecord]:
    config = load_config(config_path)
    audit = open_audit_for(config)
    try:
        return audit.history(config.portfolio_id, limit)
    finally:
        audit.close()


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


def reconcile(config_path: Path, *, repair: bool = False) -> ReconcileReport:
    """`rebalance reconcile`: exchange vs ledger vs audit; `repair` aligns ledger and audit to the exchange."""
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
                executor = Executor(config, exchange, ledger, audit)
                return run(config, exchange, ledger, audit, repair=repair, settle=executor.settle)
            finally:
                exchange.close()
        finally:
            audit.close()
    finally:
        ledger.close()
