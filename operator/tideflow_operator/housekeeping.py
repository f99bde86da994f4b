"""Housekeeping: what the operator does on a clock rather than on an event.

Every ``housekeeping_seconds`` (:meth:`Housekeeper.run`, a supervised task):

* **deadlines** — a run past its ``deadlineSeconds`` is cancelled at its site
  and shown Failed (``DeadlineExceeded``), with an Event and its root span;
* **statuses held back** — a Workflow whose last patch was slow waits before
  its next write (``write_after``); a status seen to differ from what this
  process wrote (a hand edit, another writer) is written over; both here;
* **acks** — every site is acknowledged what has been persisted, when that
  changed (or every ``ACK_REFRESH_SECONDS``: :meth:`~.bridge.CloudBridge.refresh_ack`);
* **the ledger** is flushed (removals alone at most every ``REMOVAL_SECONDS``);
* **Workflows waiting for a site** are tried again when the sites changed or
  every few seconds (:meth:`~.watch.WorkflowWatch.retry`);
* **the C heap** — freed memory is given back to the kernel at most every
  few seconds (:class:`~.heap.HeapTrim`, issue 13);
* **reconcile**, every ``reconcile_seconds`` (and at start-up,
  :meth:`Housekeeper.cancel_gone`): the runs whose Workflows are gone are
  cancelled at their sites — a ledger entry whose cancel never got out, and
  a run held whose Workflow vanished without a DELETED event reaching the watch.

Only what was known before a listing started is judged, so a Workflow
created meanwhile is never taken for gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from tideflow import wire
from tideflow.failpoints import failpoint
from tideflow.phases import RunPhase

from .applier import Applier
from .bridge import CloudBridge, InvalidSiteName
from .heap import HeapTrim
from .kube import Kube
from .ledger import REMOVAL_SECONDS, Entry, Ledger
from .model import Held, Key, Override
from .status import StatusWriter

log = logging.getLogger(__name__)

# The Workflow is gone: cancel its run (Runtime.deleted).
Deleted = Callable[[Mapping[str, Any]], Awaitable[None]]


def cancel_at_site(bridge: CloudBridge, site: str, uid: str, reason: str) -> bool:
    """Send a cancel; True if it reached a connected link (it is re-sent anyway)."""
    try:
        return bridge.control(site, wire.ControlPayload(action="cancel", uid=uid, reason=reason))
    except InvalidSiteName:
        return True  # nothing was ever sent there


class Housekeeper:
    """The periodic round, and the reconcile it runs."""

    def __init__(
        self,
        kube: Kube,
        bridge: CloudBridge,
        applier: Applier,
        ledger: Ledger,
        status: StatusWriter,
        held: Held,
        deleted: Deleted,
        *,
        namespaces: Sequence[str],
        every_seconds: float,
        reconcile_seconds: float,
        retry: Callable[[], Awaitable[object]] | None = None,
        heap: HeapTrim | None = None,
    ) -> None:
        self.kube = kube
        self.bridge = bridge
        self.applier = applier
        self.ledger = ledger
        self.status = status
        self.held = held
        self.deleted = deleted
        self.namespaces = list(namespaces)  # empty: all namespaces
        self.every_seconds = every_seconds
        self.reconcile_seconds = reconcile_seconds
        self.last_reconcile = 0.0
        self.retry = retry
        self.heap = heap

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_seconds)
            failpoint("housekeeping")
            try:
                await self.round()
            except Exception:
                log.exception("housekeeping failed; will try again")

    async def round(self) -> None:
        await self.enforce_deadlines()
        now = time.monotonic()
        for key in list(self.held.dirty | self.held.suspect):
            record = self.held.records.get(key)
            if record is None or now >= record.write_after:
                await self.status.write(key)
        for site in self.applier.sites():
            self.bridge.refresh_ack(site)
        await self.ledger.flush(removals_every=REMOVAL_SECONDS)
        if self.retry is not None:
            await self.retry()
        if time.monotonic() - self.last_reconcile >= self.reconcile_seconds:
            await self.reconcile()
        if self.heap is not None:
            self.heap.maybe()

    # ------------------------------------------------------------- deadlines
    async def enforce_deadlines(self) -> None:
        now = time.time()
        for key, record in list(self.held.records.items()):
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
            record.override = Override(RunPhase.FAILED, "DeadlineExceeded", message)
            self.bridge.control(
                record.site, wire.ControlPayload(action="cancel", uid=record.uid, reason=message)
            )
            await self.status.write(key)
            await self.status.export_traces([key])
            await self.kube.event(
                record.body_ref, "Workflow", "DeadlineExceeded", message, warning=True,
                once="deadline",
            )  # fmt: skip

    # ------------------------------------------------------------- reconcile
    def my_entries(self) -> list[Entry]:
        """Ledger entries of the namespaces this operator watches (another may share the ledger)."""
        namespaces = set(self.namespaces)
        return [e for e in self.ledger.all() if not namespaces or e.namespace in namespaces]

    def cancel_gone(self, existing: set[str], entries: list[Entry], why: str) -> int:
        """Cancel at its site each ledger entry whose Workflow no longer exists.

        ``existing`` holds the uids of the Workflows that exist (listed after
        ``entries`` were taken, so an entry made meanwhile is never judged gone);
        a run this process still holds a record of is not gone either.
        """
        held = {record.uid for record in self.held.records.values()}
        cancelled = 0
        for entry in entries:
            if entry.uid in existing or entry.uid in held:
                continue
            cancelled += 1
            log.info(
                "Workflow %s/%s (uid %s) is gone but site %s was sent it (%s): cancelling",
                entry.namespace, entry.name, entry.uid, entry.site, why,
            )  # fmt: skip
            if cancel_at_site(self.bridge, entry.site, entry.uid, f"Workflow deleted ({why})"):
                self.ledger.discard(entry.site, entry.uid)
        return cancelled

    async def reconcile(self) -> int:
        """Cancel the runs whose Workflows are gone (missed deletions); returns how many.

        Two kinds of miss: a ledger entry with no run held (its cancel never got
        out), and a run held whose Workflow vanished without a DELETED event
        reaching kopf (deleted between this process's start-up list and kopf's
        first watch).  Only what was known before the listing started is judged,
        so a Workflow created meanwhile is never taken for gone.
        """
        self.last_reconcile = time.monotonic()
        entries = self.my_entries()
        held: dict[Key, str] = {key: record.uid for key, record in self.held.records.items()}
        if not entries and not held:
            return 0
        existing = await self.kube.list_workflow_uids(self.namespaces)
        vanished = 0
        for (namespace, name), uid in held.items():
            record = self.held.records.get((namespace, name))
            if uid in existing or record is None or record.uid != uid:
                continue
            log.info("Workflow %s/%s (uid %s) vanished unseen: cancelling", namespace, name, uid)
            await self.deleted({"metadata": {"namespace": namespace, "name": name, "uid": uid}})
            vanished += 1
        alive = {uid for uid, deleting in existing.items() if not deleting}
        return vanished + self.cancel_gone(alive, entries, "deletion not seen")
