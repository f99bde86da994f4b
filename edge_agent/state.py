"""In-memory state of runs and tasks, and the outbox records that report them.

The executor owns these objects while a run is live; the store persists them
and, in the same transaction, appends the record that ``to_record`` returns.
Records carry the whole state of one task or run (not a delta), so applying
one twice or out of order can be detected and never corrupts the receiver.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tideflow.phases import RUN_DONE, TASK_DONE, RunPhase, TaskPhase
from tideflow.wire import RUN_RECORD, TASK_RECORD, RunRecord

TASK_PHASES: tuple[str, ...] = tuple(TaskPhase)
RUN_PHASES: tuple[str, ...] = tuple(RunPhase)


@dataclass
class RunState:
    run_id: str
    uid: str
    generation: int
    namespace: str
    name: str
    spec_json: str
    phase: str = RunPhase.PENDING
    reason: str | None = None
    message: str | None = None
    suspended: bool = False
    cancel_requested: bool = False
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    deadline_at: float | None = None
    traceparent: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    # Set on a run a CronWorkflow fired: {uid, name, generation, scheduledTime}.
    cron: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.phase in RUN_DONE

    def to_record(self) -> dict[str, Any]:
        """The run's record as the wire defines it (``tideflow.wire.RunRecord``)."""
        record = RunRecord.model_construct(
            uid=self.uid,
            generation=self.generation,
            namespace=self.namespace,
            name=self.name,
            phase=RunPhase(self.phase),
            reason=self.reason,
            message=self.message,
            suspended=self.suspended,
            started_at=self.started_at,
            finished_at=self.finished_at,
        ).model_dump(by_alias=True, mode="json")
        record.pop("cron", None)
        if self.cron is not None:  # a versioned field: left out when unset
            record["cron"] = self.cron
        return record


@dataclass
class TaskState:
    run_id: str
    name: str
    compensation: bool = False
    phase: str = TaskPhase.PENDING
    attempt: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    message: str | None = None
    next_attempt_at: float | None = None
    pid: int | None = None
    pid_start: str | None = None
    span_id: str | None = None
    # Consecutive attempts cut short by the agent stopping; reset by any outcome.
    interruptions: int = 0
    # Attempts that failed (what retry.limit counts; interruptions never do).
    failures: int = 0
    # The finished attempt's span record, to be written with the outcome's
    # transition (Store.save_task), then cleared; never stored in task_runs.
    span_record: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.phase in TASK_DONE

    def to_record(self, run: RunState) -> dict[str, Any]:
        """The task's record as the wire defines it (``tideflow.wire.TaskRecord``).

        Built as a plain dict: two are made per step, and going through the
        pydantic model cost more than the rest of the step's bookkeeping.
        tests/unit/test_records.py keeps it equal to the model's dump.
        """
        return {
            "uid": run.uid,
            "generation": run.generation,
            "namespace": run.namespace,
            "name": run.name,
            "task": self.name,
            "compensation": self.compensation,
            "phase": TaskPhase(self.phase).value,
            "attempt": self.attempt,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "exitCode": self.exit_code,
            "outputs": dict(self.outputs),
            "message": self.message,
        }


# json.dumps with these arguments builds a new encoder per call; this is that encoder.
_ENCODE = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def record_json(body: dict[str, Any]) -> str:
    """A record's body as stored and sent: compact, keys sorted."""
    return _ENCODE(body)


__all__ = [
    "RUN_DONE",
    "RUN_PHASES",
    "RUN_RECORD",
    "TASK_DONE",
    "TASK_PHASES",
    "TASK_RECORD",
    "RunState",
    "TaskState",
    "record_json",
]
