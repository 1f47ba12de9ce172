"""The CLI through its real entry point, as scripts and cron jobs run it: exit codes, stdout, stderr.

Every run is a subprocess of `python -m rebalancer_cli` with the state directory in a temporary folder, so
what is tested is what a user's shell gets, including imports, argument parsing and the exit status.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer
import yaml
from conftest import EXAMPLES, ROOT

from rebalancer_cli.cli import _direct, app, main

BROKEN_SECRET = "x9f3kLq0pZ"  # the credential pasted into examples/broken.yaml

# Weights exactly at target: BTC 0.8 * 50000 = 40000, ETH 12 * 2500 = 30000, USDC 30000; total 100000
# -> 0.4 / 0.3 / 0.3, the weights of examples/treasury.yaml. Mids: (49990 + 50010) / 2, (2499 + 2501) / 2.
BALANCED = """\
taken_at: "2026-11-27T10:00:00Z"
balances: {BTC: "0.8", ETH: "12", USDC: "30000"}
markets:
  BTC/USDC:
    taker_fee: "0.001"
    amount_step: "0.00001"
    min_notional: "5"
    bids: [["49990", "3"], ["49980", "5"]]
    asks: [["50010", "3"], ["50020", "5"]]
  ETH/USDC:
    taker_fee: "0.001"
    amount_step: "0.0001"
    min_notional: "5"
    bids: [["2499", "40"], ["2498", "60"]]
    asks: [["2501", "40"], ["2502", "60"]]
"""

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


@pytest.fixture()
def rebalance(tmp_path: Path) -> Any:
    """Run the real entry point; the state directory is private to the test."""
    state = tmp_path / "state"
    state.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCE_")}
    env["REBALANCE_STATE_DIR"] = str(state)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rebalancer_cli", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
        )

    return run


def _no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr


# --- exit 0 -----------------------------------------------------------------------------------------------------


def test_validate_config_ok(rebalance: Any) -> None:
    r = rebalance("validate-config", "examples/treasury.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "examples/treasury.yaml: valid (portfolio treasury-v1, 3 assets, quote USDC)"
    assert r.stderr == ""


def test_validate_config_json_ok_is_an_empty_list(rebalance: Any) -> None:
    r = rebalance("validate-config", "examples/treasury.yaml", "--json")
    assert (r.returncode, json.loads(r.stdout)) == (0, [])


def test_plan_prints_tables_and_exits_0(rebalance: Any) -> None:
    r = rebalance("plan", "--config", "examples/treasury.yaml")
    assert r.returncode == 0, r.stderr
    _no_traceback(r)
    assert "Plan for treasury-v1" in r.stdout
    assert "Trades, in execution order" in r.stdout
    assert "turnover" in r.stdout


# --- plan --json: exactly the Plan object of DESIGN.md ------------------------------------------------------

PLAN_KEYS = {"portfolio_id", "quote", "taken_at", "total_value", "assets", "trades", "summary"}
ASSET_KEYS = {
    "symbol", "target_weight", "current_weight", "drift", "threshold", "drift_value", "est_cost", "decision", "reason",
}  # fmt: skip
ASSET_DECIMALS = ASSET_KEYS - {"symbol", "decision", "reason"}
TRADE_KEYS = {
    "symbol", "market", "side", "amount", "est_price", "notional", "est_fee", "est_slippage", "idempotency_key",
}  # fmt: skip
TRADE_DECIMALS = {"amount", "est_price", "notional", "est_fee", "est_slippage"}
SUMMARY_KEYS = {"turnover", "est_total_cost", "drift_before", "drift_after"}


def _decimal_text(value: object) -> Decimal:
    assert isinstance(value, str), f"decimals are JSON strings, not {type(value).__name__}: {value!r}"
    d = Decimal(value)
    assert d.is_finite()
    return d


def test_plan_json_is_one_object_with_the_design_keys_and_exit_10_with_trades(rebalance: Any) -> None:
    r = rebalance("plan", "--config", "examples/treasury.yaml", "--json", "--detailed-exitcode")
    assert r.returncode == 10, r.stderr  # --detailed-exitcode: the plan proposes trades
    plan = json.loads(r.stdout)  # the whole of stdout is one JSON document: nothing before or after it
    assert isinstance(plan, dict)
    assert plan.keys() >= PLAN_KEYS
    assert (plan["portfolio_id"], plan["quote"]) == ("treasury-v1", "USDC")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", plan["taken_at"])
    total = _decimal_text(plan["total_value"])
    assert total > 0

    assert [a["symbol"] for a in plan["assets"]] == ["BTC", "ETH", "USDC"]  # one per config asset, in order
    for a in plan["assets"]:
        assert a.keys() >= ASSET_KEYS
        for key in ASSET_DECIMALS:
            _decimal_text(a[key])
        assert a["decision"] in ("trade", "hold") and a["reason"]
        # drift is signed, target minus current
        assert _decimal_text(a["drift"]) == _decimal_text(a["target_weight"]) - _decimal_text(a["current_weight"])

    assert plan["trades"], "the example portfolio is off target: the plan trades"
    sides = [t["side"] for t in plan["trades"]]
    assert sides == sorted(sides, key=lambda s: s != "sell")  # sells before buys
    for t in plan["trades"]:
        assert t.keys() >= TRADE_KEYS
        for key in TRADE_DECIMALS:
            _decimal_text(t[key])
        assert t["market"] == f"{t['symbol']}/USDC"
        assert re.fullmatch(
            r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", t["idempotency_key"]
        )

    assert plan["summary"].keys() >= SUMMARY_KEYS
    summary = {k: _decimal_text(plan["summary"][k]) for k in SUMMARY_KEYS}
    assert summary["turnover"] == sum(_decimal_text(t["notional"]) for t in plan["trades"])
    assert summary["drift_after"] <= summary["drift_before"]


def test_plan_detailed_exitcode_is_0_when_nothing_to_trade(rebalance: Any, tmp_path: Path) -> None:
    snap = tmp_path / "balanced.yaml"
    snap.write_text(BALANCED)
    r = rebalance("plan", "-c", "examples/treasury.yaml", "--snapshot", str(snap), "--json", "--detailed-exitcode")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["trades"] == []
    assert plan["total_value"] is not None and Decimal(plan["total_value"]) == Decimal(100000)
    assert {a["symbol"]: Decimal(a["drift"]) for a in plan["assets"]} == {"BTC": 0, "ETH": 0, "USDC": 0}
    assert {a["decision"] for a in plan["assets"]} == {"hold"}


# --- exit 2 -----------------------------------------------------------------------------------------------------


def test_broken_example_reports_all_its_mistakes_with_lines_in_one_run(rebalance: Any) -> None:
    r = rebalance("validate-config", "examples/broken.yaml")
    assert r.returncode == 2
    assert r.stdout == ""
    _no_traceback(r)
    lines = r.stderr.splitlines()
    located = [ln for ln in lines if re.match(r"examples/broken\.yaml:\d+:\d+ ", ln)]
    assert lines == [*located, f"{len(located)} problems"]
    for expected in [
        "examples/broken.yaml:3:1 base_treshold: unknown key; did you mean 'base_threshold'?",
        "examples/broken.yaml:5:16 safety_margin: must be between 1.0 and 5.0 (got 0.8)",
        "examples/broken.yaml:7:1 max_trades_per_cycle: duplicate key (first on line 6); a repeated key would "
        "silently override the first",
        "examples/broken.yaml:9:36 assets[0].target_weight: must be between 0 and 1 (got 1.3)",
        "examples/broken.yaml:10:41 assets[1].max_deviaton: unknown key; did you mean 'max_deviation'?",
        "examples/broken.yaml:11:14 assets[2].symbol: duplicate symbol BTC (also assets[0])",
    ]:
        assert expected in lines
    assert any(ln.startswith("examples/broken.yaml:15:") and "credentials_env.apiKey" in ln for ln in lines)
    distinct_lines = {int(ln.split(":")[1]) for ln in located}
    assert len(distinct_lines) >= 4
    assert BROKEN_SECRET not in r.stderr + r.stdout


def test_validate_config_json_lists_located_errors(rebalance: Any) -> None:
    r = rebalance("validate-config", "examples/broken.yaml", "--json")
    assert r.returncode == 2
    errors = json.loads(r.stdout)
    assert isinstance(errors, list) and len(errors) >= 4
    for e in errors:
        assert set(e) == {"line", "column", "path", "message"}
        assert isinstance(e["line"], int) and e["line"] > 0 and isinstance(e["column"], int) and e["column"] > 0
        assert isinstance(e["path"], str) and isinstance(e["message"], str)
    assert {"line": 5, "column": 16, "path": "safety_margin", "message": "must be between 1.0 and 5.0 (got 0.8)"} in (
        errors
    )
    assert BROKEN_SECRET not in r.stdout + r.stderr


def test_plan_with_a_bad_config_exits_2_with_located_lines(rebalance: Any) -> None:
    r = rebalance("plan", "--config", "examples/broken.yaml", "--json")
    assert r.returncode == 2
    assert r.stdout == ""  # a script reading the plan gets nothing rather than half a plan
    assert "examples/broken.yaml:5:16 safety_margin: must be between 1.0 and 5.0 (got 0.8)" in r.stderr.splitlines()
    _no_traceback(r)


def test_plan_with_a_bad_snapshot_exits_2_with_located_lines(rebalance: Any, tmp_path: Path) -> None:
    snap = tmp_path / "crossed.yaml"
    snap.write_text(BALANCED.replace('[["2499", "40"]', '[["2600", "40"]'))
    r = rebalance("plan", "-c", "examples/treasury.yaml", "--snapshot", str(snap), "--json")
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        f"{snap}:11:5 markets.ETH/USDC: crossed book: best bid 2600 is not below best ask 2501"
    ]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("plan", "--config", "examples/treasury.yaml", "--bogus"), "No such option: --bogus"),
        (("plan",), "Missing option '--config'"),
        (("validate-config",), "validate-config takes one config: FILE or --config FILE"),
        (("frobnicate",), "No such command 'frobnicate'"),
        (("plan", "--config", "examples/nothere.yaml"), "examples/nothere.yaml no such config file"),
        (
            ("plan", "-c", "examples/treasury.yaml", "--snapshot", "examples/nothere.yaml"),
            "examples/nothere.yaml no such snapshot file",
        ),
    ],
)
def test_bad_usage_and_missing_files_exit_2(rebalance: Any, args: tuple[str, ...], says: str) -> None:
    r = rebalance(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    _no_traceback(r)
    assert says in r.stderr


def test_plan_without_an_exchange_says_what_to_add_and_exits_2(rebalance: Any, tmp_path: Path) -> None:
    # DESIGN.md's minimum config is valid but names no exchange: planning from it must explain, not crash
    cfg = tmp_path / "minimum.yaml"
    cfg.write_text(DESIGN_MINIMUM)
    r = rebalance("plan", "--config", str(cfg))
    assert r.returncode == 2
    _no_traceback(r)
    assert re.match(rf"{re.escape(str(cfg))}:\d+:\d+ exchange: no exchange configured", r.stderr), r.stderr
    assert "--snapshot" in r.stderr
    snap = tmp_path / "balanced.yaml"
    snap.write_text(BALANCED)
    assert rebalance("plan", "--config", str(cfg), "--snapshot", str(snap), "--json").returncode == 0


# --- config-schema ----------------------------------------------------------------------------------------------


def _properties(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        for name, prop in (node.get("properties") or {}).items():
            found.append((f"{path}.{name}", prop))
        for key, value in node.items():
            found += _properties(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _properties(value, f"{path}[{i}]")
    return found


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-m", "rebalancer_cli", "config-schema"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)  # the whole of stdout is the schema
    assert isinstance(printed, dict)
    return printed


def test_config_schema_describes_every_property(schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)
    props = _properties(schema)
    names = {p.rsplit(".", 1)[1] for p, _ in props}
    # the walk reaches the nested models, so "every property" covers the exchange block and the assets
    assert {
        "portfolio_id",
        "assets",
        "exchange",
        "target_weight",
        "max_deviation",
        "credentials_env",
        "api_url",
    } <= names
    assert "source" not in names  # set by the loader, never written in a file
    undescribed = [p for p, prop in props if not str(prop.get("description", "")).strip()]
    assert undescribed == []


def test_config_schema_agrees_with_the_loader_on_the_examples(schema: dict[str, Any]) -> None:
    """An editor using the schema must not flag a file the loader accepts, and must flag unknown keys."""
    validator = jsonschema.Draft202012Validator(schema)
    for text in [(EXAMPLES / "treasury.yaml").read_text(), DESIGN_MINIMUM, DESIGN_MINIMUM.replace("0.001", '"1e-4"')]:
        assert list(validator.iter_errors(yaml.safe_load(text))) == []
    broken = list(validator.iter_errors(yaml.safe_load((EXAMPLES / "broken.yaml").read_text())))
    assert any("base_treshold" in e.message for e in broken)


# --- fast start and help ------------------------------------------------------------------------------------

FAST_START = """
import sys
from rebalancer_cli.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("ccxt", "redis", "psycopg"))
sys.stderr.write(f"exit={code} heavy={','.join(heavy)}\\n")
"""


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("--help",), 0),
        (("validate-config", "examples/treasury.yaml"), 0),
        (("validate-config", "examples/broken.yaml"), 2),
    ],
)
def test_help_and_validate_config_do_not_import_heavy_modules(args: tuple[str, ...], code: int) -> None:
    r = subprocess.run([sys.executable, "-c", FAST_START, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.stderr.splitlines()[-1] == f"exit={code} heavy="


def _command_paths(command: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group, nested ones included (typer may vendor click: duck-typed)."""
    paths = [prefix]
    for name, sub in (getattr(command, "commands", None) or {}).items():
        paths += _command_paths(sub, (*prefix, name))
    return paths


def test_every_command_help_shows_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    commands = [p for p in _command_paths(typer.main.get_command(app)) if p]
    assert {("validate-config",), ("config-schema",), ("plan",)} <= set(commands)
    missing = []
    for path in commands:
        with pytest.raises(SystemExit) as info:
            main([*path, "--help"])
        out, _ = capsys.readouterr()
        assert info.value.code == 0
        if "Example:" not in out:
            missing.append(" ".join(path))
    assert missing == []


# --- validate-config runs what plan would check before its first request ---------------------------------------


@pytest.mark.parametrize(
    ("exchange", "says"),
    [
        ("exchange: {id: krakn}\n", ":10:16 exchange.id: 'krakn' is neither `paper` nor an exchange ccxt knows; did "
         "you mean 'kraken'?"),
        ("exchange:\n  id: kraken\n", ":10:1 exchange.credentials_env: kraken needs the credential(s) apiKey, secret"),
        ("exchange:\n  id: okx\n  credentials_env: {apiKey: OKX_KEY, secret: OKX_SECRET}\n",
         ":12:20 exchange.credentials_env: okx needs the credential(s) password"),
        ("exchange:\n  id: paper\n  snapshot: nothere.yaml\n", ":12:13 exchange.snapshot: no such snapshot file"),
        ("", ":1:1 exchange: no exchange configured"),
    ],
)  # fmt: skip
def test_validate_config_fails_where_plan_would_at_the_config_line(
    rebalance: Any, tmp_path: Path, exchange: str, says: str
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(DESIGN_MINIMUM + exchange)
    for args in (("validate-config", str(cfg)), ("validate-config", "--config", str(cfg))):
        r = rebalance(*args)
        assert (r.returncode, r.stdout) == (2, ""), r.stderr
        assert r.stderr.startswith(f"{cfg}{says}"), r.stderr
    if exchange:  # and plan stops at the same line, before any request
        r = rebalance("plan", "--config", str(cfg))
        assert r.returncode == 2 and r.stderr.startswith(f"{cfg}{says}"), r.stderr


def test_validate_config_notes_credentials_not_set_here_without_failing(rebalance: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(DESIGN_MINIMUM + "exchange:\n  id: kraken\n  credentials_env: {apiKey: RB_K, secret: RB_S}\n")
    r = rebalance("validate-config", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "note: credential apiKey: environment variable RB_K is not set here" in r.stderr


def test_the_static_list_of_ccxt_exchanges_matches_the_installed_ccxt() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_ccxt_ids.py"), "--check"], capture_output=True)
    assert r.returncode == 0, r.stderr


def _in_process(capsys: pytest.CaptureFixture[str], run: Any) -> tuple[int, dict[str, Any] | str]:
    with pytest.raises(SystemExit) as done:
        run()
    out = capsys.readouterr().out
    code = done.value.code if isinstance(done.value.code, int) else 0
    try:
        doc = json.loads(out)
    except ValueError:
        return code, out
    doc.pop("plan_id")
    doc.pop("taken_at")  # the paper exchange's snapshot is taken now
    doc.pop("digest")  # over the ids and the time
    for t in doc["trades"]:
        t.pop("idempotency_key")
    return code, doc


@pytest.mark.parametrize(
    "args",
    [
        ["--config", "examples/treasury.yaml", "--json", "--detailed-exitcode"],
        ["-c", "examples/treasury.yaml", "--json"],
        ["--json", "--config=examples/treasury.yaml"],
    ],
)
def test_plan_dispatched_directly_answers_as_typer_does(
    args: list[str], capsys: pytest.CaptureFixture[str], state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`plan` skips typer's parsing when its options are plain; the outcome is the same as through typer."""
    monkeypatch.chdir(ROOT)
    assert _direct(["plan", *args]) is not None, "these arguments take the direct way"
    direct = _in_process(capsys, lambda: main(["plan", *args]))

    def through_typer() -> None:
        try:
            code = app(args=["plan", *args], prog_name="rebalance", standalone_mode=False)
        except typer.Exit as exc:  # --detailed-exitcode
            code = exc.exit_code
        raise SystemExit(code or 0)

    typed = _in_process(capsys, through_typer)
    assert direct[0] == typed[0] == (10 if "--detailed-exitcode" in args else 0)
    assert isinstance(direct[1], dict) and direct[1]["trades"]
    assert direct[1] == typed[1]


@pytest.mark.parametrize(
    "args", [["--config", "examples/treasury.yaml", "--bogus"], ["--config"], ["--json"], ["--help"]]
)
def test_plan_arguments_typer_must_judge_still_get_its_messages(rebalance: Any, args: list[str]) -> None:
    assert _direct(["plan", *args]) is None
    r = rebalance("plan", *args)
    if args == ["--help"]:
        assert r.returncode == 0 and "--detailed-exitcode" in r.stdout
    else:
        assert r.returncode == 2 and (
            "No such option" in r.stderr or "requires an argument" in r.stderr or "Missing option" in r.stderr
        ), r.stderr
