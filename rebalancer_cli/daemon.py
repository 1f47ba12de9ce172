"""The daemon: many portfolios, continuously, on one or several instances.

Each portfolio runs on its own interval in a worker pool, so one slow or failing portfolio never delays the
others: threads of the daemon's process, or (`processes` > 1) worker processes with stores and exchange clients
of their own, for when one core is not enough (an idle cycle costs ~10 ms of CPU, mostly in ccxt and the
stores; 5,000 portfolios a minute are ~85 cycles a second). The daemon's process alone keeps the schedule, the
leases, the metrics and the logs. Instances share the work through leases (`leases.py`): the main loop
heartbeats, renews every lease it holds in one round trip and claims its fair share of the rest (portfolios over
live instances) in chunks, so a second instance started beside a first one takes half the work, and a dead
instance's portfolios are claimed once its leases expire.
A portfolio is worked only while this instance holds its lease, and the lease's fencing token guards every
ledger write. The time of each portfolio's last cycle is kept in the store too, so a portfolio taken over from
another instance keeps its schedule instead of running twice. Every cycle goes through `executor.Executor.run`,
the same path as `rebalance execute`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import queue
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from .config import Config, load_config
from .errors import ConfigError, HaltedError, InputError, LeaseLostError, RebalanceError
from .leases import LeaseStore, open_leases
from .telemetry import Metrics, log, register_secret, span

CONFIG_SUFFIXES = (".yaml", ".yml")
# A failing portfolio backs off exponentially, but never longer than this (or its own interval): the
# exchange's circuit breaker already protects the exchange, the backoff only spares the logs.
MAX_BACKOFF_SECONDS = 900.0
# Config keys that name where the state lives: changing them under a held lease would split the state.
RESTART_KEYS = ("redis_url", "database_url", "state_dir")
# An exchange client is rebuilt after this long, so that a long-running daemon reads market rules again.
CLIENT_MAX_AGE = 600.0
# Config files checked for changes per reload call (one a second), at least; with more than RELOAD_SLICE *
# RELOAD_SWEEP portfolios each file is checked once every RELOAD_SWEEP calls.
RELOAD_SLICE = 1000
RELOAD_SWEEP = 5
# Portfolios claimed per round trip to the lease store; every claim is then fenced in the ledger one by one.
CLAIM_CHUNK = 200
logger = logging.getLogger("rebalance")
T = TypeVar("T")
# How long a stopping daemon waits for its cycles to finish: with the lease releases and store closes after it,
# SIGTERM to exit stays under 10 s, whatever the exchange's timeout.
STOP_WAIT_SECONDS = 6.0


@dataclass
class Slot:
    """One portfolio as the daemon tracks it."""

    path: Path
    config: Config
    mtime: float
    rank: str = ""
    next_due: float = 0.0
    token: int | None = None
    running: Future[Any] | None = None
    cycles: int = 0
    failures: int = 0
    # when this instance, at its fair share, first saw the lease free (nobody else is taking it)
    free_since: float | None = None
    # taken above the fair share because no other instance wanted it: never handed back
    surplus: bool = False
    # which lease store the portfolio's lease lives in (its stores cannot change while the daemon runs)
    lease_key: tuple[str, str] = ("", "")
    # the lease token under which this instance last recorded a cycle: while it still holds that lease, the
    # schedule in the store is its own and need not be read back
    scheduled_under: int | None = None

    @property
    def pid(self) -> str:
        return self.config.portfolio_id


def discover(paths: list[Path], known: set[Path] | frozenset[Path] = frozenset()) -> list[Path]:
    """Config files from files and directories (a directory contributes its *.yaml / *.yml, sorted).

    Files in `known` are configs already: they are not read again to tell them from snapshots."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(
                (
                    f
                    for f in p.iterdir()
                    if f.suffix in CONFIG_SUFFIXES and (f in known or (f.is_file() and not _is_snapshot(f)))
                ),
                key=str,  # comparing Path objects costs ten times more than their text, for the same order
            )
        else:
            found.append(p)
    if not found:
        raise InputError(f"no config files in {', '.join(map(str, paths))}")
    return found


def _is_snapshot(path: Path) -> bool:
    """Paper snapshots often sit next to the configs that name them; they are not configs."""
    try:
        head = path.read_text(errors="replace")[:4096]
    except OSError:
        return False
    keys = {line.split(":", 1)[0].strip() for line in head.splitlines() if line and not line[0].isspace()}
    return {"taken_at", "markets"} <= keys and "portfolio_id" not in keys


def _register_secrets(config: Config) -> None:
    """Credentials never reach a log line, even inside an exception message nobody scrubbed."""
    for env_name in config.exchange.credentials_env.values():
        value = os.environ.get(env_name)
        if value:
            register_secret(value)


def _store_key(kind: str, config: Config) -> tuple[str, str]:
    url = config.redis_url if kind in ("ledger", "leases") else config.database_url
    return (kind, f"{url or ''}|{config.resolved_state_dir()}")


def _schedule_key(pid: str) -> str:
    """The last cycle's time is shared state: a successor instance keeps the schedule.

    Kept under `daemon:<portfolio>` in the ledger's memory: a portfolio id cannot contain ':', so no portfolio's
    own memory can be this key (it was `<portfolio>.daemon`, which portfolio `a.daemon` overwrote; see
    `_legacy_schedule` for schedules written before)."""
    return f"daemon:{pid}"


def _legacy_schedule(ledger: Any, pid: str) -> float | None:
    """The schedule earlier daemons wrote under `<portfolio>.daemon`, read once after an upgrade, so that
    running instances keep their schedules; it is never written again. Only a value of exactly that shape is
    taken: a portfolio named `<portfolio>.daemon` keeps asset symbols there, never a `last_cycle` key."""
    try:
        memory = json.loads(ledger.get_memory(f"{pid}.daemon") or "{}")
    except ValueError:
        return None
    if isinstance(memory, dict) and set(memory) == {"last_cycle"} and isinstance(memory["last_cycle"], int | float):
        return float(memory["last_cycle"])
    return None


@dataclass
class CycleResult:
    """What one cycle tells the daemon, for its schedule, metrics and logs; plain data, because a cycle may run
    in a worker process.

    `kind`: ran (the executor finished; `status` is its report's), scheduled (another instance ran the
    portfolio recently: it is due in `due_in` seconds), halted, fenced (the lease was lost), error, bug, or
    stopped (the daemon was stopping: nothing was done)."""

    kind: str
    started: float = 0.0
    worker: int = field(default_factory=os.getpid)  # the process that ran the cycle
    due_in: float = 0.0
    elapsed: float = 0.0
    has_report: bool = False
    status: str = ""
    traded: bool = False
    drift: Decimal | None = None
    cost_ratio: float | None = None
    orders: list[dict[str, str]] = field(default_factory=list)
    order_results: list[tuple[str, str]] = field(default_factory=list)  # (side, status) of each order
    lock_failures: int = 0
    decisions: dict[str, str] = field(default_factory=dict)
    error: str = ""
    exit_code: int | None = None
    traceback: str = ""
    api_calls: dict[str, int] = field(default_factory=dict)
    exchange_id: str = ""
    breaker_value: float | None = None
    rate_limit_remaining: float | None = None


class CycleRunner:
    """Stores, exchange clients, per-account guards, and the cycle itself: one in the daemon's process, and one
    in each worker process when the daemon runs several (`processes`).

    `share` is how many runners split each exchange account's request budget: a bucket kept in Redis is
    shared by all of them anyway, a local one gets its share of the budget."""

    def __init__(self, stopping: threading.Event, *, share: int = 1) -> None:
        self.stopping = stopping
        self.share = share
        self._stores: dict[tuple[str, str], Any] = {}
        self._limiters: dict[str, Any] = {}
        self._breakers: dict[str, Any] = {}
        self._idle_clients: dict[str, list[tuple[float, Any]]] = {}
        self._remaining: dict[int, tuple[float, float]] = {}  # rate-limit budget left, by bucket: (read at, value)
        self._lock = threading.Lock()

    def store(self, kind: str, config: Config) -> Any:
        key = _store_key(kind, config)
        with self._lock:
            if key not in self._stores:
                if kind == "ledger":
                    from .runtime import open_ledger_for

                    self._stores[key] = open_ledger_for(config)
                elif kind == "audit":
                    from .runtime import open_audit_for

                    self._stores[key] = open_audit_for(config)
                else:
                    self._stores[key] = open_leases(config.redis_url, config.resolved_state_dir())
            return self._stores[key]

    def stores(self) -> list[tuple[str, Any]]:
        with self._lock:
            return [(kind, store) for (kind, _), store in self._stores.items()]

    def close_clients(self) -> None:
        with self._lock:
            idle = [c for clients in self._idle_clients.values() for _, c in clients]
            self._idle_clients.clear()
        for client in idle:
            with contextlib.suppress(Exception):  # closing is best effort at exit
                client.close()

    def close_stores(self) -> None:
        with self._lock:
            for store in self._stores.values():
                with contextlib.suppress(Exception):  # closing is best effort at exit
                    store.close()
            self._stores.clear()

    @staticmethod
    def _client_key(config: Config) -> str:
        """Which pooled clients a config may use: the same exchange block and state directory (the caches)."""
        return json.dumps([config.exchange.model_dump(mode="json"), str(config.resolved_state_dir())])

    @contextlib.contextmanager
    def exchange(self, config: Config) -> Iterator[Any]:
        """An exchange client for one cycle.

        ccxt clients are reused across the cycles of every portfolio on the same account: building one and
        loading its markets costs more CPU than a whole idle cycle. A client serves one cycle at a time (so its
        call counts are that cycle's), is closed instead of reused after a failure, and is replaced after
        CLIENT_MAX_AGE so that market rules (lot sizes, fees) are read again.
        """
        if config.exchange.is_paper:
            from .runtime import open_exchange

            paper = open_exchange(config)
            try:
                yield paper
            finally:
                paper.close()
            return
        from .exchange.ccxt_exchange import CcxtExchange

        key = self._client_key(config)
        now = time.monotonic()
        client = None
        with self._lock:
            idle = self._idle_clients.setdefault(key, [])
            while idle and client is None:
                born, candidate = idle.pop()
                if now - born < CLIENT_MAX_AGE:
                    client = (born, candidate)
                else:
                    candidate.close()
        if client is None:
            limiter, breaker = self.shared_guards(config)
            client = (now, CcxtExchange.from_config(config, limiter=limiter, breaker=breaker))
        ok = False
        try:
            yield client[1]
            ok = True
        finally:
            if ok and not self.stopping.is_set():
                with self._lock:
                    self._idle_clients[key].append(client)
            else:
                client[1].close()

    def shared_guards(self, config: Config) -> tuple[Any, Any]:
        """One rate-limit bucket and one circuit breaker per exchange account, across every portfolio on it.

        The bucket is shared through Redis with every other instance. The breaker must outlive a cycle (each
        cycle builds a fresh exchange client): a breaker born with each cycle would never see enough
        consecutive failures to open, and a failing exchange would be hammered by every portfolio.
        """
        ex = config.exchange
        account = "|".join([ex.id, ex.api_url or "", *sorted(ex.credentials_env.values())])
        with self._lock:
            if account not in self._limiters:
                import ccxt

                from .exchange.breaker import BreakerState, CircuitBreaker
                from .exchange.ratelimit import bucket_for_exchange, limit_per_minute_from_ccxt, rate_limit_key

                per_minute = (
                    float(ex.rate_limit_per_minute)
                    if ex.rate_limit_per_minute
                    else (limit_per_minute_from_ccxt(getattr(ccxt, ex.id)().rateLimit))
                )
                client = None
                if config.redis_url:
                    from .ledger.redis import connect

                    client = connect(config.redis_url)
                digest = uuid.uuid5(uuid.NAMESPACE_URL, account).hex[:12]
                self._limiters[account] = bucket_for_exchange(
                    per_minute if client else per_minute / self.share,
                    client=client,
                    key=rate_limit_key(ex.id, digest) if client else None,
                    max_cost=50.0,
                )

                def on_change(_old: BreakerState, new: BreakerState) -> None:
                    log(logger, logging.WARNING, "circuit breaker", exchange=ex.id, state=str(new))

                self._breakers[account] = CircuitBreaker(
                    ex.id, failure_threshold=5, reset_timeout=30.0, on_state_change=on_change
                )
            return self._limiters[account], self._breakers[account]

    # -- the cycle itself ------------------------------------------------------------------------------------

    def run(
        self,
        config: Config,
        token: int,
        *,
        own_schedule: bool,
        cycle: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> CycleResult:
        """One cycle through the executor; never raises: whatever happened is in the result.

        `own_schedule`: this instance recorded the portfolio's last cycle under this very lease, so the schedule
        kept in the store is its own and is not read back."""
        result = CycleResult("ran", started=clock())
        if self.stopping.is_set():
            result.kind = "stopped"
            return result
        from .executor import Executor

        pid = config.portfolio_id
        try:
            ledger = self.store("ledger", config)
            if not own_schedule:
                due_in = self._due_in(ledger, config)
                if due_in > 0:
                    # another instance ran it recently (a takeover): keep its schedule
                    result.kind, result.due_in = "scheduled", due_in
                    return result
            # one write-behind queue serves every portfolio of the process; its failures stay with their portfolio
            audit = self.store("audit", config).scoped(pid)
            t0 = time.perf_counter()
            with self.exchange(config) as exchange:
                before = dict(exchange.calls)
                try:
                    with span("cycle", portfolio=pid, cycle=cycle):
                        report = Executor(config, exchange, ledger, audit, fence=token, stop=self.stopping).run()
                finally:
                    result.elapsed = time.perf_counter() - t0
                    self._exchange_figures(exchange, before, result)
            _summarize(report, result)
            ledger.set_memory(_schedule_key(pid), json.dumps({"last_cycle": time.time()}), fence=token)
        except HaltedError as exc:
            result.kind, result.error = "halted", str(exc)
        except LeaseLostError as exc:
            result.kind, result.error = "fenced", str(exc)
        except RebalanceError as exc:
            result.kind, result.error, result.exit_code = "error", str(exc), exc.exit_code
        except Exception as exc:  # one portfolio's bug must not stop the others
            result.kind, result.error = "bug", f"{type(exc).__name__}: {exc}"
            result.traceback = traceback.format_exc()
        return result

    def _exchange_figures(self, exchange: Any, before: dict[str, int], result: CycleResult) -> None:
        """API calls, breaker and rate-limit budget, also of a failed cycle (when they matter most).

        The budget left is read at most once a second per account: a bucket shared through Redis costs a round
        trip to read, and thousands of cycles a minute would add one each for a gauge."""
        result.exchange_id = str(getattr(exchange, "id", ""))
        result.api_calls = {e: n - before.get(e, 0) for e, n in exchange.calls.items() if n - before.get(e, 0)}
        breaker = getattr(exchange, "breaker", None)
        if breaker is not None:
            result.breaker_value = float(breaker.state_value)
        limiter = getattr(exchange, "limiter", None)
        if limiter is None:
            return
        now = time.monotonic()
        read = self._remaining.get(id(limiter))
        if read is None or now - read[0] >= 1.0:
            with contextlib.suppress(RebalanceError):  # a shared bucket's store may be down: a gauge can wait
                read = (now, float(limiter.remaining()))
                self._remaining[id(limiter)] = read
        result.rate_limit_remaining = read[1] if read is not None else None

    @staticmethod
    def _due_in(ledger: Any, config: Config) -> float:
        try:
            memory = json.loads(ledger.get_memory(_schedule_key(config.portfolio_id)) or "{}")
        except ValueError:
            memory = {}
        last_wall = memory.get("last_cycle") if isinstance(memory, dict) else None
        if not last_wall:
            last_wall = _legacy_schedule(ledger, config.portfolio_id)
        if not last_wall:
            return 0.0
        interval = float(config.interval)
        waited = time.time() - float(last_wall)  # negative when the last holder's clock ran ahead of ours
        return min(interval, max(0.0, interval - waited))


def _summarize(report: Any, result: CycleResult) -> None:
    result.has_report = True
    result.status = report.status
    plan = report.plan
    result.traded = plan is not None and bool(plan.trades)
    result.drift = report.drift_after if report.drift_after is not None else report.drift_before
    if plan is not None:
        benefit = sum((a.drift_value for a in plan.assets if a.decision == "trade"), Decimal(0))
        result.cost_ratio = float(plan.summary.est_total_cost / benefit) if benefit else 0.0
        result.decisions = {a.symbol: a.reason for a in plan.assets}
    for o in report.outcomes:
        result.order_results.append((o.side, o.status))
        result.lock_failures += "shadow ledger refused" in o.reason
        result.orders.append(
            {
                "market": o.market,
                "side": o.side,
                "amount": format(o.amount, "f"),
                "status": o.status,
                "filled": format(o.filled, "f"),
                "idempotency_key": o.key,
            }
        )


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
        from .telemetry import JsonFormatter, tracing_endpoint

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

    from .telemetry import configure_tracing, setup_logging

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


class Daemon:
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

    # -- configs ----------------------------------------------------------------------------------------

    def _new_slot(self, path: Path, config: Config) -> Slot:
        _register_secrets(config)
        # rendezvous order: each instance prefers different portfolios, so racing claims rarely collide
        rank = hashlib.sha256(f"{self.instance_id}|{config.portfolio_id}".encode()).hexdigest()
        self.metrics.lock_failures.labels(config.portfolio_id)  # the series exists at 0 before any failure
        return Slot(path, config, path.stat().st_mtime, rank=rank, lease_key=_store_key("leases", config))

    def _load_all(self) -> None:
        problems: list[str] = []
        for path in discover(self.paths):
            try:
                config = load_config(path)
            except ConfigError as exc:
                problems.append(str(exc))
                continue
            if config.portfolio_id in self.slots:
                other = self.slots[config.portfolio_id].path
                problems.append(f"{path}: portfolio_id {config.portfolio_id} is also used by {other}")
                continue
            self.slots[config.portfolio_id] = self._new_slot(path, config)
        if problems:
            raise InputError("\n".join(problems))

    def reload_changed(self) -> None:
        """A changed config replaces the old one only if it validates; an invalid change is logged, not used.

        New files in a config directory are added the same way; a portfolio whose file is gone is dropped
        once its cycle is over, and its lease handed back.
        """
        slots = list(self.slots.values())
        # thousands of files are checked a slice a call, so that each is still seen within a few seconds
        share = min(len(slots), max(RELOAD_SLICE, math.ceil(len(slots) / RELOAD_SWEEP)))
        start = self._reload_cursor % max(len(slots), 1)
        self._reload_cursor = start + share
        for slot in (slots[start:] + slots[:start])[:share]:
            try:
                mtime = os.stat(slot.path).st_mtime
            except OSError:
                self._drop(slot)
                continue
            if mtime != slot.mtime:
                slot.mtime = mtime
                self._reload(slot)
        if not self._listing_changed():
            return
        known = {s.path for s in self.slots.values()}
        try:
            paths = discover(self.paths, known)
        except InputError:
            return
        for path in paths:
            if path in known:
                continue
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if self._rejected.get(path) == mtime:
                continue  # logged already; the next edit is read again
            try:
                config = load_config(path)
            except ConfigError as exc:
                self._rejected[path] = mtime
                log(logger, logging.ERROR, "new config rejected", path=str(path), problems=_problems(exc))
                continue
            if config.portfolio_id in self.slots:
                self._rejected[path] = mtime
                log(
                    logger,
                    logging.ERROR,
                    "new config rejected: portfolio_id already used",
                    portfolio=config.portfolio_id,
                    path=str(path),
                    other=str(self.slots[config.portfolio_id].path),
                )
                continue
            self._rejected.pop(path, None)
            self.slots[config.portfolio_id] = self._new_slot(path, config)
            log(logger, logging.INFO, "config added", portfolio=config.portfolio_id, path=str(path))

    def _listing_changed(self) -> bool:
        """Whether the config directories must be listed again: a directory's mtime moves when a file is added,
        removed or renamed into it, and a rejected file may have been fixed in place. Listing thousands of files
        every second cost more than all the portfolios' cycles together at that scale.

        A change within the last seconds is listed again regardless: a file created in the same clock tick as
        the previous listing leaves the directory's mtime where that listing saw it."""
        marks: list[float | None] = []
        for path in [*self.paths, *self._rejected]:
            try:
                marks.append(os.stat(path).st_mtime)
            except OSError:
                marks.append(None)
        changed = marks != self._listing_marks or time.time() - max((m for m in marks if m), default=0.0) < 3.0
        self._listing_marks = marks
        return changed

    def _reload(self, slot: Slot) -> None:
        try:
            config = load_config(slot.path)
        except ConfigError as exc:
            log(
                logger,
                logging.ERROR,
                "config change rejected; keeping the previous config",
                portfolio=slot.pid,
                path=str(slot.path),
                problems=_problems(exc),
            )
            return
        if config.portfolio_id != slot.pid:
            log(
                logger,
                logging.ERROR,
                "config change rejected: portfolio_id cannot change while running; keeping the previous config",
                portfolio=slot.pid,
                path=str(slot.path),
            )
            return
        moved = [k for k in RESTART_KEYS if getattr(config, k) != getattr(slot.config, k)]
        if moved:
            log(
                logger,
                logging.ERROR,
                "config change rejected: a store cannot change while running (restart the daemon); "
                "keeping the previous config",
                portfolio=slot.pid,
                path=str(slot.path),
                keys=moved,
            )
            return
        _register_secrets(config)
        slot.config = config
        log(logger, logging.INFO, "config reloaded", portfolio=slot.pid, path=str(slot.path))

    def _drop(self, slot: Slot) -> None:
        if slot.running is not None:
            return  # after its cycle: the next reload drops it
        self._let_go(slot, "config removed")
        self.slots.pop(slot.pid, None)
        log(logger, logging.INFO, "config removed", portfolio=slot.pid, path=str(slot.path))

    # -- stores, shared per URL (the daemon's own: leases, fences, health) --------------------------------

    def _store(self, kind: str, config: Config) -> Any:
        return self.runner.store(kind, config)

    def _leases(self, config: Config) -> LeaseStore:
        store: LeaseStore = self.runner.store("leases", config)
        return store

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

    @staticmethod
    def _guarded(step: Callable[[], None]) -> None:
        """A bug in one step of the loop is logged, not fatal: the portfolios already held keep running."""
        try:
            step()
        except Exception:
            logger.exception("daemon loop step failed")

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

    # -- leases ----------------------------------------------------------------------------------------------

    def _let_go(self, slot: Slot, why: str) -> None:
        """Release the lease (if held) and forget the portfolio's gauges: an instance that no longer works a
        portfolio must not keep exporting its last drift, or an alert would fire on a stale value."""
        token, slot.token = slot.token, None
        slot.surplus = False
        if token is not None:
            with contextlib.suppress(RebalanceError):  # it expires on its own anyway
                self._leases(slot.config).release(slot.pid, self.instance_id, token)
            log(logger, logging.INFO, "lease released", portfolio=slot.pid, token=token, reason=why)
        self._forget_gauges(slot.pid)

    def _let_go_many(self, slots: list[Slot], why: str) -> None:
        """`_let_go` for many portfolios of one lease store, in one round trip: a clean stop of an instance
        holding thousands must still end within seconds."""
        tokens = {s.pid: s.token for s in slots if s.token is not None}
        if tokens:
            with contextlib.suppress(RebalanceError):  # they expire on their own anyway
                self._leases(slots[0].config).release_many(tokens, self.instance_id)
        for slot in slots:
            slot.token, slot.surplus = None, False
            if slot.pid in tokens:
                log(logger, logging.INFO, "lease released", portfolio=slot.pid, token=tokens[slot.pid], reason=why)
            self._forget_gauges(slot.pid)

    def _forget_gauges(self, pid: str) -> None:
        for gauge in (self.metrics.drift, self.metrics.cost_ratio):
            with contextlib.suppress(KeyError):
                gauge.remove(pid)

    def _by_lease_store(self, slots: list[Slot]) -> dict[tuple[str, str], list[Slot]]:
        groups: dict[tuple[str, str], list[Slot]] = {}
        for slot in slots:
            groups.setdefault(slot.lease_key, []).append(slot)
        return groups

    def _lease_tick(self, now: float, *, claim: bool = True) -> None:
        """Heartbeat, renew what is held, hand back what is above the fair share, claim up to it."""
        for key, slots in self._by_lease_store(list(self.slots.values())).items():
            try:
                store = self._leases(slots[0].config)
                live: int | None = store.heartbeat(self.instance_id, self.lease_ttl)
            except RebalanceError as exc:
                log(logger, logging.WARNING, "lease store unreachable", error=str(exc))
                live = None
                store = None
            if store is not None:
                self._renew(store, slots)
            if store is None or live is None or not claim:
                continue
            self.live_instances[key[1]] = live
            self._share(store, slots, now, live)
        self.metrics.leases.set(sum(1 for s in self.slots.values() if s.token is not None))

    def _renew(self, store: LeaseStore, slots: list[Slot]) -> None:
        """Every lease held, in one round trip: renewing thousands one by one took longer than a lease lasts."""
        tokens = {slot.pid: slot.token for slot in slots if slot.token is not None}
        if not tokens:
            return
        try:
            lost = store.renew_many(tokens, self.instance_id, self.lease_ttl)
        except RebalanceError as exc:
            # unknown: keep working under the leases; fencing refuses our writes if one really was lost
            log(logger, logging.WARNING, "lease renewal failed", portfolios=len(tokens), error=str(exc))
            return
        for slot in slots:
            # a token that changed meanwhile (a cycle saw it fenced) is not this renewal's business
            if slot.pid in lost and slot.token is not None and slot.token == tokens[slot.pid]:
                log(logger, logging.WARNING, "lease lost", portfolio=slot.pid, token=slot.token)
                slot.token = None
                slot.surplus = False
                self._forget_gauges(slot.pid)

    def _share(self, store: LeaseStore, slots: list[Slot], now: float, live: int) -> None:
        fair = math.ceil(len(slots) / max(live, 1))
        held = [s for s in slots if s.token is not None]
        sheddable = sorted((s for s in held if not s.surplus), key=lambda s: s.rank, reverse=True)
        excess = len(held) - fair
        for slot in sheddable:
            if excess <= 0:
                break
            if slot.running is None:
                self._let_go(slot, f"fair share is {fair} of {len(slots)} with {live} instances")
                excess -= 1
        count = sum(1 for s in slots if s.token is not None)
        free = sorted((s for s in slots if s.token is None and s.running is None), key=lambda s: s.rank)
        if not free:
            return
        # Claims are fenced one by one in the ledger: a takeover of thousands spreads over a few rounds instead of
        # holding up the renewals (and the cycles) behind it for longer than a lease lasts.
        deadline = time.monotonic() + self.lease_period / 2
        rest = iter(free)
        while count < fair and time.monotonic() < deadline and not self.stopping.is_set():
            chunk = list(itertools.islice(rest, min(CLAIM_CHUNK, fair - count)))
            if not chunk:
                return
            count += self._claim(store, chunk, surplus=False)
        if count < fair or time.monotonic() >= deadline or self.stopping.is_set():
            return
        # at our share: take a portfolio only once it stayed free for a whole TTL, i.e. no other instance wants
        # it (their configs differ from ours)
        above = list(rest)
        if not above:
            return
        try:
            holders = store.holders([s.pid for s in above])
        except RebalanceError as exc:
            log(logger, logging.WARNING, "lease lookup failed", portfolios=len(above), error=str(exc))
            return
        unwanted = []
        for slot in above:
            if holders.get(slot.pid) is not None:
                slot.free_since = None
                continue
            if slot.free_since is None:
                slot.free_since = now
            if now - slot.free_since >= self.lease_ttl:
                unwanted.append(slot)
        for start in range(0, len(unwanted), CLAIM_CHUNK):
            if time.monotonic() >= deadline or self.stopping.is_set():
                return
            self._claim(store, unwanted[start : start + CLAIM_CHUNK], surplus=True)

    def _claim(self, store: LeaseStore, chunk: list[Slot], *, surplus: bool) -> int:
        """Claim a chunk in one round trip, then fence each claimed portfolio; returns how many were taken."""
        try:
            tokens = store.acquire_many([s.pid for s in chunk], self.instance_id, self.lease_ttl)
        except RebalanceError as exc:
            log(logger, logging.WARNING, "lease claim failed", portfolios=len(chunk), error=str(exc))
            return 0
        taken = 0
        for slot in chunk:
            token = tokens.get(slot.pid)
            if token is None:
                slot.free_since = None
                continue
            try:
                # announced before the first write: from now on the previous holder's writes are refused
                self._store("ledger", slot.config).advance_fence(slot.pid, token)
            except RebalanceError as exc:
                log(logger, logging.ERROR, "fence not advanced; lease handed back", portfolio=slot.pid, error=str(exc))
                with contextlib.suppress(RebalanceError):
                    store.release(slot.pid, self.instance_id, token)
                continue
            slot.token, slot.surplus, slot.free_since = token, surplus, None
            taken += 1
            log(logger, logging.INFO, "lease acquired", portfolio=slot.pid, token=token, instance=self.instance_id)
        return taken

    # -- one cycle's outcome -----------------------------------------------------------------------------------

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

    # -- metrics and logs -----------------------------------------------------------------------------------

    def _record_exchange(self, r: CycleResult) -> None:
        m = self.metrics
        for endpoint, count in r.api_calls.items():
            m.api_calls.labels(endpoint).inc(count)
        if r.breaker_value is not None:
            m.breaker.labels(r.exchange_id).set(r.breaker_value)
        if r.rate_limit_remaining is not None:
            m.rate_limit_remaining.labels(r.exchange_id).set(r.rate_limit_remaining)

    def _record(self, slot: Slot, r: CycleResult, late: float | None) -> None:
        m = self.metrics
        m.duration.observe(r.elapsed)
        if r.drift is not None and slot.token is not None:
            m.drift.labels(slot.pid).set(float(r.drift))
        if r.cost_ratio is not None and slot.token is not None:
            m.cost_ratio.labels(slot.pid).set(r.cost_ratio)
        for side, status in r.order_results:
            m.orders.labels(side, status).inc()
        if r.lock_failures:
            m.lock_failures.labels(slot.pid).inc(r.lock_failures)
        m.cycles.labels(slot.pid, r.status).inc()
        log(
            logger,
            logging.INFO,
            "cycle",
            portfolio=slot.pid,
            cycle=slot.cycles,
            decision="trade" if r.traded else "hold",
            status=r.status,
            orders=r.orders,
            decisions=r.decisions,
            drift=str(r.drift),
            seconds=round(r.elapsed, 4),
            late=round(late, 3) if late is not None else None,
            instance=self.instance_id,
            worker=r.worker,
        )

    # -- health --------------------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Ready when the loop ticked recently and every store of every portfolio answers."""
        slots = list(self.slots.values())
        detail: dict[str, Any] = {
            "instance": self.instance_id,
            "portfolios": len(slots),
            "leases": sum(1 for s in slots if s.token is not None),
            "instances": max(self.live_instances.values(), default=None),
        }
        if isinstance(self.pool, WorkerProcesses):
            detail["worker_processes"] = self.pool.alive
        alive = self.clock() - self.last_tick < max(5.0, self.tick * 10) and not self.stopping.is_set()
        detail["loop_alive"] = alive
        if self.stopping.is_set():
            return False, {**detail, "stopping": True}  # and never reopen a store shutdown just closed
        ok = alive
        checked: set[tuple[str, str]] = set()
        for slot in slots:
            for kind in ("leases", "ledger", "audit"):
                key = _store_key(kind, slot.config)
                if key in checked:
                    continue
                checked.add(key)
                try:
                    # a store that could not even be opened is as down as one that stopped answering
                    self._store(kind, slot.config).ping()
                except RebalanceError as exc:
                    ok = False
                    detail[f"{kind}_error"] = str(exc)
        return ok, detail


def _problems(exc: ConfigError) -> list[str]:
    return [p.render() for p in exc.problems]


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

    from .telemetry import MetricsServer, configure_tracing

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
