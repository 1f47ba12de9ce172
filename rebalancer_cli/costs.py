"""What a correction costs, in quote currency: fees + spread + market impact, from real book depth.

Composed of small models so a backtest or a bench can swap one piece (e.g. top-of-book instead of a walk)
without touching the planner. Costs are per trade; nothing here accumulates across assets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from .snapshot import Level, Market

ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class BookWalk:
    """The result of taking `filled` base units from one side of a book."""

    requested: Decimal
    filled: Decimal
    notional: Decimal  # quote value paid or received for `filled`
    capped: bool  # the visible book held less than requested

    @property
    def vwap(self) -> Decimal | None:
        return self.notional / self.filled if self.filled else None


def walk_book(levels: Sequence[Level], amount: Decimal) -> BookWalk:
    """Take `amount` from best-first levels; stops at the book's depth rather than inventing liquidity."""
    remaining = amount
    notional = ZERO
    for price, size in levels:
        if size >= remaining:
            notional += price * remaining
            remaining = ZERO
            break
        notional += price * size
        remaining -= size
    return BookWalk(requested=amount, filled=amount - remaining, notional=notional, capped=remaining > 0)


def book_depth(levels: Sequence[Level]) -> Decimal:
    return sum((size for _, size in levels), ZERO)


@dataclass(frozen=True, slots=True)
class CostEstimate:
    side: str
    amount: Decimal  # base units that would fill (capped at visible depth)
    notional: Decimal
    est_price: Decimal  # VWAP
    fee: Decimal
    slippage: Decimal  # |VWAP - mid| * amount: spread + market impact
    capped: bool

    @property
    def total(self) -> Decimal:
        return self.fee + self.slippage


class FeeModel(Protocol):
    def fee(self, market: Market, notional: Decimal) -> Decimal: ...


class SlippageModel(Protocol):
    def walk(self, market: Market, side: str, amount: Decimal) -> BookWalk: ...


@dataclass(frozen=True, slots=True)
class TakerFee:
    """Market orders pay the taker fee on their notional."""

    def fee(self, market: Market, notional: Decimal) -> Decimal:
        return market.taker_fee * notional


@dataclass(frozen=True, slots=True)
class BookWalkSlippage:
    """Walks the side the order takes: asks for a buy, bids for a sell."""

    def walk(self, market: Market, side: str, amount: Decimal) -> BookWalk:
        return walk_book(market.asks if side == "buy" else market.bids, amount)


@dataclass(frozen=True, slots=True)
class TopOfBookSlippage:
    """Prices everything at the best level with unlimited depth: the spread only, no market impact.

    Underestimates large orders; kept as the baseline that shows what the book walk adds (bench, backtests).
    """

    def walk(self, market: Market, side: str, amount: Decimal) -> BookWalk:
        price = market.asks[0][0] if side == "buy" else market.bids[0][0]
        return BookWalk(requested=amount, filled=amount, notional=price * amount, capped=False)


@dataclass(frozen=True, slots=True)
class CostModel:
    fees: FeeModel = TakerFee()
    slippage: SlippageModel = BookWalkSlippage()

    def estimate(self, market: Market, side: str, amount: Decimal) -> CostEstimate:
        walk = self.slippage.walk(market, side, amount)
        if not walk.filled:
            return CostEstimate(side, ZERO, ZERO, ZERO, ZERO, ZERO, capped=walk.capped)
        vwap = walk.notional / walk.filled
        slippage = abs(vwap - market.mid) * walk.filled
        return CostEstimate(
            side=side,
            amount=walk.filled,
            notional=walk.notional,
            est_price=vwap,
            fee=self.fees.fee(market, walk.notional),
            slippage=slippage,
            capped=walk.capped,
        )
