"""Files and checks shared by the execution, crash and contract tests: a portfolio that needs a sell then a
buy, its config for the paper exchange or an exchange emulator (Binance unless told), and the three books
(exchange, ledger, audit) side by side."""

from __future__ import annotations

import contextlib
import decimal
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rebalancer_cli.testing import load_dialect
from rebalancer_cli.testing.emulator import RemoteEmulator

if TYPE_CHECKING:
    from rebalancer_cli.executor import ExecutionReport, OrderOutcome
    from rebalancer_cli.testing.core import Emulator

D = Decimal
ASSETS = ("BTC", "ETH", "USDC")
# BTC is overweight and ETH underweight: every plan sells BTC first, then buys ETH with what it freed
OPENING = {"BTC": D("1.5"), "ETH": D("5"), "USDC": D("30000")}
# ccxt credential field -> the environment variable the test configs name for it
ENV_NAMES = {"apiKey": "EMU_API_KEY", "secret": "EMU_SECRET", "password": "EMU_PASSWORD"}


def emulator_credentials(exchange: str = "binance") -> dict[str, str]:
    """The environment holding the credentials that `exchange`'s emulator accepts by default."""
    return {ENV_NAMES[name]: value for name, value in load_dialect(exchange).credentials.items()}


CREDENTIALS_ENV = emulator_credentials()


def levels(best: str, step: str, amount: str, n: int = 12) -> list[list[str]]:
    return [[str(D(best) + i * D(step)), amount] for i in range(n)]


BOOKS: dict[str, dict[str, Any]] = {
    "BTC/USDC": {
        "taker_fee": "0.001",
        "amount_step": "0.00001",
        "min_notional": "5",
        "volatility": "0.03",
        "bids": levels("64995", "-10", "2"),
        "asks": levels("65005", "10", "2"),
    },
    "ETH/USDC": {
        "taker_fee": "0.001",
        "amount_step": "0.0001",
        "min_notional": "5",
        "volatility": "0.04",
        "bids": levels("3399.5", "-0.5", "20"),
        "asks": levels("3400.5", "0.5", "20"),
    },
}


def write_snapshot(
    path: Path,
    balances: dict[str, Decimal] | None = None,
    books: dict[str, dict[str, Any]] | None = None,
) -> Path:
    doc = {
        "taken_at": "2026-11-27T10:00:00Z",
        "balances": {k: str(v) for k, v in (balances or OPENING).items()},
        "markets": books or BOOKS,
    }
    path.write_text(json.dumps(doc, indent=1))  # JSON is YAML; every number travels as a string
    return path


def write_config(
    directory: Path,
    portfolio_id: str,
    exchange: dict[str, Any],
    *,
    name: str = "portfolio.yaml",
    targets: Sequence[tuple[str, str, str]] = (("BTC", "0.4", "0.05"), ("ETH", "0.3", "0.05"), ("USDC", "0.3", "0.02")),
    **extra: Any,
) -> Path:
    lines = [
        f'portfolio_id: "{portfolio_id}"',
        "base_threshold: 0.001",
        "volatility_factor: 0.5",
        "safety_margin: 1.5",
        "max_trades_per_cycle: 10",
        "policy: cost-adjusted",  # the trades these tests expect come from the original rule
        "assets:",
        *(f'  - {{symbol: "{s}", target_weight: {w}, max_deviation: {m}}}' for s, w, m in targets),
        f"exchange: {json.dumps(exchange)}",
        f"state_dir: {json.dumps(str(directory / 'state'))}",
        *(f"{k}: {json.dumps(v) if isinstance(v, str) else v}" for k, v in extra.items()),
    ]
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    return path


def emulator_exchange(url: str, *, exchange: str = "binance", **extra: Any) -> dict[str, Any]:
    """The `exchange:` block of a config on `exchange`'s emulator at `url`, with the dialect's test options
    (short acceptance windows keep the settle waits of recovery short)."""
    dialect = load_dialect(exchange)
    return {
        "id": dialect.ccxt_id,
        "api_url": url,
        "credentials_env": {name: ENV_NAMES[name] for name in dialect.credentials},
        "options": dict(dialect.config_options),
        **dialect.config_exchange,
        **extra,
    }


def paper_balances(config_path: Path) -> dict[str, Decimal]:
    from rebalancer_cli.config import load_config
    from rebalancer_cli.exchange.paper import PaperExchange

    config = load_config(config_path)
    snapshot = config.snapshot_path()
    assert snapshot is not None
    exchange = PaperExchange(snapshot, config.resolved_state_dir(), config.portfolio_id)
    try:
        return exchange.fetch_balances()[0]
    finally:
        exchange.close()


def emu_config(tmp_path: Path, emulator: Emulator, pid: str, **kw: Any) -> Path:
    """A config on `emulator` (whatever its exchange); `exchange_extra` adds keys to its exchange block."""
    exchange = emulator_exchange(emulator.base_url, exchange=emulator.dialect.name, **kw.pop("exchange_extra", {}))
    return write_config(tmp_path, pid, exchange, **kw)


def stores(backend: str, redis_url: str | None = None, database_url: str | None = None) -> dict[str, str]:
    """Config keys of a store backend: `sqlite` (embedded default) or `redis+postgres`."""
    if backend == "sqlite":
        return {}
    assert redis_url and database_url
    return {"redis_url": redis_url, "database_url": database_url}


def comparable(plan_json: str, *, threshold: bool = True) -> dict[str, Any]:
    """A plan without what differs between any two runs: its ids and the snapshot's time."""
    d: dict[str, Any] = json.loads(plan_json)
    d.pop("plan_id", None)
    d.pop("taken_at", None)
    d.pop("digest", None)  # covers the ids and the time
    for t in d["trades"]:
        t.pop("idempotency_key")
    if not threshold:
        for a in d["assets"]:
            a.pop("threshold")
    return d


def once(emulator: Any, key_status: str, symbol: str, action: Any) -> Any:
    """A listener that does `action` the first time `symbol`'s order reaches `key_status`: after the snapshot
    and the plan, just before the order leaves (for `locked`)."""
    done: list[bool] = []

    def listener(o: OrderOutcome) -> None:
        if not done and o.symbol == symbol and o.status == key_status:
            done.append(True)
            action()

    return listener


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **CREDENTIALS_ENV, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rebalancer_cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def cli_killed_once_order_arrives(
    emulator: Any, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the CLI and SIGKILL it as soon as the emulator has received its first order request (held back by a
    latency fault, so the exchange is still executing it): dead with an order in flight, whatever time the
    client took before the request left (rate pacing, a loaded machine). A timed failpoint cannot promise
    that: killed before the request left, the test would prove "never sent" instead."""
    full_env = {**os.environ, **CREDENTIALS_ENV, **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rebalancer_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    due = time.monotonic() + timeout
    try:
        while not emulator.stats()["calls"].get("create_order"):
            if proc.poll() is not None or time.monotonic() > due:
                raise AssertionError(f"no order reached the emulator (exit {proc.returncode})")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --- the three books --------------------------------------------------------------------------------


def emulator_holdings(state: dict[str, Any], assets: Iterable[str] = ASSETS) -> dict[str, Decimal]:
    balances = state["balances"]
    return {a: D(balances[a]["free"]) + D(balances[a]["locked"]) if a in balances else D(0) for a in assets}


def ledger_holdings(config_path: Path, assets: Iterable[str] = ASSETS) -> dict[str, Decimal]:
    from rebalancer_cli.config import load_config
    from rebalancer_cli.runtime import open_ledger_for

    config = load_config(config_path)
    ledger = open_ledger_for(config)
    try:
        assert ledger.locks(config.portfolio_id) == [], "no lock may outlive its order"
        held = ledger.balances(config.portfolio_id)
    finally:
        ledger.close()
    return {a: held.get(a, D(0)) for a in assets}


def audit_holdings(
    config_path: Path, opening: dict[str, Decimal], assets: Iterable[str] = ASSETS
) -> dict[str, Decimal]:
    """The opening balances moved by every fill and fee the audit trail recorded."""
    from rebalancer_cli.config import load_config
    from rebalancer_cli.runtime import open_audit_for

    config = load_config(config_path)
    audit = open_audit_for(config)
    try:
        records = audit.recent_orders(config.portfolio_id, 1000)
    finally:
        audit.close()
    out = {a: opening.get(a, D(0)) for a in assets}
    ctx = decimal.Context(prec=80)
    for r in records:
        if r.filled == 0:
            continue
        assert r.avg_price is not None
        base, quote = r.intent.market.split("/")
        # avg_price is notional / filled to 50 digits; real notionals here have at most 16 decimals, so
        # rounding filled * avg_price to 1e-20 gives the recorded notional back exactly
        notional = ctx.multiply(r.filled, r.avg_price).quantize(D("1e-20")).normalize()
        sign = 1 if r.intent.side == "buy" else -1
        out[base] = out.get(base, D(0)) + sign * r.filled
        out[quote] = out.get(quote, D(0)) - sign * notional
        for ccy, fee in r.fees.items():
            out[ccy] = out.get(ccy, D(0)) - fee
    return {a: out[a] for a in assets}


def assert_books_agree(config_path: Path, state: dict[str, Any], opening: dict[str, Decimal]) -> dict[str, Decimal]:
    """Exchange, shadow ledger and audit trail hold exactly the same amounts; returns them."""
    exchange = emulator_holdings(state)
    assert ledger_holdings(config_path) == exchange
    assert audit_holdings(config_path, opening) == exchange
    return exchange


def order_counts(stats: dict[str, Any]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = stats["orders"]
    return counts


def assert_each_key_filled_at_most_once(stats: dict[str, Any]) -> None:
    for key, c in order_counts(stats).items():
        assert c["accepted"] <= 1 and c["filled"] <= 1, f"idempotency key {key} traded twice: {c}"


@contextlib.contextmanager
def remote_emulator(snapshot: Path) -> Iterator[Any]:
    """The Binance emulator in its own process, serving `snapshot`, stopped on exit."""

    proc = subprocess.Popen(
        [sys.executable, "-m", "rebalancer_cli.testing.emulator", "--snapshot", str(snapshot), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield RemoteEmulator(url)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def check_consistent(
    config: Path, emulator: Emulator, report: ExecutionReport, opening: dict[str, Decimal] = OPENING
) -> None:
    """What the emulator saw agrees with the run: no key filled twice, exactly the keys sent reached it, and
    exchange, ledger and audit hold the same amounts (from `opening`); reconcile finds nothing to repair."""
    from rebalancer_cli.exchange.profiles import profile_for
    from rebalancer_cli.runtime import reconcile

    stats = emulator.stats()
    assert_each_key_filled_at_most_once(stats)
    sent = {o.key for o in report.outcomes + report.recovered if o.status not in ("refused", "skipped", "cancelled")}
    profile = profile_for(emulator.dialect.ccxt_id)  # the emulator counts the exchange's client order ids
    assert {profile.key_of(client_id) for client_id in order_counts(stats)} == sent
    assert_books_agree(config, emulator.state(), opening)
    assert reconcile(config).consistent
