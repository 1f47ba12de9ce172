"""One contract for every shadow ledger backend: SQLite, one Redis server, and a Redis Cluster.

Each test runs against each backend on real stores, so the executor may rely on the behaviour whatever the
operator configured.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_cluster_fixture import redis_cluster_url  # noqa: F401  (fixture)

from rebalancer_cli.errors import InputError, LeaseLostError, StoreError
from rebalancer_cli.ledger import Lock, RedisLedger, ShadowLedger, SQLiteLedger, open_ledger
from rebalancer_cli.ledger.base import Commit

D = Decimal
BACKENDS = ["sqlite", "redis", "redis-cluster"]
Opener = Callable[[], ShadowLedger]


@pytest.fixture(params=BACKENDS)
def opener(request: pytest.FixtureRequest, tmp_path: Path, unique_id: str) -> Iterator[Opener]:
    """Opens a fresh instance over the same store each call, as a second process or daemon would."""
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path / 'ledger.sqlite3'}"
    elif request.param == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = request.getfixturevalue("redis_cluster_url")
    opened: list[ShadowLedger] = []

    def open_one() -> ShadowLedger:
        ledger = open_ledger(url, tmp_path)
        opened.append(ledger)
        return ledger

    yield open_one
    if request.param != "sqlite":
        cleaner = open_one()
        assert isinstance(cleaner, RedisLedger)
        for pid in (unique_id, f"{unique_id}-b"):
            for key in cleaner.key_names(pid):
                cleaner._client.delete(key)
    for ledger in opened:
        ledger.close()


@pytest.fixture()
def ledger(opener: Opener) -> ShadowLedger:
    return opener()


@pytest.fixture()
def pid(unique_id: str) -> str:
    return unique_id


TTL = 60.0


# --- holdings -----------------------------------------------------------------------------------


def test_a_new_portfolio_holds_nothing(ledger: ShadowLedger, pid: str) -> None:
    assert ledger.balances(pid) == {}
    assert ledger.available(pid, "BTC") == 0
    assert ledger.locks(pid) == []
    assert ledger.halted(pid) is None
    assert ledger.get_memory(pid) is None
    assert not ledger.is_committed(pid, "k")


def test_sync_replaces_holdings_and_keeps_locks(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"BTC": D("1.5"), "USDC": D("100")})
    assert ledger.lock(pid, "k1", "USDC", D("30"), ttl_seconds=TTL)
    ledger.sync_balances(pid, {"USDC": D("50"), "ETH": D("2")})
    assert ledger.balances(pid) == {"USDC": D("50"), "ETH": D("2")}  # BTC gone: the exchange says so
    assert [lock.key for lock in ledger.locks(pid)] == ["k1"]
    assert ledger.available(pid, "USDC") == D("20")


def test_sync_unless_locked_leaves_holdings_while_an_order_is_in_flight(ledger: ShadowLedger, pid: str) -> None:
    assert ledger.sync_balances(pid, {"USDC": D("100")}, unless_locked=True)  # no lock: replaced
    assert ledger.lock(pid, "k1", "USDC", D("30"), ttl_seconds=TTL)
    assert not ledger.sync_balances(pid, {"USDC": D("70")}, unless_locked=True)
    assert ledger.balances(pid) == {"USDC": D("100")}  # the exchange's 70 may not show the order yet
    ledger.release(pid, "k1")
    assert ledger.sync_balances(pid, {"USDC": D("70")}, unless_locked=True)
    assert ledger.balances(pid) == {"USDC": D("70")}
    assert ledger.lock(pid, "k2", "USDC", D("1"), ttl_seconds=0.05)
    time.sleep(0.1)  # an expired lock is no order in flight
    assert ledger.sync_balances(pid, {"USDC": D("60")}, unless_locked=True)
    assert ledger.balances(pid) == {"USDC": D("60")}


def test_halt_and_memory_read_together_as_each_reads_alone(ledger: ShadowLedger, pid: str) -> None:
    assert ledger.halt_and_memory(pid) == (None, None)
    ledger.set_memory(pid, '{"BTC": {"armed": false}}')
    ledger.halt(pid, "drill", "alice")
    halt, memory = ledger.halt_and_memory(pid)
    assert (halt, memory) == (ledger.halted(pid), ledger.get_memory(pid)) == (halt, '{"BTC": {"armed": false}}')
    assert halt is not None and (halt.reason, halt.by) == ("drill", "alice")
    ledger.resume(pid)
    assert ledger.halt_and_memory(pid) == (None, '{"BTC": {"armed": false}}')


def test_portfolios_do_not_share_funds(ledger: ShadowLedger, pid: str) -> None:
    other = f"{pid}-b"
    ledger.sync_balances(pid, {"USDC": D("10")})
    ledger.sync_balances(other, {"USDC": D("10")})
    assert ledger.lock(pid, "k", "USDC", D("10"), ttl_seconds=TTL)
    assert ledger.available(other, "USDC") == D("10")
    assert ledger.lock(other, "k", "USDC", D("10"), ttl_seconds=TTL)
    ledger.halt(pid, "test", "alice")
    assert ledger.halted(other) is None


# --- locks ---------------------------------------------------------------------------------------


def test_lock_grants_exactly_what_is_available(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("1")})
    assert ledger.lock(pid, "a", "USDC", D("0.7"), ttl_seconds=TTL)
    assert not ledger.lock(pid, "b", "USDC", D("0.300000000000000001"), ttl_seconds=TTL)
    assert ledger.lock(pid, "c", "USDC", D("0.3"), ttl_seconds=TTL)  # the last cent fits exactly
    assert ledger.available(pid, "USDC") == 0
    assert not ledger.lock(pid, "d", "USDC", D("0.000000000000000001"), ttl_seconds=TTL)
    assert not ledger.lock(pid, "e", "BTC", D("1"), ttl_seconds=TTL)  # an asset never held
    assert {lock.key for lock in ledger.locks(pid)} == {"a", "c"}
    assert ledger.balances(pid) == {"USDC": D("1")}  # locking never moves holdings


def test_lock_many_grants_in_order_each_against_what_the_ones_before_it_took(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("10"), "BTC": D("1")})
    assert ledger.lock(pid, "done", "USDC", D("1"), ttl_seconds=TTL)
    ledger.commit(pid, "done", debit={"USDC": D("1")}, credit={"BTC": D("0.0001")})
    assert ledger.lock(pid, "live", "USDC", D("2"), ttl_seconds=TTL)
    granted = ledger.lock_many(
        pid,
        [
            ("a", "USDC", D("4")),
            ("b", "USDC", D("3.000000000000000001")),  # 3 left after a: refused
            ("c", "BTC", D("1.0001")),  # the whole BTC, the commit's included: another asset's funds
            ("live", "USDC", D("2")),  # held already: granted, nothing locked twice
            ("done", "USDC", D("1")),  # committed before: granted, nothing locked
            ("d", "USDC", D("3")),  # the last 3 fit exactly
        ],
        ttl_seconds=TTL,
    )
    assert granted == [True, False, True, True, True, True]
    assert {lock.key for lock in ledger.locks(pid)} == {"live", "a", "c", "d"}
    assert ledger.available(pid, "USDC") == 0 and ledger.available(pid, "BTC") == 0
    assert ledger.lock_many(pid, [], ttl_seconds=TTL) == []
    with pytest.raises(ValueError):  # one bad request refuses the batch before anything is locked
        ledger.lock_many(pid, [("e", "BTC", D("0.1")), ("f", "USDC", D("0"))], ttl_seconds=TTL)
    assert "e" not in {lock.key for lock in ledger.locks(pid)}


def test_relocking_a_live_key_is_idempotent(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("10")})
    assert ledger.lock(pid, "k", "USDC", D("6"), ttl_seconds=TTL)
    # After a crash the executor locks the same key again: granted, and nothing is locked twice.
    assert ledger.lock(pid, "k", "USDC", D("6"), ttl_seconds=TTL)
    assert ledger.lock(pid, "k", "USDC", D("9"), ttl_seconds=TTL)
    assert ledger.available(pid, "USDC") == D("4")
    assert ledger.locks(pid) == [Lock("k", "USDC", D("6"), ledger.locks(pid)[0].expires_at)]


def test_lock_refuses_bad_amounts(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("10")})
    for bad in (D("0"), D("-1"), D("-0.000000000000000001")):
        with pytest.raises(ValueError):
            ledger.lock(pid, "k", "USDC", bad, ttl_seconds=TTL)
    with pytest.raises(ValueError):
        ledger.lock(pid, "k", "USDC", D("NaN"), ttl_seconds=TTL)
    with pytest.raises(TypeError):
        ledger.lock(pid, "k", "USDC", 0.1, ttl_seconds=TTL)  # type: ignore[arg-type]
    for ttl in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            ledger.lock(pid, "k", "USDC", D("1"), ttl_seconds=ttl)
    assert ledger.locks(pid) == []


def test_locks_report_their_expiry(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"BTC": D("2")})
    before = time.time()
    assert ledger.lock(pid, "k", "BTC", D("0.5"), ttl_seconds=120)
    after = time.time()
    (lock,) = ledger.locks(pid)
    assert (lock.key, lock.asset, lock.amount) == ("k", "BTC", D("0.5"))
    assert before + 119 <= lock.expires_at <= after + 121


def test_expired_lock_frees_its_funds(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("10")})
    assert ledger.lock(pid, "short", "USDC", D("10"), ttl_seconds=0.3)
    assert not ledger.lock(pid, "other", "USDC", D("1"), ttl_seconds=TTL)
    time.sleep(0.6)
    assert ledger.locks(pid) == []
    assert ledger.available(pid, "USDC") == D("10")
    assert ledger.lock(pid, "other", "USDC", D("4"), ttl_seconds=TTL)
    # The expired key is a new lock now, granted only if the funds are there.
    assert not ledger.lock(pid, "short", "USDC", D("10"), ttl_seconds=TTL)
    assert ledger.lock(pid, "short", "USDC", D("6"), ttl_seconds=TTL)
    assert ledger.available(pid, "USDC") == 0


# --- commit and release ---------------------------------------------------------------------------


def test_commit_applies_a_fill_once_and_drops_its_lock(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("1000"), "BTC": D("0")})
    assert ledger.lock(pid, "buy-1", "USDC", D("650.65"), ttl_seconds=TTL)
    assert ledger.commit(pid, "buy-1", debit={"USDC": D("650.65")}, credit={"BTC": D("0.01")})
    assert ledger.balances(pid) == {"USDC": D("349.35"), "BTC": D("0.01")}
    assert ledger.locks(pid) == []
    assert ledger.available(pid, "USDC") == D("349.35")
    assert ledger.is_committed(pid, "buy-1")
    # A retried acknowledgement must not apply the fill twice.
    assert not ledger.commit(pid, "buy-1", debit={"USDC": D("650.65")}, credit={"BTC": D("0.01")})
    assert ledger.balances(pid) == {"USDC": D("349.35"), "BTC": D("0.01")}


def test_commit_many_applies_each_fill_once_in_one_step(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("100"), "BTC": D("1"), "ETH": D("2")})
    assert ledger.lock_many(
        pid, [("s1", "BTC", D("0.5")), ("s2", "ETH", D("1")), ("b1", "USDC", D("10"))], ttl_seconds=TTL
    ) == [True, True, True]
    ledger.commit(pid, "s2", debit={"ETH": D("1")}, credit={"USDC": D("30")})  # settled before, by recovery
    answers = ledger.commit_many(
        pid,
        [
            Commit("s1", {"BTC": D("0.5")}, {"USDC": D("20.000000000000000001")}),
            Commit("s2", {"ETH": D("1")}, {"USDC": D("30")}),  # committed already: changes nothing
            Commit("b1", {"USDC": D("9.9")}, {"ETH": D("0.3")}),
            Commit("s1", {"BTC": D("0.5")}, {"USDC": D("20")}),  # twice in one call: once only
        ],
    )
    assert answers == [True, False, True, False]
    assert ledger.balances(pid) == {
        "BTC": D("0.5"),
        "ETH": D("1.3"),
        "USDC": D("100") + D("30") + D("20.000000000000000001") - D("9.9"),
    }
    assert ledger.locks(pid) == [] and all(ledger.is_committed(pid, k) for k in ("s1", "s2", "b1"))
    assert ledger.commit_many(pid, []) == []
    assert ledger.commit_many(pid, [Commit("m1", {}, {"ETH": D("0.1")})], memory='{"cycle": 2}') == [True]
    assert ledger.get_memory(pid) == '{"cycle": 2}'  # stored in the same step as the fill
    assert ledger.commit_many(pid, [], memory='{"cycle": 3}') == [] and ledger.get_memory(pid) == '{"cycle": 3}'
    with pytest.raises(ValueError):  # one bad commit refuses them all before anything is written
        ledger.commit_many(
            pid, [Commit("c1", {}, {"BTC": D("1")}), Commit("c2", {"BTC": D("-1")}, {})], memory='{"cycle": 4}'
        )
    assert not ledger.is_committed(pid, "c1") and ledger.balances(pid)["BTC"] == D("0.5")
    assert ledger.get_memory(pid) == '{"cycle": 3}'


def test_commit_works_without_a_live_lock(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("100")})
    assert ledger.lock(pid, "late", "USDC", D("50"), ttl_seconds=0.3)
    time.sleep(0.5)
    # The order filled on the exchange after its lock expired: the fill is real and must be recorded.
    assert ledger.commit(pid, "late", debit={"USDC": D("50")}, credit={"ETH": D("0.02")})
    assert ledger.commit(pid, "never-locked", debit={"USDC": D("10")}, credit={"BTC": D("0.0001")})
    assert ledger.balances(pid) == {"USDC": D("40"), "ETH": D("0.02"), "BTC": D("0.0001")}


def test_locking_a_committed_key_locks_nothing(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("100")})
    assert ledger.commit(pid, "k", debit={"USDC": D("30")}, credit={})
    assert ledger.lock(pid, "k", "USDC", D("30"), ttl_seconds=TTL)
    assert ledger.locks(pid) == []
    assert ledger.available(pid, "USDC") == D("70")


def test_commit_refuses_negative_movements(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("100")})
    with pytest.raises(ValueError):
        ledger.commit(pid, "k", debit={"USDC": D("-1")}, credit={})
    with pytest.raises(TypeError):
        ledger.commit(pid, "k", debit={}, credit={"BTC": 0.5})  # type: ignore[dict-item]
    assert not ledger.is_committed(pid, "k")
    assert ledger.balances(pid) == {"USDC": D("100")}


def test_release_frees_funds_and_is_idempotent(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("10")})
    assert ledger.lock(pid, "k", "USDC", D("10"), ttl_seconds=TTL)
    ledger.release(pid, "k")
    ledger.release(pid, "k")
    ledger.release(pid, "never-locked")
    assert ledger.locks(pid) == []
    assert ledger.available(pid, "USDC") == D("10")
    assert ledger.balances(pid) == {"USDC": D("10")}
    assert not ledger.is_committed(pid, "k")


def test_release_after_commit_changes_nothing(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("10")})
    assert ledger.lock(pid, "k", "USDC", D("4"), ttl_seconds=TTL)
    assert ledger.commit(pid, "k", debit={"USDC": D("4")}, credit={"BTC": D("0.1")})
    ledger.release(pid, "k")
    assert ledger.is_committed(pid, "k")
    assert ledger.balances(pid) == {"USDC": D("6"), "BTC": D("0.1")}


# --- exactness -------------------------------------------------------------------------------------

EXACT_CASES = [
    # (start, debit, credit, expected)
    ("0.1", "0", "0.2", "0.3"),
    ("0.3", "0.1", "0", "0.2"),
    ("1.000000000000000001", "0.000000000000000001", "0", "1"),
    ("1000000000000000", "0", "0.000000000000000001", "1000000000000000.000000000000000001"),
    ("999999999999999.999999999999999999", "0", "0.000000000000000001", "1000000000000000"),
    ("123456789012345.123456789012345678", "23456789012345.023456789012345678", "0", "100000000000000.1"),
    ("0.5", "0.500000000000000001", "0", "-0.000000000000000001"),  # a fee overshoot
    ("-0.000000000000000001", "0", "0.000000000000000002", "0.000000000000000001"),
    ("-5", "10", "0", "-15"),
    ("-5", "0", "5", "0"),
]


@pytest.mark.parametrize(("start", "debit", "credit", "expected"), EXACT_CASES)
def test_amounts_are_exact(ledger: ShadowLedger, pid: str, start: str, debit: str, credit: str, expected: str) -> None:
    ledger.sync_balances(pid, {"X": D(start)})
    assert ledger.balances(pid) == {"X": D(start)}
    assert ledger.commit(pid, "fill", debit={"X": D(debit)}, credit={"X": D(credit)})
    (value,) = ledger.balances(pid).values()
    assert value == D(expected)
    assert str(value) == str(D(expected)), "the canonical text, not a float's approximation"
    assert ledger.available(pid, "X") == D(expected)


def test_odd_decimal_spellings_round_trip(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"A": D("1E+3"), "B": D("1.500"), "C": D("-0"), "D": D("1E-18"), "E": 7})  # type: ignore[dict-item]
    assert ledger.balances(pid) == {"A": D(1000), "B": D("1.5"), "C": D(0), "D": D("1E-18"), "E": D(7)}
    with pytest.raises(TypeError):
        ledger.sync_balances(pid, {"A": 0.1})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        ledger.sync_balances(pid, {"A": D("Infinity")})


def test_negative_holdings_lock_nothing(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"BNB": D("0.001")})
    assert ledger.commit(pid, "fee", debit={"BNB": D("0.0015")}, credit={})
    assert ledger.available(pid, "BNB") == D("-0.0005")
    assert not ledger.lock(pid, "k", "BNB", D("0.000000000000000001"), ttl_seconds=TTL)


_counter = itertools.count()
_amount = st.builds(lambda n, scale: Decimal(n).scaleb(-scale), st.integers(0, 10**34), st.integers(0, 18))
_positive = st.builds(lambda n, scale: Decimal(n).scaleb(-scale), st.integers(1, 10**34), st.integers(0, 18))
_signed = st.builds(lambda n, scale: Decimal(n).scaleb(-scale), st.integers(-(10**34), 10**34), st.integers(0, 18))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=_signed, fills=st.lists(st.tuples(_amount, _amount), min_size=1, max_size=4), want=_positive)
def test_arithmetic_matches_exact_decimal(
    ledger: ShadowLedger, pid: str, start: Decimal, fills: list[tuple[Decimal, Decimal]], want: Decimal
) -> None:
    ledger.sync_balances(pid, {"X": start})
    for key in [lock.key for lock in ledger.locks(pid)]:
        ledger.release(pid, key)
    with localcontext() as ctx:
        ctx.prec = 200
        expected = start
        for debit, credit in fills:
            assert ledger.commit(pid, f"f{next(_counter)}", debit={"X": debit}, credit={"X": credit})
            expected = expected - debit + credit
        assert ledger.balances(pid) == {"X": expected}
        affordable = want <= expected
        assert ledger.lock(pid, f"l{next(_counter)}", "X", want, ttl_seconds=TTL) == affordable
        assert ledger.available(pid, "X") == (expected - want if affordable else expected)


# --- the send mark -----------------------------------------------------------------------------------


def test_begin_send_marks_the_order_leaving_and_commit_or_release_clears_it(opener: Opener, pid: str) -> None:
    """The mark is what a successor's recovery reads before it calls an order the exchange does not know
    absent: written in the same step as the checks, seen by every instance, gone once the order is settled."""
    ledger, other = opener(), opener()
    ledger.sync_balances(pid, {"USDC": D("10")})
    at = datetime(2026, 12, 3, 7, 30, 15, 250000, tzinfo=UTC)
    for key in ("a", "b"):
        assert ledger.lock(pid, key, "USDC", D("1"), ttl_seconds=TTL)
        assert other.sent_at(pid, key) is None  # locked only: it never left
        assert ledger.begin_send(pid, key, fence=None, at=at) == ("ok", "")
        assert other.sent_at(pid, key) == at
    ledger.commit(pid, "a", debit={"USDC": D("1")}, credit={"BTC": D("1")})
    ledger.release(pid, "b")
    assert (other.sent_at(pid, "a"), other.sent_at(pid, "b")) == (None, None)


def test_a_refused_begin_send_leaves_no_mark(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("10")})
    assert ledger.begin_send(pid, "never-locked", fence=None) == ("unlocked", "")
    assert ledger.lock(pid, "held", "USDC", D("1"), ttl_seconds=TTL)
    ledger.halt(pid, "operator", "test")
    assert ledger.begin_send(pid, "held", fence=None)[0] == "halted"
    ledger.resume(pid)
    ledger.advance_fence(pid, 3)
    with pytest.raises(LeaseLostError):
        ledger.begin_send(pid, "held", fence=2)
    assert (ledger.sent_at(pid, "never-locked"), ledger.sent_at(pid, "held")) == (None, None)
    before = datetime.now(UTC)
    assert ledger.begin_send(pid, "held", fence=3) == ("ok", "")  # no time given: the store's now
    mark = ledger.sent_at(pid, "held")
    assert mark is not None and before - timedelta(seconds=2) <= mark <= datetime.now(UTC) + timedelta(seconds=2)


def test_begin_send_many_checks_and_marks_a_groups_orders_in_one_step(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("10"), "BTC": D("1")})
    assert ledger.lock_many(pid, [("a", "USDC", D("1")), ("b", "BTC", D("1"))], ttl_seconds=TTL) == [True, True]
    ledger.halt(pid, "operator", "test")
    assert ledger.begin_send_many(pid, ["a", "b"], fence=None) == [("halted", "operator")] * 2
    ledger.resume(pid)
    ledger.advance_fence(pid, 7)
    with pytest.raises(LeaseLostError):
        ledger.begin_send_many(pid, ["a", "b"], fence=6)
    assert (ledger.sent_at(pid, "a"), ledger.sent_at(pid, "b")) == (None, None)
    ledger.release(pid, "b")  # taken back (a successor's recovery): that one may not leave, the others may
    at = datetime(2026, 12, 3, 12, 0, 0, 250000, tzinfo=UTC)
    assert ledger.begin_send_many(pid, ["a", "b", "never"], fence=7, at=at) == [
        ("ok", ""),
        ("unlocked", ""),
        ("unlocked", ""),
    ]
    assert (ledger.sent_at(pid, "a"), ledger.sent_at(pid, "b"), ledger.sent_at(pid, "never")) == (at, None, None)
    assert ledger.begin_send_many(pid, [], fence=7) == []


# --- fencing ---------------------------------------------------------------------------------------


def test_a_stale_lease_holder_cannot_write(ledger: ShadowLedger, pid: str) -> None:
    ledger.sync_balances(pid, {"USDC": D("10")})
    assert ledger.lock(pid, "held", "USDC", D("1"), ttl_seconds=TTL)
    ledger.advance_fence(pid, 5)
    stale = 4
    writes: list[Callable[[], object]] = [
        lambda: ledger.sync_balances(pid, {"USDC": D("99")}, fence=stale),
        lambda: ledger.lock(pid, "new", "USDC", D("1"), ttl_seconds=TTL, fence=stale),
        lambda: ledger.commit(pid, "held", debit={"USDC": D("1")}, credit={"BTC": D("1")}, fence=stale),
        lambda: ledger.commit_many(
            pid, [Commit("held", {"USDC": D("1")}, {"BTC": D("1")})], fence=stale, memory='{"x": 2}'
        ),
        lambda: ledger.release(pid, "held", fence=stale),
        lambda: ledger.set_memory(pid, '{"x": 1}', fence=stale),
        lambda: ledger.advance_fence(pid, stale),
    ]
    for write in writes:
        with pytest.raises(LeaseLostError):
            write()
    # Nothing the stale instance tried is visible.
    assert ledger.balances(pid) == {"USDC": D("10")}
    assert [lock.key for lock in ledger.locks(pid)] == ["held"]
    assert not ledger.is_committed(pid, "held")
    assert ledger.get_memory(pid) is None
    # The current holder and unfenced callers write on.
    assert ledger.lock(pid, "new", "USDC", D("1"), ttl_seconds=TTL, fence=5)
    ledger.set_memory(pid, "{}", fence=5)
    ledger.release(pid, "new")
    ledger.advance_fence(pid, 5)


def test_a_write_with_a_newer_token_fences_off_older_ones(opener: Opener, pid: str) -> None:
    first, second = opener(), opener()
    first.sync_balances(pid, {"USDC": D("10")})
    first.advance_fence(pid, 1)
    second.set_memory(pid, "{}", fence=2)  # a new lease holder writes before announcing itself
    with pytest.raises(LeaseLostError, match="lost its lease"):
        first.lock(pid, "k", "USDC", D("1"), ttl_seconds=TTL, fence=1)
    assert first.locks(pid) == []


def test_fences_are_per_portfolio(ledger: ShadowLedger, pid: str) -> None:
    ledger.advance_fence(pid, 10)
    ledger.set_memory(f"{pid}-b", "{}", fence=1)
    with pytest.raises(ValueError):
        ledger.set_memory(pid, "{}", fence=-1)


# --- kill switch and planner memory -----------------------------------------------------------------


def test_halt_is_seen_by_every_instance_until_resumed(opener: Opener, pid: str) -> None:
    operator, daemon = opener(), opener()
    before = datetime.now(UTC)
    operator.halt(pid, "exchange incident", "alice")
    halt = daemon.halted(pid)
    assert halt is not None
    assert (halt.reason, halt.by) == ("exchange incident", "alice")
    assert halt.at.tzinfo is not None
    assert before - timedelta(seconds=5) <= halt.at <= datetime.now(UTC) + timedelta(seconds=5)
    operator.halt(pid, "still broken", "bob")
    assert daemon.halted(pid) is not None
    assert daemon.halted(pid).by == "bob"  # type: ignore[union-attr]
    daemon.resume(pid)
    daemon.resume(pid)
    assert operator.halted(pid) is None


def test_memory_round_trips_between_instances(opener: Opener, pid: str) -> None:
    first, second = opener(), opener()
    text = '{"hysteresis": {"BTC": "0.0125"}, "cooldown_until": "2026-11-27T10:00:00Z", "note": "ünï"}'
    first.set_memory(pid, text)
    assert second.get_memory(pid) == text
    second.set_memory(pid, "")
    assert first.get_memory(pid) == ""


def test_ping_answers_on_a_live_store(ledger: ShadowLedger) -> None:
    ledger.ping()


# --- opening ---------------------------------------------------------------------------------------


def test_default_ledger_is_sqlite_in_the_state_dir(state_dir: Path, unique_id: str) -> None:
    nested = state_dir / "deeper" / "still"
    ledger = open_ledger(None, nested)
    try:
        assert isinstance(ledger, SQLiteLedger)
        ledger.sync_balances(unique_id, {"BTC": D("1")})
    finally:
        ledger.close()
    assert (nested / "ledger.sqlite3").is_file()
    again = open_ledger(f"sqlite://{nested / 'ledger.sqlite3'}", state_dir)
    try:
        assert again.balances(unique_id) == {"BTC": D("1")}
    finally:
        again.close()


def test_unknown_ledger_scheme_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown scheme"):
        open_ledger("postgres://u:hunter2@db/x", tmp_path)
    with pytest.raises(InputError) as info:
        open_ledger("memcached://u:hunter2@db/x", tmp_path)
    assert "hunter2" not in str(info.value)
    with pytest.raises(InputError):
        open_ledger("sqlite://relative.db", tmp_path)
    with pytest.raises(InputError) as info:
        open_ledger("redis://u:hunter2@host:notaport/0", tmp_path)
    assert "hunter2" not in str(info.value)


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_redis_is_a_store_error_without_the_password(tmp_path: Path) -> None:
    port = _dead_port()
    ledger = open_ledger(f"redis://user:hunter2@127.0.0.1:{port}/0", tmp_path)
    with pytest.raises(StoreError) as info:
        ledger.ping()
    message = str(info.value)
    assert "hunter2" not in message
    assert f"redis://user@127.0.0.1:{port}/0" in message
    assert "\n" not in message
    assert info.value.exit_code == 3
    with pytest.raises(StoreError) as info:
        open_ledger(f"redis+cluster://:hunter2@127.0.0.1:{port}", tmp_path)
    assert "hunter2" not in str(info.value)
    assert "\n" not in str(info.value)


def test_cluster_keeps_a_portfolio_in_one_slot(redis_cluster_url: str, unique_id: str) -> None:  # noqa: F811
    ledger = open_ledger(redis_cluster_url, Path("/nonexistent"))
    assert isinstance(ledger, RedisLedger)
    try:
        client = redis.Redis(host="127.0.0.1", port=int(redis_cluster_url.rsplit(":", 1)[1]))
        slots = {client.cluster("KEYSLOT", key) for key in ledger.key_names(unique_id)}
        client.close()
        assert len(slots) == 1
    finally:
        ledger.close()
