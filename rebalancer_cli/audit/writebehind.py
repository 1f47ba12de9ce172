"""Write-behind for the audit trail: only what crash safety needs is written before an order leaves.

The order intent must be durable before the order is sent: after a crash it is what tells the next run to look
the order up. Everything else (status changes, fills, events, the plan's outcome) can be derived again from the
exchange by that lookup, so it is written by a background thread while the cycle goes on. Reads first wait for
the queue to drain, so a caller always sees its own writes. A failed background write is raised
at the next call instead of being lost silently.

One queue serves a whole daemon; its errors are kept per portfolio. `scoped(portfolio_id)` gives a view whose
writes are tagged with the portfolio: a failed write is raised only in that portfolio's next call, and only that
portfolio's later deferred writes are skipped until then (they could depend on the failed one). The unscoped
object is one more scope of its own (what `execute` and the CLI use).
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from decimal import Decimal
from typing import Any

from ..errors import StoreError
from .base import AuditStore, ExecutionRecord, Fill, OrderIntent, OrderRecord, OrderStatus

_STOP = object()
#: The longest `sending` holds the background writes back. A cycle's sends take milliseconds; with many
#: portfolios sending in turn the holds could chain forever, and a queue held that long would fill and block
#: the very senders that hold it: after this the writes go on, held or not.
HOLD_SECONDS = 0.25


class WriteBehindAudit:
    def __init__(self, store: AuditStore, *, max_pending: int = 10_000) -> None:
        self.store = store
        self._scope: str | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        # failed background writes by scope, until raised there; shared by every scoped view
        self._errors: dict[str | None, BaseException] = {}
        self._errors_lock = threading.Lock()
        # `sending` scopes open (shared by every scoped view), and `flush` calls waiting, which lift any hold
        self._holds = _Holds()
        self._thread = threading.Thread(target=self._drain, name="audit-writer", daemon=True)
        self._thread.start()

    def scoped(self, portfolio_id: str) -> WriteBehindAudit:
        """A view on the same queue and store whose failed writes are raised only in its own calls."""
        view = copy.copy(self)
        view._scope = portfolio_id
        return view

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            self._holds.wait_released(HOLD_SECONDS)
            try:
                if item is _STOP:
                    return
                scope, fn, args, kwargs = item
                with self._errors_lock:
                    failed = scope in self._errors
                if not failed:
                    try:
                        with self.store.deferred():
                            fn(*args, **kwargs)
                    except BaseException as exc:  # surfaced to the scope's caller at its next call
                        with self._errors_lock:
                            self._errors[scope] = exc
            finally:
                self._queue.task_done()

    def _defer(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._raise_pending()
        self._queue.put((self._scope, fn, args, kwargs))

    def _raise_pending(self) -> None:
        with self._errors_lock:
            error = self._errors.pop(self._scope, None)
        if error is not None:
            if isinstance(error, StoreError):
                raise error
            raise StoreError(f"audit write failed in the background: {type(error).__name__}: {error}") from error

    def flush(self) -> None:
        with self._holds.lifted():
            self._queue.join()
        self._raise_pending()

    def sending(self) -> AbstractContextManager[None]:
        return self._holds.held()

    # -- deferred writes ------------------------------------------------------------------------------

    def record_plan(
        self,
        plan_id: str,
        portfolio_id: str,
        created_at: datetime,
        plan: Mapping[str, Any],
        drift_before: Decimal,
        *,
        finished: str | None = None,
    ) -> None:
        self._defer(self.store.record_plan, plan_id, portfolio_id, created_at, plan, drift_before, finished=finished)

    def finish_plan(self, plan_id: str, status: str, drift_after: Decimal | None, at: datetime) -> None:
        self._defer(self.store.finish_plan, plan_id, status, drift_after, at)

    def update_order(
        self,
        key: str,
        status: OrderStatus,
        *,
        at: datetime,
        exchange_order_id: str | None = None,
        reason: str | None = None,
    ) -> bool:
        self._defer(self.store.update_order, key, status, at=at, exchange_order_id=exchange_order_id, reason=reason)
        return True

    def record_fill(self, fill: Fill) -> bool:
        self._defer(self.store.record_fill, fill)
        return True

    def record_event(self, portfolio_id: str, kind: str, detail: Mapping[str, Any], at: datetime) -> None:
        self._defer(self.store.record_event, portfolio_id, kind, detail, at)

    # -- synchronous: the intent, and every read -----------------------------------------------------------

    def record_intent(self, intent: OrderIntent) -> bool:
        # straight through without draining the queue: an intent is the first write of its key, and what is
        # queued concerns other keys (or the plan row, which nothing references)
        self._raise_pending()
        return self.store.record_intent(intent)

    def record_intents(self, intents: Sequence[OrderIntent]) -> list[bool]:
        self._raise_pending()
        return self.store.record_intents(intents)

    def order(self, key: str) -> OrderRecord | None:
        self.flush()
        return self.store.order(key)

    def open_orders(self, portfolio_id: str) -> list[OrderRecord]:
        self.flush()
        return self.store.open_orders(portfolio_id)

    def recent_orders(self, portfolio_id: str, limit: int = 50) -> list[OrderRecord]:
        self.flush()
        return self.store.recent_orders(portfolio_id, limit)

    def history(self, portfolio_id: str, limit: int = 20) -> list[ExecutionRecord]:
        self.flush()
        return self.store.history(portfolio_id, limit)

    def fees_since(self, portfolio_id: str, since: datetime) -> dict[str, Decimal]:
        self.flush()
        return self.store.fees_since(portfolio_id, since)

    def events(
        self, portfolio_id: str, limit: int = 100, kinds: Sequence[str] | None = None
    ) -> list[tuple[datetime, str, dict[str, Any]]]:
        self.flush()
        return self.store.events(portfolio_id, limit, kinds)

    def plan(self, plan_id: str) -> dict[str, Any] | None:
        self.flush()
        return self.store.plan(plan_id)

    def migrate(self) -> list[str]:
        self.flush()
        return self.store.migrate()

    def deferred(self) -> AbstractContextManager[None]:
        return self.store.deferred()

    def check(self) -> None:
        self.store.check()

    def ping(self) -> None:
        self._raise_pending()
        self.store.ping()

    def close(self) -> None:
        """Flush; the unscoped owner also stops the writer and closes the store (a scoped view only flushes)."""
        if self._scope is not None:
            self.flush()
            return
        try:
            self.flush()
        finally:
            self._queue.put(_STOP)
            self._thread.join(timeout=10)
            self.store.close()


class _Holds:
    """When the writer may write: not while a `sending` scope is open, unless a `flush` waits for it, or the
    hold has lasted `HOLD_SECONDS`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = 0
        self._lifted = 0
        self._since = 0.0  # when the holds open now began (the first of them)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._cond:
            if not self._held:
                self._since = time.monotonic()
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def lifted(self) -> Iterator[None]:
        with self._cond:
            self._lifted += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._lifted -= 1

    def wait_released(self, longest: float) -> None:
        """Until no hold is open or one is lifted, and no longer than `longest` after the holds began (however
        many followed one another since)."""
        with self._cond:
            while self._held and not self._lifted:
                left = self._since + longest - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)
