"""What an operator sees on an ordinary terminal and in shell pipelines: tables whole at 80 columns, numbers
as the exchange writes them, exit codes that survive pipes and signals, ASCII-only output."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES, ROOT

from rebalancer_cli.cli import main

WIDTHS = (80, 120, 200)


@pytest.fixture()
def run_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run the CLI in this process at a terminal width (COLUMNS), with a private state directory."""
    from rebalancer_cli import cli

    def run(width: int, *args: str, state: str = "state") -> tuple[int, str, str]:
        monkeypatch.setenv("COLUMNS", str(width))
        monkeypatch.setenv("REBALANCE_STATE_DIR", str(tmp_path / state))
        cli._Verbosity.level = 0
        with pytest.raises(SystemExit) as info:
            main(list(args))
        out, err = capsys.readouterr()
        code = info.value.code
        return (code if isinstance(code, int) else 0), out, err

    return run


def _whole(out: str, width: int, *cells: str) -> None:
    """Every line fits, nothing is cut short, and each decisive cell appears whole inside a table cell."""
    assert "…" not in out, out
    assert max(len(line) for line in out.splitlines()) <= width, out
    for cell in cells:
        assert re.search(rf"│ *{re.escape(cell)} *│", out), f"{cell!r} not whole in:\n{out}"


@pytest.mark.parametrize("width", WIDTHS)
def test_plan_keeps_side_market_amount_price_notional_and_decision_whole(
    run_at: Any, tmp_path: Path, width: int
) -> None:
    saved = tmp_path / "plan.json"
    code, out, _ = run_at(width, "plan", "-c", "examples/treasury.yaml", "-o", str(saved))
    assert code == 0
    plan = json.loads(saved.read_text())  # -o: the same plan, as JSON
    cells = [a["decision"] for a in plan["assets"]]
    cells += [a["reason"] for a in plan["assets"] if width >= 200]  # free text may wrap at narrower widths
    for t in plan["trades"]:
        cells += [t["side"], t["market"], t["amount"], f"{float(t['notional']):,.2f}", t["idempotency_key"]]
    _whole(out, width, *cells, "64,995.12", "3,399.66")
    assert "drift value" not in out and "benefit = |drift| x total value x target weight" in out


PENNY = """\
portfolio_id: "alts"
base_threshold: 0.001
volatility_factor: 0.5
safety_margin: 1.5
max_trades_per_cycle: 10
assets:
  - {symbol: "PEPE", target_weight: 0.5, max_deviation: 0.05}
  - {symbol: "XRP", target_weight: 0.3, max_deviation: 0.05}
  - {symbol: "USDT", target_weight: 0.2, max_deviation: 0.05}
"""
PENNY_SNAPSHOT = """\
taken_at: "2026-11-27T10:00:00Z"
balances: {PEPE: "4000000000", XRP: "10000", USDT: "10000"}
markets:
  PEPE/USDT:
    taker_fee: "0.001"
    amount_step: "1"
    min_notional: "5"
    bids: [["0.00001234", "90000000000"]]
    asks: [["0.00001236", "90000000000"]]
  XRP/USDT:
    taker_fee: "0.001"
    amount_step: "0.1"
    price_step: "0.0001"
    min_notional: "5"
    bids: [["0.6200", "500000"]]
    asks: [["0.6202", "500000"]]
"""


def test_prices_and_amounts_show_at_the_markets_tick_and_lot_with_separators(run_at: Any, tmp_path: Path) -> None:
    (tmp_path / "alts.yaml").write_text(PENNY)
    (tmp_path / "snap.yaml").write_text(PENNY_SNAPSHOT)
    args = ("plan", "-c", str(tmp_path / "alts.yaml"), "--snapshot", str(tmp_path / "snap.yaml"))
    _, out, _ = run_at(80, *args, "--json")
    trades = {t["market"]: t for t in json.loads(out)["trades"]}
    assert set(trades) == {"PEPE/USDT", "XRP/USDT"}
    assert run_at(80, *args)[0] == 0
    _, out, _ = run_at(80, *args)
    pepe = f"{int(trades['PEPE/USDT']['amount']):,}"  # lot 1: no decimals, thousands separated
    assert "," in pepe
    _whole(out, 80, pepe, "0.00001234", "0.6202")


@pytest.fixture()
def paper_config(tmp_path: Path) -> Path:
    """The treasury example on the original rule, whose trades (to target) these rendering tests know."""
    text = (EXAMPLES / "treasury.yaml").read_text().replace("# policy: no-trade-region", "policy: cost-adjusted")
    assert "\npolicy: cost-adjusted" in text
    (tmp_path / "treasury.yaml").write_text(text)
    shutil.copy(EXAMPLES / "market.yaml", tmp_path / "market.yaml")
    return tmp_path / "treasury.yaml"


@pytest.mark.parametrize("width", WIDTHS)
def test_execute_report_and_history_keep_their_decisive_columns_whole(
    run_at: Any, paper_config: Path, width: int
) -> None:
    state = f"state-{width}"
    code, out, err = run_at(width, "execute", "-c", str(paper_config), "--confirm", state=state)
    assert code == 0, err
    _whole(out, width, "sell", "BTC/USDC", "ETH/USDC", "0.29692", "2.7499", "filled", "64,995.12", "3,399.66")
    code, out, _ = run_at(width, "history", "-c", str(paper_config), state=state)
    assert code == 0
    _whole(out, width, "done", "2/2 filled", "28,647.08", "29.31% → 0.02%")
    assert re.search(r"│ \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC *│", out), out  # a time with its zone


def test_reconcile_differences_and_backtest_compare_fit_80_columns(run_at: Any, tmp_path: Path) -> None:
    from rich.console import Console

    from rebalancer_cli import render
    from rebalancer_cli.reconcile import Difference

    diffs = [Difference("balance", "BTC", "1.20000000", "1.50000000", "1.50000000", "the ledger holds more")]
    for width in WIDTHS:
        console = Console(width=width, record=True)
        render.differences(console, diffs)
        _whole(console.export_text(), width, "balance", "BTC", "1.20000000", "1.50000000")
    prices = tmp_path / "p.csv"
    assert run_at(80, "backtest", "generate", "--steps", "120", "-o", str(prices))[0] == 0
    for width in WIDTHS:
        code, out, err = run_at(width, "backtest", "-c", "examples/treasury.yaml", "--prices", str(prices), "--compare")
        assert code == 0, err
        _whole(out, width, "cost-adjusted+hysteresis+cooldown", "cost-adjusted-edge-half", "calendar")


def test_an_empty_history_says_so_and_no_percentage_reads_minus_zero(run_at: Any, paper_config: Path) -> None:
    from rebalancer_cli import render

    code, out, _ = run_at(80, "history", "-c", str(paper_config))
    assert (code, out.strip()) == (0, "No executions recorded yet for this portfolio.")
    assert render.pct("-0.00001") == "0.00%" and render.pct("-0.00001", signed=True) == "0.00%"
    assert render.pct("0.0123", signed=True) == "+1.23%" and render.money("-0.001") == "0.00"


# --- exit codes through the real entry point -------------------------------------------------------------


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCE_")}
    return {**env, "REBALANCE_STATE_DIR": str(tmp_path / "state"), **extra}


def test_a_closed_pipe_keeps_the_commands_own_exit_code(tmp_path: Path) -> None:
    plan = f"{sys.executable} -m rebalancer_cli plan -c examples/treasury.yaml --detailed-exitcode"
    r = subprocess.run(
        ["bash", "-c", f"{plan} | head -1; echo ${{PIPESTATUS[0]}}"],
        capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=60,
    )  # fmt: skip
    assert r.stdout.splitlines()[-1] == "10", r.stdout + r.stderr
    # and when the reader is gone before the first byte is written (deterministic EPIPE)
    for args, code in ((["--detailed-exitcode"], 10), (["--json", "--detailed-exitcode"], 10), ([], 0)):
        p = subprocess.Popen(
            [sys.executable, "-m", "rebalancer_cli", "plan", "-c", "examples/treasury.yaml", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=_env(tmp_path),
        )  # fmt: skip
        assert p.stdout is not None and p.stderr is not None
        p.stdout.close()
        err = p.stderr.read().decode()
        assert p.wait(timeout=60) == code, err
        assert "Traceback" not in err and "Exception ignored" not in err, err


def test_ascii_only_output_degrades_instead_of_failing_after_trading(tmp_path: Path, paper_config: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "rebalancer_cli", "execute", "-c", str(paper_config), "--confirm"],
        capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path, PYTHONIOENCODING="ascii"), timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "status done - drift 29.31% -> 0.02%" in r.stdout
    assert r.stdout.isascii()


@pytest.fixture()
def emulator(tmp_path: Path) -> Iterator[Any]:
    from exec_helpers import remote_emulator, write_snapshot

    with remote_emulator(write_snapshot(tmp_path / "emu-market.yaml")) as emu:
        yield emu


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_execute_names_the_order_in_flight_and_the_next_run_settles_it(
    tmp_path: Path, emulator: Any, sig: int, code: int
) -> None:
    from exec_helpers import CREDENTIALS_ENV, emulator_exchange, write_config

    config = write_config(tmp_path, "interrupted", emulator_exchange(emulator.base_url))
    emulator.faults.latency(1500, endpoint="/api/v3/order", method="POST", count=1)
    env = _env(tmp_path, **CREDENTIALS_ENV)
    argv = [sys.executable, "-m", "rebalancer_cli", "execute", "-c", str(config), "--confirm"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stderr is not None
    lines = []
    for line in p.stderr:  # the progress lines of a non-terminal run
        lines.append(line)
        if line.endswith(": sent\n"):
            break
    p.send_signal(sig)  # by pid: the process this test started
    rest = p.stderr.read()
    assert p.wait(timeout=30) == code, "".join(lines) + rest
    side, amount, market = lines[-1].split(":")[0].split()
    match = re.search(rf"^  {side} {amount} {market}  client id ([0-9a-f-]{{36}})  \(sent", rest, re.M)
    assert match, rest
    assert "the next `rebalance execute` or `rebalance reconcile` settles them" in rest
    if sig != signal.SIGINT:
        return  # settling is the same after either signal; once is enough
    settled = subprocess.run([*argv, "--json"], capture_output=True, text=True, env=env, timeout=60)
    report = json.loads(settled.stdout)
    assert match.group(1) in {o["idempotency_key"] for o in report["recovered"]}, settled.stdout


# --- the kill switch, init, and the smaller items ---------------------------------------------------------


def test_a_second_halt_keeps_the_first_reason_and_plan_and_history_show_the_kill_switch(
    run_at: Any, paper_config: Path
) -> None:
    cfg = str(paper_config)
    code, out, _ = run_at(80, "halt", "-c", cfg, "--reason", "exchange incident", "--json")
    assert code == 0 and json.loads(out)["halted"]["reason"] == "exchange incident"
    code, _, err = run_at(80, "halt", "-c", cfg, "--reason", "something else")
    assert code == 5 and "already halted" in err and "exchange incident" in err and "--force" in err
    code, out, _ = run_at(80, "plan", "-c", cfg, "--json")
    assert json.loads(out)["halted"]["reason"] == "exchange incident"
    code, out, _ = run_at(80, "plan", "-c", cfg)
    assert "HALTED" in out and "exchange incident" in out
    code, out, _ = run_at(80, "halt", "-c", cfg, "--reason", "maintenance", "--force", "--json")
    assert (code, json.loads(out)["replaced"]["reason"]) == (0, "exchange incident")
    code, out, _ = run_at(80, "resume", "-c", cfg, "--json")
    assert json.loads(out)["resumed"] is True
    code, out, _ = run_at(80, "plan", "-c", cfg, "--json")
    assert json.loads(out)["halted"] is None
    code, out, _ = run_at(80, "history", "-c", cfg, "--json")
    assert [(e["kind"], e["reason"]) for e in json.loads(out)] == [
        ("resume", "maintenance"),
        ("halt", "maintenance"),
        ("halt", "exchange incident"),
    ]
    code, out, _ = run_at(80, "history", "-c", cfg)
    _whole(out, 80, "halt", "resume")


def test_init_writes_a_config_and_snapshot_that_plan_runs_at_once(run_at: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "new" / "portfolio.yaml"
    code, out, err = run_at(80, "init", "-c", str(cfg))
    assert code == 0, err
    assert cfg.read_text().startswith("# A portfolio for `rebalance`")
    assert run_at(80, "validate-config", str(cfg))[0] == 0
    code, out, err = run_at(80, "plan", "-c", str(cfg), "--json")
    assert code == 0 and json.loads(out)["trades"], err
    code, _, err = run_at(80, "init", "-c", str(cfg))
    assert code == 2 and "--force" in err  # never overwrites silently


def test_version_json_everywhere_and_atomic_output(run_at: Any, tmp_path: Path, paper_config: Path) -> None:
    code, out, _ = run_at(80, "--version")
    assert code == 0 and re.fullmatch(r"rebalance \d+\.\d+\.\d+\S*\n", out)
    prices = tmp_path / "p.csv"
    code, out, _ = run_at(80, "backtest", "generate", "--steps", "10", "-o", str(prices), "--json")
    assert json.loads(out)["rows"] == 10
    code, out, _ = run_at(80, "db", "migrate", "-c", str(paper_config), "--json")
    assert isinstance(json.loads(out)["applied"], list)
    code, out, _ = run_at(80, "snapshot", "-c", str(paper_config), "-o", str(tmp_path / "s.yaml"), "--json")
    assert json.loads(out)["markets"] == 2
    schema = tmp_path / "schema.json"
    code, out, _ = run_at(80, "config-schema", "-o", str(schema))
    assert code == 0 and out == "" and json.loads(schema.read_text())["title"] == "rebalance portfolio config"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    code, out, _ = run_at(80, "plan", "-c", str(paper_config), "-q")
    assert (code, out) == (0, "")


def test_help_shows_no_python_types_and_backtest_help_lists_the_policies(capsys: pytest.CaptureFixture[str]) -> None:
    from rebalancer_cli import cli
    from rebalancer_cli.simulation import generate, names, policies

    # --help reads the names from simulation.names, which imports nothing: they must be the simulation's own
    assert cli.POLICY_NAMES == policies.POLICY_NAMES and set(names.REGIME_NAMES) == set(generate.REGIMES)
    for path in (["plan"], ["daemon"], ["execute"], ["backtest"]):
        with pytest.raises(SystemExit):
            main([*path, "--help"])
        out = capsys.readouterr().out
        assert "<bool>" not in out and "list[" not in out, out
        if path == ["backtest"]:
            assert all(name in " ".join(out.split()) for name in policies.POLICY_NAMES), out


def test_chart_without_matplotlib_says_the_local_install_before_running(
    run_at: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from rebalancer_cli.simulation import replay as backtest

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(backtest, "backtest_files", lambda *a, **k: pytest.fail("the backtest ran first"))
    args = ("backtest", "-c", "examples/treasury.yaml", "--prices", "examples/prices.csv", "--chart", "x.png")
    code, _, err = run_at(80, *args)
    assert code == 2 and "pip install -e '.[chart]'" in err and "rebalance[chart]" not in err


def test_a_short_credential_does_not_garble_messages_and_a_real_one_is_scrubbed() -> None:
    from types import SimpleNamespace

    from rebalancer_cli.exchange.ccxt_exchange import CcxtExchange

    text = "okx: AuthenticationError: https://www.okx.com/api/v5/account key=K3yK3yK3y pw a sEcReT-long-enough-123"
    fake = SimpleNamespace(_secrets=("a", "K3yK3yK3y", "sEcReT-long-enough-123"))
    scrubbed = CcxtExchange._scrub(fake, text)  # type: ignore[arg-type]
    assert scrubbed == "okx: AuthenticationError: https://www.okx.com/api/v5/account key=*** pw a ***"
