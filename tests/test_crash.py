"""Crash safety, proven: `rebalance execute` is killed with SIGKILL at each step of the execution path, on
both store backends, against the Binance emulator running in its own process; a second run finishes the job.

After each kill and rerun: the emulator saw every idempotency key fill at most once (it would accept a
repeated key, as Binance does once the first order is filled, so a double send would show here), the next
plan has nothing left to do, and exchange, shadow ledger and audit trail hold exactly the same amounts.
Run with `pytest -s` to see the order counts per key.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import ccxt
import pytest
from exec_helpers import (
    OPENING,
    assert_books_agree,
    assert_each_key_filled_at_most_once,
    cli,
    emulator_exchange,
    order_counts,
    stores,
    write_config,
)

from rebalancer_cli.config import load_config
from rebalancer_cli.runtime import make_plan, open_exchange, reconcile
from rebalancer_cli.testing.emulator import RemoteEmulator, binance_client

# The answer to the order is held back this long, and the process dies this long after it started sending:
# it is dead while the exchange is still executing its order. The delay stays below the 1000 ms receive window
# of the configs, so the exchange does execute it.
ORDER_LATENCY_MS = 800
DIE_AFTER_MS = 300
FAILPOINTS = ["after_intent", "after_lock", f"during_send:{DIE_AFTER_MS}", "after_answer", "before_commit"]
BACKENDS = ["sqlite", "redis+postgres"]


pytestmark = pytest.mark.usefixtures("emulator_credentials")


def test_the_emulator_refuses_an_order_that_arrives_after_its_receive_window(
    remote: RemoteEmulator, tmp_path: Path
) -> None:
    """Why the settle window is honest: an order still on its way after recvWindow can never trade, so once
    the executor waited that long (from ccxt's recvWindow option), an order the exchange does not know is final."""
    remote.reset()
    exchange = open_exchange(load_config(write_config(tmp_path, "p", emulator_exchange(remote.base_url))))
    assert exchange.settle_window == 2.0  # recvWindow 1000 ms, plus a second for clocks and transit
    exchange.close()
    client = binance_client(remote.base_url, recvWindow=1000)
    client.load_markets()
    remote.faults.latency(1200, endpoint="/api/v3/order", method="POST", count=1)
    with pytest.raises(ccxt.BaseError, match="recvWindow"):
        client.create_order("BTC/USDC", "market", "sell", "0.01", None, {"clientOrderId": "late-1"})
    remote.faults.latency(600, endpoint="/api/v3/order", method="POST", count=1)
    client.create_order("BTC/USDC", "market", "sell", "0.01", None, {"clientOrderId": "in-time-1"})
    assert set(order_counts(remote.stats())) == {"in-time-1"}
    remote.reset()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("failpoint", FAILPOINTS)
def test_killed_at_each_step_the_next_run_finishes_without_trading_twice(
    remote: RemoteEmulator,
    tmp_path: Path,
    unique_id: str,
    failpoint: str,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    remote.reset()
    urls = {}
    if backend != "sqlite":
        urls = stores(backend, request.getfixturevalue("redis_url"), request.getfixturevalue("migrated"))
    config = write_config(tmp_path, unique_id, emulator_exchange(remote.base_url), **urls)
    if failpoint.startswith("during_send"):
        remote.faults.latency(ORDER_LATENCY_MS, endpoint="/api/v3/order", method="POST", count=1)

    killed = cli("execute", "--config", str(config), "--confirm", "--json", env={"REBALANCE_FAILPOINT": failpoint})
    assert killed.returncode == -9, f"expected death by SIGKILL at {failpoint}: {killed.returncode} {killed.stderr}"
    sent_before_death = set(order_counts(remote.stats()))

    rerun = cli("execute", "--config", str(config), "--confirm", "--json")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    report = json.loads(rerun.stdout)
    recovered = {o["idempotency_key"]: o["status"] for o in report["recovered"]}
    assert len(recovered) == 1  # the first order of the killed run, whatever became of it
    if failpoint in ("after_intent", "after_lock"):
        assert list(recovered.values()) == ["cancelled"] and not sent_before_death  # it never left
    else:
        assert list(recovered.values()) == ["filled"]  # found on the exchange by its key, booked once
    if failpoint.startswith("during_send"):
        assert not sent_before_death  # the process died while its order was still on the way
    if failpoint in ("after_answer", "before_commit"):
        assert set(recovered) == sent_before_death
    assert report["status"] == "done"

    stats = remote.stats()
    counts = order_counts(stats)
    print(f"\n[{backend}] killed at {failpoint}: orders per idempotency key on the exchange")
    for key, c in counts.items():
        origin = "killed run, recovered" if key in recovered else "second run"
        print(f"  {key}  accepted={c['accepted']} filled={c['filled']} rejected={c['rejected']}  ({origin})")
    assert_each_key_filled_at_most_once(stats)
    assert stats["requests"].get("POST /api/v3/order", 0) == len(counts)  # no key was ever sent twice
    assert len(counts) == 2  # the sell and the buy of the portfolio, each once

    _, plan = make_plan(config)
    assert plan.trades == (), [t.market for t in plan.trades]
    held = assert_books_agree(config, remote.state(), OPENING)
    print(f"  exchange = ledger = audit: {_fmt(held)}")
    assert reconcile(config).consistent


def _fmt(held: dict[str, Decimal]) -> str:
    return ", ".join(f"{a} {format(v, 'f')}" for a, v in held.items())
