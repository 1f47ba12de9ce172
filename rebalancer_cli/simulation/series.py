"""A price history held exactly: timestamps and, per asset, close (and optional OHLC) columns.

A year of minute bars is half a million rows per asset, and the backtest reads every one, so prices are
kept as scaled integers per column (`array('q')` of price * 10**scale) rather than half a million `Decimal`
objects: exact like Decimal, a fraction of the memory, and cheap for the "nothing to do" screen. `Decimal`
is built only when a step needs money arithmetic.
"""

from __future__ import annotations

import itertools
import operator
import statistics
from array import array
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import TypeAlias

from ..errors import InputError

# int64 holds 18 full decimal digits; more decimals than this in a price is a unit error, not precision
MAX_DECIMALS = 18
OHLC_FIELDS = ("open", "high", "low", "close")
SECONDS_PER_YEAR = 365 * 86_400

Column: TypeAlias = tuple["array[int]", int]  # array is generic only for type checkers on 3.11


# --- the series --------------------------------------------------------------------------------------


class PriceSeries:
    """Timestamps (unix seconds) and, per asset, a close column and optional open/high/low columns.

    Each column is an `array('q')` of price * 10**scale with one scale per column, so every price is exact.
    """

    __slots__ = ("__weakref__", "_columns", "_step", "assets", "source", "timestamps")

    def __init__(
        self,
        timestamps: array[int],
        columns: Mapping[str, Mapping[str, Column]],
        *,
        source: str = "",
    ) -> None:
        if not columns:
            raise InputError("a price series needs at least one asset")
        n = len(timestamps)
        for asset, fields in columns.items():
            if "close" not in fields:
                raise InputError(f"price series: asset {asset} has no close column")
            for name, (values, scale) in fields.items():
                if name not in OHLC_FIELDS:
                    raise InputError(f"price series: unknown field {name!r} for {asset}")
                if len(values) != n:
                    raise InputError(f"price series: {asset} {name} has {len(values)} prices for {n} timestamps")
                if not 0 <= scale <= MAX_DECIMALS:
                    raise InputError(f"price series: scale {scale} of {asset} {name} is out of range")
                if n and min(values) <= 0:
                    raise InputError(f"price series: {asset} {name} has a price that is not above 0")
        if not all(map(operator.lt, timestamps, itertools.islice(timestamps, 1, None))):
            raise InputError("price series: timestamps must be strictly increasing")
        self.timestamps = timestamps
        self._columns = {a: dict(f) for a, f in columns.items()}
        self.assets: tuple[str, ...] = tuple(columns)
        self.source = source
        self._step: int | None = None

    @classmethod
    def from_decimals(
        cls,
        timestamps: Sequence[int | datetime],
        closes: Mapping[str, Sequence[Decimal]],
        *,
        source: str = "",
    ) -> PriceSeries:
        """Build a series from exact prices, e.g. a hand-computed scenario in a test."""
        stamps = array("q", (_unix(t) for t in timestamps))
        columns: dict[str, dict[str, Column]] = {}
        for asset, prices in closes.items():
            columns[asset] = {"close": _scaled_column(asset, prices)}
        return cls(stamps, columns, source=source)

    def __len__(self) -> int:
        return len(self.timestamps)

    def __repr__(self) -> str:
        span = ""
        if len(self):
            span = f" {_iso(self.timestamps[0])}..{_iso(self.timestamps[-1])}"
        return f"<PriceSeries {','.join(self.assets)} x{len(self)}{span}>"

    @property
    def step_seconds(self) -> int:
        """Median spacing: robust to the odd missing bar, which real exports always have."""
        if self._step is None:
            ts = self.timestamps
            if len(ts) < 2:
                self._step = 0
            else:
                diffs = list(map(operator.sub, itertools.islice(ts, 1, None), ts))
                first = diffs[0]
                self._step = first if diffs.count(first) == len(diffs) else int(statistics.median_low(diffs))
        return self._step

    def fields(self, asset: str) -> tuple[str, ...]:
        """The fields present for `asset`, in open/high/low/close order."""
        have = self._column_set(asset)
        return tuple(f for f in OHLC_FIELDS if f in have)

    def raw(self, asset: str, field: str = "close") -> Column:
        """The stored integers and their scale: price = value / 10**scale. For fast screens."""
        have = self._column_set(asset)
        if field not in have:
            raise KeyError(f"{asset} has no {field} prices")
        return have[field]

    def price(self, i: int, asset: str, field: str = "close") -> Decimal:
        values, scale = self.raw(asset, field)
        return Decimal(values[i]).scaleb(-scale)

    def row(self, i: int) -> dict[str, Decimal]:
        """Close of every asset at step `i`."""
        out = {}
        for asset, fields in self._columns.items():
            values, scale = fields["close"]
            out[asset] = Decimal(values[i]).scaleb(-scale)
        return out

    def time(self, i: int) -> datetime:
        return datetime.fromtimestamp(self.timestamps[i], UTC)

    def slice(self, start: int | None = None, stop: int | None = None) -> PriceSeries:
        """Rows [start, stop) as a new series (the arrays are copied, the original is untouched)."""
        sl = slice(start, stop)
        columns = {
            asset: {name: (values[sl], scale) for name, (values, scale) in fields.items()}
            for asset, fields in self._columns.items()
        }
        return PriceSeries(self.timestamps[sl], columns, source=self.source)

    def _column_set(self, asset: str) -> dict[str, Column]:
        try:
            return self._columns[asset]
        except KeyError:
            raise KeyError(f"no prices for {asset}; the series has {', '.join(self.assets)}") from None


def _unix(value: int | datetime) -> int:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        if aware.microsecond:
            raise InputError(f"timestamps are whole seconds (got {value.isoformat()})")
        return int(aware.timestamp())
    return int(value)


def _scaled_column(asset: str, prices: Sequence[Decimal]) -> Column:
    exps = []
    for p in prices:
        if not isinstance(p, Decimal) or not p.is_finite() or p <= 0:
            raise InputError(f"price series: every price of {asset} must be a positive Decimal (got {p!r})")
        exps.append(p.as_tuple().exponent)
    scale = max([0, *(-int(e) for e in exps)])
    if scale > MAX_DECIMALS:
        raise InputError(f"price series: {asset} prices have more than {MAX_DECIMALS} decimals")
    try:
        return array("q", (int(p.scaleb(scale)) for p in prices)), scale
    except OverflowError:
        raise InputError(f"price series: {asset} prices have too many digits to store exactly") from None


def _iso(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")
