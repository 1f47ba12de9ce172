"""Price inputs of the backtest: the prices CSV, the generator, the synthetic book, rolling volatility."""

from __future__ import annotations

import contextlib
import math
import statistics
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rebalancer_cli.errors import InputError, PricesError
from rebalancer_cli.simulation import csvfile
from rebalancer_cli.simulation.books import BookModel, RollingVolatility, realized_volatility
from rebalancer_cli.simulation.csvfile import dump_prices, load_prices, write_prices
from rebalancer_cli.simulation.generate import REGIMES, Regime, example_prices, generate_prices
from rebalancer_cli.simulation.series import PriceSeries
from rebalancer_cli.snapshot import Market, Snapshot, load_snapshot, save_snapshot

ROOT = Path(__file__).resolve().parent.parent
DAILY_2022 = ROOT / "tests" / "data" / "btc-eth-daily-2022.csv"
START = datetime(2025, 1, 1, tzinfo=UTC)
D = Decimal


def write(tmp_path: Path, text: str, name: str = "prices.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(PricesError) as info:
        load_prices(path)
    return [p.render() for p in info.value.problems]


def log_returns(series: PriceSeries, asset: str) -> list[float]:
    values, _ = series.raw(asset)
    return [math.log(values[i] / values[i - 1]) for i in range(1, len(values))]


def generate(regime: Regime, *, seed: int = 1, correlation: float = 0.6, steps: int = 8760) -> PriceSeries:
    return generate_prices(
        assets={"BTC": D("65000"), "ETH": D("3500")},
        steps=steps,
        step_seconds=3600,
        seed=seed,
        regime=regime,
        correlation=correlation,
        start=START,
    )


# --- loading: what a valid file gives -----------------------------------------------------------------


def test_the_2022_daily_closes_load_exactly_as_written() -> None:
    series = load_prices(DAILY_2022)
    assert series.assets == ("BTC", "ETH")
    assert len(series) == 365
    assert series.step_seconds == 86_400
    assert series.time(0) == datetime(2022, 1, 1, tzinfo=UTC)
    assert series.row(0) == {"BTC": D("47733.43"), "ETH": D("3768.13")}
    # ETH switches from 2 to 1 decimal in 2022: the column keeps 2 and loses nothing
    assert series.price(364, "ETH") == D("1195.1")
    assert series.raw("ETH")[1] == 2


def test_timestamps_accept_dates_datetimes_offsets_and_unix_seconds(tmp_path: Path) -> None:
    text = (
        "timestamp,BTC\n"
        "2025-01-01,100\n"
        "2025-01-01T01:00:00Z,101\n"
        "2025-01-01 02:00:00,102\n"  # naive means UTC
        "2025-01-01T05:00:00+02:00,103\n"  # 03:00 UTC
        f"{int(datetime(2025, 1, 1, 4, tzinfo=UTC).timestamp())},104\n"
    )
    series = load_prices(write(tmp_path, text))
    assert [series.time(i).hour for i in range(5)] == [0, 1, 2, 3, 4]
    assert series.step_seconds == 3600


def test_quotes_spaces_crlf_and_a_bom_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b'\xef\xbb\xbf"date","BTC"\r\n"2025-01-01", 100.5\r\n2025-01-02,101\r\n\r\n')
    series = load_prices(path)
    assert [series.price(i, "BTC") for i in range(2)] == [D("100.5"), D("101")]


def test_ohlc_columns_value_at_the_close_and_keep_high_and_low(tmp_path: Path) -> None:
    text = (
        "date,BTC_open,BTC_high,BTC_low,BTC_close,ETH\n"
        "2025-01-01,100,110,95,105.5,10\n"
        "2025-01-02,105.5,120.25,101,119,11\n"
    )
    series = load_prices(write(tmp_path, text))
    assert series.assets == ("BTC", "ETH")
    assert series.fields("BTC") == ("open", "high", "low", "close")
    assert series.fields("ETH") == ("close",)
    assert series.row(1) == {"BTC": D("119"), "ETH": D("11")}
    assert series.price(1, "BTC", "high") == D("120.25")
    assert series.price(0, "BTC", "low") == D("95")
    with pytest.raises(KeyError):
        series.raw("ETH", "high")
    again = tmp_path / "again.csv"
    write_prices(series, again)
    assert again.read_text().splitlines()[0] == "date,BTC_open,BTC_high,BTC_low,BTC_close,ETH"
    assert load_prices(again).raw("BTC", "high") == series.raw("BTC", "high")


def test_median_spacing_ignores_a_missing_bar_and_slices_keep_exact_prices(tmp_path: Path) -> None:
    rows = [f"2025-01-01T{h:02d}:00:00Z,{100 + h}.{h:02d}" for h in (0, 1, 2, 4, 5, 6)]
    series = load_prices(write(tmp_path, "timestamp,BTC\n" + "\n".join(rows) + "\n"))
    assert series.step_seconds == 3600
    part = series.slice(2, 4)
    assert len(part) == 2
    assert part.price(0, "BTC") == D("102.02")
    assert part.time(1) == datetime(2025, 1, 1, 4, tzinfo=UTC)
    assert len(series) == 6  # the original is untouched


# --- loading: every problem, located ----------------------------------------------------------------


def test_unreadable_files_are_one_clear_line_each(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    assert problems(missing) == [f"{missing} no such prices file"]
    assert problems(tmp_path) == [f"{tmp_path} is a directory, not a prices file"]
    empty = write(tmp_path, "  \n", "empty.csv")
    assert problems(empty) == [f"{empty} is empty; a prices file needs a header line and rows of prices"]
    binary = tmp_path / "prices.parquet"
    binary.write_bytes(b"PAR1\x00\x01\x02")
    assert problems(binary) == [f"{binary} is binary, not a CSV prices file"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"date,BTC\n2025-01-01,1\xe9\n")
    [message] = problems(latin)
    assert "not UTF-8" in message and "YAML" not in message


def test_a_file_without_header_says_so(tmp_path: Path) -> None:
    path = write(tmp_path, "2025-01-01,100\n2025-01-02,101\n")
    assert problems(path) == [f"{path}:1:1 no header: the first line must name the columns, e.g. timestamp,BTC,ETH"]


def test_header_problems_are_all_located(tmp_path: Path) -> None:
    path = write(tmp_path, "time,BTC,ETH,BTC,btc,BTC_close,SOL_high,,ETH_Close\n2025-01-01,1,1,1,1,1,1,1,1\n")
    assert problems(path) == [
        f"{path}:1:1 the first column must be named timestamp or date (got time)",
        f"{path}:1:14 BTC: duplicate column: the close price of BTC is already column 2",
        f"{path}:1:18 btc: asset symbols are upper case; did you mean 'BTC'? (got btc)",
        f"{path}:1:22 BTC_close: duplicate column: the close price of BTC is already column 2 (BTC)",
        f"{path}:1:32 SOL_high: SOL has high columns but no SOL_close; the close values the portfolio",
        f"{path}:1:41 empty column name; every column after the first names an asset, e.g. BTC",
        f"{path}:1:42 ETH_Close: open/high/low/close suffixes are lower case; did you mean 'ETH_close'? "
        "(got ETH_Close)",
    ]


def test_bad_prices_are_each_located_at_their_cell(tmp_path: Path) -> None:
    text = (
        "timestamp,BTC,ETH\n"
        "2025-01-01T00:00:00Z,0,3500\n"
        "2025-01-01T01:00:00Z,65000,-1\n"
        "2025-01-01T02:00:00Z,inf,NaN\n"
        "2025-01-01T03:00:00Z,abc,\n"
        "2025-01-01T04:00:00Z,65000,1.0000000000000000001\n"
    )
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}:2:22 BTC: must be above 0 (got 0)",
        f"{path}:3:28 ETH: must be above 0 (got -1)",
        f"{path}:4:22 BTC: must be a finite number (got inf)",
        f"{path}:4:26 ETH: must be a finite number (got NaN)",
        f"{path}:5:22 BTC: not a number (got abc)",
        f"{path}:5:26 ETH: missing price",
        f"{path}:6:28 ETH: more than 18 decimals (got 1.0000000000000000001)",
    ]


def test_rows_with_the_wrong_number_of_fields(tmp_path: Path) -> None:
    text = (
        "timestamp,BTC,ETH\n"
        "2025-01-01T00:00:00Z,65000,3500\n"
        "2025-01-01T01:00:00Z,65000\n"
        "\n"
        "2025-01-01T02:00:00Z,65000,3500,7\n"
        "2025-01-01T03:00:00Z,65000,3500\n"
    )
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}:3:27 row has 2 fields; the header has 3 (timestamp, BTC, ETH)",
        f"{path}:5:33 row has 4 fields; the header has 3 (timestamp, BTC, ETH)",
    ]


def test_timestamps_must_strictly_increase(tmp_path: Path) -> None:
    text = (
        "timestamp,BTC\n"
        "2025-01-01T00:00:00Z,1\n"
        "2025-01-01T01:00:00Z,1\n"
        "2025-01-01T01:00:00Z,1\n"
        "2025-01-01T00:30:00Z,1\n"
        "2025-01-01T02:00:00Z,1\n"
    )
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}:4:1 timestamp: duplicate timestamp (same as line 3) (got 2025-01-01T01:00:00Z)",
        f"{path}:5:1 timestamp: timestamps must increase; this one is before line 4's (2025-01-01T01:00:00Z) "
        "(got 2025-01-01T00:30:00Z)",
    ]


def test_bad_timestamps_are_named(tmp_path: Path) -> None:
    text = "date,BTC\n2025-01-01,1\n2025-13-01,1\n1735776000000,1\n20250104,1\n2025-01-05T00:00:00.5Z,1\n,1\n"
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}:3:1 date: not a date, date-time (ISO 8601) or unix seconds (got 2025-13-01)",
        f"{path}:4:1 date: unix time must be in seconds; this looks like milliseconds (got 1735776000000)",
        f"{path}:5:1 date: unix seconds must fall between 2000-01-01 and 2100-01-01 (got 20250104)",
        f"{path}:6:1 date: timestamps are whole seconds (got 2025-01-05T00:00:00.5Z)",
        f"{path}:7:1 date: missing timestamp",
    ]


def test_an_ohlc_row_whose_close_is_above_its_high_is_refused(tmp_path: Path) -> None:
    text = (
        "date,BTC_high,BTC_low,BTC_close\n"
        "2025-01-01,110,90,100\n"
        "2025-01-02,110,90,111\n"
        "2025-01-03,110,90,89.5\n"
        "2025-01-04,110,112,111\n"
    )
    path = write(tmp_path, text)
    hint = "on the same row; are the columns in the wrong order?"
    assert problems(path) == [
        f"{path}:3:19 BTC_close: above BTC_high 110 {hint} (got 111)",
        f"{path}:4:19 BTC_close: below BTC_low 90 {hint} (got 89.5)",
        f"{path}:5:16 BTC_low: above BTC_high 110 {hint} (got 112)",
        f"{path}:5:20 BTC_close: above BTC_high 110 {hint} (got 111)",
        f"{path}:5:20 BTC_close: below BTC_low 112 {hint} (got 111)",
    ]


def test_a_single_row_is_not_a_history(tmp_path: Path) -> None:
    path = write(tmp_path, "date,BTC\n2025-01-01,1\n")
    assert problems(path) == [f"{path} needs at least two rows of prices; it has one row"]


def test_problems_are_capped_at_fifty_with_a_count_of_the_rest(tmp_path: Path) -> None:
    rows = [f"2025-01-01T00:{m:02d}:00Z,oops" for m in range(60)] + [
        f"2025-01-01T01:{m:02d}:00Z,-{m + 1}" for m in range(60)
    ]
    path = write(tmp_path, "timestamp,BTC\n" + "\n".join(rows) + "\n")
    found = problems(path)
    assert len(found) == 51
    assert found[0] == f"{path}:2:22 BTC: not a number (got oops)"
    assert found[49] == f"{path}:51:22 BTC: not a number (got oops)"
    assert found[50] == f"{path} and 70 more problems"


def test_reading_in_chunks_changes_neither_the_prices_nor_the_located_problems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Big files are parsed a few MB at a time; a row cut by a chunk boundary must not be noticed."""
    rows = [
        f"2025-01-{d:02d}T{h:02d}:00:00Z,{1000 + d * 24 + h}.{h:02d},{7 + h}" for d in range(1, 8) for h in range(24)
    ]
    good = write(tmp_path, "timestamp,BTC,ETH\n" + "\n".join(rows[:80]) + "\n\n" + "\n".join(rows[80:]) + "\n")
    bad_rows = list(rows)
    bad_rows[50] = bad_rows[50].replace(".02,", ".02,x")
    bad_rows[120] = bad_rows[119]
    bad = write(tmp_path, "timestamp,BTC,ETH\n" + "\n".join(bad_rows) + "\n", "bad.csv")
    whole, whole_problems = load_prices(good), problems(bad)
    monkeypatch.setattr(csvfile, "_CHUNK_CHARS", 70)
    chunked = load_prices(good)
    assert chunked.timestamps == whole.timestamps
    assert [chunked.row(i) for i in range(len(chunked))] == [whole.row(i) for i in range(len(whole))]
    assert (
        problems(bad)
        == whole_problems
        == [
            f"{bad}:52:30 ETH: not a number (got x9)",
            f"{bad}:122:1 timestamp: duplicate timestamp (same as line 121) (got 2025-01-05T23:00:00Z)",
        ]
    )


def test_the_error_is_an_input_error_with_exit_code_2(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        load_prices(write(tmp_path, "date,BTC\n2025-01-01,x\n2025-01-02,1\n"))
    assert isinstance(info.value, PricesError)
    assert info.value.exit_code == 2


# --- writing ----------------------------------------------------------------------------------------


def test_write_then_load_is_exact(tmp_path: Path) -> None:
    series = generate_prices(
        assets={"BTC": D("65000.5"), "PEPE": D("0.00001234")},
        steps=500,
        step_seconds=300,
        seed=3,
        regime=REGIMES["volatile"],
        start=START,
    )
    path = tmp_path / "out.csv"
    write_prices(series, path)
    back = load_prices(path)
    assert back.assets == series.assets
    assert back.timestamps == series.timestamps
    for asset in series.assets:
        assert back.raw(asset) == series.raw(asset)
    assert back.price(0, "PEPE") == D("0.00001234")
    assert back.price(0, "BTC") == D("65000.5")
    # and the daily file survives a round trip with its mixed decimals
    daily = load_prices(DAILY_2022)
    write_prices(daily, path)
    again = load_prices(path)
    assert path.read_text().startswith("date,BTC,ETH\n2022-01-01,")
    assert [again.row(i) for i in range(len(again))] == [daily.row(i) for i in range(len(daily))]


def test_examples_prices_csv_is_the_example_scenario() -> None:
    """The example file is reproducible: regenerating it gives the same bytes."""
    text = (ROOT / "examples" / "prices.csv").read_text()
    assert text == dump_prices(example_prices())
    lines = text.splitlines()
    assert lines[0] == "timestamp,BTC,ETH"
    assert len(lines) == 8761
    assert lines[1] == "2025-01-01T00:00:00Z,65000.00,3500.00"


# --- the generator ----------------------------------------------------------------------------------


def test_the_generator_is_deterministic_for_a_seed() -> None:
    a = dump_prices(generate(REGIMES["volatile"], seed=7, steps=2000))
    b = dump_prices(generate(REGIMES["volatile"], seed=7, steps=2000))
    c = dump_prices(generate(REGIMES["volatile"], seed=8, steps=2000))
    assert a == b
    assert a != c
    assert a.splitlines()[1] == c.splitlines()[1]  # both start from the given prices


def test_generated_series_has_the_asked_shape() -> None:
    series = generate_prices(
        assets={"BTC": D("65000"), "ETH": D("3500"), "DOGE": D("0.5")},
        steps=1440,
        step_seconds=60,
        seed=1,
        regime=REGIMES["calm"],
        start=START,
    )
    assert len(series) == 1440
    assert series.step_seconds == 60
    assert series.time(0) == START
    assert series.time(1439) == datetime(2025, 1, 1, 23, 59, tzinfo=UTC)
    assert series.row(0) == {"BTC": D("65000.00"), "ETH": D("3500.00"), "DOGE": D("0.500000")}
    assert series.raw("BTC")[1] == 2
    assert series.raw("DOGE")[1] == 6  # six significant digits below 1


def test_regimes_differ_in_realized_volatility_as_intended() -> None:
    vols = {}
    for name, regime in REGIMES.items():
        returns = log_returns(generate(regime, seed=11), "BTC")
        vols[name] = statistics.stdev(returns) * math.sqrt(8760)
    assert vols["calm"] == pytest.approx(REGIMES["calm"].volatility, rel=0.08)
    assert vols["trending"] == pytest.approx(REGIMES["trending"].volatility, rel=0.08)
    assert vols["volatile"] > vols["trending"] > vols["calm"]
    assert vols["volatile"] > REGIMES["volatile"].volatility  # the jumps add to the diffusion


def test_jumps_appear_in_the_volatile_regime_only() -> None:
    def big_moves(regime: Regime) -> int:
        sigma = regime.volatility / math.sqrt(8760)
        return sum(abs(r) > 6 * sigma for r in log_returns(generate(regime, seed=5), "ETH"))

    assert big_moves(REGIMES["calm"]) == 0
    assert big_moves(REGIMES["trending"]) == 0
    assert big_moves(REGIMES["volatile"]) >= 3


def test_trending_drifts_up_on_average() -> None:
    growth = [sum(log_returns(generate(REGIMES["trending"], seed=s, steps=2000), "BTC")) for s in range(8)]
    calm = [sum(log_returns(generate(REGIMES["calm"], seed=s, steps=2000), "BTC")) for s in range(8)]
    assert statistics.mean(growth) > statistics.mean(calm)


@pytest.mark.parametrize("correlation", [0.6, 0.0, -0.4])
def test_correlation_is_roughly_as_set(correlation: float) -> None:
    series = generate(REGIMES["calm"], seed=2, correlation=correlation)
    measured = statistics.correlation(log_returns(series, "BTC"), log_returns(series, "ETH"))
    assert measured == pytest.approx(correlation, abs=0.05)


def test_a_regime_schedule_switches_volatility_at_the_given_step() -> None:
    series = generate_prices(
        assets={"BTC": D("65000")},
        steps=8760,
        step_seconds=3600,
        seed=4,
        regime=[(0, REGIMES["calm"]), (4380, REGIMES["volatile"])],
        start=START,
    )
    returns = log_returns(series, "BTC")
    first = statistics.stdev(returns[:4379]) * math.sqrt(8760)
    second = statistics.stdev(returns[4379:]) * math.sqrt(8760)
    assert first == pytest.approx(0.35, rel=0.1)
    assert second > 2 * first


@pytest.mark.parametrize(
    "change",
    [
        {"steps": 1},
        {"step_seconds": 30},
        {"step_seconds": 86_401},
        {"assets": {}},
        {"assets": {"BTC": D("0")}},
        {"correlation": 1.5},
        {"correlation": -0.9, "assets": {"A": D("1"), "B": D("1"), "C": D("1")}},
        {"regime": [(5, REGIMES["calm"])]},
        {"regime": [(0, REGIMES["calm"]), (0, REGIMES["volatile"])]},
        {"regime": [(0, REGIMES["calm"]), (100, REGIMES["volatile"])]},
    ],
)
def test_impossible_generator_settings_are_refused(change: dict[str, object]) -> None:
    settings: dict[str, object] = {
        "assets": {"BTC": D("65000"), "ETH": D("3500")},
        "steps": 100,
        "step_seconds": 3600,
        "seed": 1,
        "regime": REGIMES["calm"],
        "start": START,
    }
    settings.update(change)
    with pytest.raises(InputError):
        generate_prices(**settings)  # type: ignore[arg-type]


def test_a_regime_with_negative_volatility_is_refused() -> None:
    with pytest.raises(InputError):
        Regime("broken", drift=0.0, volatility=-0.1)


@pytest.mark.slow
def test_a_year_of_minute_bars_for_three_assets_loads(tmp_path: Path) -> None:
    series = generate_prices(
        assets={"BTC": D("65000"), "ETH": D("3500"), "SOL": D("150")},
        steps=525_600,
        step_seconds=60,
        seed=9,
        regime=REGIMES["trending"],
        start=START,
    )
    path = tmp_path / "minutes.csv"
    write_prices(series, path)
    loaded = load_prices(path)
    assert len(loaded) == 525_600
    assert loaded.step_seconds == 60
    assert loaded.time(525_599) == datetime(2025, 12, 31, 23, 59, tzinfo=UTC)
    for asset in ("BTC", "ETH", "SOL"):
        assert loaded.raw(asset) == series.raw(asset)
    assert loaded.row(300_000) == series.row(300_000)


# --- the synthetic book -----------------------------------------------------------------------------


def book(mid: str, volatility: str | None = "0.02", model: BookModel | None = None, step: str = "0.00001") -> Market:
    return (model or BookModel()).market(
        "BTC/USDC",
        D(mid),
        volatility=D(volatility) if volatility is not None else None,
        taker_fee=D("0.001"),
        amount_step=D(step),
        min_notional=D("10"),
    )


def buy_price(market: Market, quote: Decimal) -> Decimal:
    """Average price paid for `quote` of base, walking the asks level by level."""
    spent, bought = D(0), D(0)
    for price, amount in market.asks:
        take = min(amount, (quote - spent) / price)
        spent += take * price
        bought += take
        if spent >= quote:
            return spent / bought
    raise AssertionError("the book is too thin for this order")


@pytest.mark.parametrize(("mid", "step"), [("65010.25", "0.00001"), ("3500", "0.0001"), ("0.00001234", "1")])
def test_the_book_is_sorted_uncrossed_and_centred_on_the_mid(mid: str, step: str) -> None:
    market = book(mid, step=step)
    bids = [p for p, _ in market.bids]
    asks = [p for p, _ in market.asks]
    assert len(bids) == len(asks) == 20
    assert bids == sorted(bids, reverse=True) and len(set(bids)) == 20
    assert asks == sorted(asks) and len(set(asks)) == 20
    assert bids[0] < D(mid) < asks[0]
    assert market.mid == D(mid)
    assert all(p > 0 for p in bids)
    assert all(a > 0 and a % D(step) == 0 for _, a in market.bids + market.asks)
    assert (market.base, market.quote, market.taker_fee, market.volatility) == ("BTC", "USDC", D("0.001"), D("0.02"))


def test_deeper_levels_hold_more_and_big_orders_pay_more_slippage() -> None:
    market = book("65000")
    for side in (market.bids, market.asks):
        values = [p * a for p, a in side]
        assert values == sorted(values) and values[-1] > 5 * values[0]
    mid = market.mid
    slippage = [buy_price(market, D(q)) / mid - 1 for q in ("1000", "100000", "1000000", "5000000")]
    assert slippage == sorted(slippage)
    assert slippage[0] == (market.asks[0][0] / mid - 1)  # a small order pays only the half spread
    assert slippage[-1] > 10 * slippage[0]
    # the square-root law: 50x the size costs far less than 50x the impact
    assert slippage[3] / slippage[1] < 50


def test_volatility_widens_the_spread_but_never_pushes_bids_to_zero() -> None:
    def spread(volatility: str | None) -> Decimal:
        market = book("65000", volatility)
        return market.asks[0][0] - market.bids[0][0]

    assert spread(None) == spread("0") < spread("0.01") < spread("0.05")
    assert spread("0.01") == spread(None) * D("1.25")
    wild = book("65000", "50")
    assert wild.bids[-1][0] >= D("32500")


def test_the_synthetic_market_passes_the_snapshot_validator(tmp_path: Path) -> None:
    market = book("65010.25", "0.031")
    snapshot = Snapshot(taken_at=START, balances={"BTC": D("1"), "USDC": D("1000")}, markets={market.symbol: market})
    path = tmp_path / "snapshot.yaml"
    save_snapshot(snapshot, path)
    loaded = load_snapshot(path).markets["BTC/USDC"]
    assert (loaded.bids, loaded.asks, loaded.volatility) == (market.bids, market.asks, market.volatility)


def test_same_mid_and_widening_share_a_book_but_not_the_volatility() -> None:
    model = BookModel()
    a = book("65000", "0.02", model)
    b = book("65000", "0.020001", model)
    assert a.bids is b.bids
    assert (a.volatility, b.volatility) == (D("0.02"), D("0.020001"))


@pytest.mark.parametrize(
    "change",
    [
        {"spread_bps": D("0")},
        {"levels": 0},
        {"level_step_bps": D("-1")},
        {"depth_quote": D("0")},
        {"depth_growth": D("-0.1")},
        {"levels": 200, "level_step_bps": D("100")},
    ],
)
def test_impossible_book_settings_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(InputError):
        BookModel(**change)  # type: ignore[arg-type]


# --- realized volatility -----------------------------------------------------------------------------


def test_rolling_volatility_equals_the_direct_computation_at_every_step() -> None:
    series = generate(REGIMES["volatile"], seed=3, steps=3000)
    returns = log_returns(series, "BTC")
    window = 48
    got = [realized_volatility(series, "BTC", i, window) for i in range(len(series))]
    assert got[:window] == [None] * window
    for i in range(window, len(series)):
        direct = statistics.stdev(returns[i - window : i]) * math.sqrt(24)
        value = got[i]
        assert value is not None
        assert abs(float(value) - direct) <= 1.5e-6, i
    # a jump back in time gives the same answer as walking there
    assert realized_volatility(series, "BTC", 100, window) == got[100]
    assert RollingVolatility(series, "BTC", window).at(2999) == got[2999]


def test_a_flat_series_has_zero_volatility_and_daily_bars_are_not_rescaled() -> None:
    flat = PriceSeries.from_decimals(
        list(range(1_700_000_000, 1_700_000_000 + 86_400 * 10, 86_400)), {"BTC": [D("100")] * 10}
    )
    assert realized_volatility(flat, "BTC", 9, 5) == D("0.000000")
    moving = PriceSeries.from_decimals(
        list(range(1_700_000_000, 1_700_000_000 + 86_400 * 4, 86_400)),
        {"BTC": [D("100"), D("110"), D("99"), D("108.9")]},
    )
    returns = [math.log(110 / 100), math.log(99 / 110), math.log(108.9 / 99)]
    assert realized_volatility(moving, "BTC", 3, 3) == D(statistics.stdev(returns)).quantize(D("0.000001"))


_CELLS = [
    "65000.00",
    "1" * 5001,
    "9e999999999",
    "-0",
    "0",
    "NaN",
    "sNaN",
    "Infinity",
    "1e-999999",
    "1.5e3",
    "",
    '"3500"',
    "x",
    "１２",
    "0.000000000000000000000000001",
    "18446744073709551616",
]
_TIMES = ["2025-01-01T00:00:00Z", "2025-01-01T00:01:00Z", "1735689720", "2025-13-01", "", "2025-01-01 00:03:00"]


@settings(max_examples=200, deadline=None)
@given(
    header=st.sampled_from(["timestamp,BTC,ETH", "date,BTC,ETH", "timestamp,BTC,BTC", "timestamp,BTC", "timestamp"]),
    rows=st.lists(
        st.tuples(st.sampled_from(_TIMES), st.sampled_from(_CELLS), st.sampled_from(_CELLS), st.booleans()),
        min_size=0,
        max_size=6,
    ),
)
def test_fuzzed_prices_files_load_or_get_a_located_error(tmp_path_factory: pytest.TempPathFactory, header: str,
                                                        rows: list[tuple[str, str, str, bool]]) -> None:  # fmt: skip
    """Any mix of good and hostile cells is either a price series or a PricesError/InputError (exit 2)."""
    lines = [header] + [f"{t},{a},{b}" + (",extra" if extra else "") for t, a, b, extra in rows]
    path = tmp_path_factory.mktemp("fuzz") / "prices.csv"
    path.write_text("\n".join(lines) + "\n")
    with contextlib.suppress(InputError):
        load_prices(path)
