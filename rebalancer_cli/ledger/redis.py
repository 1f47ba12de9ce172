"""Shadow ledger in Redis, shared by every instance of the daemon.

Each state change is one Lua script, so check-and-lock is atomic on the server however many instances race.
Amounts stay canonical decimal strings end to end: Lua numbers are doubles, so the scripts add, subtract and
compare digit strings (`lib.lua`) and never turn an amount into a number. Every key of a portfolio carries
the hash tag `{portfolio_id}`, which puts them in one slot, so the same scripts run on Redis Cluster. Expiry
uses the server's clock (`TIME`), so instances with skewed clocks agree on which locks are live.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.cluster
from redis.commands.core import Script

from rebalancer_cli.errors import InputError, LeaseLostError, StoreError
from rebalancer_cli.ledger.base import (
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

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SINGLE_SCHEMES = ("redis", "rediss")

_SCRIPTS = (
    "lock",
    "commit",
    "release",
    "sync",
    "set_memory",
    "advance_fence",
    "available",
    "locks",
    "begin_send",
    "epoch",
)
_T = TypeVar("_T")


def redact_url(url: str) -> str:
    """The URL as it may appear in a message or a log: the password and any query string removed."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0] if at else ""
    netloc = f"{user}@{hostport}" if user else hostport
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _fence_arg(fence: int | None) -> str:
    check_fence(fence)
    return "" if fence is None else str(fence)


def _halt(raw: Mapping[str, str]) -> Halt | None:
    if not raw:
        return None
    return Halt(raw.get("reason", ""), raw.get("by", ""), datetime.fromisoformat(raw["at"]))


def _load_script(name: str) -> str:
    package = resources.files("rebalancer_cli.ledger")
    lib = package.joinpath("lib.lua").read_text(encoding="utf-8")
    body = package.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    return f"{lib}\n{body}"


class RedisLedger:
    """ShadowLedger on one Redis server or a Redis Cluster; thread-safe (redis-py pools connections)."""

    def __init__(self, client: redis.Redis | redis.cluster.RedisCluster, url: str) -> None:
        self._client = client
        self._url = redact_url(url)
        self._scripts: dict[str, Script] = {n: client.register_script(_load_script(n)) for n in _SCRIPTS}

    @classmethod
    def from_url(cls, url: str) -> RedisLedger:
        return cls(connect(url), url)

    # --- plumbing ---------------------------------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreError(f"Redis at {self._url} is unreachable: {_first_line(exc)}") from exc
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise StoreError(f"Redis at {self._url} failed: {_first_line(exc)}") from exc

    def _call(self, fn: Callable[[], _T]) -> _T:
        with self._guard():
            return fn()

    @staticmethod
    def _key(portfolio_id: str, name: str) -> str:
        check_portfolio(portfolio_id)
        return f"rb:{{{portfolio_id}}}:{name}"

    def key_names(self, portfolio_id: str) -> list[str]:
        """Every key this ledger may write for a portfolio (for cleanup and for operators' inspection)."""
        names = ("hold", "locks", "done", "fence", "halt", "memory", "epoch", "sent")
        return [self._key(portfolio_id, n) for n in names]

    def _run(self, portfolio_id: str, script: str, keys: list[str], args: list[str]) -> list[str]:
        with self._guard():
            result = self._scripts[script](keys=keys, args=args)
        status, detail = str(result[0]), str(result[1])
        if status == "fenced":
            self._fenced(portfolio_id, args[0], detail)
        return [status, detail]

    @staticmethod
    def _fenced(portfolio_id: str, token: str, highest: str) -> None:
        raise LeaseLostError(
            f"portfolio {portfolio_id}: fencing token {token} is older than {highest}; "
            "this instance lost its lease and may not write"
        )

    # --- holdings ---------------------------------------------------------------------------------

    def sync_balances(
        self,
        portfolio_id: str,
        balances: Mapping[str, Decimal],
        *,
        fence: int | None = None,
        unless_locked: bool = False,
    ) -> bool:
        pairs: list[str] = []
        for asset, amount in balances.items():
            check_name(asset, "asset")
            pairs += [asset, amount_text(amount, f"balance of {asset}")]
        keys = [self._key(portfolio_id, n) for n in ("hold", "fence", "locks")]
        status, _ = self._run(portfolio_id, "sync", keys, [_fence_arg(fence), "1" if unless_locked else "", *pairs])
        return status == "ok"

    def balances(self, portfolio_id: str) -> dict[str, Decimal]:
        key = self._key(portfolio_id, "hold")
        raw: dict[str, str] = self._call(lambda: self._client.hgetall(key))  # type: ignore[arg-type, return-value]
        return {asset: Decimal(text) for asset, text in sorted(raw.items())}

    def available(self, portfolio_id: str, asset: str) -> Decimal:
        check_name(asset, "asset")
        keys = [self._key(portfolio_id, "hold"), self._key(portfolio_id, "locks")]
        with self._guard():
            text = self._scripts["available"](keys=keys, args=[asset])
        return Decimal(str(text))

    # --- locks ------------------------------------------------------------------------------------

    def _lock_keys(self, portfolio_id: str) -> list[str]:
        return [self._key(portfolio_id, n) for n in ("hold", "locks", "done", "fence", "sent")]

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
        check_ttl(ttl_seconds)
        args = [_fence_arg(fence), str(max(1, math.ceil(ttl_seconds * 1000)))]
        for request in lock_requests(requests):
            args += request
        if not requests:
            return []
        keys = self._lock_keys(portfolio_id)
        with self._guard():
            result = [str(r) for r in self._scripts["lock"](keys=keys, args=args)]
        if result[0] == "fenced":
            self._fenced(portfolio_id, args[0], result[1])
        return [status != "refused" for status in result[1:]]

    def commit(
        self,
        portfolio_id: str,
        key: str,
        *,
        debit: Mapping[str, Decimal],
        credit: Mapping[str, Decimal],
        fence: int | None = None,
    ) -> bool:
        """Return False when `key` was committed before, also by an earlier attempt of this very call whose
        reply was lost: either way the fill is in the holdings exactly once."""
        return self.commit_many(portfolio_id, [Commit(key, debit, credit)], fence=fence)[0]

    def commit_many(
        self, portfolio_id: str, commits: Sequence[Commit], *, fence: int | None = None, memory: str | None = None
    ) -> list[bool]:
        if memory is not None and not isinstance(memory, str):
            raise TypeError(f"memory must be text, not {type(memory).__name__}")
        args = [_fence_arg(fence), "" if memory is None else "1", memory or ""]
        for key, debits, credits in commit_requests(commits):
            args += [key, str(len(debits)), str(len(credits))]
            for asset, text in debits + credits:
                args += [asset, text]
        if not commits:
            if memory is not None:
                self.set_memory(portfolio_id, memory, fence=fence)
            return []
        keys = [*self._lock_keys(portfolio_id), self._key(portfolio_id, "memory")]
        with self._guard():
            result = [str(r) for r in self._scripts["commit"](keys=keys, args=args)]
        if result[0] == "fenced":
            self._fenced(portfolio_id, args[0], result[1])
        return [status == "committed" for status in result[1:]]

    def release(self, portfolio_id: str, key: str, *, fence: int | None = None) -> None:
        check_name(key, "key")
        keys = [self._key(portfolio_id, n) for n in ("locks", "fence", "sent")]
        self._run(portfolio_id, "release", keys, [_fence_arg(fence), key])

    def locks(self, portfolio_id: str) -> list[Lock]:
        keys = [self._key(portfolio_id, "locks")]
        with self._guard():
            flat = self._scripts["locks"](keys=keys, args=[])
        out: list[Lock] = []
        for i in range(0, len(flat), 2):
            asset, amount, expires_ms = str(flat[i + 1]).split("\n")
            out.append(Lock(str(flat[i]), asset, Decimal(amount), int(expires_ms) / 1000))
        return sorted(out, key=lambda lock: lock.key)

    def is_committed(self, portfolio_id: str, key: str) -> bool:
        check_name(key, "key")
        done = self._key(portfolio_id, "done")
        return self._call(lambda: self._client.zscore(done, key)) is not None

    # --- leases, kill switch, planner memory ------------------------------------------------------

    def begin_send(
        self, portfolio_id: str, key: str, *, fence: int | None, at: datetime | None = None
    ) -> tuple[SendCheck, str]:
        return self.begin_send_many(portfolio_id, [key], fence=fence, at=at)[0]

    def begin_send_many(
        self, portfolio_id: str, keys: Sequence[str], *, fence: int | None, at: datetime | None = None
    ) -> list[tuple[SendCheck, str]]:
        for key in keys:
            check_name(key, "key")
        fence_arg = _fence_arg(fence)
        if not keys:
            return []
        names = [self._key(portfolio_id, n) for n in ("fence", "halt", "locks", "sent")]
        stamp = "" if at is None else str(math.floor(at.timestamp() * 1000))
        with self._guard():
            result = [str(r) for r in self._scripts["begin_send"](keys=names, args=[fence_arg, stamp, *keys])]
        if result[0] == "fenced":
            self._fenced(portfolio_id, fence_arg, result[1])
        if result[0] == "halted":
            return [("halted", result[1])] * len(keys)
        if result[0] != "ok" or len(result) != len(keys) + 1 or any(r not in ("ok", "unlocked") for r in result[1:]):
            raise StoreError(f"Redis ledger answered {result!r} to begin_send")
        return [(cast(SendCheck, r), "") for r in result[1:]]

    def sent_at(self, portfolio_id: str, key: str) -> datetime | None:
        check_name(key, "key")
        name = self._key(portfolio_id, "sent")
        raw = self._call(lambda: self._client.hget(name, key))
        return None if raw is None else datetime.fromtimestamp(int(str(raw)) / 1000, UTC)

    def epoch(self, portfolio_id: str, fresh: str) -> tuple[str, bool]:
        check_name(fresh, "epoch")
        with self._guard():
            result = self._scripts["epoch"](keys=[self._key(portfolio_id, "epoch")], args=[fresh])
        return str(result[0]), str(result[1]) == "new"

    def advance_fence(self, portfolio_id: str, token: int) -> None:
        """Raise LeaseLostError when a newer token was announced already: the caller's lease is stale."""
        if token is None:
            raise ValueError("fencing token must be an integer, not None")
        self._run(portfolio_id, "advance_fence", [self._key(portfolio_id, "fence")], [_fence_arg(token)])

    def halt(self, portfolio_id: str, reason: str, by: str) -> None:
        key = self._key(portfolio_id, "halt")
        at = datetime.now(UTC).isoformat()
        self._call(lambda: self._client.hset(key, mapping={"reason": reason, "by": by, "at": at}))

    def resume(self, portfolio_id: str) -> None:
        key = self._key(portfolio_id, "halt")
        self._call(lambda: self._client.delete(key))

    def halted(self, portfolio_id: str) -> Halt | None:
        key = self._key(portfolio_id, "halt")
        raw: dict[str, str] = self._call(lambda: self._client.hgetall(key))  # type: ignore[arg-type, return-value]
        return _halt(raw)

    def halt_and_memory(self, portfolio_id: str) -> tuple[Halt | None, str | None]:
        halt, memory = self._key(portfolio_id, "halt"), self._key(portfolio_id, "memory")

        def both() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)  # one slot (hash tag): also on a cluster
            pipe.hgetall(halt)
            pipe.get(memory)
            return pipe.execute()

        raw, value = self._call(both)
        return _halt(raw), None if value is None else str(value)

    def get_memory(self, portfolio_id: str) -> str | None:
        key = self._key(portfolio_id, "memory")
        value = self._call(lambda: self._client.get(key))
        return None if value is None else str(value)

    def set_memory(self, portfolio_id: str, value: str, *, fence: int | None = None) -> None:
        if not isinstance(value, str):
            raise TypeError(f"memory must be text, not {type(value).__name__}")
        keys = [self._key(portfolio_id, "memory"), self._key(portfolio_id, "fence")]
        self._run(portfolio_id, "set_memory", keys, [_fence_arg(fence), value])

    def ping(self) -> None:
        self._call(self._client.ping)

    def close(self) -> None:
        with self._guard():
            self._client.close()


def connect(url: str) -> redis.Redis | redis.cluster.RedisCluster:
    """Connect lazily to a server, or eagerly to a cluster (redis-py reads its slot map at once).

    Shared by everything that keeps cross-instance state in Redis (ledger, leases, rate limits)."""
    scheme = urlsplit(url).scheme.lower()
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": 5,
        "socket_timeout": 10,
    }
    display = redact_url(url)
    try:
        if scheme in CLUSTER_SCHEMES:
            plain = scheme.removesuffix("+cluster") + url[len(scheme) :]
            client: redis.Redis | redis.cluster.RedisCluster = redis.cluster.RedisCluster.from_url(plain, **options)
        elif scheme in SINGLE_SCHEMES:
            client = redis.Redis.from_url(url, **options)
        else:
            raise ValueError(f"not a Redis URL scheme: {scheme!r}")
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        raise StoreError(f"Redis at {display} is unreachable: {_first_line(exc)}") from exc
    except (ValueError, TypeError) as exc:
        raise InputError(f"Redis URL {display} is invalid: {_first_line(exc)}") from exc
    return client
