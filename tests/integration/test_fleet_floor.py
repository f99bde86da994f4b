"""The fleet benchmark's floor: what the issue lets a Workflow cost the API server, alone.

Issue 13 allows a Workflow, after the user's create, at most three writes to
its object and status (Assigned, Running, Succeeded).  ``bench.fleet --floor``
makes exactly those writes at the wave's pace with no operator and no fleet, so
that apply→Assigned of the real run can be read against the least any operator
could cost.  Each patch must change the status (a merge patch that changes
nothing is not written to etcd, and would make the floor cheaper than it is).
Against a real API server (envtest).
"""

from __future__ import annotations

import importlib
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from services.world import install_crds

pytestmark = pytest.mark.envtest

REPO = Path(__file__).resolve().parents[2]


def test_the_floor_writes_each_workflow_created_then_patched_n_times(
    envtest: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO))  # bench/ is run from the root, not installed
    fleet = importlib.import_module("bench.fleet")
    install_crds(envtest)
    ns = f"floor-{uuid.uuid4().hex[:8]}"
    envtest.kubectl("create", "namespace", ns)
    server, context, _ = fleet.ssl_from_kubeconfig(envtest.kubeconfig)
    manifests = [fleet.manifest(ns, f"wf-{i}", "site-a", 3, None) for i in range(4)]

    wave = fleet.paced_wave(server, context, manifests, 0.4, 4, patches=3)

    assert wave.errors == []
    assert len(wave.applied) == 4
    assert len(wave.patch_rtt) == 4  # apply -> first patch done, one per Workflow
    custom = client.CustomObjectsApi(envtest.api_client())
    for i in range(4):
        obj = custom.get_namespaced_custom_object(
            "tideflow.io", "v1alpha1", ns, "workflows", f"wf-{i}"
        )
        assert obj["status"]["phase"] == "Succeeded"
        assert obj["status"]["syncedSeq"] == 3  # each of the three patches changed the status
    assert fleet.floor_phases(3) == ("Assigned", "Running", "Succeeded")
    assert fleet.floor_phases(5) == ("Assigned", "Running", "Running", "Running", "Succeeded")
    assert fleet.floor_phases(1) == ("Assigned",)
