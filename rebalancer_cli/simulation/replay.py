"""Replays a price history through the planner and the paper fill rule, and measures what a policy costs.

Every decision comes from `planner.plan` on a `Snapshot` built from that step's prices and synthetic books,
and every order fills through `exchange.paper.paper_fill`, the rule the paper exchange itself uses: what a
backtest shows is what `plan` and `execute` would have done, not what a second model of them guesses.

A year of minute bars is half a million steps and a plan costs a few hundred microseconds, so the replay
plans only where a plan can matter. A screen on float weights skips a step only when no asset's drift can
pass its trigger or hard band and no held-back asset can re-arm; it keeps a margin (`SCREEN_EPS`) a million
times wider than the float error of the few operations it does, so it never skips a step that `plan` would
have acted on (the tests run the same series with and without it and compare every trade).

Money is `Decimal`: holdings, fees, slippage and turnover are exact. Drift and tracking error are statistics
of the run and are accumulated in floats, then reported as decimals.
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

from ..config import Config, load_config
from ..errors import InputError, InsufficientFundsError, InvalidOrderError
from ..exchange.paper import paper_fill
from ..planner import (
    AssetContext,
    AssetRisk,
    NoTradeRegion,
    Plan,
    PlannerState,
    Policy,
    ThresholdRule,
    needs_book,
    plain,
    plan,
    portfolio_risk,
)
from ..snapshot import Covariance, Market, Snapshot, load_snapshot
from .books import BookModel, RollingVolatility
from .csvfile import load_prices
from .policies import DEFAULT_CALENDAR_SECONDS, BacktestPolicy, named_policies, select_policies
from .series import SECONDS_PER_YEAR, PriceSeries
from .yardstick import SIDE_RISK_AVERSIONS, Loss, certainty_equivalent_loss

ZERO = Decimal(0)
ONE = Decimal(1)
DAY = 86_400

# The screen skips a step only when every drift is this far inside its limits. Weights are computed from a
# handful of float products and one division (relative error ~1e-15); 1e-9 covers that a million times over.
SCREEN_EPS = 1e-9
# Volatility as the live tool sees it: daily returns over the last 30 days (ccxt_exchange.VOLATILITY_DAYS).
VOLATILITY_DAYS = 30
# The covariance of the no-trade region: daily log returns of the last 90 days before the step's day (fewer
# at the start of a history, from 10 on): correlations need more days than a volatility to settle.
COVARIANCE_DAYS = 90
COVARIANCE_MIN_DAYS = 10
# The screen places a no-trade region's trigger with the cost rate cut by this share: within a day the
# synthetic book's half spread moves only by tick rounding (8 significant digits: under 2e-7 of the mid), which
# moves k by less than this share whenever k >= REGION_SCREEN_MIN_COST; below that the screen plans every step.
REGION_SCREEN_SLACK = Decimal("0.001")
REGION_SCREEN_MIN_COST = Decimal("0.0002")
# the joint region's cut of the widths, a little further still, for the floats it is computed in
SCREEN_FACTOR_SLACK = Decimal("0.999")
DEFAULT_INITIAL_VALUE = Decimal(100_000)
DEFAULT_RISK_AVERSION = Decimal(5)
DEFAULT_TAKER_FEE = Decimal("0.001")
DEFAULT_MIN_NOTIONAL = Decimal(5)
# A live cycle reads the balances and the best bid/ask of every market (one request each), then one full book
# per market the planner's screen passes, one request per order, and the balances again after executing.
IDLE_CALLS = 2
AFTER_EXECUTION_CALLS = 1
TIMELINE_POINTS = 2_000
PROGRESS_EVERY = 16_384

Progress = Callable[[int], None]


# --- the market the replay trades in ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MarketRules:
    """What a market charges and allows; the books come from the `BookModel`."""

    taker_fee: Decimal
    amount_step: Decimal
    min_notional: Decimal
    source: str


def default_amount_step(price: Decimal) -> Decimal:
    """A lot worth between 0.1 and 1 quote units at `price`: as fine as the big exchanges' spot lots."""
    return Decimal(1).scaleb(-(price.adjusted() + 1))


def market_rules(
    config: Config,
    prices: PriceSeries,
    *,
    taker_fee: Decimal | None = None,
    min_notional: Decimal | None = None,
) -> dict[str, MarketRules]:
    """Fees, lots and minimums per traded asset: flags first, then the paper snapshot's markets, then the
    config's `exchange.taker_fee`, then defaults (0.1% taker fee, a lot under 1 quote unit, 5 minimum)."""
    quote = config.quote_symbol
    snapshot_markets: Mapping[str, Market] = {}
    path = config.snapshot_path() if config.exchange.is_paper else None
    if path is not None and path.exists():
        snapshot_markets = load_snapshot(path).markets
    rules = {}
    for a in config.assets:
        if a.symbol == quote:
            continue
        m = snapshot_markets.get(f"{a.symbol}/{quote}")
        if taker_fee is not None:
            fee, source = taker_fee, "--fee"
        elif m is not None:
            fee, source = m.taker_fee, f"snapshot {path.name if path else ''}".strip()
        elif config.exchange.taker_fee is not None:
            fee, source = config.exchange.taker_fee, "config exchange.taker_fee"
        else:
            fee, source = DEFAULT_TAKER_FEE, "default"
        step = m.amount_step if m is not None else default_amount_step(prices.price(0, a.symbol))
        floor = min_notional if min_notional is not None else (m.min_notional if m else DEFAULT_MIN_NOTIONAL)
        rules[a.symbol] = MarketRules(fee, step, floor, source)
    return rules


class Replay:
    """A price history prepared for replay: float closes for the screen, daily volatility, and the snapshot
    of any step. Shared by every policy run on the same history."""

    def __init__(
        self,
        config: Config,
        prices: PriceSeries,
        *,
        book_model: BookModel | None = None,
        rules: Mapping[str, MarketRules] | None = None,
        taker_fee: Decimal | None = None,
    ) -> None:
        self.config = config
        self.prices = prices
        self.quote = config.quote_symbol
        self.traded = tuple(a.symbol for a in config.assets if a.symbol != self.quote)
        missing = [s for s in self.traded if s not in prices.assets]
        if missing:
            raise InputError(
                f"{prices.source or 'the prices'} has no prices for {', '.join(missing)} "
                f"(it has {', '.join(prices.assets)}); every asset but the quote {self.quote} needs a column"
            )
        if len(prices) < 2:
            raise InputError("a backtest needs at least two steps of prices")
        self.book_model = book_model or BookModel()
        self._tops = replace(self.book_model, levels=1)
        self.rules = dict(rules) if rules is not None else market_rules(config, prices, taker_fee=taker_fee)
        for s in self.traded:
            if s not in self.rules:
                raise InputError(f"no market rules for {s}")
        self.floats: dict[str, list[float]] = {}
        for s in self.traded:
            values, scale = prices.raw(s)
            unit = 10**scale
            self.floats[s] = [v / unit for v in values]
        self._day_vol, self._day_cov = self._daily_risk()

    @property
    def steps(self) -> int:
        return len(self.prices)

    def _daily_risk(self) -> tuple[dict[int, dict[str, Decimal | None]], dict[int, Covariance | None]]:
        """Per UTC day: each asset's volatility, and the assets' covariance, from the closes of the days
        before it (no look-ahead).

        The live tool computes volatility from 30 daily candles and caches it for hours; here it changes once a
        day, which also keeps every threshold constant within a day.
        """
        ts = self.prices.timestamps
        last_of_day: dict[int, int] = {}
        for i, t in enumerate(ts):
            last_of_day[t // DAY] = i
        days = sorted(last_of_day)
        stamps = [d * DAY for d in days]
        daily = PriceSeries(
            array("q", stamps),
            {
                s: {"close": (array("q", (self.prices.raw(s)[0][last_of_day[d]] for d in days)), self.prices.raw(s)[1])}
                for s in self.traded
            },
        )
        rollers = {s: RollingVolatility(daily, s, VOLATILITY_DAYS) for s in self.traded}
        out: dict[int, dict[str, Decimal | None]] = {}
        for k, d in enumerate(days):
            out[d] = {s: rollers[s].at(k - 1) if k >= 1 else None for s in self.traded}
        closes = {s: [self.floats[s][last_of_day[d]] for d in days] for s in self.traded}
        returns = [[math.log(b / a) for a, b in itertools.pairwise(closes[s])] for s in self.traded]
        covariances: dict[int, Covariance | None] = {}
        for k, d in enumerate(days):
            # returns 0..k-2 end at day k-1's close: the last close before day k
            window = [r[max(0, k - 1 - COVARIANCE_DAYS) : max(0, k - 1)] for r in returns]
            covariances[d] = trailing_covariance(self.traded, window, COVARIANCE_MIN_DAYS)
        return out, covariances

    def covariance(self, i: int) -> Covariance | None:
        return self._day_cov[self.prices.timestamps[i] // DAY]

    def volatility(self, i: int) -> dict[str, Decimal | None]:
        return self._day_vol[self.prices.timestamps[i] // DAY]

    def market(self, i: int, asset: str, *, book: bool = True) -> Market:
        """`asset`'s market at step `i`: the close as mid, the day's volatility, the synthetic book around it
        (`book=False`: only its best bid and ask, as the live snapshot reads every market first)."""
        r = self.rules[asset]
        vol = self.volatility(i)[asset]
        model = self.book_model
        # the top of a one-level book is the first level of the full one, unless the full book's depth caps its
        # volatility widening differently
        if not book and self._tops.widening(vol) == model.widening(vol):
            model = self._tops
        return model.market(
            f"{asset}/{self.quote}",
            self.prices.price(i, asset),
            volatility=vol,
            taker_fee=r.taker_fee,
            amount_step=r.amount_step,
            min_notional=r.min_notional,
        )

    def snapshot(self, i: int, balances: Mapping[str, Decimal], *, books: Collection[str] | None = None) -> Snapshot:
        """What the live tool would have seen at step `i` holding `balances`: full books for the markets in
        `books` (all when None), best bid and ask for the others."""
        markets = {}
        for s in self.traded:
            symbol = f"{s}/{self.quote}"
            markets[symbol] = self.market(i, s, book=books is None or symbol in books)
        return Snapshot(
            taken_at=self.prices.time(i),
            balances=dict(balances),
            markets=markets,
            source=f"backtest:{self.prices.source}#{i}",
            covariance=self.covariance(i),
        )

    def with_books(self, snapshot: Snapshot, i: int, books: Collection[str]) -> Snapshot:
        """`snapshot` (of step `i`) with the full books of `books`: the second read of a live snapshot."""
        if not books:
            return snapshot
        markets = dict(snapshot.markets)
        for symbol in books:
            markets[symbol] = self.market(i, markets[symbol].base)
        return replace(snapshot, markets=markets)

    def opening_balances(self, value: Decimal) -> dict[str, Decimal]:
        """`value` of quote spread at target weights at the first step's closes."""
        if not value.is_finite() or value <= 0:
            raise InputError(f"the initial value must be above 0 (got {value})")
        out = {}
        for a in self.config.assets:
            share = value * a.target_weight
            out[a.symbol] = share if a.symbol == self.quote else share / self.prices.price(0, a.symbol)
        return out


# --- results ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FillRecord:
    """One order of the replay as it filled on paper; `fee_value` is the fee in quote at the mid."""

    step: int
    at: datetime
    symbol: str
    side: str
    amount: Decimal
    filled: Decimal
    notional: Decimal
    fee: Decimal
    fee_currency: str
    fee_value: Decimal
    slippage: Decimal


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    """One point of the chart: the largest drift seen since the previous point and the cost so far."""

    at: datetime
    drift: float
    cost: Decimal


@dataclass(frozen=True, slots=True)
class PlanStep:
    """What `plan` was given and what it decided at one step; passed to `on_plan`."""

    step: int
    snapshot: Snapshot
    state: PlannerState
    plan: Plan
    books: frozenset[str]


@dataclass(frozen=True)
class BacktestResult:
    """The figures of one policy over one history.

    - `turnover`: quote value of everything that filled; `fees`: taker fees in quote (a buy's fee, charged in
      the base, at the mid); `slippage`: |fill value - mid value| of every fill; `total_cost` = fees +
      slippage, which is exactly the mid value the trades lost.
    - `mean_drift`, `max_drift`: total drift sum(|target - current|) over all assets, observed at every step
      before trading.
    - `tracking_error`: annualized standard deviation of the per-step return difference between the
      portfolio and a costless portfolio kept at target weights at every step, both valued at mids. The
      portfolio's return over a step is that of the holdings carried into it (after the previous step's
      trades), so it measures drift only: costs are reported apart, not counted twice.
    - `api_calls`: requests the live tool would have sent: 2 per check (balances, best bid/ask), +1 full book
      per market the planner's screen passed, +1 per order, +1 balance read after executing. A calendar
      policy checks only on its dates. Cached reads (markets, daily candles, fee schedule) are not counted.
    - `plans`: steps that reached `planner.plan` (the others were skipped by the screen or the calendar).
    """

    policy: str
    description: str
    steps: int
    start: datetime
    end: datetime
    initial_value: Decimal
    final_value: Decimal
    trades: int
    rejected: int
    turnover: Decimal
    fees: Decimal
    slippage: Decimal
    mean_drift: Decimal
    max_drift: Decimal
    tracking_error: Decimal
    mean_value: Decimal
    years: Decimal
    api_calls: int
    plans: int
    final_balances: Mapping[str, Decimal]
    fills: tuple[FillRecord, ...] = field(repr=False, default=())
    timeline: tuple[TimelinePoint, ...] = field(repr=False, default=())

    @property
    def total_cost(self) -> Decimal:
        return self.fees + self.slippage

    @property
    def cost_ratio(self) -> Decimal:
        """Total cost as a fraction of the starting value."""
        return self.total_cost / self.initial_value

    def loss(self, risk_aversion: Decimal) -> Loss:
        """The certainty-equivalent loss L(gamma) of `yardstick`, in bp per year."""
        return certainty_equivalent_loss(
            total_cost=self.total_cost,
            years=self.years,
            mean_value=self.mean_value,
            tracking_error=self.tracking_error,
            risk_aversion=risk_aversion,
        )

    def to_dict(self, risk_aversion: Decimal = DEFAULT_RISK_AVERSION) -> dict[str, Any]:
        main = self.loss(risk_aversion)
        return {
            "policy": self.policy,
            "description": self.description,
            "steps": self.steps,
            "trades": self.trades,
            "rejected_orders": self.rejected,
            "turnover": _money(self.turnover),
            "fees": _money(self.fees),
            "slippage": _money(self.slippage),
            "total_cost": _money(self.total_cost),
            "cost_ratio": _ratio(self.cost_ratio),
            "mean_drift": _ratio(self.mean_drift),
            "max_drift": _ratio(self.max_drift),
            "tracking_error": _ratio(self.tracking_error),
            "certainty_equivalent_loss": {
                "risk_aversion": plain(risk_aversion),
                "bp_per_year": _bp(main.total_bp),
                "cost_rate_bp": _bp(main.cost_bp),
                "tracking_bp": _bp(main.tracking_bp),
                "at": {plain(g): _bp(self.loss(g).total_bp) for g in SIDE_RISK_AVERSIONS},
            },
            "mean_value": _money(self.mean_value),
            "years": _ratio(self.years),
            "api_calls": self.api_calls,
            "plans": self.plans,
            "initial_value": _money(self.initial_value),
            "final_value": _money(self.final_value),
            "final_balances": {k: plain(v.normalize()) for k, v in self.final_balances.items()},
        }


_Q = Decimal("1e-8")


def _money(d: Decimal) -> str:
    return format(d.quantize(_Q, rounding=ROUND_HALF_EVEN), "f")


def _ratio(d: Decimal) -> str:
    return format(d.quantize(_Q, rounding=ROUND_HALF_EVEN), "f")


def _bp(d: Decimal) -> str:
    return format(d.quantize(Decimal("0.0001"), rounding=ROUND_HALF_EVEN), "f")


def _stat(x: float) -> Decimal:
    """A float statistic as a decimal, rounded well below anything reported."""
    return Decimal(repr(round(x, 12)))


# --- the replay -------------------------------------------------------------------------------------------


def run_backtest(
    config: Config,
    prices: PriceSeries | Replay,
    *,
    policy: BacktestPolicy | Policy | None = None,
    book_model: BookModel | None = None,
    rules: Mapping[str, MarketRules] | None = None,
    taker_fee: Decimal | None = None,
    initial_value: Decimal = DEFAULT_INITIAL_VALUE,
    prescreen: bool = True,
    progress: Progress | None = None,
    on_plan: Callable[[PlanStep], None] | None = None,
) -> BacktestResult:
    """Replay `prices` step by step: screen, `plan` where it may matter, fill on paper, carry state forward.

    The market: `book_model` for the books, `rules` for fees, lots and minimums (default: `market_rules`,
    with `taker_fee` overriding the fee). Starts with `initial_value` of quote at target weights.
    `prescreen=False` plans every step: slower, and the reference the screen is tested against. `progress` is
    called with the number of steps done since its previous call. `on_plan` sees each planned step (the
    snapshot, state and plan), for tests and tracing.
    """
    replay = (
        prices
        if isinstance(prices, Replay)
        else Replay(config, prices, book_model=book_model, rules=rules, taker_fee=taker_fee)
    )
    if policy is None:
        bp = named_policies(config, check_seconds=replay.prices.step_seconds)["config"]
    elif isinstance(policy, Policy):
        bp = BacktestPolicy(policy.name, policy)
    else:
        bp = policy
    return _Run(replay, bp, initial_value, prescreen, progress, on_plan).run()


def run_many(
    config: Config,
    prices: PriceSeries | Replay,
    policies: Sequence[BacktestPolicy],
    *,
    book_model: BookModel | None = None,
    rules: Mapping[str, MarketRules] | None = None,
    initial_value: Decimal = DEFAULT_INITIAL_VALUE,
    progress: Progress | None = None,
) -> list[BacktestResult]:
    """Each policy over the same history and market; `progress` counts steps across all of them."""
    replay = prices if isinstance(prices, Replay) else Replay(config, prices, book_model=book_model, rules=rules)
    return [run_backtest(config, replay, policy=p, initial_value=initial_value, progress=progress) for p in policies]


def _screen_threshold(rule: ThresholdRule, context: AssetContext) -> Decimal:
    """The threshold the screen may assume for the rest of the day: the rule's own, except for a no-trade
    region, whose cost rate comes from each step's book: its width with the cheaper side's k cut by
    REGION_SCREEN_SLACK, which no step of the day goes below (see REGION_SCREEN_SLACK); 0 when k is too small
    for that bound to hold, so that every step is planned. (A joint region's are then cut by `_joint_factor`.)"""
    if not isinstance(rule, NoTradeRegion) or context.market is None:
        return rule.threshold(context)
    k = min(rule.cost_rate(context.market, "buy"), rule.cost_rate(context.market, "sell"))
    if k < REGION_SCREEN_MIN_COST:
        return ZERO
    return rule.figures(context, cost_rate=k * (ONE - REGION_SCREEN_SLACK)).half_width


def _joint_factor(names: list[str], widths: list[Decimal], risk: Mapping[str, AssetRisk]) -> Decimal:
    """How far the per-asset widths must be cut for the screen of a joint region: with every |x_j| below
    c delta_j, sign(x_i) (Sigma x)_i <= sum_j |Sigma_ij| c delta_j <= sigma_i^2 delta_i, the condition under which
    the joint region holds every asset (`planner._joint_holds`), for c = min_i sigma_i^2 delta_i / sum_j
    |Sigma_ij| delta_j. The widths are the day's lower bounds, so this holds at every step of the day."""
    at = dict(zip(names, widths, strict=True))
    factor = ONE
    for name, width in at.items():
        r = risk.get(name)
        if r is None or not r.row:
            continue  # outside the joint problem: its own width holds for it, as in the plan
        spread = sum(abs(c) * float(at.get(other, ZERO)) for other, c in r.covariances)
        if spread > 0:
            factor = min(factor, Decimal(repr(r.deviation_variance * float(width) / spread)) * SCREEN_FACTOR_SLACK)
    return max(ZERO, factor)


class _Run:
    """One policy over one history. A class only to keep the per-step state in fast locals of `run`."""

    def __init__(
        self,
        replay: Replay,
        bp: BacktestPolicy,
        initial_value: Decimal,
        prescreen: bool,
        progress: Progress | None,
        on_plan: Callable[[PlanStep], None] | None,
    ) -> None:
        self.replay = replay
        self.bp = bp
        self.policy = bp.policy
        self.prescreen = prescreen
        self.progress = progress
        self.on_plan = on_plan
        self.initial_value = initial_value
        self.balances = replay.opening_balances(initial_value)
        self.state = PlannerState()
        counter = itertools.count(1)
        self.keys: Callable[[], str] = lambda: f"backtest-{next(counter)}"
        self.fills: list[FillRecord] = []
        self.fees = ZERO
        self.slippage = ZERO
        self.turnover = ZERO
        self.rejected = 0
        self.api_calls = 0
        self.plans = 0
        quote = replay.quote
        self._assets = [a for a in replay.config.assets if a.symbol != quote]

    # -- limits of the screen, per traded asset ----------------------------------------------------------

    def _limits(self, i: int) -> tuple[list[float], list[float], list[int], list[float]]:
        """(hard, trigger, cooling-until, re-arm) per traded asset, from the day's thresholds and the state.

        An asset may trade when its drift exceeds `hard`, or exceeds `trigger` once the step's time reaches
        `cooling-until`; a held-back asset changes state when its drift falls below `re-arm`. All are widened
        by SCREEN_EPS towards "plan this step".
        """
        policy = self.policy
        h = policy.hysteresis
        replay = self.replay
        tops = replay.snapshot(i, self.balances, books=())
        risk, _source = portfolio_risk(replay.config, tops)
        hard, trigger, cool, rearm = [], [], [], []
        thresholds = []
        for a in self._assets:
            market = tops.markets[f"{a.symbol}/{replay.quote}"]
            context = AssetContext(a.symbol, a.target_weight, ZERO, market, risk.get(a.symbol))
            thresholds.append(_screen_threshold(policy.threshold, context))
        rule = policy.threshold
        if isinstance(rule, NoTradeRegion) and rule.joint:
            factor = _joint_factor([a.symbol for a in self._assets], thresholds, risk)
            thresholds = [t * factor for t in thresholds]
        for a, threshold in zip(self._assets, thresholds, strict=True):
            memory = self.state.of(a.symbol)
            hard.append(float(a.max_deviation) - SCREEN_EPS)
            armed = memory.armed or not h
            trigger.append(float(threshold * (ONE + h)) - SCREEN_EPS if armed else math.inf)
            until = 0
            if policy.cooldown_seconds and memory.last_trade_at is not None:
                until = int(memory.last_trade_at.timestamp()) + math.ceil(policy.cooldown_seconds)
            cool.append(until)
            rearm.append(float(threshold * (ONE - h)) + SCREEN_EPS if h and not memory.armed else -1.0)
        return hard, trigger, cool, rearm

    def run(self) -> BacktestResult:
        replay = self.replay
        config = replay.config
        quote = replay.quote
        syms = [a.symbol for a in self._assets]
        cols = [replay.floats[s] for s in syms]
        targets = [float(a.target_weight) for a in self._assets]
        quote_cfg = config.asset(quote)
        quote_target = float(quote_cfg.target_weight) if quote_cfg else 0.0
        m = len(syms)
        idx = range(m)
        ts = replay.prices.timestamps
        n = len(ts)

        held = [float(self.balances[s]) for s in syms]
        cash = float(self.balances[quote])
        every = self.bp.every_seconds
        next_due = ts[0] + every if every else 0
        screen = self.prescreen and not every
        next_day = 0
        hard: list[float] = []
        trigger: list[float] = []
        cool: list[int] = []
        rearm: list[float] = []

        bucket = max(1, -(-n // TIMELINE_POINTS))
        timeline: list[TimelinePoint] = []
        bucket_max = 0.0
        drift_sum = 0.0
        value_sum = 0.0
        drift_max = 0.0
        te_sum = 0.0
        te_sq = 0.0
        prev_value = cash + sum(held[k] * cols[k][0] for k in idx)
        progress = self.progress
        reported = 0
        # the live tool checks every step (a calendar policy only on its dates), whether or not we plan it
        checks = 0 if every else n

        for i in range(n):
            t = ts[i]
            if t >= next_day:
                next_day = (t // DAY + 1) * DAY
                hard, trigger, cool, rearm = self._limits(i)
            value = cash
            vals = [held[k] * cols[k][i] for k in idx]
            for v in vals:
                value += v
            # tracking: the held portfolio's return over the step against the target weights' return
            if i:
                target_return = 0.0
                for k in idx:
                    target_return += targets[k] * (cols[k][i] / cols[k][i - 1] - 1.0)
                diff = value / prev_value - 1.0 - target_return
                te_sum += diff
                te_sq += diff * diff
            total_drift = abs(quote_target - cash / value)
            go = False
            for k in idx:
                size = abs(targets[k] - vals[k] / value)
                total_drift += size
                if size > hard[k] or (size > trigger[k] and t >= cool[k]) or size < rearm[k]:
                    go = True
            drift_sum += total_drift
            if total_drift > drift_max:
                drift_max = total_drift
            if total_drift > bucket_max:
                bucket_max = total_drift

            if every:
                go = t >= next_due
                if go:
                    next_due += every * ((t - next_due) // every + 1)
                    checks += 1
            elif not screen:
                go = True
            if go:
                if self._step(i):
                    held = [float(self.balances[s]) for s in syms]
                    cash = float(self.balances[quote])
                    value = cash + sum(held[k] * cols[k][i] for k in idx)
                hard, trigger, cool, rearm = self._limits(i)
            prev_value = value
            value_sum += value

            if i % bucket == bucket - 1 or i == n - 1:
                timeline.append(TimelinePoint(replay.prices.time(i), bucket_max, self.fees + self.slippage))
                bucket_max = 0.0
            if progress is not None and i - reported >= PROGRESS_EVERY:
                progress(i - reported)
                reported = i
        if progress is not None:
            progress(n - reported)

        self.api_calls += IDLE_CALLS * checks
        last = {s: replay.prices.price(n - 1, s) for s in syms}
        final_value = self.balances[quote] + sum((self.balances[s] * last[s] for s in syms), ZERO)
        periods = n - 1
        te = 0.0
        if periods > 1:
            variance = max(0.0, (te_sq - te_sum * te_sum / periods) / (periods - 1))
            step = replay.prices.step_seconds or DAY
            te = math.sqrt(variance) * math.sqrt(SECONDS_PER_YEAR / step)
        return BacktestResult(
            policy=self.bp.name,
            description=self.bp.description,
            steps=n,
            start=replay.prices.time(0),
            end=replay.prices.time(n - 1),
            initial_value=self.initial_value,
            final_value=final_value,
            trades=len(self.fills),
            rejected=self.rejected,
            turnover=self.turnover,
            fees=self.fees,
            slippage=self.slippage,
            mean_drift=_stat(drift_sum / n),
            mean_value=_stat(value_sum / n),
            years=Decimal(ts[n - 1] - ts[0]) / SECONDS_PER_YEAR,
            max_drift=_stat(drift_max),
            tracking_error=_stat(te),
            api_calls=self.api_calls,
            plans=self.plans,
            final_balances=dict(self.balances),
            fills=tuple(self.fills),
            timeline=tuple(timeline),
        )

    def _step(self, i: int) -> bool:
        """Plan step `i` on its snapshot, fill the trades on paper, carry the state; True when something filled."""
        replay = self.replay
        config = replay.config
        now = replay.prices.time(i)
        state = self.state
        # as live: best bid/ask of every market, then full books only where the planner's screen passes
        tops = replay.snapshot(i, self.balances, books=())
        books = frozenset(needs_book(config, tops, state, now=now, policy=self.policy))
        snapshot = replay.with_books(tops, i, books)
        decided = plan(config, snapshot, state, now=now, policy=self.policy, key_factory=self.keys)
        self.plans += 1
        self.api_calls += len(books)
        if self.on_plan is not None:
            self.on_plan(PlanStep(i, snapshot, state, decided, books))
        executed: set[str] = set()
        for trade in decided.trades:
            if self._fill(i, snapshot.markets[trade.market], trade.side, trade.amount):
                executed.add(trade.symbol)
        if executed:
            self.api_calls += AFTER_EXECUTION_CALLS
        self.state = state.after(decided, executed, now)
        return bool(executed)

    def _fill(self, i: int, market: Market, side: str, amount: Decimal) -> bool:
        """Send one order of step `i` to `market` as the live tool would (one request) and fill it on paper
        with `paper_fill`: fee, spread and the walk of `market`'s book, the exchange's lot and minimum. An order
        the paper exchange refuses counts as rejected. True when something filled; the fill is booked.

        `_step` sends every trade of a plan through here; a subclass that decides its trades some other way
        (the bench's cvxportfolio anchor) fills them through here too, so that they cost what a plan's would."""
        self.api_calls += 1
        try:
            fill = paper_fill(
                market,
                side,
                amount,
                base_free=self.balances.get(market.base, ZERO),
                quote_free=self.balances.get(market.quote, ZERO),
            )
        except (InvalidOrderError, InsufficientFundsError):
            self.rejected += 1
            return False
        if not fill.filled:
            return False
        self.balances[market.base] = self.balances.get(market.base, ZERO) + fill.base_delta
        self.balances[market.quote] = self.balances.get(market.quote, ZERO) + fill.quote_delta
        fee_value = fill.fee if fill.fee_currency == market.quote else fill.fee * market.mid
        slippage = abs(fill.cost - fill.filled * market.mid)
        self.fees += fee_value
        self.slippage += slippage
        self.turnover += fill.cost
        self.fills.append(
            FillRecord(
                step=i,
                at=self.replay.prices.time(i),
                symbol=market.base,
                side=side,
                amount=amount,
                filled=fill.filled,
                notional=fill.cost,
                fee=fill.fee,
                fee_currency=fill.fee_currency,
                fee_value=fee_value,
                slippage=slippage,
            )
        )
        return True


# --- reports: what the CLI renders ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BacktestReport:
    """Several policies over one history and market, with what is needed to reproduce the run."""

    config: str
    portfolio_id: str
    quote: str
    prices: PriceSeries
    book_model: BookModel
    rules: Mapping[str, MarketRules]
    results: list[BacktestResult]
    risk_aversion: Decimal = DEFAULT_RISK_AVERSION

    def to_dict(self) -> dict[str, Any]:
        p = self.prices
        b = self.book_model
        return {
            "config": self.config,
            "portfolio_id": self.portfolio_id,
            "quote": self.quote,
            "prices": {
                "source": p.source,
                "steps": len(p),
                "start": _iso(p.time(0)),
                "end": _iso(p.time(len(p) - 1)),
                "step_seconds": p.step_seconds,
            },
            "market_model": {
                "spread_bps": plain(b.spread_bps),
                "levels": b.levels,
                "level_step_bps": plain(b.level_step_bps),
                "depth_quote": plain(b.depth_quote),
                "depth_growth": plain(b.depth_growth),
                "vol_widening": plain(b.vol_widening),
                "markets": {
                    s: {
                        "taker_fee": plain(r.taker_fee),
                        "amount_step": plain(r.amount_step),
                        "min_notional": plain(r.min_notional),
                        "fee_source": r.source,
                    }
                    for s, r in self.rules.items()
                },
            },
            "risk_aversion": plain(self.risk_aversion),
            "results": [r.to_dict(self.risk_aversion) for r in self.results],
        }


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def backtest_files(
    config_path: Path,
    prices_path: Path,
    *,
    policy_names: Sequence[str] = (),
    compare: bool = False,
    book_model: BookModel | None = None,
    taker_fee: Decimal | None = None,
    initial_value: Decimal = DEFAULT_INITIAL_VALUE,
    calendar_seconds: int = DEFAULT_CALENDAR_SECONDS,
    risk_aversion: Decimal | None = None,
    progress: Callable[[int], Progress | None] | None = None,
) -> BacktestReport:
    """`rebalance backtest`: load and validate both files, pick the policies, run each.

    `risk_aversion` replaces the config's (the yardstick's gamma and the no-trade regions' alike).
    `progress`, when given, is called once with the total number of steps to replay and returns the
    per-step callback (or None), so that a caller can size a progress bar before anything runs.
    """
    config = load_config(config_path)
    if risk_aversion is not None:
        config = config.model_copy(update={"risk_aversion": risk_aversion})
    prices = load_prices(prices_path)
    policies = select_policies(
        config, policy_names, compare=compare, calendar_seconds=calendar_seconds, check_seconds=prices.step_seconds
    )
    model = book_model or BookModel()
    rules = market_rules(config, prices, taker_fee=taker_fee)
    replay = Replay(config, prices, book_model=model, rules=rules)
    tick = progress(len(prices) * len(policies)) if progress is not None else None
    results = run_many(config, replay, policies, initial_value=initial_value, progress=tick)
    return BacktestReport(
        str(config_path), config.portfolio_id, replay.quote, prices, model, rules, results, config.risk_aversion
    )


def parse_step(text: str, *, flag: str = "--step", low: int = 60, high: int | None = DAY) -> int:
    """Whole seconds from `60`, `1m`, `1h`, `1d` (the config's duration syntax), within [low, high]."""
    from ..config import _duration

    try:
        seconds = _duration(text)
    except ValueError as exc:
        raise InputError(f"{flag} {text!r}: {exc}") from None
    too_high = high is not None and seconds > high
    if seconds != seconds.to_integral_value() or seconds < low or too_high:
        span = f"from {low}s to {high}s" if high is not None else f"of at least {low}s"
        raise InputError(f"{flag} {text!r}: must be whole seconds {span}")
    return int(seconds)


def parse_assets(specs: Sequence[str]) -> dict[str, Decimal]:
    """`BTC=65000` pairs into start prices."""
    out: dict[str, Decimal] = {}
    for spec in specs:
        name, sep, price = spec.partition("=")
        try:
            value = Decimal(price.strip())
        except ArithmeticError:
            value = Decimal(0)
        if not sep or not name.strip() or not value.is_finite() or value <= 0:
            raise InputError(f"--asset {spec!r}: write SYMBOL=START_PRICE, e.g. BTC=65000")
        out[name.strip()] = value
    return out


def generate_file(
    output: Path,
    *,
    regime: str,
    steps: int,
    step_seconds: int,
    seed: int,
    assets: Mapping[str, Decimal] | None = None,
    start: datetime | None = None,
) -> PriceSeries:
    """`rebalance backtest generate`: a reproducible scenario written as a prices CSV (atomically)."""
    from .csvfile import write_prices
    from .generate import EXAMPLE_START_PRICES, REGIMES, generate_prices

    if regime not in REGIMES:
        raise InputError(f"unknown regime {regime!r}; known: {', '.join(REGIMES)}")
    series = generate_prices(
        assets=assets or EXAMPLE_START_PRICES,
        steps=steps,
        step_seconds=step_seconds,
        seed=seed,
        regime=REGIMES[regime],
        start=start or datetime(2025, 1, 1, tzinfo=UTC),
    )
    write_prices(series, output)
    return series


def write_chart(report: BacktestReport, path: Path) -> None:
    """Drift and cumulative cost over time, one line per policy, as a PNG (needs the `chart` extra)."""
    try:
        import matplotlib
    except ImportError:
        raise InputError("--chart needs matplotlib: pip install 'rebalance[chart]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for r in report.results:
        times = [p.at for p in r.timeline]
        top.plot(times, [p.drift * 100 for p in r.timeline], linewidth=0.8, label=r.policy)
        bottom.plot(times, [float(p.cost) for p in r.timeline], linewidth=1.0, label=r.policy)
    top.set_ylabel("total drift, % (max per point)")
    bottom.set_ylabel(f"cumulative cost, {report.quote}")
    top.set_title(f"{report.portfolio_id}: {report.prices.source or 'prices'}")
    top.legend(fontsize="small", loc="upper left")
    top.grid(alpha=0.3)
    bottom.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise InputError(f"--chart {path}: cannot write: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def trailing_covariance(assets: Sequence[str], returns: Sequence[Sequence[float]], min_days: int) -> Covariance | None:
    """Sample covariance of daily log returns (one list per asset, aligned); None with fewer than `min_days`."""
    n = len(returns[0]) if returns else 0
    if n < max(2, min_days):
        return None
    means = [math.fsum(r) / n for r in returns]
    m = len(returns)
    matrix = tuple(
        tuple(
            math.fsum((returns[a][t] - means[a]) * (returns[b][t] - means[b]) for t in range(n)) / (n - 1)
            for b in range(m)
        )
        for a in range(m)
    )
    return Covariance(tuple(assets), matrix, source=f"trailing {n} daily closes")
