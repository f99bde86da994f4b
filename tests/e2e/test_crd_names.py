"""The API server, given the generated CRDs, refuses the names the site would refuse.

Proves, against a real kube-apiserver: an EdgeSite whose name is not a
DNS-1123 label (``Line-2``: the API server alone checks a custom resource's
name only as a path segment) and a Workflow placed on ``x/y`` or ``+`` (an
MQTT level separator and wildcard) are refused with the field named; a
Workflow named ``Nightly`` is refused; Argo's dag-diamond with tasks ``A``..``D``
and a 128-character task name are accepted (the CRD's pattern and maxLength,
with its CEL rules, pass the API server's cost estimator).
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from services.world import install_crds

pytestmark = pytest.mark.envtest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cluster(envtest: Any) -> Any:
    install_crds(envtest)
    for crd in ("workflows.tideflow.io", "edgesites.tideflow.io"):
        envtest.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")
    return envtest


def apply(cluster: Any, manifest: dict[str, Any]) -> Any:
    return cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=False)


def edgesite(name: str) -> dict[str, Any]:
    return {"apiVersion": "tideflow.io/v1alpha1", "kind": "EdgeSite", "metadata": {"name": name}}


def diamond(name: str, namespace: str) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load((REPO / "examples" / "dag-diamond.yaml").read_text())
    manifest["metadata"] = {"name": name, "namespace": namespace}
    return manifest


def test_names_that_break_topics_or_files_are_refused(cluster: Any) -> None:
    namespace = f"names-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", namespace)

    refused = apply(cluster, edgesite("Line-2"))
    assert refused.returncode != 0 and "metadata.name" in refused.stderr, refused.stderr
    site = f"line-{uuid.uuid4().hex[:6]}"
    assert apply(cluster, edgesite(site)).returncode == 0

    for bad_site in ("x/y", "+"):
        wf = diamond(f"bad-{uuid.uuid4().hex[:6]}", namespace)
        wf["spec"]["placement"] = {"site": bad_site}
        refused = apply(cluster, wf)
        assert refused.returncode != 0 and "spec.placement.site" in refused.stderr, refused.stderr

    refused = apply(cluster, diamond("Nightly", namespace))
    assert refused.returncode != 0 and "metadata.name" in refused.stderr, refused.stderr

    accepted = apply(cluster, diamond("dag-diamond", namespace))
    assert accepted.returncode == 0, accepted.stderr
    long_names = copy.deepcopy(diamond("long-names", namespace))
    long_names["spec"]["tasks"][0]["name"] = "A" * 128
    for task in long_names["spec"]["tasks"][1:3]:
        task["dependsOn"] = ["A" * 128]
    assert apply(cluster, long_names).returncode == 0
    too_long = copy.deepcopy(long_names)
    too_long["metadata"]["name"] = "too-long"
    too_long["spec"]["tasks"][0]["name"] = "A" * 129
    refused = apply(cluster, too_long)
    assert refused.returncode != 0 and "spec.tasks[0].name" in refused.stderr, refused.stderr
