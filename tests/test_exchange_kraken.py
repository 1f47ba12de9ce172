"""The Kraken profile through the generic adapter, against the Kraken emulator (the real `ccxt.kraken` client).

What a Kraken user relies on beyond the contract suite: an order is found by our key even though ccxt's
`fetch_order` cannot find it (it sends the key as `userref`), also when markets come from the cache on a
pair whose id is not its altname (XXBTZUSD / XBTUSD); the settle window is the AddOrder deadline plus a
second; a request refused for its deadline never traded and is an unknown outcome to look up, not a
rejection; and the refusals ccxt leaves as a bare ExchangeError (duplicate id, cost minimum, bad
signature) reach the executor as what they are.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from exec_helpers import levels, write_config, write_snapshot

from rebalancer_cli.config import load_config
from rebalancer_cli.errors import (
    ExchangeAuthError,
    ExchangeUnavailableError,
    InvalidOrderError,
    OrderAlreadyPlacedError,
)
from rebalancer_cli.exchange.base import Side
from rebalancer_cli.exchange.ccxt_exchange import CcxtExchange
from rebalancer_cli.exchange.profiles import PROFILES
from rebalancer_cli.ids import new_key
from rebalancer_cli.runtime import open_exchange
from rebalancer_cli.testing.core import Emulator, start_emulator
from rebalancer_cli.testing.kraken import DEFAULT_API_KEY, DEFAULT_SECRET, now_rfc3339

D = Decimal
BOOKS: dict[str, dict[str, Any]] = {
    "BTC/USD": {
        "taker_fee": "0.0026",
        "amount_step": "0.00001",
        "min_notional": "5",
        "bids": levels("64995", "-10", "2"),
        "asks": levels("65005", "10", "2"),
    },
}


@pytest.fixture()
def emu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    monkeypatch.setenv("KRAKEN_KEY", DEFAULT_API_KEY)
    monkeypatch.setenv("KRAKEN_SECRET", DEFAULT_SECRET)
    snapshot = write_snapshot(tmp_path / "emulator.json", {"BTC": D("2"), "USD": D("200000")}, BOOKS)
    with start_emulator(snapshot, exchange="kraken") as emulator:
        yield emulator


def exchange_on(tmp_path: Path, emu: Emulator, **options: Any) -> CcxtExchange:
    config = {
        "id": "kraken",
        "api_url": emu.base_url,
        "credentials_env": {"apiKey": "KRAKEN_KEY", "secret": "KRAKEN_SECRET"},
        "rate_limit_per_minute": 6000,
        "options": {"deadlineSeconds": 3, **options},
    }
    path = write_config(tmp_path, "kraken", config, targets=(("BTC", "0.5", "0.05"), ("USD", "0.5", "0.05")))
    exchange = open_exchange(load_config(path))
    assert isinstance(exchange, CcxtExchange)
    return exchange


def test_settle_window_is_the_deadline_plus_a_second(tmp_path: Path, emu: Emulator) -> None:
    profile = PROFILES["kraken"]
    assert profile.settle_window({}) == 11.0
    assert profile.settle_window({"deadlineSeconds": 100}) == 61.0  # Kraken takes at most now + 60 s
    assert profile.settle_window({"deadlineSeconds": 0.5}) == 4.0  # and at least now + 2 s (3 s, rounded down)
    exchange = exchange_on(tmp_path, emu, deadlineSeconds=4)
    assert exchange.settle_window == 5.0
    exchange.close()


def test_an_order_is_found_by_its_key_from_cached_markets_on_a_legacy_pair(tmp_path: Path, emu: Emulator) -> None:
    first = exchange_on(tmp_path, emu)
    key = new_key()
    placed = first.create_order("BTC/USD", Side.BUY, D("2.5"), key, worst_price=D("65015"))
    first.close()
    assert (placed.status, placed.filled, placed.market) == ("closed", D("2.5"), "BTC/USD")
    assert placed.cost == 2 * D("65005") + D("0.5") * D("65015")  # Kraken's own cost, exact
    again = exchange_on(tmp_path, emu)  # markets from the cache this time
    found = again.fetch_order("BTC/USD", key)
    assert again.client.markets["BTC/USD"]["id"] == "XXBTZUSD"
    assert "load_markets" not in again.calls  # restored from the cache
    again.close()
    assert found is not None
    assert (found.market, found.filled, found.cost) == ("BTC/USD", placed.filled, placed.cost)
    assert [(f.amount, f.price) for f in found.fills] == [(D("2"), D("65005")), (D("0.5"), D("65015"))]
    assert found.fees == {"USD": placed.cost * D("0.0026")}
    assert emu.stats()["orders"][key] == {"accepted": 1, "filled": 1, "rejected": 0, "duplicates": 0}


def test_an_unknown_key_is_none(tmp_path: Path, emu: Emulator) -> None:
    exchange = exchange_on(tmp_path, emu)
    assert exchange.fetch_order("BTC/USD", new_key()) is None
    exchange.close()


def test_a_request_past_its_deadline_never_traded_and_is_looked_up(tmp_path: Path, emu: Emulator) -> None:
    exchange = exchange_on(tmp_path, emu)
    key = new_key()
    emu.faults.latency(3500, endpoint="/0/private/AddOrder", count=1)
    with pytest.raises(ExchangeUnavailableError, match="EService:Deadline elapsed"):
        exchange.create_order("BTC/USD", Side.SELL, D("0.1"), key, worst_price=D("64985"))
    assert emu.stats()["orders"][key] == {"accepted": 0, "filled": 0, "rejected": 1, "duplicates": 0}
    assert emu.free("BTC") == 2
    exchange.close()


def test_a_key_held_by_an_open_order_is_already_placed(tmp_path: Path, emu: Emulator) -> None:
    exchange = exchange_on(tmp_path, emu)
    key = new_key()
    resting = {"clientOrderId": key, "deadline": now_rfc3339(10)}
    exchange.client.create_order("BTC/USD", "limit", "buy", "0.1", "60000", resting)
    with pytest.raises(OrderAlreadyPlacedError, match="EOrder:Duplicate order"):
        exchange.create_order("BTC/USD", Side.BUY, D("0.1"), key, worst_price=D("65015"))
    found = exchange.fetch_order("BTC/USD", key)
    assert found is not None and found.status == "open"
    exchange.cancel_order("BTC/USD", key)
    found = exchange.fetch_order("BTC/USD", key)
    assert found is not None and found.status == "canceled"
    exchange.close()


def test_refusals_ccxt_leaves_generic_are_what_they_are(
    tmp_path: Path, emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    exchange = exchange_on(tmp_path, emu)
    with pytest.raises(InvalidOrderError, match="EOrder:Cost minimum not met"):
        exchange.create_order("BTC/USD", Side.BUY, D("0.00005"), new_key(), worst_price=D("65015"))
    exchange.close()
    monkeypatch.setenv("KRAKEN_SECRET", base64.b64encode(b"a secret of the right shape, unknown here.......").decode())
    (tmp_path / "other").mkdir()
    refused = exchange_on(tmp_path / "other", emu)
    with pytest.raises(ExchangeAuthError, match="EAPI:Invalid signature"):
        refused.fetch_balances()
    refused.close()


def test_ordermin_is_the_step_where_it_is_whole_lots() -> None:
    """Kraken's `ordermin` (0.00005 BTC) is far above its lot (1e-8): sizes in steps of ordermin never fall
    below it; a minimum that is not whole lots leaves the lot, and Kraken refuses what falls below."""
    import ccxt

    profile = PROFILES["kraken"]

    def market(minimum: str) -> dict[str, Any]:
        return {"precision": {"amount": "0.00000001"}, "limits": {"amount": {"min": minimum}}}

    assert profile.amount_step(market("0.00005"), ccxt.TICK_SIZE) == D("0.00005")
    assert profile.amount_step(market("0.000000015"), ccxt.TICK_SIZE) == D("0.00000001")
    assert profile.amount_step(market("0.00000001"), ccxt.TICK_SIZE) == D("0.00000001")


def test_only_a_long_uuid_is_one_of_our_keys() -> None:
    profile = PROFILES["kraken"]
    key = new_key()
    assert profile.client_order_id(key) == key and profile.key_of(key) == key
    assert profile.key_of("free-text-id") is None
    assert profile.client_id_pattern.match("free-text-id")  # Kraken takes it, but it is none of ours
