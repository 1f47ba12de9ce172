"""The backtest: replays through `planner.plan` and the paper fill rule, figures checked by hand, the screen
that skips idle steps checked against planning every step, and the CLI around it."""

from __future__ import annotations

import json
import math
import statistics
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from rebalancer_cli.cli import main
from rebalancer_cli.config import Config, load_config
from rebalancer_cli.planner import FixedThreshold, Policy, ToTarget, needs_book, plan
from rebalancer_cli.simulation import replay as bt
from rebalancer_cli.simulation.books import BookModel
from rebalancer_cli.simulation.csvfile import load_prices
from rebalancer_cli.simulation.generate import REGIMES, generate_prices
from rebalancer_cli.simulation.series import PriceSeries

ROOT = Path(__file__).resolve().parent.parent
TREASURY = ROOT / "examples" / "treasury.yaml"
HOURLY = ROOT / "examples" / "prices.csv"
DAILY_2022 = ROOT / "tests" / "data" / "btc-eth-daily-2022.csv"
START = datetime(2025, 1, 1, tzinfo=UTC)
D = Decimal


def two_asset_config(max_deviation: str = "0.5", **extra: Any) -> Config:
    data: dict[str, Any] = {
        "portfolio_id": "bt",
        "base_threshold": D("0.01"),
        "volatility_factor": D("0.5"),
        "safety_margin": D("1.5"),
        "max_trades_per_cycle": 10,
        "quote": "USDC",
        "assets": [
            {"symbol": "BTC", "target_weight": D("0.5"), "max_deviation": D(max_deviation)},
            {"symbol": "USDC", "target_weight": D("0.5"), "max_deviation": D(max_deviation)},
        ],
        "exchange": {"id": "paper", "snapshot": "not-used.yaml"},
    }
    data.update(extra)
    return Config.model_validate(data)


RULES = {"BTC": bt.MarketRules(D("0.002"), D("0.0001"), D("10"), "test")}
# one level holding far more than any order: bid and ask sit exactly 0.1% (10 bps) from the mid
ONE_LEVEL = BookModel(spread_bps=D(20), levels=1, depth_quote=D("1e9"))


def hourly(*closes: str) -> PriceSeries:
    return PriceSeries.from_decimals(
        [int(START.timestamp()) + 3600 * i for i in range(len(closes))],
        {"BTC": [D(c) for c in closes]},
    )


def fill_key(r: bt.BacktestResult) -> list[tuple[Any, ...]]:
    return [(f.step, f.symbol, f.side, f.amount, f.filled, f.notional, f.fee, f.slippage) for f in r.fills]


# --- figures by hand ---------------------------------------------------------------------------------------


def test_a_flat_series_trades_nothing_under_any_policy() -> None:
    config = load_config(TREASURY)
    flat = PriceSeries.from_decimals(
        [int(START.timestamp()) + 3600 * i for i in range(24 * 40)],
        {"BTC": [D("65000.00")] * (24 * 40), "ETH": [D("3500.00")] * (24 * 40)},
    )
    replay = bt.Replay(config, flat)
    for policy in bt.named_policies(config).values():
        r = bt.run_backtest(config, replay, policy=policy)
        assert (r.trades, r.turnover, r.total_cost) == (0, 0, 0), policy.name
        assert r.max_drift < D("1e-9") and r.tracking_error == 0
        assert abs(r.final_value - bt.DEFAULT_INITIAL_VALUE) < D("1e-18")
        # the live tool would still have checked: balances + best bid/ask at every check, nothing else
        checks = 1 if policy.every_seconds else len(flat)  # 40 days: one 30-day calendar date
        assert r.api_calls == 2 * checks, policy.name


def test_fees_slippage_and_drift_of_a_hand_computed_series() -> None:
    config = two_asset_config()
    band = Policy(FixedThreshold(D("0.05")), ToTarget(), None, name="band")
    r = bt.run_backtest(
        config,
        hourly("100.00", "100.00", "160.00", "80.00", "80.00"),
        policy=band,
        book_model=ONE_LEVEL,
        rules=RULES,
        initial_value=D(1000),
    )
    # start: 1000 USDC at 50/50 and BTC 100 -> 5 BTC + 500 USDC
    # step 2, BTC 160: BTC worth 800 of 1300, drift 0.5 - 800/1300 = -150/1300 -> sell 150 USDC worth = 0.9375 BTC
    #   at the bid 159.84: notional 149.85, fee 0.002 * 149.85 = 0.2997 USDC, slippage 0.9375 * 0.16 = 0.15
    #   -> 4.0625 BTC, 500 + 149.85 - 0.2997 = 649.5503 USDC
    # step 3, BTC 80: BTC worth 325, total 974.5503, buy 0.5 * 974.5503 - 325 = 162.27515 USDC worth
    #   = 2.028439375 BTC, down to the 0.0001 lot: 2.0284 at the ask 80.08: notional 162.434272;
    #   fee 0.002 * 2.0284 = 0.0040568 BTC (charged in BTC), worth 0.324544 at the mid; slippage 2.0284 * 0.08
    #   -> 4.0625 + 2.0284 - 0.0040568 = 6.0868432 BTC, 649.5503 - 162.434272 = 487.116028 USDC
    assert [(f.step, f.side, f.amount, f.notional, f.fee, f.fee_currency) for f in r.fills] == [
        (2, "sell", D("0.9375"), D("149.85"), D("0.2997"), "USDC"),
        (3, "buy", D("2.0284"), D("162.434272"), D("0.0040568"), "BTC"),
    ]
    assert r.fees == D("0.2997") + D("0.324544")
    assert r.slippage == D("0.15") + D("0.162272")
    assert r.total_cost == D("0.936516")
    assert r.turnover == D("149.85") + D("162.434272")
    assert r.final_balances == {"BTC": D("6.0868432"), "USDC": D("487.116028")}
    # the cost is exactly the mid value the trades lost: 974.5503 before the buy, minus its cost
    assert r.final_value == D("974.5503") - D("0.324544") - D("0.162272") == D("974.063484")

    # total drift sum |target - weight| before trading: 0, 0, then 2 * 150/1300, 2 * 162.27515/974.5503,
    # then the post-buy holdings at 80: 2 * |0.5 - 486.947456/974.063484|
    drifts = [0.0, 0.0, 300 / 1300, 2 * 162.27515 / 974.5503, 2 * abs(0.5 - 486.947456 / 974.063484)]
    assert float(r.mean_drift) == pytest.approx(sum(drifts) / 5, abs=1e-11)
    assert float(r.max_drift) == pytest.approx(2 * 162.27515 / 974.5503, abs=1e-11)
    # tracking: the weights carried into a step times the step's returns, against 50/50. Only step 3 differs:
    # it carries 650 BTC of 1299.5503 (after the step 2 sale, at 160) into a -50% BTC move.
    diffs = [0.0, 0.0, (650 / 1299.5503 - 0.5) * -0.5, 0.0]
    assert float(r.tracking_error) == pytest.approx(statistics.stdev(diffs) * math.sqrt(8760), rel=1e-9)
    # 5 checks x 2 calls, + BTC book on steps 2 and 3, + 2 orders, + 2 balance reads after executing
    assert r.api_calls == 10 + 2 + 2 + 2
    assert (r.trades, r.rejected, r.plans) == (2, 0, 2)


# --- the same code path as `plan` ----------------------------------------------------------------------------


def test_every_planned_step_decides_what_plan_decides_on_the_same_snapshot() -> None:
    config = load_config(TREASURY)
    prices = load_prices(HOURLY).slice(0, 400)
    replay = bt.Replay(config, prices)
    policy = bt.named_policies(config)["cost-adjusted"]
    seen: list[bt.PlanStep] = []
    result = bt.run_backtest(config, replay, policy=policy, on_plan=seen.append)
    traded = [s for s in seen if s.plan.trades]
    assert len(traded) > 50 and len(seen) < len(prices)
    fills = {(f.step, f.symbol): f for f in result.fills}
    for step in seen:
        # the live read: best bid and ask of every market, then full books where the planner's screen passes
        balances = step.snapshot.balances
        tops = replay.snapshot(step.step, balances, books=())
        assert step.books == needs_book(config, tops, step.state, now=tops.taken_at, policy=policy.policy)
        assert replay.with_books(tops, step.step, step.books) == step.snapshot
        # `plan` on that snapshot, and on one with every book in full, decides what the backtest did
        for snapshot in (step.snapshot, replay.snapshot(step.step, balances)):
            direct = plan(
                config, snapshot, step.state, now=snapshot.taken_at, policy=policy.policy, key_factory=lambda: "k"
            )
            assert [(a.symbol, a.decision, a.reason, a.drift) for a in direct.assets] == [
                (a.symbol, a.decision, a.reason, a.drift) for a in step.plan.assets
            ]
            assert [(t.market, t.side, t.amount, t.notional, t.est_fee) for t in direct.trades] == [
                (t.market, t.side, t.amount, t.notional, t.est_fee) for t in step.plan.trades
            ]
        # and each trade filled on paper for the amount planned, at the book's price
        for t in step.plan.trades:
            f = fills[(step.step, t.symbol)]
            assert (f.side, f.amount, f.notional) == (t.side, t.amount, t.notional)


def test_the_screen_never_changes_a_decision() -> None:
    # minute bars of the volatile regime, where cooldowns run out and hysteresis holds and re-arms
    config = load_config(TREASURY)
    prices = generate_prices(
        assets={"BTC": D("65000"), "ETH": D("3500")},
        steps=1200,
        step_seconds=60,
        seed=5,
        regime=REGIMES["volatile"],
        start=START,
    )
    # plus, on the daily closes of 2022, a hard band close to a sticky trigger (0.02 * 1.5) and a 2-day cooldown
    tight = two_asset_config(max_deviation="0.035")
    daily = load_prices(DAILY_2022)
    sticky = Policy(FixedThreshold(D("0.02")), ToTarget(), None, hysteresis=D("0.5"), cooldown_seconds=D(2 * 86400))
    named = bt.named_policies(config)
    cases = [
        (config, prices, named[n])
        for n in ("config", "cost-adjusted-edge-half", "tolerance-band", "band-edge", "calendar")
    ]
    cases.append((tight, daily, bt.BacktestPolicy("sticky", sticky)))
    # no-trade regions: their width moves with each step's book, which the screen must allow for
    cases.append((config, prices, named["no-trade-region-edge"]))
    tight_named = bt.named_policies(tight, check_seconds=daily.step_seconds)
    cases += [(tight, daily, tight_named[n]) for n in ("no-trade-region", "no-trade-region-edge")]
    rules = {"BTC": bt.MarketRules(D("0.001"), D("0.00001"), D("5"), "test")}
    held = 0
    for cfg, series, policy in cases:
        replay = bt.Replay(cfg, series, rules=rules if cfg is tight else None)
        planned: list[bt.PlanStep] = []
        every = bt.run_backtest(cfg, replay, policy=policy, prescreen=False, on_plan=planned.append)
        screened = bt.run_backtest(cfg, replay, policy=policy)
        assert fill_key(screened) == fill_key(every), policy.name
        assert screened.final_balances == every.final_balances
        assert (screened.api_calls, screened.mean_drift, screened.tracking_error) == (
            every.api_calls,
            every.mean_drift,
            every.tracking_error,
        )
        if not policy.every_seconds:
            assert screened.plans < every.plans == len(series), policy.name  # the screen did skip steps
        reasons = {a.reason for step in planned for a in step.plan.assets}
        held += any(r in reasons for r in ("held by hysteresis", "held by cooldown", "hard band breached"))
    assert held >= 2  # hysteresis, cooldown and hard band paths were really exercised


# --- known results ----------------------------------------------------------------------------------------


def test_band_edge_and_tolerance_bands_beat_the_calendar_as_published() -> None:
    config = load_config(TREASURY)
    replay = bt.Replay(config, load_prices(HOURLY))
    named = bt.named_policies(config)
    r = {
        n: bt.run_backtest(config, replay, policy=named[n]) for n in ("calendar", "band", "band-edge", "tolerance-band")
    }
    # Leland 1996: trading to the band's edge cuts turnover sharply against periodic rebalancing ...
    assert r["band-edge"].turnover < r["calendar"].turnover / 2
    # ... at a similar tracking error (here lower)
    assert r["band-edge"].tracking_error < r["calendar"].tracking_error * D("1.1")
    # Daryanani 2008: a wide trigger band trading back to a tolerance band beats the calendar on cost and drift
    assert r["tolerance-band"].total_cost < r["calendar"].total_cost
    assert r["tolerance-band"].tracking_error < r["calendar"].tracking_error
    # and trades less than going all the way back to target from the same band
    assert r["tolerance-band"].turnover < r["band"].turnover


# --- CLI ------------------------------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_json_gives_every_figure_of_every_policy_asked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    prices = tmp_path / "prices.csv"
    prices.write_text("\n".join(HOURLY.read_text().splitlines()[:1001]) + "\n")  # header + 1000 hours
    code, out, err = run_cli(
        capsys,
        "backtest",
        "--config",
        str(TREASURY),
        "--prices",
        str(prices),
        "-p",
        "band",
        "-p",
        "cost-adjusted",
        "--json",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["portfolio_id"] == "treasury-v1" and doc["quote"] == "USDC"
    assert doc["prices"]["steps"] == 1000 and doc["prices"]["step_seconds"] == 3600
    assert doc["market_model"]["markets"]["BTC"]["taker_fee"] == "0.001"
    assert [r["policy"] for r in doc["results"]] == ["band", "cost-adjusted"]
    expected = {
        "policy",
        "description",
        "steps",
        "trades",
        "rejected_orders",
        "turnover",
        "fees",
        "slippage",
        "total_cost",
        "cost_ratio",
        "mean_drift",
        "max_drift",
        "tracking_error",
        "api_calls",
        "plans",
        "initial_value",
        "final_value",
        "final_balances",
        "certainty_equivalent_loss",
        "mean_value",
        "years",
    }
    assert doc["risk_aversion"] == "5"
    for r in doc["results"]:
        assert set(r) == expected
        # L(5) = cost / (years * mean value) + 5/2 * TE^2, in bp a year, with its parts
        loss = r["certainty_equivalent_loss"]
        cost_bp = D(r["total_cost"]) / (D(r["years"]) * D(r["mean_value"])) * 10_000
        tracking_bp = D(5) / 2 * D(r["tracking_error"]) ** 2 * 10_000
        assert abs(D(loss["cost_rate_bp"]) - cost_bp) < D("0.001")
        assert abs(D(loss["tracking_bp"]) - tracking_bp) < D("0.001")
        assert abs(D(loss["bp_per_year"]) - D(loss["cost_rate_bp"]) - D(loss["tracking_bp"])) <= D("0.0002")
        assert set(loss["at"]) == {"1", "20"} and D(loss["at"]["20"]) >= D(loss["at"]["1"])
        # money and ratios are decimal strings, so that no reader rounds them through a float
        assert all(isinstance(r[k], str) and D(r[k]) >= 0 for k in ("turnover", "fees", "total_cost", "tracking_error"))
        assert D(r["total_cost"]) == D(r["fees"]) + D(r["slippage"])
    assert doc["results"][1]["trades"] > doc["results"][0]["trades"]


def test_a_bad_prices_file_is_exit_2_with_its_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    prices = tmp_path / "bad.csv"
    prices.write_text("timestamp,BTC,ETH\n2025-01-01T00:00:00Z,65000,3500\n2025-01-01T01:00:00Z,abc,3500\n")
    code, out, err = run_cli(capsys, "backtest", "--config", str(TREASURY), "--prices", str(prices))
    assert code == 2 and out == ""
    assert f"{prices}:3:22" in err and "not a number" in err


def test_a_prices_file_without_a_configured_asset_is_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    prices = tmp_path / "btc-only.csv"
    prices.write_text("timestamp,BTC\n2025-01-01T00:00:00Z,65000\n2025-01-01T01:00:00Z,65100\n")
    code, _, err = run_cli(capsys, "backtest", "--config", str(TREASURY), "--prices", str(prices))
    assert code == 2 and "no prices for ETH" in err


def test_unknown_policy_and_missing_files_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "backtest", "--config", str(TREASURY), "--prices", str(HOURLY), "-p", "yolo")
    assert code == 2 and "unknown policy yolo" in err and "tolerance-band" in err
    code, _, err = run_cli(capsys, "backtest", "--config", str(TREASURY))
    assert code == 2 and "--prices" in err


def test_generate_writes_the_seeded_scenario(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_file = tmp_path / "volatile.csv"
    code, _, err = run_cli(
        capsys,
        "backtest",
        "generate",
        "--regime",
        "volatile",
        "--steps",
        "500",
        "--step",
        "1h",
        "--seed",
        "7",
        "-o",
        str(out_file),
    )
    assert code == 0, err
    loaded = load_prices(out_file)
    again = generate_prices(
        assets={"BTC": D("65000"), "ETH": D("3500")},
        steps=500,
        step_seconds=3600,
        seed=7,
        regime=REGIMES["volatile"],
        start=START,
    )
    assert loaded.raw("BTC") == again.raw("BTC") and loaded.timestamps == again.timestamps
    code, _, err = run_cli(capsys, "backtest", "generate", "--regime", "sideways", "-o", str(out_file))
    assert code == 2 and "calm, trending, volatile" in err


def test_table_and_chart(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    chart = tmp_path / "chart.png"
    code, out, err = run_cli(
        capsys,
        "backtest",
        "--config",
        str(TREASURY),
        "--prices",
        str(HOURLY),
        "-p",
        "calendar",
        "-p",
        "band-edge",
        "--chart",
        str(chart),
    )
    assert code == 0, err
    assert "calendar" in out and "band-edge" in out and "TE/yr" in out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_book_flags_change_the_cost(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("backtest", "--config", str(TREASURY), "--prices", str(HOURLY), "-p", "band", "--json")
    _, narrow, _ = run_cli(capsys, *args)
    _, wide, _ = run_cli(capsys, *args, "--spread-bps", "40", "--fee", "0.002")
    a, b = json.loads(narrow)["results"][0], json.loads(wide)["results"][0]
    assert D(b["slippage"]) > D(a["slippage"]) and D(b["fees"]) > D(a["fees"])
    assert json.loads(wide)["market_model"]["markets"]["ETH"] == {
        "taker_fee": "0.002",
        "amount_step": "0.0001",
        "min_notional": "5",
        "fee_source": "--fee",
    }
