"""Turn each site's stream of outbox records into per-workflow views, exactly once.

Why this module exists: MQTT delivers the ``events`` channel at least once and
may reorder or drop batches across reconnects, while a workflow's ``.status``
must reflect every record once and in the order the site wrote them.  Each
site numbers its outbox records (``seq``), so the cloud keeps, per site, the
contiguous high-water mark ``applied_through`` and:

* ignores duplicates (``seq <= applied_through`` or already held back);
* holds back records that arrive beyond a gap (a bounded buffer; overflow is
  dropped and counted, since the site resends everything it has not had
  acknowledged) and asks for a resend from ``applied_through + 1``;
* applies contiguous runs, including held records that become contiguous;
* skips (counts, logs, and still consumes) a record whose body is malformed:
  it can never become valid, and waiting for it would wedge the site forever.

What a site may change (each refusal is a :class:`Discard` reason, counted in
:attr:`Applier.discarded` and logged once per batch, and per site and reason at
most once per :data:`DISCARD_LOG_SECONDS`):

* only runs assigned to it.  A view exists only once the operator declared the
  assignment (:meth:`Applier.expect`, or :meth:`Applier.load` at start-up), and
  its ``site`` is the assignment's, never a record's claim: a record for a run
  assigned elsewhere is ``forged``, one for a Workflow the cloud does not know
  (deleted, never assigned, another namespace) is ``unknown``, one for another
  uid or an older generation is ``stale``;
* only its run's tasks: a task record naming a task the spec does not have is
  ``unknown`` (a view not told the spec's names, rebuilt from a status or a fired
  run's, takes new names up to :data:`MAX_RUN_TASKS`);
* a finished run is final: a run record that would move it to another phase is
  ``final`` (no Succeeded -> Running, no Failed -> Succeeded);
* a run no Workflow names is taken only as a fire of a schedule placed on the
  site (``accept_cron``, :mod:`.cron`); one naming such a schedule at a time it
  never produces, or outside the clock-skew window, is ``off_schedule``; one
  whose name another run holds is ``stale`` and handed to the operator, which
  says so on the CronWorkflow (:meth:`Applier.refuse_run`, decision 0048);
* at most ``window`` seqs ahead of the mark are held; a record beyond that is
  dropped (``beyond_window``), logged, and does not count as a gap, so a forged
  seq of 1,000,000 is neither kept nor allowed to take the real record's place
  later.  The first record to arrive for a seq wins; later copies are
  duplicates.

Every discarded record is still consumed, so it advances the ack exactly like
an applied one: each record ends applied or deliberately discarded, and no
record can hold a site's acknowledgement back for ever.  Nothing is kept for a
discarded record (no view, no dirty mark), so memory stays bounded whatever a
site sends.

Epochs: a site's numbering belongs to its database, which has an identity
(``epoch``, sent with every batch).  A batch of a new epoch starts the site's
sequence again (mark 0, nothing held) and the result reports an
:class:`EpochChange` with the site's unfinished runs, which the new database
does not hold: the operator sends them again.  Batches of a retired epoch are
discarded without consuming anything.  A view remembers the epoch of its
``synced_seq``, so "already reflected" compares seqs of the same database only.
After an operator restart nothing says which epoch came before; the first one
seen is adopted, and unfinished runs last synced under another epoch are
reported lost the same way.

The result of applying is a :class:`WorkflowView` per ``(namespace, name)``,
which renders to the Workflow ``.status`` (:meth:`WorkflowView.to_status`) and
can be rebuilt from it (:meth:`WorkflowView.from_status`).  Nothing here does
I/O: the operator feeds decoded payloads in, patches statuses, and publishes
acks.  The only durable state is per-site ``applied_through``; the operator
rebuilds it from the site's own claim (a heartbeat's ``lastAckedSeq``),
bounded by the gap the site's records show (:meth:`Applier.accept_claim`),
and the views with :meth:`Applier.load`.

Why one module of ~1,150 lines: the per-site rules (marks, held records,
windows, epochs, discards) and the views they change are one state machine;
its invariants — each record applied or discarded once, a view's
``synced_seq`` read with its epoch, ``to_status``/``from_status`` a round trip
— hold across both halves and are tested together (tests/unit/test_applier.py,
property tests included).  Nothing in it does I/O, so its size costs reading,
not coupling.

Acks and persistence: :attr:`ApplyResult.ack_through` covers only records that
were actually applied to in-memory views.  An operator that must never ack a
record whose effect is not yet in Kubernetes calls :meth:`Applier.mark_persisted`
after each successful status patch and publishes :meth:`Applier.ackable_through`
instead, which stays below the first applied-but-unpersisted record.

Not thread-safe: use it from one thread (kopf's event loop).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

from tideflow.phases import RUN_DONE, TaskPhase
from tideflow.spec import MAX_SPEC_BYTES
from tideflow.tracing import attempt_span_of
from tideflow.wire import (
    LOG_RECORD,
    RUN_RECORD,
    SCHEDULE_RECORD,
    SPAN_RECORD,
    TASK_RECORD,
    AttemptSpanRef,
    EventRecord,
    EventsPayload,
    RunRecord,
    ScheduleRecord,
    shown,
)
from tideflow.wire_events import CheckedBatch, CheckedRecord, check_record

log = logging.getLogger(__name__)

WorkflowKey = tuple[str, str]
"""``(namespace, name)`` of a Workflow object."""

TASK_PHASES: tuple[str, ...] = tuple(TaskPhase)

DEFAULT_MAX_HELD = 10_000
DEFAULT_WINDOW = 20_000  # seqs beyond the mark that may be held (agents send <= 16,000 ahead)
RETIRED_EPOCHS = 16  # per site, remembered to discard late batches of replaced databases
DEFAULT_MAX_SPANS = 100_000
# Span ids remembered so a span sent twice (inside its outcome and as a record) is kept once.
RECENT_SPAN_IDS = 10_000
DEFAULT_MAX_LOG_CHARS = 4096
DEFAULT_MAX_LOG_TAILS = 512
DEFAULT_MAX_TOMBSTONES = 10_000
DEFAULT_STATUS_MAX_TASKS = 500
# More tasks than any spec can hold (MAX_SPEC_BYTES of the shortest tasks,
# {"name":"a","script":""}): a view whose task names are not known takes new names
# up to this many.  A site named any task it liked, and each was kept for ever.
MAX_RUN_TASKS = MAX_SPEC_BYTES // len('{"name":"a","script":""},')
DEFAULT_STATUS_MAX_BYTES = 192 * 1024
STATUS_MESSAGE_CHARS = 4096
# A run's reason is a word (TaskFailed, DeadlineExceeded); a site may send anything,
# and an unclipped one of 300 KB took the status's whole room from its tasks.
STATUS_REASON_CHARS = 256
TASK_MESSAGE_CHARS = 512
OUTPUT_VALUE_CHARS = 512
OUTPUT_TOTAL_CHARS = 2048
STATUS_LOG_CHARS = 1024  # per stream of a listed task, when the status has room left
DISCARD_LOG_SECONDS = 10.0  # one line per site and discard reason at most this often
MAX_DISCARD_LOGGED = 100_000  # (site, reason) pairs remembered for that

# Which tasks a truncated status lists first.  Live tasks come first so that a
# view rebuilt from a truncated status can infer what an unlisted task was
# (see ``WorkflowView._take_residual``); then the interesting terminal ones.
_LIST_PRIORITY = {
    p: i
    for i, p in enumerate(
        (
            "Running",
            "Retrying",
            "Interrupted",
            "Failed",
            "Cancelled",
            "Succeeded",
            "Skipped",
            "Pending",
        )
    )
}
# Whose log tails a status with little room left keeps first.
_LOG_PRIORITY = {p: i for i, p in enumerate(("Failed", "Running", "Retrying", "Interrupted"))}
# An unlisted task that reports anew was still live; see WorkflowView._take_residual.
_LIVE_FIRST = ("Running", "Retrying", "Interrupted")


class Discard(StrEnum):
    """Why a record was not applied: a fixed set, used as a metric label."""

    MALFORMED = "malformed"  # the body does not validate (consumed)
    STALE = "stale"  # another uid, an older generation, deleted, already reflected (consumed)
    FORGED = "forged"  # a run assigned to another site (consumed)
    UNKNOWN = "unknown"  # no such Workflow assigned, or no such task in it (consumed)
    FINAL = "final"  # would change a finished run's phase (consumed)
    BEYOND_WINDOW = "beyond_window"  # too far ahead of the mark (dropped, not consumed)
    OVERFLOW = "overflow"  # the hold-back buffer was full (dropped; the site resends)
    RETIRED_EPOCH = "retired_epoch"  # from a database the site has replaced (not consumed)
    # A fired run at a time its schedule never produces, or outside the window (consumed).
    OFF_SCHEDULE = "off_schedule"


class FiredRunRefused(ValueError):
    """``accept_cron`` refusing a run that names a schedule placed on its site: the
    message names the field and why (see :meth:`tideflow_operator.cron.CronPlan.accepts`)."""


_LOG_LEVEL = {
    Discard.FORGED: logging.WARNING,
    Discard.FINAL: logging.WARNING,
    Discard.BEYOND_WINDOW: logging.WARNING,
    Discard.UNKNOWN: logging.INFO,
    # Two agents on one site name, or a database brought back: someone must look.
    Discard.RETIRED_EPOCH: logging.WARNING,
    Discard.OFF_SCHEDULE: logging.WARNING,
    Discard.MALFORMED: logging.WARNING,
}


# ----------------------------------------------------------------- time format
def rfc3339(ts: float | None) -> str | None:
    """Epoch seconds -> ``2024-05-01T12:00:00.123Z`` (millisecond precision).

    None for a time no date has (1e300, -1e20, Infinity: a site's record may
    say anything): raising here made the Workflow's status unwritable and held
    the site's ack below that record for ever.
    """
    if ts is None or not math.isfinite(ts):
        return None
    try:
        millis = round(ts * 1000)
        secs, ms = divmod(millis, 1000)
        # isoformat, not strftime: %Y does not pad a year before 1000 ("68-01-01"),
        # which is no date-time the API server takes.
        when = datetime.fromtimestamp(secs, tz=UTC).isoformat(timespec="seconds")[:19]
        return f"{when}.{ms:03d}Z"
    except (OverflowError, OSError, ValueError):
        return None


def parse_rfc3339(text: Any) -> float | None:
    """RFC 3339 string (or a number, or None) -> epoch seconds, ms precision.

    None for text that is no time Python has.  Statuses are read back with it
    (restoring every assigned run at start-up), and the API server takes in a
    date-time field what ``fromisoformat`` refuses: RFC 3339's lower-case ``t``
    and ``z`` (read here), year 0000.  Raising made one such status, written by
    a person or another tool, stop every operator's start-up.
    """
    if text is None or text == "":
        return None
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    try:
        dt = datetime.fromisoformat(str(text).upper())
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return round(dt.timestamp() * 1000) / 1000
    except (ValueError, OverflowError, OSError):
        return None


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def _status_outputs(outputs: Mapping[str, str]) -> tuple[dict[str, str], bool]:
    """``outputs`` as a task's status entry holds them, and whether any were cut:
    each value to ``OUTPUT_VALUE_CHARS``, all of them to ``OUTPUT_TOTAL_CHARS``.
    A key longer than a value may be (an agent's are at most 128 characters) is
    left out.  Clipping what was clipped changes nothing."""
    kept: dict[str, str] = {}
    budget = OUTPUT_TOTAL_CHARS
    clipped = False
    for key, value in outputs.items():
        if budget <= 0:
            return kept, True
        if len(key) > OUTPUT_VALUE_CHARS:
            clipped = True
            continue
        short = _clip(value, min(OUTPUT_VALUE_CHARS, budget)) or ""
        clipped = clipped or short != value
        kept[key] = short
        budget -= len(key) + len(short)
    return kept, clipped


def _clip(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: max(0, limit - 1)] + "…"


# ---------------------------------------------------------------------- views
@dataclass(slots=True)
class TaskView:
    """The last reported state of one task (main or compensation) of a run."""

    name: str
    compensation: bool = False
    phase: str = "Pending"
    attempt: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    message: str | None = None
    # Rebuilt from a status whose outputs were clipped: they are incomplete.
    outputs_truncated: bool = False

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> TaskView:
        """From a checked task record body (``tideflow.wire_events``: field names as keys).

        The outputs are kept as the status shows them (clipped): a record may
        carry up to ``MAX_RECORD_BYTES`` of them, and a view of 5,000 tasks held
        every byte, where the status (all that survives a restart) keeps ~2 KiB.
        """
        outputs, clipped = _status_outputs(rec["outputs"])
        return cls(
            rec["task"],
            rec["compensation"],
            rec["phase"],
            rec["attempt"],
            rec["started_at"],
            rec["finished_at"],
            rec["exit_code"],
            outputs,
            rec["message"],
            clipped,
        )

    def to_status(self) -> dict[str, Any]:
        """Compact entry for ``.status.tasks``: None/empty omitted, long text clipped."""
        out: dict[str, Any] = {"name": self.name, "phase": self.phase, "attempt": self.attempt}
        if self.compensation:
            out["compensation"] = True
        if self.started_at is not None:
            out["startedAt"] = rfc3339(self.started_at)
        if self.finished_at is not None:
            out["finishedAt"] = rfc3339(self.finished_at)
        if self.exit_code is not None:
            out["exitCode"] = self.exit_code
        if self.outputs:
            outputs, clipped = _status_outputs(self.outputs)
            out["outputs"] = outputs
            if clipped or self.outputs_truncated:
                out["outputsTruncated"] = True
        if self.message:
            out["message"] = _clip(self.message, TASK_MESSAGE_CHARS)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskView:
        return cls(
            name=str(data["name"]),
            compensation=bool(data.get("compensation", False)),
            phase=str(data.get("phase", "Pending")),
            attempt=int(data.get("attempt", 0)),
            started_at=parse_rfc3339(data.get("startedAt")),
            finished_at=parse_rfc3339(data.get("finishedAt")),
            exit_code=data.get("exitCode"),
            outputs={str(k): str(v) for k, v in (data.get("outputs") or {}).items()},
            message=data.get("message"),
            outputs_truncated=bool(data.get("outputsTruncated", False)),
        )


@dataclass(slots=True)
class LogTail:
    """The last ``max_log_chars`` of one stream of one task's latest attempt."""

    attempt: int
    text: str


@dataclass
class WorkflowView:
    """What the cloud knows about one Workflow's run, built from its site's records.

    ``tasks`` holds every individually known task in display order (spec order
    when :meth:`Applier.expect` was called).  A view rebuilt from a truncated
    status also has ``residual``: how many tasks, by (compensation, phase),
    are known only as counts.  Counts and progress always include them.
    """

    namespace: str
    name: str
    uid: str
    generation: int
    site: str | None = None
    phase: str = "Pending"
    reason: str | None = None
    message: str | None = None
    suspended: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    tasks: dict[str, TaskView] = field(default_factory=dict)
    residual: Counter[tuple[bool, str]] = field(default_factory=Counter)
    logs: OrderedDict[tuple[str, str], LogTail] = field(default_factory=OrderedDict)
    synced_seq: int = 0
    # The site database (epoch) whose numbering synced_seq belongs to.
    synced_epoch: str | None = None
    # Set by Applier.expect/load: the Kubernetes object's identity is authoritative,
    # so records of another uid are stale rather than a re-created object.
    pinned: bool = field(default=False, compare=False)
    # The spec's task names (main and onFailure), when Applier.expect was told them:
    # a record naming another task is none of this run's.  None: not known (a view
    # rebuilt from a status, a fired run's), new names taken up to MAX_RUN_TASKS.
    known_tasks: frozenset[str] | None = field(default=None, compare=False)

    @property
    def key(self) -> WorkflowKey:
        return (self.namespace, self.name)

    # -- counts ---------------------------------------------------------------
    def _counts(self, compensation: bool) -> dict[str, int]:
        counts = dict.fromkeys(TASK_PHASES, 0)
        for task in self.tasks.values():
            if task.compensation == compensation:
                counts[task.phase] = counts.get(task.phase, 0) + 1
        for (comp, phase), n in self.residual.items():
            if comp == compensation and n > 0:
                counts[phase] = counts.get(phase, 0) + n
        return counts

    def task_counts(self) -> dict[str, int]:
        """Main tasks by phase, every phase present (zeros too); exact."""
        return self._counts(False)

    def compensation_counts(self) -> dict[str, int]:
        """Compensation (onFailure) tasks by phase, every phase present."""
        return self._counts(True)

    @property
    def has_compensation(self) -> bool:
        return any(t.compensation for t in self.tasks.values()) or any(
            comp and n > 0 for (comp, _), n in self.residual.items()
        )

    @property
    def succeeded(self) -> int:
        return self.task_counts()["Succeeded"]

    @property
    def total(self) -> int:
        return sum(self.task_counts().values())

    @property
    def progress(self) -> str:
        counts = self.task_counts()
        return f"{counts['Succeeded']}/{sum(counts.values())}"

    @property
    def done(self) -> bool:
        return self.phase in RUN_DONE

    def log_tail(self, task: str) -> dict[str, str]:
        """``{stream: text}`` of the latest reported attempt of ``task``."""
        return {stream: tail.text for (name, stream), tail in self.logs.items() if name == task}

    # -- applying ---------------------------------------------------------------
    # Each takes a checked record body (tideflow.wire_events: field names as keys).
    def apply_run(self, rec: Mapping[str, Any]) -> bool:
        before = (self.phase, self.reason, self.message, self.suspended)
        before_times = (self.started_at, self.finished_at)
        self.phase, self.reason, self.message = rec["phase"], rec["reason"], rec["message"]
        self.suspended = rec["suspended"]
        self.started_at, self.finished_at = rec["started_at"], rec["finished_at"]
        return before != (self.phase, self.reason, self.message, self.suspended) or (
            before_times != (self.started_at, self.finished_at)
        )

    def takes_task(self, name: str) -> bool:
        """Whether a record about task ``name`` may change this view (see known_tasks)."""
        if name in self.tasks:
            return True
        if self.known_tasks is not None:
            return name in self.known_tasks
        return len(self.tasks) < MAX_RUN_TASKS

    def apply_task(self, rec: Mapping[str, Any]) -> bool:
        new = TaskView.from_record(rec)
        name = new.name
        old = self.tasks.get(name)
        if old is None:
            self._take_residual(new.compensation, new.phase)
        elif old == new:
            return False
        else:
            new.name = old.name  # one copy of the name per task, not one per record
        self.tasks[name] = new
        return True

    def apply_log(self, rec: Mapping[str, Any], max_chars: int, max_tails: int) -> bool:
        key = (rec["task"], rec["stream"])
        tail: str = rec["tail"]
        attempt: int = rec["attempt"]
        text = tail[-max_chars:] if max_chars > 0 else ""
        old = self.logs.get(key)
        if old is not None and old.attempt > attempt:
            return False
        if old is not None and old.attempt == attempt and old.text == text:
            return False
        self.logs[key] = LogTail(attempt, text)
        self.logs.move_to_end(key)
        while len(self.logs) > max_tails:
            self.logs.popitem(last=False)
        return True

    def _take_residual(self, compensation: bool, new_phase: str) -> None:
        """A task not individually known now reports: take it out of the residual counts.

        Only a view rebuilt from a truncated status has residuals.  Its
        truncation listed every Running/Retrying task first, records already
        reflected in it are skipped, and a finished task reports nothing new,
        so the task was Pending -- unless more tasks were live than the status
        could list, or it merely repeats its state.  Try the phases in that
        order.  A Succeeded or Failed record is no repeat: a task may go there
        straight from Pending (an attempt that ended within 20 ms reports its
        outcome alone, decision 0042; a template without a value fails one
        before it starts), and taking it from the finished counts instead
        would leave a Pending count that nothing ever takes back.
        """
        pool = [(c, p) for (c, p), n in self.residual.items() if c == compensation and n > 0]
        if not pool:
            return
        phases = {p for _, p in pool}
        for phase in (*_LIVE_FIRST, "Pending", new_phase, *sorted(phases)):
            if phase in phases:
                self.residual[(compensation, phase)] -= 1
                if self.residual[(compensation, phase)] <= 0:
                    del self.residual[(compensation, phase)]
                return

    def expect_tasks(self, names: Sequence[str], compensation: Sequence[str]) -> None:
        """Add the spec's tasks (as Pending) that have not reported yet, in spec order.

        The names become :attr:`known_tasks` (none given: not known; a spec has one).
        """
        self.known_tasks = frozenset((*names, *compensation)) if names else None
        has_residual = {c for (c, _), n in self.residual.items() if n > 0}
        reordered: dict[str, TaskView] = {}
        for flag, group in ((False, names), (True, compensation)):
            for task_name in group:
                if task_name in reordered:
                    continue
                known = self.tasks.get(task_name)
                if known is not None:
                    reordered[task_name] = known
                elif flag not in has_residual:
                    reordered[task_name] = TaskView(task_name, compensation=flag)
        for task_name, task in self.tasks.items():
            reordered.setdefault(task_name, task)
        self.tasks = reordered

    # -- status ---------------------------------------------------------------
    def to_status(
        self,
        max_tasks: int = DEFAULT_STATUS_MAX_TASKS,
        max_bytes: int = DEFAULT_STATUS_MAX_BYTES,
    ) -> dict[str, Any]:
        """The Workflow ``.status`` content, camelCase, safe as a JSON merge patch.

        Nullable scalars are always present (None clears them in a merge
        patch); ``taskCounts`` always has every phase.  ``tasks`` lists at most
        ``max_tasks`` entries and at most about ``max_bytes`` of JSON; when it
        is capped, ``tasksTruncated`` is true and the counts stay exact.
        """
        counts = self.task_counts()
        status: dict[str, Any] = {
            "phase": self.phase,
            "site": self.site,
            "observedGeneration": self.generation,
            "progress": f"{counts['Succeeded']}/{sum(counts.values())}",
            "reason": _clip(self.reason, STATUS_REASON_CHARS),
            "message": _clip(self.message, STATUS_MESSAGE_CHARS),
            "suspended": self.suspended,
            "startedAt": rfc3339(self.started_at),
            "finishedAt": rfc3339(self.finished_at),
            "taskCounts": counts,
            "compensationCounts": self.compensation_counts() if self.has_compensation else None,
            "syncedSeq": self.synced_seq,
            "syncedEpoch": self.synced_epoch,
        }
        fixed = len(json.dumps(status, separators=(",", ":")))
        budget = max(0, max_bytes - fixed)
        tasks, truncated = self._status_tasks(max_tasks, budget)
        self._attach_log_tails(tasks, budget - sum(_json_size(t) + 1 for t in tasks))
        status["tasks"] = tasks
        status["tasksTruncated"] = truncated or bool(+self.residual)
        return status

    def _status_tasks(self, max_tasks: int, budget: int) -> tuple[list[dict[str, Any]], bool]:
        entries = list(self.tasks.values())
        rendered = [t.to_status() for t in entries]
        sizes = [len(json.dumps(r, separators=(",", ":"))) + 1 for r in rendered]
        if len(entries) <= max_tasks and sum(sizes) <= budget:
            return rendered, False

        # Pick by priority (live first, then most recent activity), show in order.
        def rank(i: int) -> tuple[int, float]:
            t = entries[i]
            recent = t.finished_at or t.started_at or 0.0
            return (_LIST_PRIORITY.get(t.phase, len(_LIST_PRIORITY)), -recent)

        chosen: list[int] = []
        used = 0
        for i in sorted(range(len(entries)), key=rank):
            if len(chosen) >= max_tasks or used + sizes[i] > budget:
                break
            chosen.append(i)
            used += sizes[i]
        return [rendered[i] for i in sorted(chosen)], True

    def _attach_log_tails(self, listed: list[dict[str, Any]], budget: int) -> None:
        """Each listed task's latest log tails, in the room the task list left.

        Tails never crowd a task out of the list: they go last, failed and live
        tasks first, each stream clipped to its last ``STATUS_LOG_CHARS``.
        """
        if not self.logs:
            return
        by_task: dict[str, dict[str, str]] = {}
        for (task, stream), tail in self.logs.items():
            if tail.text:
                by_task.setdefault(task, {})[stream] = tail.text[-STATUS_LOG_CHARS:]
        entries = [entry for entry in listed if entry["name"] in by_task]
        entries.sort(key=lambda e: _LOG_PRIORITY.get(e["phase"], len(_LOG_PRIORITY)))
        for entry in entries:
            tails = by_task[entry["name"]]
            cost = _json_size(tails) + len(',"logs":')
            if cost > budget:
                continue
            entry["logs"] = tails
            budget -= cost

    @classmethod
    def from_status(
        cls,
        status: Mapping[str, Any],
        *,
        namespace: str,
        name: str,
        uid: str,
        generation: int | None = None,
    ) -> WorkflowView:
        """Rebuild a view from a ``.status`` written by :meth:`to_status`.

        Tasks omitted by truncation are kept as residual counts (by phase),
        so counts and progress stay exact.  Log tails come back as clipped in the status.
        ``generation`` defaults to the status's ``observedGeneration``.
        """
        gen = status.get("observedGeneration") if generation is None else generation
        view = cls(
            namespace=namespace,
            name=name,
            uid=uid,
            generation=int(gen or 1),
            site=status.get("site"),
            phase=str(status.get("phase") or "Pending"),
            reason=status.get("reason"),
            message=status.get("message"),
            suspended=bool(status.get("suspended", False)),
            started_at=parse_rfc3339(status.get("startedAt")),
            finished_at=parse_rfc3339(status.get("finishedAt")),
            synced_seq=int(status.get("syncedSeq") or 0),
            synced_epoch=status.get("syncedEpoch") or None,
        )
        for entry in status.get("tasks") or []:
            task = TaskView.from_dict(entry)
            view.tasks[task.name] = task
            tails = entry.get("logs")
            if isinstance(tails, Mapping):
                for stream, text in tails.items():
                    view.logs[(task.name, str(stream))] = LogTail(task.attempt, str(text))
        for flag, counts in (
            (False, status.get("taskCounts") or {}),
            (True, status.get("compensationCounts") or {}),
        ):
            listed = Counter(t.phase for t in view.tasks.values() if t.compensation == flag)
            for phase, n in counts.items():
                extra = int(n) - listed.get(phase, 0)
                if extra > 0:
                    view.residual[(flag, str(phase))] = extra
        return view


# -------------------------------------------------------------------- results
class PhaseChange(NamedTuple):
    """A workflow's phase changed (worth a Kubernetes Event)."""

    key: WorkflowKey
    old: str
    new: str
    reason: str | None
    message: str | None


class EpochChange(NamedTuple):
    """A site's records now come from another database (see the module doc).

    ``old`` is None when the previous epoch is not known (operator restart).
    ``lost``: the site's unfinished runs, which the new database does not hold.
    """

    site: str
    old: str | None
    new: str
    lost: list[WorkflowKey]


class CollectedSpan(NamedTuple):
    """A span record from a site, kept for OTLP re-export with its original ids."""

    site: str
    seq: int
    body: dict[str, Any]


@dataclass
class ApplyResult:
    """What one :meth:`Applier.apply_batch` call did.

    Every record consumed in seq order is exactly one of ``applied``,
    ``stale`` (valid, but for an older uid/generation or already reflected in
    a restored view), ``malformed``, ``forged``, ``unknown``, ``final`` or ``off_schedule`` (see
    :class:`Discard`); records not consumed are ``duplicates``, ``held`` back,
    ``dropped`` because the buffer was full, ``beyond_window``, or ``retired``
    (the batch came from a replaced database).  ``epoch_change`` is set when
    this batch started a new numbering for the site.
    ``gap`` is ``ack_through + 1`` while anything beyond the mark has been
    received (held or dropped): the site should resend from there.  The
    ``acks`` message carries ``ack_through`` (or :meth:`Applier.ackable_through`).
    """

    site: str
    ack_through: int
    applied: int = 0
    duplicates: int = 0
    malformed: int = 0
    stale: int = 0
    dropped: int = 0
    held: int = 0
    forged: int = 0
    unknown: int = 0
    final: int = 0
    beyond_window: int = 0
    retired: int = 0
    off_schedule: int = 0
    gap: int | None = None
    changed: set[WorkflowKey] = field(default_factory=set)
    transitions: list[PhaseChange] = field(default_factory=list)
    epoch_change: EpochChange | None = None
    # The first discarded record of each reason, described for the batch's log line.
    examples: dict[Discard, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def consumed(self) -> int:
        return (
            self.applied + self.stale + self.malformed + self.forged + self.unknown + self.final
            + self.off_schedule
        )  # fmt: skip

    @property
    def needs_resend(self) -> bool:
        return self.gap is not None

    @property
    def resend_from(self) -> int | None:
        """The first seq the site should send again, or None if nothing is missing."""
        return self.gap


@dataclass
class _Site:
    applied_through: int = 0
    held: dict[int, CheckedRecord] = field(default_factory=dict)
    # Highest seq ever received (held or dropped): beyond the mark means a gap.
    highest_seen: int = 0
    # key -> seq of the first applied record not yet persisted (mark_persisted).
    dirty: dict[WorkflowKey, int] = field(default_factory=dict)
    epoch: str | None = None
    retired: deque[str] = field(default_factory=lambda: deque(maxlen=RETIRED_EPOCHS))
    warned_claim: int = 0  # the last lastAckedSeq logged as refused (once per value)


# -------------------------------------------------------------------- applier
class Applier:
    """Applies each site's records in seq order, exactly once, to workflow views."""

    def __init__(
        self,
        *,
        max_held: int = DEFAULT_MAX_HELD,
        window: int = DEFAULT_WINDOW,
        max_spans: int = DEFAULT_MAX_SPANS,
        max_log_chars: int = DEFAULT_MAX_LOG_CHARS,
        max_log_tails: int = DEFAULT_MAX_LOG_TAILS,
        max_tombstones: int = DEFAULT_MAX_TOMBSTONES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_held = max_held
        self.clock = clock  # read only to space out log lines (DISCARD_LOG_SECONDS)
        # (site, reason) -> (when last logged, records discarded since, not logged)
        self._discard_logged: dict[tuple[str, Discard], tuple[float, int]] = {}
        self.window = window
        self.max_log_chars = max_log_chars
        self.max_log_tails = max_log_tails
        self.max_tombstones = max_tombstones
        self._sites: dict[str, _Site] = {}
        self._views: dict[WorkflowKey, WorkflowView] = {}
        self._spans: deque[CollectedSpan] = deque(maxlen=max_spans)
        # Schedule confirmations for the CronWorkflow handlers (operator/cron.py);
        # one lost to a full deque costs a re-send, which the site confirms again.
        self._schedules: deque[tuple[str, ScheduleRecord]] = deque(maxlen=max_spans)
        # Runs a site's schedule fired have no Workflow object until the cloud
        # makes one (operator/cron.py): ``accept_cron`` says whether a site may
        # report such a run (its schedule is placed there and the run's name and
        # uid are the ones derived for it); accepted runs get a view at once and
        # wait in ``_cron_runs`` for their object, created before the site is acked.
        self.accept_cron: Callable[[str, RunRecord], bool] | None = None
        self._cron_runs: list[tuple[str, RunRecord]] = []
        self._tombstones: OrderedDict[str, None] = OrderedDict()
        self.spans_dropped = 0
        self._recent_spans: OrderedDict[str, None] = OrderedDict()
        self.spans_duplicate = 0
        self.malformed_total = 0
        self.discarded: Counter[Discard] = Counter()

    # -- sites -------------------------------------------------------------------
    def _site(self, site: str) -> _Site:
        state = self._sites.get(site)
        if state is None:
            state = self._sites[site] = _Site()
        return state

    def applied_through(self, site: str) -> int:
        state = self._sites.get(site)
        return state.applied_through if state else 0

    def held(self, site: str) -> int:
        state = self._sites.get(site)
        return len(state.held) if state else 0

    def sites(self) -> list[str]:
        return sorted(self._sites)

    def state(self) -> dict[str, int]:
        """The durable part: ``{site: applied_through}``."""
        return {site: s.applied_through for site, s in self._sites.items()}

    def restore(self, state: Mapping[str, int]) -> None:
        for site, through in state.items():
            self.restore_site(site, through)

    def restore_site(self, site: str, applied_through: int) -> ApplyResult:
        """Raise the site's mark to ``applied_through`` (never lowers it).

        Use it at start-up and whenever the site reports ``lastAckedSeq`` in a
        ``state`` message: everything the cloud ever acknowledged was applied
        (and, with :meth:`ackable_through`, persisted), and the site will not
        send those records again, so waiting for them would wedge it.  Held
        records that become contiguous are applied; the result says so.
        """
        state = self._site(site)
        result = ApplyResult(site=site, ack_through=state.applied_through)
        if applied_through > state.applied_through:
            state.applied_through = applied_through
            for seq in [s for s in state.held if s <= applied_through]:
                del state.held[seq]
            self._drain(site, state, result)
        self._finish(state, result)
        return result

    def accept_claim(self, site: str, claimed: int) -> ApplyResult:
        """Take a site's own word for its acknowledged mark, bounded by its records.

        A heartbeat's ``lastAckedSeq`` is what the site *says* some operator
        acknowledged.  An operator restarted beside an idle site needs it (the
        records up to it were compacted and never come again), but a huge or
        bogus claim taken as is made every later record of the site a
        "duplicate": none applied, none acked.  So the claim only closes a gap
        the site's own records show: the mark rises to at most the seq before
        the first record held back beyond it, and not at all while nothing is
        held (no record has shown the gap yet).  A claim at or past a record
        the site itself sent unacknowledged is logged, naming the field.
        """
        state = self._site(site)
        result = ApplyResult(site=site, ack_through=state.applied_through)
        if claimed > state.applied_through:
            if state.held:
                first = min(state.held)
                if claimed >= first and self._warn_claim(state, claimed):
                    log.warning(
                        "site %s: heartbeat lastAckedSeq %d claims records the site is still"
                        " sending (seq %d is unacknowledged); the mark rises only to %d",
                        site, claimed, first, first - 1,
                    )  # fmt: skip
                return self.restore_site(site, min(claimed, first - 1))
            claim_past_records = state.highest_seen and claimed > state.highest_seen
            if claim_past_records and self._warn_claim(state, claimed):
                log.warning(
                    "site %s: heartbeat lastAckedSeq %d is beyond seq %d, the last record the"
                    " site sent; ignored (the mark stays at %d)",
                    site, claimed, state.highest_seen, state.applied_through,
                )  # fmt: skip
        self._finish(state, result)
        return result

    @staticmethod
    def _warn_claim(state: _Site, claimed: int) -> bool:
        """Log a refused claim once per value, not on every heartbeat."""
        if state.warned_claim == claimed:
            return False
        state.warned_claim = claimed
        return True

    def reset_site(self, site: str) -> set[WorkflowKey]:
        """Forget a site's mark, e.g. after its agent was reinstalled and counts from 1 again.

        The site's views get ``synced_seq`` 0 (their old numbers belong to the
        old numbering); their keys are returned, as their statuses changed.
        """
        self._sites.pop(site, None)
        changed = set()
        for view in self._views.values():
            if view.site == site and view.synced_seq:
                view.synced_seq = 0
                changed.add(view.key)
        return changed

    def epoch(self, site: str) -> str | None:
        """The epoch (database identity) of the site's current numbering, if known."""
        state = self._sites.get(site)
        return state.epoch if state else None

    def observe_epoch(
        self, site: str, epoch: str | None, *, scan: bool = True
    ) -> EpochChange | None:
        """The site says its records come from database ``epoch``; see the module doc.

        A new epoch retires the current one and starts the site's sequence
        again; the first epoch seen (after a restart) is adopted.  Returns what
        changed, or None (same epoch, no epoch, a retired one, or an adoption
        that lost nothing).  ``scan=False``: the change takes effect but its
        ``lost`` is left empty and nothing is logged (the bridge coalesces a
        site's flips and asks :meth:`unfinished` once, when it handles them).
        """
        state = self._site(site)
        if epoch is None or epoch == state.epoch or epoch in state.retired:
            return None
        old, state.epoch = state.epoch, epoch
        if old is None:
            lost = self._unfinished(
                site, lambda v: v.synced_epoch is not None and v.synced_epoch != epoch
            )
            if lost:
                log.warning(
                    "site %s: its database %s did not sync %d unfinished runs synced under"
                    " another database; sending them again",
                    site, epoch, len(lost),
                )  # fmt: skip
            return EpochChange(site, None, epoch, lost) if lost else None
        state.retired.append(old)
        state.applied_through = state.highest_seen = 0
        state.held.clear()
        state.dirty.clear()
        if not scan:
            return EpochChange(site, old, epoch, [])
        lost = self._unfinished(site, lambda v: True)
        log.warning(
            "site %s: new database %s (was %s): its sequence starts again;"
            " %d unfinished runs are sent again",
            site, epoch, old, len(lost),
        )  # fmt: skip
        return EpochChange(site, old, epoch, lost)

    def unfinished(self, site: str) -> list[WorkflowKey]:
        """The site's unfinished runs (what a database it replaced held)."""
        return self._unfinished(site, lambda v: True)

    def _unfinished(self, site: str, which: Callable[[WorkflowView], bool]) -> list[WorkflowKey]:
        views = self._views.values()
        return sorted(v.key for v in views if v.site == site and not v.done and which(v))

    # -- views -------------------------------------------------------------------
    def view(self, namespace: str, name: str) -> WorkflowView | None:
        return self._views.get((namespace, name))

    def views(self) -> list[WorkflowView]:
        return list(self._views.values())

    def load(self, view: WorkflowView) -> None:
        """Install a view rebuilt with :meth:`WorkflowView.from_status` (operator start-up)."""
        view.pinned = True
        self._views[view.key] = view

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted workflow; late records for its uid are then stale."""
        view = self._views.pop((namespace, name), None)
        if view is None:
            return
        self.refuse_run(view.uid)
        for state in self._sites.values():
            state.dirty.pop(view.key, None)

    def refuse_run(self, uid: str) -> None:
        """Records of run ``uid`` are stale from now on (a fired run whose name is taken)."""
        self._tombstones[uid] = None
        while len(self._tombstones) > self.max_tombstones:
            self._tombstones.popitem(last=False)

    def _name_taken(self, site: str, run: RunRecord) -> None:
        """A fire of a schedule placed on ``site`` whose name another run holds: handed to
        the operator with the fired runs (``drain_cron_runs``), which says so and
        refuses it (``refuse_run``); its records are stale meanwhile."""
        try:
            ours = self.accept_cron is not None and self.accept_cron(site, run)
        except Exception:  # refused (off schedule) or broken: not a fire to speak of
            ours = False
        if ours:
            self._cron_runs.append((site, run))

    def expect(
        self,
        namespace: str,
        name: str,
        uid: str,
        generation: int,
        task_names: Sequence[str],
        *,
        compensation_names: Sequence[str] = (),
        site: str,
    ) -> WorkflowView:
        """Declare the workflow as assigned to ``site``: its identity and its spec's task names.

        Only ``site``'s records can change the view from now on.  Total task
        counts come from here (tasks that have not reported yet are Pending).
        A newer uid or generation replaces the view; from now on records of
        another uid or an older generation cannot overwrite it.  An
        expectation older than the view (lower generation) is ignored.
        """
        key = (namespace, name)
        view = self._views.get(key)
        if view is not None and view.uid == uid and view.generation > generation:
            return view
        if view is None or view.uid != uid or view.generation != generation:
            view = WorkflowView(namespace=namespace, name=name, uid=uid, generation=generation)
            self._views[key] = view
            for state in self._sites.values():
                state.dirty.pop(key, None)
        view.pinned = True
        view.site = site
        view.expect_tasks(task_names, compensation_names)
        return view

    def drain_cron_runs(self) -> list[tuple[str, RunRecord]]:
        """Take every (site, first run record) of a fired run that still needs its object."""
        runs, self._cron_runs = self._cron_runs, []
        return runs

    def drain_schedules(self) -> list[tuple[str, ScheduleRecord]]:
        """Take every (site, schedule record) applied so far (oldest first)."""
        records = list(self._schedules)
        self._schedules.clear()
        return records

    # -- spans -------------------------------------------------------------------
    def drain_spans(self) -> list[CollectedSpan]:
        """Take every span collected so far (oldest first)."""
        spans = list(self._spans)
        self._spans.clear()
        return spans

    # -- persistence-aware acks ------------------------------------------------------
    def mark_persisted(self, namespace: str, name: str, synced_seq: int) -> None:
        """The status rendered at ``synced_seq`` is now stored in Kubernetes."""
        key = (namespace, name)
        view = self._views.get(key)
        if view is None or view.synced_seq > synced_seq:
            return
        for state in self._sites.values():
            state.dirty.pop(key, None)

    def ackable_through(self, site: str) -> int:
        """The highest seq such that every record up to it is applied and persisted."""
        state = self._sites.get(site)
        if state is None:
            return 0
        if not state.dirty:
            return state.applied_through
        return min(state.applied_through, min(state.dirty.values()) - 1)

    # -- applying --------------------------------------------------------------
    def apply_batch(
        self,
        site: str,
        batch: EventsPayload | CheckedBatch | Iterable[EventRecord | CheckedRecord],
        *,
        epoch: str | None = None,
        scan_epoch: bool = True,
    ) -> ApplyResult:
        """Apply one ``events`` batch from ``site``; see :class:`ApplyResult`.

        ``epoch`` defaults to the batch's own (an :class:`EventsPayload` or
        :class:`CheckedBatch`); ``scan_epoch`` as :meth:`observe_epoch`'s ``scan``.
        Records come checked (the bridge's fast path, :mod:`tideflow.wire_events`)
        or as decoded, checked when applied.
        """
        records: Sequence[CheckedRecord]
        if isinstance(batch, CheckedBatch):
            records = batch.records
        elif isinstance(batch, EventsPayload):
            records = [check_record(record) for record in batch.records]
        else:
            records = [r if isinstance(r, dict) else check_record(r) for r in batch]
        if isinstance(batch, EventsPayload | CheckedBatch):
            epoch = epoch if epoch is not None else batch.epoch
        state = self._site(site)
        result = ApplyResult(site=site, ack_through=state.applied_through)
        if epoch is not None and epoch in state.retired:
            result.retired = len(records)
            self._discard(result, Discard.RETIRED_EPOCH, f"database {epoch}", len(records))
            self._finish(state, result)
            self._log_discards(site, result)
            return result
        result.epoch_change = self.observe_epoch(site, epoch, scan=scan_epoch)
        result.ack_through = state.applied_through
        held = state.held
        for record in records:
            seq = record["seq"]
            if seq <= state.applied_through or seq in held:
                result.duplicates += 1
                continue
            if seq > state.applied_through + self.window:
                result.beyond_window += 1
                self._discard(
                    result,
                    Discard.BEYOND_WINDOW,
                    f"seq {seq} > mark {state.applied_through} + window {self.window}",
                )
                continue
            held[seq] = record
            if seq > state.highest_seen:
                state.highest_seen = seq
        self._drain(site, state, result)
        if len(state.held) > self.max_held:
            overflow = sorted(state.held)[self.max_held :]
            for seq in overflow:
                del state.held[seq]
            result.dropped += len(overflow)
            self.discarded[Discard.OVERFLOW] += len(overflow)
            log.warning(
                "site %s: hold-back buffer full, dropped %d records after seq %d;"
                " the site will resend them",
                site,
                len(overflow),
                state.applied_through,
            )
        self._finish(state, result)
        self._log_discards(site, result)
        return result

    def _discard(self, result: ApplyResult, reason: Discard, example: str, n: int = 1) -> None:
        self.discarded[reason] += n
        result.examples.setdefault(reason, example)

    def _log_discards(self, site: str, result: ApplyResult) -> None:
        """One line per reason per batch: a flood of bad records is not a flood of logs."""
        for reason, example in result.examples.items():
            level = _LOG_LEVEL.get(reason, logging.DEBUG)
            if not log.isEnabledFor(level):
                continue
            count = getattr(result, reason.value, None)
            if reason is Discard.RETIRED_EPOCH:
                count = result.retired
            # And one line per site and reason per DISCARD_LOG_SECONDS: a site
            # sending batch after batch of refused records wrote a line each.
            now = self.clock()
            logged, quiet = self._discard_logged.get((site, reason), (None, 0))
            if logged is not None and now - logged < DISCARD_LOG_SECONDS:
                self._discard_logged[(site, reason)] = (logged, quiet + (count or 0))
                continue
            if len(self._discard_logged) >= MAX_DISCARD_LOGGED:
                self._discard_logged.clear()
            self._discard_logged[(site, reason)] = (now, 0)
            more = f" ({quiet} more since the last line)" if quiet else ""
            log.log(
                level, "site %s: discarded %s %s record(s); first: %s%s",
                site, count, reason.value, example, more,
            )  # fmt: skip

    def _finish(self, state: _Site, result: ApplyResult) -> None:
        result.ack_through = state.applied_through
        result.held = len(state.held)
        missing = state.held or state.highest_seen > state.applied_through
        result.gap = state.applied_through + 1 if missing else None

    def _drain(self, site: str, state: _Site, result: ApplyResult) -> None:
        while True:
            record = state.held.pop(state.applied_through + 1, None)
            if record is None:
                return
            self._apply_one(site, state, record, result)
            state.applied_through = record["seq"]

    def _apply_one(
        self, site: str, state: _Site, checked: CheckedRecord, result: ApplyResult
    ) -> None:
        body = checked["body"]
        if body is None:
            result.malformed += 1
            self.malformed_total += 1
            # One line per batch with the others (a batch of bad records was a line
            # each); the error is bounded by wire (its first error, named).
            self._discard(result, Discard.MALFORMED, str(checked.get("error")))
            return
        kind = checked["kind"]
        seq = checked["seq"]
        if kind == SPAN_RECORD:
            self._collect_span(site, seq, body)
            result.applied += 1
            return
        if kind == SCHEDULE_RECORD:
            self._schedules.append((site, ScheduleRecord.model_construct(**body)))
            result.applied += 1
            return
        found = self._view_for(site, state, seq, kind, body)
        if kind == TASK_RECORD and found is not Discard.FORGED:
            # An outcome carrying its attempt's span (decision 0022) whole, or its
            # ids to derive it from the record (decision 0036): the span is kept
            # as a span record's body is, whatever becomes of the task's part,
            # except from a record refused as another site's (not into its trace).
            span = carried_span(body)
            if span is not None:
                self._collect_span(site, seq, span)
        if isinstance(found, FiredRunRefused):
            self._count(result, Discard.OFF_SCHEDULE, site, checked, body, detail=str(found))
            return
        if isinstance(found, Discard):
            self._count(result, found, site, checked, body)
            return
        view = found
        old_phase = view.phase
        if kind == RUN_RECORD:
            if view.done and body["phase"] != view.phase:
                self._count(result, Discard.FINAL, site, checked, body, view)
                return
            changed = view.apply_run(body)
        elif kind == TASK_RECORD:
            if not view.takes_task(body["task"]):
                detail = f"task {shown(body['task'])} is not one of the run's"
                self._count(result, Discard.UNKNOWN, site, checked, body, view, detail)
                return
            changed = view.apply_task(body)
        elif kind == LOG_RECORD:
            changed = view.apply_log(body, self.max_log_chars, self.max_log_tails)
        else:  # pragma: no cover - wire.EventRecord allows only the five kinds
            result.stale += 1
            return
        result.applied += 1
        if changed:
            # syncedSeq moves only when the view changes: the status is then
            # patched, and every record of this view up to it is reflected.
            view.synced_seq, view.synced_epoch = seq, state.epoch
            key = (view.namespace, view.name)
            result.changed.add(key)
            state.dirty.setdefault(key, seq)
        if view.phase != old_phase:
            result.transitions.append(
                PhaseChange(view.key, old_phase, view.phase, view.reason, view.message)
            )

    def _collect_span(self, site: str, seq: int, body: Mapping[str, Any]) -> None:
        key = f"{site}/{body.get('traceId')}/{body.get('spanId')}"
        if key in self._recent_spans:
            self.spans_duplicate += 1
            return
        self._recent_spans[key] = None
        if len(self._recent_spans) > RECENT_SPAN_IDS:
            self._recent_spans.popitem(last=False)
        if len(self._spans) == self._spans.maxlen:
            self.spans_dropped += 1
        self._spans.append(CollectedSpan(site, seq, dict(body)))

    def _count(
        self,
        result: ApplyResult,
        reason: Discard,
        site: str,
        record: CheckedRecord,
        body: Mapping[str, Any],
        view: WorkflowView | None = None,
        detail: str | None = None,
    ) -> None:
        setattr(result, reason.value, getattr(result, reason.value) + 1)
        # The site wrote these strings: shown bounded and escaped (wire.shown).
        named = f"{body['namespace']}/{body['name']}"
        where = (
            f"seq {record['seq']} {record['kind']} for {shown(named, 160)} uid {shown(body['uid'])}"
        )
        if reason is Discard.FORGED:
            assigned = self._views[(body["namespace"], body["name"])].site
            where += f", a run assigned to site {assigned}, not {site}"
        elif reason is Discard.FINAL and view is not None:
            where += f": {view.phase} is final, refused {shown(body.get('phase', '?'))}"
        if detail is not None:
            where += f": {detail}"
        self._discard(result, reason, where)

    def _view_for(
        self, site: str, state: _Site, seq: int, kind: str, body: Mapping[str, Any]
    ) -> WorkflowView | Discard | FiredRunRefused:
        """The view a record may change, or why it may not (see the module doc)."""
        uid: str = body["uid"]
        if uid in self._tombstones:
            return Discard.STALE
        key = (body["namespace"], body["name"])
        view = self._views.get(key)
        if (
            view is None
            and kind == RUN_RECORD
            and body["cron"] is not None
            and self.accept_cron is not None
        ):
            run = RunRecord.model_construct(**body)
            try:
                accepted = self.accept_cron(site, run)
            except FiredRunRefused as refused:  # ours, but at a time it never fires
                return refused
            except Exception:  # raising here wedged the site: its batch never applied
                log.exception(
                    "site %s: judging fired run %s failed; discarded", site, shown(run.name)
                )
                accepted = False
            if accepted:
                view = WorkflowView(
                    namespace=run.namespace,
                    name=run.name,
                    uid=run.uid,
                    generation=run.generation,
                    site=site,
                    pinned=True,
                )
                self._views[key] = view
                self._cron_runs.append((site, run))
                return view
        if view is None:
            return Discard.UNKNOWN
        if view.uid != uid:
            if kind == RUN_RECORD and body["cron"] is not None:
                self._name_taken(site, RunRecord.model_construct(**body))
            return Discard.STALE
        # Before the generation: a site's standing must not depend on another site's records.
        if view.site != site:
            return Discard.FORGED
        generation: int = body["generation"]
        if generation < view.generation:
            return Discard.STALE
        if generation == view.generation:
            # Already reflected in a view rebuilt from a newer status (same database).
            if view.synced_epoch == state.epoch and seq <= view.synced_seq:
                return Discard.STALE
            return view
        for other in self._sites.values():
            other.dirty.pop(key, None)
        view = WorkflowView(
            namespace=key[0], name=key[1], uid=uid, generation=generation, site=site, pinned=True
        )
        self._views[key] = view
        return view


__all__ = [
    "DEFAULT_MAX_HELD",
    "DEFAULT_WINDOW",
    "TASK_PHASES",
    "Applier",
    "ApplyResult",
    "CollectedSpan",
    "Discard",
    "EpochChange",
    "FiredRunRefused",
    "LogTail",
    "PhaseChange",
    "TaskView",
    "WorkflowKey",
    "WorkflowView",
    "parse_rfc3339",
    "rfc3339",
]


def carried_span(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The attempt span a checked task record (keyed by field names) carries, if any.

    A whole ``span`` (agents of decisions 0022 to 0036) is taken as sent; an
    ``attemptSpan`` is turned into the span by the contract's one derivation,
    from the record in its wire form.
    """
    span = body.get("span")
    if span is not None:
        return dict(span)
    ref = body.get("attempt_span")
    if ref is None:
        return None
    record = {
        "uid": body["uid"],
        "generation": body["generation"],
        "namespace": body["namespace"],
        "name": body["name"],
        "task": body["task"],
        "compensation": body["compensation"],
        "phase": str(body["phase"]),
        "attempt": body["attempt"],
        "startedAt": body["started_at"],
        "finishedAt": body["finished_at"],
        "exitCode": body["exit_code"],
        "message": body["message"],
        "attemptSpan": ref.model_dump(by_alias=True, exclude_none=True)
        if isinstance(ref, AttemptSpanRef)
        else dict(ref),
    }
    return attempt_span_of(record)
