"""Comparing what the exchange, the shadow ledger and the audit trail each believe, and repairing the two
books we keep from the one we do not (the exchange is the truth about balances and orders).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from . import killswitch
from .audit.base import AuditStore, OrderStatus
from .config import Config
from .errors import ExchangeError
from .exchange.base import Exchange
from .ledger.base import ShadowLedger

ZERO = Decimal(0)
RECENT_ORDERS = 50
# the audit reason of an order whose report stayed suspect: closed from the exchange's balances, its fills
# (at a price that cannot be true) not booked, so its filled amount is not compared again
SETTLED_FROM_BALANCES = "reconcile: settled from the exchange's balances"


@dataclass(frozen=True)
class Difference:
    kind: str  # balance | order | lock | ledger | halt
    subject: str  # asset, or order key
    exchange: str
    ledger: str
    audit: str
    note: str = ""


@dataclass
class ReconcileReport:
    portfolio_id: str
    differences: list[Difference] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.differences

    def to_dict(self) -> dict[str, Any]:
        return {
            "portfolio_id": self.portfolio_id,
            "consistent": self.consistent,
            "differences": [d.__dict__ for d in self.differences],
            "repaired": self.repaired,
        }


def reconcile(
    config: Config,
    exchange: Exchange,
    ledger: ShadowLedger,
    audit: AuditStore,
    *,
    repair: bool = False,
    settle: Callable[..., Any] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    fence: int | None = None,
) -> ReconcileReport:
    """List every disagreement; with `repair`, bring ledger and audit in line with the exchange and record it.

    `fence`: the repairing writer's lease token, carried by every ledger write it makes."""
    pid = config.portfolio_id
    report = ReconcileReport(pid)
    known = killswitch.known_epoch(audit, pid)
    epoch, created = ledger.epoch(pid, uuid.uuid4().hex)
    if known is not None and epoch != known:
        report.differences.append(
            Difference(
                "ledger",
                "epoch",
                "",
                f"epoch {epoch}" + (" (came back empty)" if created else ""),
                f"epoch {known}",
                "the ledger lost its state; repair rebuilds it from the exchange",
            )
        )
    durable = killswitch.durable_halt(audit, pid)
    if durable is not None and ledger.halted(pid) is None:
        report.differences.append(
            Difference("halt", pid, "", "not halted", f"halted: {durable.reason}", "the ledger forgot a halt")
        )
    assets = [a.symbol for a in config.assets]
    free, locked = exchange.fetch_balances()
    held = ledger.balances(pid)
    live_locks = ledger.locks(pid)
    for asset in assets:
        on_exchange = free.get(asset, ZERO) + locked.get(asset, ZERO)
        in_ledger = held.get(asset, ZERO)
        if on_exchange != in_ledger:
            report.differences.append(
                Difference("balance", asset, _s(on_exchange), _s(in_ledger), "", "ledger holdings differ")
            )
    for lock in live_locks:
        record = audit.order(lock.key)
        if record is None or record.status.terminal:
            status = record.status.value if record else "no record"
            report.differences.append(
                Difference(
                    "lock",
                    lock.key,
                    "",
                    f"{_s(lock.amount)} {lock.asset} locked",
                    status,
                    "lock held for an order that is not in flight",
                )
            )
    checked: set[str] = set()
    orders = audit.open_orders(pid) + audit.recent_orders(pid, RECENT_ORDERS)
    for record in orders:
        key = record.intent.key
        if key in checked:
            continue
        checked.add(key)
        try:
            found = exchange.fetch_order(record.intent.market, key)
        except ExchangeError as exc:
            report.differences.append(Difference("order", key, f"lookup failed: {exc}", "", record.status.value))
            continue
        if found is None:
            if record.status in (OrderStatus.FILLED, OrderStatus.PARTIALLY_FILLED) or record.filled > 0:
                report.differences.append(
                    Difference(
                        "order",
                        key,
                        "unknown to the exchange",
                        "",
                        f"{record.status.value} {_s(record.filled)}",
                        "audit records fills the exchange does not know",
                    )
                )
            elif not record.status.terminal:
                report.differences.append(
                    Difference("order", key, "never placed", "", record.status.value, "intent left by an earlier run")
                )
            continue
        settled_by_balances = (record.reason or "").startswith(SETTLED_FROM_BALANCES) and record.status.terminal
        if (found.filled != record.filled and not settled_by_balances) or (
            found.is_final and not record.status.terminal
        ):
            report.differences.append(
                Difference(
                    "order",
                    key,
                    f"{found.status} {_s(found.filled)}",
                    "",
                    f"{record.status.value} {_s(record.filled)}",
                    "audit differs from the exchange",
                )
            )
    if repair and report.differences:
        _repair(config, exchange, ledger, audit, report, free, locked, settle, now, fence)
    return report


def _repair(
    config: Config,
    exchange: Exchange,
    ledger: ShadowLedger,
    audit: AuditStore,
    report: ReconcileReport,
    free: dict[str, Decimal],
    locked: dict[str, Decimal],
    settle: Callable[..., Any] | None,
    now: Callable[[], datetime],
    fence: int | None,
) -> None:
    pid = config.portfolio_id
    resync = any(d.kind in ("balance", "ledger") for d in report.differences)
    for d in report.differences:
        if d.kind == "halt":
            durable = killswitch.durable_halt(audit, pid)
            if durable is not None:
                ledger.halt(pid, durable.reason, durable.by)
                report.repaired.append(f"halt restored from the audit trail: {durable.reason}")
        elif d.kind == "order" and settle is not None:
            record = audit.order(d.subject)
            if record is None:
                continue
            found = exchange.fetch_order(record.intent.market, d.subject)
            if found is not None:
                outcome = settle(record.intent, found)
                if getattr(outcome, "status", None) == "suspect":
                    # the exchange still reports what cannot be true: the order is closed by its balances
                    # (synced below from the exchange), its fills are not booked, and the halt stays
                    ledger.release(pid, d.subject, fence=fence)
                    audit.update_order(
                        d.subject,
                        OrderStatus.FILLED if found.filled > 0 else OrderStatus.CANCELLED,
                        at=now(),
                        reason=f"{SETTLED_FROM_BALANCES}; its report: {outcome.reason}",
                    )
                    report.repaired.append(
                        f"order {d.subject}: closed from the exchange's balances (its report stays suspect); "
                        "the portfolio stays halted until `rebalance resume`"
                    )
                    resync = True
                    continue
                report.repaired.append(f"order {d.subject}: recorded as the exchange reports it ({found.status})")
            elif not record.status.terminal:
                ledger.release(pid, d.subject, fence=fence)
                audit.update_order(
                    d.subject, OrderStatus.CANCELLED, at=now(), reason="reconcile: the exchange never received it"
                )
                report.repaired.append(f"order {d.subject}: cancelled, never reached the exchange")
        elif d.kind == "lock":
            ledger.release(pid, d.subject, fence=fence)
            report.repaired.append(f"lock {d.subject}: released")
    holdings = {a.symbol: free.get(a.symbol, ZERO) + locked.get(a.symbol, ZERO) for a in config.assets}
    if resync:
        if any(d.kind != "balance" for d in report.differences):
            free, locked = exchange.fetch_balances()  # orders were settled above: read the balances again
            holdings = {a.symbol: free.get(a.symbol, ZERO) + locked.get(a.symbol, ZERO) for a in config.assets}
        ledger.sync_balances(pid, holdings, fence=fence)
        report.repaired.append("ledger holdings set to the exchange's balances")
    if any(d.kind == "ledger" for d in report.differences):
        durable = killswitch.durable_halt(audit, pid)
        if durable is not None and ledger.halted(pid) is None:
            ledger.halt(pid, durable.reason, durable.by)
            report.repaired.append(f"halt restored from the audit trail: {durable.reason}")
        adopted = killswitch.adopt_epoch(ledger, audit, pid)
        if adopted:
            report.repaired.append(f"ledger rebuilt from the exchange; its epoch {adopted} is now the trusted one")
    audit.record_event(
        pid,
        "reconcile_repair",
        {"differences": [d.__dict__ for d in report.differences], "repaired": report.repaired},
        now(),
    )


def _s(d: Decimal) -> str:
    return format(d, "f")
