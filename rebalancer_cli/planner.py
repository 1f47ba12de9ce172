"""From a snapshot, a config and remembered state to a Plan: which assets to trade, how much, in what order.

Pure and deterministic given its inputs (idempotency keys come from an injectable factory). Every amount is
a `Decimal`. The planner is what `plan`, `execute`, the daemon and the backtest all call, so a decision seen
in a backtest is the decision the daemon makes.

Order of work per asset, cheapest first so that idle checks stay cheap: value at mid -> drift -> threshold ->
hysteresis / cooldown -> (only now) walk the book for the cost -> cost gate -> sizing and rounding.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal
from typing import Any, Protocol

from .config import AssetConfig, Config, RebalanceTo
from .costs import CostEstimate, CostModel
from .errors import InputError, PlanningError
from .ids import KeyFactory, new_key
from .snapshot import Market, Snapshot

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


# --- policy pieces ---------------------------------------------------------------------------------


class ThresholdRule(Protocol):
    def threshold(self, volatility: Decimal | None) -> Decimal: ...


@dataclass(frozen=True, slots=True)
class VolatilityScaledThreshold:
    """base * (1 + factor * daily volatility): calm markets trade small drifts, wild ones wait for more."""

    base: Decimal
    factor: Decimal

    def threshold(self, volatility: Decimal | None) -> Decimal:
        return self.base * (ONE + self.factor * (volatility or ZERO))


@dataclass(frozen=True, slots=True)
class FixedThreshold:
    """A fixed no-trade band, e.g. 5 percentage points."""

    band: Decimal

    def threshold(self, volatility: Decimal | None) -> Decimal:
        return self.band


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
class CostGate:
    """Trade only when the drift's value beats the estimated cost times a safety margin."""

    safety_margin: Decimal

    def worth_it(self, drift_value: Decimal, cost: Decimal) -> bool:
        return drift_value > self.safety_margin * cost


@dataclass(frozen=True, slots=True)
class Policy:
    """How the planner decides; built from the config, or composed by hand for backtests."""

    threshold: ThresholdRule
    sizing: Sizing = ToTarget()
    gate: CostGate | None = None
    hysteresis: Decimal = ZERO
    cooldown_seconds: Decimal = ZERO
    cost_model: CostModel = field(default_factory=CostModel)
    name: str = "cost-adjusted"


def policy_from_config(config: Config) -> Policy:
    return Policy(
        threshold=VolatilityScaledThreshold(config.base_threshold, config.volatility_factor),
        sizing=ToBandEdge() if config.rebalance_to is RebalanceTo.BAND_EDGE else ToTarget(),
        gate=CostGate(config.safety_margin),
        hysteresis=config.hysteresis,
        cooldown_seconds=config.cooldown,
    )


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

    @property
    def has_trades(self) -> bool:
        return bool(self.trades)

    def to_dict(self) -> dict[str, Any]:
        """The Plan object of DESIGN.md; decimals as strings so nothing is rounded by a JSON reader."""
        return {
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
        }

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


def _screen(v: _View, policy: Policy, memory: AssetMemory, now: datetime) -> str | None:
    """The cheap part of the decision; returns a hold reason, or None when the asset may trade."""
    vol = v.market.volatility if v.market else None
    v.threshold = policy.threshold.threshold(vol)
    size = abs(v.drift)
    v.hard = size > v.max_deviation
    if policy.hysteresis and size < v.threshold * (ONE - policy.hysteresis):
        v.rearm = True
    if v.hard:
        return None
    trigger = v.threshold * (ONE + policy.hysteresis) if policy.hysteresis else v.threshold
    if size <= trigger:
        return BELOW_THRESHOLD
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
    return {
        v.market.symbol for v in views if v.market is not None and _screen(v, policy, state.of(v.symbol), when) is None
    }


# Bound on |float drift - Decimal drift|, in weight units: weights and targets lie in [0, 1] and each is a few
# float operations (relative error 2^-53 each) away from the 28-digit Decimal result, so the real error is below
# 1e-14; the margin leaves five orders of magnitude to spare.
_FLOAT_MARGIN = 1e-9
# Totals outside this range could overflow or lose values to underflow in floats: the exact path decides.
_FLOAT_RANGE = (1e-200, 1e200)


def _certainly_below_threshold(config: Config, snapshot: Snapshot, policy: Policy) -> bool:
    """True only when the exact screen would hold every asset as below threshold (and none past its hard band).

    The idle check of a daemon is this question, thousands of times a second; floats answer it in a fraction of
    the Decimal path's time. Every asset's |drift| must be below both its trigger and its max_deviation by
    `_FLOAT_MARGIN`, a margin far wider than the floats' error, so the answer is the exact screen's; anything
    closer, unusual or missing (a market the exact path would report) returns False and the exact path runs.
    """
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
    widen = ONE + policy.hysteresis if policy.hysteresis else ONE
    for a, market, value in screened:
        trigger = float(policy.threshold.threshold(market.volatility) * widen)
        size = abs(float(a.target_weight) - value / total)
        if not size < min(trigger, float(a.max_deviation)) - _FLOAT_MARGIN:
            return False
    return True


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

    for v in views:
        if v.market is None:
            v.reason = IS_QUOTE
            v.threshold = policy.threshold.threshold(None)
            continue
        if v.market.volatility is None and v.target:
            notes.append(f"{v.symbol}: volatility unknown, counted as 0 (threshold not widened)")
        hold = _screen(v, policy, state.of(v.symbol), when)
        if hold is not None:
            v.reason = hold
            continue
        _size(v, total, policy)
        if v.reason:
            continue
        assert v.cost is not None
        if not v.hard and policy.gate is not None and not policy.gate.worth_it(v.drift_value, v.cost.total):
            v.reason = COST_EXCEEDS_BENEFIT
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
        v.reason = "hard band breached" if v.hard else "drift above threshold and worth its cost"
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
