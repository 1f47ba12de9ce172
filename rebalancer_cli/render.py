"""How the terminal shows results: numbers as the exchange writes them, tables that fit the terminal.

`cli.py` hands typed results here; nothing here decides anything. A table never cuts a cell short: when its
columns do not fit the console, the columns after the first ones continue in a second table under the first
(the key columns, such as the asset or the order number, repeated), and free text wraps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from .audit.base import ExecutionRecord
    from .ledger.base import Halt
    from .planner import Plan

Cell = str | Text
Precision = Mapping[str, tuple[Decimal, Decimal]]

# --- numbers ----------------------------------------------------------------------------------------


def _d(value: Decimal | str) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(value)


def _no_negative_zero(text: str) -> str:
    return text[1:] if text.startswith("-") and not any(c in "123456789" for c in text) else text


def pct(value: Decimal | str, *, signed: bool = False) -> str:
    """A ratio as a percentage to 2 decimals; a value that rounds to zero is `0.00%`, never `-0.00%`."""
    text = _no_negative_zero(f"{_d(value) * 100:.2f}")
    if signed and not text.startswith("-") and any(c in "123456789" for c in text):
        text = "+" + text
    return text + "%"


def money(value: Decimal | str, places: int = 2) -> str:
    """Quote-currency money with thousands separators."""
    return _no_negative_zero(f"{_d(value):,.{places}f}")


def step_places(step: Decimal) -> int:
    return max(0, -int(step.normalize().as_tuple().exponent))


def amount(value: Decimal | str, step: Decimal | None = None) -> str:
    """An amount to the market's lot when known (else at most 8 decimals, trailing zeros dropped), with
    thousands separators: 12,500,000 PEPE, 0.29692 BTC."""
    d = _d(value)
    if step is not None:
        return _no_negative_zero(f"{d:,.{step_places(step)}f}")
    text = f"{d.quantize(Decimal('1e-8'), rounding=ROUND_HALF_EVEN):,f}"
    return _no_negative_zero(text.rstrip("0").rstrip(".") if "." in text else text)


def price(value: Decimal | str, tick: Decimal | None = None) -> str:
    """A price to the market's tick when known; else with its significant digits (2 decimals would show a
    PEPE price of 0.00001235 as 0.00), with thousands separators."""
    d = _d(value)
    if tick is not None:
        return f"{d:,.{step_places(tick)}f}"
    if abs(d) >= 1000:
        return f"{d:,.2f}"
    if abs(d) >= 1:
        return f"{d:,.4f}"
    return amount(d) if d else "0"


def when(at: datetime) -> str:
    """A time with its zone: UTC, as the stores keep it."""
    return f"{at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def ascii_only(console: Console) -> bool:
    return not console.encoding.lower().startswith("utf")


def dot(console: Console) -> str:
    """The separator of summary lines; ASCII where the output cannot encode `·` (PYTHONIOENCODING=ascii)."""
    return " - " if ascii_only(console) else " · "


def arrow(console: Console) -> str:
    return "->" if ascii_only(console) else "→"


# --- tables that fit -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Col:
    header: str
    justify: str = "right"
    key: bool = False  # repeated in every part of a table split to fit
    wrap: bool = False  # free text: may wrap onto several lines (never cut)


WRAP_MIN = 16


def _width(cell: Cell) -> int:
    return cell.cell_len if isinstance(cell, Text) else Text(cell).cell_len


def _parts(cols: Sequence[Col], rows: Sequence[Sequence[Cell]], width: int) -> list[list[int]]:
    """Column indexes of each part: key columns in every part, the others packed in order."""
    natural = [max([_width(c.header), *(_width(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    need = [min(n, WRAP_MIN) if c.wrap else n for n, c in zip(natural, cols, strict=True)]
    keys = [i for i, c in enumerate(cols) if c.key]
    parts: list[list[int]] = []
    current: list[int] = []
    for i, c in enumerate(cols):
        if c.key:
            continue
        candidate = sorted([*keys, *current, i])
        if current and sum(need[j] for j in candidate) + 3 * len(candidate) + 1 > width:
            parts.append(sorted([*keys, *current]))
            current = []
        current.append(i)
    if current or not parts:
        parts.append(sorted([*keys, *current]))
    return parts


def print_table(
    console: Console,
    title: str,
    cols: Sequence[Col],
    rows: Sequence[Sequence[Cell]],
) -> None:
    """Print one table, or as many as it takes for every cell to show whole at the console's width."""
    parts = _parts(cols, rows, console.width)
    for n, part in enumerate(parts):
        suffix = f" ({n + 1}/{len(parts)})" if len(parts) > 1 else ""
        table = Table(title=title + suffix, title_justify="left")
        for i in part:
            c = cols[i]
            # no_wrap on numbers and names: rich collapses the wrapping (free text) columns first, and _parts
            # left room for every other column at its full width, so nothing is cut
            table.add_column(c.header, justify=c.justify, no_wrap=not c.wrap, overflow="fold")  # type: ignore[arg-type]
        for r in rows:
            table.add_row(*(r[i] if isinstance(r[i], Text) else Text(str(r[i])) for i in part))
        console.print(table)


# --- plan ----------------------------------------------------------------------------------------------

BENEFIT_NOTE = (
    "benefit = |drift| x total value x target weight (the cost-adjusted rule trades only when it is above "
    "est. cost x safety margin); threshold = the no-trade region's half-width, or the rule's band"
)


def plan(console: Console, p: Plan, halt: Halt | None = None) -> None:
    d = p.to_dict()
    if halt is not None:
        console.print(
            f"[bold red]HALTED[/] by {halt.by} at {when(halt.at)}: {_esc(halt.reason)}. "
            "`execute` and the daemon send nothing until `rebalance resume`."
        )
    asset_cols = [
        Col("asset", "left", key=True),
        Col("target"),
        Col("current"),
        Col("drift"),
        Col("threshold"),
        Col("benefit"),
        Col("est. cost"),
        Col("decision", "left"),
        Col("reason", "left", wrap=True),
    ]
    asset_rows = [
        [
            a["symbol"],
            pct(a["target_weight"]),
            pct(a["current_weight"]),
            pct(a["drift"], signed=True),
            pct(a["threshold"]),
            money(a["drift_value"]),
            money(a["est_cost"]),
            Text(a["decision"], style="bold green" if a["decision"] == "trade" else "dim"),
            a["reason"],
        ]
        for a in d["assets"]
    ]
    print_table(
        console, f"Plan for {p.portfolio_id}: total value {money(d['total_value'])} {p.quote}", asset_cols, asset_rows
    )
    console.print(f"[dim]{BENEFIT_NOTE}[/]")
    if p.trades:
        trade_cols = [
            Col("#", key=True),
            Col("side", "left"),
            Col("market", "left"),
            Col("amount"),
            Col("est. price"),
            Col("notional"),
            Col("fee"),
            Col("slippage"),
            Col("idempotency key", "left"),
        ]
        trade_rows = []
        for i, t in enumerate(p.trades, 1):
            lot, tick = p.precision.get(t.market, (None, None))
            trade_rows.append(
                [
                    str(i),
                    t.side,
                    t.market,
                    amount(t.amount, lot),
                    price(t.est_price, tick),
                    money(t.notional),
                    money(t.est_fee),
                    money(t.est_slippage),
                    t.idempotency_key,
                ]
            )
        print_table(console, "Trades, in execution order", trade_cols, trade_rows)
    else:
        console.print("No trades: nothing is worth its cost right now.")
    s = d["summary"]
    sep = dot(console)
    console.print(
        f"turnover {money(s['turnover'])} {p.quote}{sep}est. cost {money(s['est_total_cost'])} {p.quote}{sep}"
        f"drift {pct(s['drift_before'])} {arrow(console)} {pct(s['drift_after'])}"
    )
    for note in p.notes:
        console.print(f"[yellow]note:[/] {_esc(note)}")


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# --- execute ------------------------------------------------------------------------------------------


def orders_table(outcomes: Sequence[Any], precision: Precision) -> Table:
    """The live view of orders while `execute` runs (it redraws; it is never cut: few, short columns)."""
    t = Table(title="Orders")
    for col in ("market", "side", "amount", "status", "filled", "avg price"):
        t.add_column(col, no_wrap=True, overflow="fold")
    for o in outcomes:
        lot, tick = precision.get(o.market, (None, None))
        t.add_row(
            o.market,
            o.side,
            amount(o.amount, lot),
            o.status,
            amount(o.filled, lot),
            price(o.avg_price, tick) if o.avg_price else "",
        )
    return t


def report(console: Console, r: Any) -> None:
    d = r.to_dict()
    precision: Precision = r.plan.precision if r.plan is not None else {}
    for title, orders in (("Recovered from an earlier run", d["recovered"]), ("Orders", d["orders"])):
        if not orders:
            continue
        cols = [
            Col("#", key=True),
            Col("side", "left"),
            Col("market", "left"),
            Col("amount"),
            Col("status", "left"),
            Col("filled"),
            Col("avg price"),
            Col("fees", wrap=True),
        ]
        rows = []
        reasons: list[str] = []
        for i, o in enumerate(orders, 1):
            lot, tick = precision.get(o["market"], (None, None))
            fees = ", ".join(f"{amount(v)} {k}" for k, v in o["fees"].items())
            rows.append(
                [
                    str(i),
                    o["side"],
                    o["market"],
                    amount(o["amount"], lot),
                    o["status"],
                    amount(o["filled"], lot),
                    price(o["avg_price"], tick) if o["avg_price"] else "",
                    fees,
                ]
            )
            if o["reason"]:
                reasons.append(f"  {i}. {_esc(o['reason'])}")  # exchange text, not markup
        print_table(console, title, cols, rows)
        for line in reasons:
            console.print(line)
    if not d["orders"]:
        console.print("No trades: nothing is worth its cost right now.")
    before, after = d["drift_before"], d["drift_after"]
    console.print(
        f"status {d['status']}{dot(console)}drift {pct(before) if before else '?'} {arrow(console)} "
        f"{pct(after) if after else '?'}"
    )
    for note in d["notes"]:
        console.print(f"[yellow]note:[/] {_esc(note)}")


# --- history, reconcile --------------------------------------------------------------------------------


def history(console: Console, records: Sequence[ExecutionRecord], events: Sequence[Any]) -> None:
    """Executions and kill-switch events, newest first."""
    if not records and not events:
        console.print("No executions recorded yet for this portfolio.")
        return
    cols = [
        Col("time", "left", key=True),
        Col("status", "left"),
        Col("orders"),
        Col("turnover"),
        Col("drift"),
        Col("fees", wrap=True),
    ]
    rows: list[tuple[datetime, list[Cell]]] = []
    for r in records:
        drift = (
            f"{pct(r.drift_before) if r.drift_before is not None else '?'} {arrow(console)} "
            f"{pct(r.drift_after) if r.drift_after is not None else '?'}"
        )
        rows.append(
            (
                r.created_at,
                [
                    when(r.created_at),
                    r.status,
                    f"{r.filled_orders}/{r.orders} filled",
                    money(r.turnover),
                    drift,
                    ", ".join(f"{amount(v)} {k}" for k, v in r.fees.items()),
                ],
            )
        )
    for e in events:
        text = f"by {e.by}: {e.reason}" if e.kind == "halt" else f"by {e.by}"
        rows.append(
            (e.at, [when(e.at), Text(e.kind, style="bold red" if e.kind == "halt" else "bold"), "", "", "", text])
        )
    rows.sort(key=lambda x: x[0], reverse=True)
    print_table(console, "Executions and kill-switch events, newest first", cols, [r for _, r in rows])


def differences(console: Console, diffs: Sequence[Any]) -> None:
    cols = [
        Col("kind", "left", key=True),
        Col("subject", "left", key=True),
        Col("exchange", "left"),
        Col("ledger", "left"),
        Col("audit", "left"),
        Col("note", "left", wrap=True),
    ]
    rows = [[d.kind, d.subject, d.exchange, d.ledger, d.audit, d.note] for d in diffs]
    print_table(console, "Differences", cols, rows)


# --- backtest --------------------------------------------------------------------------------------------


def backtest(console: Console, r: Any) -> None:
    d = r.to_dict()
    p = d["prices"]
    title = (
        f"Backtest of {d['portfolio_id']}: {p['steps']:,} steps of {p['step_seconds']}s, "
        f"{p['start'][:10]} to {p['end'][:10]} ({d['quote']})"
    )
    gamma = d["risk_aversion"]
    cols = [Col("policy", "left", key=True)] + [
        Col(h)
        for h in (
            f"L({gamma}) bp/yr",
            "= cost",
            "+ tracking",
            "L(1)/L(20)",
            "trades",
            "turnover",
            "total cost",
            "drift avg",
            "TE/yr",
            "API calls",
            "final value",
        )
    ]

    def bp(text: str) -> str:
        return f"{Decimal(text):,.1f}"

    rows = [
        [
            x["policy"],
            bp(x["certainty_equivalent_loss"]["bp_per_year"]),
            bp(x["certainty_equivalent_loss"]["cost_rate_bp"]),
            bp(x["certainty_equivalent_loss"]["tracking_bp"]),
            f"{bp(x['certainty_equivalent_loss']['at']['1'])}/{bp(x['certainty_equivalent_loss']['at']['20'])}",
            f"{x['trades']:,}",
            money(x["turnover"], 0),
            money(x["total_cost"]),
            pct(x["mean_drift"]),
            pct(x["tracking_error"]),
            f"{x['api_calls']:,}",
            money(x["final_value"], 0),
        ]
        for x in d["results"]
    ]
    print_table(console, title, cols, rows)
    m = d["market_model"]
    fees = ", ".join(f"{s} {v['taker_fee']} ({v['fee_source']})" for s, v in m["markets"].items())
    sep = dot(console)
    console.print(
        f"book: spread {m['spread_bps']} bps, {m['levels']} levels, {money(m['depth_quote'])} {d['quote']} at the "
        f"best level{sep}taker fee {fees}{sep}drift = sum |target - weight| before trading{sep}TE/yr = "
        "annualized tracking error against the portfolio kept at target"
    )
    console.print(
        f"L = cost/(years x mean value) + gamma/2 x TE^2, bp per year, at gamma {gamma} (the config's "
        "risk_aversion or --risk-aversion) and beside it at 1 and 20: lower is better"
    )
