"""The fleet simulator's in-memory outbox drives the agent's real :class:`Syncer`.

``bench/fleet_sim.py`` builds each simulated site from the agent's own syncer
over :class:`MemoryOutbox`; when the syncer starts calling a store method the
outbox lacks, every simulated site's sender dies and the fleet benchmark and
the shards e2e test see no record at all.  This runs the syncer over it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from pathlib import Path

import pytest

from edge_agent.sync import SyncConfig, Syncer
from tideflow import wire

REPO = Path(__file__).resolve().parents[2]


async def test_the_agents_syncer_sends_and_compacts_the_simulators_outbox(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(REPO))  # bench/ is run from the root, not installed
    outbox = importlib.import_module("bench.fleet_sim").MemoryOutbox()
    for i in range(5):
        outbox.append("run", {"uid": f"u{i}"})
    sent: list[tuple[str, bytes]] = []

    def publish(topic: str, payload: bytes) -> bool:
        sent.append((topic, payload))
        return True

    syncer = Syncer(outbox, "sim-1", publish, SyncConfig(batch_count=2))  # type: ignore[arg-type]
    await syncer.load()
    syncer.link_changed(True)
    task = asyncio.create_task(syncer.run())
    try:
        async with asyncio.timeout(10):
            while len(sent) < 1:
                await asyncio.sleep(0.01)
            assert sent[0][0] == wire.topic("sim-1", wire.EVENTS)
            first = json.loads(sent[0][1])["payload"]["records"]
            assert [r["seq"] for r in first] == [1, 2]
            assert await syncer.on_ack(2)
            while outbox.last_acked < 2:
                await asyncio.sleep(0.01)
            assert [r.seq for r in outbox.records] == [3, 4, 5]
    finally:
        task.cancel()
