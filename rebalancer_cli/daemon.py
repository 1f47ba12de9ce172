"""The daemon: many portfolios, continuously, on one or several instances.

Each portfolio runs on its own interval in a worker pool, so one slow or failing portfolio never delays the
others. Instances share the work through leases (`leases.py`): a portfolio is worked only by the holder of its
lease, whose fencing token guards every ledger write. The time of each portfolio's last cycle is kept in the
store too, so a portfolio taken over from a dead instance keeps its schedule instead of running twice.
Every cycle goes through `executor.Executor.run`, the same path as `rebalance execute`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from .config import Config, load_config
from .errors import ConfigError, InputError, RebalanceError
from .leases import LeaseStore, open_leases
from .telemetry import Metrics, log, span

CONFIG_SUFFIXES = (".yaml", ".yml")
logger = logging.getLogger("rebalance")


@dataclass
class Slot:
    """One portfolio as the daemon tracks it."""

    path: Path
    config: Config
    mtime: float
    next_due: float = 0.0
    token: int | None = None
    running: Future[Any] | None = None
    renewed_at: float = 0.0
    cycles: int = 0
    failures: int = 0
    last: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> str:
        return self.config.portfolio_id


def discover(paths: list[Path]) -> list[Path]:
    """Config files from files and directories (a directory contributes its *.yaml / *.yml, sorted)."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(
                f for f in p.iterdir() if f.suffix in CONFIG_SUFFIXES and f.is_file() and not _is_snapshot(f)
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


class Daemon:
    def __init__(
        self,
        paths: list[Path],
        *,
        instance_id: str | None = None,
        lease_ttl: float = 15.0,
        workers: int = 8,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick: float = 0.2,
    ) -> None:
        self.paths = paths
        self.instance_id = instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lease_ttl = lease_ttl
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.tick = tick
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cycle")
        self.slots: dict[str, Slot] = {}
        self._stores: dict[tuple[str, str], Any] = {}
        self._limiters: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.last_tick = 0.0
        self._load_all()

    # -- configs ----------------------------------------------------------------------------------------

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
            self.slots[config.portfolio_id] = Slot(path, config, path.stat().st_mtime)
        if problems:
            raise InputError("\n".join(problems))

    def reload_changed(self) -> None:
        """A changed config replaces the old one only if it validates; an invalid change is logged, not used."""
        for slot in list(self.slots.values()):
            try:
                mtime = slot.path.stat().st_mtime
            except OSError:
                continue
            if mtime == slot.mtime:
                continue
            slot.mtime = mtime
            try:
                config = load_config(slot.path)
            except ConfigError as exc:
                log(
                    logger,
                    logging.ERROR,
                    "config change rejected; keeping the previous config",
                    portfolio=slot.pid,
                    path=str(slot.path),
                    problems=[p.render() for p in exc.problems],
                )
                continue
            if config.portfolio_id != slot.pid:
                log(
                    logger,
                    logging.ERROR,
                    "config change rejected: portfolio_id cannot change while running",
                    portfolio=slot.pid,
                    path=str(slot.path),
                )
                continue
            slot.config = config
            log(logger, logging.INFO, "config reloaded", portfolio=slot.pid, path=str(slot.path))

    # -- stores, shared per URL --------------------------------------------------------------------------

    def _store(self, kind: str, config: Config) -> Any:
        url = config.redis_url if kind in ("ledger", "leases") else config.database_url
        key = (kind, f"{url or ''}|{config.resolved_state_dir()}")
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

    def _leases(self, config: Config) -> LeaseStore:
        store: LeaseStore = self._store("leases", config)
        return store

    def _exchange(self, config: Config) -> Any:
        if config.exchange.is_paper:
            from .runtime import open_exchange

            return open_exchange(config)
        from .exchange.ccxt_exchange import CcxtExchange

        return CcxtExchange.from_config(config, limiter=self._shared_limiter(config))

    def _shared_limiter(self, config: Config) -> Any:
        """One bucket per exchange account across every portfolio and, through Redis, every instance."""
        ex = config.exchange
        account = "|".join([ex.id, ex.api_url or "", *sorted(ex.credentials_env.values())])
        with self._lock:
            if account not in self._limiters:
                import ccxt

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
                    per_minute, client=client, key=rate_limit_key(ex.id, digest) if client else None, max_cost=50.0
                )
            return self._limiters[account]

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self, *, max_seconds: float | None = None) -> int:
        started = self.clock()
        last_renew = 0.0
        last_reload = 0.0
        try:
            while not self.stopping.is_set():
                now = self.clock()
                self.last_tick = now
                if max_seconds is not None and now - started >= max_seconds:
                    break
                if now - last_reload >= 1.0:
                    self.reload_changed()
                    last_reload = now
                if now - last_renew >= self.lease_ttl / 3:
                    self._renew_leases()
                    last_renew = now
                for slot in self.slots.values():
                    if slot.running is None and now >= slot.next_due:
                        slot.running = self.pool.submit(self._cycle, slot)
                        slot.running.add_done_callback(self._done_callback(slot))
                self.stopping.wait(self.tick)
        finally:
            self.shutdown()
        return 0

    def stop(self) -> None:
        self.stopping.set()

    def shutdown(self, timeout: float = 9.0) -> None:
        """Finish the orders in flight, release leases and close the stores."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for slot in self.slots.values():
            f = slot.running
            if f is not None:
                with contextlib.suppress(Exception):  # the cycle logged its own failure
                    f.result(timeout=max(0.0, deadline - time.monotonic()))
        self.pool.shutdown(wait=False, cancel_futures=True)
        for slot in self.slots.values():
            if slot.token is not None:
                with contextlib.suppress(RebalanceError):  # it expires on its own anyway
                    self._leases(slot.config).release(slot.pid, self.instance_id, slot.token)
                slot.token = None
        with self._lock:
            for store in self._stores.values():
                with contextlib.suppress(Exception):  # closing is best effort at exit
                    store.close()
            self._stores.clear()
        self.metrics.leases.set(0)

    @staticmethod
    def _done_callback(slot: Slot) -> Callable[[Future[Any]], None]:
        def done(_: Future[Any]) -> None:
            slot.running = None

        return done

    def _renew_leases(self) -> None:
        held = 0
        for slot in self.slots.values():
            if slot.token is None:
                continue
            try:
                ok = self._leases(slot.config).renew(slot.pid, self.instance_id, slot.token, self.lease_ttl)
            except RebalanceError as exc:
                log(logger, logging.WARNING, "lease renewal failed", portfolio=slot.pid, error=str(exc))
                ok = False
            if ok:
                held += 1
            else:
                log(logger, logging.WARNING, "lease lost", portfolio=slot.pid, token=slot.token)
                slot.token = None
        self.metrics.leases.set(held)

    def _claim(self, slot: Slot, now: float) -> bool:
        """Hold the portfolio's lease for this cycle; when another instance holds it, check back soon so a
        dead holder is replaced within one TTL."""
        token = self._leases(slot.config).acquire(slot.pid, self.instance_id, self.lease_ttl)
        if token is None:
            slot.token = None
            slot.next_due = now + self.lease_ttl / 3
            return False
        if token != slot.token:
            slot.token = token
            ledger = self._store("ledger", slot.config)
            ledger.advance_fence(slot.pid, token)
            log(logger, logging.INFO, "lease acquired", portfolio=slot.pid, token=token, instance=self.instance_id)
        return True

    def _cycle(self, slot: Slot) -> None:
        from .executor import Executor

        config = slot.config
        now = self.clock()
        try:
            if not self._claim(slot, now):
                return
            ledger = self._store("ledger", config)
            due = self._next_from_store(ledger, slot, now)
            if due > now:
                slot.next_due = due
                return
            exchange = self._exchange(config)
            t0 = time.perf_counter()
            calls_before = dict(exchange.calls)
            try:
                with span("cycle", portfolio=slot.pid):
                    report = Executor(
                        config, exchange, ledger, self._store("audit", config), fence=slot.token, stop=self.stopping
                    ).run()
            finally:
                exchange.close()
            elapsed = time.perf_counter() - t0
            self._record(slot, report, exchange, calls_before, elapsed)
            self._mark_cycle(ledger, slot)
            slot.failures = 0
        except RebalanceError as exc:
            slot.failures += 1
            self.metrics.cycles.labels(slot.pid, "error").inc()
            log(logger, logging.ERROR, "cycle failed", portfolio=slot.pid, error=str(exc), exit_code=exc.exit_code)
        except Exception:  # one portfolio's bug must not stop the others
            slot.failures += 1
            self.metrics.cycles.labels(slot.pid, "bug").inc()
            logger.exception("cycle crashed", extra={"fields": {"portfolio": slot.pid}})
        finally:
            backoff = min(float(config.interval) * (2 ** min(slot.failures, 5)), 3600.0) if slot.failures else 0.0
            slot.next_due = max(slot.next_due, self.clock() + (backoff or float(config.interval)))

    # the last cycle's time is shared state: a successor instance keeps the schedule

    def _next_from_store(self, ledger: Any, slot: Slot, now: float) -> float:
        import json

        try:
            memory = json.loads(ledger.get_memory(f"{slot.pid}.daemon") or "{}")
        except ValueError:
            memory = {}
        last_wall = memory.get("last_cycle")
        if not last_wall:
            return now
        waited = time.time() - float(last_wall)
        return now + max(0.0, float(slot.config.interval) - waited)

    def _mark_cycle(self, ledger: Any, slot: Slot) -> None:
        import json

        ledger.set_memory(f"{slot.pid}.daemon", json.dumps({"last_cycle": time.time()}), fence=slot.token)
        slot.next_due = self.clock() + float(slot.config.interval)

    def _record(self, slot: Slot, report: Any, exchange: Any, before: dict[str, int], elapsed: float) -> None:
        m = self.metrics
        m.duration.labels(slot.pid).observe(elapsed)
        drift = report.drift_after if report.drift_after is not None else report.drift_before
        if drift is not None:
            m.drift.labels(slot.pid).set(float(drift))
        plan = report.plan
        if plan is not None:
            benefit = sum((a.drift_value for a in plan.assets if a.decision == "trade"), Decimal(0))
            m.cost_ratio.labels(slot.pid).set(float(plan.summary.est_total_cost / benefit) if benefit else 0.0)
        for o in report.outcomes:
            m.orders.labels(o.side, o.status).inc()
            if "shadow ledger refused" in o.reason:
                m.lock_failures.labels(slot.pid).inc()
        for endpoint, count in exchange.calls.items():
            delta = count - before.get(endpoint, 0)
            if delta:
                m.api_calls.labels(endpoint).inc(delta)
        breaker = getattr(exchange, "breaker", None)
        if breaker is not None:
            m.breaker.labels(exchange.id).set(breaker.state_value)
        limiter = getattr(exchange, "limiter", None)
        if limiter is not None:
            m.rate_limit_remaining.labels(exchange.id).set(limiter.remaining())
        m.cycles.labels(slot.pid, report.status).inc()
        slot.cycles += 1
        slot.last = {"status": report.status, "orders": len(report.outcomes), "seconds": round(elapsed, 4)}
        log(
            logger,
            logging.INFO,
            "cycle",
            portfolio=slot.pid,
            cycle=slot.cycles,
            status=report.status,
            orders=[f"{o.side} {o.amount} {o.market} {o.status}" for o in report.outcomes],
            decisions={a.symbol: a.reason for a in plan.assets} if plan else {},
            drift=str(drift),
            seconds=round(elapsed, 4),
        )

    # -- health --------------------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Ready when every store answers and the loop ticked recently."""
        detail: dict[str, Any] = {
            "instance": self.instance_id,
            "portfolios": len(self.slots),
            "leases": sum(1 for s in self.slots.values() if s.token is not None),
        }
        ok = self.clock() - self.last_tick < max(5.0, self.tick * 10) and not self.stopping.is_set()
        with self._lock:
            stores = list(self._stores.items())
        for (kind, _), store in stores:
            ping = getattr(store, "ping", None)
            if ping is None:
                continue
            try:
                ping()
            except RebalanceError as exc:
                ok = False
                detail[f"{kind}_error"] = str(exc)
        detail["loop_alive"] = ok
        return ok, detail


def run_daemon(
    paths: list[Path],
    *,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    instance_id: str | None = None,
    lease_ttl: float = 15.0,
    workers: int = 8,
    otlp_endpoint: str | None = None,
    max_seconds: float | None = None,
    on_ready: Callable[[Daemon, int | None], None] | None = None,
) -> int:
    """`rebalance daemon`: run until SIGTERM/SIGINT, then finish the order in flight and exit 0."""
    import signal

    from .telemetry import MetricsServer, configure_tracing

    daemon = Daemon(paths, instance_id=instance_id, lease_ttl=lease_ttl, workers=workers)
    configure_tracing(otlp_endpoint)
    server = None
    if metrics_port is not None:
        server = MetricsServer(daemon.metrics, daemon.health, host=metrics_host, port=metrics_port).start()

    def stop(signum: int, _frame: Any) -> None:
        log(logger, logging.INFO, "stopping", signal=signal.Signals(signum).name)
        daemon.stop()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    log(logger, logging.INFO, "daemon started", instance=daemon.instance_id, portfolios=sorted(daemon.slots),
        metrics_port=server.port if server else None)
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
