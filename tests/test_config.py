"""The config loader: every mistake an operator can make is reported, located, all at once, and never crashes.

A config moves real money, so each rule of DESIGN.md ("Config (YAML)") has a test here that fails when the
rule stops being enforced, and each message is checked in the exact form a user reads:
`FILE:LINE:COL key.path: message (got VALUE)`.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rebalancer_cli.cli import main
from rebalancer_cli.config import Config, load_config
from rebalancer_cli.errors import ConfigError, ExitCode, Problem

D = Decimal

# DESIGN.md, "Config (YAML)": the minimum valid file, exactly as written there.
DESIGN_MINIMUM = """\
portfolio_id: "treasury-v1"
base_threshold: 0.001
volatility_factor: 0.5
safety_margin: 1.5
max_trades_per_cycle: 10
assets:
  - {symbol: "BTC", target_weight: 0.4, max_deviation: 0.05}
  - {symbol: "ETH", target_weight: 0.3, max_deviation: 0.05}
  - {symbol: "USDC", target_weight: 0.3, max_deviation: 0.02}
"""

# The same shape with every value replaceable; line numbers are those of DESIGN_MINIMUM.
TEMPLATE = """\
portfolio_id: "treasury-v1"
base_threshold: {base_threshold}
volatility_factor: {volatility_factor}
safety_margin: {safety_margin}
max_trades_per_cycle: {max_trades_per_cycle}
assets:
  - {{symbol: "BTC", target_weight: {w_btc}, max_deviation: {dev_btc}}}
  - {{symbol: "ETH", target_weight: {w_eth}, max_deviation: 0.05}}
  - {{symbol: "USDC", target_weight: {w_usdc}, max_deviation: 0.02}}
"""
DEFAULTS = {
    "base_threshold": "0.001",
    "volatility_factor": "0.5",
    "safety_margin": "1.5",
    "max_trades_per_cycle": "10",
    "w_btc": "0.4",
    "dev_btc": "0.05",
    "w_eth": "0.3",
    "w_usdc": "0.3",
}
BTC_LINE = 7


def config_text(**values: str) -> str:
    return TEMPLATE.format(**{**DEFAULTS, **values})


Writer = Callable[..., Path]


@pytest.fixture()
def write(tmp_path: Path) -> Writer:
    def _write(text: str | bytes, name: str = "portfolio.yaml") -> Path:
        path = tmp_path / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    return _write


def problems(path: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.exit_code == ExitCode.USAGE
    return info.value.problems


def rendered(path: Path) -> list[str]:
    return [p.render() for p in problems(path)]


def col_after(text: str, line: int, prefix: str) -> int:
    """1-based column of the value that follows `prefix` on `line`, as an editor shows it."""
    return text.splitlines()[line - 1].index(prefix) + len(prefix) + 1


# --- the minimum example and exact decimals -------------------------------------------------------------


def test_design_minimum_example_validates_exactly_as_written(write: Writer) -> None:
    cfg = load_config(write(DESIGN_MINIMUM))
    assert cfg.portfolio_id == "treasury-v1"
    assert cfg.quote == "USDC"  # the one stable asset, inferred
    assert [(a.symbol, a.target_weight, a.max_deviation) for a in cfg.assets] == [
        ("BTC", D("0.4"), D("0.05")),
        ("ETH", D("0.3"), D("0.05")),
        ("USDC", D("0.3"), D("0.02")),
    ]
    assert (cfg.base_threshold, cfg.volatility_factor, cfg.safety_margin) == (D("0.001"), D("0.5"), D("1.5"))
    assert cfg.max_trades_per_cycle == 10


def test_numbers_are_exact_decimals_from_the_text(write: Writer) -> None:
    text = config_text(base_threshold="0.1", w_btc="0.4", w_eth="0.29999999999999996", w_usdc="0.30000000000000004")
    cfg = load_config(write(text))
    assert type(cfg.base_threshold) is Decimal
    assert cfg.base_threshold == D("0.1")
    # a float would have turned both into 0.3 and lost the digits: the text is kept to the last one
    assert str(cfg.assets[2].target_weight) == "0.30000000000000004"
    assert str(cfg.assets[1].target_weight) == "0.29999999999999996"
    assert sum(a.target_weight for a in cfg.assets) == D(1)


@pytest.mark.parametrize(
    ("written", "value"),
    [
        ("1e-4", D("0.0001")),  # plain text in YAML 1.1 (no dot), still a number here
        ("1.0e-4", D("0.0001")),  # a YAML float
        ('"0.002"', D("0.002")),  # quoted numbers are accepted as decimal text
        ("'0.1'", D("0.1")),
        ("0.1_0", D("0.10")),
    ],
)
def test_number_spellings_that_are_accepted(write: Writer, written: str, value: Decimal) -> None:
    cfg = load_config(write(config_text(base_threshold=written)))
    assert cfg.base_threshold == value
    assert type(cfg.base_threshold) is Decimal


def test_quoted_whole_number_is_accepted_for_the_trade_count(write: Writer) -> None:
    assert load_config(write(config_text(max_trades_per_cycle='"12"'))).max_trades_per_cycle == 12


@pytest.mark.parametrize(
    ("written", "message"),
    [
        (".inf", "must be a finite number (got .inf)"),
        ("-.inf", "must be a finite number (got -.inf)"),
        (".nan", "must be a finite number (got .nan)"),
        ('"NaN"', "must be a finite number (got NaN)"),
        ('"Infinity"', "must be a finite number (got Infinity)"),
        ("true", "must be a number, not a boolean (got True)"),
        ("yes", "must be a number, not a boolean (got True)"),  # YAML 1.1 reads `yes` as true
        ("0x1f", "must be a number (got 0x1f)"),
        ("1:30", "must be a number (got 1:30)"),  # sexagesimal in YAML 1.1: never meant in a money config
        ("ten", "must be a number (got ten)"),
        ("[0.1]", "must be a number"),
        ("9.0e+999999", "must be less than 1e30 in size (got 9.0E+999999)"),
    ],
)
def test_number_spellings_that_are_refused(write: Writer, written: str, message: str) -> None:
    text = config_text(safety_margin=written)
    path = write(text)
    assert rendered(path) == [f"{path}:4:{col_after(text, 4, 'safety_margin: ')} safety_margin: {message}"]


def test_absurd_magnitudes_in_weights_are_located_not_an_internal_error(write: Writer) -> None:
    # 9e999999 + 9e999999 overflows Decimal; the weight sum must not be where that surfaces
    text = config_text(w_btc="9.0e+999999", w_eth="9.0e+999999")
    path = write(text)
    lines = rendered(path)
    assert lines == [
        f"{path}:7:{col_after(text, 7, 'target_weight: ')} assets[0].target_weight: must be less than 1e30 in size "
        "(got 9.0E+999999)",
        f"{path}:8:{col_after(text, 8, 'target_weight: ')} assets[1].target_weight: must be less than 1e30 in size "
        "(got 9.0E+999999)",
    ]


# --- ranges, at both edges ----------------------------------------------------------------------------------


TOP_RANGES = [
    # key, lowest valid, highest valid, just below, just above, message
    ("base_threshold", "0.0001", "0.1", "0.0000999", "0.1000001", "must be between 0.0001 and 0.1"),
    ("volatility_factor", "0.1", "2.0", "0.0999", "2.0001", "must be between 0.1 and 2.0"),
    ("safety_margin", "1.0", "5.0", "0.9999", "5.0001", "must be between 1.0 and 5.0"),
    ("max_trades_per_cycle", "1", "50", "0", "51", "must be between 1 and 50"),
]
TOP_LINE = {"base_threshold": 2, "volatility_factor": 3, "safety_margin": 4, "max_trades_per_cycle": 5}


@pytest.mark.parametrize(("key", "lo", "hi", "below", "above", "message"), TOP_RANGES)
def test_top_level_ranges_at_both_edges(
    write: Writer, key: str, lo: str, hi: str, below: str, above: str, message: str
) -> None:
    for edge in (lo, hi):
        cfg = load_config(write(config_text(**{key: edge})))
        assert getattr(cfg, key) == D(edge)
    for outside in (below, above):
        text = config_text(**{key: outside})
        path = write(text)
        line = TOP_LINE[key]
        assert rendered(path) == [f"{path}:{line}:{col_after(text, line, f'{key}: ')} {key}: {message} (got {outside})"]


def test_trade_count_must_be_whole(write: Writer) -> None:
    text = config_text(max_trades_per_cycle="2.5")
    path = write(text)
    assert rendered(path) == [f"{path}:5:23 max_trades_per_cycle: must be a whole number between 1 and 50 (got 2.5)"]


@pytest.mark.parametrize(
    ("weights", "edge"),
    [(("0", "0.7", "0.3"), D(0)), (("1", "0", "0"), D(1))],
)
def test_target_weight_edges_are_valid(write: Writer, weights: tuple[str, str, str], edge: Decimal) -> None:
    w_btc, w_eth, w_usdc = weights
    cfg = load_config(write(config_text(w_btc=w_btc, w_eth=w_eth, w_usdc=w_usdc)))
    assert cfg.assets[0].target_weight == edge


@pytest.mark.parametrize("outside", ["-0.0001", "1.0001"])
def test_target_weight_just_outside_is_refused(write: Writer, outside: str) -> None:
    text = config_text(w_btc=outside)
    path = write(text)
    col = col_after(text, BTC_LINE, "target_weight: ")
    assert f"{path}:7:{col} assets[0].target_weight: must be between 0 and 1 (got {outside})" in rendered(path)


@pytest.mark.parametrize("edge", ["0", "1"])
def test_max_deviation_edges_are_valid(write: Writer, edge: str) -> None:
    assert load_config(write(config_text(dev_btc=edge))).assets[0].max_deviation == D(edge)


@pytest.mark.parametrize("outside", ["-0.0001", "1.0001"])
def test_max_deviation_just_outside_is_refused(write: Writer, outside: str) -> None:
    text = config_text(dev_btc=outside)
    path = write(text)
    col = col_after(text, BTC_LINE, "max_deviation: ")
    assert rendered(path) == [f"{path}:7:{col} assets[0].max_deviation: must be between 0 and 1 (got {outside})"]


def test_the_issue_example_line_is_rendered_exactly(write: Writer) -> None:
    text = config_text(w_eth="1.3", w_usdc="-0.7")
    path = write(text)
    assert rendered(path) == [
        f"{path}:8:36 assets[1].target_weight: must be between 0 and 1 (got 1.3)",
        f"{path}:9:37 assets[2].target_weight: must be between 0 and 1 (got -0.7)",
    ]


# --- every problem in one run -----------------------------------------------------------------------------


def test_all_problems_come_in_one_run_sorted_by_line(write: Writer) -> None:
    text = """\
portfolio_id: "treasury-v1"
base_treshold: 0.001
volatility_factor: 7
safety_margin: 1.5
safety_margin: 2
max_trades_per_cycle: 0
assets:
  - {symbol: "BTC", target_weight: 0.5, max_deviation: 0.05}
  - {symbol: "BTC", target_weight: 0.3, max_deviation: 1.2}
  - {symbol: "USDC", target_weight: 0.3, max_deviaton: 0.02}
exchange: {id: paper}
"""
    path = write(text)
    assert rendered(path) == [
        f"{path}:1:1 base_threshold: required key is missing",
        f"{path}:2:1 base_treshold: unknown key; did you mean 'base_threshold'?",
        f"{path}:3:20 volatility_factor: must be between 0.1 and 2.0 (got 7)",
        f"{path}:5:1 safety_margin: duplicate key (first on line 4); a repeated key would silently override the first",
        f"{path}:6:23 max_trades_per_cycle: must be between 1 and 50 (got 0)",
        f"{path}:8:3 assets: target weights sum to 1.1, not 1 (tolerance 0.0001)",
        f"{path}:9:14 assets[1].symbol: duplicate symbol BTC (also assets[0])",
        f"{path}:9:56 assets[1].max_deviation: must be between 0 and 1 (got 1.2)",
        f"{path}:10:5 assets[2].max_deviation: required key is missing",
        f"{path}:10:42 assets[2].max_deviaton: unknown key; did you mean 'max_deviation'?",
        f"{path}:11:1 exchange.snapshot: the paper exchange needs a snapshot file",
    ]


# --- unknown and duplicate keys ------------------------------------------------------------------------


def test_unknown_keys_suggest_the_close_known_key_at_every_level(write: Writer) -> None:
    text = DESIGN_MINIMUM + "safty_margin: 2\nexchange:\n  id: binance\n  sandboxx: true\n"
    path = write(text)
    assert rendered(path) == [
        f"{path}:10:1 safty_margin: unknown key; did you mean 'safety_margin'?",
        f"{path}:13:3 exchange.sandboxx: unknown key; did you mean 'sandbox'?",
    ]


def test_unknown_key_without_a_close_match_lists_the_known_keys(write: Writer) -> None:
    path = write(DESIGN_MINIMUM + "colour: blue\n")
    [line] = rendered(path)
    assert line.startswith(f"{path}:10:1 colour: unknown key (known keys: assets, base_threshold, ")
    assert "portfolio_id" in line and "max_trades_per_cycle" in line


def test_source_is_not_a_key_of_the_file(write: Writer) -> None:
    # the loader remembers the file a config came from; a `source:` in the file must be a typo, not accepted
    path = write(DESIGN_MINIMUM + "source: /etc/other.yaml\n")
    [line] = rendered(path)
    assert line.startswith(f"{path}:10:1 source: unknown key")
    assert "source," not in line.split("known keys:")[1]
    assert load_config(write(DESIGN_MINIMUM)).source == str(write(DESIGN_MINIMUM))


def test_duplicate_keys_are_errors_at_the_top_and_nested(write: Writer) -> None:
    text = DESIGN_MINIMUM.replace('{symbol: "ETH",', '{symbol: "ETH", symbol: "SOL",') + "base_threshold: 0.002\n"
    path = write(text)
    assert rendered(path) == [
        f"{path}:8:21 assets[1].symbol: duplicate key (first on line 8); a repeated key would silently override the "
        "first",
        f"{path}:10:1 base_threshold: duplicate key (first on line 2); a repeated key would silently override the "
        "first",
    ]


def test_duplicate_symbols_are_errors(write: Writer) -> None:
    path = write(DESIGN_MINIMUM.replace('"ETH"', '"BTC"'))
    assert rendered(path) == [f"{path}:8:14 assets[1].symbol: duplicate symbol BTC (also assets[0])"]


# --- weights ----------------------------------------------------------------------------------------------


def test_weights_not_summing_to_one_name_the_sum(write: Writer) -> None:
    path = write(config_text(w_usdc="0.2"))
    assert rendered(path) == [f"{path}:7:3 assets: target weights sum to 0.9, not 1 (tolerance 0.0001)"]


@pytest.mark.parametrize("w_usdc", ["0.29991", "0.30009", "0.2999", "0.3001"])
def test_a_sum_within_the_tolerance_is_accepted(write: Writer, w_usdc: str) -> None:
    cfg = load_config(write(config_text(w_usdc=w_usdc)))
    assert cfg.assets[2].target_weight == D(w_usdc)  # kept as written, not normalised


@pytest.mark.parametrize(("w_usdc", "total"), [("0.29989", "0.99989"), ("0.30011", "1.00011")])
def test_a_sum_just_outside_the_tolerance_is_refused(write: Writer, w_usdc: str, total: str) -> None:
    path = write(config_text(w_usdc=w_usdc))
    assert rendered(path) == [f"{path}:7:3 assets: target weights sum to {total}, not 1 (tolerance 0.0001)"]


@pytest.mark.parametrize("w_btc", ['"0.5"', "5e-1"])
def test_weights_written_as_text_count_in_the_sum(write: Writer, w_btc: str) -> None:
    # both spellings are accepted as 0.5, so they must be summed too: 0.5 + 0.3 + 0.3 = 1.1
    path = write(config_text(w_btc=w_btc))
    assert rendered(path) == [f"{path}:7:3 assets: target weights sum to 1.1, not 1 (tolerance 0.0001)"]


# --- quote ------------------------------------------------------------------------------------------------


def test_quote_is_inferred_from_exactly_one_stable(write: Writer) -> None:
    assert load_config(write(DESIGN_MINIMUM.replace("USDC", "EUR"))).quote == "EUR"


def test_quote_cannot_be_inferred_without_a_stable(write: Writer) -> None:
    path = write(DESIGN_MINIMUM.replace("USDC", "SOL"))
    assert rendered(path) == [
        f"{path}:1:1 quote: required key is missing: no asset is a stable or fiat currency, so the quote currency "
        "cannot be inferred"
    ]


def test_quote_cannot_be_inferred_from_two_stables_but_may_be_named(write: Writer) -> None:
    two = DESIGN_MINIMUM.replace("ETH", "USDT")
    path = write(two)
    assert rendered(path) == [
        f"{path}:1:1 quote: required key is missing: 2 assets are stable or fiat (USDT, USDC), so the quote "
        "currency cannot be inferred"
    ]
    assert load_config(write(two + "quote: USDT\n")).quote == "USDT"


def test_explicit_quote_must_be_one_of_the_assets(write: Writer) -> None:
    path = write(DESIGN_MINIMUM + "quote: EUR\n")
    assert rendered(path) == [f"{path}:10:8 quote: quote EUR must be one of the assets (it is the cash leg)"]


# --- the exchange block -------------------------------------------------------------------------------------


def test_paper_exchange_needs_a_snapshot(write: Writer) -> None:
    path = write(DESIGN_MINIMUM + "exchange:\n  id: paper\n")
    assert rendered(path) == [f"{path}:10:1 exchange.snapshot: the paper exchange needs a snapshot file"]


def test_snapshot_path_is_relative_to_the_config_file(write: Writer, tmp_path: Path) -> None:
    cfg = load_config(write(DESIGN_MINIMUM + "exchange: {id: paper, snapshot: market.yaml}\n"))
    assert cfg.snapshot_path() == tmp_path / "market.yaml"


def test_real_exchange_block_of_design_validates(write: Writer) -> None:
    block = """\
exchange:
  id: binance                      # any ccxt exchange id
  credentials_env: {apiKey: BINANCE_API_KEY, secret: BINANCE_SECRET}
  api_url: http://127.0.0.1:8900   # optional: replaces every REST base URL (loopback emulator, a proxy)
  sandbox: false                   # optional: the exchange's own testnet (ccxt sandbox mode)
  options: {}                      # optional: passed to the ccxt exchange's options as they are
"""
    ex = load_config(write(DESIGN_MINIMUM + block)).exchange
    assert (ex.id, ex.api_url, ex.sandbox) == ("binance", "http://127.0.0.1:8900", False)
    assert ex.credentials_env == {"apiKey": "BINANCE_API_KEY", "secret": "BINANCE_SECRET"}


SECRETS = [
    "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A",  # Binance-like, mixed case
    "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==",  # base64
    "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08",  # upper-case hex: fits a NAME's letters
    "x9f3kLq0pZ",
]


@pytest.mark.parametrize("secret", SECRETS)
def test_a_credential_instead_of_a_variable_name_is_refused_and_never_echoed(write: Writer, secret: str) -> None:
    text = DESIGN_MINIMUM + f"exchange:\n  id: binance\n  credentials_env: {{apiKey: '{secret}'}}\n"
    path = write(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    col = col_after(text, 12, "apiKey: ")
    assert [p.render() for p in info.value.problems] == [
        f"{path}:12:{col} exchange.credentials_env.apiKey: must be the NAME of an environment variable holding the "
        "credential (upper case, e.g. BINANCE_SECRET), never the credential itself"
    ]
    assert secret not in str(info.value)
    assert all(secret not in str(v) for p in info.value.problems for v in p.as_dict().values())


def test_credentials_env_fields_are_ccxt_credential_names(write: Writer) -> None:
    text = DESIGN_MINIMUM + "exchange:\n  id: binance\n  credentials_env: {api_key: BINANCE_API_KEY}\n"
    path = write(text)
    assert rendered(path) == [
        f"{path}:12:21 exchange.credentials_env.api_key: 'api_key' is not a ccxt credential field (apiKey, secret, "
        "password, uid, privateKey, walletAddress, token)"
    ]


@pytest.mark.parametrize("url", ["127.0.0.1:8900", "ftp://127.0.0.1", "http://", "localhost"])
def test_bad_api_url_is_refused_at_its_line(write: Writer, url: str) -> None:
    text = DESIGN_MINIMUM + f"exchange:\n  id: binance\n  api_url: '{url}'\n"
    path = write(text)
    assert rendered(path) == [
        f"{path}:12:12 exchange.api_url: must be an http(s) URL such as http://127.0.0.1:8900 (got {url})"
    ]


def test_bad_exchange_id_is_refused_at_its_line(write: Writer) -> None:
    path = write(DESIGN_MINIMUM + "exchange: {id: Binance.com}\n")
    assert rendered(path) == [
        f"{path}:10:16 exchange.id: must be `paper` or a ccxt exchange id such as binance (got Binance.com)"
    ]


def test_text_from_the_file_never_splits_a_problem_over_lines(write: Writer) -> None:
    text = DESIGN_MINIMUM.replace('"ETH"', '"US\\nDC"').replace('"BTC"', '"US\\nDC"') + '"ba\\nd": 1\nquote: "A\\tB"\n'
    path = write(text)
    lines = rendered(path)
    assert all("\n" not in line for line in lines)
    assert f"{path}:8:14 assets[1].symbol: duplicate symbol US\\nDC (also assets[0])" in lines
    assert any(line.startswith(f"{path}:10:1 ba\\nd: unknown key") for line in lines)


# --- inputs that are not a config at all: one clear line, exit 2, no traceback -------------------------------


def run_validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(["validate-config", str(path)])
    out, err = capsys.readouterr()
    code = info.value.code
    assert isinstance(code, int)
    return code, out, err


def _fifty_megabytes(path: Path) -> None:
    chunk = b"padding: [" + b"1, " * 1000 + b"1]\n"
    with path.open("wb") as f:
        for _ in range(50 * 2**20 // len(chunk) + 1):
            f.write(chunk)


BAD_INPUTS = [
    # name, how to make it, what the one line says (after the file name)
    ("missing", None, "no such config file"),
    ("a-directory", "dir", "is a directory, not a config file"),
    ("empty", b"", "is empty"),
    ("comment-only", b"# nothing here yet\n\n   # still nothing\n", "is empty"),
    ("not-yaml", b"a: [\n", ":2:1 not valid YAML: while parsing a flow node, did not find expected node content"),
    ("tab-indent", b"assets:\n\t- BTC\n", ":2:1 not valid YAML"),
    ("binary", bytes(range(256)) * 4, "is binary, not a YAML config file"),
    ("invalid-utf8", b"portfolio_id: caf\xe9\n", "is not UTF-8 text (invalid byte at offset 17)"),
    ("control-char", b"portfolio_id: a\x07b\n", ":1:16 not valid YAML: unacceptable character #x0007"),
    ("list-at-top", b"- BTC\n- ETH\n", ":1:1 the top level of a config file must be a mapping of keys, not a list"),
    (
        "scalar-at-top",
        b"42\n",
        ":1:1 the top level of a config file must be a mapping of keys, not a single value (42)",
    ),
    ("two-documents", b"a: 1\n---\nb: 2\n", ":2:1 not valid YAML: expected a single document in the stream"),
    # the position depends on the libyaml version (newer ones refuse deep nesting while scanning ahead)
    ("deep-nesting", b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested deeper than 64 levels"),
    ("recursive-alias", b"a: &x [*x]\n", "YAML aliases make the document nested deeper than 64 levels"),
    (
        "billion-laughs",
        b"a: &a [x,x,x,x,x,x,x,x,x,x]\n"
        + b"".join(
            f"b{i}: &b{i} [".encode() + b",".join([f"*{'a' if i == 1 else f'b{i - 1}'}".encode()] * 10) + b"]\n"
            for i in range(1, 9)
        ),
        "YAML aliases make the document too large",
    ),
    ("fifty-megabytes", "50MB", "MB; a config file is at most 1 MB"),
]


@pytest.mark.parametrize(("name", "content", "says"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_unusable_input_gives_one_clear_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes | str | None, says: str
) -> None:
    path = tmp_path / f"{name}.yaml"
    if content == "dir":
        path.mkdir()
    elif content == "50MB":
        _fifty_megabytes(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    code, out, err = run_validate(path, capsys)
    assert code == ExitCode.USAGE
    assert out == ""
    assert "Traceback" not in err and "internal error" not in err
    assert err.count("\n") == 1, err  # exactly one line
    assert err.startswith(str(path))
    assert says in err


def test_a_device_that_never_ends_is_refused_not_read_forever(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_validate(Path("/dev/zero"), capsys)
    assert (code, err) == (ExitCode.USAGE, "/dev/zero is larger than 1 MB, the most a config file may be\n")


# --- nothing but ConfigError, whatever the input -----------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "config.yaml"


def _load_or_config_error(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError always says what is wrong"
        for p in exc.problems:
            assert "\n" not in p.render()
    else:
        assert isinstance(cfg, Config)


KEYS = [
    "portfolio_id", "base_threshold", "volatility_factor", "safety_margin", "max_trades_per_cycle", "assets",
    "symbol", "target_weight", "max_deviation", "quote", "exchange", "id", "snapshot", "credentials_env", "apiKey",
    "api_url", "options", "cooldown", "hysteresis", "rebalance_to", "interval", "<<", "source",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=8),
    st.sampled_from(
        ["0.4", "1e-4", ".inf", ".nan", "0x1f", "1:30", "BTC", "USDC", "paper", "15m", "-1", "9.0e+999999", "U\nSD"]
    ),
)
YAML_TREES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from([*KEYS, "a\nb"]), st.text(max_size=4), st.integers()), inner, max_size=5
        ),
    ),
    max_leaves=20,
)
YAML_CHARS = st.text(alphabet=st.sampled_from(list("ab: -[]{}&*!,'\"\n#?|>%@`0.1\t\\")), max_size=80)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.one_of(st.binary(max_size=300), YAML_CHARS.map(str.encode), st.text(max_size=100).map(str.encode)))
def test_arbitrary_bytes_and_text_raise_only_config_error(scratch: Path, content: bytes) -> None:
    _load_or_config_error(scratch, content)


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.dictionaries(st.sampled_from(KEYS), YAML_TREES, max_size=8))
def test_arbitrary_yaml_documents_raise_only_config_error(scratch: Path, doc: dict[str, object]) -> None:
    _load_or_config_error(scratch, yaml.safe_dump(doc, allow_unicode=True).encode())


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=st.lists(
        st.tuples(
            st.sampled_from(["portfolio_id", "assets", "base_threshold", "quote", "exchange", "0", "1"]), YAML_TREES
        ),
        max_size=3,
    )
)
def test_mutations_of_a_valid_config_raise_only_config_error(scratch: Path, changes: list[tuple[str, object]]) -> None:
    doc = yaml.safe_load(DESIGN_MINIMUM)
    for where, value in changes:
        if where.isdigit():
            assets = doc["assets"]
            if isinstance(assets, list) and assets and isinstance(assets[int(where) % len(assets)], dict):
                assets[int(where) % len(assets)]["target_weight"] = value
        else:
            doc[where] = value
    _load_or_config_error(scratch, yaml.safe_dump(doc, allow_unicode=True).encode())


# --- the no-trade-region policy's keys ------------------------------------------------------------------


def test_policy_keys_default_and_are_checked_with_their_line(write: Writer) -> None:
    cfg = load_config(write(config_text()))
    assert (cfg.risk_aversion, cfg.region_point, cfg.correlations) == (D(5), D("0.5"), {})
    text = config_text() + "risk_aversion: 0\npolicy: lowest-cost\ncorrelations: {BTC/USDC: 0.5, BTC/ETH: 1.5}\n"
    path = write(text)
    got = rendered(path)
    assert f"{path}:10:16 risk_aversion: must be between 0.1 and 100 (got 0)" in got
    assert any(p.startswith(f"{path}:11:9 policy: ") and "no-trade-region" in p for p in got)
    assert any(p.startswith(f"{path}:12:16 correlations.BTC/USDC: ") and "two different traded" in p for p in got)
    assert any(p.startswith(f"{path}:12:") and "correlations.BTC/ETH: must be between -1 and 1" in p for p in got)
    extra = "policy: cost-adjusted\nrisk_aversion: 20\ncorrelations: {BTC/ETH: 0.8}\n"
    good = load_config(write(config_text() + extra))
    assert (good.policy.value, good.risk_aversion, good.correlations) == ("cost-adjusted", D(20), {"BTC/ETH": D("0.8")})
