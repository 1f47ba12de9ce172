"""How many portfolios ONE daemon instance keeps on schedule against the loopback Binance emulator, with its CPU
share and peak memory, at 100, 5,000 and 10,000 portfolios of 10 assets on a 60 s interval, all in ONE process
(no worker processes); and the exchange API calls each idle cycle makes, next to the naive count (one balance
read and one order book per traded asset: 1 + 9 for 10 assets, one of which is the quote).

    python bench/daemon_bench.py                      # 100, 5,000 and 10,000 portfolios (about 12 minutes)
    python bench/daemon_bench.py --processes 2        # cycles in 2 worker processes (daemon --processes)
    python bench/daemon_bench.py --quick              # smoke run: 50 and 200 portfolios, 6 s interval
    python bench/daemon_bench.py --redis redis://127.0.0.1:6379/0 \
        --database postgresql://postgres@127.0.0.1:5432/test   # the production stores instead of SQLite

Setup per level: one emulator process (10 markets, its weight limit out of reach: one account cannot really
serve 5,000 portfolios a minute, the bench measures the daemon, not Binance's budget), N configs in a temporary
directory, all on the same 10 assets of the same emulator account and balanced so that nothing trades (idle
cycles), and the daemon as a subprocess running `run_daemon` (what `rebalance daemon` runs) with --processes
worker processes of --workers threads each, so that neither the emulator's CPU nor the bench's is counted as
the daemon's. After a warm-up long enough for every portfolio to be claimed and cycled once, a window of at
least one interval is measured:

* CPU share: user + system time of the daemon and its worker processes in the window over the window's length
  (1.0 = one core), from /proc/PID/stat; peak memory: the sum of their VmHWM (/proc/PID/status), an upper bound
  of the instance's peak over the whole run, warm-up included.
* On schedule: a cycle started within --tolerance seconds (5) of its due time. Due = the end of the same
  portfolio's previous cycle plus its interval (the daemon schedules from the end of a cycle); start = the
  cycle's log time minus its duration. A portfolio that has not started a cycle by the end of the window although
  it was due more than the tolerance before counts as late too, so a starved portfolio cannot hide.
* API calls per idle cycle: requests the emulator received in the window over the cycles that ended in it.

Every portfolio of a level is on the same emulator account, so the 100-portfolio level is the case of 100
portfolios sharing an exchange (and an account).

Goals (issue 13): 10,000 portfolios in one process on schedule (>= 99% of due cycles within the tolerance, the
overdue ones included), peak memory under 600 MB at 10,000, and at most 1 API call per idle portfolio cycle on
average when 100 portfolios share an exchange. Figures depend on the machine and on what else runs on it: the
bench prints the core count and load average next to them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from rebalancer_cli.testing.emulator import DEFAULT_API_KEY, DEFAULT_SECRET, RemoteEmulator

D = Decimal
ASSETS = [f"C{i}" for i in range(9)]  # + USDC: 10 assets per portfolio
EXTRA_MARKET = "C9"  # the emulator lists 10 markets; the portfolios use 9 of them
NAIVE_CALLS = 1 + len(ASSETS)  # one balance read + one order book per traded asset
GOAL_PORTFOLIOS = 10000
GOAL_CALLS = 1.0
GOAL_CALLS_AT = 100  # portfolios sharing the exchange
GOAL_MEMORY_MB = 600.0
GOAL_SHARE = 0.99
KEY_ENV, SECRET_ENV = "DAEMON_BENCH_API_KEY", "DAEMON_BENCH_SECRET"
CLK_TCK = os.sysconf("SC_CLK_TCK")


LAUNCH = (
    "import sys; from pathlib import Path; from rebalancer_cli.telemetry import setup_logging; "
    "from rebalancer_cli.daemon import run_daemon; setup_logging('json', 'info'); "
    "sys.exit(run_daemon([Path(sys.argv[1])], workers=int(sys.argv[2]), processes=int(sys.argv[3])))"
)


# --- files ---------------------------------------------------------------------------------------------


def write_snapshot(path: Path) -> None:
    """10 markets around different prices, 20 levels a side; balances exactly at equal weights (idle)."""
    markets: dict[str, Any] = {}
    balances = {"USDC": "10000"}
    for i, name in enumerate([*ASSETS, EXTRA_MARKET]):
        mid = D(100 + 10 * i)
        markets[f"{name}/USDC"] = {
            "taker_fee": "0.001",
            "amount_step": "0.001",
            "min_notional": "5",
            "volatility": "0.02",
            "bids": [[str(mid - D(j + 1) / 10), "50"] for j in range(20)],
            "asks": [[str(mid + D(j + 1) / 10), "50"] for j in range(20)],
        }
        balances[name] = str(D(10000) / mid)
    doc = {"taken_at": "2026-11-27T10:00:00Z", "balances": balances, "markets": markets}
    path.write_text(yaml.safe_dump(doc))


def write_configs(
    root: Path, n: int, *, url: str, interval: float, tag: str, state_dir: Path, redis: str | None, db: str | None
) -> None:
    root.mkdir(parents=True)
    weight = D("0.1")
    assets = "".join(f'  - {{symbol: "{a}", target_weight: {weight}, max_deviation: 0.5}}\n' for a in [*ASSETS, "USDC"])
    stores = (f"redis_url: {redis}\n" if redis else "") + (f"database_url: {db}\n" if db else "")
    for i in range(n):
        (root / f"p{i:05d}.yaml").write_text(
            f"""portfolio_id: bench-{tag}-{i:05d}
base_threshold: 0.001
volatility_factor: 0.5
safety_margin: 1.5
max_trades_per_cycle: 10
interval: {interval}
state_dir: {state_dir}
{stores}assets:
{assets}exchange:
  id: binance
  api_url: {url}
  credentials_env: {{apiKey: {KEY_ENV}, secret: {SECRET_ENV}}}
  rate_limit_per_minute: 1000000000
"""
        )


# --- processes -------------------------------------------------------------------------------------------


def stop(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # by pid: this very process
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def start_emulator(snapshot: Path) -> tuple[subprocess.Popen[str], str]:
    args = ["--snapshot", str(snapshot), "--port", "0", "--weight-limit", str(10**12)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rebalancer_cli.testing.emulator", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        stop(proc)
        raise SystemExit("the emulator did not start")
    return proc, url


def drop_redis_keys(url: str, tag: str) -> None:
    """The bench's ledger and lease keys off the shared server (the audit rows stay: an audit trail is kept)."""
    from rebalancer_cli.ledger.redis import connect

    client = connect(url)
    try:
        for key in client.scan_iter(match=f"rb:{{bench-{tag}-*", count=1000):
            client.delete(key)  # one by one: keys of different portfolios live in different cluster slots
    finally:
        client.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15 of stat)


def memory_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def family(pid: int) -> list[int]:
    """The daemon and its worker processes (children of any of its threads)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            out += family(int(child))
    return out


def family_cpu(pid: int) -> float:
    total = 0.0
    for p in family(pid):
        try:
            total += cpu_seconds(p)
        except OSError:
            continue  # a worker that just exited
    return total


def read_events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # the last line may be half written
    return out


def wall(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["time"]).timestamp()


# --- one level ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    n: int
    cycles: int = 0
    cycled: int = 0  # portfolios with at least one cycle in the window
    failed: int = 0
    late: list[float] = field(default_factory=list)  # lateness of every due cycle (overdue ones included)
    on_time: int = 0
    calls_per_cycle: float = 0.0
    by_endpoint: dict[str, float] = field(default_factory=dict)
    cpu_share: float = 0.0
    peak_mb: float = 0.0
    ready_s: float = 0.0
    first_round_s: float = 0.0
    trades: int = 0
    emulator_cpu: float = 0.0
    peak_parts: list[float] = field(default_factory=list)
    load: float = 0.0

    @property
    def share(self) -> float:
        return self.on_time / len(self.late) if self.late else 0.0

    @property
    def on_schedule(self) -> bool:
        return self.share >= GOAL_SHARE

    def pct(self, q: float) -> float:
        if not self.late:
            return float("nan")
        ordered = sorted(self.late)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_level(n: int, args: argparse.Namespace, tmp: Path) -> Result:
    tag = uuid.uuid4().hex[:6]
    work = tmp / f"level-{n}"
    work.mkdir()
    write_snapshot(work / "exchange.yaml")
    emulator, url = start_emulator(work / "exchange.yaml")
    daemon: subprocess.Popen[bytes] | None = None
    result = Result(n)
    try:
        configs = work / "configs"
        write_configs(
            configs,
            n,
            url=url,
            interval=args.interval,
            tag=tag,
            state_dir=work / "state",
            redis=args.redis,
            db=args.database,
        )
        log = work / "daemon.log"
        env = {**os.environ, KEY_ENV: DEFAULT_API_KEY, SECRET_ENV: DEFAULT_SECRET}
        command = [sys.executable, "-c", LAUNCH, str(configs), str(args.workers), str(args.processes)]
        t0 = time.time()
        with log.open("wb") as sink:
            daemon = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink, env=env)
        remote = RemoteEmulator(url)
        while not any(e.get("event") == "daemon started" for e in read_events(log)):
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited ({daemon.returncode}):\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        result.ready_s = time.time() - t0
        time.sleep(max(0.0, args.warmup - (time.time() - t0)))
        cpu0, emu0, stats0, w0 = family_cpu(daemon.pid), cpu_seconds(emulator.pid), remote.stats(), time.time()
        time.sleep(args.window)
        cpu1, emu1, stats1, w1 = family_cpu(daemon.pid), cpu_seconds(emulator.pid), remote.stats(), time.time()
        result.peak_parts = [memory_mb(p, "VmHWM") for p in family(daemon.pid)]
        result.peak_mb = sum(result.peak_parts)
        result.cpu_share = (cpu1 - cpu0) / (w1 - w0)
        result.emulator_cpu = (emu1 - emu0) / (w1 - w0)
        result.load = os.getloadavg()[0]
        stop(daemon)
        events = read_events(log)
    finally:
        if daemon is not None:
            stop(daemon)
        stop(emulator)
        if args.redis:
            drop_redis_keys(args.redis, tag)

    cycles: dict[str, list[tuple[float, float]]] = {}  # portfolio -> [(start, end)]
    for e in events:
        if e.get("event") == "cycle":
            end = wall(e)
            cycles.setdefault(e["portfolio"], []).append((end - float(e["seconds"]), end))
            result.trades += sum(1 for o in e.get("orders", []) if o.get("status") == "filled")
        elif e.get("event") == "cycle failed" and w0 <= wall(e) <= w1:
            result.failed += 1
    firsts = [runs[0][1] for runs in cycles.values()]
    result.first_round_s = (max(firsts) - t0) if len(firsts) == n else float("nan")
    ended_in_window = 0
    for runs in cycles.values():
        runs.sort()
        in_window = False
        for (_, prev_end), (start, end) in itertools.pairwise(runs):
            if w0 <= end <= w1:
                ended_in_window += 1
            if w0 <= start <= w1:
                in_window = True
                late = start - (prev_end + args.interval)
                result.late.append(late)
                result.on_time += late <= args.tolerance
        if runs and w0 <= runs[0][1] <= w1:
            ended_in_window += 1
        started = [end for start, end in runs if start <= w1]
        overdue = w1 - ((max(started) if started else t0) + args.interval)
        if overdue > args.tolerance:
            result.late.append(overdue)  # due, and not started by the end of the window
        result.cycled += in_window
    result.late += [w1 - t0] * (n - len(cycles))  # never cycled at all
    result.cycles = ended_in_window
    requests = stats1["requests_total"] - stats0["requests_total"]
    result.calls_per_cycle = requests / ended_in_window if ended_in_window else float("nan")
    endpoints = {k: v - stats0["requests"].get(k, 0) for k, v in stats1["requests"].items()}
    result.by_endpoint = {k: v / ended_in_window for k, v in endpoints.items() if v and ended_in_window}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="100,5000,10000", help="portfolio counts, comma separated")
    parser.add_argument("--interval", type=float, default=60.0, help="each portfolio's interval, seconds")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before the window (default 1.5 x)")
    parser.add_argument("--window", type=float, default=None, help="measured seconds (default 1.5 intervals)")
    parser.add_argument("--tolerance", type=float, default=5.0, help="seconds late that still count as on time")
    parser.add_argument("--workers", type=int, default=4, help="cycles at once per daemon process")
    parser.add_argument("--processes", type=int, default=1, help="the daemon's worker processes (1: threads only)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 50 and 200 portfolios, 6 s interval")
    parser.add_argument("--redis", help="Redis URL for ledger and leases (default: SQLite in a temp dir)")
    parser.add_argument("--database", help="PostgreSQL URL for the audit store (default: SQLite)")
    args = parser.parse_args()
    # a TERM ends the run through the `finally` blocks, which stop the daemon and the emulator
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.levels, args.interval, args.tolerance = "50,200", 6.0, 1.0
    args.warmup = args.warmup if args.warmup is not None else 1.5 * args.interval
    args.window = args.window if args.window is not None else 1.5 * args.interval
    levels = [int(x) for x in args.levels.split(",") if x]

    stores = f"ledger/leases {'Redis' if args.redis else 'SQLite'}, audit {'PostgreSQL' if args.database else 'SQLite'}"
    print(
        f"one daemon, {len(ASSETS) + 1}-asset portfolios every {args.interval:g}s, idle; {stores}; "
        f"{args.processes} process(es) x {args.workers} workers; warm-up {args.warmup:g}s, window {args.window:g}s; "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start"
    )
    print(
        f"{'portfolios':>10} | {'on time':>7} {'late p50':>8} {'p99':>6} {'max':>6} {'cycled':>6} | "
        f"{'cycles':>6} {'fail':>4} | {'calls':>5} {'naive':>5} | {'cpu':>5} {'peak MB':>7} | {'1st round':>9}"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="daemon-bench-") as tmp:
        for n in levels:
            r = run_level(n, args, Path(tmp))
            results.append(r)
            print(
                f"{n:>10} | {r.share:>7.1%} {r.pct(0.5):>7.2f}s {r.pct(0.99):>5.1f}s {max(r.late, default=0):>5.1f}s "
                f"{r.cycled / n:>6.0%} | {r.cycles:>6} {r.failed:>4} | {r.calls_per_cycle:>5.2f} {NAIVE_CALLS:>5} | "
                f"{r.cpu_share:>5.0%} {r.peak_mb:>7.0f} | {r.first_round_s:>8.0f}s",
                flush=True,
            )
            if r.trades:
                print(f"   warning: {r.trades} orders filled; the portfolios were meant to be idle")
            split = ", ".join(f"{k} {v:.4f}" for k, v in sorted(r.by_endpoint.items()))
            print(f"   calls per cycle by endpoint: {split}")
            print(
                f"   cycles/s {r.cycles / args.window:.1f}, daemon CPU per cycle "
                f"{1000 * r.cpu_share * args.window / max(r.cycles, 1):.1f} ms; emulator CPU {r.emulator_cpu:.0%}; "
                f"load average {r.load:.1f} at the window's end; peak MB by process "
                + " + ".join(f"{m:.0f}" for m in r.peak_parts)
            )
    top = max(results, key=lambda r: r.n)
    sharing = min(results, key=lambda r: abs(r.n - GOAL_CALLS_AT))
    calls = sharing.calls_per_cycle
    print(
        f"naive idle cycle: {NAIVE_CALLS} calls (1 balance read + {len(ASSETS)} order books); ours "
        + ", ".join(f"{r.calls_per_cycle:.3f} at {r.n}" for r in results)
    )
    verdicts = [
        (
            f"<= {GOAL_CALLS:g} API call per idle cycle with {sharing.n} portfolios on an exchange",
            calls <= GOAL_CALLS,
            f"{calls:.3f}",
        ),
    ]
    if top.n >= GOAL_PORTFOLIOS:
        verdicts += [
            (f"{GOAL_PORTFOLIOS} portfolios on schedule", top.on_schedule, f"{top.share:.1%} on time"),
            (f"peak memory < {GOAL_MEMORY_MB:g} MB at {top.n}", top.peak_mb < GOAL_MEMORY_MB, f"{top.peak_mb:.0f} MB"),
        ]
    else:
        print(f"(run with --levels ...,{GOAL_PORTFOLIOS} to check the {GOAL_PORTFOLIOS}-portfolio goals)")
    for what, ok, figure in verdicts:
        print(f"goal {what}: {'met' if ok else 'NOT met'} ({figure})")
    for r in results:
        if not r.on_schedule:
            print(f"{r.n} portfolios: NOT on schedule ({r.share:.1%} on time)")
    sys.exit(0 if all(ok for _, ok, _ in verdicts) else 1)


if __name__ == "__main__":
    main()
