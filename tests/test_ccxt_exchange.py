"""The ccxt adapter, driven through the real `ccxt.binance` client against the loopback emulator (no mocks).

What a user relies on: `plan` against an exchange decides exactly as `plan --snapshot` on the same picture;
an idle check costs at most 3 API calls; each failure is reported with the right error and exit code after
the right number of attempts; the rate limiter keeps a burst under the exchange's limit; the breaker opens
and recovers; an order whose answer was lost is found by its client order id; money stays Decimal; and
credentials never appear in any output or file.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from decimal import Decimal
from pathlib import Path
from typing import Any

import ccxt
import pytest
import typer
import yaml
from conftest import EXAMPLES, ROOT
from exec_helpers import comparable

from rebalancer_cli.cli import app, main
from rebalancer_cli.config import load_config
from rebalancer_cli.errors import (
    CircuitOpenError,
    CredentialsError,
    ExchangeAuthError,
    ExchangeError,
    ExchangeNetworkError,
    ExchangeTimeoutError,
    ExchangeUnavailableError,
    InsufficientFundsError,
    InvalidOrderError,
    RateLimitedError,
)
from rebalancer_cli.exchange.base import Side
from rebalancer_cli.exchange.breaker import BreakerState, CircuitBreaker
from rebalancer_cli.exchange.ccxt_exchange import CcxtExchange, _max_cost
from rebalancer_cli.exchange.ratelimit import bucket_for_exchange
from rebalancer_cli.exchange.retry import RetryPolicy
from rebalancer_cli.runtime import make_plan
from rebalancer_cli.snapshot import load_snapshot
from rebalancer_cli.testing.emulator import Emulator, start_emulator

D = Decimal
# Known fake credentials: the emulator accepts exactly these; the leak test searches everything for them.
KEY = "rbtestKEY7f3a9c21d4e8b6057aa1c9e3f2d8b4a6c0e7f1d3b5a9c2e4f6a8b0d2"
SECRET = "rbtestSECRET5e2c8a4f6b1d3e9a7c5b2f8d4e6a1c3b9f7d5e2a8c4b6f0e1d3a5"
WRONG_KEY = "rbtestWRONGKEY0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5"
KEY_ENV, SECRET_ENV = "RB_TEST_BINANCE_KEY", "RB_TEST_BINANCE_SECRET"

ACCOUNT = "GET /api/v3/account"
BOOK_TICKER = "GET /api/v3/ticker/bookTicker"
DEPTH = "GET /api/v3/depth"
NEW_ORDER = "POST /api/v3/order"

# Balances against the treasury targets BTC 0.4 / ETH 0.3 / USDC 0.3 at mids 65000 and 3400:
BUSY = {"BTC": "1.5", "ETH": "20", "USDC": "30000"}  # BTC past its hard band, ETH far over: both trade
IDLE = {"BTC": "0.6", "ETH": "8.6", "USDC": "29260"}  # drifts of 0.0001 at most: nothing to do
BTC_ONLY = {"BTC": "1", "ETH": "12", "USDC": "30200"}  # BTC past its hard band, ETH exactly on target


def write_snapshot(path: Path, balances: dict[str, str]) -> Path:
    doc = yaml.safe_load((EXAMPLES / "market.yaml").read_text())
    doc["balances"] = balances
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def write_config(
    path: Path, emu: Emulator, *, exchange: str = "", key_env: str = KEY_ENV, portfolio: str = "ccxt-test"
) -> Path:
    """The treasury example (hysteresis, cooldown) on the emulator; `exchange` adds keys to its block."""
    extra = "".join(f"\n  {line}" for line in exchange.strip().splitlines())
    path.write_text(
        f"""portfolio_id: {portfolio}
base_threshold: 0.001
volatility_factor: 0.5
safety_margin: 1.5
max_trades_per_cycle: 10
policy: cost-adjusted  # its trades go to target whatever the (emulator's candle-based) volatility
hysteresis: 0.2
cooldown: 15m
assets:
  - {{symbol: BTC, target_weight: 0.4, max_deviation: 0.05}}
  - {{symbol: ETH, target_weight: 0.3, max_deviation: 0.05}}
  - {{symbol: USDC, target_weight: 0.3, max_deviation: 0.02}}
exchange:
  id: binance
  api_url: {emu.base_url}
  credentials_env: {{apiKey: {key_env}, secret: {SECRET_ENV}}}{extra}
"""
    )
    return path


@pytest.fixture()
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv(SECRET_ENV, SECRET)


def emulator_for(tmp_path: Path, balances: dict[str, str], **kw: Any) -> Emulator:
    return start_emulator(write_snapshot(tmp_path / "market.yaml", balances), api_key=KEY, secret=SECRET, **kw)


@pytest.fixture()
def busy(tmp_path: Path, state_dir: Path, creds: None) -> Iterator[Emulator]:
    with emulator_for(tmp_path, BUSY) as emu:
        yield emu


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """The real entry point, in process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in args])
    out = capsys.readouterr()
    code = done.value.code
    return (code if isinstance(code, int) else 0), out.out, out.err


def requests(emu: Emulator) -> dict[str, int]:
    return dict(emu.stats()["requests"])


# --- plan through ccxt ------------------------------------------------------------------------------


def test_plan_from_the_exchange_equals_plan_from_the_same_snapshot_file(
    busy: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "p.yaml", busy)
    code, live, _ = cli(capsys, "plan", "--config", cfg, "--json")
    assert code == 0
    code, cached, _ = cli(capsys, "plan", "--config", cfg, "--json")  # markets, fees, volatility from cache
    assert code == 0
    code, offline, _ = cli(capsys, "plan", "--config", cfg, "--snapshot", tmp_path / "market.yaml", "--json")
    assert code == 0

    from_file = comparable(offline, threshold=False)
    assert [t["market"] for t in from_file["trades"]] == ["BTC/USDC", "ETH/USDC"]  # the comparison has substance
    assert comparable(live, threshold=False) == from_file  # decisions, amounts, prices, fees, slippage, costs
    assert comparable(cached, threshold=False) == from_file
    # The threshold widens with volatility, which the exchange gives only as daily candles: the emulator
    # synthesises them around the file's volatility (within a few percent), so thresholds agree closely.
    for a, b in zip(json.loads(live)["assets"], json.loads(offline)["assets"], strict=True):
        assert abs(D(a["threshold"]) - D(b["threshold"])) <= D("0.000001")


def test_an_idle_check_costs_two_calls_once_markets_fees_and_volatility_are_cached(
    tmp_path: Path, state_dir: Path, creds: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with emulator_for(tmp_path, IDLE) as emu:
        cfg = write_config(tmp_path / "p.yaml", emu)
        code, out, _ = cli(capsys, "plan", "--config", cfg, "--json")
        assert code == 0 and json.loads(out)["trades"] == []
        first = requests(emu)
        assert first["GET /api/v3/exchangeInfo"] == 1 and DEPTH not in first

        emu.reset()
        code, out, _ = cli(capsys, "plan", "--config", cfg, "--json", "--detailed-exitcode")
        assert code == 0 and json.loads(out)["trades"] == []
        assert requests(emu) == {ACCOUNT: 1, BOOK_TICKER: 1}  # balances + every bid/ask: 2 calls, goal <= 3


def test_order_books_are_read_only_for_assets_that_pass_the_screen(
    tmp_path: Path, state_dir: Path, creds: None
) -> None:
    with emulator_for(tmp_path, BTC_ONLY) as emu:
        config = load_config(write_config(tmp_path / "p.yaml", emu))
        exchange = CcxtExchange.from_config(config)
        try:
            snap = exchange.fetch_snapshot(config)
        finally:
            exchange.close()
        assert requests(emu)[DEPTH] == 1
        assert len(snap.markets["BTC/USDC"].bids) == 12  # the drifted asset: its full book
        assert len(snap.markets["ETH/USDC"].bids) == 1  # on target: top of book is all the plan needs


# --- faults: error class, attempts, exit code ---------------------------------------------------------


def _latency(emu: Emulator) -> None:
    emu.faults.latency(1000, endpoint="/api/v3/account")  # timeout is 200ms


def _http_503(emu: Emulator) -> None:
    emu.faults.http_5xx(None, status=503, endpoint="/api/v3/account")


def _dropped(emu: Emulator) -> None:
    emu.faults.drop_connection(None, endpoint="/api/v3/account")


@pytest.mark.parametrize(
    ("arm", "error", "attempts"),
    [
        (_latency, ExchangeTimeoutError, 5),
        (_http_503, ExchangeUnavailableError, 5),
        (_dropped, ExchangeNetworkError, 5),
    ],
    ids=["latency-beyond-timeout", "http-503", "dropped-connection"],
)
def test_an_unreachable_exchange_is_retried_then_exits_3(
    busy: Emulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arm: Callable[[Emulator], None],
    error: type[ExchangeError],
    attempts: int,
) -> None:
    cfg = write_config(tmp_path / "p.yaml", busy, exchange="timeout: 200ms")
    arm(busy)
    with pytest.raises(error) as raised:
        make_plan(cfg)
    assert raised.value.exit_code == 3
    assert requests(busy)[ACCOUNT] == attempts  # RetryPolicy's default, counted where the requests arrive

    busy.reset()
    arm(busy)
    code, out, err = cli(capsys, "plan", "--config", cfg)
    assert (code, out) == (3, "")
    assert len(err.splitlines()) == 1 and err.startswith("error: binance: ")
    assert requests(busy)[ACCOUNT] == attempts


def test_refused_credentials_are_not_retried_and_exit_2(
    busy: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, WRONG_KEY)
    cfg = write_config(tmp_path / "p.yaml", busy)
    with pytest.raises(ExchangeAuthError):
        make_plan(cfg)
    assert requests(busy)[ACCOUNT] == 1
    code, out, err = cli(capsys, "plan", "--config", cfg)
    assert (code, out) == (2, "")
    assert "Invalid API-key" in err and len(err.splitlines()) == 1
    assert requests(busy)[ACCOUNT] == 2


def test_missing_credentials_exit_2_before_any_request(
    busy: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV)
    cfg = write_config(tmp_path / "p.yaml", busy)
    with pytest.raises(CredentialsError):
        make_plan(cfg)
    code, _, err = cli(capsys, "plan", "--config", cfg)
    assert code == 2 and err == f"error: credential apiKey is missing: environment variable {KEY_ENV} is not set\n"
    no_secret = tmp_path / "q.yaml"
    no_secret.write_text(cfg.read_text().replace(f", secret: {SECRET_ENV}", ""))
    monkeypatch.setenv(KEY_ENV, KEY)
    code, _, err = cli(capsys, "plan", "--config", no_secret)
    assert code == 2 and "needs the credential(s) secret" in err
    assert emu_total(busy) == 0


def emu_total(emu: Emulator) -> int:
    return int(emu.stats()["requests_total"])


def test_a_key_revoked_mid_session_is_an_auth_error_not_a_rate_limit(busy: Emulator, tmp_path: Path) -> None:
    """ccxt reads Binance's -2015 as DDoSProtection once the same client has made a private call."""
    exchange = CcxtExchange.from_config(load_config(write_config(tmp_path / "p.yaml", busy)))
    try:
        exchange.fetch_balances()
        busy.faults.reject_auth(code=-2015, endpoint="/api/v3/account")
        with pytest.raises(ExchangeAuthError):
            exchange.fetch_balances()
    finally:
        exchange.close()
    assert requests(busy)[ACCOUNT] == 2  # refused once, not retried as a rate limit


def test_a_429_past_the_weight_limit_is_reported_with_retry_after_and_exits_3(
    busy: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "p.yaml", busy)
    # exchangeInfo (20) and two klines (2 each) fit; the account read (20) does not: 429, Retry-After up to 60 s
    busy.faults.rate_limit(30)
    with pytest.raises(RateLimitedError) as raised:
        make_plan(cfg)
    assert raised.value.retry_after is not None and 1 <= raised.value.retry_after <= 60
    # a wait longer than the retry budget (20 s) is not slept through: one attempt, then the error
    assert requests(busy)[ACCOUNT] == 1 and busy.stats()["rate_limited_429"] == 1

    code, out, err = cli(capsys, "plan", "--config", cfg)
    assert (code, out) == (3, "") and "DDoSProtection" in err
    assert busy.stats()["banned_418"] == 0


def test_a_short_retry_after_is_waited_out_and_the_call_then_succeeds(
    tmp_path: Path, state_dir: Path, creds: None
) -> None:
    with emulator_for(tmp_path, BUSY, weight_window=1.0, weight_limit=45) as emu:
        exchange = CcxtExchange.from_config(load_config(write_config(tmp_path / "p.yaml", emu)))
        try:
            exchange.fetch_balances()  # markets (weight 20) + account (20): 40 of 45 in this 1 s window
            free, _ = exchange.fetch_balances()  # 429 with Retry-After: 1; waited out, then served
        finally:
            exchange.close()
    stats = emu.stats()
    assert free["BTC"] == D("1.5")
    assert stats["requests"][ACCOUNT] == 3 and stats["rate_limited_429"] == 1 and stats["banned_418"] == 0


# --- orders ---------------------------------------------------------------------------------------------


def _assert_decimals(obj: Any) -> None:
    """Every money field of a dataclass is a Decimal (or None where optional), recursively through books."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float):
            pytest.fail(f"{type(obj).__name__}.{f.name} is a float: {value!r}")
        if f.name in ("bids", "asks", "fills"):
            for item in value:
                if isinstance(item, tuple):
                    assert all(type(x) is Decimal for x in item), (f.name, item)
                else:
                    _assert_decimals(item)
        elif f.name == "fees":
            assert all(type(v) is Decimal for v in value.values())
        elif f.name in ("amount", "filled", "cost", "price", "fee", "taker_fee", "amount_step", "min_notional", "mid"):
            assert type(value) is Decimal, (f.name, value)
        elif f.name in ("average", "volatility"):
            assert value is None or type(value) is Decimal, (f.name, value)


def test_a_market_order_lost_in_a_timeout_is_found_filled_by_its_client_order_id(
    busy: Emulator, tmp_path: Path
) -> None:
    config = load_config(write_config(tmp_path / "p.yaml", busy, exchange="timeout: 300ms"))
    exchange = CcxtExchange.from_config(config)
    try:
        snap = exchange.fetch_snapshot(config)
        assert all(type(v) is Decimal for v in [*snap.balances.values(), *snap.locked.values()])
        for market in snap.markets.values():
            _assert_decimals(market)

        placed = exchange.create_order("BTC/USDC", Side.BUY, D("0.01"), "rb-test-order-1", worst_price=D("70000"))
        assert (placed.status, placed.filled, placed.client_order_id) == ("closed", D("0.01"), "rb-test-order-1")
        _assert_decimals(placed)

        busy.faults.timeout_after_accept(hang_seconds=2)  # the exchange fills it, the answer never comes
        with pytest.raises(ExchangeTimeoutError):
            exchange.create_order("BTC/USDC", Side.SELL, D("0.02"), "rb-test-order-2", worst_price=D("60000"))
        found = exchange.fetch_order("BTC/USDC", "rb-test-order-2")
        assert exchange.fetch_order("BTC/USDC", "rb-test-never-sent") is None
    finally:
        exchange.close()
    assert found is not None
    _assert_decimals(found)
    assert (found.status, found.side, found.amount, found.filled) == ("closed", "sell", D("0.02"), D("0.02"))
    assert found.fills and sum((f.amount for f in found.fills), D(0)) == D("0.02")
    assert found.fees == {"USDC": sum((f.fee for f in found.fills), D(0))}
    stats = busy.stats()
    assert stats["orders"]["rb-test-order-2"]["accepted"] == 1  # placed once: never resent after the timeout
    assert stats["requests"][NEW_ORDER] == 2


def _insufficient(emu: Emulator) -> None:
    emu.faults.insufficient_balance()


def _lot_size(emu: Emulator) -> None:
    emu.faults.filter_failure("LOT_SIZE")


def _notional(emu: Emulator) -> None:
    emu.faults.filter_failure("NOTIONAL")


@pytest.mark.parametrize(
    ("arm", "error"),
    [(_insufficient, InsufficientFundsError), (_lot_size, InvalidOrderError), (_notional, InvalidOrderError)],
    ids=["insufficient-balance", "filter-LOT_SIZE", "filter-NOTIONAL"],
)
def test_an_order_refused_on_its_merits_is_sent_once_and_execute_exits_4(
    busy: Emulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arm: Callable[[Emulator], None],
    error: type[ExchangeError],
) -> None:
    cfg = write_config(tmp_path / "p.yaml", busy)
    exchange = CcxtExchange.from_config(load_config(cfg))
    arm(busy)
    try:
        with pytest.raises(error):
            exchange.create_order("BTC/USDC", Side.SELL, D("0.1"), "rb-test-refused", worst_price=D("60000"))
    finally:
        exchange.close()
    assert requests(busy)[NEW_ORDER] == 1 and busy.stats()["orders_accepted"] == 0

    busy.reset()
    arm(busy)  # the first order of `execute` is refused; the run reports it and goes on
    code, _, _ = cli(capsys, "execute", "--config", cfg, "--confirm", "--json")
    assert code == 4


def test_a_real_notional_failure_arrives_as_bad_request_and_is_an_invalid_order(busy: Emulator, tmp_path: Path) -> None:
    exchange = CcxtExchange.from_config(load_config(write_config(tmp_path / "p.yaml", busy)))
    try:
        with pytest.raises(InvalidOrderError, match=r"BadRequest.*NOTIONAL"):
            exchange.create_order(
                "BTC/USDC", Side.BUY, D("0.00001"), "rb-test-tiny", worst_price=D("100000")
            )  # 0.65 USDC < 5
    finally:
        exchange.close()


# --- rate limiter and circuit breaker ------------------------------------------------------------------


def test_a_burst_of_500_calls_stays_under_the_exchange_weight_limit(
    tmp_path: Path, state_dir: Path, creds: None
) -> None:
    # Units. Binance counts request WEIGHT per minute (6000 on spot; the account read weighs 20). ccxt
    # counts COST units with binance.rateLimit = 50 ms, i.e. 1200 units a minute, so 1 unit = 5 weight (the
    # account read costs 4). `exchange.rate_limit_per_minute` is in ccxt units; the emulator's weight_limit
    # in weight: a consistent pair is weight_limit = 5 * rate_limit_per_minute.
    # Time. A real minute would make the test last minutes, so the emulator's window is one second and the
    # bucket runs on a clock 60 times faster: its "minute" is the emulator's window.
    units = 700  # per window; the bucket refills 80% of it and bursts the other 20% (140 >= heaviest 50)
    weight_limit = 5 * units + 20  # + one account read: a call granted just before a window may land in it
    speedup = 60.0
    with emulator_for(tmp_path, BUSY, weight_window=1.0, weight_limit=weight_limit) as emu:
        config = load_config(write_config(tmp_path / "p.yaml", emu, exchange=f"rate_limit_per_minute: {units}"))
        per_minute = float(config.exchange.rate_limit_per_minute or 0)
        limiter = bucket_for_exchange(
            per_minute,
            max_cost=_max_cost(ccxt.binance()),
            clock=lambda: time.monotonic() * speedup,
            sleep=lambda s: time.sleep(s / speedup),
        )
        exchange = CcxtExchange.from_config(config, limiter=limiter)
        try:
            for _ in range(500):  # 500 account reads: 2000 units, 10000 weight, ~3 windows' worth
                exchange.fetch_balances()
        finally:
            exchange.close()
        stats = emu.stats()
    assert stats["requests"][ACCOUNT] == 500
    # Nearly three windows' worth of weight, which ccxt alone sends in about a second (2-3 ms a call here):
    # it got through without a single 429 (the emulator answers 429 past its limit, tests/test_emulator.py)
    # only because our bucket paced it.
    assert stats["weight_total"] > 2.5 * weight_limit
    assert stats["rate_limited_429"] == 0 and stats["banned_418"] == 0


def test_the_breaker_opens_after_consecutive_failures_and_recovers_after_its_pause(
    busy: Emulator, tmp_path: Path
) -> None:
    breaker = CircuitBreaker("binance", failure_threshold=3, reset_timeout=0.3)
    config = load_config(write_config(tmp_path / "p.yaml", busy))
    exchange = CcxtExchange.from_config(config, breaker=breaker, retry=RetryPolicy(attempts=1))
    try:
        busy.faults.http_5xx(None, endpoint="/api/v3/account")
        for _ in range(3):
            with pytest.raises(ExchangeUnavailableError):
                exchange.fetch_balances()
        assert breaker.state is BreakerState.OPEN
        with pytest.raises(CircuitOpenError):
            exchange.fetch_balances()
        assert requests(busy)[ACCOUNT] == 3  # the open circuit did not call the exchange

        busy.faults.clear()
        time.sleep(0.35)
        free, _ = exchange.fetch_balances()  # the half-open trial succeeds and closes the circuit
    finally:
        exchange.close()
    assert free["ETH"] == D("20") and breaker.state is BreakerState.CLOSED
    assert requests(busy)[ACCOUNT] == 4


# --- snapshot command, replay and skew -----------------------------------------------------------------


def test_a_saved_snapshot_has_every_book_and_replays_the_live_decision(
    tmp_path: Path, state_dir: Path, creds: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with emulator_for(tmp_path, BTC_ONLY) as emu:
        cfg = write_config(tmp_path / "p.yaml", emu)
        saved = tmp_path / "out" / "incident.yaml"
        code, out, _ = cli(capsys, "snapshot", "--config", cfg, "-o", saved)
        assert code == 0 and str(saved) in out
        assert requests(emu)[DEPTH] == 2  # every market's book, not only the screened one

        emu.reset()
        code, live, _ = cli(capsys, "plan", "--config", cfg, "--json")
        assert code == 0 and requests(emu)[DEPTH] == 1
    snap = load_snapshot(saved)
    assert {m: len(snap.markets[m].asks) for m in snap.markets} == {"BTC/USDC": 12, "ETH/USDC": 12}
    assert snap.markets["BTC/USDC"].fee_source == "account" and snap.markets["BTC/USDC"].volatility is not None
    code, replay, _ = cli(capsys, "plan", "--config", cfg, "--snapshot", saved, "--json")
    assert code == 0
    assert [t["market"] for t in json.loads(live)["trades"]] == ["BTC/USDC"]
    assert comparable(replay) == comparable(live)  # thresholds included: volatility is saved too


def test_plan_refuses_a_snapshot_whose_parts_are_too_far_apart(
    busy: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "p.yaml", busy, exchange="max_snapshot_skew: 300ms")
    code, _, _ = cli(capsys, "plan", "--config", cfg)
    assert code == 0  # the same exchange, answering promptly, is consistent enough
    busy.faults.latency(500, endpoint="/api/v3/ticker/bookTicker")  # balances, then bid/asks 0.5 s later
    code, out, err = cli(capsys, "plan", "--config", cfg)
    assert (code, out) == (5, "")
    assert "max_snapshot_skew" in err and len(err.splitlines()) == 1


# --- credentials never leak -----------------------------------------------------------------------------


def test_ccxt_debug_logging_never_carries_the_credentials(
    busy: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    exchange = CcxtExchange.from_config(load_config(write_config(tmp_path / "p.yaml", busy)))
    try:
        exchange.fetch_balances()
    finally:
        exchange.close()
    assert "/api/v3/account" in caplog.text  # the wire log is there, scrubbed
    assert KEY not in caplog.text and SECRET not in caplog.text


def _commands() -> set[str]:
    """Every runnable command path of the CLI: leaves, and groups that run on their own (`backtest`)."""
    out: set[str] = set()

    def walk(cmd: Any, path: str) -> None:
        subs = getattr(cmd, "commands", None) or {}
        if path and (not subs or getattr(cmd, "invoke_without_command", False)):
            out.add(path)
        for name, sub in subs.items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return out


def _command_of(argv: list[object]) -> str:
    return " ".join(str(a) for a in itertools.takewhile(lambda a: isinstance(a, str) and a[:1] != "-", argv))


@pytest.mark.slow  # ~17 CLI processes, each importing ccxt (~1 s of CPU)
def test_no_command_ever_shows_or_writes_the_credentials(tmp_path: Path) -> None:
    """Every command, as a user runs it (a subprocess), with real keys and with refused ones."""
    home = tmp_path / "home"
    state = tmp_path / "state"
    tmp = tmp_path / "tmp"
    for d in (home, state, tmp, tmp_path / "daemon"):
        d.mkdir()
    with emulator_for(tmp_path, BUSY) as emu:
        cfg = write_config(tmp_path / "p.yaml", emu)
        bad = write_config(tmp_path / "bad.yaml", emu, key_env="RB_TEST_WRONG_KEY")
        snap = tmp_path / "saved.yaml"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("REBALANCE_")},
            KEY_ENV: KEY,
            SECRET_ENV: SECRET,
            "RB_TEST_WRONG_KEY": WRONG_KEY,
            "REBALANCE_STATE_DIR": str(state),
            "HOME": str(home),
            "TMPDIR": str(tmp),
        }
        runs: dict[str, list[object]] = {
            "validate-config": ["validate-config", cfg],
            "config-schema": ["config-schema"],
            "snapshot-schema": ["snapshot-schema"],
            "init": ["init", "--config", tmp_path / "init.yaml"],
            "exchanges": ["exchanges", "--json"],
            "plan": ["plan", "--config", cfg],
            "plan --json": ["plan", "--config", cfg, "--json", "--detailed-exitcode"],
            "snapshot": ["snapshot", "--config", cfg, "-o", snap],
            "history": ["history", "--config", cfg, "--json"],
            "db migrate": ["db", "migrate", "--config", cfg],
            "backtest generate": ["backtest", "generate", "--steps", "50", "-o", tmp_path / "prices.csv"],
            "bad key: plan": ["plan", "--config", bad],
            "bad key: execute": ["execute", "--config", bad, "--confirm"],
        }
        later: dict[str, list[object]] = {
            "plan --snapshot": ["plan", "--config", cfg, "--snapshot", snap, "--json"],
            "execute --confirm": ["execute", "--config", cfg, "--confirm"],
            "reconcile": ["reconcile", "--config", cfg],
            "backtest": ["backtest", "--config", cfg, "--prices", tmp_path / "prices.csv", "--json"],
            "halt": ["halt", "--config", cfg, "--reason", "leak test"],
            "resume": ["resume", "--config", cfg],
        }
        daemon = ["daemon", "--config", cfg, "--log-level", "debug", "--log-format", "json"]
        missing = _commands() - {_command_of(argv) for argv in [*runs.values(), *later.values(), daemon]}
        assert not missing, f"add the new command(s) {sorted(missing)} to this leak test"

        def run(argv: list[object]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "rebalancer_cli", *map(str, argv)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        # the daemon runs meanwhile, on an exchange of its own so that its first cycle can be seen
        with emulator_for(tmp_path / "daemon", BUSY) as daemon_emu:
            daemon[2] = write_config(tmp_path / "daemon" / "d.yaml", daemon_emu, portfolio="ccxt-daemon")
            proc = subprocess.Popen(
                [sys.executable, "-m", "rebalancer_cli", *map(str, daemon)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                with ThreadPoolExecutor(3) as pool:
                    results = dict(zip(runs, pool.map(run, runs.values()), strict=True))
                results.update({name: run(argv) for name, argv in later.items()})  # in order: they change state
                deadline = time.monotonic() + 30
                while emu_total(daemon_emu) < 3 and time.monotonic() < deadline and proc.poll() is None:
                    time.sleep(0.1)
                time.sleep(0.3)  # let the cycle finish and log
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    out, err = proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    raise
            results["daemon"] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            assert emu_total(daemon_emu) >= 3, "the daemon never read the exchange"

    codes = {name: r.returncode for name, r in results.items()}
    expected = {name: 2 if name.startswith("bad key") else 10 if name == "plan --json" else 0 for name in codes}
    assert codes == expected, {n: results[n].stderr[-300:] for n in codes if codes[n] != expected[n]}
    assert "Invalid API-key" in results["bad key: plan"].stderr

    leaks = [
        f"{name}: {stream}"
        for name, r in results.items()
        for stream, text in (("stdout", r.stdout), ("stderr", r.stderr))
        if KEY in text or SECRET in text or WRONG_KEY in text
    ]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.parent.parent.name == "cache" for p in written) and snap in written  # caches were searched too
    leaks += [str(p) for p in written if any(s.encode() in p.read_bytes() for s in (KEY, SECRET, WRONG_KEY))]
    assert not leaks


def test_plan_without_store_urls_imports_neither_redis_nor_psycopg(busy: Emulator, tmp_path: Path) -> None:
    """A cron `plan` on the embedded stores starts without the Redis and PostgreSQL clients (~0.15 s)."""
    from test_cli import FAST_START

    cfg = write_config(tmp_path / "p.yaml", busy)
    r = subprocess.run(
        [sys.executable, "-c", FAST_START, "plan", "--config", str(cfg), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    status, heavy = r.stderr.splitlines()[-1].split(" ")
    assert status == "exit=0", r.stderr
    assert {m.split(".")[0] for m in heavy.removeprefix("heavy=").split(",")} == {"ccxt"}  # what it uses, only
    assert [t["market"] for t in json.loads(r.stdout)["trades"]] == ["BTC/USDC", "ETH/USDC"]


def test_ccxt_is_entered_one_exchange_at_a_time_and_whole_for_whoever_needs_it() -> None:
    """A command imports the exchange it talks to, not ccxt's hundred; whoever else in the process uses ccxt
    whole gets the real package (its own `__init__`, run into the same module)."""
    code = (
        "import sys\n"
        "from rebalancer_cli.exchange import ccxt_module\n"
        "binance = ccxt_module.exchange_class('binance')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('ccxt.') and m.count('.') == 1)\n"
        "assert loaded == ['ccxt.abstract', 'ccxt.base', 'ccxt.binance'], loaded\n"
        "assert ccxt_module.exchange_class('nosuch') is None and ccxt_module.exchange_class('base') is None\n"
        "import ccxt\n"
        "assert ccxt.binance is binance and 'kraken' in ccxt.exchanges and ccxt.kraken.__name__ == 'kraken'\n"
        "assert issubclass(ccxt.InvalidOrder, ccxt.BaseError) and ccxt_module.exchange_class('okx') is ccxt.okx\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
