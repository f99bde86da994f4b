"""The link's fault tests on a clustered broker: a real 3-node RabbitMQ cluster (MQTT plugin).

The same checks as against Mosquitto (tests/integration/test_link.py): the
cloud's applied state equals the agent's database, every outbox seq consumed
exactly once, no process died.  The faults are the ones a cluster adds: the
agent and the cloud on different nodes, a backlog queued on one node and
fetched from another, the agent killed while offline, duplicated batches, and
a node killed -9 while sites are connected to it (they reconnect to another
node from their failover list).  Also what a site's permissions give and do
not: another site's user with the site's client id gets no session, but
RabbitMQ 3.10 drops the site's connection (docs/decisions/0015).  The cloud
speaks MQTT 3.1.1 here: Debian's
RabbitMQ (3.10) has no MQTT 5 (docs/decisions/0012-clustered-broker.md).

Each test has a vhost of its own on the session's cluster (``rabbit``), so
sessions and retained messages never leak between tests; a test that kills a
node gets it back before the next test (the fixture restarts it).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from services.agent import AgentProcess, agent_truth
from services.broker import LinkProxy
from services.cloud import SITE, Cloud, chain_spec, converged, running_cloud, until
from services.rabbit_http_auth import ClientIdAuth, http_authn
from services.rabbitmq import RabbitCluster, Vhost

from tideflow import wire

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def cloud(rabbit: Vhost) -> AsyncIterator[Cloud]:
    """The cloud bridge, on node 2 first (the agents start on node 1)."""
    async with running_cloud(
        rabbit.url_from(1),
        username=rabbit.username,
        password_file=rabbit.password_file,
        mqtt5=False,
    ) as cloud:
        yield cloud


def agent_on(rabbit: Vhost, db: Path, first_node: int = 0) -> AgentProcess:
    return AgentProcess(SITE, rabbit.url_from(first_node), db, *rabbit.agent_args())


def link_ups(agent: AgentProcess) -> int:
    return agent.log_tail(100_000).count("link up")


def link_downs(agent: AgentProcess) -> int:
    return agent.log_tail(100_000).count("link down")


def run_finished(agent: AgentProcess) -> bool:
    return any(r["phase"] == "Succeeded" for r in agent_truth(agent.db)["runs"].values())


async def test_a_run_syncs_between_sites_and_cloud_on_different_nodes(
    cloud: Cloud, rabbit: Vhost, tmp_path: Path
) -> None:
    with agent_on(rabbit, tmp_path / "a.db") as agent:
        cloud.assign(chain_spec(4, 0.05))
        await until(lambda: cloud.view_phase() == "Succeeded", 30, "Succeeded in the cloud")
        await converged(cloud, agent)
        view = cloud.bridge.applier.view("default", "wf")
        assert view is not None and view.tasks["t3"].outputs == {"n": "3"}
        assert agent.alive


async def test_a_backlog_queued_while_offline_is_fetched_from_another_node(
    cloud: Cloud, rabbit: Vhost, tmp_path: Path
) -> None:
    agent = agent_on(rabbit, tmp_path / "a.db").start()
    try:
        await until(lambda: cloud.bridge.presence.connected(SITE), 20, "the site to come online")
        agent.terminate()
        await until(lambda: not cloud.bridge.presence.connected(SITE), 20, "the site offline")
        quick = cloud.assign(chain_spec(2, 0.05), name="quick")
        slow = cloud.assign({"tasks": [{"name": "long", "command": ["sleep", "300"]}]}, name="slow")
        cloud.cancel(slow)
        # The session was made on node 1; the site comes back on node 3.
        agent = agent_on(rabbit, tmp_path / "a.db", first_node=2).start()
        await until(lambda: cloud.view_phase("quick") == "Succeeded", 30, "quick Succeeded")
        await until(lambda: cloud.view_phase("slow") == "Cancelled", 30, "slow Cancelled")
        await converged(cloud, agent)
        assert quick != slow
        assert cloud.bridge.outstanding(SITE) == ([], [])
    finally:
        agent.kill()


async def test_agent_killed_and_restarted_while_offline(
    cloud: Cloud, rabbit: Vhost, tmp_path: Path
) -> None:
    # The site's uplink is a relay that can be cut; behind it, the cluster.
    with LinkProxy("127.0.0.1", rabbit.ports[0]).start() as uplink:
        agent = AgentProcess(SITE, uplink.url, tmp_path / "a.db", *rabbit.agent_args()).start()
        try:
            cloud.assign(chain_spec(10, 0.3))
            await until(lambda: agent_truth(agent.db)["runs"], 20, "the site to take it")
            downs = link_downs(agent)
            uplink.cut()
            await until(lambda: link_downs(agent) > downs, 15, "the agent to lose the link")
            seq = agent_truth(agent.db)["last_seq"]
            await until(lambda: agent_truth(agent.db)["last_seq"] > seq, 15, "progress offline")
            assert not run_finished(agent), "the kill must land mid-run"
            agent.kill()
            agent.start()
            await until(lambda: run_finished(agent), 40, "the run to finish offline after the kill")
            uplink.restore()
            await converged(cloud, agent)
            assert agent.alive
        finally:
            agent.kill()


async def test_duplicated_and_reordered_batches_apply_once(cloud: Cloud, rabbit: Vhost) -> None:
    site = "injected"
    uid = str(uuid.uuid4())
    cloud.bridge.applier.expect("default", "inj", uid, 1, ["a"], site=site)
    base = {"uid": uid, "generation": 1, "namespace": "default", "name": "inj"}
    done = {**base, "task": "a", "phase": "Succeeded", "attempt": 1, "exitCode": 0}
    records = [
        (1, "run", {**base, "phase": "Pending"}),
        (2, "run", {**base, "phase": "Running"}),
        (3, "task", {**base, "task": "a", "phase": "Running", "attempt": 1}),
        (4, "task", {**done, "outputs": {"k": "v"}}),
        (5, "run", {**base, "phase": "Succeeded"}),
    ]
    batches = [[records[0], records[1]], [records[2]], [records[3], records[4]]]
    acks: list[int] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="injector")
    client.username_pw_set(rabbit.username, rabbit.password)
    client.on_message = lambda _c, _u, m: acks.append(json.loads(m.payload)["payload"]["through"])
    client.connect("127.0.0.1", rabbit.ports[2])  # node 3; the cloud is on node 2
    client.subscribe(wire.topic(site, wire.ACKS), 1)
    client.loop_start()
    try:
        for batch in (batches[2], batches[0], batches[0], batches[2], batches[1], batches[1]):
            payload = [(seq, kind, json.dumps(body)) for seq, kind, body in batch]
            client.publish(wire.topic(site, wire.EVENTS), wire.encode_events(site, payload), 1)
        await until(lambda: cloud.view_phase("inj") == "Succeeded", 15, "the injected run")
        await until(lambda: acks and acks[-1] == 5, 15, "an ack through 5")
    finally:
        client.loop_stop()
        client.disconnect()
    assert cloud.bridge.applier.applied_through(site) == 5
    assert cloud.bridge.records_applied == 5
    assert cloud.bridge.duplicates_ignored >= 3
    assert acks == sorted(acks), "acks never go backwards"


async def test_the_node_the_site_and_cloud_use_is_killed_and_both_move_to_another(
    rabbit: Vhost, rabbitmq_cluster: RabbitCluster, tmp_path: Path
) -> None:
    # Both start on node 1, the one that dies; their lists name the other two after it.
    async with running_cloud(
        rabbit.url_from(0), username=rabbit.username, password_file=rabbit.password_file,
        mqtt5=False,
    ) as cloud:  # fmt: skip
        with agent_on(rabbit, tmp_path / "a.db", first_node=0) as agent:
            cloud.assign(chain_spec(24, 0.3))
            await until(lambda: agent_truth(agent.db)["runs"], 20, "the site to take it")
            seq = agent_truth(agent.db)["last_seq"]
            await until(lambda: agent_truth(agent.db)["last_seq"] > seq + 2, 20, "progress")
            ups, cloud_ups = link_ups(agent), cloud.link_ups
            killed_at = time.monotonic()
            rabbitmq_cluster.nodes[0].kill()
            await until(lambda: link_ups(agent) > ups, 30, "the agent on another node")
            agent_back = time.monotonic() - killed_at
            await until(lambda: cloud.link_ups > cloud_ups, 30, "the cloud on another node")
            cloud_back = time.monotonic() - killed_at
            assert not run_finished(agent), "the node died after the run had finished"
            await until(lambda: cloud.view_phase() == "Succeeded", 60, "Succeeded in the cloud")
            await converged(cloud, agent)
            synced = time.monotonic() - killed_at
            assert agent.alive
            print(
                f"\nnode killed: agent reconnected after {agent_back:.2f}s, cloud after "
                f"{cloud_back:.2f}s, the run Succeeded in the cloud {synced:.1f}s after the kill"
            )


def publish_state(rabbit: Vhost, node: int, payload: bytes, site: str = SITE) -> None:
    """Publish ``payload`` as the site's retained ``state`` on one node (QoS 1, confirmed)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fake-{uuid.uuid4().hex[:6]}")
    client.username_pw_set(rabbit.username, rabbit.password)
    client.connect("127.0.0.1", rabbit.ports[node])
    client.loop_start()
    try:
        info = client.publish(wire.topic(site, wire.STATE), payload, qos=1, retain=True)
        info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


async def test_a_stale_retained_state_on_one_node_does_not_fake_presence(
    rabbit: Vhost, tmp_path: Path
) -> None:
    # The site said "online" through node 1, then went offline through node 2 (its
    # last will, say).  Retained messages are per node: node 1 still holds "online".
    online = wire.encode(wire.KIND_STATE, SITE, wire.StatePayload(online=True, epoch="e1"))
    publish_state(rabbit, 0, online)
    offline = wire.encode(wire.KIND_STATE, SITE, wire.StatePayload(online=False))
    publish_state(rabbit, 1, offline)
    # A cloud that starts on node 1 must not take the stale copy for the truth.
    async with running_cloud(
        rabbit.url_from(0), username=rabbit.username, password_file=rabbit.password_file,
        mqtt5=False,
    ) as cloud:  # fmt: skip
        # A live message reaches it whatever node it was published on.
        probe = wire.encode(wire.KIND_STATE, "probe-site", wire.StatePayload(online=True))
        publish_state(rabbit, 2, probe, site="probe-site")
        await until(lambda: cloud.bridge.presence.connected("probe-site"), 15, "a live state")
        assert not cloud.bridge.presence.connected(SITE), "a stale retained copy made it online"
        assert cloud.bridge.applier.epoch(SITE) is None, "a stale retained copy set the epoch"
        # The site's next live heartbeat is what brings it online.
        publish_state(rabbit, 1, online)
        await until(lambda: cloud.bridge.presence.connected(SITE), 15, "the live heartbeat")


async def test_a_site_user_is_confined_to_its_own_topics(
    cloud: Cloud, rabbit: Vhost, rabbitmq_cluster: RabbitCluster, tmp_path: Path
) -> None:
    """The README's RabbitMQ permissions: a site's user reads and writes its own topics only."""
    username, password_file = rabbitmq_cluster.site_user(rabbit, SITE)
    password = password_file.read_text().strip()
    # As the site's user (and its client id: the session queue is named after it).
    results: list[Any] = []
    closed = threading.Event()
    hostile = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tideflow-agent-{SITE}")
    hostile.username_pw_set(username, password)
    hostile.on_subscribe = lambda _c, _u, _mid, codes, _p: results.extend(codes)
    hostile.on_disconnect = lambda *_: closed.set()
    hostile.connect("127.0.0.1", rabbit.ports[0])
    hostile.loop_start()
    try:
        # Its own topics: granted.
        hostile.subscribe(wire.topic(SITE, wire.ASSIGN), 1)
        await until(lambda: results, 10, "the SUBACK")
        assert [code.is_failure for code in results] == [False]
        own = wire.encode(wire.KIND_STATE, SITE, wire.StatePayload(online=False))
        hostile.publish(wire.topic(SITE, wire.STATE), own, 1).wait_for_publish(10)
        assert not closed.is_set()
        # Another site's assignments: RabbitMQ closes the connection.
        hostile.subscribe(wire.topic("other", wire.ASSIGN), 1)
        await until(closed.is_set, 10, "the broker to refuse another site's subscription")
        assert len(results) == 1
        # Another site's events: refused (no PUBACK) and the connection closed.
        closed.clear()
        hostile.reconnect()
        await until(hostile.is_connected, 10, "the hostile client back")
        batch = wire.encode_events("other", [(1, "run", json.dumps({"uid": "u"}))])
        info = hostile.publish(wire.topic("other", wire.EVENTS), batch, 1)
        await until(closed.is_set, 10, "the broker to refuse another site's topic")
        assert not info.is_published()
    finally:
        hostile.loop_stop()
        hostile.disconnect()
    # The real agent, as that user, runs and syncs as usual.
    agent = AgentProcess(
        SITE, rabbit.url_from(0), tmp_path / "a.db",
        "--username", username, "--password-file", str(password_file),
    )  # fmt: skip
    with agent:
        cloud.assign(chain_spec(3, 0.05))
        await until(lambda: cloud.view_phase() == "Succeeded", 30, "Succeeded in the cloud")
        await converged(cloud, agent)
    assert cloud.bridge.applier.applied_through("other") == 0


def hostile_connect(port: int, username: str, password: str, *, clean: bool) -> list[Any]:
    """One CONNECT with the site's client id under another user; CONNACKs and messages seen."""
    seen: list[Any] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=wire.agent_client_id(SITE),
                         clean_session=clean, protocol=mqtt.MQTTv311)  # fmt: skip
    client.username_pw_set(username, password)
    client.on_connect = lambda _c, _u, _f, rc, _p: seen.append(rc)
    client.on_message = lambda _c, _u, msg: seen.append(msg.topic)
    client.connect("127.0.0.1", port)
    # Until the broker closes the connection (a refusal does), or a while if it does not.
    deadline = time.monotonic() + 3
    while client.socket() is not None and time.monotonic() < deadline:
        client.loop(0.1)
    client.disconnect()
    return seen


async def test_another_sites_user_gets_no_session_but_can_drop_the_sites_connection(
    cloud: Cloud, rabbit: Vhost, rabbitmq_cluster: RabbitCluster, tmp_path: Path
) -> None:
    """RabbitMQ 3.10 and client ids (decision 0015): the README's permissions, tested.

    Another site's user connecting with this site's client id never gets the
    session (its queue needs permissions only the site's user has): nothing
    queued for the site is delivered to it or dropped.  But RabbitMQ 3.10
    registers the client id, closing the site's live connection, *before*
    it checks the session queue, and a user of any vhost can: the limit the
    README documents.  The agent reconnects and loses nothing.  (If the drop
    stops happening, a newer RabbitMQ fixed it: update the README and 0015.)
    """
    username, password_file = rabbitmq_cluster.site_user(rabbit, SITE)
    other, other_password_file = rabbitmq_cluster.site_user(rabbit, "other")
    other_password = other_password_file.read_text().strip()
    agent = AgentProcess(SITE, rabbit.url_from(0), tmp_path / "a.db",
                         "--username", username, "--password-file", str(password_file))  # fmt: skip
    agent.start()
    try:
        await until(lambda: cloud.bridge.presence.connected(SITE), 20, "the site online")
        agent.terminate()
        cloud.assign(chain_spec(2, 0.05), name="queued")  # waits in the site's session
        for clean in (False, True):  # take the session / wipe it
            seen = hostile_connect(rabbit.ports[1], other, other_password, clean=clean)
            assert len(seen) == 1 and seen[0].is_failure, (clean, seen)
        agent.start()
        await until(lambda: cloud.view_phase("queued") == "Succeeded", 30, "queued Succeeded")
        await converged(cloud, agent)

        # The limit: the same CONNECT while the site is connected drops the site first.
        downs = link_downs(agent)
        seen = hostile_connect(rabbit.ports[0], other, other_password, clean=False)
        assert all(not isinstance(s, str) for s in seen), f"a message of the site's: {seen}"
        await until(lambda: link_downs(agent) > downs, 10, "RabbitMQ 3.10 to drop the site")
        said = f"with duplicate id '{wire.agent_client_id(SITE)}'"
        await until(lambda: any(said in n.log_tail(300) for n in rabbitmq_cluster.nodes), 10,
                    "RabbitMQ to log why it dropped the site")  # fmt: skip
        # Client ids are tracked cluster-wide, not per vhost: a user of another vhost
        # (another tenant of a shared cluster) drops the site as well.
        elsewhere = rabbitmq_cluster.vhost()
        downs = link_downs(agent)
        hostile_connect(rabbit.ports[2], elsewhere.username, elsewhere.password, clean=True)
        await until(lambda: link_downs(agent) > downs, 10, "another vhost's user to drop it")
        cloud.assign(chain_spec(2, 0.05), name="after")
        await until(lambda: cloud.view_phase("after") == "Succeeded", 30, "after Succeeded")
        await converged(cloud, agent)
    finally:
        agent.kill()


async def test_the_http_auth_backend_keeps_another_sites_user_off_a_sites_client_id(
    cloud: Cloud, rabbit: Vhost, rabbitmq_cluster: RabbitCluster, tmp_path: Path
) -> None:
    """The README's remedy for RabbitMQ 3.10: a login service that binds client ids.

    RabbitMQ hands its HTTP auth backend the MQTT client id at login, before it
    registers the id; refusing the wrong one there leaves the site connected.
    """
    username, password_file = rabbitmq_cluster.site_user(rabbit, SITE)
    other, other_password_file = rabbitmq_cluster.site_user(rabbit, "other")
    site_password = password_file.read_text().strip()
    other_password = other_password_file.read_text().strip()
    users = {  # RabbitMQ asks with the user's name, the vhost apart
        SITE: (site_password, wire.agent_client_id(SITE)),
        "other": (other_password, wire.agent_client_id("other")),
        "guest": (rabbit.password, None),  # the operator's stand-in: any client id
    }
    credentials = ["--username", username, "--password-file", str(password_file)]
    agent = AgentProcess(SITE, rabbit.url_from(0), tmp_path / "a.db", *credentials)
    with http_authn(rabbitmq_cluster, ClientIdAuth(users)) as auth, agent:
        await until(lambda: cloud.bridge.presence.connected(SITE), 20, "the site online")
        for node, clean in ((0, False), (1, True)):
            seen = hostile_connect(rabbit.ports[node], other, other_password, clean=clean)
            assert len(seen) == 1 and seen[0].is_failure, (clean, seen)
        asked = [q for q in auth.asked if q.get("username") == "other"]
        assert {q.get("client_id") for q in asked} == {wire.agent_client_id(SITE)}, asked
        cloud.assign(chain_spec(2, 0.05))
        await until(lambda: cloud.view_phase() == "Succeeded", 30, "Succeeded in the cloud")
        await converged(cloud, agent)
        assert link_downs(agent) == 0, agent.log_tail()


async def test_a_site_that_died_with_its_node_goes_offline_in_the_cloud(
    rabbit: Vhost, rabbitmq_cluster: RabbitCluster, tmp_path: Path
) -> None:
    # The site knows node 1 only, and node 1 dies: no last will is published (the
    # node holding the site's connection is gone) and the site never comes back.
    # The cloud must not show it connected for ever: its heartbeats stopped.
    seen: list[bool] = []

    async def on_presence(update: Any) -> None:
        seen.append(update.info.online)

    async with running_cloud(
        rabbit.url_from(1), username=rabbit.username, password_file=rabbit.password_file,
        mqtt5=False, site_silence_seconds=4, on_presence=on_presence,
    ) as cloud:  # fmt: skip
        with AgentProcess(SITE, rabbit.urls[0], tmp_path / "a.db", *rabbit.agent_args()):
            await until(lambda: cloud.bridge.presence.connected(SITE), 20, "the site online")
            rabbitmq_cluster.nodes[0].kill()
            await until(lambda: not cloud.bridge.presence.connected(SITE), 20, "the site offline")
            assert seen[-1] is False, "the operator was not told (EdgeSite, Workflows)"
