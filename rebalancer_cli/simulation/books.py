"""Synthetic order books and rolling volatility for replaying a price history.

A backtest has closes, not books, yet what a policy costs depends on the book: a small order pays the
half spread, a big one walks several levels. `BookModel` builds a book around each price so that the cost
model of `plan` walks it exactly as it walks a real one.

Shape: level k sits (half spread + k * level step) away from the mid and holds `depth_quote * (1 +
depth_growth * k)` of quote value. Depth growing linearly with distance makes the cumulative depth grow with
the square of the distance, so the price impact of an order grows with the square root of its size: the
empirical square-root law of market impact. Volatility widens the spread and the level spacing together, as
market makers quote wider when prices move fast.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal

from ..errors import InputError
from ..snapshot import Level, Market
from .series import PriceSeries

_BPS = Decimal("0.0001")
# volatility is rounded to this before it shapes a book, so that consecutive steps share cached shapes
_FACTOR_STEP = Decimal("0.01")
# the deepest bid stays at least this far above zero, whatever the volatility
_MAX_DEPTH_FRACTION = Decimal("0.5")
_SIGNIFICANT_DIGITS = 8
_CACHE_SIZE = 4096


_Book = tuple[tuple[Level, ...], tuple[Level, ...]]


@dataclass(frozen=True)
class _Shape:
    """Per widening factor: each level's distance from the mid (fraction) and quote depth."""

    offsets: tuple[tuple[int, int], ...]  # distance from the mid as a fraction (numerator, denominator)
    depths: tuple[tuple[int, int], ...]  # quote value held


@dataclass(frozen=True)
class BookModel:
    """Parameters of the synthetic book; all Decimal, as the books feed money arithmetic.

    `vol_widening`: spread and level spacing are multiplied by `1 + vol_widening * v`, where v is the daily
    volatility in percent (0.25 widens by 75% at 3% daily volatility). The multiplier is capped so that the
    deepest bid stays above half the mid.
    """

    spread_bps: Decimal = Decimal("2")
    levels: int = 20
    level_step_bps: Decimal = Decimal("2")
    depth_quote: Decimal = Decimal("50000")
    depth_growth: Decimal = Decimal("0.5")
    vol_widening: Decimal = Decimal("0.25")
    _shapes: dict[Decimal, _Shape] = field(default_factory=dict, init=False, repr=False, compare=False)
    _books: dict[tuple[Decimal, Decimal, Decimal], _Book] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        checks = (
            ("spread_bps", self.spread_bps, False),
            ("level_step_bps", self.level_step_bps, False),
            ("depth_quote", self.depth_quote, False),
            ("depth_growth", self.depth_growth, True),
            ("vol_widening", self.vol_widening, True),
        )
        for name, value, zero_ok in checks:
            if not isinstance(value, Decimal) or not value.is_finite():
                raise InputError(f"book model: {name} must be a finite Decimal (got {value!r})")
            if value < 0 or (value == 0 and not zero_ok):
                raise InputError(f"book model: {name} must be {'at least' if zero_ok else 'above'} 0 (got {value})")
        if not 1 <= self.levels <= 200:
            raise InputError(f"book model: levels must be 1 to 200 (got {self.levels})")
        if self._reach(Decimal(1)) > _MAX_DEPTH_FRACTION:
            raise InputError(
                "book model: half the spread plus (levels - 1) level steps must stay under 5000 bps "
                f"(got {self._reach(Decimal(1)) / _BPS} bps)"
            )

    def _reach(self, factor: Decimal) -> Decimal:
        """Distance of the deepest level from the mid, as a fraction, for a widening factor."""
        return (self.spread_bps / 2 + (self.levels - 1) * self.level_step_bps) * factor * _BPS

    def widening(self, volatility: Decimal | None) -> Decimal:
        """The factor applied to spread and spacing, rounded to 0.01 so that books can be cached."""
        if volatility is None or volatility <= 0:
            return Decimal(1)
        factor = 1 + self.vol_widening * volatility * 100
        cap = (_MAX_DEPTH_FRACTION / self._reach(Decimal(1))).quantize(_FACTOR_STEP, rounding=ROUND_DOWN)
        return min(factor.quantize(_FACTOR_STEP), cap)

    def market(
        self,
        symbol: str,
        mid: Decimal,
        *,
        volatility: Decimal | None,
        taker_fee: Decimal,
        amount_step: Decimal,
        min_notional: Decimal,
        fee_source: str = "model",
    ) -> Market:
        """A market whose book is centred on `mid`: (best bid + best ask) / 2 == mid exactly."""
        base, sep, quote = symbol.partition("/")
        if not sep or not base or not quote:
            raise InputError(f"book model: market '{symbol}' must be written BASE/QUOTE")
        if not mid.is_finite() or mid <= 0:
            raise InputError(f"book model: mid price of {symbol} must be above 0 (got {mid})")
        if not amount_step.is_finite() or amount_step <= 0:
            raise InputError(f"book model: amount step of {symbol} must be above 0 (got {amount_step})")
        factor = self.widening(volatility)
        key = (mid, factor, amount_step)
        book = self._books.get(key)
        if book is None:
            if len(self._books) >= _CACHE_SIZE:
                self._books.clear()
            book = self._books[key] = self._book(mid, factor, amount_step)
        bids, asks = book
        return Market(
            symbol=symbol,
            base=base,
            quote=quote,
            taker_fee=taker_fee,
            amount_step=amount_step,
            min_notional=min_notional,
            bids=bids,
            asks=asks,
            volatility=volatility,
            fee_source=fee_source,
        )

    def _shape(self, factor: Decimal) -> _Shape:
        shape = self._shapes.get(factor)
        if shape is None:
            half = self.spread_bps / 2
            offsets = tuple(
                ((half + k * self.level_step_bps) * factor * _BPS).as_integer_ratio() for k in range(self.levels)
            )
            depths = tuple(
                (self.depth_quote * (1 + self.depth_growth * k)).as_integer_ratio() for k in range(self.levels)
            )
            shape = self._shapes[factor] = _Shape(offsets, depths)
        return shape

    def _book(self, mid: Decimal, factor: Decimal, amount_step: Decimal) -> _Book:
        """Exact integer arithmetic on ticks and lots: the same numbers as Decimal, several times faster."""
        shape = self._shape(factor)
        # prices on a grid that contains the mid, so that bid and ask sit symmetrically around it
        exponent = mid.as_tuple().exponent
        assert isinstance(exponent, int)
        tick_exp = min(exponent, mid.adjusted() - _SIGNIFICANT_DIGITS + 1)
        ticks = int(mid.scaleb(-tick_exp))
        step_num, step_den = amount_step.as_integer_ratio()
        # lots = floor(depth / (price * step)) with price = p_ticks * 10**tick_exp
        up, down = (10**-tick_exp, 1) if tick_exp < 0 else (1, 10**tick_exp)
        bids: list[Level] = []
        asks: list[Level] = []
        previous = 0
        for (off_num, off_den), (depth_num, depth_den) in zip(shape.offsets, shape.depths, strict=True):
            distance = (2 * ticks * off_num + off_den) // (2 * off_den)  # half up
            if distance <= previous:  # a tick is coarser than the step: keep levels distinct
                distance = previous + 1
            previous = distance
            numerator = depth_num * step_den * up
            for side, p_ticks in ((bids, ticks - distance), (asks, ticks + distance)):
                lots = numerator // (depth_den * p_ticks * step_num * down)
                side.append((Decimal(p_ticks).scaleb(tick_exp), amount_step * max(lots, 1)))
        return tuple(bids), tuple(asks)


# --- realized volatility ------------------------------------------------------------------------------


class RollingVolatility:
    """Daily-scaled standard deviation of log returns over a trailing window, O(1) per consecutive step.

    Running sums of returns and squared returns give the variance; they are rebuilt exactly every `window`
    steps so that floating-point drift never accumulates over half a million steps.
    """

    __slots__ = ("_at", "_count", "_scale", "_sum", "_sumsq", "_values", "window")

    def __init__(self, series: PriceSeries, asset: str, window: int) -> None:
        if window < 2:
            raise InputError(f"volatility window must be at least 2 steps (got {window})")
        self.window = window
        values, _scale = series.raw(asset)
        self._values: Sequence[int] = values
        step = series.step_seconds or 86_400
        self._scale = math.sqrt(86_400 / step)
        self._at = -1
        self._count = 0
        self._sum = 0.0
        self._sumsq = 0.0

    def _ret(self, j: int) -> float:
        v = self._values
        return math.log(v[j] / v[j - 1])

    def _rebuild(self, i: int) -> None:
        returns = [self._ret(j) for j in range(i - self.window + 1, i + 1)]
        self._sum = math.fsum(returns)
        self._sumsq = math.fsum(r * r for r in returns)
        self._count = 0
        self._at = i

    def at(self, i: int) -> Decimal | None:
        """Volatility from the returns of steps i-window+1..i; None before a full window exists."""
        if i < 0:
            i += len(self._values)
        if i < self.window or i >= len(self._values):
            return None
        if i == self._at + 1 and self._at >= self.window and self._count < self.window:
            new, old = self._ret(i), self._ret(i - self.window)
            self._sum += new - old
            self._sumsq += new * new - old * old
            self._count += 1
            self._at = i
        elif i != self._at:
            self._rebuild(i)
        n = self.window
        variance = max(0.0, (self._sumsq - self._sum * self._sum / n) / (n - 1))
        return Decimal(math.sqrt(variance) * self._scale).quantize(Decimal("0.000001"))


_rolling: weakref.WeakKeyDictionary[PriceSeries, dict[tuple[str, int], RollingVolatility]] = weakref.WeakKeyDictionary()


def realized_volatility(series: PriceSeries, asset: str, i: int, window: int) -> Decimal | None:
    """Daily-scaled volatility of `asset` over the `window` steps up to `i` (None before enough history).

    Calls for consecutive `i` on the same series cost O(1) each: the rolling state is kept per series,
    asset and window, and dropped with the series.
    """
    per_series = _rolling.setdefault(series, {})
    roller = per_series.get((asset, window))
    if roller is None:
        roller = per_series[(asset, window)] = RollingVolatility(series, asset, window)
    return roller.at(i)


# --- calibrated books -----------------------------------------------------------------------------------

# The square-root law of market impact: an order of Q quote units moves the price by Y * sigma * sqrt(Q / V),
# sigma the daily volatility and V the daily traded volume (Almgren, Thum, Hauptmann & Li 2005; Toth et al.
# 2011; on Bitcoin, Donier & Bonart 2015). Assumed here, and stated so that anyone can redo it: Y = 0.75
# (inside the 0.5-1 range those papers report), V = 1e9 quote a day (the order of one large venue's BTC spot
# volume), sigma = 3% a day (BTC's typical realized volatility), a 1 bp spread.
SQRT_LAW_Y = Decimal("0.75")
SQRT_LAW_DAILY_VOLUME = Decimal("1e9")
SQRT_LAW_SIGMA = Decimal("0.03")
SQRT_LAW_SPREAD_BPS = Decimal(1)
SQRT_LAW_STEP_BPS = Decimal("0.5")
SQRT_LAW_LEVELS = 60


def sqrt_law_book() -> BookModel:
    """A book whose cost follows the square-root law above at sigma = 3%.

    With depth growing by 1 per level (depth_growth = 1), the quote depth within distance x of the mid is
    about D (x/step)^2 / 2, step the level spacing after volatility widening; the law says it is
    V (x / (Y sigma))^2, so D = 2 V step^2 / (Y sigma)^2. At 3% volatility the default widening (0.25 per
    percent) makes the step 1.75 x 0.5 bp, and D comes to about 30,000 quote a level. Walking it, a 1,000
    order pays the half spread, 0.9 bp beyond mid (the conservative book: 1.75 bp); 100,000 pays 1.6 bp on
    average (the law: the price moves 2.25 bp, and an order walking the book pays about two thirds of its
    last price's distance, plus the half spread); 1,000,000 pays 4.8 bp (law: about 5.6 bp)."""
    widening = 1 + Decimal("0.25") * SQRT_LAW_SIGMA * 100
    step = SQRT_LAW_STEP_BPS * _BPS * widening
    depth = 2 * SQRT_LAW_DAILY_VOLUME * step**2 / (SQRT_LAW_Y * SQRT_LAW_SIGMA) ** 2
    return BookModel(
        spread_bps=SQRT_LAW_SPREAD_BPS,
        levels=SQRT_LAW_LEVELS,
        level_step_bps=SQRT_LAW_STEP_BPS,
        depth_quote=depth.quantize(Decimal(1)),
        depth_growth=Decimal(1),
    )


# `--market-model`: the calibrated book, and the original conservative one (about 2-3x its cost for the
# orders a 100,000 portfolio sends)
MARKET_MODELS = {"sqrt-law": sqrt_law_book, "conservative": BookModel}


def market_model(name: str) -> BookModel:
    try:
        return MARKET_MODELS[name]()
    except KeyError:
        raise InputError(f"--market-model {name!r}: known: {', '.join(MARKET_MODELS)}") from None
