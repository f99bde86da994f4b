"""The MQTT link's socket belongs to its own thread, with a real Mosquitto.

paho, driven by ``loop()`` from a thread it does not know of, wrote a publish
to the socket in the publishing thread itself (the event loop's), beside the
link thread reading and writing the same socket.  On a TLS link that is two
threads inside one OpenSSL connection at once; a CI run died of it with
"Fatal Python error: Aborted" in ``ssl._real_close`` (the link thread closing
the socket while the other wrote).  Proves: every write to the socket happens
on the link thread, whoever publishes; a stop still says DISCONNECT to the
broker (the last will is not sent), and publishes queued before it are delivered.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from services.broker import Mosquitto

from tideflow.mqtt import BrokerConnection, LinkConfig, MqttLink

pytestmark = pytest.mark.broker


def _watcher(mosquitto: Mosquitto, topic: str) -> tuple[mqtt.Client, list[bytes]]:
    seen: list[bytes] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4()}")
    client.on_message = lambda _c, _u, m: seen.append(m.payload)
    client.connect(mosquitto.host, mosquitto.port)
    client.subscribe(topic, 1)
    client.loop_start()
    return client, seen


async def _until(check: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_every_socket_write_is_on_the_link_thread_whoever_publishes(
    mosquitto: Mosquitto,
) -> None:
    loop = asyncio.get_running_loop()
    config = LinkConfig(BrokerConnection(mosquitto.url), client_id=f"link-{uuid.uuid4()}")
    link = MqttLink(config, loop, lambda _t, _p: None, lambda _up: None)
    writers: set[str] = set()
    send = link.client._sock_send

    def recording_send(data: bytes) -> int:
        writers.add(threading.current_thread().name)
        return send(data)

    link.client._sock_send = recording_send  # type: ignore[method-assign]
    watcher, seen = _watcher(mosquitto, "t/#")
    link.start()
    try:
        await _until(lambda: link.connected, 10, "the link to connect")
        for index in range(200):  # from this thread, the event loop's
            assert link.publish(f"t/{index % 3}", b"x" * 2000)
        await _until(lambda: len(seen) == 200, 10, "every publish delivered")
        assert writers == {"mqtt-link"}, f"the socket was written from {writers}"
    finally:
        link.stop()
        watcher.loop_stop()
        watcher.disconnect()


async def test_a_stop_disconnects_cleanly_after_delivering_what_was_queued(
    mosquitto: Mosquitto,
) -> None:
    loop = asyncio.get_running_loop()
    config = LinkConfig(
        BrokerConnection(mosquitto.url),
        client_id=f"link-{uuid.uuid4()}",
        will_topic="will/site",
        will_payload=b"gone",
    )
    link = MqttLink(config, loop, lambda _t, _p: None, lambda _up: None)
    watcher, seen = _watcher(mosquitto, "#")
    link.start()
    try:
        await _until(lambda: link.connected, 10, "the link to connect")
        final = [("final/site", b"bye", False)]
        link.stop(final)
        await _until(lambda: b"bye" in seen, 5, "the final message")
        await asyncio.sleep(0.5)
        assert b"gone" not in seen, "a stop sent the last will: no DISCONNECT reached the broker"
        assert link._thread is not None and not link._thread.is_alive()
    finally:
        watcher.loop_stop()
        watcher.disconnect()
