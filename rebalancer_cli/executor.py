"""The one execution path: `execute` and the daemon both run a cycle through `Executor.run`.

Per trade, in plan order (sells first, so buys are sized against the quote they really freed):
guards -> intent in the audit store -> lock in the shadow ledger -> order with the idempotency key as client
order id -> fills into audit and ledger, lock committed. A refusal releases the lock; an unknown outcome
(timeout, dropped connection) is resolved by looking the order up by its client order id, and the order is
re-sent under the same id only when the exchange does not know it. A crash at any point leaves an intent in
the audit store; the next run settles it from the exchange before planning anew. Nothing executes twice.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, ROUND_UP, Decimal
from typing import Any, Literal, cast

from . import failpoints, killswitch
from .audit.base import AuditStore, Fill, OrderIntent, OrderRecord, OrderStatus
from .concurrency import side_by_side
from .config import Config
from .costs import DEFAULT_PRICE_BOUND, CostModel, worst_acceptable_price
from .errors import (
    CircuitOpenError,
    ExchangeError,
    ExecutionIncompleteError,
    ExitCode,
    HaltedError,
    LeaseLostError,
    NonRetryableExchangeError,
    OrderAlreadyPlacedError,
    OrderNotFoundError,
    RefusedError,
    RetryableExchangeError,
    SendRefusedError,
    ServiceUnavailableError,
    StoreError,
)
from .exchange.base import Exchange, FillInfo, OrderResult, Side, fees_by_currency
from .ledger.base import Commit, Halt, SendCheck, ShadowLedger
from .planner import Plan, PlannerState, Trade, round_down
from .planner import plan as make_plan
from .snapshot import Market, Snapshot
from .telemetry import span

ZERO = Decimal(0)
ONE = Decimal(1)
LOCK_TTL_SECONDS = 600.0
MAX_SENDS = 3
# a saved plan's weights are written to 8 decimals; holdings that moved less than this have not changed
SAVED_PLAN_WEIGHT_TOLERANCE = Decimal("1e-6")

Listener = Callable[["OrderOutcome"], None]


def _then_failpoint(mark_sent: Callable[[], None], quiesce: Callable[[], None]) -> Callable[[], None]:
    def before_send() -> None:
        mark_sent()
        failpoints.hit("during_send", quiesce=quiesce)

    return before_send


# A group's "leaving" marks are written before its first order leaves, stamped this far ahead: every request
# signed until then is covered by its mark (a successor waits out the receive window from the mark's time, so a
# mark later than the signature only makes it wait longer); one signed later is marked again on its own.
MARK_AHEAD = timedelta(seconds=0.25)
# an order's average price is a quotient of the exchange's rounded totals: this much past the bound is rounding
BOUND_TOLERANCE = Decimal("1e-9")
# a fill this many times away from its estimate cannot be a market price (checked when no bound is known)
ABSURD_FACTOR = Decimal(100)


def _short(d: Decimal) -> str:
    return format(d.quantize(Decimal("1e-12")).normalize(), "f")


def _suspect(intent: OrderIntent, fills: list[FillInfo], filled: Decimal, cost: Decimal) -> str | None:
    """Why an exchange's report of an order cannot be true, or None. Such a report must not be booked (nor
    wedge every later run): zero or negative prices or amounts, or a price no market could have. (Negative
    fees are maker rebates, not suspect.)"""
    for f in fills:
        if not (f.price.is_finite() and f.amount.is_finite() and f.fee.is_finite()):
            return f"a fill with a non-finite number (trade {f.trade_id})"
        if f.price <= 0:
            return f"a fill at price {f.price} (trade {f.trade_id})"
        if f.amount <= 0:
            return f"a fill of {f.amount} (trade {f.trade_id})"
    if filled > 0 and cost <= 0:
        return f"{filled} filled for a cost of {cost}"
    if filled > intent.amount:
        return f"{filled} filled on an order of {intent.amount}"
    if filled > 0 and intent.est_price > 0:
        avg = cost / filled
        if avg > intent.est_price * ABSURD_FACTOR or avg * ABSURD_FACTOR < intent.est_price:
            return f"an average price of {_short(avg)} against an estimate of {_short(intent.est_price)}"
    return None


def utcnow() -> datetime:
    return datetime.now(UTC)


# What happened to one trade, in the order a live view shows them. `breached`: it filled outside its worst
# acceptable price; `suspect`: the exchange reported a fill that cannot be true (a zero or negative price).
# Both halt the portfolio.
OutcomeStatus = Literal[
    "pending",
    "locked",
    "sent",
    "filled",
    "partial",
    "rejected",
    "refused",
    "skipped",
    "unknown",
    "failed",
    "cancelled",
    "breached",
    "suspect",
]
ReportStatus = Literal["done", "incomplete", "refused", "halted"]


@dataclass
class OrderOutcome:
    """What happened to one trade (see OutcomeStatus)."""

    key: str
    symbol: str
    market: str
    side: str
    amount: Decimal
    status: OutcomeStatus = "pending"
    filled: Decimal = ZERO
    avg_price: Decimal | None = None
    cost: Decimal = ZERO
    fees: dict[str, Decimal] = field(default_factory=dict)
    reason: str = ""
    est_price: Decimal | None = None
    # the shadow ledger refused to set its funds aside (what the daemon's lock-failure metric counts)
    lock_refused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "idempotency_key": self.key,
            "symbol": self.symbol,
            "market": self.market,
            "side": self.side,
            "amount": format(self.amount, "f"),
            "status": self.status,
            "filled": format(self.filled, "f"),
            # a quotient: shown to 12 decimals; the books keep the exact cost
            "avg_price": format(self.avg_price.quantize(Decimal("1e-12")), "f") if self.avg_price is not None else None,
            "cost": format(self.cost, "f"),
            "fees": {k: format(v, "f") for k, v in self.fees.items()},
            "reason": self.reason,
        }


# a partial fill leaves the portfolio short of its targets: the cycle is incomplete (exit 4), like a failure
FAILED: frozenset[OutcomeStatus] = frozenset({"rejected", "unknown", "failed", "partial"})
BAD_FILLS: frozenset[OutcomeStatus] = frozenset({"breached", "suspect"})


@dataclass
class ExecutionReport:
    portfolio_id: str
    plan: Plan | None
    outcomes: list[OrderOutcome]
    recovered: list[OrderOutcome]
    drift_before: Decimal | None
    drift_after: Decimal | None
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> ReportStatus:
        if any(o.status in BAD_FILLS for o in self.outcomes + self.recovered):
            return "halted"
        if any(o.status in FAILED for o in self.outcomes + self.recovered):
            return "incomplete"
        if any(o.status == "refused" for o in self.outcomes):
            return "refused"
        return "done"

    @property
    def traded(self) -> bool:
        """Whether anything filled in this run (recovered orders included)."""
        return any(o.filled > 0 for o in self.outcomes + self.recovered)

    @property
    def exit_code(self) -> int:
        return {
            "done": ExitCode.OK,
            "incomplete": ExitCode.INCOMPLETE,
            "refused": ExitCode.REFUSED,
            "halted": ExitCode.BAD_FILL,
        }[self.status]

    def to_dict(self) -> dict[str, Any]:
        def q(d: Decimal | None) -> str | None:
            return format(d.quantize(Decimal("1e-8"), rounding=ROUND_HALF_EVEN), "f") if d is not None else None

        return {
            "portfolio_id": self.portfolio_id,
            "plan_id": self.plan.plan_id if self.plan else None,
            "status": self.status,
            "orders": [o.to_dict() for o in self.outcomes],
            "recovered": [o.to_dict() for o in self.recovered],
            "drift_before": q(self.drift_before),
            "drift_after": q(self.drift_after),
            "notes": self.notes,
        }


@dataclass
class _Booked:
    """An answer `Executor._book` recorded in the audit trail, waiting for the ledger (`Executor._apply`)."""

    intent: OrderIntent
    outcome: OrderOutcome
    result: OrderResult
    fills: list[FillInfo]
    filled: Decimal
    cost: Decimal
    fees: dict[str, Decimal]
    net: dict[str, Decimal]
    synthesized: bool


class Executor:
    def __init__(
        self,
        config: Config,
        exchange: Exchange,
        ledger: ShadowLedger,
        audit: AuditStore,
        *,
        fence: int | None = None,
        listener: Listener | None = None,
        clock: Callable[[], datetime] = utcnow,
        lock_ttl: float = LOCK_TTL_SECONDS,
        settle_window: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        stop: threading.Event | None = None,
    ) -> None:
        # set by the daemon on SIGTERM: the order in flight finishes, the rest of the cycle is skipped
        self.stop = stop or threading.Event()
        self.config = config
        self.pid = config.portfolio_id
        self.exchange = exchange
        self.ledger = ledger
        self.audit = audit
        self.fence = fence
        self.listener = listener
        self.clock = clock
        self.lock_ttl = lock_ttl
        # An order not found on the exchange may still be in flight; once older than this, its absence is final
        # (the exchange rejects requests older than its receive window).
        self.settle_window = (
            settle_window if settle_window is not None else float(getattr(exchange, "settle_window", 0.0))
        )
        self.sleep = sleep
        # the kill switch's reason once `begin_send` found it pulled mid-cycle: the rest of the cycle is refused
        self._halted_by: str | None = None
        # worst acceptable price of each order sent in this run, for the check of its fills
        self._bounds: dict[str, Decimal] = {}
        # the holdings this run synced the ledger to, plus what its commits moved since (None: not synced), so
        # the drift after execution needs no ledger read; settled orders of a group add to it side by side
        self._holdings: dict[str, Decimal] | None = None
        self._holdings_lock = threading.Lock()
        # set by an order of a group that found the circuit open: the rest of the cycle is skipped
        self._circuit_open: CircuitOpenError | None = None
        # the planner's memory after the cycle, from what it executed, and whether a commit stored it already
        self._memory_after: Callable[[set[str]], str] = lambda executed: ""
        self._memory_stored = False
        self._outcomes: list[OrderOutcome] = []
        # the ledger's sync to this run's snapshot, until it ran (`_synced`)
        self._unsynced: Callable[[], None] | None = None
        # the group's "leaving" marks, written before its first order left: each order's own first send uses its
        # mark (or raises what writing the marks raised); a resend is marked again
        self._premarks: dict[str, tuple[SendCheck, str, datetime] | BaseException] = {}

    # -- the cycle ------------------------------------------------------------------------------------------

    def run(self, *, saved_plan: Plan | None = None, plan_only: bool = False) -> ExecutionReport:
        """Recover, snapshot, plan (or check a saved plan), execute, record. Raises HaltedError when halted
        (`_read` checks it, before the snapshot)."""
        # a dry run only plans: settling earlier runs' orders is a writer's job, under the lease
        if plan_only:
            recovered: list[OrderOutcome] = []
            state, snapshot = self._read()
        else:
            # What earlier runs left open is read beside the snapshot, not before it: almost always there is
            # nothing, and the cycle saves a store round trip. When there is, it is settled first and the memory
            # and the snapshot are read again, after the fills it booked.
            reads: list[Any] = side_by_side([functools.partial(self.audit.open_orders, self.pid), self._read])
            left_open = cast(list[OrderRecord], reads[0])
            recovered = [self._recover_one(record) for record in left_open]
            state, snapshot = self._read() if left_open else cast(tuple[PlannerState, Snapshot], reads[1])
        from .runtime import check_skew

        check_skew(self.config, snapshot)
        now = self.clock()
        if saved_plan is not None:
            self.check_saved_plan(saved_plan, snapshot, now)
            plan = saved_plan
        else:
            with span("plan", portfolio=self.pid):
                plan = make_plan(self.config, snapshot, state, now=now)
        report = ExecutionReport(self.pid, plan, [], recovered, plan.summary.drift_before, None)
        if plan_only:
            return report
        # the planner's memory after this cycle goes with the last group's fills, in the same ledger step
        self._memory_after = lambda executed: state.after(plan, executed, now).to_json()
        self._memory_stored = False
        # the ledger's sync goes side by side with the first intents' commit (independent stores), or alone
        self._unsynced = functools.partial(self._sync_ledger, snapshot, report)
        # The audit rows queued behind (the plan, statuses, fills) are written once the sends are over, not
        # beside the intents' commit and the orders on the same cores (`sending`, bounded)
        with self.audit.sending():
            self.audit.record_plan(plan.plan_id, self.pid, now, plan.to_dict(), plan.summary.drift_before)
            report.outcomes = [self._outcome(t) for t in plan.trades]
            for o in report.outcomes:  # the live view shows the whole plan before the first order leaves
                self._emit(o)
            try:
                self._execute(plan, snapshot, report, saved=saved_plan is not None)
                self._synced()
            except BaseException as exc:
                # A store or the exchange failed mid-cycle: the outcomes still read "locked" or "sent", so the report's
                # status would say "done". Record the plan as interrupted (best effort: the original error is what the
                # operator must see) and remember what did trade, for the cooldown.
                executed = {o.symbol for o in report.outcomes if o.filled > 0}
                with contextlib.suppress(Exception):
                    self.audit.finish_plan(plan.plan_id, "interrupted", None, self.clock())
                with contextlib.suppress(Exception):
                    self.ledger.set_memory(self.pid, state.after(plan, executed, now).to_json(), fence=self.fence)
                left = [o for o in report.outcomes if o.filled > 0 or o.status in ("sent", "unknown")]
                if left and isinstance(exc, ServiceUnavailableError):
                    # "unreachable, nothing was traded" (exit 3) would be a lie: say what did leave (exit 4)
                    done = ", ".join(f"{o.side} {o.market} {o.status} {o.filled}" for o in left)
                    raise ExecutionIncompleteError(
                        f"{exc}; after orders of this run had left ({done}): the next run settles what is open"
                    ) from exc
                raise
        executed = {o.symbol for o in report.outcomes if o.filled > 0}
        if executed:
            report.drift_after = self._realized_drift(plan, snapshot)
        else:
            report.drift_after = plan.summary.drift_before
        self.audit.finish_plan(plan.plan_id, report.status, report.drift_after, self.clock())
        if not self._memory_stored:
            self.ledger.set_memory(self.pid, state.after(plan, executed, now).to_json(), fence=self.fence)
        return report

    def check_halt(self, halt: Halt | None) -> None:
        """HaltedError when the portfolio is halted (`halt`: as read with the memory, `halt_and_memory`)."""
        if halt is not None:
            raise HaltedError(
                f"portfolio {self.pid} is halted since {halt.at:%Y-%m-%d %H:%M:%S}Z by {halt.by}: {halt.reason} "
                f"(`rebalance resume` lifts it)"
            )

    def check_saved_plan(self, plan: Plan, snapshot: Snapshot, now: datetime) -> None:
        """A saved plan is executed only while it still describes the market."""
        if plan.portfolio_id != self.pid:
            raise RefusedError(f"the saved plan is for portfolio {plan.portfolio_id}, not {self.pid}")
        age = (now - plan.taken_at).total_seconds()
        if age > float(self.config.max_plan_age):
            raise RefusedError(
                f"the saved plan's snapshot is {age:.0f}s old, more than max_plan_age {self.config.max_plan_age}s: "
                "plan again"
            )
        for line in plan.assets:
            if line.symbol == plan.quote:
                continue
            market = snapshot.markets.get(f"{line.symbol}/{plan.quote}")
            if market is None:
                raise RefusedError(f"{line.symbol}/{plan.quote} is no longer quoted")
            moved = abs(market.mid - line.mid) / line.mid
            if moved > self.config.price_tolerance:
                raise RefusedError(
                    f"{line.symbol} moved {moved * 100:.2f}% since the plan (tolerance "
                    f"{self.config.price_tolerance * 100}%): plan again"
                )
        # Prices alone do not make a saved plan valid: if the holdings changed (the plan, or another plan, was
        # executed since; a deposit), its trades would correct a drift that is no longer there. Valued at the
        # plan's own mids, unchanged holdings give back the plan's weights whatever the market did since.
        values = {
            line.symbol: (snapshot.balances.get(line.symbol, ZERO) + snapshot.locked.get(line.symbol, ZERO)) * line.mid
            for line in plan.assets
        }
        total = sum(values.values(), ZERO)
        for line in plan.assets:
            now_weight = values[line.symbol] / total if total > 0 else ZERO
            if abs(now_weight - line.current_weight) > SAVED_PLAN_WEIGHT_TOLERANCE:
                raise RefusedError(
                    f"holdings changed since the plan ({line.symbol} was {line.current_weight * 100:.4f}% of the "
                    f"portfolio, is {now_weight * 100:.4f}% at the plan's prices): plan again"
                )
        self._check_saved_trades(plan, snapshot)

    def _check_saved_trades(self, plan: Plan, snapshot: Snapshot) -> None:
        """Each saved trade against the fresh snapshot and the config's targets (never the file's): it must be
        one of this portfolio's markets, go the way the fresh drift goes, and not trade past the target."""
        targets = {a.symbol: a.target_weight for a in self.config.assets}
        quote = self.config.quote_symbol
        fresh = {
            a: (snapshot.balances.get(a, ZERO) + snapshot.locked.get(a, ZERO))
            * (ONE if a == quote else snapshot.markets[f"{a}/{quote}"].mid)
            for a in targets
            if a == quote or f"{a}/{quote}" in snapshot.markets
        }
        total = sum(fresh.values(), ZERO)
        for t in plan.trades:
            if t.symbol not in targets or t.symbol == quote or t.market != f"{t.symbol}/{quote}":
                raise RefusedError(f"the saved plan trades {t.market}, which is not one of this portfolio's markets")
            market = snapshot.markets[t.market]
            drift = targets[t.symbol] - fresh.get(t.symbol, ZERO) / total if total > 0 else ZERO
            wanted = "buy" if drift > 0 else "sell"
            if t.side != wanted:
                raise RefusedError(
                    f"the saved plan would {t.side} {t.symbol}, but it is {'under' if drift > 0 else 'over'}weight "
                    f"by {abs(drift) * 100:.4f}%: plan again"
                )
            most = abs(drift) * total / market.mid * (1 + self.config.price_tolerance) + market.amount_step
            if t.amount > most:
                raise RefusedError(
                    f"the saved plan would {t.side} {t.amount} {t.symbol}, more than the {most.normalize()} that "
                    "would bring it back to target: plan again"
                )

    def _synced(self) -> None:
        """The ledger synced to the snapshot, if it was not yet in this run."""
        sync, self._unsynced = self._unsynced, None
        if sync is not None:
            sync()

    def _sync_ledger(self, snapshot: Snapshot, report: ExecutionReport) -> None:
        """The exchange is the truth; replace the ledger's holdings with it unless orders are in flight."""
        holdings = {a: snapshot.balances.get(a, ZERO) + snapshot.locked.get(a, ZERO) for a in snapshot.balances}
        # one atomic step: replaced only while no order is in flight (checking the locks first was a round trip,
        # and a race with a lock taken in between)
        self._holdings = None
        if self.ledger.sync_balances(self.pid, holdings, fence=self.fence, unless_locked=True):
            self._holdings = holdings
        else:
            report.notes.append("ledger kept its own holdings: another order of this portfolio is in flight")

    def _outcome(self, t: Trade) -> OrderOutcome:
        return OrderOutcome(t.idempotency_key, t.symbol, t.market, t.side, t.amount, est_price=t.est_price)

    def _emit(self, o: OrderOutcome) -> None:
        if self.listener is not None:
            self.listener(o)

    def _execute(self, plan: Plan, snapshot: Snapshot, report: ExecutionReport, *, saved: bool) -> None:
        """The sells, side by side (each sells its own asset: they are independent), then the buys, side by
        side too once their amounts are fixed: each is fitted, in plan order, to the quote the sells really
        freed minus what the buys before it may spend. Every order follows the same per-key protocol (intent,
        lock, SENT, fenced send, settle), so running them at once changes nothing of what a crash or a second
        writer can do to any one of them; it only stops them waiting for each other's round trips."""
        mids = {a.symbol: a.mid for a in plan.assets}
        pairs = list(zip(plan.trades, report.outcomes, strict=True))
        turnover = ZERO
        last = "buy" if any(t.side == "buy" for t in plan.trades) else "sell"
        self._outcomes = report.outcomes
        for side in ("sell", "buy"):
            group = [(t, o) for t, o in pairs if t.side == side]
            ready: list[tuple[Trade, OrderOutcome]] = []
            for trade, outcome in group:
                notional = self._admit(trade, outcome, mids, turnover, snapshot)
                if notional is not None:
                    ready.append((trade, outcome))
                    turnover += notional
            free: dict[str, Decimal] = {}  # the quote free before the group's buys, read once per quote
            if side == "buy":
                self._synced()  # the buys are fitted to the quote the ledger holds
            amounts = self._fit_buys(ready, snapshot, free) if side == "buy" else [t.amount for t, _ in ready]
            self._send_group(plan, ready, amounts, snapshot, free, saved=saved, last=side == last)
            if self._circuit_open is not None:
                for _, rest in pairs:
                    if rest.status == "pending":
                        rest.status, rest.reason = "skipped", "circuit breaker open: cycle ended"
                        self._emit(rest)
                return
            # the buys are admitted against what the sells really traded, not their estimate
            turnover = sum((o.cost for t, o in pairs if t.side == "sell"), ZERO)

    def _admit(
        self, trade: Trade, outcome: OrderOutcome, mids: dict[str, Decimal], turnover: Decimal, snapshot: Snapshot
    ) -> Decimal | None:
        """The checks before an order may start, in plan order: the notional it was admitted at (priced on the
        fresh book), or None when it may not start (the reason already reported)."""
        if self.stop.is_set():
            outcome.status, outcome.reason = "skipped", "shutting down: not started"
        elif self._halted_by is not None:
            outcome.status, outcome.reason = "refused", f"portfolio halted during this cycle: {self._halted_by}"
        else:
            refusal, notional = self._guard(trade, mids.get(trade.symbol), turnover, snapshot)
            if refusal is None:
                return notional
            outcome.status, outcome.reason = "refused", refusal
            self.audit.record_event(
                self.pid, "guard_refused", {"key": trade.idempotency_key, "why": refusal}, self.clock()
            )
        self._emit(outcome)
        return None

    def _fit_buys(
        self, ready: list[tuple[Trade, OrderOutcome]], snapshot: Snapshot, free: dict[str, Decimal]
    ) -> list[Decimal]:
        """Each buy's amount, in plan order, against the quote still free once the buys before it are counted
        at the most they may spend (their limit, fee included): sent at once, they can never overspend.
        `free` is filled with what the ledger said was free of each quote before them."""
        left: dict[str, Decimal] = {}
        amounts: list[Decimal] = []
        for trade, _ in ready:
            market = snapshot.markets[trade.market]
            if market.quote not in free:
                free[market.quote] = left[market.quote] = self.ledger.available(self.pid, market.quote)
            amount = self._fit_buy(trade, snapshot, left[market.quote])
            if amount > 0:
                left[market.quote] -= amount * self._bound(market, "buy", amount) * (1 + market.taker_fee)
            amounts.append(amount)
        return amounts

    def _send_group(
        self,
        plan: Plan,
        ready: list[tuple[Trade, OrderOutcome]],
        amounts: list[Decimal],
        snapshot: Snapshot,
        free: Mapping[str, Decimal],
        *,
        saved: bool,
        last: bool = False,
    ) -> None:
        """Every intent of the group in one store round trip (write-ahead, before the first of them leaves),
        every lock in one ledger round trip, then each order's send and settlement side by side."""
        prepared: list[tuple[Trade, OrderOutcome, OrderIntent]] = []
        for (trade, outcome), amount in zip(ready, amounts, strict=True):
            intent = self._intent(plan, trade, outcome, amount, saved=saved)
            if intent is not None:
                prepared.append((trade, outcome, intent))
        if not prepared:
            return
        intents = [intent for _, _, intent in prepared]
        jobs: list[Callable[[], Any]] = [functools.partial(self.audit.record_intents, intents)]
        if self._unsynced is not None:
            jobs.append(self._synced)  # the first group's: the ledger's sync beside the intents' commit
        new = cast(list[bool], side_by_side(jobs)[0])
        # an intent this run did not write is another run's, or an earlier one's: never sent again from here
        prepared = [
            p for p, fresh in zip(prepared, new, strict=True) if fresh or not self._known(p[0].idempotency_key, p[1])
        ]
        if not prepared:
            return
        failpoints.hit("after_intent")
        worsts = [self._bound(snapshot.markets[t.market], t.side, i.amount) for t, _, i in prepared]
        needs = self._lock_needs(prepared, worsts, snapshot, free)
        granted = self.ledger.lock_many(
            self.pid,
            [(t.idempotency_key, asset, amount) for (t, _, _), (asset, amount) in zip(prepared, needs, strict=True)],
            ttl_seconds=self.lock_ttl,
            fence=self.fence,
        )
        locked = []
        keys: list[str] = []
        answered: list[_Booked] = []  # the group's answers, each appended by its own thread
        for (trade, outcome, intent), worst, (asset, amount), ok in zip(prepared, worsts, needs, granted, strict=True):
            if ok:
                # no audit write for the lock: the ledger holds it, and recovery treats a lock like an intent
                outcome.status = "locked"
                self._emit(outcome)
                locked.append(functools.partial(self._order, trade, outcome, intent, worst, answered))
                keys.append(trade.idempotency_key)
                continue
            reason = f"shadow ledger refused to lock {amount} {asset}: not available"
            self.audit.update_order(trade.idempotency_key, OrderStatus.REJECTED, at=self.clock(), reason=reason)
            self.audit.record_event(
                self.pid,
                "lock_failed",
                {"key": trade.idempotency_key, "asset": asset, "amount": str(amount)},
                self.clock(),
            )
            outcome.status, outcome.reason, outcome.lock_refused = "rejected", reason, True
            self._emit(outcome)
        if not locked:
            return
        failpoints.hit("after_lock", quiesce=self._quiesce)
        self._premark(keys)
        try:
            with self.exchange.batch(len(locked)):
                side_by_side(locked)
        finally:
            # every answer into the ledger in one step, in plan order, also when another order of the group
            # failed (what did trade is booked now, not left to the next run's recovery)
            order = {id(o): i for i, (_, o, _) in enumerate(prepared)}
            if answered:
                failpoints.hit("before_commit")  # the group's fills are in the audit trail, none in the ledger
            memory = None
            if last and answered:  # the cycle's memory rides on its last fills (what run would write after)
                executed = {o.symbol for o in self._outcomes if o.filled > 0}
                memory = self._memory_after(executed | {b.outcome.symbol for b in answered if b.filled > 0})
            self._apply(sorted(answered, key=lambda b: order[id(b.outcome)]), memory=memory)

    def _intent(
        self, plan: Plan, trade: Trade, outcome: OrderOutcome, amount: Decimal, *, saved: bool
    ) -> OrderIntent | None:
        """The intent to write for `trade` (`amount`: a buy's, fitted to the quote it may spend), or None when
        it may not go (the reason already reported)."""
        if saved and self._known(trade.idempotency_key, outcome):
            return None
        if trade.side == "buy":
            if amount <= 0:
                outcome.status, outcome.reason = "skipped", "not enough quote freed by the sells for this buy"
                self._emit(outcome)
                return None
            outcome.amount = amount
        return OrderIntent(
            key=trade.idempotency_key,
            portfolio_id=self.pid,
            plan_id=plan.plan_id,
            market=trade.market,
            side=trade.side,
            amount=amount,
            est_price=trade.est_price,
            created_at=self.clock(),
        )

    def _order(
        self, trade: Trade, outcome: OrderOutcome, intent: OrderIntent, worst: Decimal, group: list[_Booked]
    ) -> None:
        try:
            with span("order", portfolio=self.pid, market=trade.market, side=trade.side, key=trade.idempotency_key):
                self._one(trade, outcome, intent, worst, group)
        except CircuitOpenError as exc:
            outcome.status, outcome.reason = "unknown" if outcome.status == "sent" else "failed", str(exc)
            self._emit(outcome)
            self._circuit_open = exc

    def _guard(
        self, trade: Trade, mid: Decimal | None, turnover: Decimal, snapshot: Snapshot
    ) -> tuple[str | None, Decimal]:
        """(refusal or None, notional): guards on what would be sent, priced on the fresh snapshot's book,
        never on numbers carried by the trade (a saved plan's notional or price may say anything)."""
        c = self.config
        market = snapshot.markets.get(trade.market)
        if market is None:
            return f"{trade.market} is not in the snapshot", ZERO
        est = CostModel().estimate(market, trade.side, trade.amount)
        notional = est.notional
        if est.capped:
            return f"{trade.amount} {market.base} is more than the visible book holds", notional
        if c.max_trade_notional is not None and notional > c.max_trade_notional:
            return f"notional {notional:.2f} above max_trade_notional {c.max_trade_notional}", notional
        if c.max_cycle_turnover is not None and turnover + notional > c.max_cycle_turnover:
            return f"cycle turnover would reach {turnover + notional:.2f}, above max_cycle_turnover", notional
        if c.max_slippage is not None and mid:
            slip = abs(est.est_price - mid) / mid
            if slip > c.max_slippage:
                why = f"estimated price {slip * 100:.3f}% from mid, above max_slippage {c.max_slippage * 100}%"
                return why, notional
        return None, notional

    # -- one order --------------------------------------------------------------------------------------------

    def _one(
        self, trade: Trade, outcome: OrderOutcome, intent: OrderIntent, worst: Decimal, group: list[_Booked]
    ) -> None:
        """One order's protocol once its intent is written and its funds are locked: the last checks, the send
        at no worse than `worst`, its fills booked in the audit trail; `group` gets what the ledger must apply
        (`_send_group` applies a group's answers together)."""
        amount = intent.amount
        key = trade.idempotency_key

        def mark_sent() -> None:
            # After any rate-limit wait, the request's signature time is frozen, then this runs: recovery counts
            # the exchange's receive window from the mark's time, so it must not be earlier than the signature
            # (`_mark`: the group's mark, stamped ahead, or one of its own). The fence, the kill switch and the lock
            # were checked and the "leaving" mark written in one atomic ledger step: a successor that took the
            # lease after it finds the mark and waits out the settle window. The audit row's SENT is history
            # only, so it is written behind.
            check, detail, at = self._mark(key)
            if check == "halted":
                self._halted_by = detail
                raise SendRefusedError(f"not sent: the portfolio was halted ({detail})")
            if check != "ok":
                raise SendRefusedError("not sent: its lock was taken back by another writer's recovery")
            self.audit.update_order(key, OrderStatus.SENT, at=at)
            outcome.status = "sent"
            self._emit(outcome)

        self._bounds[key] = worst
        try:
            result = self._send(trade.market, trade.side, amount, key, mark_sent, worst)
        except (SendRefusedError, LeaseLostError) as exc:
            reason = str(exc) if isinstance(exc, SendRefusedError) else f"not sent: {exc}"
            with contextlib.suppress(LeaseLostError):
                self.ledger.release(self.pid, key, fence=self.fence)
            self.audit.update_order(key, OrderStatus.CANCELLED, at=self.clock(), reason=reason)
            outcome.status, outcome.reason = "refused", reason
            self._emit(outcome)
            if isinstance(exc, LeaseLostError):
                raise
            return
        except NonRetryableExchangeError as exc:
            self.ledger.release(self.pid, trade.idempotency_key, fence=self.fence)
            self.audit.update_order(trade.idempotency_key, OrderStatus.REJECTED, at=self.clock(), reason=str(exc))
            outcome.status, outcome.reason = "rejected", str(exc)
            self._emit(outcome)
            return
        except CircuitOpenError:
            self.audit.update_order(
                trade.idempotency_key,
                OrderStatus.UNKNOWN,
                at=self.clock(),
                reason="circuit open before the outcome was known",
            )
            raise
        except ExchangeError as exc:
            # outcome unknown and the exchange cannot tell us now: keep the lock, the next run settles it
            self.audit.update_order(trade.idempotency_key, OrderStatus.UNKNOWN, at=self.clock(), reason=str(exc))
            outcome.status, outcome.reason = "unknown", f"outcome unknown, settled on the next run: {exc}"
            self._emit(outcome)
            return
        failpoints.hit("after_answer")
        booked = self._book(intent, result, outcome, first_report=True)
        if isinstance(booked, _Booked):
            group.append(booked)

    def _premark(self, keys: list[str]) -> None:
        """The fence, the kill switch and every lock of the group checked, and the orders marked as leaving, in
        one ledger step before the first of them leaves, stamped `MARK_AHEAD` from now. What it found (or raised)
        is each order's to act on at its send, as if it had asked on its own."""
        at = self.clock() + MARK_AHEAD
        try:
            checks = self.ledger.begin_send_many(self.pid, keys, fence=self.fence, at=at)
        except BaseException as exc:  # raised at each order's send, where a lost lease or a store error belongs
            self._premarks = dict.fromkeys(keys, exc)
            return
        self._premarks = {k: (c, d, at) for k, (c, d) in zip(keys, checks, strict=True)}

    def _mark(self, key: str) -> tuple[SendCheck, str, datetime]:
        """The order's "leaving" mark, right before its request leaves (its signature's time frozen already):
        the group's, when this is the order's first send and the mark's time is still ahead; else its own."""
        premark = self._premarks.pop(key, None)
        if isinstance(premark, BaseException):
            raise premark
        if premark is not None and self.clock() <= premark[2]:
            return premark
        at = self.clock()
        check, detail = self.ledger.begin_send(self.pid, key, fence=self.fence, at=at)
        return check, detail, at

    def _known(self, key: str, outcome: OrderOutcome) -> bool:
        """An order under this key exists already (a saved plan run twice): never send it again from here.

        A finished one is done; a live one belongs to another run, or to recovery. Re-sending a live key would
        trade twice on Binance-like exchanges, which refuse a repeated client order id only while it is open.
        """
        existing = self.audit.order(key)
        if existing is None:
            return False
        outcome.filled = existing.filled
        if existing.status == OrderStatus.FILLED:
            outcome.status, outcome.reason = "skipped", "already executed earlier"
        elif existing.status.terminal:
            # its key is spent: this plan can no longer carry the trade out, and must not look as if it had
            outcome.status = "rejected"
            outcome.reason = f"{existing.status} in an earlier run and cannot be sent again under its key: plan again"
        else:
            outcome.status = "unknown"
            outcome.reason = f"in flight in another run ({existing.status}); the next run settles it"
        self._emit(outcome)
        return True

    def _quiesce(self) -> None:
        """Let queued audit writes finish (failpoints only: a test freezing this process right here)."""
        flush = getattr(self.audit, "flush", None)
        if flush is not None:
            flush()

    def _bound(self, market: Market, side: str, amount: Decimal) -> Decimal:
        """The worst acceptable price of an order of `amount`, from the fresh snapshot's book (never from a file)."""
        return worst_acceptable_price(
            market, side, amount, self.config.max_slippage or DEFAULT_PRICE_BOUND, market.price_step
        )

    def _fit_buy(self, trade: Trade, snapshot: Snapshot, available: Decimal) -> Decimal:
        """Size a buy against the quote the ledger says is free now, after the sells really settled.

        A protected buy may spend up to `amount * limit * (1 + fee)`: exchanges reserve the quote of a limit order
        at its limit price. The buy shrinks only when the free quote does not cover that.
        """
        market = snapshot.markets[trade.market]
        amount = trade.amount
        for _ in range(3):  # a smaller buy walks less deep, so its limit can only fall: this converges at once
            most = amount * self._bound(market, "buy", amount) * (1 + market.taker_fee)
            if most <= available:
                break
            amount = round_down(amount * available / most, market.amount_step)
            if amount <= 0:
                return ZERO
        else:
            return ZERO
        if amount == trade.amount:
            return amount
        est = CostModel().estimate(market, "buy", amount)
        if est.notional < market.min_notional:
            return ZERO
        return est.amount

    def _lock_needs(
        self,
        prepared: list[tuple[Trade, OrderOutcome, OrderIntent]],
        worsts: list[Decimal],
        snapshot: Snapshot,
        free: Mapping[str, Decimal],
    ) -> list[tuple[str, Decimal]]:
        """(asset, amount) each order locks: a sell its base; a buy the most its protected order may spend
        (limit price, fee included), capped, in order, by the quote still free after the buys before it (of
        `free`, the ledger's figure before the group; read here when missing)."""
        left = dict(free)
        out = []
        for (trade, _, intent), limit in zip(prepared, worsts, strict=True):
            market = snapshot.markets[trade.market]
            if trade.side == "sell":
                out.append((market.base, intent.amount))
                continue
            most = (intent.amount * limit * (1 + market.taker_fee)).quantize(Decimal("1e-8"), rounding=ROUND_UP)
            if market.quote not in left:
                left[market.quote] = self.ledger.available(self.pid, market.quote)
            available = left[market.quote]
            need = min(most, available) if available > 0 else most
            left[market.quote] = available - need
            out.append((market.quote, need))
        return out

    def _send(
        self,
        market: str,
        side: str,
        amount: Decimal,
        key: str,
        mark_sent: Callable[[], None],
        worst_price: Decimal,
    ) -> OrderResult:
        """Send once; on an unknown outcome look up by client order id, re-send (same id) only if unknown."""
        for attempt in range(1, MAX_SENDS + 1):
            try:
                return self.exchange.create_order(
                    market,
                    Side(side),
                    amount,
                    key,
                    worst_price=worst_price,
                    before_send=_then_failpoint(mark_sent, self._quiesce),
                )
            except OrderAlreadyPlacedError as exc:
                found = self._lookup(market, key, exc, settle=False)
                if found is not None:
                    return found
                raise ExchangeError(f"exchange says order {key} exists but cannot find it") from None
            except RetryableExchangeError as exc:
                found = self._lookup(market, key, exc, settle=True)
                if found is not None:
                    return found
                if attempt == MAX_SENDS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _lookup(self, market: str, key: str, cause: ExchangeError, *, settle: bool) -> OrderResult | None:
        """Find an order whose outcome is unknown; the exchange may still execute one in flight until its
        receive window passed, so with `settle` a missing order is looked up again after that window.

        A lookup refused on its merits (permissions, a bad symbol) says nothing about the order: it must not
        pass for a refusal of the order itself, which would release its lock and close it as rejected while it
        may have traded. It is raised as an unknown outcome instead, for the next run to settle.
        """
        try:
            found = self.exchange.fetch_order(market, key)
            if found is None and settle and self.settle_window > 0:
                self.sleep(self.settle_window)
                found = self.exchange.fetch_order(market, key)
        except NonRetryableExchangeError as exc:
            raise ExchangeError(f"order {key}: outcome unknown after {cause}; looking it up failed: {exc}") from exc
        return found

    # -- settling ---------------------------------------------------------------------------------------------

    def settle(
        self,
        intent: OrderIntent,
        result: OrderResult,
        outcome: OrderOutcome | None = None,
        *,
        first_report: bool = False,
    ) -> OrderOutcome:
        """Record what the exchange says happened, in audit then ledger; both steps are idempotent.

        `first_report`: the answer to our own send in this run, so no fill of it can be recorded yet.
        """
        booked = self._book(intent, result, outcome, first_report=first_report)
        if isinstance(booked, OrderOutcome):
            return booked
        self._apply([booked])
        return booked.outcome

    def _book(
        self,
        intent: OrderIntent,
        result: OrderResult,
        outcome: OrderOutcome | None = None,
        *,
        first_report: bool = False,
    ) -> _Booked | OrderOutcome:
        """The first half of `settle`: the fills recorded in the audit trail (idempotent, keyed by trade id), and
        what the ledger must then be told; or the outcome itself when there is nothing to apply (still open,
        suspect). Nothing terminal is written here: the order's final status follows the ledger's commit, so
        a crash in between leaves an order recovery settles, never a closed one whose lock still holds funds."""
        o = outcome or OrderOutcome(intent.key, intent.market.split("/")[0], intent.market, intent.side, intent.amount)
        if not result.is_final:
            # market orders should never rest; a live one is cancelled so nothing trades behind our back
            try:
                # it may have finished between the answer and the cancel: the lookup below says how
                with contextlib.suppress(OrderNotFoundError):
                    self.exchange.cancel_order(intent.market, intent.key)
                refreshed = self.exchange.fetch_order(intent.market, intent.key)
                result = refreshed or result
            except ExchangeError as exc:
                self.audit.update_order(intent.key, OrderStatus.UNKNOWN, at=self.clock(), reason=str(exc))
                o.status, o.reason = "unknown", f"order still open and could not be cancelled: {exc}"
                self._emit(o)
                return o
            if not result.is_final:
                self.audit.update_order(
                    intent.key, OrderStatus.UNKNOWN, at=self.clock(), reason="still open after a cancel"
                )
                o.status, o.reason = "unknown", "order still open after a cancel; the next run settles it"
                self._emit(o)
                return o
        base, quote = intent.market.split("/")
        fills = list(result.fills)
        synthesized = result.filled > 0 and not fills
        if synthesized:
            # the exchange gave totals only: one fill stands for them (its price is a quotient, the books use cost)
            fee_ccy, fee = next(iter(result.fees.items()), (quote, ZERO))
            fills = [
                FillInfo(
                    f"{result.exchange_order_id}-total",
                    result.filled,
                    result.cost / result.filled,
                    fee,
                    fee_ccy,
                    self.clock(),
                )
            ]
        filled = sum((f.amount for f in fills), ZERO)
        cost = sum((f.amount * f.price for f in fills), ZERO)
        if synthesized or filled != result.filled or result.cost > 0:
            # The order's totals are what the exchange booked: a fill's price may be a rounded quotient, so the
            # books take the exchange's own cost (and its filled amount when the listed fills do not add up).
            filled, cost = result.filled, result.cost
        suspect = _suspect(intent, fills, filled, cost)
        if suspect is not None:
            return self._hold_suspect(intent, o, suspect)
        recorded = None if first_report else self.audit.order(intent.key)
        if recorded is None or recorded.filled < filled:
            # An order reported again (a second lookup, recovery, reconcile) is stored once: fills are keyed by
            # trade id, and a report whose fills carry other ids (totals only) adds nothing once its fills are in.
            for f in fills:
                self.audit.record_fill(
                    Fill(intent.key, f.trade_id, f.amount, f.price, f.fee, f.fee_currency or quote, f.at)
                )
        fees = fees_by_currency(fills, quote)
        net: dict[str, Decimal] = {}
        if filled > 0:
            sign = 1 if intent.side == "buy" else -1
            net[base] = net.get(base, ZERO) + sign * filled
            net[quote] = net.get(quote, ZERO) - sign * cost
        for ccy, fee in fees.items():
            net[ccy] = net.get(ccy, ZERO) - fee
        return _Booked(intent, o, result, fills, filled, cost, fees, net, synthesized)

    def _apply(self, booked: Sequence[_Booked], *, memory: str | None = None) -> None:
        """The second half of `settle`, for one order or a whole group: every fill into the ledger in one atomic
        step (an order that filled nothing only gives its lock back), then each order's final status. `memory`:
        the planner's memory to store in that same step (the cycle's last group)."""
        filled = [b for b in booked if b.filled > 0]
        if filled:
            commits = [
                Commit(
                    b.intent.key,
                    {a: -v for a, v in b.net.items() if v < 0},
                    {a: v for a, v in b.net.items() if v > 0},
                )
                for b in filled
            ]
            self.ledger.commit_many(self.pid, commits, fence=self.fence, memory=memory)
            self._memory_stored = memory is not None
            with self._holdings_lock:
                if self._holdings is not None:
                    for b in filled:
                        for ccy, moved in b.net.items():
                            self._holdings[ccy] = self._holdings.get(ccy, ZERO) + moved
        for b in booked:
            if not b.filled:
                self.ledger.release(self.pid, b.intent.key, fence=self.fence)
            self._finish(b)

    def _finish(self, b: _Booked) -> None:
        intent, o, filled = b.intent, b.outcome, b.filled
        if filled == 0:
            status, reason = OrderStatus.REJECTED, f"exchange filled nothing ({b.result.status})"
        elif filled < intent.amount:
            status, reason = OrderStatus.FILLED, f"partially filled: {filled} of {intent.amount} ({b.result.status})"
        else:
            status, reason = OrderStatus.FILLED, None
        self.audit.update_order(
            intent.key, status, at=self.clock(), exchange_order_id=b.result.exchange_order_id, reason=reason
        )
        o.filled, o.cost, o.fees = filled, b.cost, b.fees
        o.avg_price = b.cost / filled if filled else None
        o.status = "rejected" if filled == 0 else ("partial" if filled < intent.amount else "filled")
        o.reason = reason or ""
        if o.avg_price is not None and o.est_price:
            worse = (o.avg_price - o.est_price) * (1 if intent.side == "buy" else -1)
            if worse > 0:
                self.audit.record_event(
                    self.pid,
                    "worse_fill",
                    {"key": intent.key, "est_price": str(o.est_price), "avg_price": str(o.avg_price)},
                    self.clock(),
                )
        if filled > 0:
            self._check_bound(intent, o, b.fills, b.synthesized)
        self._emit(o)

    def _check_bound(self, intent: OrderIntent, o: OrderOutcome, fills: list[FillInfo], synthesized: bool) -> None:
        """A fill beyond the order's worst acceptable price: booked (it happened), then the portfolio is halted,
        since an exchange that fills outside a limit order's price cannot be trusted with the next one."""
        bound = self._bounds.get(intent.key) or self._planned_bound(intent)
        if bound is None or o.avg_price is None:
            return
        buy = intent.side == "buy"
        # listed fills are checked one by one; totals only by their average (a quotient: a hair of tolerance)
        prices = [o.avg_price * (1 - BOUND_TOLERANCE if buy else 1 + BOUND_TOLERANCE)]
        if not synthesized:
            prices += [f.price for f in fills]
        worst = max(prices) if buy else min(prices)
        if (worst > bound) if buy else (worst < bound):
            reason = (
                f"order {intent.key} ({intent.side} {intent.market}) filled at {_short(worst)}, beyond its worst "
                f"acceptable price {_short(bound)}: portfolio halted; check the exchange, then `rebalance resume`"
            )
            self.audit.record_event(
                self.pid,
                "price_breach",
                {"key": intent.key, "bound": str(bound), "avg_price": str(o.avg_price), "worst": str(worst)},
                self.clock(),
            )
            killswitch.halt(self.ledger, self.audit, self.pid, reason, "rebalance (price bound)")
            self._halted_by = reason
            o.status, o.reason = "breached", reason

    def _planned_bound(self, intent: OrderIntent) -> Decimal | None:
        """The bound an order of an earlier run was sent with: its plan's, as the audit trail recorded it."""
        try:
            plan = self.audit.plan(intent.plan_id)
        except StoreError:
            return None
        for t in (plan or {}).get("trades", []):
            if t.get("idempotency_key") == intent.key and t.get("worst_price"):
                try:
                    return Decimal(str(t["worst_price"]))
                except ArithmeticError:
                    return None
        return None

    def _hold_suspect(self, intent: OrderIntent, o: OrderOutcome, problem: str) -> OrderOutcome:
        """An answer that cannot be true is not booked: the order stays open (its lock too), the portfolio is
        halted naming it, and `reconcile --repair` settles it against the exchange once an operator looked."""
        reason = (
            f"order {intent.key} ({intent.side} {intent.market}): the exchange reported {problem}; not booked, "
            "portfolio halted: check the order on the exchange, then `rebalance reconcile --repair`"
        )
        self.audit.update_order(intent.key, OrderStatus.UNKNOWN, at=self.clock(), reason=f"suspect: {problem}")
        self.audit.record_event(self.pid, "suspect_fill", {"key": intent.key, "problem": problem}, self.clock())
        killswitch.halt(self.ledger, self.audit, self.pid, reason, "rebalance (suspect fill)")
        self._halted_by = reason
        o.status, o.reason = "suspect", reason
        self._emit(o)
        return o

    # -- recovery ----------------------------------------------------------------------------------------------

    def _read(self) -> tuple[PlannerState, Snapshot]:
        """The planner's memory and the exchange's snapshot, as the plan reads them; HaltedError first when the
        portfolio is halted (read with the memory, in one round trip)."""
        halt, memory = self.ledger.halt_and_memory(self.pid)
        self.check_halt(halt)
        state = PlannerState.from_json(memory)
        with span("snapshot", portfolio=self.pid, exchange=self.exchange.id):
            return state, self.exchange.fetch_snapshot(self.config, state)

    def recover(self) -> list[OrderOutcome]:
        """Settle every order a previous run left open (crash, timeout), from what the exchange knows."""
        out: list[OrderOutcome] = []
        for record in self.audit.open_orders(self.pid):
            out.append(self._recover_one(record))
        return out

    def _recover_one(self, record: OrderRecord) -> OrderOutcome:
        intent = record.intent
        o = OrderOutcome(
            intent.key,
            intent.market.split("/")[0],
            intent.market,
            intent.side,
            intent.amount,
            est_price=intent.est_price,
        )
        found = self.exchange.fetch_order(intent.market, intent.key)
        # the ledger's mark of the order leaving (`begin_send`), which the audit row's SENT may not show yet
        left_at = self.ledger.sent_at(self.pid, intent.key) if found is None else None
        if found is None and (left_at is not None or record.status in (OrderStatus.SENT, OrderStatus.UNKNOWN)):
            # A request may still be on its way to the exchange: its absence is final only once the receive
            # window passed since it was last sent (an intent or a lock alone never left this machine: no wait).
            last_sent = max(intent.created_at, record.updated_at, left_at or intent.created_at)
            age = (self.clock() - last_sent).total_seconds()
            if age < self.settle_window:
                self.sleep(self.settle_window - age)
                found = self.exchange.fetch_order(intent.market, intent.key)
        if found is not None:
            self.settle(intent, found, o)
            o.reason = f"recovered: {o.reason}" if o.reason else "recovered from an earlier run"
            self.audit.record_event(self.pid, "recovered", {"key": intent.key, "status": o.status}, self.clock())
            return o
        # never reached the exchange: drop it; a fresh plan decides anew from current balances
        self.ledger.release(self.pid, intent.key, fence=self.fence)
        self.audit.update_order(
            intent.key,
            OrderStatus.CANCELLED,
            at=self.clock(),
            reason="never reached the exchange (earlier run stopped); superseded by a new plan",
        )
        o.status, o.reason = "cancelled", "never reached the exchange; superseded by a new plan"
        self._emit(o)
        return o

    def _realized_drift(self, plan: Plan, snapshot: Snapshot) -> Decimal | None:
        """Total drift from the holdings after execution, valued at the snapshot's mids: the ledger's, which
        every fill of this run was just committed to exactly as the exchange reported it (`reconcile` checks
        the two agree), so no balance read is spent on it. They are known without a ledger read when this run
        synced the ledger: what it synced plus what its commits moved."""
        with self._holdings_lock:
            held = dict(self._holdings) if self._holdings is not None else None
        if held is None:
            try:
                held = self.ledger.balances(self.pid)
            except StoreError:
                return None
        values = {}
        for a in plan.assets:
            values[a.symbol] = held.get(a.symbol, ZERO) * a.mid
        total = sum(values.values(), ZERO)
        if total <= 0:
            return None
        return sum((abs(a.target_weight - values[a.symbol] / total) for a in plan.assets), ZERO)
