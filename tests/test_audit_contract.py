"""Contract of the audit store: one suite, run against embedded SQLite and against the real PostgreSQL.

PostgreSQL tests work in schemas named rb_test_<hex>, created for this session and dropped at its end, so
they never see another run's rows; per-test isolation comes from `unique_id` portfolios and fresh keys.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import uuid6
from psycopg import sql

from rebalancer_cli.audit import (
    AuditStore,
    Fill,
    OrderIntent,
    OrderStatus,
    SqliteAuditStore,
    open_audit,
)
from rebalancer_cli.audit.base import PARTITION_MONTHS_AHEAD, key_time, migrations, parse_order_key
from rebalancer_cli.audit.postgres import PostgresAuditStore
from rebalancer_cli.errors import InputError, StoreError

_T = TypeVar("_T")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIGRATIONS = [m.name for m in migrations("sqlite")]


# --- helpers --------------------------------------------------------------------------------------


def new_key() -> str:
    return str(uuid6.uuid7())


def key_at(at: datetime) -> str:
    """A UUIDv7 dated `at` (RFC 9562 layout), for orders that belong to another month's partition."""
    ms = (at - _EPOCH) // timedelta(milliseconds=1)
    rand = secrets.randbits(74)
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def make_intent(portfolio_id: str, plan_id: str = "plan-1", **changes: Any) -> OrderIntent:
    values: dict[str, Any] = {
        "key": new_key(),
        "portfolio_id": portfolio_id,
        "plan_id": plan_id,
        "market": "BTC/USDC",
        "side": "buy",
        "amount": Decimal("0.5"),
        "est_price": Decimal("65000"),
        "created_at": datetime.now(UTC),
    }
    values.update(changes)
    return OrderIntent(**values)


def make_fill(key: str, fill_id: str = "t1", **changes: Any) -> Fill:
    values: dict[str, Any] = {
        "key": key,
        "fill_id": fill_id,
        "amount": Decimal("0.1"),
        "price": Decimal("65000"),
        "fee": Decimal("0.0065"),
        "fee_currency": "USDC",
        "at": datetime.now(UTC),
    }
    values.update(changes)
    return Fill(**values)


def month_start(at: datetime, ahead: int = 0) -> datetime:
    index = at.year * 12 + at.month - 1 + ahead
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def in_threads(n: int, fn: Callable[[int], _T]) -> list[_T]:
    """Run fn(0..n-1) in n threads released together; re-raise the first failure."""
    barrier = threading.Barrier(n)
    results: dict[int, _T] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return [results[i] for i in range(n)]


# --- fixtures: one Backend per parameter ------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_schemas(database_url: str) -> Iterator[Callable[[], str]]:
    """Makes fresh schema names; every schema made is dropped when the session ends."""
    made: list[str] = []

    def new() -> str:
        made.append(f"rb_test_{secrets.token_hex(6)}")
        return made[-1]

    yield new
    with psycopg.connect(database_url, autocommit=True) as conn:
        for name in made:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_schema(database_url: str, pg_schemas: Callable[[], str]) -> str:
    """The session's migrated schema, shared by the tests that only need a working store."""
    name = pg_schemas()
    with PostgresAuditStore(database_url, schema=name) as store:
        store.migrate()
    return name


@dataclass
class Backend:
    kind: str
    shared: str  # a migrated database: SQLite file or PostgreSQL schema
    connect: Callable[[str], AuditStore]
    fresh: Callable[[], str]  # a new, empty database
    opened: list[AuditStore] = field(default_factory=list)

    def open(self, target: str | None = None) -> AuditStore:
        store = self.connect(self.shared if target is None else target)
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def be(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        counter = iter(range(1000))
        backend = Backend(
            "sqlite",
            shared=str(tmp_path / "audit.sqlite3"),
            connect=lambda target: SqliteAuditStore(Path(target)),
            fresh=lambda: str(tmp_path / f"fresh-{next(counter)}.sqlite3"),
        )
        backend.open().migrate()
    else:
        url = request.getfixturevalue("database_url")
        backend = Backend(
            "postgres",
            shared=request.getfixturevalue("pg_schema"),
            connect=lambda target: PostgresAuditStore(url, schema=target),
            fresh=request.getfixturevalue("pg_schemas"),
        )
    yield backend
    for store in backend.opened:
        store.close()


@pytest.fixture()
def store(be: Backend) -> AuditStore:
    return be.open()


@pytest.fixture()
def pg(database_url: str, pg_schema: str) -> Iterator[psycopg.Connection[Any]]:
    """A raw connection in the session schema, to look at what the store did inside PostgreSQL."""
    with psycopg.connect(database_url, autocommit=True, options=f"-c search_path={pg_schema}") as conn:
        yield conn


# --- schema and migrations ---------------------------------------------------------------------------


def test_check_fails_before_migrate_and_migrating_twice_changes_nothing(be: Backend, unique_id: str) -> None:
    store = be.open(be.fresh())
    with pytest.raises(StoreError, match=r"audit schema at version 0, expected 1: run `rebalance db migrate`"):
        store.check()
    with pytest.raises(StoreError, match="rebalance db migrate"):
        store.record_event(unique_id, "start", {}, datetime.now(UTC))

    assert store.migrate() == MIGRATIONS
    store.check()
    assert store.migrate() == []
    store.check()
    store.record_event(unique_id, "start", {}, datetime.now(UTC))
    assert [kind for _, kind, _ in store.events(unique_id)] == ["start"]


def test_processes_migrating_at_once_apply_each_migration_exactly_once(be: Backend) -> None:
    target = be.fresh()
    stores = [be.open(target) for _ in range(3)]
    applied = in_threads(3, lambda i: stores[i].migrate())
    assert sorted(name for names in applied for name in names) == MIGRATIONS
    for store in stores:
        store.check()


# --- orders ------------------------------------------------------------------------------------------


def test_a_group_of_intents_is_written_in_one_step_each_answered(store: AuditStore, unique_id: str) -> None:
    """The executor writes a group's intents at once before the first order leaves: each answer says whether
    that key was new, a known key is left as it was, and a key given twice counts once."""
    known = make_intent(f"{unique_id}-known")
    assert store.record_intent(known) is True
    group = [make_intent(f"{unique_id}-{i}") for i in range(3)]
    batch = [group[0], replace(known, amount=Decimal("9")), group[1], group[2], group[1]]
    assert store.record_intents(batch) == [True, False, True, True, False]
    for intent in [*group, known]:
        record = store.order(intent.key)
        assert record is not None and record.intent == intent and record.status is OrderStatus.INTENT
    assert store.record_intents([]) == []


def test_an_intent_recorded_twice_is_stored_once_unchanged(store: AuditStore, unique_id: str) -> None:
    first = make_intent(unique_id)
    assert store.record_intent(first) is True
    assert store.record_intent(replace(first, amount=Decimal("9"), market="ETH/USDC")) is False

    record = store.order(first.key)
    assert record is not None
    assert record.intent == first
    assert record.status is OrderStatus.INTENT
    assert (record.filled, record.avg_price, record.fees) == (Decimal(0), None, {})
    assert [r.intent.key for r in store.open_orders(unique_id)] == [first.key]


@pytest.mark.parametrize(
    "bad",
    ["not-a-uuid", str(uuid.uuid4()), str(uuid6.uuid7()).upper(), str(uuid6.uuid7()).replace("-", "")],
    ids=["garbage", "uuid4", "uppercase", "unhyphenated"],
)
def test_order_keys_must_be_canonical_uuid7(store: AuditStore, unique_id: str, bad: str) -> None:
    with pytest.raises(InputError):
        make_intent(unique_id, key=bad)
    with pytest.raises(InputError):
        store.order(bad)
    with pytest.raises(InputError):
        store.update_order(bad, OrderStatus.SENT, at=datetime.now(UTC))


def test_unknown_orders_are_reported_not_invented(store: AuditStore, unique_id: str) -> None:
    key = new_key()
    assert store.order(key) is None
    with pytest.raises(InputError, match="never recorded"):
        store.update_order(key, OrderStatus.SENT, at=datetime.now(UTC))
    with pytest.raises(InputError, match="never recorded"):
        store.record_fill(make_fill(key))
    assert store.order(key) is None


def test_inputs_that_would_lose_precision_or_time_are_refused(store: AuditStore, unique_id: str) -> None:
    with pytest.raises(InputError, match="Decimal"):
        make_intent(unique_id, amount=0.1)
    with pytest.raises(InputError, match="finite"):
        make_intent(unique_id, est_price=Decimal("NaN"))
    with pytest.raises(InputError, match="positive"):
        make_intent(unique_id, amount=Decimal("-1"))
    with pytest.raises(InputError, match="timezone"):
        make_intent(unique_id, created_at=datetime(2026, 1, 1))
    with pytest.raises(InputError, match="side"):
        make_intent(unique_id, side="long")
    with pytest.raises(InputError, match="Decimal"):
        store.record_plan("p", unique_id, datetime.now(UTC), {}, 0.01)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="timezone"):
        store.record_event(unique_id, "x", {}, datetime(2026, 1, 1))
    with pytest.raises(InputError, match="JSON"):
        store.record_event(unique_id, "x", {"obj": object()}, datetime.now(UTC))
    assert store.events(unique_id) == []


def test_open_orders_are_the_non_terminal_ones_oldest_first(store: AuditStore, unique_id: str) -> None:
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    statuses = list(OrderStatus)
    intents = {s: make_intent(unique_id, created_at=t0 + timedelta(seconds=i)) for i, s in enumerate(statuses)}
    for status in reversed(statuses):  # recorded newest first: order must come from created_at
        assert store.record_intent(intents[status])
        if status is not OrderStatus.INTENT:
            store.update_order(intents[status].key, status, at=t0 + timedelta(minutes=1), reason=f"r-{status}")
    partial = intents[OrderStatus.PARTIALLY_FILLED].key
    assert store.record_fill(make_fill(partial, amount=Decimal("0.2"), price=Decimal("64000")))
    store.record_intent(make_intent(f"{unique_id}-other"))

    live = store.open_orders(unique_id)

    expected = [s for s in statuses if s not in (OrderStatus.FILLED, OrderStatus.REJECTED, OrderStatus.CANCELLED)]
    assert [r.intent.key for r in live] == [intents[s].key for s in expected]
    assert [r.status for r in live] == expected
    by_key = {r.intent.key: r for r in live}
    assert by_key[partial].filled == Decimal("0.2")
    assert by_key[partial].avg_price == Decimal("64000")
    assert by_key[partial].reason == "r-partially_filled"


def test_recent_orders_are_newest_first_in_any_status_with_fills(store: AuditStore, unique_id: str) -> None:
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    intents = [make_intent(unique_id, created_at=t0 + timedelta(seconds=i)) for i in range(4)]
    for intent in intents:
        store.record_intent(intent)
    store.update_order(intents[1].key, OrderStatus.FILLED, at=t0 + timedelta(minutes=1))
    assert store.record_fill(make_fill(intents[1].key, amount=Decimal("0.5"), price=Decimal("100")))

    recent = store.recent_orders(unique_id, limit=3)

    assert [r.intent.key for r in recent] == [i.key for i in reversed(intents)][:3]
    assert {r.intent.key: r.filled for r in recent}[intents[1].key] == Decimal("0.5")
    assert {r.intent.key: r.status for r in recent}[intents[1].key] is OrderStatus.FILLED


def test_a_terminal_order_is_never_reopened_by_a_late_update(store: AuditStore, unique_id: str) -> None:
    t = datetime.now(UTC)
    filled = make_intent(unique_id)
    store.record_intent(filled)
    assert store.update_order(filled.key, OrderStatus.SENT, at=t, exchange_order_id="ex-1")
    assert store.update_order(filled.key, OrderStatus.FILLED, at=t + timedelta(seconds=1))
    assert store.update_order(filled.key, OrderStatus.SENT, at=t + timedelta(seconds=2)) is False  # late ack

    record = store.order(filled.key)
    assert record is not None
    assert (record.status, record.exchange_order_id) == (OrderStatus.FILLED, "ex-1")
    assert record.updated_at == t + timedelta(seconds=1)
    assert store.open_orders(unique_id) == []

    # an order given up as lost that turns out filled may be corrected to the truth
    lost = make_intent(unique_id)
    store.record_intent(lost)
    store.update_order(lost.key, OrderStatus.UNKNOWN, at=t, reason="timeout")
    store.update_order(lost.key, OrderStatus.REJECTED, at=t, reason="not found")
    assert store.update_order(lost.key, OrderStatus.FILLED, at=t, exchange_order_id="ex-2")
    record = store.order(lost.key)
    assert record is not None
    assert (record.status, record.exchange_order_id, record.reason) == (OrderStatus.FILLED, "ex-2", "not found")


# --- fills and exactness ------------------------------------------------------------------------------


def test_a_fill_reported_twice_is_stored_once_and_sums_are_exact(store: AuditStore, unique_id: str) -> None:
    order = make_intent(unique_id, amount=Decimal("0.3"))
    store.record_intent(order)
    first = make_fill(order.key, "t1", amount=Decimal("0.1"), price=Decimal("100"), fee=Decimal("0.0001"))
    assert store.record_fill(first) is True
    assert store.record_fill(first) is False
    assert store.record_fill(replace(first, amount=Decimal("5"))) is False  # a re-report never overwrites
    store.record_fill(make_fill(order.key, "t2", amount=Decimal("0.1"), price=Decimal("101"), fee=Decimal("0.0001")))
    store.record_fill(
        make_fill(
            order.key, "t3", amount=Decimal("0.1"), price=Decimal("102"), fee=Decimal("0.00005"), fee_currency="BNB"
        )
    )

    record = store.order(order.key)
    assert record is not None
    assert record.filled == Decimal("0.3")  # three float 0.1s would make 0.30000000000000004
    assert record.avg_price == Decimal("101")
    assert record.fees == {"USDC": Decimal("0.0002"), "BNB": Decimal("0.00005")}


def test_decimals_round_trip_exactly(store: AuditStore, unique_id: str) -> None:
    amount = Decimal("123456789012.123456789012345678")  # 30 digits: beyond Decimal's default 28
    price = Decimal("98765432109876543210.987654321098765432")
    fee = Decimal("0.000000000000000001")
    drift = Decimal("0.012345678901234567")
    now = datetime.now(UTC)
    plan = {"trades": [{"amount": amount, "est_price": price}], "total_value": Decimal("1E+30")}
    store.record_plan("plan-x", unique_id, now, plan, drift)
    order = make_intent(unique_id, "plan-x", amount=amount, est_price=price, market="ETH/BTC")
    store.record_intent(order)
    store.record_fill(make_fill(order.key, amount=amount, price=price, fee=fee, fee_currency="ETH"))

    record = store.order(order.key)
    assert record is not None
    assert record.intent == order
    assert (str(record.intent.amount), str(record.intent.est_price)) == (str(amount), str(price))
    assert (record.filled, record.fees) == (amount, {"ETH": fee})
    assert record.avg_price == price
    assert store.plan("plan-x") == {
        "trades": [{"amount": str(amount), "est_price": str(price)}],
        "total_value": "1E+30",
    }
    [execution] = store.history(unique_id)
    with localcontext() as ctx:
        ctx.prec = 200
        assert execution.turnover == amount * price
    assert execution.drift_before == drift
    assert store.fees_since(unique_id, now - timedelta(seconds=1)) == {"ETH": fee}


def test_the_same_fill_from_many_threads_and_stores_is_stored_once(be: Backend, unique_id: str) -> None:
    stores = [be.open(), be.open()]
    order = make_intent(unique_id)
    stores[0].record_intent(order)
    fill = make_fill(order.key, "trade-42", amount=Decimal("0.25"), fee=Decimal("0.01"))

    results = in_threads(8, lambda i: stores[i % 2].record_fill(fill))

    assert results.count(True) == 1
    record = stores[1].order(order.key)
    assert record is not None
    assert (record.filled, record.fees) == (Decimal("0.25"), {"USDC": Decimal("0.01")})


# --- plans, history, fees, events ----------------------------------------------------------------------


def test_a_plan_is_recorded_once_and_finished_once_known(store: AuditStore, unique_id: str) -> None:
    now = datetime.now(UTC)
    plan_id = f"plan-{unique_id}"
    store.record_plan(plan_id, unique_id, now, {"turnover": Decimal("10")}, Decimal("0.05"))
    store.record_plan(plan_id, unique_id, now + timedelta(seconds=5), {"turnover": Decimal("99")}, Decimal("0.9"))
    assert store.plan(plan_id) == {"turnover": "10"}
    assert store.plan("no-such-plan") is None
    [execution] = store.history(unique_id)
    assert (execution.created_at, execution.status, execution.drift_before) == (now, "started", Decimal("0.05"))
    with pytest.raises(InputError, match="never recorded"):
        store.finish_plan("no-such-plan", "done", None, now)


def test_a_hold_only_plan_is_recorded_finished_in_one_call(store: AuditStore, unique_id: str) -> None:
    """The daemon's idle cycles write a hold-only plan once, already finished: history reads it as done."""
    now = datetime.now(UTC).replace(microsecond=0)
    store.record_plan(f"hold-{unique_id}", unique_id, now, {"trades": []}, Decimal("0.004"), finished="done")
    [execution] = store.history(unique_id)
    assert (execution.status, execution.drift_before, execution.drift_after) == (
        "done",
        Decimal("0.004"),
        Decimal("0.004"),
    )


def test_history_sums_each_execution_newest_first(store: AuditStore, unique_id: str) -> None:
    t0 = datetime.now(UTC) - timedelta(hours=2)
    store.record_plan("old", unique_id, t0, {}, Decimal("0.01"))
    store.record_plan("new", unique_id, t0 + timedelta(hours=1), {}, Decimal("0.08"))
    store.record_plan("elsewhere", f"{unique_id}-other", t0 + timedelta(hours=1, minutes=1), {}, Decimal("0.5"))
    sell = make_intent(unique_id, "new", side="sell", market="BTC/USDC")
    buy = make_intent(unique_id, "new", side="buy", market="ETH/USDC")
    failed = make_intent(unique_id, "new", market="SOL/USDC")
    for order in (sell, buy, failed):
        store.record_intent(order)
    store.record_fill(make_fill(sell.key, "s1", amount=Decimal("0.1"), price=Decimal("65000"), fee=Decimal("6.5")))
    store.record_fill(make_fill(sell.key, "s2", amount=Decimal("0.1"), price=Decimal("64990"), fee=Decimal("6.499")))
    store.record_fill(
        make_fill(buy.key, "b1", amount=Decimal("3"), price=Decimal("3000"), fee=Decimal("0.0012"), fee_currency="BNB")
    )
    at = t0 + timedelta(hours=1, seconds=30)
    store.update_order(sell.key, OrderStatus.FILLED, at=at)
    store.update_order(buy.key, OrderStatus.FILLED, at=at)
    store.update_order(failed.key, OrderStatus.REJECTED, at=at, reason="min notional")
    store.finish_plan("new", "incomplete", Decimal("0.002"), at)

    newest, oldest = store.history(unique_id)

    assert (newest.plan_id, oldest.plan_id) == ("new", "old")
    assert (newest.portfolio_id, newest.status, newest.orders, newest.filled_orders) == (
        unique_id,
        "incomplete",
        3,
        2,
    )
    assert newest.turnover == Decimal("6500") + Decimal("6499") + Decimal("9000")
    assert newest.fees == {"USDC": Decimal("12.999"), "BNB": Decimal("0.0012")}
    assert (newest.drift_before, newest.drift_after) == (Decimal("0.08"), Decimal("0.002"))
    assert (oldest.status, oldest.orders, oldest.filled_orders, oldest.turnover, oldest.fees) == (
        "started",
        0,
        0,
        Decimal(0),
        {},
    )
    assert (oldest.drift_after, oldest.created_at) == (None, t0)
    assert [e.plan_id for e in store.history(unique_id, limit=1)] == ["new"]


def test_fees_since_sums_per_currency_from_a_time_on(store: AuditStore, unique_id: str) -> None:
    t0 = datetime.now(UTC)
    order = make_intent(unique_id)
    store.record_intent(order)
    other = make_intent(f"{unique_id}-other")
    store.record_intent(other)
    store.record_fill(make_fill(order.key, "f1", fee=Decimal("1"), at=t0 - timedelta(hours=2)))
    store.record_fill(make_fill(order.key, "f2", fee=Decimal("0.5"), at=t0 - timedelta(hours=1)))
    store.record_fill(make_fill(order.key, "f3", fee=Decimal("0.25"), at=t0))
    store.record_fill(make_fill(order.key, "f4", fee=Decimal("0.001"), fee_currency="BNB", at=t0))
    store.record_fill(make_fill(other.key, "f5", fee=Decimal("100"), at=t0))

    assert store.fees_since(unique_id, t0 - timedelta(minutes=90)) == {
        "USDC": Decimal("0.75"),
        "BNB": Decimal("0.001"),
    }
    assert store.fees_since(unique_id, t0) == {"USDC": Decimal("0.25"), "BNB": Decimal("0.001")}
    assert store.fees_since(unique_id, t0 + timedelta(microseconds=1)) == {}


def test_events_come_back_newest_first_with_exact_decimals(store: AuditStore, unique_id: str) -> None:
    t0 = datetime.now(UTC)
    store.record_event(unique_id, "halt", {"by": "ops", "at": t0}, t0 + timedelta(seconds=2))
    store.record_event(unique_id, "plan", {"drift": Decimal("0.0123"), "trades": [1, 2]}, t0)
    store.record_event(unique_id, "order", {"amount": Decimal("0.000000000000000001")}, t0 + timedelta(seconds=1))
    store.record_event(f"{unique_id}-other", "plan", {}, t0)

    events = store.events(unique_id)

    assert [(at, kind) for at, kind, _ in events] == [
        (t0 + timedelta(seconds=2), "halt"),
        (t0 + timedelta(seconds=1), "order"),
        (t0, "plan"),
    ]
    assert events[1][2] == {"amount": "1E-18"}
    assert events[2][2] == {"drift": "0.0123", "trades": [1, 2]}
    assert events[0][2] == {"by": "ops", "at": t0.isoformat()}
    assert [kind for _, kind, _ in store.events(unique_id, limit=1)] == ["halt"]


def test_ping_succeeds_while_open_and_fails_once_closed(be: Backend) -> None:
    store = be.connect(be.shared)
    store.ping()
    store.close()
    with pytest.raises(StoreError):
        store.ping()


# --- opening ----------------------------------------------------------------------------------------------


def test_open_audit_defaults_to_a_migrated_sqlite_file_in_the_state_dir(state_dir: Path, tmp_path: Path) -> None:
    store = open_audit(None, state_dir)
    try:
        assert isinstance(store, SqliteAuditStore)
        assert store.path == state_dir / "audit.sqlite3"
        store.check()
    finally:
        store.close()
    assert (state_dir / "audit.sqlite3").stat().st_mode & 0o077 == 0  # not readable by others

    explicit = open_audit(f"sqlite://{tmp_path}/elsewhere/a.db", state_dir)
    try:
        assert isinstance(explicit, SqliteAuditStore)
        assert explicit.path == tmp_path / "elsewhere" / "a.db"
        explicit.check()
    finally:
        explicit.close()
    with pytest.raises(InputError, match="absolute"):
        open_audit("sqlite://relative/a.db", state_dir)
    with pytest.raises(InputError, match="mysql"):
        open_audit("mysql://db/x", state_dir)


def test_sqlite_that_cannot_be_opened_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError, match="cannot be opened"):
        open_audit(f"sqlite://{tmp_path}/file/audit.sqlite3", tmp_path)


def test_several_processes_share_one_sqlite_file(tmp_path: Path, unique_id: str) -> None:
    path = tmp_path / "shared.sqlite3"
    with SqliteAuditStore(path) as store:
        store.migrate()
        order = make_intent(unique_id)
        store.record_intent(order)
    script = textwrap.dedent(
        """
        import sys
        from datetime import UTC, datetime
        from decimal import Decimal
        from pathlib import Path
        from rebalancer_cli.audit import Fill, SqliteAuditStore
        path, key, pid = sys.argv[1:]
        with SqliteAuditStore(Path(path)) as store:
            fill = Fill(key, "t1", Decimal("0.5"), Decimal("100"), Decimal("0.1"), "USDC", datetime.now(UTC))
            print(store.record_fill(fill))
            for i in range(25):
                store.record_event(pid, "tick", {"i": i}, datetime.now(UTC))
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(path), order.key, unique_id], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert sorted(out[0] for out in outputs) == ["False", "False", "True"]
    with SqliteAuditStore(path) as store:
        assert len(store.events(unique_id, limit=1000)) == 75
        record = store.order(order.key)
        assert record is not None
        assert record.filled == Decimal("0.5")


@pytest.mark.services
def test_unreachable_postgres_is_a_one_line_store_error_without_the_password() -> None:
    with pytest.raises(StoreError) as caught:
        PostgresAuditStore("postgresql://rebalance:s3cret-pw@127.0.0.1:1/audit", connect_timeout=2)
    message = str(caught.value)
    assert "127.0.0.1:1/audit" in message
    assert "s3cret-pw" not in message
    assert "\n" not in message


@pytest.mark.services
def test_open_audit_reaches_postgres_with_the_schema_in_the_url(
    database_url: str, pg_schemas: Callable[[], str]
) -> None:
    schema = pg_schemas()
    separator = "&" if "?" in database_url else "?"
    store = open_audit(f"{database_url}{separator}options=-csearch_path%3D{schema}", Path("/nonexistent"))
    try:
        assert isinstance(store, PostgresAuditStore)
        with pytest.raises(StoreError, match="create it first"):
            store.migrate()  # the operator owns a schema named in the URL: it is not created behind their back
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        with pytest.raises(StoreError, match="rebalance db migrate"):
            store.check()  # a shared database is migrated on purpose, never as a side effect of opening
        assert store.migrate() == MIGRATIONS
        store.check()
    finally:
        store.close()
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.orders_default",)).fetchone()
    assert row == (True,)


# --- PostgreSQL partitions -------------------------------------------------------------------------------


def _partitions(conn: psycopg.Connection[Any], schema: str, parent: str) -> dict[str, str]:
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
        "JOIN pg_namespace n ON n.oid = p.relnamespace WHERE n.nspname = %s AND p.relname = %s",
        (schema, parent),
    ).fetchall()
    return {name: bound for name, bound in rows}


def _home(conn: psycopg.Connection[Any], table: str, where: str, value: object) -> str:
    """The partition a row physically lives in."""
    query = sql.SQL("SELECT t.tableoid::regclass::text FROM {} AS t WHERE {} = %s").format(
        sql.Identifier(table), sql.Identifier(where)
    )
    row = conn.execute(query, (value,)).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.services
def test_monthly_partitions_exist_for_the_months_ahead_plus_a_default(
    pg: psycopg.Connection[Any], database_url: str, pg_schema: str, unique_id: str
) -> None:
    now = datetime.now(UTC)
    for parent in ("plans", "orders", "fills", "events"):
        partitions = _partitions(pg, pg_schema, parent)
        assert partitions[f"{parent}_default"] == "DEFAULT"
        for ahead in range(PARTITION_MONTHS_AHEAD + 1):
            start, end = month_start(now, ahead), month_start(now, ahead + 1)
            bound = partitions[f"{parent}_p{start:%Y_%m}"]
            assert bound == f"FOR VALUES FROM ('{start:%Y-%m-%d} 00:00:00+00') TO ('{end:%Y-%m-%d} 00:00:00+00')"

    # an order (and its fills) live in the partition of the month inside its key
    with PostgresAuditStore(database_url, schema=pg_schema) as store:
        order = make_intent(unique_id)
        store.record_intent(order)
        store.record_fill(make_fill(order.key))
    month = f"{key_time(parse_order_key(order.key)):%Y_%m}"
    assert _home(pg, "orders", "key", uuid.UUID(order.key)) == f"orders_p{month}"
    assert _home(pg, "fills", "key", uuid.UUID(order.key)) == f"fills_p{month}"


@pytest.mark.services
def test_the_database_ties_each_order_key_to_one_partition(
    pg: psycopg.Connection[Any], database_url: str, pg_schema: str, unique_id: str
) -> None:
    # Python and SQL must date a key identically, to the millisecond, or a key could sit in two partitions
    keys = [key_at(_EPOCH + timedelta(milliseconds=secrets.randbelow(253402300799999))) for _ in range(300)]
    keys += [key_at(datetime(2026, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)), key_at(_EPOCH)]
    rows = pg.execute("SELECT k::text, rb_uuid7_time(k) FROM unnest(%s::uuid[]) AS k", (keys,)).fetchall()
    assert {k: t for k, t in rows} == {k: key_time(parse_order_key(k)) for k in keys}

    with PostgresAuditStore(database_url, schema=pg_schema) as store:
        order = make_intent(unique_id)
        store.record_intent(order)
    with pytest.raises(psycopg.errors.CheckViolation):
        pg.execute(
            "INSERT INTO orders (key, key_time, portfolio_id, plan_id, market, side, amount, est_price, "
            "created_at, status, updated_at) SELECT key, key_time + interval '40 days', portfolio_id, plan_id, "
            "market, side, amount, est_price, created_at, status, updated_at FROM orders WHERE key = %s",
            (uuid.UUID(order.key),),
        )


@pytest.mark.services
def test_rows_beyond_the_horizon_wait_in_default_and_move_into_their_month(
    database_url: str, pg_schemas: Callable[[], str], unique_id: str
) -> None:
    schema = pg_schemas()
    later = month_start(datetime.now(UTC), PARTITION_MONTHS_AHEAD + 3) + timedelta(days=3)
    with (
        PostgresAuditStore(database_url, schema=schema) as store,
        psycopg.connect(database_url, autocommit=True, options=f"-c search_path={schema}") as pg,
    ):
        store.migrate()
        order = make_intent(unique_id, key=key_at(later), created_at=later)
        store.record_intent(order)
        store.record_fill(make_fill(order.key, at=later))
        store.record_event(unique_id, "far", {"n": 1}, later)
        store.record_plan("far-plan", unique_id, later, {}, Decimal("0.1"))
        assert _home(pg, "orders", "key", uuid.UUID(order.key)) == "orders_default"
        assert _home(pg, "events", "portfolio_id", unique_id) == "events_default"

        created = store.ensure_partitions(later)

        month = f"{later:%Y_%m}"
        assert {f"{t}_p{month}" for t in ("plans", "orders", "fills", "events")} <= set(created)
        assert _home(pg, "orders", "key", uuid.UUID(order.key)) == f"orders_p{month}"
        assert _home(pg, "fills", "key", uuid.UUID(order.key)) == f"fills_p{month}"
        assert _home(pg, "events", "portfolio_id", unique_id) == f"events_p{month}"
        assert _home(pg, "plans", "plan_id", "far-plan") == f"plans_p{month}"
        assert store.ensure_partitions(later) == []
        record = store.order(order.key)
        assert record is not None
        assert record.filled == Decimal("0.1")
        assert [kind for _, kind, _ in store.events(unique_id)] == ["far"]

        # the same key still cannot be recorded twice after its row moved
        assert store.record_intent(order) is False

        # partitions dropped by mistake come back when a store opens
        last = f"orders_p{month_start(datetime.now(UTC), PARTITION_MONTHS_AHEAD):%Y_%m}"
        pg.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(last)))
    with PostgresAuditStore(database_url, schema=schema), psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.{last}",)).fetchone()
        assert row == (True,)


@pytest.mark.services
def test_a_role_without_ddl_rights_still_records_and_lets_rows_wait_in_default(
    database_url: str, pg_schemas: Callable[[], str], unique_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Least privilege: the daemon's role writes rows; creating partitions is left to `db migrate`."""
    schema, role = pg_schemas(), f"rb_test_role_{secrets.token_hex(4)}"
    last = f"orders_p{month_start(datetime.now(UTC), PARTITION_MONTHS_AHEAD):%Y_%m}"
    with PostgresAuditStore(database_url, schema=schema) as admin:
        admin.migrate()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE {}.{}").format(sql.Identifier(schema), sql.Identifier(last)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        for grant in (
            "GRANT USAGE ON SCHEMA {schema} TO {role}",
            "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA {schema} TO {role}",
            "GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {role}",
        ):
            conn.execute(sql.SQL(grant).format(schema=sql.Identifier(schema), role=sql.Identifier(role)))
    try:
        role_url = psycopg.conninfo.make_conninfo(database_url, user=role)
        with caplog.at_level("WARNING"), PostgresAuditStore(role_url, schema=schema) as store:
            assert "cannot create monthly partitions" in caplog.text
            order = make_intent(unique_id)
            assert store.record_intent(order)
            assert store.order(order.key) is not None
            with pytest.raises(StoreError, match="permission denied"):
                store.ensure_partitions(datetime.now(UTC))
        with PostgresAuditStore(database_url, schema=schema) as admin:
            assert admin.migrate() == []  # the privileged run creates what the daemon could not
        with psycopg.connect(database_url) as conn:
            row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.{last}",)).fetchone()
            assert row == (True,)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.services
def test_only_the_write_behind_commits_without_waiting_for_the_disk(
    database_url: str, pg_schema: str, unique_id: str
) -> None:
    """Intents are committed durably (synchronous_commit on); the write-behind's writes, which recovery can
    derive again from the exchange, on their own connection with it off."""

    with PostgresAuditStore(database_url, schema=pg_schema) as store:
        order = make_intent(unique_id)
        store.record_intent(order)
        with store._conn() as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        with store.deferred():
            store.record_fill(make_fill(order.key))
            with store._conn() as conn:
                assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
        with store._conn() as conn:  # out of the scope: the durable connections again
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        assert store.order(order.key).filled == make_fill(order.key).amount  # type: ignore[union-attr]
