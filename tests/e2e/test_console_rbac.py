"""The console's chart permissions on a real API server, and its one watch per kind.

The operator chart's console ClusterRole and binding (rendered by Helm) are
applied to the envtest API server for a ServiceAccount; ``kubectl auth
can-i`` then says what that account may do: get/list/watch Tideflow's three
kinds, and nothing else -- no Secrets, no writes, no status patches.

``tideflow console`` then runs *as that account* (a token kubeconfig) while
several clients load pages and hold server-sent-event streams open; the API
server's audit log shows that the console made no denied call and opened
one watch per kind at a time for all of them, and the pages show the objects.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from services.agent import wait_for
from services.kube import audit_events, service_account_kubeconfig
from services.world import install_crds

from tideflow.tools.fleet.console.hub import WATCH_SECONDS

pytestmark = pytest.mark.envtest
helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")

REPO = Path(__file__).resolve().parents[2]


def _chart_rbac(namespace: str) -> tuple[str, list[dict[str, Any]]]:
    values = {"mqtt": {"url": "mqtt://x:1883"}, "console": {"enabled": True},
              "fullnameOverride": f"c-{namespace}"}  # fmt: skip
    with helm.Chart.load(str(REPO / "charts" / "tideflow-operator")) as chart:
        text = chart.render(values, name="c", namespace=namespace)
    docs = [d for d in yaml.safe_load_all(text["tideflow-operator/templates/console.yaml"]) if d]
    rbac = [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    account = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    return account, rbac


def test_the_console_account_can_only_read_and_watches_once_per_kind(
    envtest: Any, tmp_path: Path
) -> None:
    install_crds(envtest)
    ns = f"c-{uuid.uuid4().hex[:6]}"
    envtest.kubectl("create", "namespace", ns)
    account, rbac = _chart_rbac(ns)
    config, user = service_account_kubeconfig(
        envtest, ns, account, tmp_path / "console.kubeconfig", cluster_admin=False
    )
    envtest.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))

    def can(verb: str, resource: str) -> bool:
        got = envtest.kubectl("auth", "can-i", verb, resource, f"--as={user}", "-n", ns,
                              check=False)  # fmt: skip
        return got.stdout.strip() == "yes"

    for resource in ("workflows.tideflow.io", "edgesites.tideflow.io", "cronworkflows.tideflow.io"):
        assert all(can(verb, resource) for verb in ("get", "list", "watch")), resource
        for verb in ("create", "update", "patch", "delete"):
            assert not can(verb, resource), f"{verb} {resource}"
    assert not can("patch", "workflows.tideflow.io/status")
    for verb, resource in (("get", "secrets"), ("list", "secrets"), ("list", "pods"),
                           ("list", "configmaps"), ("create", "events")):  # fmt: skip
        assert not can(verb, resource), f"{verb} {resource}"

    site = f"rb-{uuid.uuid4().hex[:6]}"
    envtest.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "tideflow.io/v1alpha1", "kind": "EdgeSite",
        "metadata": {"name": site, "labels": {"region": "eu"}}, "spec": {},
    }))  # fmt: skip
    envtest.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "tideflow.io/v1alpha1", "kind": "Workflow",
        "metadata": {"name": "seen", "namespace": ns},
        "spec": {"placement": {"site": site}, "tasks": [{"name": "a", "script": "true"}]},
    }))  # fmt: skip

    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tideflow.cli", "console", "--port", "0",
         "--kubeconfig", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
        env=envtest.env(), start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        found = re.search(r"http://127\.0\.0\.1:\d+/", proc.stdout.readline().decode())
        assert found, proc.stderr.read().decode() if proc.stderr else ""
        url = found.group(0)

        def get(path: str) -> Any:
            with urllib.request.urlopen(url + path, timeout=10) as answer:
                return json.loads(answer.read())

        streams = [urllib.request.urlopen(url + "api/events", timeout=30) for _ in range(3)]
        readers = [threading.Thread(target=s.readline, daemon=True) for s in streams]
        for reader in readers:
            reader.start()
        wait_for(lambda: any(r["name"] == site for r in get("api/sites")["items"]), 30, "site")
        # Each kind's watch fills its cache on its own: the sites' may come first.
        wait_for(lambda: get(f"api/workflows?namespace={ns}")["items"], 30, "the workflow")
        for _ in range(5):
            assert [r["name"] for r in get(f"api/workflows?namespace={ns}")["items"]] == ["seen"]
            assert get("api/sites?selector=region%3Deu")["total"] >= 1
        assert get(f"api/workflows/{ns}/seen")["tasks"][0]["name"] == "a"
        for stream in streams:
            stream.close()
    finally:
        proc.terminate()
        proc.wait(10)

    def calls() -> list[dict[str, Any]]:
        return [e for e in audit_events(envtest.audit_log, user)
                if e["requestReceivedTimestamp"] >= _rfc3339(started)]  # fmt: skip

    wait_for(lambda: len(calls()) >= 6, 20, "the console's calls in the audit log")
    events = calls()
    denied = [e for e in events if e["responseStatus"]["code"] >= 400]
    assert denied == [], denied
    # One watch per kind for every viewer: never two of a kind at once.  (Each
    # ends after WATCH_SECONDS and the next resumes it, so a slow run sees more.)
    watches: dict[str, list[tuple[str, str]]] = {}
    for event in events:
        if event["verb"] == "watch":
            span = (event["requestReceivedTimestamp"], event["stageTimestamp"])
            watches.setdefault(event["objectRef"]["resource"], []).append(span)
    assert set(watches) == {"workflows", "edgesites", "cronworkflows"}, watches
    resumed_at_most = 1 + int((time.time() - started) // WATCH_SECONDS)
    for resource, spans in watches.items():
        assert len(spans) <= resumed_at_most, (resource, spans)
        spans.sort()
        for (_, ended), (began, _) in itertools.pairwise(spans):
            assert began >= ended, (resource, "two watches at once", spans)
    assert {e["verb"] for e in events} <= {"list", "watch", "get"}


def _rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts - 1)) + ".000000Z"
