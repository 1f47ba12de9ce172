"""The Bybit profile through the generic adapter, against the Bybit emulator (real ccxt.bybit, nothing mocked).

What a user relies on: an order's status and fills are known right after the create answer (which carries
only ids); a later run finds the order by its key, in the realtime list or in the order history once the
realtime list no longer keeps it; a cancel by key reaches Bybit; the settle window follows the receive
window; fees come from the fee-rate endpoint; the rate-limit wait is read from Bybit's own header; and the
exchange's codes become the right errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from exec_helpers import CREDENTIALS_ENV, emulator_exchange, write_config, write_snapshot

from rebalancer_cli.config import load_config
from rebalancer_cli.errors import (
    ExchangeAuthError,
    ExchangeUnavailableError,
    InsufficientFundsError,
    InvalidOrderError,
    OrderAlreadyPlacedError,
    RateLimitedError,
)
from rebalancer_cli.exchange.base import Side
from rebalancer_cli.exchange.ccxt_exchange import CcxtExchange
from rebalancer_cli.exchange.profiles import PROFILES
from rebalancer_cli.ids import new_key
from rebalancer_cli.runtime import open_exchange
from rebalancer_cli.testing.core import Emulator, start_emulator

D = Decimal
BYBIT = PROFILES["bybit"]


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CREDENTIALS_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture()
def emu(tmp_path: Path) -> Iterator[Emulator]:
    with start_emulator(write_snapshot(tmp_path / "emulator.json"), exchange="bybit") as emulator:
        yield emulator


def bybit_on(tmp_path: Path, emu: Emulator, **extra: Any) -> CcxtExchange:
    config = write_config(tmp_path, "bybit", emulator_exchange(emu.base_url, exchange="bybit", **extra))
    exchange = open_exchange(load_config(config))
    assert isinstance(exchange, CcxtExchange) and exchange.profile is BYBIT
    return exchange


def test_the_key_is_the_order_link_id_as_it_is() -> None:
    key = new_key()
    assert BYBIT.client_order_id(key) == key and BYBIT.key_of(key) == key
    assert BYBIT.client_id_pattern.match(key) and len(key) == 36
    assert BYBIT.key_of("someone-elses-id") is None


def test_create_reports_the_fill_the_lookup_found(tmp_path: Path, emu: Emulator) -> None:
    exchange = bybit_on(tmp_path, emu)
    key = new_key()
    result = exchange.create_order("BTC/USDC", Side.SELL, D("0.5"), key, worst_price=D("64980"))
    assert (result.status, result.filled, result.average) == ("closed", D("0.5"), D("64995"))
    assert result.fees == {"USDC": D("32.4975")}
    assert emu.stats()["requests"]["GET /v5/order/realtime"] == 1
    assert emu.stats()["orders"][key]["filled"] == 1
    exchange.close()


def test_an_order_listed_only_after_its_ack_is_waited_for(tmp_path: Path, emu: Emulator) -> None:
    """Bybit creates orders asynchronously: the profile asks again until the accepted order is listed."""
    exchange = bybit_on(tmp_path, emu)
    emu.dialect.visible_after_ms = 250  # type: ignore[attr-defined]
    result = exchange.create_order("BTC/USDC", Side.SELL, D("0.1"), new_key(), worst_price=D("64980"))
    assert (result.status, result.filled) == ("closed", D("0.1"))
    assert emu.stats()["calls"]["fetch_order"] >= 2  # not listed at first, then found
    assert emu.stats()["calls"]["create_order"] == 1
    exchange.close()


def test_a_partly_filled_ioc_is_final_with_its_fill(tmp_path: Path, emu: Emulator) -> None:
    exchange = bybit_on(tmp_path, emu)
    emu.set_balance("BTC", 10)
    # bids of 2 BTC, 10 USDC apart: a sell down to 64985 takes the 2 at 64995 and the 2 at 64985, the rest expires
    partial = exchange.create_order("BTC/USDC", Side.SELL, D("5"), new_key(), worst_price=D("64985"))
    assert (partial.status, partial.filled, partial.amount) == ("closed", D("4"), D("5"))
    assert partial.average == D("64990") and partial.fees == {"USDC": D("259.96")}
    exchange.close()


def test_lookup_by_key_finds_it_later_in_realtime_or_history(
    tmp_path: Path, emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rebalancer_cli.testing import bybit

    exchange = bybit_on(tmp_path, emu)
    key = new_key()
    exchange.create_order("BTC/USDC", Side.SELL, D("0.1"), key, worst_price=D("64980"))
    assert exchange.fetch_order("BTC/USDC", new_key()) is None  # unknown key: neither list has it
    monkeypatch.setattr(bybit, "REALTIME_CLOSED_KEPT", 0)  # the realtime list dropped it
    found = exchange.fetch_order("BTC/USDC", key)
    assert found is not None and found.filled == D("0.1") and found.is_final
    assert found.fills and found.fills[0].price == D("64995")
    assert emu.stats()["requests"]["GET /v5/order/history"] >= 1
    exchange.close()


def test_cancel_by_key_reaches_bybit(tmp_path: Path, emu: Emulator) -> None:
    exchange = bybit_on(tmp_path, emu)
    exchange.fetch_balances()
    key = new_key()
    client = exchange.client  # a resting order, which the tool itself never sends
    client.create_order("ETH/USDC", "limit", "buy", "1", "3000", {"clientOrderId": key})
    exchange.cancel_order("ETH/USDC", key)
    found = exchange.fetch_order("ETH/USDC", key)
    assert found is not None and found.status == "canceled"
    assert emu.locked("USDC") == 0
    exchange.close()


def test_settle_window_is_the_receive_window_plus_a_second(tmp_path: Path, emu: Emulator) -> None:
    assert BYBIT.settle_window({}) == 6.0  # ccxt's default recvWindow for Bybit is 5 s
    exchange = bybit_on(tmp_path, emu)
    assert exchange.settle_window == 2.0  # the test configs send recvWindow 1000
    exchange.close()


def test_fees_come_from_the_fee_rate_endpoint_per_market(tmp_path: Path, emu: Emulator) -> None:
    exchange = bybit_on(tmp_path, emu)
    fee, source = exchange._taker_fee("ETH/USDC", {})
    assert (fee, source) == (D("0.001"), "account")
    assert emu.stats()["requests"]["GET /v5/account/fee-rate"] == 1
    exchange.close()


def test_refusals_become_the_right_errors(tmp_path: Path, emu: Emulator) -> None:
    exchange = bybit_on(tmp_path, emu)
    with pytest.raises(InsufficientFundsError, match="170131"):
        exchange.create_order("BTC/USDC", Side.BUY, D("10"), new_key(), worst_price=D("65100"))
    with pytest.raises(InvalidOrderError, match="170140"):
        exchange.create_order("BTC/USDC", Side.SELL, D("0.00001"), new_key(), worst_price=D("64980"))
    emu.faults.add("filter_failure", filter="LOT_SIZE")
    with pytest.raises(InvalidOrderError, match="170137"):
        exchange.create_order("BTC/USDC", Side.SELL, D("0.1"), new_key(), worst_price=D("64980"))
    key = new_key()
    client = exchange.client
    client.create_order("ETH/USDC", "limit", "buy", "1", "3000", {"clientOrderId": key})  # open: holds its id
    with pytest.raises(OrderAlreadyPlacedError, match="170141"):
        exchange.create_order("ETH/USDC", Side.BUY, D("1"), key, worst_price=D("3000"))
    emu.faults.reject_auth(count=1, code=10004)
    with pytest.raises(ExchangeAuthError, match="10004"):
        exchange.fetch_balances()
    exchange.close()


def test_an_internal_error_on_a_read_is_retried_and_on_an_order_is_unknown(tmp_path: Path, emu: Emulator) -> None:
    exchange = bybit_on(tmp_path, emu)
    exchange.fetch_balances()
    emu.faults.http_5xx(1, endpoint="/v5/account/wallet-balance", body="exchange")
    free, _ = exchange.fetch_balances()
    assert free["BTC"] == D("1.5")
    emu.faults.http_5xx(1, endpoint="/v5/order/create", method="POST", body="exchange")
    with pytest.raises(ExchangeUnavailableError, match="10016"):
        exchange.create_order("BTC/USDC", Side.SELL, D("0.1"), new_key(), worst_price=D("64980"))
    assert emu.stats()["requests"]["POST /v5/order/create"] == 1  # never re-sent by the adapter
    exchange.close()


def test_the_rate_limit_wait_is_read_from_bybits_reset_header(tmp_path: Path, emu: Emulator) -> None:
    exchange = bybit_on(tmp_path, emu)
    exchange.fetch_balances()
    emu.faults.rate_limit(1)
    with pytest.raises(RateLimitedError) as refused:
        exchange.call("fetch_time", lambda: exchange.client.fetch_time(), retry=False)
    assert refused.value.retry_after is not None and 0 < refused.value.retry_after <= 5.0
    exchange.close()


def test_why_the_profile_calls_bybits_endpoints_itself(tmp_path: Path, emu: Emulator) -> None:
    """ccxt's unified calls do not carry the client order id to Bybit: fetch_order refuses without
    `acknowledged` and would send `orderId`; cancel_order sends `clientOrderId`, which Bybit does not know."""
    import ccxt

    exchange = bybit_on(tmp_path, emu)
    key = new_key()
    exchange.create_order("BTC/USDC", Side.SELL, D("0.1"), key, worst_price=D("64980"))
    client = exchange.client
    with pytest.raises(ccxt.ArgumentsRequired):
        client.fetch_order(None, "BTC/USDC", {"clientOrderId": key})
    with pytest.raises(ccxt.BadRequest, match="orderId or orderLinkId"):
        client.cancel_order(None, "BTC/USDC", {"clientOrderId": key})
    exchange.close()


def test_sandbox_uses_bybits_testnet(tmp_path: Path) -> None:
    block = emulator_exchange("", exchange="bybit", sandbox=True)
    del block["api_url"]
    client = open_exchange(load_config(write_config(tmp_path, "sandboxed", block))).client  # type: ignore[attr-defined]
    assert client.implode_hostname(client.urls["api"]["private"]) == "https://api-testnet.bybit.com"
    client.session.close()
