"""Portfolio leases: at most one daemon instance works a portfolio at a time, and a dead one is replaced
within one lease TTL.

A lease carries a fencing token that only ever grows (Kleppmann's fencing tokens): the holder hands it to the
shadow ledger with every write, so an instance that paused past its lease (GC, a stopped VM) and wakes up
believing it still holds the portfolio is refused by the ledger instead of trading beside its successor.
Two implementations: Redis (shared by instances on many hosts; every key hash-tagged by portfolio, so it runs
on Redis Cluster) and SQLite (instances on one host sharing a state directory).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from .errors import StoreError

_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local holder, token = string.match(cur, '^(.*)|(%d+)$')
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(token)
  end
  return -1
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return token
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseStore(Protocol):
    def acquire(self, portfolio_id: str, holder: str, ttl: float) -> int | None:
        """The fencing token when this holder now has the lease (new or renewed), else None."""
        ...

    def renew(self, portfolio_id: str, holder: str, token: int, ttl: float) -> bool: ...

    def release(self, portfolio_id: str, holder: str, token: int) -> None: ...

    def holder(self, portfolio_id: str) -> str | None: ...

    def close(self) -> None: ...


class RedisLeases:
    def __init__(self, client: Any) -> None:
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str) -> RedisLeases:
        from .ledger.redis import connect

        return cls(connect(url))

    @staticmethod
    def _keys(pid: str) -> list[str]:
        return [f"rb:{{{pid}}}:lease", f"rb:{{{pid}}}:lease_seq"]

    def _call(self, fn: Any) -> Any:
        import redis

        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreError(f"lease store unreachable: {str(exc).splitlines()[0]}") from exc

    def acquire(self, portfolio_id: str, holder: str, ttl: float) -> int | None:
        token = int(self._call(lambda: self._acquire(keys=self._keys(portfolio_id), args=[holder, int(ttl * 1000)])))
        return token if token > 0 else None

    def renew(self, portfolio_id: str, holder: str, token: int, ttl: float) -> bool:
        keys = self._keys(portfolio_id)[:1]
        return bool(self._call(lambda: self._renew(keys=keys, args=[f"{holder}|{token}", int(ttl * 1000)])))

    def release(self, portfolio_id: str, holder: str, token: int) -> None:
        keys = self._keys(portfolio_id)[:1]
        self._call(lambda: self._release(keys=keys, args=[f"{holder}|{token}"]))

    def holder(self, portfolio_id: str) -> str | None:
        value = self._call(lambda: self._client.get(self._keys(portfolio_id)[0]))
        return str(value).rsplit("|", 1)[0] if value else None

    def close(self) -> None:
        self._client.close()


class SQLiteLeases:
    """Leases for instances on one host; time is the host's clock, which all of them share."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("pragma journal_mode=wal")
            self._db.execute(
                "create table if not exists leases (pid text primary key, holder text, token integer, expires real)"
            )
            self._db.execute("create table if not exists lease_seq (pid text primary key, token integer)")
        except sqlite3.Error as exc:
            raise StoreError(f"lease store {path} is unusable: {exc}") from None

    def _tx(self, fn: Any) -> Any:
        with self._lock:
            try:
                self._db.execute("begin immediate")
                try:
                    out = fn(self._db)
                except BaseException:
                    self._db.execute("rollback")
                    raise
                self._db.execute("commit")
                return out
            except sqlite3.Error as exc:
                raise StoreError(f"lease store failed: {exc}") from None

    def acquire(self, portfolio_id: str, holder: str, ttl: float) -> int | None:
        def run(db: sqlite3.Connection) -> int | None:
            now = time.time()
            row = db.execute("select holder, token, expires from leases where pid=?", (portfolio_id,)).fetchone()
            if row and row[0] == holder and row[2] > now:
                db.execute("update leases set expires=? where pid=?", (now + ttl, portfolio_id))
                return int(row[1])
            if row and row[2] > now:
                return None
            db.execute(
                "insert into lease_seq values (?, 1) on conflict(pid) do update set token = token + 1", (portfolio_id,)
            )
            token = int(db.execute("select token from lease_seq where pid=?", (portfolio_id,)).fetchone()[0])
            db.execute("insert or replace into leases values (?, ?, ?, ?)", (portfolio_id, holder, token, now + ttl))
            return token

        result: int | None = self._tx(run)
        return result

    def renew(self, portfolio_id: str, holder: str, token: int, ttl: float) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            now = time.time()
            cur = db.execute(
                "update leases set expires=? where pid=? and holder=? and token=? and expires>?",
                (now + ttl, portfolio_id, holder, token, now),
            )
            return cur.rowcount == 1

        return bool(self._tx(run))

    def release(self, portfolio_id: str, holder: str, token: int) -> None:
        self._tx(
            lambda db: db.execute(
                "delete from leases where pid=? and holder=? and token=?", (portfolio_id, holder, token)
            )
        )

    def holder(self, portfolio_id: str) -> str | None:
        row = self._db.execute("select holder, expires from leases where pid=?", (portfolio_id,)).fetchone()
        return str(row[0]) if row and row[1] > time.time() else None

    def close(self) -> None:
        self._db.close()


def open_leases(redis_url: str | None, state_dir: Path) -> LeaseStore:
    if redis_url:
        return RedisLeases.from_url(redis_url)
    return SQLiteLeases(state_dir / "leases.sqlite3")
