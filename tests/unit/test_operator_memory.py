"""What the operator holds per Workflow (issue 13: at most 400 MB at 10,000 Workflows).

Measured at 1,000 sites, the operator's RSS grew by about 19 KB per Workflow
it held; what it keeps alive of its own is measured here with ``tracemalloc``
over the real runtime (admission, the applier's view, the run's record, the
ledger entry, its statuses written) for a thousand Workflows that ran to
Succeeded, against a fake API server that keeps nothing.  Every object kept
per Workflow is also a page kept from being given back when the transient
objects around it are freed, so the budget is tight.

A Workflow's record keeps what it needs to render conditions and Events — a
condition's status and since when, the object's uid — not rendered copies
of them.
"""

from __future__ import annotations

import gc
import logging
import tracemalloc
from typing import Any

from tideflow import wire
from tideflow_operator.admission import Outcome
from tideflow_operator.bridge import CloudBridge
from tideflow_operator.runtime import OperatorConfig, Runtime

WORKFLOWS = 1000
SITES = 100
EPOCH = "e1"
# Bytes held per Workflow that ran (3 tasks): about 5,000 before this budget.
BUDGET_BYTES = 3600


class ForgetfulKube:
    """The API server as the runtime sees it; keeps nothing it is sent."""

    def __init__(self) -> None:
        self.version = 0

    async def patch_workflow_status(self, *_: Any, **__: Any) -> str:
        self.version += 1
        return str(self.version)

    async def patch_ledger(self, *_: Any) -> None:
        return None

    async def read_ledgers(self, namespace: str) -> dict[str, dict[str, str]]:
        return {}

    async def event(self, *_: Any, **__: Any) -> None:
        return None

    async def create_edgesite(self, name: str, labels: dict[str, str]) -> None:
        return None

    async def patch_edgesite_status(self, name: str, status: dict[str, Any]) -> None:
        return None


def workflow(i: int) -> dict[str, Any]:
    steps = [{"name": "t0", "command": ["true"]}] + [
        {"name": f"t{j}", "command": ["true"], "dependsOn": [f"t{j - 1}"]} for j in (1, 2)
    ]
    return {
        "apiVersion": "tideflow.io/v1alpha1", "kind": "Workflow",
        "metadata": {"namespace": "bench", "name": f"wf-{i:05d}", "generation": 1,
                     "uid": f"{i:08x}-0000-4000-8000-000000000000",
                     "resourceVersion": str(100 + i)},
        "spec": {"placement": {"site": f"site-{i % SITES:04d}"}, "tasks": steps},
    }  # fmt: skip


def records(body: dict[str, Any], first_seq: int) -> wire.EventsPayload:
    meta = body["metadata"]
    base = {"uid": meta["uid"], "generation": 1, "namespace": "bench", "name": meta["name"]}
    bodies: list[tuple[str, dict[str, Any]]] = [("run", {"phase": "Pending"})]
    bodies.append(("run", {"phase": "Running"}))
    for j in range(3):
        bodies.append(("task", {"task": f"t{j}", "phase": "Running", "attempt": 1}))
        bodies.append(("task", {"task": f"t{j}", "phase": "Succeeded", "attempt": 1}))
    bodies.append(("run", {"phase": "Succeeded"}))
    return wire.EventsPayload(
        records=[
            wire.EventRecord(seq=first_seq + n, kind=kind, body={**base, **extra})
            for n, (kind, extra) in enumerate(bodies)
        ],
        epoch=EPOCH,
    )


async def test_a_workflow_that_ran_costs_the_operator_little_memory() -> None:
    config = OperatorConfig(broker="mqtt://127.0.0.1:1")
    rt = Runtime(
        config,
        kube=ForgetfulKube(),  # type: ignore[arg-type]
        bridge=CloudBridge(config.bridge_config()),
        quiet_seconds=0.0,
    )
    rt.bridge.assign = lambda *a, **k: True  # type: ignore[method-assign]
    rt.ledger.spacing = 0.0  # (its group commit's pacing: nothing to wait for here)
    # One Workflow first: what is made once (caches, the sites' state) is not counted.
    warm = workflow(WORKFLOWS)
    assert await rt.admit(warm) is Outcome.ASSIGNED
    seqs = {f"site-{i:04d}": 1 for i in range(SITES)}
    for site in seqs:  # each site's first batch, of a run not counted
        await rt.persist(rt.applier.apply_batch(site, records(warm, 1)))
        seqs[site] = 10
    bodies = [workflow(i) for i in range(WORKFLOWS)]
    # (pytest keeps every log record it captures: a line per Workflow is not the operator's)
    logging.getLogger("tideflow_operator").setLevel(logging.WARNING)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for body in bodies:
            assert await rt.admit(body) is Outcome.ASSIGNED
        for body in bodies:
            site = body["spec"]["placement"]["site"]
            await rt.persist(rt.applier.apply_batch(site, records(body, seqs[site])))
            seqs[site] += 9
        del bodies, body
        gc.collect()
        held = (tracemalloc.get_traced_memory()[0] - before) / WORKFLOWS
    finally:
        tracemalloc.stop()
        logging.getLogger("tideflow_operator").setLevel(logging.NOTSET)
    assert all(v.phase == "Succeeded" for v in rt.applier._views.values())
    assert len(rt.records) == WORKFLOWS + 1
    assert held <= BUDGET_BYTES, f"{held:.0f} bytes held per Workflow"
    print(f"{held:.0f} bytes held per Workflow")
