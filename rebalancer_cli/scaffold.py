"""`rebalance init`: a commented config and a paper-exchange snapshot beside it, so that `plan` runs at once.

The config explains every key a first portfolio needs; the snapshot is a small, realistic account (balances,
fees, lot sizes, books) for the embedded paper exchange. Nothing is overwritten unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .fsutil import atomic_write_text

CONFIG_TEMPLATE = """\
# A portfolio for `rebalance` (written by `rebalance init`). Every key: `rebalance config-schema`.
# Check it with `rebalance validate-config --config {config}`, then `rebalance plan --config {config}`.
portfolio_id: "my-portfolio"   # names this portfolio's keys in the ledger and audit stores
# policy: no-trade-region      # the default; or cost-adjusted (the thresholds and gate below)
# risk_aversion: 5             # gamma of cost + gamma/2 * TE^2: sizes the no-trade regions
# region: joint                # or per-asset: each asset's region sized alone, ignoring correlations
# region_point: 0.5            # a trade goes to this fraction of the region's half-width (1 = edge);
#                              # the region is sized for it: further inside, wider
# correlations: {{BTC/ETH: 0.8}}  # when the snapshot has no covariance: with each market's volatility
base_threshold: 0.001          # never trade a drift below 0.1% of portfolio value ...
volatility_factor: 0.5         # ... widened by half the daily volatility
safety_margin: 1.5             # trade only when correcting is worth 1.5x its estimated cost
max_trades_per_cycle: 10       # at most this many orders per run; the largest drifts first
# rebalance_to: target         # or band_edge: trade only to the edge of the no-trade band
# hysteresis: 0.2              # trigger above threshold*1.2, re-arm below threshold*0.8
# cooldown: 15m                # after a trade an asset waits, unless it breaches its hard band
max_trade_notional: 50000      # guard: refuse any single order above this many USDC
max_slippage: 0.01             # guard: refuse an order more than 1% away from mid
assets:                        # target weights sum to 1; max_deviation is the hard band
  - {{symbol: "BTC", target_weight: 0.4, max_deviation: 0.05}}
  - {{symbol: "ETH", target_weight: 0.3, max_deviation: 0.05}}
  - {{symbol: "USDC", target_weight: 0.3, max_deviation: 0.02}}   # the quote: the one stable asset
exchange:
  id: paper                    # the embedded paper exchange: no network, fills against the snapshot's books
  snapshot: {snapshot}
  # For a real exchange: a ccxt id, and the NAMES of the environment variables holding the keys, e.g.
  # id: binance
  # credentials_env: {{apiKey: BINANCE_API_KEY, secret: BINANCE_SECRET}}
  # sandbox: true              # the exchange's own testnet
# state_dir: ./state           # default $REBALANCE_STATE_DIR, else ~/.local/state/rebalance
"""

SNAPSHOT_HEAD = """\
# The paper exchange's account for {config} (written by `rebalance init`): balances, then per market the
# taker fee, lot size (amount_step), price tick (price_step), minimum order value and the order book, best
# levels first. Edit it to try other situations; `rebalance snapshot-schema` describes every key.
"""


def _levels(best: float, step: float, amount: str, n: int, places: int) -> list[list[str]]:
    return [[f"{best + i * step:.{places}f}", amount] for i in range(n)]


def snapshot_document() -> dict[str, Any]:
    return {
        "taken_at": "2026-01-05T10:00:00Z",
        "balances": {"BTC": "1.5", "ETH": "20", "USDC": "30000"},
        "markets": {
            "BTC/USDC": {
                "taker_fee": "0.001",
                "amount_step": "0.00001",
                "price_step": "0.01",
                "min_notional": "5",
                "volatility": "0.028",
                "bids": _levels(64995.12, -7.80, "0.5", 8, 2),
                "asks": _levels(65004.88, 7.80, "0.5", 8, 2),
            },
            "ETH/USDC": {
                "taker_fee": "0.001",
                "amount_step": "0.0001",
                "price_step": "0.01",
                "min_notional": "5",
                "volatility": "0.036",
                "bids": _levels(3399.66, -0.51, "8", 8, 2),
                "asks": _levels(3400.34, 0.51, "8", 8, 2),
            },
        },
    }


@dataclass(frozen=True)
class InitResult:
    config: Path
    snapshot: Path

    def to_dict(self) -> dict[str, str]:
        return {"config": str(self.config), "snapshot": str(self.snapshot)}


def init_portfolio(config: Path, *, force: bool = False) -> InitResult:
    """Write `config` and `<stem>-market.yaml` beside it (atomically); refuses to overwrite unless `force`."""
    import yaml

    snapshot = config.with_name(f"{config.stem}-market.yaml")
    existing = [str(p) for p in (config, snapshot) if p.exists()]
    if existing and not force:
        raise InputError(f"{' and '.join(existing)} already exist(s): add --force to overwrite")
    body = yaml.safe_dump(snapshot_document(), sort_keys=False, default_flow_style=None, width=120)
    atomic_write_text(snapshot, SNAPSHOT_HEAD.format(config=config.name) + body)
    atomic_write_text(config, CONFIG_TEMPLATE.format(config=config, snapshot=snapshot.name))
    return InitResult(config, snapshot)
