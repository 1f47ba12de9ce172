"""The daemon: many portfolios, continuously, on one or several instances.

Each portfolio runs on its own interval in a worker pool, so one slow or failing portfolio never delays the
others. Instances share the work through leases (`leases.py`): the main loop heartbeats, renews the leases it
holds and claims its fair share of the rest (portfolios over live instances), so a second instance started
beside a first one takes half the work, and a dead instance's portfolios are claimed once its leases expire.
A portfolio is worked only while this instance holds its lease, and the lease's fencing token guards every
ledger write. The time of each portfolio's last cycle is kept in the store too, so a portfolio taken over from
another instance keeps its schedule instead of running twice. Every cycle goes through `executor.Executor.run`,
the same path as `rebalance execute`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

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
logger = logging.getLogger("rebalance")


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
                f
                for f in p.iterdir()
                if f.suffix in CONFIG_SUFFIXES and (f in known or (f.is_file() and not _is_snapshot(f)))
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
        join_delay: float | None = None,
    ) -> None:
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
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cycle")
        self.slots: dict[str, Slot] = {}
        self._stores: dict[tuple[str, str], Any] = {}
        self._limiters: dict[str, Any] = {}
        self._breakers: dict[str, Any] = {}
        self._idle_clients: dict[str, list[tuple[float, Any]]] = {}
        self._rejected: dict[Path, float] = {}  # new config files refused, by the version refused
        self._lock = threading.Lock()
        self.last_tick = clock()
        self.live_instances: dict[str, int] = {}
        self._load_all()

    # -- configs ----------------------------------------------------------------------------------------

    def _new_slot(self, path: Path, config: Config) -> Slot:
        _register_secrets(config)
        # rendezvous order: each instance prefers different portfolios, so racing claims rarely collide
        rank = hashlib.sha256(f"{self.instance_id}|{config.portfolio_id}".encode()).hexdigest()
        self.metrics.lock_failures.labels(config.portfolio_id)  # the series exists at 0 before any failure
        return Slot(path, config, path.stat().st_mtime, rank=rank)

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
        for slot in list(self.slots.values()):
            try:
                mtime = slot.path.stat().st_mtime
            except OSError:
                self._drop(slot)
                continue
            if mtime != slot.mtime:
                slot.mtime = mtime
                self._reload(slot)
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

    # -- stores, shared per URL --------------------------------------------------------------------------

    def _store_key(self, kind: str, config: Config) -> tuple[str, str]:
        url = config.redis_url if kind in ("ledger", "leases") else config.database_url
        return (kind, f"{url or ''}|{config.resolved_state_dir()}")

    def _store(self, kind: str, config: Config) -> Any:
        key = self._store_key(kind, config)
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

    @contextlib.contextmanager
    def _exchange(self, config: Config) -> Iterator[Any]:
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

        key = json.dumps([config.exchange.model_dump(mode="json"), str(config.resolved_state_dir())], sort_keys=True)
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
            limiter, breaker = self._shared_guards(config)
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

    def _shared_guards(self, config: Config) -> tuple[Any, Any]:
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
                    per_minute, client=client, key=rate_limit_key(ex.id, digest) if client else None, max_cost=50.0
                )
                gauge = self.metrics.breaker.labels(ex.id)
                gauge.set(0)

                def on_change(_old: BreakerState, new: BreakerState) -> None:
                    from .exchange.breaker import STATE_VALUES

                    gauge.set(STATE_VALUES[new])
                    log(logger, logging.WARNING, "circuit breaker", exchange=ex.id, state=str(new))

                self._breakers[account] = CircuitBreaker(
                    ex.id, failure_threshold=5, reset_timeout=30.0, on_state_change=on_change
                )
            return self._limiters[account], self._breakers[account]

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
                        slot.running = self.pool.submit(self._cycle, slot, slot.token)
                        slot.running.add_done_callback(self._done_callback(slot))
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

    def shutdown(self, timeout: float = 9.0) -> None:
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
        for slot in list(self.slots.values()):
            if slot in still:
                # still writing after the deadline: its lease expires on its own, and fencing stops a successor
                # from being overwritten; releasing it now would let the successor start beside it
                log(logger, logging.WARNING, "cycle still running at exit; lease left to expire", portfolio=slot.pid)
                continue
            self._let_go(slot, "stopping")
        with self._lock:
            stores = list(self._stores.items())
        for (kind, _), store in stores:
            if kind == "leases":
                with contextlib.suppress(RebalanceError):  # the heartbeat expires on its own anyway
                    store.leave(self.instance_id)
        with self._lock:
            idle = [c for clients in self._idle_clients.values() for _, c in clients]
            self._idle_clients.clear()
        for client in idle:
            with contextlib.suppress(Exception):  # closing is best effort at exit
                client.close()
        if still:
            return  # the stores stay open under the cycles still running; the process exit closes them
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

    def _forget_gauges(self, pid: str) -> None:
        for gauge in (self.metrics.drift, self.metrics.cost_ratio):
            with contextlib.suppress(KeyError):
                gauge.remove(pid)

    def _by_lease_store(self, slots: list[Slot]) -> dict[tuple[str, str], list[Slot]]:
        groups: dict[tuple[str, str], list[Slot]] = {}
        for slot in slots:
            groups.setdefault(self._store_key("leases", slot.config), []).append(slot)
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
        for slot in slots:
            token = slot.token
            if token is None:
                continue
            try:
                ok = store.renew(slot.pid, self.instance_id, token, self.lease_ttl)
            except RebalanceError as exc:
                # unknown: keep working under the lease; fencing refuses our writes if it really was lost
                log(logger, logging.WARNING, "lease renewal failed", portfolio=slot.pid, error=str(exc))
                continue
            if not ok:
                log(logger, logging.WARNING, "lease lost", portfolio=slot.pid, token=token)
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
        for slot in sorted((s for s in slots if s.token is None and s.running is None), key=lambda s: s.rank):
            if self.stopping.is_set():
                return
            surplus = False
            try:
                if count >= fair:
                    # at our share: take a portfolio only once it stayed free for a whole TTL, i.e. no other
                    # instance wants it (their configs differ from ours)
                    if store.holder(slot.pid) is not None:
                        slot.free_since = None
                        continue
                    if slot.free_since is None:
                        slot.free_since = now
                    if now - slot.free_since < self.lease_ttl:
                        continue
                    surplus = True
                token = store.acquire(slot.pid, self.instance_id, self.lease_ttl)
            except RebalanceError as exc:
                log(logger, logging.WARNING, "lease claim failed", portfolio=slot.pid, error=str(exc))
                continue
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
            count += 1
            log(logger, logging.INFO, "lease acquired", portfolio=slot.pid, token=token, instance=self.instance_id)

    # -- one cycle -------------------------------------------------------------------------------------------

    def _cycle(self, slot: Slot, token: int) -> None:
        if self.stopping.is_set():
            return
        from .executor import Executor

        config = slot.config
        now = self.clock()
        scheduled: float | None = None
        slot.cycles += 1
        try:
            ledger = self._store("ledger", config)
            due = self._next_from_store(ledger, slot, now)
            if due > now:
                # another instance ran it recently (a takeover): keep its schedule
                scheduled = due
                slot.cycles -= 1
                return
            audit = self._store("audit", config)
            t0 = time.perf_counter()
            with self._exchange(config) as exchange:
                before = dict(exchange.calls)
                try:
                    with span("cycle", portfolio=slot.pid, cycle=slot.cycles):
                        report = Executor(config, exchange, ledger, audit, fence=token, stop=self.stopping).run()
                finally:
                    elapsed = time.perf_counter() - t0
                    self._record_exchange(exchange, before)
            self._record(slot, report, elapsed)
            self._mark_cycle(ledger, slot, token)
            slot.failures = 0
        except HaltedError as exc:
            # the operator's decision, not a failure: checked again every interval, no backoff
            self.metrics.cycles.labels(slot.pid, "halted").inc()
            log(logger, logging.WARNING, "portfolio halted", portfolio=slot.pid, cycle=slot.cycles,
                decision="halted", orders=[], error=str(exc))  # fmt: skip
        except LeaseLostError as exc:
            # a successor holds the portfolio now; it carries on, with nothing of ours written after its fence
            self.metrics.lock_failures.labels(slot.pid).inc()
            self.metrics.cycles.labels(slot.pid, "fenced").inc()
            if slot.token == token:
                slot.token = None
                self._forget_gauges(slot.pid)
            log(logger, logging.WARNING, "lease lost during a cycle; writes fenced off", portfolio=slot.pid,
                cycle=slot.cycles, decision="fenced", orders=[], error=str(exc))  # fmt: skip
        except RebalanceError as exc:
            slot.failures += 1
            self.metrics.cycles.labels(slot.pid, "error").inc()
            log(logger, logging.ERROR, "cycle failed", portfolio=slot.pid, cycle=slot.cycles, decision="error",
                orders=[], error=str(exc), exit_code=exc.exit_code)  # fmt: skip
        except Exception:  # one portfolio's bug must not stop the others
            slot.failures += 1
            self.metrics.cycles.labels(slot.pid, "bug").inc()
            logger.exception(
                "cycle crashed",
                extra={"fields": {"portfolio": slot.pid, "cycle": slot.cycles, "decision": "error", "orders": []}},
            )
        finally:
            if scheduled is not None:
                slot.next_due = scheduled
            else:
                interval = float(config.interval)
                delay = interval
                if slot.failures:
                    delay = min(interval * 2 ** min(slot.failures, 5), max(interval, MAX_BACKOFF_SECONDS))
                slot.next_due = self.clock() + delay

    # the last cycle's time is shared state: a successor instance keeps the schedule

    @staticmethod
    def _schedule_key(pid: str) -> str:
        return f"{pid}.daemon"

    def _next_from_store(self, ledger: Any, slot: Slot, now: float) -> float:
        try:
            memory = json.loads(ledger.get_memory(self._schedule_key(slot.pid)) or "{}")
        except ValueError:
            memory = {}
        last_wall = memory.get("last_cycle") if isinstance(memory, dict) else None
        if not last_wall:
            return now
        interval = float(slot.config.interval)
        waited = time.time() - float(last_wall)  # negative when the last holder's clock ran ahead of ours
        return now + min(interval, max(0.0, interval - waited))

    def _mark_cycle(self, ledger: Any, slot: Slot, token: int) -> None:
        ledger.set_memory(self._schedule_key(slot.pid), json.dumps({"last_cycle": time.time()}), fence=token)

    # -- metrics and logs -----------------------------------------------------------------------------------

    def _record_exchange(self, exchange: Any, before: dict[str, int]) -> None:
        """API calls, breaker and rate-limit budget, also of a failed cycle (when they matter most)."""
        m = self.metrics
        for endpoint, count in exchange.calls.items():
            delta = count - before.get(endpoint, 0)
            if delta:
                m.api_calls.labels(endpoint).inc(delta)
        breaker = getattr(exchange, "breaker", None)
        if breaker is not None:
            m.breaker.labels(exchange.id).set(breaker.state_value)
        limiter = getattr(exchange, "limiter", None)
        if limiter is not None:
            with contextlib.suppress(RebalanceError):  # a shared bucket's store may be down: a gauge can wait
                m.rate_limit_remaining.labels(exchange.id).set(limiter.remaining())

    def _record(self, slot: Slot, report: Any, elapsed: float) -> None:
        m = self.metrics
        m.duration.labels(slot.pid).observe(elapsed)
        drift = report.drift_after if report.drift_after is not None else report.drift_before
        if drift is not None and slot.token is not None:
            m.drift.labels(slot.pid).set(float(drift))
        plan = report.plan
        if plan is not None and slot.token is not None:
            benefit = sum((a.drift_value for a in plan.assets if a.decision == "trade"), Decimal(0))
            m.cost_ratio.labels(slot.pid).set(float(plan.summary.est_total_cost / benefit) if benefit else 0.0)
        for o in report.outcomes:
            m.orders.labels(o.side, o.status).inc()
            if "shadow ledger refused" in o.reason:
                m.lock_failures.labels(slot.pid).inc()
        m.cycles.labels(slot.pid, report.status).inc()
        log(
            logger,
            logging.INFO,
            "cycle",
            portfolio=slot.pid,
            cycle=slot.cycles,
            decision="trade" if plan is not None and plan.trades else "hold",
            status=report.status,
            orders=[
                {
                    "market": o.market,
                    "side": o.side,
                    "amount": format(o.amount, "f"),
                    "status": o.status,
                    "filled": format(o.filled, "f"),
                    "idempotency_key": o.key,
                }
                for o in report.outcomes
            ],
            decisions={a.symbol: a.reason for a in plan.assets} if plan else {},
            drift=str(drift),
            seconds=round(elapsed, 4),
            instance=self.instance_id,
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
        alive = self.clock() - self.last_tick < max(5.0, self.tick * 10) and not self.stopping.is_set()
        detail["loop_alive"] = alive
        if self.stopping.is_set():
            return False, {**detail, "stopping": True}  # and never reopen a store shutdown just closed
        ok = alive
        checked: set[tuple[str, str]] = set()
        for slot in slots:
            for kind in ("leases", "ledger", "audit"):
                key = self._store_key(kind, slot.config)
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
