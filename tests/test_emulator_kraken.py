"""The Kraken dialect, driven by the real `ccxt.kraken` client (nothing mocked).

These pin down what ccxt sees from the emulator: Kraken's asset and pair ids mapped back to unified
symbols, precision and limits from AssetPairs, balances, fees, the signature and nonce rules, the
AddOrder `deadline`, the `cl_ord_id` rules (open-order uniqueness only), IOC partial fills, lookups and
cancels by `cl_ord_id`, and the ccxt exception class each answer turns into (the table in the dialect's
docstring, which the Kraken profile's error mapping relies on).
"""

from __future__ import annotations

import base64
import itertools
import math
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import ccxt
import pytest
import yaml

from rebalancer_cli.testing.core import Emulator, start_emulator
from rebalancer_cli.testing.kraken import DEFAULT_SECRET, api_sign, now_rfc3339, pair_id, valid_cl_ord_id

D = Decimal
KEY = "0190f0a4-1234-7abc-8def-0123456789ab"

SNAPSHOT: dict[str, Any] = {
    "taken_at": "2026-11-27T10:00:00Z",
    "balances": {"BTC": "1.5", "ETH": "20", "USD": "100000"},
    "markets": {
        "BTC/USD": {
            "taker_fee": "0.0026",
            "amount_step": "0.00001",
            "min_notional": "10",
            "bids": [["64990", "0.5"], ["64980", "2"]],
            "asks": [["65010", "0.4"], ["65020", "3"]],
            "volatility": "0.03",
        },
        "ETH/USD": {
            "taker_fee": "0.0026",
            "amount_step": "0.0001",
            "min_notional": "5",
            "bids": [["3400.5", "10"], ["3400", "20"]],
            "asks": [["3401", "8"], ["3401.5", "30"]],
        },
        "SOL/USD": {
            "taker_fee": "0.004",
            "amount_step": "0.01",
            "min_notional": "5",
            "bids": [["150.12", "100"]],
            "asks": [["150.15", "80"]],
        },
    },
}


@pytest.fixture()
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    path = tmp_path / "market.yaml"
    path.write_text(yaml.safe_dump(SNAPSHOT, sort_keys=False))
    with start_emulator(path, exchange="kraken") as emu:
        yield emu


@pytest.fixture()
def client(emulator: Emulator) -> Any:
    c = emulator.client()
    c.load_markets()
    return c


def ioc(client: Any, side: str, amount: str, price: str, key: str = KEY, **extra: Any) -> Any:
    params = {"clientOrderId": key, "timeInForce": "IOC", "oflags": "fciq", "deadline": now_rfc3339(10), **extra}
    return client.create_order("BTC/USD", "limit", side, amount, price, params)


def by_key(client: Any, key: str = KEY) -> list[Any]:
    found = client.fetch_open_orders(None, None, None, {"clientOrderId": key})
    return [*found, *client.fetch_closed_orders(None, None, None, {"clientOrderId": key})]


def test_ids_and_client_id_rules() -> None:
    assert pair_id("BTC", "USD") == "XXBTZUSD"
    assert pair_id("BTC", "USDC") == "XBTUSDC"
    assert pair_id("SOL", "USD") == "SOLUSD"
    assert valid_cl_ord_id(KEY)  # a UUIDv7, 36 characters: Kraken's "long UUID"
    assert valid_cl_ord_id(KEY.replace("-", ""))
    assert valid_cl_ord_id("x" * 18)
    assert not valid_cl_ord_id("x" * 19)
    assert not valid_cl_ord_id(KEY + "0")


def test_markets_balances_and_market_data_as_ccxt_reads_them(client: Any) -> None:
    btc = client.markets["BTC/USD"]
    assert btc["id"] == "XXBTZUSD" and btc["altname"] == "XBTUSD"
    assert (btc["precision"]["amount"], btc["precision"]["price"]) == ("0.00001", "0.01")
    assert btc["limits"]["amount"]["min"] == "0.00001" and btc["limits"]["cost"]["min"] == "10"
    assert D(btc["taker"]) == D("0.0026")
    assert client.markets["SOL/USD"]["id"] == "SOLUSD"
    balance = client.fetch_balance()
    assert D(balance["free"]["BTC"]) == D("1.5") and D(balance["free"]["USD"]) == D("100000")
    tickers = client.fetch_tickers(["BTC/USD", "ETH/USD"])
    assert D(tickers["BTC/USD"]["bid"]) == 64990 and D(tickers["BTC/USD"]["askVolume"]) == D("0.4")
    book = client.fetch_order_book("ETH/USD", 100)
    assert [D(level[0]) for level in book["bids"]] == [D("3400.5"), D("3400")]
    assert D(client.fetch_trading_fee("SOL/USD")["taker"]) == D("0.004")
    closes = [float(c[4]) for c in client.fetch_ohlcv("BTC/USD", "1d", limit=31)]
    returns = [math.log(b / a) for a, b in itertools.pairwise(closes)]
    mean = sum(returns) / len(returns)
    sd = math.sqrt(sum((r - mean) ** 2 for r in returns) / (len(returns) - 1))
    assert len(closes) == 31 and abs(sd - 0.03) < 0.005


def test_ioc_partial_fill_fee_in_quote_and_lookup_by_cl_ord_id(client: Any, emulator: Emulator) -> None:
    created = ioc(client, "buy", "0.5", "65015")
    assert created["id"] and created["status"] is None  # Kraken's answer carries no status, no fill
    (order,) = by_key(client)
    assert (order["status"], D(order["filled"]), D(order["amount"])) == ("canceled", D("0.4"), D("0.5"))
    assert order["clientOrderId"] == KEY and order["id"] == created["id"]
    assert order["fee"]["currency"] == "USD" and D(order["fee"]["cost"]) == D("0.4") * 65010 * D("0.0026")
    trades = client.fetch_my_trades("BTC/USD")
    assert [(t["order"], D(t["amount"]), t["fee"]["currency"]) for t in trades] == [(created["id"], D("0.4"), "USD")]
    assert emulator.free("BTC") == D("1.9")
    assert emulator.free("USD") == 100000 - D("0.4") * 65010 * D("1.0026")
    assert emulator.stats()["orders"][KEY] == {"accepted": 1, "filled": 0, "rejected": 0, "duplicates": 0}


def test_unified_fetch_order_by_client_id_cannot_find_our_order(client: Any) -> None:
    """ccxt's fetch_order sends a client id as `userref` (an int32) next to the txid it requires."""
    ioc(client, "buy", "0.1", "65015")
    with pytest.raises(ccxt.BaseError):
        client.fetch_order(None, None, {"clientOrderId": KEY})


def test_an_id_is_unique_among_open_orders_only(client: Any, emulator: Emulator) -> None:
    resting = {"clientOrderId": KEY, "deadline": now_rfc3339(10)}
    client.create_order("BTC/USD", "limit", "buy", "0.1", "60000", resting)
    with pytest.raises(ccxt.ExchangeError, match="EOrder:Duplicate order"):
        client.create_order("BTC/USD", "limit", "buy", "0.1", "60000", {**resting, "deadline": now_rfc3339(10)})
    client.cancel_order(None, None, {"clientOrderId": KEY})
    with pytest.raises(ccxt.OrderNotFound):
        client.cancel_order(None, None, {"clientOrderId": KEY})
    # a filled (or cancelled) order frees its id: the same key trades again
    ioc(client, "buy", "0.1", "65015")
    ioc(client, "buy", "0.1", "65015")
    assert emulator.stats()["orders"][KEY] == {"accepted": 3, "filled": 2, "rejected": 0, "duplicates": 1}


def test_deadline_bounds_how_late_an_order_can_trade(client: Any, emulator: Emulator) -> None:
    emulator.faults.latency(2500, endpoint="/0/private/AddOrder", count=1)
    with pytest.raises(ccxt.ExchangeError, match="EService:Deadline elapsed"):
        ioc(client, "buy", "0.1", "65015", deadline=now_rfc3339(2))
    with pytest.raises(ccxt.ExchangeError, match="Invalid arguments:deadline"):
        ioc(client, "buy", "0.1", "65015", deadline=now_rfc3339(90))
    assert emulator.stats()["orders"][KEY] == {"accepted": 0, "filled": 0, "rejected": 2, "duplicates": 0}
    assert emulator.free("BTC") == D("1.5")


def test_bad_client_ids_are_refused_before_the_engine(client: Any, emulator: Emulator) -> None:
    with pytest.raises(ccxt.ExchangeError, match="Invalid arguments:cl_ord_id"):
        ioc(client, "buy", "0.1", "65015", key="x" * 19)
    assert emulator.stats()["orders"] == {}


@pytest.mark.parametrize(
    ("amount", "price", "error", "text"),
    [
        ("100", "65015", ccxt.InsufficientFunds, "EOrder:Insufficient funds"),
        ("0.0001", "65015", ccxt.ExchangeError, "EOrder:Cost minimum not met"),
    ],
)
def test_order_refusals(client: Any, amount: str, price: str, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        ioc(client, "buy", amount, price)


@pytest.mark.parametrize(
    ("volume", "price", "error", "text"),
    [
        ("0.1", "65015.001", ccxt.ExchangeError, "price can only be specified up to 2 decimals"),
        ("0.000001", "65015", ccxt.InvalidOrder, "Invalid arguments:volume"),
        ("0.000010", "65015", ccxt.ExchangeError, "Cost minimum not met"),
    ],
)
def test_unrounded_amounts_are_refused_in_krakens_words(
    client: Any, volume: str, price: str, error: type[Exception], text: str
) -> None:
    """ccxt rounds amounts and prices itself; these are sent raw, as another client might."""
    order = {"pair": "XXBTZUSD", "type": "buy", "ordertype": "limit", "volume": volume, "price": price}
    with pytest.raises(error, match=text):
        client.privatePostAddOrder(order)


def test_signature_key_and_nonce_refusals(emulator: Emulator, client: Any) -> None:
    wrong_secret = base64.b64encode(b"another secret of the right kind of length, 64 bytes long.....!").decode()
    other = emulator.dialect.client(emulator.base_url, {"apiKey": emulator.api_key, "secret": wrong_secret})
    with pytest.raises(ccxt.ExchangeError, match="EAPI:Invalid signature"):
        other.fetch_balance()
    wrong_key = emulator.dialect.client(emulator.base_url, {"apiKey": "nope", "secret": DEFAULT_SECRET})
    with pytest.raises(ccxt.AuthenticationError, match="EAPI:Invalid key"):
        wrong_key.fetch_balance()
    client.fetch_balance()
    stale = emulator.client()
    stale.markets, stale.markets_by_id = client.markets, client.markets_by_id
    stale.nonce = lambda: 1  # an older nonce than the one just accepted
    with pytest.raises(ccxt.InvalidNonce):
        stale.fetch_balance()


def test_signature_is_krakens_documented_example() -> None:
    """The worked example of Kraken's "Spot REST Authentication" guide."""
    secret = "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg=="
    body = "nonce=1616492376594&ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25"
    expected = "4/dpxb3iT4tp/ZCVEwSnEsLxx0bqyhLpdfOpc6fn7OR8+UClSV5n9E6aSS8MPtnRfp32bAb0nmbRn6H8ndwLUQ=="
    assert api_sign(secret, "/0/private/AddOrder", "1616492376594", body) == expected


def test_faults_through_the_dialect(client: Any, emulator: Emulator) -> None:
    emulator.faults.reject_auth(count=1)
    with pytest.raises(ccxt.AuthenticationError):
        client.fetch_balance()
    emulator.faults.http_5xx(count=1, status=503)
    with pytest.raises(ccxt.ExchangeNotAvailable):
        client.fetch_balance()
    emulator.faults.timeout_after_accept(mode="unknown_status")
    with pytest.raises(ccxt.ExchangeNotAvailable, match="EGeneral:Internal error"):
        ioc(client, "buy", "0.1", "65015")
    assert [o["status"] for o in by_key(client)] == ["closed"]  # it did trade
    emulator.faults.filter_failure("NOTIONAL")
    with pytest.raises(ccxt.ExchangeError, match="Cost minimum not met"):
        ioc(client, "buy", "0.1", "65015", key="second-key")
    emulator.faults.rate_limit(1)
    with pytest.raises(ccxt.DDoSProtection, match="EAPI:Rate limit exceeded"):
        client.fetch_balance()
    assert int(client.last_response_headers["Retry-After"]) >= 1


def test_unknown_method_and_pair(emulator: Emulator, client: Any) -> None:
    with pytest.raises(ccxt.ExchangeError, match="EQuery:Unknown asset pair"):
        client.publicGetDepth({"pair": "NOPE"})
    with urllib.request.urlopen(emulator.base_url + "/0/public/Time") as answer:
        assert b'"unixtime"' in answer.read()


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("EAPI:Invalid key", ccxt.AuthenticationError),
        ("EAPI:Invalid signature", ccxt.ExchangeError),
        ("EGeneral:Permission denied", ccxt.PermissionDenied),
    ],
)
def test_forced_key_refusals(client: Any, emulator: Emulator, code: str, error: type[Exception]) -> None:
    emulator.faults.reject_auth(count=1, code=code)
    with pytest.raises(error, match=code):
        client.fetch_balance()


def test_tick_size_and_lockout(client: Any, emulator: Emulator) -> None:
    emulator.faults.filter_failure("PRICE_FILTER")
    with pytest.raises(ccxt.ExchangeError, match="EOrder:Tick size check failed"):
        ioc(client, "buy", "0.1", "65015")
    emulator.faults.too_many_requests(retry_after=30)
    with pytest.raises(ccxt.DDoSProtection, match="EAPI:Rate limit exceeded"):
        client.fetch_balance()
    client.fetch_balance()  # sending on during Retry-After: answered, but counted
    client.fetch_balance()
    with pytest.raises(ccxt.DDoSProtection, match="EGeneral:Temporary lockout"):
        client.fetch_balance()
    assert emulator.stats()["requests_during_retry_after"] == 3
