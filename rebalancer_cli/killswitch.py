"""The kill switch and the ledger's epoch: what must survive the loss of the shadow ledger.

A halt lives in two places. The ledger holds the live switch, checked in the same atomic step that lets an
order leave (`ShadowLedger.begin_send`), so a halt pulled mid-cycle stops the very next order. The audit
store keeps every halt and resume as an event: it is durable (PostgreSQL, or SQLite on disk), so a Redis
restarted without persistence cannot silently lift a halt; `verify` puts the switch back before any trade.

The epoch tells a ledger that kept its state from one that came back empty: the ledger adopts a random epoch
the first time it holds a portfolio's state, and the audit store records the epoch it saw. An empty ledger
adopts a new epoch; finding an older one in the audit trail, a writer refuses to trade (its holdings and locks
are gone, so in-flight orders could be spent twice) until `reconcile --repair` rebuilds it from the exchange.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from .audit.base import AuditStore
from .errors import LedgerLostError
from .ledger.base import Halt, ShadowLedger

HALT = "halt"
RESUME = "resume"
EPOCH = "ledger_epoch"


def halt(ledger: ShadowLedger, audit: AuditStore, portfolio_id: str, reason: str, by: str) -> Halt:
    """Pull the switch: durable first (the audit event), then live (the ledger)."""
    at = datetime.now(UTC)
    audit.record_event(portfolio_id, HALT, {"reason": reason, "by": by}, at)
    ledger.halt(portfolio_id, reason, by)
    return ledger.halted(portfolio_id) or Halt(reason, by, at)


def durable_halt(audit: AuditStore, portfolio_id: str) -> Halt | None:
    """The halt the audit trail says is in force: its latest halt event, unless a resume came after it."""
    events = audit.events(portfolio_id, 1, kinds=(HALT, RESUME))
    if not events or events[0][1] != HALT:
        return None
    at, _, detail = events[0]
    return Halt(str(detail.get("reason", "")), str(detail.get("by", "")), at)


def known_epoch(audit: AuditStore, portfolio_id: str) -> str | None:
    events = audit.events(portfolio_id, 1, kinds=(EPOCH,))
    return str(events[0][2].get("epoch")) if events else None


def verify(ledger: ShadowLedger, audit: AuditStore, portfolio_id: str) -> None:
    """Before a writer trades: re-arm a halt the ledger forgot, and refuse a ledger that lost its state."""
    halted = durable_halt(audit, portfolio_id)
    if halted is not None and ledger.halted(portfolio_id) is None:
        ledger.halt(portfolio_id, halted.reason, halted.by)
    known = known_epoch(audit, portfolio_id)
    epoch, created = ledger.epoch(portfolio_id, uuid.uuid4().hex)
    if known is None:
        audit.record_event(portfolio_id, EPOCH, {"epoch": epoch}, datetime.now(UTC))
    elif epoch != known:
        what = "came back empty" if created else f"holds another state (epoch {epoch})"
        raise LedgerLostError(
            f"portfolio {portfolio_id}: the shadow ledger {what}, but the audit trail knows epoch {known} "
            "(a store restarted without persistence?): in-flight orders and locks may be lost; "
            "run `rebalance reconcile --repair` to rebuild it from the exchange before trading"
        )


def adopt_epoch(ledger: ShadowLedger, audit: AuditStore, portfolio_id: str) -> str | None:
    """After a repair rebuilt the ledger from the exchange: record its epoch as the one to trust.

    Returns the epoch adopted when it differs from the one the audit trail knew, else None."""
    known = known_epoch(audit, portfolio_id)
    epoch, _ = ledger.epoch(portfolio_id, uuid.uuid4().hex)
    if epoch == known:
        return None
    audit.record_event(portfolio_id, EPOCH, {"epoch": epoch, "previous": known}, datetime.now(UTC))
    return epoch
