"""The Workflows' watch events, and everything the operator does from them alone.

Why: kopf's changing handlers (create, resume, update, delete) cost every
Workflow two or three writes of kopf's own — its finalizer (refused once with
422 on average, because the Assigned status had moved the object first) and
its diff-base and progress annotations — against a fleet's budget of three
writes per Workflow (issue 13, decision 0019).  None of it is needed:

* **admission** happens at the first event that shows a Workflow, and again
  for each new generation of one not assigned yet;
* a Workflow with **no site yet** (no site matches its selector, or its site
  is retired) or whose admission failed (the API server away) *waits* here:
  it is tried again as soon as the EdgeSites change and every
  ``RETRY_SECONDS`` (kopf's create handler retried every 10 s before);
* **spec edits** of an assigned Workflow are judged from the watch
  (:meth:`~tideflow_operator.runtime.Runtime.observed`): ``suspend`` is
  applied, any other change refused;
* **deletion** is the DELETED event (the run is cancelled at its site).  A
  deletion this process never sees (it was down, or a standby took over) is
  found from the ledger of assignments at start-up and every
  ``--reconcile-seconds`` (decision 0007), so no finalizer is needed;
* an object still carrying the **finalizer of an older operator**
  (``tideflow.io/cancel-at-site``) has it removed: at once when it is being
  deleted (after its run was cancelled), otherwise once admissions pause.
  Nothing else would ever remove it, and the object could not be deleted.

kopf still watches (its own event handler, its per-object workers, its
listing at start-up), but with no changing handler it stores nothing on the
object; :class:`NoDiffBase` makes it skip building a diff base for every event.

What is kept here past an event is :func:`compact`, never the watch's whole
object (issue 13: the operator's memory at 10,000 Workflows): a Workflow
waiting for a site, or an old finalizer to remove, keeps the metadata
admission reads, its spec and its status — not ``managedFields`` nor
annotations such as kubectl's last-applied configuration (a second copy of
the spec), which together are most of an object.

**kopf's events go through a queue of our own** (:meth:`WorkflowWatch.offer`,
decision 0026): each event, as :func:`compact`, joins its Workflow's queue and
is handled in order behind that Workflow's earlier events (a DELETED never
overtakes its admission), by a fixed pool of ``WORKERS`` tasks.  kopf's call
waits for its event to be handled only while at most ``HELD_EVENTS`` events
are queued or in hand; past that it returns at once, so kopf's per-object
worker lets the whole object go.  At 1,000 sites kopf's workers held every
waiting Workflow's whole object (10,000 of them) while admissions waited for
the API server: the operator's memory peak (issue 13).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import kopf

from .admission import Admission, AdmissionGate, Outcome
from .model import Errands, Held, Key

log = logging.getLogger(__name__)

# The finalizer kopf added for operators before decision 0019 (settings.persistence.finalizer).
OLD_FINALIZER = "tideflow.io/cancel-at-site"
RETRY_SECONDS = 10.0
# Tasks handling the queued events (each waits for an admission's round trip at most).
WORKERS = 512
# Events queued or in hand past which kopf's call no longer waits for its own.
HELD_EVENTS = 64

Body = Mapping[str, Any]

# What admission, a shard's claim and an Event read of a Workflow's metadata
# (admission.py, shards.py, kube.event); the rest is not kept (compact).
KEPT_METADATA = (
    "namespace", "name", "uid", "generation", "resourceVersion", "labels",
    "deletionTimestamp", "finalizers",
)  # fmt: skip


def compact(body: Body) -> dict[str, Any]:
    """What is kept of a watch event's object: :data:`KEPT_METADATA`, spec and status.

    The spec and status are the event's own (shared, not copied): holding them
    lets the rest of the object go.
    """
    meta = body["metadata"]
    kept: dict[str, Any] = {"metadata": {k: meta[k] for k in KEPT_METADATA if k in meta}}
    for part in ("spec", "status"):
        if part in body:
            kept[part] = body[part]
    return kept


class FinalizerStore(Protocol):
    async def remove_finalizer(
        self, namespace: str, name: str, finalizers: list[str], finalizer: str
    ) -> bool: ...


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's diff base, for an operator with no changing handler: none, built from nothing.

    kopf builds one for every event of every resource whatever its handlers (a
    copy of the whole spec by default); nothing here reads it.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return None

    def fetch(self, *, body: kopf.Body) -> Any:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


@dataclass
class _Waiting:
    """A Workflow not assigned yet: its latest object (:func:`compact`), to try again with."""

    uid: str
    generation: int
    body: Body


@dataclass
class _Queued:
    """One event waiting in its Workflow's queue (``done``: kopf's call waits for it)."""

    kind: str | None
    body: Body
    done: asyncio.Future[None] | None


class WorkflowWatch:
    """What each watch event of a Workflow means; and the Workflows waiting for a site."""

    def __init__(
        self,
        admission: Admission,
        held: Held,
        gate: AdmissionGate,
        errands: Errands,
        kube: FinalizerStore,
        *,
        admit: Callable[[Body], Awaitable[Outcome]],
        observed: Callable[[Body], None],
        gone: Callable[[Body], Awaitable[None]],
        sites_version: Callable[[], int],
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.admission = admission  # (its per-Workflow locks)
        self.admit = admit  # Runtime.admit: a sharded operator's claim, then admission
        self.held = held
        self.gate = gate
        self.errands = errands
        self.kube = kube
        self.observed = observed
        self.gone = gone
        self.sites_version = sites_version
        self.retry_seconds = retry_seconds
        self.waiting: dict[Key, _Waiting] = {}
        self._tried_sites = -1  # sites_version() at the last retry
        self._tried_at = 0.0  # monotonic
        self._releasing: set[str] = set()  # uids whose old finalizer is being removed
        self._unreleased: dict[str, Body] = {}  # uid -> compact body: a removal that failed
        # The queue (offer): per Workflow its events in order; the Workflows with some, in order.
        self._queues: dict[Key, collections.deque[_Queued]] = {}
        self._ready: asyncio.Queue[Key] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self.queued = 0  # events queued or in hand

    # ------------------------------------------------------------- the queue
    async def offer(self, kind: str | None, body: Body) -> None:
        """kopf's call for one event: queue it (compact) behind this Workflow's earlier ones.

        Waits until it is handled while few events are queued (an exception is
        then kopf's to log, as before), otherwise returns at once.
        """
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        wait = self.queued < HELD_EVENTS
        done: asyncio.Future[None] | None = (
            asyncio.get_running_loop().create_future() if wait else None
        )
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = collections.deque()
            self._start().put_nowait(key)
        queue.append(_Queued(kind, compact(body), done))
        self.queued += 1
        if done is not None:
            await asyncio.shield(done)

    def _start(self) -> asyncio.Queue[Key]:
        if self._ready is None:
            self._ready = asyncio.Queue()
            self._workers = [
                asyncio.create_task(self._work(self._ready), name=f"workflow events {i}")
                for i in range(WORKERS)
            ]
        return self._ready

    async def _work(self, ready: asyncio.Queue[Key]) -> None:
        while True:
            key = await ready.get()
            queue = self._queues[key]
            while queue:  # (a Workflow is in ``ready`` at most once: one worker at a time)
                item = queue[0]
                try:
                    await self.event(item.kind, item.body)
                except Exception as exc:
                    if item.done is None or item.done.done():
                        log.exception("%s/%s: event %s failed", *key, item.kind)
                    else:
                        item.done.set_exception(exc)
                else:
                    if item.done is not None and not item.done.done():
                        item.done.set_result(None)
                finally:
                    queue.popleft()
                    self.queued -= 1
            del self._queues[key]

    async def stop(self) -> None:
        """Stop handling queued events (the operator stops)."""
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers, self._ready = [], None
        for queue in self._queues.values():  # kopf's calls waiting for these return
            for item in queue:
                if item.done is not None and not item.done.done():
                    item.done.cancel()
        self._queues.clear()
        self.queued = 0

    # ------------------------------------------------------------- events
    async def event(self, kind: str | None, body: Body) -> None:
        """One watch event (``kind`` None: kopf's listing at start-up)."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if kind == "DELETED":
            self._stop_waiting(key, meta.get("uid"))
            await self.gone(body)
            self.admission.forget(key)  # (its lock; a run this process held was forgotten too)
            return
        has_old_finalizer = OLD_FINALIZER in (meta.get("finalizers") or [])
        if meta.get("deletionTimestamp"):
            # Still here only because some finalizer holds it: cancel now, then let go of ours.
            self._stop_waiting(key, meta.get("uid"))
            await self.gone(body)
            if has_old_finalizer:
                await self._release(body)
            return
        if has_old_finalizer:
            what = "old finalizer of {}/{}".format(*key)
            self.errands.soon(self.gate.after(self._release(compact(body))), what)
        record = self.held.records.get(key)
        held = record is not None and record.uid == meta.get("uid")
        if (body.get("status") or {}).get("assignedGeneration"):
            self._stop_waiting(key, meta.get("uid"))
            if not held:  # assigned by an operator before this one: held again (restored)
                await self._admit(key, body)
            self.observed(body)
            return
        if held:
            self.observed(body)  # assigned by this process; the event predates its status
            return
        generation = int(meta.get("generation") or 1)
        waiting = self.waiting.get(key)
        if (
            waiting is not None
            and waiting.uid == meta.get("uid")
            and generation <= waiting.generation
        ):
            waiting.body = compact(body)  # (our own Pending status, a label): keep the latest
            return
        await self._admit(key, body)

    async def _admit(self, key: Key, body: Body) -> None:
        meta = body["metadata"]
        try:
            outcome = await self.admit(body)
        except Exception as exc:
            log.warning("%s/%s: admission failed, will try again: %s", *key, exc)
            outcome = Outcome.WAITING
        if outcome is Outcome.WAITING:
            self.waiting[key] = _Waiting(
                str(meta.get("uid")), int(meta.get("generation") or 1), compact(body)
            )
        else:
            self._stop_waiting(key, meta.get("uid"))

    def _stop_waiting(self, key: Key, uid: Any) -> None:
        waiting = self.waiting.get(key)
        if waiting is not None and waiting.uid == uid:
            del self.waiting[key]

    # ------------------------------------------------------------- retries
    async def retry(self, *, force: bool = False) -> int:
        """Try the waiting Workflows again if the sites changed or it is time (housekeeping).

        Returns how many were tried.
        """
        for body in list(self._unreleased.values()):
            await self._release(body)
        if not self.waiting:
            return 0
        version, now = self.sites_version(), time.monotonic()
        if not force and version == self._tried_sites and now - self._tried_at < self.retry_seconds:
            return 0
        self._tried_sites, self._tried_at = version, now
        tried = list(self.waiting.items())
        for key, waiting in tried:
            if self.waiting.get(key) is waiting:
                await self._admit(key, waiting.body)
        return len(tried)

    # ------------------------------------------------------------- old finalizer
    async def _release(self, body: Body) -> None:
        """Remove the finalizer an older operator's kopf added (only ours; others stay)."""
        meta = body["metadata"]
        uid = str(meta.get("uid"))
        if uid in self._releasing:
            return
        self._releasing.add(uid)
        try:
            finalizers = list(meta.get("finalizers") or [])
            removed = await self.kube.remove_finalizer(
                meta["namespace"], meta["name"], finalizers, OLD_FINALIZER
            )
            if removed:
                log.info("%s/%s: removed the finalizer of an older operator (%s)",
                         meta["namespace"], meta["name"], OLD_FINALIZER)  # fmt: skip
            self._unreleased.pop(uid, None)
        except Exception as exc:  # tried again at the next retry round (or the next event)
            self._unreleased[uid] = compact(body)
            log.warning("%s/%s: could not remove finalizer %s: %s",
                        meta["namespace"], meta["name"], OLD_FINALIZER, exc)  # fmt: skip
        finally:
            self._releasing.discard(uid)
