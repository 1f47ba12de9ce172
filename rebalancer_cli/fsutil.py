"""Files of our own: atomic writes (nothing half-written is ever left behind, even on a crash mid-write), and
the owner-only state directory with its embedded SQLite stores."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import time
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) owner-only (0700): the state directory holds holdings, halt reasons and
    the audit trail of a trading account. An existing directory of ours is tightened; others are left alone."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
            path.chmod(0o700)
    return path


def open_sqlite(path: Path, *, timeout: float) -> sqlite3.Connection:
    """An embedded store's connection: the file created owner-only (0600; SQLite gives its WAL and SHM files
    the same mode), WAL journaling, and the first-open race survived.

    Two processes opening a fresh file at once can both try to switch it to WAL, and the loser gets "database is
    locked" at once (the journal-mode switch does not wait on the busy timeout): it retries until `timeout`."""
    private_dir(path.parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
    if str(mode).lower() != "wal":
        conn.close()
        raise sqlite3.OperationalError(f"WAL mode refused (journal_mode={mode})")
    return conn
