"""Rate limiting, retries and the circuit breaker at the exchange boundary.

Time is a fake clock whose sleep advances it, except for the Redis bucket, which runs on the real server's
clock and is checked against it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rebalancer_cli.errors import (
    CircuitOpenError,
    ExchangeAuthError,
    ExchangeNetworkError,
    ExchangeTimeoutError,
    ExchangeUnavailableError,
    InsufficientFundsError,
    InvalidOrderError,
    OrderAlreadyPlacedError,
    RateLimitedError,
    StoreError,
)
from rebalancer_cli.exchange.breaker import BreakerState, CircuitBreaker
from rebalancer_cli.exchange.ratelimit import (
    BINANCE_SPOT_WEIGHT_PER_MINUTE,
    LocalTokenBucket,
    Prepaid,
    RateLimiter,
    RedisTokenBucket,
    bucket_for_exchange,
    limit_per_minute_from_ccxt,
    rate_limit_key,
)
from rebalancer_cli.exchange.retry import RetryPolicy, call_with_retry


class FakeClock:
    """A monotonic clock that only moves when someone sleeps on it (or a test advances it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def _random_requests(
    limiter: RateLimiter, clock: FakeClock, start: float, rng: random.Random, *, idle: float = 0.0
) -> list[tuple[float, float]]:
    """(when, cost) of requests of random weights for 300 s of the fake clock, each sent once `limiter` grants
    it; after a request, with probability `idle`, a quiet spell of 0.05-20 s."""
    sent: list[tuple[float, float]] = []
    while clock.now - start < 300:
        cost = rng.choice([1.0, 2.0, 5.0, 10.0, 20.0])
        limiter.acquire(cost)
        sent.append((clock.now, cost))
        if idle and rng.random() < idle:
            clock.now += rng.choice([0.05, 0.49, 0.51, 3.0, 20.0])
    return sent


def max_in_window(grants: list[tuple[float, float]], window: float) -> float:
    """Largest total cost granted within any closed interval of `window` seconds."""
    best = total = 0.0
    lo = 0
    for t, cost in grants:
        total += cost
        while grants[lo][0] < t - window:
            total -= grants[lo][1]
            lo += 1
        best = max(best, total)
    return best


# --- local token bucket ---------------------------------------------------------------------------


def test_burst_of_500_never_exceeds_capacity_plus_refill_over_any_interval() -> None:
    clock = FakeClock()
    bucket = LocalTokenBucket(20, 5, clock, clock.sleep)
    rng = random.Random(7)
    grants: list[tuple[float, float]] = []
    for i in range(500):
        if i % 97 == 96:
            clock.now += rng.uniform(0, 30)  # idle spells: the bucket must refill only up to capacity
        cost = rng.choice([0.5, 1.0, 2.0, 3.0])
        bucket.acquire(cost)
        grants.append((clock.now, cost))
    for i in range(len(grants)):
        total = 0.0
        for j in range(i, len(grants)):
            total += grants[j][1]
            assert total <= 20 + 5 * (grants[j][0] - grants[i][0]) + 1e-9, (i, j)


def test_a_saturated_bucket_grants_at_the_refill_rate_not_slower() -> None:
    clock = FakeClock()
    start = clock.now
    bucket = LocalTokenBucket(20, 5, clock, clock.sleep)
    costs = [1.0, 2.0, 0.5, 3.0] * 125
    for cost in costs:
        bucket.acquire(cost)
    # The first 20 are the burst; everything after is paid for at exactly 5 per second.
    assert clock.now - start == pytest.approx((sum(costs) - 20) / 5)
    assert bucket.remaining() == pytest.approx(0, abs=1e-9)


def test_weights_count_and_an_impossible_cost_is_refused() -> None:
    clock = FakeClock()
    bucket = LocalTokenBucket(10, 2, clock, clock.sleep)
    bucket.acquire(4)
    bucket.acquire(4)
    assert clock.sleeps == []
    assert bucket.remaining() == pytest.approx(2)
    assert not bucket.try_acquire(4)
    bucket.acquire(4)  # 2 tokens missing at 2 per second
    assert clock.sleeps == [pytest.approx(1.0)]
    assert bucket.remaining() == pytest.approx(0)
    with pytest.raises(ValueError, match="capacity"):
        bucket.acquire(11)


def test_penalize_blocks_every_caller_until_retry_after_then_refills_from_empty() -> None:
    clock = FakeClock()
    bucket = LocalTokenBucket(10, 2, clock, clock.sleep)
    penalized_at = clock.now
    bucket.penalize(5)
    bucket.penalize(1)  # a shorter, later hint never shortens the ban already known
    assert bucket.remaining() == 0
    assert not bucket.try_acquire(0.5)
    clock.now += 4.9
    assert not bucket.try_acquire(0.5)
    bucket.acquire(1)
    # Waited out the penalty, then the one token it needed at 2 per second: nothing earned while banned.
    assert clock.now == pytest.approx(penalized_at + 5 + 0.5)


class CountingBucket(LocalTokenBucket):
    """The real bucket, counting the grants it is asked for (what a Redis bucket pays a round trip each)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.grants: list[float] = []

    def acquire(self, cost: float = 1.0) -> None:
        self.grants.append(cost)
        super().acquire(cost)


def _side_by_side(limiter: RateLimiter, n: int, cost: float = 1.0) -> None:
    start = threading.Barrier(n)

    def one() -> None:
        start.wait()
        limiter.acquire(cost)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)


def test_requests_of_a_batch_take_their_tokens_in_one_grant_and_never_more_than_granted() -> None:
    clock = FakeClock()
    inner = CountingBucket(10, 1e-9, clock, clock.sleep)
    limiter = Prepaid(inner)
    with limiter.batch(3):
        _side_by_side(limiter, 3, 2.0)
    assert inner.grants == [6.0]  # three requests of weight 2: one grant of 6
    assert inner.remaining() == pytest.approx(4)
    with limiter.batch(3):
        _side_by_side(limiter, 4)  # one more than announced asks on its own
    assert sorted(inner.grants[1:]) == [1.0, 3.0] and inner.remaining() == pytest.approx(0)
    with limiter.batch(2), pytest.raises(RateLimitedError):  # nothing left: the bucket still decides
        limiter.acquire(1)


def test_credit_is_dropped_by_a_penalty_and_when_the_batch_closes() -> None:
    clock = FakeClock()
    inner = CountingBucket(10, 1, clock, clock.sleep, max_wait=0.5)
    limiter = Prepaid(inner)
    with limiter.batch(3):
        limiter.acquire(1)  # takes 3: the two others' credit
        limiter.penalize(5)  # Retry-After: nothing more may leave on tokens taken before it
        with pytest.raises(RateLimitedError):
            limiter.acquire(1)
    clock.now += 10
    with limiter.batch(4):
        limiter.acquire(1)
    before = len(inner.grants)
    limiter.acquire(1)  # the batch closed with credit for 3: dropped, this one asks the bucket
    assert len(inner.grants) == before + 1
    clock.now += 10
    with limiter.batch(30):  # a grant above the bucket's capacity could never come: each asks alone
        limiter.acquire(1)
    assert inner.grants[-1] == 1.0


def test_a_penalty_that_comes_while_a_batch_grant_is_on_its_way_leaves_no_credit() -> None:
    on_its_way, answer = threading.Event(), threading.Event()

    class SlowBucket(CountingBucket):
        def acquire(self, cost: float = 1.0) -> None:
            super().acquire(cost)
            if cost > 1:  # the batch's grant, given, its answer held up like a slow Redis round trip
                on_its_way.set()
                answer.wait(5)

    clock = FakeClock()
    inner = SlowBucket(10, 1, clock, clock.sleep, max_wait=0.5)
    limiter = Prepaid(inner)
    with limiter.batch(3):
        leader = threading.Thread(target=limiter.acquire)
        leader.start()
        assert on_its_way.wait(5)
        penalty = threading.Thread(target=limiter.penalize, args=(5,))  # another request's 429, meanwhile
        penalty.start()
        time.sleep(0.05)
        answer.set()
        leader.join(5)
        penalty.join(5)
        with pytest.raises(RateLimitedError):  # no credit from the grant that predates the penalty
            limiter.acquire(1)
    assert inner.grants == [3.0, 1.0]


class ReservingCountingBucket(LocalTokenBucket):
    """The real bucket, counting the tokens of each grant (`acquire` grants through `acquire_upto`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.grants: list[float] = []

    def acquire_upto(self, cost: float, extra: float) -> float:
        got = super().acquire_upto(cost, extra)
        self.grants.append(got)
        return got


def test_a_reserve_serves_the_requests_that_follow_for_its_hold_and_never_past_it() -> None:
    clock = FakeClock()
    inner = ReservingCountingBucket(100, 1e-9, clock, clock.sleep, max_wait=0.5)
    limiter = Prepaid(inner, hold_seconds=0.5, max_reserve=9, clock=clock)

    def after(seconds: float, cost: float = 1.0) -> None:
        clock.now += seconds
        limiter.acquire(cost)

    after(0)  # no demand seen yet: asks for itself only
    after(0.01, 2)  # 1 asked in the last half second: takes 1 more
    assert inner.grants == [1, 3]
    after(0.01)  # spends the reserve without asking the bucket
    after(0.01)  # none left: asks, taking as much more as the last half second asked for (4)
    assert inner.grants == [1, 3, 5]
    for _ in range(4):
        after(0.01)
    after(0.01)  # 9 asked before it: a reserve of 9 (the cap)
    assert inner.grants == [1, 3, 5, 10]
    after(0.5)  # past the reserve's hold: what is left (9) is dropped, never spent; no demand in the last 0.5 s
    assert inner.grants == [1, 3, 5, 10, 1] and inner.remaining() == pytest.approx(80)
    after(0.01)  # a new reserve of 1
    assert inner.grants[-1] == 2
    limiter.penalize(0.001)  # a Retry-After drops it at once: the next request asks the (emptied) bucket
    with pytest.raises(RateLimitedError):
        after(0.01)


def test_with_a_reserve_every_minute_stays_within_the_exchange_limit() -> None:
    """Tokens spent up to hold_seconds after their grant: the bucket's burst is smaller by that much."""
    clock = FakeClock()
    start = clock.now
    limit = BINANCE_SPOT_WEIGHT_PER_MINUTE
    hold = 0.5
    bucket = bucket_for_exchange(limit, clock=clock, sleep=clock.sleep, hold_seconds=hold)
    assert bucket.capacity == pytest.approx(1200 - 80 * hold)
    limiter = Prepaid(bucket, hold_seconds=hold, max_reserve=0.05 * bucket.capacity, clock=clock)
    # idle spells, so reserves expire unspent, and bursts after them
    sent = _random_requests(limiter, clock, start, random.Random(5), idle=0.3)
    assert max_in_window(sent, 60.0) <= limit + 1e-6


def test_penalize_holds_back_other_threads_sharing_the_bucket() -> None:
    bucket = LocalTokenBucket(100, 100)
    penalized_at = time.monotonic()
    bucket.penalize(0.3)
    granted_at: list[float] = []

    def worker() -> None:
        bucket.acquire(1)
        granted_at.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted_at) == 4
    assert min(granted_at) >= penalized_at + 0.3


def test_a_long_ban_is_reported_instead_of_blocking_for_hours() -> None:
    clock = FakeClock()
    bucket = LocalTokenBucket(10, 2, clock, clock.sleep, max_wait=60)
    bucket.penalize(3600)
    with pytest.raises(RateLimitedError) as info:
        bucket.acquire(1)
    assert info.value.retry_after == pytest.approx(3600)
    assert clock.sleeps == []


def test_threads_hammering_one_bucket_never_get_more_than_it_holds() -> None:
    bucket = LocalTokenBucket(100, 1e-6)
    granted = [0] * 8

    def worker(n: int) -> None:
        for _ in range(100):
            if bucket.try_acquire(1):
                granted[n] += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 100


def test_binance_bucket_keeps_every_minute_within_the_exchange_limit_and_runs_at_80_percent() -> None:
    clock = FakeClock()
    start = clock.now
    bucket = bucket_for_exchange(BINANCE_SPOT_WEIGHT_PER_MINUTE, clock=clock, sleep=clock.sleep)
    assert isinstance(bucket, RateLimiter)
    grants = _random_requests(bucket, clock, start, random.Random(3))
    assert max_in_window(grants, 60.0) <= 6000 + 1e-6
    minutes = (grants[-1][0] - start) / 60
    # The burst (1200) plus 4800 a minute: all of the 80 % budget is used, none beyond it.
    assert sum(c for _, c in grants) == pytest.approx(1200 + 4800 * minutes, abs=20)


def test_ccxt_rate_limit_converts_and_the_heaviest_request_always_fits() -> None:
    assert limit_per_minute_from_ccxt(50) == pytest.approx(1200)
    clock = FakeClock()
    bucket = bucket_for_exchange(limit_per_minute_from_ccxt(3000), max_cost=6, clock=clock, sleep=clock.sleep)
    bucket.acquire(6)  # 20 a minute leaves a burst of 4 only: a weight-6 request must still pass
    bucket.acquire(6)
    assert clock.now > 1000.0


# --- Redis token bucket ---------------------------------------------------------------------------


def _redis_worker(url: str, key: str, capacity: float, refill: float, plan: list[float], out: Any) -> None:
    bucket = RedisTokenBucket(redis.Redis.from_url(url), key, capacity, refill)
    granted = 0.0
    for cost in plan:
        if plan[0] < 0:  # blocking mode: every cost is acquired, waiting as needed
            bucket.acquire(-cost)
            granted += -cost
        elif bucket.try_acquire(cost):
            granted += cost
    out.put(granted)


def _run_processes(url: str, key: str, capacity: float, refill: float, plans: list[list[float]]) -> float:
    ctx = multiprocessing.get_context("fork")  # each child opens its own connection
    out = ctx.Queue()
    procs = [ctx.Process(target=_redis_worker, args=(url, key, capacity, refill, plan, out)) for plan in plans]
    for p in procs:
        p.start()
    totals = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return sum(totals)


def _server_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1_000_000


@pytest.mark.services
def test_redis_bucket_shared_by_two_processes_grants_no_more_than_it_holds(redis_url: str, unique_id: str) -> None:
    key = rate_limit_key("binance", unique_id)
    assert key == f"rl:{{binance:{unique_id}}}"
    plan = [1.0, 3.0] * 150
    total = _run_processes(redis_url, key, 50, 1e-6, [plan, plan])
    # Never more than the 50 held; and no tokens lost either: at most a fraction of one is left over.
    assert 49 < total <= 50
    assert redis.Redis.from_url(redis_url).pttl(key) > 0  # an abandoned bucket does not stay forever


@pytest.mark.services
def test_redis_bucket_makes_two_processes_wait_for_the_refill(redis_url: str, unique_id: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = rate_limit_key("binance", unique_id)
    began = _server_time(client)
    total = _run_processes(redis_url, key, 10, 40, [[-1.0] * 25, [-2.0] * 10])
    ended = _server_time(client)
    assert total == 45
    assert ended - began >= (45 - 10) / 40


@pytest.mark.services
def test_redis_penalty_set_by_one_client_stops_another(redis_url: str, unique_id: str) -> None:
    key = rate_limit_key("binance", unique_id)
    first = RedisTokenBucket(redis.Redis.from_url(redis_url), key, 10, 2)
    second_client = redis.Redis.from_url(redis_url)
    second = RedisTokenBucket(second_client, key, 10, 2)
    impatient = RedisTokenBucket(redis.Redis.from_url(redis_url), key, 10, 2, max_wait=0.05)
    assert second.remaining() == pytest.approx(10)
    before = _server_time(second_client)
    first.penalize(0.4)
    assert not second.try_acquire(1)
    assert second.remaining() == 0
    with pytest.raises(RateLimitedError) as info:
        impatient.acquire(1)
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 0.4
    second.acquire(1)
    # The ban (0.4 s), then one token at 2 per second (0.5 s): nothing is earned while banned.
    assert _server_time(second_client) >= before + 0.4 + 0.5


@pytest.mark.services
def test_redis_bucket_refills_only_up_to_its_capacity(redis_url: str, unique_id: str) -> None:
    bucket = RedisTokenBucket(redis.Redis.from_url(redis_url), rate_limit_key("x", unique_id), 5, 100)
    bucket.acquire(5)
    time.sleep(0.2)  # 20 tokens' worth of refill for a bucket that holds 5
    assert bucket.remaining() == 5


@pytest.mark.services
def test_redis_bucket_grants_a_reserve_only_from_what_it_holds(redis_url: str, unique_id: str) -> None:
    bucket = RedisTokenBucket(redis.Redis.from_url(redis_url), rate_limit_key("x", unique_id), 10, 1e-6)
    assert bucket.acquire_upto(2, 3) == pytest.approx(5)  # 10 there: the 2 asked for and the 3 more
    assert bucket.acquire_upto(2, 30) == pytest.approx(5)  # 5 left: all of them, never more
    assert bucket.remaining() == pytest.approx(0, abs=1e-3)
    bucket.max_wait = 0.01
    with pytest.raises(RateLimitedError):  # the reserve is never waited for, but the cost itself still is
        bucket.acquire_upto(1, 0)


def test_redis_bucket_unreachable_is_a_store_error() -> None:
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    bucket = RedisTokenBucket(client, rate_limit_key("binance", "nobody"), 10, 1)
    with pytest.raises(StoreError):
        bucket.acquire(1)


# --- retries --------------------------------------------------------------------------------------


class Flaky:
    """Raises the given errors in turn, then returns "ok"; counts calls."""

    def __init__(self, *errors: BaseException, clock: FakeClock | None = None, takes: float = 0.0) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.clock = clock
        self.takes = takes

    def __call__(self) -> str:
        self.calls += 1
        if self.clock is not None:
            self.clock.now += self.takes
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_retry_counts_attempts_exactly_and_reraises_the_last_error_unchanged() -> None:
    clock = FakeClock()
    errors = [ExchangeNetworkError(f"reset {i}") for i in range(10)]
    fn = Flaky(*errors)
    seen: list[tuple[int, BaseException, float]] = []
    policy = RetryPolicy(attempts=5, base_delay=0.2, max_delay=5.0, max_total=20.0, jitter=False)
    with pytest.raises(ExchangeNetworkError) as info:
        call_with_retry(
            fn,
            policy=policy,
            on_retry=lambda n, e, d: seen.append((n, e, d)),
            sleep=clock.sleep,
            clock=clock,
        )
    assert fn.calls == 5
    assert info.value is errors[4]
    assert [n for n, _, _ in seen] == [1, 2, 3, 4]
    assert [e for _, e, _ in seen] == errors[:4]
    assert clock.sleeps == pytest.approx([0.2, 0.4, 0.8, 1.6])
    assert [d for _, _, d in seen] == clock.sleeps


def test_retry_returns_the_result_once_a_transient_failure_clears() -> None:
    clock = FakeClock()
    fn = Flaky(ExchangeTimeoutError("slow"), ExchangeUnavailableError("maintenance"))
    assert call_with_retry(fn, policy=RetryPolicy(), sleep=clock.sleep, clock=clock) == "ok"
    assert fn.calls == 3


def test_retry_stops_before_a_pause_that_would_overrun_max_total() -> None:
    clock = FakeClock()
    fn = Flaky(*[ExchangeNetworkError("down") for _ in range(100)])
    policy = RetryPolicy(attempts=100, base_delay=1.0, max_delay=100.0, max_total=10.0, jitter=False)
    with pytest.raises(ExchangeNetworkError):
        call_with_retry(fn, policy=policy, sleep=clock.sleep, clock=clock)
    assert clock.sleeps == [1.0, 2.0, 4.0]  # the next pause (8) would end at 15 s > 10 s
    assert fn.calls == 4


def test_retry_budget_includes_the_time_the_calls_themselves_take() -> None:
    clock = FakeClock()
    fn = Flaky(*[ExchangeTimeoutError("timeout") for _ in range(100)], clock=clock, takes=4.0)
    policy = RetryPolicy(attempts=100, base_delay=0.5, max_delay=100.0, max_total=10.0, jitter=False)
    with pytest.raises(ExchangeTimeoutError):
        call_with_retry(fn, policy=policy, sleep=clock.sleep, clock=clock)
    assert fn.calls == 3
    assert clock.sleeps == [0.5, 1.0]


@pytest.mark.parametrize(
    "error",
    [
        InsufficientFundsError("not enough USDC"),
        InvalidOrderError("below min notional"),
        OrderAlreadyPlacedError("duplicate client order id"),
        ExchangeAuthError("bad key"),
        CircuitOpenError("open"),
        ValueError("a bug"),
    ],
)
def test_retry_never_repeats_a_refusal_an_open_circuit_or_a_bug(error: BaseException) -> None:
    clock = FakeClock()
    fn = Flaky(error)
    with pytest.raises(type(error)) as info:
        call_with_retry(fn, policy=RetryPolicy(), sleep=clock.sleep, clock=clock)
    assert info.value is error
    assert fn.calls == 1
    assert clock.sleeps == []


def test_retry_waits_at_least_retry_after() -> None:
    clock = FakeClock()
    fn = Flaky(RateLimitedError("429", retry_after=3.0))
    delays: list[float] = []
    result = call_with_retry(
        fn, policy=RetryPolicy(), on_retry=lambda n, e, d: delays.append(d), sleep=clock.sleep, clock=clock
    )
    assert result == "ok"
    assert clock.sleeps[0] >= 3.0
    assert delays == clock.sleeps


def test_retry_gives_up_at_once_when_retry_after_exceeds_the_budget() -> None:
    clock = FakeClock()
    banned = RateLimitedError("418 banned", retry_after=600.0)
    fn = Flaky(banned)
    with pytest.raises(RateLimitedError) as info:
        call_with_retry(fn, policy=RetryPolicy(max_total=20.0), sleep=clock.sleep, clock=clock)
    assert info.value is banned
    assert fn.calls == 1
    assert clock.sleeps == []


def test_full_jitter_stays_under_the_exponential_cap_and_varies() -> None:
    clock = FakeClock()
    fn = Flaky(*[ExchangeNetworkError("x") for _ in range(20)])
    policy = RetryPolicy(attempts=8, base_delay=0.1, max_delay=0.8, max_total=100.0, jitter=True)
    with pytest.raises(ExchangeNetworkError):
        call_with_retry(fn, policy=policy, sleep=clock.sleep, clock=clock, rng=random.Random(1))
    assert len(clock.sleeps) == 7
    for n, slept in enumerate(clock.sleeps, start=1):
        assert 0 <= slept <= min(0.8, 0.1 * 2 ** (n - 1))
    assert len(set(clock.sleeps)) > 1


# --- circuit breaker ------------------------------------------------------------------------------


def failing(error: BaseException) -> Callable[[], None]:
    def fn() -> None:
        raise error

    return fn


def trip(breaker: CircuitBreaker, times: int, error: BaseException | None = None) -> None:
    for _ in range(times):
        with pytest.raises(type(error) if error else ExchangeNetworkError):
            breaker.call(failing(error or ExchangeNetworkError("reset")))


def test_breaker_opens_after_n_consecutive_failures_and_then_refuses_without_calling() -> None:
    clock = FakeClock()
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        "binance", failure_threshold=5, clock=clock, on_state_change=lambda o, n: changes.append((o, n))
    )
    trip(breaker, 4)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.state_value == 0
    trip(breaker, 1)
    assert breaker.state is BreakerState.OPEN
    assert breaker.state_value == 1
    assert changes == [(BreakerState.CLOSED, BreakerState.OPEN)]
    fn = Flaky()
    with pytest.raises(CircuitOpenError, match="binance"):
        breaker.call(fn)
    assert fn.calls == 0


def test_breaker_needs_consecutive_failures_and_unexpected_errors_count() -> None:
    breaker = CircuitBreaker("x", failure_threshold=3, clock=FakeClock())
    trip(breaker, 2)
    assert breaker.call(lambda: "ok") == "ok"
    trip(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    trip(breaker, 1, ValueError("garbage from the exchange"))
    assert breaker.state is BreakerState.OPEN


def test_business_refusals_prove_the_exchange_is_up_and_reset_the_count() -> None:
    breaker = CircuitBreaker("x", failure_threshold=3, clock=FakeClock())
    trip(breaker, 2)
    trip(breaker, 1, InsufficientFundsError("not enough BTC"))
    trip(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    trip(breaker, 10, InvalidOrderError("lot size"))
    assert breaker.state is BreakerState.CLOSED
    trip(breaker, 2, StoreError("redis down"))  # says nothing about the exchange: neither counts nor resets
    assert breaker.failures == 0
    trip(breaker, 2)
    trip(breaker, 1, StoreError("redis down"))
    trip(breaker, 1)
    assert breaker.state is BreakerState.OPEN


def test_breaker_half_opens_after_the_timeout_and_a_trial_success_closes_it() -> None:
    clock = FakeClock()
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        "x",
        failure_threshold=2,
        reset_timeout=30,
        clock=clock,
        on_state_change=lambda o, n: changes.append((o, n)),
    )
    trip(breaker, 2)
    clock.now += 29.9
    assert breaker.state is BreakerState.OPEN
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.state_value == 0.5
    assert breaker.call(lambda: 42) == 42
    assert breaker.state is BreakerState.CLOSED
    assert changes == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
    trip(breaker, 1)  # the count started again from zero
    assert breaker.state is BreakerState.CLOSED


def test_a_failed_trial_reopens_for_a_full_timeout() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("x", failure_threshold=2, reset_timeout=30, clock=clock)
    trip(breaker, 2)
    clock.now += 30
    trip(breaker, 1, ExchangeUnavailableError("still down"))
    assert breaker.state is BreakerState.OPEN
    clock.now += 29
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: None)
    clock.now += 1
    assert breaker.state is BreakerState.HALF_OPEN


def test_half_open_lets_exactly_one_trial_through() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("x", failure_threshold=1, reset_timeout=30, clock=clock)
    trip(breaker, 1)
    clock.now += 30
    entered, release = threading.Event(), threading.Event()
    results: list[object] = []

    def trial() -> str:
        entered.set()
        release.wait(10)
        return "trial"

    t = threading.Thread(target=lambda: results.append(breaker.call(trial)))
    t.start()
    assert entered.wait(10)
    other = Flaky()
    with pytest.raises(CircuitOpenError, match="trial"):
        breaker.call(other)
    assert other.calls == 0
    release.set()
    t.join()
    assert results == ["trial"]
    assert breaker.state is BreakerState.CLOSED


def test_a_slow_success_from_before_the_circuit_opened_does_not_close_it() -> None:
    breaker = CircuitBreaker("x", failure_threshold=3, clock=FakeClock())
    entered, release = threading.Event(), threading.Event()

    def slow() -> str:
        entered.set()
        release.wait(10)
        return "late"

    results: list[object] = []
    t = threading.Thread(target=lambda: results.append(breaker.call(slow)))
    t.start()
    assert entered.wait(10)
    trip(breaker, 3)
    release.set()
    t.join()
    assert results == ["late"]
    assert breaker.state is BreakerState.OPEN


def test_breaker_under_concurrent_failures_opens_and_stops_calling() -> None:
    breaker = CircuitBreaker("x", failure_threshold=5, clock=FakeClock())
    calls = 0
    lock = threading.Lock()

    def down() -> None:
        nonlocal calls
        with lock:
            calls += 1
        raise ExchangeNetworkError("down")

    def worker() -> None:
        for _ in range(50):
            with contextlib.suppress(ExchangeNetworkError, CircuitOpenError):
                breaker.call(down)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert breaker.state is BreakerState.OPEN
    assert 5 <= calls <= 5 + 8 - 1  # at most the calls already in flight when it opened


def test_a_broken_listener_does_not_break_the_call(caplog: pytest.LogCaptureFixture) -> None:
    def broken(old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("metrics backend gone")

    breaker = CircuitBreaker("x", failure_threshold=1, clock=FakeClock(), on_state_change=broken)
    trip(breaker, 1)
    assert breaker.state is BreakerState.OPEN
    assert "listener failed" in caplog.text


def test_retry_around_the_breaker_stops_as_soon_as_the_circuit_opens() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("x", failure_threshold=3, clock=clock)
    fn = Flaky(*[ExchangeNetworkError("down") for _ in range(10)])
    with pytest.raises(CircuitOpenError):
        call_with_retry(
            lambda: breaker.call(fn),
            policy=RetryPolicy(attempts=10, max_total=1000),
            sleep=clock.sleep,
            clock=clock,
        )
    assert fn.calls == 3
