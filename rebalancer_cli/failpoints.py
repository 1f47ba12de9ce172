"""Named crash points for fault-injection tests, in the spirit of etcd's gofail and TiKV's fail-rs.

`REBALANCE_FAILPOINT=after_lock` makes the process kill itself with SIGKILL at that point, so that the crash
tests exercise real process death (no cleanup, no finally blocks) at each step of the execution path.
`during_send:MS` kills the process MS milliseconds after an order starts being sent: with a slow exchange it
dies while the answer is still on its way. `after_lock:stop` freezes the process there (SIGSTOP) instead, as a
GC pause or a stopped VM would: the test thaws it with SIGCONT once another writer took over.
Unset in production; checking it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

ENV = "REBALANCE_FAILPOINT"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hit(name: str, *, quiesce: Callable[[], None] | None = None) -> None:
    """`quiesce` runs before a `stop`: background writes finish first, so the frozen process holds no store
    lock (an embedded SQLite store stays locked by a process frozen mid-transaction; that case is safe, since
    every other writer then stops at its busy timeout, but it is not what a freeze test is about)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, arg = spec.partition(":")
    if point != name:
        return
    if arg == "stop":
        if quiesce is not None:
            quiesce()
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if arg:
        timer = threading.Timer(int(arg) / 1000, _die)
        timer.daemon = True
        timer.start()
    else:
        _die()
