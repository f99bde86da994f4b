"""The Helm charts, linted and rendered by Helm itself, with no cluster.

Helm comes from PyPI's ``helm-python-sdk`` (Helm v4's Go SDK behind a C ABI,
imported as ``helm_python``): no ``helm`` binary.  These tests lint and render
``charts/tideflow-operator`` and ``charts/tideflow-agent`` with their defaults
and with every option switched on, check that bad values fail with a message
naming them (the ``values.schema.json`` files and the templates' own checks),
that every container is hardened, that the operator's RBAC is exactly the
calls the operator makes, that the chart's CRDs are the repository's, that
every command and setting a chart gives a container exists in the package and
reaches its CLI, and that the broker option's generated Mosquitto config
really confines each site to its own topics (on a real Mosquitto).

``tests/e2e/test_helm_install.py`` installs the same charts into a real API
server.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from services.chart_broker import MqttProbe, chart_mosquitto

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is not installed: pip install -e '.[test]'"
)

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_CHART = ROOT / "charts" / "tideflow-operator"
AGENT_CHART = ROOT / "charts" / "tideflow-agent"

Doc = dict[str, Any]

BROKER_URL = "mqtt://mqtt.example.net:1883"
OPERATOR_DEFAULTS: Doc = {"mqtt": {"url": BROKER_URL}}
# Every option of the operator chart switched on (namespace mode).
OPERATOR_ALL: Doc = {
    "replicaCount": 3,
    "image": {"repository": "registry.example/tideflow-operator", "tag": "1.2.3",
              "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "watchNamespaces": ["team-a", "team-b"],
    "mqtt": {
        "url": "",  # the in-chart broker
        "username": "cloud",
        "passwordSecret": {"name": "tideflow-mqtt", "key": "operator-password"},
        "tls": {"caSecret": {"name": "tideflow-mqtt-ca", "key": "ca.pem"}},
        "clientId": "tideflow-cloud",
        "version": "3.1.1",
    },
    "autoRegisterSites": False,
    "agentLabels": False,
    "ttlSecondsAfterFinished": 86400,
    "siteSilenceSeconds": 45,
    "leaderElection": {"enabled": True, "leaseName": "tideflow-leader"},
    "peering": {"enabled": True, "name": "tideflow-peering"},
    "logLevel": "DEBUG",
    "logJson": True,
    "metrics": {"enabled": True, "port": 9090,
                "serviceMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "10s",
                                   "labels": {"release": "prometheus"}}},
    "serviceAccount": {"create": True, "name": "tideflow", "annotations": {"a": "b"}},
    "podAnnotations": {"example.com/note": "x"},
    "podLabels": {"team": "platform"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops",
                     "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
    "priorityClassName": "system-cluster-critical",
    "extraEnv": [{"name": "EXTRA", "value": "1"}],
    "otlpEndpoint": "http://otel-collector:4318",
    "broker": {
        "enabled": True,
        "passwordFileSecret": {"name": "tideflow-broker-passwd", "key": "passwd"},
        "sites": [{"name": "site-a"}, {"name": "site-b", "username": "b-agent"}],
        "maxQueuedMessages": 250000,
        "maxInflightMessages": 50,
        "persistence": {"enabled": True, "size": "2Gi", "storageClass": "fast"},
        "tls": {"secretName": "tideflow-broker-tls", "port": 8883},
        "plainListener": True,
        "service": {"type": "LoadBalancer", "port": 1883, "annotations": {"x": "y"},
                    "loadBalancerIP": "192.0.2.10"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        "affinity": {"podAntiAffinity": {}},
    },
}  # fmt: skip
# Cluster-wide, a TLS-only broker, no leader election, no peering, no RBAC rendered.
OPERATOR_OTHER: Doc = {
    "replicaCount": 1,
    "mqtt": {"url": "", "passwordSecret": {"name": "pw"}},
    "leaderElection": {"enabled": False},
    "peering": {"enabled": False},
    "broker": {"enabled": True, "passwordFileSecret": {"name": "pf"}, "plainListener": False,
               "tls": {"secretName": "tls"}, "persistence": {"enabled": False}},
}  # fmt: skip

SITE = "line-2"
AGENT_DEFAULTS: Doc = {"site": {"name": SITE}, "mqtt": {"url": BROKER_URL}}
AGENT_ALL: Doc = {
    "site": {"name": SITE, "labels": {"region": "north", "tideflow.io/line": "2"}},
    "image": {"repository": "registry.example/tideflow-agent", "tag": "1.2.3"},
    "imagePullSecrets": [{"name": "regcred"}],
    "mqtt": {"url": "mqtts://mqtt.example.net:8883", "username": "line-2-agent",
             "passwordSecret": {"name": "site-mqtt", "key": "pw"},
             "tls": {"caSecret": {"name": "site-mqtt-ca", "key": "ca.pem"}}},
    "concurrency": 4,
    "passEnv": ["AWS_*", "HTTP_PROXY"],
    "retentionSeconds": 86400,
    "logLevel": "DEBUG",
    "heartbeatSeconds": 5,
    "synchronous": "NORMAL",
    "outboxBudgetBytes": 1073741824,
    "storage": {"type": "persistentVolumeClaim", "mountPath": "/data",
                "persistentVolumeClaim": {"size": "10Gi", "storageClass": "local-path",
                                          "accessModes": ["ReadWriteOncePod"]}},
    "tmp": {"sizeLimit": "1Gi", "medium": "Memory"},
    "metrics": {"port": 9100, "service": {"enabled": True, "type": "ClusterIP"},
                "serviceMonitor": {"enabled": True, "interval": "1m", "labels": {"a": "b"}}},
    "nodeSelector": {"node-role.kubernetes.io/edge": "", "tideflow.io/site": SITE},
    "tolerations": [{"key": "node-role.kubernetes.io/edge", "operator": "Exists",
                     "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {}},
    "priorityClassName": "edge-critical",
    "terminationGracePeriodSeconds": 60,
    "podAnnotations": {"k": "v"},
    "podLabels": {"team": "plant"},
    "extraEnv": [{"name": "PLANT", "value": "7"}],
    "extraVolumes": [{"name": "recipes", "hostPath": {"path": "/srv/recipes"}}],
    "extraVolumeMounts": [{"name": "recipes", "mountPath": "/recipes", "readOnly": True}],
}  # fmt: skip
AGENT_HOSTPATH: Doc = {
    **AGENT_DEFAULTS,
    "storage": {"type": "hostPath", "hostPath": {"path": "/var/lib/tideflow-line-2",
                                                 "type": "DirectoryOrCreate"}},
}  # fmt: skip

VARIANTS = {
    "operator-defaults": (OPERATOR_CHART, OPERATOR_DEFAULTS),
    "operator-all-options": (OPERATOR_CHART, OPERATOR_ALL),
    "operator-cluster-tls-broker": (OPERATOR_CHART, OPERATOR_OTHER),
    "agent-defaults": (AGENT_CHART, AGENT_DEFAULTS),
    "agent-all-options": (AGENT_CHART, AGENT_ALL),
    "agent-hostpath": (AGENT_CHART, AGENT_HOSTPATH),
}


# ----------------------------------------------------------------- helpers
def render(chart: Path, values: Doc, *, namespace: str = "tideflow", name: str = "tf") -> list[Doc]:
    """Every object the chart renders (NOTES.txt left out)."""
    with helm.Chart.load(str(chart)) as loaded:
        manifests = loaded.render(values, name=name, namespace=namespace)
    docs: list[Doc] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def notes(chart: Path, values: Doc) -> str:
    with helm.Chart.load(str(chart)) as loaded:
        manifests = loaded.render(values, name="tf", namespace="tideflow")
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def render_error(chart: Path, values: Doc) -> str:
    with pytest.raises(helm.HelmError) as info:
        render(chart, values)
    return str(info.value)


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name or ''}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def tideflow_deployment(docs: list[Doc]) -> Doc:
    """The operator's or the agent's Deployment (not the broker's)."""
    (found,) = [
        d for d in of_kind(docs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] in ("operator", "agent")
    ]  # fmt: skip
    return found


def container_env(container: Doc) -> dict[str, str]:
    """The container's env as the kubelet would set it (fieldRefs filled in)."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            field = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = {"metadata.namespace": "tideflow", "metadata.name": "pod-0"}[field]
    return env


def merged(base: Doc, extra: Doc) -> Doc:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and key in out else value
    return out


# ----------------------------------------------------------------- lint and render
@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_is_clean_with_defaults_and_every_option(variant: str) -> None:
    chart, values = VARIANTS[variant]
    report = helm.lint(str(chart), values, strict=True, namespace="tideflow")
    assert report["errors"] == [], report
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_renders_with_a_namespace_and_common_labels(variant: str) -> None:
    chart, values = VARIANTS[variant]
    docs = render(chart, values)
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    assert docs
    for doc in docs:
        meta = doc["metadata"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta["name"]), meta["name"]
        assert len(meta["name"]) <= 63
        if doc["kind"] not in cluster_scoped:
            assert meta.get("namespace"), f"{doc['kind']} {meta['name']} has no namespace"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "tideflow"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_is_hardened(variant: str) -> None:
    chart, values = VARIANTS[variant]
    deployments = of_kind(render(chart, values), "Deployment")
    assert deployments
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["runAsNonRoot"] is True
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
            assert not ctx.get("privileged")
            assert container["resources"]["requests"] and container["resources"]["limits"]
            assert "livenessProbe" in container and "readinessProbe" in container
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        # Only the operator talks to the Kubernetes API.
        assert pod["automountServiceAccountToken"] is (component == "operator")


@pytest.mark.parametrize("variant", ["agent-defaults", "agent-all-options", "agent-hostpath"])
def test_agent_writes_only_to_its_database_directory_and_tmp(variant: str) -> None:
    chart, values = VARIANTS[variant]
    deployment = tideflow_deployment(render(chart, values))
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    db_dir = values.get("storage", {}).get("mountPath", "/var/lib/tideflow")
    assert writable == {db_dir, "/tmp"}
    assert container_env(container)["TIDEFLOW_DB"] == f"{db_dir}/agent.db"


def test_chart_crds_are_the_repository_crds() -> None:
    chart_crds = {p.name: p.read_bytes() for p in (OPERATOR_CHART / "crds").iterdir()}
    repo_crds = {p.name: p.read_bytes() for p in (ROOT / "crds").iterdir() if p.is_file()}
    assert chart_crds == repo_crds, (
        "charts/tideflow-operator/crds/ differs from crds/: "
        "cp crds/*.yaml charts/tideflow-operator/crds/"
    )
    with helm.Chart.load(str(OPERATOR_CHART)) as chart:
        docs = [d for c in chart.crds for d in yaml.safe_load_all(c["data"]) if d]
    assert {d["kind"] for d in docs} == {"CustomResourceDefinition"}
    assert sorted(d["metadata"]["name"] for d in docs) == [
        "clusterkopfpeerings.kopf.dev", "cronworkflows.tideflow.io", "edgesites.tideflow.io",
        "kopfpeerings.kopf.dev", "workflows.tideflow.io",
    ]  # fmt: skip


# ----------------------------------------------------------------- the operator chart
def test_operator_defaults() -> None:
    docs = render(OPERATOR_CHART, OPERATOR_DEFAULTS)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted([
        "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
        "RoleBinding", "Role", "RoleBinding", "ClusterKopfPeering",  # Roles: lease, ledger
    ])  # fmt: skip
    deployment = tideflow_deployment(docs)
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["tideflow-operator"]
    assert container["args"] == ["run", "--all-namespaces", "--leader-election"]
    env = container_env(container)
    assert env["TIDEFLOW_BROKER"] == BROKER_URL
    assert env["TIDEFLOW_LIVENESS"] == "http://0.0.0.0:8080/healthz"
    assert env["TIDEFLOW_PEERING"] == one(docs, "ClusterKopfPeering")["metadata"]["name"]
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    # Ready only while holding the lease (operator/cli.py READINESS_PATH): the standby is not.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert env["TIDEFLOW_LOG_JSON"] == "false"
    assert "TIDEFLOW_TTL_SECONDS_AFTER_FINISHED" not in env  # finished Workflows are kept
    assert env["TIDEFLOW_SITE_SILENCE_SECONDS"] == "90"  # the operator's own default
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    # A slow start is never cut short by the startup probe.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert "all namespaces" in notes(OPERATOR_CHART, OPERATOR_DEFAULTS)


def rules_of(doc: Doc) -> set[tuple[str, str, str, tuple[str, ...]]]:
    """(apiGroup, resource, verb, resourceNames) for every rule of a Role/ClusterRole."""
    out = set()
    for rule in doc["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb, tuple(rule.get("resourceNames", ()))))
    return out


# What operator/ (and kopf inside it) calls; tests/e2e/test_helm_install.py checks the
# same list against a real API server's audit log of the operator running under it.
EDGESITE_RULES = {
    ("tideflow.io", "edgesites", "list", ()),
    ("tideflow.io", "edgesites", "watch", ()),
    ("tideflow.io", "edgesites", "patch", ()),  # the label keys the site's agent reports
    ("tideflow.io", "edgesites", "create", ()),
    ("tideflow.io", "edgesites/status", "patch", ()),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list", ()),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch", ()),
}
WORKFLOW_RULES = {
    ("tideflow.io", "workflows", "list", ()),
    ("tideflow.io", "workflows", "watch", ()),
    ("tideflow.io", "workflows", "patch", ()),
    ("tideflow.io", "workflows/status", "patch", ()),
    ("tideflow.io", "cronworkflows", "list", ()),
    ("tideflow.io", "cronworkflows", "watch", ()),
    ("tideflow.io", "cronworkflows/status", "patch", ()),
    ("tideflow.io", "workflows", "create", ()),
    ("tideflow.io", "workflows", "delete", ()),
    ("", "events", "create", ()),
}


def peering_rules(kind: str, name: str) -> set[tuple[str, str, str, tuple[str, ...]]]:
    return {
        ("kopf.dev", kind, "list", ()),
        ("kopf.dev", kind, "watch", ()),
        ("kopf.dev", kind, "patch", (name,)),
    }


# The ledger of assignments: ConfigMaps in the release namespace only.
LEDGER_RULES = {("", "configmaps", verb, ()) for verb in ("list", "create", "patch")}


def lease_rules(name: str) -> set[tuple[str, str, str, tuple[str, ...]]]:
    return {
        ("coordination.k8s.io", "leases", "create", ()),
        ("coordination.k8s.io", "leases", "get", (name,)),
        ("coordination.k8s.io", "leases", "update", (name,)),
    }


def test_operator_rbac_is_exactly_the_calls_it_makes_cluster_wide() -> None:
    docs = render(OPERATOR_CHART, OPERATOR_DEFAULTS)
    name = "tf-tideflow-operator"
    assert rules_of(one(docs, "ClusterRole")) == (
        EDGESITE_RULES | WORKFLOW_RULES | peering_rules("clusterkopfpeerings", name)
    )
    roles = {r["metadata"]["name"]: r for r in of_kind(docs, "Role")}
    assert set(roles) == {f"{name}-leader-election", f"{name}-ledger"}
    assert {r["metadata"]["namespace"] for r in roles.values()} == {"tideflow"}
    assert rules_of(roles[f"{name}-leader-election"]) == lease_rules(name)
    assert rules_of(roles[f"{name}-ledger"]) == LEDGER_RULES
    sa = {"kind": "ServiceAccount", "name": name, "namespace": "tideflow"}
    for binding in of_kind(docs, "ClusterRoleBinding") + of_kind(docs, "RoleBinding"):
        assert binding["subjects"] == [sa]


def test_operator_rbac_in_namespace_mode_is_roles_in_those_namespaces() -> None:
    docs = render(OPERATOR_CHART, OPERATOR_ALL)
    assert rules_of(one(docs, "ClusterRole")) == (
        EDGESITE_RULES
        - {("tideflow.io", "edgesites", "create", ())}  # autoRegisterSites off
        - {("tideflow.io", "edgesites", "patch", ())}  # agentLabels off
    ) | {("", "namespaces", "list", ()), ("", "namespaces", "watch", ())}
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in of_kind(docs, "Role")}
    for namespace in ("team-a", "team-b"):
        assert rules_of(roles[(namespace, "tf-tideflow-operator")]) == (
            WORKFLOW_RULES | peering_rules("kopfpeerings", "tideflow-peering")
        )
        peering = [p for p in of_kind(docs, "KopfPeering")
                   if p["metadata"]["namespace"] == namespace]  # fmt: skip
        assert [p["metadata"]["name"] for p in peering] == ["tideflow-peering"]
    assert rules_of(roles[("tideflow", "tf-tideflow-operator-leader-election")]) == lease_rules(
        "tideflow-leader"
    )
    assert rules_of(roles[("tideflow", "tf-tideflow-operator-ledger")]) == LEDGER_RULES
    bindings = of_kind(docs, "RoleBinding")
    assert {(b["metadata"]["namespace"], b["roleRef"]["name"]) for b in bindings} == {
        ("team-a", "tf-tideflow-operator"), ("team-b", "tf-tideflow-operator"),
        ("tideflow", "tf-tideflow-operator-leader-election"),
        ("tideflow", "tf-tideflow-operator-ledger"),
    }  # fmt: skip
    assert all(b["subjects"][0]["name"] == "tideflow" for b in bindings)
    assert of_kind(docs, "ClusterKopfPeering") == []


NEVER_GRANTED = {
    "secrets", "pods", "configmaps", "serviceaccounts", "roles", "clusterroles",
    "rolebindings", "clusterrolebindings", "nodes", "deployments",
}  # fmt: skip


@pytest.mark.parametrize("variant", ["operator-defaults", "operator-all-options"])
def test_operator_rbac_has_no_secrets_pods_or_wildcards(variant: str) -> None:
    chart, values = VARIANTS[variant]
    docs = render(chart, values)
    for role in of_kind(docs, "ClusterRole") + of_kind(docs, "Role"):
        # The one exception: the ledger's ConfigMaps, in the operator's own namespace.
        ledger = role["kind"] == "Role" and role["metadata"]["name"].endswith("-ledger")
        for group, resource, verb, _ in rules_of(role):
            assert "*" not in (group, resource, verb)
            if ledger:
                assert role["metadata"]["namespace"] == "tideflow" and resource == "configmaps"
                continue
            assert resource.split("/")[0] not in NEVER_GRANTED, resource
            assert verb not in {"deletecollection", "escalate", "bind", "impersonate"}
            # The one delete: finished Workflows past a CronWorkflow's history limits
            # (decision 0007); nothing else the operator did not create itself.
            if verb == "delete":
                assert (group, resource) == ("tideflow.io", "workflows")


def test_operator_without_rbac_or_peering_or_leader_election() -> None:
    docs = render(OPERATOR_CHART, merged(OPERATOR_OTHER, {"rbac": {"create": False}}))
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding"}
    assert not kinds & {"ClusterKopfPeering", "KopfPeering"}
    (container,) = tideflow_deployment(docs)["spec"]["template"]["spec"]["containers"]
    assert "--no-leader-election" in container["args"]
    env = container_env(container)
    assert "TIDEFLOW_PEERING" not in env and "TIDEFLOW_LEASE_NAME" not in env
    # A TLS-only broker: the operator uses it through TLS.
    assert env["TIDEFLOW_BROKER"] == "mqtts://tf-tideflow-operator-broker.tideflow.svc:8883"


def test_operator_all_options() -> None:
    docs = render(OPERATOR_CHART, OPERATOR_ALL)
    deployment = tideflow_deployment(docs)
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/tideflow-operator:1.2.3"
    assert container["args"] == [
        "run", "--namespace=team-a", "--namespace=team-b", "--leader-election",
        "--no-auto-register", "--no-agent-labels",
    ]  # fmt: skip
    env = container_env(container)
    assert env["TIDEFLOW_BROKER"] == "mqtt://tf-tideflow-operator-broker.tideflow.svc:1883"
    assert env["TIDEFLOW_METRICS_PORT"] == "9090"
    assert env["TIDEFLOW_TTL_SECONDS_AFTER_FINISHED"] == "86400"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert env["EXTRA"] == "1"
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["tolerations"] == OPERATOR_ALL["tolerations"]
    assert pod["affinity"] == OPERATOR_ALL["affinity"]
    service = one(docs, "Service", "tf-tideflow-operator-metrics")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["interval"] == "15s"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    broker = one(docs, "Deployment", "tf-tideflow-operator-broker")
    assert broker["spec"]["strategy"] == {"type": "Recreate"}
    assert broker["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    (mosquitto,) = broker["spec"]["template"]["spec"]["containers"]
    assert {p["containerPort"] for p in mosquitto["ports"]} == {1883, 8883}
    volumes = {v["name"]: v for v in broker["spec"]["template"]["spec"]["volumes"]}
    assert volumes["passwd"]["secret"]["secretName"] == "tideflow-broker-passwd"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "tf-tideflow-operator-broker"
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["storageClassName"] == "fast"
    svc = one(docs, "Service", "tf-tideflow-operator-broker")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert {p["port"] for p in svc["spec"]["ports"]} == {1883, 8883}
    text = notes(OPERATOR_CHART, OPERATOR_ALL)
    assert "team-a, team-b" in text and "site-a, site-b" in text


def broker_files(values: Doc) -> tuple[str, str]:
    config_map = one(render(OPERATOR_CHART, values), "ConfigMap")
    return config_map["data"]["mosquitto.conf"], config_map["data"]["acl"]


def client_ids(values: Doc) -> str:
    """The broker ConfigMap's ``client-ids.json`` (Mosquitto's dynamic-security file)."""
    return str(one(render(OPERATOR_CHART, values), "ConfigMap")["data"]["client-ids.json"])


def test_broker_config_sets_the_queue_limit_and_refuses_anonymous_clients() -> None:
    conf, acl = broker_files(OPERATOR_ALL)
    lines = [line.strip() for line in conf.splitlines() if line.strip() and line[0] != "#"]
    assert "max_queued_messages 250000" in lines
    assert "max_inflight_messages 50" in lines
    assert "allow_anonymous false" in lines
    assert "password_file /mosquitto/secret/passwd" in lines
    assert "persistence true" in lines
    assert lines.count("listener 1883") == lines.count("listener 8883") == 1
    # The default is explicit too (Mosquitto's own 1000 drops queued messages silently).
    default_conf, _ = broker_files(
        merged(OPERATOR_DEFAULTS, {"mqtt": {"passwordSecret": {"name": "p"}},
                                   "broker": {"enabled": True,
                                              "passwordFileSecret": {"name": "f"}}})
    )  # fmt: skip
    assert "max_queued_messages 100000" in default_conf.splitlines()
    blocks = acl_blocks(acl)
    assert blocks == {
        "cloud": {("readwrite", "tideflow/v1/sites/#")},
        "site-a": site_acl("site-a"),
        "b-agent": site_acl("site-b"),
    }


def test_broker_binds_each_site_user_to_its_agents_client_id() -> None:
    """Decision 0015: the dynamic-security file names each site user's one client id."""
    from tideflow import wire

    docs = render(OPERATOR_CHART, OPERATOR_ALL)
    data = one(docs, "ConfigMap")["data"]
    lines = [ln.strip() for ln in data["mosquitto.conf"].splitlines()]
    assert "plugin /usr/lib/mosquitto_dynamic_security.so" in lines
    assert "plugin_opt_config_file /mosquitto/config/client-ids.json" in lines
    bindings = json.loads(data["client-ids.json"])
    assert bindings["clients"] == [
        {"username": "site-a", "clientid": wire.agent_client_id("site-a")},
        {"username": "b-agent", "clientid": wire.agent_client_id("site-b")},
    ]  # no password, no role: those stay with the password file and the ACL
    assert bindings["roles"] == bindings["groups"] == []
    assert {d["acltype"]: d["allow"] for d in bindings["defaultACLAccess"]} == dict.fromkeys(
        ("publishClientSend", "publishClientReceive", "subscribe", "unsubscribe"), False
    )
    # The whole ConfigMap is the broker's config directory.
    broker = one(docs, "Deployment", "tf-tideflow-operator-broker")
    volumes = {v["name"]: v for v in broker["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"] == {"name": "tf-tideflow-operator-broker"}
    other = merged(
        OPERATOR_ALL, {"broker": {"sites": [], "dynamicSecurityPlugin": "/opt/m/dynsec.so"}}
    )
    data = one(render(OPERATOR_CHART, other), "ConfigMap")["data"]
    assert "plugin /opt/m/dynsec.so" in data["mosquitto.conf"].splitlines()
    assert json.loads(data["client-ids.json"])["clients"] == []


def site_acl(site: str) -> set[tuple[str, str]]:
    from tideflow import wire

    reads = {("read", wire.topic(site, c)) for c in (wire.ASSIGN, wire.CONTROL, wire.ACKS)}
    return reads | {("write", wire.topic(site, c)) for c in (wire.EVENTS, wire.STATE)}


def acl_blocks(acl: str) -> dict[str, set[tuple[str, str]]]:
    blocks: dict[str, set[tuple[str, str]]] = {}
    user = None
    for line in acl.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            user = words[1]
            blocks[user] = set()
        else:
            assert words[0] == "topic" and user is not None, line
            blocks[user].add((words[1], words[2]))
    return blocks


def test_site_acl_covers_every_channel_of_the_wire_contract() -> None:
    """Sites read what the cloud sends and write what they report: nothing else, nothing less."""
    from tideflow import wire

    assert {topic.rsplit("/", 1)[1] for _, topic in site_acl("x")} == set(wire.CHANNELS)
    assert {topic for _, topic in site_acl("x")} == {wire.topic("x", c) for c in wire.CHANNELS}


# ----------------------------------------------------------------- the agent chart
def test_agent_defaults() -> None:
    docs = render(AGENT_CHART, AGENT_DEFAULTS, namespace="edge")
    assert sorted(d["kind"] for d in docs) == ["Deployment", "PersistentVolumeClaim"]
    deployment = tideflow_deployment(docs)
    assert deployment["metadata"]["name"] == f"tideflow-agent-{SITE}"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["tideflow-agent"] and container["args"] == ["run"]
    env = container_env(container)
    assert env["TIDEFLOW_SITE"] == SITE and env["TIDEFLOW_USERNAME"] == SITE
    assert env["TIDEFLOW_BROKER"] == BROKER_URL
    assert env["TIDEFLOW_METRICS_PORT"] == "9464"
    assert env["TIDEFLOW_RETENTION_SECONDS"] == "259200"  # 3 days, the agent's own default
    assert "TIDEFLOW_PASS_ENV" not in env  # tasks get the minimal environment
    for probe in ("startupProbe", "livenessProbe"):  # a stopped agent still accepts a connect
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_agent_all_options() -> None:
    docs = render(AGENT_CHART, AGENT_ALL, namespace="edge")
    assert sorted(d["kind"] for d in docs) == [
        "Deployment", "PersistentVolumeClaim", "Service", "ServiceMonitor",
    ]  # fmt: skip
    pod = tideflow_deployment(docs)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(container)
    assert env["TIDEFLOW_LABELS"] == "region=north,tideflow.io/line=2"
    assert env["TIDEFLOW_USERNAME"] == "line-2-agent"
    assert env["TIDEFLOW_CONCURRENCY"] == "4"
    assert env["TIDEFLOW_PASS_ENV"] == "AWS_*,HTTP_PROXY"
    assert env["TIDEFLOW_RETENTION_SECONDS"] == "86400"
    assert pod["nodeSelector"] == AGENT_ALL["nodeSelector"]
    assert pod["tolerations"] == AGENT_ALL["tolerations"]
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOncePod"]
    assert pvc["spec"]["storageClassName"] == "local-path"


def test_agent_on_a_host_path() -> None:
    docs = render(AGENT_CHART, AGENT_HOSTPATH, namespace="edge")
    assert [d["kind"] for d in docs] == ["Deployment"]
    pod = tideflow_deployment(docs)["spec"]["template"]["spec"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data == {"name": "data", "hostPath": {"path": "/var/lib/tideflow-line-2",
                                                 "type": "DirectoryOrCreate"}}  # fmt: skip


def test_agent_with_an_existing_claim_creates_none() -> None:
    values = merged(AGENT_DEFAULTS, {"storage": {"persistentVolumeClaim": {"existingClaim": "db"}}})
    docs = render(AGENT_CHART, values)
    assert of_kind(docs, "PersistentVolumeClaim") == []
    pod = tideflow_deployment(docs)["spec"]["template"]["spec"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == "db"


def test_one_release_per_site_gives_distinct_names() -> None:
    a = render(AGENT_CHART, AGENT_DEFAULTS, name="site-a")
    b = render(AGENT_CHART, merged(AGENT_DEFAULTS, {"site": {"name": "line-3"}}), name="site-b")
    names_a = {(d["kind"], d["metadata"]["name"]) for d in a}
    names_b = {(d["kind"], d["metadata"]["name"]) for d in b}
    assert not names_a & names_b


# ----------------------------------------------------------------- bad values
AGENT_BAD = [
    ("no site", {"mqtt": {"url": BROKER_URL}}, ["/site", "missing property 'name'"]),
    ("empty site", {"site": {"name": ""}, "mqtt": {"url": BROKER_URL}}, ["/site/name"]),
    ("bad site", {"site": {"name": "Line_2"}, "mqtt": {"url": BROKER_URL}},
     ["/site/name", "Line_2"]),
    ("no broker", {"site": {"name": SITE}}, ["/mqtt/url"]),
    ("http broker", merged(AGENT_DEFAULTS, {"mqtt": {"url": "http://x:1883"}}), ["/mqtt/url"]),
    ("storage type", merged(AGENT_DEFAULTS, {"storage": {"type": "nfs"}}), ["/storage/type"]),
    ("misspelt key", {**AGENT_DEFAULTS, "concurency": 4}, ["concurency"]),
    ("string number", {**AGENT_DEFAULTS, "concurrency": "4"}, ["/concurrency"]),
    ("label with comma", merged(AGENT_DEFAULTS, {"site": {"labels": {"a": "x,y=z"}}}),
     ["/site/labels/a"]),
    ("synchronous", {**AGENT_DEFAULTS, "synchronous": "OFF"}, ["/synchronous"]),
    ("monitor without service",
     merged(AGENT_DEFAULTS, {"metrics": {"serviceMonitor": {"enabled": True}}}),
     ["metrics.serviceMonitor.enabled needs metrics.service.enabled"]),
]  # fmt: skip
OPERATOR_BAD = [
    ("no broker", {}, ["mqtt.url is required", "broker.enabled"]),
    ("http broker", {"mqtt": {"url": "http://x"}}, ["/mqtt/url"]),
    ("zero replicas", {**OPERATOR_DEFAULTS, "replicaCount": 0}, ["/replicaCount"]),
    ("string replicas", {**OPERATOR_DEFAULTS, "replicaCount": "2"}, ["/replicaCount"]),
    ("misspelt key", {**OPERATOR_DEFAULTS, "watchNamespace": ["a"]}, ["watchNamespace"]),
    ("bad namespace", {**OPERATOR_DEFAULTS, "watchNamespaces": ["Team_A"]},
     ["/watchNamespaces/0"]),
    ("tiny queue", merged(OPERATOR_DEFAULTS, {"broker": {"maxQueuedMessages": 10}}),
     ["/broker/maxQueuedMessages"]),
    ("broker without password file",
     {"mqtt": {"passwordSecret": {"name": "p"}}, "broker": {"enabled": True}},
     ["broker.passwordFileSecret.name is required"]),
    ("broker without operator password",
     {"broker": {"enabled": True, "passwordFileSecret": {"name": "f"}}},
     ["mqtt.passwordSecret.name is required"]),
    ("site with the operator's user",
     {"mqtt": {"passwordSecret": {"name": "p"}},
      "broker": {"enabled": True, "passwordFileSecret": {"name": "f"},
                 "sites": [{"name": "a", "username": "tideflow-operator"}]}},
     ["uses the operator's user"]),
    ("two sites one user",
     {"mqtt": {"passwordSecret": {"name": "p"}},
      "broker": {"enabled": True, "passwordFileSecret": {"name": "f"},
                 "sites": [{"name": "a", "username": "u"}, {"name": "b", "username": "u"}]}},
     ["user \"u\" is given to two sites"]),
    ("bad site name",
     merged(OPERATOR_DEFAULTS, {"broker": {"sites": [{"name": "Site A"}]}}),
     ["/broker/sites/0/name"]),
    ("no listener",
     {"mqtt": {"passwordSecret": {"name": "p"}},
      "broker": {"enabled": True, "passwordFileSecret": {"name": "f"}, "plainListener": False}},
     ["broker.plainListener=false needs broker.tls.secretName"]),
    ("monitor without metrics",
     merged(OPERATOR_DEFAULTS, {"metrics": {"serviceMonitor": {"enabled": True}}}),
     ["metrics.serviceMonitor.enabled needs metrics.enabled"]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "values", "expected"), AGENT_BAD, ids=[c[0] for c in AGENT_BAD])
def test_bad_agent_values_fail_naming_the_value(
    case: str, values: Doc, expected: list[str]
) -> None:
    message = render_error(AGENT_CHART, values)
    for text in expected:
        assert text in message, message


@pytest.mark.parametrize(
    ("case", "values", "expected"), OPERATOR_BAD, ids=[c[0] for c in OPERATOR_BAD]
)
def test_bad_operator_values_fail_naming_the_value(
    case: str, values: Doc, expected: list[str]
) -> None:
    message = render_error(OPERATOR_CHART, values)
    for text in expected:
        assert text in message, message


def test_missing_site_name_fails_with_a_clear_message_in_lint_and_in_templates(
    tmp_path: Path,
) -> None:
    report = helm.lint(str(AGENT_CHART), {"mqtt": {"url": BROKER_URL}})
    assert any("missing property 'name'" in e and "/site" in e for e in report["errors"]), report
    # Without the schema (a chart copy without values.schema.json) the template says it in words.
    import shutil

    copy = tmp_path / "tideflow-agent"
    shutil.copytree(AGENT_CHART, copy)
    (copy / "values.schema.json").unlink()
    message = render_error(copy, {"mqtt": {"url": BROKER_URL}})
    assert "site.name is required" in message and "--set site.name=" in message, message
    message = render_error(copy, {"site": {"name": "Line 2"}, "mqtt": {"url": BROKER_URL}})
    assert 'site.name "Line 2": lowercase letters, digits' in message, message


# ----------------------------------------------------------------- images and commands
def project_scripts() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(data["project"]["scripts"])


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions per build stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word.upper(), rest.strip()))
    return stages


@pytest.mark.parametrize(
    ("chart", "values", "dockerfile"),
    [(OPERATOR_CHART, OPERATOR_ALL, "operator/Dockerfile"),
     (AGENT_CHART, AGENT_ALL, "edge_agent/Dockerfile")],
    ids=["operator", "agent"],
)  # fmt: skip
def test_every_command_a_chart_runs_exists_in_the_package(
    chart: Path, values: Doc, dockerfile: str
) -> None:
    scripts = project_scripts()
    (container,) = tideflow_deployment(render(chart, values))["spec"]["template"]["spec"][
        "containers"
    ]
    command = container["command"][0]
    assert command in scripts, f"{command} is not a console script in pyproject.toml"
    module, _, function = scripts[command].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    # The image runs the same command.
    final = dockerfile_stages(ROOT / dockerfile)[-1]
    entrypoint = [yaml.safe_load(rest) for word, rest in final if word == "ENTRYPOINT"]
    assert entrypoint == [[command]]


@pytest.mark.parametrize("dockerfile", ["operator/Dockerfile", "edge_agent/Dockerfile"])
def test_dockerfiles_build_in_one_stage_and_run_slim_and_unprivileged(dockerfile: str) -> None:
    stages = dockerfile_stages(ROOT / dockerfile)
    assert len(stages) == 2, "a build stage and a final stage"
    build, final = stages
    assert any("build-essential" in rest for word, rest in build if word == "RUN")
    assert any("pip wheel" in rest for word, rest in build if word == "RUN")
    base = final[0][1]
    assert base == "${PYTHON_IMAGE}"
    assert "python:3.12-slim" in (ROOT / dockerfile).read_text()
    runs = " ".join(rest for word, rest in final if word == "RUN")
    for tool in ("apt-get install", "build-essential", "gcc", "pip install", "pip wheel"):
        assert tool not in runs, f"{tool} in the final stage"
    # No pip either: not in the base image's Python, not in the copied virtualenv.
    assert "pip uninstall --yes --quiet pip" in runs
    assert any("venv --without-pip /opt/tideflow" in rest for word, rest in build if word == "RUN")
    # The installed virtualenv imports both sides before the image is kept.
    assert any('python -c "import tideflow_operator.cli' in rest for _, rest in build)
    assert [rest for word, rest in final if word == "COPY"] == [
        "--from=build /opt/tideflow /opt/tideflow"
    ]
    (user,) = [rest for word, rest in final if word == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid"


def _parse_operator(env: dict[str, str], args: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from tideflow_operator import cli

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return cli.build_parser().parse_args(args)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    import os

    for key in list(os.environ):
        if key.startswith("TIDEFLOW_"):
            monkeypatch.delenv(key)
    yield monkeypatch


def secret_file_paths(pod: Doc, container: Doc) -> dict[str, str]:
    """File path in the container -> 'secret/key' it comes from."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    out = {}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret:
            for item in secret.get("items", []):
                source = f"{secret['secretName']}/{item['key']}"
                out[f"{mount['mountPath']}/{item['path']}"] = source
    return out


def test_operator_settings_from_the_chart_reach_its_cli(clean_env: pytest.MonkeyPatch) -> None:
    pod = tideflow_deployment(render(OPERATOR_CHART, OPERATOR_ALL))["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(container)
    args = _parse_operator(env, [*container["command"][1:], *container["args"]], clean_env)
    assert args.command == "run"
    assert args.namespace == ["team-a", "team-b"] and not args.all_namespaces
    assert args.broker == "mqtt://tf-tideflow-operator-broker.tideflow.svc:1883"
    assert args.username == "cloud"
    assert args.client_id == "tideflow-cloud"
    assert args.mqtt_version == "3.1.1"
    assert args.leader_election is True
    assert args.lease_name == "tideflow-leader" and args.lease_namespace == "tideflow"
    assert args.peering == "tideflow-peering"
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    assert args.no_auto_register is True
    assert args.no_agent_labels is True
    assert int(args.metrics_port) == 9090
    assert args.log_level == "DEBUG"
    assert args.log_json is True
    assert args.ttl_seconds_after_finished == 86400
    assert args.site_silence_seconds == 45
    files = secret_file_paths(pod, container)
    assert files[str(args.password_file)] == "tideflow-mqtt/operator-password"
    assert files[str(args.tls_ca)] == "tideflow-mqtt-ca/ca.pem"
    used = {
        "TIDEFLOW_LOG_LEVEL", "TIDEFLOW_BROKER", "TIDEFLOW_CLIENT_ID", "TIDEFLOW_USERNAME",
        "TIDEFLOW_PASSWORD_FILE", "TIDEFLOW_TLS_CA", "TIDEFLOW_LIVENESS", "TIDEFLOW_PEERING",
        "TIDEFLOW_LEASE_NAME", "TIDEFLOW_LEASE_NAMESPACE", "TIDEFLOW_METRICS_PORT",
        "TIDEFLOW_LOG_JSON", "TIDEFLOW_MQTT_VERSION", "TIDEFLOW_TTL_SECONDS_AFTER_FINISHED",
        "TIDEFLOW_SITE_SILENCE_SECONDS",
    }  # fmt: skip
    assert {k for k in env if k.startswith("TIDEFLOW_")} == used
    # kopf names its peering identity after the pod.
    assert env["POD_ID"] == "pod-0"


def test_agent_settings_from_the_chart_reach_its_cli(clean_env: pytest.MonkeyPatch) -> None:
    from edge_agent import cli

    pod = tideflow_deployment(render(AGENT_CHART, AGENT_ALL))["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(container)
    for key, value in env.items():
        clean_env.setenv(key, value)
    args = cli.build_parser().parse_args([*container["command"][1:], *container["args"]])
    assert args.command == "run"
    assert args.site == SITE
    assert args.broker == "mqtts://mqtt.example.net:8883"
    assert args.db == "/data/agent.db"
    assert args.username == "line-2-agent"
    assert args.concurrency == 4
    assert int(args.metrics_port) == 9100
    assert args.labels == "region=north,tideflow.io/line=2"
    assert args.synchronous == "NORMAL"
    assert args.heartbeat_seconds == 5.0
    assert args.outbox_budget_bytes == 1073741824
    assert args.log_level == "DEBUG"
    files = secret_file_paths(pod, container)
    assert files[str(args.password_file)] == "site-mqtt/pw"
    assert files[str(args.tls_ca)] == "site-mqtt-ca/ca.pem"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(args.metrics_port)


def test_operator_metrics_flag_has_its_module() -> None:
    importlib.import_module("tideflow_operator.metrics")


# ----------------------------------------------------------------- the broker option, for real
@pytest.mark.broker
def test_generated_broker_config_confines_each_site_on_a_real_mosquitto(tmp_path: Path) -> None:
    from services.broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found; install Debian's mosquitto")
    values = merged(OPERATOR_ALL, {"broker": {"tls": {"secretName": ""}}})
    conf, acl = broker_files(values)
    users = {"cloud": "cloud-pw", "site-a": "a-pw", "b-agent": "b-pw"}

    with chart_mosquitto(conf, acl, users, tmp_path / "broker", client_ids(values)) as broker:
        operator = MqttProbe(broker, "cloud", users["cloud"])
        site_a = MqttProbe(broker, "site-a", users["site-a"])
        site_b = MqttProbe(broker, "b-agent", users["b-agent"])
        try:
            operator.subscribe("tideflow/v1/sites/#")
            site_a.subscribe("tideflow/v1/sites/site-a/assign")
            site_a.subscribe("tideflow/v1/sites/site-b/assign")  # granted; reads are checked
            site_b.subscribe("tideflow/v1/sites/site-b/assign")
            # A site forging another site's records: acked by the broker, delivered to nobody.
            site_a.publish("tideflow/v1/sites/site-b/events", b"forged")
            site_a.publish("tideflow/v1/sites/site-a/assign", b"self-assigned")
            site_a.publish("tideflow/v1/sites/site-a/events", b"a-events")
            assert operator.expect() == ("tideflow/v1/sites/site-a/events", b"a-events")
            operator.expect_nothing()
            # The operator reaches each site, and each site only its own topics.
            operator.publish("tideflow/v1/sites/site-b/assign", b"for-b")
            operator.publish("tideflow/v1/sites/site-a/assign", b"for-a")
            assert site_b.expect() == ("tideflow/v1/sites/site-b/assign", b"for-b")
            assert site_a.expect() == ("tideflow/v1/sites/site-a/assign", b"for-a")
            site_a.expect_nothing()
            site_b.expect_nothing()
            # No anonymous clients, no wrong passwords.
            assert MqttProbe.refused(broker, None, None)
            assert MqttProbe.refused(broker, "site-a", "b-pw")
        finally:
            for probe in (operator, site_a, site_b):
                probe.close()
        assert "max_queued_messages 250000" in broker.conf_path.read_text()


@pytest.mark.broker
def test_generated_broker_config_keeps_each_site_to_its_own_client_id_on_a_real_mosquitto(
    tmp_path: Path,
) -> None:
    """Another site's user with a site's client id is refused; the site keeps its session."""
    from services.broker import find_mosquitto

    from tideflow import wire

    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found; install Debian's mosquitto")
    values = merged(OPERATOR_ALL, {"broker": {"tls": {"secretName": ""}}})
    conf, acl = broker_files(values)
    users = {"cloud": "cloud-pw", "site-a": "a-pw", "b-agent": "b-pw"}
    with chart_mosquitto(conf, acl, users, tmp_path / "broker", client_ids(values)) as broker:
        site_a = MqttProbe(broker, "site-a", users["site-a"])
        operators = [MqttProbe(broker, "cloud", users["cloud"])]
        try:
            assert site_a.client_id == wire.agent_client_id("site-a")
            site_a.subscribe("tideflow/v1/sites/site-a/assign")
            # b's user: under its own agent's id it connects, under a's it is refused.
            MqttProbe(broker, "b-agent", users["b-agent"]).close()
            assert MqttProbe.refused(broker, "b-agent", users["b-agent"], site_a.client_id)
            # The operator's processes each have an id of their own.
            operators.append(MqttProbe(broker, "cloud", users["cloud"], "tideflow-cloud-2"))
            operators[1].publish("tideflow/v1/sites/site-a/assign", b"for-a")
            assert site_a.expect() == ("tideflow/v1/sites/site-a/assign", b"for-a")
            assert site_a.client.is_connected(), "site a lost its connection"
        finally:
            for probe in (site_a, *operators):
                probe.close()
        assert "already connected, closing old connection" not in broker.log_tail(100_000)


def test_generated_broker_config_refuses_a_sites_message_over_the_packet_limit(
    tmp_path: Path,
) -> None:
    """Mosquitto sets no message size limit: a site's user could hand the operator
    messages of up to MQTT's 256 MB, each read whole (and, as state, queued) before
    the operator could drop it.  The chart's broker refuses any packet over
    ``broker.maxPacketBytes`` (2 MiB: an assignment and an events batch are under
    1 MiB); what the site sends within it still arrives."""
    from services.broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found; install Debian's mosquitto")
    values = merged(OPERATOR_ALL, {"broker": {"tls": {"secretName": ""}}})
    conf, acl = broker_files(values)
    users = {"cloud": "cloud-pw", "site-a": "a-pw", "b-agent": "b-pw"}
    with chart_mosquitto(conf, acl, users, tmp_path / "broker", client_ids(values)) as broker:
        cloud = MqttProbe(broker, "cloud", users["cloud"])
        site_a = MqttProbe(broker, "site-a", users["site-a"])
        try:
            cloud.subscribe("tideflow/v1/sites/+/events")
            with contextlib.suppress(Exception):  # (the broker drops the connection)
                site_a.publish("tideflow/v1/sites/site-a/events", b"x" * (3 * 1024 * 1024))
            site_a.close()
            site_a = MqttProbe(broker, "site-a", users["site-a"])
            site_a.publish("tideflow/v1/sites/site-a/events", b"y" * (1024 * 1024))
            topic, payload = cloud.expect()
            assert (topic, len(payload)) == ("tideflow/v1/sites/site-a/events", 1024 * 1024)
            cloud.expect_nothing()
        finally:
            for probe in (site_a, cloud):
                probe.close()


# ----------------------------------------------------------------- operator shards
def test_operator_shards_are_deployments_each_with_its_own_index_lease_and_peering(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """``shards: 3``: three Deployments (active/standby each), disjoint selectors, the
    index and count reaching each one's CLI, and RBAC and peering for exactly the Lease
    and peering names each shard uses (README "When to shard")."""
    from tideflow_operator import cli
    from tideflow_operator.shards import ShardSpec

    docs = render(OPERATOR_CHART, merged(OPERATOR_DEFAULTS, {"shards": 3}))
    deployments = [
        d for d in of_kind(docs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    ]  # fmt: skip
    name = "tf-tideflow-operator"
    assert [d["metadata"]["name"] for d in deployments] == [f"{name}-shard-{i}" for i in range(3)]
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items())) for d in deployments]
    assert len(set(selectors)) == 3
    leases, peerings = set(), set()
    for index, deployment in enumerate(deployments):
        assert deployment["spec"]["replicas"] == 2  # each shard active/standby
        pod = deployment["spec"]["template"]
        assert (
            deployment["spec"]["selector"]["matchLabels"].items()
            <= pod["metadata"]["labels"].items()
        )
        (container,) = pod["spec"]["containers"]
        args = _parse_operator(
            container_env(container), [*container["command"][1:], *container["args"]], clean_env
        )
        config = cli.config_from_args(args)
        assert (config.shard_index, config.shard_count) == (index, 3)
        shard = ShardSpec(config.shard_index, config.shard_count)
        leases.add(shard.lease_name(config.lease_name))
        assert config.peering is not None
        peerings.add(shard.lease_name(config.peering))
    role = one(docs, "Role", f"{name}-leader-election")
    for verb in ("get", "update"):
        assert {n for r in rules_of(role) if r[2] == verb for n in r[3]} == leases
    assert ("coordination.k8s.io", "leases", "create", ()) in rules_of(role)
    assert {d["metadata"]["name"] for d in of_kind(docs, "ClusterKopfPeering")} == peerings
    granted = {r for r in rules_of(one(docs, "ClusterRole")) if r[1] == "clusterkopfpeerings"}
    assert {n for r in granted if r[2] == "patch" for n in r[3]} >= peerings


def test_one_shard_renders_the_operator_as_without_shards() -> None:
    assert render(OPERATOR_CHART, merged(OPERATOR_ALL, {"shards": 1})) == render(
        OPERATOR_CHART, OPERATOR_ALL
    )
    (container,) = tideflow_deployment(render(OPERATOR_CHART, OPERATOR_DEFAULTS))["spec"][
        "template"
    ]["spec"]["containers"]
    assert not {k for k in container_env(container) if k.startswith("TIDEFLOW_SHARD")}
    assert "shards" in render_error(OPERATOR_CHART, merged(OPERATOR_DEFAULTS, {"shards": 0}))
