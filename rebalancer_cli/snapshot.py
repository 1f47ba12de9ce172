"""One consistent picture of an account: balances, markets (fees, lot sizes, limits), books, volatility.

The planner never talks to an exchange; it reads a `Snapshot`. The same picture can be saved to a file and
replayed (`plan --snapshot`), which makes every decision reproducible for an incident report.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from . import yamlfile
from .decimals import AnyDecimal, FeeRate, NonNegative, Positive, to_decimal
from .errors import InvalidFileError, SnapshotError

Level = tuple[Decimal, Decimal]
MAX_SNAPSHOT_BYTES = 32_000_000


@dataclass(frozen=True, slots=True)
class Market:
    """A spot market as the planner needs it; books are best-first (price, amount) pairs."""

    symbol: str
    base: str
    quote: str
    taker_fee: Decimal
    amount_step: Decimal
    min_notional: Decimal
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    volatility: Decimal | None = None
    fee_source: str = "snapshot"
    # the exchange's price tick; None when unknown (older snapshot files, an exchange that does not say)
    price_step: Decimal | None = None
    mid: Decimal = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # read on every planning step of every asset; computed once
        object.__setattr__(self, "mid", (self.bids[0][0] + self.asks[0][0]) / 2)

    def price_tick(self) -> Decimal:
        """The price tick, for display: the exchange's when known, else the finest step the book's best
        levels are written in (a book quoted 64995.12 ticks in cents)."""
        if self.price_step is not None:
            return self.price_step
        exponent = min(int(p.as_tuple().exponent) for p, _ in (*self.bids[:5], *self.asks[:5]))
        return Decimal(1).scaleb(max(min(exponent, 0), -12))


@dataclass(frozen=True, slots=True)
class Covariance:
    """Covariance of the assets' daily log returns against the quote, from trailing daily closes.

    A statistic, so floats: it sizes no-trade regions, never an amount that is sent or booked. `assets` names
    the rows and columns of `matrix` (symmetric). `source` says where it came from, for the plan's notes.
    """

    assets: tuple[str, ...]
    matrix: tuple[tuple[float, ...], ...]
    source: str = "snapshot"

    def __post_init__(self) -> None:
        n = len(self.assets)
        if len(self.matrix) != n or any(len(row) != n for row in self.matrix):
            raise ValueError(f"covariance of {n} assets needs a {n}x{n} matrix")

    def of(self, a: str, b: str) -> float:
        return self.matrix[self.assets.index(a)][self.assets.index(b)]

    def covers(self, symbols: Sequence[str]) -> bool:
        return all(s in self.assets for s in symbols)


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: datetime
    balances: Mapping[str, Decimal]
    markets: Mapping[str, Market]
    locked: Mapping[str, Decimal] = field(default_factory=dict)
    # seconds between the first and last read that built this picture (0 for a file)
    skew_seconds: float = 0.0
    source: str = "file"
    # daily covariance of the traded assets' returns, when the source has one (backtests, snapshot files)
    covariance: Covariance | None = None

    def market_for(self, base: str, quote: str) -> Market | None:
        return self.markets.get(f"{base}/{quote}")


# --- the file format ------------------------------------------------------------------------------


def _level(value: Any) -> Level:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise PydanticCustomError("level", "a book level is a pair [price, amount]")
    price, amount = to_decimal(value[0]), to_decimal(value[1])
    if price <= 0 or amount <= 0:
        raise PydanticCustomError("level", "price and amount of a book level must be above 0")
    return (price, amount)


BookLevel = Annotated[Level, BeforeValidator(_level)]


class MarketFile(BaseModel):
    # built on first use: a plan from the exchange never reads a snapshot file
    model_config = ConfigDict(extra="forbid", defer_build=True)
    taker_fee: FeeRate = Field(description="Taker fee as a fraction of notional, e.g. 0.001")
    amount_step: Positive = Field(description="Lot size; order amounts are rounded down to it")
    min_notional: NonNegative = Field(Decimal(0), description="Orders below this quote value are not placed")
    bids: list[BookLevel] = Field(description="Bids, best (highest) first: [price, amount]")
    asks: list[BookLevel] = Field(description="Asks, best (lowest) first: [price, amount]")
    volatility: NonNegative | None = Field(None, description="Daily realized volatility, e.g. 0.03")
    fee_source: str = Field("snapshot", description="Where the fee came from (account, config, default)")
    price_step: Positive | None = Field(
        None,
        description="Price tick: prices are shown to it, order limits rounded to it (default: the book's precision)",
    )

    @field_validator("bids")
    @classmethod
    def _bids_sorted(cls, v: list[Level]) -> list[Level]:
        return _sorted_book(v, descending=True)

    @field_validator("asks")
    @classmethod
    def _asks_sorted(cls, v: list[Level]) -> list[Level]:
        return _sorted_book(v, descending=False)

    @model_validator(mode="after")
    def _not_crossed(self) -> MarketFile:
        if self.bids and self.asks and self.bids[0][0] >= self.asks[0][0]:
            raise ValueError(f"crossed book: best bid {self.bids[0][0]} is not below best ask {self.asks[0][0]}")
        return self


def _sorted_book(levels: list[Level], *, descending: bool) -> list[Level]:
    if not levels:
        raise PydanticCustomError("book", "a book side needs at least one level")
    for (p1, _), (p2, _) in itertools.pairwise(levels):
        if (p2 >= p1) if descending else (p2 <= p1):
            order = "highest" if descending else "lowest"
            raise PydanticCustomError(
                "book", f"levels must be best ({order}) first with distinct prices; {p2} follows {p1}"
            )
    return levels


def _market_key(value: str) -> str:
    parts = value.split("/")
    if len(parts) != 2 or not all(parts) or value != value.strip():
        raise ValueError(f"market '{value}' must be written BASE/QUOTE, e.g. BTC/USDC")
    return value


MarketKey = Annotated[str, AfterValidator(_market_key)]


class SnapshotFile(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    taken_at: datetime = Field(description="When the picture was taken (ISO 8601 with a timezone)")
    balances: dict[str, NonNegative] = Field(description="Free balance per asset")
    locked: dict[str, NonNegative] = Field(default_factory=dict, description="Balance held in open orders")
    markets: dict[MarketKey, MarketFile] = Field(description="Markets by BASE/QUOTE symbol")
    covariance: dict[str, dict[str, AnyDecimal]] | None = Field(
        None,
        description="Daily covariance of the assets' log returns, by base asset: {BTC: {BTC: 0.0011, ETH: 0.0012}, "
        "ETH: {ETH: 0.0019}}; either triangle is enough. Sizes the no-trade-region policy's regions",
    )

    @field_validator("covariance")
    @classmethod
    def _covariance_complete(cls, v: dict[str, dict[str, Decimal]] | None) -> dict[str, dict[str, Decimal]] | None:
        if v is None:
            return v
        assets = sorted({a for a in v} | {b for row in v.values() for b in row})
        for a in assets:
            for b in assets:
                x, y = v.get(a, {}).get(b), v.get(b, {}).get(a)
                if x is None and y is None:
                    raise ValueError(f"covariance of {a} and {b} is missing")
                if x is not None and y is not None and x != y:
                    raise ValueError(f"covariance is not symmetric: {a}/{b} is {x} but {b}/{a} is {y}")
            if (v.get(a, {}).get(a) or Decimal(0)) <= 0:
                raise ValueError(f"variance of {a} must be above 0")
        return v

    @field_validator("taken_at", mode="before")
    @classmethod
    def _aware(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                parsed = datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError("must be an ISO 8601 time such as 2026-11-27T10:00:00Z") from None
            if parsed.tzinfo is None:
                raise ValueError("must carry a timezone (e.g. a trailing Z for UTC)")
            return parsed.astimezone(UTC)
        if isinstance(v, datetime):
            return v
        raise ValueError("must be an ISO 8601 time such as 2026-11-27T10:00:00Z")


def from_file_model(model: SnapshotFile, source: str = "file") -> Snapshot:
    markets = {}
    for symbol, m in model.markets.items():
        base, quote = symbol.split("/")
        markets[symbol] = Market(
            symbol=symbol,
            base=base,
            quote=quote,
            taker_fee=m.taker_fee,
            amount_step=m.amount_step,
            min_notional=m.min_notional,
            bids=tuple(m.bids),
            asks=tuple(m.asks),
            volatility=m.volatility,
            fee_source=m.fee_source,
            price_step=m.price_step,
        )
    covariance = None
    if model.covariance is not None:
        cov = model.covariance
        names = tuple(sorted({a for a in cov} | {b for row in cov.values() for b in row}))
        cell = {(a, b): float(x) for a, row in cov.items() for b, x in row.items()}
        matrix = tuple(tuple(cell.get((a, b), cell.get((b, a), 0.0)) for b in names) for a in names)
        covariance = Covariance(names, matrix, source=f"snapshot {source}")
    return Snapshot(
        taken_at=model.taken_at,
        balances=dict(model.balances),
        markets=markets,
        locked=dict(model.locked),
        source=source,
        covariance=covariance,
    )


def load_snapshot(path: Path) -> Snapshot:
    """Load and validate a snapshot file; raises `SnapshotError` listing every problem with its line."""
    try:
        doc = yamlfile.load(path, kind="snapshot", max_bytes=MAX_SNAPSHOT_BYTES)
        model = yamlfile.validate(SnapshotFile, doc)
    except SnapshotError:
        raise
    except InvalidFileError as exc:
        raise SnapshotError(exc.problems) from None
    return from_file_model(model, source=str(path))


def to_document(snapshot: Snapshot) -> dict[str, Any]:
    """The snapshot as plain data in the file format; decimals as strings so nothing is rounded."""
    doc: dict[str, Any] = {
        "taken_at": snapshot.taken_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "balances": {k: str(v) for k, v in snapshot.balances.items()},
    }
    if snapshot.locked:
        doc["locked"] = {k: str(v) for k, v in snapshot.locked.items()}
    markets: dict[str, Any] = {}
    for symbol, m in snapshot.markets.items():
        entry: dict[str, Any] = {
            "taker_fee": str(m.taker_fee),
            "amount_step": str(m.amount_step),
            "min_notional": str(m.min_notional),
            "bids": [[str(p), str(a)] for p, a in m.bids],
            "asks": [[str(p), str(a)] for p, a in m.asks],
        }
        if m.volatility is not None:
            entry["volatility"] = str(m.volatility)
        if m.fee_source != "snapshot":
            entry["fee_source"] = m.fee_source
        if m.price_step is not None:
            entry["price_step"] = str(m.price_step)
        markets[symbol] = entry
    doc["markets"] = markets
    cov = snapshot.covariance
    if cov is not None:
        doc["covariance"] = {
            a: {b: repr(cov.matrix[i][j]) for j, b in enumerate(cov.assets) if j >= i} for i, a in enumerate(cov.assets)
        }
    return doc


def dump_snapshot(snapshot: Snapshot) -> str:
    return yaml.safe_dump(to_document(snapshot), sort_keys=False, default_flow_style=None, width=200)


def save_snapshot(snapshot: Snapshot, path: Path) -> None:
    """Write atomically: a reader (or a crash) never sees half a snapshot."""
    from .fsutil import atomic_write_text

    atomic_write_text(path, dump_snapshot(snapshot))


def json_schema() -> dict[str, Any]:
    """The snapshot file format as JSON Schema (`rebalance snapshot-schema`)."""
    schema = SnapshotFile.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "rebalance snapshot file"
    return schema
