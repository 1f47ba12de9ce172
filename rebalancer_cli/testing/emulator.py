"""The emulators' entry point, and the Binance emulator's historical module (its names still import here).

`python -m rebalancer_cli.testing.emulator --snapshot FILE [--exchange NAME]` serves a snapshot with one
exchange's REST dialect (Binance by default); the first line on stdout is the base URL. The engine is in
`core.py` (its docstring documents the dialect API), Binance's REST dialect in `binance.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rebalancer_cli.snapshot import Snapshot
from rebalancer_cli.testing import core
from rebalancer_cli.testing.binance import BinanceDialect, binance_client
from rebalancer_cli.testing.core import (
    CONTROL_PREFIX,
    DEFAULT_API_KEY,
    DEFAULT_PASSWORD,
    DEFAULT_SECRET,
    FAULT_KINDS,
    ORDER_ENDPOINT,
    ClientOrderIdScope,
    Dialect,
    Emulator,
    Fault,
    FaultControl,
    Faults,
    RemoteEmulator,
    RemoteFaults,
)

__all__ = [
    "CONTROL_PREFIX",
    "DEFAULT_API_KEY",
    "DEFAULT_PASSWORD",
    "DEFAULT_SECRET",
    "FAULT_KINDS",
    "ORDER_ENDPOINT",
    "BinanceDialect",
    "ClientOrderIdScope",
    "Dialect",
    "Emulator",
    "Fault",
    "FaultControl",
    "Faults",
    "RemoteEmulator",
    "RemoteFaults",
    "binance_client",
    "main",
    "start_emulator",
]


def start_emulator(
    snapshot: Path | str | Snapshot,
    *,
    exchange: str | Dialect = "binance",
    port: int = 0,
    weight_limit: int | None = None,
    api_key: str | None = None,
    secret: str | None = None,
    password: str | None = None,
    weight_window: float | None = None,
    client_order_id_scope: ClientOrderIdScope = "open",
    ban_after: int = 3,
    ban_seconds: float = 120.0,
) -> Emulator:
    """Start a loopback exchange serving `snapshot` on 127.0.0.1 (`port=0`: any free port); Binance unless
    `exchange` names another registered dialect (`rebalancer_cli.testing.DIALECTS`)."""
    return core.start_emulator(
        snapshot,
        exchange=exchange,
        port=port,
        weight_limit=weight_limit,
        api_key=api_key,
        secret=secret,
        password=password,
        weight_window=weight_window,
        client_order_id_scope=client_order_id_scope,
        ban_after=ban_after,
        ban_seconds=ban_seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return core.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
