"""Building configs and snapshots in memory for planner tests, without YAML files."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from rebalancer_cli.config import Config
from rebalancer_cli.snapshot import Market, Snapshot

D = Decimal
T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


def config(assets: Sequence[tuple[str, str, str]], **kw: Any) -> Config:
    data: dict[str, Any] = {
        "portfolio_id": "p1",
        "base_threshold": D("0.01"),
        "volatility_factor": D("0.5"),
        "safety_margin": D("1.5"),
        "max_trades_per_cycle": 10,
        "assets": [{"symbol": s, "target_weight": D(w), "max_deviation": D(m)} for s, w, m in assets],
        "exchange": {"id": "paper", "snapshot": "unused.yaml"},
        # these tests check the cost-adjusted rule's arithmetic; test_planner_region.py checks the default's
        "policy": "cost-adjusted",
    }
    data.update(kw)
    cfg = Config.model_validate(data)
    if cfg.quote is None:
        cfg.quote = "USDC"
    return cfg


def market(
    base: str,
    bids: Sequence[tuple[str, str]],
    asks: Sequence[tuple[str, str]],
    *,
    fee: str = "0.001",
    step: str = "0.01",
    min_notional: str = "10",
    vol: str | None = "0.02",
    quote: str = "USDC",
) -> Market:
    return Market(
        symbol=f"{base}/{quote}",
        base=base,
        quote=quote,
        taker_fee=D(fee),
        amount_step=D(step),
        min_notional=D(min_notional),
        bids=tuple((D(p), D(a)) for p, a in bids),
        asks=tuple((D(p), D(a)) for p, a in asks),
        volatility=D(vol) if vol is not None else None,
    )


def snapshot(balances: dict[str, str], *markets: Market, at: datetime = T0) -> Snapshot:
    return Snapshot(
        taken_at=at, balances={k: D(v) for k, v in balances.items()}, markets={m.symbol: m for m in markets}
    )


def keys() -> Iterator[str]:
    counter = itertools.count(1)
    return (f"00000000-0000-7000-8000-{next(counter):012d}" for _ in itertools.count())
