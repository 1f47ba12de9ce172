"""`rebalance daemon` on one instance: schedules, state that survives restarts, graceful stop, config reload,
JSON logs, /metrics and /healthz, and the leases that keep two instances off one portfolio.

Daemons run in process where only the scheduling is under test (fast), and as `rebalance daemon` subprocesses
where signals, logs and HTTP endpoints are. Exchanges are the paper exchange or the Binance emulator through
real ccxt; stores are the real SQLite, Redis and PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from daemon_helpers import (
    DESIGN_METRICS,
    DaemonProcess,
    by_label,
    emulator_exchange,
    http_get,
    pair_config,
    pair_snapshot,
    sample_names,
    scrape,
)
from redis_cluster_fixture import redis_cluster_url  # noqa: F401  (fixture)
from typer.testing import CliRunner

from rebalancer_cli.cli import app
from rebalancer_cli.config import load_config
from rebalancer_cli.daemon import Daemon
from rebalancer_cli.errors import LeaseLostError
from rebalancer_cli.leases import SQLiteLeases
from rebalancer_cli.ledger import open_ledger
from rebalancer_cli.runtime import open_audit_for, open_ledger_for
from rebalancer_cli.telemetry import MetricsServer
from rebalancer_cli.testing.emulator import DEFAULT_API_KEY, DEFAULT_SECRET, Emulator, start_emulator

D = Decimal


@pytest.fixture()
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    emu = start_emulator(pair_snapshot(tmp_path / "exchange.json", range(2)))
    try:
        yield emu
    finally:
        emu.stop()


class Events(logging.Handler):
    """The structured fields of every event the in-process daemon logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append({"event": record.getMessage(), **(getattr(record, "fields", None) or {})})

    def cycles(self, portfolio: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "cycle" and e["portfolio"] == portfolio]


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


def btc_snapshot(path: Path, price: str, *, btc: str = "1", usdc: str = "1000") -> Path:
    """A BTC/USDC paper market one tick wide around `price`; rewriting only the prices keeps the accounts."""
    p = D(price)
    doc = {
        "taken_at": "2026-11-27T10:00:00Z",
        "balances": {"BTC": btc, "USDC": usdc},
        "markets": {
            "BTC/USDC": {
                "taker_fee": "0.001",
                "amount_step": "0.0001",
                "min_notional": "1",
                "bids": [[str(p - D("0.5")), "50"], [str(p - 1), "50"]],
                "asks": [[str(p + D("0.5")), "50"], [str(p + 1), "50"]],
            }
        },
    }
    path.write_text(json.dumps(doc))
    return path


def btc_config(path: Path, pid: str, snapshot: str, **extra: Any) -> Path:
    """50/50 BTC/USDC with a 1% threshold and a hard band (20%) far away from the drifts these tests use."""
    lines = [
        f'portfolio_id: "{pid}"',
        "base_threshold: 0.01",
        "volatility_factor: 0.1",
        "safety_margin: 1.0",
        "max_trades_per_cycle: 10",
        "policy: cost-adjusted",  # the trades these tests expect come from the original rule
        "assets:",
        '  - {symbol: "BTC", target_weight: 0.5, max_deviation: 0.2}',
        '  - {symbol: "USDC", target_weight: 0.5, max_deviation: 0.2}',
        f"exchange: {{id: paper, snapshot: {snapshot}}}",
        *(f"{k}: {v}" for k, v in extra.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_until(daemon: Daemon, done: Any, timeout: float = 20) -> None:
    """Run an in-process daemon until `done()` holds, then stop it as SIGTERM would."""
    loop = threading.Thread(target=daemon.run)
    loop.start()
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert loop.is_alive() and time.monotonic() < deadline, "the daemon did not get there"
            time.sleep(0.02)
    finally:
        daemon.stop()
        loop.join(timeout=15)
    assert not loop.is_alive()


def daemon(*paths: Path, instance_id: str | None = None) -> Daemon:
    """An in-process instance that claims at once (no other instance to wait for) and ticks fast."""
    return Daemon(list(paths), lease_ttl=3, join_delay=0, tick=0.05, instance_id=instance_id)


def count(daemon: Daemon, pid: str, outcome: str) -> int:
    value = daemon.metrics.registry.get_sample_value(
        "rebalance_cycles_total", {"portfolio_id": pid, "outcome": outcome}
    )
    return int(value or 0)


# --- scheduling -------------------------------------------------------------------------------------------


def test_each_portfolio_cycles_on_its_own_interval_and_a_failing_one_backs_off_alone(
    tmp_path: Path, state_dir: Path, unique_id: str
) -> None:
    btc_snapshot(tmp_path / "market.json", "1000", btc="1.2", usdc="800")
    fast, slow, broken = f"{unique_id}-fast", f"{unique_id}-slow", f"{unique_id}-broken"
    btc_config(tmp_path / "fast.yaml", fast, "market.json", interval=1)
    btc_config(tmp_path / "slow.yaml", slow, "market.json", interval=60)
    # valid as a file, but its market is missing from the exchange: every cycle fails (only the interval line
    # changes from 60 to 1: a random portfolio id may hold "60" too)
    (tmp_path / "broken.yaml").write_text(
        (tmp_path / "slow.yaml")
        .read_text()
        .replace(slow, broken)
        .replace("BTC", "XRP")
        .replace("interval: 60", "interval: 1")
    )
    instance = daemon(tmp_path)
    assert instance.run(max_seconds=3.5) == 0

    # one cycle at once, then one per second: 4 in 3.5 s (3 when a slow machine delays the start)
    assert 3 <= count(instance, fast, "done") <= 4
    assert count(instance, slow, "done") == 1, "a 60 s portfolio ran once"
    # the broken one failed at 0 s and once more after a doubled interval, then waits 4 s: its backoff never
    # delayed the others
    assert 1 <= count(instance, broken, "error") <= 2
    assert count(instance, broken, "done") == 0


def test_hysteresis_and_cooldown_hold_across_a_daemon_restart(
    tmp_path: Path, state_dir: Path, unique_id: str, events: Events
) -> None:
    snap = btc_snapshot(tmp_path / "market.json", "1000", btc="1.1", usdc="900")  # 55% BTC for a 50% target
    plain, hyst, cool = f"{unique_id}-plain", f"{unique_id}-hyst", f"{unique_id}-cool"
    btc_config(tmp_path / "plain.yaml", plain, "market.json", interval=1)
    # to the band edge: the trade leaves the asset outside the re-arm band, so hysteresis holds it afterwards
    btc_config(tmp_path / "hyst.yaml", hyst, "market.json", interval=1, hysteresis=0.5, rebalance_to="band_edge")
    btc_config(tmp_path / "cool.yaml", cool, "market.json", interval=1, cooldown="1h")

    run_until(daemon(tmp_path), lambda: all(events.cycles(pid) for pid in (plain, hyst, cool)))
    for pid in (plain, hyst, cool):
        [first] = events.cycles(pid)
        assert first["decision"] == "trade" and [o["status"] for o in first["orders"]] == ["filled"]

    # BTC rallies 10%: 52.4% BTC again, a drift of 2.4% (above 1.5%, the hysteresis trigger, and far from the
    # 0.5% that re-arms it). Only what the store remembers of the first run can keep the two from trading.
    btc_snapshot(snap, "1100", btc="1.1", usdc="900")
    events.events.clear()
    run_until(daemon(tmp_path), lambda: all(events.cycles(pid) for pid in (plain, hyst, cool)))

    decisions = {pid: events.cycles(pid)[0] for pid in (plain, hyst, cool)}
    assert decisions[plain]["decision"] == "trade", "the control trades: the move is worth a trade"
    assert decisions[hyst]["decision"] == "hold" and decisions[hyst]["decisions"]["BTC"] == "held by hysteresis"
    assert decisions[cool]["decision"] == "hold" and decisions[cool]["decisions"]["BTC"] == "held by cooldown"
    assert decisions[hyst]["orders"] == [] and decisions[cool]["orders"] == []


def test_config_files_added_and_removed_while_running(
    tmp_path: Path, state_dir: Path, unique_id: str, events: Events
) -> None:
    btc_snapshot(tmp_path / "market.json", "1000", btc="1.2", usdc="800")
    first, second = f"{unique_id}-first", f"{unique_id}-second"
    btc_config(tmp_path / "first.yaml", first, "market.json", interval=1)
    instance = daemon(tmp_path)

    def step() -> None:
        if events.cycles(first) and not (tmp_path / "second.yaml").exists():
            (tmp_path / "broken.yaml").write_text("portfolio_id: x\n")  # invalid: logged, never used
            btc_config(tmp_path / "second.yaml", second, "market.json", interval=1)
        if events.cycles(second) and (tmp_path / "first.yaml").exists():
            (tmp_path / "first.yaml").unlink()

    def done() -> bool:
        step()
        return any(e["event"] == "config removed" for e in events.events)

    run_until(instance, done)
    assert [e["event"] for e in events.events].count("new config rejected") == 1, "an invalid new file: once"
    assert events.cycles(second)[0]["decision"] == "trade", "a new file is a new portfolio, worked at once"
    released = [e for e in events.events if e["event"] == "lease released" and e["portfolio"] == first]
    assert released and released[0]["reason"] == "config removed"
    assert set(instance.slots) == {second}


def test_two_instances_on_one_host_split_the_portfolios_and_hand_them_over_at_a_clean_stop(
    tmp_path: Path, state_dir: Path, unique_id: str
) -> None:
    btc_snapshot(tmp_path / "market.json", "1000")
    pids = [f"{unique_id}-{i}" for i in range(4)]
    for pid in pids:
        btc_config(tmp_path / f"{pid}.yaml", pid, "market.json", interval=1)
    # SQLite leases in the shared state directory; the same --instance-id by mistake must not merge them
    a, b = daemon(tmp_path, instance_id="same"), daemon(tmp_path, instance_id="same")
    loops = [threading.Thread(target=d.run) for d in (a, b)]
    for loop in loops:
        loop.start()
    try:
        deadline = time.monotonic() + 15

        def held(d: Daemon) -> set[str]:
            return {s.pid for s in d.slots.values() if s.token is not None}

        while not (len(held(a)) == len(held(b)) == 2):
            assert time.monotonic() < deadline, (held(a), held(b))
            time.sleep(0.05)
        assert held(a).isdisjoint(held(b))
        b.stop()
        loops[1].join(timeout=15)
        while held(a) != set(pids):  # b left and released: no need to wait for its leases to expire
            assert time.monotonic() < deadline, held(a)
            time.sleep(0.05)
    finally:
        for d in (a, b):
            d.stop()
        for loop in loops:
            loop.join(timeout=15)


# --- cron-style runs: no chatter --------------------------------------------------------------------------


def _cron_run(runner: CliRunner, config: Path) -> tuple[str, int]:
    """What a cron job does: `plan --json` (to read the decision) then `execute --confirm --json`."""
    planned = runner.invoke(app, ["plan", "--config", str(config), "--json"])
    assert planned.exit_code in (0, 10), planned.output
    [btc] = [a for a in json.loads(planned.stdout)["assets"] if a["symbol"] == "BTC"]
    executed = runner.invoke(app, ["execute", "--config", str(config), "--confirm", "--json"])
    assert executed.exit_code == 0, executed.output
    filled = [o for o in json.loads(executed.stdout)["orders"] if o["status"] == "filled"]
    return (btc["reason"] if btc["decision"] == "hold" else "trade"), len(filled)


OSCILLATION = ["1060", "1000", "1060", "1000", "1060", "1000"]  # +-6%: a drift of 1.46% each way


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_cron_runs_on_prices_oscillating_around_the_threshold_trade_once_per_cooldown(
    tmp_path: Path, state_dir: Path, unique_id: str, store: str, request: pytest.FixtureRequest
) -> None:
    runner = CliRunner()
    extra = {"redis_url": request.getfixturevalue("redis_url")} if store == "redis" else {}
    snap = tmp_path / "market.json"
    btc_snapshot(snap, "1000")
    chatty = btc_config(tmp_path / "chatty.yaml", f"{unique_id}-chatty", "market.json", **extra)
    calm = btc_config(tmp_path / "calm.yaml", f"{unique_id}-calm", "market.json", cooldown="1h", **extra)

    seen: dict[Path, list[tuple[str, int]]] = {chatty: [], calm: []}
    for price in OSCILLATION:
        btc_snapshot(snap, price)
        for config in seen:
            seen[config].append(_cron_run(runner, config))

    # without a cooldown every swing crosses the 1% threshold and trades: the chatter the cooldown exists for
    assert [filled for _, filled in seen[chatty]] == [1] * len(OSCILLATION)
    # with it, one trade in the window, and the swings that would have traded say why they did not
    assert sum(filled for _, filled in seen[calm]) == 1
    assert seen[calm][0] == ("trade", 1)
    assert {reason for reason, _ in seen[calm][1:]} == {"held by cooldown", "below threshold"}


def test_cron_runs_with_hysteresis_retrade_only_after_rearming(
    tmp_path: Path, state_dir: Path, unique_id: str, events: Events
) -> None:
    runner = CliRunner()
    snap = tmp_path / "market.json"
    btc_snapshot(snap, "1000")
    # threshold 1%: trades above 1.2%, re-arms below 0.8%; trading to the band's edge leaves 1% of drift, outside
    # the re-arm band, so the asset stays disarmed after each trade
    config = btc_config(
        tmp_path / "hyst.yaml",
        f"{unique_id}-hyst",
        "market.json",
        hysteresis=0.2,
        interval=1,
        rebalance_to="band_edge",
    )
    steps = []
    for price in ["1060", "1080", "1000", "1080"]:
        btc_snapshot(snap, price)
        steps.append(_cron_run(runner, config))
    # the trade to the edge disarms BTC; the swing further up (1.7%, above the 1.2% trigger) is held; the swing
    # back lands inside the re-arm band; only then does the next swing up trade
    assert steps == [("trade", 1), ("held by hysteresis", 0), ("below threshold", 0), ("trade", 1)]
    # the daemon reads the same memory as cron: the last cron trade disarmed BTC, so the daemon holds the next swing
    btc_snapshot(snap, "1100")
    run_until(daemon(config), lambda: bool(events.cycles(f"{unique_id}-hyst")))
    [cycle] = events.cycles(f"{unique_id}-hyst")
    assert cycle["decisions"]["BTC"] == "held by hysteresis" and cycle["orders"] == []


# --- a real daemon process: logs, metrics, health, reload -------------------------------------------------


def test_daemon_process_logs_json_exports_metrics_and_reloads_only_valid_configs(
    tmp_path: Path, state_dir: Path, unique_id: str, emulator: Emulator
) -> None:
    pid = f"{unique_id}-p0"
    config = pair_config(tmp_path / "p0.yaml", pid, 0, emulator_exchange(emulator.base_url), interval=1)
    daemon = DaemonProcess([config], tmp_path / "daemon.log", env={"REBALANCE_STATE_DIR": str(state_dir)}, lease_ttl=3)
    try:
        daemon.wait_ready()
        daemon.wait_for(lambda ev: any(e.get("decision") == "trade" for e in ev), 30, "the first trade")

        # every metric of DESIGN.md, with values that say what happened
        text, samples = scrape(daemon.port)
        names = sample_names(samples)
        for name in DESIGN_METRICS:
            assert name in names or f"{name}_count" in names, f"{name} missing from /metrics:\n{text}"
        assert by_label(samples, "portfolio_drift_ratio", "portfolio_id")[pid] < 0.001
        assert samples[("orders_total", (("result", "filled"), ("side", "sell")))] == 1
        assert by_label(samples, "shadow_ledger_lock_failures_total", "portfolio_id") == {pid: 0}
        assert by_label(samples, "circuit_breaker_state", "exchange") == {"binance": 0}
        assert by_label(samples, "exchange_api_calls_total", "endpoint")["create_order"] == 1
        assert by_label(samples, "exchange_rate_limit_remaining", "exchange")["binance"] > 0
        status, body = http_get(f"http://127.0.0.1:{daemon.port}/healthz")
        assert status == 200 and json.loads(body)["ok"] is True

        # an invalid edit is logged with its problem and changes nothing: cycles go on with the old config
        exchange = emulator_exchange(emulator.base_url)
        pair_config(config, pid, 0, exchange, interval=1, weights=("0.6", "0.6"))  # weights sum to 1.2
        daemon.wait_for(lambda ev: any("rejected" in e["event"] for e in ev), 10, "the rejection")
        [rejected] = [e for e in daemon.events() if "rejected" in e["event"]]
        assert rejected["portfolio"] == pid and any("sum" in p for p in rejected["problems"]), rejected
        before = len(daemon.cycles(pid))
        daemon.wait_for(lambda ev: len(daemon.cycles(pid)) >= before + 2, 10, "cycles after the rejection")
        assert all(c["decision"] == "hold" for c in daemon.cycles(pid)[1:]), "the old (balanced) targets hold"

        # a valid edit is used from the next cycle on: 60% base now, so it buys
        pair_config(config, pid, 0, exchange, interval=1, weights=("0.6", "0.4"))
        daemon.wait_for(lambda ev: any(e["event"] == "config reloaded" for e in ev), 10, "the reload")
        daemon.wait_for(lambda ev: sum(c["decision"] == "trade" for c in daemon.cycles(pid)) == 2, 10, "a buy")
        trades = [c for c in daemon.cycles(pid) if c["decision"] == "trade"]
        assert [(o["side"], o["status"]) for o in trades[1]["orders"]] == [("buy", "filled")]

        # refused credentials fail cycles: the errors are logged, never the credentials
        emulator.faults.reject_auth(count=None)
        daemon.wait_for(lambda ev: any(e["event"] == "cycle failed" for e in ev), 15, "a failed cycle")
        emulator.faults.clear()
    finally:
        code = daemon.terminate()
    assert code == 0
    events = daemon.events()  # every line parses as JSON
    text = daemon.text()
    assert DEFAULT_SECRET not in text and DEFAULT_API_KEY not in text
    for cycle in [e for e in events if e["event"] == "cycle"]:
        assert {"portfolio", "cycle", "decision", "orders", "time", "level"} <= set(cycle)
    stats = emulator.stats()["orders"]
    assert len(stats) == 2 and all(c["accepted"] == 1 and c["filled"] == 1 for c in stats.values())


def test_sigterm_finishes_the_order_in_flight_releases_lease_and_locks_and_exits_0(
    tmp_path: Path, state_dir: Path, unique_id: str, emulator: Emulator
) -> None:
    pid = f"{unique_id}-p1"
    exchange = emulator_exchange(emulator.base_url, recv_window_ms=5000)  # a slow order is still in time
    config = pair_config(tmp_path / "p1.yaml", pid, 1, exchange, interval=1)
    emulator.faults.latency(2000, endpoint="/api/v3/order", method="POST")  # the order is slow to answer
    daemon = DaemonProcess([config], tmp_path / "daemon.log", env={"REBALANCE_STATE_DIR": str(state_dir)}, lease_ttl=3)
    try:
        daemon.wait_ready()
        deadline = time.monotonic() + 30
        while emulator.stats()["requests"].get("POST /api/v3/order", 0) == 0:
            assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.text()
            time.sleep(0.02)
        daemon.proc.send_signal(signal.SIGTERM)  # while the order is on its way
        assert daemon.proc.wait(timeout=10) == 0
    finally:
        daemon.terminate()

    [counts] = emulator.stats()["orders"].values()
    assert counts["accepted"] == 1 and counts["filled"] == 1, "the order in flight was finished, once"
    [cycle] = daemon.cycles(pid)
    assert [o["status"] for o in cycle["orders"]] == ["filled"]
    assert any(e["event"] == "lease released" and e["portfolio"] == pid for e in daemon.events())

    loaded = load_config(config)
    ledger = open_ledger_for(loaded)
    audit = open_audit_for(loaded)
    leases = SQLiteLeases(state_dir / "leases.sqlite3")
    try:
        assert ledger.locks(pid) == [], "no lock outlives the stop"
        assert ledger.balances(pid)["A1"] == D(5), "the fill is in the ledger"
        [order] = audit.recent_orders(pid)
        assert order.status == "filled"
        assert leases.holder(pid) is None, "the lease was released, not left to expire"
        assert leases.heartbeat("probe", 3) == 1, "the instance left the membership"
    finally:
        leases.close()
        audit.close()
        ledger.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_healthz_is_503_when_a_store_goes_down(tmp_path: Path, state_dir: Path, unique_id: str) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not on PATH: cannot start a Redis to stop")
    port = _free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        client.close()
        btc_snapshot(tmp_path / "market.json", "1000")
        btc_config(tmp_path / "p.yaml", unique_id, "market.json", interval=1, redis_url=f"redis://127.0.0.1:{port}/0")
        instance = daemon(tmp_path / "p.yaml")
        http = MetricsServer(instance.metrics, instance.health).start()
        loop = threading.Thread(target=instance.run)
        loop.start()
        try:
            deadline = time.monotonic() + 10
            while count(instance, unique_id, "done") == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            status, body = http_get(f"http://127.0.0.1:{http.port}/healthz")
            assert status == 200, body

            server.terminate()  # by pid
            server.wait(timeout=10)
            status, body = http_get(f"http://127.0.0.1:{http.port}/healthz")
            detail = json.loads(body)
            assert status == 503 and detail["ok"] is False
            assert "ledger_error" in detail and "leases_error" in detail
            assert detail["loop_alive"] is True, "the process is fine: only the store is down"
        finally:
            instance.stop()
            loop.join(timeout=15)
            http.stop()
        assert not loop.is_alive(), "a store outage does not keep the daemon from stopping"
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=10)


# --- leases -----------------------------------------------------------------------------------------------


def test_a_lease_has_one_holder_expires_after_its_ttl_and_fences_the_old_holder(
    lease_env: tuple[str | None, Any], tmp_path: Path, unique_id: str
) -> None:
    url, open_one = lease_env
    a, b = open_one(), open_one()  # two instances
    pid = unique_id

    token_a = a.acquire(pid, "instance-a", 0.4)
    assert token_a is not None
    assert b.acquire(pid, "instance-b", 0.4) is None, "a second holder cannot acquire"
    assert b.holder(pid) == "instance-a"
    assert not b.renew(pid, "instance-b", token_a, 0.4), "nor renew someone else's lease"
    assert a.acquire(pid, "instance-a", 0.4) == token_a, "the holder re-acquires its own lease"
    ledger_a, ledger_b = open_ledger(url, tmp_path), open_ledger(url, tmp_path)
    try:
        ledger_a.advance_fence(pid, token_a)
        ledger_a.set_memory(pid, "from a", fence=token_a)

        time.sleep(0.6)  # instance a pauses past its TTL
        assert b.holder(pid) is None, "the lease expired after its TTL"
        assert not a.renew(pid, "instance-a", token_a, 0.4), "an expired lease cannot be renewed"
        token_b = b.acquire(pid, "instance-b", 5)
        assert token_b is not None and token_b > token_a
        ledger_b.advance_fence(pid, token_b)

        with pytest.raises(LeaseLostError):  # a wakes up and writes with its old token: refused
            ledger_a.set_memory(pid, "from a, stale", fence=token_a)
        with pytest.raises(LeaseLostError):
            ledger_a.advance_fence(pid, token_a)
        ledger_b.set_memory(pid, "from b", fence=token_b)
        assert ledger_a.get_memory(pid) == "from b"

        b.release(pid, "instance-a", token_a)  # a stale release does nothing
        assert a.holder(pid) == "instance-b"
        b.release(pid, "instance-b", token_b)
        assert a.holder(pid) is None
    finally:
        ledger_a.close()
        ledger_b.close()


def test_instances_count_each_other_through_heartbeats(lease_env: tuple[str | None, Any], unique_id: str) -> None:
    url, open_one = lease_env
    a, b = open_one(), open_one()
    me, other = f"{unique_id}-a", f"{unique_id}-b"
    alone = a.heartbeat(me, 0.5)  # other test sessions may share this Redis: counts are relative
    assert b.heartbeat(other, 0.5) >= alone + 1 if url else b.heartbeat(other, 0.5) == 2
    b.leave(other)
    assert a.heartbeat(me, 0.5) == alone, "a clean stop leaves at once"
    b.heartbeat(other, 0.3)
    time.sleep(0.5)
    assert a.heartbeat(me, 0.5) == alone, "a dead instance drops out after its TTL"
    a.leave(me)


# --- issue 9: the schedule's own key space, bounded stop ------------------------------------------------------


def test_portfolios_a_and_a_daemon_keep_their_own_state(
    tmp_path: Path, state_dir: Path, unique_id: str, events: Events
) -> None:
    """The schedule was kept as `<portfolio>.daemon`: portfolio `a.daemon`'s memory and fence were overwritten."""
    btc_snapshot(tmp_path / "market.json", "1000", btc="1", usdc="1000")  # at target: every cycle holds
    a, b = unique_id, f"{unique_id}.daemon"
    btc_config(tmp_path / "a.yaml", a, "market.json", interval=1, hysteresis=0.5)
    btc_config(tmp_path / "b.yaml", b, "market.json", interval=1, hysteresis=0.5)
    instance = daemon(tmp_path)
    run_until(instance, lambda: all(len(events.cycles(pid)) >= 2 for pid in (a, b)))
    assert [e for e in events.events if e["event"] in ("cycle failed", "cycle crashed")] == []
    for pid in (a, b):
        assert count(instance, pid, "fenced") == 0 and count(instance, pid, "done") >= 2
    ledger = open_ledger_for(load_config(tmp_path / "b.yaml"))
    try:
        assert "BTC" in json.loads(ledger.get_memory(b) or "{}"), "a.daemon's memory is its planner's"
    finally:
        ledger.close()


def test_a_schedule_written_under_the_old_key_is_kept_after_an_upgrade(
    tmp_path: Path, state_dir: Path, unique_id: str, events: Events
) -> None:
    btc_snapshot(tmp_path / "market.json", "1000", btc="1", usdc="1000")
    pid = unique_id
    btc_config(tmp_path / "a.yaml", pid, "market.json", interval=3600)
    ledger = open_ledger_for(load_config(tmp_path / "a.yaml"))
    try:
        ledger.set_memory(f"{pid}.daemon", json.dumps({"last_cycle": time.time() - 60}))  # ran a minute ago
    finally:
        ledger.close()
    instance = daemon(tmp_path)
    run_until(instance, lambda: instance.slots[pid].next_due > 0)
    assert events.cycles(pid) == [], "not due for another 59 minutes: the old daemon's schedule is kept"
    assert 3400 < instance.slots[pid].next_due - instance.clock() <= 3540


@pytest.mark.slow
def test_sigterm_exits_within_10_s_while_a_request_waits_on_a_30_s_timeout(
    tmp_path: Path, state_dir: Path, unique_id: str, emulator: Emulator
) -> None:
    pid = f"{unique_id}-p1"
    exchange = {**emulator_exchange(emulator.base_url), "timeout": "30s"}
    config = pair_config(tmp_path / "p1.yaml", pid, 1, exchange, interval=1)
    emulator.faults.latency(60_000, endpoint="/api/v3/account")  # the balance read hangs past every bound
    daemon = DaemonProcess([config], tmp_path / "daemon.log", env={"REBALANCE_STATE_DIR": str(state_dir)})
    try:
        daemon.wait_ready()
        deadline = time.monotonic() + 30
        while emulator.stats()["requests"].get("GET /api/v3/account", 0) == 0:
            assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.text()
            time.sleep(0.02)
        daemon.proc.send_signal(signal.SIGTERM)  # while the cycle waits on the exchange
        assert daemon.proc.wait(timeout=10) == 0, "the promise: SIGTERM to exit within 10 s"
    finally:
        emulator.faults.clear()
        daemon.terminate()
    assert any(e["event"] == "daemon stopped" for e in daemon.events())
