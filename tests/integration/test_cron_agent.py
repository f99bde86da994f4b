"""CronWorkflow schedules at a real agent process, through a real Mosquitto.

A test client stands in for the cloud: it sends the schedule on the site's
``assign`` topic, acks what the site sends, and keeps every record.  Proves:

* an ``@every 2s`` schedule keeps firing while the broker is down, and across
  a kill -9 of the agent while offline (the next agent, still offline, goes
  on from the same database);
* a kill -9 exactly between a run's commit and the schedule's high-water
  mark (fail point ``cron-fired``) does not fire that time again;
* after the link returns, the cloud has received each scheduled time under
  exactly one run identity, the same set the site's database holds;
* ``Forbid`` never overlaps a slow run; a ``withdraw`` stops the firing.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from services.agent import AgentProcess, wait_for
from services.broker import Mosquitto

from tideflow import wire

pytestmark = pytest.mark.broker

SITE = "line-2"
SCHEDULE_UID = "cwf-0001"


class Cloud:
    """Sends schedules, acks every contiguous record, keeps what it received."""

    def __init__(self, broker: Mosquitto) -> None:
        self.records: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._acked = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"cloud-{uuid.uuid4()}")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(wire.topic(SITE, wire.EVENTS), 1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        body = json.loads(message.payload)
        if body.get("kind") != wire.KIND_EVENTS:
            return
        with self._lock:
            for record in body["payload"]["records"]:
                self.records.setdefault(record["seq"], record)
            through = self._acked
            while through + 1 in self.records:
                through += 1
            self._acked = through
        ack = wire.AckPayload(through=through, epoch=body["payload"].get("epoch"))
        self.client.publish(wire.topic(SITE, wire.ACKS), wire.encode(wire.KIND_ACK, SITE, ack), 1)

    def schedule(self, spec: dict[str, Any], *, action: str = "put", generation: int = 1) -> None:
        body = wire.SchedulePayload(
            action=action,  # type: ignore[arg-type]
            uid=SCHEDULE_UID,
            generation=generation,
            namespace="plant-7",
            name="etl",
            spec=spec if action == "put" else None,
        )
        info = self.client.publish(
            wire.topic(SITE, wire.ASSIGN), wire.encode(wire.KIND_SCHEDULE, SITE, body), 1
        )
        info.wait_for_publish(10)

    def deliver(self, spec: dict[str, Any], *, action: str = "put", state: str = "Held") -> None:
        """Send until the site confirms (as the operator does: re-send until confirmed)."""
        sent = [0.0]

        def confirmed() -> bool:
            if any(r["state"] == state for r in self.of_kind(wire.SCHEDULE_RECORD)):
                return True
            if time.monotonic() - sent[0] > 1.0 and self.client.is_connected():
                self.schedule(spec, action=action)
                sent[0] = time.monotonic()
            return False

        wait_for(confirmed, 30, f"the site to confirm the schedule {state}")

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r["body"] for _, r in sorted(self.records.items()) if r["kind"] == kind]

    def fired(self) -> dict[float, set[str]]:
        """scheduled time -> run uids the cloud heard of for it."""
        out: dict[float, set[str]] = {}
        for body in self.of_kind(wire.RUN_RECORD):
            cron = body.get("cron")
            if cron and cron["uid"] == SCHEDULE_UID:
                out.setdefault(cron["scheduledTime"], set()).add(body["uid"])
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def site_fired(db: Path) -> list[tuple[float, str, str]]:
    """(scheduled time, run uid, phase) of every run the site's schedule fired."""
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute(
            "SELECT scheduled_at, uid, phase FROM runs WHERE schedule_uid=? ORDER BY scheduled_at",
            (SCHEDULE_UID,),
        ).fetchall()
        return [(float(t), str(u), str(p)) for t, u, p in rows]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def every(seconds: int, **extra: Any) -> dict[str, Any]:
    return {
        "schedule": f"@every {seconds}s",
        "placement": {"site": SITE},
        "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]},
        **extra,
    }


@pytest.fixture
def cloud(mosquitto: Mosquitto) -> Iterator[Cloud]:
    c = Cloud(mosquitto)
    yield c
    c.close()


def test_every_2s_fires_offline_and_across_kill_9_and_syncs_each_time_once(
    mosquitto: Mosquitto, cloud: Cloud, tmp_path: Path
) -> None:
    db = tmp_path / "site.db"
    agent = AgentProcess(SITE, mosquitto.url, db)
    with agent:
        cloud.deliver(every(2))
        wait_for(lambda: len(site_fired(db)) >= 1, 20, "a first fire online")

        mosquitto.stop()  # the link is down from here
        online = len(site_fired(db))
        wait_for(lambda: len(site_fired(db)) >= online + 2, 20, "fires while offline")
        agent.kill()  # kill -9 while offline
        before_restart = len(site_fired(db))
        agent.start()  # still offline
        wait_for(
            lambda: len(site_fired(db)) >= before_restart + 2,
            20,
            f"fires after the restart, offline\n{agent.log_tail()}",
        )
        # A kill -9 between a run's commit and the high-water mark: the next fire.
        agent.kill()
        agent.start(failpoints="cron-fired")
        wait_for(lambda: not agent.alive, 20, "the agent killed at the cron-fired fail point")
        at_crash = site_fired(db)
        agent.start()
        wait_for(lambda: len(site_fired(db)) >= len(at_crash) + 2, 20, "fires after the crash")

        mosquitto.start()  # the link returns
        # Withdrawn, the schedule fires no more: what the site holds from here is final,
        # and every time in it must reach the cloud (a fire between a snapshot and the
        # stop would otherwise be one the cloud had no time to hear of).
        cloud.deliver({}, action="withdraw", state="Withdrawn")
        wait_for(
            lambda: set(cloud.fired()) >= {t for t, _, _ in site_fired(db)},
            30,
            f"every fired run reported to the cloud\n{agent.log_tail()}",
        )
        agent.terminate()

    site = site_fired(db)
    times = [t for t, _, _ in site]
    assert len(times) == len(set(times)), "a scheduled time fired twice at the site"
    assert all(t % 2 == 0 for t in times)
    # The time fired just before the crash was not fired again after it.
    assert at_crash[-1][0] in times and times.count(at_crash[-1][0]) == 1
    # The cloud holds each scheduled time under exactly one run identity, the site's.
    heard = cloud.fired()
    assert {t: {u} for t, u, _ in site} == {t: heard[t] for t, _, _ in site}
    assert set(heard) == set(times)
    assert all(phase == "Succeeded" for _, _, phase in site[:-1])


def test_forbid_never_overlaps_and_withdraw_stops_firing(
    mosquitto: Mosquitto, cloud: Cloud, tmp_path: Path
) -> None:
    db = tmp_path / "site.db"
    marks = tmp_path / "marks"
    script = (
        f'echo "start $(date +%s.%N)" >> {marks}; sleep 3; echo "end $(date +%s.%N)" >> {marks}'
    )
    spec = every(1, concurrencyPolicy="Forbid")
    spec["workflowSpec"] = {"tasks": [{"name": "slow", "script": script}]}
    with AgentProcess(SITE, mosquitto.url, db) as agent:
        cloud.deliver(spec)
        wait_for(
            lambda: len([r for r in site_fired(db) if r[2] == "Succeeded"]) >= 2,
            40,
            f"two slow runs finished\n{agent.log_tail()}",
        )
        cloud.deliver({}, action="withdraw", state="Withdrawn")
        count = len(site_fired(db))
        # Nothing fires after the withdrawal: let three scheduled times pass on the clock.
        withdrawn_at = time.time()
        wait_for(lambda: time.time() > withdrawn_at + 3.5, 10, "three scheduled times")
        assert len(site_fired(db)) == count
    events = [line.split() for line in marks.read_text().splitlines()]
    running = peak = 0
    for kind, _ in sorted(events, key=lambda e: float(e[1])):
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 1
    held = [r for r in cloud.of_kind(wire.SCHEDULE_RECORD) if r["state"] == "Held"]
    assert held and max(r["missedCount"] for r in held) >= 1  # skipped while one ran


def test_replace_cancels_the_previous_run(
    mosquitto: Mosquitto, cloud: Cloud, tmp_path: Path
) -> None:
    db = tmp_path / "site.db"
    spec = every(2, concurrencyPolicy="Replace")
    spec["workflowSpec"] = {"tasks": [{"name": "slow", "command": ["sleep", "60"]}]}
    with AgentProcess(SITE, mosquitto.url, db) as agent:
        cloud.deliver(spec)
        wait_for(lambda: len(site_fired(db)) >= 3, 30, f"three fires\n{agent.log_tail()}")
        runs = site_fired(db)
        # Every run but the newest was cancelled by its successor; one is live.
        wait_for(
            lambda: [p for _, _, p in site_fired(db)[:2]] == ["Cancelled", "Cancelled"],
            30,
            "the replaced runs cancelled",
        )
        # (a cancel takes effect a moment after its successor is created: wait for it)
        wait_for(
            lambda: [r[2] for r in site_fired(db)].count("Cancelled") == len(site_fired(db)) - 1,
            30,
            "exactly one live run",
        )
        # The cloud hears of the cancellations like any run's.
        first_uid = runs[0][1]
        wait_for(
            lambda: any(
                b["uid"] == first_uid and b["phase"] == "Cancelled"
                for b in cloud.of_kind(wire.RUN_RECORD)
            ),
            30,
            "the cancellation reported",
        )
        cloud.deliver({}, action="withdraw", state="Withdrawn")
