"""Admission: a new Workflow validated, placed, marked Assigned, then sent — once.

The steps of :meth:`Admission.admit`, each a method below:

1. **parse** the spec with the shared pydantic model (invalid: Failed,
   ``InvalidSpec``);
2. **place** it on a site (a site name that cannot be a topic: Failed,
   ``InvalidPlacement``; no matching or a retired site: Pending, and the
   Workflow waits in :class:`~tideflow_operator.watch.WorkflowWatch`, which
   tries again when the sites change and every ``RETRY_SECONDS``);
3. **hold** it: a :class:`~tideflow_operator.model.CloudRecord`, the
   applier's view, and the Assigned status rendered from both;
4. **mark it assigned**: the Assigned status, written only over the
   resourceVersion admission was decided on, together with the ledger entry
   (stored before the site can receive anything, so a restarted operator can
   cancel the run even if the Workflow is gone).  A conflict with another
   operator's Assigned status adopts its run as an observer instead;
5. **send** it — returned as a callable, so that a burst's Assigned statuses
   all go out before any site starts running (and competing with the API
   server for the same CPU).

Admission runs from the watch alone (:mod:`.watch`: the first event that
shows the Workflow, a new generation of one not assigned yet, a retry); kopf
has no changing handler for Workflows, so it writes no finalizer and no
annotation (decision 0019).  Calls for one Workflow are serialized and one
that finds it already assigned does nothing, so no path assigns twice.  Each
call says what became of the Workflow (:class:`Outcome`).

:class:`AdmissionGate` lets admissions go first: other writes wait until none
has started for ``quiet_seconds`` (at most ``SETTLE_LIMIT_SECONDS``), so a
burst of Workflows is assigned before the API server spends itself on
Events, kopf's bookkeeping and progress.

:meth:`Admission.restore` brings back a run already assigned (at start-up,
or when admission finds ``assignedGeneration``), and re-sends exactly what
was assigned (:meth:`Admission.resend_assignment`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from tideflow import wire
from tideflow.phases import RunPhase
from tideflow.spec import SpecError, WorkflowSpec, parse_spec

from . import cron
from .applier import Applier, WorkflowView, parse_rfc3339, rfc3339
from .bridge import CloudBridge, InvalidSiteName, check_site_name
from .kube import Conflict, Kube, NotFound
from .ledger import Entry, Ledger, spec_digest
from .metrics import ADMISSION_SECONDS
from .model import (
    CloudRecord,
    Errands,
    Held,
    Key,
    Override,
    Since,
    condition,
    site_phase,
    watched,
)
from .placement import NoSiteError, SiteCandidate, choose_site
from .sites import RETIRED_ANNOTATION, Sites
from .status import CONFLICT_RETRIES, StatusWriter

log = logging.getLogger(__name__)

QUIET_SECONDS = 0.25
SETTLE_LIMIT_SECONDS = 3.0
# Failed reasons that only a new spec (generation) can change.
REFUSALS = frozenset({"InvalidSpec", "InvalidPlacement"})
Body = Mapping[str, Any]


class Outcome(enum.Enum):
    """What one call of :meth:`Admission.admit` made of a Workflow."""

    ASSIGNED = "assigned"  # marked Assigned and sent, by this call
    HELD = "held"  # this process follows it already (or restored it), or it is not ours
    REFUSED = "refused"  # can never run as it is (Failed); a new generation may
    WAITING = "waiting"  # no site for it yet (Pending): try again later
    LOST = "lost"  # gone, or another operator assigned it meanwhile


class AdmissionRetry(RuntimeError):
    """Admission could not finish (the object kept changing): the watch tries again."""


class AdmissionGate:
    """Counts admissions in flight; :meth:`settled` waits until they have paused."""

    def __init__(
        self, quiet_seconds: float = QUIET_SECONDS, limit_seconds: float = SETTLE_LIMIT_SECONDS
    ) -> None:
        self.quiet_seconds = quiet_seconds
        self.limit_seconds = limit_seconds
        self.in_flight = 0
        self._last = 0.0
        self._began = 0.0  # loop time the current burst began
        self._quiet = asyncio.Event()
        self._quiet.set()

    def started(self) -> None:
        if self._quiet.is_set():
            self._began = asyncio.get_running_loop().time()
        self.in_flight += 1
        self._quiet.clear()

    def done(self) -> None:
        loop = asyncio.get_running_loop()
        self.in_flight -= 1
        self._last = loop.time()
        loop.call_later(self.quiet_seconds, self._check_quiet)

    def _check_quiet(self) -> None:
        loop = asyncio.get_running_loop()
        if self.in_flight == 0 and loop.time() - self._last >= self.quiet_seconds * 0.9:
            self._quiet.set()

    async def settled(self) -> None:
        """Wait until admissions have paused, or ``limit_seconds`` after the burst began.

        The limit counts from the start of the burst, not from each call: a
        stream of admissions that never pauses (a fleet applying Workflows all
        day) holds the other writes back once, not for as long as it lasts
        (the bridge waits here before each status write, and the sites' acks
        with it).
        """
        if self._quiet.is_set():
            return
        left = self._began + self.limit_seconds - asyncio.get_running_loop().time()
        if left > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), timeout=left)

    async def quiet(self) -> None:
        """Wait until admissions have paused (no limit)."""
        await self._quiet.wait()

    async def after(self, coro: Coroutine[Any, Any, None]) -> None:
        """``coro``, once admissions have paused."""
        await self.settled()
        await coro


class Admission:
    """Admits new Workflows and restores assigned ones into ``held``."""

    def __init__(
        self,
        kube: Kube,
        bridge: CloudBridge,
        applier: Applier,
        ledger: Ledger,
        status: StatusWriter,
        sites: Sites,
        held: Held,
        gate: AdmissionGate,
        errands: Errands,
    ) -> None:
        self.kube = kube
        self.bridge = bridge
        self.applier = applier
        self.ledger = ledger
        self.status = status
        self.sites = sites
        self.held = held
        self.gate = gate
        self.errands = errands
        # Where a selector looks (a sharded operator narrows it to its own sites: shards.py).
        self.candidates: Callable[[], list[SiteCandidate]] = sites.candidates
        self._locks: dict[Key, asyncio.Lock] = {}

    def forget(self, key: Key) -> None:
        self._locks.pop(key, None)

    async def admit(self, body: Body, *, site: str | None = None) -> Outcome:
        """Validate, place, mark Assigned and send; at most once per Workflow.

        Calls for the same Workflow are serialized, and one that finds it
        already assigned does nothing.  An exception (the API server away)
        leaves the Workflow unassigned: the caller tries again.  ``site``: the
        placement already decided (a sharded operator's placer).
        """
        meta = body["metadata"]
        if cron.CRON_LABEL in (meta.get("labels") or {}):
            return Outcome.HELD  # a run a site's schedule fired: the site's already (cron.py)
        key = (meta["namespace"], meta["name"])
        started = time.monotonic()
        async with self._locks.setdefault(key, asyncio.Lock()):
            record = self.held.records.get(key)
            if record is not None and record.uid == meta["uid"]:
                return Outcome.HELD
            self.gate.started()
            try:
                send = await self._admit(body, site=site)
            finally:
                self.gate.done()
            if isinstance(send, Outcome):
                return send
            ADMISSION_SECONDS.observe(time.monotonic() - started)
            if self.gate.in_flight:
                # A burst: its Assigned statuses go out before any site starts
                # running (and competing with the API server for the same CPU).
                await self.gate.settled()
            send()
            return Outcome.ASSIGNED

    async def _admit(self, body: Body, *, site: str | None = None) -> Callable[[], None] | Outcome:
        """Everything up to the Assigned status; returns what sends it to the site."""
        status = dict(body.get("status") or {})
        if status.get("assignedGeneration"):
            self.restore(body, status)
            return Outcome.HELD
        if _refused_already(body, status):
            return Outcome.REFUSED  # said on the object at this generation (a restart)
        spec = await self._parse(body)
        if spec is None:
            return Outcome.REFUSED
        placed = await self._place(body, spec, placed=site)
        if isinstance(placed, Outcome):
            return placed
        record, assigned = self._hold(body, spec, placed)
        if not await self._mark_assigned(body, record, assigned):
            return Outcome.LOST
        # Whether the site was connected when admission decided (the status says so too).
        return self._sender(body, spec, record, connected=bool(assigned["siteConnected"]))

    # ------------------------------------------------------------- the steps
    async def _parse(self, body: Body) -> WorkflowSpec | None:
        """Step 1: the spec, or None (an invalid one is reported)."""
        try:
            return parse_spec(body.get("spec"))
        except SpecError as exc:
            await self._refuse(body, "InvalidSpec", str(exc), "invalid-spec")
            return None

    async def _place(
        self, body: Body, spec: WorkflowSpec, *, placed: str | None = None
    ) -> str | Outcome:
        """Step 2: the site; or REFUSED (a name no topic can carry), or WAITING (none yet)."""
        try:
            # Candidates cost a pass over every record: build them only for a selector.
            explicit = spec.placement is not None and spec.placement.site is not None
            site = placed or choose_site(spec.placement, [] if explicit else self.candidates())
            check_site_name(site)
            if self.sites.retired(site):
                raise NoSiteError(
                    f"site {site} is retired (annotation {RETIRED_ANNOTATION}): "
                    "no new Workflows are placed there"
                )
            return site
        except InvalidSiteName as exc:
            # Never published: a wildcard or '/' in a topic would break the link.
            message = f"spec.placement.site: {exc}"
            await self._refuse(body, "InvalidPlacement", message, "invalid-placement")
            return Outcome.REFUSED
        except NoSiteError as exc:
            await self._waiting(body, "SiteRetired" if "retired" in str(exc) else "NoMatchingSite",
                                str(exc))  # fmt: skip
            return Outcome.WAITING

    async def _waiting(self, body: Body, reason: str, message: str) -> None:
        """No site yet: Pending, with the reason; written only when it says something new.

        The watch tries again when the sites change and every few seconds, and
        a retry that finds the same answer must not cost a write.
        """
        meta, generation = body["metadata"], _generation(body)
        stored = body.get("status") or {}
        if (
            stored.get("phase") == RunPhase.PENDING
            and stored.get("reason") == reason
            and stored.get("message") == message
            and stored.get("observedGeneration") == generation
        ):
            return
        await self.status.patch(meta["namespace"], meta["name"], {
            "phase": RunPhase.PENDING, "reason": reason, "message": message,
            "observedGeneration": generation,
            "conditions": [
                condition(None, "Accepted", True, "Valid"),
                condition(None, "Assigned", False, reason, message),
            ],
        })  # fmt: skip
        # The Event is what a user acts on (label a site, or fix the selector); named
        # by generation and reason, so a retry or a restart never posts it twice.
        self.errands.soon(
            self.kube.event(
                dict(body), "Workflow", reason, message, warning=True,
                once=f"{reason.lower()}-g{generation}",
            ),
            f"Event {reason} for {meta['namespace']}/{meta['name']}",
        )  # fmt: skip

    async def _refuse(self, body: Body, reason: str, message: str, once: str) -> None:
        """A Workflow that can never run as it is: Failed, with a condition and an Event."""
        meta, generation = body["metadata"], _generation(body)
        await self.status.patch(meta["namespace"], meta["name"], {
            "phase": RunPhase.FAILED, "reason": reason, "message": message,
            "observedGeneration": generation,
            "conditions": [condition(None, "Accepted", False, reason, message)],
        })  # fmt: skip
        await self.kube.event(
            dict(body), "Workflow", reason, message, warning=True, once=f"{once}-g{generation}"
        )

    def _hold(
        self, body: Body, spec: WorkflowSpec, site: str
    ) -> tuple[CloudRecord, dict[str, Any]]:
        """Step 3: the run's record and view; returns the record and its Assigned status."""
        meta, generation = body["metadata"], _generation(body)
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        record = CloudRecord.assigned(
            namespace=namespace, name=name, uid=uid, generation=generation, site=site,
            object_uid=uid, assigned_at=time.time(), deadline_seconds=spec.deadline_seconds,
            assigned_digest=spec_digest(body["spec"]),
            suspend=bool(spec.suspend), seen_generation=generation,
        )  # fmt: skip
        self.held.records[record.key] = record
        view = self.applier.expect(
            namespace, name, uid, generation,
            [t.name for t in spec.tasks], compensation_names=[t.name for t in spec.on_failure],
            site=site,
        )  # fmt: skip
        status = self.status.render(view, record)
        status.update({
            "assignedGeneration": generation, "assignedAt": rfc3339(record.assigned_at),
            "traceId": record.trace_id, "rootSpanId": record.root_span_id,
            "observedGeneration": generation,
        })  # fmt: skip
        return record, status

    async def _mark_assigned(self, body: Body, record: CloudRecord, status: dict[str, Any]) -> bool:
        """Step 4: the Assigned status and the ledger entry, both stored; False: not ours."""
        entry = Entry(
            site=record.site, uid=record.uid, namespace=record.namespace, name=record.name,
            generation=record.generation, spec_digest=record.assigned_digest or "",
        )  # fmt: skip
        try:
            # The ledger entry is stored before the site can receive anything, so a
            # restarted operator can cancel the run even if the Workflow is gone.
            written, _ = await asyncio.gather(
                self._admission_patch(body, status), self.ledger.record(entry)
            )
        except Exception:  # not assigned after all: the watch tries again
            self.held.records.pop(record.key, None)  # (the view stays: same uid comes back)
            raise
        if not written:
            # Gone, or assigned by another operator meanwhile.
            if self.held.records.get(record.key) is record:
                self.held.records.pop(record.key, None)
            return False
        record.written = watched(status)
        return True

    def _sender(
        self, body: Body, spec: WorkflowSpec, record: CloudRecord, *, connected: bool
    ) -> Callable[[], None]:
        """Step 5: what sends the assignment (and a suspend) to the site."""
        namespace, name, uid, site = record.namespace, record.name, record.uid, record.site
        payload = wire.AssignPayload(
            uid=uid, generation=record.generation, namespace=namespace, name=name,
            spec=dict(body["spec"]),
        )  # fmt: skip
        where = "" if connected else " (site offline: the assignment waits for it)"
        message = f"assigned to site {site}{where}"
        log.info("Workflow %s/%s %s", namespace, name, message, extra=record.log_extra)

        def send() -> None:
            if self.held.records.get(record.key) is not record:
                return  # deleted (or replaced) meanwhile
            self.bridge.assign(site, payload, record.traceparent)
            if spec.suspend:
                self.bridge.control(site, wire.ControlPayload(action="suspend", uid=uid))
            # No Event: nobody acts on "Assigned" (the status says it, with the site);
            # an Event per Workflow was a third of a fleet's writes (decision 0019).

        return send

    async def _admission_patch(self, body: Body, status: dict[str, Any]) -> bool:
        """Write the Assigned status, only over the version admission was decided on.

        A conflict is looked at: a change that is not an assignment (a label,
        an old finalizer removed) is harmless (write again on the new
        version); a status with ``assignedGeneration`` means another operator
        assigned it first, and this one must not send it too.
        """
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        version = meta.get("resourceVersion")
        for _ in range(CONFLICT_RETRIES):
            try:
                return await self.status.patch(
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
                        self._adopt(current, stored)
                    return False
                version = current_meta.get("resourceVersion")
        raise AdmissionRetry(f"{namespace}/{name} kept changing while being assigned")

    def _adopt(self, body: Mapping[str, Any], status: dict[str, Any]) -> None:
        """Follow a run another writer assigned, as an observer (never writing its status)."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        self.held.records.pop(key, None)
        self.restore(body, status, resend=False)
        adopted = self.held.records.get(key)
        if adopted is not None:
            adopted.observer = True

    # ------------------------------------------------------------- restoring
    def restore(
        self, body: Mapping[str, Any], status: dict[str, Any], *, resend: bool = True
    ) -> None:
        """Hold again a run assigned before (its ``.status``): record, view, and what to send."""
        meta = body["metadata"]
        namespace, name = key = (meta["namespace"], meta["name"])
        if key in self.held.records:
            return
        # A fired run's site uid is derived from its schedule (cron.py), not the object's.
        uid = status.get("runUid") or meta["uid"]
        resend = resend and not status.get("runUid")  # the site fired it: nothing to send
        generation = int(status["assignedGeneration"])
        site = str(status.get("site"))
        spec = body.get("spec") or {}
        entry = self.ledger.get(site, uid)
        record = CloudRecord.assigned(
            namespace=namespace, name=name, uid=uid, generation=generation, site=site,
            object_uid=meta["uid"],
            trace_id=str(status.get("traceId") or ""),
            root_span_id=str(status.get("rootSpanId") or ""),
            assigned_at=parse_rfc3339(status.get("assignedAt")) or time.time(),
            deadline_seconds=spec.get("deadlineSeconds"),
            conditions={
                str(c["type"]): Since.of(c)
                for c in status.get("conditions") or []
                if isinstance(c, Mapping) and "type" in c
            },
            resource_version=meta.get("resourceVersion"),
            # The generation an operator last handled: a newer one (an edit made while
            # no operator ran) is judged at the first watch event (Runtime.spec_seen).
            seen_generation=int(status.get("observedGeneration") or generation),
            assigned_digest=None if entry is None else entry.spec_digest,
            suspend=bool(spec.get("suspend", False)),
        )  # fmt: skip
        if status.get("reason") == "DeadlineExceeded":
            record.override = Override(
                RunPhase.FAILED, "DeadlineExceeded", str(status.get("message") or "")
            )
        self.held.records[key] = record
        view = WorkflowView.from_status(
            status, namespace=namespace, name=name, uid=uid, generation=generation
        )
        view.site = site
        view.phase = site_phase(view.phase)
        self.applier.load(view)
        record.written = watched(status)
        if view.done:  # finished while no operator ran: its ledger entry has done its job
            self.ledger.discard(site, uid)
        if resend and not view.done:
            # Pending: the site may never have received it (duplicates are harmless).
            # Otherwise kept, to send again if the site's database is replaced.
            self.resend_assignment(body, record, held=view.phase != RunPhase.PENDING)
        if resend and not view.done and record.suspend != bool(status.get("suspended", False)):
            # spec.suspend changed while no operator ran (or the site has not said yet).
            action = "suspend" if record.suspend else "resume"
            with contextlib.suppress(InvalidSiteName):
                self.bridge.control(site, wire.ControlPayload(action=action, uid=uid))

    def resend_assignment(
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
        same = (
            entry.spec_digest == spec_digest(spec)
            if entry is not None
            else _generation(body) == record.generation
        )
        kept = None if same else self.ledger.kept_assigned(record.site, record.uid)
        if kept is not None and entry is not None:
            kept_spec = dict(kept.get("spec") or {})
            if spec_digest(kept_spec) == entry.spec_digest:
                spec, same = kept_spec, True  # exactly what was sent before the edit
        if not same and held:
            return  # the site runs it already; nothing to keep for a database replacement
        if not same:
            self._unsendable(record)
            return
        if entry is None:
            self.errands.soon(
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

    def _unsendable(self, record: CloudRecord) -> None:
        """What was assigned is known only by its digest: say so on the Workflow."""
        message = (
            "the spec was edited while no operator ran, after assignment and before the "
            "site confirmed it; the edit is never sent, and what was assigned is known "
            "only by its digest: if the site does not start the run, delete and re-create "
            "the Workflow"
        )
        log.warning("%s/%s: %s", record.namespace, record.name, message, extra=record.log_extra)
        condition(record, "AssignmentResent", False, "SpecEdited", message)  # (kept, shown)
        self.held.dirty.add(record.key)


def _generation(body: Mapping[str, Any]) -> int:
    return int(body["metadata"].get("generation") or 1)


def _refused_already(body: Body, status: Mapping[str, Any]) -> bool:
    """Failed for an invalid spec or placement at this very generation (said before)."""
    return (
        status.get("phase") == RunPhase.FAILED
        and status.get("reason") in REFUSALS
        and status.get("observedGeneration") == _generation(body)
    )
