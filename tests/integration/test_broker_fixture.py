"""The broker fixtures give us the Mosquitto behaviour Tideflow is designed around.

These tests pin what the rest of the suite and the design take for granted:

* a QoS 1 message published while a persistent-session client is offline is
  delivered when it reconnects — also after the broker was stopped and started
  again, and after a SIGKILL once the message is in the persistence database;
* with the secure broker, a site's credentials confine it to its own topics:
  site A can neither write into site B's topics nor read them, can report its
  own events to the operator, and a wrong password is refused;
* each site's credentials connect with its agent's client id only, so no
  other site can take its session (the operator's are free), and a broker
  whose client-id bindings did not load does not start.

Everything runs on loopback with bounded waits.
"""

from __future__ import annotations

import contextlib
import json
import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode
from services.broker import BrokerError, Mosquitto

from tideflow import wire

pytestmark = pytest.mark.broker

WAIT = 5.0  # seconds to wait for something that should happen
QUIET = 0.7  # seconds to watch for something that must not happen


class Probe:
    """A paho client run on its own thread, recording what arrives in queues."""

    def __init__(
        self,
        broker: Mosquitto,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = False,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
            # Acked by expect(), from the test's thread: a PUBACK the network thread
            # sent only once on_message returned could follow close()'s DISCONNECT,
            # and the broker would deliver that message again after a restart.
            manual_ack=True,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.messages: queue.Queue[tuple[str, bytes, int, int]] = queue.Queue()
        self._connacks: queue.Queue[tuple[ReasonCode, bool]] = queue.Queue()
        self._subacks: queue.Queue[tuple[int, list[ReasonCode]]] = queue.Queue()
        self._disconnected: queue.Queue[ReasonCode] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self._looping = False

    def _on_connect(self, _c: mqtt.Client, _u: Any, flags: Any, rc: ReasonCode, _p: Any) -> None:
        self._connacks.put((rc, bool(flags.session_present)))

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any
    ) -> None:
        self._subacks.put((mid, rcs))

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put((msg.topic, msg.payload, msg.mid, msg.qos))

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self._disconnected.put(rc)

    def connect(self) -> tuple[ReasonCode, bool]:
        """Connect and return (CONNACK reason, session present); a refusal is not retried."""
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        self._looping = True
        rc, present = self._connacks.get(timeout=WAIT)
        if rc.is_failure:
            self.close()
        return rc, present

    def connected(self) -> bool:
        """Connect and require success; returns whether the broker had a session."""
        rc, present = self.connect()
        assert not rc.is_failure, f"{self.client_id!r} refused: {rc}"
        return present

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        got_mid, rcs = self._subacks.get(timeout=WAIT)
        assert got_mid == mid and all(rc.value <= 1 for rc in rcs), (topic, rcs)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def expect(self, count: int) -> list[tuple[str, bytes]]:
        """The next ``count`` messages, each acknowledged before this returns."""
        got = []
        try:
            for _ in range(count):
                topic, payload, mid, qos = self.messages.get(timeout=WAIT)
                self.client.ack(mid, qos)
                got.append((topic, payload))
        except queue.Empty:
            pytest.fail(f"expected {count} messages within {WAIT}s, got {got}")
        return got

    def expect_nothing(self, within: float = QUIET) -> None:
        try:
            unexpected = self.messages.get(timeout=within)[:2]
        except queue.Empty:
            return
        pytest.fail(f"received {unexpected} but should not have")

    def close(self) -> None:
        """Disconnect cleanly (a persistent session stays on the broker) and stop the loop."""
        if not self._looping:
            return
        if self.client.is_connected():
            self.client.disconnect()
            with contextlib.suppress(queue.Empty):
                self._disconnected.get(timeout=WAIT)
        self.client.loop_stop()
        self._looping = False


@pytest.fixture
def probes() -> Iterator[Callable[..., Probe]]:
    made: list[Probe] = []

    def make(broker: Mosquitto, client_id: str, **kwargs: Any) -> Probe:
        probe = Probe(broker, client_id, **kwargs)
        made.append(probe)
        return probe

    yield make
    for probe in made:
        probe.close()


ASSIGN_A = wire.topic("a", wire.ASSIGN)


def test_offline_persistent_session_gets_queued_qos1_across_broker_restart(
    mosquitto: Mosquitto, probes: Callable[..., Probe]
) -> None:
    site = probes(mosquitto, "edge-a")
    assert site.connected() is False
    site.subscribe(ASSIGN_A)
    site.close()

    cloud = probes(mosquitto, "cloud", clean_session=True)
    cloud.connected()
    cloud.publish(ASSIGN_A, b"one")
    cloud.publish(ASSIGN_A, b"two")

    site = probes(mosquitto, "edge-a")
    assert site.connected() is True, "the persistent session was lost"
    assert site.expect(2) == [(ASSIGN_A, b"one"), (ASSIGN_A, b"two")]
    site.close()

    cloud.publish(ASSIGN_A, b"three")
    cloud.close()
    port = mosquitto.port
    mosquitto.stop()
    assert not mosquitto.running
    mosquitto.start()
    assert mosquitto.port == port and mosquitto.url == f"mqtt://127.0.0.1:{port}"

    site = probes(mosquitto, "edge-a")
    assert site.connected() is True, "the session did not survive the restart"
    assert site.expect(1) == [(ASSIGN_A, b"three")]
    site.expect_nothing()


def test_queued_message_survives_sigkill_once_saved(
    mosquitto_factory: Callable[..., Mosquitto], probes: Callable[..., Probe]
) -> None:
    broker = mosquitto_factory(autosave_on_changes=True, autosave_interval=1)
    site = probes(broker, "edge-a")
    site.connected()
    site.subscribe(ASSIGN_A)
    site.close()

    cloud = probes(broker, "cloud", clean_session=True)
    cloud.connected()
    cloud.publish(ASSIGN_A, b"survives-sigkill")
    broker.wait_persisted(b"survives-sigkill")
    broker.kill()
    broker.start()

    site = probes(broker, "edge-a")
    assert site.connected() is True
    assert site.expect(1) == [(ASSIGN_A, b"survives-sigkill")]


def _login(broker: Mosquitto, probes: Callable[..., Probe], user: str) -> Probe:
    # A site's user may connect with its agent's client id only (decision 0015).
    client_id = broker.client_id_of(user) or f"{user}-client"
    probe = probes(broker, client_id, username=user, password=broker.users[user])
    probe.connected()
    return probe


def test_site_credentials_confine_a_site_to_its_own_topics(
    secure_mosquitto: Mosquitto, probes: Callable[..., Probe]
) -> None:
    broker = secure_mosquitto
    operator = _login(broker, probes, "operator")
    operator.subscribe(f"{wire.TOPIC_ROOT}/#")
    site_b = _login(broker, probes, "site-b")
    for channel in (wire.ASSIGN, wire.CONTROL, wire.ACKS):
        site_b.subscribe(wire.topic("b", channel))
    site_a = _login(broker, probes, "site-a")
    site_a.subscribe(wire.topic("a", wire.ASSIGN))
    # Mosquitto 2.0 grants these subscriptions but checks read access per message.
    site_a.subscribe(wire.topic("b", wire.ASSIGN))
    site_a.subscribe(f"{wire.TOPIC_ROOT}/#")

    # A writing into B's topics: the broker acks and drops every one of them.
    for channel in wire.CHANNELS:
        site_a.publish(wire.topic("b", channel), b"forged-by-a")
    # A's own events reach the operator (after anything A sent before them).
    site_a.publish(wire.topic("a", wire.EVENTS), b"a-events")
    assert operator.expect(1) == [(wire.topic("a", wire.EVENTS), b"a-events")]
    operator.expect_nothing()
    site_b.expect_nothing()

    # The operator writes to B's and A's assign: B and A each see only their own.
    operator.publish(wire.topic("b", wire.ASSIGN), b"for-b")
    operator.publish(ASSIGN_A, b"for-a")
    assert site_b.expect(1) == [(wire.topic("b", wire.ASSIGN), b"for-b")]
    assert site_a.expect(1) == [(ASSIGN_A, b"for-a")]
    site_a.expect_nothing()
    operator.expect(2)  # its own two, through its wildcard


@pytest.mark.parametrize(
    ("user", "password"),
    [("site-a", "wrong"), ("operator", "site-a-pw"), ("nobody", "x"), (None, None)],
)
def test_bad_credentials_are_refused(
    secure_mosquitto: Mosquitto,
    probes: Callable[..., Probe],
    user: str | None,
    password: str | None,
) -> None:
    probe = probes(secure_mosquitto, "intruder", username=user, password=password)
    rc, _ = probe.connect()
    assert rc.is_failure
    assert rc.getName() == "Not authorized"


def test_each_user_connects_with_its_own_client_id_only(
    secure_mosquitto: Mosquitto, probes: Callable[..., Probe]
) -> None:
    """Decision 0015: a site's credentials name one client id, its agent's; admins any."""
    broker = secure_mosquitto
    a_id = wire.agent_client_id("a")
    assert broker.client_id_of("site-a") == a_id and broker.client_id_of("operator") is None
    site_a = _login(broker, probes, "site-a")
    site_a.subscribe(ASSIGN_A)
    for user, client_id in [("site-b", a_id), ("site-a", wire.agent_client_id("b")),
                            ("site-a", "site-a-tool"), ("site-b", "site-b")]:  # fmt: skip
        rc, _ = probes(broker, client_id, username=user, password=broker.users[user]).connect()
        assert rc.getName() == "Not authorized", (user, client_id, rc)
    # The operator's processes each use an id of their own, a's among them if it wants.
    for client_id in ("tideflow-operator-0-1", "tideflow-operator-1-7"):
        operator = probes(broker, client_id, username="operator", password=broker.users["operator"])
        operator.connected()
    operator.publish(ASSIGN_A, b"for-a")
    assert site_a.expect(1) == [(ASSIGN_A, b"for-a")], "site a lost its session"
    # Nobody rewrites the bindings through the plugin's control topic.
    command = {"commands": [{"command": "modifyClient", "username": "site-b", "clientid": a_id}]}
    site_b = _login(broker, probes, "site-b")
    site_b.publish("$CONTROL/dynamic-security/v1", json.dumps(command).encode())
    operator.publish("$CONTROL/dynamic-security/v1", json.dumps(command).encode())
    rc, _ = probes(broker, a_id, username="site-b", password=broker.users["site-b"]).connect()
    assert rc.getName() == "Not authorized"
    site_a.expect_nothing()


def test_a_broker_whose_bindings_did_not_load_does_not_start(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    """Mosquitto carries on without a plugin file it cannot read, binding nothing: fail closed."""

    class Unreadable(Mosquitto):
        def _write_client_ids(self) -> None:
            super()._write_client_ids()
            self.dynsec_path.write_text("{not json")

    broker = Unreadable(workdir=tmp_path / "b", users={"site-a": "pw"}, acl_sites={"site-a": "a"})
    try:
        with pytest.raises(BrokerError, match="client-id bindings did not load"):
            broker.start()
        assert not broker.running
    finally:
        broker.close()
