"""What must survive, and what must not leak: halts and the ledger's epoch across a lost Redis, an owner-only
state directory, and a fresh state directory opened by several processes at once."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from exec_helpers import OPENING, paper_balances, write_config, write_snapshot

from rebalancer_cli.config import load_config
from rebalancer_cli.errors import HaltedError, LedgerLostError
from rebalancer_cli.ledger.redis import RedisLedger
from rebalancer_cli.runtime import execute, halt, make_plan, migrate, reconcile, resume

pytestmark = pytest.mark.services


def _paper(tmp_path: Path, pid: str, *, name: str = "portfolio.yaml", **extra: object) -> Path:
    write_snapshot(tmp_path / "market.yaml")
    return write_config(tmp_path, pid, {"id": "paper", "snapshot": "market.yaml"}, name=name, **extra)


def _lose_redis(config: Path, redis_url: str) -> None:
    """What a Redis restarted without persistence leaves of this portfolio: nothing."""
    pid = load_config(config).portfolio_id
    ledger = RedisLedger.from_url(redis_url)
    try:
        ledger._client.delete(*ledger.key_names(pid))
        assert ledger.halted(pid) is None and ledger.balances(pid) == {}
    finally:
        ledger.close()


def test_a_halt_and_the_ledger_survive_a_redis_that_came_back_empty(
    tmp_path: Path, unique_id: str, redis_url: str, database_url: str
) -> None:
    stores = {"redis_url": redis_url, "database_url": database_url}
    guarded = _paper(tmp_path, unique_id, **stores, max_trade_notional=1)
    migrate(guarded)
    # a first run records the ledger's epoch in the audit trail (its orders are refused by the guard)
    assert execute(guarded).status == "refused" and paper_balances(guarded) == OPENING
    config = _paper(tmp_path, unique_id, **stores, name="unguarded.yaml")
    halt(config, "exchange incident")
    _lose_redis(config, redis_url)

    with pytest.raises(LedgerLostError, match="came back empty"):
        execute(config)  # and the halt the audit trail knows is back in the ledger already
    repaired = reconcile(config, repair=True)
    assert any("rebuilt" in line for line in repaired.repaired), repaired.repaired
    with pytest.raises(HaltedError, match="exchange incident"):  # the halt came back from the audit trail
        execute(config)
    assert paper_balances(config) == OPENING  # nothing traded while the ledger was lost or halted
    resume(config)
    assert execute(config).traded
    assert make_plan(config)[1].trades == ()


def test_the_state_directory_and_its_stores_are_owner_only(tmp_path: Path, unique_id: str) -> None:
    config = _paper(tmp_path, unique_id)
    report = execute(config)
    assert report.traded
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = [p for p in state.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"ledger.sqlite3", "paper.sqlite3", "leases.sqlite3"}
    loose = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) & 0o077}
    assert loose == {}


OPEN_ALL = """
import sys
from pathlib import Path
from rebalancer_cli.audit.sqlite import SqliteAuditStore
from rebalancer_cli.leases import SQLiteLeases
from rebalancer_cli.ledger.sqlite import SQLiteLedger
d = Path(sys.argv[1])
for store in (SQLiteLedger(d / "ledger.sqlite3"), SqliteAuditStore(d / "audit.sqlite3"), SQLiteLeases(d / "l.sqlite3")):
    store.close()
"""


def test_processes_opening_a_fresh_state_directory_at_once_all_succeed(tmp_path: Path) -> None:
    for round_ in range(3):
        fresh = tmp_path / f"state-{round_}"
        procs = [
            subprocess.Popen([sys.executable, "-c", OPEN_ALL, str(fresh)], stderr=subprocess.PIPE, text=True)
            for _ in range(6)
        ]
        failures = [p.communicate()[1] for p in procs if p.wait(timeout=60) != 0]
        assert failures == []
        assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
