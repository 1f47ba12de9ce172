"""Independent exchange requests side by side: the books of one snapshot, the orders of one group.

Threads, not asyncio: ccxt's synchronous client and our stores are blocking, and the work is all waiting on
sockets. Daemon threads, so a process told to stop is never held back by a request still waiting for its
answer (for an order, recovery settles it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def side_by_side(jobs: Sequence[Callable[[], T]]) -> list[T]:
    """Run `jobs` at once and wait for every one of them (none is left running behind the caller); their
    results in order, or the first error raised. One job runs inline, without a thread."""
    if len(jobs) <= 1:
        return [job() for job in jobs]
    results: list[T | None] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]  # every slot was filled: no job raised
