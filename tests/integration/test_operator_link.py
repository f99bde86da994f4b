"""The operator's side of the MQTT link under faults, with a real Mosquitto.

* Re-sends after a link outage: a message that cannot be published (a site
  name that is a wildcard) must cost that message only, never the other
  sites' re-sends (issue 16 #5).
* Two processes under one MQTT client id keep taking each other's session
  over; the operator's link says so loudly (issue 16 #6).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from services.broker import LinkProxy, Mosquitto

from tideflow import wire
from tideflow.mqtt import BrokerConnection, LinkConfig, MqttLink
from tideflow_operator.bridge import BridgeConfig, CloudBridge


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


class Listener:
    """A plain MQTT client that records what arrives on a topic filter."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"listener-{id(self)}")
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic, bytes(m.payload)))
        host, port = broker.url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert self.ready.wait(10), "listener never subscribed"

    def topics(self) -> list[str]:
        return [t for t, _ in self.received]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def assignment(uid: str) -> wire.AssignPayload:
    return wire.AssignPayload(
        uid=uid, generation=1, namespace="ns", name=uid,
        spec={"tasks": [{"name": "t", "command": ["true"]}]},
    )  # fmt: skip


async def test_one_unpublishable_message_does_not_stop_other_sites_resends(
    mosquitto: Mosquitto,
) -> None:
    listener = Listener(mosquitto, wire.subscription(wire.ASSIGN))
    host, port = mosquitto.url.removeprefix("mqtt://").split(":")
    with LinkProxy(host, int(port)) as proxy:
        bridge = CloudBridge(BridgeConfig(BrokerConnection(proxy.url), client_id="op-resend"))
        await bridge.start()
        try:
            await until(bridge.connected.is_set, 15, "the bridge to connect")
            proxy.cut()  # a broker outage, as the operator sees it
            await until(lambda: not bridge.connected.is_set(), 15, "the bridge to see the cut")
            # Made during the outage: a placement that is a wildcard, then real sites'.
            with contextlib.suppress(ValueError):  # refused up front, or kept for re-sending
                bridge.assign("+", assignment("wild"))
            for site in ("north-1", "south-2"):
                assert bridge.assign(site, assignment(f"uid-{site}")) is False  # link down
            proxy.restore()
            await until(
                lambda: (
                    {wire.topic(s, wire.ASSIGN) for s in ("north-1", "south-2")}
                    <= set(listener.topics())
                ),
                15,
                "both real sites' assignments re-sent after the outage",
            )
            # And the bridge goes on sending afterwards.
            assert bridge.assign("west-3", assignment("uid-west"))
            await until(
                lambda: wire.topic("west-3", wire.ASSIGN) in listener.topics(), 10, "a new send"
            )
            assert not any("+" in t.split("/") for t in listener.topics())
        finally:
            await bridge.stop()
            listener.close()


async def test_a_second_client_with_the_operators_client_id_is_reported_loudly(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    states: list[bool] = []
    link = MqttLink(
        LinkConfig(
            BrokerConnection(mosquitto.url), client_id="tideflow-operator-shared", mqtt5=True
        ),
        loop,
        on_message=lambda _t, _d: None,
        on_state=states.append,
    )
    caplog.set_level(logging.WARNING, logger="tideflow.mqtt")
    link.start()
    try:
        await until(lambda: states and states[-1], 15, "the link to connect")
        # Another process connects under the same client id.
        intruder = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="tideflow-operator-shared",
            protocol=mqtt.MQTTv5,
        )
        host, port = mosquitto.url.removeprefix("mqtt://").split(":")
        intruder.connect(host, int(port))
        intruder.loop_start()
        try:
            await until(
                lambda: any(
                    r.levelno == logging.WARNING and "SESSION TAKEN OVER" in r.getMessage()
                    for r in caplog.records
                ),
                15,
                "a warning that the session was taken over",
            )
        finally:
            intruder.loop_stop()
            intruder.disconnect()
    finally:
        await loop.run_in_executor(None, link.stop)


async def test_a_retained_state_is_not_taken_for_presence_or_the_database_epoch(
    mosquitto: Mosquitto,
) -> None:
    # A retained copy can be stale: a clustered broker keeps one per node
    # (RabbitMQ), and whichever node the operator lands on hands out its own.
    # Here the broker holds a retained "online" of an old database; only live
    # messages may move presence and the epoch (docs/decisions/0012).
    site = "site-r"
    host, port = mosquitto.url.removeprefix("mqtt://").split(":")
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fake-site")
    publisher.connect(host, int(port))
    publisher.loop_start()
    try:
        stale = wire.StatePayload(online=True, epoch="old-database")
        message = wire.encode(wire.KIND_STATE, site, stale)
        publisher.publish(wire.topic(site, wire.STATE), message, 1, retain=True).wait_for_publish(5)
        bridge = CloudBridge(
            BridgeConfig(BrokerConnection(mosquitto.url), client_id="retained-test")
        )
        await bridge.start()
        try:
            await until(bridge.connected.is_set, 10, "the bridge to connect")
            # A live message of another site shows the bridge is listening.
            probe = wire.encode(wire.KIND_STATE, "probe", wire.StatePayload(online=True))
            publisher.publish(wire.topic("probe", wire.STATE), probe, 1).wait_for_publish(5)
            await until(lambda: bridge.presence.connected("probe"), 10, "the live probe")
            assert not bridge.presence.connected(site), "a retained copy made the site online"
            assert bridge.applier.epoch(site) is None, "a retained copy set the database epoch"
            live = wire.encode(wire.KIND_STATE, site, wire.StatePayload(online=True, epoch="new"))
            publisher.publish(wire.topic(site, wire.STATE), live, 1).wait_for_publish(5)
            await until(lambda: bridge.presence.connected(site), 10, "the live state")
            assert bridge.applier.epoch(site) == "new"
        finally:
            await bridge.stop()
    finally:
        publisher.loop_stop()
        publisher.disconnect()
