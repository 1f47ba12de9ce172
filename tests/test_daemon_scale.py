"""What lets one daemon carry thousands of portfolios: lease operations batched into one round trip (one
SQLite transaction, one Redis pipeline per chunk, split by node on a cluster), with exactly the answers of the
one-by-one operations; and a daemon that claims, renews and schedules through them.

The throughput itself is measured by bench/daemon_bench.py, never asserted here.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import CREDENTIALS_ENV, emulator_exchange, pair_config, pair_snapshot
from redis_cluster_fixture import redis_cluster_url  # noqa: F401  (fixture)

from rebalancer_cli import leases as leases_module
from rebalancer_cli.config import load_config
from rebalancer_cli.daemon import Daemon, WorkerProcesses
from rebalancer_cli.errors import InputError
from rebalancer_cli.leases import SQLiteLeases
from rebalancer_cli.runtime import open_audit_for
from rebalancer_cli.testing.emulator import start_emulator


def test_batched_claims_renewals_and_lookups_answer_as_the_single_ones(
    lease_env: tuple[str | None, Any], unique_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, open_one = lease_env
    monkeypatch.setattr(leases_module, "PIPELINE_CHUNK", 7)  # several round trips, with a partial last one
    a, b = open_one(), open_one()
    pids = [f"{unique_id}-{i:02d}" for i in range(20)]
    taken_by_b = b.acquire(pids[3], "instance-b", 5)
    assert taken_by_b is not None

    mine = a.acquire_many(pids, "instance-a", 0.6)
    assert set(mine) == set(pids) - {pids[3]}, "a portfolio held by another instance is not claimed"
    assert a.acquire_many(pids[:5], "instance-a", 0.6) == {p: mine[p] for p in pids[:5] if p != pids[3]}, (
        "claiming again what one holds keeps its token"
    )
    holders = b.holders(pids)
    assert holders == {p: ("instance-b" if p == pids[3] else "instance-a") for p in pids}
    assert b.holders([f"{unique_id}-nobody"]) == {f"{unique_id}-nobody": None}

    # a renewal with a wrong token, or of another holder's lease, is lost; the rest are renewed past their TTL
    tokens = {**mine, pids[3]: taken_by_b, pids[0]: mine[pids[0]] + 1000}
    assert a.renew_many(tokens, "instance-a", 5) == {pids[0], pids[3]}
    time.sleep(0.8)  # past the first TTL: only the renewed leases are still held
    held = b.holders(pids)
    assert held[pids[0]] is None, "the lease renewed with a wrong token expired"
    assert all(held[p] == "instance-a" for p in pids if p not in (pids[0], pids[3]))
    assert held[pids[3]] == "instance-b"
    assert a.renew_many({}, "instance-a", 5) == set()

    # once a lease expired, renewing it no longer works and another instance claims it with a higher token
    assert b.acquire_many([pids[0]], "instance-b", 5)[pids[0]] > mine[pids[0]]
    assert a.renew_many({pids[0]: mine[pids[0]]}, "instance-a", 5) == {pids[0]}

    # a clean stop hands back what it holds, and only that (a stale token releases nothing)
    a.release_many({**mine, pids[3]: taken_by_b}, "instance-a")
    assert b.holders(pids) == {p: ("instance-b" if p in (pids[0], pids[3]) else None) for p in pids}


def _config(path: Path, pid: str, snapshot: str) -> Path:
    path.write_text(
        "\n".join(
            [
                f'portfolio_id: "{pid}"',
                "base_threshold: 0.01",
                "volatility_factor: 0.1",
                "safety_margin: 1.0",
                "max_trades_per_cycle: 10",
                "interval: 60",
                "assets:",
                '  - {symbol: "BTC", target_weight: 0.5, max_deviation: 0.2}',
                '  - {symbol: "USDC", target_weight: 0.5, max_deviation: 0.2}',
                f"exchange: {{id: paper, snapshot: {snapshot}}}",
            ]
        )
        + "\n"
    )
    return path


def _market(path: Path) -> None:
    path.write_text(
        '{"taken_at": "2026-11-27T10:00:00Z", "balances": {"BTC": "1", "USDC": "1000"}, "markets": {"BTC/USDC": '
        '{"taker_fee": "0.001", "amount_step": "0.0001", "min_notional": "1", '
        '"bids": [["999.5", "50"]], "asks": [["1000.5", "50"]]}}}'
    )


class Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append({"event": record.getMessage(), **(getattr(record, "fields", None) or {})})

    def of(self, event: str, pids: list[str]) -> list[str]:
        return sorted(e["portfolio"] for e in self.events if e["event"] == event and e.get("portfolio") in pids)


@pytest.fixture()
def events() -> Iterator[Events]:
    logger = logging.getLogger("rebalance")
    handler, level = Events(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_daemon_claims_in_batches_renews_every_lease_and_cycles_each_portfolio_once(
    tmp_path: Path, state_dir: Path, unique_id: str, events: Events
) -> None:
    """Claimed in batches, renewed in one transaction a round, released at the stop: no lease is ever lost
    with a TTL of one second (a renewal round every quarter second), and each portfolio is due once."""
    _market(tmp_path / "market.json")
    pids = [f"{unique_id}-{i:02d}" for i in range(40)]
    for pid in pids:
        _config(tmp_path / f"{pid}.yaml", pid, "market.json")
    daemon = Daemon([tmp_path], lease_ttl=1.0, join_delay=0, tick=0.05)
    assert daemon.run(max_seconds=2.5) == 0

    assert events.of("lease acquired", pids) == pids, "each portfolio claimed once"
    assert events.of("lease lost", pids) == []
    assert events.of("cycle", pids) == pids, "each portfolio cycled once in its 60 s interval"
    assert events.of("lease released", pids) == pids
    store = SQLiteLeases(state_dir / "leases.sqlite3")
    try:
        assert set(store.holders(pids).values()) == {None}, "nothing is left held after the stop"
    finally:
        store.close()


def test_worker_processes_run_the_cycles_trade_once_each_survive_a_killed_worker_and_stop_cleanly(
    tmp_path: Path, state_dir: Path, unique_id: str, events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One instance, its cycles in two worker processes (through real ccxt against the emulator): each
    overweight portfolio sells exactly once, a SIGKILLed worker is replaced and the portfolios go on cycling,
    and a stop leaves no worker behind and no lease held."""
    for name, value in CREDENTIALS_ENV.items():
        monkeypatch.setenv(name, value)  # workers are spawned with the environment of this moment
    emulator = start_emulator(pair_snapshot(tmp_path / "exchange.json", range(4)))
    try:
        pids = [f"{unique_id}-{i}" for i in range(4)]
        for i, pid in enumerate(pids):
            pair_config(tmp_path / f"{pid}.yaml", pid, i, emulator_exchange(emulator.base_url), interval=1)
        daemon = Daemon([tmp_path], lease_ttl=3, join_delay=0, tick=0.05, workers=2, processes=2)
        assert isinstance(daemon.pool, WorkerProcesses)
        workers = [w.process for w in daemon.pool._workers]
        loop = threading.Thread(target=daemon.run)
        loop.start()
        try:

            def cycles() -> list[dict[str, Any]]:
                return [e for e in events.events if e["event"] == "cycle"]

            _wait(lambda: set(events.of("cycle", pids)) == set(pids), "a first cycle of each portfolio")
            first = cycles()[: len(pids)]
            assert {e["worker"] for e in first} == {w.pid for w in workers}, "both workers ran cycles"
            assert all(e["decision"] == "trade" and e["orders"][0]["status"] == "filled" for e in first)

            os.kill(workers[0].pid, signal.SIGKILL)  # by pid: the worker this test's daemon started
            _wait(lambda: any(e["event"] == "worker process died; replaced" for e in events.events), "the replacement")
            seen = len(cycles())
            _wait(lambda: len(cycles()) >= seen + 2 * len(pids), "two more rounds of cycles")
        finally:
            daemon.stop()
            loop.join(timeout=20)
        assert not loop.is_alive()
        assert not any(w.process.is_alive() for w in daemon.pool._workers), "no worker outlives the daemon"
        orders = emulator.stats()["orders"]
        assert len(orders) == len(pids), "one sell per portfolio, whichever process ran it"
        assert all(c["accepted"] == 1 and c["filled"] == 1 for c in orders.values())
        assert events.of("lease released", pids) == pids
    finally:
        emulator.stop()


def test_a_refused_start_leaves_no_worker_process(tmp_path: Path, state_dir: Path) -> None:
    (tmp_path / "broken.yaml").write_text("portfolio_id: x\n")  # invalid: the daemon refuses to start
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(InputError):
        Daemon([tmp_path], processes=2)
    assert {p.pid for p in multiprocessing.active_children()} == before


def _wait(done: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_idle_portfolios_on_one_account_share_their_reads_and_write_nothing_new(
    tmp_path: Path, state_dir: Path, unique_id: str, events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty idle portfolios on one exchange account: their balance and bid/ask reads are shared (well under one
    request per cycle, against two each when every cycle read for itself), and repeated holds add nothing to the
    audit trail after the first one."""
    for name, value in CREDENTIALS_ENV.items():
        monkeypatch.setenv(name, value)
    emulator = start_emulator(pair_snapshot(tmp_path / "exchange.json", [0], base="4", quote="400"))  # at target
    try:
        pids = [f"{unique_id}-{i}" for i in range(20)]
        for pid in pids:
            pair_config(tmp_path / f"{pid}.yaml", pid, 0, emulator_exchange(emulator.base_url), interval=1)
        daemon = Daemon([tmp_path], lease_ttl=3, join_delay=0, tick=0.05, workers=4)
        loop = threading.Thread(target=daemon.run)
        loop.start()
        try:
            _wait(lambda: set(events.of("cycle", pids)) == set(pids), "a first cycle of each portfolio")
            before, seen = dict(emulator.stats()["requests"]), len(events.of("cycle", pids))
            _wait(lambda: len(events.of("cycle", pids)) >= seen + 3 * len(pids), "three more rounds")
            after, cycles = dict(emulator.stats()["requests"]), len(events.of("cycle", pids)) - seen
        finally:
            daemon.stop()
            loop.join(timeout=20)
        assert all(e["decision"] == "hold" for e in events.events if e["event"] == "cycle")
        reads = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
        assert set(reads) <= {"GET /api/v3/account", "GET /api/v3/ticker/bookTicker"}, reads
        assert sum(reads.values()) < cycles / 2, f"{reads} for {cycles} idle cycles"
        audit = open_audit_for(load_config(tmp_path / f"{pids[0]}.yaml"))
        try:
            history = audit.history(pids[0])
        finally:
            audit.close()
        assert [h.status for h in history] == ["done"], "one hold recorded, not one per cycle"
    finally:
        emulator.stop()
