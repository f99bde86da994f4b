"""Admission from watch events next to kopf's create handler: never twice.

A Workflow is admitted from its first watch event (``eager``) and again by
kopf's create/resume handler later; both, and any number of events, may
race.  No API server here: a fake ``Kube``, passed to the runtime as its
collaborator, records what would be written.
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

SITE = "site-a"


class FakeKube:
    def __init__(self) -> None:
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[str, str]] = []

    async def patch_workflow_status(
        self, namespace: str, name: str, status: dict[str, Any], *, urgent: bool = False, **_: Any
    ) -> None:
        await asyncio.sleep(0.02)  # a round trip: lets the other callers in
        self.patches.append((name, status))

    async def patch_ledger(
        self, namespace: str, name: str, site: str, data: dict[str, str | None]
    ) -> None:
        await asyncio.sleep(0.01)

    async def read_ledgers(self, namespace: str) -> dict[str, dict[str, str]]:
        return {}

    async def event(
        self, obj: dict[str, Any], kind: str, reason: str, message: str, **_: Any
    ) -> None:
        self.events.append((obj["metadata"]["name"], reason))


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


def workflow(name: str = "wf", generation: int = 1, **spec: Any) -> dict[str, Any]:
    return {
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


async def settle(rt: Runtime) -> None:
    await asyncio.sleep(0.05)
    await rt.errands.wait()


async def test_concurrent_events_and_create_handler_assign_once(runtime: Runtime) -> None:
    body = workflow()
    results = await asyncio.gather(
        *(runtime.admit(body, eager=True) for _ in range(4)), runtime.admit(body)
    )
    await settle(runtime)
    assert sorted(results) == [False, False, False, False, True]
    assigned = [s for _, s in runtime.kube.patches if s.get("assignedGeneration")]  # type: ignore[attr-defined]
    assert len(assigned) == 1 and assigned[0]["phase"] == "Assigned"
    assert [kind for kind, _ in runtime.sent] == ["assign"]
    assert runtime.kube.events == [("wf", "Assigned")]  # type: ignore[attr-defined]
    assert runtime.records[("ns", "wf")].trace_id == assigned[0]["traceId"]


async def test_a_burst_is_written_before_it_is_sent(runtime: Runtime) -> None:
    bodies = [workflow(f"wf-{i}") for i in range(20)]
    await asyncio.gather(*(runtime.admit(b, eager=True) for b in bodies))
    await settle(runtime)
    assert len(runtime.sent) == 20 and len(runtime.kube.patches) == 20  # type: ignore[attr-defined]


async def test_spec_edited_before_kopf_caught_up_still_applies(runtime: Runtime) -> None:
    assert await runtime.admit(workflow(), eager=True)
    # kopf's create handler sees generation 2 (suspend set): its diff base starts
    # there, so the update handler would never see this edit.
    await runtime.admit(workflow(generation=2, suspend=True))
    await settle(runtime)
    assert [kind for kind, _ in runtime.sent] == ["assign", "suspend"]
    assert runtime.records[("ns", "wf")].spec is None
    await runtime.admit(workflow(generation=2, suspend=True))  # resume: nothing more
    assert [kind for kind, _ in runtime.sent] == ["assign", "suspend"]


async def test_eager_admission_leaves_an_invalid_spec_to_the_create_handler(
    runtime: Runtime,
) -> None:
    bad = workflow(tasks=[{"name": "a", "command": ["true"], "dependsOn": ["a"]}])
    assert not await runtime.admit(bad, eager=True)
    assert runtime.kube.patches == [] and runtime.sent == []  # type: ignore[attr-defined]
    await runtime.admit(bad)
    assert [s["reason"] for _, s in runtime.kube.patches] == ["InvalidSpec"]  # type: ignore[attr-defined]


async def test_deleted_before_kopf_added_its_finalizer_cancels(
    runtime: Runtime,
) -> None:
    body = workflow()
    await handlers_event(runtime, "ADDED", body)
    await handlers_event(runtime, "DELETED", body)
    kinds = [kind for kind, _ in runtime.sent]
    assert kinds == ["assign", "cancel"]
    assert isinstance(runtime.sent[1][1], wire.ControlPayload)
    assert ("ns", "wf") not in runtime.records
    # A later DELETED (kopf's delete handler already ran) does nothing more.
    await handlers_event(runtime, "DELETED", body)
    assert [kind for kind, _ in runtime.sent] == ["assign", "cancel"]


async def handlers_event(rt: Runtime, kind: str, body: dict[str, Any]) -> None:
    """kopf's call of the watch-event handler, the runtime in its memo as the startup left it."""
    await handlers.workflow_event(type=kind, body=body, memo=kopf.Memo(runtime=rt))  # type: ignore[arg-type]
