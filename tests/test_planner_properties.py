"""Properties over random portfolios and books: what a plan must never do, whatever the market looks like."""

from __future__ import annotations

from decimal import ROUND_DOWN, Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_helpers import T0

from rebalancer_cli.config import Config
from rebalancer_cli.errors import PlanningError
from rebalancer_cli.planner import plan
from rebalancer_cli.snapshot import Market, Snapshot

D = Decimal
STEPS = [D("0.00000001"), D("0.00001"), D("0.001"), D("0.01"), D("0.1"), D("1")]


@st.composite
def books(draw: st.DrawFn, base: str) -> Market:
    mid = D(draw(st.integers(1, 10_000_000))) / D(100)
    spread_bps = D(draw(st.integers(1, 300)))
    n = draw(st.integers(1, 15))
    half = mid * spread_bps / D(20000)
    bids, asks = [], []
    for i in range(n):
        off = half + mid * D(i) * D(draw(st.integers(1, 50))) / D(10000) if i else half
        amt = D(draw(st.integers(1, 10_000))) / D(100)
        bid = (mid - off).quantize(D("0.0001"))
        if bid <= 0 or (bids and bid >= bids[-1][0]):
            break
        bids.append((bid, amt))
        asks.append(((mid + off).quantize(D("0.0001")), amt))
    if not bids:
        bids, asks = [(mid * D("0.999"), D(1))], [(mid * D("1.001"), D(1))]
    return Market(
        symbol=f"{base}/USDC",
        base=base,
        quote="USDC",
        taker_fee=D(draw(st.integers(0, 50))) / D(10000),
        amount_step=draw(st.sampled_from(STEPS)),
        min_notional=D(draw(st.integers(0, 50))),
        bids=tuple(bids),
        asks=tuple(asks),
        volatility=draw(st.one_of(st.none(), st.integers(0, 200).map(lambda v: D(v) / D(1000)))),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Config, Snapshot]:
    names = [f"A{i}" for i in range(draw(st.integers(1, 6)))]
    raw = [draw(st.integers(0, 100)) for _ in range(len(names) + 1)]
    if sum(raw) == 0:
        raw[-1] = 1
    weights = [(D(r) / D(sum(raw))).quantize(D("0.0001"), rounding=ROUND_DOWN) for r in raw[:-1]]
    weights.append(D(1) - sum(weights, D(0)))
    markets = [draw(books(n)) for n in names]
    balances = {n: D(draw(st.integers(0, 10**7))) / D(10**4) for n in names}
    balances["USDC"] = D(draw(st.integers(0, 10**9))) / D(100)
    cfg = Config.model_validate(
        {
            "portfolio_id": "prop",
            "base_threshold": D(draw(st.integers(1, 1000))) / D(10000),
            "volatility_factor": D(draw(st.integers(1, 20))) / D(10),
            "safety_margin": D(draw(st.integers(10, 50))) / D(10),
            "max_trades_per_cycle": draw(st.integers(1, 50)),
            "rebalance_to": draw(st.sampled_from(["target", "band_edge"])),
            "assets": [
                {"symbol": s, "target_weight": w, "max_deviation": D(draw(st.integers(0, 100))) / D(100)}
                for s, w in zip([*names, "USDC"], weights, strict=True)
            ],
            "exchange": {"id": "paper", "snapshot": "x.yaml"},
        }
    )
    cfg.quote = "USDC"
    return cfg, Snapshot(taken_at=T0, balances=balances, markets={m.symbol: m for m in markets})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_plan_never_breaks_its_invariants(case: tuple[Config, Snapshot]) -> None:
    cfg, snap = case
    try:
        p = plan(cfg, snap)
    except PlanningError:
        assert (
            sum(
                (snap.balances[s] * (m.mid if (m := snap.markets.get(f"{s}/USDC")) else 1) for s in snap.balances), D(0)
            )
            <= 0
        )
        return
    free_quote = snap.balances["USDC"]
    proceeds = sum((t.notional - t.est_fee for t in p.trades if t.side == "sell"), D(0))
    spend = sum((t.notional + t.est_fee for t in p.trades if t.side == "buy"), D(0))
    assert spend <= free_quote + proceeds, "spends more quote than is free after the sells"
    sides = [t.side for t in p.trades]
    assert sides == sorted(sides, key=lambda s: s != "sell"), "sells come before buys"
    assert len(p.trades) <= cfg.max_trades_per_cycle
    for t in p.trades:
        m = snap.markets[t.market]
        assert t.amount > 0
        assert t.amount % m.amount_step == 0, "off the lot size"
        assert t.notional >= m.min_notional, "below min notional"
        if t.side == "sell":
            assert t.amount <= snap.balances[t.symbol], "sells more than is held"
    assert p.summary.drift_after <= p.summary.drift_before
    assert len({t.idempotency_key for t in p.trades}) == len(p.trades)
