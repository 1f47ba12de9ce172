"""The daemon: its loop and its stop, composed of the parts in this package."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import RebalanceError
from ..telemetry import Metrics, log
from .configs import ConfigWatching
from .cycle import CycleRunner
from .health import Reporting
from .leasing import LeaseBalancing
from .scheduling import STOP_WAIT_SECONDS, CycleThreads, Scheduling, WorkerProcesses
from .state import Slot

if TYPE_CHECKING:
    pass

logger = logging.getLogger("rebalance")
T = TypeVar("T")


class Daemon(ConfigWatching, LeaseBalancing, Scheduling, Reporting):
    """Many portfolios, continuously; see the package's documentation."""

    def __init__(
        self,
        paths: list[Path],
        *,
        instance_id: str | None = None,
        lease_ttl: float = 15.0,
        workers: int = 8,
        processes: int = 1,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick: float = 0.2,
        join_delay: float | None = None,
    ) -> None:
        """`workers` cycles run at once in each process; with `processes` > 1 they run in that many worker
        processes (each with its own stores and exchange clients), so that one instance is not bound to the one
        core Python's interpreter lock lets a process use. Worker processes time cycles with the system's
        monotonic clock, whatever `clock` is."""
        self.paths = paths
        # A random tag even on a given name: two processes started with the same --instance-id would otherwise
        # both "hold" every lease either of them took, and trade the same portfolios side by side.
        self.instance_id = f"{instance_id or f'{socket.gethostname()}-{os.getpid()}'}-{uuid.uuid4().hex[:6]}"
        self.lease_ttl = lease_ttl
        # renewals four times per TTL: a lease survives a missed renewal or two (a slow store, a GC pause)
        self.lease_period = lease_ttl / 4
        # instances started together see each other before the first claims, so they split the work at once
        self.join_delay = min(lease_ttl / 3, 2.0) if join_delay is None else join_delay
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.tick = tick
        self.stopping = threading.Event()
        self.runner = CycleRunner(self.stopping)
        self.slots: dict[str, Slot] = {}
        self._rejected: dict[Path, float] = {}  # new config files refused, by the version refused
        self._listing_marks: list[float | None] = []
        self._reload_cursor = 0
        self.last_tick = clock()
        self.live_instances: dict[str, int] = {}
        self._load_all()
        # only once the configs loaded: a refused start leaves no worker process behind
        self.pool: CycleThreads | WorkerProcesses = (
            WorkerProcesses(processes, workers) if processes > 1 else CycleThreads(workers)
        )

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self, *, max_seconds: float | None = None) -> int:
        started = self.clock()
        joined = started + self.join_delay
        next_lease = started  # the first tick announces this instance; claims start once it joined
        last_reload = started
        try:
            while not self.stopping.is_set():
                now = self.clock()
                self.last_tick = now
                if max_seconds is not None and now - started >= max_seconds:
                    break
                if now - last_reload >= 1.0:
                    last_reload = now
                    self._guarded(self.reload_changed)
                if now >= next_lease:
                    claim = now >= joined
                    next_lease = now + self.lease_period if claim else min(now + self.lease_period, joined)
                    self._guarded(functools.partial(self._lease_tick, now, claim=claim))
                for slot in list(self.slots.values()):
                    if slot.token is not None and slot.running is None and now >= slot.next_due:
                        self._submit(slot, slot.token)
                self.stopping.wait(self.tick)
        finally:
            self.shutdown()
        return 0

    def stop(self) -> None:
        self.stopping.set()

    def shutdown(self, timeout: float = STOP_WAIT_SECONDS) -> None:
        """Skip the cycles not started, finish the orders in flight, release leases and close the stores."""
        self.stopping.set()
        # queued cycles are cancelled first: waiting on one would run it (a whole snapshot and plan) at exit
        self.pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        renew_at = time.monotonic()
        while True:
            busy = [s for s in self.slots.values() if s.running is not None and not s.running.done()]
            if not busy or time.monotonic() >= deadline:
                break
            if time.monotonic() >= renew_at:
                # the main loop no longer renews: an order finishing must not see its lease expire under it
                for group in self._by_lease_store(busy).values():
                    with contextlib.suppress(RebalanceError):
                        self._renew(self._leases(group[0].config), group)
                renew_at = time.monotonic() + self.lease_period
            futures_wait([s.running for s in busy if s.running is not None], timeout=0.05)
        still = [s for s in self.slots.values() if s.running is not None and not s.running.done()]
        for slot in still:
            # still writing after the deadline: its lease expires on its own, and fencing stops a successor
            # from being overwritten; releasing it now would let the successor start beside it
            log(logger, logging.WARNING, "cycle still running at exit; lease left to expire", portfolio=slot.pid)
        done = [s for s in self.slots.values() if s not in still]
        for group in self._by_lease_store(done).values():
            self._let_go_many(group, "stopping")
        for kind, store in self.runner.stores():
            if kind == "leases":
                with contextlib.suppress(RebalanceError):  # the heartbeat expires on its own anyway
                    store.leave(self.instance_id)
        self.runner.close_clients()
        if isinstance(self.pool, WorkerProcesses):
            self.pool.close(wait=not still)
        if still:
            return  # the stores stay open under the cycles still running; the process exit closes them
        self.runner.close_stores()
        self.metrics.leases.set(0)


def run_daemon(
    paths: list[Path],
    *,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    instance_id: str | None = None,
    lease_ttl: float = 15.0,
    workers: int = 8,
    processes: int = 1,
    otlp_endpoint: str | None = None,
    max_seconds: float | None = None,
    on_ready: Callable[[Daemon, int | None], None] | None = None,
) -> int:
    """`rebalance daemon`: run until SIGTERM/SIGINT, then finish the order in flight and exit 0."""
    import signal

    from ..telemetry import MetricsServer, configure_tracing

    configure_tracing(otlp_endpoint)  # first: worker processes take the same
    daemon = Daemon(paths, instance_id=instance_id, lease_ttl=lease_ttl, workers=workers, processes=processes)
    server = None
    if metrics_port is not None:
        server = MetricsServer(daemon.metrics, daemon.health, host=metrics_host, port=metrics_port).start()

    def stop(signum: int, _frame: Any) -> None:
        log(logger, logging.INFO, "stopping", signal=signal.Signals(signum).name)
        daemon.stop()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    log(logger, logging.INFO, "daemon started", instance=daemon.instance_id, portfolios=sorted(daemon.slots),
        metrics_port=server.port if server else None)  # fmt: skip
    if on_ready is not None:
        on_ready(daemon, server.port if server else None)
    try:
        return daemon.run(max_seconds=max_seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.stop()
        log(logger, logging.INFO, "daemon stopped", instance=daemon.instance_id)
