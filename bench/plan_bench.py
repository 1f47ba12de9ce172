"""Plan latency for 3, 10 and 50 assets with 100-level books, next to the same planner with the book walk
removed (top-of-book pricing), measured in the same run so the ratio survives a noisy machine.

Every asset is drifted past its threshold so that every one walks its book: the worst case, not the idle one.
Then the idle case: checks per second on one core (CPU time of this process, so other load on the machine
does not count against it) of a 10-asset portfolio with nothing to trade, along the daemon's own path from
the snapshot (top of book, as the exchange reads it) to "hold": the screen that picks the books to read, then
`daemon.cycle.decide_hold` (the plan, the memory, holdings and decisions it compares with what it last wrote).

    python bench/plan_bench.py [--runs 1000] [--idle-seconds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

from rebalancer_cli.config import Config, PolicyName
from rebalancer_cli.costs import CostModel, TopOfBookSlippage
from rebalancer_cli.daemon.cycle import decide_hold
from rebalancer_cli.planner import PlannerState, needs_book, plan, policy_from_config
from rebalancer_cli.snapshot import Market, Snapshot

D = Decimal
GOAL_P99_MS_50 = 5.0
GOAL_IDLE_PER_SECOND = 10_000
IDLE_TICKS = 200


def scenario(n_assets: int, levels: int = 100) -> tuple[Config, Snapshot]:
    names = [f"C{i:02d}" for i in range(n_assets)]
    weight = (D(1) / D(n_assets + 1)).quantize(D("0.0001"))
    weights = [weight] * n_assets
    quote_weight = D(1) - sum(weights, D(0))
    cfg = Config.model_validate(
        {
            "portfolio_id": "bench",
            "base_threshold": D("0.001"),
            "volatility_factor": D("0.5"),
            "safety_margin": D("1.5"),
            "max_trades_per_cycle": 50,
            "assets": [
                {"symbol": s, "target_weight": w, "max_deviation": D("0.5")}
                for s, w in zip(names, weights, strict=True)
            ]
            + [{"symbol": "USDC", "target_weight": quote_weight, "max_deviation": D("0.5")}],
            "exchange": {"id": "paper", "snapshot": "x.yaml"},
        }
    )
    cfg.quote = "USDC"
    markets = {}
    balances = {}
    for i, s in enumerate(names):
        mid = D(100 + 37 * i)
        bids = tuple(
            ((mid - mid * D(j + 1) / D(10000)).quantize(D("0.01")), D("0.5") + D(j) / 10) for j in range(levels)
        )
        asks = tuple(
            ((mid + mid * D(j + 1) / D(10000)).quantize(D("0.01")), D("0.5") + D(j) / 10) for j in range(levels)
        )
        markets[f"{s}/USDC"] = Market(f"{s}/USDC", s, "USDC", D("0.001"), D("0.001"), D("5"), bids, asks, D("0.03"))
        # alternate over- and underweight by ~50% so every asset trades and walks deep into its book (with 50
        # assets of 2% each, 30% would stay inside regions sized for trades to half their width)
        target_value = D(10000)
        balances[s] = (target_value * (D("1.5") if i % 2 else D("0.5")) / mid).quantize(D("0.001"))
    balances["USDC"] = D(10000) * quote_weight / weight
    snap = Snapshot(taken_at=datetime(2026, 11, 27, tzinfo=UTC), balances=balances, markets=markets)
    return cfg, snap


def measure(cfg: Config, snap: Snapshot, runs: int, *, walk: bool) -> list[float]:
    policy = policy_from_config(cfg)
    if not walk:
        policy = replace(policy, cost_model=CostModel(slippage=TopOfBookSlippage()))
    key = "00000000-0000-7000-8000-000000000000"
    for _ in range(min(50, runs)):  # warm caches and the allocator
        plan(cfg, snap, policy=policy, key_factory=lambda: key)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        plan(cfg, snap, policy=policy, key_factory=lambda: key)
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def idle_scenario(n_assets: int = 10) -> tuple[Config, Snapshot]:
    """The same portfolio at its targets, with only the best bid and ask of each market (an idle read)."""
    cfg, snap = scenario(n_assets, levels=1)
    value = D(10000)
    balances = {m.base: (value / m.mid).quantize(D("0.001")) for m in snap.markets.values()}
    balances["USDC"] = snap.balances["USDC"]
    return cfg, replace(snap, balances=balances)


def idle_ticks(snap: Snapshot, n: int = IDLE_TICKS) -> list[Snapshot]:
    """`n` reads of the idle portfolio as a live market gives them: every best bid and ask moves by a few ticks
    from one read to the next (a seeded random walk, a few basis points in all), so nothing keyed on
    prices is found again from one check to the next, as in a daemon; the portfolio stays inside its regions."""
    rng = random.Random(7)
    ticks = []
    shift = {s: 0 for s in snap.markets}
    for _ in range(n):
        markets = {}
        for s, m in snap.markets.items():
            shift[s] = max(-20, min(20, shift[s] + rng.choice((-1, 0, 1))))
            moved = D(shift[s]) / 100
            (bid, bid_size), (ask, ask_size) = m.bids[0], m.asks[0]
            markets[s] = replace(m, bids=((bid + moved, bid_size),), asks=((ask + moved, ask_size),))
        ticks.append(replace(snap, markets=markets))
    return ticks


def idle_checks_per_second(seconds: float, policy: PolicyName | None = None) -> tuple[float, float]:
    """(checks per CPU second, per wall second) of the idle check, repeated for `seconds` of CPU time, on the
    scenario's own policy or on `policy`, each check on the next of `idle_ticks`."""
    cfg, snap = idle_scenario()
    if policy is not None:
        cfg = cfg.model_copy(update={"policy": policy})
    state = PlannerState().after(plan(cfg, snap), set(), snap.taken_at)  # the memory after the first cycle
    ticks = idle_ticks(snap)
    for tick in ticks:  # every tick idle, and the screen's hold the plan's own, to the digit
        full = plan(cfg, tick, state, now=tick.taken_at)
        first = decide_hold(cfg, tick, state, tick.taken_at)
        if first is None or first.decisions != tuple((a.symbol, a.reason) for a in full.assets):
            raise SystemExit(f"the idle check's decisions differ from the plan's: {first}")
        if first.drift != full.summary.drift_before:
            raise SystemExit(f"the idle check's drift {first.drift} is not the plan's {full.summary.drift_before}")
    checks = 0

    def check(tick: Snapshot) -> None:
        books = needs_book(cfg, tick, state, now=tick.taken_at)  # in the exchange's snapshot: which books to read
        hold = decide_hold(cfg, tick, state, tick.taken_at)  # the daemon's idle check from there
        if books or hold is None or hold.memory != state:
            raise SystemExit(f"the idle scenario is not idle: books {books}, hold {hold}")

    for tick in ticks:
        check(tick)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while time.process_time() - cpu0 < seconds:
        for tick in ticks:
            check(tick)
        checks += len(ticks)
    return checks / (time.process_time() - cpu0), checks / (time.perf_counter() - wall0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="CPU seconds of idle checks")
    args = parser.parse_args()
    print(f"plan latency, {args.runs} runs each, 100-level books, every asset trading (ms)")
    print(
        f"{'assets':>6} {'trades':>6} {'median':>8} {'p99':>8} | {'no-walk median':>14} {'no-walk p99':>11} | ratio p99"
    )
    result_50 = 0.0
    for n in (3, 10, 50):
        cfg, snap = scenario(n)
        trades = len(plan(cfg, snap).trades)
        if trades != n:
            raise SystemExit(f"{n} assets: {trades} trades; the latency case is meant to trade every asset")
        # interleave the two variants so machine noise hits both alike
        walk, flat = [], []
        for _ in range(4):
            walk += measure(cfg, snap, args.runs // 4, walk=True)
            flat += measure(cfg, snap, args.runs // 4, walk=False)
        print(
            f"{n:>6} {trades:>6} {statistics.median(walk):>8.3f} {p99(walk):>8.3f} | "
            f"{statistics.median(flat):>14.3f} {p99(flat):>11.3f} | {p99(walk) / p99(flat):>6.2f}x"
        )
        if n == 50:
            result_50 = p99(walk)
    verdict = "met" if result_50 <= GOAL_P99_MS_50 else "NOT met"
    print(f"goal: p99 <= {GOAL_P99_MS_50} ms for 50 assets: {verdict} ({result_50:.3f} ms)")
    load = os.getloadavg()[0]
    for policy in (PolicyName.NO_TRADE_REGION, PolicyName.COST_ADJUSTED):
        per_cpu, per_wall = idle_checks_per_second(args.idle_seconds, policy)
        print(
            f"idle checks, 10 assets, nothing to trade, policy {policy.value}: {per_cpu:,.0f}/s per CPU second, "
            f"{per_wall:,.0f}/s wall (load {load:.2f} on {os.cpu_count()} cores)"
        )
        verdict = "met" if per_cpu >= GOAL_IDLE_PER_SECOND else "NOT met"
        print(f"goal: >= {GOAL_IDLE_PER_SECOND:,} idle checks a second on one core ({policy.value}): {verdict}")


if __name__ == "__main__":
    main()
