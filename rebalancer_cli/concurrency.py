"""Independent exchange requests side by side: the balances and the quotes of a snapshot, its books, the
orders of one group.

Threads, not asyncio: ccxt's synchronous client and our stores are blocking, and the work is all waiting on
sockets. The threads are kept and reused (a cached pool: one is started only when none is idle), because
starting one costs more than it looks: `Thread.start` waits until the new thread runs, and a thread that runs
ccxt's request building holds the GIL for up to the switch interval (5 ms) before the starter gets it back, so
three threads started one after another staggered a group's orders by milliseconds. Handing a job to an idle
worker only enqueues it. The caller runs the first job itself. Daemon threads, so a process told to stop is
never held back by a request still waiting for its answer (for an order, recovery settles it).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

_tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_idle = 0  # workers waiting on `_tasks`, or about to
_idle_lock = threading.Lock()


def _worker(first: Callable[[], None]) -> None:
    global _idle
    task = first
    while True:
        task()  # a task never raises: `side_by_side` hands every error back to its caller
        with _idle_lock:
            _idle += 1
        task = _tasks.get()


def _submit(task: Callable[[], None]) -> None:
    global _idle
    with _idle_lock:
        reuse = _idle > 0
        if reuse:
            _idle -= 1
    if reuse:
        _tasks.put(task)
    else:
        threading.Thread(target=_worker, args=(task,), name="side-by-side", daemon=True).start()


def side_by_side(jobs: Sequence[Callable[[], T]]) -> list[T]:
    """Run `jobs` at once and wait for every one of them (none is left running behind the caller); their
    results in order, or the first error raised (in job order). The first job runs in the caller's thread."""
    if len(jobs) <= 1:
        return [job() for job in jobs]
    results: list[T | None] = [None] * len(jobs)
    errors: list[BaseException | None] = [None] * len(jobs)
    remaining = [len(jobs) - 1]
    lock = threading.Lock()
    finished = threading.Event()

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as exc:  # handed to the caller below
            errors[i] = exc
        if i:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                finished.set()

    for i in range(1, len(jobs)):
        _submit(lambda i=i: run(i))  # type: ignore[misc]
    run(0)
    finished.wait()
    for error in errors:
        if error is not None:
            raise error
    return results  # type: ignore[return-value]  # every slot was filled: no job raised


K = TypeVar("K")


class Gather(Generic[K, T]):
    """Calls from threads running side by side, answered by as few calls of `batch` as they allow: the first to
    arrive waits for the others (until `expected` have arrived, at most `wait` seconds), then asks `batch` for
    all of them at once; a call arriving while that is on its way is served by the next batch. `batch` gets the
    items in arrival order and returns one answer per item; an error it raises is raised in every caller it
    was asked for.

    For the last store write before each order of a group leaves (one round trip for the group, where one per
    order cost a round trip each, side by side on a contended GIL)."""

    def __init__(self, batch: Callable[[list[K]], Sequence[T]], *, expected: int, wait: float) -> None:
        self._batch = batch
        self._expected = expected
        self._wait = wait
        self._cond = threading.Condition()
        self._arrived = 0
        self._queued: list[tuple[int, K]] = []
        self._answers: dict[int, tuple[T | None, BaseException | None]] = {}
        self._busy = False  # a batch is being gathered or asked for
        self._next = 0

    def __call__(self, item: K) -> T:
        with self._cond:
            ticket = self._next
            self._next += 1
            self._arrived += 1
            self._queued.append((ticket, item))
            self._cond.notify_all()
            while ticket not in self._answers and self._busy:
                self._cond.wait()
            if ticket not in self._answers:
                # no batch on its way: this caller asks for everything queued, once the others had their chance
                self._busy = True
                deadline = time.monotonic() + self._wait
                while self._arrived < self._expected and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                asked, self._queued = self._queued, []
        if ticket not in self._answers:
            answers: list[tuple[T | None, BaseException | None]]
            try:
                got = list(self._batch([i for _, i in asked]))
                if len(got) != len(asked):
                    raise ValueError(f"a batch of {len(asked)} got {len(got)} answers")
                answers = [(a, None) for a in got]
            except BaseException as exc:  # handed to every caller of this batch
                answers = [(None, exc)] * len(asked)
            with self._cond:
                self._answers.update({t: a for (t, _), a in zip(asked, answers, strict=True)})
                self._busy = False
                self._cond.notify_all()
        with self._cond:
            answer, error = self._answers.pop(ticket)
        if error is not None:
            raise error
        return answer  # type: ignore[return-value]  # no error: the batch answered this item
