"""Whole-process start-to-exit time of `rebalance plan` as a user runs it (a new process each time, caches warm),
next to a plain ccxt script making exactly the same requests, measured alternately in the same run.

    python bench/process_bench.py [--runs 10]

The Binance emulator runs in this process on loopback; both processes use the real ccxt client. Scenario:
3 and 10 assets with two of them drifted past their threshold, so that a `plan` reads the balances, every
best bid/ask in one call and the two drifted markets' full books (markets, fees and volatility come from
the cache its first run wrote). The plain script is what someone would write by hand with ccxt and the same
markets cache: import ccxt, build the client, load the cached markets, then the same requests in the same
order, printing the raw answers. Requests are counted at the emulator and must be equal for both, or the
bench stops. Also: `rebalance --help` and `validate-config` against `python -c pass` (the interpreter's floor).

Goal: `rebalance plan` at most 1.1x the plain ccxt script (medians of wall time). Also printed: the CPU time of
each (user + system; on a loaded machine it varies less than the wall time), and a "tuned" plain script that
takes the tool's two start-up measures too (no cycle collection while imports load, no interpreter teardown
once its output is flushed): the ratio to it is the tool's own work, config, planner and rendering included.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from snapshot_bench import KEY_ENV, SECRET_ENV, market_snapshot, write_config

from rebalancer_cli.snapshot import Snapshot
from rebalancer_cli.testing.emulator import DEFAULT_API_KEY, DEFAULT_SECRET, Emulator, start_emulator

GOAL_RATIO = 1.1
DRIFTED = 2  # assets past their threshold: their books are read

PLAIN_SCRIPT = """
import json, os, sys
from urllib.parse import urlsplit

import ccxt

cache, api_url, symbols, books = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4:]
client = ccxt.binance({
    "apiKey": os.environ["KEY_ENV"], "secret": os.environ["SECRET_ENV"], "number": str, "enableRateLimit": False,
    "options": {"fetchMarkets": {"types": ["spot"]}, "fetchCurrencies": False, "adjustForTimeDifference": False},
})
base = urlsplit(api_url)
client.urls["api"] = {k: urlsplit(v)._replace(scheme=base.scheme, netloc=base.netloc).geturl()
                      if isinstance(v, str) else v for k, v in client.urls["api"].items()}
with open(cache) as f:
    client.set_markets(json.load(f))
out = {"balance": client.fetch_balance()["free"], "tops": client.fetch_bids_asks(symbols)}
for s in books:
    out[s] = client.fetch_order_book(s, 100)
sys.stdout.write(json.dumps(out, default=str)[:200] + "\\n")
""".replace("KEY_ENV", KEY_ENV).replace("SECRET_ENV", SECRET_ENV)
# The same script with the two start-up measures `rebalance` takes (no cycle collection while imports load, no
# interpreter teardown after the output is flushed): what is left between the two is the tool's own work.
TUNED_SCRIPT = "import gc\ngc.disable()\n" + PLAIN_SCRIPT + "sys.stdout.flush()\nimport os\nos._exit(0)\n"


def drifted_snapshot(n_assets: int) -> Snapshot:
    """Every asset at target except the first DRIFTED (30% over, 30% under)."""
    snap = market_snapshot(n_assets, busy=False)
    balances = dict(snap.balances)
    for i in range(DRIFTED):
        s = f"C{i:02d}"
        balances[s] = (balances[s] * (Decimal("1.3") if i % 2 else Decimal("0.7"))).quantize(Decimal("0.001"))
    return Snapshot(taken_at=snap.taken_at, balances=balances, markets=snap.markets)


def rebalance_cmd() -> list[str]:
    """The installed console script, as a user starts it."""
    script = Path(sys.executable).with_name("rebalance")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rebalancer_cli"]


CPU: list[float] = []  # CPU milliseconds (user + system) of the last process `timed` ran, appended per run


def timed(cmd: Sequence[str], emu: Emulator | None = None) -> tuple[float, int]:
    """Wall milliseconds of one process and the requests it made; its CPU milliseconds go to CPU."""
    before = emu.stats()["requests_total"] if emu else 0
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    ms = (time.perf_counter() - t0) * 1000
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.append((r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) * 1000)
    if done.returncode not in (0, 10):
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return ms, (emu.stats()["requests_total"] - before) if emu else 0


def endpoints(emu: Emulator) -> dict[str, int]:
    return dict(emu.stats().get("requests", {}))


def bench_plan(n_assets: int, runs: int, tmp: Path) -> tuple[float, float]:
    with start_emulator(drifted_snapshot(n_assets), weight_limit=10**9) as emu:
        work = tmp / f"plan-{n_assets}"
        work.mkdir()
        cfg = write_config(work / "portfolio.yaml", n_assets, emu, work / "state")
        ours = [*rebalance_cmd(), "plan", "--config", str(cfg)]
        timed(ours, emu)  # warm: markets, fees and volatility into the cache
        caches = list((work / "state" / "cache").glob("*/markets.json"))
        if len(caches) != 1:
            raise SystemExit(f"expected one markets cache after the warm run, found {caches}")
        symbols = [f"C{i:02d}/USDC" for i in range(n_assets)]
        books = symbols[:DRIFTED]
        args = [str(caches[0]), emu.base_url, ",".join(symbols), *books]
        (work / "plain_ccxt.py").write_text(PLAIN_SCRIPT)
        (work / "tuned_ccxt.py").write_text(TUNED_SCRIPT)
        plain = [sys.executable, str(work / "plain_ccxt.py"), *args]
        tuned = [sys.executable, str(work / "tuned_ccxt.py"), *args]
        timed(plain, emu)  # warm the OS page cache for ccxt alike
        wall: dict[str, list[float]] = {"plan": [], "plain": [], "tuned": []}
        cpu: dict[str, list[float]] = {"plan": [], "plain": [], "tuned": []}
        for _ in range(runs):  # alternately, so that machine noise hits all alike
            calls = {}
            for name, cmd in (("plan", ours), ("plain", plain), ("tuned", tuned)):
                ms, calls[name] = timed(cmd, emu)
                wall[name].append(ms)
                cpu[name].append(CPU[-1])
            if len(set(calls.values())) != 1:
                raise SystemExit(f"{n_assets} assets: requests differ between the processes: {calls}")
        a, b, t = (statistics.median(wall[k]) for k in ("plan", "plain", "tuned"))
        ca, cb, ct = (statistics.median(cpu[k]) for k in ("plan", "plain", "tuned"))
        print(
            f"{n_assets:>6} {calls['plan']:>8} | {a:>8.1f} {b:>8.1f} {a / b:>5.2f}x | {t:>8.1f} {a / t:>5.2f}x | "
            f"{ca:>7.1f} {cb:>7.1f} {ca / cb:>5.2f}x {ct:>7.1f} {ca / ct:>5.2f}x"
        )
        return a, b


def bench_floor(runs: int, cfg: Path) -> None:
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "rebalance --help": [*rebalance_cmd(), "--help"],
        "rebalance validate-config": [*rebalance_cmd(), "validate-config", str(cfg)],
    }
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for cmd in cases.values():
        timed(cmd)
    for _ in range(runs):
        for name, cmd in cases.items():
            samples[name].append(timed(cmd)[0])
    floor = statistics.median(samples["python -c pass"])
    for name, ms in samples.items():
        med = statistics.median(ms)
        print(f"{name:<26} median {med:>7.1f} ms  (+{med - floor:>6.1f} ms over python -c pass, {med / floor:>5.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="runs of each process per scenario (at least 10)")
    args = parser.parse_args()
    runs = max(10, args.runs)
    os.environ[KEY_ENV], os.environ[SECRET_ENV] = DEFAULT_API_KEY, DEFAULT_SECRET
    load = os.getloadavg()
    print(f"whole processes, {runs} alternate runs each, caches warm; load {load[0]:.2f} on {os.cpu_count()} cores")
    print("medians of wall and CPU (user + system) milliseconds; the goal is judged on wall time against plain ccxt")
    print(
        f"{'assets':>6} {'requests':>8} | {'plan':>8} {'ccxt':>8} ratio | {'tuned':>8} ratio | "
        f"{'CPU':>7} {'ccxt':>7} ratio {'tuned':>7} ratio"
    )
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="process-bench-") as tmp:
        for n in (3, 10):
            ours, plain = bench_plan(n, runs, Path(tmp))
            worst = max(worst, ours / plain)
        bench_floor(runs, Path(tmp) / "plan-10" / "portfolio.yaml")
    verdict = "met" if worst <= GOAL_RATIO else "NOT met"
    print(f"goal: rebalance plan <= {GOAL_RATIO}x the plain ccxt script: {verdict} (worst {worst:.2f}x)")
    sys.exit(0 if worst <= GOAL_RATIO else 1)


if __name__ == "__main__":
    main()
