"""One writer per portfolio: `execute` and `reconcile --repair` hold the portfolio's lease, as a daemon does.

Without it, two runs started together (cron overlapping an operator, or a slow cron run overlapping the next)
both plan from the same balances and both trade. The lease (leases.py: Redis, or SQLite in the state dir) is
exclusive and carries a fencing token that only grows; the holder announces it to the shadow ledger at once,
so from then on every write and every send of an earlier holder that paused past its lease is refused by the
ledger (`ShadowLedger.begin_send` checks the token in the same atomic step that lets an order leave).

A run renews its lease in the background every third of its TTL; when a renewal fails, `on_lost` fires
(the executor stops starting orders) and the fence does the rest.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from .config import Config
from .errors import PortfolioBusyError, StoreError
from .leases import LeaseStore, open_leases
from .ledger.base import ShadowLedger

# Long enough that a renewal every TTL/3 survives a few seconds of stall; short enough that a killed run's
# portfolio is free again within half a minute.
WRITER_TTL_SECONDS = 30.0
TTL_ENV = "REBALANCE_WRITER_LEASE_TTL"  # seconds; for tests and for operators who want a faster takeover
POLL_SECONDS = 0.2


def writer_ttl() -> float:
    from .errors import InputError

    text = os.environ.get(TTL_ENV, "")
    try:
        value = float(text) if text else WRITER_TTL_SECONDS
    except ValueError:
        raise InputError(f"{TTL_ENV} must be a number of seconds, got {text!r}") from None
    if not 1 <= value <= 3600:
        raise InputError(f"{TTL_ENV} must be between 1 and 3600 seconds, got {text!r}")
    return value


def _pid_namespace() -> str:
    """The PID namespace of this process: two containers may share a host name, never a PID namespace."""
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
    except OSError:
        return "?"


def holder_name(kind: str) -> str:
    """Who holds a portfolio, as another writer's refusal names it: what, which process, where, since when
    (and the PID namespace, so that a dead holder on this very host can be told apart from a live one)."""
    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{kind} pid {os.getpid()} on {socket.gethostname()} since {since} [ns {_pid_namespace()}]"


_HOLDER = re.compile(r" pid (\d+) on (\S+) since \S+ \[ns ([^\]]+)\]$")


def dead_local_holder(holder: str | None) -> bool:
    """True when `holder` is a writer of this host and PID namespace whose process no longer exists (killed,
    crashed): its lease need not run out before the next run may take the portfolio over."""
    m = _HOLDER.search(holder or "")
    if m is None or m.group(2) != socket.gethostname() or m.group(3) in ("?", "") or m.group(3) != _pid_namespace():
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists (owned by another user) or we cannot tell: treat it as alive
    return False


def busy_error(portfolio_id: str, holder: str | None, waited: float) -> PortfolioBusyError:
    who = re.sub(r" \[ns [^\]]*\]$", "", holder) if holder else "another writer (its lease is ending)"
    after = f" after waiting {waited:.0f}s" if waited > 0 else ""
    return PortfolioBusyError(
        f"portfolio {portfolio_id} is held by {who}{after}: nothing was done; retry later or pass --wait SECONDS",
        who,
    )


class _Renewer(threading.Thread):
    def __init__(
        self, store: LeaseStore, pid: str, holder: str, token: int, ttl: float, on_lost: Callable[[], None]
    ) -> None:
        super().__init__(name=f"lease-{pid}", daemon=True)
        self.store, self.pid, self.holder, self.token, self.ttl = store, pid, holder, token, ttl
        self.on_lost = on_lost
        self.done = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.ttl / 3):
            try:
                kept = self.store.renew(self.pid, self.holder, self.token, self.ttl)
            except StoreError:
                kept = False
            if not kept:
                self.lost.set()
                self.on_lost()
                return


@contextlib.contextmanager
def hold(
    config: Config,
    ledger: ShadowLedger,
    kind: str,
    *,
    wait: float = 0.0,
    on_lost: Callable[[], None] = lambda: None,
    ttl: float | None = None,
    store: LeaseStore | None = None,
) -> Iterator[int]:
    """Hold the portfolio's lease for the block; yields the fencing token to write and send with.

    Raises PortfolioBusyError (exit 6) naming the holder when another writer keeps it longer than `wait`."""
    pid = config.portfolio_id
    ttl = ttl or writer_ttl()
    leases = store or open_leases(config.redis_url, config.resolved_state_dir())
    holder = holder_name(kind)
    started = time.monotonic()
    renewer: _Renewer | None = None
    token: int | None = None
    try:
        while True:
            token = leases.acquire(pid, holder, ttl)
            if token is not None:
                break
            current = leases.holder(pid)
            if dead_local_holder(current) and current is not None and leases.break_lease(pid, current):
                continue  # a run killed on this host: take over now; its token is spent, its writes fenced
            waited = time.monotonic() - started
            if waited >= wait:
                raise busy_error(pid, current, waited)
            time.sleep(min(POLL_SECONDS, wait - waited))
        # announced before the first write: from now on a previous holder's writes and sends are refused
        ledger.advance_fence(pid, token)
        renewer = _Renewer(leases, pid, holder, token, ttl, on_lost)
        renewer.start()
        yield token
    finally:
        if renewer is not None:
            renewer.done.set()
            renewer.join(timeout=5)
        if token is not None:
            with contextlib.suppress(StoreError):
                leases.release(pid, holder, token)
        if store is None:
            with contextlib.suppress(StoreError):
                leases.close()
