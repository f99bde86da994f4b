"""kopf handlers: Workflow and EdgeSite reconciliation, bridged to the sites.

How the pieces fit:

* kopf calls the handlers below for Workflow events, create/resume/update/
  delete and for EdgeSite events.  A new Workflow is validated with the
  shared pydantic model, placed on a site, its status set to Assigned
  (written *before* the assignment is published, so a fast site can never be
  overwritten by a stale "Assigned"), then sent through the bridge.
* Admission runs from the first watch event that shows the Workflow, not
  from kopf's create handler: kopf calls that only after its finalizer PATCH
  has come back on the watch, which under a burst took seconds.  The create
  and resume handlers stay as the fallback (invalid specs, no matching site
  and its retries, a spec edited before kopf caught up); admission is
  serialized per Workflow, so the two paths never assign twice.  kopf still
  adds the finalizer; a Workflow deleted before it did is cancelled from its
  DELETED event.
* The :class:`~tideflow_operator.bridge.CloudBridge` applies the sites'
  records; :meth:`Runtime.persist` writes each changed Workflow's status as
  one merge patch per batch (many records coalesced), posts an Event per
  phase change, and only then lets the bridge ack the site.
* Nothing is kept only in memory that cannot be rebuilt: on resume the
  views come back from ``.status``, each site's applied mark from its own
  ``state`` message, and what each site was sent from the ledger
  (:mod:`~tideflow_operator.ledger`), which is how a Workflow deleted while
  no operator ran is still cancelled at its site (at start-up and every
  ``reconcile_seconds``).
* Two operators cannot both act unseen: the Assigned status is written only
  over the version admission was decided on, later status writes carry the
  resourceVersion they were based on (a stored finished phase backed by more
  records is never turned back; a hand edit is written over), and Events are
  named by Workflow uid and phase so a second copy is refused.

A Workflow is a run, not a template: once assigned, spec edits other than
``suspend`` are refused with a condition and an Event.  Deleting a Workflow
cancels its run at the site; an offline site never blocks the deletion
(the cancel waits in the broker and is re-sent when the site comes back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf

from tideflow import tracing, wire
from tideflow.aiotasks import BackgroundTaskDied, Supervisor
from tideflow.failpoints import failpoint
from tideflow.logs import trace_extra
from tideflow.spec import SpecError, parse_spec

from . import cron
from .applier import ApplyResult, EpochChange, WorkflowView, parse_rfc3339, rfc3339
from .bridge import BridgeConfig, CloudBridge, InvalidSiteName, check_site_name
from .kube import EDGESITES, GROUP, VERSION, WORKFLOWS, Conflict, Kube, NotFound
from .ledger import Entry, Ledger, spec_digest
from .metrics import SPANS_EXPORTED, STATUS_PATCH_SECONDS, STATUS_PATCHES
from .placement import NoSiteError, SiteCandidate, choose_site
from .presence import PresenceUpdate
from .telemetry import SpanForwarder, exporter_from_environment, root_span

log = logging.getLogger(__name__)

FINALIZER = "tideflow.io/cancel-at-site"
RETIRED_ANNOTATION = "tideflow.io/retired"
CONFLICT_RETRIES = 5
# A status patch slower than this marks a huge Workflow: its next write waits
# SLOW_PATCH_SPACING times as long, so kopf's own patches find a gap.
SLOW_PATCH_SECONDS = 0.3
SLOW_PATCH_SPACING = 3.0
SITE_REFRESH_SECONDS = 30.0
# Admissions go first: other writes wait until none has started for QUIET_SECONDS
# (at most SETTLE_LIMIT_SECONDS), so a burst of Workflows is assigned before
# the API server spends itself on Events, kopf's bookkeeping and progress.
QUIET_SECONDS = 0.25
SETTLE_LIMIT_SECONDS = 3.0
Key = tuple[str, str]


@dataclass
class OperatorConfig:
    broker: str
    username: str | None = None
    password_file: Path | None = None
    tls_ca: Path | None = None
    auto_register: bool = True
    client_id: str = "tideflow-operator"
    status_max_tasks: int = 500
    housekeeping_seconds: float = 1.0
    namespaces: list[str] = field(default_factory=list)  # empty: all namespaces
    # Where the ledger of assignments lives (the operator's own namespace).
    ledger_namespace: str = "default"
    # How often what the sites were sent is compared with the Workflows that exist.
    reconcile_seconds: float = 60.0


CONFIG: OperatorConfig | None = None
RUNTIME: Runtime | None = None
# Set by the CLI to kopf's stop flag: a dead worker stops the whole operator.
STOP_FLAG: asyncio.Event | None = None


class OperatorFailure(BackgroundTaskDied):
    """A background task of the operator died: the operator exits non-zero."""


@dataclass
class CloudRecord:
    """What the cloud knows of one assigned Workflow beyond the site's records."""

    namespace: str
    name: str
    uid: str
    generation: int
    site: str
    body_ref: dict[str, Any]
    trace_id: str
    root_span_id: str
    assigned_at: float
    deadline_seconds: int | None = None
    spec: dict[str, Any] | None = None  # assigned from a watch event; kept till kopf catches up
    override: tuple[str, str, str] | None = None  # phase, reason, message decided by the cloud
    root_emitted: bool = False
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)
    resource_version: str | None = None  # of the last status this process wrote or read
    written: dict[str, Any] | None = None  # the fields of that status compared on resync
    suspend: bool = False  # what the site was last told (assignment, suspend, resume)
    seen_generation: int = 0  # the spec generation already handled
    write_after: float = 0.0  # monotonic: a slow Workflow's next status write waits till then
    # Assigned by another writer (an operator forced active beside this one): this
    # process follows the run (cancel on delete) but never writes its status, whose
    # view may lack records that arrived before it adopted the run.
    observer: bool = False

    @property
    def traceparent(self) -> str:
        return tracing.format_traceparent(self.trace_id, self.root_span_id)

    @property
    def log_extra(self) -> dict[str, str]:
        """``extra=`` for a log line about this run: it carries the run's trace id."""
        return trace_extra(self.trace_id, self.root_span_id)


def essence_of(spec: Mapping[str, Any] | None) -> tuple[bool, str]:
    """(suspend, digest of the rest) of a spec, or of a digest-only diff base."""
    spec = dict(spec or {})
    if "specDigest" in spec and set(spec) <= {"suspend", "specDigest"}:
        return bool(spec.get("suspend", False)), str(spec["specDigest"])
    return bool(spec.get("suspend", False)), spec_digest(spec)


FINISHED = ("Succeeded", "Failed", "Cancelled")
WATCHED_FIELDS = ("phase", "progress", "site", "syncedSeq", "reason", "suspended")


_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_LABEL_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _label_ok(key: str, value: str) -> bool:
    """A Kubernetes label: ``[prefix/]name`` with a name and a value of at most 63 characters."""
    prefix, _, name = key.rpartition("/")
    return (
        bool(name)
        and _LABEL_NAME.fullmatch(name) is not None
        and (not prefix or _LABEL_PREFIX.fullmatch(prefix) is not None)
        and _LABEL_NAME.fullmatch(value) is not None
    )


def _newer(version: Any, than: Any) -> bool:
    """Is ``version`` a later resourceVersion than ``than``?  (etcd's are integers.)"""
    if version is None:
        return False
    if than is None:
        return True
    try:
        return int(version) > int(than)
    except (TypeError, ValueError):
        return bool(version != than)


def _finished(phase: Any) -> bool:
    return phase in FINISHED


def _watched(status: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a status that the resync compares with what was written."""
    return {k: status.get(k) for k in WATCHED_FIELDS}


def _now() -> str:
    return rfc3339(time.time()) or ""


def _condition(
    record: CloudRecord | None, kind: str, status: bool, reason: str, message: str = ""
) -> dict[str, Any]:
    value = "True" if status else "False"
    previous = record.conditions.get(kind) if record else None
    since = previous["lastTransitionTime"] if previous and previous["status"] == value else _now()
    condition = {
        "type": kind, "status": value, "reason": reason, "message": message,
        "lastTransitionTime": since,
    }  # fmt: skip
    if record is not None:
        record.conditions[kind] = condition
    return condition


class Runtime:
    """Everything one operator process holds; created by the startup handler."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.kube = Kube()
        self.bridge = CloudBridge(
            BridgeConfig(
                broker=config.broker,
                client_id=config.client_id,
                username=config.username,
                password_file=config.password_file,
                tls_ca=config.tls_ca,
            ),
            persist=self.persist,
            on_presence=self.on_presence,
            on_epoch=self.on_epoch,
        )
        self.applier = self.bridge.applier
        self.records: dict[Key, CloudRecord] = {}
        self.sites: dict[str, dict[str, Any]] = {}  # EdgeSite name -> {labels, status}
        self.dirty: set[Key] = set()
        self.status_patches = 0
        self._admitting: dict[Key, asyncio.Lock] = {}
        self._admissions = 0  # in flight
        self._last_admission = 0.0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._background: set[asyncio.Task[None]] = set()
        self._site_written: dict[str, tuple[dict[str, Any], float]] = {}
        self._housekeeping: asyncio.Task[None] | None = None
        # A worker that dies stops the operator (non-zero exit), never a silent limp.
        self.supervisor = Supervisor(self._worker_died, failure_type=OperatorFailure)
        self.spans = SpanForwarder(exporter_from_environment())
        self.ledger = Ledger(self.kube, config.ledger_namespace)
        self.suspect: set[Key] = set()  # statuses seen to differ from what we wrote
        self._last_reconcile = 0.0
        self._conflict_warned: set[Key] = set()
        self._bad_labels_warned: set[str] = set()

    async def start(self) -> None:
        # Views must be back from .status before the first record arrives:
        # a record applied to a blank view would be lost when the view loads.
        await self.ledger.load()
        items = await self.kube.list_workflows(self.config.namespaces)
        for item in items:
            status = dict(item.get("status") or {})
            if status.get("assignedGeneration"):
                # A Workflow being deleted is restored too (nothing re-sent): kopf's
                # delete handler then finds its run and cancels it at the site.
                self._restore(item, status)
        existing = {str(item["metadata"]["uid"]) for item in items}
        self.cancel_gone(existing, self._my_entries(), "deleted while the operator was away")
        await cron.attach(self)  # before the first record: fired runs must be recognised
        await self.bridge.start()
        if self.bridge.worker is not None:
            self.supervisor.watch(self.bridge.worker, forever=True)
        self._last_reconcile = time.monotonic()
        self._housekeeping = self.supervisor.spawn(self._housekeep(), "housekeeping", forever=True)

    def _my_entries(self) -> list[Entry]:
        """Ledger entries of the namespaces this operator watches (another may share the ledger)."""
        namespaces = set(self.config.namespaces)
        return [e for e in self.ledger.all() if not namespaces or e.namespace in namespaces]

    def cancel_gone(self, existing: set[str], entries: list[Entry], why: str) -> int:
        """Cancel at its site each ledger entry whose Workflow no longer exists.

        ``existing`` holds the uids of the Workflows that exist (listed after
        ``entries`` were taken, so an entry made meanwhile is never judged gone);
        a run this process still holds a record of is not gone either.
        """
        held = {record.uid for record in self.records.values()}
        cancelled = 0
        for entry in entries:
            if entry.uid in existing or entry.uid in held:
                continue
            cancelled += 1
            log.info(
                "Workflow %s/%s (uid %s) is gone but site %s was sent it (%s): cancelling",
                entry.namespace, entry.name, entry.uid, entry.site, why,
            )  # fmt: skip
            if self._cancel(entry.site, entry.uid, f"Workflow deleted ({why})"):
                self.ledger.discard(entry.site, entry.uid)
        return cancelled

    def _cancel(self, site: str, uid: str, reason: str) -> bool:
        """Send a cancel; True if it reached a connected link (it is re-sent anyway)."""
        try:
            return self.bridge.control(
                site, wire.ControlPayload(action="cancel", uid=uid, reason=reason)
            )
        except InvalidSiteName:
            return True  # nothing was ever sent there

    def _worker_died(self) -> None:
        if STOP_FLAG is not None:
            STOP_FLAG.set()

    async def stop(self) -> None:
        self.spans.shutdown()
        await self.supervisor.stop()
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        await self.bridge.stop()

    def _admission_started(self) -> None:
        self._admissions += 1
        self._quiet.clear()

    def _admission_done(self) -> None:
        loop = asyncio.get_running_loop()
        self._admissions -= 1
        self._last_admission = loop.time()
        loop.call_later(QUIET_SECONDS, self._check_quiet)

    def _check_quiet(self) -> None:
        loop = asyncio.get_running_loop()
        if self._admissions == 0 and loop.time() - self._last_admission >= QUIET_SECONDS * 0.9:
            self._quiet.set()

    async def settled(self) -> None:
        """Wait until admissions have paused (at most SETTLE_LIMIT_SECONDS)."""
        if not self._quiet.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), timeout=SETTLE_LIMIT_SECONDS)

    async def _after_admissions(self, coro: Coroutine[Any, Any, None]) -> None:
        await self.settled()
        await coro

    def _soon(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run ``coro`` off the caller's path (Events); failures are logged."""

        def done(task: asyncio.Task[None]) -> None:
            self._background.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.warning("%s failed: %s", what, task.exception())

        task = asyncio.create_task(coro, name=what)
        self._background.add(task)
        task.add_done_callback(done)

    # ------------------------------------------------------------- admission
    async def admit(self, body: kopf.Body, *, eager: bool = False) -> bool:
        """Validate, place, mark Assigned and send; at most once per Workflow.

        ``eager`` (from a watch event) takes only the happy path: an invalid
        spec or no matching site is left to kopf's create handler, which
        reports it and retries.  Calls for the same Workflow are serialized,
        and one that finds it already assigned does nothing (or, from kopf's
        handlers, applies a spec edited since the eager assignment).
        """
        meta = body["metadata"]
        if cron.CRON_LABEL in (meta.get("labels") or {}):
            return False  # a run a site's schedule fired: it is the site's already (cron.py)
        key = (meta["namespace"], meta["name"])
        lock = self._admitting.setdefault(key, asyncio.Lock())
        async with lock:
            record = self.records.get(key)
            if record is not None and record.uid == meta["uid"]:
                if not eager and record.spec is not None:
                    await self._caught_up(body, record)
                return False
            self._admission_started()
            try:
                send = await self._admit(body, eager=eager)
            finally:
                self._admission_done()
            if send is None:
                return False
            if self._admissions:
                # A burst: its Assigned statuses go out before any site starts
                # running (and competing with the API server for the same CPU).
                await self.settled()
            send()
            return True

    async def _caught_up(self, body: kopf.Body, record: CloudRecord) -> None:
        """kopf's create handler for a Workflow a watch event already assigned.

        kopf stores the spec it sees now as the base of later diffs: an edit
        made in between would never reach the update handler, so apply it here.
        """
        assigned, record.spec = record.spec, None
        if int(body["metadata"].get("generation") or 1) != record.generation:
            await self.spec_changed(body, {"spec": assigned}, {"spec": body.get("spec")})

    async def _admit(self, body: kopf.Body, *, eager: bool) -> Callable[[], None] | None:
        """Everything up to the Assigned status; returns what sends it to the site."""
        meta, status = body["metadata"], dict(body.get("status") or {})
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        generation = int(meta.get("generation") or 1)
        if status.get("assignedGeneration"):
            self._restore(body, status)
            return None
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError as exc:
            if eager:
                return None
            message = str(exc)
            await self._patch(namespace, name, {
                "phase": "Failed", "reason": "InvalidSpec", "message": message,
                "observedGeneration": generation,
                "conditions": [_condition(None, "Accepted", False, "InvalidSpec", message)],
            })  # fmt: skip
            await self.kube.event(
                dict(body), "Workflow", "InvalidSpec", message, warning=True,
                once=f"invalid-spec-g{generation}",
            )  # fmt: skip
            return None
        try:
            # Candidates cost a pass over every record: build them only for a selector.
            explicit = spec.placement is not None and spec.placement.site is not None
            site = choose_site(spec.placement, [] if explicit else self._candidates())
            check_site_name(site)
            if self._retired(site):
                raise NoSiteError(
                    f"site {site} is retired (annotation {RETIRED_ANNOTATION}): "
                    "no new Workflows are placed there"
                )
        except InvalidSiteName as exc:
            # Never published: a wildcard or '/' in a topic would break the link.
            if eager:
                return None
            message = f"spec.placement.site: {exc}"
            await self._patch(namespace, name, {
                "phase": "Failed", "reason": "InvalidPlacement", "message": message,
                "observedGeneration": generation,
                "conditions": [
                    _condition(None, "Accepted", False, "InvalidPlacement", message),
                ],
            })  # fmt: skip
            await self.kube.event(
                dict(body), "Workflow", "InvalidPlacement", message, warning=True,
                once=f"invalid-placement-g{generation}",
            )  # fmt: skip
            return None
        except NoSiteError as exc:
            if eager:
                return None
            reason = "SiteRetired" if "retired" in str(exc) else "NoMatchingSite"
            await self._patch(namespace, name, {
                "phase": "Pending", "reason": reason, "message": str(exc),
                "observedGeneration": generation,
                "conditions": [
                    _condition(None, "Accepted", True, "Valid"),
                    _condition(None, "Assigned", False, reason, str(exc)),
                ],
            })  # fmt: skip
            raise kopf.TemporaryError(str(exc), delay=10) from None
        record = CloudRecord(
            namespace=namespace, name=name, uid=uid, generation=generation, site=site,
            body_ref={"metadata": {"name": name, "namespace": namespace, "uid": uid}},
            trace_id=tracing.new_trace_id(), root_span_id=tracing.new_span_id(),
            assigned_at=time.time(), deadline_seconds=spec.deadline_seconds,
            spec=dict(body["spec"]) if eager else None,
            suspend=bool(spec.suspend), seen_generation=generation,
        )  # fmt: skip
        self.records[(namespace, name)] = record
        view = self.applier.expect(
            namespace, name, uid, generation,
            [t.name for t in spec.tasks], compensation_names=[t.name for t in spec.on_failure],
            site=site,
        )  # fmt: skip
        connected = self.bridge.presence.connected(site)
        status = self._render(view, record)
        status.update({
            "assignedGeneration": generation, "assignedAt": rfc3339(record.assigned_at),
            "traceId": record.trace_id, "rootSpanId": record.root_span_id,
            "observedGeneration": generation,
        })  # fmt: skip
        entry = Entry(
            site=site, uid=uid, namespace=namespace, name=name, generation=generation,
            spec_digest=spec_digest(body["spec"]),
        )  # fmt: skip
        try:
            # The ledger entry is stored before the site can receive anything, so a
            # restarted operator can cancel the run even if the Workflow is gone.
            written, _ = await asyncio.gather(
                self._admission_patch(body, status), self.ledger.record(entry)
            )
        except Exception:  # not assigned after all: kopf's create handler tries again
            self.records.pop((namespace, name), None)  # (the view stays: same uid comes back)
            raise
        if not written:
            # Gone, or assigned by another operator meanwhile.
            if self.records.get((namespace, name)) is record:
                self.records.pop((namespace, name), None)
            return None
        record.written = _watched(status)
        payload = wire.AssignPayload(
            uid=uid, generation=generation, namespace=namespace, name=name, spec=dict(body["spec"])
        )
        where = "" if connected else " (site offline: the assignment waits for it)"
        message = f"assigned to site {site}{where}"
        log.info("Workflow %s/%s %s", namespace, name, message, extra=record.log_extra)

        def send() -> None:
            if self.records.get((namespace, name)) is not record:
                return  # deleted (or replaced) meanwhile
            self.bridge.assign(site, payload, record.traceparent)
            if spec.suspend:
                self.bridge.control(site, wire.ControlPayload(action="suspend", uid=uid))
            # The Event is for people: it must not hold up the assignment or kopf's next step.
            self._soon(
                self._after_admissions(
                    self.kube.event(
                        record.body_ref, "Workflow", "Assigned", message, once="assigned"
                    )
                ),
                f"Event Assigned for {namespace}/{name}",
            )

        return send

    async def _admission_patch(self, body: kopf.Body, status: dict[str, Any]) -> bool:
        """Write the Assigned status, only over the version admission was decided on.

        A conflict is looked at: kopf's own finalizer patch is harmless (write
        again on the new version); a status with ``assignedGeneration`` means
        another operator assigned it first, and this one must not send it too.
        """
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        version = meta.get("resourceVersion")
        for _ in range(CONFLICT_RETRIES):
            try:
                written = await self._patch(
                    namespace, name, status, urgent=True, resource_version=version
                )
            except Conflict:
                try:
                    current = await self.kube.get_workflow(namespace, name)
                except NotFound:
                    return False
                current_meta = current["metadata"]
                stored = dict(current.get("status") or {})
                if current_meta.get("uid") != meta["uid"] or stored.get("assignedGeneration"):
                    log.warning(
                        "%s/%s was assigned by another writer meanwhile (is a second operator "
                        "running without leader election?); not sending it", namespace, name,
                    )  # fmt: skip
                    if stored.get("assignedGeneration") and current_meta.get("uid") == meta["uid"]:
                        self.records.pop((namespace, name), None)
                        self._restore(current, stored, resend=False)
                        adopted = self.records.get((namespace, name))
                        if adopted is not None:
                            adopted.observer = True
                        return False
                    return False
                version = current_meta.get("resourceVersion")
                continue
            return written
        raise kopf.TemporaryError(f"{namespace}/{name} kept changing while being assigned", delay=1)

    def _retired(self, site: str) -> bool:
        return bool((self.sites.get(site) or {}).get("retired"))

    def _restore(
        self, body: Mapping[str, Any], status: dict[str, Any], *, resend: bool = True
    ) -> None:
        meta = body["metadata"]
        # A fired run's site uid is derived from its schedule (cron.py), not the object's.
        namespace, name, uid = meta["namespace"], meta["name"], status.get("runUid") or meta["uid"]
        resend = resend and not status.get("runUid")  # the site fired it: nothing to send
        generation = int(status["assignedGeneration"])
        key = (namespace, name)
        if key in self.records:
            return
        site = str(status.get("site"))
        record = CloudRecord(
            namespace=namespace, name=name, uid=uid, generation=generation, site=site,
            body_ref={"metadata": {"name": name, "namespace": namespace, "uid": meta["uid"]}},
            trace_id=str(status.get("traceId") or tracing.new_trace_id()),
            root_span_id=str(status.get("rootSpanId") or tracing.new_span_id()),
            assigned_at=parse_rfc3339(status.get("assignedAt")) or time.time(),
            deadline_seconds=(body.get("spec") or {}).get("deadlineSeconds"),
            conditions={c["type"]: c for c in status.get("conditions") or [] if "type" in c},
        )  # fmt: skip
        if status.get("reason") == "DeadlineExceeded":
            record.override = ("Failed", "DeadlineExceeded", str(status.get("message") or ""))
        record.resource_version = meta.get("resourceVersion")
        record.seen_generation = int(meta.get("generation") or generation)
        record.suspend = bool((body.get("spec") or {}).get("suspend", False))
        self.records[key] = record
        view = WorkflowView.from_status(
            status, namespace=namespace, name=name, uid=uid, generation=generation
        )
        view.site = site
        if view.phase == "Assigned":
            view.phase = "Pending"
        self.applier.load(view)
        record.written = _watched(status)
        if view.done:  # finished while no operator ran: its ledger entry has done its job
            self.ledger.discard(site, uid)
        if resend and not view.done:
            # Pending: the site may never have received it (duplicates are harmless).
            # Otherwise kept, to send again if the site's database is replaced.
            self._resend_assignment(body, record, held=view.phase != "Pending")
        if resend and not view.done and record.suspend != bool(status.get("suspended", False)):
            # spec.suspend changed while no operator ran (or the site has not said yet).
            action = "suspend" if record.suspend else "resume"
            with contextlib.suppress(InvalidSiteName):
                self.bridge.control(site, wire.ControlPayload(action=action, uid=uid))

    def _resend_assignment(
        self, body: Mapping[str, Any], record: CloudRecord, *, held: bool = False
    ) -> None:
        """Send again exactly what was assigned, or nothing (``held``: keep it only).

        The ledger keeps the digest of the assigned spec: a spec edited since
        (refused with SpecChangeRefused) must never reach the site.  The ledger
        also keeps the assignment as sent when an edit was refused before the
        site confirmed it; an edit made while no operator ran is not sent, and
        the Workflow says so.  Without an entry (assigned by an older operator)
        the spec is the assigned one only if no edit raised the generation.
        """
        spec = dict(body.get("spec") or {})
        entry = self.ledger.get(record.site, record.uid)
        generation = int(body["metadata"].get("generation") or 1)
        same = (
            entry.spec_digest == spec_digest(spec)
            if entry is not None
            else generation == record.generation
        )
        kept = None if same else self.ledger.kept_assigned(record.site, record.uid)
        if kept is not None and entry is not None:
            kept_spec = dict(kept.get("spec") or {})
            if spec_digest(kept_spec) == entry.spec_digest:
                spec, same = kept_spec, True  # exactly what was sent before the edit
        if not same and held:
            return  # the site runs it already; nothing to keep for a database replacement
        if not same:
            message = (
                "the spec was edited while no operator ran, after assignment and before the "
                "site confirmed it; the edit is never sent, and what was assigned is known "
                "only by its digest: if the site does not start the run, delete and re-create "
                "the Workflow"
            )
            log.warning("%s/%s: %s", record.namespace, record.name, message, extra=record.log_extra)
            record.conditions["AssignmentResent"] = _condition(
                record, "AssignmentResent", False, "SpecEdited", message
            )
            self.dirty.add((record.namespace, record.name))
            return
        if entry is None:
            self._soon(
                self.ledger.record(
                    Entry(
                        site=record.site, uid=record.uid, namespace=record.namespace,
                        name=record.name, generation=record.generation,
                        spec_digest=spec_digest(spec),
                    )
                ),
                f"ledger entry for {record.namespace}/{record.name}",
            )  # fmt: skip
        payload = wire.AssignPayload(
            uid=record.uid, generation=record.generation, namespace=record.namespace,
            name=record.name, spec=spec,
        )  # fmt: skip
        try:
            if held:
                check_site_name(record.site)
                self.bridge.remember(record.site, payload, record.traceparent)
            else:
                self.bridge.assign(record.site, payload, record.traceparent)
        except InvalidSiteName as exc:
            log.error(
                "%s/%s: not re-sent: %s", record.namespace, record.name, exc, extra=record.log_extra
            )

    # ------------------------------------------------------------- updates
    async def spec_changed(self, body: kopf.Body, old: Any, new: Any) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        record = self.records.get(key)
        generation = int(meta.get("generation") or 1)
        if record is None:
            # Not assigned yet (invalid or waiting for a site): try again with the new spec.
            await self.admit(body)
            return
        was, old_digest = essence_of((old or {}).get("spec"))
        now, new_digest = essence_of((new or {}).get("spec"))
        patch: dict[str, Any] = {"observedGeneration": generation}
        if old_digest != new_digest:
            # Not yet confirmed by the site: keep what was sent, so that a restarted
            # operator re-sends that and never this edit.
            sent = self.bridge.unconfirmed_assignment(record.site, record.uid)
            if sent is not None:
                try:
                    await self.ledger.keep_assigned(record.site, record.uid, sent)
                except Exception as exc:
                    log.warning(
                        "%s/%s: could not keep the assignment: %s", *key, exc,
                        extra=record.log_extra,
                    )  # fmt: skip
            message = (
                "a Workflow is a run, not a template: spec changes after assignment are "
                "ignored (only spec.suspend applies); create a new Workflow instead"
            )
            patch["conditions"] = self._conditions(record, refused=message)
            await self.kube.event(
                dict(body), "Workflow", "SpecChangeRefused", message, warning=True,
                once=f"refused-g{generation}",
            )  # fmt: skip
        del was  # what counts is what the site was last told
        record.seen_generation = max(record.seen_generation, generation)
        await self._apply_suspend(body, record, now)
        await self._patch(*key, patch)

    async def _apply_suspend(self, body: Mapping[str, Any], record: CloudRecord, now: bool) -> None:
        """Tell the site when ``spec.suspend`` differs from what it was last told (idempotent)."""
        if now == record.suspend:
            return
        record.suspend = now
        generation = int(body["metadata"].get("generation") or 1)
        action = "suspend" if now else "resume"
        self.bridge.control(record.site, wire.ControlPayload(action=action, uid=record.uid))
        await self.kube.event(
            dict(body), "Workflow", "Suspended" if now else "Resumed",
            f"{action} sent to site {record.site}", once=f"{action}-g{generation}",
        )  # fmt: skip

    async def spec_seen(self, body: Mapping[str, Any]) -> None:
        """A new spec generation seen on the watch: apply ``suspend`` without kopf's diff.

        kopf calls the update handler only once it has stored its diff base, and
        on a huge Workflow whose status changes every few seconds its patches
        kept losing the race; the watch sees every generation regardless.  The
        rest (refusing other edits) stays with the update handler, which knows
        the old spec; both paths are idempotent.
        """
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        record = self.records.get(key)
        generation = int(meta.get("generation") or 1)
        if record is None or record.uid != meta.get("uid"):
            return
        if generation <= record.seen_generation:
            return
        record.seen_generation = generation
        suspend = bool((body.get("spec") or {}).get("suspend", False))
        await self._apply_suspend(body, record, suspend)

    async def deleted(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        record = self.records.pop(key, None)
        view = self.applier.view(*key)
        if record is not None and (view is None or not view.done):
            if self._cancel(record.site, record.uid, "Workflow deleted"):
                self.ledger.discard(record.site, record.uid)
            # else: the ledger keeps it; the periodic reconcile sends the cancel again
        elif record is not None:
            self.ledger.discard(record.site, record.uid)
        if record is not None:
            self.bridge.forget_assignment(record.site, record.uid)
        self.applier.forget(*key)
        self.dirty.discard(key)
        self._admitting.pop(key, None)

    async def gone(self, body: kopf.Body) -> None:
        """A DELETED watch event: cancel a run whose Workflow never got kopf's finalizer.

        (Assigned from its first event, deleted before kopf added the finalizer;
        with the finalizer, the delete handler already did this.)
        """
        meta = body["metadata"]
        record = self.records.get((meta["namespace"], meta["name"]))
        if record is not None and record.uid == meta["uid"]:
            await self.deleted(body)

    # ------------------------------------------------------------- statuses
    def _conditions(self, record: CloudRecord, refused: str | None = None) -> list[dict[str, Any]]:
        view = self.applier.view(record.namespace, record.name)
        connected = self.bridge.presence.connected(record.site)
        done = (view is not None and view.done) or record.override is not None
        phase = record.override[0] if record.override else (view.phase if view else "Pending")
        conditions = [
            _condition(record, "Accepted", True, "Valid"),
            _condition(record, "Assigned", True, "Sent", f"site {record.site}"),
            _condition(
                record, "SiteConnected", connected, "Online" if connected else "Offline",
                "" if connected else "the site's records will sync when its link returns",
            ),
            _condition(record, "Completed", done, phase if done else "NotFinished"),
        ]  # fmt: skip
        if refused is not None:
            conditions.append(_condition(record, "SpecChangeRefused", True, "Immutable", refused))
        elif "SpecChangeRefused" in record.conditions:
            conditions.append(record.conditions["SpecChangeRefused"])
        if "AssignmentResent" in record.conditions:
            conditions.append(record.conditions["AssignmentResent"])
        return conditions

    def _render(self, view: WorkflowView, record: CloudRecord) -> dict[str, Any]:
        status = view.to_status(max_tasks=self.config.status_max_tasks)
        status.pop("observedGeneration", None)
        if status["phase"] == "Pending":
            status["phase"] = "Assigned"
        if record.override is not None:
            status["phase"], status["reason"], status["message"] = record.override
        status["site"] = record.site
        status["siteConnected"] = self.bridge.presence.connected(record.site)
        status["traceId"] = record.trace_id
        status["conditions"] = self._conditions(record)
        return status

    async def _patch(
        self,
        namespace: str,
        name: str,
        status: dict[str, Any],
        *,
        urgent: bool = False,
        resource_version: str | None = None,
    ) -> bool:
        started = time.monotonic()
        try:
            version = await self.kube.patch_workflow_status(
                namespace, name, status, urgent=urgent, resource_version=resource_version
            )
        except NotFound:
            return False
        record = self.records.get((namespace, name))
        took = time.monotonic() - started
        if record is not None:
            record.resource_version = version
            record.write_after = time.monotonic() + (
                min(SLOW_PATCH_SPACING * took, 30.0) if took >= SLOW_PATCH_SECONDS else 0.0
            )
        self.status_patches += 1
        STATUS_PATCHES.inc()
        STATUS_PATCH_SECONDS.observe(time.monotonic() - started)
        log.debug("status of %s/%s patched in %.3fs", namespace, name, time.monotonic() - started)
        return True

    async def write_status(self, key: Key) -> bool:
        view, record = self.applier.view(*key), self.records.get(key)
        if record is None and cron.awaiting(key):
            return False  # a fired run whose Workflow is not made yet: hold the ack back
        if view is None or record is None or record.observer:
            if view is not None:  # nothing to write: it must not hold the site's ack back
                self.applier.mark_persisted(*key, view.synced_seq)
            return True
        try:
            found = await self._write_over(key, view, record)
        except Exception as exc:  # API server away: keep it dirty, retry, ack later
            log.warning(
                "status patch of %s/%s failed (%s); will retry", *key, exc, extra=record.log_extra
            )
            self.dirty.add(key)
            return False
        if not found:
            self.applier.forget(*key)
        self.applier.mark_persisted(*key, view.synced_seq)
        self.dirty.discard(key)
        self.suspect.discard(key)
        if view.done and found:
            self.ledger.discard(record.site, record.uid)
        return True

    async def _write_over(self, key: Key, view: WorkflowView, record: CloudRecord) -> bool:
        """Patch the status over the version this process last saw, never over a newer end.

        Optimistic concurrency: the patch names the resourceVersion of the last
        status this process wrote or read.  On a conflict the stored status is
        read: a status stored from more records of the same site database than
        this view holds (``syncedEpoch``/``syncedSeq``) came from a newer view
        (another operator, or records this one has not applied yet) and is left
        alone; anything else (kopf's own bookkeeping, a hand edit) is written
        over, on the new version.
        """
        status = self._render(view, record)
        for _ in range(CONFLICT_RETRIES):
            try:
                found = await self._patch(*key, status, resource_version=record.resource_version)
            except Conflict:
                try:
                    current = await self.kube.get_workflow(*key)
                except NotFound:
                    return False
                if current["metadata"].get("uid") != record.uid:
                    return False
                record.resource_version = current["metadata"].get("resourceVersion")
                stored = dict(current.get("status") or {})
                same_db = stored.get("syncedEpoch") in (None, view.synced_epoch)
                newer = same_db and int(stored.get("syncedSeq") or 0) > view.synced_seq
                if newer:
                    if key not in self._conflict_warned:
                        self._conflict_warned.add(key)
                        log.warning(
                            "%s/%s: the stored status (%s) is newer than this operator's view "
                            "(%s); not overwritten (is a second operator running?)",
                            *key, stored.get("phase"), status["phase"], extra=record.log_extra,
                        )  # fmt: skip
                    record.written = _watched(stored)
                    return True
                continue
            if found:
                if (record.written or {}).get("phase") != status["phase"]:
                    log.info("Workflow %s/%s is %s", *key, status["phase"], extra=record.log_extra)
                record.written = _watched(status)
            return found
        raise RuntimeError(f"{key[0]}/{key[1]} kept changing while its status was written")

    def public_phase(self, key: Key) -> str:
        record, view = self.records.get(key), self.applier.view(*key)
        if record is not None and record.override is not None:
            return record.override[0]
        phase = view.phase if view is not None else "Assigned"
        return "Assigned" if phase == "Pending" else phase

    async def _export_traces(self, finished: list[Key]) -> None:
        """Forward the sites' spans, plus the root span of each run that just ended."""
        if not self.spans.enabled:
            self.applier.drain_spans()
            return
        roots = []
        for key in finished:
            record, view = self.records.get(key), self.applier.view(*key)
            if record is None or record.root_emitted:
                continue
            record.root_emitted = True
            phase = self.public_phase(key)
            roots.append(
                root_span(
                    trace_id=record.trace_id, span_id=record.root_span_id,
                    namespace=record.namespace, name=record.name, site=record.site,
                    started=record.assigned_at,
                    finished=view.finished_at if view is not None else None,
                    phase=phase, reason=record.override[1] if record.override else None,
                )
            )  # fmt: skip
        records = [(span.site, span.body) for span in self.applier.drain_spans()]
        try:
            await self.spans.forward(records, roots)
            SPANS_EXPORTED.inc(len(records) + len(roots))
        except Exception as exc:  # a collector outage must not stop status updates
            log.warning("trace export failed: %s", exc)

    async def persist(self, result: ApplyResult) -> None:
        """The bridge applied records: write each changed status once, post Events.

        A Workflow whose last status patch was slow (a huge one: the API server
        validates the whole object on every write) is written at most every few
        patch durations, phase changes excepted; the rest waits in ``dirty``
        (and its records' ack with it).  Back-to-back writes left kopf no gap:
        its finalizer patch conflicted with every one of them.
        """
        await self.settled()
        await cron.materialize(self, result.changed)  # objects for fired runs, before the ack
        now = time.monotonic()
        moved = {change.key for change in result.transitions}
        due = []
        for key in result.changed:
            record = self.records.get(key)
            if record is not None and key not in moved and now < record.write_after:
                self.dirty.add(key)
            else:
                due.append(key)
        await asyncio.gather(*(self.write_status(key) for key in due))
        await self._export_traces(
            [c.key for c in result.transitions if c.new in ("Succeeded", "Failed", "Cancelled")]
        )
        for change in result.transitions:
            record = self.records.get(change.key)
            if record is None or record.observer:
                continue
            message = f"{change.old} -> {change.new}"
            if change.message:
                message += f": {change.message}"
            # Named by phase: a retry, or a second operator, cannot post it twice.
            await self.kube.event(
                record.body_ref, "Workflow", change.new, message,
                warning=change.new == "Failed", once=change.new.lower(),
            )  # fmt: skip

    async def on_presence(self, update: PresenceUpdate) -> None:
        info = update.info
        labels = self._agent_labels(info.site, info.labels)
        if info.site not in self.sites and self.config.auto_register:
            try:
                check_site_name(info.site)
                # Registered with the labels the agent reports (--labels).
                await self.kube.create_edgesite(info.site, labels)
                self.sites[info.site] = {"labels": labels, "status": {}}
            except Exception as exc:
                log.warning("could not register EdgeSite %s: %s", info.site, exc)
        elif info.site in self.sites and labels:
            await self._merge_agent_labels(info.site, labels)
        status = info.to_status()
        # Heartbeats arrive every few seconds per site: write only what changed,
        # and lastSeen at most every SITE_REFRESH_SECONDS.
        written = self._site_written.get(info.site)
        now = time.monotonic()
        essentials = {k: v for k, v in status.items() if k != "lastSeen"}
        if written and written[0] == essentials and now - written[1] < SITE_REFRESH_SECONDS:
            return
        try:
            await self.kube.patch_edgesite_status(info.site, status)
            self._site_written[info.site] = (essentials, now)
        except NotFound:
            log.info("site %s is not registered (auto-register is off)", info.site)
        except Exception as exc:
            log.warning("could not update EdgeSite %s: %s", info.site, exc)
        if update.came_online or update.went_offline:
            for key, record in list(self.records.items()):
                if record.site == info.site:
                    await self.write_status(key)

    async def on_epoch(self, change: EpochChange) -> None:
        """A site's agent runs on a new database: say so on its EdgeSite."""
        if change.old is None:
            message = (
                f"the agent's database {change.new} does not hold {len(change.lost)} unfinished"
                " runs synced from another database; they were sent again"
            )
        else:
            message = (
                f"the agent now runs on a new database ({change.old} -> {change.new}): the"
                f" site's sequence starts again and {len(change.lost)} unfinished runs were"
                " sent again"
            )
        uid = (self.sites.get(change.site) or {}).get("uid")
        await self.kube.event(
            {"metadata": {"name": change.site, "uid": uid}}, "EdgeSite", "DatabaseReplaced",
            message, warning=True,
        )  # fmt: skip

    def _agent_labels(self, site: str, labels: Mapping[str, str]) -> dict[str, str]:
        """The agent's labels that Kubernetes accepts; the rest are said once and left out."""
        good = {k: v for k, v in labels.items() if _label_ok(k, v)}
        bad = sorted(set(labels) - set(good))
        if bad and site not in self._bad_labels_warned:
            self._bad_labels_warned.add(site)
            log.warning("site %s reports labels Kubernetes refuses (%s); left out", site, bad)
        return good

    async def _merge_agent_labels(self, site: str, labels: Mapping[str, str]) -> None:
        """The agent owns the label keys it reports: put back any that differ.

        Keys the agent does not report belong to whoever set them (kubectl);
        they are never touched.  A key the agent stops reporting stays as it was.
        """
        current = self.sites[site].get("labels") or {}
        changed = {k: v for k, v in labels.items() if current.get(k) != v}
        if not changed:
            return
        try:
            await self.kube.patch_edgesite_labels(site, changed)
            self.sites[site]["labels"] = {**current, **changed}
        except NotFound:
            pass
        except Exception as exc:
            log.warning("could not update the labels of EdgeSite %s: %s", site, exc)

    def _candidates(self) -> list[SiteCandidate]:
        load: dict[str, int] = {}
        for record in self.records.values():
            view = self.applier.view(record.namespace, record.name)
            if view is None or not view.done:
                load[record.site] = load.get(record.site, 0) + 1
        candidates = []
        for name, site in self.sites.items():
            if site.get("retired"):
                continue
            info = self.bridge.presence.get(name)
            running = info.running if info else int((site.get("status") or {}).get("running") or 0)
            candidates.append(
                SiteCandidate(
                    name=name,
                    labels=site.get("labels") or {},
                    connected=self.bridge.presence.connected(name),
                    load=running + load.get(name, 0),
                )
            )
        return candidates

    # ------------------------------------------------------------- housekeeping
    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(self.config.housekeeping_seconds)
            failpoint("housekeeping")
            try:
                await self._enforce_deadlines()
                now = time.monotonic()
                for key in list(self.dirty | self.suspect):
                    record = self.records.get(key)
                    if record is None or now >= record.write_after:
                        await self.write_status(key)
                for site in self.applier.sites():
                    self.bridge.send_ack(site)
                await self.ledger.flush()
                if time.monotonic() - self._last_reconcile >= self.config.reconcile_seconds:
                    await self.reconcile()
            except Exception:
                log.exception("housekeeping failed; will try again")

    async def reconcile(self) -> int:
        """Cancel the runs whose Workflows are gone (missed deletions); returns how many.

        Two kinds of miss: a ledger entry with no run held (its cancel never got
        out), and a run held whose Workflow vanished without a DELETED event
        reaching kopf (deleted between this process's start-up list and kopf's
        first watch).  Only what was known before the listing started is judged,
        so a Workflow created meanwhile is never taken for gone.
        """
        self._last_reconcile = time.monotonic()
        entries = self._my_entries()
        held = {key: record.uid for key, record in self.records.items()}
        if not entries and not held:
            return 0
        existing = await self.kube.list_workflow_uids(self.config.namespaces)
        vanished = 0
        for (namespace, name), uid in held.items():
            record = self.records.get((namespace, name))
            if uid in existing or record is None or record.uid != uid:
                continue
            log.info("Workflow %s/%s (uid %s) vanished unseen: cancelling", namespace, name, uid)
            await self.deleted({"metadata": {"namespace": namespace, "name": name, "uid": uid}})
            vanished += 1
        alive = {uid for uid, deleting in existing.items() if not deleting}
        return vanished + self.cancel_gone(alive, entries, "deletion not seen")

    def observed(self, body: Mapping[str, Any]) -> None:
        """A watch event of a held Workflow: note its version; a status not ours is suspect.

        A status that differs from what this process last wrote, at a newer
        version than that write (a hand edit, or another writer), is written
        over from this process's view at the next housekeeping round.
        """
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        record = self.records.get(key)
        if record is None or record.uid != meta.get("uid"):
            return
        if int(meta.get("generation") or 1) > record.seen_generation:
            self._soon(self.spec_seen(body), f"spec of {key[0]}/{key[1]}")
        version = meta.get("resourceVersion")
        if not _newer(version, record.resource_version):
            return
        record.resource_version = version
        if record.written is not None and _watched(body.get("status") or {}) != record.written:
            self.suspect.add(key)

    async def _enforce_deadlines(self) -> None:
        now = time.time()
        for key, record in list(self.records.items()):
            view = self.applier.view(*key)
            if (
                record.deadline_seconds is None
                or record.observer
                or record.override is not None
                or (view is not None and view.done)
                or now < record.assigned_at + record.deadline_seconds
            ):
                continue
            message = f"deadline of {record.deadline_seconds}s exceeded"
            record.override = ("Failed", "DeadlineExceeded", message)
            self.bridge.control(
                record.site, wire.ControlPayload(action="cancel", uid=record.uid, reason=message)
            )
            await self.write_status(key)
            await self._export_traces([key])
            await self.kube.event(
                record.body_ref, "Workflow", "DeadlineExceeded", message, warning=True,
                once="deadline",
            )  # fmt: skip


class DigestDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base as a digest: ``{"spec": {"suspend": b, "specDigest": h}}``.

    kopf keeps the last handled state to tell what changed; by default it is a
    copy of the whole spec in an annotation.  At the CRD's 5,000 tasks that copy
    plus kubectl's own ``last-applied-configuration`` passed the API server's
    256 KiB limit on annotations: kopf's PATCH failed with 422 for ever, the
    finalizer was never added and ``suspend`` was ignored.  The handlers only
    need to know whether ``suspend`` changed and whether anything else did,
    so that is all this stores (about 100 bytes, whatever the spec's size).
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        suspend, digest = essence_of(body.get("spec"))
        return {"spec": {"suspend": suspend, "specDigest": digest}}


def runtime() -> Runtime:
    if RUNTIME is None:
        raise kopf.TemporaryError("operator is starting", delay=1)
    return RUNTIME


# ----------------------------------------------------------------- handlers
@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global RUNTIME
    assert CONFIG is not None, "tideflow_operator.cli sets CONFIG before kopf starts"
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="tideflow.io")
    settings.persistence.diffbase_storage = DigestDiffBaseStorage(
        prefix="tideflow.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    RUNTIME = Runtime(CONFIG)
    await RUNTIME.start()


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if RUNTIME is not None:
        await RUNTIME.stop()


@kopf.on.event(GROUP, VERSION, WORKFLOWS)
async def workflow_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    """Assign from the first watch event; kopf's create handler comes much later."""
    rt = RUNTIME
    if rt is None:
        return
    if type == "DELETED":
        await rt.gone(body)
        return
    status = body.get("status") or {}
    if status.get("assignedGeneration"):
        rt.observed(body)
        return
    if body["metadata"].get("deletionTimestamp"):
        return
    if await rt.admit(body, eager=True):
        # kopf's finalizer and bookkeeping PATCHes follow this handler: let the
        # burst's other admissions go first (a deletion meanwhile is seen as DELETED).
        await rt.settled()


@kopf.on.resume(GROUP, VERSION, WORKFLOWS)
@kopf.on.create(GROUP, VERSION, WORKFLOWS)
async def workflow_created(body: kopf.Body, **_: Any) -> None:
    await runtime().admit(body)


@kopf.on.update(GROUP, VERSION, WORKFLOWS, field="spec")
async def workflow_updated(body: kopf.Body, old: Any, new: Any, **_: Any) -> None:
    await runtime().spec_changed(body, {"spec": old}, {"spec": new})


@kopf.on.delete(GROUP, VERSION, WORKFLOWS)
async def workflow_deleted(body: kopf.Body, **_: Any) -> None:
    await runtime().deleted(body)


@kopf.on.event(GROUP, VERSION, EDGESITES)
async def edgesite_event(type: str, body: kopf.Body, name: str, **_: Any) -> None:
    rt = runtime()
    if type == "DELETED":
        rt.sites.pop(name, None)
        return
    annotations = body["metadata"].get("annotations") or {}
    rt.sites[name] = {
        "uid": body["metadata"].get("uid"),
        "labels": dict(body["metadata"].get("labels") or {}),
        "status": dict(body.get("status") or {}),
        "retired": str(annotations.get(RETIRED_ANNOTATION, "")).lower() in ("true", "1", "yes"),
    }
