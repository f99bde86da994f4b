"""The cloud bridge under records a site should not send, through a real Mosquitto.

A test client plays the site: it publishes ``events`` batches and reads the
``acks`` the bridge sends back.  Proves, end to end through the broker: a seq
far beyond the mark is dropped and logged, not held, and the ack asks for no
resend because of it; a finished run does not go back to Running; 10,000
records for Workflows the cloud does not know keep no view and are all
acknowledged; and when the site reports a new database (epoch), the
assignments of its unfinished runs are sent to it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from services.broker import Mosquitto

from tideflow import wire
from tideflow.mqtt import BrokerConnection
from tideflow_operator.applier import Discard, EpochChange
from tideflow_operator.bridge import BridgeConfig, CloudBridge

SITE = "rogue"


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


class FakeSite:
    """A paho client on the site's topics: publishes events, collects acks."""

    def __init__(self, broker: Mosquitto) -> None:
        self.acks: queue.Queue[wire.AckPayload] = queue.Queue()
        self.assigned: queue.Queue[wire.AssignPayload] = queue.Queue()
        self.latest: wire.AckPayload | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"site-{uuid.uuid4()}")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(wire.topic(SITE, wire.ACKS), qos=1)
        self.client.subscribe(wire.topic(SITE, wire.ASSIGN), qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        _, payload = wire.decode(message.topic, message.payload)
        if isinstance(payload, wire.AssignPayload):
            self.assigned.put(payload)
        else:
            assert isinstance(payload, wire.AckPayload)
            self.acks.put(payload)

    def send(self, rows: list[tuple[int, str, dict[str, Any]]], epoch: str | None = None) -> None:
        data = wire.encode_events(
            SITE, [(seq, kind, json.dumps(body)) for seq, kind, body in rows], epoch=epoch
        )
        self.client.publish(wire.topic(SITE, wire.EVENTS), data, qos=1).wait_for_publish(10)

    def online(self, epoch: str) -> None:
        state = wire.StatePayload(online=True, epoch=epoch)
        data = wire.encode(wire.KIND_STATE, SITE, state)
        self.client.publish(wire.topic(SITE, wire.STATE), data, qos=1).wait_for_publish(10)

    def assignments(self) -> list[str]:
        uids = []
        while not self.assigned.empty():
            uids.append(self.assigned.get_nowait().uid)
        return uids

    def ack_reaching(
        self, through: int, epoch: str | None = None
    ) -> Callable[[], wire.AckPayload | None]:
        def check() -> wire.AckPayload | None:
            while not self.acks.empty():
                self.latest = self.acks.get_nowait()
            latest = self.latest
            if latest is not None and latest.through >= through:
                return latest if epoch is None or latest.epoch == epoch else None
            return None

        return check

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
async def bridge(mosquitto: Mosquitto) -> AsyncIterator[CloudBridge]:
    cloud = CloudBridge(BridgeConfig(BrokerConnection(mosquitto.url), client_id="cloud-under-test"))
    await cloud.start()
    await until(cloud.connected.is_set, 10, "the bridge to connect")
    yield cloud
    await cloud.stop()


@pytest.fixture
def site(mosquitto: Mosquitto) -> Iterator[FakeSite]:
    fake = FakeSite(mosquitto)
    yield fake
    fake.close()


def _run(name: str, uid: str, phase: str) -> dict[str, Any]:
    return {"uid": uid, "generation": 1, "namespace": "default", "name": name, "phase": phase}


async def test_far_ahead_regressions_and_unknown_workflows_through_the_broker(
    bridge: CloudBridge, site: FakeSite, caplog: pytest.LogCaptureFixture
) -> None:
    uid = str(uuid.uuid4())
    bridge.applier.expect("default", "mine", uid, 1, ["a"], site=SITE)
    baseline = len(bridge.applier.views())

    with caplog.at_level(logging.INFO, logger="tideflow_operator.applier"):
        # A forged seq far ahead: dropped and logged, not held, no gap claimed.
        site.send([(1_000_000, "run", _run("mine", uid, "Succeeded"))])
        await until(lambda: bridge.applier.discarded[Discard.BEYOND_WINDOW] == 1, 10, "the drop")
        assert bridge.applier.held(SITE) == 0
        assert any("1000000" in r.getMessage() for r in caplog.records)

        # Succeeded, then Running: the finished run stays finished.
        site.send(
            [(1, "run", _run("mine", uid, "Succeeded")), (2, "run", _run("mine", uid, "Running"))]
        )
        ack = await until(site.ack_reaching(2), 10, "the ack of seq 2")
        assert not ack.resend
        view = bridge.applier.view("default", "mine")
        assert view is not None and view.phase == "Succeeded"
        assert bridge.applier.discarded[Discard.FINAL] == 1

        # 10,000 records for Workflows the cloud does not know: all acked, no view kept.
        seq = 2
        for _ in range(10):
            rows = []
            for _ in range(1000):
                seq += 1
                rows.append((seq, "run", _run(f"gone-{seq}", f"uid-{seq}", "Running")))
            site.send(rows)
        ack = await until(site.ack_reaching(seq), 30, f"the ack of seq {seq}")
    assert (ack.through, ack.resend) == (10_002, False)
    assert len(bridge.applier.views()) == baseline
    assert bridge.applier.discarded[Discard.UNKNOWN] == 10_000
    unknown_lines = [r for r in caplog.records if "unknown" in r.getMessage()]
    assert 0 < len(unknown_lines) <= 10  # one line per batch, not per record


async def test_a_new_database_gets_the_sites_unfinished_assignments_again(
    bridge: CloudBridge, site: FakeSite
) -> None:
    changes: list[EpochChange] = []

    async def on_epoch(change: EpochChange) -> None:
        changes.append(change)

    bridge.on_epoch = on_epoch
    live, done = str(uuid.uuid4()), str(uuid.uuid4())
    for name, uid in (("live", live), ("done", done)):
        bridge.applier.expect("default", name, uid, 1, ["a"], site=SITE)
        spec = {"tasks": [{"name": "a", "command": ["true"]}]}
        bridge.assign(
            SITE,
            wire.AssignPayload(uid=uid, generation=1, namespace="default", name=name, spec=spec),
        )
    site.online("db-one")
    site.send(
        [(1, "run", _run("live", live, "Running")), (2, "run", _run("done", done, "Succeeded"))],
        epoch="db-one",
    )
    ack = await until(site.ack_reaching(2), 10, "the ack of the first database")
    assert ack.epoch == "db-one"
    assert bridge.outstanding(SITE) == ([], [])  # both proved held: no more re-sends
    site.assignments()

    site.online("db-two")  # the agent restarted on a new, empty database
    await until(lambda: changes, 10, "the epoch change")
    assert changes == [EpochChange(SITE, "db-one", "db-two", [("default", "live")])]
    resent: list[str] = []
    await until(lambda: resent.extend(site.assignments()) or live in resent, 10, "the re-send")
    assert done not in resent
    assert bridge.outstanding(SITE)[0] == [(live, 1)]
    # Its seq 1 is new, not a duplicate of the old database's seq 1.
    site.send([(1, "run", _run("live", live, "Running"))], epoch="db-two")
    ack = await until(site.ack_reaching(1, epoch="db-two"), 10, "the new database's ack")
    assert ack.through == 1 and bridge.applier.applied_through(SITE) == 1
