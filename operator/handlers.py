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
  views come back from ``.status`` and each site's applied mark from its
  own ``state`` message.

A Workflow is a run, not a template: once assigned, spec edits other than
``suspend`` are refused with a condition and an Event.  Deleting a Workflow
cancels its run at the site; an offline site never blocks the deletion
(the cancel waits in the broker and is re-sent when the site comes back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf

from tideflow import tracing, wire
from tideflow.spec import SpecError, parse_spec

from .applier import ApplyResult, EpochChange, WorkflowView, parse_rfc3339, rfc3339
from .bridge import BridgeConfig, CloudBridge
from .kube import EDGESITES, GROUP, VERSION, WORKFLOWS, Kube, NotFound
from .metrics import SPANS_EXPORTED, STATUS_PATCH_SECONDS, STATUS_PATCHES
from .placement import NoSiteError, SiteCandidate, choose_site
from .presence import PresenceUpdate
from .telemetry import SpanForwarder, exporter_from_environment, root_span

log = logging.getLogger(__name__)

FINALIZER = "tideflow.io/cancel-at-site"
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


CONFIG: OperatorConfig | None = None
RUNTIME: Runtime | None = None


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

    @property
    def traceparent(self) -> str:
        return tracing.format_traceparent(self.trace_id, self.root_span_id)


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
        self.spans = SpanForwarder(exporter_from_environment())

    async def start(self) -> None:
        # Views must be back from .status before the first record arrives:
        # a record applied to a blank view would be lost when the view loads.
        for item in await self.kube.list_workflows(self.config.namespaces):
            status = dict(item.get("status") or {})
            if status.get("assignedGeneration") and not item["metadata"].get("deletionTimestamp"):
                self._restore(item, status)
        await self.bridge.start()
        self._housekeeping = asyncio.create_task(self._housekeep(), name="housekeeping")

    async def stop(self) -> None:
        self.spans.shutdown()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
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
            await self.kube.event(dict(body), "Workflow", "InvalidSpec", message, warning=True)
            return None
        try:
            # Candidates cost a pass over every record: build them only for a selector.
            explicit = spec.placement is not None and spec.placement.site is not None
            site = choose_site(spec.placement, [] if explicit else self._candidates())
        except NoSiteError as exc:
            if eager:
                return None
            await self._patch(namespace, name, {
                "phase": "Pending", "reason": "NoMatchingSite", "message": str(exc),
                "observedGeneration": generation,
                "conditions": [
                    _condition(None, "Accepted", True, "Valid"),
                    _condition(None, "Assigned", False, "NoMatchingSite", str(exc)),
                ],
            })  # fmt: skip
            raise kopf.TemporaryError(str(exc), delay=10) from None
        record = CloudRecord(
            namespace=namespace, name=name, uid=uid, generation=generation, site=site,
            body_ref={"metadata": {"name": name, "namespace": namespace, "uid": uid}},
            trace_id=tracing.new_trace_id(), root_span_id=tracing.new_span_id(),
            assigned_at=time.time(), deadline_seconds=spec.deadline_seconds,
            spec=dict(body["spec"]) if eager else None,
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
        try:
            await self._patch(namespace, name, status, urgent=True)
        except Exception:  # not assigned after all: kopf's create handler tries again
            self.records.pop((namespace, name), None)  # (the view stays: same uid comes back)
            raise
        payload = wire.AssignPayload(
            uid=uid, generation=generation, namespace=namespace, name=name, spec=dict(body["spec"])
        )
        where = "" if connected else " (site offline: the assignment waits for it)"
        message = f"assigned to site {site}{where}"

        def send() -> None:
            if self.records.get((namespace, name)) is not record:
                return  # deleted (or replaced) meanwhile
            self.bridge.assign(site, payload, record.traceparent)
            if spec.suspend:
                self.bridge.control(site, wire.ControlPayload(action="suspend", uid=uid))
            # The Event is for people: it must not hold up the assignment or kopf's next step.
            self._soon(
                self._after_admissions(
                    self.kube.event(record.body_ref, "Workflow", "Assigned", message)
                ),
                f"Event Assigned for {namespace}/{name}",
            )

        return send

    def _restore(self, body: Mapping[str, Any], status: dict[str, Any]) -> None:
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        generation = int(status["assignedGeneration"])
        key = (namespace, name)
        if key in self.records:
            return
        site = str(status.get("site"))
        record = CloudRecord(
            namespace=namespace, name=name, uid=uid, generation=generation, site=site,
            body_ref={"metadata": {"name": name, "namespace": namespace, "uid": uid}},
            trace_id=str(status.get("traceId") or tracing.new_trace_id()),
            root_span_id=str(status.get("rootSpanId") or tracing.new_span_id()),
            assigned_at=parse_rfc3339(status.get("assignedAt")) or time.time(),
            deadline_seconds=(body.get("spec") or {}).get("deadlineSeconds"),
            conditions={c["type"]: c for c in status.get("conditions") or [] if "type" in c},
        )  # fmt: skip
        if status.get("reason") == "DeadlineExceeded":
            record.override = ("Failed", "DeadlineExceeded", str(status.get("message") or ""))
        self.records[key] = record
        view = WorkflowView.from_status(
            status, namespace=namespace, name=name, uid=uid, generation=generation
        )
        view.site = site
        if view.phase == "Assigned":
            view.phase = "Pending"
        self.applier.load(view)
        if not view.done:
            spec = dict(body.get("spec") or {})
            payload = wire.AssignPayload(
                uid=uid, generation=generation, namespace=namespace, name=name, spec=spec
            )
            if view.phase == "Pending":
                # The site may never have received it: duplicates are harmless.
                self.bridge.assign(site, payload, record.traceparent)
            else:  # kept to send again if the site's database is replaced
                self.bridge.remember(site, payload, record.traceparent)

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
        old_spec = dict((old or {}).get("spec") or {})
        new_spec = dict((new or {}).get("spec") or {})
        was, now = bool(old_spec.pop("suspend", False)), bool(new_spec.pop("suspend", False))
        patch: dict[str, Any] = {"observedGeneration": generation}
        if old_spec != new_spec:
            message = (
                "a Workflow is a run, not a template: spec changes after assignment are "
                "ignored (only spec.suspend applies); create a new Workflow instead"
            )
            patch["conditions"] = self._conditions(record, refused=message)
            await self.kube.event(
                dict(body), "Workflow", "SpecChangeRefused", message, warning=True
            )
        if was != now:
            action = "suspend" if now else "resume"
            self.bridge.control(record.site, wire.ControlPayload(action=action, uid=record.uid))
            await self.kube.event(
                dict(body), "Workflow", "Suspended" if now else "Resumed",
                f"{action} sent to site {record.site}",
            )  # fmt: skip
        await self._patch(*key, patch)

    async def deleted(self, body: kopf.Body) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        record = self.records.pop(key, None)
        view = self.applier.view(*key)
        if record is not None and (view is None or not view.done):
            self.bridge.control(
                record.site,
                wire.ControlPayload(action="cancel", uid=record.uid, reason="Workflow deleted"),
            )
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
        self, namespace: str, name: str, status: dict[str, Any], *, urgent: bool = False
    ) -> bool:
        started = time.monotonic()
        try:
            await self.kube.patch_workflow_status(namespace, name, status, urgent=urgent)
        except NotFound:
            return False
        self.status_patches += 1
        STATUS_PATCHES.inc()
        STATUS_PATCH_SECONDS.observe(time.monotonic() - started)
        log.debug("status of %s/%s patched in %.3fs", namespace, name, time.monotonic() - started)
        return True

    async def write_status(self, key: Key) -> bool:
        view, record = self.applier.view(*key), self.records.get(key)
        if view is None or record is None:
            if view is not None:  # nothing to write: it must not hold the site's ack back
                self.applier.mark_persisted(*key, view.synced_seq)
            return True
        try:
            found = await self._patch(*key, self._render(view, record))
        except Exception as exc:  # API server away: keep it dirty, retry, ack later
            log.warning("status patch of %s/%s failed (%s); will retry", *key, exc)
            self.dirty.add(key)
            return False
        if not found:
            self.applier.forget(*key)
        self.applier.mark_persisted(*key, view.synced_seq)
        self.dirty.discard(key)
        return True

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
        """The bridge applied records: write each changed status once, post Events."""
        await self.settled()
        await asyncio.gather(*(self.write_status(key) for key in result.changed))
        await self._export_traces(
            [c.key for c in result.transitions if c.new in ("Succeeded", "Failed", "Cancelled")]
        )
        for change in result.transitions:
            record = self.records.get(change.key)
            if record is None:
                continue
            message = f"{change.old} -> {change.new}"
            if change.message:
                message += f": {change.message}"
            await self.kube.event(
                record.body_ref, "Workflow", change.new, message, warning=change.new == "Failed"
            )

    async def on_presence(self, update: PresenceUpdate) -> None:
        info = update.info
        if info.site not in self.sites and self.config.auto_register:
            try:
                await self.kube.create_edgesite(info.site, {})
            except Exception as exc:
                log.warning("could not register EdgeSite %s: %s", info.site, exc)
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

    def _candidates(self) -> list[SiteCandidate]:
        load: dict[str, int] = {}
        for record in self.records.values():
            view = self.applier.view(record.namespace, record.name)
            if view is None or not view.done:
                load[record.site] = load.get(record.site, 0) + 1
        candidates = []
        for name, site in self.sites.items():
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
            try:
                await self._enforce_deadlines()
                for key in list(self.dirty):
                    await self.write_status(key)
                for site in self.applier.sites():
                    self.bridge.send_ack(site)
            except Exception:
                log.exception("housekeeping failed; will try again")

    async def _enforce_deadlines(self) -> None:
        now = time.time()
        for key, record in list(self.records.items()):
            view = self.applier.view(*key)
            if (
                record.deadline_seconds is None
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
                record.body_ref, "Workflow", "DeadlineExceeded", message, warning=True
            )


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
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
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
    if body["metadata"].get("deletionTimestamp") or status.get("assignedGeneration"):
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
    rt.sites[name] = {
        "uid": body["metadata"].get("uid"),
        "labels": dict(body["metadata"].get("labels") or {}),
        "status": dict(body.get("status") or {}),
    }
