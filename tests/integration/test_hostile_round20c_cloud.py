"""Round 20c: a compromised site's clock-step report, through the real broker and operator.

A site may report that its clock stepped back (a ``schedule`` record with
``clockSteppedBackFrom``, decision 0049).  Here the site's credentials (the
per-site ACL lets it write only its own ``events``) send one whose mark is
1e300: the operator kept it before rendering it, and every later write of the
CronWorkflow's status raised, so even a genuine report after it never showed.
Now the bad one is refused naming the field (decision 0050), the operator
runs on, and the genuine one is shown.  Real API server (envtest), Mosquitto
with passwords and the per-site ACL, the operator process.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from services.agent import wait_for
from services.broker import Mosquitto
from services.kube import EnvtestCluster
from services.world import World, install_crds

from tideflow import wire

SITE, SITE_USER = "a", "site-a"


def _publish_as_site(broker: Mosquitto, password: str, payload: bytes) -> None:
    """One QoS 1 message on the site's own events topic, with the site's credentials."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=wire.agent_client_id(SITE))
    client.username_pw_set(SITE_USER, password)
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        info = client.publish(wire.topic(SITE, wire.EVENTS), payload, qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), "no PUBACK"
    finally:
        client.disconnect()
        client.loop_stop()


def _step(uid: str, namespace: str, to: float, from_: float) -> str:
    body = {
        "uid": uid, "generation": 1, "namespace": namespace, "name": "etl",
        "state": "Held", "lastScheduledTime": to, "missedCount": 0,
        "clockSteppedBackFrom": from_,
    }  # fmt: skip
    return json.dumps(body)


def _get(world: World, kind: str, name: str) -> dict[str, Any]:
    out = world.kubectl("get", kind, name, "-n", world.namespace, "-o", "json").stdout
    return dict(json.loads(out))


def test_a_step_report_from_no_time_leaves_the_operator_writing_the_status(
    envtest: EnvtestCluster, secure_mosquitto: Mosquitto, tmp_path: Path
) -> None:
    install_crds(envtest)
    broker = secure_mosquitto
    world = World(envtest, broker, tmp_path)
    try:
        secret = tmp_path / "operator.pw"
        secret.write_text(broker.users["operator"])
        op = world.operator("--username", "operator", "--password-file", str(secret))
        cron = {
            "apiVersion": "tideflow.io/v1alpha1", "kind": "CronWorkflow",
            "metadata": {"name": "etl", "namespace": world.namespace},
            "spec": {"schedule": "@every 10s", "placement": {"site": SITE},
                     "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]}},
        }  # fmt: skip
        world.kubectl("apply", "-f", "-", input=yaml.safe_dump(cron))
        uid = _get(world, "cronworkflow", "etl")["metadata"]["uid"]
        now = float(int(time.time()))
        password = broker.users[SITE_USER]
        bad = [(1, "schedule", _step(uid, world.namespace, now, 1e300))]
        good = [(2, "schedule", _step(uid, world.namespace, now - 5, now + 300))]

        def shown() -> Any:
            entries = (_get(world, "cronworkflow", "etl").get("status") or {}).get("sites")
            return entries[0].get("clockSteppedBackFrom") if entries else None

        # Sent again until shown (the operator may not have subscribed yet): the
        # applier takes each seq once, in order, so a resend changes nothing.
        deadline = time.monotonic() + 45
        while shown() is None and time.monotonic() < deadline:
            _publish_as_site(broker, password, wire.encode_events(SITE, bad))
            _publish_as_site(broker, password, wire.encode_events(SITE, good))
            with contextlib.suppress(AssertionError):
                wait_for(lambda: shown() is not None, 5, "the genuine step in the status")
        assert shown() is not None, op.log_text()[-3000:]
        assert shown() == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 300))
        assert op.alive
        log = op.log_text()
        assert "clockSteppedBackFrom 1e+300 is not a time" in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    finally:
        world.close()
