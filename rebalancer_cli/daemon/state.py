"""What every part of the daemon reads: the portfolios it tracks (`Slot`) and the attributes and methods its parts
share, declared once with their types (`DaemonState`); `core.Daemon` composes the parts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import Config
from ..leases import LeaseStore
from ..telemetry import Metrics

if TYPE_CHECKING:
    from .cycle import CycleResult, CycleRunner
    from .scheduling import CycleThreads, WorkerProcesses

logger = logging.getLogger("rebalance")
T = TypeVar("T")


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


class DaemonState:
    """The daemon's shared state, typed; each part (config watching, lease balancing, scheduling, reporting)
    is a mixin over it, and the methods one part calls in another are declared here."""

    paths: list[Path]
    instance_id: str
    lease_ttl: float
    lease_period: float
    join_delay: float
    metrics: Metrics
    clock: Callable[[], float]
    tick: float
    stopping: threading.Event
    runner: CycleRunner
    slots: dict[str, Slot]
    pool: CycleThreads | WorkerProcesses
    live_instances: dict[str, int]
    last_tick: float
    _rejected: dict[Path, float]  # new config files refused, by the version refused
    _listing_marks: list[float | None]
    _reload_cursor: int

    def _let_go(self, slot: Slot, why: str) -> None:
        raise NotImplementedError

    def _let_go_many(self, slots: list[Slot], why: str) -> None:
        raise NotImplementedError

    def _forget_gauges(self, pid: str) -> None:
        raise NotImplementedError

    def _by_lease_store(self, slots: list[Slot]) -> dict[tuple[str, str], list[Slot]]:
        raise NotImplementedError

    def _renew(self, store: LeaseStore, slots: list[Slot]) -> None:
        raise NotImplementedError

    def _leases(self, config: Config) -> LeaseStore:
        raise NotImplementedError

    def _store(self, kind: str, config: Config) -> Any:
        raise NotImplementedError

    def _submit(self, slot: Slot, token: int) -> None:
        raise NotImplementedError

    def _record(self, slot: Slot, r: CycleResult, late: float | None) -> None:
        raise NotImplementedError

    def _record_exchange(self, r: CycleResult) -> None:
        raise NotImplementedError

    @staticmethod
    def _guarded(step: Callable[[], None]) -> None:
        """A bug in one step of the loop is logged, not fatal: the portfolios already held keep running."""
        try:
            step()
        except Exception:
            logger.exception("daemon loop step failed")
