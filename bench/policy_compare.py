"""Choose the default policy from evidence: every backtest policy on the example portfolio (examples/treasury.yaml)
over generated regimes and real prices, then the rule of the README applied to the figures.

Scenarios: calm, trending and volatile (with jumps) generated at the daemon's cadence (one-minute checks, 90
days) and at an hourly cron's (one year); and the real daily BTC and ETH closes of 2017-11-09 to 2025-07-04
(examples/btc-eth-daily.csv) checked once a day. Start: 100,000 USDC at target weights.

The rule: a policy qualifies when its tracking error is no worse than the cost-adjusted rule's in EVERY
scenario; the default is the qualifying policy with the lowest total cost (summed as multiples of the
cost-adjusted rule's, so that each scenario counts once whatever its length).

    python bench/policy_compare.py [--seed 1] [--minute-days 90]      # prints Markdown tables
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from rebalancer_cli.config import load_config
from rebalancer_cli.simulation.csvfile import load_prices
from rebalancer_cli.simulation.generate import EXAMPLE_START_PRICES, REGIMES, generate_prices
from rebalancer_cli.simulation.replay import BacktestResult, Replay, named_policies, run_backtest
from rebalancer_cli.simulation.series import PriceSeries

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "cost-adjusted"
START = datetime(2025, 1, 1, tzinfo=UTC)


def scenarios(seed: int, minute_days: int) -> list[tuple[str, str, PriceSeries]]:
    """(short name, title, prices) of every scenario."""
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
            out.append((short, label, series))
    real = load_prices(ROOT / "examples" / "btc-eth-daily.csv")
    out.append(("real 1d", "real BTC/ETH 2017-11-09 to 2025-07-04, daily checks", real))
    return out


def pct(d: Decimal, places: int = 2) -> str:
    return f"{d * 100:.{places}f}%"


def table(results: list[BacktestResult]) -> list[str]:
    ref = next(r for r in results if r.policy == REFERENCE)
    lines = [
        "| policy | trades | turnover | total cost | cost vs c-a | drift avg | drift max | tracking error | TE vs c-a "
        "| API calls |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.policy} | {r.trades:,} | {r.turnover:,.0f} | {r.total_cost:,.2f} | "
            f"{r.total_cost / ref.total_cost:.2f} | {pct(r.mean_drift)} | {pct(r.max_drift)} | "
            f"{pct(r.tracking_error, 3)} | {r.tracking_error / ref.tracking_error:.2f} | {r.api_calls:,} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minute-days", type=int, default=90)
    args = parser.parse_args()

    config = load_config(ROOT / "examples" / "treasury.yaml")
    # `config` is examples/treasury.yaml's own rule, the same as cost-adjusted+hysteresis+cooldown here
    policies = [p for name, p in named_policies(config).items() if name != "config"]
    runs: dict[str, list[BacktestResult]] = {}
    titles: dict[str, str] = {}
    began = time.perf_counter()
    for short, label, series in scenarios(args.seed, args.minute_days):
        replay = Replay(config, series)
        runs[short] = [run_backtest(config, replay, policy=p) for p in policies]
        titles[short] = label
        print(f"... {label}: {time.perf_counter() - began:.0f}s", file=sys.stderr)

    print("Policies:\n")
    for p in policies:
        print(f"- `{p.name}`: {p.description}")
    for short, results in runs.items():
        print(f"\n#### {titles[short]}\n")
        print("\n".join(table(results)))

    names = [p.name for p in policies]
    ratios: dict[str, list[tuple[Decimal, Decimal]]] = {n: [] for n in names}
    for results in runs.values():
        ref = next(r for r in results if r.policy == REFERENCE)
        for r in results:
            ratios[r.policy].append((r.total_cost / ref.total_cost, r.tracking_error / ref.tracking_error))
    print("\n#### Summary: total cost / tracking error, as multiples of cost-adjusted's\n")
    print("| policy | " + " | ".join(runs) + " | qualifies |")
    print("| --- | " + " | ".join("---:" for _ in runs) + " | --- |")
    qualifying = []
    for n in names:
        ok = all(te <= 1 for _, te in ratios[n])
        if ok:
            qualifying.append(n)
        cells = " | ".join(f"{c:.2f} / {te:.2f}" for c, te in ratios[n])
        print(f"| {n} | {cells} | {'yes' if ok else 'no'} |")
    best = min(qualifying, key=lambda n: sum((c for c, _ in ratios[n]), Decimal(0)))
    print(f"\nDefault by the rule (tracking error no worse than {REFERENCE} everywhere, then lowest cost): **{best}**")
    for cadence, suffix in (("1-minute", " 1m"), ("hourly", " 1h"), ("daily", " 1d")):
        idx = [i for i, short in enumerate(runs) if short.endswith(suffix)]
        fits = [n for n in names if all(ratios[n][i][1] <= 1 for i in idx)]
        pick = min(fits, key=lambda n: sum((ratios[n][i][0] for i in idx), Decimal(0)))
        print(f"- {cadence} checks only: {pick}")
    print(f"\n({time.perf_counter() - began:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
