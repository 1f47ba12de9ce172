"""Shadow ledger: funds locked before an order leaves, committed on acknowledgement, released on failure.

`open_ledger` picks the backend from the configured URL, so callers never name a backend class.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from rebalancer_cli.errors import InputError
from rebalancer_cli.ledger.base import Halt, Lock, ShadowLedger
from rebalancer_cli.ledger.sqlite import SQLiteLedger

__all__ = ["Halt", "Lock", "SQLiteLedger", "ShadowLedger", "open_ledger"]

DEFAULT_FILE = "ledger.sqlite3"


def open_ledger(url: str | None, state_dir: Path) -> ShadowLedger:
    """None or `sqlite:///abs/path.db` -> SQLite (default `state_dir/ledger.sqlite3`); `redis://`,
    `rediss://` -> one Redis server; `redis+cluster://host:port` (`rediss+cluster://`) -> Redis Cluster.

    Raises InputError for any other URL (a typo must not silently fall back to a local file) and StoreError
    when the store cannot be opened.
    """
    if url is None or not url.strip():
        return SQLiteLedger(Path(state_dir) / DEFAULT_FILE)
    # redis is imported only when a Redis ledger is configured: the embedded default starts faster without it
    from rebalancer_cli.ledger.redis import CLUSTER_SCHEMES, SINGLE_SCHEMES, RedisLedger, redact_url

    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or len(url) <= len("sqlite:///"):
            raise InputError(f"ledger URL {url!r}: expected sqlite:///absolute/path.db")
        return SQLiteLedger(Path(url[len("sqlite://") :]))
    if scheme in SINGLE_SCHEMES or scheme in CLUSTER_SCHEMES:
        return RedisLedger.from_url(url)
    raise InputError(
        f"ledger URL {redact_url(url)!r}: unknown scheme {scheme!r} "
        "(expected sqlite:///path, redis://, rediss:// or redis+cluster://)"
    )


def __getattr__(name: str) -> object:
    """`RedisLedger` on demand, so that importing the package does not import redis."""
    if name == "RedisLedger":
        from rebalancer_cli.ledger.redis import RedisLedger

        return RedisLedger
    raise AttributeError(name)
