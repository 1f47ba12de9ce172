"""Metrics and health: what each cycle reports to /metrics and the logs, and /healthz."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import RebalanceError
from ..telemetry import log
from .cycle import CycleResult, _store_key
from .scheduling import WorkerProcesses
from .state import DaemonState, Slot

if TYPE_CHECKING:
    pass

logger = logging.getLogger("rebalance")
T = TypeVar("T")


class Reporting(DaemonState):
    """Metrics, logs and health of the daemon and its portfolios."""

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
