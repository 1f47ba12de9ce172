"""Test infrastructure shipped with the package: loopback exchange emulators, one core and one REST dialect
per exchange (`core.py` documents the dialect API; `binance.py` is the first dialect).

It lives in the package (not under tests/) so that subprocess tests, benchmarks and operators trying the
tool without an exchange account can all run `python -m rebalancer_cli.testing.emulator --exchange NAME`.

Adding an exchange's emulator: write `rebalancer_cli/testing/<name>.py` with a `core.Dialect` subclass and
add one line to `DIALECTS`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import Dialect

# name -> "module:class" of its dialect, imported only when used
DIALECTS: dict[str, str] = {
    "binance": "rebalancer_cli.testing.binance:BinanceDialect",
    "kraken": "rebalancer_cli.testing.kraken:KrakenDialect",
}


def load_dialect(name: str) -> Dialect:
    """A fresh instance of the dialect registered as `name` (one instance serves one emulator)."""
    from .core import Dialect

    try:
        module_name, _, class_name = DIALECTS[name].partition(":")
    except KeyError:
        raise ValueError(f"no emulator dialect {name!r}; known: {', '.join(sorted(DIALECTS))}") from None
    dialect = getattr(importlib.import_module(module_name), class_name)()
    assert isinstance(dialect, Dialect)
    return dialect
