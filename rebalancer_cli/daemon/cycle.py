"""One cycle of one portfolio, and what it needs: stores, exchange clients (pooled per account), the account's
guards (`exchange.accounts`), and the schedule kept in the ledger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import Config
from ..errors import HaltedError, LeaseLostError, RebalanceError
from ..exchange.accounts import Accounts
from ..exchange.feed import MarketFeed
from ..leases import LeaseStore, open_leases
from ..telemetry import span

if TYPE_CHECKING:
    from datetime import datetime

    from ..audit.writebehind import WriteBehindAudit
    from ..exchange.base import Exchange
    from ..executor import ExecutionReport, Executor
    from ..ledger.base import ShadowLedger
    from ..planner import Plan, PlannerState
    from ..snapshot import Snapshot

logger = logging.getLogger("rebalance")
T = TypeVar("T")


# An exchange client is rebuilt after this long, so that a long-running daemon reads market rules again.
CLIENT_MAX_AGE = 600.0
# An idle cycle writes the schedule only this many intervals after it last did (a cycle that did something,
# always): a successor taking the portfolio over after a crash runs it early at worst, which for a portfolio
# with nothing to do costs one idle check.
SCHEDULE_REFRESH = 10
ZERO = Decimal(0)


def _store_key(kind: str, config: Config) -> tuple[str, str]:
    url = config.redis_url if kind in ("ledger", "leases") else config.database_url
    return (kind, f"{url or ''}|{config.resolved_state_dir()}")


def _schedule_key(pid: str) -> str:
    """The last cycle's time is shared state: a successor instance keeps the schedule.

    Kept under `daemon:<portfolio>` in the ledger's memory: a portfolio id cannot contain ':', so no portfolio's
    own memory can be this key (it was `<portfolio>.daemon`, which portfolio `a.daemon` overwrote; see
    `_legacy_schedule` for schedules written before)."""
    return f"daemon:{pid}"


def _legacy_schedule(ledger: ShadowLedger, pid: str) -> float | None:
    """The schedule earlier daemons wrote under `<portfolio>.daemon`, read once after an upgrade, so that
    running instances keep their schedules; it is never written again. Only a value of exactly that shape is
    taken: a portfolio named `<portfolio>.daemon` keeps asset symbols there, never a `last_cycle` key."""
    try:
        memory = json.loads(ledger.get_memory(f"{pid}.daemon") or "{}")
    except ValueError:
        return None
    if isinstance(memory, dict) and set(memory) == {"last_cycle"} and isinstance(memory["last_cycle"], int | float):
        return float(memory["last_cycle"])
    return None


@dataclass
class CycleResult:
    """What one cycle tells the daemon, for its schedule, metrics and logs; plain data, because a cycle may run
    in a worker process.

    `kind`: ran (the executor finished; `status` is its report's), scheduled (another instance ran the
    portfolio recently: it is due in `due_in` seconds), halted, fenced (the lease was lost), error, bug, or
    stopped (the daemon was stopping: nothing was done)."""

    kind: str
    started: float = 0.0
    worker: int = field(default_factory=os.getpid)  # the process that ran the cycle
    due_in: float = 0.0
    elapsed: float = 0.0
    has_report: bool = False
    status: str = ""
    traded: bool = False
    drift: Decimal | None = None
    cost_ratio: float | None = None
    orders: list[dict[str, str]] = field(default_factory=list)
    order_results: list[tuple[str, str]] = field(default_factory=list)  # (side, status) of each order
    lock_failures: int = 0
    decisions: dict[str, str] = field(default_factory=dict)
    error: str = ""
    exit_code: int | None = None
    traceback: str = ""
    api_calls: dict[str, int] = field(default_factory=dict)
    exchange_id: str = ""
    breaker_value: float | None = None
    rate_limit_remaining: float | None = None


@dataclass(frozen=True)
class Hold:
    """An idle check's decision: what the cycle would write (each only if it changed), and the hold-only plan
    when one was built (None when the screen proved the hold: `plan` is then run only to record it)."""

    plan: Plan | None
    memory: PlannerState  # the planner's memory after this hold
    holdings: dict[str, Decimal]  # free + locked per asset, as the ledger keeps them
    decisions: tuple[tuple[str, str], ...]  # (asset, reason): a plan is recorded when these change
    drift: Decimal  # sum of |drift| before (= after) the hold


def decide_hold(config: Config, snapshot: Snapshot, state: PlannerState, now: datetime) -> Hold | None:
    """From the snapshot to "hold" (None: the plan trades). The daemon's idle check after its reads; what
    bench/plan_bench.py times as an idle check, with the screen that picked the books to read.

    Most idle checks end at the planner's screen (`idle_hold`), which knows every decision without a plan;
    the rest plan in full."""
    from ..planner import idle_hold, plan

    holdings = {a: snapshot.balances.get(a, ZERO) + snapshot.locked.get(a, ZERO) for a in snapshot.balances}
    quick = idle_hold(config, snapshot, state)
    if quick is not None:
        return Hold(None, state, holdings, quick.decisions, quick.drift)
    held = plan(config, snapshot, state, now=now)
    if held.trades:
        return None
    decisions = tuple((a.symbol, a.reason) for a in held.assets)
    return Hold(held, state.after(held, set(), now), holdings, decisions, held.summary.drift_before)


class CycleRunner:
    """Stores, exchange clients, per-account guards, and the cycle itself: one in the daemon's process, and one
    in each worker process when the daemon runs several (`processes`).

    `share` is how many runners split each exchange account's request budget: a bucket kept in Redis is
    shared by all of them anyway, a local one gets its share of the budget."""

    def __init__(self, stopping: threading.Event, *, share: int = 1) -> None:
        self.stopping = stopping
        self.share = share
        self._stores: dict[tuple[str, str], Any] = {}
        # one rate-limit bucket and one circuit breaker per exchange account, across every portfolio on it: a
        # breaker born with each client would never see enough consecutive failures to open
        self.accounts = Accounts(share=share)
        self._idle_clients: dict[str, list[tuple[float, Any]]] = {}
        self._remaining: dict[int, tuple[float, float]] = {}  # rate-limit budget left, by bucket: (read at, value)
        self._lock = threading.Lock()
        # bid/ask per exchange and balances per account, read once a tick for every portfolio (idle checks only)
        self._feeds: dict[str, MarketFeed] = {}
        # what this process last wrote for each portfolio on an idle cycle: equal again, nothing is written
        self._synced: dict[str, dict[str, Decimal]] = {}
        self._recorded: dict[str, tuple[tuple[str, str], ...]] = {}
        self._scheduled: dict[str, float] = {}  # wall time of the schedule last written

    def feed(self, config: Config) -> MarketFeed:
        """The process's shared market data; with a Redis URL, bid/ask is shared with every instance too."""
        key = config.redis_url or ""
        with self._lock:
            found = self._feeds.get(key)
            if found is None:
                client = None
                if config.redis_url:
                    from ..ledger.redis import connect

                    client = connect(config.redis_url)
                found = self._feeds[key] = MarketFeed(redis_client=client)
            return found

    def store(self, kind: str, config: Config) -> Any:
        key = _store_key(kind, config)
        with self._lock:
            if key not in self._stores:
                if kind == "ledger":
                    from ..runtime import open_ledger_for

                    self._stores[key] = open_ledger_for(config)
                elif kind == "audit":
                    from ..runtime import open_audit_for

                    self._stores[key] = open_audit_for(config)
                else:
                    self._stores[key] = open_leases(config.redis_url, config.resolved_state_dir())
            return self._stores[key]

    def ledger(self, config: Config) -> ShadowLedger:
        store: ShadowLedger = self.store("ledger", config)
        return store

    def audit(self, config: Config) -> WriteBehindAudit:
        store: WriteBehindAudit = self.store("audit", config)
        return store

    def leases(self, config: Config) -> LeaseStore:
        store: LeaseStore = self.store("leases", config)
        return store

    def stores(self) -> list[tuple[str, Any]]:
        with self._lock:
            return [(kind, store) for (kind, _), store in self._stores.items()]

    def close_clients(self) -> None:
        with self._lock:
            idle = [c for clients in self._idle_clients.values() for _, c in clients]
            self._idle_clients.clear()
        for client in idle:
            with contextlib.suppress(Exception):  # closing is best effort at exit
                client.close()

    def close_stores(self) -> None:
        with self._lock:
            for store in self._stores.values():
                with contextlib.suppress(Exception):  # closing is best effort at exit
                    store.close()
            self._stores.clear()

    @staticmethod
    def _client_key(config: Config) -> str:
        """Which pooled clients a config may use: the same exchange block and state directory (the caches)."""
        return json.dumps([config.exchange.model_dump(mode="json"), str(config.resolved_state_dir())])

    @contextlib.contextmanager
    def exchange(self, config: Config) -> Iterator[Any]:
        """An exchange client for one cycle.

        ccxt clients are reused across the cycles of every portfolio on the same account: building one and
        loading its markets costs more CPU than a whole idle cycle. A client serves one cycle at a time (so its
        call counts are that cycle's), is closed instead of reused after a failure, and is replaced after
        CLIENT_MAX_AGE so that market rules (lot sizes, fees) are read again.
        """
        if config.exchange.is_paper:
            from ..runtime import open_exchange

            paper = open_exchange(config)
            try:
                yield paper
            finally:
                paper.close()
            return
        from ..exchange.ccxt_exchange import CcxtExchange

        key = self._client_key(config)
        now = time.monotonic()
        client = None
        with self._lock:
            idle = self._idle_clients.setdefault(key, [])
            while idle and client is None:
                born, candidate = idle.pop()
                if now - born < CLIENT_MAX_AGE:
                    client = (born, candidate)
                else:
                    candidate.close()
        if client is None:
            # the account's rate limiter and breaker outlive each client: built once, in `exchange.accounts`
            client = (now, CcxtExchange.from_config(config, accounts=self.accounts))
        ok = False
        try:
            yield client[1]
            ok = True
        finally:
            if ok and not self.stopping.is_set():
                with self._lock:
                    self._idle_clients[key].append(client)
            else:
                client[1].close()

    # -- the cycle itself ------------------------------------------------------------------------------------

    def run(
        self,
        config: Config,
        token: int,
        *,
        own_schedule: bool,
        cycle: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> CycleResult:
        """One cycle through the executor; never raises: whatever happened is in the result.

        `own_schedule`: this instance recorded the portfolio's last cycle under this very lease, so the schedule
        kept in the store is its own and is not read back."""
        result = CycleResult("ran", started=clock())
        if self.stopping.is_set():
            result.kind = "stopped"
            return result
        from ..executor import Executor

        pid = config.portfolio_id
        try:
            ledger = self.ledger(config)
            if not own_schedule:
                due_in = self._due_in(ledger, config)
                if due_in > 0:
                    # another instance ran it recently (a takeover): keep its schedule
                    result.kind, result.due_in = "scheduled", due_in
                    return result
            # one write-behind queue serves every portfolio of the process; its failures stay with their portfolio
            audit = self.audit(config).scoped(pid)
            t0 = time.perf_counter()
            with self.exchange(config) as exchange:
                before = dict(exchange.calls)
                try:
                    with span("cycle", portfolio=pid, cycle=cycle):
                        executor = Executor(config, exchange, ledger, audit, fence=token, stop=self.stopping)
                        report = self._idle_check(config, executor, exchange, token)
                        idle = report is not None
                        if report is None:  # something to do: the whole cycle, on the exchange's own reads
                            report = executor.run()
                            self._synced.pop(pid, None)
                            self._recorded.pop(pid, None)
                finally:
                    result.elapsed = time.perf_counter() - t0
                    self._exchange_figures(exchange, before, result)
            _summarize(report, result)
            if idle and report.plan is None:  # a hold the screen proved: its decisions are the ones recorded
                result.decisions = dict(self._recorded.get(pid, ()))
                result.cost_ratio = 0.0
            now = time.time()
            if not idle or now - self._scheduled.get(pid, 0.0) >= SCHEDULE_REFRESH * float(config.interval):
                ledger.set_memory(_schedule_key(pid), json.dumps({"last_cycle": now}), fence=token)
                self._scheduled[pid] = now
        except HaltedError as exc:
            result.kind, result.error = "halted", str(exc)
        except LeaseLostError as exc:
            result.kind, result.error = "fenced", str(exc)
        except RebalanceError as exc:
            result.kind, result.error, result.exit_code = "error", str(exc), exc.exit_code
        except Exception as exc:  # one portfolio's bug must not stop the others
            result.kind, result.error = "bug", f"{type(exc).__name__}: {exc}"
            result.traceback = traceback.format_exc()
        return result

    def _idle_check(self, config: Config, executor: Executor, exchange: Exchange, token: int) -> ExecutionReport | None:
        """The executor's first steps (halt check, recovery, memory, snapshot, plan) on shared market data; the
        report of a hold, or None when the cycle has something to do (a trade, an order recovered, a snapshot
        too far apart): then `Executor.run` does the whole cycle on fresh reads of its own.

        A hold writes only what changed since this process last wrote it: the planner's memory, the holdings
        (kept in the ledger for reconcile; every trading cycle syncs them first anyway), and the hold-only plan
        in the audit trail, in one write, when its decisions changed."""
        if config.exchange.is_paper:
            return None  # the paper exchange reads a local file: nothing to share
        from ..exchange.ccxt_exchange import CcxtExchange
        from ..executor import ExecutionReport
        from ..planner import PlannerState, plan
        from ..runtime import check_skew

        if not isinstance(exchange, CcxtExchange):
            return None
        pid = config.portfolio_id
        ledger, audit = executor.ledger, executor.audit
        halt, memory = ledger.halt_and_memory(pid)
        executor.check_halt(halt)
        if executor.recover():
            return None
        state = PlannerState.from_json(memory)
        snapshot = exchange.fetch_snapshot(config, state, feed=self.feed(config))
        try:
            check_skew(config, snapshot)
        except RebalanceError:
            return None
        now = executor.clock()
        hold = decide_hold(config, snapshot, state, now)
        if hold is None:
            return None
        if hold.memory != state:
            ledger.set_memory(pid, hold.memory.to_json(), fence=token)
        if self._synced.get(pid) != hold.holdings and ledger.sync_balances(
            pid, hold.holdings, fence=token, unless_locked=True
        ):
            self._synced[pid] = hold.holdings
        if self._recorded.get(pid) != hold.decisions:
            held = hold.plan or plan(config, snapshot, state, now=now)
            audit.record_plan(held.plan_id, pid, now, held.to_dict(), hold.drift, finished="done")
            self._recorded[pid] = hold.decisions
        return ExecutionReport(pid, hold.plan, [], [], hold.drift, hold.drift)

    def _exchange_figures(self, exchange: Any, before: dict[str, int], result: CycleResult) -> None:
        """API calls, breaker and rate-limit budget, also of a failed cycle (when they matter most).

        The budget left is read at most once a second per account: a bucket shared through Redis costs a round
        trip to read, and thousands of cycles a minute would add one each for a gauge."""
        result.exchange_id = str(getattr(exchange, "id", ""))
        result.api_calls = {e: n - before.get(e, 0) for e, n in exchange.calls.items() if n - before.get(e, 0)}
        breaker = getattr(exchange, "breaker", None)
        if breaker is not None:
            result.breaker_value = float(breaker.state_value)
        limiter = getattr(exchange, "limiter", None)
        if limiter is None:
            return
        now = time.monotonic()
        read = self._remaining.get(id(limiter))
        if read is None or now - read[0] >= 1.0:
            with contextlib.suppress(RebalanceError):  # a shared bucket's store may be down: a gauge can wait
                read = (now, float(limiter.remaining()))
                self._remaining[id(limiter)] = read
        result.rate_limit_remaining = read[1] if read is not None else None

    @staticmethod
    def _due_in(ledger: ShadowLedger, config: Config) -> float:
        try:
            memory = json.loads(ledger.get_memory(_schedule_key(config.portfolio_id)) or "{}")
        except ValueError:
            memory = {}
        last_wall = memory.get("last_cycle") if isinstance(memory, dict) else None
        if not last_wall:
            last_wall = _legacy_schedule(ledger, config.portfolio_id)
        if not last_wall:
            return 0.0
        interval = float(config.interval)
        waited = time.time() - float(last_wall)  # negative when the last holder's clock ran ahead of ours
        return min(interval, max(0.0, interval - waited))


def _summarize(report: Any, result: CycleResult) -> None:
    result.has_report = True
    result.status = report.status
    plan = report.plan
    result.traded = plan is not None and bool(plan.trades)
    result.drift = report.drift_after if report.drift_after is not None else report.drift_before
    if plan is not None:
        benefit = sum((a.drift_value for a in plan.assets if a.decision == "trade"), Decimal(0))
        result.cost_ratio = float(plan.summary.est_total_cost / benefit) if benefit else 0.0
        result.decisions = {a.symbol: a.reason for a in plan.assets}
    for o in report.outcomes:
        result.order_results.append((o.side, o.status))
        result.lock_failures += o.lock_refused
        result.orders.append(
            {
                "market": o.market,
                "side": o.side,
                "amount": format(o.amount, "f"),
                "status": o.status,
                "filled": format(o.filled, "f"),
                "idempotency_key": o.key,
            }
        )
