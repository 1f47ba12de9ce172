"""Write-behind audit: deferred writes are never lost from a caller's view, and never fail silently."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from rebalancer_cli.audit.base import Fill, OrderIntent, OrderStatus
from rebalancer_cli.audit.sqlite import SqliteAuditStore
from rebalancer_cli.audit.writebehind import HOLD_SECONDS, WriteBehindAudit
from rebalancer_cli.errors import StoreError
from rebalancer_cli.ids import new_key


def _intent(key: str) -> OrderIntent:
    return OrderIntent(key, "p", "plan-1", "BTC/USDC", "buy", Decimal("0.5"), Decimal("100"), datetime.now(UTC))


class SlowStore(SqliteAuditStore):
    """A real SQLite store whose deferred writes wait for a gate, to see what callers see meanwhile."""

    gate = threading.Event()

    def record_fill(self, fill: Fill) -> bool:
        self.gate.wait(5)
        return super().record_fill(fill)


def test_reads_see_every_deferred_write_and_close_flushes(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "a.sqlite3")
    store.migrate()
    audit = WriteBehindAudit(store)
    key = new_key()
    assert audit.record_intent(_intent(key))
    audit.record_fill(Fill(key, "t1", Decimal("0.5"), Decimal("101"), Decimal("0.0005"), "BTC", datetime.now(UTC)))
    audit.update_order(key, OrderStatus.FILLED, at=datetime.now(UTC))
    threading.Timer(0.2, SlowStore.gate.set).start()
    record = audit.order(key)  # waits for the queue: the caller sees its own writes
    assert record is not None and record.status is OrderStatus.FILLED and record.filled == Decimal("0.5")
    audit.record_event("p", "note", {"x": "1"}, datetime.now(UTC))
    audit.close()
    reopened = SqliteAuditStore(tmp_path / "a.sqlite3")
    assert [kind for _, kind, _ in reopened.events("p")] == ["note"]
    reopened.close()


def test_a_failed_background_write_is_raised_at_the_next_call(tmp_path: Path) -> None:
    store = SqliteAuditStore(tmp_path / "b.sqlite3")
    store.migrate()
    audit = WriteBehindAudit(store)
    unknown = new_key()
    audit.update_order(unknown, OrderStatus.FILLED, at=datetime.now(UTC))  # never recorded: the store refuses it
    with pytest.raises(StoreError, match="never recorded"):
        audit.flush()
    audit.close()


def test_one_portfolios_failed_write_is_raised_in_that_portfolio_only(tmp_path: Path) -> None:
    """A daemon shares one queue between its portfolios: A's refused write must not fail B's cycle."""
    store = SqliteAuditStore(tmp_path / "d.sqlite3")
    store.migrate()
    shared = WriteBehindAudit(store)
    a, b = shared.scoped("a"), shared.scoped("b")
    a.update_order(new_key(), OrderStatus.FILLED, at=datetime.now(UTC))  # never recorded: refused in the background
    key = new_key()
    assert b.record_intent(_intent(key))
    b.update_order(key, OrderStatus.FILLED, at=datetime.now(UTC))
    b.record_event("b", "note", {"x": "1"}, datetime.now(UTC))
    b.flush()  # A's failure is not B's
    record = b.order(key)
    assert record is not None and record.status is OrderStatus.FILLED
    assert [kind for _, kind, _ in b.events("b")] == ["note"]
    with pytest.raises(StoreError, match="never recorded"):
        a.flush()
    a.flush()  # raised once, then the portfolio goes on
    shared.close()


def _write_behind(path: Path) -> WriteBehindAudit:
    """A write-behind over a fresh, migrated SQLite store at `path` (another connection can read the file)."""
    store = SqliteAuditStore(path)
    store.migrate()
    return WriteBehindAudit(store)


def _written(path: Path, portfolio: str) -> list[str]:
    """What another connection sees in the store's file: what the writer really wrote so far."""
    other = SqliteAuditStore(path)
    try:
        return [kind for _, kind, _ in other.events(portfolio)]
    finally:
        other.close()


def test_writes_wait_while_orders_are_sending_and_a_read_inside_still_sees_them(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    audit = _write_behind(path)
    with audit.sending():
        audit.record_event("p", "first", {}, datetime.now(UTC))
        time.sleep(0.1)
        assert _written(path, "p") == []  # held: the sends have the interpreter to themselves
        assert [kind for _, kind, _ in audit.events("p")] == ["first"]  # a read lifts the hold for itself
        audit.record_event("p", "second", {}, datetime.now(UTC))
        time.sleep(0.1)
        assert _written(path, "p") == ["first"]
    audit.flush()
    assert _written(path, "p") == ["second", "first"]  # newest first
    audit.close()


def test_a_hold_is_bounded_however_many_sends_follow_one_another(tmp_path: Path) -> None:
    path = tmp_path / "d.sqlite3"
    audit = _write_behind(path)
    began = time.monotonic()
    with audit.sending():
        audit.record_event("p", "held", {}, datetime.now(UTC))
        with audit.scoped("q").sending():  # another portfolio's sends, chained onto the first
            while not _written(path, "p") and time.monotonic() - began < 5:
                time.sleep(0.02)
            waited = time.monotonic() - began
    assert _written(path, "p") == ["held"]
    assert HOLD_SECONDS <= waited < HOLD_SECONDS + 1
    audit.close()
