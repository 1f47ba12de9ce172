"""The OKX (API v5) emulator dialect, driven by the real `ccxt.okx` client (nothing mocked).

These tests pin down what ccxt sees from it, the table in `rebalancer_cli/testing/okx.py`: OKX's shapes,
signature and its 30 s validity window, client order id rules, the duplicate-id rule that frees an id
once its order is done, and the ccxt exception class each refusal or fault turns into.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import ccxt
import pytest
import yaml
from exec_helpers import write_config

from rebalancer_cli.config import load_config
from rebalancer_cli.errors import InputError, NonRetryableExchangeError
from rebalancer_cli.exchange.base import Side
from rebalancer_cli.exchange.ccxt_exchange import rebase_urls
from rebalancer_cli.exchange.profiles.okx import OKX
from rebalancer_cli.ids import new_key
from rebalancer_cli.runtime import open_exchange
from rebalancer_cli.testing.core import Emulator, start_emulator
from rebalancer_cli.testing.okx import OkxDialect

D = Decimal

SNAPSHOT: dict[str, Any] = {
    "taken_at": "2026-11-27T10:00:00Z",
    "balances": {"BTC": "1.5", "ETH": "20", "USDC": "100000"},
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
            "taker_fee": "0.0008",
            "amount_step": "0.0001",
            "min_notional": "5",
            "bids": [["3400.5", "10"], ["3400", "20"]],
            "asks": [["3401", "8"], ["3401.5", "30"]],
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
    with start_emulator(snapshot_file, exchange="okx") as emu:
        yield emu


@pytest.fixture()
def okx(emulator: Emulator) -> Any:
    client = emulator.client()
    client.load_markets()
    return client


def sandboxed(emulator: Emulator) -> Any:
    """A client in ccxt's sandbox mode (OKX: same host, header `x-simulated-trading: 1`), rebased after
    the switch, as the adapter does, since ccxt swaps in its own test URLs."""
    client = emulator.client()
    client.set_sandbox_mode(True)
    client.urls["api"] = rebase_urls(client.urls["api"], emulator.base_url)
    assert client.headers == {"x-simulated-trading": "1"}
    return client


def ioc(client: Any, side: str, amount: str, price: str, client_id: str, symbol: str = "BTC/USDC") -> Any:
    return client.create_order(symbol, "limit", side, amount, price, {"clientOrderId": client_id, "timeInForce": "IOC"})


def test_markets_give_tick_lot_and_min_size_but_no_min_notional(okx: Any) -> None:
    btc = okx.markets["BTC/USDC"]
    assert (btc["id"], btc["spot"], btc["active"]) == ("BTC-USDC", True, True)
    assert D(btc["precision"]["amount"]) == D("0.00001")  # lotSz
    assert D(btc["precision"]["price"]) == D("0.1")  # tickSz
    # minSz: the smallest lot multiple worth the snapshot's min_notional (10) at its mid (65000)
    assert D(btc["limits"]["amount"]["min"]) == D("0.00016")  # 0.00016 * 65000 = 10.4
    assert btc["limits"]["cost"]["min"] is None  # OKX publishes no minimum notional for spot
    assert D(okx.fetch_trading_fee("ETH/USDC")["taker"]) == D("0.0008")  # singular: fetchTradingFees is False


def test_balances_tickers_books_and_candles(emulator: Emulator, okx: Any) -> None:
    balance = okx.fetch_balance()
    assert (D(balance["BTC"]["free"]), D(balance["USDC"]["free"])) == (D("1.5"), D("100000"))
    tickers = okx.fetch_tickers(["BTC/USDC", "ETH/USDC"])
    assert (D(tickers["BTC/USDC"]["bid"]), D(tickers["BTC/USDC"]["ask"])) == (D("64990"), D("65010"))
    assert D(tickers["ETH/USDC"]["askVolume"]) == D("8")
    book = okx.publicGetMarketBooks({"instId": "BTC-USDC", "sz": "5"})["data"][0]
    assert book["bids"] == [["64990", "0.5", "0", "1"], ["64980", "2", "0", "1"]]
    daily = okx.fetch_ohlcv("BTC/USDC", "1d", limit=31)
    assert len(daily) == 31 and daily[1][0] - daily[0][0] == 86_400_000
    assert daily[0][0] % 86_400_000 == 0  # 1Dutc: ccxt asks for UTC days
    assert D(daily[-1][4]) == D("65000")  # the open candle closes at the mid
    requests = emulator.stats()["requests"]
    assert requests["GET /api/v5/market/candles"] == 1
    assert requests["GET /api/v5/asset/currencies"] == 1  # ccxt's load_markets with credentials


def test_ioc_limit_fills_what_crosses_and_the_answer_carries_no_state(emulator: Emulator, okx: Any) -> None:
    placed = ioc(okx, "buy", "0.5", "65010", "buy1")
    assert (placed["clientOrderId"], placed["status"], placed["filled"]) == ("buy1", None, None)
    order = okx.fetch_order(None, "BTC/USDC", {"clientOrderId": "buy1"})
    # 0.4 at 65010 filled; the rest expired: OKX calls it canceled, with accFillSz what did fill
    assert (order["status"], D(order["filled"]), D(order["amount"])) == ("canceled", D("0.4"), D("0.5"))
    assert order["fee"] == {"cost": "0.0004", "currency": "BTC"}
    trades = okx.fetch_my_trades("BTC/USDC", None, None, {"ordId": order["id"]})
    assert [(D(t["amount"]), D(t["price"]), D(t["fee"]["cost"])) for t in trades] == [
        (D("0.4"), D("65010"), D("0.0004"))
    ]
    assert emulator.free("BTC") == D("1.5") + D("0.4") - D("0.0004")
    assert emulator.stats()["orders"]["buy1"] == {"accepted": 1, "filled": 0, "rejected": 0, "duplicates": 0}


def test_a_done_order_frees_its_client_id_and_a_repeat_trades_again(emulator: Emulator, okx: Any) -> None:
    """OKX refuses a repeated clOrdId (51016) only while the first order is live: after a fill, only a
    lookup by clOrdId protects a re-send."""
    ioc(okx, "sell", "0.1", "64990", "sell1")
    ioc(okx, "sell", "0.1", "64990", "sell1")
    assert emulator.stats()["orders"]["sell1"]["filled"] == 2
    okx.create_order("ETH/USDC", "limit", "buy", "1", "3300", {"clientOrderId": "rest1"})  # rests, live
    with pytest.raises(ccxt.InvalidOrder, match=re.escape('"sCode":"51016","sMsg":"Client order ID already exists."')):
        okx.create_order("ETH/USDC", "limit", "buy", "1", "3300", {"clientOrderId": "rest1"})
    assert emulator.stats()["orders"]["rest1"]["duplicates"] == 1
    okx.cancel_order(None, "ETH/USDC", {"clientOrderId": "rest1"})
    with pytest.raises(ccxt.OrderNotFound, match="51400"):
        okx.cancel_order(None, "ETH/USDC", {"clientOrderId": "rest1"})


@pytest.mark.parametrize("client_id", ["0190a5c2-7f3e-7c1a-9d2b-3e4f5a6b7c8d", "a" * 33, "with_underscore"])
def test_client_ids_outside_okx_rules_are_refused(emulator: Emulator, okx: Any, client_id: str) -> None:
    with pytest.raises(ccxt.BadRequest, match='"sCode":"51000","sMsg":"Parameter clOrdId error"'):
        ioc(okx, "sell", "0.1", "64990", client_id)
    assert emulator.stats()["orders_accepted"] == 0


def test_refusals_map_to_the_classes_ccxt_really_raises(emulator: Emulator, okx: Any) -> None:
    with pytest.raises(ccxt.InvalidOrder, match="51020"):
        ioc(okx, "sell", "0.0001", "64990", "small1")  # below minSz
    with pytest.raises(ccxt.InsufficientFunds, match="Insufficient BTC balance in account"):
        ioc(okx, "sell", "2", "64000", "big1")
    emulator.faults.filter_failure("LOT_SIZE")
    with pytest.raises(ccxt.InvalidOrder, match="51121"):
        ioc(okx, "sell", "0.1", "64990", "lot1")
    emulator.faults.insufficient_balance()
    with pytest.raises(ccxt.InsufficientFunds):
        ioc(okx, "sell", "0.1", "64990", "poor1")
    with pytest.raises(ccxt.OrderNotFound, match="51603"):
        okx.fetch_order(None, "BTC/USDC", {"clientOrderId": "never1"})
    off_tick = {"instId": "BTC-USDC", "tdMode": "cash", "side": "sell", "ordType": "ioc", "sz": "0.1"}
    with pytest.raises(ccxt.BadRequest, match="Parameter px error"):  # ccxt rounds to tickSz; sent raw here
        okx.privatePostTradeBatchOrders([{**off_tick, "px": "64990.05", "clOrdId": "offtick1"}])
    with pytest.raises(ccxt.BadSymbol, match="51001"):
        okx.privateGetTradeOrder({"instId": "DOGE-USDC", "clOrdId": "never1"})
    counts = emulator.stats()["orders"]
    assert all(c["rejected"] == 1 for c in counts.values()) and len(counts) == 5


def test_signature_passphrase_key_and_environment_are_checked(emulator: Emulator, okx: Any) -> None:
    def refused_with(credentials: dict[str, str]) -> Any:
        client = emulator.dialect.client(emulator.base_url, {**emulator.credentials, **credentials})
        with pytest.raises(ccxt.AuthenticationError) as caught:
            client.fetch_balance()
        return json.loads(str(caught.value).split(" ", 1)[1])["code"]

    assert refused_with({"secret": "not-the-secret"}) == "50113"
    assert refused_with({"password": "not-the-passphrase"}) == "50105"
    assert refused_with({"apiKey": "unknown-key"}) == "50111"
    with pytest.raises(ccxt.AuthenticationError, match="50101"):
        sandboxed(emulator).fetch_balance()  # a live key sent to demo trading
    emulator.faults.reject_auth(count=1)
    with pytest.raises(ccxt.AuthenticationError, match="50111"):
        okx.fetch_balance()
    # a POST body is signed too: the order endpoint verifies it
    assert ioc(okx, "sell", "0.1", "64990", "signed1")["id"]


def test_a_demo_key_answers_only_sandbox_requests(snapshot_file: Path) -> None:
    with start_emulator(snapshot_file, exchange=OkxDialect(simulated=True)) as emu:
        client = sandboxed(emu)
        assert D(client.fetch_balance()["BTC"]["free"]) == D("1.5")
        assert ioc(client, "sell", "0.1", "64990", "demo1")["id"]


def test_a_signed_request_is_honoured_for_30_seconds_and_no_longer(okx: Any) -> None:
    """OKX's whole validity window: 50102 beyond 30 s (ccxt's clock offset stands in for transit time)."""
    okx.options["timeDifference"] = 29_000  # signed 29 s before it arrives: still accepted
    assert ioc(okx, "sell", "0.1", "64990", "late29")["id"]
    okx.options["timeDifference"] = 31_000
    with pytest.raises(ccxt.InvalidNonce, match="50102"):
        ioc(okx, "sell", "0.1", "64990", "late31")
    okx.options["timeDifference"] = -31_000  # from the future
    with pytest.raises(ccxt.InvalidNonce, match="50102"):
        okx.fetch_balance()


def test_rate_limit_and_faults_map_to_ccxt_classes(snapshot_file: Path) -> None:
    with start_emulator(snapshot_file, exchange="okx", weight_limit=2) as emu:
        client = emu.client()
        client.load_markets()
        for i in range(2):
            ioc(client, "sell", "0.1", "64990", f"rl{i}")
        with pytest.raises(ccxt.RateLimitExceeded, match="50011"):
            ioc(client, "sell", "0.1", "64990", "rl2")
        assert client.last_response_headers["Retry-After"] in ("1", "2")
        emu.reset()
        emu.faults.http_5xx(status=503, endpoint="/api/v5/account/balance")
        with pytest.raises(ccxt.ExchangeNotAvailable):
            client.fetch_balance()
        emu.faults.http_5xx(status=504, endpoint="/api/v5/account/balance")
        with pytest.raises(ccxt.RequestTimeout):
            client.fetch_balance()
        emu.faults.timeout_after_accept(mode="unknown_status")
        with pytest.raises(ccxt.RequestTimeout, match="50004"):
            ioc(client, "sell", "0.1", "64990", "unknown1")
        assert emu.stats()["orders"]["unknown1"]["filled"] == 1  # placed and filled all the same
        emu.faults.drop_connection(endpoint=emu.dialect.order_path)
        with pytest.raises(ccxt.NetworkError):
            ioc(client, "sell", "0.1", "64990", "dropped1")
        assert "dropped1" not in emu.stats()["orders"]


def test_unknown_path_is_an_okx_error(emulator: Emulator) -> None:
    request = urllib.request.Request(emulator.base_url + "/api/v5/nowhere")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 404


def test_an_order_past_its_exp_time_is_not_processed(emulator: Emulator, okx: Any) -> None:
    """ "Transaction timeouts": the `expTime` header bounds how late an order request may still execute."""
    market = okx.market("BTC/USDC")
    order = {"instId": market["id"], "tdMode": "cash", "side": "sell", "ordType": "ioc", "px": "64990", "sz": "0.1"}
    okx.headers = {"expTime": str(int(time.time() * 1000) - 1)}
    with pytest.raises(ccxt.ExchangeError, match="50036"):
        okx.privatePostTradeBatchOrders([{**order, "clOrdId": "expired1"}])
    okx.headers = {"expTime": str(int(time.time() * 1000) + 5000)}
    assert okx.privatePostTradeBatchOrders([{**order, "clOrdId": "intime1"}])["data"][0]["sCode"] == "0"
    assert set(emulator.stats()["orders"]) == {"intime1"}


@pytest.mark.parametrize(("status", "expected"), [(500, ccxt.ExchangeNotAvailable), (503, ccxt.OnMaintenance)])
def test_internal_errors_in_okx_words(emulator: Emulator, okx: Any, status: int, expected: type) -> None:
    emulator.faults.http_5xx(status=status, body="exchange", endpoint="/api/v5/account/balance")
    with pytest.raises(expected):
        okx.fetch_balance()


# --- the profile, through the adapter -------------------------------------------------------------------------


def okx_exchange(tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch, **options: Any) -> Any:
    credentials = {"apiKey": "OKX_EMU_KEY", "secret": "OKX_EMU_SECRET", "password": "OKX_EMU_PASSPHRASE"}
    for field, env in credentials.items():
        monkeypatch.setenv(env, emulator.credentials[field])
    exchange = {"id": "okx", "api_url": emulator.base_url, "credentials_env": credentials, "options": options}
    return open_exchange(load_config(write_config(tmp_path, "okx-profile", exchange)))


def test_the_settle_window_is_okx_validity_or_the_exp_time_deadline(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert OKX.settle_window({}) == 32.0  # 30 s of a signed request, 2 s for clocks and transit
    exchange = okx_exchange(tmp_path, emulator, monkeypatch, expTime=1500)
    assert exchange.settle_window == 3.5
    exchange.close()
    with pytest.raises(InputError, match="expTime"):
        okx_exchange(tmp_path, emulator, monkeypatch, expTime=45_000)


def test_an_order_held_in_flight_past_exp_time_never_trades(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `options.expTime` the profile signs every order request with OKX's deadline: a request that
    arrives late is discarded by the exchange (50036), one in time trades, and reads carry no deadline."""
    exchange = okx_exchange(tmp_path, emulator, monkeypatch, expTime=1000)
    key, late = new_key(), new_key()
    emulator.faults.latency(1300, endpoint=emulator.dialect.order_path, method="POST", count=1)
    with pytest.raises(NonRetryableExchangeError, match="50036"):
        exchange.create_order("BTC/USDC", Side.SELL, D("0.1"), late, worst_price=D("64900"))
    assert exchange.fetch_order("BTC/USDC", late) is None
    result = exchange.create_order("BTC/USDC", Side.SELL, D("0.1"), key, worst_price=D("64900"))
    # the placement answer has no state: the profile read the order back, with its fills and exact cost
    assert (result.status, result.filled, result.cost) == ("closed", D("0.1"), D("6499"))
    assert [(f.amount, f.price) for f in result.fills] == [(D("0.1"), D("64990"))]
    assert set(emulator.stats()["orders"]) == {OKX.client_order_id(key)}
    exchange.close()


def test_a_partial_ioc_fill_is_canceled_on_okx_and_booked_as_what_filled(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    exchange = okx_exchange(tmp_path, emulator, monkeypatch)
    result = exchange.create_order("BTC/USDC", Side.BUY, D("0.6"), new_key(), worst_price=D("65010"))
    assert (result.status, result.is_final, result.filled, result.cost) == ("canceled", True, D("0.4"), D("26004"))
    assert result.fees == {"BTC": D("0.0004")}
    exchange.close()
