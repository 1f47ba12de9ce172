"""A circuit breaker in front of an exchange, so an outage costs one fast refusal per call, not a timeout.

It counts only what says the exchange is unhealthy: transient exchange errors and unexpected exceptions.
A refusal on the merits (insufficient funds, an invalid order, bad credentials) proves the exchange is up
and answering, so it resets the count like a success. Our own other errors (a store outage, a nested
open circuit) say nothing about the exchange and leave the count alone.

Written here rather than with pybreaker: pybreaker holds its lock for the whole duration of the wrapped
call (serialising every exchange request of a process), times the reset with the wall clock (an NTP step
can shorten or stretch it, and tests would need real sleeps), and lets more than one trial call through
while half-open.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import TypeVar

from rebalancer_cli.errors import (
    CircuitOpenError,
    NonRetryableExchangeError,
    RebalanceError,
    RetryableExchangeError,
)

T = TypeVar("T")

log = logging.getLogger(__name__)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: Values of the `circuit_breaker_state` gauge.
STATE_VALUES: dict[BreakerState, float] = {
    BreakerState.CLOSED: 0.0,
    BreakerState.OPEN: 1.0,
    BreakerState.HALF_OPEN: 0.5,
}

StateListener = Callable[[BreakerState, BreakerState], None]


def _is_failure(exc: BaseException) -> bool | None:
    """True: the exchange looks unhealthy. False: it answered. None: says nothing about it."""
    if isinstance(exc, RetryableExchangeError):
        return True
    if isinstance(exc, NonRetryableExchangeError):
        return False
    if isinstance(exc, RebalanceError):
        return None  # our other errors (StoreError, a nested CircuitOpenError) are not the exchange's
    # KeyboardInterrupt and SystemExit are the operator's doing, not the exchange's.
    return isinstance(exc, Exception)


class CircuitBreaker:
    """Closed, then open after `failure_threshold` consecutive failures, half-open after `reset_timeout`."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        reset_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_state_change: StateListener | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, not {failure_threshold}")
        if reset_timeout < 0:
            raise ValueError(f"reset_timeout must not be negative, not {reset_timeout}")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._clock = clock
        # Reentrant, and listeners run under it, so a gauge sees transitions in the order they happened.
        self._lock = threading.RLock()
        self._listeners: list[StateListener] = [on_state_change] if on_state_change else []
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_running = False
        # Bumped at every transition: an outcome of a call started under an older state is ignored, so
        # a slow success from before the circuit opened cannot close it behind the trial's back.
        self._generation = 0

    def add_listener(self, listener: StateListener) -> None:
        """Call `listener(old, new)` at every transition, e.g. to set a gauge or log."""
        with self._lock:
            self._listeners.append(listener)

    @property
    def state(self) -> BreakerState:
        with self._lock:
            self._half_open_if_due()
            return self._state

    @property
    def state_value(self) -> float:
        """0 closed, 1 open, 0.5 half-open: the `circuit_breaker_state` gauge."""
        return STATE_VALUES[self.state]

    @property
    def failures(self) -> int:
        """Consecutive failures counted so far."""
        with self._lock:
            return self._failures

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` unless the circuit is open (CircuitOpenError, `fn` not called); errors pass through."""
        with self._lock:
            self._half_open_if_due()
            if self._state is BreakerState.OPEN or (self._state is BreakerState.HALF_OPEN and self._trial_running):
                raise self._open_error()
            trial = self._state is BreakerState.HALF_OPEN
            if trial:
                self._trial_running = True
            generation = self._generation
        try:
            result = fn()
        except BaseException as exc:
            self._record(generation, trial, _is_failure(exc))
            raise
        self._record(generation, trial, False)
        return result

    def _record(self, generation: int, trial: bool, failure: bool | None) -> None:
        with self._lock:
            if trial and generation == self._generation:
                self._trial_running = False
            if generation != self._generation or failure is None:
                return
            if not failure:
                self._failures = 0
                if self._state is BreakerState.HALF_OPEN:
                    self._transition(BreakerState.CLOSED)
                return
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
                self._transition(BreakerState.OPEN)

    def _half_open_if_due(self) -> None:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.reset_timeout:
            self._transition(BreakerState.HALF_OPEN)

    def _transition(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        self._generation += 1
        self._trial_running = False
        for listener in list(self._listeners):
            try:
                listener(old, new)
            except Exception:
                # A broken metrics hook must not break trading calls; it must not go unseen either.
                log.exception("circuit breaker %s: state listener failed", self.name)

    def _open_error(self) -> CircuitOpenError:
        if self._state is BreakerState.HALF_OPEN:
            return CircuitOpenError(f"circuit {self.name!r} is half-open: a trial call is in flight")
        left = max(0.0, self.reset_timeout - (self._clock() - self._opened_at))
        return CircuitOpenError(
            f"circuit {self.name!r} is open after {self._failures} consecutive failures; next trial in {left:.1f}s"
        )
