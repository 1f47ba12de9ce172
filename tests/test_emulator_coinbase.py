"""The loopback Coinbase Advanced Trade emulator, driven by the real `ccxt.coinbase` client (nothing mocked).

These tests pin down what ccxt sees from the Coinbase dialect: products with Coinbase's increments and
minimums, Advanced Trade accounts (available and held), the CDP key JWT and its 2-minute lifetime, the
"not unique: the existing order is returned" client order id rule, the failure envelopes and the ccxt
exception class each answer turns into (the table in `rebalancer_cli/testing/coinbase.py`).
"""

from __future__ import annotations

import base64
import json
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
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from rebalancer_cli.exchange.ccxt_exchange import realized_volatility
from rebalancer_cli.testing.coinbase import CLIENT_ID_MAX, DEFAULT_KEY_NAME, CoinbaseDialect
from rebalancer_cli.testing.core import Emulator, start_emulator

D = Decimal
CID = "0193a3e1-7c2b-7d4e-8f10-123456789abc"

SNAPSHOT: dict[str, Any] = {
    "taken_at": "2026-11-27T10:00:00Z",
    "balances": {"BTC": "1.5", "ETH": "20", "USD": "100000"},
    "locked": {"USD": "250"},
    "markets": {
        "BTC/USD": {
            "taker_fee": "0.006",
            "amount_step": "0.00000001",
            "min_notional": "1",
            "bids": [["64990", "0.5"], ["64980", "2"]],
            "asks": [["65010", "0.4"], ["65020", "3"]],
            "volatility": "0.03",
        },
        "ETH/USD": {
            "taker_fee": "0.006",
            "amount_step": "0.0001",
            "min_notional": "1",
            "bids": [["3400.5", "10"], ["3400", "20"]],
            "asks": [["3401", "8"], ["3401.5", "30"]],
            "volatility": "0.04",
        },
    },
}


@pytest.fixture(scope="module")
def snapshot_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("coinbase") / "snapshot.yaml"
    path.write_text(yaml.safe_dump(SNAPSHOT))
    return path


@pytest.fixture()
def emulator(snapshot_file: Path) -> Iterator[Emulator]:
    emu = start_emulator(snapshot_file, exchange="coinbase")
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture()
def exchange(emulator: Emulator) -> Any:
    client = emulator.client()
    client.load_markets()
    return client


def _ioc(client: Any, side: str, amount: str, price: str, cid: str = CID) -> Any:
    return client.create_order("BTC/USD", "limit", side, amount, price, {"timeInForce": "IOC", "client_order_id": cid})


def _client(url: str, api_key: str, secret: str) -> Any:
    """A real `ccxt.coinbase` on the emulator with other credentials than the ones it accepts."""
    return CoinbaseDialect().client(url, {"apiKey": api_key, "secret": secret})


def _raw(emulator: Emulator, path: str, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(emulator.base_url + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_products_carry_coinbase_increments_minimums_and_the_account_fee_tier(exchange: Any) -> None:
    btc = exchange.markets["BTC/USD"]
    assert btc["id"] == "BTC-USD"
    assert btc["precision"] == {"amount": "0.00000001", "price": "0.01"}
    assert btc["limits"]["amount"]["min"] == "0.00000001"
    assert btc["limits"]["cost"]["min"] == "1"
    assert btc["taker"] == "0.006"  # from /transaction_summary, read by load_markets with credentials
    assert exchange.fetch_trading_fees()["ETH/USD"]["taker"] == "0.006"


def test_accounts_report_available_and_hold(exchange: Any) -> None:
    balance = exchange.fetch_balance()
    assert balance["USD"] == {"free": "100000", "used": "250", "total": "100250"}
    assert balance["BTC"]["free"] == "1.5"


def test_best_bid_ask_of_several_products_in_one_request_and_full_books(emulator: Emulator, exchange: Any) -> None:
    tops = exchange.fetch_bids_asks(["BTC/USD", "ETH/USD"])
    assert (tops["ETH/USD"]["bid"], tops["ETH/USD"]["ask"], tops["ETH/USD"]["askVolume"]) == ("3400.5", "3401", "8")
    assert emulator.stats()["requests"]["GET /api/v3/brokerage/best_bid_ask"] == 1
    book = exchange.fetch_order_book("BTC/USD", 100)
    assert [level[0] for level in book["asks"]] == [65010, 65020]


def test_daily_candles_match_the_snapshot_volatility(exchange: Any) -> None:
    candles = exchange.fetch_ohlcv("BTC/USD", "1d", limit=31)
    assert len(candles) >= 30 and candles[0][0] < candles[-1][0]
    sigma = realized_volatility([D(c[4]) for c in candles])
    assert sigma is not None and abs(sigma - D("0.03")) < D("0.006")


def test_ioc_limit_fills_what_crosses_charges_the_fee_in_quote_and_cancels_the_rest(
    emulator: Emulator, exchange: Any
) -> None:
    placed = _ioc(exchange, "buy", "1", "65010")
    assert placed["clientOrderId"] == CID and placed["status"] is None  # a create answer carries no status
    order = exchange.fetch_order(placed["id"], "BTC/USD")
    assert (order["status"], order["filled"], order["amount"], order["timeInForce"]) == ("canceled", "0.4", "1", "IOC")
    assert order["fee"] == {"cost": "156.024", "currency": "USD"}
    assert emulator.free("BTC") == D("1.9")
    assert emulator.free("USD") == D("100000") - D("26004") - D("156.024")
    fills = exchange.fetch_my_trades("BTC/USD", None, None, {"order_ids": [placed["id"]]})
    assert [(f["amount"], f["price"], f["fee"]["currency"]) for f in fills] == [("0.4", "65010", "USD")]


def test_a_repeated_client_order_id_answers_with_the_existing_order_and_trades_nothing(
    emulator: Emulator, exchange: Any
) -> None:
    first = _ioc(exchange, "sell", "0.1", "64990")
    again = _ioc(exchange, "sell", "0.2", "64000")
    assert again["id"] == first["id"]
    assert emulator.stats()["orders"][CID] == {"accepted": 1, "filled": 1, "rejected": 0, "duplicates": 1}
    assert emulator.free("BTC") == D("1.4")


def test_client_order_id_longer_than_the_limit_is_a_bad_request(emulator: Emulator, exchange: Any) -> None:
    with pytest.raises(ccxt.BadRequest):
        _ioc(exchange, "buy", "0.1", "65010", cid="x" * (CLIENT_ID_MAX + 1))
    assert emulator.stats()["orders_accepted"] == 0


def test_list_orders_filters_by_product_and_time_and_pages_by_cursor(emulator: Emulator, exchange: Any) -> None:
    for i in range(3):
        _ioc(exchange, "buy", "0.01", "65010", cid=f"{CID[:-1]}{i}")
    page = exchange.v3PrivateGetBrokerageOrdersHistoricalBatch({"product_ids": ["BTC-USD"], "limit": 2})
    assert [o["client_order_id"][-1] for o in page["orders"]] == ["2", "1"] and page["has_next"]
    rest = exchange.v3PrivateGetBrokerageOrdersHistoricalBatch(
        {"product_ids": ["BTC-USD"], "limit": 2, "cursor": page["cursor"]}
    )
    assert [o["client_order_id"][-1] for o in rest["orders"]] == ["0"] and not rest["has_next"]
    later = exchange.v3PrivateGetBrokerageOrdersHistoricalBatch(
        {"product_ids": ["ETH-USD"], "start_date": "2020-01-01T00:00:00Z"}
    )
    assert later["orders"] == []


@pytest.mark.parametrize(
    ("amount", "price", "reason"),
    [
        ("0.000000001", "65010", "INVALID_SIZE_PRECISION"),
        ("0.00001", "65010", "PREVIEW_INVALID_QUOTE_SIZE_TOO_SMALL"),
        ("0.1", "65010.005", "INVALID_PRICE_PRECISION"),
    ],
)
def test_size_rules_are_refused_with_coinbase_failure_reasons(
    emulator: Emulator, exchange: Any, amount: str, price: str, reason: str
) -> None:
    body = {
        "client_order_id": CID,
        "product_id": "BTC-USD",
        "side": "BUY",
        "order_configuration": {"sor_limit_ioc": {"base_size": amount, "limit_price": price}},
    }
    # ccxt would round the size and price to the product's increments first: send the raw request
    with pytest.raises(ccxt.ExchangeError) as caught:
        exchange.v3PrivatePostBrokerageOrders(body)
    assert type(caught.value) is ccxt.ExchangeError and reason in str(caught.value)
    assert emulator.stats()["orders"][CID]["rejected"] == 1


def test_insufficient_funds_real_and_injected(emulator: Emulator, exchange: Any) -> None:
    with pytest.raises(ccxt.InsufficientFunds):
        _ioc(exchange, "sell", "2", "64000")
    emulator.faults.insufficient_balance()
    with pytest.raises(ccxt.InsufficientFunds):
        _ioc(exchange, "buy", "0.01", "65010", cid=CID[:-1] + "0")
    assert emulator.stats()["orders_accepted"] == 0


def test_unknown_field_and_unsupported_configuration_are_refused(exchange: Any) -> None:
    with pytest.raises(ccxt.ExchangeError, match="unknown field"):
        exchange.create_order("BTC/USD", "limit", "buy", "0.01", "65010", {"timeInForce": "IOC", "orderLinkId": "x"})
    with pytest.raises(ccxt.ExchangeError) as caught:  # ccxt maps only the preview reason, never `error`
        exchange.create_order("BTC/USD", "limit", "buy", "0.01", "65010", {"timeInForce": "GTD", "end_time": "x"})
    assert type(caught.value) is ccxt.ExchangeError and "UNSUPPORTED_ORDER_CONFIGURATION" in str(caught.value)


def test_unknown_order_id_is_not_found_but_ccxt_raises_a_plain_exchange_error(exchange: Any) -> None:
    with pytest.raises(ccxt.ExchangeError) as caught:
        exchange.fetch_order("c0b1a5e0-0000-4000-8000-00000000beef")
    assert type(caught.value) is ccxt.ExchangeError and "NOT_FOUND" in str(caught.value)


def test_cancel_by_order_id_of_a_closed_order_fails_per_result(exchange: Any) -> None:
    placed = _ioc(exchange, "buy", "0.01", "65010")
    with pytest.raises(ccxt.BadRequest):
        exchange.cancel_order(placed["id"])


def test_bad_signature_unknown_key_and_legacy_hmac_are_401_unauthorized(emulator: Emulator) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()
    with pytest.raises(ccxt.AuthenticationError):
        _client(emulator.base_url, DEFAULT_KEY_NAME, pem).fetch_balance()
    with pytest.raises(ccxt.AuthenticationError):
        _client(emulator.base_url, "organizations/x/apiKeys/y", emulator.secret).fetch_balance()
    with pytest.raises(ccxt.AuthenticationError):  # a legacy key (not a PEM): ccxt signs CB-ACCESS-* headers
        _client(emulator.base_url, "legacy-key", "legacy-secret").fetch_balance()
    status, body = _raw(emulator, "/api/v3/brokerage/accounts", {})
    assert (status, body) == (401, "Unauthorized")


def test_an_ed25519_cdp_key_signs_eddsa_tokens_that_are_verified_too(snapshot_file: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    secret = base64.b64encode(raw + public).decode()  # 88 characters: ccxt signs EdDSA with it
    name = "0b6e3c1d-2a4f-4e8b-9c7d-1f2e3a4b5c6d"
    with start_emulator(snapshot_file, exchange="coinbase", api_key=name, secret=secret) as emu:
        assert _client(emu.base_url, name, secret).fetch_balance()["BTC"]["free"] == "1.5"
        other = base64.b64encode(bytes(64)).decode()
        with pytest.raises(ccxt.AuthenticationError):
            _client(emu.base_url, name, other).fetch_balance()


def test_a_token_is_valid_two_minutes_and_only_for_its_own_uri(emulator: Emulator) -> None:
    client = emulator.client()
    url = emulator.base_url + "/api/v3/brokerage/accounts"
    now = int(time.time())
    fresh = client.create_auth_token(now, "GET", url)
    assert _raw(emulator, "/api/v3/brokerage/accounts", {"Authorization": f"Bearer {fresh}"})[0] == 200
    stale = client.create_auth_token(now - 121, "GET", url)
    assert _raw(emulator, "/api/v3/brokerage/accounts", {"Authorization": f"Bearer {stale}"}) == (401, "Unauthorized")
    held = client.create_auth_token(now - 100, "GET", url)  # signed 100 s ago: still accepted
    assert _raw(emulator, "/api/v3/brokerage/accounts", {"Authorization": f"Bearer {held}"})[0] == 200
    elsewhere = client.create_auth_token(now, "GET", emulator.base_url + "/api/v3/brokerage/transaction_summary")
    assert _raw(emulator, "/api/v3/brokerage/accounts", {"Authorization": f"Bearer {elsewhere}"})[0] == 401


def test_forced_refusals_rate_limit_and_faults_map_to_ccxt_classes(emulator: Emulator, exchange: Any) -> None:
    emulator.faults.reject_auth(1)
    with pytest.raises(ccxt.AuthenticationError):
        exchange.fetch_balance()
    emulator.faults.reject_auth(1, code="permission_denied")
    with pytest.raises(ccxt.PermissionDenied):
        exchange.fetch_balance()
    emulator.faults.http_5xx(1, status=503)
    with pytest.raises(ccxt.ExchangeNotAvailable):
        exchange.fetch_balance()
    emulator.set_weight_limit(1)
    time.sleep(1.05)  # the private budget: 30 requests a second (here 1), in a sliding one-second window
    exchange.fetch_balance()
    with pytest.raises(ccxt.RateLimitExceeded):
        exchange.fetch_balance()
    assert exchange.last_response_headers.get("Retry-After") == "1"


def test_an_order_whose_outcome_is_unknown_is_placed_and_ccxt_sees_an_exchange_error(
    emulator: Emulator, exchange: Any
) -> None:
    emulator.faults.timeout_after_accept(mode="unknown_status")
    with pytest.raises(ccxt.ExchangeError) as caught:
        _ioc(exchange, "buy", "0.01", "65010")
    assert type(caught.value) is ccxt.ExchangeError and "DEADLINE_EXCEEDED" in str(caught.value)
    assert emulator.stats()["orders"][CID]["accepted"] == 1
    listed = exchange.v3PrivateGetBrokerageOrdersHistoricalBatch({"product_ids": ["BTC-USD"]})
    assert [o["client_order_id"] for o in listed["orders"]] == [CID]


def test_public_reads_need_no_key(emulator: Emulator) -> None:
    status, body = _raw(emulator, "/api/v3/brokerage/market/products?product_type=FUTURE", {})
    assert status == 200 and json.loads(body)["products"] == []
