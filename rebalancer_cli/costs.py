"""What a correction costs, in quote currency: fees + spread + market impact, from real book depth.

Composed of small models so a backtest or a bench can swap one piece (e.g. top-of-book instead of a walk)
without touching the planner. Costs are per trade; nothing here accumulates across assets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Protocol

from .snapshot import Level, Market

ZERO = Decimal(0)
# Without `max_slippage`, a protected order's limit is the worst level its book walk reached, widened by this.
DEFAULT_PRICE_BOUND = Decimal("0.005")


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


def within_limit(levels: Sequence[Level], side: str, limit: Decimal | None) -> Sequence[Level]:
    """The levels an immediate-or-cancel limit order may take: asks at or below a buy's limit, bids at or above
    a sell's. Best-first levels make this a prefix."""
    if limit is None:
        return levels
    n = 0
    for price, _ in levels:
        if (price > limit) if side == "buy" else (price < limit):
            break
        n += 1
    return levels[:n]


def worst_level(levels: Sequence[Level], amount: Decimal) -> Decimal | None:
    """Price of the last level a walk of `amount` reaches (the deepest it goes), or None on an empty book."""
    remaining = amount
    last: Decimal | None = None
    for price, size in levels:
        last = price
        if size >= remaining:
            break
        remaining -= size
    return last


def worst_acceptable_price(
    market: Market, side: str, amount: Decimal, max_slippage: Decimal, price_step: Decimal | None = None
) -> Decimal:
    """The limit of a protected order: the worst book level the walk for `amount` reaches, widened by
    `max_slippage` (buy: x (1 + s), sell: x (1 - s)), then rounded to the market's tick towards the safe side
    (a buy's limit down, a sell's up), never past the level itself.

    A book that moved between snapshot and order fills less at this limit, never worse: the rest expires.
    """
    levels = market.asks if side == "buy" else market.bids
    level = worst_level(levels, amount)
    if level is None:
        raise ValueError(f"{market.symbol}: no {'asks' if side == 'buy' else 'bids'} to bound an order by")
    widened = level * (1 + max_slippage) if side == "buy" else level * (1 - max_slippage)
    step = price_step if price_step is not None and price_step > 0 else None
    if step is not None:
        q = (widened / step).to_integral_value(rounding=ROUND_FLOOR if side == "buy" else ROUND_CEILING) * step
        # rounding towards safety may not cross the level that was actually seen in the book
        widened = max(q, level) if side == "buy" else min(q, level)
    if widened <= 0:
        raise ValueError(f"{market.symbol}: max_slippage {max_slippage} leaves no positive sell limit")
    return widened


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
