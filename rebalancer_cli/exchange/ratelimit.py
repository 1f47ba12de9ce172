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
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

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

    def _take(self, cost: float, extra: float = 0.0) -> tuple[float, float]:
        """(0.0, tokens granted: `cost` and up to `extra` more if they are there), or (how long to wait
        before asking again, 0.0)."""
        with self._lock:
            now = self._clock()
            if now < self._blocked_until:
                return self._blocked_until - now, 0.0
            self._refill(now)
            if self._tokens + _SLACK >= cost:
                granted = max(cost, min(self._tokens, cost + extra))
                self._tokens = max(0.0, self._tokens - granted)
                return 0.0, granted
            return (cost - self._tokens) / self.refill_per_second, 0.0

    def try_acquire(self, cost: float = 1.0) -> bool:
        """Take `cost` tokens if they are there now; never blocks."""
        _check_cost(cost, self.capacity)
        return self._take(cost)[0] == 0.0

    def acquire(self, cost: float = 1.0) -> None:
        self.acquire_upto(cost, 0.0)

    def acquire_upto(self, cost: float, extra: float) -> float:
        """`acquire(cost)`, taking up to `extra` tokens more in the same grant where the bucket holds them (never
        waiting for them); returns the tokens granted."""
        _check_cost(cost, self.capacity)
        waited = 0.0
        while True:
            wait, granted = self._take(cost, max(0.0, extra))
            if wait == 0.0:
                return granted
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
# cost (take) or seconds (penalize), and for take the extra tokens it may have as well if they are there (0 when
# absent). Returns {granted 0|1, seconds to wait, tokens left, tokens granted} as strings.
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
local extra = tonumber(ARGV[5]) or 0
local granted = 0
local amount = 0
local wait = 0
if op == 'penalize' then
  tokens = 0
  ts = now
  blocked = math.max(blocked, now + arg)
elseif now < blocked then
  wait = blocked - now
elseif op == 'take' then
  if tokens + 1e-9 >= arg then
    amount = math.max(arg, math.min(tokens, arg + math.max(0, extra)))
    tokens = math.max(0, tokens - amount)
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
return {granted, string.format('%.17g', wait), string.format('%.17g', tokens), string.format('%.17g', amount)}
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

    def _run(self, op: str, arg: float, extra: float = 0.0) -> tuple[bool, float, float, float]:
        args = [op, repr(self.capacity), repr(self.refill_per_second), repr(float(arg)), repr(float(extra))]
        try:
            granted, wait, tokens, amount = self._script(keys=[self.key], args=args, client=self._client)
        except self._redis_error as exc:
            raise StoreError(f"rate limiter: Redis failed for {self.key}: {exc}") from exc
        return int(granted) == 1, float(wait), float(tokens), float(amount)

    def try_acquire(self, cost: float = 1.0) -> bool:
        """Take `cost` tokens if they are there now; never blocks."""
        _check_cost(cost, self.capacity)
        return self._run("take", cost)[0]

    def acquire(self, cost: float = 1.0) -> None:
        self.acquire_upto(cost, 0.0)

    def acquire_upto(self, cost: float, extra: float) -> float:
        """`acquire(cost)`, taking up to `extra` tokens more in the same grant where the bucket holds them (never
        waiting for them); returns the tokens granted."""
        _check_cost(cost, self.capacity)
        waited = 0.0
        while True:
            granted, wait, _, amount = self._run("take", cost, max(0.0, extra))
            if granted:
                return amount
            error = _too_long(wait, waited, self.max_wait)
            if error is not None:
                raise error
            self._sleep(wait)
            waited += wait

    def penalize(self, seconds: float) -> None:
        self._run("penalize", max(0.0, seconds))

    def remaining(self) -> float:
        return self._run("peek", 0.0)[2]


@runtime_checkable
class Reserving(RateLimiter, Protocol):
    """A bucket that can grant a little more than asked in the same grant (both buckets here)."""

    def acquire_upto(self, cost: float, extra: float) -> float:
        """`acquire(cost)`, plus up to `extra` more tokens where the bucket holds them now; the tokens granted."""
        ...


class Prepaid:
    """A rate limiter that asks its bucket less often than it sends: a shared (Redis) bucket costs a round trip
    per grant, on the path of every request.

    Two kinds of credit, both spent before the bucket is asked again:

    * A batch: inside `batch(n)`, the first request to ask takes the tokens of all `n` at its own cost each
      (requests of one batch hit one endpoint, so they weigh the same), and the others spend that credit
      without asking. Credit left when the last batch closes is dropped.
    * A reserve (`hold_seconds` > 0, over a `Reserving` bucket): a grant also takes, where the bucket holds
      them, as many tokens more as this process spent in the last `hold_seconds` (at most `max_reserve`), and
      later requests spend them for `hold_seconds` after the grant was asked for; then what is left is dropped.
      A daemon's or a benchmark's back-to-back cycles then ask the bucket about once per `hold_seconds`
      instead of four times a cycle. The tokens were granted by the bucket, only spent up to `hold_seconds`
      later, so in any window of W seconds what leaves is at most what the bucket granted in W +
      `hold_seconds`: `bucket_for_exchange(hold_seconds=...)` takes that much off the bucket's burst, and the
      exchange's limit holds exactly as before. Sized by recent demand, a reserve never dropped more tokens
      than were spent in the window before it.

    Nothing is ever sent on tokens the bucket did not grant: a request that finds no credit asks the bucket
    (tokens taken early and never spent only make us slower); a penalty (Retry-After) drops every credit at
    once, and a grant on its way when it came adds none, so nothing more leaves on tokens taken before it.
    """

    def __init__(
        self,
        inner: RateLimiter,
        *,
        hold_seconds: float = 0.0,
        max_reserve: float = 0.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.inner = inner
        self._lock = threading.Condition()
        self._open = 0  # batches open
        self._pending = 0  # requests announced by open batches that have neither asked nor been paid for
        self._credit = 0.0
        self._granting = False  # a grant for several is on its way: the others wait for it, not the bucket
        self._penalties = 0  # penalties so far: a grant that was on its way during one adds no credit
        reserving = hold_seconds > 0 and max_reserve > 0 and isinstance(inner, Reserving)
        self.hold_seconds = hold_seconds if reserving else 0.0
        self._max_reserve = max_reserve if reserving else 0.0
        self._clock = clock
        self._reserve = 0.0
        self._reserve_until = -math.inf
        self._spent: deque[tuple[float, float]] = deque()  # (when, cost) of the last hold_seconds' requests
        self._spent_total = 0.0

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

    def _demand(self, now: float, cost: float) -> float:
        """The tokens asked for in the last hold_seconds before this request (of `cost`, recorded at `now`)."""
        if not self._max_reserve:
            return 0.0
        while self._spent and self._spent[0][0] <= now - self.hold_seconds:
            self._spent_total -= self._spent.popleft()[1]
        before = max(0.0, self._spent_total)
        self._spent.append((now, cost))
        self._spent_total += cost
        return before

    def acquire(self, cost: float = 1.0) -> None:
        with self._lock:
            while self._granting:
                self._lock.wait()
            now = self._clock()
            demand = self._demand(now, cost)
            if self._credit + _SLACK >= cost > 0:
                self._credit = max(0.0, self._credit - cost)
                return
            if now >= self._reserve_until:
                self._reserve = 0.0
            if self._reserve + _SLACK >= cost > 0:
                self._reserve = max(0.0, self._reserve - cost)
                return
            ahead = self._pending
            # a grant above the bucket's capacity could never be given: then each asks on its own
            together = ahead > 1 and cost > 0 and cost * ahead <= self.inner.capacity
            need = cost * ahead if together else cost
            if together:
                self._pending = 0
            extra = min(self._max_reserve, demand) if cost > 0 else 0.0
            if not together and not extra:
                ask: float | None = None  # nothing to share: ask the bucket as before, without the gate
            else:
                self._granting, ask, penalties = True, now, self._penalties
        if ask is None:
            self.inner.acquire(cost)
            return
        granted = 0.0
        try:
            if extra:
                granted = cast(Reserving, self.inner).acquire_upto(need, extra)
            else:
                self.inner.acquire(need)
                granted = need
        finally:
            with self._lock:
                self._granting = False
                if granted and self._penalties == penalties:
                    if together and self._open:
                        self._credit += need - cost
                    if granted > need:  # counted from when it was asked for: it can only expire earlier
                        self._reserve, self._reserve_until = granted - need, ask + self.hold_seconds
                elif not granted and together:
                    self._pending += ahead  # not taken: the others ask on their own
                self._lock.notify_all()

    def penalize(self, seconds: float) -> None:
        with self._lock:
            self._pending, self._credit, self._reserve = 0, 0.0, 0.0
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


def _refill_per_second(limit_per_minute: float, fraction: float) -> float:
    """The steady rate a bucket at `fraction` of an exchange's per-minute limit refills at (the arguments checked)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be strictly between 0 and 1, not {fraction!r}")
    if not (limit_per_minute > 0 and math.isfinite(limit_per_minute)):
        raise ValueError(f"limit_per_minute must be a positive finite number, not {limit_per_minute!r}")
    return limit_per_minute * fraction / 60.0


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
    hold_seconds: float = 0.0,
) -> LocalTokenBucket | RedisTokenBucket:
    """A bucket that refills at `fraction` of the exchange limit, with a burst no window can overspend.

    Exchanges count weight in fixed or sliding minutes. A bucket grants at most capacity + refill * 60 in
    any 60 seconds, so the burst capacity is the rest of the limit, (1 - fraction) * limit: even a burst
    right after a quiet spell keeps every minute within the exchange's limit, while the steady rate stays
    at `fraction` of it. Tokens its users may spend up to `hold_seconds` after the grant (`Prepaid`'s reserve)
    leave within 60 s what it granted in 60 + `hold_seconds`, so the burst is smaller by refill *
    `hold_seconds`. The capacity is raised to `max_cost` (the heaviest endpoint's weight) when the
    limit is too small for that, else such a request could never be granted. With a Redis `client` (and
    `key`, see `rate_limit_key`) the bucket is shared by every process using that key.
    """
    refill = _refill_per_second(limit_per_minute, fraction)
    capacity = max(limit_per_minute * (1.0 - fraction) - refill * max(0.0, hold_seconds), max_cost)
    if client is None:
        return LocalTokenBucket(capacity, refill, clock, sleep, max_wait=max_wait)
    if key is None:
        raise ValueError("a shared (Redis) bucket needs a key, e.g. rate_limit_key('binance', account)")
    return RedisTokenBucket(client, key, capacity, refill, sleep=sleep, max_wait=max_wait)


#: How long a shared bucket's reserve may be spent after its grant, and the most it may hold, as a share of the
#: bucket: half a second of a process's own recent demand, at most 5% of the burst.
RESERVE_HOLD_SECONDS = 0.5
RESERVE_SHARE = 0.05


def account_limiter(
    limit_per_minute: float,
    *,
    client: redis.Redis | RedisCluster | None = None,
    key: str | None = None,
    max_cost: float = 1.0,
    fraction: float = 0.8,
) -> Prepaid:
    """An account's limiter: its bucket (`bucket_for_exchange`) behind `Prepaid`. A shared bucket gets a reserve
    (a round trip saved per request while a process keeps sending), its burst made smaller to pay for it; the
    hold is shortened where the limit is too small to spare that (never below the heaviest request)."""
    refill = _refill_per_second(limit_per_minute, fraction)
    spare = limit_per_minute * (1.0 - fraction) - max_cost
    hold = min(RESERVE_HOLD_SECONDS, max(0.0, spare / refill)) if client is not None else 0.0
    bucket = bucket_for_exchange(
        limit_per_minute, fraction, client=client, key=key, max_cost=max_cost, hold_seconds=hold
    )
    return Prepaid(bucket, hold_seconds=hold, max_reserve=RESERVE_SHARE * bucket.capacity)
