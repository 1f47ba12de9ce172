"""The terminal shell: parse, call one core function per command, render, map errors to exit codes.

Nothing here decides anything about money; `runtime`, `planner` and `executor` do. Heavy modules are imported
inside commands so that `--help`, completion and `validate-config` start fast (ccxt alone takes ~0.4 s).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from .errors import ExitCode, InvalidFileError, RebalanceError

if TYPE_CHECKING:
    from rich.console import Console

    from .planner import Plan

app = typer.Typer(
    name="rebalance",
    help="Keep portfolios at their target weights on real exchanges, safely and cheaply.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 0 done, 1 internal error, 2 bad usage/config, 3 unreachable, 4 incomplete, "
    "5 refused, 10 plan has trades (--detailed-exitcode).",
)

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="Portfolio config (YAML).", dir_okay=True, show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def _out() -> Console:
    from rich.console import Console

    # piped output (cron mail, CI logs) gets room for the full table instead of the 80-column default
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _long_running() -> None:
    """Collect garbage again (see `main`), leaving what is loaded so far out of every future collection."""
    gc.freeze()
    gc.enable()


def _err_line(text: str) -> None:
    """Errors are written plainly, one per line, never wrapped: scripts grep them."""
    sys.stderr.write(text + "\n")


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# --- validate-config / config-schema ------------------------------------------------------------


@app.command("validate-config", epilog="Example: rebalance validate-config examples/treasury.yaml")
def validate_config(
    file: Annotated[Path, typer.Argument(help="Config file to check.", show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """Check a config against the schema; list every problem with its line, exit 2 if any."""
    from .config import load_config

    try:
        config = load_config(file)
    except InvalidFileError as exc:
        if as_json:
            _print_json([p.as_dict() for p in exc.problems])
            raise typer.Exit(ExitCode.USAGE) from None
        raise
    if as_json:
        _print_json([])
    else:
        _out().print(
            f"{file}: valid (portfolio {config.portfolio_id}, {len(config.assets)} assets, quote {config.quote})"
        )


@app.command("config-schema", epilog="Example: rebalance config-schema > rebalance.schema.json")
def config_schema() -> None:
    """Print the JSON Schema of the config, for editors and linters."""
    from .config import json_schema

    _print_json(json_schema())


# --- plan -------------------------------------------------------------------------------------------


@app.command(
    "plan",
    epilog="Example: rebalance plan --config examples/treasury.yaml --json",
)
def plan_cmd(
    config: ConfigOpt,
    snapshot: Annotated[
        Path | None, typer.Option("--snapshot", help="Plan from a saved snapshot file instead of the exchange.")
    ] = None,
    as_json: JsonOpt = False,
    detailed_exitcode: Annotated[
        bool, typer.Option("--detailed-exitcode", help="Exit 10 when the plan proposes trades.")
    ] = False,
) -> None:
    """Snapshot balances, prices and books and print the cost-adjusted trade plan. Never trades."""
    from .runtime import make_plan

    _, plan = make_plan(config, snapshot_path=snapshot)
    if as_json:
        _print_json(plan.to_dict())
    else:
        render_plan(_out(), plan)
    if detailed_exitcode and plan.has_trades:
        raise typer.Exit(ExitCode.PLAN_HAS_TRADES)


def render_plan(console: Console, plan: Plan) -> None:
    from rich.table import Table

    d = plan.to_dict()
    title = f"Plan for {plan.portfolio_id}: total value {_num(d['total_value'])} {plan.quote}"
    table = Table(title=title, title_justify="left")
    for col in ("asset", "target", "current", "drift", "threshold", "drift value", "est. cost"):
        table.add_column(col, justify="right" if col != "asset" else "left", no_wrap=True)
    table.add_column("decision", no_wrap=True)
    table.add_column("reason", ratio=1)
    for a in d["assets"]:
        style = "bold green" if a["decision"] == "trade" else "dim"
        table.add_row(
            a["symbol"],
            _pct(a["target_weight"]),
            _pct(a["current_weight"]),
            _pct(a["drift"], signed=True),
            _pct(a["threshold"]),
            _num(a["drift_value"]),
            _num(a["est_cost"]),
            f"[{style}]{a['decision']}[/]",
            a["reason"],
        )
    console.print(table)
    if d["trades"]:
        trades = Table(title="Trades, in execution order", title_justify="left")
        for col in ("#", "side", "market", "amount", "est. price", "notional", "fee", "slippage", "idempotency key"):
            trades.add_column(
                col, justify="right" if col not in ("side", "market", "idempotency key") else "left", no_wrap=True
            )
        for i, t in enumerate(d["trades"], 1):
            trades.add_row(
                str(i),
                t["side"],
                t["market"],
                t["amount"],
                _num(t["est_price"]),
                _num(t["notional"]),
                _num(t["est_fee"]),
                _num(t["est_slippage"]),
                t["idempotency_key"],
            )
        console.print(trades)
    else:
        console.print("No trades: nothing is worth its cost right now.")
    s = d["summary"]
    console.print(
        f"turnover {_num(s['turnover'])} {plan.quote} · est. cost {_num(s['est_total_cost'])} {plan.quote} · "
        f"drift {_pct(s['drift_before'])} -> {_pct(s['drift_after'])}"
    )
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}")


def _pct(text: str, *, signed: bool = False) -> str:
    from decimal import Decimal

    value = Decimal(text) * 100
    return f"{value:+.2f}%" if signed else f"{value:.2f}%"


def _num(text: str) -> str:
    from decimal import Decimal

    return f"{Decimal(text):,.2f}"


# --- execute, kill switch, history, stores ---------------------------------------------------------------


@app.command(
    "execute",
    epilog="Example: rebalance execute --config examples/treasury.yaml --confirm",
)
def execute_cmd(
    config: ConfigOpt,
    confirm: Annotated[bool, typer.Option("--confirm", help="Actually send the orders.")] = False,
    plan_file: Annotated[
        Path | None, typer.Option("--plan", help="Execute this saved plan (from `plan --json`) if still valid.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Execute the cost-adjusted plan through the shadow ledger, idempotency keys and the audit trail."""
    from .runtime import execute

    if not confirm:
        report = execute(config, saved_plan=plan_file, plan_only=True)
        assert report.plan is not None
        if as_json:
            _print_json(report.plan.to_dict())
        else:
            render_plan(_out(), report.plan)
        _err_line("nothing was sent: add --confirm to execute this plan")
        raise typer.Exit(ExitCode.USAGE)
    listener, finish = _live_view(enabled=not as_json)
    try:
        report = execute(config, saved_plan=plan_file, listener=listener)
    finally:
        finish()
    if as_json:
        _print_json(report.to_dict())
    else:
        render_report(_out(), report)
    raise typer.Exit(report.exit_code)


def _live_view(*, enabled: bool) -> tuple[Any, Any]:
    """A live table of orders on a terminal; plain progress lines on stderr otherwise."""
    from .executor import OrderOutcome

    rows: dict[str, OrderOutcome] = {}
    if not enabled:
        return None, lambda: None
    if not sys.stderr.isatty():

        def line(o: OrderOutcome) -> None:
            _err_line(f"{o.side} {o.amount} {o.market}: {o.status}{' (' + o.reason + ')' if o.reason else ''}")

        return line, lambda: None
    from rich.live import Live
    from rich.table import Table

    def table() -> Table:
        t = Table(title="Orders")
        for col in ("market", "side", "amount", "status", "filled", "avg price"):
            t.add_column(col)
        for o in rows.values():
            t.add_row(
                o.market,
                o.side,
                _amount(str(o.amount)),
                o.status,
                _amount(str(o.filled)),
                _price(str(o.avg_price)) if o.avg_price else "",
            )
        return t

    live = Live(table(), console=_errc(), refresh_per_second=8, transient=True)
    live.start()

    def update(o: OrderOutcome) -> None:
        rows[o.key] = o
        live.update(table())

    return update, live.stop


def _errc() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def render_report(console: Console, report: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    d = report.to_dict()
    for title, orders in (("Recovered from an earlier run", d["recovered"]), ("Orders", d["orders"])):
        if not orders:
            continue
        t = Table(title=title, title_justify="left")
        for col in ("#", "side", "market", "amount", "status", "filled", "avg price", "fees"):
            # a number too wide for the terminal folds onto a second line: a number cut short would mislead
            t.add_column(col, no_wrap=col in ("#", "side", "status"), overflow="fold")
        reasons: list[str] = []
        for i, o in enumerate(orders, 1):
            fees = ", ".join(f"{_amount(v)} {k}" for k, v in o["fees"].items())
            t.add_row(
                str(i),
                o["side"],
                o["market"],
                _amount(o["amount"]),
                o["status"],
                _amount(o["filled"]),
                _price(o["avg_price"]) if o["avg_price"] else "",
                fees,
            )
            if o["reason"]:
                reasons.append(f"  {i}. {escape(o['reason'])}")  # exchange text, not markup
        console.print(t)
        for line in reasons:
            console.print(line)
    if not d["orders"]:
        console.print("No trades: nothing is worth its cost right now.")
    before, after = d["drift_before"], d["drift_after"]
    console.print(f"status {d['status']} · drift {_pct(before) if before else '?'} -> {_pct(after) if after else '?'}")
    for note in d["notes"]:
        console.print(f"[yellow]note:[/] {escape(note)}")


def _amount(text: str) -> str:
    """An exact amount without trailing zeros, at most 8 decimals (what exchanges show); exact in --json."""
    from decimal import ROUND_HALF_EVEN, Decimal

    d = Decimal(text).quantize(Decimal("1e-8"), rounding=ROUND_HALF_EVEN)
    out = format(d, "f")
    return out.rstrip("0").rstrip(".") if "." in out else out


def _price(text: str) -> str:
    """Prices keep their significant digits: 2 decimals hide everything about a price of 0.00001234."""
    from decimal import Decimal

    d = Decimal(text)
    if abs(d) >= 1000:
        return f"{d:,.2f}"
    if abs(d) >= 1:
        return f"{d:,.4f}"
    return _amount(format(d, "f")) if d else "0"


@app.command("halt", epilog='Example: rebalance halt --config examples/treasury.yaml --reason "exchange incident"')
def halt_cmd(
    config: ConfigOpt,
    reason: Annotated[str, typer.Option("--reason", help="Why; shown to everyone who tries to trade.")],
) -> None:
    """Pull the kill switch: execute and the daemon send nothing for this portfolio until `resume`."""
    from .runtime import halt

    h = halt(config, reason)
    _out().print(f"halted by {h.by} at {h.at:%Y-%m-%d %H:%M:%S}Z: {h.reason}")


@app.command("resume", epilog="Example: rebalance resume --config examples/treasury.yaml")
def resume_cmd(config: ConfigOpt) -> None:
    """Lift the kill switch."""
    from .runtime import resume

    previous = resume(config)
    _out().print(f"resumed (was halted by {previous.by}: {previous.reason})" if previous else "was not halted")


@app.command("history", epilog="Example: rebalance history --config examples/treasury.yaml --limit 5")
def history_cmd(
    config: ConfigOpt,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000, help="How many executions.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Recent executions from the audit trail, with cost and drift before and after."""
    from .runtime import history

    records = history(config, limit)
    if as_json:
        _print_json(
            [
                {
                    "plan_id": r.plan_id,
                    "created_at": r.created_at.isoformat(),
                    "status": r.status,
                    "orders": r.orders,
                    "filled_orders": r.filled_orders,
                    "turnover": format(r.turnover, "f"),
                    "fees": {k: format(v, "f") for k, v in r.fees.items()},
                    "drift_before": format(r.drift_before, "f") if r.drift_before is not None else None,
                    "drift_after": format(r.drift_after, "f") if r.drift_after is not None else None,
                }
                for r in records
            ]
        )
        return
    from rich.table import Table

    t = Table(title="Executions, newest first", title_justify="left")
    for col in ("time", "status", "orders", "filled", "turnover", "fees", "drift before", "drift after"):
        t.add_column(col)
    for r in records:
        t.add_row(
            f"{r.created_at:%Y-%m-%d %H:%M:%S}",
            r.status,
            str(r.orders),
            str(r.filled_orders),
            f"{r.turnover:,.2f}",
            ", ".join(f"{v:.8f} {k}" for k, v in r.fees.items()),
            _pct(str(r.drift_before)) if r.drift_before is not None else "",
            _pct(str(r.drift_after)) if r.drift_after is not None else "",
        )
    _out().print(t)


@app.command("reconcile", epilog="Example: rebalance reconcile --config examples/treasury.yaml --repair")
def reconcile_cmd(
    config: ConfigOpt,
    repair: Annotated[bool, typer.Option("--repair", help="Align ledger and audit with the exchange.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Compare exchange, shadow ledger and audit trail; exit 4 while they disagree (after --repair: 0)."""
    from .runtime import reconcile

    report = reconcile(config, repair=repair)
    if as_json:
        _print_json(report.to_dict())
    else:
        from rich.table import Table

        if report.consistent:
            _out().print(f"{report.portfolio_id}: exchange, ledger and audit agree")
        else:
            t = Table(title="Differences", title_justify="left")
            for col in ("kind", "subject", "exchange", "ledger", "audit", "note"):
                t.add_column(col)
            for d in report.differences:
                t.add_row(d.kind, d.subject, d.exchange, d.ledger, d.audit, d.note)
            _out().print(t)
        for line in report.repaired:
            _out().print(f"repaired: {line}")
    if not report.consistent and not repair:
        raise typer.Exit(ExitCode.INCOMPLETE)


@app.command(
    "daemon",
    epilog="Example: rebalance daemon --config portfolios/ --metrics-port 9108 --log-format json",
)
def daemon_cmd(
    config: Annotated[
        list[Path], typer.Option("--config", "-c", help="Config file or directory of configs; repeatable.")
    ],
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", help="Serve /metrics and /healthz on this port.")
    ] = None,
    metrics_host: Annotated[str, typer.Option("--metrics-host", help="Address to serve metrics on.")] = "127.0.0.1",
    log_format: Annotated[
        str, typer.Option("--log-format", help="text, json or auto (json when not a terminal).")
    ] = "auto",
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
    instance_id: Annotated[str | None, typer.Option("--instance-id", help="Name of this instance in leases.")] = None,
    lease_ttl: Annotated[float, typer.Option("--lease-ttl", min=1.0, help="Seconds a lease lasts unrenewed.")] = 15.0,
    workers: Annotated[int, typer.Option("--workers", min=1, max=256, help="Portfolios worked at once.")] = 8,
    processes: Annotated[
        int, typer.Option("--processes", min=1, max=64, help="Worker processes, each running --workers cycles.")
    ] = 1,
    otlp_endpoint: Annotated[
        str | None, typer.Option("--otlp-endpoint", help="Export traces over OTLP/HTTP to this URL.")
    ] = None,
) -> None:
    """Keep every configured portfolio at its targets, continuously; several instances share the work."""
    from .daemon import run_daemon
    from .telemetry import setup_logging

    _long_running()
    if log_format not in ("text", "json", "auto"):
        raise typer.BadParameter("must be text, json or auto", param_hint="--log-format")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise typer.BadParameter("must be debug, info, warning or error", param_hint="--log-level")
    setup_logging(log_format, log_level)
    raise typer.Exit(
        run_daemon(
            config,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            instance_id=instance_id,
            lease_ttl=lease_ttl,
            workers=workers,
            processes=processes,
            otlp_endpoint=otlp_endpoint,
        )
    )


db_app = typer.Typer(
    help="Audit store administration.",
    no_args_is_help=True,
    epilog="Example: rebalance db migrate --config examples/treasury.yaml",
)
app.add_typer(db_app, name="db")


@db_app.command("migrate", epilog="Example: rebalance db migrate --config examples/treasury.yaml")
def db_migrate_cmd(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Portfolio config naming the store.")] = None,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="Audit store URL (default: the config's, else embedded).")
    ] = None,
) -> None:
    """Apply pending schema migrations to the audit store (idempotent; safe when run concurrently)."""
    from .runtime import migrate

    applied = migrate(config, database_url)
    _out().print(f"applied {', '.join(applied)}" if applied else "audit store already at the current schema")


# --- snapshot ------------------------------------------------------------------------------------


@app.command(
    "snapshot",
    epilog="Example: rebalance snapshot --config portfolio.yaml -o incident.yaml, then "
    "rebalance plan --config portfolio.yaml --snapshot incident.yaml replays the decision",
)
def snapshot_cmd(
    config: ConfigOpt,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Snapshot file to write (YAML, atomically).", show_default=False)
    ],
) -> None:
    """Save balances, fees, volatility and every market's full book, for `plan --snapshot` to replay."""
    from .runtime import save_live_snapshot

    snap = save_live_snapshot(config, output)
    _out().print(
        f"{output}: {len(snap.markets)} markets, {len(snap.balances)} balances, taken at "
        f"{snap.taken_at:%Y-%m-%d %H:%M:%S}Z ({snap.skew_seconds:.3f}s apart)"
    )


# --- backtest ------------------------------------------------------------------------------------------

backtest_app = typer.Typer(
    help="Replay a price history through the planner and paper fills; compare policies' cost and drift.",
    invoke_without_command=True,
)
app.add_typer(backtest_app, name="backtest")


def _decimal_opt(flag: str, text: str | None) -> Any:
    from decimal import Decimal, InvalidOperation

    from .errors import InputError

    if text is None:
        return None
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise InputError(f"{flag} {text!r}: must be a number") from None
    if not value.is_finite() or value < 0:
        raise InputError(f"{flag} {text!r}: must be a finite number of at least 0")
    return value


@backtest_app.callback(
    invoke_without_command=True,
    epilog="Example: rebalance backtest --config examples/treasury.yaml --prices examples/prices.csv --compare",
)
def backtest_cmd(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Portfolio config (YAML); required.", show_default=False)
    ] = None,
    prices: Annotated[
        Path | None,
        typer.Option("--prices", help="Prices CSV: timestamp or date, then one close per asset; required."),
    ] = None,
    policy: Annotated[
        list[str] | None,
        typer.Option("--policy", "-p", help="Policy to replay; repeatable (default: config, the config's own)."),
    ] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Replay every known policy side by side.")] = False,
    as_json: JsonOpt = False,
    chart: Annotated[
        Path | None, typer.Option("--chart", help="Write a PNG of drift and cumulative cost (needs matplotlib).")
    ] = None,
    spread_bps: Annotated[str | None, typer.Option("--spread-bps", help="Synthetic book spread (default 2).")] = None,
    depth: Annotated[
        str | None, typer.Option("--depth", help="Quote value at the best level of the book (default 50000).")
    ] = None,
    levels: Annotated[int | None, typer.Option("--levels", min=1, max=200, help="Book levels (default 20).")] = None,
    fee: Annotated[
        str | None, typer.Option("--fee", help="Taker fee, e.g. 0.001 (default: the config's exchange, else 0.001).")
    ] = None,
    initial_value: Annotated[
        str, typer.Option("--initial-value", help="Starting value in quote, at target weights.")
    ] = "100000",
    calendar_period: Annotated[
        str, typer.Option("--calendar-period", help="Period of the calendar policy, e.g. 7d or 30d.")
    ] = "30d",
) -> None:
    """Replay a price history through the planner and paper fills; compare policies' cost and drift.

    Lists the policies with --compare; `rebalance backtest generate` writes reproducible price scenarios.
    """
    if ctx.invoked_subcommand is not None:
        return
    from dataclasses import replace

    from . import backtest as bt
    from .errors import InputError
    from .market_model import BookModel

    _long_running()
    if config is None or prices is None:
        raise InputError("backtest needs --config FILE and --prices FILE (or a subcommand: generate)")
    model = BookModel()
    changes: dict[str, Any] = {}
    if spread_bps is not None:
        changes["spread_bps"] = _decimal_opt("--spread-bps", spread_bps)
    if depth is not None:
        changes["depth_quote"] = _decimal_opt("--depth", depth)
    if levels is not None:
        changes["levels"] = levels
    if changes:
        model = replace(model, **changes)
    calendar_seconds = bt.parse_step(calendar_period, flag="--calendar-period", low=60, high=None)

    bar: Any = None

    def progress(total: int) -> bt.Progress | None:
        nonlocal bar
        if total < 200_000 or not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(console=Console(stderr=True), transient=True)
        bar.start()
        task = bar.add_task("backtest", total=total)
        return lambda done: bar.advance(task, done)

    try:
        report = bt.backtest_files(
            config,
            prices,
            policy_names=policy or (),
            compare=compare,
            book_model=model,
            taker_fee=_decimal_opt("--fee", fee),
            initial_value=_decimal_opt("--initial-value", initial_value),
            calendar_seconds=calendar_seconds,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.stop()
    if chart is not None:
        bt.write_chart(report, chart)
    if as_json:
        _print_json(report.to_dict())
        return
    _render_backtest(_out(), report)
    if chart is not None:
        _out().print(f"chart: {chart}")


_BACKTEST_COLUMNS = (
    "trades",
    "turnover",
    "fees",
    "slippage",
    "total cost",
    "drift avg",
    "drift max",
    "TE/yr",
    "API calls",
    "final value",
)


def _render_backtest(console: Console, report: Any) -> None:
    from decimal import Decimal

    from rich.table import Table

    d = report.to_dict()
    p = d["prices"]
    title = (
        f"Backtest of {d['portfolio_id']}: {p['steps']:,} steps of {p['step_seconds']}s, "
        f"{p['start'][:10]} to {p['end'][:10]} ({d['quote']})"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("policy", no_wrap=True)
    for col in _BACKTEST_COLUMNS:
        table.add_column(col, justify="right", no_wrap=True)
    for r in d["results"]:
        table.add_row(
            r["policy"],
            f"{r['trades']:,}",
            f"{Decimal(r['turnover']):,.0f}",
            _num(r["fees"]),
            _num(r["slippage"]),
            _num(r["total_cost"]),
            _pct(r["mean_drift"]),
            _pct(r["max_drift"]),
            _pct(r["tracking_error"]),
            f"{r['api_calls']:,}",
            f"{Decimal(r['final_value']):,.0f}",
        )
    console.print(table)
    m = d["market_model"]
    fees = ", ".join(f"{s} {v['taker_fee']} ({v['fee_source']})" for s, v in m["markets"].items())
    console.print(
        f"book: spread {m['spread_bps']} bps, {m['levels']} levels, {_num(m['depth_quote'])} {d['quote']} at the "
        f"best level · taker fee {fees} · drift = sum |target - weight| before trading · TE/yr = annualized "
        "tracking error against the portfolio kept at target"
    )


@backtest_app.command(
    "generate",
    epilog="Example: rebalance backtest generate --regime volatile --steps 8760 --step 1h --seed 7 -o volatile.csv",
)
def backtest_generate_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Prices CSV to write.", show_default=False)],
    regime: Annotated[str, typer.Option("--regime", help="calm, trending or volatile (with jumps).")] = "calm",
    steps: Annotated[int, typer.Option("--steps", min=2, max=5_000_000, help="Rows to generate.")] = 8760,
    step: Annotated[str, typer.Option("--step", help="Time per row, 1m to 1d (e.g. 1m, 1h, 1d).")] = "1h",
    seed: Annotated[int, typer.Option("--seed", help="Random seed: the same seed gives the same file.")] = 1,
    asset: Annotated[
        list[str] | None,
        typer.Option("--asset", help="SYMBOL=START_PRICE; repeatable (default BTC=65000, ETH=3500)."),
    ] = None,
) -> None:
    """Write reproducible prices: geometric Brownian motion with a volatility regime and jumps."""
    from . import backtest as bt

    series = bt.generate_file(
        output,
        regime=regime,
        steps=steps,
        step_seconds=bt.parse_step(step),
        seed=seed,
        assets=bt.parse_assets(asset or []) or None,
    )
    _out().print(
        f"{output}: {len(series):,} rows of {', '.join(series.assets)}, {series.step_seconds}s apart, "
        f"regime {regime}, seed {seed}"
    )


# --- entry point --------------------------------------------------------------------------------------


def _fail(exc: RebalanceError) -> NoReturn:
    if isinstance(exc, InvalidFileError):
        for p in exc.problems:
            _err_line(p.render())
        if len(exc.problems) > 1:
            _err_line(f"{len(exc.problems)} problems")
    else:
        _err_line(f"error: {exc}")
    sys.exit(exc.exit_code)


_READ_ONLY_COMMANDS = ("plan", "validate-config", "config-schema")
# Commands a cron job runs every few minutes: dispatched straight to their function when the arguments are simple
# (see `_direct`), since typer builds the whole command tree, every command's parameters, before parsing any.
_HOT_COMMANDS = ("plan",)


def _direct(argv: list[str]) -> tuple[Any, dict[str, Any]] | None:
    """(the command's function, its keyword arguments) for a hot command whose arguments need nothing of typer:
    only its own options, each given once, as `--name value`, `--name=value`, `-n value` or a boolean flag, with
    every required one present. Anything else (help, a bad flag, a missing value) is None: typer parses it, with
    its messages. The options are read from the command's own declarations, so a new option needs no change here.
    """
    import inspect
    import types
    import typing

    if not argv or argv[0] not in _HOT_COMMANDS:
        return None
    command = next((c for c in app.registered_commands if c.name == argv[0]), None)
    if command is None or command.callback is None:
        return None
    fn = command.callback
    hints = typing.get_type_hints(fn, include_extras=True)
    flags: dict[str, tuple[str, bool]] = {}  # "--config" -> ("config", takes a Path)
    required: set[str] = set()
    for name, param in inspect.signature(fn).parameters.items():
        hint = hints.get(name)
        info = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, typer.models.OptionInfo)), None)
        if info is None or info.envvar or info.exists or info.resolve_path or info.callback:
            return None  # an argument, a typer.Context, or something typer checks: typer parses
        base = typing.get_args(hint)[0]
        kinds = {a for a in typing.get_args(base) if a is not None.__class__}
        if not isinstance(base, types.UnionType):
            kinds = {base}
        # typer.Option("--name", "-n") inside Annotated: the first declaration arrives as the option's default
        first = (info.default,) if isinstance(info.default, str) and info.default.startswith("-") else ()
        decls = (*first, *(info.param_decls or ()))
        if not decls or any("/" in d for d in decls):
            return None  # typer names it itself, or it is an on/off pair
        if kinds == {bool}:
            takes_value = False
        elif kinds == {Path}:
            takes_value = True
        else:
            return None
        for decl in decls:
            flags[decl] = (name, takes_value)
        if param.default is param.empty:
            required.add(name)
    kwargs: dict[str, Any] = {}
    args = iter(argv[1:])
    for token in args:
        flag, eq, inline = token.partition("=")
        known = flags.get(flag)
        if known is None or known[0] in kwargs:
            return None
        name, takes_value = known
        if not takes_value:
            if eq:
                return None
            kwargs[name] = True
            continue
        value = inline if eq else next(args, None)
        if value is None or (not eq and value.startswith("-")):
            return None
        kwargs[name] = Path(value)
    if not required <= kwargs.keys():
        return None
    return fn, kwargs


def main(argv: list[str] | None = None) -> NoReturn:
    # A one-shot command allocates a bounded heap, most of it by imports (ccxt alone builds ~100 exchange
    # classes): collecting cycles while they load only rescans them, ~0.2 s of a `plan`. Long-running
    # commands (daemon, backtest) turn the collector back on once their imports are done (`_long_running`).
    gc.disable()
    # pydantic scans every installed package's entry points for plugins when it builds the first model; the
    # config's models need none (set the variable to anything else to have them loaded)
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    try:
        direct = _direct(sys.argv[1:] if argv is None else argv)
    except Exception:  # an option declaration the direct way cannot read: typer reads it
        direct = None
    args = sys.argv[1:] if argv is None else argv
    # read-only commands that leave no thread behind: their process may end without the interpreter's teardown
    quick = argv is None and (
        direct is not None or not args or args[0] in _READ_ONLY_COMMANDS or any(a in ("-h", "--help") for a in args)
    )
    try:
        _dispatch(argv, direct)
    except SystemExit as exc:
        if quick:
            _exit_now(exc.code)
        raise


def _exit_now(code: object) -> NoReturn:
    """End a finished read-only command (or help) without the interpreter's teardown, which frees every module
    object one by one (ccxt's ~100 exchange classes: ~0.14 s of CPU, a quarter of a `plan`; ~40 ms of `--help`).
    Exit handlers run and output is flushed first, as in a normal exit; such a command leaves no thread or file
    behind."""
    import atexit
    import contextlib

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more to say
            stream.flush()
    if code is None or isinstance(code, int):
        os._exit(code or 0)
    with contextlib.suppress(Exception):
        sys.stderr.write(f"{code}\n")
        sys.stderr.flush()
    os._exit(1)


def _dispatch(argv: list[str] | None, direct: tuple[Any, dict[str, Any]] | None) -> NoReturn:
    try:
        if direct is not None:
            fn, kwargs = direct
            code = fn(**kwargs)
        else:
            code = app(args=argv, prog_name="rebalance", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as exc:  # bad usage: unknown flag, missing option, bad value
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            _err_line(f"error: {exc}")
        sys.exit(ExitCode.USAGE)
    except RebalanceError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _err_line("interrupted")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:
        if os.environ.get("REBALANCE_DEBUG"):
            raise
        _err_line(
            f"internal error: {type(exc).__name__}: {exc} (a bug: please report it; "
            "REBALANCE_DEBUG=1 shows the traceback)"
        )
        sys.exit(ExitCode.INTERNAL)
    sys.exit(code if isinstance(code, int) else 0)
