"""Comparing what the exchange, the shadow ledger and the audit trail each believe, and repairing the two
books we keep from the one we do not (the exchange is the truth about balances and orders).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from .audit.base import AuditStore, OrderStatus
from .config import Config
from .errors import ExchangeError
from .exchange.base import Exchange
from .ledger.base import ShadowLedger

ZERO = Decimal(0)
RECENT_ORDERS = 50


@dataclass(frozen=True)
class Difference:
    kind: str  # balance | order | lock
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
) -> ReconcileReport:
    """List every disagreement; with `repair`, bring ledger and audit in line with the exchange and record it."""
    pid = config.portfolio_id
    report = ReconcileReport(pid)
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
        if found.filled != record.filled or (found.is_final and not record.status.terminal):
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
        _repair(config, exchange, ledger, audit, report, free, locked, settle, now)
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
) -> None:
    pid = config.portfolio_id
    for d in report.differences:
        if d.kind == "order" and settle is not None:
            record = audit.order(d.subject)
            if record is None:
                continue
            found = exchange.fetch_order(record.intent.market, d.subject)
            if found is not None:
                settle(record.intent, found)
                report.repaired.append(f"order {d.subject}: recorded as the exchange reports it ({found.status})")
            elif not record.status.terminal:
                ledger.release(pid, d.subject)
                audit.update_order(
                    d.subject, OrderStatus.CANCELLED, at=now(), reason="reconcile: the exchange never received it"
                )
                report.repaired.append(f"order {d.subject}: cancelled, never reached the exchange")
        elif d.kind == "lock":
            ledger.release(pid, d.subject)
            report.repaired.append(f"lock {d.subject}: released")
    holdings = {a.symbol: free.get(a.symbol, ZERO) + locked.get(a.symbol, ZERO) for a in config.assets}
    if any(d.kind == "balance" for d in report.differences):
        ledger.sync_balances(pid, holdings)
        report.repaired.append("ledger holdings set to the exchange's balances")
    audit.record_event(
        pid,
        "reconcile_repair",
        {"differences": [d.__dict__ for d in report.differences], "repaired": report.repaired},
        now(),
    )


def _s(d: Decimal) -> str:
    return format(d, "f")
