"""The side-by-side primitives of the execution path: `side_by_side` and `Gather`."""

from __future__ import annotations

import threading
import time

import pytest

from rebalancer_cli.concurrency import Gather, side_by_side


def test_side_by_side_returns_results_in_order_and_raises_the_first_error_after_all_finished() -> None:
    finished: list[int] = []

    def job(i: int) -> int:
        time.sleep(0.01 * (3 - i))
        finished.append(i)
        if i == 1:
            raise KeyError(i)
        return i * 10

    assert side_by_side([lambda i=i: i * 10 for i in range(3)]) == [0, 10, 20]  # type: ignore[misc]
    with pytest.raises(KeyError):
        side_by_side([lambda i=i: job(i) for i in range(3)])  # type: ignore[misc]
    assert sorted(finished) == [0, 1, 2]  # nothing left running behind the caller


def test_gather_answers_callers_that_arrive_together_with_one_batch() -> None:
    batches: list[list[str]] = []

    def batch(items: list[str]) -> list[str]:
        batches.append(items)
        return [i.upper() for i in items]

    gather = Gather(batch, expected=3, wait=5.0)  # a long wait: the three arrive well within it
    assert sorted(side_by_side([lambda k=k: gather(k) for k in "abc"])) == ["A", "B", "C"]  # type: ignore[misc]
    assert len(batches) == 1 and sorted(batches[0]) == ["a", "b", "c"]
    assert gather("d") == "D" and batches[-1] == ["d"]  # a later call (a resend) is a batch of its own


def test_gather_does_not_wait_past_its_bound_for_a_caller_that_never_comes() -> None:
    gather = Gather(lambda items: [len(i) for i in items], expected=3, wait=0.05)
    began = time.monotonic()
    assert gather("xy") == 2
    assert 0.04 <= time.monotonic() - began < 2


def test_a_batch_error_is_raised_in_every_caller_of_that_batch_and_later_callers_get_a_new_batch() -> None:
    calls: list[list[int]] = []
    in_flight, release = threading.Event(), threading.Event()

    def batch(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            in_flight.set()
            release.wait(5)
            raise RuntimeError("store down")
        return items

    gather = Gather(batch, expected=2, wait=5.0)
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            gather(i)
        except RuntimeError as exc:
            errors.append(exc)

    first = [threading.Thread(target=call, args=(i,)) for i in (1, 2)]
    for t in first:
        t.start()
    assert in_flight.wait(5)
    late: list[int] = []
    latecomer = threading.Thread(target=lambda: late.append(gather(3)))  # arrives while the batch is on its way
    latecomer.start()
    time.sleep(0.05)
    release.set()
    for t in [*first, latecomer]:
        t.join(5)
    assert len(errors) == 2 and late == [3]
    assert sorted(calls[0]) == [1, 2] and calls[1] == [3]
