"""Assignments and cancels are never lost to the broker: the cloud's re-send, proven.

A persistent broker delivers what was queued for an offline site by itself,
so a test with one would pass with the operator's re-send removed.  Here the
broker really loses the messages, and each test first checks that it did:

* a Mosquitto without persistence is restarted while the site is offline:
  the site's session and everything queued in it are gone (a probe connecting
  with the site's client id finds no session);
* a Mosquitto with ``max_queued_messages 1`` keeps one message for the
  offline site and drops the rest (it logs that it did).

Then the site comes online and everything the cloud sent must run (or be
cancelled) exactly as sent.  The cloud is the operator's own MQTT bridge
(:class:`~tideflow_operator.bridge.CloudBridge`), in process; the agent is a
real ``tideflow-agent run`` process.

Also here: a cancel that overtakes its assignment (sent first, arrives
first, with the agent killed -9 in between) cancels the late assignment
before any of its tasks runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.agent import AgentProcess, agent_truth, has_schema, read_only
from services.broker import Mosquitto
from services.cloud import SITE, Cloud, converged, running_cloud, until
from services.mqtt_probe import session_present

AGENT_CLIENT_ID = f"tideflow-agent-{SITE}"


def journal_task(name: str, journal: Path, then: str = "true") -> dict[str, Any]:
    """A task that leaves a line in ``journal`` when (and each time) it really runs."""
    return {"name": name, "script": f'echo {name} >> "{journal}"; {then}'}


def journal_lines(journal: Path) -> list[str]:
    return journal.read_text().split() if journal.exists() else []


async def take_offline(cloud: Cloud, agent: AgentProcess) -> None:
    """Let the agent make its persistent session, then stop it cleanly (the site is offline)."""
    await until(lambda: cloud.bridge.presence.connected(SITE), 20, "the site to come online")
    agent.terminate()
    await until(lambda: not cloud.bridge.presence.connected(SITE), 20, "the site to go offline")


async def test_what_a_restarted_broker_lost_is_re_sent_when_the_site_comes_online(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    broker = mosquitto_factory(persistence=False)
    journal = tmp_path / "journal"
    async with running_cloud(broker.url) as cloud:
        agent = AgentProcess(SITE, broker.url, tmp_path / "a.db").start()
        try:
            await until(lambda: cloud.bridge.presence.connected(SITE), 20, "the site online")
            # (a retry budget: the attempt the stop interrupts runs again on restart)
            slow_task = {**journal_task("slow", journal, then="sleep 300"), "retry": {"limit": 3}}
            slow = cloud.assign({"tasks": [slow_task]}, name="slow")
            await until(lambda: "slow" in journal_lines(journal), 30, "slow to run at the site")
            await take_offline(cloud, agent)
            quick = cloud.assign({"tasks": [journal_task("quick", journal)]}, name="quick")
            cloud.cancel(slow)
            ups = cloud.link_ups
            broker.restart()
            # The fault landed: the site's session, and what was queued in it, is gone.
            assert not session_present(broker, AGENT_CLIENT_ID)
            # The cloud re-sends when its own link comes back: into the void, the site is away.
            await until(lambda: cloud.link_ups > ups, 20, "the cloud to reconnect")
            agent.start()
            await until(lambda: cloud.view_phase("quick") == "Succeeded", 30, "quick Succeeded")
            await until(lambda: cloud.view_phase("slow") == "Cancelled", 30, "slow Cancelled")
            await converged(cloud, agent)
            assert journal_lines(journal).count("quick") == 1
            assert cloud.bridge.outstanding(SITE) == ([], [])
            phases = {r["phase"] for r in agent_truth(agent.db)["runs"].values()}
            assert phases == {"Succeeded", "Cancelled"}
            assert quick != slow
        finally:
            agent.kill()


async def test_what_a_full_broker_queue_dropped_is_re_sent_when_the_site_comes_online(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    broker = mosquitto_factory(max_queued_messages=1)
    journal = tmp_path / "journal"
    names = ["first", "second", "third"]
    async with running_cloud(broker.url) as cloud:
        agent = AgentProcess(SITE, broker.url, tmp_path / "a.db").start()
        try:
            await take_offline(cloud, agent)
            for name in names:
                cloud.assign({"tasks": [journal_task(name, journal)]}, name=name)
            # The fault landed: the broker kept one message for the site and dropped the rest.
            await until(
                lambda: (
                    f"Outgoing messages are being dropped for client {AGENT_CLIENT_ID}"
                    in broker.log_path.read_text(errors="replace")
                ),
                10,
                "the broker to drop messages queued for the offline site",
            )
            agent.start()
            for name in names:
                await until(lambda n=name: cloud.view_phase(n) == "Succeeded", 30, f"{name} ran")
            await converged(cloud, agent)
            assert sorted(journal_lines(journal)) == sorted(names), "each ran exactly once"
            assert cloud.bridge.outstanding(SITE) == ([], [])
        finally:
            agent.kill()


def tombstone(db: Path, uid: str) -> str | None:
    if not db.exists():
        return None
    with read_only(db) as conn:
        if not has_schema(conn):
            return None
        row = conn.execute("SELECT value FROM meta WHERE key=?", (f"cancelled:{uid}",)).fetchone()
    return row[0] if row else None


async def test_a_cancel_that_overtakes_its_assignment_is_remembered_across_a_kill(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    uid = str(uuid.uuid4())
    async with running_cloud(mosquitto.url) as cloud:
        agent = AgentProcess(SITE, mosquitto.url, tmp_path / "a.db").start()
        try:
            await until(lambda: cloud.bridge.presence.connected(SITE), 20, "the site online")
            cloud.cancel(uid, reason="deleted before it arrived")  # sent first ...
            await until(lambda: tombstone(agent.db, uid), 20, "the site to remember the cancel")
            agent.kill()  # the memory of the cancel must be durable
            spec = {"tasks": [journal_task("never", journal, then="sleep 300")]}
            cloud.assign(spec, name="late", uid=uid)  # ... the assignment after it
            agent.start()
            await until(lambda: cloud.view_phase("late") == "Cancelled", 30, "late Cancelled")
            await converged(cloud, agent)
            assert journal_lines(journal) == [], "a task of the cancelled run ran"
            (run,) = agent_truth(agent.db)["runs"].values()
            assert run["phase"] == "Cancelled"
            assert all(t["attempt"] == 0 for t in run["tasks"].values()), run
        finally:
            agent.kill()
