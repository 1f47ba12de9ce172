"""The loopback Binance emulator, driven by the real `ccxt.binance` client (nothing mocked).

Every later exchange test trusts this emulator, so these tests pin down what ccxt sees from it: the
snapshot's markets, balances and books in Binance's shapes, exact order accounting, and the ccxt
exception class each refusal or fault turns into (the table in the emulator's docstring).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import ccxt
import pytest
import yaml

from rebalancer_cli.testing.emulator import (
    DEFAULT_API_KEY,
    DEFAULT_SECRET,
    Emulator,
    RemoteEmulator,
    binance_client,
    start_emulator,
)

D = Decimal

SNAPSHOT: dict[str, Any] = {
    "taken_at": "2026-11-27T10:00:00Z",
    "balances": {"BTC": "1.5", "ETH": "20", "USDC": "100000"},
    "locked": {"USDC": "250"},
    "markets": {
        "BTC/USDC": {
            "taker_fee": "0.001",
            "amount_step": "0.00001",
            "min_notional": "10",
            "bids": [["64990", "0.5"], ["64980", "2"]],
            "asks": [["65010", "0.4"], ["65020", "3"]],
            "volatility": "0.03",
        },
        "ETH/USDC": {
            "taker_fee": "0.00075",
            "amount_step": "0.0001",
            "min_notional": "5",
            "bids": [["3400.5", "10"], ["3400", "20"]],
            "asks": [["3401", "8"], ["3401.5", "30"]],
            "volatility": "0.04",
        },
        "SOL/USDC": {
            "taker_fee": "0.001",
            "amount_step": "0.01",
            "min_notional": "5",
            "bids": [["150.12", "100"]],
            "asks": [["150.15", "80"]],
        },
    },
}


@pytest.fixture()
def snapshot_file(tmp_path: Path) -> Path:
    path = tmp_path / "market.yaml"
    path.write_text(yaml.safe_dump(SNAPSHOT, sort_keys=False))
    return path


@pytest.fixture()
def emulator(snapshot_file: Path) -> Iterator[Emulator]:
    with start_emulator(snapshot_file) as emu:
        yield emu


@pytest.fixture()
def exchange(emulator: Emulator) -> Any:
    client = binance_client(emulator.base_url)
    client.load_markets()
    return client


def raw(
    emu: Emulator, method: str, path: str, query: str = "", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request without ccxt, for what ccxt hides (status codes, headers, missing API key)."""
    url = emu.base_url + path + (f"?{query}" if query else "")
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def signed_query(params: str, secret: str = DEFAULT_SECRET) -> str:
    query = f"{params}&timestamp={int(time.time() * 1000)}" if params else f"timestamp={int(time.time() * 1000)}"
    signature = hmac.new(secret.encode(), query.encode(), hashlib.sha256).hexdigest()
    return f"{query}&signature={signature}"


def free(exchange: Any, asset: str) -> Decimal:
    return D(exchange.fetch_balance()[asset]["free"])


# --- market data ----------------------------------------------------------------------------------


def test_markets_carry_the_snapshots_lot_sizes_min_notionals_and_fees(exchange: Any) -> None:
    btc = exchange.markets["BTC/USDC"]
    assert (btc["id"], btc["spot"], btc["active"]) == ("BTCUSDC", True, True)
    assert D(btc["precision"]["amount"]) == D("0.00001")
    assert D(btc["limits"]["amount"]["min"]) == D("0.00001")
    assert D(btc["limits"]["cost"]["min"]) == D("10")
    eth = exchange.markets["ETH/USDC"]
    assert D(eth["precision"]["amount"]) == D("0.0001")
    assert D(eth["limits"]["cost"]["min"]) == D("5")
    assert D(eth["precision"]["price"]) == D("0.01")  # tick derived from the book, at least 0.01
    assert sorted(exchange.symbols) == ["BTC/USDC", "ETH/USDC", "SOL/USDC"]
    assert exchange.fetch_status()["status"] == "ok"
    fees = exchange.fetch_trading_fees()
    assert D(fees["ETH/USDC"]["taker"]) == D("0.00075")
    assert D(fees["BTC/USDC"]["taker"]) == D("0.001")


def test_balance_reports_free_and_locked(exchange: Any) -> None:
    balance = exchange.fetch_balance()
    assert D(balance["BTC"]["free"]) == D("1.5")
    assert D(balance["USDC"]["free"]) == D("100000")
    assert D(balance["USDC"]["used"]) == D("250")
    assert D(balance["SOL"]["total"]) == 0  # every market's asset is listed, like Binance does


def test_bids_and_asks_of_several_markets_come_in_one_request(emulator: Emulator, exchange: Any) -> None:
    quotes = exchange.fetch_bids_asks(["BTC/USDC", "ETH/USDC"])
    assert set(quotes) == {"BTC/USDC", "ETH/USDC"}
    assert (D(quotes["BTC/USDC"]["bid"]), D(quotes["BTC/USDC"]["ask"])) == (D("64990"), D("65010"))
    assert (D(quotes["ETH/USDC"]["bidVolume"]), D(quotes["ETH/USDC"]["askVolume"])) == (D("10"), D("8"))
    tickers = exchange.fetch_tickers(["BTC/USDC", "SOL/USDC"])
    assert D(tickers["SOL/USDC"]["bid"]) == D("150.12")
    assert D(tickers["SOL/USDC"]["last"]) == D("150.14")  # the mid, on the tick
    requests = emulator.stats()["requests"]
    assert requests["GET /api/v3/ticker/bookTicker"] == 1
    assert requests["GET /api/v3/ticker/24hr"] == 1


def test_order_book_levels_and_request_weights(emulator: Emulator, exchange: Any) -> None:
    # ccxt parses order books into floats whatever `number` is; the raw endpoint keeps the strings
    book = exchange.publicGetDepth({"symbol": "BTCUSDC", "limit": 5})
    assert book["bids"] == [["64990.00000000", "0.50000000"], ["64980.00000000", "2.00000000"]]
    assert book["asks"][0] == ["65010.00000000", "0.40000000"]
    assert exchange.fetch_order_book("ETH/USDC", 100)["asks"][1] == [3401.5, 30.0]
    # exchangeInfo 20, depth(limit<=100) 5 twice, then depth(limit 500) 25
    exchange.publicGetDepth({"symbol": "BTCUSDC", "limit": 500})
    assert exchange.last_response_headers["X-MBX-USED-WEIGHT-1M"] == "55"
    assert emulator.stats()["weight_total"] == 55


def test_ohlcv_is_deterministic_and_matches_the_snapshot_volatility(exchange: Any) -> None:
    daily = exchange.fetch_ohlcv("BTC/USDC", "1d", limit=60)
    assert len(daily) == 60
    assert daily == exchange.fetch_ohlcv("BTC/USDC", "1d", limit=60)
    assert D(daily[-1][4]) == D("65000")  # the open candle closes at the mid
    assert all(D(low) <= D(o) <= D(high) and D(low) <= D(c) <= D(high) for _, o, high, low, c, _ in daily)
    assert daily[1][0] - daily[0][0] == 86_400_000

    def realized(candles: list[list[Any]]) -> Decimal:
        closes = [D(c[4]) for c in candles]
        returns = [(b / a).ln() for a, b in itertools.pairwise(closes)]
        mean = sum(returns, D(0)) / len(returns)
        return (sum(((r - mean) ** 2 for r in returns), D(0)) / (len(returns) - 1)).sqrt()

    assert abs(realized(daily) / D("0.03") - 1) < D("0.1")
    hourly = exchange.fetch_ohlcv("ETH/USDC", "1h", limit=240)
    assert abs(realized(hourly) * D(24).sqrt() / D("0.04") - 1) < D("0.1")
    flat = exchange.fetch_ohlcv("SOL/USDC", "1d", limit=10)  # no volatility in the snapshot
    assert {c[4] for c in flat} == {"150.14000000"}


# --- orders ---------------------------------------------------------------------------------------


def test_market_buy_walks_the_book_and_charges_the_fee_in_base(emulator: Emulator, exchange: Any) -> None:
    order = exchange.create_order("BTC/USDC", "market", "buy", "0.5", None, {"clientOrderId": "buy-1"})
    assert (order["status"], order["clientOrderId"]) == ("closed", "buy-1")
    assert D(order["filled"]) == D("0.5")
    assert D(order["cost"]) == D("0.4") * 65010 + D("0.1") * 65020  # 32506
    assert [(D(t["price"]), D(t["amount"]), D(t["fee"]["cost"])) for t in order["trades"]] == [
        (D("65010"), D("0.4"), D("0.0004")),
        (D("65020"), D("0.1"), D("0.0001")),
    ]
    assert order["fee"]["currency"] == "BTC"
    balance = exchange.fetch_balance()
    assert D(balance["BTC"]["free"]) == D("1.5") + D("0.5") - D("0.0005")
    assert D(balance["USDC"]["free"]) == D("100000") - D("32506")
    # the book's depth was consumed: the first ask level is gone, the second shrank
    assert exchange.publicGetDepth({"symbol": "BTCUSDC"})["asks"][0] == ["65020.00000000", "2.90000000"]
    trades = exchange.fetch_my_trades("BTC/USDC")
    assert [t["order"] for t in trades] == [order["id"], order["id"]]
    assert int(trades[1]["id"]) > int(trades[0]["id"])
    assert emulator.stats()["orders"]["buy-1"] == {"accepted": 1, "filled": 1, "rejected": 0, "duplicates": 0}


def test_market_sell_charges_the_fee_in_quote(exchange: Any) -> None:
    order = exchange.create_order("BTC/USDC", "market", "sell", "1", None, {"clientOrderId": "sell-1"})
    proceeds = D("0.5") * 64990 + D("0.5") * 64980  # 64985
    assert D(order["cost"]) == proceeds
    assert order["fee"]["currency"] == "USDC"
    assert D(order["fee"]["cost"]) == proceeds * D("0.001")
    assert free(exchange, "USDC") == D("100000") + proceeds - proceeds * D("0.001")
    assert free(exchange, "BTC") == D("0.5")
    fetched = exchange.fetch_order(None, "BTC/USDC", {"clientOrderId": "sell-1"})
    assert (fetched["id"], fetched["status"], D(fetched["filled"])) == (order["id"], "closed", D("1"))


def test_market_buy_by_quote_amount_stays_on_the_lot_size(exchange: Any) -> None:
    order = exchange.create_market_buy_order_with_cost("BTC/USDC", "1000")
    assert D(order["filled"]) == D("0.01538")  # 1000 / 65010 rounded down to the 0.00001 step
    assert D(order["cost"]) == D("0.01538") * 65010
    assert free(exchange, "USDC") == D("100000") - D("0.01538") * 65010


def test_limit_order_fills_what_crosses_and_rests_the_rest(emulator: Emulator, exchange: Any) -> None:
    order = exchange.create_order("BTC/USDC", "limit", "buy", "1", "65010", {"clientOrderId": "lim-1"})
    assert (order["status"], D(order["filled"])) == ("open", D("0.4"))
    balance = exchange.fetch_balance()
    assert D(balance["USDC"]["used"]) == D("250") + D("0.6") * 65010
    assert [o["clientOrderId"] for o in exchange.fetch_open_orders("BTC/USDC")] == ["lim-1"]
    canceled = exchange.cancel_order(order["id"], "BTC/USDC")
    assert canceled["status"] == "canceled"
    assert D(exchange.fetch_balance()["USDC"]["used"]) == D("250")
    assert exchange.fetch_open_orders("BTC/USDC") == []
    with pytest.raises(ccxt.OrderNotFound):
        exchange.cancel_order(order["id"], "BTC/USDC")


def test_duplicate_client_order_id_of_an_open_order_is_refused(emulator: Emulator, exchange: Any) -> None:
    exchange.create_order("BTC/USDC", "limit", "buy", "0.01", "60000", {"clientOrderId": "dup-1"})
    with pytest.raises(ccxt.InvalidOrder, match="Duplicate order sent") as caught:
        exchange.create_order("BTC/USDC", "limit", "buy", "0.01", "60000", {"clientOrderId": "dup-1"})
    assert type(caught.value) is ccxt.InvalidOrder
    assert emulator.stats()["orders"]["dup-1"] == {"accepted": 1, "filled": 0, "rejected": 0, "duplicates": 1}
    assert D(exchange.fetch_balance()["USDC"]["used"]) == D("250") + D("600")  # locked once only


def test_a_filled_order_does_not_protect_its_client_order_id_as_on_binance(emulator: Emulator, exchange: Any) -> None:
    """Binance: ids are unique among OPEN orders only, so a resent filled market order trades again."""
    first = exchange.create_order("BTC/USDC", "market", "buy", "0.01", None, {"clientOrderId": "again"})
    second = exchange.create_order("BTC/USDC", "market", "buy", "0.01", None, {"clientOrderId": "again"})
    assert int(second["id"]) > int(first["id"])
    assert emulator.stats()["orders"]["again"]["accepted"] == 2
    assert free(exchange, "BTC") == D("1.5") + 2 * (D("0.01") - D("0.00001"))
    assert exchange.fetch_order(None, "BTC/USDC", {"clientOrderId": "again"})["id"] == second["id"]


def test_scope_any_refuses_every_repeated_client_order_id(snapshot_file: Path) -> None:
    with start_emulator(snapshot_file, client_order_id_scope="any") as emu:
        exchange = binance_client(emu.base_url)
        exchange.create_order("BTC/USDC", "market", "buy", "0.01", None, {"clientOrderId": "once"})
        with pytest.raises(ccxt.InvalidOrder, match="Duplicate order sent"):
            exchange.create_order("BTC/USDC", "market", "buy", "0.01", None, {"clientOrderId": "once"})
        assert emu.stats()["orders"]["once"]["accepted"] == 1


def test_unknown_orders_are_not_found(exchange: Any) -> None:
    with pytest.raises(ccxt.OrderNotFound, match="-2013"):
        exchange.fetch_order(None, "BTC/USDC", {"clientOrderId": "never-sent"})
    with pytest.raises(ccxt.OrderNotFound, match="-2013"):
        exchange.fetch_order("424242", "BTC/USDC")
    with pytest.raises(ccxt.OrderNotFound, match="-2011"):
        exchange.cancel_order(None, "BTC/USDC", {"clientOrderId": "never-sent"})


def test_filter_failures_map_to_the_classes_ccxt_really_raises(emulator: Emulator, exchange: Any) -> None:
    with pytest.raises(ccxt.BadRequest, match="Filter failure: NOTIONAL") as notional:
        exchange.create_order("BTC/USDC", "market", "buy", "0.0001", None, {"clientOrderId": "tiny"})
    assert not isinstance(notional.value, ccxt.InvalidOrder)  # Binance's quirk: NOT InvalidOrder
    # ccxt rounds amounts to the lot itself, so an off-lot quantity must bypass its unified API
    params = {"symbol": "BTCUSDC", "side": "BUY", "type": "MARKET", "quantity": "0.000015"}
    with pytest.raises(ccxt.InvalidOrder, match="Filter failure: LOT_SIZE"):
        exchange.privatePostOrder(params)
    with pytest.raises(ccxt.InvalidOrder, match="Filter failure: PRICE_FILTER"):
        exchange.privatePostOrder(
            {
                "symbol": "BTCUSDC",
                "side": "BUY",
                "type": "LIMIT",
                "timeInForce": "GTC",
                "quantity": "0.01",
                "price": "60000.005",
            }
        )
    with pytest.raises(ccxt.BadRequest, match="-1100"):
        exchange.privatePostOrder({**params, "quantity": "1e-3"})
    with pytest.raises(ccxt.OrderImmediatelyFillable):
        exchange.create_order("BTC/USDC", "limit", "buy", "0.01", "65010", {"postOnly": True})
    emulator.faults.filter_failure("LOT_SIZE")
    with pytest.raises(ccxt.InvalidOrder, match="LOT_SIZE"):
        exchange.create_order("BTC/USDC", "market", "buy", "0.01", None, {"clientOrderId": "forced"})
    emulator.faults.filter_failure("NOTIONAL")
    with pytest.raises(ccxt.BadRequest, match="NOTIONAL"):
        exchange.create_order("BTC/USDC", "market", "buy", "0.01", None, {"clientOrderId": "forced"})
    assert emulator.stats()["orders_accepted"] == 0
    assert emulator.stats()["orders"]["forced"]["rejected"] == 2
    assert free(exchange, "BTC") == D("1.5")


def test_insufficient_balance_real_and_injected(emulator: Emulator, exchange: Any) -> None:
    with pytest.raises(ccxt.InsufficientFunds):
        exchange.create_order("ETH/USDC", "market", "sell", "21", None, {"clientOrderId": "too-much"})
    emulator.faults.insufficient_balance()
    with pytest.raises(ccxt.InsufficientFunds):
        exchange.create_order("ETH/USDC", "market", "sell", "1", None, {"clientOrderId": "affordable"})
    order = exchange.create_order("ETH/USDC", "market", "sell", "1", None, {"clientOrderId": "affordable"})
    assert order["status"] == "closed"  # the fault hit one order only
    assert free(exchange, "ETH") == D("19")


# --- authentication -------------------------------------------------------------------------------


def test_bad_signature_and_unknown_key_are_refused(emulator: Emulator) -> None:
    with pytest.raises(ccxt.AuthenticationError, match="-1022"):
        binance_client(emulator.base_url, secret="not-the-secret").fetch_balance()
    with pytest.raises(ccxt.AuthenticationError, match="-2015"):
        binance_client(emulator.base_url, api_key="someone-else").fetch_balance()
    status, _, body = raw(emulator, "GET", "/api/v3/account", signed_query(""))
    assert (status, body["code"]) == (401, -2014)  # no X-MBX-APIKEY header at all
    good = raw(emulator, "GET", "/api/v3/account", signed_query(""), {"X-MBX-APIKEY": DEFAULT_API_KEY})
    assert good[0] == 200
    tampered = signed_query("omitZeroBalances=true").replace("true", "false")
    status, _, body = raw(emulator, "GET", "/api/v3/account", tampered, {"X-MBX-APIKEY": DEFAULT_API_KEY})
    assert (status, body["code"]) == (400, -1022)


def test_post_body_signature_is_verified(emulator: Emulator, exchange: Any) -> None:
    """ccxt signs orders in the body; a body altered after signing must not trade."""
    body = signed_query("symbol=BTCUSDC&side=BUY&type=MARKET&quantity=0.01").replace("0.01", "0.02")
    request = urllib.request.Request(
        emulator.base_url + "/api/v3/order",
        data=body.encode(),
        method="POST",
        headers={"X-MBX-APIKEY": DEFAULT_API_KEY, "Content-Type": "application/x-www-form-urlencoded"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert json.loads(refused.value.read())["code"] == -1022
    assert emulator.stats()["orders_accepted"] == 0


def test_stale_timestamp_is_outside_the_recv_window(exchange: Any) -> None:
    exchange.options["timeDifference"] = 70_000  # the client's clock runs 70 s behind
    with pytest.raises(ccxt.InvalidNonce, match="-1021"):
        exchange.fetch_balance()


def test_revoked_key_is_an_authentication_error_until_ccxt_has_seen_a_success(
    emulator: Emulator, exchange: Any
) -> None:
    emulator.faults.reject_auth(count=1)
    with pytest.raises(ccxt.AuthenticationError, match="-2015"):
        exchange.fetch_balance()
    exchange.fetch_balance()
    emulator.faults.reject_auth(count=1)
    with pytest.raises(ccxt.DDoSProtection, match="-2015"):  # ccxt's reading: a temporary ban
        exchange.fetch_balance()
    emulator.faults.reject_auth(count=1, code=-2014)
    with pytest.raises(ccxt.AuthenticationError, match="-2014"):
        exchange.fetch_balance()
    emulator.faults.reject_auth(count=1, code=-1022)
    with pytest.raises(ccxt.AuthenticationError, match="-1022"):
        exchange.fetch_balance()


# --- request weight -------------------------------------------------------------------------------


def test_weight_past_the_limit_gets_429_with_retry_after_then_418(snapshot_file: Path) -> None:
    with start_emulator(snapshot_file, weight_limit=45, ban_after=2) as emu:
        exchange = binance_client(emu.base_url)
        exchange.load_markets()  # 20
        exchange.fetch_balance()  # 40
        with pytest.raises(ccxt.DDoSProtection, match="429") as limited:
            exchange.fetch_balance()  # would be 60
        assert not isinstance(limited.value, ccxt.RateLimitExceeded)
        retry_after = int(exchange.last_response_headers["Retry-After"])
        assert 1 <= retry_after <= 60
        assert exchange.last_response_headers["X-MBX-USED-WEIGHT-1M"] == "40"
        exchange.publicGetPing()  # 1 more weight still fits
        # ignoring Retry-After: the next request during the back-off is a strike, the second one a ban
        with pytest.raises(ccxt.DDoSProtection):
            exchange.fetch_balance()
        status, headers, body = raw(emu, "GET", "/api/v3/ping")
        assert (status, body["code"]) == (418, -1003)
        assert int(headers["Retry-After"]) > 60
        stats = emu.stats()
        assert (stats["rate_limited_429"], stats["banned_418"]) == (1, 2)


def test_retry_after_is_honest(snapshot_file: Path) -> None:
    with start_emulator(snapshot_file, weight_limit=30, weight_window=1.0) as emu:
        exchange = binance_client(emu.base_url)
        exchange.load_markets()
        with pytest.raises(ccxt.DDoSProtection):
            exchange.fetch_balance()
        time.sleep(int(exchange.last_response_headers["Retry-After"]))
        assert D(exchange.fetch_balance()["BTC"]["free"]) == D("1.5")
        assert emu.stats()["banned_418"] == 0


def test_rate_limit_can_be_lowered_at_run_time(emulator: Emulator, exchange: Any) -> None:
    emulator.faults.rate_limit(25)
    with pytest.raises(ccxt.DDoSProtection):
        exchange.fetch_balance()
    assert emulator.stats()["rate_limited_429"] == 1


# --- faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (503, ccxt.ExchangeNotAvailable),
        (502, ccxt.ExchangeNotAvailable),
        (500, ccxt.ExchangeNotAvailable),
        (504, ccxt.RequestTimeout),
    ],
)
def test_http_5xx_maps_to(emulator: Emulator, exchange: Any, status: int, expected: type) -> None:
    emulator.faults.http_5xx(2, status=status, endpoint="/api/v3/account")
    exchange.fetch_bids_asks(["BTC/USDC"])  # other endpoints are not hit
    for _ in range(2):
        with pytest.raises(expected) as caught:
            exchange.fetch_balance()
        assert type(caught.value) is expected
    assert D(exchange.fetch_balance()["BTC"]["free"]) == D("1.5")
    assert emulator.stats()["http_5xx"] == 2


def test_5xx_on_an_order_does_not_place_it(emulator: Emulator, exchange: Any) -> None:
    emulator.faults.http_5xx(endpoint="/api/v3/order", method="POST")
    with pytest.raises(ccxt.ExchangeNotAvailable):
        exchange.create_order("BTC/USDC", "market", "buy", "0.01", None, {"clientOrderId": "gw"})
    assert "gw" not in emulator.stats()["orders"]


def test_dropped_connection_is_a_network_error_and_nothing_is_placed(emulator: Emulator, exchange: Any) -> None:
    emulator.faults.drop_connection(endpoint="/api/v3/order")
    with pytest.raises(ccxt.NetworkError) as caught:
        exchange.create_order("BTC/USDC", "market", "buy", "0.01", None, {"clientOrderId": "drop-1"})
    assert type(caught.value) is ccxt.NetworkError
    stats = emulator.stats()
    assert stats["requests"]["POST /api/v3/order"] == 1  # neither ccxt nor urllib3 retried it
    assert stats["dropped"] == 1
    assert "drop-1" not in stats["orders"]


def test_timeout_after_accept_places_the_order_but_never_answers(snapshot_file: Path) -> None:
    with start_emulator(snapshot_file) as emu:
        exchange = binance_client(emu.base_url, timeout_ms=300)
        exchange.load_markets()
        emu.faults.timeout_after_accept(hang_seconds=5)
        with pytest.raises(ccxt.RequestTimeout):
            exchange.create_order("BTC/USDC", "market", "buy", "0.01", None, {"clientOrderId": "lost-1"})
        assert emu.stats()["orders"]["lost-1"] == {"accepted": 1, "filled": 1, "rejected": 0, "duplicates": 0}
        found = exchange.fetch_order(None, "BTC/USDC", {"clientOrderId": "lost-1"})
        assert (found["status"], D(found["filled"])) == ("closed", D("0.01"))
        assert free(exchange, "BTC") == D("1.5") + D("0.01") - D("0.00001")

        emu.faults.timeout_after_accept(mode="drop")
        with pytest.raises(ccxt.NetworkError) as dropped:
            exchange.create_order("BTC/USDC", "market", "buy", "0.01", None, {"clientOrderId": "lost-2"})
        assert type(dropped.value) is ccxt.NetworkError

        emu.faults.timeout_after_accept(mode="unknown_status")
        with pytest.raises(ccxt.RequestTimeout, match="-1007"):
            exchange.create_order("BTC/USDC", "market", "buy", "0.01", None, {"clientOrderId": "lost-3"})
        orders = emu.stats()["orders"]
        assert orders["lost-2"]["filled"] == orders["lost-3"]["filled"] == 1
        assert emu.stats()["timeouts_after_accept"] == 3


def test_latency_beyond_the_client_timeout_is_a_request_timeout(snapshot_file: Path) -> None:
    with start_emulator(snapshot_file) as emu:
        exchange = binance_client(emu.base_url, timeout_ms=200)
        exchange.load_markets()
        emu.faults.latency(1000, endpoint="/api/v3/ticker/bookTicker", count=1)
        exchange.fetch_balance()  # another endpoint: on time
        with pytest.raises(ccxt.RequestTimeout):
            exchange.fetch_bids_asks(["BTC/USDC"])
        assert D(exchange.fetch_bids_asks(["BTC/USDC"])["BTC/USDC"]["bid"]) == D("64990")


def test_unknown_path_is_a_binance_error_json(emulator: Emulator, exchange: Any) -> None:
    status, _, body = raw(emulator, "GET", "/api/v3/avgPrice", "symbol=BTCUSDC")
    assert (status, body["code"]) == (404, -1020)
    with pytest.raises(ccxt.BadRequest, match="-1020"):
        exchange.publicGetAvgPrice({"symbol": "BTCUSDC"})
    with pytest.raises(ccxt.BadSymbol, match="-1121"):
        exchange.publicGetDepth({"symbol": "DOGEUSDC"})


def test_books_and_balances_can_be_set_and_reset(emulator: Emulator, exchange: Any) -> None:
    emulator.set_balance("USDC", "5")
    emulator.set_book("BTC/USDC", bids=[["70000", "1"]], asks=[["70001.5", "2"]])
    emulator.faults.http_5xx(count=None, endpoint="/api/v3/ping")
    assert free(exchange, "USDC") == D("5")
    assert D(exchange.fetch_bids_asks(["BTC/USDC"])["BTC/USDC"]["ask"]) == D("70001.5")
    with pytest.raises(ccxt.InsufficientFunds):
        exchange.create_order("BTC/USDC", "market", "buy", "0.01", None, {"clientOrderId": "poor"})
    emulator.reset()
    exchange.publicGetPing()  # faults are gone too
    assert free(exchange, "USDC") == D("100000")
    assert D(exchange.fetch_bids_asks(["BTC/USDC"])["BTC/USDC"]["ask"]) == D("65010")
    assert emulator.stats()["orders"] == {}


# --- the command line, controlled over HTTP -------------------------------------------------------


def test_cli_serves_a_snapshot_and_is_controlled_over_http(snapshot_file: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rebalancer_cli.testing.emulator",
            "--snapshot",
            str(snapshot_file),
            "--port",
            "0",
            "--api-key",
            "k-test",
            "--secret",
            "s-test",
            "--weight-limit",
            "500",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        remote = RemoteEmulator(url)
        exchange = binance_client(url, "k-test", "s-test")
        remote.faults.http_5xx(endpoint="/api/v3/exchangeInfo")
        with pytest.raises(ccxt.ExchangeNotAvailable):
            exchange.load_markets()
        remote.set_balance("ETH", "3.25")
        remote.set_book("ETH/USDC", bids=[["3000", "1"]], asks=[["3001", "1"]])
        order = exchange.create_order("ETH/USDC", "market", "sell", "1", None, {"clientOrderId": "cli-1"})
        assert D(order["cost"]) == D("3000")
        assert remote.state()["balances"]["ETH"] == {"free": "2.25", "locked": "0"}
        stats = remote.stats()
        assert stats["orders"]["cli-1"]["filled"] == 1
        assert stats["weight_limit"] == 500
        remote.faults.rate_limit(1)
        with pytest.raises(ccxt.DDoSProtection):
            exchange.fetch_balance()
        remote.reset()
        assert remote.state()["balances"]["ETH"]["free"] == "20"
        with pytest.raises(ValueError, match="unknown fault kind"):
            remote.faults.add("meteor_strike")
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
