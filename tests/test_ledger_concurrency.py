"""Many threads in several processes race for the same funds: the ledger never grants more than is there.

Each worker process runs threads that start together (a barrier across processes, then one per process);
half of them share their process's ledger instance and half open their own, as separate daemon instances
would. Runs on SQLite (one file shared by the processes), one Redis server and a Redis Cluster.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from redis_cluster_fixture import redis_cluster_url  # noqa: F401  (fixture)

from rebalancer_cli.ledger import RedisLedger, ShadowLedger, open_ledger

D = Decimal
PROCESSES = 4
THREADS = 6
ATTEMPTS = 4
TTL = 120.0


def _race(
    url: str,
    state_dir: str,
    pid: str,
    worker: int,
    action: str,
    start: Any,
    results: Any,
) -> None:
    """Body of one worker process: THREADS threads each try ATTEMPTS locks (or the same commit)."""
    try:
        shared = open_ledger(url, Path(state_dir))
        granted: list[str] = []
        errors: list[str] = []
        ready = threading.Barrier(THREADS)
        mutex = threading.Lock()

        def thread_body(t: int) -> None:
            ledger = shared if t % 2 == 0 else open_ledger(url, Path(state_dir))
            try:
                ready.wait()
                for i in range(ATTEMPTS):
                    key = f"w{worker}-t{t}-{i}"
                    if action == "lock":
                        ok = ledger.lock(pid, key, "USDC", D("0.07"), ttl_seconds=TTL)
                    else:
                        key = "the-fill"
                        ok = ledger.commit(pid, key, debit={"USDC": D("0.07")}, credit={"BTC": D("0.000001")})
                    if ok:
                        with mutex:
                            granted.append(key)
            except Exception as exc:
                with mutex:
                    errors.append(repr(exc))
            finally:
                if ledger is not shared:
                    ledger.close()

        threads = [threading.Thread(target=thread_body, args=(t,)) for t in range(THREADS)]
        start.wait(timeout=60)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        shared.close()
        results.put((worker, granted, errors))
    except Exception as exc:
        results.put((worker, [], [repr(exc)]))


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path, unique_id: str) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path / 'shared.sqlite3'}"
    elif request.param == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = request.getfixturevalue("redis_cluster_url")
    yield url
    if request.param != "sqlite":
        ledger = open_ledger(url, tmp_path)
        assert isinstance(ledger, RedisLedger)
        for key in ledger.key_names(unique_id):
            ledger._client.delete(key)
        ledger.close()


def _run_race(url: str, state_dir: Path, pid: str, action: str) -> tuple[list[str], ShadowLedger]:
    # Fork: workers start at once with everything imported; each opens its own store connections after
    # the fork (nothing open in this process is used by them).
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(url, str(state_dir), pid, w, action, start, results)) for w in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    granted: list[str] = []
    errors: list[str] = []
    reported = 0
    try:
        while reported < PROCESSES:
            try:
                _worker, got, errs = results.get(timeout=0.5)
            except queue.Empty:
                # A worker that died without reporting must fail the test now, not after a long timeout.
                if any(p.exitcode not in (None, 0) for p in procs):
                    pytest.fail(f"a worker process died: exit codes {[p.exitcode for p in procs]}")
                continue
            reported += 1
            granted += got
            errors += errs
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert errors == []
    assert [proc.exitcode for proc in procs] == [0] * PROCESSES
    return granted, open_ledger(url, state_dir)


def test_racing_locks_never_overspend(store_url: str, tmp_path: Path, unique_id: str) -> None:
    setup = open_ledger(store_url, tmp_path)
    setup.sync_balances(unique_id, {"USDC": D("1")})
    setup.close()

    granted, ledger = _run_race(store_url, tmp_path, unique_id, "lock")
    try:
        attempts = PROCESSES * THREADS * ATTEMPTS
        assert attempts > 14
        # 1 USDC affords exactly 14 locks of 0.07 (0.98); no more, and no fewer, whatever the interleaving.
        assert len(granted) == 14
        assert len(set(granted)) == 14
        live = ledger.locks(unique_id)
        assert sorted(lock.key for lock in live) == sorted(granted)
        assert sum((lock.amount for lock in live), D(0)) == D("0.98")
        assert ledger.available(unique_id, "USDC") == D("0.02")
        assert ledger.balances(unique_id) == {"USDC": D("1")}
    finally:
        ledger.close()


def test_racing_commits_of_one_fill_apply_it_once(store_url: str, tmp_path: Path, unique_id: str) -> None:
    setup = open_ledger(store_url, tmp_path)
    setup.sync_balances(unique_id, {"USDC": D("1")})
    setup.close()

    granted, ledger = _run_race(store_url, tmp_path, unique_id, "commit")
    try:
        assert granted == ["the-fill"]
        assert ledger.balances(unique_id) == {"USDC": D("0.93"), "BTC": D("0.000001")}
        assert ledger.is_committed(unique_id, "the-fill")
    finally:
        ledger.close()
