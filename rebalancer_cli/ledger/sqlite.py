"""Shadow ledger in an embedded SQLite file: the default, needing no server.

Several processes (a daemon and a `rebalance execute` run, say) may share one file. Every state change runs
in a `BEGIN IMMEDIATE` transaction, which takes SQLite's write lock before reading, so a check-then-lock can
never interleave with another writer; WAL mode lets readers go on meanwhile. Amounts are stored as canonical
decimal text and computed with `Decimal` in an exact context, never as SQLite REAL.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

from rebalancer_cli.errors import LeaseLostError, StoreError
from rebalancer_cli.fsutil import open_sqlite
from rebalancer_cli.ledger.base import (
    EXACT,
    Commit,
    Halt,
    Lock,
    SendCheck,
    amount_text,
    check_fence,
    check_name,
    check_portfolio,
    check_ttl,
    commit_requests,
    lock_requests,
)

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS holdings (
    portfolio_id TEXT NOT NULL, asset TEXT NOT NULL, amount TEXT NOT NULL,
    PRIMARY KEY (portfolio_id, asset));
CREATE TABLE IF NOT EXISTS locks (
    portfolio_id TEXT NOT NULL, key TEXT NOT NULL, asset TEXT NOT NULL, amount TEXT NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (portfolio_id, key));
CREATE TABLE IF NOT EXISTS committed (
    portfolio_id TEXT NOT NULL, key TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (portfolio_id, key));
CREATE TABLE IF NOT EXISTS fences (portfolio_id TEXT PRIMARY KEY, token INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS halts (
    portfolio_id TEXT PRIMARY KEY, reason TEXT NOT NULL, halted_by TEXT NOT NULL, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS memory (portfolio_id TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS epochs (portfolio_id TEXT PRIMARY KEY, epoch TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sends (
    portfolio_id TEXT NOT NULL, key TEXT NOT NULL, sent_at REAL NOT NULL, PRIMARY KEY (portfolio_id, key));
"""

# How long a writer waits for another process's write lock before reporting the store as failed.
BUSY_TIMEOUT_SECONDS = 30.0


class SQLiteLedger:
    """ShadowLedger in one SQLite file; thread-safe (one connection per instance, used under a mutex)."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._mutex = threading.RLock()
        try:
            self._conn = open_sqlite(self._path, timeout=BUSY_TIMEOUT_SECONDS)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"SQLite ledger {self._path} cannot be opened: {exc}") from exc
        with self._guard(), self._write() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

    @property
    def path(self) -> Path:
        return self._path

    # --- plumbing ---------------------------------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[None]:
        with self._mutex:
            try:
                yield
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite ledger {self._path} failed: {type(exc).__name__}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: the write lock is taken first, so what is read inside stays true."""
        with self._mutex:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    with suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction, so that several SELECTs see the same snapshot."""
        with self._mutex:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def _tx(self, fn: Callable[[sqlite3.Connection], _T], *, write: bool) -> _T:
        with self._guard(), self._write() if write else self._read() as conn:
            return fn(conn)

    @staticmethod
    def _check_fence(conn: sqlite3.Connection, portfolio_id: str, fence: int | None) -> None:
        """Refuse a write carrying an older token than the highest seen; a newer one becomes the highest."""
        check_fence(fence)
        if fence is None:
            return
        row = conn.execute("SELECT token FROM fences WHERE portfolio_id = ?", (portfolio_id,)).fetchone()
        if row is not None and fence < int(row[0]):
            raise LeaseLostError(
                f"portfolio {portfolio_id}: fencing token {fence} is older than {row[0]}; "
                "this instance lost its lease and may not write"
            )
        if row is None or fence > int(row[0]):
            conn.execute(
                "INSERT INTO fences (portfolio_id, token) VALUES (?, ?) "
                "ON CONFLICT (portfolio_id) DO UPDATE SET token = excluded.token",
                (portfolio_id, fence),
            )

    @staticmethod
    def _available(conn: sqlite3.Connection, portfolio_id: str, asset: str, now: float) -> Decimal:
        row = conn.execute(
            "SELECT amount FROM holdings WHERE portfolio_id = ? AND asset = ?", (portfolio_id, asset)
        ).fetchone()
        total = Decimal(row[0]) if row else Decimal(0)
        for (amount,) in conn.execute(
            "SELECT amount FROM locks WHERE portfolio_id = ? AND asset = ? AND expires_at > ?",
            (portfolio_id, asset, now),
        ):
            total = EXACT.subtract(total, Decimal(amount))
        return Decimal(amount_text(total))

    # --- holdings ---------------------------------------------------------------------------------

    def sync_balances(
        self,
        portfolio_id: str,
        balances: Mapping[str, Decimal],
        *,
        fence: int | None = None,
        unless_locked: bool = False,
    ) -> bool:
        check_portfolio(portfolio_id)
        rows: list[tuple[str, str, str]] = []
        for asset, amount in balances.items():
            check_name(asset, "asset")
            rows.append((portfolio_id, asset, amount_text(amount, f"balance of {asset}")))

        def run(conn: sqlite3.Connection) -> bool:
            self._check_fence(conn, portfolio_id, fence)
            if unless_locked:
                live = conn.execute(
                    "SELECT 1 FROM locks WHERE portfolio_id = ? AND expires_at > ? LIMIT 1", (portfolio_id, time.time())
                ).fetchone()
                if live is not None:
                    return False
            conn.execute("DELETE FROM holdings WHERE portfolio_id = ?", (portfolio_id,))
            conn.executemany("INSERT INTO holdings (portfolio_id, asset, amount) VALUES (?, ?, ?)", rows)
            return True

        return self._tx(run, write=True)

    def balances(self, portfolio_id: str) -> dict[str, Decimal]:
        check_portfolio(portfolio_id)
        rows = self._tx(
            lambda conn: conn.execute(
                "SELECT asset, amount FROM holdings WHERE portfolio_id = ? ORDER BY asset", (portfolio_id,)
            ).fetchall(),
            write=False,
        )
        return {str(asset): Decimal(amount) for asset, amount in rows}

    def available(self, portfolio_id: str, asset: str) -> Decimal:
        check_portfolio(portfolio_id)
        check_name(asset, "asset")
        now = time.time()
        return self._tx(lambda conn: self._available(conn, portfolio_id, asset, now), write=False)

    # --- locks ------------------------------------------------------------------------------------

    def lock(
        self,
        portfolio_id: str,
        key: str,
        asset: str,
        amount: Decimal,
        *,
        ttl_seconds: float,
        fence: int | None = None,
    ) -> bool:
        return self.lock_many(portfolio_id, [(key, asset, amount)], ttl_seconds=ttl_seconds, fence=fence)[0]

    def lock_many(
        self,
        portfolio_id: str,
        requests: Sequence[tuple[str, str, Decimal]],
        *,
        ttl_seconds: float,
        fence: int | None = None,
    ) -> list[bool]:
        check_portfolio(portfolio_id)
        checked = lock_requests(requests)
        check_ttl(ttl_seconds)
        if not checked:
            return []

        def one(conn: sqlite3.Connection, key: str, asset: str, text: str, now: float) -> bool:
            if conn.execute(
                "SELECT 1 FROM committed WHERE portfolio_id = ? AND key = ?", (portfolio_id, key)
            ).fetchone():
                return True
            if conn.execute(
                "SELECT 1 FROM locks WHERE portfolio_id = ? AND key = ? AND expires_at > ?",
                (portfolio_id, key, now),
            ).fetchone():
                return True
            if self._available(conn, portfolio_id, asset, now) < Decimal(text):
                return False
            conn.execute(
                "INSERT INTO locks (portfolio_id, key, asset, amount, expires_at) VALUES (?, ?, ?, ?, ?)",
                (portfolio_id, key, asset, text, now + float(ttl_seconds)),
            )
            return True

        def run(conn: sqlite3.Connection) -> list[bool]:
            self._check_fence(conn, portfolio_id, fence)
            # The clock is read inside the write lock, so expiry decisions are ordered like the writes.
            now = time.time()
            conn.execute("DELETE FROM locks WHERE portfolio_id = ? AND expires_at <= ?", (portfolio_id, now))
            return [one(conn, key, asset, text, now) for key, asset, text in checked]

        return self._tx(run, write=True)

    def commit(
        self,
        portfolio_id: str,
        key: str,
        *,
        debit: Mapping[str, Decimal],
        credit: Mapping[str, Decimal],
        fence: int | None = None,
    ) -> bool:
        """Return False when `key` was committed before: the fill is in the holdings exactly once."""
        return self.commit_many(portfolio_id, [Commit(key, debit, credit)], fence=fence)[0]

    def commit_many(
        self, portfolio_id: str, commits: Sequence[Commit], *, fence: int | None = None, memory: str | None = None
    ) -> list[bool]:
        check_portfolio(portfolio_id)
        checked = commit_requests(commits)
        if memory is not None and not isinstance(memory, str):
            raise TypeError(f"memory must be text, not {type(memory).__name__}")
        if not checked:
            if memory is not None:
                self.set_memory(portfolio_id, memory, fence=fence)
            return []

        def one(conn: sqlite3.Connection, key: str, changes: list[tuple[str, Decimal]], now: float) -> bool:
            if conn.execute(
                "SELECT 1 FROM committed WHERE portfolio_id = ? AND key = ?", (portfolio_id, key)
            ).fetchone():
                return False
            for asset, delta in changes:
                row = conn.execute(
                    "SELECT amount FROM holdings WHERE portfolio_id = ? AND asset = ?", (portfolio_id, asset)
                ).fetchone()
                new = EXACT.add(Decimal(row[0]) if row else Decimal(0), delta)
                conn.execute(
                    "INSERT INTO holdings (portfolio_id, asset, amount) VALUES (?, ?, ?) "
                    "ON CONFLICT (portfolio_id, asset) DO UPDATE SET amount = excluded.amount",
                    (portfolio_id, asset, amount_text(new)),
                )
            conn.execute("DELETE FROM locks WHERE portfolio_id = ? AND key = ?", (portfolio_id, key))
            conn.execute("DELETE FROM sends WHERE portfolio_id = ? AND key = ?", (portfolio_id, key))
            conn.execute("INSERT INTO committed (portfolio_id, key, at) VALUES (?, ?, ?)", (portfolio_id, key, now))
            return True

        def run(conn: sqlite3.Connection) -> list[bool]:
            self._check_fence(conn, portfolio_id, fence)
            now = time.time()
            if memory is not None:
                self._put_memory(conn, portfolio_id, memory)
            return [
                one(
                    conn,
                    key,
                    [(a, Decimal(t).copy_negate()) for a, t in debits] + [(a, Decimal(t)) for a, t in credits],
                    now,
                )
                for key, debits, credits in checked
            ]

        return self._tx(run, write=True)

    def release(self, portfolio_id: str, key: str, *, fence: int | None = None) -> None:
        check_portfolio(portfolio_id)
        check_name(key, "key")

        def run(conn: sqlite3.Connection) -> None:
            self._check_fence(conn, portfolio_id, fence)
            conn.execute("DELETE FROM locks WHERE portfolio_id = ? AND key = ?", (portfolio_id, key))
            conn.execute("DELETE FROM sends WHERE portfolio_id = ? AND key = ?", (portfolio_id, key))

        self._tx(run, write=True)

    def locks(self, portfolio_id: str) -> list[Lock]:
        check_portfolio(portfolio_id)
        now = time.time()
        rows = self._tx(
            lambda conn: conn.execute(
                "SELECT key, asset, amount, expires_at FROM locks "
                "WHERE portfolio_id = ? AND expires_at > ? ORDER BY key",
                (portfolio_id, now),
            ).fetchall(),
            write=False,
        )
        return [Lock(str(k), str(a), Decimal(amount), float(exp)) for k, a, amount, exp in rows]

    def is_committed(self, portfolio_id: str, key: str) -> bool:
        check_portfolio(portfolio_id)
        check_name(key, "key")
        row = self._tx(
            lambda conn: conn.execute(
                "SELECT 1 FROM committed WHERE portfolio_id = ? AND key = ?", (portfolio_id, key)
            ).fetchone(),
            write=False,
        )
        return row is not None

    # --- leases, kill switch, planner memory ------------------------------------------------------

    def begin_send(
        self, portfolio_id: str, key: str, *, fence: int | None, at: datetime | None = None
    ) -> tuple[SendCheck, str]:
        return self.begin_send_many(portfolio_id, [key], fence=fence, at=at)[0]

    def begin_send_many(
        self, portfolio_id: str, keys: Sequence[str], *, fence: int | None, at: datetime | None = None
    ) -> list[tuple[SendCheck, str]]:
        check_portfolio(portfolio_id)
        for key in keys:
            check_name(key, "key")
        if not keys:
            return []

        def one(conn: sqlite3.Connection, key: str, now: float) -> tuple[SendCheck, str]:
            live = conn.execute(
                "SELECT 1 FROM locks WHERE portfolio_id = ? AND key = ? AND expires_at > ?",
                (portfolio_id, key, now),
            ).fetchone()
            if not live:
                return "unlocked", ""
            conn.execute(
                "INSERT INTO sends (portfolio_id, key, sent_at) VALUES (?, ?, ?) "
                "ON CONFLICT (portfolio_id, key) DO UPDATE SET sent_at = excluded.sent_at",
                (portfolio_id, key, now if at is None else at.timestamp()),
            )
            return "ok", ""

        def run(conn: sqlite3.Connection) -> list[tuple[SendCheck, str]]:
            self._check_fence(conn, portfolio_id, fence)
            halt = conn.execute("SELECT reason FROM halts WHERE portfolio_id = ?", (portfolio_id,)).fetchone()
            if halt is not None:
                return [("halted", str(halt[0]))] * len(keys)
            now = time.time()
            return [one(conn, key, now) for key in keys]

        return self._tx(run, write=True)

    def sent_at(self, portfolio_id: str, key: str) -> datetime | None:
        check_portfolio(portfolio_id)
        check_name(key, "key")
        row = self._tx(
            lambda conn: conn.execute(
                "SELECT sent_at FROM sends WHERE portfolio_id = ? AND key = ?", (portfolio_id, key)
            ).fetchone(),
            write=False,
        )
        return None if row is None else datetime.fromtimestamp(float(row[0]), UTC)

    def epoch(self, portfolio_id: str, fresh: str) -> tuple[str, bool]:
        check_portfolio(portfolio_id)
        check_name(fresh, "epoch")

        def run(conn: sqlite3.Connection) -> tuple[str, bool]:
            row = conn.execute("SELECT epoch FROM epochs WHERE portfolio_id = ?", (portfolio_id,)).fetchone()
            if row is not None:
                return str(row[0]), False
            conn.execute("INSERT INTO epochs (portfolio_id, epoch) VALUES (?, ?)", (portfolio_id, fresh))
            return fresh, True

        return self._tx(run, write=True)

    def advance_fence(self, portfolio_id: str, token: int) -> None:
        """Raise LeaseLostError when a newer token was announced already: the caller's lease is stale."""
        check_portfolio(portfolio_id)
        if token is None:
            raise ValueError("fencing token must be an integer, not None")
        self._tx(lambda conn: self._check_fence(conn, portfolio_id, token), write=True)

    def halt(self, portfolio_id: str, reason: str, by: str) -> None:
        check_portfolio(portfolio_id)
        at = datetime.now(UTC).isoformat()
        self._tx(
            lambda conn: conn.execute(
                "INSERT INTO halts (portfolio_id, reason, halted_by, at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (portfolio_id) DO UPDATE SET "
                "reason = excluded.reason, halted_by = excluded.halted_by, at = excluded.at",
                (portfolio_id, reason, by, at),
            ),
            write=True,
        )

    def resume(self, portfolio_id: str) -> None:
        check_portfolio(portfolio_id)
        self._tx(
            lambda conn: conn.execute("DELETE FROM halts WHERE portfolio_id = ?", (portfolio_id,)),
            write=True,
        )

    @staticmethod
    def _halt(conn: sqlite3.Connection, portfolio_id: str) -> Halt | None:
        row = conn.execute("SELECT reason, halted_by, at FROM halts WHERE portfolio_id = ?", (portfolio_id,)).fetchone()
        return None if row is None else Halt(str(row[0]), str(row[1]), datetime.fromisoformat(row[2]))

    @staticmethod
    def _memory(conn: sqlite3.Connection, portfolio_id: str) -> str | None:
        row = conn.execute("SELECT value FROM memory WHERE portfolio_id = ?", (portfolio_id,)).fetchone()
        return None if row is None else str(row[0])

    def halted(self, portfolio_id: str) -> Halt | None:
        check_portfolio(portfolio_id)
        return self._tx(lambda conn: self._halt(conn, portfolio_id), write=False)

    def halt_and_memory(self, portfolio_id: str) -> tuple[Halt | None, str | None]:
        check_portfolio(portfolio_id)
        return self._tx(lambda conn: (self._halt(conn, portfolio_id), self._memory(conn, portfolio_id)), write=False)

    def get_memory(self, portfolio_id: str) -> str | None:
        check_portfolio(portfolio_id)
        return self._tx(lambda conn: self._memory(conn, portfolio_id), write=False)

    @staticmethod
    def _put_memory(conn: sqlite3.Connection, portfolio_id: str, value: str) -> None:
        conn.execute(
            "INSERT INTO memory (portfolio_id, value) VALUES (?, ?) "
            "ON CONFLICT (portfolio_id) DO UPDATE SET value = excluded.value",
            (portfolio_id, value),
        )

    def set_memory(self, portfolio_id: str, value: str, *, fence: int | None = None) -> None:
        check_portfolio(portfolio_id)
        if not isinstance(value, str):
            raise TypeError(f"memory must be text, not {type(value).__name__}")

        def run(conn: sqlite3.Connection) -> None:
            self._check_fence(conn, portfolio_id, fence)
            self._put_memory(conn, portfolio_id, value)

        self._tx(run, write=True)

    def ping(self) -> None:
        with self._guard():
            self._conn.execute("SELECT count(*) FROM fences").fetchone()

    def close(self) -> None:
        with self._mutex:
            self._conn.close()
