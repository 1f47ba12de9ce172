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
from collections.abc import Callable, Sequence
from typing import TypeVar

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
