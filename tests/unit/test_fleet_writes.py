"""What a fleet costs the API server: writes the operator makes, and what holds them back.

Found with ``bench/fleet.py`` (issue 13).  No API server here: a fake ``Kube``
passed to the runtime records every write.

* A run's progress is written at most every ``PROGRESS_SECONDS`` per
  Workflow; phase changes and ``suspended`` go at once (a three-task run is
  Assigned, Running, Succeeded: three status writes, not one per task).
* A sustained stream of admissions holds the other writes (and so the sites'
  acks) back once, for ``SETTLE_LIMIT_SECONDS``, not for as long as it lasts:
  at a thousand sites the stream never paused and no record's status was
  written for minutes.
* A heartbeat that changes nothing writes nothing to its EdgeSite, however
  long ago the last write was.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tideflow import wire
from tideflow_operator.admission import AdmissionGate, Outcome
from tideflow_operator.bridge import ACK_REFRESH_SECONDS, CloudBridge
from tideflow_operator.model import Held
from tideflow_operator.presence import SitePresence
from tideflow_operator.runtime import OperatorConfig, Runtime
from tideflow_operator.sites import Sites

SITE = "site-a"
EPOCH = "e1"


class FakeKube:
    def __init__(self) -> None:
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.site_patches: list[tuple[str, dict[str, Any]]] = []

    async def patch_workflow_status(
        self, namespace: str, name: str, status: dict[str, Any], **_: Any
    ) -> str:
        self.patches.append((name, status))
        return str(len(self.patches))

    async def patch_ledger(self, *_: Any) -> None:
        return None

    async def read_ledgers(self, namespace: str) -> dict[str, dict[str, str]]:
        return {}

    async def list_workflow_uids(self, namespaces: Any = None) -> dict[str, bool]:
        return {"uid-wf": False}

    async def event(self, *_: Any, **__: Any) -> None:
        return None

    async def create_edgesite(self, name: str, labels: dict[str, str]) -> None:
        return None

    async def patch_edgesite_status(self, name: str, status: dict[str, Any]) -> None:
        self.site_patches.append((name, status))


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Runtime:
    config = OperatorConfig(broker="mqtt://127.0.0.1:1")
    rt = Runtime(
        config,
        kube=FakeKube(),  # type: ignore[arg-type]
        bridge=CloudBridge(config.bridge_config()),
        quiet_seconds=0.01,
    )
    monkeypatch.setattr(rt.bridge, "assign", lambda *a, **k: True)
    return rt


def workflow(tasks: int = 3) -> dict[str, Any]:
    steps = [{"name": f"t{i}", "command": ["true"]} for i in range(tasks)]
    return {
        "metadata": {"namespace": "ns", "name": "wf", "uid": "uid-wf", "generation": 1},
        "spec": {"placement": {"site": SITE}, "tasks": steps},
    }


class Site:
    """Records as an agent numbers them."""

    def __init__(self) -> None:
        self.seq = 0

    def batch(self, *bodies: tuple[str, dict[str, Any]]) -> wire.EventsPayload:
        records = []
        for kind, body in bodies:
            self.seq += 1
            base = {"uid": "uid-wf", "generation": 1, "namespace": "ns", "name": "wf"}
            records.append(wire.EventRecord(seq=self.seq, kind=kind, body={**base, **body}))
        return wire.EventsPayload(records=records, epoch=EPOCH)


def run(phase: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    return "run", {"phase": phase, **extra}


def task(name: str, phase: str) -> tuple[str, dict[str, Any]]:
    return "task", {"task": name, "phase": phase, "attempt": 1}


async def apply(rt: Runtime, payload: wire.EventsPayload) -> None:
    await rt.persist(rt.applier.apply_batch(SITE, payload))


def phases(rt: Runtime) -> list[tuple[str, str]]:
    return [(s["phase"], s["progress"]) for _, s in rt.kube.patches]  # type: ignore[attr-defined]


async def test_a_short_run_is_written_three_times_progress_coalesced(runtime: Runtime) -> None:
    assert await runtime.admit(workflow()) is Outcome.ASSIGNED
    site = Site()
    await apply(runtime, site.batch(run("Pending"), run("Running"), task("t0", "Running")))
    await apply(runtime, site.batch(task("t0", "Succeeded"), task("t1", "Running")))
    await apply(runtime, site.batch(task("t1", "Succeeded"), task("t2", "Running")))
    key = ("ns", "wf")
    assert key in runtime.dirty  # progress waits (and its ack with it) ...
    assert runtime.applier.ackable_through(SITE) == 3
    await apply(runtime, site.batch(task("t2", "Succeeded"), run("Succeeded")))
    # ... and goes with the next phase change.
    assert phases(runtime) == [("Assigned", "0/3"), ("Running", "0/3"), ("Succeeded", "3/3")]
    assert key not in runtime.dirty
    assert runtime.applier.ackable_through(SITE) == site.seq


async def test_held_back_progress_is_written_by_housekeeping_when_due(runtime: Runtime) -> None:
    assert await runtime.admit(workflow()) is Outcome.ASSIGNED
    site = Site()
    await apply(runtime, site.batch(run("Pending"), run("Running"), task("t0", "Running")))
    await apply(runtime, site.batch(task("t0", "Succeeded"), task("t1", "Running")))
    assert phases(runtime)[-1] == ("Running", "0/3")
    runtime.records[("ns", "wf")].write_after = 0.0  # its time has come
    await runtime.housekeeper.round()
    assert phases(runtime)[-1] == ("Running", "1/3")
    assert runtime.applier.ackable_through(SITE) == site.seq


async def test_suspended_is_written_at_once(runtime: Runtime) -> None:
    assert await runtime.admit(workflow()) is Outcome.ASSIGNED
    site = Site()
    await apply(runtime, site.batch(run("Pending"), run("Running"), task("t0", "Running")))
    await apply(runtime, site.batch(run("Running", suspended=True)))
    assert runtime.kube.patches[-1][1]["suspended"] is True  # type: ignore[attr-defined]


async def test_a_stream_of_admissions_holds_other_writes_back_once_not_for_ever() -> None:
    gate = AdmissionGate(quiet_seconds=0.01, limit_seconds=0.3)
    gate.started()  # admissions keep coming: it never goes quiet
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(gate.settled(), 0.05)  # the burst goes first ...
    await gate.settled()  # ... for up to the limit since it began ...
    await asyncio.wait_for(gate.settled(), 0.05)  # ... and then the other writes go too
    gate.done()
    await asyncio.wait_for(gate.quiet(), 1.0)
    gate.started()  # a new burst after a pause goes first again
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(gate.settled(), 0.05)


async def test_a_heartbeat_that_changes_nothing_writes_nothing() -> None:
    kube = FakeKube()
    now = [1000.0]
    presence = SitePresence(clock=lambda: now[0])
    sites = Sites(
        kube, presence, None, None, Held(), auto_register=True,  # type: ignore[arg-type]
        clock=lambda: now[0],
    )  # fmt: skip
    sites.known[SITE] = {"labels": {}, "status": {}}

    async def heartbeat(running: int = 0) -> None:
        state = wire.StatePayload(online=True, epoch=EPOCH, running=running)
        update = presence.observe(SITE, state, sent_at=now[0])
        await sites.on_presence(update)

    await heartbeat()  # came online: written
    for _ in range(240):  # an hour of heartbeats every 15 s
        now[0] += 15
        await heartbeat()
    assert len(kube.site_patches) == 1
    await heartbeat(running=1)  # a change is written
    assert len(kube.site_patches) == 2
    assert kube.site_patches[-1][1]["running"] == 1


async def test_a_site_coming_back_rewrites_its_unfinished_runs_only(runtime: Runtime) -> None:
    assert await runtime.admit(workflow(tasks=1)) is Outcome.ASSIGNED
    site = Site()
    await apply(runtime, site.batch(run("Pending"), run("Running"), task("t0", "Running")))
    await apply(runtime, site.batch(task("t0", "Succeeded"), run("Succeeded")))
    finished = len(runtime.kube.patches)  # type: ignore[attr-defined]
    # It finished before the operator heard the site (a retained state is not trusted):
    # written as offline.  The site's first live state corrects that, once.
    assert runtime.kube.patches[-1][1]["siteConnected"] is False  # type: ignore[attr-defined]
    presence = runtime.bridge.presence
    state = wire.StatePayload(online=True, epoch=EPOCH)
    await runtime.sites.on_presence(presence.observe(SITE, state, sent_at=presence_time()))
    corrected = runtime.kube.patches[finished:]  # type: ignore[attr-defined]
    assert [(name, body["siteConnected"]) for name, body in corrected] == [("wf", True)]
    for online in (False, True):  # the site goes (its last will) and comes back
        state = wire.StatePayload(online=online, epoch=EPOCH)
        await runtime.sites.on_presence(presence.observe(SITE, state, sent_at=presence_time()))
    # A finished run's SiteConnected condition is not worth a write per site reconnect
    # (a broker restart reconnects every site of a fleet at once).
    assert len(runtime.kube.patches) == finished + 1  # type: ignore[attr-defined]

    other = workflow(tasks=1)
    other["metadata"].update(name="live", uid="uid-live")
    assert await runtime.admit(other) is Outcome.ASSIGNED
    before = len(runtime.kube.patches)  # type: ignore[attr-defined]
    state = wire.StatePayload(online=False, epoch=EPOCH)
    await runtime.sites.on_presence(presence.observe(SITE, state, sent_at=presence_time()))
    written = [name for name, _ in runtime.kube.patches[before:]]  # type: ignore[attr-defined]
    assert written == ["live"]
    assert runtime.kube.patches[-1][1]["siteConnected"] is False  # type: ignore[attr-defined]
    await runtime.errands.wait()  # the Assigned Events


_TICK = [2_000_000_000.0]


def presence_time() -> float:
    _TICK[0] += 1.0
    return _TICK[0]


async def test_phase_events_never_hold_the_sites_ack_back(runtime: Runtime) -> None:
    # Events were posted one by one before the ack: at 200 sites a group of
    # batches waited on a hundred Event POSTs, the sites heard no ack for 10 s
    # and sent their outboxes again (44,000 duplicates for 10,800 records).
    release = asyncio.Event()
    posted: list[str] = []

    async def slow_event(obj: dict[str, Any], kind: str, reason: str, *_: Any, **__: Any) -> None:
        await release.wait()
        posted.append(reason)

    runtime.kube.event = slow_event  # type: ignore[method-assign]
    assert await runtime.admit(workflow(tasks=1)) is Outcome.ASSIGNED
    site = Site()
    await asyncio.wait_for(
        apply(runtime, site.batch(run("Pending"), run("Running"), task("t0", "Running"))), 1.0
    )
    assert runtime.applier.ackable_through(SITE) == site.seq
    # (Only a Failed run has a phase Event now, decision 0019: the same holds for it.)
    await asyncio.wait_for(apply(runtime, site.batch(task("t0", "Failed"), run("Failed"))), 1.0)
    assert runtime.applier.ackable_through(SITE) == site.seq
    release.set()
    await runtime.errands.wait()
    assert posted == ["Failed"]


async def test_housekeeping_acks_a_site_again_only_when_its_ack_changed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unchanged ack is not published every round (at 1,000 sites: 1,000 a second).

    Each queued QoS 1 publish is a paho message of about 2 KB until the broker
    acknowledges it; at a fleet's scale the housekeeping acks outran the link
    and were the largest thing the operator held (issue 13).  A lost ack still
    comes again: the site resends on silence and every batch is answered, and
    here every ``ACK_REFRESH_SECONDS`` and after the site comes online.
    """
    now = [1000.0]
    runtime.bridge.presence._clock = lambda: now[0]
    acks: list[int] = []  # the "through" of each ack published

    def publish(topic: str, payload: bytes) -> bool:
        if topic.endswith("/" + wire.ACKS):
            acks.append(wire.decode(topic, payload)[1].through)  # type: ignore[attr-defined]
        return True

    monkeypatch.setattr(runtime.bridge, "_publish", publish)
    assert await runtime.admit(workflow()) is Outcome.ASSIGNED
    site = Site()
    await apply(runtime, site.batch(run("Pending")))
    for _ in range(3):
        await runtime.housekeeper.round()
    assert acks == [1]  # once, not every round
    await apply(runtime, site.batch(run("Running")))
    await runtime.housekeeper.round()
    await runtime.housekeeper.round()
    assert acks == [1, 2]  # a change, sent once
    now[0] += ACK_REFRESH_SECONDS + 1
    await runtime.housekeeper.round()
    assert acks == [1, 2, 2]  # unchanged, but a while ago: sent again
    runtime.bridge.send_ack(SITE, resend=True)  # a batch's own ack (or a request) always goes
    assert acks == [1, 2, 2, 2]
