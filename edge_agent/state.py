"""In-memory state of runs and tasks, and the outbox records that report them.

The executor owns these objects while a run is live; the store persists them
and, in the same transaction, appends the record that ``to_record`` returns.
Records carry the whole state of one task or run (not a delta), so applying
one twice or out of order can be detected and never corrupts the receiver.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from tideflow.phases import RUN_DONE, TASK_DONE, RunPhase, TaskPhase
from tideflow.wire import MAX_RECORD_BYTES, RUN_RECORD, TASK_RECORD, RunRecord

log = logging.getLogger(__name__)

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
    # What of the finished attempt's span its outcome record does not hold (the
    # record's ``attemptSpan``, decision 0036): set and cleared as span_record is.
    span_ref: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # The final attempt's ``attemptSpan``, kept in the task's own row (task_runs.span_ref,
    # decision 0038): the span of a finished task's last attempt is derived from the
    # row, not filed.  Set by Store.save_task when it writes such an outcome.
    kept_span: dict[str, Any] | None = field(default=None, repr=False, compare=False)

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
_STDLIB_ENCODE = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def _encode(body: Any) -> str:
    """Compact JSON, keys sorted, ASCII only: orjson's, ~10x faster than the stdlib's
    (two per step, on the path of every chain step: bench/README.md, "Issue 15, tenth
    pass"), else the stdlib's.  The stdlib's where orjson refuses (a lone surrogate, an
    integer over 64 bits, a key that is no string) or where its text would not be ASCII
    (it does not escape): a body stays ASCII, as the store's byte counts expect.  The
    two differ only in how a float is spelt where both are valid (``1e-7``/``1e-07``)
    and in a NaN: orjson writes ``null``, which any JSON parser accepts."""
    try:
        raw = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # (orjson.JSONEncodeError is one)
        return _STDLIB_ENCODE(body)
    return raw.decode("ascii") if raw.isascii() else _STDLIB_ENCODE(body)


def record_json(body: dict[str, Any]) -> str:
    """A record's body as stored and sent: compact, keys sorted, at most ``MAX_RECORD_BYTES``.

    A body over the limit (a failure message quoting a 1 MB command line) is
    cut to fit by :func:`fit_record`: sent whole it would be refused by the
    link on every resend and block the outbox behind it.
    """
    text = _encode(body)
    if len(text) <= MAX_RECORD_BYTES:
        return text
    return _encode(fit_record(body)[0])


def fit_record(
    body: dict[str, Any], limit: int = MAX_RECORD_BYTES
) -> tuple[dict[str, Any], list[str]]:
    """``body`` as is if it encodes within ``limit`` bytes, else a copy cut to fit.

    The longest strings are cut first, each ending with a marker that says
    so; if that is not enough, the largest nested objects and lists are
    emptied (a task's ``outputs``, a span's ``attributes``).  A record with
    a ``message`` field says there which fields were cut, and a warning names
    them.  Types are kept, so the cut record is still a valid record: the
    cloud applies it once, as any other.  Returns the body and the cut paths.
    """
    text = _encode(body)
    if len(text) <= limit:
        return body, []
    size = len(text)
    fitted: dict[str, Any] = json.loads(text)  # a deep copy
    marker = f"...[cut by the agent: the record was {size} bytes, over the {limit}-byte limit]"
    target = max(limit - 1024, limit // 2)  # room for the note in ``message``
    cut: list[str] = []
    for _ in range(8):  # each round cuts enough by its estimate; escapes can make it short
        if len(text) <= target:
            break
        leaves = _leaves(fitted)
        strings = sorted(
            (leaf for leaf in leaves if isinstance(leaf[3], str) and len(leaf[3]) > 256),
            key=lambda leaf: -leaf[0],
        )
        if strings:
            chosen, cap = _water_line([leaf[0] for leaf in strings], len(text) - target, marker)
            for encoded, where, node, value in strings[:chosen]:
                node[where[-1]] = value[: int(len(value) * cap / encoded)] + marker
                cut.append(".".join(str(part) for part in where))
        else:
            nested = [leaf for leaf in leaves if isinstance(leaf[3], dict | list) and leaf[3]]
            if not nested:
                break
            encoded, where, node, value = max(nested, key=lambda leaf: leaf[0])
            node[where[-1]] = type(value)()
            cut.append(".".join(str(part) for part in where))
        text = _encode(fitted)
    if len(text) > target:  # (many small values: none of them is worth keeping)
        fitted = {key: _emptied(value) for key, value in fitted.items()}
        cut.append("*")
    cut = list(dict.fromkeys(cut))
    if "message" in fitted and "message" not in cut:
        paths = ", ".join(cut[:5])[:400]
        note = f"[the agent cut {paths} to fit the {limit}-byte record limit]"
        message = fitted["message"]
        fitted["message"] = f"{message} {note}" if isinstance(message, str) else note
    log.warning("an outbox record of %d bytes is over the %d-byte limit: cut %s",
                size, limit, ", ".join(repr(path) for path in cut[:10]))  # fmt: skip
    return fitted, cut


def _water_line(encoded: list[int], excess: int, marker: str) -> tuple[int, int]:
    """How many of the longest strings (``encoded``, longest first) to cut, and to
    how many bytes each, so that together they shed ``excess`` bytes."""
    total = 0
    for count, size in enumerate(encoded, 1):
        total += size
        cap = (total - excess) // count - len(marker)
        if count == len(encoded) or cap >= encoded[count]:
            return count, max(64, cap)
    return len(encoded), 64


def _emptied(value: Any) -> Any:
    """``value`` with its type but nothing in it (a record's last resort)."""
    if isinstance(value, str):
        return value[:256]  # (names and uids are shorter: kept whole)
    if isinstance(value, dict | list):
        return type(value)()
    return value


def _leaves(body: dict[str, Any]) -> list[tuple[int, tuple[Any, ...], Any, Any]]:
    """Every value below ``body`` as (encoded bytes, path, its container, value)."""
    found: list[tuple[int, tuple[Any, ...], Any, Any]] = []
    stack: list[tuple[Any, tuple[Any, ...]]] = [(body, ())]
    while stack:
        node, path = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            where = (*path, key)
            if isinstance(value, str | dict | list):
                found.append((len(_encode(value)), where, node, value))
            if isinstance(value, dict | list):
                stack.append((value, where))
    return found


__all__ = [
    "RUN_DONE",
    "RUN_PHASES",
    "RUN_RECORD",
    "TASK_DONE",
    "TASK_PHASES",
    "TASK_RECORD",
    "RunState",
    "TaskState",
    "fit_record",
    "record_json",
]
