"""Test infrastructure shipped with the package: loopback exchange emulators, one core and one REST dialect
per exchange (`core.py` documents the dialect API; `binance.py` is the first dialect).

It lives in the package (not under tests/) so that subprocess tests, benchmarks and operators trying the
tool without an exchange account can all run `python -m rebalancer_cli.testing.emulator --exchange NAME`.

Adding an exchange (named by its ccxt id everywhere):
1. `rebalancer_cli/testing/<id>.py`: a `core.Dialect` subclass (the API is in `core.py`'s docstring;
   `binance.py` is a complete example), and one line in `DIALECTS` below.
2. `rebalancer_cli/exchange/profiles/<id>.py`: an `ExchangeProfile` subclass and its instance (see
   `profiles/base.py`), and one line in `PROFILES` (`profiles/__init__.py`).
3. `pytest tests/test_exchange_contract.py tests/test_exchange_profiles.py -k <id>`: the contract suite
   runs on every pair registered under the same name; claim `execute` in `proven_for` only when it passes.
4. Paste `markdown_table()` (`rebalancer_cli.exchange.profiles`) into the README's Exchanges section (a
   test compares them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import Dialect

# name -> "module:class" of its dialect, imported only when used
DIALECTS: dict[str, str] = {
    "binance": "rebalancer_cli.testing.binance:BinanceDialect",
    "okx": "rebalancer_cli.testing.okx:OkxDialect",
    "bybit": "rebalancer_cli.testing.bybit:BybitDialect",
    "coinbase": "rebalancer_cli.testing.coinbase:CoinbaseDialect",
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
