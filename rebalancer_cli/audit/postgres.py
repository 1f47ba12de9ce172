"""Audit store in PostgreSQL: the production backend, shared by every daemon instance.

Tables are partitioned by month (see the migration for why orders and fills are partitioned on the time
inside their UUIDv7 key), so that years of history cost nothing to the hot path and old months can be
detached or archived whole. Partitions are created ahead of time by `migrate`, at open, and again once a
day by a long-running process before it writes; a DEFAULT partition catches anything outside them.

Every write is one statement, hence one round trip in autocommit mode: checks that need a read (does the
order exist? was the fill new?) are folded into the statement with CTEs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, date, datetime
from decimal import Decimal
from types import TracebackType
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from rebalancer_cli.audit.base import (
    PARTITION_MONTHS_AHEAD,
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
    key_time,
    load_json,
    migrations,
    parse_order_key,
    to_utc,
)
from rebalancer_cli.errors import InputError, StoreError

_log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 5.0
# The longest one use of a connection may take (a statement, a transaction) before the watchdog cuts its
# socket: libpq has no read timeout, and a server that stopped answering (a black-holed host, a stopped VM)
# would otherwise hold a run forever, an order already filled. Overridable for tests and slow links.
DEFAULT_DEADLINE = 10.0
MIGRATE_DEADLINE = 120.0
DEADLINE_ENV = "REBALANCE_STORE_TIMEOUT"
DEFAULT_MAX_CONNECTIONS = 4

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# The advisory lock serialising migrations and partition creation; per schema, as the migration computes it.
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('rebalance-audit:' || coalesce(%s::text, current_schema(), '')))"

_TERMINAL_SQL = "('filled', 'rejected', 'cancelled')"

# Sums of an order's fills: one partition (the order's), grouped by fee currency, folded into one row.
_ORDER_SELECT = """
SELECT o.key::text, o.portfolio_id, o.plan_id, o.market, o.side, o.amount, o.est_price, o.created_at,
       o.status, o.exchange_order_id, o.reason, o.updated_at, f.filled, f.notional, f.fees
FROM orders AS o
LEFT JOIN LATERAL (
    SELECT sum(g.filled) AS filled, sum(g.notional) AS notional,
           json_object_agg(g.fee_currency, g.fee::text) AS fees
    FROM (SELECT fee_currency, sum(amount) AS filled, sum(amount * price) AS notional, sum(fee) AS fee
          FROM fills WHERE fills.key = o.key AND fills.key_time = o.key_time
          GROUP BY fee_currency) AS g
) AS f ON true
"""

_HISTORY = """
SELECT p.plan_id, p.created_at, p.status, p.drift_before, p.drift_after,
       coalesce(o.orders, 0), coalesce(o.filled_orders, 0), coalesce(f.turnover, 0), f.fees
FROM (SELECT plan_id, portfolio_id, created_at, status, drift_before, drift_after FROM plans
      WHERE portfolio_id = %(portfolio_id)s ORDER BY created_at DESC, plan_id DESC LIMIT %(limit)s) AS p
LEFT JOIN LATERAL (
    SELECT count(*) AS orders, count(*) FILTER (WHERE status = 'filled') AS filled_orders
    FROM orders WHERE orders.plan_id = p.plan_id AND orders.portfolio_id = p.portfolio_id
) AS o ON true
LEFT JOIN LATERAL (
    SELECT sum(g.notional) AS turnover, json_object_agg(g.fee_currency, g.fee::text) AS fees
    FROM (SELECT fee_currency, sum(amount * price) AS notional, sum(fee) AS fee
          FROM fills WHERE fills.plan_id = p.plan_id AND fills.portfolio_id = p.portfolio_id
          GROUP BY fee_currency) AS g
) AS f ON true
ORDER BY p.created_at DESC, p.plan_id DESC
"""


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _decimal_map(value: Mapping[str, str] | None) -> dict[str, Decimal]:
    return {} if value is None else {currency: Decimal(text) for currency, text in value.items()}


def _one_line(text: str, secret: str | None) -> str:
    line = " ".join(text.split())
    if secret:
        line = line.replace(secret, "***")
    return line


def store_deadline() -> float:
    """Seconds a store call may take: $REBALANCE_STORE_TIMEOUT, else DEFAULT_DEADLINE."""
    try:
        value = float(os.environ.get(DEADLINE_ENV, "") or DEFAULT_DEADLINE)
    except ValueError:
        raise InputError(f"{DEADLINE_ENV} must be a number of seconds") from None
    if not 0 < value <= 3600:
        raise InputError(f"{DEADLINE_ENV} must be between 0 and 3600 seconds")
    return value


class _Watchdog:
    """One thread per store that cuts the socket of a connection held past its deadline.

    Shutting the socket down makes the blocked libpq read return at once with an error, which psycopg raises
    and the pool discards the connection: the caller gets a StoreError instead of waiting forever."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[float, Any]] = {}
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def watch(self, conn: Any, seconds: float) -> int:
        token = id(conn)
        with self._lock:
            self._watched[token] = (time.monotonic() + seconds, conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-watchdog", daemon=True)
                self._thread.start()
        return token

    def unwatch(self, token: int) -> None:
        with self._lock:
            self._watched.pop(token, None)

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(0.25)
            now = time.monotonic()
            with self._lock:
                late = [c for deadline, c in self._watched.values() if deadline <= now]
            for conn in late:
                with contextlib.suppress(Exception):
                    fd = conn.pgconn.socket
                    # a duplicate of the descriptor: closing it leaves libpq's own descriptor to libpq
                    sock = socket.socket(fileno=os.dup(fd))
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    finally:
                        sock.close()


class PostgresAuditStore:
    """AuditStore in PostgreSQL through a small connection pool; thread-safe.

    `schema` confines the store to one PostgreSQL schema (created by `migrate`), so that tests or
    several deployments can share a database without ever seeing each other's rows.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise InputError(f"audit schema name {schema!r} must match {_SCHEMA_NAME.pattern}")
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error:
            # the message may quote the URL, password included: say only what is wrong
            raise InputError("database_url is not a valid PostgreSQL connection URL") from None
        self._schema = schema
        self._secret = str(params["password"]) if params.get("password") else None
        host = params.get("host") or "localhost"
        self._where = f"{host}:{params.get('port') or 5432}/{params.get('dbname') or ''}"
        if schema:
            self._where += f" (schema {schema})"
        self._partitions_day: date | None = None
        self._partitions_lock = threading.Lock()
        self._deadline = store_deadline()
        self._watchdog = _Watchdog()

        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = max(2, math.ceil(connect_timeout))  # libpq: whole seconds, >= 2
        if "application_name" not in params:
            kwargs["application_name"] = "rebalance-audit"

        # A direct first connection reports an unreachable server at once and with libpq's own reason;
        # a pool would retry in the background until its timeout and then say only that it timed out.
        try:
            with psycopg.connect(url, **kwargs) as probe:
                self._configure(probe)
                exists = probe.execute(
                    "SELECT to_regprocedure('rb_ensure_partitions(timestamptz, integer)') IS NOT NULL"
                ).fetchone()
                if exists and exists[0]:
                    self._ensure(probe, datetime.now(UTC), tolerate_privileges=True)
        except psycopg.Error as exc:
            raise self._failure("unreachable", exc) from None

        self._pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, max_connections),
            kwargs=kwargs,
            configure=self._configure,
            timeout=connect_timeout + 5,
            name="rebalance-audit",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout + 1)
        except PoolTimeout:
            self._pool.close(timeout=1)
            raise StoreError(f"audit store {self._where} unreachable: no connection within the timeout") from None
        # the write-behind's own connection, opened on its first deferred write (see `deferred`)
        self._url, self._kwargs, self._connect_timeout = url, kwargs, connect_timeout
        self._deferred_pool: ConnectionPool[psycopg.Connection[TupleRow]] | None = None
        self._deferred_lock = threading.Lock()
        self._local = threading.local()

    def __enter__(self) -> PostgresAuditStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def schema(self) -> str | None:
        return self._schema

    # --- plumbing ---------------------------------------------------------------------------------

    def _configure(self, conn: psycopg.Connection[TupleRow]) -> None:
        """UTC sessions, so times come back in UTC whatever the server's default zone."""
        statement: sql.SQL | sql.Composed = sql.SQL("SET TIME ZONE 'UTC'")
        if self._schema:
            statement = sql.SQL("SET search_path TO {}; {}").format(sql.Identifier(self._schema), statement)
        conn.execute(statement)  # no parameters: both SETs travel in one round trip

    def _failure(self, what: str, exc: BaseException) -> StoreError:
        """One line, never the password: it ends up in logs and on terminals."""
        if isinstance(exc, (pg_errors.UndefinedTable, pg_errors.UndefinedFunction, pg_errors.InvalidSchemaName)):
            return StoreError(
                f"audit store {self._where} has no audit schema ({_one_line(str(exc), self._secret)}): "
                "run `rebalance db migrate`"
            )
        return StoreError(f"audit store {self._where} {what}: {_one_line(str(exc), self._secret)}")

    def sending(self) -> AbstractContextManager[None]:
        return nullcontext()  # writes straight through: nothing held

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """This thread's writes inside are committed without waiting for the WAL to reach the disk
        (`synchronous_commit = off`, on a connection of their own, so no write-ahead intent ever shares it).

        For the write-behind's queue only: its writes (status changes, fills, events, plan rows) were held in
        memory before they reached the store, and everything in them is derived again from the exchange by the
        order's key. A server crash can lose the last few hundred milliseconds of them (3 x wal_writer_delay,
        PostgreSQL's documented bound), never corrupt anything, and never an intent: those are written straight
        through, durably. What it saves is an fsync wait per write, which on a shared disk is most of its time.
        """
        self._local.deferred = True
        try:
            yield
        finally:
            self._local.deferred = False

    def _deferred_connections(self) -> ConnectionPool[psycopg.Connection[TupleRow]]:
        with self._deferred_lock:
            if self._deferred_pool is None:

                def configure(conn: psycopg.Connection[TupleRow]) -> None:
                    self._configure(conn)
                    conn.execute("SET synchronous_commit TO off")

                pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
                    self._url,
                    min_size=1,
                    max_size=1,
                    kwargs=self._kwargs,
                    configure=configure,
                    timeout=self._connect_timeout + 5,
                    name="rebalance-audit-deferred",
                    open=False,
                )
                pool.open(wait=False)
                self._deferred_pool = pool
            return self._deferred_pool

    @contextmanager
    def _conn(self, deadline: float | None = None) -> Iterator[psycopg.Connection[TupleRow]]:
        pool = self._deferred_connections() if getattr(self._local, "deferred", False) else self._pool
        try:
            with pool.connection() as conn:
                token = self._watchdog.watch(conn, deadline or self._deadline)
                try:
                    yield conn
                finally:
                    self._watchdog.unwatch(token)
        except (PoolTimeout, PoolClosed) as exc:
            raise self._failure("unavailable", exc) from None
        except psycopg.Error as exc:
            raise self._failure("failed", exc) from None

    def _ensure(self, conn: psycopg.Connection[TupleRow], now: datetime, *, tolerate_privileges: bool) -> list[str]:
        """Create the partitions due; a role without DDL rights only warns, as the DEFAULT partition holds on.

        Least-privilege deployments run the daemon with a role that may write rows but not create tables,
        and `rebalance db migrate` (run by a privileged role, e.g. monthly) creates the partitions instead.
        """
        try:
            rows = conn.execute(
                "SELECT rb_ensure_partitions(%s, %s)", (to_utc(now, "now"), PARTITION_MONTHS_AHEAD)
            ).fetchall()
        except pg_errors.InsufficientPrivilege as exc:
            if not tolerate_privileges:
                raise
            _log.warning(
                "audit store %s: cannot create monthly partitions (%s); new rows go to the DEFAULT partition "
                "until `rebalance db migrate` runs with a role allowed to create tables",
                self._where,
                _one_line(str(exc), self._secret),
            )
            rows = []
        self._partitions_day = datetime.now(UTC).date()
        return [str(row[0]) for row in rows]

    def _before_write(self) -> None:
        """A daemon runs for months: keep the partitions ahead of the calendar without a restart."""
        today = datetime.now(UTC).date()
        if self._partitions_day != today:
            with self._partitions_lock:
                if self._partitions_day != today:
                    with self._conn() as conn:
                        self._ensure(conn, datetime.now(UTC), tolerate_privileges=True)

    # --- schema -----------------------------------------------------------------------------------

    def migrate(self) -> list[str]:
        applied: list[str] = []
        with self._conn(MIGRATE_DEADLINE) as conn, conn.transaction():
            conn.execute(_LOCK, (self._schema,))
            if self._schema:
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self._schema)))
            else:
                row = conn.execute("SELECT current_schema(), current_setting('search_path')").fetchone()
                if row is None or row[0] is None:
                    path = row[1] if row else "?"
                    raise StoreError(
                        f"audit store {self._where}: no schema of search_path ({path}) exists; create it first"
                    )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "name text PRIMARY KEY, version integer NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for migration in migrations("postgres"):
                if migration.name in done:
                    continue
                conn.execute(migration.sql.encode())  # no parameters: sent as one multi-statement query
                conn.execute(
                    "INSERT INTO schema_migrations (name, version) VALUES (%s, %s)",
                    (migration.name, migration.version),
                )
                applied.append(migration.name)
            conn.execute("SELECT rb_ensure_partitions(%s, %s)", (datetime.now(UTC), PARTITION_MONTHS_AHEAD))
        self._partitions_day = datetime.now(UTC).date()
        return applied

    def schema_version(self) -> int:
        with self._conn() as conn:
            try:
                row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
            except pg_errors.UndefinedTable:
                return 0
        return int(row[0]) if row else 0

    def check(self) -> None:
        check_version(self.schema_version(), migrations("postgres")[-1].version)

    def ensure_partitions(self, now: datetime) -> list[str]:
        """Create the monthly partitions from `now`'s month to PARTITION_MONTHS_AHEAD later; returns new ones."""
        with self._conn() as conn:
            return self._ensure(conn, now, tolerate_privileges=False)

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
        before = check_decimal(drift_before, "drift_before")
        params = {
            "plan_id": check_text(plan_id, "plan_id"),
            "portfolio_id": check_text(portfolio_id, "portfolio_id"),
            "created_at": to_utc(created_at, "plan created_at"),
            "plan": dump_json(plan, "plan"),
            "drift_before": before,
            "status": PLAN_STARTED if finished is None else check_text(finished, "plan status"),
            "drift_after": None if finished is None else before,  # nothing traded: after is before
            "finished": finished is not None,
        }
        self._before_write()
        with self._conn() as conn:
            # plan_keys makes plan_id unique across partitions; the plan row is written only if the key is new
            conn.execute(
                "WITH k AS (INSERT INTO plan_keys (plan_id, created_at) VALUES (%(plan_id)s, %(created_at)s) "
                "ON CONFLICT DO NOTHING RETURNING plan_id, created_at) "
                "INSERT INTO plans (plan_id, portfolio_id, created_at, plan, drift_before, status, drift_after, "
                "finished_at) SELECT k.plan_id, %(portfolio_id)s, k.created_at, %(plan)s::jsonb, %(drift_before)s, "
                "%(status)s, %(drift_after)s, CASE WHEN %(finished)s THEN k.created_at END FROM k",
                params,
            )

    def finish_plan(self, plan_id: str, status: str, drift_after: Decimal | None, at: datetime) -> None:
        params = {
            "plan_id": check_text(plan_id, "plan_id"),
            "status": check_text(status, "plan status"),
            "drift_after": None if drift_after is None else check_decimal(drift_after, "drift_after"),
            "at": to_utc(at, "finished at"),
        }
        with self._conn() as conn:
            changed = conn.execute(
                "UPDATE plans SET status = %(status)s, drift_after = %(drift_after)s, finished_at = %(at)s "
                "WHERE plan_id = %(plan_id)s "
                "AND created_at = (SELECT created_at FROM plan_keys WHERE plan_id = %(plan_id)s)",
                params,
            ).rowcount
        if changed == 0:
            raise InputError(f"plan {plan_id} was never recorded")

    def plan(self, plan_id: str) -> dict[str, Any] | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT plan::text FROM plans WHERE plan_id = %(p)s "
                "AND created_at = (SELECT created_at FROM plan_keys WHERE plan_id = %(p)s)",
                {"p": plan_id},
            ).fetchone()
        return None if row is None else load_json(row[0])

    # --- orders and fills -------------------------------------------------------------------------

    def record_intent(self, intent: OrderIntent) -> bool:
        return self.record_intents([intent])[0]

    def record_intents(self, intents: Sequence[OrderIntent]) -> list[bool]:
        rows = []
        for intent in checked_intents(intents):
            key = parse_order_key(intent.key)
            created = to_utc(intent.created_at, "created_at")
            rows.append(
                (
                    key,
                    key_time(key),
                    intent.portfolio_id,
                    intent.plan_id,
                    intent.market,
                    intent.side,
                    intent.amount,
                    intent.est_price,
                    created,
                    OrderStatus.INTENT.value,
                    created,
                )
            )
        if not rows:
            return []
        self._before_write()
        values = ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"] * len(rows))
        with self._conn() as conn:
            new = {
                str(r[0])
                for r in conn.execute(
                    "INSERT INTO orders (key, key_time, portfolio_id, plan_id, market, side, amount, est_price, "
                    f"created_at, status, updated_at) VALUES {values} ON CONFLICT DO NOTHING RETURNING key",
                    [v for row in rows for v in row],
                ).fetchall()
            }
        answers, seen = [], set()
        for row in rows:  # a key given twice in one batch is new only the first time
            key_text = str(row[0])
            answers.append(key_text in new and key_text not in seen)
            seen.add(key_text)
        return answers

    def update_order(
        self,
        key: str,
        status: OrderStatus,
        *,
        at: datetime,
        exchange_order_id: str | None = None,
        reason: str | None = None,
    ) -> bool:
        parsed = parse_order_key(key)
        new = check_status(status)
        params = {
            "key": parsed,
            "key_time": key_time(parsed),
            "status": new.value,
            "xid": exchange_order_id,
            "reason": reason,
            "at": to_utc(at, "update time"),
            # a terminal order may be corrected to another terminal state, never reopened by a late update
            "to_terminal": new in TERMINAL,
        }
        with self._conn() as conn:
            row = conn.execute(
                "WITH cur AS (SELECT FROM orders WHERE key = %(key)s AND key_time = %(key_time)s), "
                "upd AS (UPDATE orders SET status = %(status)s, "
                "exchange_order_id = coalesce(%(xid)s::text, exchange_order_id), "
                "reason = coalesce(%(reason)s::text, reason), updated_at = %(at)s "
                "WHERE key = %(key)s AND key_time = %(key_time)s "
                f"AND (%(to_terminal)s OR status NOT IN {_TERMINAL_SQL}) RETURNING 1) "
                "SELECT EXISTS (SELECT FROM cur), EXISTS (SELECT FROM upd)",
                params,
            ).fetchone()
        if row is None or not row[0]:
            raise InputError(f"order {key} was never recorded")
        return bool(row[1])

    def record_fill(self, fill: Fill) -> bool:
        if not isinstance(fill, Fill):
            raise InputError(f"record_fill needs a Fill, got {type(fill).__name__}")
        parsed = parse_order_key(fill.key)
        params = {
            "key": parsed,
            "key_time": key_time(parsed),
            "fill_id": fill.fill_id,
            "amount": fill.amount,
            "price": fill.price,
            "fee": fill.fee,
            "currency": fill.fee_currency,
            "at": to_utc(fill.at, "fill time"),
        }
        self._before_write()
        with self._conn() as conn:
            row = conn.execute(
                "WITH o AS (SELECT portfolio_id, plan_id FROM orders "
                "WHERE key = %(key)s AND key_time = %(key_time)s), "
                "ins AS (INSERT INTO fills (key, key_time, fill_id, portfolio_id, plan_id, amount, price, fee, "
                "fee_currency, at) SELECT %(key)s, %(key_time)s, %(fill_id)s, o.portfolio_id, o.plan_id, "
                "%(amount)s, %(price)s, %(fee)s, %(currency)s, %(at)s FROM o "
                "ON CONFLICT DO NOTHING RETURNING 1) "
                "SELECT EXISTS (SELECT FROM o), EXISTS (SELECT FROM ins)",
                params,
            ).fetchone()
        if row is None or not row[0]:
            raise InputError(f"fill {fill.fill_id} is for order {fill.key}, which was never recorded")
        return bool(row[1])

    @staticmethod
    def _record(row: tuple[Any, ...]) -> OrderRecord:
        intent = OrderIntent(
            key=row[0],
            portfolio_id=row[1],
            plan_id=row[2],
            market=row[3],
            side=row[4],
            amount=row[5],
            est_price=row[6],
            created_at=_utc(row[7]),
        )
        filled: Decimal = row[12] if row[12] is not None else Decimal(0)
        notional: Decimal = row[13] if row[13] is not None else Decimal(0)
        return OrderRecord(
            intent=intent,
            status=OrderStatus(row[8]),
            exchange_order_id=row[9],
            reason=row[10],
            filled=filled,
            avg_price=average_price(notional, filled),
            fees=_decimal_map(row[14]),
            updated_at=_utc(row[11]),
        )

    def order(self, key: str) -> OrderRecord | None:
        parsed = parse_order_key(key)
        with self._conn() as conn:
            row = conn.execute(
                _ORDER_SELECT + "WHERE o.key = %s AND o.key_time = %s", (parsed, key_time(parsed))
            ).fetchone()
        return None if row is None else self._record(row)

    def open_orders(self, portfolio_id: str) -> list[OrderRecord]:
        with self._conn() as conn:
            rows = conn.execute(
                _ORDER_SELECT + f"WHERE o.portfolio_id = %s AND o.status NOT IN {_TERMINAL_SQL} "
                "ORDER BY o.created_at, o.key",
                (portfolio_id,),
            ).fetchall()
        return [self._record(row) for row in rows]

    def recent_orders(self, portfolio_id: str, limit: int = 50) -> list[OrderRecord]:
        check_limit(limit)
        with self._conn() as conn:
            rows = conn.execute(
                _ORDER_SELECT + "WHERE o.portfolio_id = %s ORDER BY o.created_at DESC, o.key DESC LIMIT %s",
                (portfolio_id, limit),
            ).fetchall()
        return [self._record(row) for row in rows]

    # --- reports ----------------------------------------------------------------------------------

    def history(self, portfolio_id: str, limit: int = 20) -> list[ExecutionRecord]:
        check_limit(limit)
        with self._conn() as conn:
            rows = conn.execute(_HISTORY, {"portfolio_id": portfolio_id, "limit": limit}).fetchall()
        return [
            ExecutionRecord(
                plan_id=plan_id,
                portfolio_id=portfolio_id,
                created_at=_utc(created_at),
                status=status,
                orders=int(orders),
                filled_orders=int(filled_orders),
                turnover=turnover,
                fees=_decimal_map(fees),
                drift_before=before,
                drift_after=after,
            )
            for plan_id, created_at, status, before, after, orders, filled_orders, turnover, fees in rows
        ]

    def fees_since(self, portfolio_id: str, since: datetime) -> dict[str, Decimal]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT fee_currency, sum(fee) FROM fills WHERE portfolio_id = %s AND at >= %s GROUP BY fee_currency",
                (portfolio_id, to_utc(since, "since")),
            ).fetchall()
        return {str(currency): total for currency, total in rows}

    # --- events -----------------------------------------------------------------------------------

    def record_event(self, portfolio_id: str, kind: str, detail: Mapping[str, Any], at: datetime) -> None:
        params = (
            check_text(portfolio_id, "portfolio_id"),
            check_text(kind, "event kind"),
            to_utc(at, "event time"),
            dump_json(detail, "event detail"),
        )
        self._before_write()
        with self._conn() as conn:
            conn.execute("INSERT INTO events (portfolio_id, kind, at, detail) VALUES (%s, %s, %s, %s::jsonb)", params)

    def events(
        self, portfolio_id: str, limit: int = 100, kinds: Sequence[str] | None = None
    ) -> list[tuple[datetime, str, dict[str, Any]]]:
        check_limit(limit)
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT at, kind, detail::text FROM events WHERE portfolio_id = %s "
                "AND (%s::text[] IS NULL OR kind = ANY(%s::text[])) ORDER BY at DESC, id DESC LIMIT %s",
                (portfolio_id, None if kinds is None else list(kinds), None if kinds is None else list(kinds), limit),
            ).fetchall()
        return [(_utc(at), kind, load_json(detail)) for at, kind, detail in rows]

    # --- lifecycle --------------------------------------------------------------------------------

    def ping(self) -> None:
        with self._conn() as conn:
            conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        self._watchdog.close()
        self._pool.close(timeout=5)
        if self._deferred_pool is not None:
            self._deferred_pool.close(timeout=5)
