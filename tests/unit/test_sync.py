"""The syncer's ack rule, on a real site database: never compact what was not sent.

An ack says "the cloud applied everything through N"; the cloud can only have
applied what this agent sent.  Proves: an ack beyond the highest seq sent is
refused and deletes nothing (records written but not yet sent included); a
true ack compacts; a fresh syncer (a restarted agent) has sent nothing yet
and refuses acks until it has resent.
"""

from __future__ import annotations

from pathlib import Path

from edge_agent.state import RunState, TaskState
from edge_agent.store import Store
from edge_agent.sync import SyncConfig, Syncer


class Recorder:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def __call__(self, topic: str, payload: bytes) -> bool:
        self.sent.append(payload)
        return True


async def records(store: Store, n: int) -> None:
    run = RunState(
        run_id="u.1", uid="u", generation=1, namespace="d", name="n", spec_json="{}", created_at=1.0
    )
    if await store.create_run(run, [TaskState(run.run_id, "a")]):
        n -= 1
    for i in range(n):
        run.message = str(i)
        await store.save_run(run)


async def test_ack_beyond_what_was_sent_is_refused(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    try:
        await records(store, 5)
        syncer = Syncer(store, "s", Recorder(), SyncConfig(batch_count=3))
        await syncer.load()
        syncer.connected = True
        assert await syncer._send_batch()  # seq 1..3 sent; 4..5 written, not sent
        assert syncer.max_sent == 3
        await records(store, 2)  # 6..7
        for bogus in (4, 7, 10**9):
            assert await syncer.on_ack(bogus) is False
            assert (await store.outbox_stats()).depth == 7
        assert await syncer.on_ack(3) is True
        stats = await store.outbox_stats()
        assert (stats.depth, stats.last_acked_seq) == (4, 3)
        # A restarted agent has sent nothing in this life: it refuses until it resends.
        fresh = Syncer(store, "s", Recorder(), SyncConfig(batch_count=10))
        await fresh.load()
        assert await fresh.on_ack(5) is False
        assert (await store.outbox_stats()).depth == 4
        assert await fresh._send_batch()
        assert await fresh.on_ack(7) is True
        assert (await store.outbox_stats()).depth == 0
    finally:
        await store.close()
