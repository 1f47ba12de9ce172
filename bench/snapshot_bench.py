"""API calls and wall time of one `plan` through ccxt, against the loopback Binance emulator, for 3, 10 and 50
assets, idle (nothing to trade) and busy (everything trades), next to the naive loop the original design
warned against (one balance read and one order book per asset), measured in the same run.

    python bench/snapshot_bench.py [--runs 10]

The emulator runs in this process and is counted where requests arrive; the ccxt client is the real one.
"Per plan" is what a cron `rebalance plan` does after its first run (markets, fees and volatility cached):
load the config, read the exchange, plan. The naive loop reads the same markets (cached too) but asks for
the balances once per asset and a full book for every market, then plans on the same kind of snapshot.
Both go through the same adapter (the real ccxt client), with the rate limit set out of reach so that
waiting never blurs the timing; `weight` is Binance's request weight, the budget the rate limiter guards.
Calls and weight are exact; milliseconds depend on the machine and its load.

Goal: an idle check of 50 assets in at most 3 calls, 97% fewer than the naive loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path

from rebalancer_cli.config import Config, load_config
from rebalancer_cli.exchange.ccxt_exchange import CcxtExchange
from rebalancer_cli.planner import plan
from rebalancer_cli.runtime import make_plan
from rebalancer_cli.snapshot import Market, Snapshot
from rebalancer_cli.testing.emulator import DEFAULT_API_KEY, DEFAULT_SECRET, Emulator, start_emulator

D = Decimal
GOAL_CALLS = 3
GOAL_FEWER = D("0.97")
KEY_ENV, SECRET_ENV = "SNAPSHOT_BENCH_API_KEY", "SNAPSHOT_BENCH_SECRET"


def market_snapshot(n_assets: int, *, busy: bool, levels: int = 100) -> Snapshot:
    """n assets plus USDC, equal targets; idle: holdings exactly at target; busy: every one ~30% off."""
    markets: dict[str, Market] = {}
    balances: dict[str, Decimal] = {}
    value = D(10000)  # per asset, at target
    for i in range(n_assets):
        s = f"C{i:02d}"
        mid = D(100 + 37 * i)
        bids = tuple(((mid - mid * D(j + 1) / D(10000)).quantize(D("0.01")), D("50") + D(j)) for j in range(levels))
        asks = tuple(((mid + mid * D(j + 1) / D(10000)).quantize(D("0.01")), D("50") + D(j)) for j in range(levels))
        markets[f"{s}/USDC"] = Market(f"{s}/USDC", s, "USDC", D("0.001"), D("0.001"), D("5"), bids, asks, D("0.03"))
        skew = (D("1.3") if i % 2 else D("0.7")) if busy else D(1)
        balances[s] = (value * skew / mid).quantize(D("0.001"))
    balances["USDC"] = value
    return Snapshot(taken_at=datetime.now(UTC), balances=balances, markets=markets)


def write_config(path: Path, n_assets: int, emu: Emulator, state_dir: Path) -> Path:
    weight = (D(1) / D(n_assets + 1)).quantize(D("0.0001"))
    quote_weight = D(1) - weight * n_assets
    assets = "".join(
        f'  - {{symbol: "C{i:02d}", target_weight: {weight}, max_deviation: 0.5}}\n' for i in range(n_assets)
    )
    path.write_text(
        f"""portfolio_id: bench-{n_assets}
base_threshold: 0.001
volatility_factor: 0.5
safety_margin: 1.5
max_trades_per_cycle: 50
state_dir: {state_dir}
assets:
{assets}  - {{symbol: "USDC", target_weight: {quote_weight}, max_deviation: 0.5}}
exchange:
  id: binance
  api_url: {emu.base_url}
  credentials_env: {{apiKey: {KEY_ENV}, secret: {SECRET_ENV}}}
  rate_limit_per_minute: 100000000
"""
    )
    return path


def adapter_plan(config_path: Path) -> int:
    """What `rebalance plan` does once started: load the config, snapshot through the adapter, plan."""
    return len(make_plan(config_path)[1].trades)


def naive_plan(config: Config, meta: Mapping[str, Market]) -> int:
    """The original design: per asset, read the balances, then the market's full order book.

    Fees, lot sizes and volatility (`meta`) come from the adapter's cache, as they would for any careful
    loop: only the per-cycle reads differ. Books are read with the adapter's own method so both parse alike."""
    exchange = CcxtExchange.from_config(config)
    try:
        exchange._ensure_markets()  # from the cache: no call
        quote = config.quote_symbol
        balances: dict[str, Decimal] = {}
        markets: dict[str, Market] = {}
        for a in config.assets:
            free, _ = exchange.fetch_balances()
            balances[a.symbol] = free.get(a.symbol, D(0))
            if a.symbol != quote:
                symbol = f"{a.symbol}/{quote}"
                bids, asks = exchange._book(symbol)
                markets[symbol] = dataclasses.replace(meta[symbol], bids=bids, asks=asks)
        return len(plan(config, Snapshot(taken_at=datetime.now(UTC), balances=balances, markets=markets)).trades)
    finally:
        exchange.close()


def _metadata(config: Config) -> Mapping[str, Market]:
    exchange = CcxtExchange.from_config(config)
    try:
        return exchange.fetch_snapshot(config).markets
    finally:
        exchange.close()


class Sample:
    """One method's measurements in one scenario; calls and weight are counted by the emulator."""

    def __init__(self, fn: Callable[[], int]) -> None:
        self.fn = fn
        self.ms: list[float] = []
        self.calls: set[int] = set()
        self.weight = 0
        self.trades = fn()  # warm: markets, fees and volatility into the cache, imports, connections

    def run(self, emu: Emulator) -> None:
        before = emu.stats()
        t0 = time.perf_counter()
        self.trades = self.fn()
        self.ms.append((time.perf_counter() - t0) * 1000)
        after = emu.stats()
        self.calls.add(after["requests_total"] - before["requests_total"])
        self.weight = max(self.weight, after["weight_total"] - before["weight_total"])

    @property
    def call_count(self) -> int:
        if len(self.calls) != 1:
            raise SystemExit(f"calls per plan varied between runs: {sorted(self.calls)}")
        return next(iter(self.calls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="measured plans per scenario and method")
    args = parser.parse_args()
    os.environ[KEY_ENV], os.environ[SECRET_ENV] = DEFAULT_API_KEY, DEFAULT_SECRET
    print(f"one plan through ccxt against the emulator, median of {args.runs} runs, caches warm")
    print(
        f"{'assets':>6} {'state':>5} {'trades':>6} | {'calls':>5} {'weight':>6} {'ms':>7} | "
        f"{'naive calls':>11} {'weight':>6} {'ms':>7} | {'fewer calls':>11}"
    )
    idle_50: tuple[int, Decimal] | None = None
    with tempfile.TemporaryDirectory(prefix="snapshot-bench-") as tmp:
        for n in (3, 10, 50):
            for busy in (False, True):
                with start_emulator(market_snapshot(n, busy=busy), weight_limit=10**9) as emu:
                    work = Path(tmp) / f"{n}-{'busy' if busy else 'idle'}"
                    work.mkdir()
                    cfg_path = write_config(work / "portfolio.yaml", n, emu, work / "state")
                    config = load_config(cfg_path)
                    ours = Sample(partial(adapter_plan, cfg_path))
                    naive = Sample(partial(naive_plan, config, _metadata(config)))
                    for _ in range(args.runs):  # interleaved, so that machine noise hits both alike
                        ours.run(emu)
                        naive.run(emu)
                if naive.trades != ours.trades:
                    raise SystemExit(f"{n} assets: the naive loop planned {naive.trades} trades, we {ours.trades}")
                trades, calls, weight, ms = ours.trades, ours.call_count, ours.weight, statistics.median(ours.ms)
                n_calls, n_weight, n_ms = naive.call_count, naive.weight, statistics.median(naive.ms)
                fewer = 1 - D(calls) / D(n_calls)
                state = "busy" if busy else "idle"
                print(
                    f"{n:>6} {state:>5} {trades:>6} | {calls:>5} {weight:>6} {ms:>7.1f} | "
                    f"{n_calls:>11} {n_weight:>6} {n_ms:>7.1f} | {fewer:>10.1%}"
                )
                if n == 50 and not busy:
                    idle_50 = (calls, fewer)
    assert idle_50 is not None
    calls, fewer = idle_50
    met = calls <= GOAL_CALLS and fewer >= GOAL_FEWER
    print(
        f"goal: idle check of 50 assets in <= {GOAL_CALLS} calls, >= {GOAL_FEWER:.0%} fewer than naive: "
        f"{'met' if met else 'NOT met'} ({calls} calls, {fewer:.1%} fewer)"
    )
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
