"""Audit store: the durable record of every plan, order, fill, fee and event.

`open_audit` picks the backend from the configured URL: embedded SQLite by default (one file in the state
directory), PostgreSQL in production. Both implement `AuditStore` and pass the same contract tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rebalancer_cli.audit.base import (
    PARTITION_MONTHS_AHEAD,
    PLAN_STARTED,
    TERMINAL,
    AuditStore,
    ExecutionRecord,
    Fill,
    OrderIntent,
    OrderRecord,
    OrderStatus,
)
from rebalancer_cli.audit.sqlite import SqliteAuditStore
from rebalancer_cli.errors import InputError

if TYPE_CHECKING:
    from rebalancer_cli.audit.postgres import PostgresAuditStore

__all__ = [
    "DEFAULT_SQLITE_NAME",
    "PARTITION_MONTHS_AHEAD",
    "PLAN_STARTED",
    "TERMINAL",
    "AuditStore",
    "ExecutionRecord",
    "Fill",
    "OrderIntent",
    "OrderRecord",
    "OrderStatus",
    "PostgresAuditStore",
    "SqliteAuditStore",
    "open_audit",
]

DEFAULT_SQLITE_NAME = "audit.sqlite3"


def open_audit(url: str | None, state_dir: Path) -> AuditStore:
    """Open the audit store a config names; the embedded SQLite file is migrated on open.

    An embedded store is private to this machine and must work with zero setup, so it is brought to the
    current schema on open (concurrent openers serialise on SQLite's write lock). A PostgreSQL store is
    shared and its schema is the operator's to change: call `check()` and let them run
    `rebalance db migrate`.
    """
    if url is None or url == "":
        store = SqliteAuditStore(Path(state_dir) / DEFAULT_SQLITE_NAME)
    elif url.startswith("sqlite://"):
        path = Path(url.removeprefix("sqlite://"))
        if not path.is_absolute() or path == Path("/"):
            raise InputError(f"audit URL {url!r} must name an absolute file path: sqlite:///abs/path/audit.sqlite3")
        store = SqliteAuditStore(path)
    elif url.startswith(("postgresql://", "postgres://")):
        from rebalancer_cli.audit.postgres import PostgresAuditStore

        return PostgresAuditStore(url)
    else:
        scheme = url.split(":", 1)[0] if ":" in url else url
        raise InputError(
            f"audit store URL scheme {scheme!r} is not supported: use postgresql://... or sqlite:///abs/path"
        )
    try:
        store.migrate()
    except BaseException:
        store.close()
        raise
    return store


def __getattr__(name: str) -> object:
    # psycopg is imported only by those who use PostgreSQL: keeps `rebalance plan` quick to start
    if name == "PostgresAuditStore":
        from rebalancer_cli.audit.postgres import PostgresAuditStore

        return PostgresAuditStore
    raise AttributeError(name)
