"""Choose the default policy from evidence: every backtest policy on the example portfolio (examples/treasury.yaml),
judged by the certainty-equivalent loss L(gamma) = cost / (years * mean value) + (gamma/2) * TE^2 (bp a year), with
cvxportfolio's single-period optimizer beside them as an outside anchor.

Scenarios: calm, trending and volatile (with jumps) generated at the daemon's cadence (one-minute checks, 90
days) and at an hourly cron's (one year); the real daily BTC and ETH closes of 2017-11-09 to 2025-07-04
(examples/btc-eth-daily.csv; ../shared/data/btc-eth-daily.csv is run too when it differs) checked once a day.
Start: 100,000 USDC at target weights. Books: the square-root-law book (`--market-model sqrt-law`, the CLI's
default) and the conservative one, to show the ranking holds on both.

The rule: the default is the policy with the lowest L(gamma) at the config's risk_aversion, summed over the
scenarios as multiples of the original cost-adjusted rule's (each scenario counts once whatever its length),
among the policies never worse than cost-adjusted in any scenario.

The anchor (the `bench` extra: pip install -e '.[bench]'): cvxportfolio's `SinglePeriodOptimization` toward the
same targets (benchmark = the target weights), run inside OUR replay, not in cvxportfolio's simulator. At every
step of the scenario (from the same start, over the same period) it is given the replay's holdings at mid and
the returns before the step: the rows `cvxportfolio.UserProvidedMarketData.serve(t)` hands a policy (the bench
checks they are equal; nothing downloaded, no look-ahead: a return at t is held from t to t+1, so the newest it
sees ends at the step's close). The trades it asks for (value per asset) are rounded down to the lot, dropped
below the market's minimum notional (the live tool would not send them), sent sells first, and filled by the
replay's own `_Run._fill`: paper_fill on the step's full synthetic book, fee + spread + impact, exactly as every
policy's trades. Tracking error, cost, L, trades and median order then come from the same `BacktestResult` as
the policies'. (The policy is initialised once and then asked with `values_in_time_recursive`, the call
`Policy.execute` makes after re-compiling the problem and re-estimating everything from scratch, which it does
at every call: too slow for 100,000 steps; the answers agree to the solver's tolerance.)

Its optimizer knows the replay's cost shape: `TransactionCost(a, b, sigma, volume_hat)` with a = taker fee +
half spread of the step's book, and the 3/2-power impact b sigma |x|^1.5 / sqrt(V) with b = 2/3 * SQRT_LAW_Y
(an order walking a square-root-law book pays about two thirds of its last price's distance), sigma the
replay's daily volatility (the one that widens the books, from the days before) scaled to a step, and V the
volume the book's depth implies: fitted each day so that the predicted cost of a 100,000 order equals what
paper_fill charges for it on that day's book. The bench prints, per scenario, the mean predicted and charged
cost of an order of the anchor's median size and of 100,000.

Its risk term is FullCovariance (trailing per-step returns) times m * gamma/2 * (steps in a day): m days of the
covariance, so that a setting means the same at minute, hourly and daily checks (a single-period optimizer
pays a correction's cost at once and counts its benefit for one step; m stands in for the days the correction
lasts; at daily checks this is the per-step setting of before). m = 10, 100, 1000; the anchor's number is the
best of them. It trades from the step with COVARIANCE_MIN_DAYS returns or a day of them, whichever is more
(before that it holds the opening target weights).

A step of the anchor takes about 3 ms (cvxportfolio's estimators and one solve), so at one-minute checks it
runs on the first `--cvx-minute-days` days of each minute scenario, and the policies are run again on exactly
that window for its table and goal line (labelled "first N d"); the hourly and daily scenarios are compared
over their whole length. The runs go side by side on `--jobs` processes.

    python bench/policy_compare.py [--seed 1] [--minute-days 90] [--cvx-minute-days 60] [--no-cvx] [--jobs 2]
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

from rebalancer_cli.config import Config, load_config
from rebalancer_cli.exchange.paper import paper_fill
from rebalancer_cli.simulation.books import SQRT_LAW_SIGMA, SQRT_LAW_Y, BookModel, market_model
from rebalancer_cli.simulation.csvfile import load_prices
from rebalancer_cli.simulation.generate import EXAMPLE_START_PRICES, REGIMES, generate_prices
from rebalancer_cli.simulation.policies import BacktestPolicy
from rebalancer_cli.simulation.replay import (
    COVARIANCE_MIN_DAYS,
    DAY,
    DEFAULT_INITIAL_VALUE,
    BacktestResult,
    Replay,
    _Run,
    named_policies,
    run_backtest,
)
from rebalancer_cli.simulation.series import PriceSeries
from rebalancer_cli.snapshot import Market

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "cost-adjusted"
START = datetime(2025, 1, 1, tzinfo=UTC)
# the anchor's risk settings: m days of covariance times gamma/2 (see the docstring)
CVX_RISK = (10.0, 100.0, 1000.0)
# the 3/2-power impact's coefficient, and the order its depth-implied volume is fitted to
CVX_B = 2 / 3 * float(SQRT_LAW_Y)
CVX_FIT_NOTIONAL = Decimal(100_000)
# at one-minute checks the anchor runs on the first days of the scenario (a solve a step; see the docstring)
CVX_MINUTE_DAYS = 60
# goals of issue 11
REAL_GOAL = Decimal("0.45")
GENERATED_GOAL = Decimal("0.25")
# the second book is replayed for these, to show the ranking does not hang on the book
ROBUSTNESS = ("cost-adjusted", "cost-adjusted-edge-half", "no-trade-region", "no-trade-region-edge", "band")


@dataclass
class Row:
    """One policy on one scenario, in the yardstick's terms."""

    policy: str
    loss: Decimal  # at the config's gamma
    cost_bp: Decimal
    tracking_bp: Decimal
    loss_1: Decimal
    loss_20: Decimal
    trades: int
    total_cost: Decimal
    tracking_error: Decimal
    median_notional: Decimal


@dataclass
class Scenario:
    short: str
    title: str
    series: PriceSeries
    main: bool  # in the summary, robustness and the rule (False: a window the anchor runs on)
    cvx: bool  # the anchor runs on it
    window_of: str | None = None  # the scenario this is the window of


def scenarios(seed: int, minute_days: int, cvx_minute_days: int) -> list[Scenario]:
    """Every scenario, and the windows of the minute ones that the anchor runs on."""
    out = []
    for regime in ("calm", "trending", "volatile"):
        for short, label, steps, step in (
            (f"{regime} 1m", f"{regime}, 1-minute checks, {minute_days} days", minute_days * 1440, 60),
            (f"{regime} 1h", f"{regime}, hourly checks, 1 year", 8760, 3600),
        ):
            series = generate_prices(
                assets=EXAMPLE_START_PRICES,
                steps=steps,
                step_seconds=step,
                seed=seed,
                regime=REGIMES[regime],
                start=START,
            )
            if step == 60 and cvx_minute_days < minute_days:
                out.append(Scenario(short, label, series, main=True, cvx=False))
                out.append(
                    Scenario(
                        f"{short}, first {cvx_minute_days}d",
                        f"{regime}, 1-minute checks, first {cvx_minute_days} days of the {minute_days} "
                        "(the window the anchor runs on)",
                        series.slice(0, cvx_minute_days * 1440),
                        main=False,
                        cvx=True,
                        window_of=short,
                    )
                )
            else:
                out.append(Scenario(short, label, series, main=True, cvx=True))
    example = ROOT / "examples" / "btc-eth-daily.csv"
    out.append(
        Scenario("real 1d", "real BTC/ETH 2017-11-09 to 2025-07-04, daily checks", load_prices(example), True, True)
    )
    shared = ROOT.parent / "shared" / "data" / "btc-eth-daily.csv"
    if shared.exists() and shared.read_bytes() != example.read_bytes():
        out.append(Scenario("shared 1d", f"real closes of {shared}, daily checks", load_prices(shared), True, True))
    elif shared.exists():
        print(f"note: {shared} is byte-identical to {example}; run once", file=sys.stderr)
    return out


def to_row(config: Config, r: BacktestResult) -> Row:
    main, one, twenty = (r.loss(g) for g in (config.risk_aversion, Decimal(1), Decimal(20)))
    notional = statistics.median(f.notional for f in r.fills) if r.fills else Decimal(0)
    return Row(
        r.policy,
        main.total_bp,
        main.cost_bp,
        main.tracking_bp,
        one.total_bp,
        twenty.total_bp,
        r.trades,
        r.total_cost,
        r.tracking_error,
        notional,
    )


# --- the tasks the processes share: set before the pool forks ----------------------------------------------

CONFIG: Config | None = None
SCENARIOS: dict[str, Scenario] = {}
BOOKS: dict[str, BookModel] = {}


def _config() -> Config:
    assert CONFIG is not None
    return CONFIG


def policies_task(short: str, book: str) -> tuple[str, str, list[Row], dict[str, str], float]:
    """The project's policies on one scenario and book (the second book: the robustness set only)."""
    began = time.perf_counter()
    config = _config()
    series = SCENARIOS[short].series
    policies = {n: p for n, p in named_policies(config, check_seconds=series.step_seconds).items() if n != "config"}
    replay = Replay(config, series, book_model=BOOKS[book])
    chosen = policies.values() if book == "sqrt-law" else [policies[n] for n in ROBUSTNESS]
    rows = [to_row(config, run_backtest(config, replay, policy=p)) for p in chosen]
    return short, book, rows, {n: p.description for n, p in policies.items()}, time.perf_counter() - began


def cvx_task(short: str, risk_days: float) -> tuple[str, float, Row | str, str, float]:
    """The anchor at one risk setting on one scenario: its row, and the cost check line."""
    began = time.perf_counter()
    try:
        import cvxportfolio  # noqa: F401
    except ImportError:
        return short, risk_days, "cvxportfolio is not installed (pip install -e '.[bench]'): skipped", "", 0.0
    warnings.filterwarnings("ignore")
    logging.getLogger("cvxportfolio").setLevel(logging.ERROR)
    config = _config()
    series = SCENARIOS[short].series
    replay = Replay(config, series, book_model=BOOKS["sqrt-law"])
    model = cvx_model(config, replay)
    placeholder = named_policies(config, check_seconds=series.step_seconds)[REFERENCE]
    result = CvxRun(replay, model, risk_days, placeholder).run()
    row = to_row(config, result)
    typical, which = row.median_notional.quantize(Decimal(1)), "its median order"
    if not row.trades:
        typical, which = Decimal(1000), "it sent no order of 10 or more"
    elif typical < 10:
        which = f"its median order, {typical} USDC, is under 10: the check uses 1,000"
        typical = Decimal(1000)
    lines = []
    for notional in (typical, CVX_FIT_NOTIONAL):
        predicted, charged = cost_check(replay, model, notional)
        lines.append(f"{notional:,.0f} USDC: predicted {predicted:.2f} bp, charged {charged:.2f} bp")
    check = (
        f"cost check ({row.policy}'s optimizer vs paper_fill, mean over the days, assets and sides): an order "
        f"of {lines[0]} ({which}); of {lines[1]}"
    )
    return short, risk_days, row, check, time.perf_counter() - began


def _run_task(task: tuple[str, str, Any]) -> tuple[str, Any]:
    kind, short, arg = task
    if kind == "policies":
        return kind, policies_task(short, arg)
    return kind, cvx_task(short, arg)


# --- cvxportfolio -------------------------------------------------------------------------------------------


@dataclass
class CvxModel:
    """What cvxportfolio is given for one scenario: the returns and prices (served to it by
    `UserProvidedMarketData`, which hands the policy at time t only the returns before t), and the cost model of
    the replay's own books, per step from the day's book (whose volatility comes from the days before)."""

    market_data: Any
    returns: Any  # per step, held from t to t+1, cash last
    columns: Any  # the universe, cash last
    calendar: Any
    target: Any
    a: Any  # fee + half spread, per step and asset
    sigma: Any  # the replay's daily volatility, scaled to one step
    volume: Any  # the depth-implied volume of one step: impact b sigma |x|^1.5 / sqrt(V) matches the book's
    warmup: int
    days: list[int]  # the first step of each UTC day


def _charged(market: Market, side: str, notional: Decimal) -> tuple[Decimal, Decimal]:
    """(what paper_fill charges, the filled notional at mid) for an order of about `notional` quote on `market`."""
    amount = (notional / market.mid / market.amount_step).to_integral_value(ROUND_DOWN) * market.amount_step
    fill = paper_fill(market, side, amount, base_free=amount * 2, quote_free=notional * 2)
    fee = fill.fee if fill.fee_currency == market.quote else fill.fee * market.mid
    at_mid = fill.filled * market.mid
    return fee + abs(fill.cost - at_mid), at_mid


def cvx_model(config: Config, replay: Replay) -> CvxModel:
    import cvxportfolio as cvx
    import numpy as np
    import pandas as pd

    series = replay.prices
    quote = config.quote_symbol
    traded = list(replay.traded)
    n = len(series)
    step = series.step_seconds or DAY
    index = pd.to_datetime(list(series.timestamps), unit="s", utc=True)
    prices = pd.DataFrame({s: replay.floats[s] for s in traded}, index=index)
    returns = prices.pct_change().shift(-1).iloc[:-1]  # period t's return, held from t to t+1
    returns[quote] = 0.0
    days = [i for i in range(n) if i == 0 or series.timestamps[i] // DAY != series.timestamps[i - 1] // DAY]
    per_day: dict[str, list[tuple[float, float, float]]] = {s: [] for s in traded}
    for i in days:
        for s in traded:
            top = replay.market(i, s, book=False)
            a = top.taker_fee + (top.asks[0][0] - top.bids[0][0]) / 2 / top.mid
            vol = replay.volatility(i)[s]
            sigma = float(vol if vol is not None else SQRT_LAW_SIGMA) * math.sqrt(step / DAY)
            # the impact of the fit order, on the full book, both sides averaged
            book = replay.market(i, s)
            impact = Decimal(0)
            for side in ("buy", "sell"):
                cost, at_mid = _charged(book, side, CVX_FIT_NOTIONAL)
                impact += (cost - a * at_mid) / 2
            fit = float(CVX_FIT_NOTIONAL)
            volume = (CVX_B * sigma * fit**1.5 / float(impact)) ** 2 if impact > 0 else 1e30
            per_day[s].append((float(a), sigma, volume))
    day_of = np.searchsorted(np.array(days), np.arange(n - 1), side="right") - 1

    def frame(k: int) -> Any:
        return pd.DataFrame({s: np.array([d[k] for d in per_day[s]])[day_of] for s in traded}, index=returns.index)

    volume = frame(2)
    market_data = cvx.UserProvidedMarketData(
        returns=returns, volumes=volume, prices=prices.iloc[:-1], cash_key=quote, min_history=pd.Timedelta("0d")
    )
    target = pd.Series({a.symbol: float(a.target_weight) for a in config.assets})[list(returns.columns)]
    calendar = market_data.trading_calendar()
    assert len(calendar) == len(returns) == n - 1
    for i in (1, (n - 1) // 2, n - 2):  # what the anchor is handed at step i is what serve(t) hands a policy
        served, _, served_volumes, _, _ = market_data.serve(calendar[i])
        assert served.equals(returns.iloc[:i]) and served_volumes.equals(volume.iloc[:i])
    return CvxModel(
        market_data=market_data,
        returns=returns,
        columns=returns.columns,
        calendar=calendar,
        target=target,
        a=frame(0),
        sigma=frame(1),
        volume=volume,
        warmup=max(COVARIANCE_MIN_DAYS, DAY // step),
        days=days,
    )


class CvxRun(_Run):
    """The replay with cvxportfolio deciding: at each step SinglePeriodOptimization is given the replay's
    holdings at mid and the returns before the step, and each trade it asks for (value u per asset) is sent as
    the live tool would send it: rounded down to the lot, not sent below the market's minimum notional, sells
    first, filled by `_Run._fill` (paper_fill on the step's full synthetic book) exactly like a plan's trades.
    Tracking error, cost and L then come from the same `BacktestResult` as every policy's."""

    def __init__(self, replay: Replay, model: CvxModel, risk_days: float, placeholder: BacktestPolicy) -> None:
        import cvxportfolio as cvx

        name = f"cvxportfolio SPO risk {risk_days:g}d x gamma/2"
        super().__init__(replay, replace(placeholder, name=name), DEFAULT_INITIAL_VALUE, False, None, None)
        step = replay.prices.step_seconds or DAY
        # the risk term counts one step's covariance: times the steps of `risk_days` days
        risk = risk_days * float(replay.config.risk_aversion) / 2 * DAY / step
        cost = cvx.TransactionCost(a=model.a, b=CVX_B, sigma=model.sigma, volume_hat=model.volume)
        self.spo = cvx.SinglePeriodOptimization(objective=-risk * cvx.FullCovariance() - cost, benchmark=model.target)
        self.spo.initialize_estimator_recursive(universe=model.columns, trading_calendar=model.calendar)
        self.model = model
        self._syms = list(replay.traded)

    def _limits(self, i: int) -> tuple[list[float], list[float], list[int], list[float]]:
        m = len(self._syms)  # no screen: cvxportfolio decides every step (prescreen=False)
        return [math.inf] * m, [math.inf] * m, [0] * m, [-1.0] * m

    def _step(self, i: int) -> bool:
        import numpy as np
        import pandas as pd

        model = self.model
        if i < model.warmup or i >= len(model.calendar):
            return False  # too few returns for a covariance yet / the last close has no return after it
        replay = self.replay
        t = model.calendar[i]
        # the rows before t: what `market_data.serve(t)` hands a policy (checked in `cvx_model`), without its
        # universe mask, which scans the whole history at every step
        past_returns = model.returns.iloc[:i]
        h = np.array(
            [float(self.balances[s]) * replay.floats[s][i] for s in self._syms] + [float(self.balances[replay.quote])]
        )
        v = float(h.sum())
        w = pd.Series(h / v, index=model.columns)
        w_plus = self.spo.values_in_time_recursive(
            t=t,
            past_returns=past_returns,
            past_volumes=model.volume.iloc[:i],
            current_weights=w,
            current_portfolio_value=v,
            current_prices=None,
        )
        self.plans += 1
        u = ((w_plus - w) * v).to_numpy()
        filled = False
        for k in sorted(range(len(self._syms)), key=lambda k: u[k] > 0):  # sells first
            top = replay.market(i, self._syms[k], book=False)
            lot = top.amount_step
            amount = (Decimal(repr(abs(float(u[k])))) / top.mid / lot).to_integral_value(ROUND_DOWN) * lot
            if amount <= 0 or amount * top.mid < top.min_notional:
                continue  # below the exchange's minimum: the live tool would not send it
            market = replay.market(i, self._syms[k])
            filled = self._fill(i, market, "buy" if u[k] > 0 else "sell", amount) or filled
        return filled


def cost_check(replay: Replay, model: CvxModel, notional: Decimal) -> tuple[float, float]:
    """Mean over the days and assets of (cvxportfolio's predicted cost, paper_fill's charged cost) in bp of an
    order of `notional` quote, both sides."""
    predicted, charged = [], []
    step_rows = model.a.index
    for i in model.days:
        row_i = min(i, len(step_rows) - 1)
        for s in replay.traded:
            a = float(model.a[s].iloc[row_i])
            sigma = float(model.sigma[s].iloc[row_i])
            volume = float(model.volume[s].iloc[row_i])
            book = replay.market(i, s)
            for side in ("buy", "sell"):
                cost, at_mid = _charged(book, side, notional)
                x = float(at_mid)
                predicted.append((a * x + CVX_B * sigma * x**1.5 / volume**0.5) / x)
                charged.append(float(cost / at_mid))
    return statistics.fmean(predicted) * 1e4, statistics.fmean(charged) * 1e4


# --- tables -------------------------------------------------------------------------------------------------


def table(rows: list[Row], gamma: Decimal) -> list[str]:
    ref = next(r for r in rows if r.policy == REFERENCE)
    g = f"{gamma.normalize():f}"
    lines = [
        f"| policy | L({g}) bp/yr | cost bp | tracking bp | L({g}) vs c-a | L(1) | L(20) | trades | total cost | TE "
        "| median order |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: r.loss):
        lines.append(
            f"| {r.policy} | {r.loss:.1f} | {r.cost_bp:.1f} | {r.tracking_bp:.1f} | {r.loss / ref.loss:.2f} | "
            f"{r.loss_1:.1f} | {r.loss_20:.1f} | {r.trades:,} | {r.total_cost:,.0f} | {r.tracking_error * 100:.3f}% | "
            f"{r.median_notional:,.0f} |"
        )
    return lines


def main() -> int:
    global CONFIG
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minute-days", type=int, default=90)
    parser.add_argument(
        "--cvx-minute-days", type=int, default=CVX_MINUTE_DAYS, help="the anchor's window at one-minute checks"
    )
    parser.add_argument("--no-cvx", action="store_true", help="skip the cvxportfolio anchor")
    parser.add_argument("--cvx-all", action="store_true", help="(the default now: the anchor runs on every scenario)")
    parser.add_argument("--jobs", type=int, default=2, help="processes run side by side")
    args = parser.parse_args()

    CONFIG = config = load_config(ROOT / "examples" / "treasury.yaml")
    gamma = config.risk_aversion
    BOOKS.update({"sqrt-law": market_model("sqrt-law"), "conservative": market_model("conservative")})
    began = time.perf_counter()
    cvx_days = min(args.cvx_minute_days, args.minute_days)
    listed = scenarios(args.seed, args.minute_days, cvx_days)
    SCENARIOS.update({s.short: s for s in listed})
    tasks: list[tuple[str, str, Any]] = []
    for s in listed:
        for book in BOOKS if s.main else ("sqrt-law",):
            tasks.append(("policies", s.short, book))
        if s.cvx and not args.no_cvx:
            tasks.extend(("cvx", s.short, m) for m in CVX_RISK)
    # the longest first, so that the two processes finish together: a cvx step costs some 20 policy steps
    tasks.sort(key=lambda t: -len(SCENARIOS[t[1]].series) * (20 if t[0] == "cvx" else 12 if t[2] == "sqrt-law" else 5))

    runs: dict[str, dict[str, list[Row]]] = {name: {} for name in BOOKS}
    anchors: dict[str, list[Row] | str] = {}
    checks: dict[str, dict[float, str]] = {}
    descriptions: dict[str, str] = {}
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        for kind, out in pool.imap_unordered(_run_task, tasks):
            if kind == "policies":
                short, book, rows, described, seconds = out
                runs[book][short] = rows
                descriptions.update(described)
                what = f"{book} book"
            else:
                short, m, cvx_row, check, seconds = out
                if isinstance(cvx_row, str):
                    anchors[short] = cvx_row
                else:
                    have = anchors.setdefault(short, [])
                    if isinstance(have, list):
                        have.append(cvx_row)
                    checks.setdefault(short, {})[m] = check
                what = f"cvxportfolio {m:g}d"
            print(
                f"... {SCENARIOS[short].title}, {what}: {seconds:.0f}s (at {time.perf_counter() - began:.0f}s)",
                file=sys.stderr,
            )
    for s in listed:
        if args.no_cvx:
            anchors[s.short] = "skipped (--no-cvx)"
        elif not s.cvx:
            anchors[s.short] = f"run on the first {cvx_days} days only: see the table of that window"
        elif isinstance(anchors.get(s.short), list):
            rows = anchors[s.short]
            assert isinstance(rows, list)
            rows.sort(key=lambda r: CVX_RISK.index(float(r.policy.split("risk ")[1].split("d")[0])))

    g = f"{gamma.normalize():f}"
    print("Policies:\n")
    order = next(iter(runs["sqrt-law"].values()))
    for r in order:
        print(f"- `{r.policy}`: {descriptions.get(r.policy, '')}")
    if not args.no_cvx:
        print(
            "- `cvxportfolio SPO risk Md x gamma/2`: cvxportfolio's SinglePeriodOptimization driven by this replay, "
            "filled on the same books (see the bench's docstring); risk = M days of covariance x gamma/2"
        )
    main_runs = {s.short: runs["sqrt-law"][s.short] for s in listed if s.main}
    windows = [s for s in listed if not s.main]
    for s in listed:
        anchor = anchors[s.short]
        rows = runs["sqrt-law"][s.short]
        print(f"\n#### {s.title} (sqrt-law book)\n")
        print("\n".join(table(rows + (anchor if isinstance(anchor, list) else []), gamma)))
        if isinstance(anchor, str):
            print(f"\ncvxportfolio: {anchor}")
        else:
            top = min(anchor, key=lambda r: r.loss)
            print(f"\n{checks[s.short][float(top.policy.split('risk ')[1].split('d')[0])]}")

    names = [r.policy for r in next(iter(main_runs.values()))]
    ratios: dict[str, list[Decimal]] = {n: [] for n in names}
    for rows in main_runs.values():
        ref = next(r for r in rows if r.policy == REFERENCE)
        for r in rows:
            ratios[r.policy].append(r.loss / ref.loss)
    print(f"\n#### Summary: L({g}) as a multiple of cost-adjusted's (sqrt-law book)\n")
    print("| policy | " + " | ".join(main_runs) + " | mean | never worse |")
    print("| --- | " + " | ".join("---:" for _ in main_runs) + " | ---: | --- |")
    eligible = []
    for n in names:
        ok = all(x <= 1 for x in ratios[n])
        if ok:
            eligible.append(n)
        mean = sum(ratios[n], Decimal(0)) / len(ratios[n])
        print(f"| {n} | " + " | ".join(f"{x:.3f}" for x in ratios[n]) + f" | {mean:.3f} | {'yes' if ok else 'no'} |")
    best = min(eligible, key=lambda n: sum(ratios[n], Decimal(0)))
    print(f"\nDefault by the rule (lowest L({g}), never worse than {REFERENCE} in any scenario): **{best}**")

    print(f"\n#### Robustness: L({g}) bp/yr on both books\n")
    print("| policy | " + " | ".join(f"{s} sqrt / cons." for s in main_runs) + " |")
    print("| --- | " + " | ".join("---:" for _ in main_runs) + " |")
    for n in ROBUSTNESS:
        cells = []
        for short in main_runs:
            a = next(r for r in runs["sqrt-law"][short] if r.policy == n)
            b = next(r for r in runs["conservative"][short] if r.policy == n)
            cells.append(f"{a.loss:.1f} / {b.loss:.1f}")
        print(f"| {n} | " + " | ".join(cells) + " |")
    for book in BOOKS:
        firsts = {
            short: min((r for r in runs[book][short] if r.policy in ROBUSTNESS), key=lambda r: r.loss).policy
            for short in main_runs
        }
        print(f"- {book} book: first by L({g}) per scenario: " + ", ".join(f"{s} {p}" for s, p in firsts.items()))

    window_rows = {w.window_of: (w.short, runs["sqrt-law"][w.short]) for w in windows if w.window_of}
    # the rule's pick, and the policy a config gets when it names none (what ships), when the two differ
    shipped = Config.model_fields["policy"].default.value
    for name, title in ((best, "the rule's pick"), (shipped, "the shipped default")):
        if name == best and title != "the rule's pick":
            continue
        print(f"\n#### Goals for {title} ({name})\n")
        for line in goals(name, main_runs, anchors, window_rows):
            print(f"- {line}")
    print(f"\n({time.perf_counter() - began:.0f}s)", file=sys.stderr)
    return 0


def goals(
    best: str,
    runs: dict[str, list[Row]],
    anchors: dict[str, Any],
    windows: dict[str | None, tuple[str, list[Row]]],
) -> list[str]:
    out = []
    for short, rows in runs.items():
        ref = next(r for r in rows if r.policy == REFERENCE)
        mine = next(r for r in rows if r.policy == best)
        limit = REAL_GOAL if short.endswith("1d") else GENERATED_GOAL
        ratio = mine.loss / ref.loss
        out.append(
            f"{short}: L {mine.loss:.1f} vs {ref.loss:.1f} = {ratio:.3f}x (goal <= {limit}x): {_met(ratio <= limit)}"
        )
        out.append(f"{short}: trades {mine.trades:,} vs {ref.trades:,}: {_met(mine.trades < ref.trades)}")
        name, rows_here = short, rows
        if short in windows:
            name, rows_here = windows[short]
            mine = next(r for r in rows_here if r.policy == best)
        anchor = anchors[name]
        if isinstance(anchor, list) and anchor:
            top = min(anchor, key=lambda r: r.loss)
            out.append(
                f"{name}: below cvxportfolio's best: L {mine.loss:.1f} vs its best {top.loss:.1f} ({top.policy}): "
                f"{_met(mine.loss < top.loss)}"
            )
        else:
            out.append(f"{name}: below cvxportfolio's best: not measured ({anchor})")
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


if __name__ == "__main__":
    sys.exit(main())
