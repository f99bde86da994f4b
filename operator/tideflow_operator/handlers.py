"""kopf handlers: thin, reading the operator's runtime from kopf's ``memo``.

Every kopf registration of the operator is here, and each handler only
finds the :class:`~tideflow_operator.runtime.Runtime` in ``memo`` and calls
it; the work is in :mod:`.admission`, :mod:`.status`, :mod:`.sites`,
:mod:`.housekeeping`, :mod:`.runtime` and :mod:`.cron`.

* The startup handler makes the runtime from what the CLI put in the
  operator's memo (``memo.config``: an
  :class:`~tideflow_operator.runtime.OperatorConfig`; ``memo.stop_flag``:
  kopf's stop flag, set when a background task dies), unless the memo
  already holds one (``memo.runtime``, as tests pass it), and stores it as
  ``memo.runtime``.  A broker file it cannot use (checked again there: the
  Lease may have been waited for long) stops the operator, not retried: the
  CLI prints ``memo.cannot_start``.  kopf copies the operator's memo into each resource's
  memo when it first sees the resource, after the startup handlers ran.
* Workflows have one handler, kopf's event handler: admission, spec edits
  and deletion are read from the watch (:mod:`.watch`), each event queued
  behind its Workflow's earlier ones (:meth:`~.watch.WorkflowWatch.offer`).  With no changing
  handler (create, resume, update, delete) kopf adds no finalizer and writes
  no annotation on a Workflow (decision 0019); :class:`~.watch.NoDiffBase`
  spares it building a diff base per event.
* kopf's per-object worker exits ``WORKER_IDLE_SECONDS`` after the object's
  last event (kopf's default: 5 s), not later: an idle worker keeps its last
  event's whole object, and a fleet's wave (every Workflow created, then
  written three times) kept thousands of them alive for nothing (issue 13).
* kopf lists Workflows in one response (its default), never in pages: a
  paged listing whose continue token the API server has compacted away
  fails with 410, and kopf then stops the whole operator (issue 13: a
  1,000-site run with ``settings.watching.chunk_size`` set stopped so).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from tideflow.failpoints import failpoint
from tideflow.mqtt import BrokerFileError
from tideflow.spec import SpecError

from .cron import CRONWORKFLOWS
from .kube import EDGESITES, GROUP, VERSION, WORKFLOWS
from .runtime import Runtime
from .shards import kopf_filter
from .watch import NoDiffBase

log = logging.getLogger(__name__)

WORKER_IDLE_SECONDS = 0.5


def runtime_of(memo: Any) -> Runtime | None:
    """The runtime in kopf's ``memo``, or None before the startup handler made it."""
    runtime = memo.get("runtime") if memo is not None else None
    return runtime if isinstance(runtime, Runtime) else None


def _runtime(memo: Any) -> Runtime:
    runtime = runtime_of(memo)
    if runtime is None:
        raise kopf.TemporaryError("operator is starting", delay=1)
    return runtime


# ----------------------------------------------------------------- operator
@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    failpoint("operator-startup")
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.queueing.idle_timeout = WORKER_IDLE_SECONDS
    # (settings.watching.chunk_size stays None, kopf's default: a listing in pages
    # fails whole when a page's continue token has been compacted away (410), and
    # kopf 1.x stops the operator then; tried in issue 13 and not kept.)
    runtime = runtime_of(memo)
    if runtime is None:
        config = memo.get("config")
        assert config is not None, "tideflow_operator.cli puts the config in kopf's memo"
        stop_flag = memo.get("stop_flag")
        runtime = Runtime.connect(config, stop=stop_flag.set if stop_flag is not None else _noop)
        memo.runtime = runtime
    try:
        await runtime.start()
    except BrokerFileError as exc:
        # Not retried: the file stays as it is until someone fixes it.  The CLI
        # says it in its one line (memo.cannot_start) and exits non-zero.
        memo.cannot_start = str(exc)
        raise kopf.PermanentError(str(exc)) from None


def _noop() -> None:
    return None


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime = runtime_of(memo)
    if runtime is not None:
        await runtime.stop()


# ----------------------------------------------------------------- Workflows
# (when=: a sharded operator handles only its own sites' Workflows: shards.py;
# everything when not sharded.)
@kopf.on.event(GROUP, VERSION, WORKFLOWS, when=kopf_filter)
async def workflow_event(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    """Every watch event of a Workflow (``type`` None: kopf's listing), queued (watch.py)."""
    rt = runtime_of(memo)
    if rt is not None:
        await rt.watch.offer(type, body)


# ----------------------------------------------------------------- EdgeSites
@kopf.on.event(GROUP, VERSION, EDGESITES)
async def edgesite_event(type: str, body: kopf.Body, name: str, memo: Any, **_: Any) -> None:
    rt = _runtime(memo)
    if type == "DELETED":
        rt.sites.gone(name)
    else:
        rt.sites.seen(name, body)
    labels = None if type == "DELETED" else dict(body["metadata"].get("labels") or {})
    if rt.shards is not None and labels is not None:
        rt.shards.site_seen(name, labels)  # its owner; a move restarts this shard
    rt.cron.send(rt.cron.plan.site_changed(name, labels))


# ----------------------------------------------------------------- CronWorkflows
@kopf.on.event(GROUP, VERSION, CRONWORKFLOWS)
async def cronworkflow_event(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    cr = _runtime(memo).cron
    meta = body["metadata"]
    uid = str(meta.get("uid"))
    if type == "DELETED" or meta.get("deletionTimestamp"):
        cr.send(cr.remove(uid))
        return
    cr.seed((str(meta.get("namespace")), str(meta.get("name"))), body.get("status"))
    try:
        sends = cr.plan.upsert(dict(body))
    except SpecError as exc:
        log.warning(
            "CronWorkflow %s/%s is invalid: %s", meta.get("namespace"), meta.get("name"), exc
        )
        cr.send(cr.plan.remove(uid))
        return
    cr.send(sends)
