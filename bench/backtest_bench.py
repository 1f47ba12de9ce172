"""Backtest speed: a year of minute bars (525,600 steps) for the 3-asset example portfolio (BTC, ETH, USDC),
next to the same replay with the "nothing to do" screen disabled (every step planned), measured in the same
run on a 20,000-step slice and extrapolated, so the ratio survives a noisy machine. Goal: under 60 s.

The prices follow the example scenario's regime schedule (a quarter each of calm, trending, volatile with
jumps, calm) at one-minute steps; the policy is examples/treasury.yaml's own.

    python bench/backtest_bench.py [--steps 525600] [--baseline-steps 20000] [--policy config]
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

from rebalancer_cli.config import load_config
from rebalancer_cli.simulation.generate import EXAMPLE_START_PRICES, REGIMES, generate_prices
from rebalancer_cli.simulation.replay import Replay, named_policies, run_backtest

ROOT = Path(__file__).resolve().parent.parent
GOAL_SECONDS = 60.0
YEAR_OF_MINUTES = 525_600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=YEAR_OF_MINUTES)
    parser.add_argument("--baseline-steps", type=int, default=20_000)
    parser.add_argument("--policy", default="config")
    parser.add_argument("--seed", type=int, default=10)
    args = parser.parse_args()

    config = load_config(ROOT / "examples" / "treasury.yaml")
    quarter = args.steps // 4
    t0 = time.perf_counter()
    prices = generate_prices(
        assets=EXAMPLE_START_PRICES,
        steps=args.steps,
        step_seconds=60,
        seed=args.seed,
        regime=[
            (0, REGIMES["calm"]),
            (quarter, REGIMES["trending"]),
            (2 * quarter, REGIMES["volatile"]),
            (3 * quarter, REGIMES["calm"]),
        ],
        start=datetime(2025, 1, 1, tzinfo=UTC),
    )
    generated = time.perf_counter() - t0
    policy = named_policies(config)[args.policy]
    assets = len(config.assets)
    print(f"backtest of {args.steps:,} one-minute steps x {assets} assets, policy {policy.name} ({policy.description})")
    print(f"  prices generated in {generated:.1f}s (not counted)")

    t0 = time.perf_counter()
    replay = Replay(config, prices)
    result = run_backtest(config, replay, policy=policy)
    screened = time.perf_counter() - t0
    rate = args.steps / screened
    print(
        f"  with the screen:    {screened:7.1f}s  {rate:>10,.0f} steps/s  "
        f"({result.plans:,} steps planned, {result.trades:,} trades)"
    )

    n = min(args.baseline_steps, args.steps)
    head = prices.slice(0, n)
    t0 = time.perf_counter()
    run_backtest(config, Replay(config, head), policy=policy, prescreen=False)
    per_step = (time.perf_counter() - t0) / n
    baseline = per_step * args.steps
    print(
        f"  planning every step: {baseline:6.1f}s  {1 / per_step:>10,.0f} steps/s  "
        f"(measured on the first {n:,} steps, extrapolated)"
    )
    print(f"  ratio: {baseline / screened:.1f}x faster with the screen")
    verdict = "met" if screened < GOAL_SECONDS else "NOT met"
    print(f"  goal {GOAL_SECONDS:.0f}s for a year of minutes: {verdict} ({screened:.1f}s)")


if __name__ == "__main__":
    main()
