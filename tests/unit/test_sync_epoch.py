"""The agent database's identity (epoch), on real SQLite files.

The epoch is made once and kept; a new file gets a new one.  Every events
batch carries it, and an ack for another epoch compacts nothing: after a
site's database is replaced, an ack of the old numbering would otherwise
delete records the cloud has never seen.
"""

from __future__ import annotations

from pathlib import Path

from edge_agent.state import RunState, TaskState
from edge_agent.store import Store
from edge_agent.sync import Syncer
from tideflow import wire


async def test_the_epoch_is_made_once_and_a_new_database_gets_another(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "a.db", synchronous="NORMAL")
    first = await store.epoch()
    assert first == await store.epoch() and len(first) >= 16
    await store.close()
    reopened = await Store.open(tmp_path / "a.db", synchronous="NORMAL")
    assert await reopened.epoch() == first
    await reopened.close()
    other = await Store.open(tmp_path / "b.db", synchronous="NORMAL")
    assert await other.epoch() != first
    await other.close()


async def test_batches_carry_the_epoch_and_acks_of_another_epoch_compact_nothing(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    run = RunState(
        run_id="u.1", uid="u", generation=1, namespace="ns", name="wf",
        spec_json='{"tasks": []}', created_at=1000.0,
    )  # fmt: skip
    tasks = [TaskState(run.run_id, f"t{i}") for i in range(3)]
    assert await store.create_run(run, tasks)
    for task in tasks:
        task.phase = "Running"
        await store.save_task(run, task)
    sent: list[tuple[str, bytes]] = []
    syncer = Syncer(store, "north", lambda topic, data: sent.append((topic, data)) or True)
    await syncer.load()
    syncer.connected = True
    assert await syncer._send_batch()
    _, payload = wire.decode(*sent[0])
    assert isinstance(payload, wire.EventsPayload)
    assert payload.epoch == await store.epoch()
    top = payload.records[-1].seq

    await syncer.on_ack(top, epoch="another-database")
    stats = await store.outbox_stats()
    assert (stats.last_acked_seq, stats.depth, syncer.acks_ignored) == (0, top, 1)

    await syncer.on_ack(2, epoch=payload.epoch)
    await syncer.on_ack(top)  # an operator that predates epochs
    stats = await store.outbox_stats()
    assert (stats.last_acked_seq, stats.depth) == (top, 0)
    await store.close()
