"""Files and processes shared by the daemon tests: one-market portfolios (A{i}/Q{i}, so that many of them can
share the emulator's single account without touching each other's funds), daemon and emulator subprocesses
stopped by process id, and a /metrics scraper."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rebalancer_cli.leases import LeaseStore, RedisLeases, SQLiteLeases
from rebalancer_cli.testing.emulator import DEFAULT_API_KEY, DEFAULT_SECRET

D = Decimal
CREDENTIALS_ENV = {"EMU_API_KEY": DEFAULT_API_KEY, "EMU_SECRET": DEFAULT_SECRET}
DESIGN_METRICS = (
    "rebalance_duration_seconds",
    "portfolio_drift_ratio",
    "rebalance_cost_ratio",
    "exchange_rate_limit_remaining",
    "shadow_ledger_lock_failures_total",
    "circuit_breaker_state",
    "orders_total",
    "exchange_api_calls_total",
)


# --- files --------------------------------------------------------------------------------------------


def pair_market(price: Decimal = Decimal(100), depth: str = "1000") -> dict[str, Any]:
    """A tight two-level book around `price`: market orders fill within a basis point of mid."""
    half = price / 2000
    return {
        "taker_fee": "0.001",
        "amount_step": "0.001",
        "min_notional": "1",
        "bids": [[str(price - half), depth], [str(price - 3 * half), depth]],
        "asks": [[str(price + half), depth], [str(price + 3 * half), depth]],
    }


def pair_snapshot(
    path: Path,
    indexes: Iterable[int],
    *,
    base: str = "6",
    quote: str = "400",
    price: Decimal = Decimal(100),
    prefix: str = "",
) -> Path:
    """One market `{prefix}A{i}/{prefix}Q{i}` per index; every base asset starts overweight (6 at 100 against 400
    of quote: 60% for a 50% target), so each portfolio needs exactly one sell."""
    idx = list(indexes)
    doc = {
        "taken_at": "2026-11-27T10:00:00Z",
        "balances": {k: v for i in idx for k, v in ((f"{prefix}A{i}", base), (f"{prefix}Q{i}", quote))},
        "markets": {f"{prefix}A{i}/{prefix}Q{i}": pair_market(price) for i in idx},
    }
    path.write_text(json.dumps(doc, indent=1))  # JSON is YAML; every number travels as a string
    return path


def emulator_exchange(url: str, recv_window_ms: int = 1000) -> dict[str, Any]:
    return {
        "id": "binance",
        "api_url": url,
        "credentials_env": {"apiKey": "EMU_API_KEY", "secret": "EMU_SECRET"},
        # a short receive window keeps the settle waits of recovery short (ccxt sends it with every request);
        # the emulator, like Binance, refuses a request that arrives later than that
        "options": {"recvWindow": recv_window_ms},
    }


def pair_config(
    path: Path,
    portfolio_id: str,
    i: int,
    exchange: dict[str, Any],
    *,
    prefix: str = "",
    weights: tuple[str, str] = ("0.5", "0.5"),
    max_deviation: str = "0.05",
    **extra: Any,
) -> Path:
    a, q = f"{prefix}A{i}", f"{prefix}Q{i}"
    lines = [
        f'portfolio_id: "{portfolio_id}"',
        "base_threshold: 0.001",
        "volatility_factor: 0.5",
        "safety_margin: 1.5",
        "max_trades_per_cycle: 10",
        "policy: cost-adjusted",  # the trades these tests expect come from the original rule
        f"quote: {q}",
        "assets:",
        f'  - {{symbol: "{a}", target_weight: {weights[0]}, max_deviation: {max_deviation}}}',
        f'  - {{symbol: "{q}", target_weight: {weights[1]}, max_deviation: {max_deviation}}}',
        f"exchange: {json.dumps(exchange)}",
        *(f"{k}: {json.dumps(v) if isinstance(v, str) else v}" for k, v in extra.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- processes ----------------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)  # by pid: this very process, never a name
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return int(proc.returncode)


class DaemonProcess:
    """`rebalance daemon` as a subprocess with JSON logs in a file and /metrics on a port it picks itself."""

    def __init__(self, configs: list[Path], log: Path, *, env: dict[str, str] | None = None, **flags: Any) -> None:
        self.log = log
        args = [sys.executable, "-m", "rebalancer_cli", "daemon", "--log-format", "json", "--metrics-port", "0"]
        for c in configs:
            args += ["--config", str(c)]
        for k, v in flags.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        self._file = log.open("wb")
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=self._file, env={**os.environ, **CREDENTIALS_ENV, **(env or {})}
        )
        self.port = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        """Every log line, parsed: a line that is not JSON fails the test here."""
        out = []
        for line in self.log.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.events()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) waiting for {what}:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.text()[-4000:]}")

    def wait_ready(self, timeout: float = 20) -> DaemonProcess:
        self.wait_for(lambda ev: any(e["event"] == "daemon started" for e in ev), timeout, "the daemon to start")
        self.port = next(e["metrics_port"] for e in self.events() if e["event"] == "daemon started")
        return self

    def cycles(self, portfolio: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == "cycle" and portfolio in (None, e["portfolio"])]

    def terminate(self, timeout: float = 15) -> int:
        try:
            return _stop(self.proc, signal.SIGTERM, timeout)
        finally:
            self._file.close()

    def kill(self) -> int:
        try:
            return _stop(self.proc, signal.SIGKILL)
        finally:
            self._file.close()


class EmulatorProcess:
    """`python -m rebalancer_cli.testing.emulator` serving a snapshot; its first stdout line is its URL."""

    def __init__(self, snapshot: Path, *, weight_limit: int = 6000) -> None:
        args = ["--snapshot", str(snapshot), "--port", "0", "--weight-limit", str(weight_limit)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rebalancer_cli.testing.emulator", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            _stop(self.proc)
            raise RuntimeError(f"emulator did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")

    def stop(self) -> None:
        _stop(self.proc)


# --- HTTP ---------------------------------------------------------------------------------------------


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[str, Samples]:
    """The raw /metrics text and its samples keyed by (sample name, sorted labels)."""
    status, text = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return text, samples


def sample_names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name and label in dict(labels)}


def orders_of(stats: dict[str, Any], keys: Iterable[str]) -> list[dict[str, int]]:
    return [stats["orders"][k] for k in keys if k in stats["orders"]]


# --- a lease store on each backend (shared by the daemon tests) ------------------------------------------

LEASE_BACKENDS = ["sqlite", "redis", "redis-cluster"]


@pytest.fixture(params=LEASE_BACKENDS)
def lease_env(request: pytest.FixtureRequest, tmp_path: Path, unique_id: str) -> Iterator[tuple[str | None, Any]]:
    """(redis URL or None, opener of a second handle on the same lease store)."""
    url = None
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
    elif request.param == "redis-cluster":
        url = request.getfixturevalue("redis_cluster_url")
    opened: list[LeaseStore] = []

    def open_one() -> LeaseStore:
        store: LeaseStore = RedisLeases.from_url(url) if url else SQLiteLeases(tmp_path / "leases.sqlite3")
        opened.append(store)
        return store

    yield url, open_one
    if url:
        from rebalancer_cli.ledger.redis import connect

        client = connect(url)
        for key in (f"rb:{{{unique_id}}}:{n}" for n in ("lease", "lease_seq", "fence", "memory")):
            client.delete(key)
        client.close()
    for store in opened:
        store.close()
