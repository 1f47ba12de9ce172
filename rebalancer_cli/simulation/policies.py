"""The policies a backtest compares: the config's own rule and the published alternatives, each a `planner.Policy`
composed from the planner's pieces, so that a policy replayed here is exactly what `plan` would run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from ..config import Config
from ..errors import InputError
from ..planner import (
    AssetContext,
    CostGate,
    FixedThreshold,
    NoTradeRegion,
    Policy,
    ThresholdRule,
    ToBandEdge,
    ToRegionPoint,
    ToTarget,
    VolatilityScaledThreshold,
    no_trade_region,
    policy_from_config,
)
from .names import POLICY_NAMES

ZERO = Decimal(0)
ONE = Decimal(1)
DAY = 86_400
DEFAULT_CALENDAR_SECONDS = 30 * DAY
DEFAULT_BAND = Decimal("0.05")
DEFAULT_TOLERANCE = Decimal("0.02")
# used by the hysteresis + cooldown policy when the config sets neither (the values of examples/treasury.yaml)
DEFAULT_HYSTERESIS = Decimal("0.2")
DEFAULT_COOLDOWN_SECONDS = Decimal(900)
# the band of `cost-adjusted-edge-half`, as a fraction of the cost-adjusted threshold
EDGE_HALF = Decimal("0.5")


# --- policies ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToTolerance:
    """Trade back only to a tolerance band inside the trigger band (Daryanani 2008): less turnover than going
    to target, less drift than stopping at the trigger's edge."""

    tolerance: Decimal

    def remaining_drift(self, drift: Decimal, threshold: Decimal) -> Decimal:
        edge = min(self.tolerance, threshold, abs(drift))
        return edge if drift > 0 else -edge


@dataclass(frozen=True, slots=True)
class ScaledThreshold:
    """Another rule's threshold times a factor: the same volatility response with a tighter or wider band."""

    inner: ThresholdRule
    factor: Decimal

    def threshold(self, asset: AssetContext) -> Decimal:
        return self.inner.threshold(asset) * self.factor


@dataclass(frozen=True)
class BacktestPolicy:
    """A planner policy and when the live tool would look: every step, or only every `every_seconds`."""

    name: str
    policy: Policy
    every_seconds: int | None = None
    description: str = ""


def named_policies(
    config: Config,
    *,
    calendar_seconds: int = DEFAULT_CALENDAR_SECONDS,
    band: Decimal = DEFAULT_BAND,
    tolerance: Decimal = DEFAULT_TOLERANCE,
    check_seconds: int | None = None,
) -> dict[str, BacktestPolicy]:
    """Every policy the backtest knows, built on this config's thresholds, hard bands, risk aversion and
    assets; no-trade regions are corrected for a check every `check_seconds` (default: the config's interval;
    a backtest checks at every step of its prices)."""
    if calendar_seconds <= 0:
        raise InputError(f"the calendar period must be above 0 seconds (got {calendar_seconds})")
    if not ZERO < tolerance < band:
        raise InputError(f"the tolerance band ({tolerance}) must be above 0 and inside the trigger band ({band})")
    check = Decimal(check_seconds) if check_seconds is not None else config.interval
    live = policy_from_config(config, check_seconds=check)
    gamma = f"gamma {config.risk_aversion.normalize():f}"
    point = config.region_point
    shape = config.region.value
    scaled = VolatilityScaledThreshold(config.base_threshold, config.volatility_factor)
    gate = CostGate(config.safety_margin)
    hysteresis = config.hysteresis or DEFAULT_HYSTERESIS
    cooldown = config.cooldown or DEFAULT_COOLDOWN_SECONDS
    pct = f"{(band * 100).normalize():f} pp"
    days = f"{calendar_seconds / DAY:g} days"
    return {
        "config": BacktestPolicy("config", _named(live, "config"), description="this config's rule, as live"),
        "calendar": BacktestPolicy(
            "calendar",
            Policy(FixedThreshold(ZERO), ToTarget(), None, name="calendar"),
            every_seconds=calendar_seconds,
            description=f"back to target every {days}, no cost gate",
        ),
        "band": BacktestPolicy(
            "band", Policy(FixedThreshold(band), ToTarget(), None, name="band"), description=f"{pct} band, to target"
        ),
        "band-edge": BacktestPolicy(
            "band-edge",
            Policy(FixedThreshold(band), ToBandEdge(), None, name="band-edge"),
            description=f"{pct} band, to its edge (Leland 1996)",
        ),
        "tolerance-band": BacktestPolicy(
            "tolerance-band",
            Policy(FixedThreshold(band), ToTolerance(tolerance), None, name="tolerance-band"),
            description=f"{pct} trigger, back to {(tolerance * 100).normalize():f} pp (Daryanani 2008)",
        ),
        "cost-adjusted": BacktestPolicy(
            "cost-adjusted",
            Policy(scaled, ToTarget(), gate, name="cost-adjusted"),
            description="volatility-scaled threshold + cost gate, to target",
        ),
        "cost-adjusted+hysteresis+cooldown": BacktestPolicy(
            "cost-adjusted+hysteresis+cooldown",
            Policy(
                scaled,
                ToTarget(),
                gate,
                hysteresis=hysteresis,
                cooldown_seconds=cooldown,
                name="cost-adjusted+hysteresis+cooldown",
            ),
            description=f"cost-adjusted, hysteresis {hysteresis}, cooldown {cooldown}s",
        ),
        "cost-adjusted-edge": BacktestPolicy(
            "cost-adjusted-edge",
            Policy(scaled, ToBandEdge(), gate, name="cost-adjusted-edge"),
            description="cost-adjusted, to the band's edge",
        ),
        # Leland's edge sizing leaves the drift at the band's edge where going to target leaves none; in
        # continuous time a band 1/sqrt(2) as wide gives the same drift variance with ~30% less turnover.
        # Checks come at intervals, so the drift overshoots the band between them: half the band keeps the
        # tracking error at or below cost-adjusted's on minute checks (README, "Choosing the default policy").
        "cost-adjusted-edge-half": BacktestPolicy(
            "cost-adjusted-edge-half",
            Policy(ScaledThreshold(scaled, EDGE_HALF), ToBandEdge(), gate, name="cost-adjusted-edge-half"),
            description=f"cost-adjusted band x{EDGE_HALF}, to its edge (= base_threshold x{EDGE_HALF}, band_edge)",
        ),
        "no-trade-region": BacktestPolicy(
            "no-trade-region",
            no_trade_region(config, check),
            description=f"the config's no-trade regions ({shape}, {gamma}), sized for and trading to "
            f"{point.normalize():f} of the width",
        ),
        "no-trade-region-edge": BacktestPolicy(
            "no-trade-region-edge",
            _to_point(no_trade_region(config, check, name="no-trade-region-edge"), ONE),
            description=f"the config's no-trade regions ({shape}, {gamma}), to the region's edge (Leland 2000)",
        ),
        "per-asset-region": BacktestPolicy(
            "per-asset-region",
            replace(
                no_trade_region(config, check, name="per-asset-region"),
                threshold=NoTradeRegion(config.risk_aversion, check, return_point=point),
            ),
            description=f"a no-trade region per asset, each alone ({gamma}), sized for and trading to "
            f"{point.normalize():f} of the width",
        ),
        "no-trade-region-target": BacktestPolicy(
            "no-trade-region-target",
            _to_point(no_trade_region(config, check, name="no-trade-region-target"), ZERO),
            description=f"the config's no-trade regions ({shape}, {gamma}), sized for and trading back to target",
        ),
    }


def _to_point(policy: Policy, point: Decimal) -> Policy:
    """`policy` (a no-trade-region rule) trading to `point` of its regions, with the regions sized for it."""
    assert isinstance(policy.threshold, NoTradeRegion)
    return replace(policy, threshold=replace(policy.threshold, return_point=point), sizing=ToRegionPoint(point))


def _named(policy: Policy, name: str) -> Policy:
    return replace(policy, name=name)


def select_policies(config: Config, names: Sequence[str], *, compare: bool = False, **kw: Any) -> list[BacktestPolicy]:
    """The policies asked for by name, in the order given (all of them with `compare`); default: the config's."""
    known = named_policies(config, **kw)
    if compare:
        return list(known.values())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"unknown policy {', '.join(unknown)}; known: {', '.join(POLICY_NAMES)}")
    chosen = list(dict.fromkeys(names)) or ["config"]
    return [known[n] for n in chosen]
