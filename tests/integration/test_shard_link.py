"""An operator shard's MQTT link on a real Mosquitto: its own sites' events only.

Decision 0016: a shard subscribes to the ``events`` of the sites it owns (each
as it becomes known: here, its first ``state``) and to every site's ``state``;
the broker never delivers another shard's sites' records to it, and it
publishes nothing to another shard's site.  The e2e proof with the whole
operator is tests/e2e/test_shards_e2e.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from services.broker import Mosquitto

from tideflow import wire
from tideflow.mqtt import BrokerConnection
from tideflow_operator.bridge import BridgeConfig, CloudBridge
from tideflow_operator.shards import ShardRouter, ShardSpec, owner

SITES = [f"link-{i:02d}" for i in range(12)]


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


def publisher(broker: Mosquitto) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sites")
    host, port = broker.url.removeprefix("mqtt://").split(":")
    client.connect(host, int(port))
    client.loop_start()
    return client


async def test_a_shard_receives_only_its_own_sites_events(mosquitto: Mosquitto) -> None:
    router = ShardRouter(ShardSpec(0, 2))
    mine = [s for s in SITES if owner(s, 2) == 0]
    theirs = [s for s in SITES if owner(s, 2) == 1]
    assert mine and theirs
    bridge = CloudBridge(BridgeConfig(BrokerConnection(mosquitto.url), client_id="shard-0"))
    bridge.shard = router
    received: Counter[tuple[str, str]] = Counter()
    await bridge.start()
    assert bridge.link is not None
    forward = bridge.link._on_message

    def counting(topic: str, data: bytes) -> None:
        received[wire.parse_topic(topic)] += 1
        forward(topic, data)

    bridge.link._on_message = counting
    sites = publisher(mosquitto)
    try:
        await until(bridge.connected.is_set, 15, "the shard's link")
        for site in SITES:  # each site says it is online: the shard learns its own
            state = wire.StatePayload(online=True)
            sites.publish(
                wire.topic(site, wire.STATE), wire.encode(wire.KIND_STATE, site, state), 1
            )
        await until(lambda: all(bridge.presence.connected(s) for s in mine), 15, "own sites")
        await until(
            lambda: sum(received[(s, wire.STATE)] for s in SITES) == len(SITES), 15, "states"
        )

        # Subscribed now to each own site's events (the SUBSCRIBE may still be on its
        # way: the sites send again until their records arrive, as agents do).
        def send_events() -> bool:
            for site in SITES:
                data = wire.encode_events(site, [], epoch="e1")
                sites.publish(wire.topic(site, wire.EVENTS), data, 1)
            return True

        deadline = time.monotonic() + 15
        while not all(received[(s, wire.EVENTS)] for s in mine):
            assert time.monotonic() < deadline, "own sites' events never arrived"
            send_events()
            await asyncio.sleep(0.3)
        # Another shard's: the broker delivered their state (every site's), never their events.
        await asyncio.sleep(1.0)
        assert {s: received[(s, wire.EVENTS)] for s in theirs} == {s: 0 for s in theirs}
        assert not any(bridge.presence.get(s) for s in theirs), "another shard's state handled"
        assert bridge.dropped["other-shard"] == len(theirs)
        # Nothing goes out to another shard's site.
        assert not bridge.publish(theirs[0], wire.ACKS, b"{}")
        assert bridge.dropped["other-shard-publish"] == 1
    finally:
        sites.loop_stop()
        sites.disconnect()
        await bridge.stop()
