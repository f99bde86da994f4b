"""The operator chart's console option, rendered and linted by Helm itself (no cluster).

Proves: off by default (no console object at all); switched on, it is a
Deployment of its own running ``tideflow console --in-cluster`` from the
operator image, hardened like the operator, with a ServiceAccount whose only
permissions are get/list/watch on Workflows, EdgeSites and CronWorkflows,
and a ClusterIP Service; the container's command and arguments are ones the
``tideflow`` CLI accepts.  ``tests/e2e/test_console_rbac.py`` applies the same
rules to a real API server.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is not installed: pip install -e '.[test]'"
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tideflow-operator"
BASE = {"mqtt": {"url": "mqtt://mqtt.example.net:1883"}}
ON = {**BASE, "console": {"enabled": True, "traceUrl": "https://jaeger.example/trace/{traceId}"}}
Doc = dict[str, Any]


def render(values: Doc) -> list[Doc]:
    with helm.Chart.load(str(CHART)) as loaded:
        manifests = loaded.render(values, name="tf", namespace="tideflow")
    return [
        d
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d
    ]


def console_objects(docs: list[Doc]) -> dict[str, Doc]:
    return {d["kind"]: d for d in docs if d["metadata"]["name"] == "tf-tideflow-operator-console"}


def test_the_console_is_off_by_default() -> None:
    assert console_objects(render(BASE)) == {}


def test_the_console_is_read_only_hardened_and_reachable_by_port_forward() -> None:
    objects = console_objects(render(ON))
    assert set(objects) == {
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service",
    }  # fmt: skip
    assert objects["ClusterRole"]["rules"] == [
        {"apiGroups": ["tideflow.io"], "resources": ["workflows", "edgesites", "cronworkflows"],
         "verbs": ["get", "list", "watch"]},
    ]  # fmt: skip
    binding = objects["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == objects["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tf-tideflow-operator-console", "namespace": "tideflow"}
    ]
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "tf-tideflow-operator-console"
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "env" not in container and "envFrom" not in container  # no Secret reaches it
    assert not pod.get("volumes")
    selector = objects["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "console"
    assert objects["Service"]["spec"]["selector"] == selector
    assert objects["Service"]["spec"]["type"] == "ClusterIP"
    operator = next(
        d for d in render(ON)
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "tf-tideflow-operator"
    )  # fmt: skip
    assert operator["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    # The command is the package's, with arguments its CLI accepts.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert container["command"] == ["tideflow"] and "tideflow" in scripts
    from tideflow import cli

    args = cli.build_parser().parse_args(container["args"])
    assert (args.command, args.in_cluster, args.address, args.port) == (
        "console", True, "0.0.0.0", 8080,
    )  # fmt: skip
    assert args.trace_url == "https://jaeger.example/trace/{traceId}"
    assert container["ports"][0]["containerPort"] == 8080
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_lint_is_clean_and_a_bad_trace_url_is_refused() -> None:
    report = helm.lint(str(CHART), ON, strict=True, namespace="tideflow")
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    with pytest.raises(helm.HelmError) as info:
        render({**BASE, "console": {"enabled": True, "traceUrl": "javascript:alert(1)"}})
    assert "traceUrl" in str(info.value)
