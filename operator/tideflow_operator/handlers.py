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
  ``memo.runtime``.  kopf copies the operator's memo into each resource's
  memo when it first sees the resource, after the startup handlers ran.
* Admission runs from the first watch event that shows a Workflow, not
  from kopf's create handler: kopf calls that only after its finalizer PATCH
  has come back on the watch, which under a burst took seconds.  The create
  and resume handlers stay as the fallback (invalid specs, no matching site
  and its retries, a spec edited before kopf caught up); admission is
  serialized per Workflow, so the two paths never assign twice.  kopf still
  adds the finalizer; a Workflow deleted before it did is cancelled from its
  DELETED event.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from tideflow.spec import SpecError

from .cron import CRONWORKFLOWS
from .kube import EDGESITES, GROUP, VERSION, WORKFLOWS
from .model import essence_of
from .runtime import Runtime
from .shards import kopf_filter, kopf_shard_filter, kopf_unsharded

log = logging.getLogger(__name__)

FINALIZER = "tideflow.io/cancel-at-site"


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
        essence = essence_of(body.get("spec"))
        return {"spec": {"suspend": essence.suspend, "specDigest": essence.digest}}


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
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="tideflow.io")
    settings.persistence.diffbase_storage = DigestDiffBaseStorage(
        prefix="tideflow.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    runtime = runtime_of(memo)
    if runtime is None:
        config = memo.get("config")
        assert config is not None, "tideflow_operator.cli puts the config in kopf's memo"
        stop_flag = memo.get("stop_flag")
        runtime = Runtime.connect(config, stop=stop_flag.set if stop_flag is not None else _noop)
        memo.runtime = runtime
    await runtime.start()


def _noop() -> None:
    return None


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime = runtime_of(memo)
    if runtime is not None:
        await runtime.stop()


# ----------------------------------------------------------------- Workflows
@kopf.on.event(GROUP, VERSION, WORKFLOWS, when=kopf_filter)
async def workflow_event(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    """Assign from the first watch event; kopf's create handler comes much later."""
    rt = runtime_of(memo)
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


# (when=: a sharded operator handles only its own sites' Workflows: shards.py;
# everything when not sharded.)
@kopf.on.resume(GROUP, VERSION, WORKFLOWS, when=kopf_filter)
@kopf.on.create(GROUP, VERSION, WORKFLOWS, when=kopf_filter)
async def workflow_created(body: kopf.Body, memo: Any, **_: Any) -> None:
    await _runtime(memo).admit(body)


@kopf.on.update(GROUP, VERSION, WORKFLOWS, field="spec", when=kopf_filter)
async def workflow_updated(body: kopf.Body, old: Any, new: Any, memo: Any, **_: Any) -> None:
    await _runtime(memo).spec_changed(body, {"spec": old}, {"spec": new})


@kopf.on.delete(GROUP, VERSION, WORKFLOWS, when=kopf_unsharded)
async def workflow_deleted(body: kopf.Body, memo: Any, **_: Any) -> None:
    await _runtime(memo).deleted(body)


# A shard's: no finalizer (optional).  Shards sharing kopf's finalizer name would
# take turns adding it and removing it from each other's Workflows; a deletion is
# cancelled at the site from the DELETED event and the ledger (decision 0007).
@kopf.on.delete(GROUP, VERSION, WORKFLOWS, optional=True, when=kopf_shard_filter)
async def shard_workflow_deleted(body: kopf.Body, memo: Any, **_: Any) -> None:
    await _runtime(memo).deleted(body)


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
        cr.send(cr.plan.remove(uid))
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
