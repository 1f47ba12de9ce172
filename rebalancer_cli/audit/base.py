"""The audit store contract, shared by the PostgreSQL and SQLite backends.

The audit trail is the write-ahead record of everything that touches money: an order intent is stored
before the order leaves, so that after a crash `open_orders` tells exactly which orders may be live on the
exchange. Both backends must behave identically (one contract test suite runs against each), so the
argument checks and the JSON and decimal conventions live here, not in the backends.
"""

from __future__ import annotations

import decimal
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import Enum, StrEnum
from importlib import resources
from typing import Any, Protocol, runtime_checkable

from rebalancer_cli.errors import InputError, StoreError
from rebalancer_cli.ledger.base import EXACT


class OrderStatus(StrEnum):
    """Life cycle of one order; `open_orders` returns every order not yet in a terminal state."""

    INTENT = "intent"
    LOCKED = "locked"
    SENT = "sent"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL: frozenset[OrderStatus] = frozenset({OrderStatus.FILLED, OrderStatus.REJECTED, OrderStatus.CANCELLED})

# Status of a plan between `record_plan` and `finish_plan`; a plan left in it was interrupted.
PLAN_STARTED = "started"

# Partitions exist for the current month and this many months ahead (PostgreSQL).
PARTITION_MONTHS_AHEAD = 3

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# avg_price is a quotient and may not terminate; it is informational (slippage reports), never booked.
_QUOTIENT = decimal.Context(prec=50, rounding=decimal.ROUND_HALF_EVEN, traps=[decimal.InvalidOperation])


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrderIntent:
    """An order as decided, stored before it is sent; `key` doubles as the exchange's client order id."""

    key: str
    portfolio_id: str
    plan_id: str
    market: str
    side: str
    amount: Decimal
    est_price: Decimal
    created_at: datetime

    def __post_init__(self) -> None:
        parse_order_key(self.key)
        check_text(self.portfolio_id, "portfolio_id")
        check_text(self.plan_id, "plan_id")
        check_text(self.market, "market")
        if self.side not in ("buy", "sell"):
            raise InputError(f"order {self.key}: side must be 'buy' or 'sell', got {self.side!r}")
        check_decimal(self.amount, "amount", positive=True)
        check_decimal(self.est_price, "est_price", positive=True)
        to_utc(self.created_at, "created_at")


@dataclass(frozen=True)
class Fill:
    """One execution reported by the exchange; `fill_id` is the exchange's trade id."""

    key: str
    fill_id: str
    amount: Decimal
    price: Decimal
    fee: Decimal
    fee_currency: str
    at: datetime

    def __post_init__(self) -> None:
        parse_order_key(self.key)
        check_text(self.fill_id, "fill_id")
        check_decimal(self.amount, "fill amount", positive=True)
        check_decimal(self.price, "fill price", positive=True)
        check_decimal(self.fee, "fee")  # negative fees are maker rebates
        check_text(self.fee_currency, "fee_currency")
        to_utc(self.at, "fill time")


@dataclass(frozen=True)
class OrderRecord:
    """An order's intent, its latest status and the sums of its fills."""

    intent: OrderIntent
    status: OrderStatus
    exchange_order_id: str | None
    reason: str | None
    filled: Decimal
    avg_price: Decimal | None
    fees: dict[str, Decimal]
    updated_at: datetime


@dataclass(frozen=True)
class ExecutionRecord:
    """One plan as executed: what was planned, what got filled, what it cost (one `history` line)."""

    plan_id: str
    portfolio_id: str
    created_at: datetime
    status: str
    orders: int
    filled_orders: int
    turnover: Decimal
    fees: dict[str, Decimal]
    drift_before: Decimal | None
    drift_after: Decimal | None


# --- the contract -------------------------------------------------------------------------------


def checked_intents(intents: Sequence[OrderIntent]) -> Sequence[OrderIntent]:
    """`intents`, once each is known to be an OrderIntent (a store writes nothing of a batch with a stranger)."""
    for intent in intents:
        if not isinstance(intent, OrderIntent):
            raise InputError(f"record_intent needs an OrderIntent, got {type(intent).__name__}")
    return intents


@runtime_checkable
class AuditStore(Protocol):
    """Durable record of plans, orders, fills, fees and events; the trail an operator audits."""

    def migrate(self) -> list[str]:
        """Apply pending migrations; safe when two processes race; returns the names applied."""
        ...

    def check(self) -> None:
        """Raise StoreError when the schema is not at this version's level, before anything is written."""
        ...

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
        """Store a plan once; a repeated call for the same plan_id changes nothing. `finished`: the plan is over
        already, with that status (a hold-only plan: one write instead of a record and a finish)."""
        ...

    def finish_plan(self, plan_id: str, status: str, drift_after: Decimal | None, at: datetime) -> None: ...

    def record_intent(self, intent: OrderIntent) -> bool:
        """Write-ahead: False (and no change) when the key is already known, so a retry never doubles."""
        ...

    def deferred(self) -> AbstractContextManager[None]:
        """A scope for the write-behind's writes (never an intent): a store may commit them without waiting
        for the disk, as they can be derived again from the exchange (PostgreSQL: `synchronous_commit` off)."""
        ...

    def sending(self) -> AbstractContextManager[None]:
        """A scope in which orders are leaving and every millisecond counts: a store that writes in the
        background holds those writes until it ends (or for a bounded time), so they do not compete with the
        sends; a store that writes straight through has nothing to hold."""
        ...

    def record_intents(self, intents: Sequence[OrderIntent]) -> list[bool]:
        """`record_intent` of each, in one transaction (one round trip for a group of orders that leave
        together): all are written or none, and each answer says whether that key was new."""
        ...

    def update_order(
        self,
        key: str,
        status: OrderStatus,
        *,
        at: datetime,
        exchange_order_id: str | None = None,
        reason: str | None = None,
    ) -> bool:
        """Move an order to `status`; False when ignored as stale (a terminal order is never reopened)."""
        ...

    def record_fill(self, fill: Fill) -> bool:
        """Store a fill once per (key, fill_id); False for a fill reported again."""
        ...

    def record_event(self, portfolio_id: str, kind: str, detail: Mapping[str, Any], at: datetime) -> None: ...

    def order(self, key: str) -> OrderRecord | None: ...

    def open_orders(self, portfolio_id: str) -> list[OrderRecord]:
        """Orders not in a terminal state, oldest first: what crash recovery must look up."""
        ...

    def recent_orders(self, portfolio_id: str, limit: int = 50) -> list[OrderRecord]:
        """The newest orders in any status, newest first (reconciliation)."""
        ...

    def history(self, portfolio_id: str, limit: int = 20) -> list[ExecutionRecord]:
        """Executions, newest first."""
        ...

    def fees_since(self, portfolio_id: str, since: datetime) -> dict[str, Decimal]: ...

    def events(
        self, portfolio_id: str, limit: int = 100, kinds: Sequence[str] | None = None
    ) -> list[tuple[datetime, str, dict[str, Any]]]:
        """Events, newest first; only those of `kinds` when given."""
        ...

    def plan(self, plan_id: str) -> dict[str, Any] | None:
        """The plan as recorded (decimals as JSON strings), or None."""
        ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


# --- argument checks shared by the backends, so that both refuse exactly the same inputs ----------


def parse_order_key(key: str) -> uuid.UUID:
    """The key must be a canonical UUIDv7: its first 48 bits date it, which places the order's partition.

    Only the canonical (lowercase, hyphenated) spelling is accepted because the key is also the exchange's
    client order id, and two spellings of one UUID would be two different ids there.
    """
    if not isinstance(key, str):
        raise InputError(f"order key must be a string, got {type(key).__name__}")
    try:
        parsed = uuid.UUID(key)
    except ValueError:
        raise InputError(f"order key {key!r} is not a UUID") from None
    if parsed.version != 7 or parsed.variant != uuid.RFC_4122:
        raise InputError(f"order key {key} is not a UUIDv7 (version {parsed.version})")
    if str(parsed) != key:
        raise InputError(f"order key {key!r} is not in canonical form ({parsed})")
    try:
        key_time(parsed)
    except OverflowError:
        raise InputError(f"order key {key} carries a timestamp beyond year 9999") from None
    return parsed


def key_time(key: uuid.UUID) -> datetime:
    """The unix-millisecond timestamp in a UUIDv7's first 48 bits, as the database computes it too."""
    return _EPOCH + timedelta(milliseconds=key.int >> 80)


def to_utc(value: datetime, what: str) -> datetime:
    """Naive datetimes are refused: guessing their zone would misplace records by hours."""
    if not isinstance(value, datetime):
        raise InputError(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InputError(f"{what} must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value.astimezone(UTC)


def check_decimal(value: Decimal, what: str, *, positive: bool = False) -> Decimal:
    """Floats are refused: a binary float is never the amount the exchange reported."""
    if isinstance(value, bool) or not isinstance(value, Decimal):
        raise InputError(f"{what} must be a Decimal, not {type(value).__name__}")
    if not value.is_finite():
        raise InputError(f"{what} must be finite, got {value}")
    if positive and value <= 0:
        raise InputError(f"{what} must be positive, got {value}")
    return value


def check_text(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{what} must be a non-empty string")
    if "\x00" in value:
        raise InputError(f"{what} must not contain NUL characters")
    return value


def check_status(status: OrderStatus | str) -> OrderStatus:
    try:
        return OrderStatus(status)
    except ValueError:
        raise InputError(f"unknown order status {status!r}") from None


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InputError(f"limit must be a non-negative integer, got {limit!r}")
    return limit


# --- JSON: decimals stay exact by travelling as strings -------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return to_utc(value, "datetime in JSON").isoformat() if value.tzinfo else value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dump_json(value: Mapping[str, Any], what: str) -> str:
    if not isinstance(value, Mapping):
        raise InputError(f"{what} must be a mapping, got {type(value).__name__}")
    try:
        return json.dumps(dict(value), default=_json_default, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} cannot be stored as JSON: {exc}") from exc


def load_json(text: str) -> dict[str, Any]:
    loaded = json.loads(text)
    if not isinstance(loaded, dict):
        raise StoreError(f"audit store returned a non-object JSON value: {text[:80]}")
    return loaded


# --- exact aggregates ---------------------------------------------------------------------------


def exact_sum(values: Iterable[Decimal]) -> Decimal:
    """Sum in the exact context: Decimal's default 28 digits would round 18-decimal amounts above 1e10."""
    total = Decimal(0)
    for value in values:
        total = EXACT.add(total, value)
    return total


def exact_mul(a: Decimal, b: Decimal) -> Decimal:
    return EXACT.multiply(a, b)


def average_price(notional: Decimal, filled: Decimal) -> Decimal | None:
    """Volume-weighted price; the same rounding in both backends so that their records compare equal."""
    if filled == 0:
        return None
    return _QUOTIENT.divide(notional, filled)


# --- migrations -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    name: str
    version: int
    sql: str


_MIGRATION_FILE = re.compile(r"^(?P<version>\d{4})_(?P<slug>[a-z0-9_]+)\.(?P<backend>postgres|sqlite)\.sql$")


def migrations(backend: str) -> list[Migration]:
    """The backend's migrations in order, read as package data so that an installed wheel carries them."""
    found: list[Migration] = []
    for entry in (resources.files("rebalancer_cli.audit") / "migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match is None or match["backend"] != backend:
            continue
        version = int(match["version"])
        found.append(Migration(f"{match['version']}_{match['slug']}", version, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise StoreError(f"audit migrations for {backend} are not numbered 1..n: {versions}")
    return found


def schema_behind(current: int, expected: int) -> StoreError:
    return StoreError(f"audit schema at version {current}, expected {expected}: run `rebalance db migrate`")


def schema_ahead(current: int, expected: int) -> StoreError:
    return StoreError(
        f"audit schema at version {current}, newer than this rebalance knows ({expected}): upgrade rebalance"
    )


def check_version(current: int, expected: int) -> None:
    if current < expected:
        raise schema_behind(current, expected)
    if current > expected:
        raise schema_ahead(current, expected)
