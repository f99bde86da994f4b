"""Written before sent: each Workflow's Assigned status is stored before its assignment leaves.

Judged from two independent records, not from the operator's own account:
the API server's audit log (the operator runs as a ServiceAccount of its own;
when did the first write of each Workflow's status complete?) and a probe
subscribed to the site's ``assign`` topic (when did each assignment reach the
broker's subscribers?).  A burst of Workflows is applied at once; for every
one of them the status write must have completed first — otherwise a fast
site's report could be overwritten by a stale "Assigned".
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from services import kube
from services.agent import wait_for
from services.world import World, sample_tasks, site_name, spec_for

from tideflow import wire

pytestmark = pytest.mark.envtest
BURST = 8


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_every_assignment_leaves_after_its_assigned_status_is_written(world: World) -> None:
    site = site_name()
    seen: dict[str, float] = {}
    lock = threading.Lock()

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        arrived = time.time()
        name = json.loads(message.payload)["payload"]["name"]
        with lock:
            seen.setdefault(name, arrived)

    probe = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:6]}")
    probe.on_message = on_message
    probe.connect(world.broker.host, world.broker.port)
    probe.subscribe(wire.topic(site, wire.ASSIGN), 1)
    probe.loop_start()
    try:
        config, user = kube.service_account_kubeconfig(
            world.cluster, world.namespace, "admitter", world.tmp / "admitter.kubeconfig"
        )
        op = world.operator(env={"KUBECONFIG": str(config)})
        wait_for(lambda: "kopf" in op.log_text(), 60, "the operator to start")
        names = [f"burst-{i}" for i in range(BURST)]
        manifests = [
            {"apiVersion": "tideflow.io/v1alpha1", "kind": "Workflow",
             "metadata": {"name": name, "namespace": world.namespace},
             "spec": spec_for(site, sample_tasks(0.05, 1))}
            for name in names
        ]  # fmt: skip
        world.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(manifests))
        wait_for(lambda: len(seen) == BURST, 60, "every assignment at the probe")
    finally:
        probe.loop_stop()
        probe.disconnect()
    written: dict[str, float] = {}
    for event in kube.audit_events(world.cluster.audit_log, user):
        ref = event.get("objectRef", {})
        if (event["verb"] == "patch" and ref.get("resource") == "workflows"
                and ref.get("subresource") == "status" and ref.get("name") in seen):  # fmt: skip
            written.setdefault(ref["name"], _stamp(event["stageTimestamp"]))
    assert sorted(written) == sorted(seen), "a Workflow was sent with no status write"
    late = {n: round(seen[n] - written[n], 3) for n in names if seen[n] <= written[n]}
    assert late == {}, f"sent before its status was written (s): {late}"
