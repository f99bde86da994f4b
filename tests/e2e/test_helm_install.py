"""The Helm charts installed into a real API server, and the operator run under its RBAC.

Helm is the PyPI ``helm-python-sdk`` (Helm v4 as a library; no ``helm``
binary) talking to the envtest API server (kube-apiserver + etcd, RBAC on, no
nodes: Deployments are stored and validated, no pod runs).

* Both charts, with every option on and the broker option, install as Helm
  releases: every object they render exists on the server as rendered, and
  the "keep" volumes outlive an uninstall.
* ``kubectl auth can-i --as system:serviceaccount:<ns>:<sa>``: the operator's
  account can make every call the operator makes and nothing more (no
  Secrets, no pods/exec, no deletes, no Leases but its own), cluster-wide and
  in namespace mode.
* The operator itself, run as a local process with a token of that
  ServiceAccount (a TokenRequest) and the environment and arguments the
  chart's Deployment gives it, against an API server that writes an audit
  log and a real Mosquitto: kopf's health endpoint answers where the probes
  look, a Workflow reaches Assigned with no agent, then Succeeded with one,
  and deleting one completes (the finalizer of an older operator removed).
  The audit log must show no denied call, and every permission the chart
  grants must have been used: the RBAC is exactly the calls the operator makes.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from services import kube
from services.agent import wait_for

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is not installed: pip install -e '.[test]'"
)

pytestmark = pytest.mark.envtest

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_CHART = ROOT / "charts" / "tideflow-operator"
AGENT_CHART = ROOT / "charts" / "tideflow-agent"
Doc = dict[str, Any]

SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {"kind": "ServiceMonitor", "plural": "servicemonitors",
                  "singular": "servicemonitor", "listKind": "ServiceMonitorList"},
        "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
            "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
    },
}  # fmt: skip


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def docs_of(manifest: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(manifest) if d]


def sa_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


class Helm:
    """Helm releases in one envtest cluster, uninstalled at the end."""

    def __init__(self, cluster: kube.EnvtestCluster) -> None:
        self.cluster = cluster
        self.releases: list[tuple[str, str]] = []

    def config(self, namespace: str) -> Any:
        return helm.Config(kubeconfig_path=str(self.cluster.kubeconfig), namespace=namespace)

    def install(self, chart: Path, name: str, namespace: str, values: Doc) -> Doc:
        with self.config(namespace) as cfg:
            release: Doc = cfg.install(str(chart), name, values, namespace=namespace, timeout=60)
        self.releases.append((namespace, name))
        return release

    def uninstall(self, namespace: str, name: str) -> None:
        with self.config(namespace) as cfg:
            cfg.uninstall(name, ignore_not_found=True)
        self.releases.remove((namespace, name))

    def close(self) -> None:
        for namespace, name in list(reversed(self.releases)):
            try:
                self.uninstall(namespace, name)
            except helm.HelmError as exc:  # never hide the test's own failure
                print(f"uninstall {namespace}/{name}: {exc}")


@pytest.fixture
def releases(envtest: kube.EnvtestCluster) -> Iterator[Helm]:
    h = Helm(envtest)
    yield h
    h.close()


def create_namespaces(cluster: kube.EnvtestCluster, *names: str) -> None:
    for name in names:
        cluster.kubectl("create", "namespace", name)


def get_objects(cluster: kube.EnvtestCluster, manifest: str) -> list[Doc]:
    """Every object of a manifest as the server has it now (fails if one is missing)."""
    out = cluster.kubectl("get", "-f", "-", "-o", "json", input=manifest).stdout
    data = json.loads(out)
    return list(data["items"]) if data.get("kind") == "List" else [data]


def pod_template(doc: Doc) -> Doc:
    return dict(doc["spec"]["template"]["spec"])


# ----------------------------------------------------------------- installing
def test_both_charts_and_the_broker_install_and_the_server_accepts_every_object(
    envtest: kube.EnvtestCluster, releases: Helm
) -> None:
    cloud, team, edge = unique("tideflow"), unique("team"), unique("edge")
    create_namespaces(envtest, cloud, team, edge)
    envtest.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(SERVICE_MONITOR_CRD))
    envtest.kubectl("wait", "--for=condition=Established", "--timeout=30s",
                    "crd/servicemonitors.monitoring.coreos.com")  # fmt: skip
    for name, literal in [("tideflow-mqtt", "password=op-pw"),
                          ("tideflow-broker-passwd", "passwd=tideflow-operator:$7$x"),
                          ("tideflow-mqtt-ca", "ca.crt=ca")]:  # fmt: skip
        envtest.kubectl(
            "create", "secret", "generic", name, f"--from-literal={literal}", "-n", cloud
        )
    operator_values = {
        "watchNamespaces": [team],
        "mqtt": {"passwordSecret": {"name": "tideflow-mqtt"},
                 "tls": {"caSecret": {"name": "tideflow-mqtt-ca"}}},
        "metrics": {"enabled": True, "serviceMonitor": {"enabled": True}},
        "broker": {"enabled": True, "passwordFileSecret": {"name": "tideflow-broker-passwd"},
                   "sites": [{"name": "line-2"}, {"name": "plant-7", "username": "p7"}],
                   "tls": {"secretName": "tideflow-broker-tls"},
                   "service": {"type": "NodePort"}},
        "priorityClassName": "system-cluster-critical",
    }  # fmt: skip
    release = releases.install(OPERATOR_CHART, "tf", cloud, operator_values)
    assert release["status"] == "deployed", release["status"]
    rendered = docs_of(release["manifest"])
    kinds = {d["kind"] for d in rendered}
    assert kinds >= {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                     "RoleBinding", "KopfPeering", "ConfigMap", "Service", "ServiceMonitor",
                     "PersistentVolumeClaim"}  # fmt: skip
    live = get_objects(envtest, release["manifest"])
    assert sorted((d["kind"], d["metadata"]["name"]) for d in live) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in rendered
    )
    # The chart's CRDs came with it (Helm installs crds/ first) and are served.
    for crd in ("workflows.tideflow.io", "edgesites.tideflow.io", "kopfpeerings.kopf.dev",
                "clusterkopfpeerings.kopf.dev"):  # fmt: skip
        envtest.kubectl("wait", "--for=condition=Established", "--timeout=30s", f"crd/{crd}")
    # The server kept the hardening as rendered (nothing dropped or defaulted away).
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in live}
    for doc in rendered:
        if doc["kind"] == "Deployment":
            server = pod_template(by_name[("Deployment", doc["metadata"]["name"])])
            for mine, theirs in zip(pod_template(doc)["containers"], server["containers"],
                                    strict=True):  # fmt: skip
                assert theirs["securityContext"] == mine["securityContext"]
                assert theirs["command"] == mine["command"]
            assert server["securityContext"] == pod_template(doc)["securityContext"]

    # Two sites, one release each: one on a PersistentVolumeClaim, one on a hostPath.
    envtest.kubectl("create", "secret", "generic", "site-mqtt", "--from-literal=password=x",
                    "-n", edge)  # fmt: skip
    site_values: Doc = {
        "site": {"name": "line-2", "labels": {"region": "north"}},
        "mqtt": {"url": "mqtts://broker.example.net:8883", "passwordSecret": {"name": "site-mqtt"}},
        "metrics": {"service": {"enabled": True}, "serviceMonitor": {"enabled": True}},
        "nodeSelector": {"node-role.kubernetes.io/edge": ""},
        "tolerations": [{"key": "node-role.kubernetes.io/edge", "operator": "Exists",
                         "effect": "NoSchedule"}],
    }  # fmt: skip
    hostpath_values: Doc = {
        "site": {"name": "plant-7"},
        "mqtt": {"url": "mqtt://broker.example.net:1883", "username": "p7"},
        "storage": {"type": "hostPath", "hostPath": {"path": "/var/lib/tideflow"}},
    }
    for name, values in (("line-2", site_values), ("plant-7", hostpath_values)):
        site_release = releases.install(AGENT_CHART, name, edge, values)
        assert site_release["status"] == "deployed"
        site_live = get_objects(envtest, site_release["manifest"])
        deployment = next(d for d in site_live if d["kind"] == "Deployment")
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        (container,) = pod_template(deployment)["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["TIDEFLOW_SITE"] == name
    envtest.kubectl("get", "pvc", "tideflow-agent-line-2-data", "-n", edge)

    # Uninstalling keeps what holds data: the broker's queue and the site's database.
    releases.uninstall(edge, "line-2")
    releases.uninstall(cloud, "tf")
    envtest.kubectl("get", "pvc", "tideflow-agent-line-2-data", "-n", edge)
    envtest.kubectl("get", "pvc", "tf-tideflow-operator-broker", "-n", cloud)
    gone = envtest.kubectl("get", "deployment", "tf-tideflow-operator", "-n", cloud, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_an_agent_release_without_a_site_name_is_refused_before_anything_is_created(
    envtest: kube.EnvtestCluster, releases: Helm
) -> None:
    namespace = unique("edge")
    create_namespaces(envtest, namespace)
    with pytest.raises(helm.HelmError) as info:
        releases.install(AGENT_CHART, "nameless", namespace, {"mqtt": {"url": "mqtt://b:1883"}})
    releases.releases.clear()
    assert "/site" in str(info.value) and "missing property 'name'" in str(info.value)
    left = envtest.kubectl("get", "deployments,pvc", "-n", namespace, "-o", "name").stdout
    assert left.strip() == ""


# ----------------------------------------------------------------- kubectl auth can-i
def can_i(cluster: kube.EnvtestCluster, user: str, *args: str) -> bool:
    proc = cluster.kubectl("auth", "can-i", *args, f"--as={user}", check=False)
    answer = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert answer in ("yes", "no"), (args, proc.stdout, proc.stderr)
    return answer == "yes"


def assert_can(cluster: kube.EnvtestCluster, user: str, allowed: bool, checks: list[str]) -> None:
    wrong = [c for c in checks if can_i(cluster, user, *c.split()) is not allowed]
    word = "denied" if allowed else "allowed"
    assert not wrong, f"{user} is {word}: {wrong}"


def test_operator_account_can_do_what_it_needs_and_nothing_more(
    envtest: kube.EnvtestCluster, releases: Helm
) -> None:
    ns, other = unique("tideflow"), unique("apps")
    create_namespaces(envtest, ns, other)
    releases.install(OPERATOR_CHART, "tf", ns, {"mqtt": {"url": "mqtt://broker:1883"}})
    user = sa_user(ns, "tf-tideflow-operator")
    lease, peering = "tf-tideflow-operator", "tf-tideflow-operator"
    assert_can(envtest, user, True, [
        f"list workflows.tideflow.io -n {other}", f"watch workflows.tideflow.io -n {other}",
        "list workflows.tideflow.io --all-namespaces",
        f"patch workflows.tideflow.io -n {other}",
        f"patch workflows.tideflow.io --subresource=status -n {other}",
        # A CronWorkflow's fired runs become Workflows, finished ones past its
        # history limits are deleted (decision 0008): the one create and delete.
        f"create workflows.tideflow.io -n {other}", f"delete workflows.tideflow.io -n {other}",
        f"list cronworkflows.tideflow.io -n {other}", f"watch cronworkflows.tideflow.io -n {other}",
        f"patch cronworkflows.tideflow.io --subresource=status -n {other}",
        f"create events -n {other}", f"create events -n {ns}",
        "list edgesites.tideflow.io", "watch edgesites.tideflow.io",
        "create edgesites.tideflow.io", "patch edgesites.tideflow.io --subresource=status",
        "patch edgesites.tideflow.io",
        f"list configmaps -n {ns}", f"create configmaps -n {ns}", f"patch configmaps -n {ns}",
        "list customresourcedefinitions.apiextensions.k8s.io",
        "watch customresourcedefinitions.apiextensions.k8s.io",
        f"create leases.coordination.k8s.io -n {ns}",
        f"get leases.coordination.k8s.io/{lease} -n {ns}",
        f"update leases.coordination.k8s.io/{lease} -n {ns}",
        "list clusterkopfpeerings.kopf.dev", "watch clusterkopfpeerings.kopf.dev",
        f"patch clusterkopfpeerings.kopf.dev/{peering}",
    ])  # fmt: skip
    assert_can(envtest, user, False, [
        # No Secrets anywhere: not in its own namespace, not elsewhere.
        f"get secrets -n {ns}", f"list secrets -n {ns}", f"get secrets -n {other}",
        "list secrets --all-namespaces", f"watch secrets -n {other}",
        "get secrets -n kube-system",
        # No pods, no exec, no workloads.
        f"create pods --subresource=exec -n {ns}", f"create pods --subresource=exec -n {other}",
        f"get pods -n {ns}", f"create pods -n {other}", f"delete pods -n {ns}",
        f"create deployments.apps -n {other}", f"get configmaps -n {ns}",
        f"create configmaps -n {other}", f"patch configmaps -n {other}",
        f"delete configmaps -n {ns}",
        # Workflows are the users' (bar a CronWorkflow's runs): never replaced, nor read one by one;
        # CronWorkflows are never changed.
        f"update workflows.tideflow.io -n {other}", f"get workflows.tideflow.io -n {other}",
        f"create cronworkflows.tideflow.io -n {other}",
        f"patch cronworkflows.tideflow.io -n {other}",
        f"delete cronworkflows.tideflow.io -n {other}",
        f"update workflows.tideflow.io --subresource=status -n {other}",
        "delete edgesites.tideflow.io",
        "update edgesites.tideflow.io --subresource=status",
        # Only its own Lease, only in its namespace.
        f"get leases.coordination.k8s.io/someone-else -n {ns}",
        f"update leases.coordination.k8s.io/someone-else -n {ns}",
        f"create leases.coordination.k8s.io -n {other}",
        f"delete leases.coordination.k8s.io -n {ns}",
        "patch clusterkopfpeerings.kopf.dev/someone-else", "create clusterkopfpeerings.kopf.dev",
        # Nothing that widens its own rights.
        "create customresourcedefinitions.apiextensions.k8s.io",
        "create clusterroles.rbac.authorization.k8s.io",
        "bind clusterroles.rbac.authorization.k8s.io",
        "escalate clusterroles.rbac.authorization.k8s.io",
        f"create rolebindings.rbac.authorization.k8s.io -n {ns}",
        "impersonate users", "impersonate serviceaccounts",
        f"create serviceaccounts --subresource=token -n {ns}",
        "list namespaces", "delete namespaces", "get nodes", "* *",
    ])  # fmt: skip


def test_operator_account_in_namespace_mode_reaches_only_those_namespaces(
    envtest: kube.EnvtestCluster, releases: Helm
) -> None:
    ns, watched, other = unique("tideflow"), unique("team"), unique("apps")
    create_namespaces(envtest, ns, watched, other)
    values = {"mqtt": {"url": "mqtt://broker:1883"}, "watchNamespaces": [watched]}
    releases.install(OPERATOR_CHART, "tf", ns, values)
    user = sa_user(ns, "tf-tideflow-operator")
    assert_can(envtest, user, True, [
        f"list workflows.tideflow.io -n {watched}", f"watch workflows.tideflow.io -n {watched}",
        f"patch workflows.tideflow.io -n {watched}",
        f"patch workflows.tideflow.io --subresource=status -n {watched}",
        f"create events -n {watched}", f"list kopfpeerings.kopf.dev -n {watched}",
        f"patch kopfpeerings.kopf.dev/tf-tideflow-operator -n {watched}",
        "list namespaces", "watch namespaces", "list edgesites.tideflow.io",
        "patch edgesites.tideflow.io --subresource=status",
    ])  # fmt: skip
    assert_can(envtest, user, False, [
        f"list workflows.tideflow.io -n {other}", "list workflows.tideflow.io --all-namespaces",
        f"patch workflows.tideflow.io --subresource=status -n {other}",
        f"create events -n {other}", f"list kopfpeerings.kopf.dev -n {other}",
        "list clusterkopfpeerings.kopf.dev", f"get secrets -n {watched}",
        f"create pods --subresource=exec -n {watched}", "get namespaces",
    ])  # fmt: skip


# ----------------------------------------------------------------- the operator under its RBAC
@pytest.fixture(scope="module")
def audited_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[kube.EnvtestCluster, Path]]:
    """An API server of its own that writes an audit log of every ServiceAccount's calls."""
    reason = kube.missing_reason()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("audit")
    policy = workdir / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
        "rules": [{"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                  {"level": "None"}],
    }))  # fmt: skip
    log = workdir / "audit.log"
    cluster = kube.EnvtestCluster(
        extra_apiserver_args=[f"--audit-policy-file={policy}", f"--audit-log-path={log}",
                              "--audit-log-mode=blocking"]
    )  # fmt: skip
    with cluster:
        yield cluster, log


def service_account_kubeconfig(
    cluster: kube.EnvtestCluster, namespace: str, name: str, path: Path
) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (a TokenRequest's token)."""
    from kubernetes import client

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
    token = answer.status.token
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["users"] = [{"name": name, "user": {"token": token}}]
    config["contexts"][0]["context"]["user"] = name
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def chart_env(container: Doc, namespace: str, pod: str) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            field = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = {"metadata.namespace": namespace, "metadata.name": pod}[field]
    return env


def audit_calls(log: Path, user: str) -> list[Doc]:
    calls = []
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event["user"]["username"] == user and event.get("stage") != "RequestReceived":
            calls.append(event)
    return calls


def granted(docs: list[Doc]) -> set[tuple[str, str, str]]:
    out = set()
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "Role"):
            for rule in doc["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        out |= {(group, resource, verb) for verb in rule["verbs"]}
    return out


def workflow(name: str, namespace: str, site: str, command: list[str]) -> str:
    return yaml.safe_dump({
        "apiVersion": "tideflow.io/v1alpha1", "kind": "Workflow",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"placement": {"site": site}, "tasks": [{"name": "work", "command": command}]},
    })  # fmt: skip


def wait_phase(cluster: kube.EnvtestCluster, namespace: str, name: str, phase: str,
               dump: Callable[[], str], timeout: float = 60) -> Doc:  # fmt: skip
    def status() -> Doc:
        out = cluster.kubectl("get", "twf", name, "-n", namespace, "-o", "json").stdout
        return dict(json.loads(out).get("status") or {})

    try:
        wait_for(lambda: status().get("phase") == phase, timeout, f"{name} {phase}")
    except AssertionError:
        print(json.dumps(status(), indent=1)[:3000])
        print(dump())
        raise
    return status()


class ChartProcess:
    """A chart's container run here: its command, arguments and environment.

    Only what a pod gets from its node differs, and each difference is named
    by the caller in ``local`` (a loopback address instead of a Service, a file
    instead of a mounted Secret, a kubeconfig instead of a mounted token).
    """

    def __init__(self, container: Doc, chart_env: dict[str, str], local: dict[str, str],
                 log: Path) -> None:  # fmt: skip
        self.log = log
        script = Path(sys.executable).parent / container["command"][0]
        assert script.exists(), f"console script {script} missing: pip install -e ."
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
        env.update(chart_env)
        unknown = set(local) - set(chart_env) - {"KUBECONFIG"}
        assert not unknown, f"overrides of settings the chart does not make: {unknown}"
        env.update(local)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(script), *container.get("args", [])], env=env, stdout=out, stderr=out,
                start_new_session=True,
            )  # fmt: skip

    def text(self, tail: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.mark.broker
@pytest.mark.parametrize("mode", ["cluster-wide", "namespaces"])
def test_the_charts_run_together_and_the_operator_uses_exactly_its_permissions(
    audited_cluster: tuple[kube.EnvtestCluster, Path], tmp_path: Path, mode: str
) -> None:
    """Operator (under its ServiceAccount), broker (chart config) and agent (chart env)."""
    from services.broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found; install Debian's mosquitto")
    cluster, audit_log = audited_cluster
    ns, apps, site = unique("tideflow"), unique("apps"), unique("site")
    create_namespaces(cluster, ns, apps)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    values: Doc = {
        "mqtt": {"passwordSecret": {"name": "tideflow-mqtt"}},
        "broker": {"enabled": True, "passwordFileSecret": {"name": "tideflow-broker-passwd"},
                   "sites": [{"name": site}], "persistence": {"enabled": False}},
    }  # fmt: skip
    if mode == "namespaces":
        values["watchNamespaces"] = [apps]
    h = Helm(cluster)
    operator: ChartProcess | None = None
    agent: ChartProcess | None = None

    def dump() -> str:
        return "\n".join(
            f"--- {p.log.name} ---\n{p.text()}" for p in (operator, agent) if p is not None
        )

    try:
        release = h.install(OPERATOR_CHART, "tf", ns, values)
        rendered = docs_of(release["manifest"])
        config = next(d for d in rendered if d["kind"] == "ConfigMap")["data"]
        deployment = next(
            d for d in rendered
            if d["kind"] == "Deployment" and d["metadata"]["name"] == "tf-tideflow-operator"
        )  # fmt: skip
        (container,) = pod_template(deployment)["containers"]
        sa = pod_template(deployment)["serviceAccountName"]
        op_env = chart_env(container, ns, "tf-tideflow-operator-0")
        username = op_env["TIDEFLOW_USERNAME"]

        # The broker: the chart's mosquitto.conf and ACL, the users of the password file.
        from integration.test_charts import chart_mosquitto

        users = {username: "operator-pw", site: "site-pw"}
        (tmp_path / "operator-password").write_text("operator-pw\n")
        (tmp_path / "site-password").write_text("site-pw\n")
        broker = chart_mosquitto(config["mosquitto.conf"], config["acl"], users,
                                 tmp_path / "broker", config["client-ids.json"])  # fmt: skip
        broker.start()
        try:
            health_port = kube.free_port()
            assert op_env["TIDEFLOW_LIVENESS"] == "http://0.0.0.0:8080/healthz"
            assert op_env["TIDEFLOW_PASSWORD_FILE"] == "/etc/tideflow/mqtt/password"
            kubeconfig = service_account_kubeconfig(cluster, ns, sa, tmp_path / "sa.kubeconfig")
            operator = ChartProcess(container, op_env, {
                "TIDEFLOW_BROKER": broker.url,
                "TIDEFLOW_PASSWORD_FILE": str(tmp_path / "operator-password"),
                "TIDEFLOW_LIVENESS": f"http://127.0.0.1:{health_port}/healthz",
                "KUBECONFIG": str(kubeconfig),
            }, tmp_path / "operator.log")  # fmt: skip

            # kopf's health endpoint answers where the chart's probes look.
            probe = container["livenessProbe"]["httpGet"]["path"]
            try:
                wait_for(lambda: http_ok(f"http://127.0.0.1:{health_port}{probe}"), 60, "health")
            except AssertionError:
                print(dump())
                raise
            # No agent yet: the Workflow is placed and assigned; the assignment waits.
            cluster.kubectl("apply", "-f", "-", input=workflow("first", apps, site, ["true"]))
            status = wait_phase(cluster, apps, "first", "Assigned", dump)
            assert status["site"] == site
            # An invalid spec (a cycle): Failed, with the Event a user acts on (create events;
            # a run that goes well has none since decision 0019).
            cycle = yaml.safe_load(workflow("cycle", apps, site, ["true"]))
            cycle["spec"]["tasks"] = [
                {"name": "a", "command": ["true"], "dependsOn": ["b"]},
                {"name": "b", "command": ["true"], "dependsOn": ["a"]},
            ]
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(cycle))
            wait_phase(cluster, apps, "cycle", "Failed", dump)

            def invalid_spec_events() -> list[Doc]:
                out = cluster.kubectl(
                    "get", "events", "-n", apps, "--field-selector",
                    "involvedObject.name=cycle", "-o", "json",
                ).stdout  # fmt: skip
                return [e for e in json.loads(out)["items"] if e["reason"] == "InvalidSpec"]

            wait_for(invalid_spec_events, 30, "the InvalidSpec Event")

            # The site's agent, as the agent chart runs it, logs in as the site.
            site_values = {"site": {"name": site, "labels": {"line": "2"}},
                           "mqtt": {"url": f"mqtt://tf-tideflow-operator-broker.{ns}.svc:1883",
                                    "passwordSecret": {"name": "site-mqtt"}}}  # fmt: skip
            with helm.Chart.load(str(AGENT_CHART)) as chart:
                manifests = chart.render(site_values, name=site, namespace="edge")
            agent_deployment = next(
                d for text in manifests.values() if not text.lstrip().startswith("Tideflow")
                for d in docs_of(text) if d["kind"] == "Deployment"
            )  # fmt: skip
            (agent_container,) = pod_template(agent_deployment)["containers"]
            agent_env = chart_env(agent_container, "edge", f"{site}-0")
            assert agent_env["TIDEFLOW_USERNAME"] == site
            metrics_port = kube.free_port()
            agent = ChartProcess(agent_container, agent_env, {
                "TIDEFLOW_BROKER": broker.url,
                "TIDEFLOW_PASSWORD_FILE": str(tmp_path / "site-password"),
                "TIDEFLOW_DB": str(tmp_path / "site.db"),
                "TIDEFLOW_METRICS_PORT": str(metrics_port),
                "TIDEFLOW_HEARTBEAT_SECONDS": "1",
            }, tmp_path / "agent.log")  # fmt: skip
            # The agent's probe paths answer on its metrics port.
            for probe_kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                path = agent_container[probe_kind]["httpGet"]["path"]
                url = f"http://127.0.0.1:{metrics_port}{path}"
                wait_for(lambda url=url: http_ok(url), 30, path)
            wait_phase(cluster, apps, "first", "Succeeded", dump)
            edgesite = json.loads(cluster.kubectl("get", "edgesite", site, "-o", "json").stdout)
            assert edgesite["status"]["connected"] is True, edgesite
            # Registered with the agent's labels; a key the agent reports is put back.
            assert edgesite["metadata"]["labels"]["line"] == "2", edgesite
            cluster.kubectl("label", "edgesite", site, "line=9", "--overwrite")

            def line_label() -> str:
                out = cluster.kubectl("get", "edgesite", site, "-o", "json").stdout
                return str(json.loads(out)["metadata"]["labels"].get("line"))

            wait_for(lambda: line_label() == "2", 30, "the agent's label put back")

            # Deleting a running Workflow cancels it at the site; nothing holds the delete
            # (no finalizer since decision 0019).  This one carries the finalizer an older
            # operator's kopf added (an upgrade): the operator removes it (patch workflows).
            running = yaml.safe_load(workflow("second", apps, site, ["sleep", "60"]))
            running["metadata"]["finalizers"] = ["tideflow.io/cancel-at-site"]
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(running))
            wait_phase(cluster, apps, "second", "Running", dump)

            def finalizers() -> list[str]:
                out = cluster.kubectl("get", "twf", "second", "-n", apps, "-o", "json").stdout
                return list(json.loads(out)["metadata"].get("finalizers") or [])

            wait_for(lambda: finalizers() == [], 30, "the older operator's finalizer removed")
            cluster.kubectl("delete", "twf", "second", "-n", apps, "--timeout=30s")

            # A CronWorkflow: delivered, fired at the site, its runs made Workflows
            # (create), its status written, finished ones past the limit pruned (delete).
            cron = {
                "apiVersion": "tideflow.io/v1alpha1",
                "kind": "CronWorkflow",
                "metadata": {"name": "tick", "namespace": apps},
                "spec": {
                    "schedule": "@every 1s",
                    "placement": {"site": site},
                    "successfulJobsHistoryLimit": 1,
                    "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]},
                },
            }
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(cron))  # fmt: skip

            def pruned() -> bool:
                out = cluster.kubectl(
                    "get", "twf", "-n", apps, "-l", "tideflow.io/cron-workflow=tick", "-o", "json"
                ).stdout
                items = json.loads(out)["items"]
                done = [i for i in items if (i.get("status") or {}).get("phase") == "Succeeded"]
                got = json.loads(cluster.kubectl("get", "tcwf", "tick", "-n", apps,
                                                 "-o", "json").stdout)  # fmt: skip
                fired = (
                    sqlite3.connect(f"file:{tmp_path / 'site.db'}?mode=ro", uri=True)
                    .execute("SELECT count(*) FROM runs WHERE schedule_uid IS NOT NULL")
                    .fetchone()[0]
                )
                return fired >= 4 and len(done) <= 1 and bool(got.get("status", {}).get("sites"))

            wait_for(pruned, 60, "cron runs made Workflows and pruned to the history limit")
            assert operator.proc.poll() is None and agent.proc.poll() is None, dump()
        finally:
            for process in (agent, operator):
                if process is not None:
                    process.stop()
            broker_log = broker.log_tail(200)
            broker.close()
        assert "not authorised" not in broker_log.lower(), broker_log
        text = operator.text(10**7)
        for complaint in ("Not enough permissions", "Forbidden", "forbidden", " 403"):
            assert complaint not in text, dump()

        # The audit log (blocking mode: each event is written before its response returns):
        # nothing denied, and every permission granted was used.
        calls = audit_calls(audit_log, sa_user(ns, sa))
        assert calls, "the audit log has no call by the operator's account"
        denied = [(c["verb"], c["requestURI"], c["responseStatus"].get("code")) for c in calls
                  if c["responseStatus"].get("code") in (401, 403)]  # fmt: skip
        assert denied == [], denied
        used = set()
        for call in calls:
            ref = call.get("objectRef")
            if not ref:
                continue  # discovery (/api, /apis/...): allowed to every authenticated user
            sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
            used.add((ref.get("apiGroup", ""), ref["resource"] + sub, call["verb"]))
        assert granted(rendered) - used == set(), "granted but never used"
        assert used - granted(rendered) == set(), "used but not granted (should have failed)"
    finally:
        h.close()
