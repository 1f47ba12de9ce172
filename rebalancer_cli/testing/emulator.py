"""The emulators' entry point, and the Binance emulator's historical module (its names still import here).

`python -m rebalancer_cli.testing.emulator --snapshot FILE [--exchange NAME]` serves a snapshot with one
exchange's REST dialect (Binance by default); the first line on stdout is the base URL. The engine is in
`core.py` (its docstring documents the dialect API), Binance's REST dialect in `binance.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def start_emulator(snapshot: Path | str | Snapshot, *, exchange: str | Dialect = "binance", **options: Any) -> Emulator:
    """Start a loopback exchange serving `snapshot` on 127.0.0.1 (`port=0`: any free port); Binance unless
    `exchange` names another registered dialect (`rebalancer_cli.testing.DIALECTS`). `options` are
    `core.Emulator`'s: port, weight_limit, weight_window, api_key, secret, password, client_order_id_scope,
    ban_after, ban_seconds."""
    return core.start_emulator(snapshot, exchange=exchange, **options)


def main(argv: Sequence[str] | None = None) -> int:
    return core.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
