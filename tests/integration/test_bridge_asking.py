"""When the operator asks a site for its records (decision 0025), against a real broker.

A site that has just connected says its outbox depth in its first state
message, before its first events batch is on the wire; asking it then made
it send its window twice (the 1,000,000-record drain resent 4,169 records
once its window was wider, decision 0030).  Proves: a heartbeat showing
depth followed by the site's batch is not asked; a site that keeps showing
depth and sends nothing is asked once, at its second such heartbeat.
"""

from __future__ import annotations

import json
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from services.broker import Mosquitto
from services.cloud import running_cloud, until

from tideflow import wire

SITE = "site-a"


class FakeSite:
    """A hand-driven site on the real broker: its state messages, its batches, its acks."""

    def __init__(self, broker: Mosquitto) -> None:
        self.acks: list[dict[str, Any]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"site-{SITE}")
        self.client.on_message = lambda _c, _u, m: self.acks.append(json.loads(m.payload))
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(wire.topic(SITE, wire.ACKS), qos=1)
        self.client.loop_start()

    def state(self, depth: int) -> None:
        message = wire.encode(wire.KIND_STATE, SITE, {"online": True, "outboxDepth": depth})
        self.client.publish(wire.topic(SITE, wire.STATE), message, qos=1).wait_for_publish(10)

    def events(self, seqs: range) -> None:
        # Records of a Workflow this operator does not know: applied as discarded,
        # which moves the site's mark all the same.
        body = {"uid": "u-gone", "generation": 1, "namespace": "default", "name": "gone",
                "task": "a", "phase": "Succeeded", "attempt": 1}  # fmt: skip
        rows = [(seq, "task", json.dumps(body)) for seq in seqs]
        payload = wire.encode_events(SITE, rows)
        self.client.publish(wire.topic(SITE, wire.EVENTS), payload, qos=1).wait_for_publish(10)

    def resend_asks(self) -> list[int]:
        return [a["payload"]["through"] for a in self.acks if a["payload"].get("resend")]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def test_a_site_that_says_its_depth_and_then_sends_is_not_asked(mosquitto: Mosquitto) -> None:
    site = FakeSite(mosquitto)
    try:
        async with running_cloud(mosquitto.url) as cloud:
            bridge = cloud.bridge
            site.state(3)
            site.events(range(1, 4))
            await until(lambda: bridge.applier.ackable_through(SITE) == 3, 20, "the batch")
            site.state(0)
            site.state(0)
            await until(lambda: any(a["payload"]["through"] == 3 for a in site.acks), 20, "ack")
            # The last state message, handled after the others, proves the rest are in.
            await until(lambda: bridge.presence.get(SITE) is not None, 10, "presence")
        assert site.resend_asks() == [], site.acks
    finally:
        site.close()


async def test_a_site_that_shows_depth_and_sends_nothing_is_asked_once(
    mosquitto: Mosquitto,
) -> None:
    site = FakeSite(mosquitto)
    try:
        async with running_cloud(mosquitto.url) as cloud:
            bridge = cloud.bridge
            site.state(5)
            await until(lambda: SITE in bridge._depth_noticed, 20, "the first heartbeat")
            assert site.resend_asks() == [] and SITE not in bridge._asked
            site.state(5)
            await until(lambda: site.resend_asks(), 20, "the ask")
            for _ in range(3):
                site.state(5)
            await until(lambda: bridge.presence.get(SITE) is not None, 10, "presence")
        assert site.resend_asks() == [0]
    finally:
        site.close()
