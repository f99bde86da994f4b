"""The operator's Prometheus endpoint, scraped over HTTP: every series the README lists moves.

The operator watches only this test's namespace, so its counts start at zero
and each must move when its event happens: workflows by phase, records
applied, duplicates ignored, gaps, records discarded by reason, status
patches and their latency, admissions and theirs, sites connected (up when the agent reports, down
when it goes away), dropped messages.  Duplicates, gaps, an unknown
Workflow's record and garbage are published by hand, for a site of their own
(so the real site's sequence is untouched).
"""

from __future__ import annotations

import json
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from services.agent import wait_for
from services.metrics import scrape
from services.world import World, sample_tasks, site_name, spec_for

from tideflow import wire

pytestmark = pytest.mark.envtest


def publish(world: World, site: str, records: list[tuple[int, str, dict[str, object]]]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:6]}")
    client.connect(world.broker.host, world.broker.port)
    client.loop_start()
    try:
        payload = wire.encode_events(site, [(s, k, json.dumps(b)) for s, k, b in records])
        client.publish(wire.topic(site, wire.EVENTS), payload, 1).wait_for_publish(10)
        client.publish(wire.topic(site, wire.EVENTS), b"{garbage", 1).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def test_every_operator_metric_moves_when_its_event_happens(world: World) -> None:
    site = site_name()
    _, port = world.metered_operator()
    m = lambda: scrape(port)  # noqa: E731
    start = m()
    assert start["tideflow_operator_records_applied_total"] == 0
    assert start["tideflow_operator_sites_connected"] == 0
    assert not any(k.startswith("tideflow_operator_workflows{") for k in start), start
    agent = world.agent(site)
    wait_for(lambda: m()["tideflow_operator_sites_connected"] == 1, 30, "the site connected")
    world.apply("metered", spec_for(site, sample_tasks(0.05, 2)))
    world.wait_phase("metered", "Succeeded")
    wait_for(lambda: m().get("tideflow_operator_workflows{phase=Succeeded}") == 1, 20, "phase")
    values = m()
    assert values["tideflow_operator_records_applied_total"] > 0
    assert values["tideflow_operator_status_patches_total"] >= 2
    assert values["tideflow_operator_status_patch_seconds_count"] >= 2
    assert values["tideflow_operator_status_patch_seconds_sum"] > 0
    # One Workflow admitted: one observation, from its watch event to ready to send.
    assert values["tideflow_operator_admission_seconds_count"] == 1
    assert 0 < values["tideflow_operator_admission_seconds_sum"] < 60

    # A record applied twice, a record after a hole, garbage: each counted.
    ghost = "ghost-" + uuid.uuid4().hex[:6]
    body = {"uid": "u", "generation": 1, "namespace": world.namespace, "name": "none",
            "phase": "Pending"}  # fmt: skip
    publish(world, ghost, [(1, "run", body)])
    unknown = "tideflow_operator_records_discarded_total{reason=unknown}"
    wait_for(lambda: m().get(unknown, 0) >= 1, 20, "the ghost's record discarded as unknown")
    publish(world, ghost, [(1, "run", body)])
    wait_for(lambda: m()["tideflow_operator_duplicates_ignored_total"] >= 1, 20, "a duplicate")
    publish(world, ghost, [(3, "run", body)])
    wait_for(lambda: m()["tideflow_operator_gaps_total"] >= 1, 20, "a gap")
    dropped = lambda: sum(v for k, v in m().items()  # noqa: E731
                          if k.startswith("tideflow_operator_dropped_messages_total"))  # fmt: skip
    wait_for(lambda: dropped() >= 3, 20, "the garbage counted")

    agent.terminate()
    wait_for(lambda: m()["tideflow_operator_sites_connected"] == 0, 30, "the site gone")
