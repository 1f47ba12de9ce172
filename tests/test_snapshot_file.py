"""The snapshot file (DESIGN.md, "Snapshot file"): validated with the config's care, and saved without loss.

A snapshot is what the planner prices a portfolio from; a book sorted the wrong way or a crossed book
would make every cost estimate wrong, so each is refused at its line. Saving and reloading a snapshot must
give back exactly the same decimals, or a replayed plan would differ from the one that traded.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import EXAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rebalancer_cli.errors import ExitCode, SnapshotError
from rebalancer_cli.snapshot import Market, Snapshot, dump_snapshot, load_snapshot

D = Decimal

# DESIGN.md's example, line for line.
DESIGN_SNAPSHOT = """\
taken_at: "2026-11-27T10:00:00Z"
balances: {BTC: "1.5", ETH: "20", USDC: "30000"}
markets:
  BTC/USDC:
    taker_fee: "0.001"
    amount_step: "0.00001"     # lot size; amounts are rounded down to it
    min_notional: "10"         # orders below it are not placed
    bids: [["64990", "0.5"], ["64980", "2"]]   # best first: [price, amount]
    asks: [["65010", "0.4"], ["65020", "3"]]
    volatility: "0.03"         # optional: daily realized volatility
"""
BIDS = '[["64990", "0.5"], ["64980", "2"]]'
ASKS = '[["65010", "0.4"], ["65020", "3"]]'

Writer = Callable[[str], Path]


@pytest.fixture()
def write(tmp_path: Path) -> Writer:
    def _write(text: str) -> Path:
        path = tmp_path / "snapshot.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return _write


def rendered(path: Path) -> list[str]:
    with pytest.raises(SnapshotError) as info:
        load_snapshot(path)
    assert info.value.exit_code == ExitCode.USAGE
    return [p.render() for p in info.value.problems]


def test_design_example_loads_with_exact_decimals(write: Writer) -> None:
    snap = load_snapshot(write(DESIGN_SNAPSHOT))
    assert snap.taken_at == datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    assert dict(snap.balances) == {"BTC": D("1.5"), "ETH": D("20"), "USDC": D("30000")}
    m = snap.markets["BTC/USDC"]
    assert (m.base, m.quote, m.taker_fee, m.amount_step, m.min_notional) == (
        "BTC",
        "USDC",
        D("0.001"),
        D("0.00001"),
        D("10"),
    )
    assert m.bids == ((D("64990"), D("0.5")), (D("64980"), D("2")))
    assert m.asks == ((D("65010"), D("0.4")), (D("65020"), D("3")))
    assert m.volatility == D("0.03")
    assert m.mid == D("65000")


def test_unquoted_numbers_are_exact_too(write: Writer) -> None:
    snap = load_snapshot(write(DESIGN_SNAPSHOT.replace('taker_fee: "0.001"', "taker_fee: 0.0010")))
    assert str(snap.markets["BTC/USDC"].taker_fee) == "0.0010"


# --- books ------------------------------------------------------------------------------------------------------


def test_bids_must_be_best_first(write: Writer) -> None:
    path = write(DESIGN_SNAPSHOT.replace(BIDS, '[["64980", "0.5"], ["64990", "2"]]'))
    assert rendered(path) == [
        f"{path}:8:11 markets.BTC/USDC.bids: levels must be best (highest) first with distinct prices; "
        "64990 follows 64980"
    ]


def test_asks_must_be_best_first(write: Writer) -> None:
    path = write(DESIGN_SNAPSHOT.replace(ASKS, '[["65020", "0.4"], ["65010", "3"]]'))
    assert rendered(path) == [
        f"{path}:9:11 markets.BTC/USDC.asks: levels must be best (lowest) first with distinct prices; "
        "65010 follows 65020"
    ]


def test_a_repeated_price_is_refused(write: Writer) -> None:
    path = write(DESIGN_SNAPSHOT.replace(ASKS, '[["65010", "0.4"], ["65010", "3"]]'))
    assert rendered(path) == [
        f"{path}:9:11 markets.BTC/USDC.asks: levels must be best (lowest) first with distinct prices; "
        "65010 follows 65010"
    ]


@pytest.mark.parametrize("best_bid", ["65010", "65015"])
def test_a_crossed_or_locked_book_is_refused(write: Writer, best_bid: str) -> None:
    path = write(DESIGN_SNAPSHOT.replace('["64990", "0.5"]', f'["{best_bid}", "0.5"]').replace('"64980"', '"64000"'))
    assert rendered(path) == [
        f"{path}:5:5 markets.BTC/USDC: crossed book: best bid {best_bid} is not below best ask 65010"
    ]


@pytest.mark.parametrize(
    ("level", "column"),
    [('["64980", "0"]', 30), ('["64980", "-2"]', 30), ('["0", "2"]', 30), ('["-64980", "2"]', 30)],
)
def test_levels_must_have_positive_price_and_amount(write: Writer, level: str, column: int) -> None:
    path = write(DESIGN_SNAPSHOT.replace('["64980", "2"]', level))
    assert rendered(path) == [
        f"{path}:8:{column} markets.BTC/USDC.bids[1]: price and amount of a book level must be above 0"
    ]


@pytest.mark.parametrize(
    ("level", "shown"),
    [('["64980", "2", "1"]', ""), ('["64980"]', ""), ('"64980"', " (got 64980)"), ("{price: 64980}", "")],
)
def test_a_level_must_be_a_pair(write: Writer, level: str, shown: str) -> None:
    path = write(DESIGN_SNAPSHOT.replace('["64980", "2"]', level))
    assert rendered(path) == [f"{path}:8:30 markets.BTC/USDC.bids[1]: a book level is a pair [price, amount]{shown}"]


def test_a_level_of_text_is_refused(write: Writer) -> None:
    path = write(DESIGN_SNAPSHOT.replace('["64980", "2"]', '["64980", "lots"]'))
    assert rendered(path) == [f"{path}:8:30 markets.BTC/USDC.bids[1]: must be a number"]


def test_an_empty_book_side_is_refused(write: Writer) -> None:
    path = write(DESIGN_SNAPSHOT.replace(ASKS, "[]"))
    assert rendered(path) == [f"{path}:9:11 markets.BTC/USDC.asks: a book side needs at least one level"]


# --- markets, balances, time --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["BTCUSDC", "BTC/USDC/X", "/USDC", "BTC/", "BTC-USDC"])
def test_market_keys_must_be_base_slash_quote(write: Writer, key: str) -> None:
    path = write(DESIGN_SNAPSHOT.replace("  BTC/USDC:", f'  "{key}":'))
    assert rendered(path) == [f"{path}:4:3 markets.{key}: market '{key}' must be written BASE/QUOTE, e.g. BTC/USDC"]


def test_negative_balance_is_refused(write: Writer) -> None:
    path = write(DESIGN_SNAPSHOT.replace('ETH: "20"', 'ETH: "-0.5"'))
    assert rendered(path) == [f"{path}:2:29 balances.ETH: must be at least 0 (got -0.5)"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("taker_fee", '"0.2"', "must be between 0 and 0.1 (got 0.2)"),
        ("amount_step", '"0"', "must be above 0 (got 0)"),
        ("min_notional", '"-1"', "must be at least 0 (got -1)"),
    ],
)
def test_market_numbers_have_ranges(write: Writer, field: str, value: str, message: str) -> None:
    line = {"taker_fee": 5, "amount_step": 6, "min_notional": 7}[field]
    original = DESIGN_SNAPSHOT.splitlines()[line - 1].split("#")[0].strip()
    path = write(DESIGN_SNAPSHOT.replace(original, f"{field}: {value}"))
    col = 5 + len(f"{field}: ")
    assert rendered(path) == [f"{path}:{line}:{col} markets.BTC/USDC.{field}: {message}"]


@pytest.mark.parametrize(
    ("taken_at", "message"),
    [
        ('"yesterday"', "must be an ISO 8601 time such as 2026-11-27T10:00:00Z (got yesterday)"),
        ('"2026-13-01T10:00:00Z"', "must be an ISO 8601 time such as 2026-11-27T10:00:00Z (got 2026-13-01T10:00:00Z)"),
        ('"2026-11-27T10:00:00"', "must carry a timezone (e.g. a trailing Z for UTC) (got 2026-11-27T10:00:00)"),
        ("2026-11-27 10:00:00", "must carry a timezone (e.g. a trailing Z for UTC) (got 2026-11-27 10:00:00)"),
        ("1764237600", "must be an ISO 8601 time such as 2026-11-27T10:00:00Z (got 1764237600)"),
    ],
)
def test_taken_at_must_be_an_aware_iso_time(write: Writer, taken_at: str, message: str) -> None:
    path = write(DESIGN_SNAPSHOT.replace('"2026-11-27T10:00:00Z"', taken_at))
    assert rendered(path) == [f"{path}:1:11 taken_at: {message}"]


def test_taken_at_with_an_offset_is_read_as_the_same_instant_in_utc(write: Writer) -> None:
    snap = load_snapshot(write(DESIGN_SNAPSHOT.replace('"2026-11-27T10:00:00Z"', "2026-11-27T11:30:00+01:30")))
    assert snap.taken_at == datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


def test_unknown_keys_are_refused_with_a_suggestion(write: Writer) -> None:
    path = write(DESIGN_SNAPSHOT + "    volatilty: 0.1\nbalance: {}\n")
    assert rendered(path) == [
        f"{path}:11:5 markets.BTC/USDC.volatilty: unknown key; did you mean 'volatility'?",
        f"{path}:12:1 balance: unknown key; did you mean 'balances'?",
    ]


def test_every_problem_of_a_snapshot_in_one_run(write: Writer) -> None:
    text = (
        DESIGN_SNAPSHOT.replace('"2026-11-27T10:00:00Z"', '"2026-11-27T10:00:00"')
        .replace('USDC: "30000"', 'USDC: "-1"')
        .replace('["65020", "3"]', '["65000", "3"]')
        + "  ETHUSDC: {taker_fee: 0, amount_step: 1, bids: [[1, 1]], asks: [[2, 1]]}\n"
    )
    path = write(text)
    assert rendered(path) == [
        f"{path}:1:11 taken_at: must carry a timezone (e.g. a trailing Z for UTC) (got 2026-11-27T10:00:00)",
        f"{path}:2:41 balances.USDC: must be at least 0 (got -1)",
        f"{path}:9:11 markets.BTC/USDC.asks: levels must be best (lowest) first with distinct prices; "
        "65000 follows 65010",
        f"{path}:11:3 markets.ETHUSDC: market 'ETHUSDC' must be written BASE/QUOTE, e.g. BTC/USDC",
    ]


def test_file_level_problems_are_snapshot_errors(tmp_path: Path) -> None:
    for path, says in [
        (tmp_path / "missing.yaml", "no such snapshot file"),
        (tmp_path, "is a directory, not a snapshot file"),
    ]:
        with pytest.raises(SnapshotError) as info:
            load_snapshot(path)
        assert [p.render() for p in info.value.problems] == [f"{path} {says}"]
    (tmp_path / "bad.yaml").write_text("markets: {\n")
    with pytest.raises(SnapshotError) as info:
        load_snapshot(tmp_path / "bad.yaml")
    assert info.value.problems[0].render().startswith(f"{tmp_path / 'bad.yaml'}:2:1 not valid YAML")


# --- dump -> load is exact ------------------------------------------------------------------------------------


def _same(a: Snapshot, b: Snapshot) -> None:
    """Equal, and written the same: 0.3500 must come back as 0.3500, not 0.35."""
    assert a.taken_at == b.taken_at
    assert {k: str(v) for k, v in a.balances.items()} == {k: str(v) for k, v in b.balances.items()}
    assert {k: str(v) for k, v in a.locked.items()} == {k: str(v) for k, v in b.locked.items()}
    assert a.markets.keys() == b.markets.keys()
    for symbol, m in a.markets.items():
        n = b.markets[symbol]
        assert m == n
        assert repr((m.taker_fee, m.amount_step, m.min_notional, m.volatility, m.bids, m.asks, m.fee_source)) == repr(
            (n.taker_fee, n.amount_step, n.min_notional, n.volatility, n.bids, n.asks, n.fee_source)
        )


def test_example_market_round_trips_exactly(tmp_path: Path) -> None:
    original = load_snapshot(EXAMPLES / "market.yaml")
    path = tmp_path / "again.yaml"
    path.write_text(dump_snapshot(original))
    again = load_snapshot(path)
    _same(original, again)
    assert str(again.markets["BTC/USDC"].bids[0][1]) == "0.3500"  # trailing zeros survive


def _decimals(min_exp: int, max_exp: int, *, zero: bool = False) -> st.SearchStrategy[Decimal]:
    """Digits times a power of ten: many scales, trailing zeros, and forms str() writes as 1E-7 or 1.2E+5."""
    digits = st.integers(0 if zero else 1, 10**9)
    return st.builds(lambda m, e: Decimal(m).scaleb(e), digits, st.integers(min_exp, max_exp))


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    markets: dict[str, Market] = {}
    for base in draw(st.lists(st.sampled_from(["BTC", "ETH", "SOL", "1INCH"]), unique=True, max_size=3)):
        bid_prices = sorted(draw(st.lists(_decimals(-12, 3), min_size=1, max_size=5, unique=True)), reverse=True)
        asks, price = [], bid_prices[0]
        for gap in draw(st.lists(_decimals(-12, 0), min_size=1, max_size=5)):
            price += gap
            asks.append((price, draw(_decimals(-12, 6))))
        amounts = draw(st.lists(_decimals(-12, 6), min_size=len(bid_prices), max_size=len(bid_prices)))
        markets[f"{base}/USDT"] = Market(
            symbol=f"{base}/USDT",
            base=base,
            quote="USDT",
            taker_fee=draw(st.sampled_from(["0", "0.001", "0.00075", "0.1", "1E-5"]).map(D)),
            amount_step=draw(_decimals(-12, 0)),
            min_notional=draw(_decimals(-4, 3, zero=True)),
            bids=tuple(zip(bid_prices, amounts, strict=True)),
            asks=tuple(asks),
            volatility=draw(st.none() | _decimals(-9, -3, zero=True)),
            fee_source=draw(st.sampled_from(["snapshot", "account", "config"])),
        )
    offset = timedelta(minutes=draw(st.integers(-12 * 60, 14 * 60)))
    taken = draw(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)))
    return Snapshot(
        taken_at=taken.replace(tzinfo=timezone(offset)),
        balances=draw(st.dictionaries(st.sampled_from(["BTC", "ETH", "USDT", "SOL"]), _decimals(-18, 6, zero=True))),
        locked=draw(st.dictionaries(st.sampled_from(["BTC", "USDT"]), _decimals(-8, 3, zero=True))),
        markets=markets,
    )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("round-trip") / "snapshot.yaml"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snap=snapshots())
def test_dump_then_load_is_exact(scratch: Path, snap: Snapshot) -> None:
    scratch.write_text(dump_snapshot(snap))
    _same(snap, load_snapshot(scratch))
