"""What the operator holds about each assigned Workflow, and the small rules on it.

The modules that act on a Workflow (:mod:`.admission`, :mod:`.status`,
:mod:`.housekeeping`, :mod:`.runtime`, and :mod:`.cron` for fired runs) share
one :class:`Held` — the :class:`CloudRecord` of every run this process follows
plus the keys whose status must be written again — and the vocabulary here:

* a :class:`CloudRecord` is made in one place (:meth:`CloudRecord.assigned`),
  whether admission assigned the run, a restart restored it from ``.status``,
  or a site's schedule fired it;
* the site says ``Pending`` for a run it has not started; the Workflow says
  ``Assigned`` (:func:`public_phase`, and back with :func:`site_phase`);
* :func:`condition` keeps a condition's ``lastTransitionTime`` while its
  status stays the same.

No I/O here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tideflow import tracing
from tideflow.logs import trace_extra
from tideflow.phases import RUN_DONE, RunPhase

from .applier import rfc3339
from .ledger import spec_digest

log = logging.getLogger(__name__)

Key = tuple[str, str]
ASSIGNED = "Assigned"  # the Workflow's word for a run its site has not started (Pending)
WATCHED_FIELDS = ("phase", "progress", "site", "siteConnected", "syncedSeq", "reason", "suspended")


class Override(NamedTuple):
    """A phase the cloud decided (a deadline), shown instead of the site's."""

    phase: str
    reason: str
    message: str


class Since(NamedTuple):
    """A condition as last rendered: what is needed to date or show it again."""

    status: str  # "True" / "False"
    since: str  # its lastTransitionTime
    reason: str
    message: str

    @classmethod
    def of(cls, written: Mapping[str, Any]) -> Since:
        """From a condition as stored on the Workflow (a restart restores them)."""
        return cls(*(str(written.get(k) or "") for k in
                     ("status", "lastTransitionTime", "reason", "message")))  # fmt: skip

    def as_condition(self, kind: str) -> dict[str, Any]:
        return {"type": kind, "status": self.status, "reason": self.reason,
                "message": self.message, "lastTransitionTime": self.since}  # fmt: skip


class Watched(NamedTuple):
    """The fields of a status that the resync compares with what was written."""

    phase: Any
    progress: Any
    site: Any
    siteConnected: Any  # (the status fields' own names)
    syncedSeq: Any
    reason: Any
    suspended: Any


@dataclass(slots=True)
class CloudRecord:
    """What the cloud knows of one assigned Workflow beyond the site's records.

    Slotted, and holding no rendered copies (conditions as :class:`Since`,
    the written status as :class:`Watched`, the object's reference made
    when an Event needs it): one is kept per Workflow, 10,000 at a fleet's
    scale (issue 13).
    """

    namespace: str
    name: str
    uid: str  # the run's uid at its site (a fired run's is derived from its schedule)
    generation: int
    site: str
    object_uid: str | None  # the Kubernetes object's (Events name it)
    trace_id: str
    root_span_id: str
    assigned_at: float
    deadline_seconds: int | None = None
    # The digest of the spec assigned (ledger.spec_digest; None: not known, assigned by an
    # operator older than the ledger): a later spec that differs is an edit, refused.
    assigned_digest: str | None = None
    override: Override | None = None
    root_emitted: bool = False
    conditions: dict[str, Since] = field(default_factory=dict)
    resource_version: str | None = None  # of the last status this process wrote or read
    written: Watched | None = None  # the fields of that status compared on resync
    suspend: bool = False  # what the site was last told (assignment, suspend, resume)
    seen_generation: int = 0  # the spec generation already handled
    write_after: float = 0.0  # monotonic: a slow Workflow's next status write waits till then
    # Assigned by another writer (an operator forced active beside this one): this
    # process follows the run (cancel on delete) but never writes its status, whose
    # view may lack records that arrived before it adopted the run.
    observer: bool = False

    @classmethod
    def assigned(
        cls,
        *,
        namespace: str,
        name: str,
        uid: str,
        generation: int,
        site: str,
        object_uid: str | None,
        assigned_at: float,
        trace_id: str | None = None,
        root_span_id: str | None = None,
        **more: Any,
    ) -> CloudRecord:
        """The record of a run on ``site``; a new trace unless one is given.

        ``object_uid`` is the Kubernetes object's (Events name it), which for a
        run a schedule fired differs from the run's ``uid``.
        """
        return cls(
            namespace=namespace, name=name, uid=uid, generation=generation, site=site,
            object_uid=object_uid,
            trace_id=trace_id or tracing.new_trace_id(),
            root_span_id=root_span_id or tracing.new_span_id(),
            assigned_at=assigned_at, **more,
        )  # fmt: skip

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def body_ref(self) -> dict[str, Any]:
        """The object as an Event names it."""
        return {"metadata": {"name": self.name, "namespace": self.namespace,
                             "uid": self.object_uid}}  # fmt: skip

    @property
    def traceparent(self) -> str:
        return tracing.format_traceparent(self.trace_id, self.root_span_id)

    @property
    def log_extra(self) -> dict[str, str]:
        """``extra=`` for a log line about this run: it carries the run's trace id."""
        return trace_extra(self.trace_id, self.root_span_id)


@dataclass
class Held:
    """The runs this process follows, shared by the modules that act on them."""

    records: dict[Key, CloudRecord] = field(default_factory=dict)
    dirty: set[Key] = field(default_factory=set)  # status to write again (and ack after)
    suspect: set[Key] = field(default_factory=set)  # statuses seen to differ from what we wrote


class Essence(NamedTuple):
    """What the handlers compare of two specs: ``suspend``, and a digest of the rest."""

    suspend: bool
    digest: str


def essence_of(spec: Mapping[str, Any] | None) -> Essence:
    """The essence of a spec, or of a digest-only diff base."""
    spec = dict(spec or {})
    if "specDigest" in spec and set(spec) <= {"suspend", "specDigest"}:
        return Essence(bool(spec.get("suspend", False)), str(spec["specDigest"]))
    return Essence(bool(spec.get("suspend", False)), spec_digest(spec))


def public_phase(phase: str) -> str:
    """The Workflow's phase for a site's run phase: a run not started yet is Assigned."""
    return ASSIGNED if phase == RunPhase.PENDING else phase


def site_phase(phase: str) -> str:
    """Back from a stored Workflow phase to the site's (:func:`public_phase` reversed)."""
    return RunPhase.PENDING if phase == ASSIGNED else phase


def finished(phase: Any) -> bool:
    return phase in RUN_DONE


def newer(version: Any, than: Any) -> bool:
    """Is ``version`` a later resourceVersion than ``than``?  (etcd's are integers.)"""
    if version is None:
        return False
    if than is None:
        return True
    try:
        return int(version) > int(than)
    except (TypeError, ValueError):
        return bool(version != than)


def watched(status: Mapping[str, Any]) -> Watched:
    """The fields of a status that the resync compares with what was written."""
    return Watched(*(status.get(k) for k in WATCHED_FIELDS))


def now_rfc3339() -> str:
    return rfc3339(time.time()) or ""


def condition(
    record: CloudRecord | None, kind: str, status: bool, reason: str, message: str = ""
) -> dict[str, Any]:
    """A status condition; kept on ``record`` (whose earlier one dates an unchanged status)."""
    value = "True" if status else "False"
    previous = record.conditions.get(kind) if record else None
    since = previous.since if previous and previous.status == value else now_rfc3339()
    made = Since(value, since, reason, message)
    if record is not None:
        record.conditions[kind] = made
    return made.as_condition(kind)


class Errands:
    """Coroutines run off the caller's path (Events, ledger entries); failures are logged."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def soon(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        def done(task: asyncio.Task[None]) -> None:
            self.tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.warning("%s failed: %s", what, task.exception())

        task = asyncio.create_task(coro, name=what)
        self.tasks.add(task)
        task.add_done_callback(done)

    async def wait(self, limit_seconds: float | None = None) -> None:
        """Wait for the errands under way (at most ``limit_seconds``)."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=limit_seconds)
