"""One contract suite against every registered exchange: its profile (`rebalancer_cli/exchange/profiles`)
driving the real ccxt client against its emulator dialect (`rebalancer_cli/testing`), on both store backends.

An exchange joins by registering a profile in `PROFILES` and a dialect under the same name in `DIALECTS`;
nothing here names an exchange. A profile may claim `execute` in `proven_for` only if this suite passes on it.

Every case is judged by what the emulator saw (orders per client id, calls in order, final balances), not by
our own records: each idempotency key filled at most once, and exchange, shadow ledger and audit agreeing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from exec_helpers import (
    BOOKS,
    OPENING,
    assert_books_agree,
    assert_each_key_filled_at_most_once,
    check_consistent,
    cli,
    cli_killed_once_order_arrives,
    comparable,
    emu_config,
    emulator_credentials,
    once,
    order_counts,
    stores,
    write_snapshot,
)

from rebalancer_cli.config import load_config
from rebalancer_cli.exchange.profiles import PROFILES, ExchangeProfile
from rebalancer_cli.runtime import execute, make_plan, migrate, reconcile, save_live_snapshot
from rebalancer_cli.testing import DIALECTS
from rebalancer_cli.testing.core import ORDER_ENDPOINT, Emulator
from rebalancer_cli.testing.emulator import start_emulator

D = Decimal
EXCHANGES = sorted(name for name in PROFILES if name in DIALECTS)
BACKENDS = ["sqlite", "redis+postgres"]
FILLED_ONCE = {"accepted": 1, "filled": 1, "rejected": 0, "duplicates": 0}


@dataclasses.dataclass
class Venue:
    """One exchange's emulator, its profile and a portfolio config on it (a sell of BTC, then a buy of ETH)."""

    name: str
    emulator: Emulator
    profile: ExchangeProfile
    config: Path
    env: dict[str, str]

    @property
    def settle_window(self) -> float:
        return self.profile.settle_window(load_config(self.config).exchange.options)


@pytest.fixture(params=EXCHANGES)
def exchange(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture()
def venue(
    exchange: str,
    backend: str,
    tmp_path: Path,
    unique_id: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Iterator[Venue]:
    env = emulator_credentials(exchange)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    urls = {}
    if backend != "sqlite":
        urls = stores(backend, request.getfixturevalue("redis_url"), request.getfixturevalue("database_url"))
    with start_emulator(write_snapshot(tmp_path / "exchange.json"), exchange=exchange) as emu:
        config = emu_config(tmp_path, emu, unique_id, **urls)
        if backend != "sqlite":
            migrate(config)
        yield Venue(exchange, emu, PROFILES[exchange], config, env)


def calls_between(log: list[str], first: str, then: str) -> list[list[str]]:
    """The named calls between each `first` and the next `then` of the emulator's call log."""
    out: list[list[str]] = []
    for i, name in enumerate(log):
        if name == first:
            rest = log[i + 1 :]
            out.append(rest[: rest.index(then)] if then in rest else rest)
    return out


def assert_at_target(v: Venue) -> None:
    """Nothing left to do, and the three books agree with what the exchange holds."""
    _, again = make_plan(v.config)
    assert again.trades == (), [t.market for t in again.trades]
    assert_books_agree(v.config, v.emulator.state(), OPENING)
    assert reconcile(v.config).consistent


# --- the cases ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"])  # planning touches no store
def test_plan_from_the_live_exchange_equals_plan_from_its_saved_snapshot(venue: Venue, tmp_path: Path) -> None:
    saved = tmp_path / "saved.yaml"
    save_live_snapshot(venue.config, saved)
    _, live = make_plan(venue.config)
    _, replay = make_plan(venue.config, snapshot_path=saved)
    assert [t.market for t in live.trades] == ["BTC/USDC", "ETH/USDC"]  # the comparison has substance
    assert comparable(json.dumps(replay.to_dict())) == comparable(json.dumps(live.to_dict()))
    assert venue.emulator.stats()["orders"] == {}


def test_execute_reaches_the_target_in_one_run(venue: Venue) -> None:
    report = execute(venue.config)
    assert report.status == "done", [(o.symbol, o.status, o.reason) for o in report.outcomes]
    counts = order_counts(venue.emulator.stats())
    assert len(counts) == 2 and all(c == FILLED_ONCE for c in counts.values()), counts
    check_consistent(venue.config, venue.emulator, report)
    assert_at_target(venue)


def test_an_answer_dropped_after_the_fill_is_recovered_and_filled_once(venue: Venue) -> None:
    venue.emulator.faults.timeout_after_accept(mode="drop")
    report = execute(venue.config)
    assert report.status == "done"
    stats = venue.emulator.stats()
    assert stats["timeouts_after_accept"] == 1
    counts = order_counts(stats)
    assert len(counts) == 2 and all(c == FILLED_ONCE for c in counts.values()), counts
    assert stats["calls"]["create_order"] == 2  # looked up, found filled: never sent again
    assert "fetch_order" in calls_between(stats["call_log"], "create_order", "create_order")[0]
    check_consistent(venue.config, venue.emulator, report)
    assert_at_target(venue)


def test_killed_with_an_order_in_flight_the_next_run_settles_it_after_the_acceptance_window(venue: Venue) -> None:
    """SIGKILL while the order is on its way (the exchange holds it back, still inside its acceptance window):
    the next run must not take "unknown to the exchange" for "never sent" before that window passed."""
    latency_ms = int(min(800.0, 400 * venue.settle_window))  # well inside the window: the exchange executes it
    venue.emulator.faults.latency(latency_ms, endpoint=ORDER_ENDPOINT, method="POST", count=1)
    killed = cli_killed_once_order_arrives(
        venue.emulator, "execute", "--config", str(venue.config), "--confirm", "--json", env=venue.env
    )
    assert killed.returncode == -9, f"expected death by SIGKILL: {killed.returncode} {killed.stderr}"
    assert not order_counts(venue.emulator.stats())  # dead while its order was still held back

    rerun = cli("execute", "--config", str(venue.config), "--confirm", "--json", env=venue.env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    report = json.loads(rerun.stdout)
    stats = venue.emulator.stats()
    counts = order_counts(stats)
    [(killed_key, killed_status)] = [(o["idempotency_key"], o["status"]) for o in report["recovered"]]
    # it did trade, late, and was booked once; unless the exchange itself refused it when it finally arrived
    # (Kraken: past its AddOrder deadline, or behind a newer nonce of the rerun's first private call), and then
    # it is cancelled: the exchange never accepted it
    accepted = counts.get(venue.profile.client_order_id(killed_key), {}).get("accepted", 0)
    refused = not accepted
    assert killed_status == ("cancelled" if refused else "filled"), (killed_status, counts)
    assert report["status"] == "done"
    filled = {k: c for k, c in counts.items() if c["filled"]}
    assert len(filled) == 2 and all(c == FILLED_ONCE for c in filled.values()), counts
    # no key was ever sent twice: the killed run's order once, then the rerun's own (two, when it was refused)
    assert stats["calls"]["create_order"] == (3 if refused else 2)
    assert_at_target(venue)


@pytest.mark.parametrize("where", ["read", "order"])
def test_a_429_with_retry_after_is_honoured(venue: Venue, where: str) -> None:
    if where == "read":
        venue.emulator.faults.too_many_requests(retry_after=1, method="GET")
    else:
        venue.emulator.faults.too_many_requests(retry_after=1, endpoint=ORDER_ENDPOINT, method="POST")
    report = execute(venue.config)
    assert report.status == "done", [(o.symbol, o.status, o.reason) for o in report.outcomes]
    stats = venue.emulator.stats()
    assert stats["rate_limited_429"] == 1
    assert stats["requests_during_retry_after"] == 0  # nothing at all was sent before Retry-After passed
    assert_each_key_filled_at_most_once(stats)
    check_consistent(venue.config, venue.emulator, report)
    assert_at_target(venue)


def test_a_client_order_id_already_in_use_is_looked_up_never_traded_twice(venue: Venue, tmp_path: Path) -> None:
    """Another client of the account holds an open order under the key of our first trade (a saved plan fixes
    the keys in advance): the exchange refuses ours as a duplicate, and the run settles the order it finds."""
    _, plan = make_plan(venue.config)
    saved = tmp_path / "plan.json"
    saved.write_text(json.dumps(plan.to_dict()))
    sell = plan.trades[0]
    assert sell.side == "sell"
    far = D(BOOKS[sell.market]["asks"][0][0]) * 2  # rests: nowhere near the book
    venue.emulator.rest_order(
        sell.market, "sell", sell.amount, far, venue.profile.client_order_id(sell.idempotency_key)
    )

    first = execute(venue.config, saved_plan=saved)
    counts = order_counts(venue.emulator.stats())
    assert counts[venue.profile.client_order_id(sell.idempotency_key)] == {
        "accepted": 1,  # the other client's order, never a second one
        "filled": 0,
        "rejected": 0,
        "duplicates": 1,  # ours, refused
    }
    log = venue.emulator.stats()["call_log"]
    refused = log.index("create_order")
    assert "fetch_order" in log[refused : log.index("cancel_order")]  # looked up before anything else
    assert not venue.emulator.state()["open_orders"]  # the order under our key was settled (cancelled)
    assert first.outcomes[0].filled == 0

    second = execute(venue.config)
    assert second.status == "done", [(o.symbol, o.status, o.reason) for o in second.outcomes]
    assert_each_key_filled_at_most_once(venue.emulator.stats())
    assert_at_target(venue)


def test_an_ioc_order_that_fills_partly_records_the_rest_exits_4_and_the_next_run_replans(venue: Venue) -> None:
    book = BOOKS["BTC/USDC"]
    thin = once(venue.emulator, "locked", "BTC", lambda: venue.emulator.set_book("BTC/USDC", [["64995", "0.2"]], []))
    report = execute(venue.config, listener=thin)
    assert report.status == "incomplete" and report.exit_code == 4
    sell = report.outcomes[0]
    assert sell.status == "partial" and sell.filled == D("0.2") < sell.amount
    counts = order_counts(venue.emulator.stats())
    assert counts[venue.profile.client_order_id(sell.key)] == {
        "accepted": 1,
        "filled": 0,  # expired with the rest unfilled: an IOC never rests
        "rejected": 0,
        "duplicates": 0,
    }
    assert not venue.emulator.state()["open_orders"]
    check_consistent(venue.config, venue.emulator, report)

    venue.emulator.set_book("BTC/USDC", book["bids"], book["asks"])  # depth is back
    again = execute(venue.config)
    assert again.status == "done", [(o.symbol, o.status, o.reason) for o in again.outcomes]
    assert {o.key for o in again.outcomes}.isdisjoint(o.key for o in report.outcomes)  # new plan, new keys
    assert_each_key_filled_at_most_once(venue.emulator.stats())
    assert_at_target(venue)


def test_a_transient_5xx_on_a_read_is_retried(venue: Venue) -> None:
    venue.emulator.faults.http_5xx(1, method="GET", body="exchange")  # the exchange's own internal error
    report = execute(venue.config)
    assert report.status == "done", [(o.symbol, o.status, o.reason) for o in report.outcomes]
    assert venue.emulator.stats()["http_5xx"] == 1
    check_consistent(venue.config, venue.emulator, report)
    assert_at_target(venue)


@pytest.mark.parametrize("body", ["gateway", "exchange"])
def test_a_transient_5xx_on_an_order_is_looked_up_never_blindly_resent(venue: Venue, body: str) -> None:
    venue.emulator.faults.http_5xx(1, endpoint=ORDER_ENDPOINT, method="POST", body=body)
    report = execute(venue.config)
    assert report.status == "done", [(o.symbol, o.status, o.reason) for o in report.outcomes]
    stats = venue.emulator.stats()
    assert stats["http_5xx"] == 1
    counts = order_counts(stats)
    assert len(counts) == 2 and all(c == FILLED_ONCE for c in counts.values()), counts
    assert stats["calls"]["create_order"] == 3  # the sell twice under one key, the buy once
    between = calls_between(stats["call_log"], "create_order", "create_order")[0]
    assert between.count("fetch_order") >= 2  # looked up, and again after the acceptance window, then re-sent
    check_consistent(venue.config, venue.emulator, report)
    assert_at_target(venue)


def test_every_registered_exchange_is_in_this_suite() -> None:
    proven = sorted(name for name, p in PROFILES.items() if "execute" in p.proven_for)
    assert set(proven) <= set(EXCHANGES), "a profile claims execute without an emulator to prove it on"
