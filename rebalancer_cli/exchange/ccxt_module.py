"""ccxt, loaded one exchange at a time.

`import ccxt` runs the package's `__init__`, which imports every one of its 100+ exchanges: about 90 ms of each
command's start-up (measured: 184-241 ms for the whole package against 91-151 ms for its base and one exchange),
for one exchange used. `load` enters the package without its `__init__`: the base classes, the errors and the
precision constants are there at once, an exchange's module is imported when its class is first asked for
(`exchange_class`). Anything else asked of the package (another part of the process that imports ccxt and uses
it whole: an emulator's client, a test) runs the real `__init__` into the same module object, once, so nobody
ever sees a `ccxt` that is half there. Where ccxt was imported whole already, that module is used as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import threading
from types import ModuleType
from typing import Any

_ID = re.compile(r"[a-z][a-z0-9]*")
_lock = threading.RLock()


def load() -> ModuleType:
    """The `ccxt` package: the one in `sys.modules`, or a lean entry into it (see the module's docstring)."""
    with _lock:
        found = sys.modules.get("ccxt")
        if found is not None:
            return found
        spec = importlib.util.find_spec("ccxt")
        if spec is None or spec.loader is None:  # pragma: no cover - ccxt is a dependency
            raise ImportError("ccxt is not installed")
        package = importlib.util.module_from_spec(spec)

        def whole(name: str) -> Any:
            """PEP 562: a name the lean entry does not hold runs the package's own `__init__`, once."""
            with _lock:
                if package.__dict__.get("__getattr__") is whole:
                    del package.__dict__["__getattr__"]
                    assert spec is not None and spec.loader is not None
                    spec.loader.exec_module(package)
            try:
                return package.__dict__[name]
            except KeyError:
                raise AttributeError(f"module 'ccxt' has no attribute {name!r}") from None

        package.__dict__["__getattr__"] = whole
        sys.modules["ccxt"] = package
        try:
            from ccxt.base import decimal_to_precision, errors

            for source in (errors, decimal_to_precision):
                for name, value in vars(source).items():
                    if not name.startswith("_") and (isinstance(value, type) or name.isupper()):
                        package.__dict__.setdefault(name, value)
        except BaseException:
            del sys.modules["ccxt"]
            raise
        return package


def exchange_class(exchange_id: str) -> type | None:
    """ccxt's client class for `exchange_id` (`ccxt.binance`, ...), importing only its module; None when ccxt
    has no such exchange."""
    if not _ID.fullmatch(exchange_id):
        return None
    package = load()
    with _lock:
        known = package.__dict__.get(exchange_id)
        if isinstance(known, type):
            return known
        if "__getattr__" not in package.__dict__:  # loaded whole: its own list says
            listed = exchange_id in getattr(package, "exchanges", ())
            return getattr(package, exchange_id, None) if listed else None
        if importlib.util.find_spec(f"ccxt.{exchange_id}") is None:
            return None
        module = importlib.import_module(f"ccxt.{exchange_id}")
        klass = getattr(module, exchange_id, None)
        if not isinstance(klass, type):
            return None
        # as the package's `__init__` does: `ccxt.binance` is the class, not the module of the same name
        package.__dict__[exchange_id] = klass
        return klass
