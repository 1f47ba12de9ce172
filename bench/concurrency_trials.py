"""Two writers on one portfolio, many times over: does any order ever reach the exchange twice?

Each trial resets the Binance emulator (its own process) to a portfolio that needs one sell and one buy, then
starts two `rebalance execute --confirm` processes at the same instant (cron overlapping an operator), or a
daemon and an `execute`, and judges by what the emulator saw: the number of orders it accepted per client id
and in all. A trial is a double when the emulator accepted more than the two orders the portfolio needs, or
any client id more than once, or when the portfolio did not end at its target.

    python bench/concurrency_trials.py [--trials 100] [--latency-ms 0,100] [--backends sqlite,redis+postgres]
                                       [--daemon-trials 25]

Prints, per backend and exchange latency, the trials run, the exit codes seen and the doubles found. Goal:
zero doubles across every trial on both backends.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from exec_helpers import (
    CREDENTIALS_ENV,
    emulator_exchange,
    order_counts,
    remote_emulator,
    stores,
    write_config,
    write_snapshot,
)

from rebalancer_cli.runtime import make_plan, migrate

os.environ.update(CREDENTIALS_ENV)  # the emulator's keys, for the processes and for the checks made here
ENV = dict(os.environ)


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rebalancer_cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def judge(emulator: object, config: Path) -> tuple[bool, str]:
    stats = emulator.stats()  # type: ignore[attr-defined]
    counts = order_counts(stats)
    accepted = sum(c["accepted"] for c in counts.values())
    twice = [k for k, c in counts.items() if c["accepted"] > 1 or c["filled"] > 1]
    left = make_plan(config)[1].trades
    double = accepted > 2 or bool(twice)
    return double, f"accepted {accepted}, keys twice {len(twice)}, left to trade {len(left)}"


def run_pair(emulator: object, root: Path, backend: str, urls: dict[str, str], latency: int) -> tuple[bool, str]:
    emulator.reset()  # type: ignore[attr-defined]
    if latency:
        emulator.faults.latency(latency, endpoint="/api/v3/order", method="POST")  # type: ignore[attr-defined]
    pid = f"trial-{uuid.uuid4().hex[:10]}"
    d = root / pid
    d.mkdir()
    config = write_config(d, pid, emulator_exchange(emulator.base_url), **urls)  # type: ignore[attr-defined]
    runs = [start("execute", "--config", str(config), "--confirm") for _ in range(2)]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in runs]
    for code, err in results:
        if code not in (0, 6):
            print(f"  unexpected exit {code}: {err.strip().splitlines()[-1] if err.strip() else ''}", flush=True)
    codes = sorted(code for code, _ in results)
    double, detail = judge(emulator, config)
    return double, f"exit {codes}; {detail}"


def run_daemon(emulator: object, root: Path, urls: dict[str, str]) -> tuple[bool, str]:
    """A daemon working the portfolio while an operator runs `execute` on it."""
    emulator.reset()  # type: ignore[attr-defined]
    pid = f"trial-{uuid.uuid4().hex[:10]}"
    d = root / pid
    d.mkdir()
    config = write_config(d, pid, emulator_exchange(emulator.base_url), interval="2s", **urls)  # type: ignore[attr-defined]
    daemon = start("daemon", "--config", str(config))
    time.sleep(0.5)
    code = start("execute", "--config", str(config), "--confirm").wait(timeout=120)
    time.sleep(4)  # two more daemon cycles: a double would trade back and forth
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=30)
    double, detail = judge(emulator, config)
    return double, f"execute exit {code}; {detail}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--latency-ms", default="0,100")
    ap.add_argument("--backends", default="sqlite,redis+postgres")
    ap.add_argument("--daemon-trials", type=int, default=25)
    ap.add_argument("--redis", default=os.environ.get("REBALANCE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument(
        "--database", default=os.environ.get("REBALANCE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    )
    args = ap.parse_args()
    latencies = [int(x) for x in args.latency_ms.split(",") if x]
    total_doubles = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with remote_emulator(write_snapshot(root / "market.yaml")) as emulator:
            for backend in args.backends.split(","):
                urls = stores(backend, args.redis, args.database)
                if urls:
                    migrate(None, urls["database_url"])
                for latency in latencies:
                    doubles, codes = 0, collections.Counter[str]()
                    started = time.monotonic()
                    for _ in range(args.trials):
                        double, detail = run_pair(emulator, root, backend, urls, latency)
                        doubles += double
                        codes[detail.split(";")[0]] += 1
                        if double:
                            print(f"  DOUBLE [{backend}, {latency} ms]: {detail}", flush=True)
                    total_doubles += doubles
                    print(
                        f"two executes at once  backend {backend:15s} latency {latency:4d} ms: "
                        f"{args.trials} trials, {doubles} doubles, {dict(codes)} ({time.monotonic() - started:.0f} s)",
                        flush=True,
                    )
                if args.daemon_trials:
                    doubles = 0
                    for _ in range(args.daemon_trials):
                        double, detail = run_daemon(emulator, root, urls)
                        doubles += double
                        if double:
                            print(f"  DOUBLE [daemon+execute, {backend}]: {detail}", flush=True)
                    total_doubles += doubles
                    print(
                        f"daemon + execute      backend {backend:15s}: {args.daemon_trials} trials, {doubles} doubles",
                        flush=True,
                    )
    print(f"goal: zero doubles across every trial: {'met' if total_doubles == 0 else 'NOT met'} ({total_doubles})")


if __name__ == "__main__":
    main()
