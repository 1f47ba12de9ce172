"""From a snapshot, a config and remembered state to a Plan: which assets to trade, how much, in what order.

Pure and deterministic given its inputs (idempotency keys come from an injectable factory). Every amount is
a `Decimal`. The planner is what `plan`, `execute`, the daemon and the backtest all call, so a decision seen
in a backtest is the decision the daemon makes.

Order of work per asset, cheapest first so that idle checks stay cheap: value at mid -> drift -> threshold ->
hysteresis / cooldown -> (only now) walk the book for the cost -> cost gate -> sizing and rounding.
"""

from __future__ import annotations

import functools
import json
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal
from typing import Any, Protocol

from .config import AssetConfig, Config, PolicyName, RebalanceTo, RegionShape
from .costs import (
    DEFAULT_PRICE_BOUND,
    BookWalkSlippage,
    CostEstimate,
    CostModel,
    TakerFee,
    TopOfBookSlippage,
    worst_acceptable_price,
)
from .errors import InputError, PlanningError
from .ids import KeyFactory, new_key
from .snapshot import Covariance, Market, Snapshot

ZERO = Decimal(0)
ONE = Decimal(1)

# Hold reasons: stable strings, scripts and alerts match on them.
BELOW_THRESHOLD = "below threshold"
COST_EXCEEDS_BENEFIT = "cost exceeds benefit"
BELOW_MIN_NOTIONAL = "below min notional"
BOOK_TOO_THIN = "book too thin"
IS_QUOTE = "is the quote asset"
HYSTERESIS = "held by hysteresis"
COOLDOWN = "held by cooldown"
NOTHING_TO_SELL = "nothing free to sell"
NO_QUOTE = "not enough free quote"
MAX_TRADES = "max trades per cycle"
NO_IMPROVEMENT = "would not reduce total drift"
INSIDE_REGION = "inside the no-trade region"
COST_SHARE_ABSURD = "cost share too high"

# Broadie, Glasserman & Kou (1997): a barrier watched at intervals dt acts like one moved inward by
# beta * s * sqrt(dt), beta = -zeta(1/2) / sqrt(2 pi) = 0.5826 (the drift overshoots between checks).
DISCRETE_CHECK_BETA = 0.5826
# an order that loses more than this share of its notional to fees, spread and impact is not a correction
DEFAULT_MAX_COST_SHARE = Decimal("0.02")
_WIDTH_QUANTUM = Decimal("1e-10")


# --- what a rule sees of one asset ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssetRisk:
    """Daily variance rates the no-trade region needs, from the covariance of the portfolio's own assets.

    - `weight_variance` (s_i^2): of asset i's weight while the portfolio sits at target, w_i^2 Var(r_i - r*),
      with r* = sum_j w_j r_j the target portfolio's return: how fast drift builds up.
    - `deviation_variance` (sigma_i^2): of the portfolio's return difference against the target per unit of
      weight deviation of i held against the quote, Var(r_i): what a unit of drift costs in tracking.
    """

    weight_variance: float
    deviation_variance: float
    source: str
    # Cov(r_i, r_j) with every traded asset j (i included), in the order of `row_names`: what a joint region
    # weighs deviations by; and sum_j |Cov(r_i, r_j)|, the scale of the screen's float error
    row: tuple[float, ...] = ()
    row_names: tuple[str, ...] = ()
    spread: float = 0.0

    @property
    def covariances(self) -> tuple[tuple[str, float], ...]:
        """(asset j, Cov(r_i, r_j)) pairs of `row`."""
        return tuple(zip(self.row_names, self.row, strict=True))


@dataclass(frozen=True, slots=True)
class AssetContext:
    """One asset as a threshold rule sees it: the screen's numbers, before any book is walked."""

    symbol: str
    target: Decimal
    drift: Decimal
    market: Market | None
    risk: AssetRisk | None = None

    @property
    def volatility(self) -> Decimal | None:
        return self.market.volatility if self.market else None


def portfolio_risk(config: Config, snapshot: Snapshot) -> tuple[dict[str, AssetRisk], str]:
    """Per traded asset, its `AssetRisk`, and where the covariance came from ("" when there is none).

    The covariance is the snapshot's (a backtest's trailing daily closes, or a snapshot file's `covariance`);
    else each market's daily volatility with the config's `correlations` (unlisted pairs 0); else none, and
    a region falls back to the one-asset-against-cash width, which needs no covariance.

    It depends only on the targets, the correlations and the volatilities (or the covariance), which change
    daily, not on each tick's prices: computed once per distinct set of them (`_risk`, cached), a daemon's
    idle checks do not pay the O(assets^2) work again.
    """
    quote = config.quote_symbol
    traded = tuple((a.symbol, a.target_weight) for a in config.assets if a.symbol != quote)
    cov = snapshot.covariance
    names = [s for s, _ in traded]
    vols: tuple[Decimal | None, ...] = ()
    if cov is None or not cov.covers(names):
        cov = None
        vols = tuple(m.volatility if (m := snapshot.markets.get(f"{s}/{quote}")) else None for s in names)
    risk, source = _risk(traded, tuple(sorted(config.correlations.items())), vols, cov)
    return dict(risk), source


@functools.lru_cache(maxsize=4096)
def _risk(
    traded: tuple[tuple[str, Decimal], ...],
    correlations: tuple[tuple[str, Decimal], ...],
    vols: tuple[Decimal | None, ...],
    cov: Covariance | None,
) -> tuple[tuple[tuple[str, AssetRisk], ...], str]:
    names = [s for s, _ in traded]
    if cov is None:
        if not names or any(v is None or v <= 0 for v in vols):
            return (), ""
        sd = [float(v) for v in vols if v is not None]
        corr = {tuple(k.split("/")): float(c) for k, c in correlations}

        def rho(a: str, b: str) -> float:
            return 1.0 if a == b else corr.get((a, b), corr.get((b, a), 0.0))

        matrix = tuple(tuple(rho(a, b) * sd[i] * sd[j] for j, b in enumerate(names)) for i, a in enumerate(names))
        cov = Covariance(tuple(names), matrix, source="market volatility and config correlations")
    w = [float(t) for _, t in traded]
    index = {s: k for k, s in enumerate(cov.assets)}  # an O(1) lookup, not the O(n) of Covariance.of
    cols = [index[b] for b in names]
    sigma = [[row[c] for c in cols] for row in (cov.matrix[index[a]] for a in names)]
    sw = [sum(sigma[i][j] * w[j] for j in range(len(w))) for i in range(len(w))]
    wsw = sum(w[i] * sw[i] for i in range(len(w)))
    out = tuple(
        (
            s,
            AssetRisk(
                w[i] ** 2 * max(0.0, sigma[i][i] - 2 * sw[i] + wsw),
                sigma[i][i],
                cov.source,
                tuple(sigma[i]),
                tuple(names),
                sum(abs(c) for c in sigma[i]),
            ),
        )
        for i, s in enumerate(names)
    )
    return out, cov.source


# --- policy pieces ---------------------------------------------------------------------------------


class ThresholdRule(Protocol):
    def threshold(self, asset: AssetContext) -> Decimal:
        """Half-width of the asset's no-trade band: it may trade once |drift| exceeds it."""
        ...


@dataclass(frozen=True, slots=True)
class VolatilityScaledThreshold:
    """base * (1 + factor * daily volatility): calm markets trade small drifts, wild ones wait for more."""

    base: Decimal
    factor: Decimal

    def threshold(self, asset: AssetContext) -> Decimal:
        return self.base * (ONE + self.factor * (asset.volatility or ZERO))


@dataclass(frozen=True, slots=True)
class FixedThreshold:
    """A fixed no-trade band, e.g. 5 percentage points."""

    band: Decimal

    def threshold(self, asset: AssetContext) -> Decimal:
        return self.band


@dataclass(frozen=True, slots=True)
class RegionFigures:
    """How a no-trade region was sized, for the plan's asset line."""

    half_width: Decimal
    uncorrected: Decimal  # the continuous-time width, before the check-interval correction
    cost_rate: Decimal  # k_i: fee + half spread per unit traded
    risk_source: str


@dataclass(frozen=True, slots=True)
class NoTradeRegion:
    """Per-asset no-trade region of the certainty-equivalent objective cost + (gamma/2) * TE^2 (the yardstick
    of Leland 2000 and Sun et al. 2006, and the objective of Boyd et al. 2017), so that the rule minimizes what
    the backtest judges it by, for trades that return to `return_point` p of the half-width (`ToRegionPoint`).

    Half-width delta_i = (6 k_i s_i^2 / (gamma sigma_i^2 (1 + p) (1 + p^2)))^(1/3), with k_i = fee + half
    spread, the planner's own cost estimate for one lot at the top of the book, and s_i^2 and sigma_i^2 as in
    `AssetRisk`. The derivation (renewal-reward, for the small-cost limit in which the deviation x is a
    Brownian motion of variance rate s^2, as in Rogers 2004 and Janecek & Shreve 2004): a cycle starts at
    x = p b and ends when |x| reaches the trigger b. Brownian exit from (-b, b) started at a takes
    E[T] = (b^2 - a^2) / s^2 and accumulates E[int x^2 dt] = (b^4 - a^4) / (6 s^2) (solve (s^2/2) f'' = -1 and
    = -x^2 with f(+-b) = 0), and the cycle's trade costs k (b - a). Per unit time, with a = p b:
    cost k s^2 / ((1 + p) b) + tracking (gamma/2) sigma^2 (1 + p^2) b^2 / 6, least at the b above. At p = 1
    (Leland's trade to the edge, a reflecting band) it is the (3 k s^2 / (2 gamma sigma^2))^(1/3) of Janecek &
    Shreve 2004 and Rogers 2004 (per asset in the multi-asset setting as in Leland 2000); at p = 0 (back to
    target) (6 k s^2 / (gamma sigma^2))^(1/3); a point inside needs the wider trigger, since each trade then
    buys more tracking at the same cost per unit. Checked every dt instead of continuously, the drift
    overshoots the trigger by about 0.5826 s_i sqrt(dt) (Broadie, Glasserman & Kou 1997), so the region is
    shrunk by that much (never below 0). Without a covariance, s_i^2 / sigma_i^2 = w_i^2 (1 - w_i)^2 (the asset
    against cash alone, which needs no volatility) and no correction is made.
    """

    risk_aversion: Decimal
    check_seconds: Decimal
    cost_model: CostModel = field(default_factory=CostModel)
    # weigh each asset's deviation with the others' through the covariance (`joint_remaining`)
    joint: bool = False
    # p: where a trade ends, as a fraction of the half-width (the policy's `ToRegionPoint`); 1 = the edge
    return_point: Decimal = ONE

    def threshold(self, asset: AssetContext) -> Decimal:
        return self.figures(asset).half_width

    def cost_rate(self, market: Market, side: str) -> Decimal:
        """k for `side`: the cost model's estimate for one lot, as a share of its notional."""
        est = self.cost_model.estimate(market, side, market.amount_step)
        return est.total / est.notional if est.notional else market.taker_fee

    def figures(self, asset: AssetContext, *, cost_rate: Decimal | None = None) -> RegionFigures:
        """The asset's region. A daemon asks this for every asset of every idle check, and the inputs change
        when the book's top or the daily statistics do: with the stock cost models (taker fee; book walk or top
        of book) and a best level that holds a whole lot, k reads nothing but the fee, the lot, the mid and that
        level, so the figures are remembered under exactly those, the target and the risk. Any other model or
        book is computed afresh."""
        market = asset.market
        if market is None:
            return RegionFigures(ZERO, ZERO, ZERO, "")
        side = "buy" if asset.drift > 0 else "sell"
        key: tuple[Any, ...] | None = None
        if cost_rate is None and self.stock_costs():
            levels = market.asks if side == "buy" else market.bids
            if levels and levels[0][1] >= market.amount_step:
                key = (
                    self.risk_aversion,
                    self.check_seconds,
                    self.return_point,
                    side,
                    market.taker_fee,
                    market.amount_step,
                    market.mid,
                    levels[0],
                    asset.target,
                    asset.risk,
                )
                found = _REGIONS.get(key)
                if found is not None:
                    return found
        k = self.cost_rate(market, side) if cost_rate is None else cost_rate
        width, raw = self.half_width(float(k), float(asset.target), asset.risk)
        figures = RegionFigures(
            _decimal(width), _decimal(raw), k, asset.risk.source if asset.risk else "target weight alone"
        )
        if key is not None:
            if len(_REGIONS) >= _REGIONS_MAX:
                _REGIONS.clear()
            _REGIONS[key] = figures
        return figures

    def stock_costs(self) -> bool:
        """Whether the cost model is the stock one, whose one-lot k is a closed form (see `_float_cost_rate`)."""
        model = self.cost_model
        return (
            type(model) is CostModel
            and type(model.fees) is TakerFee
            and type(model.slippage) in (BookWalkSlippage, TopOfBookSlippage)
        )

    def half_width(self, k: float, target: float, risk: AssetRisk | None) -> tuple[float, float]:
        """(corrected, uncorrected) half-width; floats, as it is a statistic that only places a boundary."""
        return _region_width(
            k,
            target,
            risk,
            float(self.risk_aversion),
            float(self.check_seconds) / 86_400,
            point_factor(float(self.return_point)),
        )


def point_factor(p: float) -> float:
    """4 / ((1 + p) (1 + p^2)): the cube of how much wider the trigger of trades to p of the region is than the
    edge-sizing one (`NoTradeRegion`); exactly 1 at p = 1, 4 at p = 0."""
    return 4 / ((1 + p) * (1 + p * p))


def _region_width(
    k: float, target: float, risk: AssetRisk | None, gamma: float, dt_days: float, factor: float = 1.0
) -> tuple[float, float]:
    """`NoTradeRegion.half_width` with its constants given (the screen computes them once per check); `factor`
    is `point_factor` of the region's return point."""
    if risk is None or risk.deviation_variance <= 0:
        ratio, s2 = (target * (1 - target)) ** 2, 0.0
    else:
        ratio, s2 = risk.weight_variance / risk.deviation_variance, risk.weight_variance
    raw = (3 * k * ratio / (2 * gamma) * factor) ** (1 / 3) if k > 0 and ratio > 0 else 0.0
    return max(0.0, raw - DISCRETE_CHECK_BETA * math.sqrt(s2 * dt_days)), raw


# the figures of the region inputs seen so far (`NoTradeRegion.figures`), by everything they are computed from
_REGIONS: dict[tuple[Any, ...], RegionFigures] = {}
_REGIONS_MAX = 65536


def _decimal(x: float) -> Decimal:
    return Decimal(repr(x)).quantize(_WIDTH_QUANTUM)


class Sizing(Protocol):
    def remaining_drift(self, drift: Decimal, threshold: Decimal) -> Decimal:
        """The signed drift left after the trade: 0 to go back to target."""
        ...


@dataclass(frozen=True, slots=True)
class ToTarget:
    def remaining_drift(self, drift: Decimal, threshold: Decimal) -> Decimal:
        return ZERO


@dataclass(frozen=True, slots=True)
class ToBandEdge:
    """Trade only to the edge of the no-trade band (Leland 1996): far less turnover for similar tracking."""

    def remaining_drift(self, drift: Decimal, threshold: Decimal) -> Decimal:
        edge = min(threshold, abs(drift))
        return edge if drift > 0 else -edge


@dataclass(frozen=True, slots=True)
class ToRegionPoint:
    """Trade to a point inside the no-trade region: `fraction` of its half-width (1 = its edge, Leland's
    sizing; 0 = the target). A point inside makes each order at least (1 - fraction) of the half-width of the
    portfolio, so that discrete checks do not turn edge sizing into a stream of dust orders."""

    fraction: Decimal

    def remaining_drift(self, drift: Decimal, threshold: Decimal) -> Decimal:
        edge = min(threshold * self.fraction, abs(drift))
        return edge if drift > 0 else -edge


class Gate(Protocol):
    def worth_it(self, drift_value: Decimal, cost: CostEstimate) -> bool:
        """Whether the sized order is worth sending; hard-band breaches skip the gate."""
        ...


@dataclass(frozen=True, slots=True)
class CostGate:
    """Trade only when the drift's value beats the estimated cost times a safety margin."""

    safety_margin: Decimal

    def worth_it(self, drift_value: Decimal, cost: CostEstimate) -> bool:
        return drift_value > self.safety_margin * cost.total


@dataclass(frozen=True, slots=True)
class CostShareGate:
    """Refuse an order whose estimated cost is an absurd share of its notional (a book far thinner than the
    region assumed): the region already weighed the usual cost, this catches the unusual one."""

    max_share: Decimal = DEFAULT_MAX_COST_SHARE

    def worth_it(self, drift_value: Decimal, cost: CostEstimate) -> bool:
        return cost.total <= self.max_share * cost.notional


@dataclass(frozen=True, slots=True)
class Policy:
    """How the planner decides; built from the config, or composed by hand for backtests."""

    threshold: ThresholdRule
    sizing: Sizing = ToTarget()
    gate: Gate | None = None
    hysteresis: Decimal = ZERO
    cooldown_seconds: Decimal = ZERO
    cost_model: CostModel = field(default_factory=CostModel)
    name: str = "cost-adjusted"


def no_trade_region(config: Config, check_seconds: Decimal, *, name: str = "no-trade-region") -> Policy:
    """The no-trade-region rule: `NoTradeRegion` thresholds sized for the config's `region_point`, `ToRegionPoint`
    sizing to that point, `CostShareGate`.

    The region replaces hysteresis (a trade ends inside it, and the next waits until the drift leaves it
    again); the config's cooldown still holds an asset after a trade.
    """
    return Policy(
        threshold=NoTradeRegion(
            config.risk_aversion,
            check_seconds,
            joint=config.region is RegionShape.JOINT,
            return_point=config.region_point,
        ),
        sizing=ToRegionPoint(config.region_point),
        gate=CostShareGate(),
        cooldown_seconds=config.cooldown,
        name=name,
    )


def cost_adjusted(config: Config) -> Policy:
    """The original design's rule: volatility-scaled threshold, cost gate, to target or to the band's edge."""
    return Policy(
        threshold=VolatilityScaledThreshold(config.base_threshold, config.volatility_factor),
        sizing=ToBandEdge() if config.rebalance_to is RebalanceTo.BAND_EDGE else ToTarget(),
        gate=CostGate(config.safety_margin),
        hysteresis=config.hysteresis,
        cooldown_seconds=config.cooldown,
    )


def policy_from_config(config: Config, *, check_seconds: Decimal | None = None) -> Policy:
    """The config's `policy`; regions are corrected for checks every `check_seconds` (default: the
    daemon's `interval`, which is also what a cron of `plan`/`execute` should use)."""
    if config.policy is PolicyName.NO_TRADE_REGION:
        return no_trade_region(config, config.interval if check_seconds is None else check_seconds)
    return cost_adjusted(config)


# --- remembered state (hysteresis, cooldown) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssetMemory:
    armed: bool = True
    last_trade_at: datetime | None = None


_FRESH = AssetMemory()  # immutable: one instance serves every asset without memory


@dataclass(frozen=True, slots=True)
class PlannerState:
    assets: Mapping[str, AssetMemory] = field(default_factory=dict)

    def of(self, symbol: str) -> AssetMemory:
        return self.assets.get(symbol, _FRESH)

    def to_json(self) -> str:
        return json.dumps(
            {
                s: {
                    "armed": m.armed,
                    "last_trade_at": m.last_trade_at.isoformat() if m.last_trade_at else None,
                }
                for s, m in sorted(self.assets.items())
            }
        )

    @classmethod
    def from_json(cls, text: str | None) -> PlannerState:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls(
            {
                s: AssetMemory(
                    armed=bool(v.get("armed", True)),
                    last_trade_at=datetime.fromisoformat(v["last_trade_at"]) if v.get("last_trade_at") else None,
                )
                for s, v in raw.items()
            }
        )

    def after(self, plan: Plan, executed: set[str], now: datetime) -> PlannerState:
        """The state once `executed` symbols traded: they start their cooldown, and disarm unless the trade
        left them inside the re-arm band (a trade back to target does; one to the band's edge does not)."""
        assets = dict(self.assets)
        for line in plan.assets:
            mem = assets.get(line.symbol, AssetMemory())
            if line.symbol in executed:
                mem = AssetMemory(armed=line.armed_after_trade, last_trade_at=now)
            elif line.rearm:
                mem = replace(mem, armed=True)
            assets[line.symbol] = mem
        return PlannerState(assets)


# --- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssetLine:
    symbol: str
    target_weight: Decimal
    current_weight: Decimal
    drift: Decimal
    threshold: Decimal
    drift_value: Decimal
    est_cost: Decimal
    decision: str  # trade | hold
    reason: str
    mid: Decimal
    rearm: bool = False  # drift fell inside the re-arm band this time
    # a trade that ends inside the re-arm band (back to target) leaves the asset armed; one that ends at the
    # band's edge (band_edge sizing) disarms it until the drift comes back below threshold * (1 - hysteresis)
    armed_after_trade: bool = True
    region: RegionFigures | None = None  # how the no-trade region was sized (no-trade-region policy only)


@dataclass(frozen=True, slots=True)
class Trade:
    symbol: str
    market: str
    side: str
    amount: Decimal
    est_price: Decimal
    notional: Decimal
    est_fee: Decimal
    est_slippage: Decimal
    idempotency_key: str
    drift_value: Decimal = ZERO
    # the protected order's limit: the worst level the walk reached, widened by max_slippage (costs.py)
    worst_price: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Summary:
    turnover: Decimal
    est_total_cost: Decimal
    drift_before: Decimal
    drift_after: Decimal


@dataclass(frozen=True, slots=True)
class Plan:
    plan_id: str
    portfolio_id: str
    quote: str
    taken_at: datetime
    total_value: Decimal
    assets: tuple[AssetLine, ...]
    trades: tuple[Trade, ...]
    summary: Summary
    policy: str
    notes: tuple[str, ...] = ()
    # market -> (lot, price tick) of the traded markets, so that amounts and prices show as the exchange does
    precision: Mapping[str, tuple[Decimal, Decimal]] = field(default_factory=dict)

    @property
    def has_trades(self) -> bool:
        return bool(self.trades)

    def to_dict(self) -> dict[str, Any]:
        """The Plan object; decimals as strings so nothing is rounded by a JSON reader. `digest` lets
        `execute --plan` refuse a file edited after it was saved (plan_file.py)."""
        doc: dict[str, Any] = {
            "portfolio_id": self.portfolio_id,
            "quote": self.quote,
            "taken_at": _iso(self.taken_at),
            "total_value": _money(self.total_value),
            "assets": [
                {
                    "symbol": a.symbol,
                    "target_weight": plain(a.target_weight),
                    "current_weight": _ratio(a.current_weight),
                    "drift": _ratio(a.drift),
                    "threshold": _ratio(a.threshold),
                    "drift_value": _money(a.drift_value),
                    "est_cost": _money(a.est_cost),
                    "decision": a.decision,
                    "reason": a.reason,
                    "mid": plain(a.mid),
                    "region": _region_dict(a.region),
                }
                for a in self.assets
            ],
            "trades": [
                {
                    "symbol": t.symbol,
                    "market": t.market,
                    "side": t.side,
                    "amount": plain(t.amount),
                    "est_price": _money(t.est_price),
                    "notional": _money(t.notional),
                    "est_fee": _money(t.est_fee),
                    "est_slippage": _money(t.est_slippage),
                    "worst_price": plain(t.worst_price) if t.worst_price is not None else None,
                    "idempotency_key": t.idempotency_key,
                }
                for t in self.trades
            ],
            "summary": {
                "turnover": _money(self.summary.turnover),
                "est_total_cost": _money(self.summary.est_total_cost),
                "drift_before": _ratio(self.summary.drift_before),
                "drift_after": _ratio(self.summary.drift_after),
            },
            "plan_id": self.plan_id,
            "policy": self.policy,
            "notes": list(self.notes),
            "precision": {
                m: {"amount_step": plain(lot), "price_step": plain(tick)} for m, (lot, tick) in self.precision.items()
            },
        }
        from .plan_file import plan_digest  # the saved-plan format's integrity check

        doc["digest"] = plan_digest(doc)
        return doc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """A plan saved with `plan --json`, for `execute --plan`; raises InputError when it is not one."""
        try:
            assets = tuple(
                AssetLine(
                    symbol=a["symbol"],
                    target_weight=Decimal(a["target_weight"]),
                    current_weight=Decimal(a["current_weight"]),
                    drift=Decimal(a["drift"]),
                    threshold=Decimal(a["threshold"]),
                    drift_value=Decimal(a["drift_value"]),
                    est_cost=Decimal(a["est_cost"]),
                    decision=a["decision"],
                    reason=a["reason"],
                    mid=Decimal(a["mid"]),
                    region=_region_from(a.get("region")),
                )
                for a in data["assets"]
            )
            trades = tuple(
                Trade(
                    symbol=t["symbol"],
                    market=t["market"],
                    side=t["side"],
                    amount=Decimal(t["amount"]),
                    est_price=Decimal(t["est_price"]),
                    notional=Decimal(t["notional"]),
                    est_fee=Decimal(t["est_fee"]),
                    est_slippage=Decimal(t["est_slippage"]),
                    idempotency_key=t["idempotency_key"],
                )
                for t in data["trades"]
            )
            s = data["summary"]
            taken_at = datetime.fromisoformat(str(data["taken_at"]).replace("Z", "+00:00"))
            plan = cls(
                plan_id=str(data["plan_id"]),
                portfolio_id=str(data["portfolio_id"]),
                quote=str(data["quote"]),
                taken_at=taken_at,
                total_value=Decimal(data["total_value"]),
                assets=assets,
                trades=trades,
                summary=Summary(
                    Decimal(s["turnover"]),
                    Decimal(s["est_total_cost"]),
                    Decimal(s["drift_before"]),
                    Decimal(s["drift_after"]),
                ),
                policy=str(data.get("policy", "")),
                notes=tuple(data.get("notes", ())),
                precision={
                    m: (Decimal(p["amount_step"]), Decimal(p["price_step"]))
                    for m, p in (data.get("precision") or {}).items()
                },
            )
        except (KeyError, TypeError, ValueError, ArithmeticError, IndexError) as exc:
            raise InputError(f"not a plan saved by `rebalance plan --json`: {type(exc).__name__}: {exc}") from None
        for t in plan.trades:
            if t.side not in ("buy", "sell") or t.amount <= 0:
                raise InputError(f"saved plan has an invalid trade: {t.side} {t.amount} {t.market}")
        if taken_at.tzinfo is None:
            raise InputError("saved plan's taken_at has no timezone")
        return plan


_RATIO = Decimal("1e-8")
_MONEY = Decimal("1e-8")


def _region_dict(r: RegionFigures | None) -> dict[str, str] | None:
    if r is None:
        return None
    return {
        "half_width": _ratio(r.half_width),
        "uncorrected_half_width": _ratio(r.uncorrected),
        "cost_rate": _ratio(r.cost_rate),
        "risk_source": r.risk_source,
    }


def _region_from(d: Mapping[str, str] | None) -> RegionFigures | None:
    if d is None:
        return None
    return RegionFigures(
        Decimal(d["half_width"]), Decimal(d["uncorrected_half_width"]), Decimal(d["cost_rate"]), d["risk_source"]
    )


def _ratio(d: Decimal) -> str:
    return format(d.quantize(_RATIO, rounding=ROUND_HALF_EVEN), "f")


def _money(d: Decimal) -> str:
    return format(d.quantize(_MONEY, rounding=ROUND_HALF_EVEN), "f")


def plain(d: Decimal) -> str:
    """Decimal text without exponent notation (1E+1 reads as a typo to an operator)."""
    return format(d, "f")


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def round_down(amount: Decimal, step: Decimal) -> Decimal:
    """Down to a whole number of lots: an order never exceeds what was sized, or the lot-size filter."""
    if amount <= 0:
        return ZERO
    return (amount / step).to_integral_value(rounding=ROUND_DOWN) * step


# --- planning ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _View:
    """One asset's numbers during planning."""

    symbol: str
    target: Decimal
    max_deviation: Decimal
    market: Market | None
    mid: Decimal
    free: Decimal
    holdings: Decimal
    value: Decimal = ZERO
    weight: Decimal = ZERO
    drift: Decimal = ZERO
    threshold: Decimal = ZERO
    drift_value: Decimal = ZERO
    cost: CostEstimate | None = None
    decision: str = "hold"
    reason: str = ""
    rearm: bool = False
    hard: bool = False
    armed_after_trade: bool = True
    region: RegionFigures | None = None


def _views(config: Config, snapshot: Snapshot) -> tuple[list[_View], Decimal]:
    quote = config.quote_symbol
    views: list[_View] = []
    total = ZERO
    missing: list[str] = []
    for a in config.assets:
        free = snapshot.balances.get(a.symbol, ZERO)
        holdings = free + snapshot.locked.get(a.symbol, ZERO)
        if a.symbol == quote:
            market, mid = None, ONE
        else:
            market = snapshot.markets.get(f"{a.symbol}/{quote}")
            if market is None:
                missing.append(f"{a.symbol}/{quote}")
                continue
            mid = market.mid
        v = _View(a.symbol, a.target_weight, a.max_deviation, market, mid, free, holdings)
        v.value = holdings * mid
        total += v.value
        views.append(v)
    if missing:
        raise PlanningError(
            f"no market for {', '.join(missing)} in the snapshot: every asset needs an ASSET/{quote} market"
        )
    if total <= 0:
        raise PlanningError(f"the portfolio is worth {total} {quote}: nothing to rebalance (check balances)")
    for v in views:
        v.weight = v.value / total
        v.drift = v.target - v.weight
        v.drift_value = abs(v.drift) * total * v.target
    return views, total


# coordinate descent of the joint region: sweeps at most, and the change in weight that ends it
_JOINT_SWEEPS = 500
_JOINT_TOLERANCE = 1e-13


def joint_of(views: list[_View], rule: ThresholdRule, risk: Mapping[str, AssetRisk]) -> dict[str, Decimal] | None:
    """`joint_remaining` when `rule` is a joint region, else None (every asset decided alone)."""
    return joint_remaining(views, rule, risk) if isinstance(rule, NoTradeRegion) and rule.joint else None


def joint_remaining(views: list[_View], rule: NoTradeRegion, risk: Mapping[str, AssetRisk]) -> dict[str, Decimal]:
    """Each asset's drift left after the joint region's correction (equal to its drift: it holds).

    The per-asset region of asset i is the minimizer, in one dimension, of (1/2) sigma_i^2 y^2 + lambda_i |x - y|
    with lambda_i = sigma_i^2 delta_i (x: its deviation, y: what is left of it, delta_i: its half-width): hold
    when |x| <= delta_i, else trade to y = delta_i sign(x). The joint region minimizes the same objective over all
    assets at once with the full covariance, (1/2) y' Sigma y + sum_i lambda_i |x_i - y_i|, each y_i between 0
    and x_i (a trade goes toward target, never past it): the quadratic is the tracking variance the deviations
    leave, so a deviation that the others hedge (BTC over, ETH under, correlated) is left alone, and one that
    adds to them is corrected sooner. Without correlation it is the per-asset region exactly. This is the
    single-period problem of Boyd et al. 2017 (sec. 4), with the per-asset region's width standing in for the
    horizon over which a correction pays. Inside the box |x_i - y_i| is linear, so the problem is a convex QP with
    box constraints, solved by cyclic coordinate descent (each step the exact minimizer along one axis, clipped).
    Floats: it places boundaries; amounts are sized from its answer in Decimal.
    """
    assets = [v for v in views if v.market is not None and v.symbol in risk and risk[v.symbol].row]
    if not assets:
        return {}
    names = [v.symbol for v in assets]
    at = {name: i for i, name in enumerate(names)}
    x = [-float(v.drift) for v in assets]  # deviations: weight minus target
    sigma = [[0.0] * len(names) for _ in names]
    for i, v in enumerate(assets):
        for other, c in risk[v.symbol].covariances:
            j = at.get(other)
            if j is not None:
                sigma[i][j] = c
    lam = []
    for i, v in enumerate(assets):
        width = float(rule.figures(AssetContext(v.symbol, v.target, v.drift, v.market, risk[v.symbol])).half_width)
        lam.append(sigma[i][i] * width)
    lo = [min(0.0, xi) for xi in x]
    hi = [max(0.0, xi) for xi in x]
    y = list(x)  # start from holding everything
    for _ in range(_JOINT_SWEEPS):
        moved = 0.0
        for i in range(len(y)):
            if sigma[i][i] <= 0:
                continue
            row = sigma[i]
            cross = sum(map(operator.mul, row, y)) - row[i] * y[i]
            sign = 1.0 if x[i] > 0 else -1.0 if x[i] < 0 else 0.0
            new = min(hi[i], max(lo[i], (lam[i] * sign - cross) / sigma[i][i]))
            moved = max(moved, abs(new - y[i]))
            y[i] = new
        if moved < _JOINT_TOLERANCE:
            break
    out: dict[str, Decimal] = {}
    for i, v in enumerate(assets):
        # a correction smaller than the width's own rounding is no correction: the asset holds
        out[v.symbol] = v.drift if abs(x[i] - y[i]) < 1e-9 else _decimal(-y[i])
    return out


def _screen(
    v: _View,
    policy: Policy,
    memory: AssetMemory,
    now: datetime,
    risk: Mapping[str, AssetRisk],
    joint: Mapping[str, Decimal] | None = None,
) -> str | None:
    """The cheap part of the decision; returns a hold reason, or None when the asset may trade."""
    context = AssetContext(v.symbol, v.target, v.drift, v.market, risk.get(v.symbol))
    rule = policy.threshold
    if isinstance(rule, NoTradeRegion):
        v.region = rule.figures(context)
        v.threshold = v.region.half_width
        left = joint.get(v.symbol) if joint else None
        if left is not None and abs(v.drift) <= v.max_deviation:
            # the joint region's edge along this asset, given the others: where the correction stops, or (when
            # it holds) at least its drift
            v.threshold = max(v.threshold, abs(v.drift)) if left == v.drift else abs(left)
    else:
        v.threshold = rule.threshold(context)
    size = abs(v.drift)
    v.hard = size > v.max_deviation
    if policy.hysteresis and size < v.threshold * (ONE - policy.hysteresis):
        v.rearm = True
    if v.hard:
        return None
    trigger = v.threshold * (ONE + policy.hysteresis) if policy.hysteresis else v.threshold
    if size <= trigger:
        return INSIDE_REGION if v.region is not None else BELOW_THRESHOLD
    if policy.hysteresis and not memory.armed and not v.rearm:
        return HYSTERESIS
    if policy.cooldown_seconds and memory.last_trade_at is not None:
        waited = Decimal(str((now - memory.last_trade_at).total_seconds()))
        if waited < policy.cooldown_seconds:
            return COOLDOWN
    return None


def needs_book(
    config: Config,
    snapshot: Snapshot,
    state: PlannerState | None = None,
    *,
    now: datetime | None = None,
    policy: Policy | None = None,
) -> set[str]:
    """Markets whose full order book the plan will read: the cheap screen, run on top-of-book prices.

    Exchanges use it to fetch books only where a trade is possible, which keeps an idle check at a few calls.
    """
    policy = policy or policy_from_config(config)
    if _certainly_below_threshold(config, snapshot, policy):
        return set()
    state = state or PlannerState()
    when = now or snapshot.taken_at
    views, _ = _views(config, snapshot)
    # only a no-trade region reads the covariance: O(assets^2), so no other rule pays for it
    risk = portfolio_risk(config, snapshot)[0] if isinstance(policy.threshold, NoTradeRegion) else {}
    joint = joint_of(views, policy.threshold, risk)
    return {
        v.market.symbol
        for v in views
        if v.market is not None and _screen(v, policy, state.of(v.symbol), when, risk, joint) is None
    }


# Bound on |float drift - Decimal drift|, in weight units: weights and targets lie in [0, 1] and each is a few
# float operations (relative error 2^-53 each) away from the 28-digit Decimal result, so the real error is below
# 1e-14; the margin leaves five orders of magnitude to spare.
_FLOAT_MARGIN = 1e-9
# Totals outside this range could overflow or lose values to underflow in floats: the exact path decides.
_FLOAT_RANGE = (1e-200, 1e200)


# The inputs of the last screen that proved a hold: a daemon's idle check asks twice of the same reads (which
# books to fetch, then whether the cycle holds). Compared by value (the objects themselves are usually the
# same ones, which tuple comparison sees at once), so a changed config, book or balance is never mistaken.
_last_proof: tuple[Any, ...] | None = None


def _proof_key(config: Config, snapshot: Snapshot, policy: Policy) -> tuple[Any, ...]:
    return (
        config.quote_symbol,
        tuple((a.symbol, a.target_weight, a.max_deviation) for a in config.assets),
        policy,
        tuple(snapshot.markets.items()),
        tuple(snapshot.balances.items()),
        tuple(snapshot.locked.items()),
    )


def _certainly_below_threshold(config: Config, snapshot: Snapshot, policy: Policy) -> bool:
    """`_float_screen`, remembered for the inputs of its last proof of a hold (see `_last_proof`)."""
    global _last_proof
    key = _proof_key(config, snapshot, policy)
    if key == _last_proof:
        return True
    held = _float_screen(config, snapshot, policy)
    if held:
        _last_proof = key
    return held


def _float_screen(config: Config, snapshot: Snapshot, policy: Policy) -> bool:
    """True only when the exact screen would hold every asset as below threshold (and none past its hard band).

    The idle check of a daemon is this question, thousands of times a second; floats answer it in a fraction of
    the Decimal path's time. Every asset's |drift| must be below both its trigger and its max_deviation by
    `_FLOAT_MARGIN`, a margin far wider than the floats' error, so the answer is the exact screen's; anything
    closer, unusual or missing (a market the exact path would report) returns False and the exact path runs.
    """
    rule = policy.threshold
    region = isinstance(rule, NoTradeRegion)
    if not region and not isinstance(rule, VolatilityScaledThreshold | FixedThreshold):
        return False  # a rule this screen does not know: the exact path
    quote = config.quote_symbol
    markets, balances, locked = snapshot.markets, snapshot.balances, snapshot.locked
    screened: list[tuple[AssetConfig, Market, float]] = []  # (asset, market, value) of every non-quote asset
    total = 0.0
    for a in config.assets:
        held = balances.get(a.symbol)
        holdings = float(held) if held is not None else 0.0
        if locked:
            holdings += float(locked.get(a.symbol, ZERO))
        if a.symbol == quote:
            value = holdings
        else:
            market = markets.get(f"{a.symbol}/{quote}")
            if market is None:
                return False
            value = holdings * float(market.mid)
            screened.append((a, market, value))
        if not value >= 0:  # negative (a hand-built snapshot) or NaN: cancellation would void the error bound
            return False
        total += value
    if not _FLOAT_RANGE[0] < total < _FLOAT_RANGE[1]:
        return False
    widen = float(ONE + policy.hysteresis if policy.hysteresis else ONE)
    region_rule = rule if isinstance(rule, NoTradeRegion) else None
    if region_rule is not None:
        risk = portfolio_risk(config, snapshot)[0]
        stock = region_rule.stock_costs()
        gamma, dt_days = float(region_rule.risk_aversion), float(region_rule.check_seconds) / 86_400
        factor = point_factor(float(region_rule.return_point))
    joint: list[tuple[str, AssetRisk, float, float]] = []  # (asset, risk, deviation, width): a joint region's
    for a, market, value in screened:
        target = float(a.target_weight)
        drift = target - value / total
        size = abs(drift)
        if region_rule is not None:
            # a region's width depends on the side (k of a buy or a sell): where the float drift's sign is not
            # certain, the narrower of the two
            asset_risk = risk.get(a.symbol)
            if drift > _FLOAT_MARGIN or drift < -_FLOAT_MARGIN:
                k = _float_cost_rate(region_rule, market, "buy" if drift > 0 else "sell", stock)
            else:
                k = min(
                    _float_cost_rate(region_rule, market, "buy", stock),
                    _float_cost_rate(region_rule, market, "sell", stock),
                )
            # narrower where k is smaller; the exact path rounds the width to _WIDTH_QUANTUM, maybe that much down
            width = _region_width(k, target, asset_risk, gamma, dt_days, factor)[0] - _WIDTH_SLACK
            if region_rule.joint and asset_risk is not None and asset_risk.row:
                if not size < float(a.max_deviation) - _FLOAT_MARGIN:
                    return False
                joint.append((a.symbol, asset_risk, -drift, width))  # held or not by the others too: below
                continue
        else:  # these rules read the volatility only
            width = float(rule.threshold(AssetContext(a.symbol, a.target_weight, ZERO, market)))
        if not size < min(width * widen, float(a.max_deviation)) - _FLOAT_MARGIN:
            return False
    return _joint_holds(joint)


def _joint_holds(assets: list[tuple[str, AssetRisk, float, float]]) -> bool:
    """Whether `joint_remaining` leaves every deviation x as it is: y = x solves its box-constrained problem
    exactly when no coordinate may move toward its target, sign(x_i) (Sigma x)_i <= lambda_i = sigma_i^2 delta_i
    for each i (the optimality condition of a convex problem at a corner of its box; coordinate descent from
    y = x then never moves). Checked with a margin for the floats' error and the width's rounding; a deviation
    whose sign the floats cannot tell must pass for both signs."""
    if not assets:
        return True
    names = [name for name, _, _, _ in assets]
    xs = [x for _, _, x, _ in assets]
    # every row of one covariance names the same assets in the same order: when they are exactly the screened
    # ones, a row is a plain vector (the daemon's common case); else each entry is looked up by name
    order = tuple(names)
    aligned = all(r.row_names == order for _, r, _, _ in assets)
    deviation = {} if aligned else dict(zip(names, xs, strict=True))
    for _, risk, x, width in assets:
        if aligned:
            pull = sum(map(operator.mul, risk.row, xs))  # (Sigma x)_i
            scale = risk.spread  # how far the floats' error in x can move it
        else:
            pull = scale = 0.0
            for other, c in risk.covariances:
                xj = deviation.get(other)
                if xj is not None:
                    pull += c * xj
                    scale += abs(c)
        allowed = risk.deviation_variance * width - risk.deviation_variance * _WIDTH_SLACK - scale * _FLOAT_MARGIN
        if x > _FLOAT_MARGIN:
            ok = pull < allowed
        elif x < -_FLOAT_MARGIN:
            ok = -pull < allowed
        else:
            ok = abs(pull) < allowed
        if not ok:
            return False
    return True


_WIDTH_SLACK = float(_WIDTH_QUANTUM)


def _float_cost_rate(rule: NoTradeRegion, market: Market, side: str, stock: bool) -> float:
    """k of one lot, in floats, for the screen. With the stock cost models and a best level that holds a lot, the
    cost model's estimate is fee * p * lot + |p - mid| * lot on a notional of p * lot, so k = fee + |p - mid| / p
    (a few ulps from the Decimal quotient, far inside the screen's margin once through the cube root); any other
    model or book asks the cost model itself."""
    levels = market.asks if side == "buy" else market.bids
    if stock and levels and levels[0][1] >= market.amount_step:
        price = float(levels[0][0])
        if price > 0:
            return float(market.taker_fee) + abs(price - float(market.mid)) / price
    return float(rule.cost_rate(market, side))


@dataclass(frozen=True, slots=True)
class IdleHold:
    """What an idle check needs of a plan that holds every asset: each asset's reason, in the plan's order,
    and the drift before (= after), exactly as `plan` would give them."""

    decisions: tuple[tuple[str, str], ...]
    drift: Decimal


def idle_hold(
    config: Config, snapshot: Snapshot, state: PlannerState, *, policy: Policy | None = None
) -> IdleHold | None:
    """The daemon's idle check without the plan: not None only when the float screen proves that `plan` would
    hold every asset (`_certainly_below_threshold`) and leave the memory as it is (every asset already
    remembered, and armed where hysteresis could re-arm it), so its decisions are known without building the
    plan. Anything else returns None, and `plan` decides."""
    policy = policy or policy_from_config(config)
    remembered = state.assets
    for a in config.assets:
        mem = remembered.get(a.symbol)
        if mem is None or (policy.hysteresis and not mem.armed):
            return None
    if not _certainly_below_threshold(config, snapshot, policy):
        return None
    holds = INSIDE_REGION if isinstance(policy.threshold, NoTradeRegion) else BELOW_THRESHOLD
    quote = config.quote_symbol
    views, _ = _views(config, snapshot)
    return IdleHold(
        tuple((a.symbol, IS_QUOTE if a.symbol == quote else holds) for a in config.assets),
        sum((abs(v.drift) for v in views), ZERO),
    )


def plan(
    config: Config,
    snapshot: Snapshot,
    state: PlannerState | None = None,
    *,
    now: datetime | None = None,
    policy: Policy | None = None,
    key_factory: KeyFactory = new_key,
) -> Plan:
    """Compute the cost-adjusted trade plan. Never trades; raises `PlanningError` on unusable inputs."""
    policy = policy or policy_from_config(config)
    state = state or PlannerState()
    when = now or snapshot.taken_at
    quote = config.quote_symbol
    views, total = _views(config, snapshot)
    notes: list[str] = []
    candidates: list[_View] = []
    region = isinstance(policy.threshold, NoTradeRegion)
    risk, risk_source = portfolio_risk(config, snapshot) if region else ({}, "")
    if region and not risk_source:
        notes.append("no covariance or volatility: no-trade regions sized on target weights alone")
    joint = joint_of(views, policy.threshold, risk)

    for v in views:
        if v.market is None:
            v.reason = IS_QUOTE
            if not region:
                v.threshold = policy.threshold.threshold(AssetContext(v.symbol, v.target, v.drift, None))
            continue
        if v.market.volatility is None and v.target and not region:
            notes.append(f"{v.symbol}: volatility unknown, counted as 0 (threshold not widened)")
        hold = _screen(v, policy, state.of(v.symbol), when, risk, joint)
        if hold is not None:
            v.reason = hold
            continue
        _size(v, total, policy)
        if v.reason:
            continue
        assert v.cost is not None
        if not v.hard and policy.gate is not None and not policy.gate.worth_it(v.drift_value, v.cost):
            v.reason = COST_SHARE_ABSURD if isinstance(policy.gate, CostShareGate) else COST_EXCEEDS_BENEFIT
            continue
        candidates.append(v)

    # keep the largest drift values, then sells before buys
    candidates.sort(key=lambda v: v.drift_value, reverse=True)
    for v in candidates[config.max_trades_per_cycle :]:
        v.reason = MAX_TRADES
    chosen = candidates[: config.max_trades_per_cycle]
    sells = [v for v in chosen if v.cost is not None and v.cost.side == "sell"]
    buys = [v for v in chosen if v.cost is not None and v.cost.side == "buy"]

    quote_view = next((v for v in views if v.symbol == quote), None)
    quote_free = quote_view.free if quote_view else snapshot.balances.get(quote, ZERO)
    proceeds = sum((v.cost.notional - v.cost.fee for v in sells if v.cost), ZERO)
    _fit_buys(buys, quote_free + proceeds, policy)

    ordered = [v for v in sells + buys if not v.reason]
    drift_before = sum((abs(v.drift) for v in views), ZERO)
    # With nothing to trade every value and the total are unchanged, so _drift_after would recompute the very same
    # Decimal operations as drift_before: the idle path skips them.
    drift_after = _drift_after(views, ordered, total, quote) if ordered else drift_before
    # Costs and max_trades can leave a partial plan that does not help; drop the weakest until it does.
    while ordered and drift_after > drift_before:
        weakest = min(ordered, key=lambda v: v.drift_value)
        weakest.reason = NO_IMPROVEMENT
        ordered.remove(weakest)
        drift_after = _drift_after(views, ordered, total, quote)

    trades: list[Trade] = []
    for v in ordered:
        assert v.cost is not None and v.market is not None
        v.decision = "trade"
        v.reason = "hard band breached" if v.hard else _trade_reason(v)
        if v.cost.capped:
            v.reason += "; capped at visible book depth"
        trades.append(
            Trade(
                symbol=v.symbol,
                market=v.market.symbol,
                side=v.cost.side,
                amount=v.cost.amount,
                est_price=v.cost.est_price,
                notional=v.cost.notional,
                est_fee=v.cost.fee,
                est_slippage=v.cost.slippage,
                idempotency_key=key_factory(),
                drift_value=v.drift_value,
                # not yet rounded to the tick (the executor rounds what it sends, towards safety), so a plan is
                # the same from a live exchange and from a snapshot file that does not carry ticks
                worst_price=worst_acceptable_price(
                    v.market, v.cost.side, v.cost.amount, config.max_slippage or DEFAULT_PRICE_BOUND
                ),
            )
        )

    lines = tuple(
        AssetLine(
            symbol=v.symbol,
            target_weight=v.target,
            current_weight=v.weight,
            drift=v.drift,
            threshold=v.threshold,
            drift_value=v.drift_value,
            est_cost=v.cost.total if v.cost else ZERO,
            decision=v.decision,
            reason=v.reason,
            mid=v.mid,
            rearm=v.rearm,
            armed_after_trade=v.armed_after_trade,
            region=v.region,
        )
        for v in views
    )
    summary = Summary(
        turnover=sum((t.notional for t in trades), ZERO),
        est_total_cost=sum((t.est_fee + t.est_slippage for t in trades), ZERO),
        drift_before=drift_before,
        drift_after=drift_after,
    )
    return Plan(
        plan_id=key_factory(),
        portfolio_id=config.portfolio_id,
        quote=quote,
        taken_at=snapshot.taken_at,
        total_value=total,
        assets=lines,
        trades=tuple(trades),
        summary=summary,
        policy=policy.name,
        notes=tuple(notes),
        precision={v.market.symbol: (v.market.amount_step, v.market.price_tick()) for v in ordered if v.market},
    )


def _trade_reason(v: _View) -> str:
    if v.region is None:
        return "drift above threshold and worth its cost"
    assert v.cost is not None
    return (
        f"outside the no-trade region: |drift| {abs(v.drift) * 100:.2f}% > {v.threshold * 100:.2f}% "
        f"(k {v.region.cost_rate * 100:.3f}%)"
    )


def _size(v: _View, total: Decimal, policy: Policy) -> None:
    """Size the correction, round it to the lot, and estimate its cost from the book."""
    assert v.market is not None
    market = v.market
    remaining = policy.sizing.remaining_drift(v.drift, v.threshold)
    v.armed_after_trade = abs(remaining) < v.threshold * (ONE - policy.hysteresis)
    value = abs(v.drift - remaining) * total
    side = "buy" if v.drift > 0 else "sell"
    amount = value / v.mid
    if side == "sell":
        if v.free <= 0:
            v.reason = NOTHING_TO_SELL
            return
        amount = min(amount, v.free)
    amount = round_down(amount, market.amount_step)
    _estimate(v, side, amount, policy.cost_model)


def _estimate(v: _View, side: str, amount: Decimal, costs: CostModel) -> None:
    assert v.market is not None
    market = v.market
    if amount <= 0:
        v.reason = BELOW_MIN_NOTIONAL
        v.cost = None
        return
    cost = costs.estimate(market, side, amount)
    if cost.capped:
        capped = round_down(cost.amount, market.amount_step)
        if capped <= 0:
            v.reason = BOOK_TOO_THIN
            v.cost = None
            return
        if capped != cost.amount:
            cost = replace(costs.estimate(market, side, capped), capped=True)
    if cost.notional < market.min_notional or cost.amount <= 0:
        v.reason = BELOW_MIN_NOTIONAL
        v.cost = cost
        return
    v.cost = cost


def _fit_buys(buys: list[_View], available: Decimal, policy: Policy) -> None:
    """Scale buys so they spend, fees included, no more quote than is free after the sells.

    Spend grows at least linearly with size along a book, so scaling every buy by available/needed keeps the
    total within the budget; rounding down to lots only lowers it further.
    """
    needed = sum((v.cost.notional + v.cost.fee for v in buys if v.cost), ZERO)
    if needed <= available or not buys:
        return
    factor = max(available, ZERO) / needed
    for v in buys:
        assert v.cost is not None and v.market is not None
        amount = round_down(v.cost.amount * factor, v.market.amount_step)
        _estimate(v, "buy", amount, policy.cost_model)
        if v.reason == BELOW_MIN_NOTIONAL or v.cost is None:
            v.reason = NO_QUOTE
    spent = sum((v.cost.notional + v.cost.fee for v in buys if v.cost and not v.reason), ZERO)
    if spent > available:  # pragma: no cover - defended by the convexity argument above
        for v in buys:
            v.reason = NO_QUOTE


def _drift_after(views: list[_View], trades: list[_View], total: Decimal, quote: str) -> Decimal:
    """Total absolute drift once the trades fill as estimated (fees paid in quote, valued at mid)."""
    values = {v.symbol: v.value for v in views}
    for v in trades:
        assert v.cost is not None
        delta = v.cost.amount * v.mid
        if v.cost.side == "buy":
            values[v.symbol] += delta
            values[quote] = values.get(quote, ZERO) - v.cost.notional - v.cost.fee
        else:
            values[v.symbol] -= delta
            values[quote] = values.get(quote, ZERO) + v.cost.notional - v.cost.fee
    new_total = sum(values.values(), ZERO)
    if new_total <= 0:
        return sum((abs(v.target) for v in views), ZERO)
    return sum((abs(v.target - values[v.symbol] / new_total) for v in views), ZERO)
