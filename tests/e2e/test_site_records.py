"""How the operator takes a site's records, end to end: real API server, Mosquitto, agents.

Three promises, each broken once (issue 16):

* a site changes only its own runs: with per-site ACLs a site can still write
  anything on its own ``events`` topic, including a record naming another
  site's Workflow; the operator must discard it as forged;
* every record ends applied or discarded, and both advance the site's ack: a
  record for a Workflow the operator no longer knows must not stall the site's
  outbox for ever;
* a site restarted on a new, empty database is not mistaken for the old one:
  its seqs start at 1 again and must be applied, not taken as duplicates.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from services.agent import AgentProcess, agent_truth, wait_for
from services.broker import Mosquitto
from services.metrics import free_port, scrape
from services.world import World, install_crds, sample_tasks, site_name, spec_for

from tideflow import wire

pytestmark = pytest.mark.envtest


@pytest.fixture
def secure_world(envtest: Any, secure_mosquitto: Mosquitto, tmp_path: Path) -> Iterator[World]:
    install_crds(envtest)
    w = World(envtest, secure_mosquitto, tmp_path)
    yield w
    w.close()


def _password_file(world: World, user: str) -> str:
    path = world.tmp / f"{user}.password"
    path.write_text(world.broker.users[user])
    return str(path)


def _acked(db: Path) -> tuple[int, int, int]:
    """(last acked seq, last seq, outbox depth) as the agent's database says."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key='last_acked_seq'").fetchone()
        depth = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
    return int(row[0]) if row else 0, agent_truth(db)["last_seq"], int(depth)


def _db_epoch(db: Path) -> str:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return str(conn.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0])


def _drained(db: Path) -> bool:
    acked, last, depth = _acked(db)
    return last > 0 and acked == last and depth == 0


def _run_phases(agent: AgentProcess) -> dict[str, str]:
    return {run: r["phase"] for run, r in agent_truth(agent.db)["runs"].items()}


def _site_status(world: World, site: str) -> dict[str, Any]:
    """The EdgeSite's status; empty while the site is not registered yet (polled)."""
    got = world.kubectl("get", "site", site, "-o", "json", check=False)
    if got.returncode != 0 and "NotFound" in got.stderr:
        return {}
    assert got.returncode == 0, got.stderr
    return dict(json.loads(got.stdout).get("status") or {})


def test_a_site_cannot_write_another_sites_workflow_status(secure_world: World) -> None:
    world = secure_world
    port = free_port()
    world.operator(
        "--username", "operator", "--password-file", _password_file(world, "operator"),
        "--metrics-port", str(port),
    )  # fmt: skip
    agents = {}
    for user, site in (("site-a", "a"), ("site-b", "b")):
        agents[site] = AgentProcess(
            site, world.broker.url, world.tmp / f"{site}.db",
            "--username", user, "--password-file", _password_file(world, user),
        ).start()  # fmt: skip
        world.agents[site] = agents[site]
    world.apply("at-b", spec_for("b", [{"name": "long", "command": ["sleep", "120"]}]))
    running = world.wait_phase("at-b", "Running")
    assert running["site"] == "b"
    uid = world.get("at-b")["metadata"]["uid"]

    # Site a, with its own credentials, on its own events topic: b's run, "Succeeded".
    forged = {"uid": uid, "generation": 1, "namespace": world.namespace, "name": "at-b",
              "phase": "Succeeded", "finishedAt": time.time()}  # fmt: skip
    # Its credentials connect under its agent's client id only (decision 0015): the
    # forger takes a's own session for a moment (a is idle; its agent reconnects).
    forger = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=wire.agent_client_id("a"), clean_session=False
    )
    forger.username_pw_set("site-a", world.broker.users["site-a"])
    forger.connect(world.broker.host, world.broker.port)
    forger.loop_start()
    try:
        info = forger.publish(
            wire.topic("a", wire.EVENTS), wire.encode_events("a", [(1, "run", json.dumps(forged))]),
            qos=1,
        )  # fmt: skip
        info.wait_for_publish(10)
    finally:
        forger.loop_stop()
        forger.disconnect()

    forged_metric = "tideflow_operator_records_discarded_total{reason=forged}"

    def handled() -> bool:
        try:
            counted = scrape(port).get(forged_metric, 0) >= 1
        except OSError:
            counted = False
        return counted or world.status("at-b").get("phase") != "Running"

    wait_for(handled, 30, "the operator to handle the forged record")
    status = world.status("at-b")
    assert (status["phase"], status["site"]) == ("Running", "b")
    assert scrape(port)[forged_metric] == 1
    assert "forged" in world.operators[0].log_text()

    # b is still running it, and deleting the Workflow still cancels it there.
    assert set(_run_phases(agents["b"]).values()) == {"Running"}
    world.kubectl("delete", "twf", "at-b", "-n", world.namespace, "--timeout=30s")
    wait_for(
        lambda: set(_run_phases(agents["b"]).values()) == {"Cancelled"},
        30,
        "the cancel to reach site b",
    )


def test_records_for_a_workflow_deleted_while_the_site_was_away_do_not_stall_its_acks(
    world: World,
) -> None:
    site = site_name()
    op = world.operator()
    agent = world.agent(site)
    world.apply(
        "gone",
        spec_for(
            site,
            [
                {"name": "long", "command": ["sleep", "3"]},
                {"name": "after", "dependsOn": ["long"], "command": ["true"]},
            ],
        ),
    )
    world.wait_phase("gone", "Running")
    agent.kill()  # the site goes away mid-run
    world.kubectl("delete", "twf", "gone", "-n", world.namespace, "--timeout=30s")
    op.kill()  # and the operator restarts: nothing remembers the deleted Workflow
    world.operator()
    agent.start()  # the site comes back and reports what it did for the deleted Workflow
    wait_for(
        lambda: all(p in ("Succeeded", "Cancelled") for p in _run_phases(agent).values()),
        60,
        "the site to finish the run",
    )
    try:
        wait_for(lambda: _drained(agent.db), 30, "the site's outbox to drain")
    except AssertionError:
        print("acked, last seq, depth:", _acked(agent.db))
        print(agent.log_tail(30))
        print(world.operators[-1].log_text()[-3000:])
        raise
    _, last, _ = _acked(agent.db)
    wait_for(
        lambda: _site_status(world, site).get("lastAckedSeq") == last,
        30,
        "the EdgeSite's lastAckedSeq to reach the agent's last seq",
    )


HOLD = 'while [ ! -e "$1" ]; do sleep 0.05; done'


@pytest.mark.parametrize("operator_restarts", [False, True], ids=["operator-up", "restarted"])
def test_a_site_restarted_on_a_new_database_is_not_taken_for_the_old_one(
    world: World, operator_restarts: bool, tmp_path: Path
) -> None:
    """With ``operator_restarts`` the operator is restarted while the database is replaced:
    it no longer knows the old epoch and must go by the epoch each status was synced in."""
    site = site_name()
    release = tmp_path / "release"
    op = world.operator()
    agent = world.agent(site)
    world.apply("before", spec_for(site, sample_tasks(0.05, 3)))
    world.wait_phase("before", "Succeeded")
    wait_for(lambda: _drained(agent.db), 30, "the first database's outbox to drain")
    old_last = _acked(agent.db)[1]
    old_epoch = _db_epoch(agent.db)
    wait_for(
        lambda: _site_status(world, site).get("databaseEpoch") == old_epoch,
        30,
        "the EdgeSite to show the database's epoch",
    )
    world.apply(
        "lost",
        spec_for(
            site,
            [
                # Held until the old database is gone: the kill lands mid-run however
                # slow the machine (a 2 s sleep finished first under load).
                {"name": "slow", "command": ["sh", "-c", HOLD, "hold", str(release)]},
                {"name": "then", "dependsOn": ["slow"], "command": ["true"]},
            ],
        ),
    )
    world.wait_phase("lost", "Running")
    lost_uid = world.get("lost")["metadata"]["uid"]

    agent.kill()
    release.touch()
    if operator_restarts:
        op.kill()
        world.operator()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{agent.db}{suffix}").unlink(missing_ok=True)
    agent.start()  # same site name, a new empty database: its seqs start at 1 again
    world.apply("after", spec_for(site, sample_tasks(0.05, 1)))
    after_uid = world.get("after")["metadata"]["uid"]

    world.wait_phase("after", "Succeeded", timeout=60)
    # The run the old database held was sent again and ran on the new one.
    world.wait_phase("lost", "Succeeded", timeout=60)
    runs = _run_phases(agent)
    assert runs == {f"{lost_uid}.1": "Succeeded", f"{after_uid}.1": "Succeeded"}
    wait_for(lambda: _drained(agent.db), 30, "the new database's outbox to drain")
    new_last = _acked(agent.db)[1]
    assert new_last < old_last + 40  # numbered afresh (not continuing the old sequence)
    new_epoch = _db_epoch(agent.db)
    assert new_epoch != old_epoch
    # Both together: the two databases' numbers run alike (a few runs each), so the old
    # database's status may show the new one's lastAckedSeq for a moment (CI, ci2).
    wait_for(
        lambda: (
            (status := _site_status(world, site)).get("lastAckedSeq") == new_last
            and status.get("databaseEpoch") == new_epoch
        ),
        30,
        "the EdgeSite's lastAckedSeq and databaseEpoch to follow the new database",
    )

    def reasons() -> set[str]:
        out = world.kubectl(
            "get", "events", "-n", "default", "--field-selector",
            f"involvedObject.kind=EdgeSite,involvedObject.name={site}", "-o", "json",
        ).stdout  # fmt: skip
        return {e["reason"] for e in json.loads(out)["items"]}

    wait_for(lambda: "DatabaseReplaced" in reasons(), 30, "an Event on the EdgeSite")
