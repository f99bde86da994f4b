"""The phases of a run and of its tasks: one vocabulary for agent, wire and operator.

Both sides speak of the same lifecycle (the agent moves tasks through it, the
operator mirrors it into a Workflow's ``.status``), so the names and the
"is it finished" predicates live here once.  They are ``StrEnum``s: a phase
compares equal to its string and serialises as one, so stored rows, wire
records and status fields stay plain strings.

``Interrupted`` is a task whose attempt was cut short because the *agent*
stopped (signal, crash, reboot, full disk), not because the task failed: it
runs again on restart without using its retry budget (see the executor).
"""

from __future__ import annotations

from enum import StrEnum


class TaskPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    RETRYING = "Retrying"
    INTERRUPTED = "Interrupted"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"
    CANCELLED = "Cancelled"

    @property
    def done(self) -> bool:
        return self in TASK_DONE


class RunPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def done(self) -> bool:
        return self in RUN_DONE


TASK_DONE: frozenset[str] = frozenset(
    {TaskPhase.SUCCEEDED, TaskPhase.FAILED, TaskPhase.SKIPPED, TaskPhase.CANCELLED}
)
RUN_DONE: frozenset[str] = frozenset({RunPhase.SUCCEEDED, RunPhase.FAILED, RunPhase.CANCELLED})
# Tasks with an attempt under way or about to be made again.
TASK_LIVE: frozenset[str] = frozenset(
    {TaskPhase.RUNNING, TaskPhase.RETRYING, TaskPhase.INTERRUPTED}
)

__all__ = ["RUN_DONE", "TASK_DONE", "TASK_LIVE", "RunPhase", "TaskPhase"]
