"""The syncer's ack rule, on a real site database: never compact what was not sent.

An ack says "the cloud applied everything through N"; the cloud can only have
applied what this agent sent.  Proves: an ack beyond the highest seq sent is
refused and deletes nothing (records written but not yet sent included); a
true ack compacts; a fresh syncer (a restarted agent) has sent nothing yet
and refuses acks until it has resent.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from edge_agent.state import RunState, TaskState
from edge_agent.store import Store
from edge_agent.sync import SyncConfig, Syncer
from tideflow import wire


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


async def test_a_silent_cloud_is_resent_to_less_and_less_often_until_it_acks(
    tmp_path: Path,
) -> None:
    """Resend on silence backs off (10, 20, 40 s ... capped): a cloud slow to ack
    under load is not buried in duplicates.  Progress, or a new connection,
    starts over at ``ack_timeout``."""
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    try:
        await records(store, 5)
        config = SyncConfig(batch_count=10, ack_timeout=10.0, max_ack_timeout=40.0)
        syncer = Syncer(store, "s", Recorder(), config)
        now = 1000.0
        syncer.clock = lambda: now
        await syncer.load()
        syncer.link_changed(True)
        assert await syncer._send_batch()
        resent_at = []
        while now < 1200:
            now += 0.5
            if syncer.resend_if_silent():
                resent_at.append(now - 1000)
                assert syncer.sent_through == syncer.acked, "rewound to the acked mark"
                assert await syncer._send_batch()
        gaps = [b - a for a, b in zip([0.0, *resent_at], resent_at, strict=False)]
        assert [round(g) for g in gaps[:5]] == [10, 20, 40, 40, 40], gaps
        # The cloud acks: the next silence is judged against ack_timeout again.
        assert await syncer.on_ack(3) is True
        await records(store, 1)
        assert await syncer._send_batch()
        now += 9.5
        assert not syncer.resend_if_silent()
        now += 1
        assert syncer.resend_if_silent()
        assert await syncer._send_batch()
        now += 20.5
        assert syncer.resend_if_silent(), "second silent resend after 20 s"
        # A new connection, too, starts over.
        syncer.link_changed(True)
        assert await syncer._send_batch()
        now += 10.5
        assert syncer.resend_if_silent()
    finally:
        await store.close()


async def test_a_cloud_that_acks_slowly_but_surely_is_not_resent_to_before_its_usual_time(
    tmp_path: Path,
) -> None:
    """A loaded cloud (an API server behind a thousand sites) acked every batch
    after ~30 s, and each site resent its whole window every ``ack_timeout`` (10 s)
    meanwhile: 300,000 duplicates for 90,000 records at 1,000 sites, the CPU of
    the cloud that was already behind.  The silence allowed is now learnt from
    the acks' round trips, as TCP's retransmission timeout is (RFC 6298: the
    smoothed round trip plus four times its variation, at least ``ack_timeout``,
    at most ``max_ack_timeout``), and a resent batch is never timed (Karn: its
    ack may answer the first send).  A cloud that speeds up brings it back."""
    store = await Store.open(tmp_path / "site.db", synchronous="OFF")
    try:
        config = SyncConfig(batch_count=10, ack_timeout=10.0, max_ack_timeout=80.0)
        syncer = Syncer(store, "s", Recorder(), config)
        now = 1000.0
        syncer.clock = lambda: now
        await syncer.load()
        syncer.link_changed(True)
        assert syncer.resend_timeout == 10.0  # nothing learnt yet
        await records(store, 3)
        assert await syncer._send_batch()
        now += 10.5
        assert syncer.resend_if_silent(), "at first a 10 s silence is silence"
        assert await syncer._send_batch()
        now += 19.5  # the ack answers the first send, 30 s after it
        assert await syncer.on_ack(syncer.sent_through)
        for n in range(8):  # the cloud goes on answering each batch 28-32 s later
            await records(store, 3)
            assert await syncer._send_batch()
            now += 28.0 if n % 2 else 32.0
            assert not syncer.resend_if_silent(), f"batch {n}: resent to a cloud on its way"
            assert await syncer.on_ack(syncer.sent_through)
        assert 35.0 < syncer.resend_timeout <= 80.0, syncer.resend_timeout
        # Silence past what the acks taught is still silence: resent, and backed off.
        await records(store, 3)
        assert await syncer._send_batch()
        now += syncer.resend_timeout + 0.5
        assert syncer.resend_if_silent()
        assert await syncer._send_batch()
        # Its ack is timed from the first send (Karn: it may answer either send).
        now += 2.0
        assert await syncer.on_ack(syncer.sent_through)
        assert syncer.smoothed_round_trip is not None and syncer.smoothed_round_trip > 30.0
        # A reconnection's resends are timed from the resend, not across the outage.
        await records(store, 3)
        assert await syncer._send_batch()
        now += 3600.0
        syncer.link_changed(True)
        assert await syncer._send_batch()
        now += 20.0
        before = syncer.smoothed_round_trip
        assert await syncer.on_ack(syncer.sent_through)
        assert syncer.smoothed_round_trip < before
        # A cloud that catches up: the timeout comes back down to ack_timeout.
        for _ in range(40):
            await records(store, 3)
            assert await syncer._send_batch()
            now += 0.5
            assert await syncer.on_ack(syncer.sent_through)
        assert syncer.resend_timeout == 10.0
    finally:
        await store.close()


async def test_a_day_of_silence_does_not_overflow_the_backoff(tmp_path: Path) -> None:
    """1,024 silent resends in a row (a day at the 80 s cap with the broker up and
    no operator) made ``ack_timeout * 2**n`` an OverflowError that ended the
    sender task; resends go on at the cap."""
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    try:
        await records(store, 2)
        syncer = Syncer(store, "s", Recorder(), SyncConfig(ack_timeout=10.0, max_ack_timeout=80.0))
        now = 0.0
        syncer.clock = lambda: now
        await syncer.load()
        syncer.link_changed(True)
        assert await syncer._send_batch()
        syncer.silent_resends = 1100
        now += 79
        assert not syncer.resend_if_silent()
        now += 2
        assert syncer.resend_if_silent()
    finally:
        await store.close()


async def in_flight_batches(syncer: Syncer) -> int:
    """Send while the window is open; how many batches went out."""
    sent = 0
    while syncer.window_open() and await syncer._send_batch():
        sent += 1
    return sent


async def test_the_window_widens_while_acks_come_back_fast_and_narrows_when_they_do_not(
    tmp_path: Path,
) -> None:
    """A cloud that keeps up (acks within ``fast_ack_seconds``) gets more batches
    in flight, up to ``max_window_batches``: a long backlog drains without a round
    trip's wait every four batches.  A slow ack halves the window, a silent resend
    or a new connection starts it over: a loaded cloud, or a thousand sites
    reconnecting at once, get the small window."""
    store = await Store.open(tmp_path / "site.db", synchronous="OFF")
    try:
        await records(store, 400)
        config = SyncConfig(
            batch_count=5, window_batches=2, max_window_batches=8, fast_ack_seconds=1.0
        )
        syncer = Syncer(store, "s", Recorder(), config)
        now = 0.0
        syncer.clock = lambda: now
        await syncer.load()
        syncer.link_changed(True)
        assert await in_flight_batches(syncer) == 2
        widths = []
        for _ in range(4):
            now += 0.1
            assert await syncer.on_ack(syncer.sent_through)
            widths.append(await in_flight_batches(syncer))
        assert widths == [4, 8, 8, 8], "doubles per fast round trip, capped"
        now += 5.0  # the cloud took 5 s
        assert await syncer.on_ack(syncer.sent_through)
        assert await in_flight_batches(syncer) == 4, "a slow ack halves it"
        now += 0.1
        assert await syncer.on_ack(syncer.sent_through)
        assert await in_flight_batches(syncer) == 8
        now += 11.0
        assert syncer.resend_if_silent()
        assert await in_flight_batches(syncer) == 2, "a silent resend starts over"
        now += 0.1
        assert await syncer.on_ack(syncer.sent_through)
        assert await in_flight_batches(syncer) == 4
        syncer.link_changed(True)
        assert await in_flight_batches(syncer) == 2, "so does a new connection"
    finally:
        await store.close()


async def test_an_ack_for_part_of_the_window_times_its_newest_acked_batch(tmp_path: Path) -> None:
    """The round trip is measured from the newest batch the ack covers: an ack
    for the first of four batches sent long ago is slow even if later ones were
    sent a moment before it."""
    store = await Store.open(tmp_path / "site.db", synchronous="OFF")
    try:
        await records(store, 100)
        config = SyncConfig(
            batch_count=5, window_batches=4, max_window_batches=16, fast_ack_seconds=1.0
        )
        syncer = Syncer(store, "s", Recorder(), config)
        now = 0.0
        syncer.clock = lambda: now
        await syncer.load()
        syncer.link_changed(True)
        assert await in_flight_batches(syncer) == 4  # seqs 1..20
        now += 3.0
        assert await syncer.on_ack(5)  # batch one, 3 s after it was sent
        assert syncer.window_batches == 4, "never below the configured start"
        now += 0.1
        assert await syncer.on_ack(20)  # also 3.1 s after those batches went out
        assert syncer.window_batches == 4
    finally:
        await store.close()


async def test_a_stored_record_over_the_limit_is_sent_cut_and_the_same_each_time(
    tmp_path: Path,
) -> None:
    """A record an older agent stored whole (2 MB) went out whole: refused by the link
    on every resend, and nothing behind it synced.  It goes out cut to fit, the same
    bytes on every resend (the cloud applies its seq once), the records behind it too."""
    db = tmp_path / "site.db"
    store = await Store.open(db, synchronous="NORMAL")
    await records(store, 3)
    await store.close()
    huge = {"uid": "u", "generation": 1, "namespace": "d", "name": "n", "phase": "Failed",
            "message": "cannot start /" + "x" * 2_000_000}  # fmt: skip
    with sqlite3.connect(db) as conn:  # as an agent without the write-time bound stored it
        conn.execute("UPDATE outbox SET body=? WHERE seq=1", (json.dumps(huge),))
    store = await Store.open(db, synchronous="NORMAL")
    try:
        sent = Recorder()
        syncer = Syncer(store, "s", sent, SyncConfig(batch_count=10))
        await syncer.load()
        syncer.connected = True
        assert await syncer._send_batch()
        syncer.link_changed(True)  # a reconnect: everything unacked goes again
        assert await syncer._send_batch()
        assert len(sent.sent) == 2
        first = json.loads(sent.sent[0])["payload"]["records"]
        assert (
            json.loads(sent.sent[0])["payload"]["records"]
            == json.loads(sent.sent[1])["payload"]["records"]
        )
        for message in sent.sent:
            assert len(message) <= wire.DEFAULT_MAX_MESSAGE_BYTES
            wire.decode(wire.topic("s", wire.EVENTS), message)
        assert [r["seq"] for r in first] == [1]  # (alone: it was read at its stored size)
        assert "cut by the agent" in first[0]["body"]["message"]
        assert await syncer.on_ack(1) is True
        assert await syncer._send_batch()
        assert [r["seq"] for r in json.loads(sent.sent[-1])["payload"]["records"]] == [2, 3]
        assert await syncer.on_ack(3) is True
        assert (await store.outbox_stats()).depth == 0
    finally:
        await store.close()
