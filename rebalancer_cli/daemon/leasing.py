"""Lease balancing: this instance's fair share of the portfolios, renewed, claimed and handed back through the
lease store (`leases.py`), with every claim fenced in the ledger.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from typing import TYPE_CHECKING, Any, TypeVar

from .. import killswitch
from ..config import Config
from ..errors import RebalanceError
from ..leases import LeaseStore
from ..telemetry import log
from .state import DaemonState, Slot

if TYPE_CHECKING:
    pass

logger = logging.getLogger("rebalance")
T = TypeVar("T")


# Portfolios claimed per round trip to the lease store; every claim is then fenced in the ledger one by one.
CLAIM_CHUNK = 200


class LeaseBalancing(DaemonState):
    """Renews what it holds, claims its share of the rest, lets go of what it should not keep."""

    def _store(self, kind: str, config: Config) -> Any:
        return self.runner.store(kind, config)

    def _leases(self, config: Config) -> LeaseStore:
        return self.runner.leases(config)

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
                self.runner.ledger(slot.config).advance_fence(slot.pid, token)
                # a halt only the audit trail still knows is put back; a ledger that lost its state is refused
                killswitch.verify(self.runner.ledger(slot.config), self.runner.audit(slot.config), slot.pid)
            except RebalanceError as exc:
                log(logger, logging.ERROR, "portfolio not taken; lease handed back", portfolio=slot.pid, error=str(exc))
                with contextlib.suppress(RebalanceError):
                    store.release(slot.pid, self.instance_id, token)
                continue
            slot.token, slot.surplus, slot.free_since = token, surplus, None
            taken += 1
            log(logger, logging.INFO, "lease acquired", portfolio=slot.pid, token=token, instance=self.instance_id)
        return taken
