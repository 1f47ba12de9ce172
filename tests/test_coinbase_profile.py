"""The Coinbase Advanced Trade profile through the generic adapter, against the Coinbase emulator.

What a user relies on: orders carry our key as `client_order_id` (not ccxt's own `ccxt-<uuid>`), are found
again by it although Coinbase has no lookup by client id, a resend of a key returns the first order instead
of trading twice, refusals and gateway failures land in the right class (a transient one on an order is an
unknown outcome, never a refusal), and the settle window is the signed request's own lifetime.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import ccxt
import pytest
from exec_helpers import write_config, write_snapshot

from rebalancer_cli.config import load_config
from rebalancer_cli.errors import (
    ExchangeAuthError,
    InputError,
    InvalidOrderError,
    OrderNotFoundError,
    RetryableExchangeError,
    SandboxUnavailableError,
)
from rebalancer_cli.exchange.base import Side
from rebalancer_cli.exchange.ccxt_exchange import CcxtExchange
from rebalancer_cli.exchange.profiles import PROFILES
from rebalancer_cli.ids import new_key
from rebalancer_cli.runtime import open_exchange
from rebalancer_cli.testing.coinbase import DEFAULT_KEY_NAME, DEFAULT_PRIVATE_KEY, order_uuid
from rebalancer_cli.testing.core import Emulator, OrderRequest, start_emulator

D = Decimal
ACCOUNTS = "/api/v3/brokerage/accounts"


@pytest.fixture()
def emu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    monkeypatch.setenv("CB_KEY", DEFAULT_KEY_NAME)
    monkeypatch.setenv("CB_SECRET", DEFAULT_PRIVATE_KEY)
    with start_emulator(write_snapshot(tmp_path / "emulator.json"), exchange="coinbase") as emulator:
        yield emulator


def exchange_on(tmp_path: Path, emu: Emulator, *, sandbox: bool = False, **options: Any) -> CcxtExchange:
    spec = {
        "id": "coinbase",
        "api_url": emu.base_url,
        "credentials_env": {"apiKey": "CB_KEY", "secret": "CB_SECRET"},
        "options": options,
        "sandbox": sandbox,
    }
    exchange = open_exchange(load_config(write_config(tmp_path, "coinbase", spec, quote="USDC")))
    assert isinstance(exchange, CcxtExchange)
    return exchange


def sell(exchange: CcxtExchange, key: str, amount: str = "0.1", price: str = "64000") -> Any:
    return exchange.create_order("BTC/USDC", Side.SELL, D(amount), key, worst_price=D(price))


def test_settle_window_is_the_token_lifetime_plus_the_clock_skew(tmp_path: Path, emu: Emulator) -> None:
    assert PROFILES["coinbase"].settle_window({}) == 122.0  # what ccxt signs: 120 s tokens
    assert exchange_on(tmp_path, emu, jwtLifetime=3).settle_window == 5.0
    with pytest.raises(InputError, match="jwtLifetime"):
        PROFILES["coinbase"].settle_window({"jwtLifetime": 121})


def test_sandbox_is_refused_coinbase_advanced_trade_has_no_testnet(tmp_path: Path, emu: Emulator) -> None:
    with pytest.raises(SandboxUnavailableError, match="coinbase has no testnet"):
        exchange_on(tmp_path, emu, sandbox=True)


def test_a_request_held_past_its_token_lifetime_is_refused_and_one_within_it_accepted(
    tmp_path: Path, emu: Emulator
) -> None:
    exchange = exchange_on(tmp_path, emu, jwtLifetime=2)
    exchange.client.load_markets()
    emu.faults.latency(2500, endpoint=ACCOUNTS, count=1)
    with pytest.raises(ccxt.AuthenticationError):
        exchange.client.fetch_balance()
    emu.faults.latency(500, endpoint=ACCOUNTS, count=1)
    assert exchange.client.fetch_balance()["USDC"]["free"] == "30000"


def test_an_order_carries_the_key_and_is_found_again_by_it_with_its_fills(tmp_path: Path, emu: Emulator) -> None:
    exchange = exchange_on(tmp_path, emu)
    emu.set_book("BTC/USDC", [["64995", "1"], ["64985", "2"]], [["65005", "2"]])
    key = new_key()
    placed = sell(exchange, key, "1.2")
    assert (placed.status, placed.filled, placed.client_order_id) == ("closed", D("1.2"), key)
    assert placed.cost == D("77992")  # Coinbase's filled_value, not filled x its rounded average
    assert emu.stats()["orders"][key]["accepted"] == 1
    found = exchange.fetch_order("BTC/USDC", key)
    assert found is not None and found.exchange_order_id == placed.exchange_order_id
    assert [(f.amount, f.price, f.fee_currency) for f in found.fills] == [
        (D("1"), D("64995"), "USDC"),
        (D("0.2"), D("64985"), "USDC"),
    ]
    assert found.fees == {"USDC": D("77.992")}
    assert exchange.fetch_order("BTC/USDC", new_key()) is None


def test_lookup_pages_through_many_orders_of_the_product(tmp_path: Path, emu: Emulator) -> None:
    exchange = exchange_on(tmp_path, emu)
    first = new_key()
    sell(exchange, first, "0.01")
    market = emu.markets["BTC-USDC"]
    for _ in range(300):  # newer orders of the same product push the first one to the second page
        emu.place(new_key(), OrderRequest(market=market, side="buy", type="limit", amount=D("0.001"), price=D("60000")))
    found = exchange.fetch_order("BTC/USDC", first)
    assert found is not None and found.filled == D("0.01")
    assert emu.stats()["requests"]["GET /api/v3/brokerage/orders/historical/batch"] == 2


def test_a_resent_key_returns_the_first_order_and_trades_nothing_more(tmp_path: Path, emu: Emulator) -> None:
    exchange = exchange_on(tmp_path, emu)
    key = new_key()
    first = sell(exchange, key)
    again = sell(exchange, key, "0.3")
    assert again.exchange_order_id == first.exchange_order_id and again.filled == D("0.1")
    assert emu.stats()["orders"][key] == {"accepted": 1, "filled": 1, "rejected": 0, "duplicates": 1}
    assert emu.free("BTC") == D("1.4")


def test_a_refused_read_back_after_a_create_is_not_a_refusal_of_the_order(tmp_path: Path, emu: Emulator) -> None:
    exchange = exchange_on(tmp_path, emu)
    key = new_key()
    emu.faults.reject_auth(1, code="permission_denied", endpoint=f"/api/v3/brokerage/orders/historical/{order_uuid(1)}")
    placed = sell(exchange, key)
    assert not placed.is_final and placed.exchange_order_id == order_uuid(1)  # settled later, by the key
    found = exchange.fetch_order("BTC/USDC", key)
    assert found is not None and (found.status, found.filled) == ("closed", D("0.1"))


def test_cancel_finds_the_order_by_key_and_leaves_a_final_one_alone(tmp_path: Path, emu: Emulator) -> None:
    exchange = exchange_on(tmp_path, emu)
    key = new_key()
    sell(exchange, key)
    exchange.cancel_order("BTC/USDC", key)  # already filled: nothing to cancel, nothing sent
    assert "POST /api/v3/brokerage/orders/batch_cancel" not in emu.stats()["requests"]
    market = emu.markets["BTC-USDC"]
    resting = new_key()
    emu.place(resting, OrderRequest(market=market, side="buy", type="limit", amount=D("0.01"), price=D("60000")))
    exchange.cancel_order("BTC/USDC", resting)
    found = exchange.fetch_order("BTC/USDC", resting)
    assert found is not None and found.status == "canceled"
    with pytest.raises(OrderNotFoundError):
        exchange.cancel_order("BTC/USDC", new_key())


def test_size_rules_are_invalid_orders_and_key_refusals_auth_errors(tmp_path: Path, emu: Emulator) -> None:
    exchange = exchange_on(tmp_path, emu)
    with pytest.raises(InvalidOrderError, match="PREVIEW_INVALID_QUOTE_SIZE_TOO_SMALL"):
        sell(exchange, new_key(), "0.00001")
    emu.faults.reject_auth(1, code="permission_denied")
    with pytest.raises(ExchangeAuthError):
        exchange.fetch_balances()


def test_an_internal_error_on_a_read_is_retried(tmp_path: Path, emu: Emulator) -> None:
    exchange = exchange_on(tmp_path, emu)
    emu.faults.http_5xx(1, status=500, body="exchange", endpoint=ACCOUNTS)
    free, _ = exchange.fetch_balances()
    assert free["USDC"] == D("30000")
    assert emu.stats()["requests"][f"GET {ACCOUNTS}"] == 2


def test_a_gateway_timeout_on_an_order_is_an_unknown_outcome_and_the_order_is_found(
    tmp_path: Path, emu: Emulator
) -> None:
    exchange = exchange_on(tmp_path, emu)
    key = new_key()
    emu.faults.timeout_after_accept(mode="unknown_status")
    started = time.monotonic()
    with pytest.raises(RetryableExchangeError, match="DEADLINE_EXCEEDED"):
        sell(exchange, key)
    assert time.monotonic() - started < 5  # never retried inside the adapter
    found = exchange.fetch_order("BTC/USDC", key)
    assert found is not None and found.filled == D("0.1")
    assert emu.stats()["orders"][key]["accepted"] == 1
