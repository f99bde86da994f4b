"""A Workflow's ``.status``: rendered from the cloud's view, written with optimistic concurrency.

Everything the operator writes to a Workflow's status after admission goes
through :class:`StatusWriter`:

* :meth:`StatusWriter.render` turns the applier's view of a run plus the
  cloud's :class:`~tideflow_operator.model.CloudRecord` (site, trace,
  conditions, a deadline's override) into the status object;
* :meth:`StatusWriter.patch` is the one merge patch of the status
  subresource, and notes when the next may follow: progress alone is written
  at most every ``PROGRESS_SECONDS``, and a status patch slower than
  ``SLOW_PATCH_SECONDS`` marks a huge Workflow, whose next write then waits
  ``SLOW_PATCH_SPACING`` times as long so that kopf's own patches find a gap;
* :meth:`StatusWriter.write` writes one run's status over the version this
  process last saw and never over a status stored from more records (another
  operator's, or records this one has not applied yet); a hand edit is
  written over.  Only then is the site's record acknowledged
  (``mark_persisted``), so nothing a site sent is lost to a failed write;
* :meth:`StatusWriter.export_traces` forwards the sites' spans and the root
  span of each run that ended.

The collaborators (the API client, the applier, the sites' presence, the
ledger, the span forwarder) are passed in; nothing here reaches a module
global.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .applier import Applier, WorkflowView
from .kube import Conflict, Kube, NotFound
from .ledger import Ledger
from .metrics import SPANS_EXPORTED, STATUS_PATCH_SECONDS, STATUS_PATCHES
from .model import ASSIGNED, CloudRecord, Held, Key, condition, public_phase, watched
from .presence import SitePresence
from .telemetry import SpanForwarder, root_span

log = logging.getLogger(__name__)

CONFLICT_RETRIES = 5
SLOW_PATCH_SECONDS = 0.3
SLOW_PATCH_SPACING = 3.0
# A run's progress is written at most this often; phase changes and ``suspended``
# go at once (Runtime.persist).  A three-task run is then Assigned, Running,
# Succeeded: three writes, not one per task.  Well under the agent's ack_timeout
# (10 s): the records of a held-back write are acked only once it is written.
PROGRESS_SECONDS = 2.0


class StatusWriter:
    """Renders and writes the statuses of the runs in ``held``."""

    def __init__(
        self,
        kube: Kube,
        applier: Applier,
        presence: SitePresence,
        ledger: Ledger,
        spans: SpanForwarder,
        held: Held,
        *,
        max_tasks: int,
        awaiting: Callable[[Key], bool] = lambda key: False,
    ) -> None:
        self.kube = kube
        self.applier = applier
        self.presence = presence
        self.ledger = ledger
        self.spans = spans
        self.held = held
        self.max_tasks = max_tasks
        # A fired run whose Workflow object is not made yet (cron.py): its ack waits.
        self.awaiting = awaiting
        self.patches = 0
        self._conflict_warned: set[Key] = set()

    # ------------------------------------------------------------- rendering
    def conditions(self, record: CloudRecord, refused: str | None = None) -> list[dict[str, Any]]:
        view = self.applier.view(record.namespace, record.name)
        connected = self.presence.connected(record.site)
        done = (view is not None and view.done) or record.override is not None
        phase = self.phase(record, view)
        conditions = [
            condition(record, "Accepted", True, "Valid"),
            condition(record, "Assigned", True, "Sent", f"site {record.site}"),
            condition(
                record, "SiteConnected", connected, "Online" if connected else "Offline",
                "" if connected else "the site's records will sync when its link returns",
            ),
            condition(record, "Completed", done, phase if done else "NotFinished"),
        ]  # fmt: skip
        if refused is not None:
            conditions.append(condition(record, "SpecChangeRefused", True, "Immutable", refused))
        elif "SpecChangeRefused" in record.conditions:
            conditions.append(
                record.conditions["SpecChangeRefused"].as_condition("SpecChangeRefused")
            )
        if "AssignmentResent" in record.conditions:
            conditions.append(
                record.conditions["AssignmentResent"].as_condition("AssignmentResent")
            )
        return conditions

    @staticmethod
    def phase(record: CloudRecord | None, view: WorkflowView | None) -> str:
        """The Workflow's phase: the cloud's override, else the site's (Pending is Assigned)."""
        if record is not None and record.override is not None:
            return record.override.phase
        return public_phase(view.phase) if view is not None else ASSIGNED

    def render(self, view: WorkflowView, record: CloudRecord) -> dict[str, Any]:
        status = view.to_status(max_tasks=self.max_tasks)
        status.pop("observedGeneration", None)
        status["phase"] = self.phase(record, view)
        if record.override is not None:
            status["reason"], status["message"] = record.override.reason, record.override.message
        status["site"] = record.site
        status["siteConnected"] = self.presence.connected(record.site)
        status["traceId"] = record.trace_id
        status["conditions"] = self.conditions(record)
        return status

    def public_phase(self, key: Key) -> str:
        return self.phase(self.held.records.get(key), self.applier.view(*key))

    # ------------------------------------------------------------- writing
    async def patch(
        self,
        namespace: str,
        name: str,
        status: dict[str, Any],
        *,
        urgent: bool = False,
        resource_version: str | None = None,
    ) -> bool:
        """One merge patch of the status; False if the Workflow is gone."""
        started = time.monotonic()
        try:
            version = await self.kube.patch_workflow_status(
                namespace, name, status, urgent=urgent, resource_version=resource_version
            )
        except NotFound:
            return False
        record = self.held.records.get((namespace, name))
        took = time.monotonic() - started
        if record is not None:
            record.resource_version = version
            record.write_after = time.monotonic() + max(
                PROGRESS_SECONDS,
                min(SLOW_PATCH_SPACING * took, 30.0) if took >= SLOW_PATCH_SECONDS else 0.0,
            )
        self.patches += 1
        STATUS_PATCHES.inc()
        STATUS_PATCH_SECONDS.observe(time.monotonic() - started)
        log.debug("status of %s/%s patched in %.3fs", namespace, name, time.monotonic() - started)
        return True

    async def write(self, key: Key) -> bool:
        """Write one run's status from the view; True once its records may be acked."""
        view, record = self.applier.view(*key), self.held.records.get(key)
        if record is None and self.awaiting(key):
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
            self.held.dirty.add(key)
            return False
        if not found:
            self.applier.forget(*key)
        self.applier.mark_persisted(*key, view.synced_seq)
        self.held.dirty.discard(key)
        self.held.suspect.discard(key)
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
        for _ in range(CONFLICT_RETRIES):
            # Rendered at each attempt: records applied while a conflicting write was
            # in flight are in the view now, and a retry must not write an older picture
            # over the write that won (it turned a Succeeded run back to Running).
            status = self.render(view, record)
            try:
                found = await self.patch(*key, status, resource_version=record.resource_version)
            except Conflict:
                try:
                    current = await self.kube.get_workflow(*key)
                except NotFound:
                    return False
                if current["metadata"].get("uid") != record.uid:
                    return False
                record.resource_version = current["metadata"].get("resourceVersion")
                stored = dict(current.get("status") or {})
                if self._stored_is_newer(stored, view):
                    if key not in self._conflict_warned:
                        self._conflict_warned.add(key)
                        log.warning(
                            "%s/%s: the stored status (%s) is newer than this operator's view "
                            "(%s); not overwritten (is a second operator running?)",
                            *key, stored.get("phase"), status["phase"], extra=record.log_extra,
                        )  # fmt: skip
                    record.written = watched(stored)
                    return True
                continue
            if found:
                if record.written is None or record.written.phase != status["phase"]:
                    log.info("Workflow %s/%s is %s", *key, status["phase"], extra=record.log_extra)
                record.written = watched(status)
            return found
        raise RuntimeError("{}/{} kept changing while its status was written".format(*key))

    @staticmethod
    def _stored_is_newer(stored: dict[str, Any], view: WorkflowView) -> bool:
        """Was ``stored`` written from more records of the same site database than ``view``?"""
        same_db = stored.get("syncedEpoch") in (None, view.synced_epoch)
        return same_db and int(stored.get("syncedSeq") or 0) > view.synced_seq

    # ------------------------------------------------------------- traces
    async def export_traces(self, finished: list[Key]) -> None:
        """Forward the sites' spans, plus the root span of each run that just ended."""
        if not self.spans.enabled:
            self.applier.drain_spans()
            return
        roots = []
        for key in finished:
            record, view = self.held.records.get(key), self.applier.view(*key)
            if record is None or record.root_emitted:
                continue
            record.root_emitted = True
            roots.append(
                root_span(
                    trace_id=record.trace_id, span_id=record.root_span_id,
                    namespace=record.namespace, name=record.name, site=record.site,
                    started=record.assigned_at,
                    finished=view.finished_at if view is not None else None,
                    phase=self.phase(record, view),
                    reason=record.override.reason if record.override else None,
                )
            )  # fmt: skip
        records = [(span.site, span.body) for span in self.applier.drain_spans()]
        try:
            await self.spans.forward(records, roots)
            SPANS_EXPORTED.inc(len(records) + len(roots))
        except Exception as exc:  # a collector outage must not stop status updates
            log.warning("trace export failed: %s", exc)
