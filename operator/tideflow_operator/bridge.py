"""The cloud's MQTT bridge: assignments out, events in, acks back.

This is the operator's only MQTT module.  It owns a :class:`~tideflow.mqtt.MqttLink`
subscribed to every site's ``events`` and ``state``, and:

* feeds ``events`` batches to the :class:`~tideflow_operator.applier.Applier`
  (in order, exactly once per site), lets the caller persist the changed
  views (the operator patches Workflow statuses), and only then acks the
  highest seq that is both applied and persisted;
* keeps every assignment and control it sent until the site proves it has
  it (a record of that run was applied, or a receipt came back) and sends
  them again whenever the site comes online: the broker's queue is a
  convenience, not a guarantee (Mosquitto drops QoS 1 messages beyond
  ``max_queued_messages`` without a word);
* tracks presence from ``state`` (online, last will, heartbeat counters),
  live messages only: a retained copy handed out on subscribe is ignored, as
  a clustered broker's node may hold a stale one (decision 0012), so after a
  start the operator knows a site within one heartbeat;
* follows each site's database identity (``epoch``, on ``events`` and
  ``state``): when a site's agent starts on a new database, the applier starts
  the site's sequence again, the bridge sends again every assignment of the
  site's unfinished runs (the new database holds none of them; an assignment
  is kept until its run is seen to finish, not merely until the site proves
  it has it), tells ``on_epoch`` (the operator records an Event; at most once
  per :data:`EPOCH_NOTICE_SECONDS` per site), and acks
  name the epoch they acknowledge so the new database never compacts records
  on the strength of the old numbering.  The sending again (and the scan for
  the unfinished runs) happens at most once per :data:`EPOCH_CHANGE_SECONDS`
  per site; changes within that are coalesced to the newest (decision 0033).

Everything the link receives is stamped on arrival (a site's presence and
silence count from the stamp, not from when the worker gets to it) and
handled in arrival order on the asyncio loop; ``on_presence`` must not wait
on the API server (the EdgeSites are written by ``sites.py``'s writers).
When messages queue up (the API server is slower than the sites), a run of
``events`` batches is applied one by one but persisted as one group, so a
Workflow that several batches changed gets one status patch, not one per
batch.  Malformed messages are counted and dropped with one log line.

Why one module of ~700 lines: receiving, acking and re-sending share each
site's state (what it was sent and has not proved it holds, when it was last
heard, its events waiting in the inbox); split, each part would reach into
the other's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tideflow import wire
from tideflow.failpoints import failpoint
from tideflow.logs import LogBudget
from tideflow.mqtt import (
    BrokerAddress,
    BrokerConnection,
    BrokerFileError,
    LinkConfig,
    MqttLink,
    broker_file_problem,
)
from tideflow.phases import RunPhase
from tideflow.spec import site_spec
from tideflow.wire_events import CheckedBatch, decode_batch

from .applier import Applier, ApplyResult, EpochChange
from .presence import PresenceUpdate, SitePresence
from .shards import ShardRouter

log = logging.getLogger(__name__)

__all__ = [
    "BridgeConfig",
    "BrokerAddress",
    "CloudBridge",
    "InvalidSiteName",
    "check_site_name",
]

# Receipt phases that mean the site holds a live run (kept until it finishes).
_LIVE = frozenset({RunPhase.PENDING, RunPhase.RUNNING})
# The receipt of an assignment the site refused (outbox over budget, spec it cannot take).
REJECTED = "Rejected"

Persist = Callable[[ApplyResult], Awaitable[None]]
PresenceListener = Callable[[PresenceUpdate], Awaitable[None]]
ReceiptListener = Callable[[str, wire.ReceiptPayload], Awaitable[None]]
EpochListener = Callable[[EpochChange], Awaitable[None]]


class InvalidSiteName(ValueError):
    """A site name that cannot be a topic level (``+``, ``#``, ``/``, upper case...)."""


def check_site_name(site: str) -> None:
    if not isinstance(site, str) or not _SITE_NAME.fullmatch(site):
        raise InvalidSiteName(
            f"site name {site!r} is not valid: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )


_SITE_NAME = re.compile(wire.SITE_PATTERN.strip("^$"))
# Sites whose arrival times are kept (one float each): a flood of made-up site
# names on a broker without ACLs must not grow the operator without bound.
_MAX_HEARD = 100_000


# A last will is about 250 bytes.  A state message longer than this is not one,
# and is not parsed to find out: ``_is_will`` runs on paho's network thread, and
# parsing every state message whole (up to the message limit) there let a site
# flooding big heartbeats burn that thread.  Such a message goes to the worker
# like any heartbeat, under the state-flood bound.
MAX_WILL_BYTES = 4096


def _is_will(data: bytes) -> bool:
    """Whether a state message says its site went offline (a last will), read leniently."""
    if len(data) > MAX_WILL_BYTES:
        return False
    try:
        message = json.loads(data)
        return isinstance(message, dict) and message.get("payload", {}).get("online") is False
    except (ValueError, AttributeError, RecursionError):
        return False


# One site's state messages waiting in the inbox at most; past it the next are
# dropped as they arrive (``state-flood``).  Each is a whole snapshot and the site
# is heard all the same; a heartbeat every 15 s keeps one waiting.  Last wills
# (``online: false``, at most MAX_WILL_BYTES) have a bound of their own, so a flood
# of heartbeats never costs one; any state message may say ``online: false``, so
# they have a bound too.
MAX_STATES_WAITING = 8
MAX_WILLS_WAITING = 2
# A site's database change is told to ``on_epoch`` (an Event, written while the
# worker waits) at most once in this long: a site naming a new database in every
# heartbeat made an API write per heartbeat.  The change itself always takes effect.
EPOCH_NOTICE_SECONDS = 60.0
ACK_REFRESH_SECONDS = 30.0
# A site's database change is handled (every view scanned for its unfinished runs,
# each sent again) at most once in this long: a site naming a new database in every
# heartbeat made that work, and a message per unfinished run, per heartbeat.  The
# newest epoch takes effect at once (records and acks follow it); the changes
# within the window are coalesced and handled, for the newest database, when it
# ends (the worker or the silence watch, whichever comes first: check_epochs).
EPOCH_CHANGE_SECONDS = 30.0
# Lines about one site's malformed messages, at most one in this long (each is
# counted by its reason all the same): a site sending garbage in a loop wrote a
# warning line per message.
DROP_LOG_SECONDS = 10.0


def _assignment(site: str, payload: wire.AssignPayload, traceparent: str | None) -> bytes:
    """The assign message: the spec as a site takes it (no cloud-only fields)."""
    sent = payload.model_copy(update={"spec": site_spec(payload.spec)})
    return wire.encode(wire.KIND_ASSIGN, site, sent, traceparent=traceparent)


@dataclass
class BridgeConfig:
    broker: BrokerConnection
    client_id: str = "tideflow-operator"
    # MQTT 5: a taken-over session is reported, a dead one expires on its own.
    # False (3.1.1) for brokers without MQTT 5 (RabbitMQ before 3.13): the
    # broker's own setting then expires sessions (docs/decisions/0012).
    mqtt5: bool = True
    # A site not heard from for this long (while our own link was up that long)
    # is offline: its last will can be lost with the broker node that held its
    # connection.  Keep it several times the agents' --heartbeat-seconds (15).
    site_silence_seconds: float = 90.0
    max_message_bytes: int = 8 * wire.DEFAULT_MAX_MESSAGE_BYTES
    max_coalesced: int = 200  # inbox messages handled (and persisted) as one group
    # Bytes of events messages waiting in the inbox beyond which a site that already
    # has one waiting has the next dropped (the site sends again whatever is not
    # acknowledged): see CloudBridge.arrived.  A site's whole window (4,000 records
    # ahead of its ack, about 1 MB) fits many times over.  (64 MiB before: at 1,000
    # sites the inbox sat at that bound for minutes, ~73 MB of an RSS of 375 MB.)
    max_inbox_bytes: int = 16 * 1024 * 1024


@dataclass
class _Outstanding:
    """What a site has been sent and has not yet proved it holds.

    ``held`` keeps the assignments the site proved it holds until their runs
    finish: not re-sent on reconnects, only when the site's database is replaced.
    """

    assignments: dict[tuple[str, int], bytes] = field(default_factory=dict)
    controls: dict[tuple[str, str], bytes] = field(default_factory=dict)
    held: dict[tuple[str, int], bytes] = field(default_factory=dict)
    # Outstanding assignments the site said it refused, logged once until settled.
    refused: set[tuple[str, int]] = field(default_factory=set)


class CloudBridge:
    def __init__(
        self,
        config: BridgeConfig,
        *,
        applier: Applier | None = None,
        presence: SitePresence | None = None,
        persist: Persist | None = None,
        on_presence: PresenceListener | None = None,
        on_receipt: ReceiptListener | None = None,
        on_epoch: EpochListener | None = None,
    ) -> None:
        self.config = config
        self.applier = applier or Applier()
        self.presence = presence or SitePresence()
        self.persist = persist
        self.on_presence = on_presence
        self.on_receipt = on_receipt
        self.on_epoch = on_epoch
        self.dropped: Counter[str] = Counter()
        self._epoch_told: dict[str, float] = {}  # site -> when on_epoch was last told
        self._epoch_handled: dict[str, float] = {}  # site -> when its last change was handled
        self._epoch_waiting: dict[str, EpochChange] = {}  # site -> its coalesced change
        self.epoch_changes_coalesced = 0
        # One line per topic's site per DROP_LOG_SECONDS, the rest counted (a site can
        # repeat a malformed message at will).
        self._drop_log = LogBudget(
            burst=1, seconds=DROP_LOG_SECONDS, max_keys=_MAX_HEARD, clock=self.presence.now
        )
        self.epoch_notices_skipped = 0
        self._long_labels_said: set[str] = set()  # sites told of over-long labels
        self.records_applied = 0
        self.duplicates_ignored = 0
        self.gaps = 0
        self._outstanding: dict[str, _Outstanding] = {}
        # site -> (through, epoch, when) of the last ack published to it (refresh_ack)
        self._acked: dict[str, tuple[int, str | None, float]] = {}
        # (topic, payload, when it arrived on the presence clock)
        self._inbox: asyncio.Queue[tuple[str, bytes, float]] = asyncio.Queue()
        self._heard: dict[str, float] = {}  # site -> when its newest message arrived
        self._queued: Counter[str] = Counter()  # site -> bytes of its events in the inbox
        self._queued_bytes = 0  # all sites' events in the inbox
        self._states_waiting: Counter[str] = Counter()  # site -> its state messages in the inbox
        self._wills_waiting: Counter[str] = Counter()  # site -> those saying online: false
        self._worker: asyncio.Task[None] | None = None
        self.link: MqttLink | None = None
        self.connected = asyncio.Event()
        self._silence: asyncio.Task[None] | None = None
        self._link_up_since: float | None = None  # monotonic, while our link is up
        # A sharded operator (shards.py): only its own sites' events, to its own sites only.
        self.shard: ShardRouter | None = None
        self._followed: set[str] = set()  # sites whose events we subscribe to (sharded)
        # Since our link came up: sites whose events reached us, and sites asked
        # for the records their heartbeat says are unacknowledged (_on_state).
        self._events_heard: set[str] = set()
        self._asked: set[str] = set()
        self._depth_noticed: set[str] = set()

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        link = self._make_link(asyncio.get_running_loop())
        self._worker = asyncio.create_task(self._consume(), name="bridge-inbox")
        self._silence = asyncio.create_task(self._watch_silence(), name="bridge-silence")
        self.link = link
        link.start()

    def _make_link(self, loop: asyncio.AbstractEventLoop) -> MqttLink:
        """The link; a broker file it cannot use is :class:`BrokerFileError`, in one line."""
        cfg = self.config
        try:
            return MqttLink(
                LinkConfig(
                    cfg.broker,
                    client_id=cfg.client_id,
                    subscriptions=self._subscriptions(),
                    mqtt5=cfg.mqtt5,
                    # Presence and epochs come from live messages only: a retained
                    # state can be a stale copy from one node of a clustered broker.
                    ignore_retained=True,
                ),
                loop,
                on_message=self.arrived,
                on_state=self._on_link,
            )
        except (OSError, UnicodeDecodeError) as exc:  # (read in MqttLink's constructor)
            raise BrokerFileError(broker_file_problem(cfg.broker, exc)) from None

    def _subscriptions(self) -> list[str]:
        if self.shard is None:
            return [wire.subscription(wire.EVENTS), wire.subscription(wire.STATE)]
        # Every site's state (small: how a site without an EdgeSite is heard), and
        # the events of this shard's sites only.
        followed = [wire.subscription(wire.EVENTS, site) for site in sorted(self._followed)]
        return [wire.subscription(wire.STATE), *followed]

    def follow(self, site: str) -> None:
        """Sharded: subscribe to ``site``'s events (an owned site, first known now)."""
        if site in self._followed:
            return
        try:
            check_site_name(site)
        except InvalidSiteName:
            return
        self._followed.add(site)
        if self.link is not None:
            self.link.subscribe([wire.subscription(wire.EVENTS, site)])

    async def stop(self) -> None:
        if self._silence is not None:
            self._silence.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._silence
        if self._worker is not None:
            self._worker.cancel()
            # A worker that died has been reported by whoever supervises it.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        if self.link is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.link.stop)

    def arrived(self, topic: str, data: bytes, *, at: float | None = None) -> None:
        """A message arrived from the link: stamp it and queue it for the worker.

        The stamp, not the time the worker gets to it, is when its site was
        last heard: a backlog in the operator must not make live sites silent.

        Past ``max_inbox_bytes`` of events waiting, a site that has one waiting
        has the next dropped (``inbox-full``): while acks lag, sites send their
        unacknowledged records again and again, and queued unbounded those
        copies were most of the operator's memory at 1,000 sites (issue 13).
        Nothing is lost: what is dropped is not acknowledged, so the site sends
        it again; and every site keeps one message waiting.
        """
        at = self.presence.now() if at is None else at
        try:
            site, channel = wire.parse_topic(topic)
        except wire.WireError:
            pass  # dropped (and counted) by the worker
        else:
            if site in self._heard or len(self._heard) < _MAX_HEARD:
                self._heard[site] = at
            if len(data) > self.config.max_message_bytes:
                # Dropped now, not queued to be dropped: a site's big heartbeats
                # (outside the bound below) would grow the inbox while it waits.
                # (Not MQTT 5's Maximum Packet Size: Mosquitto 2.0.11 drops the
                # oversize QoS 1 messages but keeps their in-flight slots, and
                # after 20 of them delivers nothing more to us.)
                self.dropped[wire.DropReason.TOO_LARGE.value] += 1
                log.warning("dropped a message on %s: %d bytes is over the %d-byte limit",
                            topic, len(data), self.config.max_message_bytes)  # fmt: skip
                return
            if channel == wire.EVENTS:
                full = self._queued_bytes + len(data) > self.config.max_inbox_bytes
                if full and self._queued[site]:
                    self.dropped["inbox-full"] += 1
                    if self.dropped["inbox-full"] % 1000 == 1:
                        log.warning("inbox: %d bytes of events waiting; site %s's dropped "
                                    "(it sends them again; %d so far)", self._queued_bytes,
                                    site, self.dropped["inbox-full"])  # fmt: skip
                    return
                self._queued[site] += len(data)
                self._queued_bytes += len(data)
            elif channel == wire.STATE:
                waiting = self._wills_waiting if _is_will(data) else self._states_waiting
                bound = MAX_WILLS_WAITING if waiting is self._wills_waiting else MAX_STATES_WAITING
                if waiting[site] >= bound:
                    self.dropped["state-flood"] += 1
                    if self.dropped["state-flood"] % 1000 == 1:
                        log.warning("site %s has %d state messages waiting; the next dropped "
                                    "(%d so far)", site, waiting[site],
                                    self.dropped["state-flood"])  # fmt: skip
                    return
                waiting[site] += 1
        self._inbox.put_nowait((topic, data, at))

    def _taken(self, topic: str, data: bytes) -> None:
        """A message left the inbox (its site's bytes of events waiting)."""
        try:
            site, channel = wire.parse_topic(topic)
        except wire.WireError:
            return  # (never counted)
        if channel == wire.STATE:
            waiting = self._wills_waiting if _is_will(data) else self._states_waiting
            if waiting.get(site, 0) > 0:
                waiting[site] -= 1
                if waiting[site] <= 0:
                    del waiting[site]
        if channel == wire.EVENTS and self._queued.get(site, 0) > 0:
            self._queued[site] -= len(data)
            self._queued_bytes -= len(data)
            if self._queued[site] <= 0:
                del self._queued[site]

    async def check_silence(self, now: float | None = None) -> list[str]:
        """Mark offline the online sites silent for the limit; tell ``on_presence``."""
        limit = self.config.site_silence_seconds
        gone = self.presence.expire(limit, now=now, heard=self._heard)
        for site in gone:
            info = self.presence.get(site)
            log.warning("site %s not heard from for %.0fs: offline", site, limit)
            if info is not None and self.on_presence is not None:
                try:
                    await self.on_presence(PresenceUpdate(site, True, False, True, info))
                except Exception:  # one site's status write must not stop the watch
                    log.exception("site %s: reporting it offline failed", site)
        return gone

    async def _watch_silence(self) -> None:
        """Mark offline the sites whose heartbeats stopped without a last will.

        A clustered broker loses the will of every client connected to a node
        that dies.  Judged only once our own link has been up for the whole
        silence limit, so an outage of our own is not taken for the sites'.
        """
        limit = self.config.site_silence_seconds
        while True:
            await asyncio.sleep(min(5.0, limit / 4))
            if self._epoch_waiting:  # (a site gone quiet after its flips too)
                await self.check_epochs()
            up_since = self._link_up_since
            if up_since is None or time.monotonic() - up_since < limit:
                continue
            await self.check_silence()

    def _on_link(self, connected: bool) -> None:
        self._link_up_since = time.monotonic() if connected else None
        if connected:
            self.connected.set()
            self._events_heard.clear()
            self._asked.clear()
            self._depth_noticed.clear()
            # Anything sent while we were away may be lost: send it all again.
            self._resend_all()
        else:
            self.connected.clear()

    # -------------------------------------------------------------- sending
    def assign(
        self, site: str, payload: wire.AssignPayload, traceparent: str | None = None
    ) -> bool:
        """Send an assignment; it is re-sent until the site proves it holds it.

        Raises :class:`InvalidSiteName` for a name that is not a site name
        (nothing is kept or sent): the caller reports it on the Workflow.
        """
        check_site_name(site)
        if self.shard is not None:
            self.follow(site)
        message = _assignment(site, payload, traceparent)
        self._site(site).assignments[(payload.uid, payload.generation)] = message
        return self._publish(wire.topic(site, wire.ASSIGN), message)

    def control(self, site: str, payload: wire.ControlPayload) -> bool:
        """Send cancel/suspend/resume; the latest of each uid is re-sent until settled."""
        check_site_name(site)
        message = wire.encode(wire.KIND_CONTROL, site, payload)
        controls = self._site(site).controls
        # suspend and resume supersede each other; a cancel supersedes both.
        superseded = (
            ("cancel", "suspend", "resume")
            if payload.action == "cancel"
            else (
                "suspend",
                "resume",
            )
        )
        for action in superseded:
            controls.pop((payload.uid, action), None)
        controls[(payload.uid, payload.action)] = message
        return self._publish(wire.topic(site, wire.CONTROL), message)

    def settle_control(self, site: str, uid: str, action: str | None = None) -> None:
        """Stop re-sending controls for ``uid`` (the site's records show their effect)."""
        controls = self._site(site).controls
        for sent_uid, sent_action in list(controls):
            if sent_uid == uid and (action is None or sent_action == action):
                del controls[(sent_uid, sent_action)]

    def remember(
        self, site: str, payload: wire.AssignPayload, traceparent: str | None = None
    ) -> None:
        """Keep an assignment the site already holds, to send again if its database is replaced."""
        message = _assignment(site, payload, traceparent)
        self._site(site).held[(payload.uid, payload.generation)] = message

    def forget_assignment(self, site: str, uid: str) -> None:
        """Stop re-sending ``uid``'s assignment (controls, such as a cancel, stay)."""
        outstanding = self._site(site)
        for kept in (outstanding.assignments, outstanding.held):
            for kept_uid, generation in list(kept):
                if kept_uid == uid:
                    del kept[(kept_uid, generation)]

    def forget(self, site: str, uid: str) -> None:
        self.forget_assignment(site, uid)
        self.settle_control(site, uid)

    def unconfirmed_assignment(self, site: str, uid: str) -> dict[str, Any] | None:
        """The assignment of ``uid`` exactly as sent, if the site has not confirmed it."""
        for (assigned_uid, _), message in self._outstanding.get(
            site, _Outstanding()
        ).assignments.items():
            if assigned_uid == uid:
                return dict(json.loads(message)["payload"])
        return None

    def outstanding(self, site: str) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
        entry = self._site(site)
        return list(entry.assignments), list(entry.controls)

    def _site(self, site: str) -> _Outstanding:
        return self._outstanding.setdefault(site, _Outstanding())

    def _resend(self, site: str) -> None:
        """Send again what ``site`` has not confirmed; one message failing stops nothing else."""
        entry = self._outstanding.get(site)
        if entry is None:
            return
        for message in list(entry.assignments.values()):
            self._publish(wire.topic(site, wire.ASSIGN), message)
        for message in list(entry.controls.values()):
            self._publish(wire.topic(site, wire.CONTROL), message)

    def _resend_all(self) -> None:
        for site in list(self._outstanding):
            try:
                self._resend(site)
            except Exception:  # a bug for one site must not hold up the others
                log.exception("re-sending to site %s failed; other sites go on", site)
                self.dropped["resend-error"] += 1

    def publish(self, site: str, channel: str, message: bytes) -> bool:
        """Send an encoded message to a site (its sender keeps it until confirmed: cron.py)."""
        return self._publish(wire.topic(site, channel), message)

    def _publish(self, topic: str, payload: bytes) -> bool:
        """Publish one message; a refusal is logged and counted, never raised."""
        if self.link is None:
            return False
        if self.shard is not None and not self.shard.owns_topic(topic):
            # (A CronWorkflow's plan covers every matching site; each shard sends its own.)
            log.debug("not publishing to %s: another operator shard's site", topic)
            self.dropped["other-shard-publish"] += 1
            return False
        try:
            return self.link.publish(topic, payload)
        except Exception as exc:  # e.g. paho refusing a topic: this message only
            log.error("publish to %s refused: %s", topic, exc)
            self.dropped["publish-refused"] += 1
            return False

    # -------------------------------------------------------------- receiving
    @property
    def worker(self) -> asyncio.Task[None] | None:
        """The task that handles what the link receives (runs until :meth:`stop`)."""
        return self._worker

    async def _consume(self) -> None:
        while True:
            messages = [await self._inbox.get()]
            failpoint("bridge-inbox")
            if self._epoch_waiting:
                await self.check_epochs()
            # A backlog (the API server is slower than the sites) is handled as
            # one group, so a Workflow changed by several batches is written once.
            while len(messages) < self.config.max_coalesced and not self._inbox.empty():
                messages.append(self._inbox.get_nowait())
            for topic, data, _ in messages:
                self._taken(topic, data)
            await self.handle_many(
                [(topic, data) for topic, data, _ in messages],
                arrived=[at for _, _, at in messages],
            )

    async def handle(self, topic: str, data: bytes) -> None:
        await self.handle_many([(topic, data)])

    async def handle_many(
        self, messages: list[tuple[str, bytes]], *, arrived: list[float] | None = None
    ) -> None:
        """Handle messages in order; consecutive ``events`` batches share one persist.

        Each batch is applied (and its assignments/controls settled) as it
        comes; the changed Workflows are persisted once for the run of
        batches, and only then is each site acked, so the ack still never
        runs ahead of what is stored.  Any other message first settles the
        batches before it, so ordering is what it was one message at a time.
        ``arrived``: when each message arrived (presence counts from then, not
        from when the worker got to it; by default from now).
        """
        pending: list[tuple[str, ApplyResult]] = []
        for index, (topic, data) in enumerate(messages):
            if index:
                # Each message is checked and applied on the event loop: let the rest
                # of the operator (kopf, the lease, the API writes) run between two.
                # A group of 200 waiting batches held it for seconds, and a site's
                # batches of tiny malformed records for over a minute.
                await asyncio.sleep(0)
            if self.shard is not None and not self.shard.owns_topic(topic):
                self.dropped["other-shard"] += 1  # another shard's site (its state)
                continue
            try:
                # An events batch is checked in one pass (tideflow.wire_events);
                # anything that pass does not take is decoded and explained as before.
                envelope: wire.Envelope | None = None
                payload: Any = decode_batch(topic, data, max_bytes=self.config.max_message_bytes)
                if payload is not None:
                    site = payload.site
                else:
                    decoded = self._decode(topic, data)
                    if decoded is None:
                        continue
                    envelope, payload = decoded
                    site = envelope.site
                if isinstance(payload, CheckedBatch | wire.EventsPayload):
                    self._events_heard.add(site)
                    scan = not self._epoch_window_open(site)
                    result = self.applier.apply_batch(site, payload, scan_epoch=scan)
                    self._account(site, result)
                    pending.append((site, result))
                    if result.epoch_change is not None:
                        await self._epoch_changed(result.epoch_change, scanned=scan)
                    if result.needs_resend:
                        self._claimed_gap(site, pending)
                    continue
                settle, pending = pending, []
                await self._flush(settle)
                if isinstance(payload, wire.ReceiptPayload):
                    outstanding = self._site(site)
                    assignment = (payload.uid, payload.generation)
                    if payload.phase == REJECTED:
                        # The site refused it for now (its outbox is over budget):
                        # it stays outstanding and goes again when the site comes
                        # back online.  Said once, and only of an assignment of
                        # ours: a site repeating receipts must not write a line each.
                        outstanding.refused &= outstanding.assignments.keys()
                        if (
                            assignment in outstanding.assignments
                            and assignment not in outstanding.refused
                        ):
                            outstanding.refused.add(assignment)
                            log.warning(
                                "site %s refused assignment %s (generation %d) for now; "
                                "it is sent again when the site comes back",
                                site, wire.shown(payload.uid), payload.generation,
                            )  # fmt: skip
                    else:
                        outstanding.refused.discard(assignment)
                        sent = outstanding.assignments.pop(assignment, None)
                        if sent is not None and payload.phase in _LIVE:
                            outstanding.held[assignment] = sent
                    if self.on_receipt is not None:
                        await self.on_receipt(site, payload)
                elif isinstance(payload, wire.StatePayload) and envelope is not None:
                    at = arrived[index] if arrived is not None else None
                    await self._on_state(site, payload, envelope.sent_at, at)
            except Exception:  # a bug must not stop the bridge
                log.exception("message on %s could not be handled; dropped", topic)
                self.dropped["error"] += 1
        await self._flush(pending)

    def _claimed_gap(self, site: str, pending: list[tuple[str, ApplyResult]]) -> None:
        """A gap before the site's records: its last heartbeat's mark may close it.

        After an operator restart the records up to the site's ``lastAckedSeq``
        were acked by an earlier process and compacted; the site sends only
        what follows, which shows the gap its claim closes at once.
        """
        info = self.presence.get(site)
        if info is None or not info.online or not info.last_acked_seq:
            return
        if info.epoch is not None and info.epoch != self.applier.epoch(site):
            return
        restored = self.applier.accept_claim(site, info.last_acked_seq)
        if restored.changed or restored.applied or not restored.needs_resend:
            self._account(site, restored)
            pending.append((site, restored))

    async def _flush(self, results: list[tuple[str, ApplyResult]]) -> None:
        try:
            await self._persist_and_ack(results)
        except Exception:  # not acked: the records stay unacked and come again
            log.exception("persisting %d events batches failed; not acked", len(results))
            self.dropped["error"] += 1

    def _decode(self, topic: str, data: bytes) -> tuple[wire.Envelope, Any] | None:
        try:
            return wire.decode(topic, data, max_bytes=self.config.max_message_bytes)
        except wire.WireError as exc:
            reason = exc.reason.value  # a fixed set, never the sender's text
            self.dropped[reason] += 1
            self._log_drop(topic, exc)
            return None

    def _log_drop(self, topic: str, exc: wire.WireError) -> None:
        """Say why a message was dropped: at most one line per site per DROP_LOG_SECONDS."""
        parts = topic.split("/")
        site = parts[-2] if len(parts) >= 2 else ""  # (the topic's, as the ACL allows)
        quiet = self._drop_log.allow(site)
        if quiet is None:
            return
        more = f" ({quiet} more from this site since the last line)" if quiet else ""
        log.warning("dropped message on %s: %s%s", topic, exc, more)

    async def _settled(self, site: str, result: ApplyResult) -> None:
        """Account for applied records, persist their effect, then ack."""
        self._account(site, result)
        await self._persist_and_ack([(site, result)])

    def _account(self, site: str, result: ApplyResult) -> None:
        """Counters, and stop re-sending what the applied records prove the site holds."""
        self.records_applied += result.applied
        self.duplicates_ignored += result.duplicates
        if result.needs_resend:
            self.gaps += 1
        outstanding = self._site(site)
        for key in result.changed:
            view = self.applier.view(*key)
            if view is None:
                continue
            assignment = (view.uid, view.generation)
            sent = outstanding.assignments.pop(assignment, None)
            if view.done:
                outstanding.held.pop(assignment, None)
                self.settle_control(site, view.uid)
                continue
            if sent is not None:
                outstanding.held[assignment] = sent
            self.settle_control(site, view.uid, "suspend" if view.suspended else "resume")

    def _epoch_window_open(self, site: str, now: float | None = None) -> bool:
        """Whether ``site``'s last database change was handled under EPOCH_CHANGE_SECONDS ago."""
        handled = self._epoch_handled.get(site)
        now = self.presence.now() if now is None else now
        return handled is not None and now - handled < EPOCH_CHANGE_SECONDS

    async def _epoch_changed(self, change: EpochChange, *, scanned: bool = True) -> None:
        """The site's agent runs on another database: handle it now, or coalesce it.

        ``scanned``: ``change.lost`` was looked for (it was not within the window).
        """
        if not scanned or self._epoch_window_open(change.site):
            # Handled when the window ends, for the newest database (the first's "was").
            earlier = self._epoch_waiting.get(change.site)
            if earlier is not None:
                change = change._replace(old=earlier.old)
            self._epoch_waiting[change.site] = change
            self.epoch_changes_coalesced += 1
            return
        await self._handle_epoch_change(change)

    async def check_epochs(self, now: float | None = None) -> None:
        """Handle the coalesced database changes of the sites whose window has ended."""
        now = self.presence.now() if now is None else now
        for site in list(self._epoch_waiting):
            if self._epoch_window_open(site, now):
                continue
            change = self._epoch_waiting.pop(site)
            if change.new != self.applier.epoch(site):
                continue  # (superseded by a change not coalesced: already handled)
            lost = self.applier.unfinished(site) if change.old is not None else change.lost
            log.warning(
                "site %s: new database %s (was %s; changes in between coalesced): "
                "%d unfinished runs are sent again",
                site, change.new, change.old, len(lost),
            )  # fmt: skip
            try:
                await self._handle_epoch_change(change._replace(lost=lost), now)
            except Exception:  # one site's must not stop the others'
                log.exception("site %s: handling its database change failed", site)
                self.dropped["error"] += 1

    async def _handle_epoch_change(self, change: EpochChange, now: float | None = None) -> None:
        """The site's agent runs on another database: send its unfinished runs again."""
        if len(self._epoch_handled) >= _MAX_HEARD and change.site not in self._epoch_handled:
            self._epoch_handled.clear()
        self._epoch_handled[change.site] = self.presence.now() if now is None else now
        outstanding = self._site(change.site)
        for key in change.lost:
            view = self.applier.view(*key)
            if view is None:
                continue
            assignment = (view.uid, view.generation)
            message = outstanding.held.pop(assignment, None)
            if message is not None:
                outstanding.assignments[assignment] = message
            elif assignment not in outstanding.assignments:
                log.warning("site %s: no assignment of %s/%s kept to send again", change.site, *key)
        self._resend(change.site)
        if self.on_epoch is not None:
            now = self.presence.now()
            told = self._epoch_told.get(change.site)
            if told is not None and now - told < EPOCH_NOTICE_SECONDS:
                self.epoch_notices_skipped += 1
                return
            self._epoch_told[change.site] = now
            await self.on_epoch(change)

    async def _persist_and_ack(self, results: list[tuple[str, ApplyResult]]) -> None:
        if not results:
            return
        first_site, first = results[0]
        if len(results) == 1:
            merged = first
        else:
            merged = ApplyResult(site=first_site, ack_through=first.ack_through)
            for _, result in results:
                merged.changed |= result.changed
                merged.transitions.extend(result.transitions)
        if self.persist is not None:
            await self.persist(merged)
        else:
            for key in merged.changed:
                view = self.applier.view(*key)
                if view is not None:
                    self.applier.mark_persisted(*key, view.synced_seq)
        resend: dict[str, bool] = {}
        for site, result in results:  # the latest batch of a site says whether a gap is left
            resend[site] = result.needs_resend
        for site, flag in resend.items():
            self.send_ack(site, resend=flag)

    def send_ack(self, site: str, *, resend: bool = False) -> None:
        through, epoch = self.applier.ackable_through(site), self.applier.epoch(site)
        ack = wire.AckPayload(through=through, resend=resend, epoch=epoch)
        if self._publish(wire.topic(site, wire.ACKS), wire.encode(wire.KIND_ACK, site, ack)):
            self._acked[site] = (through, epoch, self.presence.now())

    def refresh_ack(self, site: str) -> None:
        """Ack ``site`` if its ack changed since the last one published, or that was long ago.

        Housekeeping's round (every second): an unchanged ack to every site every
        round was 1,000 publishes a second at 1,000 sites, queued in paho at about
        2 KB each faster than the broker confirmed them (issue 13).  A lost ack
        still comes again: every ``ACK_REFRESH_SECONDS``, after the site comes
        online, and in answer to the batch the site resends on silence.
        """
        last = self._acked.get(site)
        through, epoch = self.applier.ackable_through(site), self.applier.epoch(site)
        if (
            last is not None
            and last[:2] == (through, epoch)
            and self.presence.now() - last[2] < ACK_REFRESH_SECONDS
        ):
            return
        self.send_ack(site)

    async def _on_state(
        self, site: str, payload: wire.StatePayload, sent_at: float, arrived: float | None
    ) -> None:
        if self.shard is not None and site not in self._followed:
            self.follow(site)  # a site first heard now (no EdgeSite yet)
        if payload.labels_left_out and site not in self._long_labels_said:
            if len(self._long_labels_said) >= _MAX_HEARD:
                self._long_labels_said.clear()
            self._long_labels_said.add(site)
            log.warning(
                "site %s reports %d labels longer than Kubernetes takes (values and names "
                "of at most %d characters, prefixes of %d); left out (said once)",
                site, payload.labels_left_out, wire.LABEL_VALUE_MAX, wire.LABEL_PREFIX_MAX,
            )  # fmt: skip
        update = self.presence.observe(site, payload, sent_at, received_at=arrived)
        if not update.accepted:
            return
        scan = not self._epoch_window_open(site)
        change = (
            self.applier.observe_epoch(site, payload.epoch, scan=scan) if payload.online else None
        )
        if change is not None:
            await self._epoch_changed(change, scanned=scan)
        current = payload.epoch is None or payload.epoch == self.applier.epoch(site)
        if payload.online and payload.last_acked_seq and current:
            # What the site says was acked was applied by some operator instance
            # and will not be sent again; but it is the site's word, taken only
            # to close a gap its records show (Applier.accept_claim).  (Only a
            # mark of the current database: a late message of a replaced one
            # would skip new records.)
            restored = self.applier.accept_claim(site, payload.last_acked_seq)
            if restored.changed or restored.applied:
                await self._settled(site, restored)
        if (
            payload.online
            and current
            and payload.outbox_depth > 0
            and site not in self._events_heard
            and site not in self._asked
        ):
            # Records sent while no operator (or not this link) was subscribed
            # are lost in transit, and a site whose runs have ended sends
            # nothing new to reveal the gap: ask for them, once per link.  At
            # the second such heartbeat, not the first: a site that has just
            # connected says its depth before its first batch, which is on the
            # way, and asking then only makes it send its window twice.
            if site in self._depth_noticed:
                self._asked.add(site)
                log.info(
                    "site %s holds %d unacknowledged records none of which reached us;"
                    " asking for them",
                    site,
                    payload.outbox_depth,
                )
                self.send_ack(site, resend=True)
            self._depth_noticed.add(site)
        if update.came_online:
            log.info("site %s came online; re-sending what it has not confirmed", site)
            self._acked.pop(site, None)  # (housekeeping's next round acks it again)
            self._resend(site)
        if self.on_presence is not None:
            await self.on_presence(update)
