"""`execute`: the one execution path, on the paper exchange and through real ccxt against the Binance emulator.

What a user relies on: one run converges; nothing leaves without --confirm; a stale saved plan is refused;
guards and the kill switch stop orders before they leave; sells free the quote the buys then spend; and every
bad answer an exchange can give (partial fill, worse price, a fill reported twice, fees in a third currency,
funds gone, a timeout after the order was accepted, a 5xx) ends with exchange, shadow ledger and audit trail
agreeing to the last digit, and no idempotency key ever trading twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import exec_helpers
import pytest
from exec_helpers import (
    BOOKS,
    CREDENTIALS_ENV,
    OPENING,
    assert_books_agree,
    audit_holdings,
    cli,
    emu_config,
    emulator_holdings,
    ledger_holdings,
    levels,
    once,
    order_counts,
    paper_balances,
    stores,
    write_config,
    write_snapshot,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rebalancer_cli.audit.base import OrderIntent, OrderStatus
from rebalancer_cli.cli import main
from rebalancer_cli.config import load_config
from rebalancer_cli.errors import ExitCode, HaltedError, InputError
from rebalancer_cli.executor import ExecutionReport, Executor, OrderOutcome
from rebalancer_cli.ids import new_key
from rebalancer_cli.plan_file import load_saved_plan, plan_digest
from rebalancer_cli.runtime import (
    execute,
    make_plan,
    migrate,
    open_audit_for,
    open_exchange,
    open_ledger_for,
    reconcile,
)
from rebalancer_cli.testing.emulator import Emulator, binance_client, start_emulator

D = Decimal
# a quote-poor portfolio: the ETH buy costs far more USDC than the account holds before the BTC sell settles
QUOTE_POOR = (("BTC", "0.2", "0.05"), ("ETH", "0.78", "0.05"), ("USDC", "0.02", "0.02"))


# --- paper exchange ------------------------------------------------------------------------------------


@pytest.fixture()
def paper(tmp_path: Path, unique_id: str) -> Path:
    write_snapshot(tmp_path / "market.yaml")
    return write_config(tmp_path, unique_id, {"id": "paper", "snapshot": "market.yaml"})


@dataclasses.dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


Cli = Callable[..., Ran]


@pytest.fixture()
def rebalance(capsys: pytest.CaptureFixture[str]) -> Cli:
    """The CLI's entry point in this process: same parsing, rendering and exit codes, without the start-up
    cost of a new interpreter (one test runs the real subprocess)."""

    def run(*args: str) -> Ran:
        capsys.readouterr()
        code = 0
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def test_paper_execute_converges_in_one_run_and_history_shows_it(paper: Path) -> None:
    planned = cli("plan", "--config", str(paper), "--json")
    assert planned.returncode == 0, planned.stderr
    trades = json.loads(planned.stdout)["trades"]
    assert [(t["symbol"], t["side"]) for t in trades] == [("BTC", "sell"), ("ETH", "buy")]

    done = cli("execute", "--config", str(paper), "--confirm", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == "done"
    assert [(o["idempotency_key"] != "", o["status"]) for o in report["orders"]] == [(True, "filled")] * 2
    assert D(report["drift_after"]) < D("0.001") < D(report["drift_before"])

    again = cli("plan", "--config", str(paper), "--detailed-exitcode")
    assert again.returncode == 0, again.stdout + again.stderr  # 10 would mean: still trades to make
    assert "No trades" in again.stdout

    history = cli("history", "--config", str(paper), "--json")
    assert history.returncode == 0, history.stderr
    [record] = json.loads(history.stdout)
    assert (record["status"], record["orders"], record["filled_orders"]) == ("done", 2, 2)
    # the paper exchange charges the fee in the asset received: USDC on the sell, ETH on the buy
    assert set(record["fees"]) == {"USDC", "ETH"} and all(D(v) > 0 for v in record["fees"].values())
    # the report rounds drifts to 8 decimals; history keeps them exact
    assert D(record["drift_before"]).quantize(D("1e-8")) == D(report["drift_before"])
    assert D(record["drift_after"]).quantize(D("1e-8")) == D(report["drift_after"])
    table = cli("history", "--config", str(paper))
    assert "done" in table.stdout and "USDC" in table.stdout


def test_without_confirm_it_is_a_dry_run_exit_0_or_10(paper: Path, rebalance: Cli) -> None:
    result = rebalance("execute", "--config", str(paper))
    assert result.returncode == 0  # a dry run, not a usage error: cron tells a forgotten flag from a broken file
    assert "dry run: nothing was sent" in result.stderr and "--confirm" in result.stderr
    explicit = rebalance("execute", "--config", str(paper), "--dry-run", "--detailed-exitcode")
    assert explicit.returncode == 10, explicit.stderr  # it would trade
    assert "dry run: nothing was sent" in explicit.stderr
    assert "sell" in result.stdout and "BTC/USDC" in result.stdout  # the plan it would have executed
    assert paper_balances(paper) == OPENING
    assert json.loads(rebalance("history", "--config", str(paper), "--json").stdout) == []


def _save_plan(rebalance: Cli, config: Path, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    planned = rebalance("plan", "--config", str(config), "--json")
    assert planned.returncode == 0, planned.stderr
    path = tmp_path / "plan.json"
    path.write_text(planned.stdout)
    return path, json.loads(planned.stdout)


def test_a_fresh_saved_plan_executes_once_and_never_twice(paper: Path, tmp_path: Path, rebalance: Cli) -> None:
    plan_file, plan = _save_plan(rebalance, paper, tmp_path)
    first = rebalance("execute", "--config", str(paper), "--plan", str(plan_file), "--confirm", "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert [o["idempotency_key"] for o in report["orders"]] == [t["idempotency_key"] for t in plan["trades"]]
    after_first = paper_balances(paper)
    assert after_first != OPENING

    second = rebalance("execute", "--config", str(paper), "--plan", str(plan_file), "--confirm")
    assert second.returncode == 5
    assert "holdings changed since the plan" in second.stderr
    assert paper_balances(paper) == after_first


def test_a_saved_plan_older_than_max_plan_age_is_refused(paper: Path, tmp_path: Path, rebalance: Cli) -> None:
    plan_file, plan = _save_plan(rebalance, paper, tmp_path)
    plan["taken_at"] = (datetime.now(UTC) - timedelta(seconds=120)).isoformat()
    plan["digest"] = plan_digest(plan)  # an old plan, not an edited one
    plan_file.write_text(json.dumps(plan))
    result = rebalance("execute", "--config", str(paper), "--plan", str(plan_file), "--confirm")
    assert result.returncode == 5
    assert "max_plan_age" in result.stderr and "plan again" in result.stderr
    assert paper_balances(paper) == OPENING


def test_a_saved_plan_is_refused_when_a_price_moved_beyond_the_tolerance(
    paper: Path, tmp_path: Path, rebalance: Cli
) -> None:
    plan_file, _ = _save_plan(rebalance, paper, tmp_path)
    moved = dict(BOOKS)
    moved["BTC/USDC"] = {**BOOKS["BTC/USDC"], "bids": levels("65645", "-10", "2"), "asks": levels("65655", "10", "2")}
    write_snapshot(tmp_path / "market.yaml", books=moved)  # +1%: twice the default price_tolerance
    result = rebalance("execute", "--config", str(paper), "--plan", str(plan_file), "--confirm")
    assert result.returncode == 5
    assert "BTC moved 1.00%" in result.stderr
    assert paper_balances(paper) == OPENING


@pytest.mark.parametrize(
    ("guard", "value", "refused"),
    [
        ("max_trade_notional", "1000", ["BTC", "ETH"]),
        ("max_cycle_turnover", "50000", ["ETH"]),  # the BTC sell (~39,700) passes, the buy would exceed it
        ("max_slippage", "0.00001", ["BTC", "ETH"]),
    ],
)
def test_guards_refuse_with_exit_5_and_record_why(
    tmp_path: Path, unique_id: str, guard: str, value: str, refused: list[str], rebalance: Cli
) -> None:
    write_snapshot(tmp_path / "market.yaml")
    config = write_config(tmp_path, unique_id, {"id": "paper", "snapshot": "market.yaml"}, **{guard: value})
    result = rebalance("execute", "--config", str(config), "--confirm", "--json")
    assert result.returncode == 5, result.stderr
    orders = json.loads(result.stdout)["orders"]
    assert [o["symbol"] for o in orders if o["status"] == "refused"] == refused
    assert all(guard in o["reason"] for o in orders if o["status"] == "refused")
    assert all(o["status"] == "filled" for o in orders if o["symbol"] not in refused)
    audit = open_audit_for(load_config(config))
    try:
        events = [d for _, kind, d in audit.events(unique_id) if kind == "guard_refused"]
        for o in orders:
            if o["status"] == "refused":
                assert audit.order(o["idempotency_key"]) is None  # refused before any intent: nothing left
    finally:
        audit.close()
    assert sorted(e["key"] for e in events) == sorted(o["idempotency_key"] for o in orders if o["symbol"] in refused)
    if refused == ["BTC", "ETH"]:
        assert paper_balances(config) == OPENING


def test_halt_refuses_with_reason_and_who_until_resume(paper: Path, rebalance: Cli) -> None:
    halted = rebalance("halt", "--config", str(paper), "--reason", "exchange incident #42")
    assert halted.returncode == 0, halted.stderr
    refused = rebalance("execute", "--config", str(paper), "--confirm")
    assert refused.returncode == 5
    assert "exchange incident #42" in refused.stderr
    assert "halted" in refused.stderr and " by " in refused.stderr and "@" in refused.stderr  # user@host
    assert paper_balances(paper) == OPENING

    resumed = rebalance("resume", "--config", str(paper))
    assert resumed.returncode == 0 and "exchange incident #42" in resumed.stdout
    done = rebalance("execute", "--config", str(paper), "--confirm", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "done"


def test_sells_settle_before_buys_and_buys_spend_the_quote_they_freed(tmp_path: Path, unique_id: str) -> None:
    write_snapshot(tmp_path / "market.yaml")
    config = write_config(tmp_path, unique_id, {"id": "paper", "snapshot": "market.yaml"}, targets=QUOTE_POOR)
    seen: list[tuple[str, str]] = []
    report = execute(config, listener=lambda o: seen.append((o.symbol, o.status)))
    assert report.status == "done"
    assert seen.index(("BTC", "filled")) < seen.index(("ETH", "locked"))
    sell, buy = report.outcomes
    assert (sell.side, buy.side) == ("sell", "buy")
    freed = sell.cost - sell.fees["USDC"]
    # the buy spent more than the account held before the sell, and no more than the sell freed on top
    assert OPENING["USDC"] < buy.cost <= OPENING["USDC"] + freed
    _, again = make_plan(config)
    assert again.trades == ()


# --- through ccxt against the Binance emulator ------------------------------------------------------------


@pytest.fixture()
def emu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    for name, value in CREDENTIALS_ENV.items():
        monkeypatch.setenv(name, value)
    with start_emulator(write_snapshot(tmp_path / "emulator.yaml", EMU_OPENING)) as emulator:
        yield emulator


# the emulator's opening balances: the portfolio's, and BNB for fees in a third currency
EMU_OPENING = {**OPENING, "BNB": D("10")}


def check_consistent(config: Path, emulator: Emulator, report: ExecutionReport) -> None:
    exec_helpers.check_consistent(config, emulator, report, EMU_OPENING)


@pytest.mark.parametrize("backend", ["sqlite", "redis+postgres"])
def test_emulator_execution_books_fills_and_fees_exactly(
    tmp_path: Path, emu: Emulator, unique_id: str, backend: str, request: pytest.FixtureRequest
) -> None:
    urls = {}
    if backend != "sqlite":
        urls = stores(backend, request.getfixturevalue("redis_url"), request.getfixturevalue("database_url"))
    config = emu_config(tmp_path, emu, unique_id, **urls)
    if backend != "sqlite":
        migrate(config)
    report = execute(config)
    assert report.status == "done"
    sell, buy = report.outcomes
    assert (sell.symbol, sell.side, sell.status, buy.symbol, buy.side, buy.status) == (
        "BTC", "sell", "filled", "ETH", "buy", "filled"
    )  # fmt: skip
    # Binance charges the fee in the asset received
    assert set(sell.fees) == {"USDC"} and set(buy.fees) == {"ETH"}
    held = emulator_holdings(emu.state())
    assert held["BTC"] == OPENING["BTC"] - sell.filled
    assert held["ETH"] == OPENING["ETH"] + buy.filled - buy.fees["ETH"]
    assert held["USDC"] == OPENING["USDC"] + sell.cost - sell.fees["USDC"] - buy.cost
    check_consistent(config, emu, report)
    assert all(
        c == {"accepted": 1, "filled": 1, "rejected": 0, "duplicates": 0} for c in emu.stats()["orders"].values()
    )
    _, again = make_plan(config)
    assert again.trades == ()


def test_partial_fill_is_recorded_and_the_buy_shrinks_to_the_quote_freed(
    tmp_path: Path, emu: Emulator, unique_id: str
) -> None:
    config = emu_config(tmp_path, emu, unique_id, targets=QUOTE_POOR)
    thin = once(emu, "locked", "BTC", lambda: emu.set_book("BTC/USDC", [["64995", "0.2"]], BOOKS["BTC/USDC"]["asks"]))
    planned = make_plan(config)[1].trades
    report = execute(config, listener=thin)
    assert report.status == "incomplete" and report.exit_code == 4
    sell, buy = report.outcomes
    assert sell.status == "partial" and sell.filled == D("0.2") < sell.amount
    assert "partially filled" in sell.reason
    # sized on what the sell really freed: smaller than planned, and it filled instead of being refused
    assert buy.status == "filled" and buy.filled < planned[1].amount, buy.reason
    assert buy.cost <= OPENING["USDC"] + sell.cost - sell.fees["USDC"]
    check_consistent(config, emu, report)
    audit = open_audit_for(load_config(config))
    try:
        record = audit.order(sell.key)
    finally:
        audit.close()
    assert record is not None and record.filled == D("0.2") and "partially filled" in (record.reason or "")


def test_a_book_that_fell_past_the_bound_fills_less_never_below_it(
    tmp_path: Path, emu: Emulator, unique_id: str
) -> None:
    config = emu_config(tmp_path, emu, unique_id, max_slippage=0.002)
    planned = make_plan(config)[1].trades[0]
    assert planned.side == "sell"
    # the bids fall about 0.5% between the plan and the order: only the levels within the bound may fill
    lower = once(
        emu,
        "locked",
        "BTC",
        lambda: emu.set_book("BTC/USDC", levels("64870", "-10", "0.05"), levels("64880", "10", "2")),
    )
    report = execute(config, listener=lower)
    sell = report.outcomes[0]
    assert sell.status == "partial" and report.exit_code == 4
    bound = D("64990") * (1 - D("0.002"))  # the worst level the plan walked (the best bid here) widened by 0.2%
    assert sell.avg_price is not None and sell.avg_price >= bound
    assert sell.filled == D("0.05") * sum(1 for i in range(12) if D("64870") - 10 * i >= bound)
    check_consistent(config, emu, report)


def test_a_fill_worse_than_planned_is_booked_as_filled_and_flagged(
    tmp_path: Path, emu: Emulator, unique_id: str
) -> None:
    config = emu_config(tmp_path, emu, unique_id, max_slippage=0.01)
    lower = once(
        emu, "locked", "BTC", lambda: emu.set_book("BTC/USDC", levels("64670", "-10", "2"), levels("64680", "10", "2"))
    )
    report = execute(config, listener=lower)
    assert report.status == "done"
    sell = report.outcomes[0]
    assert sell.avg_price is not None and sell.est_price is not None and sell.avg_price < sell.est_price
    check_consistent(config, emu, report)
    audit = open_audit_for(load_config(config))
    try:
        worse = [d for _, kind, d in audit.events(unique_id) if kind == "worse_fill"]
    finally:
        audit.close()
    assert [w["key"] for w in worse] == [sell.key]
    assert D(worse[0]["avg_price"]) == sell.avg_price < D(worse[0]["est_price"])


def test_an_order_reported_filled_twice_is_stored_once_and_committed_once(
    tmp_path: Path, emu: Emulator, unique_id: str
) -> None:
    config_path = emu_config(tmp_path, emu, unique_id)
    report = execute(config_path)
    assert report.status == "done"
    before = (ledger_holdings(config_path), audit_holdings(config_path, OPENING))
    config = load_config(config_path)
    exchange, ledger, audit = open_exchange(config), open_ledger_for(config), open_audit_for(config)
    try:
        executor = Executor(config, exchange, ledger, audit)
        for o in report.outcomes:
            record = audit.order(o.key)
            assert record is not None
            found = exchange.fetch_order(o.market, o.key)  # the fills seen again, on a second lookup
            assert found is not None and len(found.fills) >= 1
            totals_only = dataclasses.replace(found, fills=())  # Binance's RESULT answer: no fills listed
            for again in (found, found, totals_only):
                settled = executor.settle(record.intent, again)
                assert settled.status == "filled" and settled.filled == o.filled
            after = audit.order(o.key)
            assert after is not None and (after.filled, after.fees) == (record.filled, record.fees)
            assert ledger.is_committed(unique_id, o.key)
    finally:
        exchange.close()
        ledger.close()
        audit.close()
    assert (ledger_holdings(config_path), audit_holdings(config_path, OPENING)) == before
    check_consistent(config_path, emu, report)


def test_drift_after_is_the_ledgers_holdings_at_the_plans_mids(tmp_path: Path, emu: Emulator, unique_id: str) -> None:
    emu.set_fee_asset("BNB", "600")  # a fee in a currency outside the portfolio moves nothing of its weights
    config = emu_config(tmp_path, emu, unique_id)
    report = execute(config)
    assert report.status == "done" and all(o.filled > 0 for o in report.outcomes)
    held = ledger_holdings(config)
    values = {a.symbol: held[a.symbol] * a.mid for a in report.plan.assets}
    total = sum(values.values(), D(0))
    drift = sum((abs(a.target_weight - values[a.symbol] / total) for a in report.plan.assets), D(0))
    assert report.drift_after == drift < report.drift_before  # exactly: no ledger read, the same number


def test_fees_in_a_third_currency_are_booked_in_that_currency(tmp_path: Path, emu: Emulator, unique_id: str) -> None:
    emu.set_fee_asset("BNB", "600")  # as Binance does with "pay fees in BNB"
    config = emu_config(tmp_path, emu, unique_id)
    report = execute(config)
    assert report.status == "done"
    assert all(set(o.fees) == {"BNB"} and o.fees["BNB"] > 0 for o in report.outcomes)
    paid = sum((o.fees["BNB"] for o in report.outcomes), D(0))
    held = emulator_holdings(emu.state(), ["BNB"])
    assert held["BNB"] == D("10") - paid == audit_holdings(config, {"BNB": D("10")}, ["BNB"])["BNB"]
    check_consistent(config, emu, report)  # BTC, ETH and USDC moved by the full fill: no fee taken from them
    _, again = make_plan(config)
    assert again.trades == ()  # no phantom drift from a fee the portfolio did not pay in its own assets


def test_a_balance_that_shrank_under_us_is_rejected_and_releases_its_lock(
    tmp_path: Path, emu: Emulator, unique_id: str
) -> None:
    config_path = emu_config(tmp_path, emu, unique_id)
    report = execute(config_path, listener=once(emu, "locked", "BTC", lambda: emu.set_balance("BTC", "0.1")))
    assert report.status == "incomplete" and report.exit_code == 4
    sell, buy = report.outcomes
    assert sell.status == "rejected" and "insufficient" in sell.reason.lower()
    assert buy.status == "filled"
    assert order_counts(emu.stats())[sell.key] == {"accepted": 0, "filled": 0, "rejected": 1, "duplicates": 0}
    config = load_config(config_path)
    ledger, audit = open_ledger_for(config), open_audit_for(config)
    try:
        assert ledger.locks(unique_id) == []
        record = audit.order(sell.key)
        assert record is not None and record.status.value == "rejected"
        assert "insufficient" in (record.reason or "").lower()
    finally:
        ledger.close()
        audit.close()
    # the next run trusts the exchange again: its ledger holdings follow the shrunken balance
    assert execute(config_path).status == "done"
    assert ledger_holdings(config_path) == emulator_holdings(emu.state())


def test_a_timeout_after_the_exchange_accepted_is_looked_up_not_resent(
    tmp_path: Path, emu: Emulator, unique_id: str
) -> None:
    config = emu_config(tmp_path, emu, unique_id, exchange_extra={"timeout": "1s"})
    emu.faults.timeout_after_accept(count=1, mode="hang", hang_seconds=3)
    report = execute(config)
    assert report.status == "done"
    sell = report.outcomes[0]
    assert sell.status == "filled"
    stats = emu.stats()
    assert stats["timeouts_after_accept"] == 1
    assert order_counts(stats)[sell.key]["accepted"] == 1
    assert stats["requests"]["POST /api/v3/order"] == 2  # the sell once, the buy once: nothing re-sent
    check_consistent(config, emu, report)


def test_a_5xx_on_the_order_is_looked_up_then_resent_once_under_the_same_key(
    tmp_path: Path, emu: Emulator, unique_id: str
) -> None:
    config = emu_config(tmp_path, emu, unique_id)
    emu.faults.http_5xx(1, status=503, endpoint="/api/v3/order", method="POST")
    report = execute(config)
    assert report.status == "done"
    sell = report.outcomes[0]
    assert sell.status == "filled"
    stats = emu.stats()
    assert stats["http_5xx"] == 1
    assert stats["requests"]["POST /api/v3/order"] == 3  # the sell twice (same key), the buy once
    assert stats["requests"]["GET /api/v3/order"] >= 2  # looked up, and again after the receive window
    assert order_counts(stats)[sell.key] == {"accepted": 1, "filled": 1, "rejected": 0, "duplicates": 0}
    assert len(order_counts(stats)) == 2
    check_consistent(config, emu, report)


def test_recovery_waits_out_the_receive_window_for_an_order_still_on_its_way(
    tmp_path: Path, emu: Emulator, unique_id: str
) -> None:
    """A run died while its order was on the wire: the next run must not take "unknown to the exchange" for
    "never sent" until the receive window passed, or it would plan and sell again next to the late order."""
    config_path = emu_config(tmp_path, emu, unique_id)
    config = load_config(config_path)
    key, amount = new_key(), D("0.5")
    client = binance_client(emu.base_url, recvWindow=1000)  # the dead run's ccxt client, markets loaded
    client.load_markets()
    ledger, audit = open_ledger_for(config), open_audit_for(config)
    try:  # what the dead run left behind: intent, lock, "sent", written just before its order left
        now = datetime.now(UTC)
        audit.record_intent(OrderIntent(key, unique_id, "dead-run", "BTC/USDC", "sell", amount, D("64995"), now))
        ledger.sync_balances(unique_id, OPENING)
        assert ledger.lock(unique_id, key, "BTC", amount, ttl_seconds=600)
        audit.update_order(key, OrderStatus.SENT, at=now)
    finally:
        ledger.close()
        audit.close()
    emu.faults.latency(800, endpoint="/api/v3/order", method="POST", count=1)  # inside the 1000 ms recvWindow
    answers: list[Any] = []
    on_the_wire = threading.Thread(
        target=lambda: answers.append(
            client.create_order("BTC/USDC", "market", "sell", str(amount), None, {"clientOrderId": key})
        )
    )
    on_the_wire.start()
    while not emu.stats()["requests"].get("POST /api/v3/order"):
        time.sleep(0.01)  # the request is in the emulator now, held back by the latency

    report = execute(config_path)
    on_the_wire.join()
    assert answers and answers[0]["status"] == "closed"  # the dead run's order did trade, late
    assert [(o.key, o.status) for o in report.recovered] == [(key, "filled")]
    assert report.status == "done"
    assert order_counts(emu.stats())[key]["accepted"] == 1
    check_consistent(config_path, emu, report)
    _, again = make_plan(config_path)
    assert again.trades == ()


def test_the_final_table_shows_exchange_text_verbatim_and_never_cuts_numbers() -> None:
    """Exchange error text may look like rich markup; the table must show it, not crash after orders went out."""
    from rich.console import Console

    from rebalancer_cli.render import report as render_report

    outcome = OrderOutcome("k1", "PEPE", "PEPE/USDC", "buy", D("123456789.12345678"), status="rejected")
    outcome.reason = 'binance: InvalidOrder: {"msg": "Filter failure: [LOT_SIZE]"} [/x]'
    filled = OrderOutcome("k2", "BTC", "BTC/USDC", "sell", D("0.29692"), status="filled", filled=D("0.29692"))
    filled.avg_price, filled.fees = D("0.0000123456"), {"USDC": D("19.2983510304")}
    report = ExecutionReport("p", None, [filled, outcome], [], D("0.1"), D("0.01"))
    console = Console(width=100, record=True)
    render_report(console, report)
    text = console.export_text()
    assert 'binance: InvalidOrder: {"msg": "Filter failure: [LOT_SIZE]"} [/x]' in text
    assert "123,456,789.12345678" in text and "0.00001235" in text and "19.29835103 USDC" in text
    assert "status incomplete" in text
    narrow = Console(width=60, record=True)
    render_report(narrow, report)
    assert "…" not in narrow.export_text()  # folded onto more lines, never cut short


def test_an_unknown_outcome_whose_lookup_is_refused_stays_unknown_and_is_settled_next_run(
    tmp_path: Path, emu: Emulator, unique_id: str
) -> None:
    """The order was accepted, its answer lost, and looking it up is refused (a key rotated mid-cycle): the
    order must not be booked as rejected with its lock released, since it traded."""
    config = emu_config(tmp_path, emu, unique_id)
    emu.faults.timeout_after_accept(count=1, mode="drop")
    emu.faults.add("reject_auth", endpoint="/api/v3/order", method="GET", count=1, code=-1022)
    report = execute(config)
    assert report.exit_code == 4
    sell = report.outcomes[0]
    assert sell.status == "unknown" and "looking it up failed" in sell.reason
    assert order_counts(emu.stats())[sell.key]["filled"] == 1  # it did trade
    ledger = open_ledger_for(load_config(config))
    try:
        assert [lock.key for lock in ledger.locks(unique_id)] == [sell.key]  # its funds stay set aside
    finally:
        ledger.close()

    after = execute(config)
    assert [(o.key, o.status) for o in after.recovered] == [(sell.key, "filled")]
    assert order_counts(emu.stats())[sell.key]["accepted"] == 1
    assert_books_agree(config, emu.state(), {**OPENING, "BNB": D("10")})
    assert reconcile(config).consistent


def test_an_open_circuit_ends_the_cycle_with_exit_4_and_the_next_run_completes(
    tmp_path: Path, emu: Emulator, unique_id: str
) -> None:
    config = emu_config(tmp_path, emu, unique_id)
    outage = once(emu, "locked", "BTC", lambda: emu.faults.http_5xx(None, status=503))  # every request, from now
    report = execute(config, listener=outage)
    assert report.exit_code == 4
    sell, buy = report.outcomes
    assert sell.status == "unknown" and "circuit" in sell.reason.lower()
    assert (buy.status, buy.reason) == ("skipped", "circuit breaker open: cycle ended")
    assert emu.stats()["requests"]["POST /api/v3/order"] == 1  # the open circuit stopped the re-sends

    emu.faults.clear()
    after = execute(config)
    assert [(o.key, o.status) for o in after.recovered] == [(sell.key, "cancelled")]  # it never reached the book
    assert after.status == "done"
    check_consistent(config, emu, after)


# --- saved plans are re-checked, not trusted --------------------------------------------------------


def _resave(path: Path, plan: dict[str, Any]) -> None:
    """Write an edited plan with its digest recomputed, as someone who knows the format could: what stops it
    then must be the checks against the fresh snapshot, not the checksum."""
    plan["digest"] = plan_digest(plan)
    path.write_text(json.dumps(plan))


def _sell(plan: dict[str, Any]) -> dict[str, Any]:
    trade: dict[str, Any] = next(t for t in plan["trades"] if t["side"] == "sell")
    return trade


def test_a_saved_plan_edited_by_hand_is_refused_and_nothing_trades(paper: Path, tmp_path: Path, rebalance: Cli) -> None:
    plan_file, plan = _save_plan(rebalance, paper, tmp_path)
    _sell(plan)["amount"] = str(D(_sell(plan)["amount"]) * 3)
    plan_file.write_text(json.dumps(plan))  # digest left as it was
    result = rebalance("execute", "--config", str(paper), "--plan", str(plan_file), "--confirm")
    assert result.returncode == 2 and "edited after it was saved" in result.stderr
    assert paper_balances(paper) == OPENING


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda p: _sell(p).update(amount=str(D(_sell(p)["amount"]) * 3)), "bring it back to target"),
        (lambda p: _sell(p).update(side="buy"), "but it is overweight"),
        (lambda p: _sell(p).update(market="DOGE/USDC", symbol="DOGE"), "not one of this portfolio's markets"),
    ],
    ids=["tripled-amount", "flipped-side", "foreign-market"],
)
def test_a_forged_saved_plan_is_refused_on_the_fresh_snapshot(
    paper: Path, tmp_path: Path, rebalance: Cli, edit: Callable[[dict[str, Any]], None], why: str
) -> None:
    plan_file, plan = _save_plan(rebalance, paper, tmp_path)
    edit(plan)
    _resave(plan_file, plan)
    result = rebalance("execute", "--config", str(paper), "--plan", str(plan_file), "--confirm")
    assert result.returncode == 5, result.stderr
    assert why in result.stderr
    assert paper_balances(paper) == OPENING


def test_a_tripled_amount_meets_max_trade_notional_priced_on_the_book_not_the_file(
    tmp_path: Path, unique_id: str, rebalance: Cli
) -> None:
    write_snapshot(tmp_path / "market.yaml")
    config = write_config(tmp_path, unique_id, {"id": "paper", "snapshot": "market.yaml"})
    _, plan = _save_plan(rebalance, config, tmp_path)
    limit = (D(_sell(plan)["notional"]) * 2).quantize(D(1))  # the honest sell passes it, the tripled one not
    config = write_config(tmp_path, unique_id, {"id": "paper", "snapshot": "market.yaml"}, max_trade_notional=limit)
    plan_file, plan = _save_plan(rebalance, config, tmp_path)
    sell = _sell(plan)
    assert D(sell["notional"]) < limit < D(sell["notional"]) * 3
    sell["amount"] = str(D(sell["amount"]) * 3)  # its notional left alone, as in the reported forgery
    _resave(plan_file, plan)
    result = rebalance("execute", "--config", str(config), "--plan", str(plan_file), "--confirm", "--json")
    assert result.returncode == 5, result.stderr
    assert paper_balances(config) == OPENING


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda p: p["trades"].append(dict(p["trades"][0])), "appears twice"),
        (lambda p: p["trades"].append({**p["trades"][0], "idempotency_key": str(new_key())}), "traded twice"),
        (lambda p: p["trades"][0].update(amount="NaN"), "trades[0].amount"),
        (lambda p: p["trades"][0].update(amount="sNaN"), "trades[0].amount"),
        (lambda p: p["trades"][0].update(amount="-0"), "trades[0].amount"),
        (lambda p: p["assets"][0].update(mid="NaN"), "assets[0].mid"),
        (lambda p: p["assets"][0].update(current_weight="9e999999999"), "assets[0].current_weight"),
        (lambda p: p["trades"][0].update(side="sideways"), "trades[0].side"),
    ],
    ids=["same-key", "copied-under-new-key", "nan", "snan", "minus-zero", "nan-mid", "huge-weight", "bad-side"],
)
def test_a_malformed_saved_plan_gets_one_located_line_and_exit_2(
    paper: Path, tmp_path: Path, rebalance: Cli, edit: Callable[[dict[str, Any]], None], where: str
) -> None:
    plan_file, plan = _save_plan(rebalance, paper, tmp_path)
    edit(plan)
    _resave(plan_file, plan)
    result = rebalance("execute", "--config", str(paper), "--plan", str(plan_file), "--confirm")
    assert result.returncode == 2, result.stderr
    assert where in result.stderr and "Traceback" not in result.stderr
    assert paper_balances(paper) == OPENING


def test_a_deeply_nested_saved_plan_is_refused_in_one_line(paper: Path, tmp_path: Path, rebalance: Cli) -> None:
    plan_file = tmp_path / "deep.json"
    plan_file.write_text("[" * 100_000 + "]" * 100_000)
    result = rebalance("execute", "--config", str(paper), "--plan", str(plan_file), "--confirm")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_saved_plans_never_crash_the_loader(tmp_path: Path, data: st.DataObject) -> None:
    """Any mutation of a real saved plan is either still a valid plan or refused as bad input (exit 2)."""
    plan = json.loads(_FUZZ_BASE)
    junk = st.one_of(
        st.text(max_size=12),
        st.sampled_from(["NaN", "-0", "sNaN", "Infinity", "9e999999999", "1e-999999", "0", "-1", "1" * 5001]),
        st.integers(),
        st.none(),
        st.booleans(),
        st.lists(st.integers(), max_size=3),
    )
    for _ in range(data.draw(st.integers(1, 3))):
        # walk down to a random dict or list of the plan, then replace or delete one of its members
        node: Any = plan
        while True:
            keys = sorted(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = data.draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, dict | list) and child and data.draw(st.booleans()):
                node = child
                continue
            if data.draw(st.booleans()):
                node[key] = data.draw(junk)
            else:
                del node[key]
            break
    if data.draw(st.booleans()):
        plan["digest"] = plan_digest(plan)
    path = tmp_path / "fuzzed.json"
    path.write_text(json.dumps(plan))
    with contextlib.suppress(InputError):
        load_saved_plan(path)


_FUZZ_BASE = json.dumps(
    {
        "portfolio_id": "p",
        "quote": "USDC",
        "taken_at": "2026-11-27T10:00:00Z",
        "total_value": "100000",
        "assets": [
            {
                "symbol": "BTC",
                "target_weight": "0.4",
                "current_weight": "0.5",
                "drift": "-0.1",
                "threshold": "0.001",
                "drift_value": "4000",
                "est_cost": "10",
                "decision": "trade",
                "reason": "r",
                "mid": "65000",
            }
        ],
        "trades": [
            {
                "symbol": "BTC",
                "market": "BTC/USDC",
                "side": "sell",
                "amount": "0.15",
                "est_price": "64990",
                "notional": "9748.5",
                "est_fee": "9.7",
                "est_slippage": "1.5",
                "worst_price": "64665",
                "idempotency_key": "01a23784-cd0e-7f5e-9a11-8c644c2cfb53",
            }
        ],
        "summary": {"turnover": "9748.5", "est_total_cost": "11.2", "drift_before": "0.2", "drift_after": "0"},
        "plan_id": "01a23784-cd0e-7f5e-9a11-8c644c2cfb54",
        "policy": "cost-adjusted",
        "notes": [],
    }
)


# --- an exchange that fills outside the bound, or reports what cannot be true ----------------------------


def test_a_fill_far_below_the_bound_halts_the_portfolio_and_the_next_order_never_leaves(
    tmp_path: Path, emu: Emulator, unique_id: str
) -> None:
    config = emu_config(tmp_path, emu, unique_id)
    emu.faults.bad_fill("30000")  # the sell fills at 30,000 against a 64,990 bid
    report = execute(config)
    sell = report.outcomes[0]
    assert (report.status, report.exit_code) == ("halted", ExitCode.BAD_FILL)
    assert sell.status == "breached" and sell.avg_price == D("30000")
    assert "beyond its worst acceptable price" in sell.reason and sell.key in sell.reason
    assert [o.status for o in report.outcomes[1:]] == ["refused"]  # the buy was stopped by the halt
    counts = order_counts(emu.stats())
    assert list(counts) == [sell.key]  # judged at the exchange: the buy never left
    halted = open_ledger_for(load_config(config))
    try:
        halt = halted.halted(unique_id)
    finally:
        halted.close()
    assert halt is not None and sell.key in halt.reason
    check_consistent(config, emu, report)  # what did fill is booked exactly
    with pytest.raises(HaltedError):
        execute(config)


def test_a_zero_price_fill_is_held_as_suspect_and_reconcile_repair_unwedges_the_portfolio(
    tmp_path: Path, emu: Emulator, unique_id: str, rebalance: Cli
) -> None:
    config = emu_config(tmp_path, emu, unique_id)
    emu.faults.bad_fill("0")
    report = execute(config)
    sell = report.outcomes[0]
    assert (report.status, sell.status) == ("halted", "suspect")
    assert "price 0" in sell.reason and sell.key in sell.reason
    assert rebalance("execute", "--config", str(config), "--confirm").returncode == 5  # halted, named, no crash
    repaired = rebalance("reconcile", "--config", str(config), "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert sell.key in repaired.stdout and "stays halted" in repaired.stdout
    assert rebalance("resume", "--config", str(config)).returncode == 0
    again = rebalance("execute", "--config", str(config), "--confirm", "--json")
    assert again.returncode == 0, again.stderr  # not wedged: it plans from the exchange's balances and trades
    assert order_counts(emu.stats())[sell.key]["accepted"] == 1  # the suspect order was never sent again
    assert make_plan(config)[1].trades == ()
    assert reconcile(config).consistent


def test_an_order_signed_after_its_groups_mark_is_checked_and_marked_again_on_its_own(paper: Path) -> None:
    """A group's "leaving" marks are written before its first order leaves, stamped ahead: an order whose request
    is signed later than that (a thread held up) must not go on the group's mark. It asks the ledger again, and a
    lock taken back meanwhile (a successor's recovery) stops it."""
    config = load_config(paper)
    migrate(paper)
    ledger, audit, exchange = open_ledger_for(config), open_audit_for(config), open_exchange(config)
    now = [datetime.now(UTC)]
    executor = Executor(config, exchange, ledger, audit, clock=lambda: now[0])
    try:
        ledger.sync_balances(config.portfolio_id, {"USDC": D("100")})
        for key in ("on-time", "late"):
            assert ledger.lock(config.portfolio_id, key, "USDC", D("1"), ttl_seconds=60)
        executor._premark(["on-time", "late"])
        ahead = ledger.sent_at(config.portfolio_id, "late")
        assert ahead is not None and ahead > now[0]  # marked as leaving, stamped ahead of the clock
        assert executor._mark("on-time")[0] == "ok"  # signed before its mark's time: the group's mark holds
        ledger.release(config.portfolio_id, "late")  # taken back while its thread was held up
        now[0] = ahead + timedelta(milliseconds=1)
        assert executor._mark("late")[0] == "unlocked"  # signed after the mark: checked again, and refused
    finally:
        exchange.close()
        ledger.close()
        audit.close()
