"""Adding a site the way the README says: password file, ``broker.sites``, ``helm upgrade``.

The operator chart is installed with its broker for one site.  Then, as the
README's "Deploy with Helm" step 3 says, the new site's line is added to the
password file and the site to ``broker.sites``, and the release is upgraded.
No pod runs on the envtest API server, so the "rollout restart" is done by
hand: a real Mosquitto is started from the broker ConfigMap the release left
on the server (what the restarted pod would mount).  Before the upgrade the
new site's user gets nothing through; after it, it reads its own ``assign``
and writes its own ``events``, and still nothing of the other site's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from services import kube
from services.chart_broker import MqttProbe, chart_mosquitto

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is not installed: pip install -e '.[test]'"
)
pytestmark = pytest.mark.envtest
OPERATOR_CHART = Path(__file__).resolve().parents[2] / "charts" / "tideflow-operator"
USERS = {"tideflow-operator": "op-pw", "line-2": "l2-pw", "line-9": "l9-pw"}


def values(*sites: str) -> dict[str, Any]:
    return {
        "image": {"repository": "registry.example/tideflow-operator"},
        "mqtt": {"passwordSecret": {"name": "tideflow-mqtt"}},
        "broker": {"enabled": True, "passwordFileSecret": {"name": "tideflow-broker-passwd"},
                   "sites": [{"name": s} for s in sites]},
    }  # fmt: skip


def broker_files(cluster: kube.EnvtestCluster, namespace: str) -> tuple[str, str, str]:
    """mosquitto.conf, acl and client-ids.json from the ConfigMap the release put on the server."""
    items = json.loads(cluster.kubectl("get", "configmap", "-n", namespace, "-o", "json").stdout)
    (data,) = [i["data"] for i in items["items"] if "acl" in (i.get("data") or {})]
    return data["mosquitto.conf"], data["acl"], data["client-ids.json"]


@pytest.fixture
def namespace(envtest: kube.EnvtestCluster) -> Iterator[str]:
    name = f"tideflow-{uuid.uuid4().hex[:6]}"
    envtest.kubectl("create", "namespace", name)
    yield name
    envtest.kubectl("delete", "namespace", name, "--wait=false", check=False)


def line_9_gets_through(conf: str, acl: str, client_ids: str, workdir: Path) -> bool:
    """Whether line-9 can take its assignment and report to the operator on this config."""
    with chart_mosquitto(conf, acl, USERS, workdir, client_ids) as broker:
        operator = MqttProbe(broker, "tideflow-operator", USERS["tideflow-operator"])
        site = MqttProbe(broker, "line-9", USERS["line-9"])
        other = MqttProbe(broker, "line-2", USERS["line-2"])
        try:
            operator.subscribe("tideflow/v1/sites/#")
            site.subscribe("tideflow/v1/sites/line-9/assign")
            other.subscribe("tideflow/v1/sites/line-2/assign")
            site.publish("tideflow/v1/sites/line-2/events", b"forged")  # never its own to write
            site.publish("tideflow/v1/sites/line-9/events", b"line-9 reporting")
            reported = _next(operator)
            operator.publish("tideflow/v1/sites/line-9/assign", b"for line-9")
            assigned = _next(site)
            other.expect_nothing()
            return reported == ("tideflow/v1/sites/line-9/events", b"line-9 reporting") and (
                assigned == ("tideflow/v1/sites/line-9/assign", b"for line-9")
            )
        finally:
            for probe in (operator, site, other):
                probe.close()


def _next(probe: MqttProbe) -> tuple[str, bytes] | None:
    try:
        return probe.expect()
    except Exception:  # queue.Empty: nothing came
        return None


def test_a_site_added_with_helm_upgrade_gets_through_the_broker(
    envtest: kube.EnvtestCluster, namespace: str, tmp_path: Path
) -> None:
    envtest.kubectl("create", "secret", "generic", "tideflow-mqtt",
                    "--from-literal=password=op-pw", "-n", namespace)  # fmt: skip
    config = helm.Config(kubeconfig_path=str(envtest.kubeconfig), namespace=namespace)
    with config as cfg:
        release = cfg.install(str(OPERATOR_CHART), "tf", values("line-2"),
                              namespace=namespace, timeout=60)  # fmt: skip
        assert release["status"] == "deployed"
        try:
            before = broker_files(envtest, namespace)
            assert not line_9_gets_through(*before, tmp_path / "before")
            upgraded = cfg.upgrade(str(OPERATOR_CHART), "tf", values("line-2", "line-9"),
                                   namespace=namespace, timeout=60)  # fmt: skip
            assert upgraded["status"] == "deployed", upgraded["status"]
            assert "line-9" in upgraded["manifest"]
            after = broker_files(envtest, namespace)
            assert line_9_gets_through(*after, tmp_path / "after")
        finally:
            cfg.uninstall("tf", ignore_not_found=True)
