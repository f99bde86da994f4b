"""A real Kubernetes API server for tests, the envtest way: kube-apiserver + etcd, no nodes.

The launcher lives in the distribution's tooling layer (:mod:`tideflow.tools.launchers.cluster`,
the ``demo`` extra), since ``tideflow demo`` needs it too; this module keeps the
names the tests import, and adds what only tests need: an audit log of every
ServiceAccount's calls (:func:`audit_args`, :func:`audit_events`) — the
independent record of who wrote what — and kubeconfigs that act as a
ServiceAccount (:func:`service_account_kubeconfig`), so that two processes can
be told apart in that log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tideflow.tools.launchers.cluster import (
    DEFAULT_ASSETS,
    HOST,
    INSTALL_HINT,
    EnvtestCluster,
    EnvtestError,
    assets_dir,
    find_etcd,
    find_kube_apiserver,
    find_kubectl,
    free_port,
    missing_reason,
)

__all__ = [
    "DEFAULT_ASSETS",
    "HOST",
    "INSTALL_HINT",
    "WRITE_VERBS",
    "EnvtestCluster",
    "EnvtestError",
    "assets_dir",
    "audit_args",
    "audit_events",
    "find_etcd",
    "find_kube_apiserver",
    "find_kubectl",
    "free_port",
    "missing_reason",
    "service_account_kubeconfig",
]


WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


def audit_args(directory: Path) -> tuple[list[str], Path]:
    """kube-apiserver flags that log every ServiceAccount's requests (metadata), and the log."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = directory / "audit-policy.yaml"
    policy.write_text(yaml.safe_dump({
        "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
        "rules": [{"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                  {"level": "None"}],
    }))  # fmt: skip
    log = directory / "audit.log"
    return [f"--audit-policy-file={policy}", f"--audit-log-path={log}",
            "--audit-log-mode=blocking"], log  # fmt: skip


def audit_events(log: Path, user: str) -> list[dict[str, Any]]:
    """The audit events of ``user`` (e.g. ``system:serviceaccount:NS:NAME``), oldest first."""
    if not log.exists():
        return []
    events = []
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event["user"]["username"] == user and event.get("stage") == "ResponseComplete":
            events.append(event)
    return events


def service_account_kubeconfig(
    cluster: EnvtestCluster, namespace: str, name: str, path: Path, *, cluster_admin: bool = True
) -> tuple[Path, str]:
    """Create ServiceAccount ``name`` (cluster-admin unless told) and a kubeconfig acting as it.

    Returns the kubeconfig and the user name the audit log records.
    """
    from kubernetes import client

    cluster.kubectl("create", "serviceaccount", name, "-n", namespace)
    user = f"system:serviceaccount:{namespace}:{name}"
    if cluster_admin:
        binding = f"{namespace}-{name}"
        account = f"--serviceaccount={namespace}:{name}"
        role = "--clusterrole=cluster-admin"
        cluster.kubectl("create", "clusterrolebinding", binding, role, account)
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(
            audiences=["https://kubernetes.default.svc"], expiration_seconds=3600
        )
    )
    with cluster.api_client() as api:
        answer = client.CoreV1Api(api).create_namespaced_service_account_token(
            name, namespace, request
        )
    assert answer.status is not None and answer.status.token
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["users"] = [{"name": name, "user": {"token": answer.status.token}}]
    config["contexts"][0]["context"]["user"] = name
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path, user
