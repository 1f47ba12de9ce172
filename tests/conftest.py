"""Shared fixtures: real Redis and PostgreSQL, skipped only when no server answers outside CI."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# fixtures shared by several test modules (lease stores on each backend; the emulator in its own process)
pytest_plugins = ["daemon_helpers", "process_emulator"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

REDIS_URL = os.environ.get("REBALANCE_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("REBALANCE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _service_missing(what: str, url: str, exc: BaseException) -> None:
    reason = f"{what} not reachable at {url}: {exc}"
    if os.environ.get("REBALANCE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"REBALANCE_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except Exception as exc:  # any failure to reach the server means: no server here
        _service_missing("Redis", REDIS_URL, exc)
    return REDIS_URL


@pytest.fixture(scope="session")
def database_url() -> str:
    import psycopg

    try:
        with psycopg.connect(DATABASE_URL, connect_timeout=2) as conn:
            conn.execute("select 1")
    except Exception as exc:
        _service_missing("PostgreSQL", DATABASE_URL, exc)
    return DATABASE_URL


@pytest.fixture()
def unique_id() -> str:
    """A portfolio id no other test (or earlier run) uses, so tests on shared servers never collide."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture()
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "state"
    d.mkdir()
    monkeypatch.setenv("REBALANCE_STATE_DIR", str(d))
    yield d
