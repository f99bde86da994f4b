"""Store-and-forward: drains the outbox to the cloud while the link is up.

The outbox is the truth; the link is a pipe that may break at any byte.  The
syncer sends records after the last acknowledged ``seq`` in batches bounded
by count and bytes, keeps a window of batches in flight (fewer, larger
messages instead of a wide MQTT inflight window), and on each ack from the
cloud compacts what was acknowledged.  The window starts small and widens
while acks come back fast (a cloud keeping up with a long backlog is not made
to wait a round trip every few batches), and narrows when they come back slow
(decision 0030).  If no ack advances for
``ack_timeout`` seconds, or the link comes back, it rewinds to the last
acknowledged seq and sends again: the cloud ignores what it already applied,
so a resend is always safe.  Safe, not free: a cloud slow to ack (an API
server under load) would get the whole window again every ``ack_timeout``,
more work for the process that is already behind.  So each further silent
resend waits twice as long, up to ``max_ack_timeout`` (TCP's retransmission
backoff); an advancing ack or a new connection starts over.  And the silence
that counts is learnt from the acks' own round trips (``resend_timeout``, TCP's
RFC 6298 estimator, between ``ack_timeout`` and ``max_ack_timeout``): a cloud
that acks every batch 30 s late, but acks it, is not sent it again meanwhile.

Epochs: every batch carries the database's identity (:meth:`Store.epoch`),
and an ack that names another epoch is ignored.  An ack is about the
numbering of one database: after the site's database is replaced, an ack
still in flight for the old one (or the operator's periodic re-ack of the old
mark) would otherwise compact new records the cloud never saw.

Disk budget: when the outbox holds more than ``budget_bytes`` the agent
refuses new assignments (and says so in its state message) but keeps running
and recording what it has; records are never dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.state import record_json
from edge_agent.store import Store
from tideflow import wire
from tideflow.failpoints import failpoint

log = logging.getLogger(__name__)

Publisher = Callable[[str, bytes], bool]


@dataclass
class SyncConfig:
    batch_count: int = 1000
    batch_bytes: int = 256 * 1024
    window_batches: int = 4  # batches in flight at first, after a silent resend or a reconnect
    max_window_batches: int = 16  # ... and at most, while acks come back fast
    fast_ack_seconds: float = 1.0  # an ack this soon after its batch was sent widens the window
    ack_timeout: float = 10.0  # silence before a resend, until acks teach a longer one
    max_ack_timeout: float = 80.0  # silent resends back off up to this
    idle_poll: float = 1.0
    budget_bytes: int = 512 * 1024 * 1024


class Syncer:
    def __init__(
        self, store: Store, site: str, publish: Publisher, config: SyncConfig | None = None
    ) -> None:
        self.store = store
        self.site = site
        self.publish = publish
        self.config = config or SyncConfig()
        self.topic = wire.topic(site, wire.EVENTS)
        self.connected = False
        self.acked = 0
        self.sent_through = 0
        # The highest seq this process has published: an ack beyond it would
        # delete records the cloud cannot have applied, so it is refused.
        # (Not persisted: after a restart an ack for what the previous process
        # sent is refused once; the resend from ``acked`` is acked again.)
        self.max_sent = 0
        self.clock: Callable[[], float] = time.monotonic
        self.last_progress = self.clock()
        self.silent_resends = 0  # in a row, since the last progress or connection
        self._kick = asyncio.Event()
        self.records_sent = 0
        self.batches_sent = 0
        self.last_ack_at: float | None = None
        self.epoch: str | None = None
        self.acks_ignored = 0
        self.window_batches = self.config.window_batches
        # (last seq of a batch, when it was sent) for the batches in flight, oldest first.
        self._sent_at: collections.deque[tuple[int, float]] = collections.deque()
        # (last seq of a batch, when its newest record was first sent) since the last
        # connection: what the acks' round trips are timed from (see resend_timeout).
        self._first_sent: collections.deque[tuple[int, float]] = collections.deque()
        self.smoothed_round_trip: float | None = None
        self.round_trip_variation = 0.0

    async def load(self) -> None:
        self.epoch = await self.store.epoch()
        self.acked = int(await self.store.get_meta("last_acked_seq") or 0)
        self.sent_through = self.acked
        self.max_sent = self.acked
        self._first_sent.clear()

    def kick(self) -> None:
        self._kick.set()

    def link_changed(self, connected: bool) -> None:
        self.connected = connected
        # Whatever was in flight may be lost with the connection: start over
        # from what the cloud acknowledged.  (Its acks would time the outage.)
        self.sent_through = self.acked
        self._first_sent.clear()
        self.last_progress = self.clock()
        self.silent_resends = 0
        self._restart_window()
        self._kick.set()

    def window_open(self) -> bool:
        return self.sent_through - self.acked < self.window_batches * self.config.batch_count

    def _restart_window(self) -> None:
        self.window_batches = self.config.window_batches
        self._sent_at.clear()

    def _time_round_trip(self, through: int) -> None:
        """Widen or narrow the window by how soon this ack followed its batch.

        Slow start, timed by delay: each fast ack lets as many more batches
        fly as it acknowledged (the window doubles per round trip, up to
        ``max_window_batches``); a slow one (the cloud is behind: an API
        server under load, a mass reconnection) halves it, never below the
        configured start.
        """
        sent_at = None
        acked_batches = 0
        while self._sent_at and self._sent_at[0][0] <= through:
            sent_at = self._sent_at.popleft()[1]
            acked_batches += 1
        if sent_at is None:
            return
        start = self.config.window_batches
        if self.clock() - sent_at <= self.config.fast_ack_seconds:
            ceiling = max(start, self.config.max_window_batches)
            self.window_batches = min(ceiling, self.window_batches + acked_batches)
        else:
            self.window_batches = max(start, self.window_batches // 2)

    @property
    def resend_timeout(self) -> float:
        """How long a silence must last before a resend, before any backing off.

        Learnt from the acks' round trips, as TCP's retransmission timeout
        (RFC 6298): the smoothed round trip plus four times its variation, at
        least ``ack_timeout`` and at most ``max_ack_timeout``.  A cloud that acks
        every batch 30 s after it was sent (an API server behind a thousand
        sites) is not sent everything again every 10 s meanwhile.
        """
        floor = self.config.ack_timeout
        if self.smoothed_round_trip is None:
            return floor
        learnt = self.smoothed_round_trip + 4 * self.round_trip_variation
        return max(floor, min(learnt, self.config.max_ack_timeout))

    def _learn_round_trip(self, through: int) -> None:
        """Time the ack from the first send of the newest record it covers.

        From the first send, not the latest: a resent record's ack may answer
        either (Karn), and taking the resend's would teach the timeout that
        sent it too early.  The longer reading errs towards fewer resends; a
        lost record is resent on the next connection anyway.
        """
        first_sent = None
        while self._first_sent and self._first_sent[0][0] <= through:
            first_sent = self._first_sent.popleft()[1]
        if first_sent is None:
            return
        sample = self.clock() - first_sent
        if self.smoothed_round_trip is None:
            self.smoothed_round_trip, self.round_trip_variation = sample, sample / 2
            return
        error = abs(self.smoothed_round_trip - sample)
        self.round_trip_variation = 0.75 * self.round_trip_variation + 0.25 * error
        self.smoothed_round_trip = 0.875 * self.smoothed_round_trip + 0.125 * sample

    def resend_if_silent(self) -> bool:
        """Rewind to the acked mark if the cloud has been silent too long."""
        if self.sent_through <= self.acked:
            return False
        base = self.resend_timeout
        timeout = min(
            # The exponent is bounded: 2**1024 is past float, and a day of silence gets there.
            base * 2 ** min(self.silent_resends, 32),
            max(self.config.max_ack_timeout, base),
        )
        if self.clock() - self.last_progress <= timeout:
            return False
        log.info("no ack for %.0fs; resending from seq %d", timeout, self.acked + 1)
        self.sent_through = self.acked
        self.last_progress = self.clock()
        self.silent_resends += 1
        self._restart_window()
        return True

    async def on_ack(self, through: int, *, resend: bool = False, epoch: str | None = None) -> bool:
        """Apply an ack; False (nothing changed) if it is beyond what was ever sent.

        An ack naming another database's epoch (this site's database was
        replaced) is ignored and counted, not refused.
        """
        if epoch is not None and epoch != self.epoch:
            self.acks_ignored += 1
            log.info("ignored an ack through %d for database epoch %s (ours: %s)",
                     through, epoch, self.epoch)  # fmt: skip
            return True
        if through > self.max_sent:
            return False
        if resend:
            # The cloud saw a gap (or a new operator saw our outbox): what
            # follows ``through`` is lost in transit.  The cloud is listening.
            self.sent_through = max(self.acked, min(self.sent_through, through))
            self.silent_resends = 0
            self._restart_window()
            self._kick.set()
        if through <= self.acked:
            return True
        failpoint("ack-received")
        # The cloud has applied (and stored) everything through ``through``: the
        # window opens now, so the next batch is read (on the store's read
        # connection, beside the compaction below) without waiting for that
        # fsync.  A crash before the compaction commits only resends from the
        # stored mark, which the cloud ignores.
        self.acked = through
        self.sent_through = max(self.sent_through, through)
        self._time_round_trip(through)
        self._learn_round_trip(through)
        self.last_progress = self.clock()
        self.silent_resends = 0
        self._kick.set()
        removed = await self.store.ack(through)
        failpoint("ack-applied")
        self.acked = max(self.acked, self.store.acked_mark)
        self.sent_through = max(self.sent_through, self.acked)
        self.last_ack_at = time.time()
        log.debug("cloud applied through %d (%d records compacted)", through, removed)
        self._kick.set()
        return True

    async def run(self) -> None:
        while True:
            if self.connected:
                self.resend_if_silent()
                if self.window_open() and await self._send_batch():
                    continue
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
            # that lands as its timeout fires, and the daemon never stopped.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.idle_poll):
                    await self._kick.wait()
            self._kick.clear()

    async def _send_batch(self) -> bool:
        batch = await self.store.outbox_batch(
            self.sent_through, max_count=self.config.batch_count, max_bytes=self.config.batch_bytes
        )
        if not batch:
            return False
        if any(len(body) > wire.MAX_RECORD_BYTES for _, _, body in batch):
            batch = [_fitted(row) for row in batch]
        payload = wire.encode_events(self.site, batch, epoch=self.epoch)
        if not self.publish(self.topic, payload):
            return False
        if self.sent_through == self.acked:
            self.last_progress = self.clock()
        failpoint("records-sent")
        self.sent_through = batch[-1][0]
        self._sent_at.append((self.sent_through, self.clock()))
        # Timed from here if first sent now (or first since the connection came back).
        if not self._first_sent or self._first_sent[-1][0] < self.sent_through:
            self._first_sent.append((self.sent_through, self.clock()))
        self.max_sent = max(self.max_sent, self.sent_through)
        self.records_sent += len(batch)
        self.batches_sent += 1
        return True

    async def over_budget(self) -> bool:
        return (await self.store.outbox_stats()).bytes > self.config.budget_bytes


def _fitted(row: tuple[int, str, str]) -> tuple[int, str, str]:
    """A stored record over ``MAX_RECORD_BYTES`` (written by an older agent), cut to fit.

    Sent whole, the link refuses it on every resend and nothing behind it
    syncs.  Cutting is deterministic, so every resend of the seq is the same
    record, and the cloud applies it once.
    """
    seq, kind, body = row
    if len(body) <= wire.MAX_RECORD_BYTES:
        return row
    log.warning("outbox record %d (%s) is %d bytes, over the %d-byte record limit: "
                "sending it cut to fit", seq, kind, len(body), wire.MAX_RECORD_BYTES)  # fmt: skip
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    # (Not an object: the cloud skips it as malformed, and the outbox goes on.)
    return seq, kind, record_json(value) if isinstance(value, dict) else "{}"
