"""`side_by_side`, the execution path's way of sending independent requests at once."""

from __future__ import annotations

import time

import pytest

from rebalancer_cli.concurrency import side_by_side


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
