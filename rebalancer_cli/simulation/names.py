"""The names a backtest offers, in a module that imports nothing: `rebalance --help` and the shell completions
list them without loading the simulation."""

from __future__ import annotations

POLICY_NAMES = (
    "config",
    "calendar",
    "band",
    "band-edge",
    "tolerance-band",
    "cost-adjusted",
    "cost-adjusted+hysteresis+cooldown",
    "cost-adjusted-edge",
    "cost-adjusted-edge-half",
    "no-trade-region",
    "no-trade-region-edge",
    "no-trade-region-target",
    "per-asset-region",
)
# the keys of simulation.generate.REGIMES (a test keeps them equal)
REGIME_NAMES = ("calm", "trending", "volatile")
