"""The exchange protocol: the one surface through which snapshots are read and orders leave.

Two real implementations: `paper` (embedded, fills against a snapshot's books) and `ccxt` (any exchange
ccxt supports). Both speak in Decimals and the project's own errors, so the executor cannot tell them apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Literal, Protocol

from ..config import Config
from ..planner import PlannerState
from ..snapshot import Snapshot

ZERO = Decimal(0)


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"


# How an exchange takes a protected order: an immediate-or-cancel limit at the worst acceptable price (a moved
# book fills less, never worse), or, where a venue offers no IOC, a market order whose fills are checked after.
Protection = Literal["ioc_limit", "market"]


@dataclass(frozen=True, slots=True)
class FillInfo:
    """One execution of an order, as the exchange reported it."""

    trade_id: str
    amount: Decimal
    price: Decimal
    fee: Decimal
    fee_currency: str
    at: datetime


def fees_by_currency(fills: Iterable[FillInfo], default_currency: str = "") -> dict[str, Decimal]:
    """Fees of fills summed per currency (a fill without a currency counts in `default_currency`)."""
    fees: dict[str, Decimal] = {}
    for f in fills:
        currency = f.fee_currency or default_currency
        fees[currency] = fees.get(currency, ZERO) + f.fee
    return fees


@dataclass(frozen=True, slots=True)
class OrderResult:
    """An order as the exchange knows it; `fills` may be empty when the exchange does not list them."""

    client_order_id: str
    exchange_order_id: str | None
    market: str
    side: str
    status: str  # open | closed | canceled | rejected | expired
    amount: Decimal
    filled: Decimal
    average: Decimal | None
    cost: Decimal  # quote value of what filled
    fees: Mapping[str, Decimal] = field(default_factory=dict)
    fills: tuple[FillInfo, ...] = ()

    @property
    def is_final(self) -> bool:
        return self.status in ("closed", "canceled", "rejected", "expired")


class Exchange(Protocol):
    id: str
    settle_window: float  # seconds after which an order the exchange does not know can no longer appear
    calls: Counter[str]  # API calls by endpoint, for telemetry and benchmarks

    def fetch_snapshot(
        self, config: Config, state: PlannerState | None = None, *, full_books: bool = False
    ) -> Snapshot:
        """One consistent picture for the portfolio: balances, top of book for all its markets, full books
        only where the planner's cheap screen says a trade is possible (every market with `full_books`, for a
        snapshot saved to replay decisions)."""
        ...

    def fetch_balances(self) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
        """(free, locked) per asset."""
        ...

    protection: Protection  # how `create_order` bounds the price it fills at

    def create_order(
        self,
        market: str,
        side: Side,
        amount: Decimal,
        client_order_id: str,
        *,
        worst_price: Decimal,
        before_send: Callable[[], None] | None = None,
    ) -> OrderResult:
        """Buy or sell `amount` base units, never at a price worse than `worst_price` where the exchange offers
        immediate-or-cancel limit orders (`protection == "ioc_limit"`); the unfilled rest expires.

        `before_send` runs once the request may leave (after any rate-limit wait), right before it does; if it
        raises, nothing is sent."""
        ...

    def fetch_order(self, market: str, client_order_id: str) -> OrderResult | None:
        """The order with this client order id, or None when the exchange does not know it."""
        ...

    def cancel_order(self, market: str, client_order_id: str) -> None: ...

    def batch(self, requests: int) -> AbstractContextManager[None]:
        """The next `requests` requests are sent side by side (one endpoint): where a grant of the request
        budget costs a round trip, they take theirs in one."""
        ...

    def close(self) -> None: ...
