"""One writer per portfolio, proven at the exchange: whatever else runs, nothing is executed twice.

Each test starts real `rebalance` processes against the Binance emulator in its own process and judges by
what the emulator saw (orders per client id, balances), never by our own records: two `execute --confirm`
started together; a writer frozen (SIGSTOP) after its lock, or after its last check right before the
request leaves, past its lease, while a successor takes over, recovers and trades. A thawed writer's request
is signed with the time of its last check, so the exchange refuses it once the settle window has passed.
`bench/concurrency_trials.py` runs the same races a hundred times and more.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from exec_helpers import (
    CREDENTIALS_ENV,
    OPENING,
    assert_books_agree,
    assert_each_key_filled_at_most_once,
    cli,
    emulator_exchange,
    order_counts,
    stores,
    write_config,
)

from rebalancer_cli.runtime import make_plan, reconcile
from rebalancer_cli.testing.emulator import RemoteEmulator

BACKENDS = ["sqlite", "redis+postgres"]
ORDER_ENDPOINT = "POST /api/v3/order"


pytestmark = pytest.mark.usefixtures("emulator_credentials")


def portfolio(tmp_path: Path, remote: RemoteEmulator, pid: str, backend: str, request: pytest.FixtureRequest) -> Path:
    urls = {}
    if backend != "sqlite":
        urls = stores(backend, request.getfixturevalue("redis_url"), request.getfixturevalue("migrated"))
    return write_config(tmp_path, pid, emulator_exchange(remote.base_url), **urls)


def start(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rebalancer_cli", "execute", "--config", str(config), "--confirm", "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **CREDENTIALS_ENV, **(env or {})},
    )


def wait_stopped(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Until the process froze itself at its failpoint (state T in /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode} before freezing: {proc.communicate()}"
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    raise AssertionError("the writer never reached its failpoint")


def assert_traded_once_to_target(config: Path, remote: RemoteEmulator, *, stale: int = 0) -> dict[str, dict[str, int]]:
    """Judged at the emulator: the portfolio's sell and buy, each sent once and filled once; then nothing
    left to do, and exchange, ledger and audit agree. `stale`: requests that arrived past their validity
    window and were refused before they could count as an order."""
    stats = remote.stats()
    assert_each_key_filled_at_most_once(stats)
    filled = {k: c for k, c in order_counts(stats).items() if c["filled"]}
    assert len(filled) == 2, order_counts(stats)
    assert stats["requests"].get(ORDER_ENDPOINT, 0) == len(order_counts(stats)) + stale  # no key sent twice
    _, plan = make_plan(config)
    assert plan.trades == ()
    assert_books_agree(config, remote.state(), OPENING)
    assert reconcile(config).consistent
    return filled


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("latency_ms", [0, 150])
def test_two_executes_started_together_trade_once(
    remote: RemoteEmulator,
    tmp_path: Path,
    unique_id: str,
    backend: str,
    latency_ms: int,
    request: pytest.FixtureRequest,
) -> None:
    remote.reset()
    if latency_ms:
        remote.faults.latency(latency_ms, endpoint="/api/v3/order", method="POST")
    config = portfolio(tmp_path, remote, unique_id, backend, request)
    runs = [start(config), start(config)]
    results = [(p.wait(timeout=60), *p.communicate()) for p in runs]
    codes = sorted(code for code, _, _ in results)
    # the loser is refused naming the winner (exit 6), or starts after it finished and finds nothing to do
    assert codes in ([0, 0], [0, 6]), results
    for code, _, err in results:
        if code == 6:
            assert "is held by execute pid" in err and "--wait" in err
    assert_traded_once_to_target(config, remote)


def test_a_second_writer_waits_with_wait_then_finds_nothing_left(
    remote: RemoteEmulator, tmp_path: Path, unique_id: str, request: pytest.FixtureRequest
) -> None:
    remote.reset()
    remote.faults.latency(400, endpoint="/api/v3/order", method="POST")
    config = portfolio(tmp_path, remote, unique_id, "sqlite", request)
    first = start(config)
    time.sleep(0.8)  # the first holds the lease and has orders on the way
    second = cli("execute", "--config", str(config), "--confirm", "--json", "--wait", "30")
    assert first.wait(timeout=60) == 0, first.communicate()
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["orders"] == []  # it planned after the first was done: nothing left
    assert_traded_once_to_target(config, remote)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("freeze_at", ["after_lock", "during_send"])
def test_a_writer_frozen_past_its_lease_never_trades_behind_its_successor(
    remote: RemoteEmulator,
    tmp_path: Path,
    unique_id: str,
    backend: str,
    freeze_at: str,
    request: pytest.FixtureRequest,
) -> None:
    """`after_lock`: frozen before its last checks; `during_send`: frozen after them, right before the request
    leaves (a GC pause, a stopped VM). Either way the successor takes the lease once it expired, settles the
    frozen writer's order (waiting out the settle window for one marked sent), and trades; the thawed writer
    sends nothing the exchange accepts."""
    remote.reset()
    config = portfolio(tmp_path, remote, unique_id, backend, request)
    short = {"REBALANCE_WRITER_LEASE_TTL": "2"}
    frozen = start(config, env={**short, "REBALANCE_FAILPOINT": f"{freeze_at}:stop"})
    try:
        wait_stopped(frozen)
        successor = cli("execute", "--config", str(config), "--confirm", "--json", "--wait", "30", env=short)
        assert successor.returncode == 0, successor.stdout + successor.stderr
        report = json.loads(successor.stdout)
        assert [o["status"] for o in report["recovered"]] == ["cancelled"]
        frozen_key = report["recovered"][0]["idempotency_key"]
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    code, _, err = frozen.wait(timeout=60), *frozen.communicate()
    counts = order_counts(remote.stats())
    assert counts.get(frozen_key, {}).get("accepted", 0) == 0, counts  # judged at the exchange
    assert code == 3 and "lost its lease" in err, err  # it knows it traded nothing, and says why
    # `after_lock`: fenced at its last check, nothing left this machine. `during_send`: it had passed its last
    # check, so its request left when it thawed, signed at the time of that check: the exchange refused it
    # as older than its receive window
    filled = assert_traded_once_to_target(config, remote, stale=0 if freeze_at == "after_lock" else 1)
    assert frozen_key not in filled
