"""Planner scenarios computed by hand; the arithmetic is written next to each expectation."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from plan_helpers import T0, config, keys, market, snapshot

from rebalancer_cli import planner as P
from rebalancer_cli.errors import PlanningError
from rebalancer_cli.planner import AssetMemory, PlannerState, plan

D = Decimal
TWO = [("BTC", "0.5", "0.2"), ("USDC", "0.5", "0.2")]


def _plan(cfg, snap, state=None, now=None):  # type: ignore[no-untyped-def]
    gen = keys()
    return plan(cfg, snap, state, now=now, key_factory=lambda: next(gen))


def line(p, symbol):  # type: ignore[no-untyped-def]
    return next(a for a in p.assets if a.symbol == symbol)


def test_sell_back_to_target_arithmetic() -> None:
    # BTC 6 @ mid (99+101)/2 = 100 -> 600; USDC 400; total 1000.
    # weight 0.6, drift 0.5 - 0.6 = -0.1; threshold 0.01 * (1 + 0.5 * 0.02) = 0.0101
    # drift_value = 0.1 * 1000 * 0.5 = 50; sell 100 USDC worth = 1.00 BTC at the 99 bid:
    # notional 99, fee 0.001 * 99 = 0.099, slippage |99 - 100| * 1 = 1, cost 1.099; 50 > 1.5 * 1.099 -> trade
    cfg = config(TWO)
    snap = snapshot({"BTC": "6", "USDC": "400"}, market("BTC", [("99", "10")], [("101", "10")]))
    p = _plan(cfg, snap)
    btc = line(p, "BTC")
    assert p.total_value == D(1000)
    assert btc.current_weight == D("0.6")
    assert btc.drift == D("-0.1")
    assert btc.threshold == D("0.0101")
    assert btc.drift_value == D(50)
    assert btc.est_cost == D("1.099")
    assert btc.decision == "trade"
    (t,) = p.trades
    assert (t.side, t.amount, t.est_price, t.notional, t.est_fee, t.est_slippage) == (
        "sell",
        D("1.00"),
        D(99),
        D(99),
        D("0.099"),
        D(1),
    )
    # drift before: |-0.1| + |0.1| = 0.2
    # after: BTC 500, USDC 400 + 99 - 0.099 = 498.901, total 998.901
    #   |0.5 - 500/998.901| + |0.5 - 498.901/998.901| = 2 * (500/998.901 - 0.5)
    assert p.summary.drift_before == D("0.2")
    expected_after = 2 * (D(500) / D("998.901") - D("0.5"))
    assert abs(p.summary.drift_after - expected_after) < D("1e-20")
    assert p.summary.turnover == D(99)
    assert p.summary.est_total_cost == D("1.099")
    assert line(p, "USDC").reason == P.IS_QUOTE


def test_cost_exceeds_benefit_holds() -> None:
    # BTC 5.2 @ mid 100 = 520, USDC 480: drift -0.02, threshold 0.0101 -> above it.
    # drift_value = 0.02 * 1000 * 0.5 = 10. Sell 0.2 BTC into a bid at 50 (ask 150, mid 100):
    # slippage 50 * 0.2 = 10, fee 0.001 * 10 = 0.01, cost 10.01; 1.5 * 10.01 > 10 -> hold.
    cfg = config(TWO)
    snap = snapshot({"BTC": "5.2", "USDC": "480"}, market("BTC", [("50", "10")], [("150", "10")], min_notional="1"))
    p = _plan(cfg, snap)
    assert line(p, "BTC").decision == "hold"
    assert line(p, "BTC").reason == P.COST_EXCEEDS_BENEFIT
    assert line(p, "BTC").est_cost == D("10.01")
    assert p.trades == ()


def test_hard_band_trades_whatever_the_cost() -> None:
    # same thin book, but drift -0.3 breaches max_deviation 0.2: trade regardless of cost
    cfg = config(TWO)
    snap = snapshot({"BTC": "8", "USDC": "200"}, market("BTC", [("50", "100")], [("150", "100")], min_notional="1"))
    p = _plan(cfg, snap)
    assert line(p, "BTC").reason == "hard band breached"
    assert p.trades[0].amount == D("3.00")  # 0.3 * 1000 / 100


def test_below_threshold_and_volatility_widens_it() -> None:
    # drift -0.012: above base 0.01, but volatility 0.5 widens it to 0.01 * (1 + 0.5 * 0.5) = 0.0125
    cfg = config(TWO)
    calm = snapshot({"BTC": "5.12", "USDC": "488"}, market("BTC", [("99.9", "100")], [("100.1", "100")], vol="0"))
    wild = snapshot({"BTC": "5.12", "USDC": "488"}, market("BTC", [("99.9", "100")], [("100.1", "100")], vol="0.5"))
    assert line(_plan(cfg, calm), "BTC").decision == "trade"
    held = line(_plan(cfg, wild), "BTC")
    assert (held.threshold, held.reason) == (D("0.0125"), P.BELOW_THRESHOLD)


def test_missing_volatility_counts_as_zero_and_says_so() -> None:
    cfg = config(TWO)
    snap = snapshot({"BTC": "5", "USDC": "500"}, market("BTC", [("99", "1")], [("101", "1")], vol=None))
    p = _plan(cfg, snap)
    assert line(p, "BTC").threshold == D("0.01")
    assert any("volatility unknown" in n for n in p.notes)


def test_trade_larger_than_book_is_capped_and_says_so() -> None:
    # sell 3 BTC wanted (drift -0.3 of 1000 at mid 100) but bids hold 0.5 + 1 = 1.5
    cfg = config(TWO)
    snap = snapshot(
        {"BTC": "8", "USDC": "200"}, market("BTC", [("99", "0.5"), ("98", "1")], [("101", "5")], min_notional="1")
    )
    p = _plan(cfg, snap)
    (t,) = p.trades
    assert t.amount == D("1.5")
    assert t.notional == D("99") * D("0.5") + D("98")  # 49.5 + 98 = 147.5
    assert "capped at visible book depth" in line(p, "BTC").reason


def test_below_min_notional_is_dropped() -> None:
    # drift -0.02 -> sell 0.2 BTC ~ 19.8 USDC, below a min notional of 50
    cfg = config(TWO)
    snap = snapshot({"BTC": "5.2", "USDC": "480"}, market("BTC", [("99", "10")], [("101", "10")], min_notional="50"))
    p = _plan(cfg, snap)
    assert line(p, "BTC").reason == P.BELOW_MIN_NOTIONAL
    assert p.trades == ()


def test_lot_size_rounds_down() -> None:
    # sell value 0.1 * 1000 = 100 -> 1/0.3 = 0.333.. lots of 0.3 at mid 100 ... amount 1.0 -> 0.9 with a 0.3 step
    cfg = config(TWO)
    snap = snapshot({"BTC": "6", "USDC": "400"}, market("BTC", [("99", "10")], [("101", "10")], step="0.3"))
    assert _plan(cfg, snap).trades[0].amount == D("0.9")


def test_never_sells_more_than_free() -> None:
    # 6 BTC held but only 0.5 free (5.5 locked in an open order): the sell is capped at 0.5
    cfg = config(TWO)
    snap = snapshot({"BTC": "0.5", "USDC": "400"}, market("BTC", [("99", "10")], [("101", "10")]))
    snap = type(snap)(taken_at=snap.taken_at, balances=snap.balances, markets=snap.markets, locked={"BTC": D("5.5")})
    p = _plan(cfg, snap)
    assert p.total_value == D(1000)
    assert p.trades[0].amount == D("0.5")


def test_sells_before_buys_and_buys_fit_the_quote() -> None:
    # BTC under target, ETH over, no free USDC: ETH sells first and funds the BTC buy.
    cfg = config([("BTC", "0.5", "0.5"), ("ETH", "0.5", "0.5"), ("USDC", "0", "0.5")])
    snap = snapshot(
        {"BTC": "3", "ETH": "7", "USDC": "0"},
        market("BTC", [("99", "100")], [("101", "100")], min_notional="1"),
        market("ETH", [("99", "100")], [("101", "100")], min_notional="1"),
    )
    p = _plan(cfg, snap)
    assert [t.side for t in p.trades] == ["sell", "buy"]
    sell, buy = p.trades
    # sell 2 ETH at 99 = 198, fee 0.198 -> 197.802 USDC free; buy wanted 2 BTC at 101 = 202 + 0.202 fee > 197.802
    assert sell.amount == D("2.00")
    spend = buy.notional + buy.est_fee
    assert spend <= sell.notional - sell.est_fee
    # scaled: 2 * 197.802 / 202.202 = 1.9564.. -> 1.95 lots
    assert buy.amount == D("1.95")


def test_max_trades_keeps_largest_drift_values() -> None:
    cfg = config(
        [("A", "0.25", "1"), ("B", "0.25", "1"), ("C", "0.25", "1"), ("USDC", "0.25", "1")], max_trades_per_cycle=1
    )
    book = ([("99.99", "1000")], [("100.01", "1000")])
    snap = snapshot(
        {"A": "3", "B": "4", "C": "2.5", "USDC": "0.5"}, *(market(s, *book, min_notional="1") for s in "ABC")
    )
    p = _plan(cfg, snap)
    # values A 300 B 400 C 250 USDC 0.5: B drifts most (0.25 - 400/950.5)
    assert [t.symbol for t in p.trades] == ["B"]
    assert line(p, "A").reason == P.MAX_TRADES


def test_band_edge_trades_only_to_the_edge() -> None:
    # drift -0.1, threshold 0.0101: band_edge leaves -0.0101 of drift, so sells (0.1 - 0.0101) * 1000 = 89.9 USDC
    cfg = config(TWO, rebalance_to="band_edge")
    snap = snapshot({"BTC": "6", "USDC": "400"}, market("BTC", [("99", "10")], [("101", "10")]))
    assert _plan(cfg, snap).trades[0].amount == D("0.89")  # 0.899 rounded down to 0.01


def test_missing_market_names_the_asset() -> None:
    cfg = config([("BTC", "0.5", "0.2"), ("ETH", "0.2", "0.2"), ("USDC", "0.3", "0.2")])
    snap = snapshot({"BTC": "1", "USDC": "1"}, market("BTC", [("99", "1")], [("101", "1")]))
    with pytest.raises(PlanningError, match="ETH/USDC"):
        _plan(cfg, snap)


def test_worthless_portfolio_is_an_error_not_a_division() -> None:
    cfg = config(TWO)
    snap = snapshot({"BTC": "0", "USDC": "0"}, market("BTC", [("99", "1")], [("101", "1")]))
    with pytest.raises(PlanningError, match="worth 0"):
        _plan(cfg, snap)


def test_hysteresis_holds_until_rearmed() -> None:
    # threshold 0.0101, hysteresis 0.5: trigger above 0.01515, re-arm below 0.00505
    cfg = config(TWO, hysteresis="0.5")
    book = market("BTC", [("99.99", "100")], [("100.01", "100")], min_notional="1")
    drift_2pct = snapshot({"BTC": "5.2", "USDC": "480"}, book)
    drift_1_2pct = snapshot({"BTC": "5.12", "USDC": "488"}, book)
    disarmed = PlannerState({"BTC": AssetMemory(armed=False)})
    assert line(_plan(cfg, drift_1_2pct), "BTC").reason == P.BELOW_THRESHOLD  # 0.012 < 0.01515
    assert line(_plan(cfg, drift_2pct), "BTC").decision == "trade"
    assert line(_plan(cfg, drift_2pct, disarmed), "BTC").reason == P.HYSTERESIS
    near = snapshot({"BTC": "5.03", "USDC": "497"}, book)  # drift 0.003 < 0.00505: re-arms
    p = _plan(cfg, near, disarmed)
    assert line(p, "BTC").rearm
    assert disarmed.after(p, set(), T0).of("BTC").armed


def test_cooldown_holds_unless_hard_band() -> None:
    cfg = config(TWO, cooldown="15m")
    book = market("BTC", [("99.99", "100")], [("100.01", "100")], min_notional="1")
    recent = PlannerState({"BTC": AssetMemory(last_trade_at=T0 - timedelta(minutes=5))})
    old = PlannerState({"BTC": AssetMemory(last_trade_at=T0 - timedelta(minutes=20))})
    drift = snapshot({"BTC": "5.5", "USDC": "450"}, book)
    assert line(_plan(cfg, drift, recent), "BTC").reason == P.COOLDOWN
    assert line(_plan(cfg, drift, old), "BTC").decision == "trade"
    breach = snapshot({"BTC": "8", "USDC": "200"}, book)
    assert line(_plan(cfg, breach, recent), "BTC").decision == "trade"


def test_state_after_execution_starts_cooldown_and_disarms_only_at_the_band_edge() -> None:
    snap = snapshot({"BTC": "6", "USDC": "400"}, market("BTC", [("99", "10")], [("101", "10")]))
    # back to target: the drift left (0) is inside the re-arm band, so the asset stays armed
    to_target = _plan(config(TWO, hysteresis="0.2", cooldown="60"), snap)
    state = PlannerState().after(to_target, {"BTC"}, T0)
    assert state.of("BTC") == AssetMemory(armed=True, last_trade_at=T0)
    # to the band's edge: the drift left (the threshold) is above threshold * (1 - h): disarmed
    to_edge = _plan(config(TWO, hysteresis="0.2", cooldown="60", rebalance_to="band_edge"), snap)
    state = PlannerState().after(to_edge, {"BTC"}, T0)
    assert state.of("BTC") == AssetMemory(armed=False, last_trade_at=T0)
    assert PlannerState.from_json(state.to_json()) == state


def test_plan_is_deterministic_given_inputs() -> None:
    cfg = config(TWO)
    snap = snapshot({"BTC": "6", "USDC": "400"}, market("BTC", [("99", "10")], [("101", "10")]))
    assert _plan(cfg, snap).to_dict() == _plan(cfg, snap).to_dict()


def test_needs_book_is_the_cheap_screen() -> None:
    cfg = config([("BTC", "0.4", "0.2"), ("ETH", "0.3", "0.2"), ("USDC", "0.3", "0.2")])
    book = ([("99.99", "100")], [("100.01", "100")])
    snap = snapshot({"BTC": "4", "ETH": "2", "USDC": "400"}, market("BTC", *book), market("ETH", *book))
    # BTC at target (0.4), ETH at 0.2 (drift 0.1): only ETH needs its book
    assert P.needs_book(cfg, snap) == {"ETH/USDC"}
