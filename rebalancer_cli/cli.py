"""The terminal shell: parse, call one core function per command, render, map errors to exit codes.

Nothing here decides anything about money; `runtime`, `planner` and `executor` do. Heavy modules are imported
inside commands so that `--help`, completion and `validate-config` start fast (ccxt alone takes ~0.4 s).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from .errors import ExitCode, InvalidFileError, RebalanceError

if TYPE_CHECKING:
    from rich.console import Console

_EXIT_CODES = (
    "Exit codes: 0 done, 1 internal error, 2 bad usage/config, 3 unreachable, 4 incomplete, 5 refused, "
    "10 trades proposed (--detailed-exitcode), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."
)

app = typer.Typer(
    name="rebalance",
    help="Keep portfolios at their target weights on real exchanges, safely and cheaply.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=_EXIT_CODES,
)

# metavar="" keeps `<bool>` off plain flags in --help
ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", help="Portfolio config (YAML).", dir_okay=True, show_default=False, metavar="FILE"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.", metavar="")]
WaitOpt = Annotated[
    float,
    typer.Option(
        "--wait",
        min=0.0,
        max=86400.0,
        metavar="SECONDS",
        help="When another writer holds the portfolio, wait up to this long for it (default: refuse, exit 6).",
    ),
]


class _Verbosity:
    level = 0  # -1 quiet, 0 normal, 1 info logs, 2 debug logs


def _set_verbose(value: int) -> int:
    if value:
        from .telemetry import setup_logging

        _Verbosity.level = max(_Verbosity.level, value)
        setup_logging("text", "debug" if _Verbosity.level >= 2 else "info")
    return value


def _set_quiet(value: bool) -> bool:
    if value:
        _Verbosity.level = -1
    return value


VerboseOpt = Annotated[
    int,
    typer.Option(
        "--verbose",
        "-v",
        count=True,
        callback=_set_verbose,
        metavar="",
        show_default=False,
        help="Log to stderr: -v info, -vv debug.",
    ),
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", callback=_set_quiet, metavar="", help="Print only errors and --json output."),
]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output", "-o", help="Also write the JSON to FILE (atomically).", show_default=False, metavar="FILE"
    ),
]


class LogFormat(StrEnum):
    text = "text"
    json = "json"
    auto = "auto"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("rebalance")
        except PackageNotFoundError:
            text = "unknown (not installed)"
        _write_stdout(f"rebalance {text}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    _version_flag: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit."),
    ] = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Keep portfolios at their target weights on real exchanges, safely and cheaply."""


# --- output that tells the truth in pipes ---------------------------------------------------------------------


def _silence_stdout() -> None:
    """The reader went away (`| head -1`): drop the rest of the output, keep running to the command's own exit
    code (rich's default exits 1 there, which `set -o pipefail` scripts would take for a failure)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _write_stdout(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()


def _out() -> Console:
    from rich.console import Console

    class Out(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            _silence_stdout()

    # COLUMNS wins; else the terminal's width; piped output (cron mail, CI logs) gets 160 columns
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 160
    return Out(highlight=False, width=width, quiet=_Verbosity.level < 0)


def _long_running() -> None:
    """Collect garbage again (see `main`), leaving what is loaded so far out of every future collection."""
    gc.freeze()
    gc.enable()


def _err_line(text: str) -> None:
    """Errors are written plainly, one per line, never wrapped: scripts grep them."""
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except BrokenPipeError:
        pass


def _info(text: str) -> None:
    """A hint on stderr, silenced by -q."""
    if _Verbosity.level >= 0:
        _err_line(text)


def _print_json(data: Any) -> None:
    _write_stdout(json.dumps(data, indent=2) + "\n")


def _write_output(path: Path, data: Any) -> None:
    from .fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


# --- validate-config / config-schema ------------------------------------------------------------


@app.command(
    "validate-config",
    epilog="Example: rebalance validate-config examples/treasury.yaml (or --config examples/treasury.yaml)",
)
def validate_config(
    file: Annotated[
        Path | None, typer.Argument(help="Config file to check (or --config FILE).", show_default=False, metavar="FILE")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Config file to check.", show_default=False, metavar="FILE")
    ] = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Check a config as `plan` would before its first request; list every problem with its line, exit 2.

    Checked: the schema, the exchange id (known to ccxt), the credentials that exchange needs named in
    credentials_env, the files the config names."""
    from .config import check_config
    from .errors import InputError

    if (file is None) == (config is None):
        raise InputError("validate-config takes one config: FILE or --config FILE")
    path = file or config
    assert path is not None
    try:
        checked, notes = check_config(path)
    except InvalidFileError as exc:
        if as_json:
            _print_json([p.as_dict() for p in exc.problems])
            raise typer.Exit(ExitCode.USAGE) from None
        raise
    for note in notes:
        _info(f"note: {note}")
    if as_json:
        _print_json([])
    else:
        _out().print(
            f"{path}: valid (portfolio {checked.portfolio_id}, {len(checked.assets)} assets, quote {checked.quote})"
        )


@app.command("config-schema", epilog="Example: rebalance config-schema -o rebalance.schema.json")
def config_schema(output: OutputOpt = None, verbose: VerboseOpt = 0, quiet: QuietOpt = False) -> None:
    """Print the JSON Schema of the config, for editors and linters."""
    from .config import json_schema

    _schema_out(json_schema(), output)


@app.command("snapshot-schema", epilog="Example: rebalance snapshot-schema -o snapshot.schema.json")
def snapshot_schema(output: OutputOpt = None, verbose: VerboseOpt = 0, quiet: QuietOpt = False) -> None:
    """Print the JSON Schema of a snapshot file (the paper exchange's account, `plan --snapshot`)."""
    from .snapshot import json_schema

    _schema_out(json_schema(), output)


def _schema_out(schema: dict[str, Any], output: Path | None) -> None:
    if output is None:
        _print_json(schema)
        return
    _write_output(output, schema)
    _info(f"{output}: written")


@app.command("init", epilog="Example: rebalance init -c portfolio.yaml && rebalance plan -c portfolio.yaml")
def init_cmd(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="Config file to write.", show_default=True, metavar="FILE")
    ] = Path("rebalance.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite files that exist.", metavar="")] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Write a commented config and a paper-exchange snapshot beside it: `plan` runs on them at once."""
    from .scaffold import init_portfolio

    result = init_portfolio(config, force=force)
    if as_json:
        _print_json(result.to_dict())
        return
    _out().print(
        f"wrote {result.config} and {result.snapshot} (paper exchange); next: rebalance plan --config {result.config}"
    )


# --- plan -------------------------------------------------------------------------------------------


@app.command(
    "plan",
    epilog="Example: rebalance plan --config examples/treasury.yaml --json",
)
def plan_cmd(
    config: ConfigOpt,
    snapshot: Annotated[
        Path | None,
        typer.Option("--snapshot", help="Plan from a saved snapshot file instead of the exchange.", metavar="FILE"),
    ] = None,
    as_json: JsonOpt = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Also save the JSON plan to FILE, atomically (for execute --plan).", metavar="FILE"
        ),
    ] = None,
    detailed_exitcode: Annotated[
        bool, typer.Option("--detailed-exitcode", help="Exit 10 when the plan proposes trades.", metavar="")
    ] = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Snapshot balances, prices and books and print the cost-adjusted trade plan. Never trades."""
    from . import render
    from .runtime import plan_portfolio

    result = plan_portfolio(config, snapshot_path=snapshot)
    if output is not None:
        _write_output(output, result.to_dict())
    if as_json:
        _print_json(result.to_dict())
    else:
        render.plan(_out(), result.plan, result.halt)
        for note in result.notes:
            _out().print(f"[yellow]note:[/] {note}")
    if detailed_exitcode and result.plan.has_trades:
        raise typer.Exit(ExitCode.PLAN_HAS_TRADES)


# --- execute, kill switch, history, stores ---------------------------------------------------------------


@app.command(
    "execute",
    epilog="Example: rebalance execute --config examples/treasury.yaml --confirm",
)
def execute_cmd(
    config: ConfigOpt,
    confirm: Annotated[bool, typer.Option("--confirm", help="Actually send the orders.", metavar="")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan, send nothing (the default without --confirm).", metavar="")
    ] = False,
    plan_file: Annotated[
        Path | None,
        typer.Option("--plan", help="Execute this saved plan (from `plan --json`) if still valid.", metavar="FILE"),
    ] = None,
    detailed_exitcode: Annotated[
        bool, typer.Option("--detailed-exitcode", help="Dry run: exit 10 when the plan would trade.", metavar="")
    ] = False,
    as_json: JsonOpt = False,
    wait: WaitOpt = 0.0,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Execute the cost-adjusted plan through the shadow ledger, idempotency keys and the audit trail.

    Without --confirm (or with --dry-run) it is a dry run: the plan is shown, nothing is sent, exit 0 (10 with
    --detailed-exitcode when it would trade). Interrupted (Ctrl-C, SIGTERM), it names the orders in flight;
    the next `execute` or `reconcile` settles them."""
    from . import render
    from .errors import InputError
    from .runtime import execute

    if confirm and dry_run:
        raise InputError("--confirm and --dry-run contradict each other: choose one")
    if not confirm:
        report = execute(config, saved_plan=plan_file, plan_only=True)
        assert report.plan is not None
        if as_json:
            _print_json(report.plan.to_dict())
        else:
            render.plan(_out(), report.plan)
        _info("dry run: nothing was sent; add --confirm to execute this plan")
        raise typer.Exit(ExitCode.PLAN_HAS_TRADES if detailed_exitcode and report.plan.has_trades else ExitCode.OK)
    listener, finish = _live_view(enabled=not as_json and _Verbosity.level >= 0)
    in_flight: dict[str, Any] = {}

    def track(o: Any) -> None:
        # locked: funds held, may be about to leave; sent: on its way or at the exchange, outcome unknown
        if o.status in ("locked", "sent"):
            in_flight[o.key] = o
        else:
            in_flight.pop(o.key, None)
        if listener is not None:
            listener(o)

    try:
        with _signals_interrupt():
            report = execute(config, saved_plan=plan_file, listener=track, wait=wait)
    except KeyboardInterrupt as exc:
        finish()
        _interrupted(list(in_flight.values()), exc)
    finally:
        finish()
    if as_json:
        _print_json(report.to_dict())
    else:
        render.report(_out(), report)
    raise typer.Exit(report.exit_code)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C while orders may be in flight."""


def _signals_interrupt() -> Any:
    import contextlib
    import signal

    @contextlib.contextmanager
    def handler() -> Any:
        def on_term(signum: int, frame: Any) -> None:
            raise _Terminated()

        try:
            previous = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread (a Python caller): leave signals alone
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    return handler()


def _interrupted(in_flight: list[Any], exc: KeyboardInterrupt) -> NoReturn:
    name, code = ("SIGTERM", ExitCode.TERMINATED) if isinstance(exc, _Terminated) else ("Ctrl-C", ExitCode.INTERRUPTED)
    if not in_flight:
        _err_line(f"interrupted ({name}): no order was in flight; `rebalance history` shows what was done")
        sys.exit(code)
    _err_line(f"interrupted ({name}) with {len(in_flight)} order(s) in flight; each may or may not have filled:")
    for o in in_flight:
        left = "sent to the exchange" if o.status == "sent" else "funds locked, about to be sent"
        _err_line(f"  {o.side} {o.amount} {o.market}  client id {o.key}  ({o.status}: {left})")
    _err_line(
        "the next `rebalance execute` or `rebalance reconcile` settles them from the exchange by their client id "
        "before anything else is sent"
    )
    sys.exit(code)


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

    from . import render

    live = Live(render.orders_table([], {}), console=_errc(), refresh_per_second=8, transient=True)
    live.start()

    def update(o: OrderOutcome) -> None:
        rows[o.key] = o
        live.update(render.orders_table(list(rows.values()), {}))

    return update, live.stop


def _errc() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@app.command("halt", epilog='Example: rebalance halt --config examples/treasury.yaml --reason "exchange incident"')
def halt_cmd(
    config: ConfigOpt,
    reason: Annotated[str, typer.Option("--reason", help="Why; shown to everyone who tries to trade.", metavar="TEXT")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace the reason of a portfolio already halted.", metavar="")
    ] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Pull the kill switch: execute and the daemon send nothing for this portfolio until `resume`.

    A portfolio already halted keeps its first reason (exit 5, the reason shown) unless --force; every halt
    and resume is recorded in `history`."""
    from . import render
    from .runtime import halt

    result = halt(config, reason, force=force)
    for note in result.notes:
        _info(f"note: {note}")
    if as_json:
        _print_json(result.to_dict())
        return
    h = result.halt
    replaced = f" (replaced: {result.replaced.reason})" if result.replaced else ""
    _out().print(f"halted by {h.by} at {render.when(h.at)}: {h.reason}{replaced}", markup=False)


@app.command("resume", epilog="Example: rebalance resume --config examples/treasury.yaml")
def resume_cmd(config: ConfigOpt, as_json: JsonOpt = False, verbose: VerboseOpt = 0, quiet: QuietOpt = False) -> None:
    """Lift the kill switch (recorded in `history`)."""
    from .runtime import resume

    result = resume(config)
    for note in result.notes:
        _info(f"note: {note}")
    if as_json:
        _print_json(result.to_dict())
        return
    previous = result.previous
    _out().print(
        f"resumed (was halted by {previous.by}: {previous.reason})" if previous else "was not halted", markup=False
    )


@app.command("history", epilog="Example: rebalance history --config examples/treasury.yaml --limit 5")
def history_cmd(
    config: ConfigOpt,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000, help="How many executions.", metavar="N")] = 20,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Recent executions from the audit trail, with cost and drift before and after, and kill-switch events.

    --json: a list, newest first, of executions (kind "execution") and of halt and resume events."""
    from . import render
    from .runtime import audit_log

    log = audit_log(config, limit)
    if as_json:
        entries: list[tuple[Any, dict[str, Any]]] = [
            (
                r.created_at,
                {
                    "kind": "execution",
                    "plan_id": r.plan_id,
                    "created_at": r.created_at.isoformat(),
                    "status": r.status,
                    "orders": r.orders,
                    "filled_orders": r.filled_orders,
                    "turnover": _q8(r.turnover),
                    "fees": {k: format(v, "f") for k, v in r.fees.items()},
                    "drift_before": _q8(r.drift_before),
                    "drift_after": _q8(r.drift_after),
                },
            )
            for r in log.executions
        ]
        entries += [(e.at, e.to_dict()) for e in log.events]
        entries.sort(key=lambda x: x[0], reverse=True)
        _print_json([e for _, e in entries])
        return
    render.history(_out(), log.executions, log.events)


def _q8(value: Any) -> str | None:
    """Ratios and quote money to 8 decimals, as in plan and execute reports (fees stay exact)."""
    from decimal import ROUND_HALF_EVEN, Decimal

    if value is None:
        return None
    return format(value.quantize(Decimal("1e-8"), rounding=ROUND_HALF_EVEN), "f")


@app.command("exchanges", epilog="Example: rebalance exchanges --json")
def exchanges_cmd(as_json: JsonOpt = False) -> None:
    """Exchanges with a profile: what is proven (plan, snapshot, execute), order protection, client order id,
    settle window, sandbox. Any other ccxt exchange can plan and snapshot; execute is refused there."""
    from .exchange.profiles import COLUMNS, display_rows
    from .runtime import exchanges

    if as_json:
        _print_json(exchanges())
        return
    from rich.table import Table

    t = Table(title="Exchanges (any other ccxt id: generic)", title_justify="left")
    for col in COLUMNS:
        t.add_column(col)
    for cells in display_rows():
        t.add_row(*cells)
    _out().print(t)


@app.command("reconcile", epilog="Example: rebalance reconcile --config examples/treasury.yaml --repair")
def reconcile_cmd(
    config: ConfigOpt,
    repair: Annotated[
        bool, typer.Option("--repair", help="Align ledger and audit with the exchange.", metavar="")
    ] = False,
    as_json: JsonOpt = False,
    wait: WaitOpt = 0.0,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Compare exchange, shadow ledger and audit trail; exit 4 while they disagree (after --repair: 0)."""
    from . import render
    from .runtime import reconcile

    report = reconcile(config, repair=repair, wait=wait)
    if as_json:
        _print_json(report.to_dict())
    else:
        out = _out()
        if report.consistent:
            out.print(f"{report.portfolio_id}: exchange, ledger and audit agree", markup=False)
        else:
            render.differences(out, report.differences)
        for line in report.repaired:
            out.print(f"repaired: {line}", markup=False)
    if not report.consistent and not repair:
        raise typer.Exit(ExitCode.INCOMPLETE)


@app.command(
    "daemon",
    epilog="Example: rebalance daemon --config portfolios/ --metrics-port 9108 --log-format json",
)
def daemon_cmd(
    config: Annotated[
        list[Path],
        typer.Option("--config", "-c", help="Config file or directory of configs; repeatable.", metavar="PATH"),
    ],
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", help="Serve /metrics and /healthz on this port.", metavar="PORT")
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Address to serve metrics on.", metavar="HOST")
    ] = "127.0.0.1",
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="json when not a terminal with auto.")
    ] = LogFormat.auto,
    log_level: Annotated[LogLevel, typer.Option("--log-level", help="Least severe level logged.")] = LogLevel.info,
    instance_id: Annotated[
        str | None, typer.Option("--instance-id", help="Name of this instance in leases.", metavar="NAME")
    ] = None,
    lease_ttl: Annotated[
        float, typer.Option("--lease-ttl", min=1.0, help="Seconds a lease lasts unrenewed.", metavar="SECONDS")
    ] = 15.0,
    workers: Annotated[
        int, typer.Option("--workers", min=1, max=256, help="Portfolios worked at once.", metavar="N")
    ] = 8,
    processes: Annotated[
        int,
        typer.Option(
            "--processes", min=1, max=64, help="Worker processes, each running --workers cycles.", metavar="N"
        ),
    ] = 1,
    otlp_endpoint: Annotated[
        str | None, typer.Option("--otlp-endpoint", help="Export traces over OTLP/HTTP to this URL.", metavar="URL")
    ] = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Keep every configured portfolio at its targets, continuously; several instances share the work.

    -v logs at debug level, -q at warning (--log-level otherwise)."""
    from .daemon import run_daemon
    from .telemetry import setup_logging

    _long_running()
    level = log_level.value
    if _Verbosity.level > 0:
        level = "debug"
    elif _Verbosity.level < 0:
        level = "warning"
    setup_logging(log_format.value, level)
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
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Portfolio config naming the store.", metavar="FILE")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="Audit store URL (default: the config's, else embedded).", metavar="URL"),
    ] = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Apply pending schema migrations to the audit store (idempotent; safe when run concurrently)."""
    from .runtime import migrate

    applied = migrate(config, database_url)
    if as_json:
        _print_json({"applied": applied})
        return
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
        Path,
        typer.Option(
            "--output", "-o", help="Snapshot file to write (YAML, atomically).", show_default=False, metavar="FILE"
        ),
    ],
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Save balances, fees, volatility and every market's full book, for `plan --snapshot` to replay."""
    from . import render
    from .runtime import save_live_snapshot

    snap = save_live_snapshot(config, output)
    if as_json:
        _print_json(
            {
                "output": str(output),
                "markets": len(snap.markets),
                "balances": len(snap.balances),
                "taken_at": snap.taken_at.isoformat().replace("+00:00", "Z"),
                "skew_seconds": round(snap.skew_seconds, 3),
            }
        )
        return
    _out().print(
        f"{output}: {len(snap.markets)} markets, {len(snap.balances)} balances, taken at "
        f"{render.when(snap.taken_at)} ({snap.skew_seconds:.3f}s apart)",
        markup=False,
        soft_wrap=True,  # a path is copied from here: never broken across lines
    )


# --- backtest ------------------------------------------------------------------------------------------

backtest_app = typer.Typer(
    help="Replay a price history through the planner and paper fills; compare policies' cost and drift.",
    invoke_without_command=True,
)
app.add_typer(backtest_app, name="backtest")

from .simulation.names import POLICY_NAMES  # noqa: E402  (imports nothing: --help stays light)

CHART_HINT = (
    "--chart needs matplotlib: from the rebalance checkout, pip install -e '.[chart]' (or pip install matplotlib); "
    "the `rebalance` package on PyPI is another project"
)


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


def _complete_policy(incomplete: str) -> list[str]:
    return [p for p in POLICY_NAMES if p.startswith(incomplete)]


@backtest_app.callback(
    invoke_without_command=True,
    epilog="Example: rebalance backtest --config examples/treasury.yaml --prices examples/prices.csv --compare",
)
def backtest_cmd(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Portfolio config (YAML); required.", show_default=False, metavar="FILE"),
    ] = None,
    prices: Annotated[
        Path | None,
        typer.Option(
            "--prices", help="Prices CSV: timestamp or date, then one close per asset; required.", metavar="FILE"
        ),
    ] = None,
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy",
            "-p",
            help=f"Policy to replay; repeatable (default: config, the config's own): {', '.join(POLICY_NAMES)}.",
            metavar="NAME",
            autocompletion=_complete_policy,
        ),
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Replay every known policy side by side.", metavar="")
    ] = False,
    as_json: JsonOpt = False,
    chart: Annotated[
        Path | None,
        typer.Option("--chart", help="Write a PNG of drift and cumulative cost (needs matplotlib).", metavar="FILE"),
    ] = None,
    spread_bps: Annotated[
        str | None, typer.Option("--spread-bps", help="Synthetic book spread (default 2).", metavar="BPS")
    ] = None,
    market_model: Annotated[
        str,
        typer.Option(
            "--market-model",
            help="Synthetic books: sqrt-law (calibrated) or conservative (2 bp, 50,000).",
            metavar="MODEL",
        ),
    ] = "sqrt-law",
    depth: Annotated[
        str | None,
        typer.Option("--depth", help="Quote value at the best level of the book (default 50000).", metavar="VALUE"),
    ] = None,
    levels: Annotated[
        int | None, typer.Option("--levels", min=1, max=200, help="Book levels (default 20).", metavar="N")
    ] = None,
    fee: Annotated[
        str | None,
        typer.Option(
            "--fee", help="Taker fee, e.g. 0.001 (default: the config's exchange, else 0.001).", metavar="RATE"
        ),
    ] = None,
    initial_value: Annotated[
        str, typer.Option("--initial-value", help="Starting value in quote, at target weights.", metavar="VALUE")
    ] = "100000",
    calendar_period: Annotated[
        str,
        typer.Option("--calendar-period", help="Period of the calendar policy, e.g. 7d or 30d.", metavar="PERIOD"),
    ] = "30d",
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
    risk_aversion: Annotated[
        str | None,
        typer.Option(
            "--risk-aversion",
            help="Gamma of the loss L = cost + gamma/2 TE^2 (default: the config's, 5).",
            metavar="GAMMA",
        ),
    ] = None,
) -> None:
    """Replay a price history through the planner and paper fills; compare policies' cost and drift.

    Policies: config, calendar, band, band-edge, tolerance-band, cost-adjusted,
    cost-adjusted+hysteresis+cooldown, cost-adjusted-edge, cost-adjusted-edge-half (--compare runs them all).
    `rebalance backtest generate` writes reproducible price scenarios.
    """
    if ctx.invoked_subcommand is not None:
        return
    import importlib.util
    from dataclasses import replace

    from . import render
    from .errors import InputError
    from .simulation import replay as bt
    from .simulation.books import market_model as book_model
    from .simulation.yardstick import parse_risk_aversion

    _long_running()
    if config is None or prices is None:
        raise InputError("backtest needs --config FILE and --prices FILE (or a subcommand: generate)")
    if chart is not None and importlib.util.find_spec("matplotlib") is None:
        raise InputError(CHART_HINT)  # before the replay, which can take minutes
    model = book_model(market_model)
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
    names = list(POLICY_NAMES) if compare else (policy or ["config"])
    feedback = _BacktestFeedback(names) if sys.stderr.isatty() and _Verbosity.level >= 0 else None
    gamma = parse_risk_aversion(risk_aversion) if risk_aversion is not None else None

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
            progress=feedback.start if feedback else None,
            risk_aversion=gamma,
        )
        if chart is not None:
            if feedback is not None:
                feedback.status(f"drawing the chart {chart}")
            bt.write_chart(report, chart)
    finally:
        if feedback is not None:
            feedback.stop()
    if as_json:
        d = report.to_dict()
        for r in d["results"]:  # quotients of exact arithmetic: 8 decimals, as every other figure
            r["final_balances"] = {k: _q8(_dec(v)) for k, v in r.get("final_balances", {}).items()}
        _print_json(d)
        return
    render.backtest(_out(), report)
    if chart is not None:
        _out().print(f"chart: {chart}", markup=False)


def _dec(text: str) -> Any:
    from decimal import Decimal

    return Decimal(text)


class _BacktestFeedback:
    """Progress on a terminal: the policy being replayed, steps, elapsed time and an estimate of the time left
    from the mean speed since the start (rich's default, over the last 30 s, swings with each policy's
    speed); then a spinner while the chart draws."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.bar: Any = None
        self.task: Any = None
        self.total = 0
        self.done = 0

    def start(self, total: int) -> Any:
        import time

        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.total, self.started = total, time.monotonic()
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=Console(stderr=True),
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task(self._label(), total=total, eta="")
        return self.advance

    def _label(self) -> str:
        per = max(1, self.total // max(1, len(self.names)))
        i = min(len(self.names) - 1, self.done // per)
        return f"{self.names[i]} ({i + 1}/{len(self.names)})"

    def advance(self, steps: int) -> None:
        import time

        self.done += steps
        elapsed = time.monotonic() - self.started
        eta = ""
        if self.done and self.done < self.total and elapsed > 1:
            left = int(elapsed * (self.total - self.done) / self.done)
            eta = f"about {left // 60}:{left % 60:02d} left"
        self.bar.update(self.task, advance=steps, description=self._label(), eta=eta)

    def status(self, text: str) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        if self.bar is not None:
            self.bar.stop()
        self.bar = Progress(
            SpinnerColumn(), TextColumn(text), TimeElapsedColumn(), console=Console(stderr=True), transient=True
        )
        self.bar.start()
        self.bar.add_task(text, total=None)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@backtest_app.command(
    "generate",
    epilog="Example: rebalance backtest generate --regime volatile --steps 8760 --step 1h --seed 7 -o volatile.csv",
)
def backtest_generate_cmd(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Prices CSV to write.", show_default=False, metavar="FILE")
    ],
    regime: Annotated[
        str, typer.Option("--regime", help="calm, trending or volatile (with jumps).", metavar="REGIME")
    ] = "calm",
    steps: Annotated[int, typer.Option("--steps", min=2, max=5_000_000, help="Rows to generate.", metavar="N")] = 8760,
    step: Annotated[
        str, typer.Option("--step", help="Time per row, 1m to 1d (e.g. 1m, 1h, 1d).", metavar="STEP")
    ] = "1h",
    seed: Annotated[
        int, typer.Option("--seed", help="Random seed: the same seed gives the same file.", metavar="N")
    ] = 1,
    asset: Annotated[
        list[str] | None,
        typer.Option(
            "--asset", help="SYMBOL=START_PRICE; repeatable (default BTC=65000, ETH=3500).", metavar="SYMBOL=PRICE"
        ),
    ] = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Write reproducible prices: geometric Brownian motion with a volatility regime and jumps."""
    from .simulation import replay as bt

    series = bt.generate_file(
        output,
        regime=regime,
        steps=steps,
        step_seconds=bt.parse_step(step),
        seed=seed,
        assets=bt.parse_assets(asset or []) or None,
    )
    if as_json:
        _print_json(
            {
                "output": str(output),
                "rows": len(series),
                "assets": list(series.assets),
                "step_seconds": series.step_seconds,
                "regime": regime,
                "seed": seed,
            }
        )
        return
    _out().print(
        f"{output}: {len(series):,} rows of {', '.join(series.assets)}, {series.step_seconds}s apart, "
        f"regime {regime}, seed {seed}",
        markup=False,
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
    _exit(exc.exit_code)


def _exit(code: int) -> NoReturn:
    """Exit with the command's own code, also when the reader of stdout went away (`| head -1`): Python's
    final flush would otherwise fail and turn any code into 120."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _silence_stdout()
    sys.exit(code)


def _ascii_safe() -> None:
    """PYTHONIOENCODING=ascii (or a C locale): never crash on a character the output cannot encode; render
    degrades to ASCII separators, anything else left becomes `?`."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if not encoding.startswith("utf") and hasattr(stream, "reconfigure"):
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(errors="replace")


def _command() -> Any:
    """The click command of the app, with `--help` shown as a plain flag (typer would show `<bool>`)."""
    root = typer.main.get_command(app)

    def plain_help(cmd: Any) -> None:
        original = cmd.get_help_option

        def get_help_option(ctx: Any) -> Any:
            option = original(ctx)
            if option is not None:
                option.metavar = ""
            return option

        cmd.get_help_option = get_help_option
        for sub in (getattr(cmd, "commands", None) or {}).values():
            plain_help(sub)

    plain_help(root)
    return root


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
    callbacks: dict[str, tuple[str, Any]] = {}  # "-v" -> ("verbose", _set_verbose)
    required: set[str] = set()
    for name, param in inspect.signature(fn).parameters.items():
        hint = hints.get(name)
        info = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, typer.models.OptionInfo)), None)
        if info is not None and info.callback in (_set_verbose, _set_quiet):
            # the verbosity flags every command takes: given, typer would only call their callback
            for decl in (info.default, *(info.param_decls or ())):
                if isinstance(decl, str) and decl.startswith("-"):
                    callbacks[decl] = (name, info.callback)
            continue
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
    counts: dict[str, int] = {}
    for token in args:
        flag, eq, inline = token.partition("=")
        if flag in callbacks and not eq:
            counts[callbacks[flag][0]] = counts.get(callbacks[flag][0], 0) + 1
            continue
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
    for name, callback in callbacks.values():
        if name in counts and name not in kwargs:
            kwargs[name] = callback(counts[name] if callback is _set_verbose else True)
    return fn, kwargs


def main(argv: list[str] | None = None) -> NoReturn:
    _ascii_safe()
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
            code = _command()(args=argv, prog_name="rebalance", standalone_mode=False)
    except typer.Exit as exc:
        _exit(exc.exit_code)
    except typer.Abort:
        _exit(ExitCode.INTERRUPTED)
    except typer.TyperException as exc:  # bad usage: unknown flag, missing option, bad value
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            _err_line(f"error: {exc}")
        _exit(ExitCode.USAGE)
    except RebalanceError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _err_line("interrupted")
        _exit(ExitCode.INTERRUPTED)
    except BrokenPipeError:  # every write above handles its own; this is a write outside them
        _silence_stdout()
        _exit(ExitCode.OK)
    except Exception as exc:
        if os.environ.get("REBALANCE_DEBUG"):
            raise
        _err_line(
            f"internal error: {type(exc).__name__}: {exc} (a bug: please report it; "
            "REBALANCE_DEBUG=1 shows the traceback)"
        )
        _exit(ExitCode.INTERNAL)
    _exit(code if isinstance(code, int) else 0)
