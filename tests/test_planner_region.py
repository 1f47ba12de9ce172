"""The no-trade-region policy: region widths computed by hand from the formula, and the decisions they lead to."""

from __future__ import annotations

import math
from decimal import Decimal

from plan_helpers import config, keys, market, snapshot

from rebalancer_cli import planner as P
from rebalancer_cli.planner import Plan, plan
from rebalancer_cli.snapshot import Covariance

D = Decimal
TWO = [("BTC", "0.5", "0.2"), ("USDC", "0.5", "0.2")]
REGION = {"policy": "no-trade-region", "region_point": D("0.5")}


def _plan(cfg, snap) -> Plan:  # type: ignore[no-untyped-def]
    gen = keys()
    return plan(cfg, snap, key_factory=lambda: next(gen))


def line(p: Plan, symbol: str) -> P.AssetLine:
    return next(a for a in p.assets if a.symbol == symbol)


def expected_width(
    k: float, ratio: float, s2: float, gamma: float = 5.0, dt_days: float = 60 / 86400, point: float = 0.5
) -> float:
    # the trigger of trades that return to `point` of the half-width: (6 k ratio / (gamma (1+p) (1+p^2)))^(1/3)
    return (6 * k * ratio / (gamma * (1 + point) * (1 + point**2))) ** (1 / 3) - 0.5826 * math.sqrt(s2 * dt_days)


def test_region_width_is_the_formula_with_the_cost_from_the_book() -> None:
    # BTC 5.5 @ 100 = 550 of 1000: weight 0.55, drift -0.05. Sell one lot (0.01) at the 99 bid: notional 0.99,
    # fee 0.00099, slippage 0.01 -> k = 0.01099 / 0.99. One asset against cash: s^2 = w^2 (1-w)^2 vol^2,
    # sigma^2 = vol^2 (vol 0.02 a day), so with trades to half the width (p = 0.5)
    # delta = (6 k 0.0625 / (5 * 1.5 * 1.25))^(1/3) - 0.5826 sqrt(s^2 * 60 s / 1 day).
    cfg = config(TWO, **REGION)
    snap = snapshot({"BTC": "5.5", "USDC": "450"}, market("BTC", [("99", "10")], [("101", "10")]))
    btc = line(_plan(cfg, snap), "BTC")
    k = 0.01099 / 0.99
    width = expected_width(k, 0.0625, 0.0625 * 0.0004)
    assert btc.region is not None
    assert abs(float(btc.region.cost_rate) - k) < 1e-12
    assert abs(float(btc.threshold) - width) < 1e-9
    assert btc.threshold == btc.region.half_width < btc.region.uncorrected
    assert btc.region.risk_source == "market volatility and config correlations"


def test_inside_the_region_holds_and_outside_trades_to_the_chosen_point() -> None:
    cfg = config(TWO, **REGION)
    book = market("BTC", [("99.99", "100")], [("100.01", "100")], step="0.001")
    # drift 0.01: inside a region of about 0.022 (k ~ 0.0011) -> hold, and the plan says so
    held = line(_plan(cfg, snapshot({"BTC": "4.9", "USDC": "510"}, book)), "BTC")
    assert held.decision == "hold" and held.reason == P.INSIDE_REGION
    assert abs(held.drift) < held.threshold
    # drift -0.1: outside; sell down to the point half-way inside the region: remaining drift -threshold/2
    p = _plan(cfg, snapshot({"BTC": "6", "USDC": "400"}, book))
    btc = line(p, "BTC")
    (t,) = p.trades
    assert btc.decision == "trade" and btc.reason.startswith("outside the no-trade region")
    wanted = (D("0.1") - btc.threshold / 2) * 1000 / btc.mid
    assert t.side == "sell" and wanted - D("0.001") < t.amount <= wanted


def test_edge_sizing_leaves_the_drift_at_the_region_edge() -> None:
    cfg = config(TWO, policy="no-trade-region", region_point=D(1))
    book = market("BTC", [("99.99", "100")], [("100.01", "100")], step="0.0001")
    p = _plan(cfg, snapshot({"BTC": "6", "USDC": "400"}, book))
    btc = line(p, "BTC")
    (t,) = p.trades
    assert abs(t.amount - (D("0.1") - btc.threshold) * 1000 / btc.mid) <= D("0.0001")
    # trading to the edge, the region is the reflecting band's (3 k s^2 / (2 gamma sigma^2))^(1/3), corrected
    k = float(btc.region.cost_rate) if btc.region else 0.0
    edge = (3 * k * 0.0625 / 10) ** (1 / 3) - 0.5826 * math.sqrt(0.0625 * 0.0004 * 60 / 86400)
    assert abs(float(btc.threshold) - edge) < 1e-9


def test_a_point_further_inside_widens_the_region() -> None:
    # the same drift of 4% is past the edge-sizing region (2.7%) but inside the wider trigger of trades to target
    # (4.3%):
    # a trade that goes further back buys more tracking at the same cost per unit, so it waits for more drift
    book = market("BTC", [("99.99", "100")], [("100.01", "100")], step="0.0001")
    snap = snapshot({"BTC": "5.4", "USDC": "460"}, book)
    widths = {}
    for point in ("1", "0.5", "0"):
        btc = line(_plan(config(TWO, policy="no-trade-region", region_point=D(point)), snap), "BTC")
        assert btc.region is not None
        k = float(btc.region.cost_rate)
        assert abs(float(btc.threshold) - expected_width(k, 0.0625, 0.0625 * 0.0004, point=float(point))) < 1e-9
        widths[point] = (btc.threshold, btc.decision)
    assert widths["1"][0] < widths["0.5"][0] < widths["0"][0]
    assert (widths["1"][1], widths["0.5"][1], widths["0"][1]) == ("trade", "trade", "hold")


def test_an_absurd_cost_share_is_refused_unless_the_hard_band_is_breached() -> None:
    # one lot is cheap at the top of the book (k ~ 0.1%, so the region is narrow), but the rest of the bids
    # sit 30% below mid: selling the correction would lose about 30% of its notional
    thin = market("BTC", [("99.99", "0.01"), ("70", "100")], [("100.01", "100")])
    cfg = config([("BTC", "0.5", "0.2"), ("USDC", "0.5", "0.2")], **REGION)
    btc = line(_plan(cfg, snapshot({"BTC": "6", "USDC": "400"}, thin)), "BTC")
    assert btc.decision == "hold" and btc.reason == P.COST_SHARE_ABSURD
    hard = config([("BTC", "0.5", "0.05"), ("USDC", "0.5", "0.05")], **REGION)
    assert line(_plan(hard, snapshot({"BTC": "6", "USDC": "400"}, thin)), "BTC").reason == "hard band breached"


def test_the_covariance_of_the_portfolio_sets_the_width_not_one_volatility() -> None:
    # BTC 0.4, ETH 0.3, USDC 0.3. With ETH moving with BTC, BTC's weight wanders less (s^2 smaller), so its
    # region is narrower than with independent assets of the same volatilities.
    three = [("BTC", "0.4", "0.2"), ("ETH", "0.3", "0.2"), ("USDC", "0.3", "0.2")]
    books = (
        market("BTC", [("99.99", "100")], [("100.01", "100")], vol="0.03"),
        market("ETH", [("9.999", "1000")], [("10.001", "1000")], vol="0.04"),
    )
    balances = {"BTC": "4", "ETH": "30", "USDC": "300"}
    independent = line(_plan(config(three, **REGION), snapshot(balances, *books)), "BTC")
    correlated = line(
        _plan(config(three, **REGION, correlations={"BTC/ETH": D("0.8")}), snapshot(balances, *books)), "BTC"
    )
    assert correlated.threshold < independent.threshold
    # the snapshot's own covariance wins over volatilities and config correlations; it is what a backtest passes
    cov = Covariance(("BTC", "ETH"), ((0.0009, 0.00096), (0.00096, 0.0016)), source="trailing 90 daily closes")
    snap = snapshot(balances, *books)
    from_snapshot = line(_plan(config(three, **REGION), type(snap)(**{**_fields(snap), "covariance": cov})), "BTC")
    assert from_snapshot.region is not None and from_snapshot.region.risk_source == "trailing 90 daily closes"
    assert abs(from_snapshot.threshold - correlated.threshold) < D("1e-9")  # 0.8 * 0.03 * 0.04 = 0.00096


def test_the_plan_json_carries_the_region_and_reads_back() -> None:
    cfg = config(TWO, **REGION)
    p = _plan(cfg, snapshot({"BTC": "6", "USDC": "400"}, market("BTC", [("99", "10")], [("101", "10")])))
    doc = p.to_dict()
    region = doc["assets"][0]["region"]
    assert set(region) == {"half_width", "uncorrected_half_width", "cost_rate", "risk_source"}
    assert doc["policy"] == "no-trade-region" and doc["assets"][1]["region"] is None  # the quote has none
    assert Plan.from_dict(doc).assets[0].region == p.assets[0].region.__class__(
        *(D(region[k]) for k in ("half_width", "uncorrected_half_width", "cost_rate")), region["risk_source"]
    )


def test_without_volatility_the_region_uses_the_target_weight_alone_and_says_so() -> None:
    cfg = config(TWO, **REGION)
    p = _plan(cfg, snapshot({"BTC": "6", "USDC": "400"}, market("BTC", [("99", "10")], [("101", "10")], vol=None)))
    btc = line(p, "BTC")
    k = 0.01099 / 0.99  # a sell: drift is negative
    # sized for trades to half the width; no interval correction
    assert abs(float(btc.threshold) - (6 * k * 0.0625 / (5 * 1.5 * 1.25)) ** (1 / 3)) < 1e-9
    assert any("target weights alone" in n for n in p.notes)


def _fields(snap):  # type: ignore[no-untyped-def]
    return {f: getattr(snap, f) for f in snap.__dataclass_fields__}
