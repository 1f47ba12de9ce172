"""Retries of transient exchange failures, bounded in attempts and in the time a caller is held.

Only RetryableExchangeError is retried: a refusal on the merits (insufficient funds, an invalid order)
would be refused again, an open circuit must fail fast, and an unexpected exception is a bug to surface,
not to repeat. Backoff uses full jitter so that many portfolios hitting one exchange do not retry in
lockstep. The last error is re-raised as it was, so the caller (and the exit code) sees what happened.

Retrying an order placement is safe only because orders carry a client order id: a repeat of an order
the exchange already took comes back as OrderAlreadyPlacedError, which is not retried.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from rebalancer_cli.errors import RateLimitedError, RetryableExchangeError

T = TypeVar("T")

OnRetry = Callable[[int, BaseException, float], None]


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: `attempts` calls at most, and never hold the caller past `max_total` seconds."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0
    max_total: float = 20.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_total < 0:
            raise ValueError("base_delay, max_delay and max_total must not be negative")

    def backoff(self, failures: int, rng: random.Random | None = None) -> float:
        """The pause after the `failures`-th failure: base * 2^(n-1), capped, then full jitter."""
        cap = min(self.max_delay, self.base_delay * 2.0 ** (failures - 1))
        if not self.jitter:
            return cap
        return (rng or random).uniform(0.0, cap)


def call_with_retry(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    on_retry: OnRetry | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T:
    """Call `fn` until it succeeds, fails for good, or the policy's budget is spent.

    `on_retry(attempt, error, delay)` runs before each pause: `attempt` is the number of the call that
    just failed (1-based) and `delay` the pause about to start, for logs and metrics. A pause is never
    shorter than a RateLimitedError's `retry_after`; when the pause would end past `max_total`, we stop
    now and raise, rather than sleep only to give up afterwards.
    """
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except RetryableExchangeError as error:
            delay = policy.backoff(attempt, rng)
            if isinstance(error, RateLimitedError) and error.retry_after is not None:
                delay = max(delay, error.retry_after)
            if attempt >= policy.attempts or clock() - started + delay > policy.max_total:
                raise
            if on_retry is not None:
                on_retry(attempt, error, delay)
            sleep(delay)
