"""The joint no-trade region (`joint-region` in backtests): the per-asset region exactly when the assets are
uncorrelated, and, with correlation, a hedged pair of deviations left alone while a pair that adds up is
corrected sooner."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_helpers import T0, config, market, snapshot

from rebalancer_cli.config import Config
from rebalancer_cli.planner import NoTradeRegion, Plan, Policy, ToRegionPoint, needs_book, plan
from rebalancer_cli.snapshot import Snapshot

D = Decimal
PRICES = {"BTC": D(60000), "ETH": D(3000)}
TOTAL = D(1_000_000)


def policy(cfg: Config, *, joint: bool) -> Policy:
    return Policy(NoTradeRegion(cfg.risk_aversion, D(86400), joint=joint), ToRegionPoint(D(1)), name="t")


def portfolio(correlation: str) -> Config:
    return config(
        [("BTC", "0.4", "0.3"), ("ETH", "0.3", "0.3"), ("USDC", "0.3", "0.3")],
        policy="no-trade-region",
        correlations={"BTC/ETH": D(correlation)},
    )


def at_weights(weights: dict[str, Decimal]) -> Snapshot:
    """A snapshot with these weights of BTC and ETH (the rest in USDC), books deep enough for any trade."""
    markets = []
    for s, p in PRICES.items():
        markets.append(market(s, [(str(p - 1), "1000")], [(str(p + 1), "1000")], step="0.00001", vol="0.04"))
    balances = {s: str((w * TOTAL / PRICES[s]).quantize(D("0.00001"))) for s, w in weights.items()}
    balances["USDC"] = str(TOTAL * (1 - sum(weights.values())))
    return snapshot(balances, *markets)


def widths(cfg: Config, snap: Snapshot) -> dict[str, Decimal]:
    held = plan(cfg, snap, policy=policy(cfg, joint=False), now=T0)
    return {a.symbol: a.region.half_width for a in held.assets if a.region is not None and a.symbol != "USDC"}


def traded(p: Plan) -> dict[str, tuple[str, Decimal]]:
    return {t.symbol: (t.side, t.amount) for t in p.trades}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(-400, 400), st.integers(-400, 400))
def test_without_correlation_it_is_the_per_asset_region(btc_bp: int, eth_bp: int) -> None:
    cfg = portfolio("0")
    snap = at_weights({"BTC": D("0.4") + D(btc_bp) / 10000, "ETH": D("0.3") + D(eth_bp) / 10000})
    apart = plan(cfg, snap, policy=policy(cfg, joint=False), now=T0)
    joint = plan(cfg, snap, policy=policy(cfg, joint=True), now=T0)
    assert traded(joint) == traded(apart)
    assert needs_book(cfg, snap, policy=policy(cfg, joint=True), now=T0) == needs_book(
        cfg, snap, policy=policy(cfg, joint=False), now=T0
    )


def test_a_hedged_pair_holds_and_a_pair_that_adds_up_trades_sooner() -> None:
    cfg = portfolio("0.9")
    delta = widths(cfg, at_weights({"BTC": D("0.4"), "ETH": D("0.3")}))
    # BTC over and ETH under, each a little past its own width: apart, both trade; together they hedge
    hedged = at_weights({"BTC": D("0.4") + delta["BTC"] * D("1.1"), "ETH": D("0.3") - delta["ETH"] * D("1.1")})
    assert set(traded(plan(cfg, hedged, policy=policy(cfg, joint=False), now=T0))) == {"BTC", "ETH"}
    joint = plan(cfg, hedged, policy=policy(cfg, joint=True), now=T0)
    assert traded(joint) == {}
    assert {a.symbol: a.reason for a in joint.assets}["BTC"] == "inside the no-trade region"
    # both over, each a little inside its own width: apart, both hold; together the tracking adds up
    together = at_weights({"BTC": D("0.4") + delta["BTC"] * D("0.8"), "ETH": D("0.3") + delta["ETH"] * D("0.8")})
    assert traded(plan(cfg, together, policy=policy(cfg, joint=False), now=T0)) == {}
    sells = traded(plan(cfg, together, policy=policy(cfg, joint=True), now=T0))
    assert sells and all(side == "sell" for side, _ in sells.values())
    # never past the target: what is sold is at most the overweight
    for s, (_, amount) in sells.items():
        assert amount * PRICES[s] <= delta[s] * D("0.8") * TOTAL
