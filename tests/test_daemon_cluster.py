"""Scale-out, end to end on real servers: two `rebalance daemon` processes share 50 portfolios through a
three-master Redis Cluster (leases, fences, shadow ledger, shared rate limit) and PostgreSQL (audit), trading on
one Binance emulator through real ccxt. Orders are counted where they land: at the exchange.

Each portfolio i holds its own pair A{i}/Q{i}, so 50 portfolios share the emulator's single account without
touching each other's funds, and every one starts 10 points overweight in A{i}: exactly one sell each.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import (
    DaemonProcess,
    EmulatorProcess,
    by_label,
    emulator_exchange,
    pair_config,
    pair_snapshot,
    scrape,
)
from redis_cluster_fixture import redis_cluster_url  # noqa: F401  (fixture)

from rebalancer_cli.config import load_config
from rebalancer_cli.ledger.redis import connect
from rebalancer_cli.runtime import migrate, open_audit_for
from rebalancer_cli.testing.emulator import RemoteEmulator

N = 50
TTL = 3.0
INTERVAL = 1


@pytest.fixture()
def emulator(tmp_path: Path) -> Iterator[tuple[str, RemoteEmulator]]:
    # 50 portfolios starting in the same second spend more request weight than one Binance minute allows; a
    # real fleet starts staggered. Rate limiting has its own tests: here the limit is lifted.
    proc = EmulatorProcess(pair_snapshot(tmp_path / "exchange.json", range(N)), weight_limit=1_000_000)
    try:
        yield proc.url, RemoteEmulator(proc.url)
    finally:
        proc.stop()


def _orders_by_portfolio(configs: list[Path]) -> dict[str, list[str]]:
    """Idempotency keys of every order the audit trail (PostgreSQL) holds, per portfolio."""
    audit = open_audit_for(load_config(configs[0]))
    try:
        return {
            load_config(c).portfolio_id: [o.intent.key for o in audit.recent_orders(load_config(c).portfolio_id)]
            for c in configs
        }
    finally:
        audit.close()


def _traded(daemon: DaemonProcess) -> dict[str, int]:
    """Portfolio -> filled orders, from one instance's own JSON log."""
    out: dict[str, int] = {}
    for c in daemon.cycles():
        filled = sum(1 for o in c["orders"] if o["status"] == "filled")
        if filled:
            out[c["portfolio"]] = out.get(c["portfolio"], 0) + filled
    return out


def _wait_orders(remote: RemoteEmulator, n: int, timeout: float, *daemons: DaemonProcess) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = remote.stats()
        if stats["orders_accepted"] >= n:
            return stats
        for d in daemons:
            assert d.proc.poll() is None, d.text()[-3000:]
        assert time.monotonic() < deadline, f"{stats['orders_accepted']} of {n} orders after {timeout}s"
        time.sleep(0.1)


def test_two_instances_split_50_portfolios_and_the_survivor_takes_over_a_killed_one(
    tmp_path: Path,
    unique_id: str,
    redis_cluster_url: str,  # noqa: F811
    database_url: str,
    emulator: tuple[str, RemoteEmulator],
) -> None:
    url, remote = emulator
    migrate(database_url=database_url)  # what `rebalance db migrate` does
    configs_dir = tmp_path / "portfolios"
    configs_dir.mkdir()
    exchange = {**emulator_exchange(url), "rate_limit_per_minute": 1_000_000}
    configs = [
        pair_config(
            configs_dir / f"p{i:02d}.yaml",
            f"{unique_id}-{i:02d}",
            i,
            exchange,
            interval=INTERVAL,
            redis_url=redis_cluster_url,
            database_url=database_url,
        )
        for i in range(N)
    ]
    pids = [f"{unique_id}-{i:02d}" for i in range(N)]

    def start(name: str) -> DaemonProcess:
        state = tmp_path / f"state-{name}"  # two hosts: nothing shared but the servers
        return DaemonProcess(
            [configs_dir],
            tmp_path / f"{name}.log",
            env={"REBALANCE_STATE_DIR": str(state)},
            instance_id=f"{unique_id}-{name}",
            lease_ttl=TTL,
            workers=8,
        )

    a, b = start("a"), start("b")
    try:
        a.wait_ready()
        b.wait_ready()

        # --- first cycle: every portfolio rebalanced exactly once, by one of the two ---------------------
        _wait_orders(remote, N, 45, a, b)
        time.sleep(INTERVAL + 1.5)  # a double order would show up within another cycle
        stats = remote.stats()
        keys = _orders_by_portfolio(configs)
        assert stats["orders_accepted"] == N, "no portfolio traded twice"
        for pid in pids:
            [key] = keys[pid]  # one order per portfolio in the audit trail
            counts = stats["orders"][key]
            assert (counts["accepted"], counts["filled"], counts["duplicates"]) == (1, 1, 0), (pid, counts)
        by_a, by_b = _traded(a), _traded(b)
        print(f"\nfirst cycle: instance a traded {len(by_a)} portfolios, instance b {len(by_b)}")
        assert not set(by_a) & set(by_b), "no portfolio was traded by both instances"
        assert set(by_a) | set(by_b) == set(pids)

        # --- the leases split evenly (an instance that started late is handed its share) ----------------
        client = connect(redis_cluster_url)

        def holders() -> dict[str, str]:
            return {pid: str(client.get(f"rb:{{{pid}}}:lease") or "").rsplit("|", 1)[0] for pid in pids}

        deadline = time.monotonic() + 4 * TTL
        while sorted(Counter(holders().values()).values()) != [N // 2, N // 2]:
            assert time.monotonic() < deadline, Counter(holders().values())
            time.sleep(0.2)
        of_b = sorted(pid for pid, h in holders().items() if h.startswith(f"{unique_id}-b-"))
        client.close()

        # --- SIGKILL b: a takes its portfolios over within one lease TTL ----------------------------------
        b.kill()
        killed = time.time()
        for pid in of_b:  # b's portfolios drift again: each needs one more sell
            remote.set_balance(f"A{int(pid.rsplit('-', 1)[1])}", "7")
        _wait_orders(remote, N + len(of_b), 60, a)
        taken = [e for e in a.events() if e["event"] == "lease acquired" and e["portfolio"] in of_b]
        assert {e["portfolio"] for e in taken} == set(of_b)
        last = max(datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp() for e in taken)
        print(f"instance b held {len(of_b)} portfolios; a held them all {last - killed:.1f}s after the kill")
        # expiry of b's leases and of its heartbeat (one TTL), then a's next lease round (a quarter TTL)
        assert last - killed <= TTL + INTERVAL + 1.0
        time.sleep(INTERVAL + 1.5)

        stats = remote.stats()
        keys = _orders_by_portfolio(configs)
        assert stats["orders_accepted"] == N + len(of_b), "no double order after the takeover"
        for pid in pids:
            assert len(keys[pid]) == (2 if pid in of_b else 1), (pid, keys[pid])
            for key in keys[pid]:
                assert stats["orders"][key]["accepted"] == 1 and stats["orders"][key]["filled"] == 1
        again = _traded(a)
        assert all(again.get(pid, 0) == by_a.get(pid, 0) + 1 for pid in of_b), "a made the second trades"

        # --- the survivor's /metrics ------------------------------------------------------------------------
        _, samples = scrape(a.port)
        sells = samples[("orders_total", (("result", "filled"), ("side", "sell")))]
        assert sells == len(by_a) + len(of_b)
        drift = by_label(samples, "portfolio_drift_ratio", "portfolio_id")
        assert set(drift) == set(pids), "a reports the drift of every portfolio it now holds, and only those"
        assert all(v < 0.001 for v in drift.values()), drift
        assert samples[("daemon_leases_held", ())] == N
        assert by_label(samples, "circuit_breaker_state", "exchange") == {"binance": 0}
    finally:
        b.kill()
        code = a.terminate()
    assert code == 0
