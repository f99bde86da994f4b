"""The site daemon (``tideflow-agent run``) against a full disk and a hostile cloud.

Real agent processes, a real Mosquitto, and a test client standing in for the
cloud.  Proves:

* a full disk stops the daemon: exit 4, the cause in its log, its retained
  state says offline, and what was committed is intact — it never keeps
  heartbeating "online" with a run stuck half-way; with space freed, the
  next daemon finishes the run;
* a corrupt database is refused with exit 3 and left byte-for-byte as it
  was, though the daemon checks it behind its start (decision 0024);
* an ack beyond the highest seq the agent ever sent is refused (one log line,
  the dropped-messages metric) and deletes nothing; a true ack still compacts;
* cancels for runs the site has never seen leave a bounded number of
  markers, and a marker is consumed when its assignment arrives;
* the dropped-messages metric only ever carries labels from the fixed set of
  reasons, whatever the messages say; a deeply nested JSON message is dropped
  with one log line, no traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from services.agent import AgentProcess, agent_truth, read_only, wait_for
from services.broker import Mosquitto
from services.metrics import metered, scrape

from edge_agent.state import RunState, TaskState
from edge_agent.store import CANCEL_MARKERS_MAX, Store
from tideflow import wire

SITE = "line-2"
DROPPED = "tideflow_agent_dropped_messages_total"


class FakeCloud:
    """A plain paho client: publishes to the site, records what the site sends."""

    def __init__(self, broker: Mosquitto, site: str = SITE) -> None:
        self.site = site
        self.events: list[dict[str, Any]] = []
        self.states: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"fake-cloud-{uuid.uuid4()}"
        )
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(wire.topic(site, wire.EVENTS), 1)
        self.client.subscribe(wire.topic(site, wire.STATE), 1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        body = json.loads(message.payload)
        with self._lock:
            if message.topic.endswith("/events"):
                self.events.append(body)
            else:
                self.states.append(body)

    def max_seq_seen(self) -> int:
        with self._lock:
            seqs = [
                r["seq"]
                for e in self.events
                if e["kind"] == "events"
                for r in e["payload"]["records"]
            ]
        return max(seqs, default=0)

    def publish(self, channel: str, payload: bytes) -> None:
        self.client.publish(wire.topic(self.site, channel), payload, 1).wait_for_publish(10)

    def assign(self, spec: dict[str, Any], uid: str | None = None, name: str = "wf") -> str:
        uid = uid or str(uuid.uuid4())
        body = wire.AssignPayload(uid=uid, generation=1, namespace="default", name=name, spec=spec)
        self.publish(wire.ASSIGN, wire.encode(wire.KIND_ASSIGN, self.site, body))
        return uid

    def cancel(self, uid: str) -> None:
        body = wire.ControlPayload(action="cancel", uid=uid, reason="stop")
        self.publish(wire.CONTROL, wire.encode(wire.KIND_CONTROL, self.site, body))

    def ack(self, through: int) -> None:
        body = wire.AckPayload(through=through)
        self.publish(wire.ACKS, wire.encode(wire.KIND_ACK, self.site, body))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def cloud(mosquitto: Mosquitto) -> Iterator[FakeCloud]:
    fake = FakeCloud(mosquitto)
    yield fake
    fake.close()


def retained_state(broker: Mosquitto, site: str = SITE) -> dict[str, Any]:
    got: list[dict[str, Any]] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"peek-{uuid.uuid4()}")
    client.on_message = lambda _c, _u, m: got.append(json.loads(m.payload))
    client.connect(broker.host, broker.port)
    client.subscribe(wire.topic(site, wire.STATE), 1)
    client.loop_start()
    try:
        wait_for(lambda: got, 10, "the retained state message")
    finally:
        client.loop_stop()
        client.disconnect()
    return got[-1]


def outbox_depth(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])


def cancel_markers(db: Path) -> set[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute("SELECT key FROM meta WHERE key LIKE 'cancelled:%'").fetchall()
    return {row[0].removeprefix("cancelled:") for row in rows}


def run_phase(db: Path, uid: str) -> str | None:
    run = agent_truth(db)["runs"].get(f"{uid}.1")
    return None if run is None else str(run["phase"])


def dropped(port: int) -> dict[str, float]:
    return {
        key[len(DROPPED) + len("{reason=") : -1]: value
        for key, value in scrape(port).items()
        if key.startswith(DROPPED + "{")
    }


# ------------------------------------------------------------------ full disk
def test_daemon_stops_with_exit_4_on_a_full_disk_then_resumes_when_space_is_freed(
    mosquitto: Mosquitto, cloud: FakeCloud, tmp_path: Path
) -> None:
    db = tmp_path / "small.db"
    # (180 KiB: 160 before migration 5 and incremental vacuum took 3 more schema pages,
    # migration 6 one more, the spans_by_run index's root, and migration 10 one more,
    # schedule_fires)
    agent = AgentProcess(SITE, mosquitto.url, db, "--db-max-bytes", str(180 * 1024))
    with agent:
        wait_for(lambda: cloud.states and cloud.states[-1]["payload"]["online"], 20, "online")
        noisy = "head -c 3000 /dev/urandom | base64"
        tasks = [{"name": "t0", "script": noisy}]
        tasks += [
            {"name": f"t{i}", "script": noisy, "dependsOn": [f"t{i - 1}"]} for i in range(1, 300)
        ]
        cloud.assign({"tasks": tasks})
        assert agent.proc is not None
        try:
            code = agent.proc.wait(60)
        except Exception:
            raise AssertionError(
                "the daemon kept running on a full disk:\n" + agent.log_tail()
            ) from None
        assert code == 4, agent.log_tail()
        log = agent.log_tail(200)
        assert "disk full" in log, log
        assert "Traceback" not in log, log
    assert retained_state(mosquitto)["payload"]["online"] is False
    with read_only(db) as conn:  # the WAL the stop left must reach the restart untouched
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        succeeded = conn.execute("SELECT count(*) FROM task_runs WHERE phase='Succeeded'")
        assert 0 < succeeded.fetchone()[0] < 300
    # Space freed (no cap): the next daemon resumes the run to the end.
    agent.extra = []
    with agent:
        wait_for(
            lambda: [r["phase"] for r in agent_truth(db)["runs"].values()] == ["Succeeded"],
            120,
            "the run to finish after space was freed",
        )


# ----------------------------------------------------------------- corruption
async def _backlog(db: Path, runs: int) -> None:
    store = await Store.open(db, synchronous="NORMAL")
    await store.set_meta("site", SITE)
    for i in range(runs):
        run = RunState(
            run_id=f"u{i}.1", uid=f"u{i}", generation=1, namespace="d", name=f"wf-{i}",
            spec_json="{}", created_at=1.0, phase="Succeeded",
        )  # fmt: skip
        assert await store.create_run(run, [TaskState(run.run_id, f"t{j}") for j in range(10)])
    await store.close()


def test_corrupt_database_is_refused_by_the_daemon_untouched(
    mosquitto: Mosquitto, cloud: FakeCloud, tmp_path: Path
) -> None:
    db = tmp_path / "site.db"
    asyncio.run(_backlog(db, 200))
    with sqlite3.connect(db) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name='runs_by_name'"
        ).fetchone()
    conn.close()
    with db.open("r+b") as handle:  # an index the drain never reads: found by the check only
        handle.seek((root - 1) * page_size)
        handle.write(random.Random(root).randbytes(page_size))
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    agent = AgentProcess(SITE, mosquitto.url, db)
    with agent:
        assert agent.proc is not None
        try:
            code = agent.proc.wait(60)
        except Exception:
            raise AssertionError(
                "the daemon ran on a corrupt database:\n" + agent.log_tail()
            ) from None
    assert code == 3, agent.log_tail()
    log = agent.log_tail(100)
    assert "corrupt" in log and "site.db" in log, log
    assert "Traceback" not in log, log
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest, "the database was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.db", "site.log"]


# ----------------------------------------------------------------------- acks
def test_ack_beyond_what_was_sent_is_refused_and_deletes_nothing(
    mosquitto: Mosquitto, cloud: FakeCloud, tmp_path: Path
) -> None:
    db = tmp_path / "a.db"
    with metered(SITE, mosquitto.url, db) as (agent, port):
        wait_for(lambda: cloud.states, 20, "the agent online")
        uid = cloud.assign({"tasks": [{"name": "a", "command": ["true"]}]})
        wait_for(lambda: run_phase(db, uid) == "Succeeded", 30, "the run to finish")
        wait_for(
            lambda: cloud.max_seq_seen() == agent_truth(db)["last_seq"], 30, "every record sent"
        )
        sent = cloud.max_seq_seen()
        depth = outbox_depth(db)
        assert depth == sent
        cloud.ack(sent + 1000)
        wait_for(lambda: dropped(port).get("ack-beyond-sent") == 1, 20, "the refusal counted")
        assert outbox_depth(db) == depth, "a refused ack deleted records"
        cloud.ack(sent - 1)  # a true ack still compacts
        wait_for(lambda: outbox_depth(db) == 1, 20, "the true ack to compact")
        assert "beyond" in agent.log_tail(100)
        assert agent.alive


# -------------------------------------------------------------------- cancels
def test_cancels_for_unknown_runs_leave_a_bounded_number_of_markers(
    mosquitto: Mosquitto, cloud: FakeCloud, tmp_path: Path
) -> None:
    db = tmp_path / "a.db"
    with AgentProcess(SITE, mosquitto.url, db) as agent:
        wait_for(lambda: cloud.states, 20, "the agent online")
        # A cancel that overtakes its assignment still cancels it on arrival...
        early = str(uuid.uuid4())
        cloud.cancel(early)
        wait_for(lambda: early in cancel_markers(db), 20, "the early cancel remembered")
        cloud.assign({"tasks": [{"name": "long", "command": ["sleep", "60"]}]}, uid=early)
        wait_for(lambda: run_phase(db, early) == "Cancelled", 30, "the late assignment cancelled")
        assert early not in cancel_markers(db), "a consumed marker is removed"
        # ...and a flood of cancels for runs that never come stays bounded.
        uids = [f"ghost-{i}" for i in range(3 * CANCEL_MARKERS_MAX)]
        for uid in uids:
            cloud.cancel(uid)
        wait_for(lambda: uids[-1] in cancel_markers(db), 120, "the last cancel handled")
        markers = cancel_markers(db)
        assert len(markers) <= CANCEL_MARKERS_MAX
        assert set(uids[-100:]) <= markers, "the newest markers are kept"
        assert agent.alive


# ------------------------------------------------------------- drop reasons
def test_dropped_message_labels_are_a_fixed_set_and_deep_json_drops_cleanly(
    mosquitto: Mosquitto, cloud: FakeCloud, tmp_path: Path
) -> None:
    db = tmp_path / "a.db"
    with metered(SITE, mosquitto.url, db) as (agent, port):
        wait_for(lambda: cloud.states, 20, "the agent online")
        junk: list[bytes] = []
        for i in range(60):
            envelope = {"v": 1, "kind": f"kind-{i}", "site": SITE, "payload": {}}
            junk.append(json.dumps(envelope).encode())
            junk.append(b"x" * (wire.DEFAULT_MAX_MESSAGE_BYTES + i + 1))
            junk.append(
                wire.encode(wire.KIND_CONTROL, f"other-{i}", {"action": "cancel", "uid": "u"})
            )
        deep = 200_000
        junk.append(b"[" * deep + b"]" * deep)
        nested: Any = "x"
        for _ in range(900):
            nested = {"a": nested}
        junk.append(
            wire.encode(
                wire.KIND_ASSIGN,
                SITE,
                {"uid": "deep", "generation": 1, "namespace": "d", "name": "n", "spec": nested},
            )
        )
        for payload in junk:
            cloud.publish(wire.CONTROL, payload)
        cloud.publish(wire.ASSIGN, junk[-1])
        wait_for(lambda: sum(dropped(port).values()) >= len(junk) + 1, 60, "every message dropped")
        labels = set(dropped(port))
        assert labels <= {reason.value for reason in wire.DropReason}, labels
        assert dropped(port).get("too-deep", 0) >= 2
        log = agent.log_tail(2000)
        assert "Traceback" not in log and "RecursionError" not in log, log[-3000:]
        assert agent.alive
        uid = cloud.assign({"tasks": [{"name": "a", "command": ["true"]}]})
        wait_for(lambda: run_phase(db, uid) == "Succeeded", 30, "the agent still works")
