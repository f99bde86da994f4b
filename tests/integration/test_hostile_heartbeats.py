"""Hand-made heartbeats (``state`` messages) against the operator's real bridge: hostile tests.

A test-owned MQTT client publishes on a site's own topics through a real
Mosquitto, as a buggy or lying agent could; the operator's real
:class:`~tideflow_operator.bridge.CloudBridge` (applier, presence) receives.
Proves:

* a heartbeat's ``lastAckedSeq`` is the site's claim, not the operator's mark:
  a huge or bogus claim neither skips the site's records nor stops their acks;
  it raises the mark only across a gap the site's own records show (what an
  operator restarted on an idle site needs), and a claim past what the site
  sent is logged with the field's name;
* a site whose clock stepped back (NTP, an RTC reset on reboot) is judged on
  the operator's receive time: its heartbeats are taken, and a site that
  comes back after its will stays online while it talks;
* a message over the operator's limit never waits in its inbox;
* a fired run at an impossible time is discarded, and the site's records go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from services.agent import AgentProcess
from services.broker import Mosquitto
from services.cloud import running_cloud, until

from tideflow import wire
from tideflow_operator.bridge import MAX_STATES_WAITING, CloudBridge

SITE = "site-a"


class Forger:
    """Publishes a site's state and events messages by hand; hears the site's acks."""

    def __init__(self, broker: Mosquitto) -> None:
        self.acks: list[dict[str, Any]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"forger-{SITE}")
        self.client.on_message = lambda _c, _u, m: self.acks.append(json.loads(m.payload))
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(wire.topic(SITE, wire.ACKS), qos=1)
        self.client.loop_start()

    def state(self, online: bool = True, sent_at: float | None = None, **payload: Any) -> None:
        message = wire.encode(wire.KIND_STATE, SITE, {"online": online} | payload)
        if sent_at is not None:
            message = re.sub(rb'"sentAt":[^,]+', b'"sentAt":' + repr(sent_at).encode(), message)
        self.client.publish(wire.topic(SITE, wire.STATE), message, qos=1).wait_for_publish(10)

    def events(self, records: list[tuple[int, str, dict[str, Any]]]) -> None:
        rows = [(seq, kind, json.dumps(body)) for seq, kind, body in records]
        payload = wire.encode_events(SITE, rows)
        self.client.publish(wire.topic(SITE, wire.EVENTS), payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def forger(mosquitto: Mosquitto) -> Iterator[Forger]:
    forger = Forger(mosquitto)
    try:
        yield forger
    finally:
        forger.close()


async def stall_the_worker(bridge: CloudBridge, forger: Forger) -> asyncio.Event:
    """Hold the bridge's worker inside its next group (the API server is slow), as it
    takes a state message of the forger's; set the returned event to let it go on."""
    release = asyncio.Event()
    handled = bridge.handle_many
    stalls: list[int] = []

    async def stalled(*args: Any, **kwargs: Any) -> None:
        stalls.append(len(args[0]))
        await release.wait()
        await handled(*args, **kwargs)

    bridge.handle_many = stalled  # type: ignore[method-assign]
    forger.state(running=0)  # (taken by the worker, which now waits)
    await until(lambda: stalls == [1], 10, "the worker to take the first")
    return release


async def sentinel_heard(forger: Forger, bridge: CloudBridge) -> None:
    """Another site's heartbeat, sent after what a test sent: once the bridge has
    heard it (on arrival), everything before it has arrived too."""
    message = wire.encode(wire.KIND_STATE, "site-b", {"online": True})
    forger.client.publish(wire.topic("site-b", wire.STATE), message, qos=1).wait_for_publish(10)
    await until(lambda: "site-b" in bridge._heard, 20, "the sentinel")


async def sentinel_handled(bridge: CloudBridge) -> None:
    """The worker has taken the sentinel, and so everything queued before it."""
    await until(lambda: bridge.presence.get("site-b") is not None, 20, "the sentinel handled")


def task(phase: str) -> dict[str, Any]:
    return {"uid": "u-1", "generation": 1, "namespace": "default", "name": "wf", "task": "a",
            "phase": phase, "attempt": 1, "finishedAt": time.time()}  # fmt: skip


RUN_DONE = {"uid": "u-1", "generation": 1, "namespace": "default", "name": "wf",
            "phase": "Succeeded", "finishedAt": 1.0}  # fmt: skip


async def test_a_huge_last_acked_seq_in_a_heartbeat_does_not_move_the_mark(
    mosquitto: Mosquitto, forger: Forger, caplog: pytest.LogCaptureFixture
) -> None:
    """A site saying it was acked through 10**12 (a corrupt meta row, a bug) made the
    operator take every later record of that site for a duplicate: none applied,
    and its ack (through 10**12, refused by the agent) never compacted a thing."""
    async with running_cloud(mosquitto.url) as cloud:
        bridge, applier = cloud.bridge, cloud.bridge.applier
        applier.expect("default", "wf", "u-1", 1, ["a"], site=SITE)
        forger.state(lastAckedSeq=10**12, outboxDepth=3, running=1)
        await until(lambda: bridge.presence.get(SITE) is not None, 20, "the heartbeat")
        assert applier.applied_through(SITE) == 0
        forger.events([(1, "task", task("Running")), (2, "task", task("Succeeded"))])
        await until(lambda: applier.applied_through(SITE) == 2, 20, "records 1-2")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            forger.state(lastAckedSeq=10**12, outboxDepth=1, running=7)
            await until(lambda: bridge.presence.get(SITE).running == 7, 20, "the 2nd heartbeat")
        assert applier.applied_through(SITE) == 2
        assert any("lastAckedSeq" in r.getMessage() for r in caplog.records), caplog.text
        forger.events([(3, "run", RUN_DONE)])
        await until(lambda: applier.applied_through(SITE) == 3, 20, "record 3")
        view = applier.view("default", "wf")
        assert view is not None and view.phase == "Succeeded"
        assert view.tasks["a"].phase == "Succeeded"
        await until(lambda: forger.acks and forger.acks[-1]["payload"]["through"] == 3, 10, "ack 3")
    assert max(a["payload"]["through"] for a in forger.acks) == 3


async def test_an_honest_claim_still_closes_the_gap_of_a_restarted_operator(
    mosquitto: Mosquitto, forger: Forger
) -> None:
    """What the claim is for: records 1-500 were acked by an earlier operator process
    and compacted at the site; its next records must apply, not wait for 1-500."""
    async with running_cloud(mosquitto.url) as cloud:
        bridge, applier = cloud.bridge, cloud.bridge.applier
        applier.expect("default", "wf", "u-1", 1, ["a"], site=SITE)
        forger.state(lastAckedSeq=500, outboxDepth=0, running=1)
        await until(lambda: bridge.presence.get(SITE) is not None, 20, "the heartbeat")
        forger.events([(501, "task", task("Succeeded")), (502, "run", RUN_DONE)])
        await until(lambda: applier.applied_through(SITE) == 502, 20, "records 501-502")
        view = applier.view("default", "wf")
        assert view is not None and view.phase == "Succeeded"
        # Only the gap the records show is closed: a claim beyond them moves nothing.
        forger.state(lastAckedSeq=10**9, outboxDepth=0, running=2)
        await until(lambda: bridge.presence.get(SITE).running == 2, 20, "the 2nd heartbeat")
        forger.events([(503, "task", task("Succeeded"))])
        await until(lambda: applier.applied_through(SITE) == 503, 20, "record 503")


DAY = 86_400.0


async def test_a_site_whose_clock_stepped_back_is_heard_and_comes_back_online(
    mosquitto: Mosquitto, forger: Forger
) -> None:
    """Its heartbeats were stale until its clock caught up (a day, here): frozen
    counters, and after a disconnect it read offline while it talked."""
    now = time.time()
    async with running_cloud(mosquitto.url) as cloud:
        presence = cloud.bridge.presence
        forger.state(boot="b1", sent_at=now, running=1)
        await until(lambda: presence.connected(SITE), 20, "the site online")
        forger.state(boot="b1", sent_at=now - DAY, running=2)  # NTP stepped it back a day
        await until(lambda: presence.get(SITE).running == 2, 20, "the stepped heartbeat")
        forger.state(online=False, boot="b1", sent_at=now - 10)  # its will (old clock)
        await until(lambda: not presence.connected(SITE), 20, "the will")
        forger.state(boot="b1", sent_at=now - DAY + 30, running=3)
        await until(lambda: presence.connected(SITE), 20, "the site back online")
        assert presence.get(SITE).running == 3


async def test_a_real_agents_heartbeats_and_will_name_its_process(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The agent says which process it is (``boot``) in its heartbeats and its will,
    so the operator tells an old process's late will from this one's without clocks."""
    seen: list[dict[str, Any]] = []
    listener = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="state-listener")
    listener.on_message = lambda _c, _u, m: m.retain or seen.append(json.loads(m.payload))
    listener.connect(mosquitto.host, mosquitto.port)
    listener.subscribe(wire.topic(SITE, wire.STATE), qos=1)
    listener.loop_start()
    agent = AgentProcess(SITE, mosquitto.url, tmp_path / "a.db")
    try:
        async with running_cloud(mosquitto.url) as cloud:
            for _ in range(2):
                agent.start()
                await until(lambda: cloud.bridge.presence.connected(SITE), 20, "online")
                agent.kill()  # the broker publishes its will
                await until(lambda: not cloud.bridge.presence.connected(SITE), 20, "the will")
        online = [m["payload"] for m in seen if m["payload"]["online"]]
        wills = [m["payload"] for m in seen if not m["payload"]["online"]]
        boots = list(dict.fromkeys(p["boot"] for p in online))
        assert len(boots) == 2, seen
        assert [w["boot"] for w in wills] == boots
    finally:
        agent.kill()
        listener.loop_stop()
        listener.disconnect()


async def test_messages_over_the_limit_never_wait_in_the_operators_inbox(
    mosquitto: Mosquitto, forger: Forger
) -> None:
    """A site may publish messages of up to 256 MB (MQTT's limit; Mosquitto sets
    none): each was read whole and queued in the operator's inbox until the worker
    dropped it as too large, and state messages are outside the inbox's byte bound,
    so a site sending big heartbeats while the worker waited on the API server grew
    the operator without bound.  Now they are dropped as they arrive, never queued.
    (Not by MQTT 5's Maximum Packet Size: Mosquitto 2.0.11 then keeps the dropped
    messages' in-flight slots, and after 20 delivers nothing more at all.)"""
    limit = 64 * 1024
    async with running_cloud(mosquitto.url, max_message_bytes=limit) as cloud:
        bridge = cloud.bridge
        release = await stall_the_worker(bridge, forger)
        big = "x" * (limit * 4)
        for _ in range(20):
            forger.state(running=1, labels={"big": big})
            forger.events([(1, "log", {"tail": big})])
        # The sentinel, small, on another site's topic (one connection: in order).
        await sentinel_heard(forger, bridge)
        assert bridge._inbox.qsize() == 1, bridge._inbox.qsize()
        release.set()
        await sentinel_handled(bridge)
        assert bridge.presence.get(SITE).running == 0


@pytest.mark.parametrize("scheduled", [1e300, -1e20, "Infinity"])
async def test_a_fired_run_at_an_impossible_time_does_not_wedge_the_sites_records(
    mosquitto: Mosquitto, forger: Forger, scheduled: float | str
) -> None:
    """A run record saying a schedule placed at the site fired at 1e300 (or -1e20, or
    Infinity) raised out of the applier: the batch was never applied nor acked, and
    every resend raised again, so nothing the site wrote after it ever synced."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_cron_plan import cron

    from tideflow_operator.cron import CronPlan

    async with running_cloud(mosquitto.url) as cloud:
        applier = cloud.bridge.applier
        plan = CronPlan()
        plan.site_changed(SITE, {"region": "north"})
        plan.upsert(cron())
        applier.accept_cron = plan.accepts
        applier.expect("default", "wf", "u-1", 1, ["a"], site=SITE)
        fired = {"uid": "x", "generation": 1, "namespace": "plant-7", "name": "etl-x",
                 "phase": "Running", "cron": {"uid": "u-1", "name": "etl", "generation": 1,
                                               "scheduledTime": 0.0}}  # fmt: skip
        rows = [(1, "run", json.dumps(fired)), (2, "task", json.dumps(task("Succeeded")))]
        payload = wire.encode_events(SITE, rows).replace(
            b'"scheduledTime": 0.0', f'"scheduledTime": {scheduled}'.encode()
        )
        assert str(scheduled).encode() in payload
        forger.client.publish(wire.topic(SITE, wire.EVENTS), payload, qos=1).wait_for_publish(10)
        await until(lambda: applier.applied_through(SITE) == 2, 20, "both records consumed")
        view = applier.view("default", "wf")
        assert view is not None and view.tasks["a"].phase == "Succeeded"
        await until(lambda: forger.acks and forger.acks[-1]["payload"]["through"] == 2, 10, "ack")


@pytest.mark.parametrize(("field", "value"), [("startedAt", 1e300), ("finishedAt", "-1e20")])
async def test_a_record_with_a_time_out_of_range_does_not_stop_the_sites_acks(
    mosquitto: Mosquitto, forger: Forger, field: str, value: float | str
) -> None:
    """A task record with ``startedAt`` 1e300 was applied, but rendering the Workflow's
    status raised (no such date): its status was never written again, and the site's
    ack stayed below that record for ever, so its outbox only grew."""
    persisted: list[str] = []

    async def persist(result: Any) -> None:  # what the operator's status writer does
        for key in result.changed:
            view = cloud.bridge.applier.view(*key)
            if view is not None:
                persisted.append(json.dumps(view.to_status()))
                cloud.bridge.applier.mark_persisted(*key, view.synced_seq)

    async with running_cloud(mosquitto.url, persist=persist) as cloud:
        applier = cloud.bridge.applier
        applier.expect("default", "wf", "u-1", 1, ["a"], site=SITE)
        body = task("Succeeded") | {field: 0.0}
        rows = [(1, "task", json.dumps(body)), (2, "run", json.dumps(RUN_DONE))]
        payload = wire.encode_events(SITE, rows).replace(
            f'"{field}": 0.0'.encode(), f'"{field}": {value}'.encode()
        )
        assert str(value).encode() in payload
        forger.client.publish(wire.topic(SITE, wire.EVENTS), payload, qos=1).wait_for_publish(10)
        await until(lambda: forger.acks and forger.acks[-1]["payload"]["through"] == 2, 20, "ack")
        assert json.loads(persisted[-1])["phase"] == "Succeeded"


async def test_a_site_flooding_heartbeats_while_the_operator_waits_is_bounded_and_its_will_kept(
    mosquitto: Mosquitto, forger: Forger
) -> None:
    """State messages were outside the inbox's byte bound: a site publishing
    heartbeats as fast as it could while the worker waited on the API server grew
    the operator without bound.  Past a few of one site's heartbeats waiting, the
    next are dropped as they arrive (``state-flood``; each is a whole snapshot,
    and the site was heard all the same); a last will is never dropped."""
    async with running_cloud(mosquitto.url) as cloud:
        bridge = cloud.bridge
        release = await stall_the_worker(bridge, forger)
        for running in range(1, 201):
            forger.state(running=running)
        forger.state(online=False)  # its last will, behind the flood
        await sentinel_heard(forger, bridge)
        waiting = bridge._inbox.qsize()
        assert waiting <= MAX_STATES_WAITING + 2, waiting  # the site's few, its will, site-b's
        assert bridge.dropped["state-flood"] == 200 - MAX_STATES_WAITING, bridge.dropped
        release.set()
        await sentinel_handled(bridge)
        info = bridge.presence.get(SITE)
        assert info is not None and not info.online, "the will was handled"


async def test_a_flood_of_offline_messages_is_bounded_too(
    mosquitto: Mosquitto, forger: Forger
) -> None:
    """A last will is never dropped for the state-flood bound, and any state message
    saying ``online: false`` passed for one: a site sending big "wills" as fast as it
    could while the worker waited grew the operator's inbox without bound.  Now a
    site's wills have a bound of their own, past which they are dropped too.  (As big
    as a will may be: bigger ones are no wills, test_a_big_forged_offline_message...)"""
    from tideflow_operator.bridge import MAX_WILL_BYTES, MAX_WILLS_WAITING

    async with running_cloud(mosquitto.url) as cloud:
        bridge = cloud.bridge
        release = await stall_the_worker(bridge, forger)
        big = "x" * (MAX_WILL_BYTES - 400)
        for running in range(1, 101):
            forger.state(online=False, running=running, labels={"big": big})
        await sentinel_heard(forger, bridge)
        waiting = bridge._inbox.qsize()
        assert waiting <= MAX_WILLS_WAITING + 1, waiting  # the site's few wills, site-b's
        assert bridge.dropped["state-flood"] == 100 - MAX_WILLS_WAITING, bridge.dropped
        release.set()
        await sentinel_handled(bridge)
        info = bridge.presence.get(SITE)
        assert info is not None and not info.online, "a will was handled"
        # Taken, the slots are free again: the next will is not dropped.
        forger.state(online=True, running=1)
        await until(lambda: bridge.presence.get(SITE).online, 20, "online again")
        forger.state(online=False)
        await until(lambda: not bridge.presence.get(SITE).online, 20, "the next will")


async def test_a_site_flapping_its_database_epoch_is_not_an_event_per_heartbeat(
    mosquitto: Mosquitto, forger: Forger
) -> None:
    """Each heartbeat naming a new database (a forged or broken agent) was an epoch
    change, and each was told to ``on_epoch``, which the operator turns into a
    Kubernetes Event written while the bridge's worker waits: one site could make an
    API write per heartbeat and hold every other site's messages behind them.  Now
    a site's database change is told at most once per EPOCH_NOTICE_SECONDS (the
    change itself still takes effect: the new database's records are applied)."""
    from tideflow_operator.bridge import EPOCH_NOTICE_SECONDS

    told: list[Any] = []

    async def on_epoch(change: Any) -> None:
        told.append(change)

    assert EPOCH_NOTICE_SECONDS >= 30
    async with running_cloud(mosquitto.url, on_epoch=on_epoch) as cloud:
        bridge, applier = cloud.bridge, cloud.bridge.applier
        applier.expect("default", "wf", "u-1", 1, ["a"], site=SITE)
        for n in range(30):
            forger.state(running=1, epoch=f"db-{n}")
            await until(lambda n=n: applier.epoch(SITE) == f"db-{n}", 20, f"epoch db-{n}")
        assert len(told) <= 2, len(told)  # the first seen is adopted: none or one told
        forger.events([(1, "task", task("Succeeded"))])  # the new database's first record
        await until(lambda: applier.applied_through(SITE) == 1, 20, "its record applied")
        assert bridge.presence.get(SITE) is not None


async def test_a_fired_run_at_a_time_its_schedule_never_produces_is_refused(
    mosquitto: Mosquitto, forger: Forger, caplog: pytest.LogCaptureFixture
) -> None:
    """A site reported a '*/5 * * * *' schedule fired at 12:34:56.789, a year ahead, or
    before the CronWorkflow existed, and the operator took each for a real run (a view,
    a Workflow object to make).  Now each is refused naming the field and the site,
    counted as off_schedule, nothing kept; the real fire beside them is taken."""
    import sys
    from datetime import UTC, datetime

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_cron_plan import cron, fired

    from tideflow_operator.applier import Discard
    from tideflow_operator.cron import CronPlan, connect_plan

    now = time.time()
    created = now - 3600
    async with running_cloud(mosquitto.url) as cloud:
        applier = cloud.bridge.applier
        plan = CronPlan()
        plan.site_changed(SITE, {"region": "north"})
        body = cron(schedule="*/5 * * * *")
        body["metadata"]["creationTimestamp"] = datetime.fromtimestamp(created, UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        plan.upsert(body)
        connect_plan(plan, applier, cloud.bridge.presence)
        real = float(int(now) // 300 * 300)
        off = real - 300 + 123.789
        times = [off, real + 365 * 86_400, real - 86_400, real]
        runs = [fired(at, site=SITE).model_dump(by_alias=True, mode="json") for at in times]
        with caplog.at_level(logging.WARNING):
            forger.events([(i + 1, "run", run) for i, run in enumerate(runs)])
            await until(lambda: applier.applied_through(SITE) == 4, 20, "all four consumed")
        assert applier.discarded[Discard.OFF_SCHEDULE] == 3
        taken = applier.drain_cron_runs()
        assert [run.name for _, run in taken] == [runs[3]["name"]]
        for run in runs[:3]:
            assert applier.view(run["namespace"], run["name"]) is None
        lines = [r.getMessage() for r in caplog.records if "off_schedule" in r.getMessage()]
        assert len(lines) == 1 and "cron.scheduledTime" in lines[0] and SITE in lines[0], lines
        await until(lambda: forger.acks and forger.acks[-1]["payload"]["through"] == 4, 10, "ack")


async def test_a_fire_refused_for_a_fast_site_clock_says_how_fast_it_reads(
    mosquitto: Mosquitto, forger: Forger, caplog: pytest.LogCaptureFixture
) -> None:
    """A site whose clock runs 20 minutes fast fires '*/5 * * * *' at what it reads as
    now: the run is refused as in the future (the site's own ``sentAt`` cannot widen
    the window), and the warning said no more than that.  It now names the skew
    presence measured from the site's heartbeats, so the user knows what to fix."""
    import sys
    from datetime import UTC, datetime

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_cron_plan import cron, fired

    from tideflow_operator.applier import Discard
    from tideflow_operator.cron import CronPlan, connect_plan

    skew = 1200.0
    now = time.time()
    async with running_cloud(mosquitto.url) as cloud:
        applier, presence = cloud.bridge.applier, cloud.bridge.presence
        plan = CronPlan()
        plan.site_changed(SITE, {"region": "north"})
        body = cron(schedule="*/5 * * * *")
        made = datetime.fromtimestamp(now - 3600, UTC)
        body["metadata"]["creationTimestamp"] = made.strftime("%Y-%m-%dT%H:%M:%SZ")
        plan.upsert(body)
        connect_plan(plan, applier, presence)
        forger.state(sent_at=time.time() + skew, running=0)
        await until(lambda: getattr(presence.get(SITE), "clock_skew", None), 10, "heartbeat")
        site_now = float(int(now + skew) // 300 * 300)  # a fire time by the site's clock
        run = fired(site_now, site=SITE).model_dump(by_alias=True, mode="json")
        with caplog.at_level(logging.WARNING):
            forger.events([(1, "run", run)])
            await until(lambda: applier.applied_through(SITE) == 1, 20, "consumed")
        assert applier.discarded[Discard.OFF_SCHEDULE] == 1
        lines = [r.getMessage() for r in caplog.records if "off_schedule" in r.getMessage()]
        assert len(lines) == 1 and "in the future" in lines[0], lines
        assert re.search(rf"site {SITE}'s clock reads 1(199|200) s ahead", lines[0]), lines


async def test_a_big_forged_offline_message_is_no_will_and_keeps_the_state_flood_bound(
    mosquitto: Mosquitto, forger: Forger
) -> None:
    """Every state message was parsed whole (up to the message limit) on paho's
    network thread to tell a last will, and any saying ``online: false`` passed for
    one: a site could burn that thread's CPU and fill its wills' slots with big
    forgeries.  A real will is about 250 bytes; one over MAX_WILL_BYTES is not read
    there and counts against the site's state-flood bound like any heartbeat, so
    the site's real will still finds its slot."""
    from tideflow_operator.bridge import MAX_WILL_BYTES, MAX_WILLS_WAITING

    assert MAX_WILLS_WAITING < MAX_STATES_WAITING
    async with running_cloud(mosquitto.url) as cloud:
        bridge = cloud.bridge
        release = await stall_the_worker(bridge, forger)
        big = "x" * (MAX_WILL_BYTES + 1)
        for running in range(1, 21):
            forger.state(online=False, running=running, agentVersion="v", labels={"big": big})
        forger.state(online=False)  # the site's real (small) will, behind them
        await sentinel_heard(forger, bridge)
        # The big ones were heartbeats to the bound (not wills: 20 - MAX_WILLS_WAITING).
        assert bridge.dropped["state-flood"] == 20 - MAX_STATES_WAITING, bridge.dropped
        assert bridge._wills_waiting[SITE] == 1, bridge._wills_waiting  # the real one
        release.set()
        await sentinel_handled(bridge)
        info = bridge.presence.get(SITE)
        assert info is not None and not info.online, "the real will was handled"


async def test_over_long_labels_are_left_out_and_the_heartbeat_taken(
    mosquitto: Mosquitto, forger: Forger, caplog: pytest.LogCaptureFixture
) -> None:
    """A heartbeat's labels had a bound on their count only: 256 labels of any
    length were held for the site (and each filtered again before every EdgeSite
    write).  Now a label longer than Kubernetes takes (a value over 63 characters,
    a name over 63, a prefix over 253) is left out as the message is read, said
    once for the site, and the rest of the heartbeat is taken."""
    long = {"v": "x" * 64, "n" * 64: "v", "p" * 254 + "/n": "v", "big": "y" * 100_000}
    fine = {"region": "north", "a" * 253 + "/" + "b" * 63: "c" * 63}
    async with running_cloud(mosquitto.url) as cloud:
        presence = cloud.bridge.presence
        with caplog.at_level(logging.WARNING):
            forger.state(running=1, labels=long | fine)
            await until(lambda: presence.get(SITE) is not None, 20, "the heartbeat")
            forger.state(running=2, labels=long | fine)
            await until(lambda: presence.get(SITE).running == 2, 20, "the 2nd heartbeat")
        assert presence.get(SITE).labels == fine
        lines = [r.getMessage() for r in caplog.records if "labels" in r.getMessage()]
        assert len(lines) == 1, lines
        assert SITE in lines[0] and "4" in lines[0] and len(lines[0]) < 500, lines


async def test_a_burst_of_epoch_flips_sends_the_sites_runs_again_a_bounded_number_of_times(
    mosquitto: Mosquitto, forger: Forger
) -> None:
    """Each heartbeat naming a new database made the operator scan every view and
    send again every unfinished assignment of the site: a site flipping its epoch
    in every heartbeat made that work (and those messages) per heartbeat.  Now the
    newest epoch takes effect at once, but the sending again happens at most once
    per EPOCH_CHANGE_SECONDS for a site; flips within it are coalesced and the
    newest database is sent the runs when it ends."""
    from tideflow_operator.bridge import EPOCH_CHANGE_SECONDS

    def sent(uid: str) -> int:
        return sum(
            1 for m in list(forger.acks) if m["kind"] == "assign" and m["payload"]["uid"] == uid
        )

    forger.client.subscribe(wire.topic(SITE, wire.ASSIGN), qos=1)
    async with running_cloud(mosquitto.url) as cloud:
        bridge, applier = cloud.bridge, cloud.bridge.applier
        applier.expect("default", "wf", "u-1", 1, ["a"], site=SITE)
        forger.state(running=0, epoch="db-start")
        await until(lambda: applier.epoch(SITE) == "db-start", 20, "the first epoch adopted")
        spec = {"tasks": [{"name": "a", "command": ["true"]}]}
        assignment = {"generation": 1, "namespace": "default", "name": "wf", "spec": spec}
        bridge.assign(SITE, wire.AssignPayload(uid="u-1", **assignment))
        await until(lambda: sent("u-1") == 1, 20, "the assignment")
        for n in range(20):  # each handled before the next (none dropped as a flood)
            forger.state(running=n + 1, epoch=f"db-{n}")
            await until(lambda n=n: bridge.presence.get(SITE).running == n + 1, 20, f"db-{n}")
        assert applier.epoch(SITE) == "db-19"  # the newest database is the one acted on
        # A marker sent after them: once it is heard, every earlier message was.
        bridge.assign(SITE, wire.AssignPayload(uid="marker-1", **assignment))
        await until(lambda: sent("marker-1") >= 1, 20, "the marker")
        assert sent("u-1") == 2, sent("u-1")  # first sent, then sent again at the first flip
        # The window ends: the newest database (the 19 flips coalesced) is sent it once.
        await bridge.check_epochs(now=bridge.presence.now() + EPOCH_CHANGE_SECONDS)
        bridge.assign(SITE, wire.AssignPayload(uid="marker-2", **assignment))
        await until(lambda: sent("marker-2") >= 1, 20, "the second marker")
        assert sent("u-1") == 3, sent("u-1")
        assert applier.epoch(SITE) == "db-19"
        await bridge.check_epochs(now=bridge.presence.now() + 2 * EPOCH_CHANGE_SECONDS)
        rows = [(1, "task", json.dumps(task("Succeeded")))]
        payload = wire.encode_events(SITE, rows, epoch="db-19")
        forger.client.publish(wire.topic(SITE, wire.EVENTS), payload, qos=1).wait_for_publish(10)
        await until(lambda: applier.applied_through(SITE) == 1, 20, "db-19's record applied")
        acks = lambda: [m["payload"] for m in list(forger.acks) if m["kind"] == "ack"]  # noqa: E731
        await until(lambda: {"through": 1, "epoch": "db-19"}.items() <= acks()[-1].items()
                    if acks() else False, 10, "db-19's ack")  # fmt: skip
        assert sent("u-1") == 3, sent("u-1")  # nothing more was waiting
