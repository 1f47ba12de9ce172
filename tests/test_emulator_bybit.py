"""The loopback Bybit v5 (spot, UTA) emulator, driven by the real `ccxt.bybit` client (nothing mocked).

These tests pin down what ccxt sees from the dialect: markets, balances and books in Bybit's shapes, the
order flow by `orderLinkId` (create answers only ids; status and fills come from the realtime / history /
execution endpoints), and the ccxt exception class each refusal or fault turns into (the table in
`rebalancer_cli/testing/bybit.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import ccxt
import pytest
from test_emulator import SNAPSHOT  # the same markets and balances as the Binance emulator's tests

from rebalancer_cli.testing.core import Emulator, start_emulator

D = Decimal
KEY = "0190a5c4-aaaa-7bbb-8ccc-0123456789ab"  # a UUIDv7 idempotency key as it is (36 characters)


@pytest.fixture()
def snapshot_file(tmp_path: Path) -> Path:
    path = tmp_path / "market.json"
    path.write_text(json.dumps(SNAPSHOT))
    return path


@pytest.fixture()
def emulator(snapshot_file: Path) -> Iterator[Emulator]:
    emu = start_emulator(snapshot_file, exchange="bybit")
    yield emu
    emu.stop()


@pytest.fixture()
def exchange(emulator: Emulator) -> Any:
    client = emulator.client()
    client.load_markets()
    return client


def ioc(client: Any, market: str, side: str, amount: str, price: str, link_id: str = KEY) -> Any:
    return client.create_order(market, "limit", side, amount, price, {"clientOrderId": link_id, "timeInForce": "IOC"})


def by_link_id(client: Any, market: str, link_id: str, endpoint: str = "realtime") -> list[Any]:
    """The orders with this orderLinkId, through ccxt's implicit methods (the unified fetch_order does not map
    the id) and ccxt's own parser."""
    call = client.privateGetV5OrderRealtime if endpoint == "realtime" else client.privateGetV5OrderHistory
    answer = call({"category": "spot", "symbol": client.market(market)["id"], "orderLinkId": link_id})
    return [client.parse_order(o, client.market(market)) for o in answer["result"]["list"]]


def test_markets_carry_lot_size_min_size_min_notional_and_tick(exchange: Any) -> None:
    btc = exchange.market("BTC/USDC")
    assert btc["id"] == "BTCUSDC"
    assert btc["precision"] == {"amount": "0.00001", "price": "0.01"}
    assert btc["limits"]["amount"]["min"] == "0.00001"
    assert btc["limits"]["cost"]["min"] == "10"
    assert exchange.fetch_trading_fee("ETH/USDC")["taker"] == "0.00075"


def test_unified_balance_free_is_wallet_minus_locked(emulator: Emulator, exchange: Any) -> None:
    exchange.create_order("ETH/USDC", "limit", "buy", "1", "3000", {"clientOrderId": "rest-1"})  # GTC, rests
    balance = exchange.fetch_balance()  # the snapshot holds 250 USDC locked already
    assert D(balance["USDC"]["total"]) == D("100250")
    assert D(balance["USDC"]["used"]) == D("3250")
    assert D(balance["USDC"]["free"]) == D("97000")
    emulator.set_balance("ETH", 0)
    assert "ETH" not in exchange.fetch_balance()["total"]  # coins at zero are not listed


def test_best_bid_and_ask_of_all_markets_in_one_request(emulator: Emulator, exchange: Any) -> None:
    before = emulator.stats()["requests"].get("GET /v5/market/tickers", 0)
    tops = exchange.fetch_bids_asks(["BTC/USDC", "ETH/USDC"])
    assert (tops["BTC/USDC"]["bid"], tops["BTC/USDC"]["bidVolume"]) == ("64990", "0.5")
    assert (tops["ETH/USDC"]["ask"], tops["ETH/USDC"]["askVolume"]) == ("3401", "8")
    assert emulator.stats()["requests"]["GET /v5/market/tickers"] == before + 1
    book = exchange.fetch_order_book("BTC/USDC", 100)
    assert book["asks"][0][0] == 65010 and len(book["bids"]) == 2


def test_daily_candles_match_the_snapshot_volatility(exchange: Any) -> None:
    import math

    candles = exchange.fetch_ohlcv("BTC/USDC", "1d", limit=31)
    assert len(candles) == 31 and candles[0][0] < candles[-1][0]  # Bybit lists newest first; ccxt sorts
    closes = [float(c[4]) for c in candles]
    rets = [math.log(b / a) for a, b in itertools.pairwise(closes)]
    mean = sum(rets) / len(rets)
    vol = math.sqrt(sum((r - mean) ** 2 for r in rets) / (len(rets) - 1))
    assert abs(vol - 0.03) < 0.005


def test_ioc_answer_has_ids_only_and_the_lookup_tells_the_fill(emulator: Emulator, exchange: Any) -> None:
    created = ioc(exchange, "BTC/USDC", "buy", "1", "65010")  # 0.4 at 65010 crosses, the rest expires
    assert created["id"] and created["clientOrderId"] == KEY and created["status"] is None
    [order] = by_link_id(exchange, "BTC/USDC", KEY)
    assert order["status"] == "closed" and order["info"]["orderStatus"] == "PartiallyFilledCanceled"
    assert (order["filled"], order["amount"], order["average"]) == ("0.4", "1", "65010")
    assert order["fee"] == {"cost": "0.0004", "currency": "BTC"}  # a spot buy pays its fee in the coin received
    trades = exchange.fetch_my_trades("BTC/USDC", None, None, {"orderId": order["id"]})
    assert [(t["amount"], t["price"], t["fee"]["currency"]) for t in trades] == [("0.4", "65010", "BTC")]
    assert by_link_id(exchange, "BTC/USDC", KEY, "history")[0]["id"] == order["id"]
    assert emulator.stats()["orders"][KEY] == {"accepted": 1, "filled": 0, "rejected": 0, "duplicates": 0}


def test_ioc_that_crosses_nothing_is_cancelled_and_one_that_fills_is_filled(exchange: Any) -> None:
    ioc(exchange, "BTC/USDC", "buy", "0.1", "65000", "none-1")
    assert by_link_id(exchange, "BTC/USDC", "none-1")[0]["status"] == "canceled"
    ioc(exchange, "BTC/USDC", "sell", "0.5", "64990", "all-1")
    [order] = by_link_id(exchange, "BTC/USDC", "all-1")
    assert (order["status"], order["filled"], order["fee"]["currency"]) == ("closed", "0.5", "USDC")


def test_unknown_link_id_is_an_empty_list_and_its_cancel_is_order_not_found(exchange: Any) -> None:
    assert by_link_id(exchange, "BTC/USDC", "never-sent") == []
    assert by_link_id(exchange, "BTC/USDC", "never-sent", "history") == []
    with pytest.raises(ccxt.OrderNotFound, match="170213"):
        exchange.privatePostV5OrderCancel({"category": "spot", "symbol": "BTCUSDC", "orderLinkId": "never-sent"})


def test_cancel_by_link_id_releases_the_lock(emulator: Emulator, exchange: Any) -> None:
    exchange.create_order("ETH/USDC", "limit", "buy", "1", "3000", {"clientOrderId": "rest-2"})
    exchange.privatePostV5OrderCancel({"category": "spot", "symbol": "ETHUSDC", "orderLinkId": "rest-2"})
    assert by_link_id(exchange, "ETH/USDC", "rest-2")[0]["status"] == "canceled"
    assert emulator.locked("USDC") == 250  # what the snapshot held locked, nothing more


def test_duplicate_link_id_of_an_open_order_is_refused_a_filled_one_is_not(emulator: Emulator, exchange: Any) -> None:
    exchange.create_order("ETH/USDC", "limit", "buy", "1", "3000", {"clientOrderId": "dup-1"})
    with pytest.raises(ccxt.InvalidOrder, match="170141"):
        exchange.create_order("ETH/USDC", "limit", "buy", "1", "3000", {"clientOrderId": "dup-1"})
    ioc(exchange, "BTC/USDC", "sell", "0.1", "64990", "dup-2")
    ioc(exchange, "BTC/USDC", "sell", "0.1", "64990", "dup-2")  # the core's "open" scope: it trades again
    counts = emulator.stats()["orders"]
    assert counts["dup-1"]["duplicates"] == 1 and counts["dup-2"]["filled"] == 2


@pytest.mark.parametrize("link_id", ["x" * 37, "has.dot", "has space"])
def test_link_ids_outside_36_letters_digits_dashes_underscores_are_refused(exchange: Any, link_id: str) -> None:
    with pytest.raises(ccxt.BadRequest, match="orderLinkId"):
        ioc(exchange, "BTC/USDC", "sell", "0.1", "64990", link_id)


def test_market_rules_refusals_map_to_invalid_order(emulator: Emulator, exchange: Any) -> None:
    with pytest.raises(ccxt.InvalidOrder, match="170140"):  # 0.0001 * 64990 < 10
        ioc(exchange, "BTC/USDC", "sell", "0.0001", "64990", "f-1")
    body = {"category": "spot", "symbol": "BTCUSDC", "side": "Sell", "orderType": "Limit", "timeInForce": "IOC"}
    with pytest.raises(ccxt.InvalidOrder, match="170137"):  # ccxt truncates amounts: send raw
        exchange.privatePostV5OrderCreate({**body, "qty": "0.123456", "price": "64990", "orderLinkId": "f-2"})
    with pytest.raises(ccxt.InvalidOrder, match="170134"):
        exchange.privatePostV5OrderCreate({**body, "qty": "0.1", "price": "64990.001", "orderLinkId": "f-3"})
    emulator.faults.filter_failure("NOTIONAL")
    with pytest.raises(ccxt.InvalidOrder, match="170140"):
        ioc(exchange, "BTC/USDC", "sell", "0.1", "64990", "f-4")
    with pytest.raises(ccxt.InvalidOrder, match="170121"):
        exchange.privatePostV5OrderCreate({**body, "symbol": "DOGEUSDC", "qty": "1", "price": "1"})
    assert emulator.stats()["orders_accepted"] == 0


def test_insufficient_balance_real_and_injected(emulator: Emulator, exchange: Any) -> None:
    with pytest.raises(ccxt.InsufficientFunds, match="170131"):
        ioc(exchange, "BTC/USDC", "buy", "2", "65020", "i-1")  # 2 * 65020 > 100000 USDC
    emulator.faults.insufficient_balance()
    with pytest.raises(ccxt.InsufficientFunds):
        ioc(exchange, "BTC/USDC", "sell", "0.1", "64990", "i-2")
    assert emulator.stats()["orders"]["i-2"]["rejected"] == 1


def _signed_get(emulator: Emulator, query: str, *, secret: str | None = None, stamp: int | None = None) -> Any:
    ts = str(stamp if stamp is not None else time.time_ns() // 1_000_000)
    origin = ts + emulator.api_key + "5000" + query
    sign = hmac.new((secret or emulator.secret).encode(), origin.encode(), hashlib.sha256).hexdigest()
    request = urllib.request.Request(
        f"{emulator.base_url}/v5/account/wallet-balance?{query}",
        headers={
            "X-BAPI-API-KEY": emulator.api_key,
            "X-BAPI-TIMESTAMP": ts,
            "X-BAPI-RECV-WINDOW": "5000",
            "X-BAPI-SIGN": sign,
        },
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, json.loads(response.read())


def test_signature_and_receive_window_as_documented(emulator: Emulator) -> None:
    status, answer = _signed_get(emulator, "accountType=UNIFIED")
    assert status == 200 and answer["retCode"] == 0 and answer["retMsg"] == "OK"
    assert _signed_get(emulator, "accountType=UNIFIED", secret="wrong")[1]["retCode"] == 10004
    now = time.time_ns() // 1_000_000
    assert _signed_get(emulator, "accountType=UNIFIED", stamp=now - 6000)[1]["retCode"] == 10002
    assert _signed_get(emulator, "accountType=UNIFIED", stamp=now + 1500)[1]["retCode"] == 10002
    assert _signed_get(emulator, "accountType=UNIFIED", stamp=now - 4000)[1]["retCode"] == 0


def test_key_refusals_are_authentication_errors(emulator: Emulator, exchange: Any) -> None:
    wrong = emulator.dialect.client(emulator.base_url, {"apiKey": emulator.api_key, "secret": "wrong"})
    wrong.set_markets(exchange.markets)
    with pytest.raises(ccxt.AuthenticationError, match="10004"):
        wrong.fetch_balance()
    unknown = emulator.dialect.client(emulator.base_url, {"apiKey": "someone-else", "secret": "x"})
    unknown.set_markets(exchange.markets)
    with pytest.raises(ccxt.AuthenticationError, match="10003"):
        unknown.fetch_balance()
    emulator.faults.reject_auth(count=1, code=10005)
    with pytest.raises(ccxt.PermissionDenied):
        exchange.fetch_balance()


def test_an_order_arriving_after_its_receive_window_never_trades(emulator: Emulator) -> None:
    client = emulator.client(recvWindow=1000)
    client.load_markets()
    client.fetch_balance()  # ccxt learns the account mode first
    emulator.faults.latency(1200, endpoint="/v5/order/create", method="POST", count=1)
    with pytest.raises(ccxt.InvalidNonce, match="10002"):
        ioc(client, "BTC/USDC", "sell", "0.1", "64990", "late-1")
    emulator.faults.latency(600, endpoint="/v5/order/create", method="POST", count=1)
    ioc(client, "BTC/USDC", "sell", "0.1", "64990", "in-time-1")
    assert set(emulator.stats()["orders"]) == {"in-time-1"}


def test_rate_limit_is_10006_with_bybits_reset_header_then_an_ip_ban(snapshot_file: Path) -> None:
    emu = start_emulator(snapshot_file, exchange="bybit", weight_limit=4, ban_after=2)
    try:
        client = emu.client()
        for _ in range(4):  # a read weighs 1: the fifth read within the second is refused
            client.publicGetV5MarketTime()
        with pytest.raises(ccxt.RateLimitExceeded, match="10006"):
            client.publicGetV5MarketTime()
        headers = {k.lower(): v for k, v in client.last_response_headers.items()}
        assert "retry-after" not in headers  # Bybit tells the wait in its own header
        assert int(headers["x-bapi-limit-reset-timestamp"]) > time.time() * 1000
        for _ in range(2):  # sending on during the wait: the IP is banned, HTTP 403 ("access too frequent")
            with pytest.raises(ccxt.RateLimitExceeded) as refused:
                client.publicGetV5MarketTime()
        assert "403" in str(refused.value) and emu.stats()["banned_418"] == 1
    finally:
        emu.stop()


@pytest.mark.parametrize("status", [500, 502, 503])
def test_gateway_5xx_is_exchange_not_available(emulator: Emulator, exchange: Any, status: int) -> None:
    emulator.faults.http_5xx(1, status=status)
    with pytest.raises(ccxt.ExchangeNotAvailable):
        exchange.fetch_balance()


def test_an_internal_error_is_bybits_10016_and_runs_nothing(emulator: Emulator, exchange: Any) -> None:
    exchange.fetch_balance()
    emulator.faults.http_5xx(1, status=503, body="exchange", endpoint="/v5/order/create")
    with pytest.raises(ccxt.ExchangeError, match="10016") as refused:
        ioc(exchange, "BTC/USDC", "sell", "0.1", "64990", "internal-1")
    assert not isinstance(refused.value, ccxt.NetworkError)
    assert by_link_id(exchange, "BTC/USDC", "internal-1") == []


def test_timeout_after_accept_places_the_order_and_unknown_status_is_a_request_timeout(
    emulator: Emulator, exchange: Any
) -> None:
    exchange.fetch_balance()
    emulator.faults.timeout_after_accept(mode="unknown_status")
    with pytest.raises(ccxt.RequestTimeout, match="170007"):
        ioc(exchange, "BTC/USDC", "sell", "0.1", "64990", "after-1")
    assert by_link_id(exchange, "BTC/USDC", "after-1")[0]["filled"] == "0.1"
    emulator.faults.timeout_after_accept(mode="drop")
    with pytest.raises(ccxt.NetworkError):
        ioc(exchange, "BTC/USDC", "sell", "0.1", "64990", "after-2")
    assert by_link_id(exchange, "BTC/USDC", "after-2")[0]["status"] == "closed"


def test_realtime_keeps_only_the_newest_closed_orders_history_keeps_the_rest(
    exchange: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UTA account's realtime endpoint lists "the most recent 500 closed" orders (2 here); the order history
    still has the older ones: a lookup by orderLinkId must fall back to it."""
    from rebalancer_cli.testing import bybit

    assert bybit.REALTIME_CLOSED_KEPT == 500
    monkeypatch.setattr(bybit, "REALTIME_CLOSED_KEPT", 2)
    for i in range(3):
        ioc(exchange, "BTC/USDC", "sell", "0.1", "64990", f"old-{i}")
    assert by_link_id(exchange, "BTC/USDC", "old-0") == []
    assert by_link_id(exchange, "BTC/USDC", "old-0", "history")[0]["filled"] == "0.1"
    assert by_link_id(exchange, "BTC/USDC", "old-2")[0]["filled"] == "0.1"


def test_unknown_path_is_route_not_found(emulator: Emulator) -> None:
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{emulator.base_url}/v5/nowhere", timeout=5)
    assert refused.value.code == 404 and json.loads(refused.value.read())["retCode"] == 10017
