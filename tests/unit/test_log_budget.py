"""``tideflow.logs.LogBudget``: a bounded number of lines per key and window, the rest counted."""

from __future__ import annotations

from tideflow.logs import LogBudget


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_per_window_then_the_next_line_says_how_many_were_held() -> None:
    clock = Clock()
    budget = LogBudget(burst=3, seconds=10.0, clock=clock)
    assert [budget.allow("not-json") for _ in range(3)] == [0, 0, 0]
    assert [budget.allow("not-json") for _ in range(500)] == [None] * 500
    assert budget.allow("bad-topic") == 0  # keys have budgets of their own
    clock.now = 9.9
    assert budget.allow("not-json") is None
    clock.now = 10.0  # a new window: the first line says what the last one held back
    assert budget.allow("not-json") == 501
    assert budget.allow("not-json") == 0


def test_keys_are_bounded_and_forgotten_together() -> None:
    budget = LogBudget(burst=1, seconds=10.0, max_keys=2, clock=Clock())
    assert budget.allow("a") == 0 and budget.allow("b") == 0
    assert budget.allow("a") is None
    assert budget.allow("c") == 0  # a third key: the two remembered are forgotten
    assert budget.allow("a") == 0
