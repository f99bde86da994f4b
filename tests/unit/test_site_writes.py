"""EdgeSite writes never hold the bridge's worker (issue 13, a thousand sites).

The bridge's one worker reads every MQTT message in order.  It awaited each
EdgeSite status patch (and, when a site came or went, a status write of each
of its unfinished runs) before reading the next message: at 1,000 sites
heartbeating every 15 s with ~1 s API latency, heartbeats queued past the
90 s silence limit, live sites were marked offline, their return brought more
writes, and the events batches (and their acks) waited behind them, so the
agents resent.  Here the API server is a fake ``Kube`` whose EdgeSite patch
waits on a gate.

* Events batches of other sites are applied and acked while an EdgeSite
  patch hangs.
* A heartbeat storm costs at most one write per site per
  ``SITE_COUNTERS_SECONDS`` when only counters change; ``connected`` flips
  go first, at once; the last status of each site is written in the end.
* Silence is judged by when a site's message arrived, not when the worker
  got to it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tideflow import wire
from tideflow_operator.bridge import CloudBridge
from tideflow_operator.model import Held
from tideflow_operator.presence import SitePresence
from tideflow_operator.runtime import OperatorConfig, Runtime
from tideflow_operator.sites import SITE_COUNTERS_SECONDS, SITE_WRITERS, Sites

EPOCH = "e1"


class GatedKube:
    """Records writes; EdgeSite status patches wait for ``gate`` (a slow API server)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.site_patches: list[tuple[str, dict[str, Any]]] = []
        self.created: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def patch_workflow_status(self, *_: Any, **__: Any) -> str:
        return "1"

    async def patch_ledger(self, *_: Any) -> None:
        return None

    async def event(self, *_: Any, **__: Any) -> None:
        return None

    async def create_edgesite(self, name: str, labels: dict[str, str]) -> None:
        self.created.append(name)

    async def patch_edgesite_labels(self, name: str, labels: dict[str, str]) -> None:
        return None

    async def patch_edgesite_status(self, name: str, status: dict[str, Any]) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            self.site_patches.append((name, dict(status)))
        finally:
            self.in_flight -= 1

    def last(self, site: str) -> dict[str, Any]:
        return [status for name, status in self.site_patches if name == site][-1]


async def until(condition: Any, timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


def state(site: str, *, online: bool = True, running: int = 0) -> tuple[str, bytes]:
    payload = wire.StatePayload(online=online, epoch=EPOCH, running=running)
    return wire.topic(site, wire.STATE), wire.encode(wire.KIND_STATE, site, payload)


def events(site: str, seq: int) -> tuple[str, bytes]:
    record = wire.EventRecord(
        seq=seq, kind="run",
        body={"uid": f"uid-{site}", "generation": 1, "namespace": "ns", "name": site,
              "phase": "Running"},
    )  # fmt: skip
    payload = wire.EventsPayload(records=[record], epoch=EPOCH)
    return wire.topic(site, wire.EVENTS), wire.encode(wire.KIND_EVENTS, site, payload)


@pytest.fixture
async def runtime(monkeypatch: pytest.MonkeyPatch) -> Any:
    config = OperatorConfig(broker="mqtt://127.0.0.1:1")
    rt = Runtime(
        config,
        kube=GatedKube(),  # type: ignore[arg-type]
        bridge=CloudBridge(config.bridge_config()),
        quiet_seconds=0.01,
    )
    acks: list[tuple[str, int]] = []
    monkeypatch.setattr(
        rt.bridge, "send_ack",
        lambda site, resend=False: acks.append((site, rt.applier.ackable_through(site))),
    )  # fmt: skip
    rt.acks = acks  # type: ignore[attr-defined]
    yield rt
    await rt.sites.stop()


async def test_events_are_applied_and_acked_while_an_edgesite_patch_hangs(
    runtime: Runtime,
) -> None:
    kube: GatedKube = runtime.kube  # type: ignore[assignment]
    kube.gate.clear()  # the API server does not answer EdgeSite patches
    sites = [f"site-{i}" for i in range(20)]
    messages = [state(site) for site in sites]  # each comes online: a write each
    messages += [events(site, 1) for site in sites]
    await asyncio.wait_for(runtime.bridge.handle_many(messages), 2.0)
    # Every batch applied and acked though not one EdgeSite patch has returned.
    assert sorted(runtime.acks) == sorted((site, 1) for site in sites)  # type: ignore[attr-defined]
    assert all(runtime.applier.applied_through(site) == 1 for site in sites)
    await until(lambda: kube.in_flight == SITE_WRITERS)
    assert kube.most_in_flight <= SITE_WRITERS  # a few in flight, not one per site
    kube.gate.set()
    await until(lambda: {name for name, _ in kube.site_patches} == set(sites))
    assert all(kube.last(site)["connected"] is True for site in sites)


async def test_a_heartbeat_storm_costs_one_write_per_site_per_interval() -> None:
    kube = GatedKube()
    now = [1000.0]
    presence = SitePresence(clock=lambda: now[0])
    sites = Sites(
        kube, presence, None, None, Held(), auto_register=True,  # type: ignore[arg-type]
        clock=lambda: now[0],
    )  # fmt: skip
    names = [f"site-{i}" for i in range(30)]
    sent = [2_000_000_000.0]

    async def heartbeat(site: str, *, online: bool = True, running: int = 0) -> None:
        sent[0] += 0.01
        payload = wire.StatePayload(online=online, epoch=EPOCH, running=running)
        await sites.offer(presence.observe(site, payload, sent_at=sent[0]))

    try:
        for site in names:
            await heartbeat(site)  # registered and online: written at once
        await until(lambda: len(kube.site_patches) == len(names))
        assert sorted(kube.created) == sorted(names)
        for running in range(1, 6):  # a wave: every heartbeat changes the counters
            for site in names:
                await heartbeat(site, running=running)
        await asyncio.sleep(0.05)  # (nothing to wait for: nothing may be written)
        assert len(kube.site_patches) == len(names)
        # A flip is not held back by the interval, and goes before the counters.
        await heartbeat(names[0], online=False)
        await until(lambda: len(kube.site_patches) == len(names) + 1)
        assert kube.site_patches[-1][0] == names[0]
        assert kube.site_patches[-1][1]["connected"] is False
        now[0] += SITE_COUNTERS_SECONDS
        await heartbeat(names[0], running=9)  # back: written at once, reads connected
        # Due now: each site's newest status, once.
        await until(lambda: len(kube.site_patches) == 2 * len(names) + 1)
        await asyncio.sleep(0.05)
        assert len(kube.site_patches) == 2 * len(names) + 1
        assert kube.last(names[0])["connected"] is True
        assert kube.last(names[0])["running"] == 9
        assert all(kube.last(site)["running"] == 5 for site in names[1:])
    finally:
        await sites.stop()


async def test_a_site_that_went_and_came_back_while_its_write_hung_reads_connected() -> None:
    kube = GatedKube()
    presence = SitePresence()
    sites = Sites(kube, presence, None, None, Held(), auto_register=True)  # type: ignore[arg-type]
    sent = [2_000_000_000.0]

    async def heartbeat(online: bool) -> None:
        sent[0] += 1
        payload = wire.StatePayload(online=online, epoch=EPOCH)
        await sites.offer(presence.observe("site-a", payload, sent_at=sent[0]))

    try:
        kube.gate.clear()
        await heartbeat(True)
        await until(lambda: kube.in_flight == 1)
        await heartbeat(False)
        await heartbeat(True)
        kube.gate.set()
        await until(lambda: kube.in_flight == 0 and len(kube.site_patches) >= 2)
        await asyncio.sleep(0.05)
        assert kube.last("site-a")["connected"] is True
        assert len(kube.site_patches) <= 3  # coalesced: never one per message
    finally:
        await sites.stop()


async def test_silence_is_judged_by_arrival_not_by_when_the_worker_got_to_it() -> None:
    bridge = CloudBridge(OperatorConfig(broker="mqtt://127.0.0.1:1").bridge_config())
    limit = bridge.config.site_silence_seconds
    topic, data = state("site-a")
    await bridge.handle(topic, data)
    assert bridge.presence.connected("site-a")
    later = bridge.presence.get("site-a").last_seen + limit + 1  # type: ignore[union-attr]
    # A heartbeat arrived in time but waits in the inbox behind a backlog.
    bridge.arrived(*state("site-a"), at=later - 1)
    assert await bridge.check_silence(now=later) == []
    assert bridge.presence.connected("site-a")
    assert await bridge.check_silence(now=later + limit) == ["site-a"]
