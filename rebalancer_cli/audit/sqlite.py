"""Audit store in an embedded SQLite file: the default, needing no server.

Several processes (a daemon and a `rebalance execute` run, say) may share one file: WAL mode lets readers
go on while one writer writes, the busy timeout makes a writer wait for another's lock instead of failing,
and every read-check-write runs in one `BEGIN IMMEDIATE` transaction. `synchronous=FULL` because an order
intent must be on disk before the order leaves: a power cut must not forget an order that may be live.
Decimals are TEXT and are summed in Python's exact context, never as SQLite REAL.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from rebalancer_cli.audit.base import (
    PLAN_STARTED,
    TERMINAL,
    ExecutionRecord,
    Fill,
    OrderIntent,
    OrderRecord,
    OrderStatus,
    average_price,
    check_decimal,
    check_limit,
    check_status,
    check_text,
    check_version,
    checked_intents,
    dump_json,
    exact_mul,
    exact_sum,
    load_json,
    migrations,
    parse_order_key,
    to_utc,
)
from rebalancer_cli.errors import InputError, StoreError
from rebalancer_cli.fsutil import open_sqlite

_T = TypeVar("_T")

# How long a writer waits for another process's write lock before reporting the store as failed.
BUSY_TIMEOUT_SECONDS = 30.0

_TERMINAL_SQL = "('filled', 'rejected', 'cancelled')"
_ORDER_COLUMNS = (
    "key, portfolio_id, plan_id, market, side, amount, est_price, created_at, status, "
    "exchange_order_id, reason, updated_at"
)


def _ts(value: datetime, what: str) -> str:
    """Fixed-width UTC text, so that comparing and sorting the text compares and sorts the times."""
    return to_utc(value, what).isoformat(timespec="microseconds")


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _opt_decimal(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _statements(script: str) -> Iterator[str]:
    """Split a migration into statements; `executescript` cannot be used as it commits on its own."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    leftover = "\n".join(ln for ln in buffer.splitlines() if ln.strip() and not ln.strip().startswith("--"))
    if leftover:
        raise StoreError(f"audit migration ends with an incomplete statement: {leftover[:80]}")


class SqliteAuditStore:
    """AuditStore in one SQLite file; thread-safe (one connection per instance, used under a mutex)."""

    def __init__(self, path: Path, *, busy_timeout: float = BUSY_TIMEOUT_SECONDS) -> None:
        self._path = Path(path)
        self._mutex = threading.RLock()
        try:
            # the trail of a trading account is nobody else's business: owner-only, like the state directory
            self._conn = open_sqlite(self._path, timeout=busy_timeout)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"SQLite audit store {self._path} cannot be opened: {exc}") from exc
        try:
            with self._guard():
                self._conn.execute("PRAGMA synchronous=FULL")
                self._conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            self._conn.close()
            raise

    @property
    def path(self) -> Path:
        return self._path

    def __enter__(self) -> SqliteAuditStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[None]:
        with self._mutex:
            try:
                yield
            except sqlite3.Error as exc:
                if "no such table" in str(exc):
                    raise StoreError(
                        f"SQLite audit store {self._path} has no audit schema ({exc}): run `rebalance db migrate`"
                    ) from exc
                raise StoreError(f"SQLite audit store {self._path} failed: {type(exc).__name__}: {exc}") from exc

    def _tx(self, fn: Callable[[sqlite3.Connection], _T], *, write: bool) -> _T:
        """One transaction: a write one takes the write lock first, so what is read inside stays true."""
        with self._guard():
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = fn(self._conn)
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    with suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise
            return result

    def _exec(self, sql: str, params: tuple[Any, ...]) -> int:
        """One statement in its own (autocommit) transaction; returns the number of rows changed."""
        with self._guard():
            return self._conn.execute(sql, params).rowcount

    # --- schema -----------------------------------------------------------------------------------

    def migrate(self) -> list[str]:
        def run(conn: sqlite3.Connection) -> list[str]:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "name TEXT PRIMARY KEY, version INTEGER NOT NULL, applied_at TEXT NOT NULL)"
            )
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            applied: list[str] = []
            for migration in migrations("sqlite"):
                if migration.name in done:
                    continue
                for statement in _statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (name, version, applied_at) VALUES (?, ?, ?)",
                    (migration.name, migration.version, _ts(datetime.now(UTC), "now")),
                )
                applied.append(migration.name)
            return applied

        return self._tx(run, write=True)

    def schema_version(self) -> int:
        def run(conn: sqlite3.Connection) -> int:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
            ).fetchone()
            if exists is None:
                return 0
            return int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0])

        return self._tx(run, write=False)

    def check(self) -> None:
        check_version(self.schema_version(), migrations("sqlite")[-1].version)

    # --- plans ------------------------------------------------------------------------------------

    def record_plan(
        self,
        plan_id: str,
        portfolio_id: str,
        created_at: datetime,
        plan: Mapping[str, Any],
        drift_before: Decimal,
        *,
        finished: str | None = None,
    ) -> None:
        at = _ts(created_at, "plan created_at")
        before = str(check_decimal(drift_before, "drift_before"))
        params = (
            check_text(plan_id, "plan_id"),
            check_text(portfolio_id, "portfolio_id"),
            at,
            dump_json(plan, "plan"),
            before,
            PLAN_STARTED if finished is None else check_text(finished, "plan status"),
            None if finished is None else before,  # nothing traded: the drift after is the drift before
            None if finished is None else at,
        )
        self._exec(
            "INSERT INTO plans (plan_id, portfolio_id, created_at, plan, drift_before, status, drift_after, "
            "finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (plan_id) DO NOTHING",
            params,
        )

    def finish_plan(self, plan_id: str, status: str, drift_after: Decimal | None, at: datetime) -> None:
        after = None if drift_after is None else str(check_decimal(drift_after, "drift_after"))
        changed = self._exec(
            "UPDATE plans SET status = ?, drift_after = ?, finished_at = ? WHERE plan_id = ?",
            (check_text(status, "plan status"), after, _ts(at, "finished at"), check_text(plan_id, "plan_id")),
        )
        if changed == 0:
            raise InputError(f"plan {plan_id} was never recorded")

    def plan(self, plan_id: str) -> dict[str, Any] | None:
        def run(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute("SELECT plan FROM plans WHERE plan_id = ?", (plan_id,)).fetchone()
            return None if row is None else load_json(row[0])

        return self._tx(run, write=False)

    # --- orders and fills -------------------------------------------------------------------------

    def record_intent(self, intent: OrderIntent) -> bool:
        return self.record_intents([intent])[0]

    def record_intents(self, intents: Sequence[OrderIntent]) -> list[bool]:
        rows = []
        for intent in checked_intents(intents):
            at = _ts(intent.created_at, "created_at")
            rows.append(
                (
                    intent.key,
                    intent.portfolio_id,
                    intent.plan_id,
                    intent.market,
                    intent.side,
                    str(intent.amount),
                    str(intent.est_price),
                    at,
                    OrderStatus.INTENT.value,
                    at,
                )
            )

        def run(conn: sqlite3.Connection) -> list[bool]:
            sql = (
                f"INSERT INTO orders ({_ORDER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?) "
                "ON CONFLICT (key) DO NOTHING"
            )
            return [conn.execute(sql, row).rowcount == 1 for row in rows]

        return self._tx(run, write=True) if rows else []

    def update_order(
        self,
        key: str,
        status: OrderStatus,
        *,
        at: datetime,
        exchange_order_id: str | None = None,
        reason: str | None = None,
    ) -> bool:
        parse_order_key(key)
        new = check_status(status)
        when = _ts(at, "update time")
        # a terminal order may be corrected to another terminal state, never reopened by a late update
        guard = "" if new in TERMINAL else f" AND status NOT IN {_TERMINAL_SQL}"

        def run(conn: sqlite3.Connection) -> bool:
            changed = conn.execute(
                "UPDATE orders SET status = ?, exchange_order_id = coalesce(?, exchange_order_id), "
                f"reason = coalesce(?, reason), updated_at = ? WHERE key = ?{guard}",
                (new.value, exchange_order_id, reason, when, key),
            ).rowcount
            if changed:
                return True
            if conn.execute("SELECT 1 FROM orders WHERE key = ?", (key,)).fetchone() is None:
                raise InputError(f"order {key} was never recorded")
            return False

        return self._tx(run, write=True)

    def record_fill(self, fill: Fill) -> bool:
        if not isinstance(fill, Fill):
            raise InputError(f"record_fill needs a Fill, got {type(fill).__name__}")
        params = (
            fill.key,
            fill.fill_id,
            str(fill.amount),
            str(fill.price),
            str(fill.fee),
            fill.fee_currency,
            _ts(fill.at, "fill time"),
            fill.key,
        )

        def run(conn: sqlite3.Connection) -> bool:
            changed = conn.execute(
                "INSERT INTO fills (key, fill_id, portfolio_id, plan_id, amount, price, fee, fee_currency, at) "
                "SELECT ?, ?, portfolio_id, plan_id, ?, ?, ?, ?, ? FROM orders WHERE key = ? "
                "ON CONFLICT (key, fill_id) DO NOTHING",
                params,
            ).rowcount
            if changed:
                return True
            if conn.execute("SELECT 1 FROM orders WHERE key = ?", (fill.key,)).fetchone() is None:
                raise InputError(f"fill {fill.fill_id} is for order {fill.key}, which was never recorded")
            return False

        return self._tx(run, write=True)

    @staticmethod
    def _record(row: tuple[Any, ...], fills: list[tuple[str, str, str, str]]) -> OrderRecord:
        intent = OrderIntent(
            key=row[0],
            portfolio_id=row[1],
            plan_id=row[2],
            market=row[3],
            side=row[4],
            amount=Decimal(row[5]),
            est_price=Decimal(row[6]),
            created_at=_dt(row[7]),
        )
        filled = exact_sum(Decimal(amount) for amount, _, _, _ in fills)
        notional = exact_sum(exact_mul(Decimal(amount), Decimal(price)) for amount, price, _, _ in fills)
        fees: dict[str, Decimal] = {}
        for _, _, fee, currency in fills:
            fees[currency] = exact_sum([fees.get(currency, Decimal(0)), Decimal(fee)])
        return OrderRecord(
            intent=intent,
            status=OrderStatus(row[8]),
            exchange_order_id=row[9],
            reason=row[10],
            filled=filled,
            avg_price=average_price(notional, filled),
            fees=fees,
            updated_at=_dt(row[11]),
        )

    def order(self, key: str) -> OrderRecord | None:
        parse_order_key(key)

        def run(conn: sqlite3.Connection) -> OrderRecord | None:
            row = conn.execute(f"SELECT {_ORDER_COLUMNS} FROM orders WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            fills = conn.execute("SELECT amount, price, fee, fee_currency FROM fills WHERE key = ?", (key,)).fetchall()
            return self._record(row, fills)

        return self._tx(run, write=False)

    def open_orders(self, portfolio_id: str) -> list[OrderRecord]:
        def run(conn: sqlite3.Connection) -> list[OrderRecord]:
            rows = conn.execute(
                f"SELECT {_ORDER_COLUMNS} FROM orders WHERE portfolio_id = ? AND status NOT IN {_TERMINAL_SQL} "
                "ORDER BY created_at, key",
                (portfolio_id,),
            ).fetchall()
            fills: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)
            for key, *rest in conn.execute(
                "SELECT f.key, f.amount, f.price, f.fee, f.fee_currency FROM fills f JOIN orders o "
                f"ON o.key = f.key WHERE o.portfolio_id = ? AND o.status NOT IN {_TERMINAL_SQL}",
                (portfolio_id,),
            ):
                fills[key].append((rest[0], rest[1], rest[2], rest[3]))
            return [self._record(row, fills[row[0]]) for row in rows]

        return self._tx(run, write=False)

    def recent_orders(self, portfolio_id: str, limit: int = 50) -> list[OrderRecord]:
        check_limit(limit)

        def run(conn: sqlite3.Connection) -> list[OrderRecord]:
            rows = conn.execute(
                f"SELECT {_ORDER_COLUMNS} FROM orders WHERE portfolio_id = ? ORDER BY created_at DESC, key DESC "
                "LIMIT ?",
                (portfolio_id, limit),
            ).fetchall()
            fills: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)
            keys = [row[0] for row in rows]
            for chunk in range(0, len(keys), 500):
                part = keys[chunk : chunk + 500]
                marks = ",".join("?" * len(part))
                for key, *rest in conn.execute(
                    f"SELECT key, amount, price, fee, fee_currency FROM fills WHERE key IN ({marks})", part
                ):
                    fills[key].append((rest[0], rest[1], rest[2], rest[3]))
            return [self._record(row, fills[row[0]]) for row in rows]

        return self._tx(run, write=False)

    # --- reports ----------------------------------------------------------------------------------

    def history(self, portfolio_id: str, limit: int = 20) -> list[ExecutionRecord]:
        check_limit(limit)
        latest = "SELECT plan_id FROM plans WHERE portfolio_id = ? ORDER BY created_at DESC, plan_id DESC LIMIT ?"

        def run(conn: sqlite3.Connection) -> list[ExecutionRecord]:
            plans = conn.execute(
                "SELECT plan_id, created_at, status, drift_before, drift_after FROM plans "
                "WHERE portfolio_id = ? ORDER BY created_at DESC, plan_id DESC LIMIT ?",
                (portfolio_id, limit),
            ).fetchall()
            orders: dict[str, int] = defaultdict(int)
            filled_orders: dict[str, int] = defaultdict(int)
            for plan_id, status in conn.execute(
                f"SELECT plan_id, status FROM orders WHERE portfolio_id = ? AND plan_id IN ({latest})",
                (portfolio_id, portfolio_id, limit),
            ):
                orders[plan_id] += 1
                filled_orders[plan_id] += status == OrderStatus.FILLED.value
            turnover: dict[str, list[Decimal]] = defaultdict(list)
            fees: dict[str, dict[str, list[Decimal]]] = defaultdict(lambda: defaultdict(list))
            for plan_id, amount, price, fee, currency in conn.execute(
                "SELECT plan_id, amount, price, fee, fee_currency FROM fills "
                f"WHERE portfolio_id = ? AND plan_id IN ({latest})",
                (portfolio_id, portfolio_id, limit),
            ):
                turnover[plan_id].append(exact_mul(Decimal(amount), Decimal(price)))
                fees[plan_id][currency].append(Decimal(fee))
            return [
                ExecutionRecord(
                    plan_id=plan_id,
                    portfolio_id=portfolio_id,
                    created_at=_dt(created_at),
                    status=status,
                    orders=orders[plan_id],
                    filled_orders=filled_orders[plan_id],
                    turnover=exact_sum(turnover[plan_id]),
                    fees={currency: exact_sum(v) for currency, v in fees[plan_id].items()},
                    drift_before=_opt_decimal(before),
                    drift_after=_opt_decimal(after),
                )
                for plan_id, created_at, status, before, after in plans
            ]

        return self._tx(run, write=False)

    def fees_since(self, portfolio_id: str, since: datetime) -> dict[str, Decimal]:
        start = _ts(since, "since")

        def run(conn: sqlite3.Connection) -> dict[str, Decimal]:
            sums: dict[str, list[Decimal]] = defaultdict(list)
            for currency, fee in conn.execute(
                "SELECT fee_currency, fee FROM fills WHERE portfolio_id = ? AND at >= ?", (portfolio_id, start)
            ):
                sums[currency].append(Decimal(fee))
            return {currency: exact_sum(values) for currency, values in sums.items()}

        return self._tx(run, write=False)

    # --- events -----------------------------------------------------------------------------------

    def record_event(self, portfolio_id: str, kind: str, detail: Mapping[str, Any], at: datetime) -> None:
        self._exec(
            "INSERT INTO events (portfolio_id, kind, at, detail) VALUES (?, ?, ?, ?)",
            (
                check_text(portfolio_id, "portfolio_id"),
                check_text(kind, "event kind"),
                _ts(at, "event time"),
                dump_json(detail, "event detail"),
            ),
        )

    def events(
        self, portfolio_id: str, limit: int = 100, kinds: Sequence[str] | None = None
    ) -> list[tuple[datetime, str, dict[str, Any]]]:
        check_limit(limit)
        only = "" if kinds is None else f" AND kind IN ({', '.join('?' for _ in kinds) or 'NULL'})"

        def run(conn: sqlite3.Connection) -> list[tuple[datetime, str, dict[str, Any]]]:
            return [
                (_dt(at), kind, load_json(detail))
                for at, kind, detail in conn.execute(
                    f"SELECT at, kind, detail FROM events WHERE portfolio_id = ?{only} "
                    "ORDER BY at DESC, id DESC LIMIT ?",
                    (portfolio_id, *(kinds or ()), limit),
                )
            ]

        return self._tx(run, write=False)

    # --- lifecycle --------------------------------------------------------------------------------

    def ping(self) -> None:
        with self._guard():
            self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()

    def deferred(self) -> AbstractContextManager[None]:
        """One connection, `synchronous=FULL` for all (see the module's docstring): nothing to relax here."""
        return nullcontext()

    def sending(self) -> AbstractContextManager[None]:
        return nullcontext()

    def close(self) -> None:
        with self._mutex:
            self._conn.close()
