"""Token buckets that keep our request weight under the exchange's own limit.

Exchanges ban accounts and IPs that exceed their request budget (Binance answers 429, then 418 with bans
from minutes to days), so we spend only a fraction of the budget and stop everyone sharing it the moment
the exchange says Retry-After. The budget belongs to the exchange account (or IP), not to the process, so
the Redis bucket lets every process and daemon instance of one account draw from the same tokens.

Written here rather than with pyrate-limiter: that library counts integer weights in a sliding log (one
Redis sorted-set member per unit of weight, 6000 a minute on Binance), has no Retry-After penalty shared by
all holders, and timestamps with the client's clock; a token bucket is one small Lua script on server time.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from rebalancer_cli.errors import RateLimitedError, StoreError

if TYPE_CHECKING:  # redis is imported only when a shared (Redis) bucket is built: ~135 ms of every start-up
    import redis
    from redis.cluster import RedisCluster

Clock = Callable[[], float]
Sleep = Callable[[float], None]

#: Binance spot's REQUEST_WEIGHT limit, per minute and per IP.
BINANCE_SPOT_WEIGHT_PER_MINUTE = 6000.0

#: How long `acquire` may block by default before it gives up with RateLimitedError. Normal refill waits
#: are milliseconds; only an exchange penalty (a 418 ban) makes waits long, and a caller held for hours
#: is worse than one told why it cannot proceed.
DEFAULT_MAX_WAIT = 60.0

#: Tokens a grant may be short by. Refill arithmetic in floats can leave a bucket 1e-16 below the cost
#: after sleeping exactly the computed wait; without this slack the next wait would be too small to move
#: the clock and the caller would spin. A billionth of a request weight never matters to an exchange.
_SLACK = 1e-9


@runtime_checkable
class RateLimiter(Protocol):
    """What the exchange boundary needs from a rate limiter; costs are request weights, not money."""

    def acquire(self, cost: float = 1.0) -> None:
        """Block until `cost` tokens are granted (thread-safe); RateLimitedError if that takes too long."""
        ...

    def penalize(self, seconds: float) -> None:
        """The exchange said Retry-After `seconds`: nobody sharing this bucket is granted before then."""
        ...

    def remaining(self) -> float:
        """Tokens available now, for the `exchange_rate_limit_remaining` gauge."""
        ...

    @property
    def capacity(self) -> float:
        """The most one grant can take."""
        ...


def _check_config(capacity: float, refill_per_second: float) -> None:
    if not (capacity > 0 and math.isfinite(capacity)):
        raise ValueError(f"capacity must be a positive finite number, not {capacity!r}")
    if not (refill_per_second > 0 and math.isfinite(refill_per_second)):
        raise ValueError(f"refill_per_second must be a positive finite number, not {refill_per_second!r}")


def _check_cost(cost: float, capacity: float) -> None:
    # A cost above the capacity could never be granted: fail loudly instead of blocking forever.
    if not (cost >= 0 and math.isfinite(cost)):
        raise ValueError(f"cost must be a non-negative finite number, not {cost!r}")
    if cost > capacity:
        raise ValueError(f"cost {cost} exceeds the bucket capacity {capacity}; it could never be granted")


def _too_long(wait: float, waited: float, max_wait: float | None) -> RateLimitedError | None:
    if max_wait is not None and waited + wait > max_wait:
        return RateLimitedError(
            f"rate limit: would wait {waited + wait:.3f}s for the request budget (limit {max_wait:.3f}s)",
            retry_after=wait,
        )
    return None


class LocalTokenBucket:
    """A token bucket for one process; threads share it through a lock and sleep outside it."""

    def __init__(
        self,
        capacity: float,
        refill_per_second: float,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        *,
        max_wait: float | None = DEFAULT_MAX_WAIT,
    ) -> None:
        _check_config(capacity, refill_per_second)
        self.capacity = float(capacity)
        self.refill_per_second = float(refill_per_second)
        self.max_wait = max_wait
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.capacity
        self._stamp = clock()
        self._blocked_until = -math.inf

    def _refill(self, now: float) -> None:
        # Time spent under a penalty earns nothing: the exchange told us we had already overspent.
        start = max(self._stamp, self._blocked_until)
        if now > start:
            self._tokens = min(self.capacity, self._tokens + (now - start) * self.refill_per_second)
            self._stamp = now

    def _take(self, cost: float) -> float:
        """Grant and return 0.0, or return how long to wait before asking again."""
        with self._lock:
            now = self._clock()
            if now < self._blocked_until:
                return self._blocked_until - now
            self._refill(now)
            if self._tokens + _SLACK >= cost:
                self._tokens = max(0.0, self._tokens - cost)
                return 0.0
            return (cost - self._tokens) / self.refill_per_second

    def try_acquire(self, cost: float = 1.0) -> bool:
        """Take `cost` tokens if they are there now; never blocks."""
        _check_cost(cost, self.capacity)
        return self._take(cost) == 0.0

    def acquire(self, cost: float = 1.0) -> None:
        _check_cost(cost, self.capacity)
        waited = 0.0
        while True:
            wait = self._take(cost)
            if wait == 0.0:
                return
            error = _too_long(wait, waited, self.max_wait)
            if error is not None:
                raise error
            self._sleep(wait)
            waited += wait

    def penalize(self, seconds: float) -> None:
        with self._lock:
            now = self._clock()
            self._refill(now)
            self._tokens = 0.0
            self._stamp = now
            self._blocked_until = max(self._blocked_until, now + max(0.0, seconds))

    def remaining(self) -> float:
        with self._lock:
            now = self._clock()
            if now < self._blocked_until:
                return 0.0
            self._refill(now)
            return self._tokens


# One atomic step on server time, so processes on different hosts (and clock skews) agree.
# KEYS[1]: the bucket hash. ARGV: op ('take' | 'peek' | 'penalize'), capacity, refill per second,
# cost (take) or seconds (penalize). Returns {granted 0|1, seconds to wait, tokens left} as strings.
_BUCKET_LUA = """
local key = KEYS[1]
local op = ARGV[1]
local capacity = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])
local arg = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', key, 'tokens', 'ts', 'blocked')
local tokens = tonumber(s[1])
local ts = tonumber(s[2])
local blocked = tonumber(s[3]) or 0
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
local start = math.max(ts, blocked)
if now > start then
  tokens = math.min(capacity, tokens + (now - start) * rate)
  ts = now
end
local granted = 0
local wait = 0
if op == 'penalize' then
  tokens = 0
  ts = now
  blocked = math.max(blocked, now + arg)
elseif now < blocked then
  wait = blocked - now
elseif op == 'take' then
  if tokens + 1e-9 >= arg then
    tokens = math.max(0, tokens - arg)
    granted = 1
  else
    wait = (arg - tokens) / rate
  end
end
if now < blocked then
  tokens = 0
end
if op ~= 'peek' then
  redis.call('HSET', key, 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.6f', ts),
             'blocked', string.format('%.6f', blocked))
  local idle = (capacity - tokens) / rate + math.max(0, blocked - now)
  redis.call('PEXPIRE', key, math.ceil(idle * 1000) + 1000)
end
return {granted, string.format('%.17g', wait), string.format('%.17g', tokens)}
"""


def rate_limit_key(exchange_id: str, account: str) -> str:
    """The Redis key of an account's bucket; the braces are a Redis Cluster hash tag for its slot."""
    return f"rl:{{{exchange_id}:{account}}}"


class RedisTokenBucket:
    """A token bucket in Redis, shared by every process and instance that uses the same key."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        key: str,
        capacity: float,
        refill_per_second: float,
        *,
        sleep: Sleep = time.sleep,
        max_wait: float | None = DEFAULT_MAX_WAIT,
    ) -> None:
        _check_config(capacity, refill_per_second)
        self.key = key
        self.capacity = float(capacity)
        self.refill_per_second = float(refill_per_second)
        self.max_wait = max_wait
        self._client = client
        self._sleep = sleep
        self._script = client.register_script(_BUCKET_LUA)
        import redis  # already loaded: the caller built `client`

        self._redis_error: type[Exception] = redis.RedisError

    def _run(self, op: str, arg: float) -> tuple[bool, float, float]:
        args = [op, repr(self.capacity), repr(self.refill_per_second), repr(float(arg))]
        try:
            granted, wait, tokens = self._script(keys=[self.key], args=args, client=self._client)
        except self._redis_error as exc:
            raise StoreError(f"rate limiter: Redis failed for {self.key}: {exc}") from exc
        return int(granted) == 1, float(wait), float(tokens)

    def try_acquire(self, cost: float = 1.0) -> bool:
        """Take `cost` tokens if they are there now; never blocks."""
        _check_cost(cost, self.capacity)
        return self._run("take", cost)[0]

    def acquire(self, cost: float = 1.0) -> None:
        _check_cost(cost, self.capacity)
        waited = 0.0
        while True:
            granted, wait, _ = self._run("take", cost)
            if granted:
                return
            error = _too_long(wait, waited, self.max_wait)
            if error is not None:
                raise error
            self._sleep(wait)
            waited += wait

    def penalize(self, seconds: float) -> None:
        self._run("penalize", max(0.0, seconds))

    def remaining(self) -> float:
        return self._run("peek", 0.0)[2]


class Prepaid:
    """A rate limiter whose requests sent side by side take their tokens in one grant.

    A shared (Redis) bucket costs a round trip per grant, on the path of every request: three books read side by
    side paid three, one after the other in effect, since each thread waits for its own. Inside `batch(n)`, the
    first request to ask takes the tokens of all `n` at its own cost each (requests of one batch hit one
    endpoint, so they weigh the same), and the others spend that credit without asking. Nothing is ever sent on
    tokens the bucket did not grant: a request that finds no credit asks the bucket as before; credit left when
    the last batch closes is dropped (tokens taken early and never spent only make us slower); a penalty
    (Retry-After) drops it at once, so nothing more leaves on it.
    """

    def __init__(self, inner: RateLimiter) -> None:
        self.inner = inner
        self._lock = threading.Condition()
        self._open = 0  # batches open
        self._pending = 0  # requests announced by open batches that have neither asked nor been paid for
        self._credit = 0.0
        self._granting = False  # a grant for several is on its way: the others wait for it, not the bucket
        self._penalties = 0  # penalties so far: a grant that was on its way during one adds no credit

    @contextlib.contextmanager
    def batch(self, requests: int) -> Iterator[None]:
        """The next `requests` requests go side by side."""
        with self._lock:
            self._open += 1
            self._pending += max(0, requests)
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1
                if self._open == 0:
                    self._pending, self._credit = 0, 0.0

    def acquire(self, cost: float = 1.0) -> None:
        with self._lock:
            while self._granting:
                self._lock.wait()
            if self._credit + _SLACK >= cost > 0:
                self._credit = max(0.0, self._credit - cost)
                return
            ahead = self._pending
            # a grant above the bucket's capacity could never be given: then each asks on its own
            together = ahead > 1 and cost > 0 and cost * ahead <= self.inner.capacity
            if together:
                self._pending, self._granting = 0, True
                penalties = self._penalties
        if not together:
            self.inner.acquire(cost)
            return
        granted = False
        try:
            self.inner.acquire(cost * ahead)
            granted = True
        finally:
            with self._lock:
                self._granting = False
                if granted and self._open and self._penalties == penalties:
                    self._credit += cost * (ahead - 1)
                elif not granted:
                    self._pending += ahead  # not taken: the others ask on their own
                self._lock.notify_all()

    def penalize(self, seconds: float) -> None:
        with self._lock:
            self._pending, self._credit = 0, 0.0
            self._penalties += 1
        self.inner.penalize(seconds)

    def remaining(self) -> float:
        return self.inner.remaining()

    @property
    def capacity(self) -> float:
        return self.inner.capacity


def limit_per_minute_from_ccxt(rate_limit_ms: float) -> float:
    """ccxt's `rateLimit` is milliseconds between unit-cost requests; as a per-minute weight budget."""
    if not rate_limit_ms > 0:
        raise ValueError(f"rateLimit must be positive milliseconds, not {rate_limit_ms!r}")
    return 60_000.0 / rate_limit_ms


def bucket_for_exchange(
    limit_per_minute: float,
    fraction: float = 0.8,
    *,
    client: redis.Redis | RedisCluster | None = None,
    key: str | None = None,
    max_cost: float = 1.0,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    max_wait: float | None = DEFAULT_MAX_WAIT,
) -> LocalTokenBucket | RedisTokenBucket:
    """A bucket that refills at `fraction` of the exchange limit, with a burst no window can overspend.

    Exchanges count weight in fixed or sliding minutes. A bucket grants at most capacity + refill * 60 in
    any 60 seconds, so the burst capacity is the rest of the limit, (1 - fraction) * limit: even a burst
    right after a quiet spell keeps every minute within the exchange's limit, while the steady rate stays
    at `fraction` of it. The capacity is raised to `max_cost` (the heaviest endpoint's weight) when the
    limit is too small for that, else such a request could never be granted. With a Redis `client` (and
    `key`, see `rate_limit_key`) the bucket is shared by every process using that key.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be strictly between 0 and 1, not {fraction!r}")
    if not (limit_per_minute > 0 and math.isfinite(limit_per_minute)):
        raise ValueError(f"limit_per_minute must be a positive finite number, not {limit_per_minute!r}")
    refill = limit_per_minute * fraction / 60.0
    capacity = max(limit_per_minute * (1.0 - fraction), max_cost)
    if client is None:
        return LocalTokenBucket(capacity, refill, clock, sleep, max_wait=max_wait)
    if key is None:
        raise ValueError("a shared (Redis) bucket needs a key, e.g. rate_limit_key('binance', account)")
    return RedisTokenBucket(client, key, capacity, refill, sleep=sleep, max_wait=max_wait)
