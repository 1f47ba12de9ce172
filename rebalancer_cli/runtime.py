"""Wiring from a config to live collaborators (exchange, ledger, audit) and the core call of each command.

`cli.py` calls one function here per command and only renders; a Python caller gets every capability of the
CLI by calling the same functions. Heavy imports (ccxt, redis, psycopg) happen inside, only when needed.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, load_config
from .errors import RefusedError
from .planner import Plan, PlannerState, plan
from .snapshot import Snapshot, load_snapshot

if TYPE_CHECKING:
    from .exchange.base import Exchange
    from .ledger.base import ShadowLedger


def open_exchange(config: Config) -> Exchange:
    if config.exchange.is_paper:
        from .exchange.paper import PaperExchange

        path = config.snapshot_path()
        assert path is not None  # the config schema demands a snapshot for paper
        return PaperExchange(path, config.resolved_state_dir(), config.portfolio_id)
    from .exchange.ccxt_exchange import CcxtExchange

    return CcxtExchange.from_config(config)


def open_ledger_for(config: Config) -> ShadowLedger:
    from .ledger import open_ledger

    return open_ledger(config.redis_url, config.resolved_state_dir())


def load_planner_state(config: Config, ledger: ShadowLedger | None = None) -> PlannerState:
    """Hysteresis and cooldown memory; only the store can know it, so cron runs and the daemon share it."""
    if not config.hysteresis and not config.cooldown:
        return PlannerState()
    own = ledger is None
    store = ledger or open_ledger_for(config)
    try:
        return PlannerState.from_json(store.get_memory(config.portfolio_id))
    finally:
        if own:
            store.close()


def check_skew(config: Config, snapshot: Snapshot) -> None:
    limit = config.exchange.max_snapshot_skew
    if Decimal(str(snapshot.skew_seconds)) > limit:
        raise RefusedError(
            f"snapshot parts were read {snapshot.skew_seconds:.2f}s apart, more than max_snapshot_skew {limit}s: "
            "the picture is not consistent enough to trade on"
        )


def take_snapshot(config: Config, state: PlannerState | None = None) -> Snapshot:
    exchange = open_exchange(config)
    try:
        snapshot = exchange.fetch_snapshot(config, state)
    finally:
        exchange.close()
    check_skew(config, snapshot)
    return snapshot


def make_plan(
    config_path: Path,
    *,
    snapshot_path: Path | None = None,
    now: datetime | None = None,
) -> tuple[Config, Plan]:
    """`rebalance plan`: load, snapshot (or read a saved one), plan. Never trades."""
    config = load_config(config_path)
    state = load_planner_state(config)
    snapshot = load_snapshot(snapshot_path) if snapshot_path is not None else take_snapshot(config, state)
    return config, plan(config, snapshot, state, now=now)
