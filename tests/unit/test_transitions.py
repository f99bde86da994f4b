"""The executor's state machine: one table, illegal moves raise.

Proves: every phase a task or run can be in is reachable from Pending through
the table; finished phases have no way out (a finished task never runs
again); a task stopped by the agent can only run again, fail by policy or be
cancelled; and ``task_transition`` refuses anything not in the table.
"""

from __future__ import annotations

import pytest

from edge_agent.executor import (
    RUN_TRANSITIONS,
    TASK_TRANSITIONS,
    IllegalTransition,
    RunEvent,
    TaskEvent,
    run_transition,
    task_transition,
)
from edge_agent.state import RunState, TaskState
from tideflow.phases import RUN_DONE, TASK_DONE, RunPhase, TaskPhase


def reachable(table: dict[tuple[str, str], str], start: str) -> set[str]:
    seen, frontier = {start}, [start]
    while frontier:
        here = frontier.pop()
        for (source, _event), target in table.items():
            if source == here and target not in seen:
                seen.add(target)
                frontier.append(target)
    return seen


def test_every_task_phase_is_reachable_and_finished_phases_are_final() -> None:
    assert reachable(TASK_TRANSITIONS, TaskPhase.PENDING) == set(TaskPhase)  # type: ignore[arg-type]
    for source, _event in TASK_TRANSITIONS:
        assert source not in TASK_DONE, f"{source} is finished but has a way out"


def test_every_run_phase_is_reachable_and_finished_phases_are_final() -> None:
    assert reachable(RUN_TRANSITIONS, RunPhase.PENDING) == set(RunPhase)  # type: ignore[arg-type]
    for source, _event in RUN_TRANSITIONS:
        assert source not in RUN_DONE


def test_an_interrupted_task_can_only_run_again_fail_by_policy_or_be_cancelled() -> None:
    ways_out = {
        target
        for (source, _event), target in TASK_TRANSITIONS.items()
        if source == TaskPhase.INTERRUPTED
    }
    assert ways_out == {
        TaskPhase.RUNNING,
        TaskPhase.INTERRUPTED,
        TaskPhase.FAILED,
        TaskPhase.CANCELLED,
    }


def test_an_interruption_is_never_a_retry() -> None:
    assert TASK_TRANSITIONS[(TaskPhase.RUNNING, TaskEvent.INTERRUPT)] == TaskPhase.INTERRUPTED
    assert (TaskPhase.INTERRUPTED, TaskEvent.RETRY) not in TASK_TRANSITIONS


@pytest.mark.parametrize(
    ("phase", "event"),
    [
        ("Succeeded", TaskEvent.START),
        ("Failed", TaskEvent.RETRY),
        ("Skipped", TaskEvent.CANCEL),
        ("Pending", TaskEvent.SUCCEED),
        ("Retrying", TaskEvent.SUCCEED),
        ("Cancelled", TaskEvent.INTERRUPT),
    ],
)
def test_illegal_task_moves_raise_and_change_nothing(phase: str, event: TaskEvent) -> None:
    state = TaskState("r", "t", phase=phase, attempt=2)
    with pytest.raises(IllegalTransition, match=f"task t: {event} not allowed from {phase}"):
        task_transition(state, event, attempt=9)
    assert (state.phase, state.attempt) == (phase, 2)


def test_a_legal_move_sets_the_phase_and_the_changes() -> None:
    state = TaskState("r", "t", phase="Running", attempt=1)
    task_transition(state, TaskEvent.INTERRUPT, interruptions=1, message="stopped")
    assert (state.phase, state.interruptions, state.message) == ("Interrupted", 1, "stopped")


def test_a_finished_run_cannot_start_again() -> None:
    run = RunState("r", "u", 1, "ns", "n", "{}", phase="Succeeded")
    with pytest.raises(IllegalTransition):
        run_transition(run, RunEvent.START)
    assert run.phase == "Succeeded"
