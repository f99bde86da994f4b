"""Finished Workflows leave etcd: ``spec.ttlSecondsAfterFinished`` and the operator's default.

Why: a Workflow is a run, and a fleet makes thousands of them a day; kept for
ever they fill etcd and slow every list.  Argo's ``ttlStrategy`` answers the
same need.  A Workflow whose phase is Succeeded, Failed or Cancelled is
deleted by the operator ``ttlSecondsAfterFinished`` seconds after it finished
(``status.finishedAt``; a run the cloud ended, such as a deadline, carries
none, and is timed from when this process first saw it finished).  The
operator-wide default (``--ttl-seconds-after-finished``,
``TIDEFLOW_TTL_SECONDS_AFTER_FINISHED``, chart value
``ttlSecondsAfterFinished``) applies to Workflows that set none; unset, nothing
is deleted that does not ask to be.

How it fits: its own kopf event handler watches every Workflow beside the
admission handlers (the reaper lives in kopf's ``memo``, made by this
module's startup handler from ``memo.ttl``, which the CLI sets) and keeps one
timer per finished Workflow with a TTL; a
changed TTL re-arms it, a deleted Workflow drops it.  After a restart kopf's
first listing shows every finished Workflow again, so deletions missed while
no operator ran happen then.  The delete names the object's uid (a Workflow
re-created under the same name is never deleted for its predecessor); its
DELETED event reaches the watch as any delete does (watch.py): the run is
finished, so nothing is sent to the site.  Runs a CronWorkflow fired are left to its history limits
(the spec refuses a TTL in a CronWorkflow's workflowSpec).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import kopf

from .applier import parse_rfc3339
from .cron import CRON_LABEL  # fired runs: kept by their CronWorkflow's history limits
from .kube import GROUP, VERSION, WORKFLOWS
from .shards import kopf_filter

log = logging.getLogger(__name__)

FINISHED = frozenset({"Succeeded", "Failed", "Cancelled"})
Key = tuple[str, str]


class Deleter(Protocol):
    async def delete_workflow(self, namespace: str, name: str, uid: str) -> bool: ...


@dataclass(frozen=True)
class TtlConfig:
    """The operator-wide default TTL (None: only Workflows that set one are deleted)."""

    default_seconds: int | None = None


def ttl_of(body: Mapping[str, Any], default: int | None) -> int | None:
    """The TTL that applies to a Workflow: its own, else the default; None for fired runs."""
    if CRON_LABEL in ((body.get("metadata") or {}).get("labels") or {}):
        return None
    own = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
    if own is not None:
        try:
            return max(0, int(own))
        except (TypeError, ValueError):
            return default
    return default


def due_at(body: Mapping[str, Any], default: int | None, seen_finished: float) -> float | None:
    """Wall-clock time at which ``body`` is to be deleted; None if never (yet)."""
    status = body.get("status") or {}
    if status.get("phase") not in FINISHED:
        return None
    ttl = ttl_of(body, default)
    if ttl is None:
        return None
    finished = parse_rfc3339(status.get("finishedAt")) or seen_finished
    return finished + ttl


class Reaper:
    """One timer per finished Workflow with a TTL; deletes when it fires."""

    def __init__(self, kube: Deleter, default: int | None, clock: Any = time.time) -> None:
        self.kube = kube
        self.default = default
        self.clock = clock
        self.deleted = 0
        self._timers: dict[Key, tuple[str, float, asyncio.TimerHandle]] = {}
        self._seen_finished: dict[Key, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def observe(self, event: str | None, body: Mapping[str, Any]) -> None:
        """A watch event of one Workflow: arm, re-arm or drop its timer."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        uid = str(meta.get("uid"))
        if event == "DELETED" or meta.get("deletionTimestamp"):
            self._drop(key)
            self._seen_finished.pop(key, None)
            return
        finished = (body.get("status") or {}).get("phase") in FINISHED
        if not finished:
            self._seen_finished.pop(key, None)
            self._drop(key)
            return
        seen = self._seen_finished.setdefault(key, self.clock())
        due = due_at(body, self.default, seen)
        current = self._timers.get(key)
        if due is None:
            self._drop(key)
            return
        if current is not None and current[0] == uid and current[1] == due:
            return
        self._drop(key)
        loop = asyncio.get_running_loop()
        delay = max(0.0, due - self.clock())
        handle = loop.call_later(delay, self._fire, key, uid)
        self._timers[key] = (uid, due, handle)

    def pending(self) -> dict[Key, float]:
        """When each armed Workflow is due (wall clock)."""
        return {key: due for key, (_, due, _) in self._timers.items()}

    def _drop(self, key: Key) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer[2].cancel()

    def _fire(self, key: Key, uid: str) -> None:
        self._timers.pop(key, None)
        task = asyncio.get_running_loop().create_task(self._delete(key, uid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _delete(self, key: Key, uid: str) -> None:
        try:
            if await self.kube.delete_workflow(key[0], key[1], uid):
                self.deleted += 1
                log.info("Workflow %s/%s deleted: its ttlSecondsAfterFinished passed", *key)
        except Exception as exc:  # the API server is away: try again a little later
            log.warning("could not delete finished Workflow %s/%s (%s); retrying", *key, exc)
            handle = asyncio.get_running_loop().call_later(10.0, self._fire, key, uid)
            self._timers[key] = (uid, self.clock() + 10.0, handle)

    async def stop(self) -> None:
        for key in list(self._timers):
            self._drop(key)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)


@kopf.on.startup()
async def ttl_startup(memo: kopf.Memo, **_: Any) -> None:
    """The reaper, made from the default the CLI put in the memo (``memo.ttl``)."""
    from .kube import Kube

    config = memo.get("ttl") or TtlConfig()
    memo.ttl_reaper = Reaper(Kube(), config.default_seconds)


@kopf.on.cleanup()
async def ttl_cleanup(memo: kopf.Memo, **_: Any) -> None:
    reaper = memo.get("ttl_reaper")
    if isinstance(reaper, Reaper):
        await reaper.stop()


@kopf.on.event(GROUP, VERSION, WORKFLOWS, when=kopf_filter)  # (a shard: its own sites')
async def ttl_workflow_event(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    reaper = memo.get("ttl_reaper") if memo is not None else None
    if isinstance(reaper, Reaper):
        reaper.observe(type, body)
