"""Scheduling and backoff: cycles on daemon threads or worker processes, when each portfolio is due next, and
how far a failing one backs off.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import Config
from ..telemetry import log
from .configs import _register_secrets
from .cycle import CycleResult, CycleRunner
from .state import DaemonState, Slot

if TYPE_CHECKING:
    pass

logger = logging.getLogger("rebalance")
T = TypeVar("T")


# A failing portfolio backs off exponentially, but never longer than this (or its own interval): the
# exchange's circuit breaker already protects the exchange, the backoff only spares the logs.
MAX_BACKOFF_SECONDS = 900.0
# How long a stopping daemon waits for its cycles to finish: with the lease releases and store closes after it,
# SIGTERM to exit stays under 10 s, whatever the exchange's timeout.
STOP_WAIT_SECONDS = 6.0


# -- cycle threads ------------------------------------------------------------------------------------------------


class CycleThreads:
    """A fixed pool of daemon threads for cycles, which the interpreter does not wait for at exit.

    ThreadPoolExecutor joins its threads when the interpreter exits, so a cycle blocked in an HTTP call held a
    stopping daemon for up to the exchange's timeout (20 s with `timeout: 30s`). A daemon stops within 10 s
    whatever that timeout: it sets the executor's stop event, waits a bounded time for cycles to finish, and
    leaves one still inside a call to the next run's recovery (its intent is durable before its order leaves)."""

    def __init__(self, workers: int, name: str = "cycle") -> None:
        self._tasks: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # the future carries it to whoever waits on it
                future.set_exception(exc)
            else:
                future.set_result(result)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._closed:
            raise RuntimeError("cannot submit a cycle after shutdown")
        future: Future[T] = Future()
        self._tasks.put((future, functools.partial(fn, *args, **kwargs)))
        return future

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = False) -> None:
        """Refuse new cycles; cancel the queued ones (`cancel_futures`); let each thread end after its cycle.
        `wait` is accepted for ThreadPoolExecutor's signature; only a bounded wait (see `Daemon.shutdown`)."""
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    task = self._tasks.get_nowait()
                except queue.Empty:
                    break
                if task is not None:
                    task[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the threads to end (after `shutdown`); True when they all did."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def __enter__(self) -> CycleThreads:
        return self

    def __exit__(self, *_: object) -> None:
        self.shutdown(cancel_futures=True)
        # the daemon already waited for these cycles (its own bounded wait): a cycle still in a call is left
        self.join(timeout=1.0)


# -- worker processes -------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process (spawn context)
    tasks: Connection  # the daemon's end: configs and tokens to run
    results: Connection  # the daemon's end: CycleResults back
    running: int = 0


class WorkerProcesses:
    """Cycles in worker processes, `threads` at once in each. The daemon's process keeps the schedule, the
    leases, the metrics and the logs; a worker gets a portfolio's config and lease token, runs the cycle with
    stores and exchange clients of its own, and sends back a CycleResult.

    A worker that dies (killed, out of memory) fails the cycles it was running as bugs and is replaced. The stop
    flag reaches every worker, which then, like the threads of a single process, finishes the order in flight
    and starts nothing new. Workers ignore SIGINT and SIGTERM: a Ctrl-C on a terminal reaches the whole process
    group, and only the daemon's process decides when they stop. A worker whose daemon is gone (its end of the
    task pipe closed, even by SIGKILL) exits after its cycles in flight.
    """

    def __init__(self, processes: int, threads: int) -> None:
        import multiprocessing

        self._ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        self._processes = processes
        self._threads = threads
        self._lock = threading.Lock()
        self._send = threading.Lock()  # one writer at a time on a worker's task pipe
        self._ids = itertools.count()
        self._pending: dict[int, tuple[Future[CycleResult], _Worker]] = {}
        self._closed = False
        self._stopping = False
        self._workers = [self._spawn() for _ in range(processes)]
        self._collector = threading.Thread(target=self._collect, name="cycle-results", daemon=True)
        self._collector.start()
        # A daemon dropped without its shutdown (a caller's bug, an exception) must not hang the interpreter's
        # exit, which joins worker processes: they are told to exit first (atexit runs the latest first).
        atexit.register(self.close, wait=False)

    def _spawn(self) -> _Worker:
        from ..telemetry import JsonFormatter, tracing_endpoint

        task_reader, task_writer = self._ctx.Pipe(duplex=False)
        result_reader, result_writer = self._ctx.Pipe(duplex=False)
        root = logging.getLogger("rebalance")
        fmt = "json" if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers) else "text"
        level = logging.getLevelName(root.getEffectiveLevel())
        process = self._ctx.Process(
            target=_worker_main,
            args=(task_reader, result_writer, self._threads, self._processes, fmt, level, tracing_endpoint()),
            name="rebalance-worker",
        )
        process.start()
        task_reader.close()  # the worker's ends: closed here, so that either side sees the other one go
        result_writer.close()
        return _Worker(process, task_writer, result_reader)

    @property
    def alive(self) -> int:
        with self._lock:
            return sum(1 for w in self._workers if w.process.is_alive())

    def submit(self, config: Config, token: int, *, own_schedule: bool, cycle: int) -> Future[CycleResult]:
        future: Future[CycleResult] = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            # the least busy; a dead one stays listed (with its cycles failed) only until its replacement runs
            worker = min(self._workers, key=lambda w: (not w.process.is_alive(), w.running))
            task_id = next(self._ids)
            self._pending[task_id] = (future, worker)
            worker.running += 1
        try:
            with self._send:
                worker.tasks.send(("run", task_id, config, token, own_schedule, cycle))
        except (OSError, ValueError) as exc:  # the worker is gone: the collector replaces it
            self._resolve(task_id, CycleResult("error", error=f"worker process unreachable: {exc}"))
        return future

    def _resolve(self, task_id: int, result: CycleResult) -> None:
        with self._lock:
            entry = self._pending.pop(task_id, None)
            if entry is not None:
                entry[1].running -= 1
        if entry is not None:
            entry[0].set_result(result)  # runs the daemon's callback, here, outside the lock

    def _collect(self) -> None:
        from multiprocessing.connection import wait

        while True:
            with self._lock:
                if self._closed and not self._pending:
                    return
                workers = list(self._workers)
            by_handle: dict[Any, _Worker] = {}
            for w in workers:
                by_handle[w.results] = w
                by_handle[w.process.sentinel] = w
            for ready in wait(list(by_handle), timeout=0.5):
                worker = by_handle[ready]
                if ready is worker.results:
                    self._drain(worker)
                elif not worker.process.is_alive():
                    self._drain(worker)  # what it sent before it went
                    self._replace(worker)

    def _drain(self, worker: _Worker) -> None:
        try:
            while worker.results.poll():
                task_id, result = worker.results.recv()
                self._resolve(task_id, result)
        except (EOFError, OSError):
            pass  # the worker is gone; its sentinel says so next

    def _replace(self, worker: _Worker) -> None:
        worker.process.join(timeout=1)
        with self._lock:
            if worker not in self._workers:
                return
            lost = [task_id for task_id, (_, w) in self._pending.items() if w is worker]
            replace = not self._closed
            if not replace:
                self._workers.remove(worker)
        for task_id in lost:
            self._resolve(
                task_id, CycleResult("bug", error=f"worker process exited ({worker.process.exitcode}) mid-cycle")
            )
        with contextlib.suppress(OSError):
            worker.tasks.close()
            worker.results.close()
        if replace:
            log(logger, logging.ERROR, "worker process died; replaced", exit_code=worker.process.exitcode)
            fresh = self._spawn()
            if self._stopping:
                with self._send, contextlib.suppress(OSError, ValueError):
                    fresh.tasks.send(("stop",))
            with self._lock:
                self._workers.append(fresh)
                self._workers.remove(worker)

    def _tell_all(self, message: Any) -> list[_Worker]:
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            with self._send, contextlib.suppress(OSError, ValueError):
                w.tasks.send(message)
        return workers

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = False) -> None:
        """Stop the workers' cycles: those queued end at once, those running finish their order in flight.

        Told through each worker's task pipe, never a multiprocessing Event: a worker killed while waiting on
        one leaves it locked, and setting it would then hang the daemon's stop."""
        self._stopping = True
        self._tell_all(("stop",))

    def close(self, *, wait: bool) -> None:
        """No more cycles: each worker exits once its cycles in flight are over (waited for with `wait`)."""
        atexit.unregister(self.close)
        with self._lock:
            self._closed = True
        workers = self._tell_all(None)
        if wait:
            for w in workers:
                w.process.join(timeout=5)


def _worker_main(
    tasks: Connection, results: Connection, threads: int, share: int, fmt: str, level: str, otlp: str | None
) -> None:
    """A worker process: run the cycles the daemon sends, `threads` at once, and send back what happened."""
    import signal

    from ..telemetry import configure_tracing, setup_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(fmt, level)
    if otlp:
        configure_tracing(otlp)
    stopping = threading.Event()
    runner = CycleRunner(stopping, share=share)
    send = threading.Lock()

    def run(task_id: int, config: Config, token: int, own_schedule: bool, cycle: int) -> None:
        result = runner.run(config, token, own_schedule=own_schedule, cycle=cycle)
        with send:
            try:
                results.send((task_id, result))
            except (OSError, ValueError, EOFError):
                pass  # the daemon is gone
            except Exception as exc:  # a result that cannot be pickled must still free the portfolio
                results.send((task_id, CycleResult("bug", error=f"cycle result not sendable: {exc}")))

    with CycleThreads(threads) as pool:
        while True:
            try:
                message = tasks.recv()
            except (EOFError, OSError):
                stopping.set()
                break  # the daemon is gone
            if message is None:
                break
            if message[0] == "stop":
                stopping.set()  # the executor checks it between orders
                continue
            _register_secrets(message[2])
            pool.submit(run, *message[1:])
    runner.close_clients()
    runner.close_stores()


class Scheduling(DaemonState):
    """Submits due cycles and schedules the next one from what each cycle did."""

    def _submit(self, slot: Slot, token: int) -> None:
        own, cycle = slot.scheduled_under == token, slot.cycles + 1
        future: Future[CycleResult]
        if isinstance(self.pool, WorkerProcesses):
            future = self.pool.submit(slot.config, token, own_schedule=own, cycle=cycle)
        else:
            future = self.pool.submit(
                self.runner.run, slot.config, token, own_schedule=own, cycle=cycle, clock=self.clock
            )

        def done(f: Future[CycleResult]) -> None:
            try:
                if not f.cancelled():
                    self._guarded(functools.partial(self._finish, slot, token, f.result()))
            finally:
                slot.running = None  # only now: the next cycle is scheduled from what this one did

        slot.running = future
        future.add_done_callback(done)

    def _finish(self, slot: Slot, token: int, r: CycleResult) -> None:
        """Schedule, metrics and logs of a finished cycle, wherever it ran."""
        if r.kind == "stopped":
            return
        if r.kind == "scheduled":
            slot.next_due = self.clock() + r.due_in
            return
        slot.cycles += 1
        m = self.metrics
        late = r.started - slot.next_due if slot.next_due else None  # the first cycle was never due
        if late is not None:
            m.lateness.observe(max(late, 0.0))
        self._record_exchange(r)
        if r.has_report:
            self._record(slot, r, late)
        if r.kind == "ran":
            slot.scheduled_under = token
            slot.failures = 0
        elif r.kind == "halted":
            # the operator's decision, not a failure: checked again every interval, no backoff
            m.cycles.labels(slot.pid, "halted").inc()
            log(logger, logging.WARNING, "portfolio halted", portfolio=slot.pid, cycle=slot.cycles,
                decision="halted", orders=[], error=r.error)  # fmt: skip
        elif r.kind == "fenced":
            # a successor holds the portfolio now; it carries on, with nothing of ours written after its fence
            m.lock_failures.labels(slot.pid).inc()
            m.cycles.labels(slot.pid, "fenced").inc()
            if slot.token == token:
                slot.token = None
                self._forget_gauges(slot.pid)
            log(logger, logging.WARNING, "lease lost during a cycle; writes fenced off", portfolio=slot.pid,
                cycle=slot.cycles, decision="fenced", orders=[], error=r.error)  # fmt: skip
        elif r.kind == "error":
            slot.failures += 1
            m.cycles.labels(slot.pid, "error").inc()
            log(logger, logging.ERROR, "cycle failed", portfolio=slot.pid, cycle=slot.cycles, decision="error",
                orders=[], error=r.error, exit_code=r.exit_code)  # fmt: skip
        else:
            slot.failures += 1
            m.cycles.labels(slot.pid, "bug").inc()
            log(logger, logging.ERROR, "cycle crashed", portfolio=slot.pid, cycle=slot.cycles, decision="error",
                orders=[], error=r.error, traceback=r.traceback)  # fmt: skip
        interval = float(slot.config.interval)
        delay = interval
        if slot.failures:
            delay = min(interval * 2 ** min(slot.failures, 5), max(interval, MAX_BACKOFF_SECONDS))
        slot.next_due = self.clock() + delay
