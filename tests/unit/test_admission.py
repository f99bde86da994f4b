"""Admission, spec edits and deletion from the Workflows' watch alone: never twice.

kopf has no changing handler for Workflows (decision 0019): every watch event
goes to :class:`~tideflow_operator.watch.WorkflowWatch`, and any number of
events (and the retries of a Workflow waiting for a site) may race.  No API
server here: a fake ``Kube``, passed to the runtime as its collaborator,
records what would be written.  End to end: tests/e2e/test_operator.py and
test_operator_control.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from tideflow import wire
from tideflow.mqtt import BrokerConnection
from tideflow_operator import handlers
from tideflow_operator.bridge import CloudBridge
from tideflow_operator.runtime import OperatorConfig, Runtime
from tideflow_operator.watch import OLD_FINALIZER

SITE = "site-a"


class FakeKube:
    def __init__(self) -> None:
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[str, str]] = []
        self.finalizers_removed: list[tuple[str, list[str]]] = []
        self.fail_patches = 0

    async def patch_workflow_status(
        self, namespace: str, name: str, status: dict[str, Any], *, urgent: bool = False, **_: Any
    ) -> None:
        await asyncio.sleep(0.02)  # a round trip: lets the other callers in
        if self.fail_patches:
            self.fail_patches -= 1
            raise RuntimeError("API server away")
        self.patches.append((name, status))

    async def patch_ledger(self, namespace: str, name: str, data: dict[str, str | None]) -> None:
        await asyncio.sleep(0.01)

    async def read_ledgers(self, namespace: str) -> dict[str, dict[str, str]]:
        return {}

    async def event(
        self, obj: dict[str, Any], kind: str, reason: str, message: str, **_: Any
    ) -> None:
        self.events.append((obj["metadata"]["name"], reason))

    async def remove_finalizer(
        self, namespace: str, name: str, finalizers: list[str], finalizer: str
    ) -> bool:
        self.finalizers_removed.append((name, [f for f in finalizers if f != finalizer]))
        return True


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Runtime:
    config = OperatorConfig(broker=BrokerConnection("mqtt://127.0.0.1:1"))
    rt = Runtime(
        config,
        kube=FakeKube(),  # type: ignore[arg-type]
        bridge=CloudBridge(config.bridge_config()),
        quiet_seconds=0.01,
    )
    rt.sent: list[tuple[str, Any]] = []  # type: ignore[misc]
    monkeypatch.setattr(rt.bridge, "assign", lambda site, p, tp=None: rt.sent.append(("assign", p)))
    monkeypatch.setattr(rt.bridge, "control", lambda site, p: rt.sent.append((p.action, p)))
    return rt


def workflow(
    name: str = "wf", generation: int = 1, status: dict[str, Any] | None = None, **spec: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {
            "namespace": "ns",
            "name": name,
            "uid": f"uid-{name}",
            "generation": generation,
        },
        "spec": {
            "placement": {"site": SITE},
            "tasks": [{"name": "t", "command": ["true"]}],
            **spec,
        },
    }
    if status is not None:
        body["status"] = status
    return body


async def settle(rt: Runtime) -> None:
    await asyncio.sleep(0.05)
    await rt.errands.wait()


def kube(rt: Runtime) -> FakeKube:
    return rt.kube  # type: ignore[return-value]


async def handlers_event(rt: Runtime, kind: str | None, body: dict[str, Any]) -> None:
    """kopf's call of the watch-event handler, the runtime in its memo as the startup left it."""
    await handlers.workflow_event(type=kind, body=body, memo=kopf.Memo(runtime=rt))  # type: ignore[arg-type]


def assigned_status(rt: Runtime, name: str = "wf") -> dict[str, Any]:
    (status,) = [s for n, s in kube(rt).patches if n == name and s.get("assignedGeneration")]
    return {**status, "observedGeneration": status["assignedGeneration"]}


async def test_concurrent_events_assign_once(runtime: Runtime) -> None:
    body = workflow()
    await asyncio.gather(
        *(handlers_event(runtime, k, body) for k in (None, "ADDED", "MODIFIED", "MODIFIED")),
        runtime.admit(body),
    )
    await settle(runtime)
    assigned = [s for _, s in kube(runtime).patches if s.get("assignedGeneration")]
    assert len(assigned) == 1 and assigned[0]["phase"] == "Assigned"
    assert [kind for kind, _ in runtime.sent] == ["assign"]
    assert kube(runtime).events == []  # nobody acts on "Assigned": no Event (decision 0019)
    assert runtime.records[("ns", "wf")].trace_id == assigned[0]["traceId"]


async def test_a_burst_is_written_before_it_is_sent(runtime: Runtime) -> None:
    bodies = [workflow(f"wf-{i}") for i in range(20)]
    await asyncio.gather(*(handlers_event(runtime, "ADDED", b) for b in bodies))
    await settle(runtime)
    assert len(runtime.sent) == 20 and len(kube(runtime).patches) == 20


async def test_spec_edits_seen_on_the_watch_suspend_or_are_refused(runtime: Runtime) -> None:
    await handlers_event(runtime, "ADDED", workflow())
    status = assigned_status(runtime)
    # A suspend edit: sent to the site; not an edit of the run.
    await handlers_event(runtime, "MODIFIED", workflow(generation=2, status=status, suspend=True))
    await settle(runtime)
    assert [kind for kind, _ in runtime.sent] == ["assign", "suspend"]
    assert ("wf", "SpecChangeRefused") not in kube(runtime).events
    # Another change: refused with a condition and an Event, never sent.
    changed = workflow(generation=3, status=status, suspend=True, params={"x": "y"})
    for _ in range(2):  # the same generation seen twice is handled once
        await handlers_event(runtime, "MODIFIED", changed)
        await settle(runtime)
    assert [kind for kind, _ in runtime.sent] == ["assign", "suspend"]
    assert kube(runtime).events.count(("wf", "SpecChangeRefused")) == 1
    (refusal,) = [s for _, s in kube(runtime).patches if "conditions" in s and
                  any(c["type"] == "SpecChangeRefused" for c in s["conditions"])]  # fmt: skip
    assert refusal["observedGeneration"] == 3


async def test_an_edit_made_while_no_operator_ran_is_judged_at_the_first_event(
    runtime: Runtime,
) -> None:
    # Assigned at generation 1 (the ledger has its digest), edited to generation 2
    # while no operator ran: the restarted operator's listing shows it.
    first = Runtime(
        runtime.config,
        kube=FakeKube(),
        bridge=runtime.bridge,
        quiet_seconds=0.01,  # type: ignore[arg-type]
    )
    await handlers_event(first, "ADDED", workflow())
    runtime.ledger = first.ledger
    runtime.admission.ledger = first.ledger
    status = {**assigned_status(first), "phase": "Running"}
    await handlers_event(runtime, None, workflow(generation=2, status=status, params={"x": "y"}))
    await settle(runtime)
    assert kube(runtime).events == [("wf", "SpecChangeRefused")]


async def test_an_invalid_spec_is_reported_once_and_a_fixed_one_is_admitted(
    runtime: Runtime,
) -> None:
    bad = workflow(tasks=[{"name": "a", "command": ["true"], "dependsOn": ["a"]}])
    await handlers_event(runtime, "ADDED", bad)
    await settle(runtime)
    ((_, failed),) = kube(runtime).patches
    assert failed["phase"] == "Failed" and failed["reason"] == "InvalidSpec"
    assert kube(runtime).events == [("wf", "InvalidSpec")]
    # Its own Failed status comes back on the watch, and again after a restart: no write.
    seen = {**bad, "status": failed}
    await handlers_event(runtime, "MODIFIED", seen)
    await handlers_event(runtime, None, seen)
    await runtime.watch.retry(force=True)
    await settle(runtime)
    assert len(kube(runtime).patches) == 1 and len(kube(runtime).events) == 1
    # Fixed (a new generation): admitted.
    await handlers_event(runtime, "MODIFIED", workflow(generation=2, status=failed))
    await settle(runtime)
    assert [kind for kind, _ in runtime.sent] == ["assign"]


async def test_a_workflow_with_no_site_waits_and_is_admitted_when_one_appears(
    runtime: Runtime,
) -> None:
    selector = {"siteSelector": {"matchLabels": {"region": "north"}}}
    body = workflow(placement=selector)
    await handlers_event(runtime, "ADDED", body)
    await settle(runtime)
    ((_, pending),) = kube(runtime).patches
    assert pending["phase"] == "Pending" and pending["reason"] == "NoMatchingSite"
    assert kube(runtime).events == [("wf", "NoMatchingSite")]  # what a user acts on
    # Its own Pending status on the watch, and retries that find nothing new: no writes.
    await handlers_event(runtime, "MODIFIED", {**body, "status": pending})
    await runtime.watch.retry(force=True)
    await settle(runtime)
    assert len(kube(runtime).patches) == 1 and len(kube(runtime).events) == 1
    # A matching site appears: the next housekeeping round admits it.
    runtime.sites.seen(SITE, {"metadata": {"uid": "s1", "labels": {"region": "north"}}})
    assert await runtime.watch.retry() == 1
    await settle(runtime)
    assert [kind for kind, _ in runtime.sent] == ["assign"]
    assert runtime.records[("ns", "wf")].site == SITE
    assert runtime.watch.waiting == {}


async def test_a_waiting_workflow_keeps_no_whole_object_and_is_admitted_from_what_it_keeps(
    runtime: Runtime,
) -> None:
    # Issue 13: 10,000 Workflows waiting for a site must not hold 10,000 whole objects.
    # What the watch delivers carries managedFields and annotations (kubectl's
    # last-applied-configuration: the spec again); none of it is kept.
    selector = {"siteSelector": {"matchLabels": {"region": "north"}}}
    body = workflow(placement=selector)
    body["metadata"].update(
        resourceVersion="7", labels={"team": "a"},
        annotations={"kubectl.kubernetes.io/last-applied-configuration": "x" * 10_000},
        managedFields=[{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:tasks": {}}}}],
        creationTimestamp="2026-11-30T00:00:00Z",
    )  # fmt: skip
    body["apiVersion"], body["kind"] = "tideflow.io/v1alpha1", "Workflow"
    await handlers_event(runtime, "ADDED", body)
    await settle(runtime)
    (waiting,) = runtime.watch.waiting.values()
    kept = waiting.body
    assert kept is not body and set(kept) <= {"metadata", "spec", "status"}
    assert set(kept["metadata"]) == {"namespace", "name", "uid", "generation",
                                     "resourceVersion", "labels"}  # fmt: skip
    assert kept["spec"] is body["spec"]  # shared, not copied; the rest may go
    # Its own Pending status on the watch: the latest is kept, compact too.
    ((_, pending),) = kube(runtime).patches
    await handlers_event(runtime, "MODIFIED", {**body, "status": pending})
    kept = runtime.watch.waiting[("ns", "wf")].body
    assert "managedFields" not in kept["metadata"] and kept["status"] == pending
    # Admitted from what was kept, as from the whole object.
    runtime.sites.seen(SITE, {"metadata": {"uid": "s1", "labels": {"region": "north"}}})
    assert await runtime.watch.retry() == 1
    await settle(runtime)
    ((kind, payload),) = runtime.sent
    assert kind == "assign" and payload.spec == body["spec"] and payload.uid == "uid-wf"
    assert runtime.watch.waiting == {}


async def test_an_admission_the_api_server_failed_is_tried_again(runtime: Runtime) -> None:
    kube(runtime).fail_patches = 1
    await handlers_event(runtime, "ADDED", workflow())
    assert runtime.sent == [] and ("ns", "wf") in runtime.watch.waiting
    assert await runtime.watch.retry(force=True) == 1
    await settle(runtime)
    assert [kind for kind, _ in runtime.sent] == ["assign"]


async def test_deleted_cancels_at_the_site_without_a_finalizer(runtime: Runtime) -> None:
    body = workflow()
    await handlers_event(runtime, "ADDED", body)
    await handlers_event(runtime, "DELETED", body)
    kinds = [kind for kind, _ in runtime.sent]
    assert kinds == ["assign", "cancel"]
    assert isinstance(runtime.sent[1][1], wire.ControlPayload)
    assert ("ns", "wf") not in runtime.records
    # A later DELETED does nothing more.
    await handlers_event(runtime, "DELETED", body)
    assert [kind for kind, _ in runtime.sent] == ["assign", "cancel"]
    assert kube(runtime).finalizers_removed == []


async def test_an_older_operators_finalizer_is_removed_and_its_deletion_cancels(
    runtime: Runtime,
) -> None:
    # Upgrade path: objects an older operator's kopf finalized.  Being deleted: the
    # run is cancelled, then only our finalizer is removed (another's stays).
    doomed = workflow("doomed")
    await handlers_event(runtime, "ADDED", doomed)
    deleting = workflow("doomed", status=assigned_status(runtime, "doomed"))
    deleting["metadata"]["finalizers"] = [OLD_FINALIZER, "example.com/other"]
    deleting["metadata"]["deletionTimestamp"] = "2026-11-30T00:00:00Z"
    await handlers_event(runtime, "MODIFIED", deleting)
    assert [kind for kind, _ in runtime.sent] == ["assign", "cancel"]
    assert kube(runtime).finalizers_removed == [("doomed", ["example.com/other"])]
    # Alive: removed once admissions pause, so that a later delete never waits for us.
    alive = workflow("alive")
    alive["metadata"]["finalizers"] = [OLD_FINALIZER]
    await handlers_event(runtime, "ADDED", alive)
    await settle(runtime)
    assert kube(runtime).finalizers_removed[-1] == ("alive", [])


async def settings_after_startup(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> kopf.OperatorSettings:
    """kopf's settings as the operator's start-up handler leaves them (runtime not started)."""

    async def started() -> None:
        return None

    monkeypatch.setattr(runtime, "start", started)
    settings = kopf.OperatorSettings()
    await handlers.startup(settings=settings, memo=kopf.Memo(runtime=runtime))
    return settings


async def test_kopf_lets_an_idle_object_worker_go_soon(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 13: an idle per-object worker keeps its last event's whole object; kopf's
    # 5 s default kept thousands of them during a fleet's wave.
    assert kopf.OperatorSettings().queueing.idle_timeout > handlers.WORKER_IDLE_SECONDS
    settings = await settings_after_startup(runtime, monkeypatch)
    assert settings.queueing.idle_timeout == handlers.WORKER_IDLE_SECONDS


async def test_kopf_lists_workflows_whole_not_in_pages_it_cannot_resume(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 13: with settings.watching.chunk_size set, a 1,000-site run's operator
    # stopped: a page's continue token was compacted away while the busy API server
    # served the listing (410), and kopf's fetch_objs lets that error stop the
    # operator ("Multidimensional multitasker has failed").
    settings = await settings_after_startup(runtime, monkeypatch)
    assert settings.watching.chunk_size is None


async def test_a_backlog_of_events_holds_compact_views_and_a_delete_waits_its_turn(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 13 (decision 0026): while admissions wait for the API server, kopf's call
    # returns past HELD_EVENTS queued, so kopf's per-object worker lets the whole
    # object go; what waits is compact; a Workflow's DELETED never overtakes its
    # admission (the run is assigned, then cancelled, never sent after the cancel).
    from tideflow_operator import watch

    monkeypatch.setattr(watch, "HELD_EVENTS", 4)
    api_away = asyncio.Event()
    patch = kube(runtime).patch_workflow_status

    async def slow_patch(*args: Any, **kwargs: Any) -> None:
        await api_away.wait()
        await patch(*args, **kwargs)

    monkeypatch.setattr(kube(runtime), "patch_workflow_status", slow_patch)
    bodies = [workflow(f"wf-{i}") for i in range(10)]
    for body in bodies:
        body["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    held = [asyncio.create_task(handlers_event(runtime, "ADDED", b)) for b in bodies[:4]]
    # Past the bound, kopf's call returns at once though nothing is admitted yet.
    for body in bodies[4:]:
        await asyncio.wait_for(handlers_event(runtime, "ADDED", body), timeout=5)
    await asyncio.wait_for(handlers_event(runtime, "DELETED", bodies[9]), timeout=5)
    assert not any(task.done() for task in held) and runtime.sent == []
    queued = [item.body for q in runtime.watch._queues.values() for item in q]
    assert len(queued) == 11 and all("managedFields" not in b["metadata"] for b in queued)
    api_away.set()
    await asyncio.wait_for(asyncio.gather(*held), timeout=5)
    async with asyncio.timeout(5):
        while runtime.watch.queued:
            await asyncio.sleep(0.01)
    await settle(runtime)
    assigned = [p.name for kind, p in runtime.sent if kind == "assign"]
    assert sorted(assigned) == sorted(b["metadata"]["name"] for b in bodies)
    last = [(kind, p.uid) for kind, p in runtime.sent if p.uid == "uid-wf-9"]
    assert last == [("assign", "uid-wf-9"), ("cancel", "uid-wf-9")]
    assert ("ns", "wf-9") not in runtime.records and runtime.watch._queues == {}
    await runtime.watch.stop()
