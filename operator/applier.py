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

The result of applying is a :class:`WorkflowView` per ``(namespace, name)``,
which renders to the Workflow ``.status`` (:meth:`WorkflowView.to_status`) and
can be rebuilt from it (:meth:`WorkflowView.from_status`).  Nothing here does
I/O: the operator feeds decoded payloads in, patches statuses, and publishes
acks.  The only durable state is per-site ``applied_through``; the operator
rebuilds it with :meth:`Applier.restore_site` and the views with
:meth:`Applier.load`.

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
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pydantic import BaseModel

from tideflow.phases import RUN_DONE, TaskPhase
from tideflow.wire import (
    LOG_RECORD,
    RUN_RECORD,
    SPAN_RECORD,
    TASK_RECORD,
    EventRecord,
    EventsPayload,
    LogRecord,
    RunRecord,
    TaskRecord,
    WireError,
    decode_record,
)

log = logging.getLogger(__name__)

WorkflowKey = tuple[str, str]
"""``(namespace, name)`` of a Workflow object."""

TASK_PHASES: tuple[str, ...] = tuple(TaskPhase)

DEFAULT_MAX_HELD = 10_000
DEFAULT_MAX_SPANS = 100_000
DEFAULT_MAX_LOG_CHARS = 4096
DEFAULT_MAX_LOG_TAILS = 512
DEFAULT_MAX_TOMBSTONES = 10_000
DEFAULT_STATUS_MAX_TASKS = 500
DEFAULT_STATUS_MAX_BYTES = 192 * 1024
STATUS_MESSAGE_CHARS = 4096
TASK_MESSAGE_CHARS = 512
OUTPUT_VALUE_CHARS = 512
OUTPUT_TOTAL_CHARS = 2048

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
# An unlisted task that reports anew was still live; see WorkflowView._take_residual.
_LIVE_FIRST = ("Running", "Retrying", "Interrupted")


# ----------------------------------------------------------------- time format
def rfc3339(ts: float | None) -> str | None:
    """Epoch seconds -> ``2024-05-01T12:00:00.123Z`` (millisecond precision)."""
    if ts is None:
        return None
    millis = round(ts * 1000)
    secs, ms = divmod(millis, 1000)
    return datetime.fromtimestamp(secs, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms:03d}Z"


def parse_rfc3339(text: Any) -> float | None:
    """RFC 3339 string (or a number, or None) -> epoch seconds, ms precision."""
    if text is None or text == "":
        return None
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    dt = datetime.fromisoformat(str(text))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return round(dt.timestamp() * 1000) / 1000


def _clip(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: max(0, limit - 1)] + "…"


# ---------------------------------------------------------------------- views
@dataclass
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
    def from_record(cls, rec: TaskRecord) -> TaskView:
        return cls(
            name=rec.task,
            compensation=rec.compensation,
            phase=rec.phase,
            attempt=rec.attempt,
            started_at=rec.started_at,
            finished_at=rec.finished_at,
            exit_code=rec.exit_code,
            outputs=dict(rec.outputs),
            message=rec.message,
        )

    def to_dict(self) -> dict[str, Any]:
        """Full detail, camelCase, times as RFC 3339; no truncation."""
        return {
            "name": self.name,
            "compensation": self.compensation,
            "phase": self.phase,
            "attempt": self.attempt,
            "startedAt": rfc3339(self.started_at),
            "finishedAt": rfc3339(self.finished_at),
            "exitCode": self.exit_code,
            "outputs": dict(self.outputs),
            "message": self.message,
        }

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
            outputs: dict[str, str] = {}
            budget = OUTPUT_TOTAL_CHARS
            clipped = self.outputs_truncated
            for key, value in self.outputs.items():
                if budget <= 0:
                    clipped = True
                    break
                short = _clip(value, min(OUTPUT_VALUE_CHARS, budget)) or ""
                clipped = clipped or short != value
                outputs[key] = short
                budget -= len(key) + len(short)
            out["outputs"] = outputs
            if clipped:
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


@dataclass
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
    # Set by Applier.expect: the Kubernetes object's identity is authoritative,
    # so records of another uid are stale rather than a re-created object.
    pinned: bool = field(default=False, compare=False)

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
    def apply_run(self, rec: RunRecord) -> bool:
        before = (self.phase, self.reason, self.message, self.suspended)
        before_times = (self.started_at, self.finished_at)
        self.phase, self.reason, self.message = rec.phase, rec.reason, rec.message
        self.suspended = rec.suspended
        self.started_at, self.finished_at = rec.started_at, rec.finished_at
        return before != (self.phase, self.reason, self.message, self.suspended) or (
            before_times != (self.started_at, self.finished_at)
        )

    def apply_task(self, rec: TaskRecord) -> bool:
        new = TaskView.from_record(rec)
        old = self.tasks.get(rec.task)
        if old is None:
            self._take_residual(rec.compensation, rec.phase)
        elif old == new:
            return False
        self.tasks[rec.task] = new
        return True

    def apply_log(self, rec: LogRecord, max_chars: int, max_tails: int) -> bool:
        key = (rec.task, rec.stream)
        text = rec.tail[-max_chars:] if max_chars > 0 else ""
        old = self.logs.get(key)
        if old is not None and old.attempt > rec.attempt:
            return False
        if old is not None and old.attempt == rec.attempt and old.text == text:
            return False
        self.logs[key] = LogTail(rec.attempt, text)
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
        could list, or it went straight to Succeeded/Failed (only a live task
        can), or it merely repeats its state.  Try the phases in that order.
        """
        pool = [(c, p) for (c, p), n in self.residual.items() if c == compensation and n > 0]
        if not pool:
            return
        phases = {p for _, p in pool}
        direct = (new_phase,) if new_phase in ("Succeeded", "Failed") else ()
        for phase in (*_LIVE_FIRST, *direct, "Pending", new_phase, *sorted(phases)):
            if phase in phases:
                self.residual[(compensation, phase)] -= 1
                if self.residual[(compensation, phase)] <= 0:
                    del self.residual[(compensation, phase)]
                return

    def expect_tasks(self, names: Sequence[str], compensation: Sequence[str]) -> None:
        """Add the spec's tasks (as Pending) that have not reported yet, in spec order."""
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
            "reason": self.reason,
            "message": _clip(self.message, STATUS_MESSAGE_CHARS),
            "suspended": self.suspended,
            "startedAt": rfc3339(self.started_at),
            "finishedAt": rfc3339(self.finished_at),
            "taskCounts": counts,
            "compensationCounts": self.compensation_counts() if self.has_compensation else None,
            "syncedSeq": self.synced_seq,
        }
        fixed = len(json.dumps(status, separators=(",", ":")))
        tasks, truncated = self._status_tasks(max_tasks, max(0, max_bytes - fixed))
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
        so counts and progress stay exact.  Log tails are not in the status.
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
        )
        for entry in status.get("tasks") or []:
            task = TaskView.from_dict(entry)
            view.tasks[task.name] = task
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
    a restored view) or ``malformed``; records not consumed are
    ``duplicates``, ``held`` back, or ``dropped`` because the buffer was full.
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
    gap: int | None = None
    changed: set[WorkflowKey] = field(default_factory=set)
    transitions: list[PhaseChange] = field(default_factory=list)

    @property
    def consumed(self) -> int:
        return self.applied + self.stale + self.malformed

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
    held: dict[int, EventRecord] = field(default_factory=dict)
    # Highest seq ever received (held or dropped): beyond the mark means a gap.
    highest_seen: int = 0
    # key -> seq of the first applied record not yet persisted (mark_persisted).
    dirty: dict[WorkflowKey, int] = field(default_factory=dict)


# -------------------------------------------------------------------- applier
class Applier:
    """Applies each site's records in seq order, exactly once, to workflow views."""

    def __init__(
        self,
        *,
        max_held: int = DEFAULT_MAX_HELD,
        max_spans: int = DEFAULT_MAX_SPANS,
        max_log_chars: int = DEFAULT_MAX_LOG_CHARS,
        max_log_tails: int = DEFAULT_MAX_LOG_TAILS,
        max_tombstones: int = DEFAULT_MAX_TOMBSTONES,
    ) -> None:
        self.max_held = max_held
        self.max_log_chars = max_log_chars
        self.max_log_tails = max_log_tails
        self.max_tombstones = max_tombstones
        self._sites: dict[str, _Site] = {}
        self._views: dict[WorkflowKey, WorkflowView] = {}
        self._spans: deque[CollectedSpan] = deque(maxlen=max_spans)
        self._tombstones: OrderedDict[str, None] = OrderedDict()
        self.spans_dropped = 0
        self.malformed_total = 0

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
        self._tombstones[view.uid] = None
        while len(self._tombstones) > self.max_tombstones:
            self._tombstones.popitem(last=False)
        for state in self._sites.values():
            state.dirty.pop(view.key, None)

    def expect(
        self,
        namespace: str,
        name: str,
        uid: str,
        generation: int,
        task_names: Sequence[str],
        *,
        compensation_names: Sequence[str] = (),
        site: str | None = None,
    ) -> WorkflowView:
        """Declare the workflow as assigned: its identity and its spec's task names.

        Total task counts come from here (tasks that have not reported yet are
        Pending).  A newer uid or generation replaces the view; from now on
        records of another uid or an older generation cannot overwrite it.
        An expectation older than the view (lower generation) is ignored.
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
        if site is not None and view.site is None:
            view.site = site
        view.expect_tasks(task_names, compensation_names)
        return view

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
    def apply_batch(self, site: str, batch: EventsPayload | Iterable[EventRecord]) -> ApplyResult:
        """Apply one ``events`` batch from ``site``; see :class:`ApplyResult`."""
        records = batch.records if isinstance(batch, EventsPayload) else batch
        state = self._site(site)
        result = ApplyResult(site=site, ack_through=state.applied_through)
        for record in records:
            if record.seq <= state.applied_through or record.seq in state.held:
                result.duplicates += 1
                continue
            state.held[record.seq] = record
            state.highest_seen = max(state.highest_seen, record.seq)
        self._drain(site, state, result)
        if len(state.held) > self.max_held:
            overflow = sorted(state.held)[self.max_held :]
            for seq in overflow:
                del state.held[seq]
            result.dropped += len(overflow)
            log.warning(
                "site %s: hold-back buffer full, dropped %d records after seq %d;"
                " the site will resend them",
                site,
                len(overflow),
                state.applied_through,
            )
        self._finish(state, result)
        return result

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
            state.applied_through = record.seq

    def _apply_one(self, site: str, state: _Site, record: EventRecord, result: ApplyResult) -> None:
        try:
            body = decode_record(record)
        except WireError as exc:
            result.malformed += 1
            self.malformed_total += 1
            log.warning("site %s: skipped malformed record: %s", site, exc)
            return
        if record.kind == SPAN_RECORD:
            if len(self._spans) == self._spans.maxlen:
                self.spans_dropped += 1
            self._spans.append(CollectedSpan(site, record.seq, dict(record.body)))
            result.applied += 1
            return
        assert isinstance(body, RunRecord | TaskRecord | LogRecord)
        view = self._view_for(site, record.seq, body)
        if view is None:
            result.stale += 1
            return
        old_phase = view.phase
        if record.kind == RUN_RECORD:
            assert isinstance(body, RunRecord)
            changed = view.apply_run(body)
        elif record.kind == TASK_RECORD:
            assert isinstance(body, TaskRecord)
            changed = view.apply_task(body)
        elif record.kind == LOG_RECORD:
            assert isinstance(body, LogRecord)
            changed = view.apply_log(body, self.max_log_chars, self.max_log_tails)
        else:  # pragma: no cover - wire.EventRecord allows only the four kinds
            result.stale += 1
            return
        result.applied += 1
        if changed or view.site != site:
            # syncedSeq moves only when the view changes: the status is then
            # patched, and every record of this view up to it is reflected.
            view.site, view.synced_seq = site, record.seq
            result.changed.add(view.key)
            state.dirty.setdefault(view.key, record.seq)
        if view.phase != old_phase:
            result.transitions.append(
                PhaseChange(view.key, old_phase, view.phase, view.reason, view.message)
            )

    def _view_for(self, site: str, seq: int, body: BaseModel) -> WorkflowView | None:
        """The view a record may change, or None if the record is stale for it."""
        assert isinstance(body, RunRecord | TaskRecord | LogRecord)
        if body.uid in self._tombstones:
            return None
        key = (body.namespace, body.name)
        view = self._views.get(key)
        if view is not None:
            if view.uid == body.uid:
                if body.generation < view.generation:
                    return None
                if body.generation == view.generation:
                    # Already reflected in a view rebuilt from a newer status.
                    if view.site == site and seq <= view.synced_seq:
                        return None
                    return view
            elif view.pinned:
                return None
            for state in self._sites.values():
                state.dirty.pop(key, None)
        view = WorkflowView(
            namespace=body.namespace,
            name=body.name,
            uid=body.uid,
            generation=body.generation,
            pinned=view.pinned if view is not None and view.uid == body.uid else False,
        )
        self._views[key] = view
        return view


__all__ = [
    "DEFAULT_MAX_HELD",
    "TASK_PHASES",
    "Applier",
    "ApplyResult",
    "CollectedSpan",
    "LogTail",
    "PhaseChange",
    "TaskView",
    "WorkflowKey",
    "WorkflowView",
    "parse_rfc3339",
    "rfc3339",
]
