"""Exchange profiles and the generic adapter: what differs per exchange lives in one profile, and what no
profile proves is refused before anything is sent.

What a user relies on: every registered profile turns the idempotency key into a client order id the
exchange accepts and back; an exchange without a proven profile plans but never executes (exit 2, one line,
nothing sent); `sandbox: true` goes to the exchange's testnet or is refused where none exists; a transient
internal error on a read is retried; and absurd numbers from an exchange are its error, never a crash.
"""

from __future__ import annotations

import decimal
import json
import re
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from exec_helpers import (
    CREDENTIALS_ENV,
    check_consistent,
    cli,
    emu_config,
    emulator_exchange,
    order_counts,
    write_config,
    write_snapshot,
)
from hypothesis import given
from hypothesis import strategies as st

from rebalancer_cli.config import load_config
from rebalancer_cli.errors import (
    ExchangeError,
    ExchangeUnavailableError,
    SandboxUnavailableError,
    UnprovenExchangeError,
)
from rebalancer_cli.exchange.base import Side
from rebalancer_cli.exchange.ccxt_exchange import CcxtExchange, to_decimal
from rebalancer_cli.exchange.profiles import (
    GENERIC,
    PROFILES,
    describe_profiles,
    markdown_table,
    profile_for,
    require_proven,
)
from rebalancer_cli.exchange.profiles.binance import BinanceProfile
from rebalancer_cli.ids import new_key
from rebalancer_cli.runtime import execute, open_exchange
from rebalancer_cli.testing import DIALECTS
from rebalancer_cli.testing.emulator import Emulator, start_emulator

D = Decimal


@pytest.fixture()
def emu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    for name, value in CREDENTIALS_ENV.items():
        monkeypatch.setenv(name, value)
    with start_emulator(write_snapshot(tmp_path / "emulator.json")) as emulator:
        yield emulator


def exchange_on(tmp_path: Path, emu: Emulator, **extra: Any) -> CcxtExchange:
    exchange = open_exchange(load_config(write_config(tmp_path, "profiles", emulator_exchange(emu.base_url, **extra))))
    assert isinstance(exchange, CcxtExchange)
    return exchange


# --- the registry ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exchange_id", sorted(PROFILES))
def test_client_order_ids_fit_the_exchange_rule_and_give_the_key_back(exchange_id: str) -> None:
    profile = PROFILES[exchange_id]
    for _ in range(200):
        key = new_key()
        client_id = profile.client_order_id(key)
        assert profile.client_id_pattern.match(client_id), (exchange_id, client_id)
        assert profile.client_order_id(key) == client_id  # deterministic
        assert profile.key_of(client_id) == key


@pytest.mark.parametrize("exchange_id", sorted(PROFILES))
def test_a_profile_proven_for_execute_has_an_emulator_its_contract_suite_runs_on(exchange_id: str) -> None:
    profile = PROFILES[exchange_id]
    assert profile.id == exchange_id
    if "execute" in profile.proven_for:
        assert exchange_id in DIALECTS, f"{exchange_id} claims execute without an emulator dialect to prove it"
        assert {"plan", "snapshot"} <= profile.proven_for


def test_an_unknown_exchange_gets_the_generic_profile_which_proves_nothing() -> None:
    assert profile_for("kraken-of-the-future") is GENERIC
    assert GENERIC.proven_for == frozenset()
    rows = {row["id"]: row for row in describe_profiles()}
    assert rows["generic"]["allowed"] == ["plan", "snapshot"]
    assert rows["binance"]["allowed"] == ["plan", "snapshot", "execute"]


def test_binance_settle_window_is_its_receive_window_plus_a_second(tmp_path: Path, emu: Emulator) -> None:
    assert PROFILES["binance"].settle_window({}) == 11.0  # ccxt's default recvWindow is 10 s
    exchange = exchange_on(tmp_path, emu, options={"recvWindow": 2500})
    assert exchange.settle_window == 3.5
    exchange.close()


# --- unproven exchanges: plan yes, execute never -------------------------------------------------------------


def unproven_config(tmp_path: Path, emu: Emulator) -> Path:
    """Binance.US: another ccxt exchange (same REST paths as Binance, so the emulator serves it) without a
    proven profile of its own."""
    return write_config(tmp_path, "unproven", emulator_exchange(emu.base_url, id="binanceus"))


def test_an_unproven_exchange_plans_but_execute_is_refused_before_anything_is_sent(
    tmp_path: Path, emu: Emulator
) -> None:
    config = unproven_config(tmp_path, emu)
    planned = cli("plan", "--config", str(config), "--json")
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["trades"]  # the portfolio is off target: the plan trades
    before = emu.stats()["requests_total"]
    refused = cli("execute", "--config", str(config), "--confirm")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "execute on binanceus is refused" in lines[0], refused.stderr
    assert emu.stats()["requests_total"] == before  # not even a balance read
    assert emu.stats()["orders"] == {}
    with pytest.raises(UnprovenExchangeError):
        require_proven(load_config(config), "execute")
    require_proven(load_config(config), "plan")


def test_the_adapter_itself_refuses_orders_on_an_unproven_exchange(tmp_path: Path, emu: Emulator) -> None:
    """The daemon builds its clients itself: the adapter refuses too, before the request leaves."""
    exchange = open_exchange(load_config(unproven_config(tmp_path, emu)))
    with pytest.raises(UnprovenExchangeError):
        exchange.create_order("BTC/USDC", Side.SELL, D("0.1"), new_key(), worst_price=D("1"))
    exchange.close()
    assert emu.stats()["requests_total"] == 0


# --- sandbox -------------------------------------------------------------------------------------------------


def test_sandbox_uses_the_exchange_testnet_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CREDENTIALS_ENV.items():
        monkeypatch.setenv(name, value)
    exchange = {"id": "binance", "sandbox": True, "credentials_env": {"apiKey": "EMU_API_KEY", "secret": "EMU_SECRET"}}
    adapter = open_exchange(load_config(write_config(tmp_path, "sandboxed", exchange)))
    assert isinstance(adapter, CcxtExchange)
    assert "testnet.binance.vision" in adapter.client.urls["api"]["private"]
    adapter.close()


def test_sandbox_is_refused_where_the_exchange_has_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CREDENTIALS_ENV.items():
        monkeypatch.setenv(name, value)
    exchange = {"id": "kraken", "sandbox": True, "credentials_env": {"apiKey": "EMU_API_KEY", "secret": "EMU_SECRET"}}
    with pytest.raises(SandboxUnavailableError, match="kraken has no testnet"):
        open_exchange(load_config(write_config(tmp_path, "sandboxed", exchange)))


# --- transient errors and absurd numbers ----------------------------------------------------------------------


def test_an_internal_error_on_a_read_is_retried_and_on_an_order_is_reported_as_unknown(
    tmp_path: Path, emu: Emulator
) -> None:
    """Binance's -1001 (HTTP 503 with its JSON) comes from ccxt as OperationFailed, not a NetworkError."""
    exchange = exchange_on(tmp_path, emu)
    emu.faults.http_5xx(1, endpoint="/api/v3/account", body="exchange")
    free, _ = exchange.fetch_balances()
    assert free["BTC"] == to_decimal("1.5")
    assert emu.stats()["requests"]["GET /api/v3/account"] == 2  # failed once, retried once
    emu.faults.http_5xx(1, endpoint="/api/v3/order", method="POST", body="exchange")
    with pytest.raises(ExchangeUnavailableError, match="-1001"):
        exchange.create_order("BTC/USDC", Side.SELL, D("0.1"), new_key(), worst_price=D("60000"))
    assert emu.stats()["requests"]["POST /api/v3/order"] == 1  # an order is never re-sent by the adapter
    exchange.close()


@pytest.mark.parametrize(
    "text", ["1e28", "-1E+30", "10000000000000000000000000000", "NaN", "-inf", "sNaN", "1E+999999", "1e-999999"]
)
def test_numbers_beyond_what_money_needs_are_the_exchange_error_naming_the_field(text: str) -> None:
    with pytest.raises(ExchangeError, match="order cost"):
        to_decimal(text, "order cost")


def test_ordinary_numbers_stay_exact() -> None:
    assert str(to_decimal("0.00001000")) == "0.00001"
    assert str(to_decimal("1E+2")) == "100"
    assert str(to_decimal("9999999999999999999999999999.5")) == "9999999999999999999999999999.5"
    assert to_decimal(None) is None


@given(
    st.from_regex(r"-?[0-9]{1,12}(\.[0-9]{0,10})?", fullmatch=True)
    | st.from_regex(r"-?[0-9]{1,6}(\.[0-9]{1,6})?[eE][-+]?[0-9]", fullmatch=True)
    | st.from_regex(r"-?\.[0-9]{1,8}", fullmatch=True)
)
def test_every_number_text_reads_as_its_canonical_decimal_whatever_path_it_takes(text: str) -> None:
    """The plain-digits shortcut (string work instead of normalize + quantize) gives the very Decimal the
    general path gives: same digits, same exponent, so plans compare equal as text."""
    expected = Decimal(text).normalize(decimal.Context(prec=80))
    if expected.adjusted() > 0 and expected.as_tuple().exponent > 0:  # type: ignore[operator]
        expected = expected.quantize(Decimal(1), context=decimal.Context(prec=80))
    got = to_decimal(text)
    assert got is not None and got.as_tuple() == expected.as_tuple() and str(got) == str(expected)


def test_a_huge_amount_in_the_book_is_refused_with_the_field_named(tmp_path: Path, emu: Emulator) -> None:
    emu.set_book("BTC/USDC", bids=[["64995", "1e30"]], asks=[["65005", "2"]])
    config = write_config(tmp_path, "huge", emulator_exchange(emu.base_url))
    planned = cli("plan", "--config", str(config))
    assert planned.returncode == 3, planned.stdout + planned.stderr
    assert "BTC/USDC bid size out of range" in planned.stderr
    assert "Traceback" not in planned.stderr


def test_a_huge_number_in_an_order_answer_is_refused_with_the_field_named(tmp_path: Path, emu: Emulator) -> None:
    exchange = exchange_on(tmp_path, emu)
    key = new_key()
    answer = {"id": "1", "clientOrderId": key, "symbol": "BTC/USDC", "amount": "1", "filled": "1e40", "cost": "1"}
    with pytest.raises(ExchangeError, match="filled amount out of range"):
        exchange._order(answer, key, "BTC/USDC")
    exchange.close()


# --- `rebalance exchanges` and the README -------------------------------------------------------------------


def test_the_exchanges_command_and_the_readme_table_agree_with_the_profiles() -> None:
    listed = cli("exchanges", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == json.loads(json.dumps(describe_profiles()))
    table = cli("exchanges")
    assert table.returncode == 0
    for exchange_id in [*PROFILES, "generic"]:
        assert exchange_id in table.stdout
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert markdown_table() in readme, "README's Exchanges table is stale: paste markdown_table() there"


def test_a_first_execute_on_the_testnet_as_the_readme_shows(tmp_path: Path, emu: Emulator) -> None:
    """`sandbox: true` with the emulator standing in for the testnet host (ccxt's testnet paths are Binance's)."""
    config = write_config(tmp_path, "testnet", emulator_exchange(emu.base_url, sandbox=True))
    dry = cli("execute", "--config", str(config))
    assert dry.returncode == 0 and emu.stats()["orders"] == {}  # a dry run: shown, nothing sent
    done = cli("execute", "--config", str(config), "--confirm", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["status"] == "done"
    again = cli("plan", "--config", str(config), "--json")
    assert json.loads(again.stdout)["trades"] == []


def test_the_adapter_sends_and_looks_up_the_profile_client_order_id_not_the_key(
    tmp_path: Path, emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A profile whose client order id is not the key (OKX's kind: the UUID's 32 hex digits): create, lookup
    after a dropped answer, and the books all go through the mapping."""

    class HexIds(BinanceProfile):
        def client_order_id(self, key: str) -> str:
            return key.replace("-", "")

        def key_of(self, client_order_id: str) -> str | None:
            return str(uuid.UUID(client_order_id)) if re.fullmatch(r"[0-9a-f]{32}", client_order_id) else None

    monkeypatch.setitem(PROFILES, "binance", HexIds())
    config = emu_config(tmp_path, emu, "hex-ids")
    emu.faults.timeout_after_accept(mode="drop")  # the first answer is lost: found again by its client id
    report = execute(config)
    assert report.status == "done"
    counts = order_counts(emu.stats())
    assert {HexIds().key_of(c) for c in counts} == {o.key for o in report.outcomes}
    assert all(re.fullmatch(r"[0-9a-f]{32}", c) for c in counts)
    check_consistent(config, emu, report)
