"""Portfolio leases: at most one daemon instance works a portfolio at a time, and a dead one is replaced
within one lease TTL.

A lease carries a fencing token that only ever grows (Kleppmann's fencing tokens): the holder hands it to the
shadow ledger with every write, so an instance that paused past its lease (GC, a stopped VM) and wakes up
believing it still holds the portfolio is refused by the ledger instead of trading beside its successor.

Instances also announce themselves (a heartbeat with the same TTL), so that each can count the live ones and
claim only its fair share: without it, the first instance to start would claim every portfolio and a second
one would sit idle. Two implementations: Redis (shared by instances on many hosts; every lease key is
hash-tagged by portfolio, so it runs on Redis Cluster, and the one membership key lives in a single slot) and
SQLite (instances on one host sharing a state directory).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .errors import StoreError
from .fsutil import open_sqlite

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
# Drop a lease whatever its token, but only while `holder` (exactly) still has it.
_BREAK = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# The server's clock decides who is alive, as it decides lease expiry: hosts with skewed clocks still agree.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 4)
return redis.call('ZCARD', KEYS[1])
"""
MEMBERS_KEY = "rb:daemon:members"
# Commands per pipeline round trip: big enough that 5,000 renewals take a handful of round trips, small enough
# that one answer never holds megabytes.
PIPELINE_CHUNK = 1000


class LeaseStore(Protocol):
    def acquire(self, portfolio_id: str, holder: str, ttl: float) -> int | None:
        """The fencing token when this holder now has the lease (new or renewed), else None."""
        ...

    def renew(self, portfolio_id: str, holder: str, token: int, ttl: float) -> bool: ...

    def acquire_many(self, portfolio_ids: Sequence[str], holder: str, ttl: float) -> dict[str, int]:
        """`acquire` for many portfolios in one round trip: the tokens of those this holder now has."""
        ...

    def renew_many(self, tokens: Mapping[str, int], holder: str, ttl: float) -> set[str]:
        """`renew` for many portfolios in one round trip; returns those whose lease this holder lost.

        Raises StoreError when the store failed: then nothing is known about any of them."""
        ...

    def holders(self, portfolio_ids: Sequence[str]) -> dict[str, str | None]:
        """`holder` of many portfolios in one round trip."""
        ...

    def release_many(self, tokens: Mapping[str, int], holder: str) -> None:
        """`release` for many portfolios in one round trip (a clean stop hands thousands back at once)."""
        ...

    def release(self, portfolio_id: str, holder: str, token: int) -> None: ...

    def holder(self, portfolio_id: str) -> str | None: ...

    def break_lease(self, portfolio_id: str, holder: str) -> bool:
        """Drop the lease while `holder` has it, whatever its token: for a holder known to be dead (a run
        killed on this host). Its fencing token stays spent, so its late writes are refused anyway."""
        ...

    def heartbeat(self, holder: str, ttl: float) -> int:
        """Announce `holder` alive for `ttl` seconds; returns how many instances are alive, itself included."""
        ...

    def leave(self, holder: str) -> None:
        """Withdraw the announcement at a clean stop, so the others take over at once instead of after a TTL."""
        ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


class RedisLeases:
    def __init__(self, client: Any) -> None:
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._break = client.register_script(_BREAK)
        self._heartbeat = client.register_script(_HEARTBEAT)

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
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            # a cluster reshuffling slots, a script error: the lease state is unknown, never a crash of the loop
            raise StoreError(f"lease store failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc

    @staticmethod
    def _ms(ttl: float) -> int:
        return max(1, int(ttl * 1000))

    def acquire(self, portfolio_id: str, holder: str, ttl: float) -> int | None:
        keys = self._keys(portfolio_id)
        token = int(self._call(lambda: self._acquire(keys=keys, args=[holder, self._ms(ttl)])))
        return token if token > 0 else None

    def renew(self, portfolio_id: str, holder: str, token: int, ttl: float) -> bool:
        keys = self._keys(portfolio_id)[:1]
        return bool(self._call(lambda: self._renew(keys=keys, args=[f"{holder}|{token}", self._ms(ttl)])))

    def _pipelined(self, script: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """One script over many keys, PIPELINE_CHUNK calls per round trip (on a cluster, redis-py splits each
        chunk by node). EVAL, not EVALSHA: redis-py refuses EVALSHA in a cluster pipeline, and a server that lost
        its script cache (a restart, a failover) would answer NOSCRIPT to a whole batch."""

        def run(chunk: list[tuple[list[str], list[Any]]]) -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for keys, args in chunk:
                # execute_command, not pipe.eval: a cluster pipeline shadows eval() with a method of its own
                pipe.execute_command("EVAL", script.script, len(keys), *keys, *args)
            return list(pipe.execute())

        out: list[Any] = []
        for start in range(0, len(calls), PIPELINE_CHUNK):
            chunk = calls[start : start + PIPELINE_CHUNK]
            out += self._call(lambda chunk=chunk: run(chunk))
        return out

    def acquire_many(self, portfolio_ids: Sequence[str], holder: str, ttl: float) -> dict[str, int]:
        calls = [(self._keys(pid), [holder, self._ms(ttl)]) for pid in portfolio_ids]
        answers = self._pipelined(self._acquire, calls)
        return {pid: int(a) for pid, a in zip(portfolio_ids, answers, strict=True) if int(a) > 0}

    def renew_many(self, tokens: Mapping[str, int], holder: str, ttl: float) -> set[str]:
        pids = list(tokens)
        calls = [(self._keys(pid)[:1], [f"{holder}|{tokens[pid]}", self._ms(ttl)]) for pid in pids]
        answers = self._pipelined(self._renew, calls)
        return {pid for pid, ok in zip(pids, answers, strict=True) if not int(ok)}

    def holders(self, portfolio_ids: Sequence[str]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for start in range(0, len(portfolio_ids), PIPELINE_CHUNK):
            chunk = portfolio_ids[start : start + PIPELINE_CHUNK]

            def run(chunk: Sequence[str] = chunk) -> list[Any]:
                pipe = self._client.pipeline(transaction=False)
                for pid in chunk:
                    pipe.get(self._keys(pid)[0])
                return list(pipe.execute())

            for pid, value in zip(chunk, self._call(run), strict=True):
                out[pid] = str(value).rsplit("|", 1)[0] if value else None
        return out

    def release_many(self, tokens: Mapping[str, int], holder: str) -> None:
        self._pipelined(self._release, [(self._keys(pid)[:1], [f"{holder}|{token}"]) for pid, token in tokens.items()])

    def release(self, portfolio_id: str, holder: str, token: int) -> None:
        keys = self._keys(portfolio_id)[:1]
        self._call(lambda: self._release(keys=keys, args=[f"{holder}|{token}"]))

    def holder(self, portfolio_id: str) -> str | None:
        value = self._call(lambda: self._client.get(self._keys(portfolio_id)[0]))
        return str(value).rsplit("|", 1)[0] if value else None

    def break_lease(self, portfolio_id: str, holder: str) -> bool:
        keys = self._keys(portfolio_id)[:1]
        return bool(self._call(lambda: self._break(keys=keys, args=[holder])))

    def heartbeat(self, holder: str, ttl: float) -> int:
        return int(self._call(lambda: self._heartbeat(keys=[MEMBERS_KEY], args=[holder, self._ms(ttl)])))

    def leave(self, holder: str) -> None:
        self._call(lambda: self._client.zrem(MEMBERS_KEY, holder))

    def ping(self) -> None:
        self._call(self._client.ping)

    def close(self) -> None:
        self._client.close()


class SQLiteLeases:
    """Leases for instances on one host; time is the host's clock, which all of them share."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        try:
            self._db = open_sqlite(path, timeout=30)
            self._db.execute(
                "create table if not exists leases (pid text primary key, holder text, token integer, expires real)"
            )
            self._db.execute("create table if not exists lease_seq (pid text primary key, token integer)")
            self._db.execute("create table if not exists members (holder text primary key, expires real)")
        except (OSError, sqlite3.Error) as exc:
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
                raise StoreError(f"lease store {self._path} failed: {exc}") from None

    @staticmethod
    def _acquire_in(db: sqlite3.Connection, portfolio_id: str, holder: str, ttl: float) -> int | None:
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

    def acquire(self, portfolio_id: str, holder: str, ttl: float) -> int | None:
        result: int | None = self._tx(lambda db: self._acquire_in(db, portfolio_id, holder, ttl))
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

    def acquire_many(self, portfolio_ids: Sequence[str], holder: str, ttl: float) -> dict[str, int]:
        def run(db: sqlite3.Connection) -> dict[str, int]:
            out: dict[str, int] = {}
            for pid in portfolio_ids:
                token = self._acquire_in(db, pid, holder, ttl)
                if token is not None:
                    out[pid] = token
            return out

        result: dict[str, int] = self._tx(run)
        return result

    def renew_many(self, tokens: Mapping[str, int], holder: str, ttl: float) -> set[str]:
        """All in one transaction: one fsync for every lease of this instance, instead of one each."""

        def run(db: sqlite3.Connection) -> set[str]:
            now = time.time()
            lost: set[str] = set()
            for pid, token in tokens.items():
                cur = db.execute(
                    "update leases set expires=? where pid=? and holder=? and token=? and expires>?",
                    (now + ttl, pid, holder, token, now),
                )
                if cur.rowcount != 1:
                    lost.add(pid)
            return lost

        result: set[str] = self._tx(run)
        return result

    def holders(self, portfolio_ids: Sequence[str]) -> dict[str, str | None]:
        def run(db: sqlite3.Connection) -> dict[str, str | None]:
            now = time.time()
            out: dict[str, str | None] = dict.fromkeys(portfolio_ids)
            for pid in portfolio_ids:
                row = db.execute("select holder, expires from leases where pid=?", (pid,)).fetchone()
                if row and row[1] > now:
                    out[pid] = str(row[0])
            return out

        result: dict[str, str | None] = self._tx(run)
        return result

    def release_many(self, tokens: Mapping[str, int], holder: str) -> None:
        self._tx(
            lambda db: db.executemany(
                "delete from leases where pid=? and holder=? and token=?",
                [(pid, holder, token) for pid, token in tokens.items()],
            )
        )

    def release(self, portfolio_id: str, holder: str, token: int) -> None:
        self._tx(
            lambda db: db.execute(
                "delete from leases where pid=? and holder=? and token=?", (portfolio_id, holder, token)
            )
        )

    def holder(self, portfolio_id: str) -> str | None:
        def run(db: sqlite3.Connection) -> str | None:
            row = db.execute("select holder, expires from leases where pid=?", (portfolio_id,)).fetchone()
            return str(row[0]) if row and row[1] > time.time() else None

        result: str | None = self._tx(run)
        return result

    def break_lease(self, portfolio_id: str, holder: str) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            cur = db.execute("delete from leases where pid=? and holder=?", (portfolio_id, holder))
            return cur.rowcount == 1

        return bool(self._tx(run))

    def heartbeat(self, holder: str, ttl: float) -> int:
        def run(db: sqlite3.Connection) -> int:
            now = time.time()
            db.execute("delete from members where expires <= ?", (now,))
            db.execute("insert or replace into members values (?, ?)", (holder, now + ttl))
            return int(db.execute("select count(*) from members").fetchone()[0])

        result: int = self._tx(run)
        return result

    def leave(self, holder: str) -> None:
        self._tx(lambda db: db.execute("delete from members where holder=?", (holder,)))

    def ping(self) -> None:
        self._tx(lambda db: db.execute("select count(*) from leases").fetchone())

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_leases(redis_url: str | None, state_dir: Path) -> LeaseStore:
    if redis_url:
        return RedisLeases.from_url(redis_url)
    return SQLiteLeases(state_dir / "leases.sqlite3")
