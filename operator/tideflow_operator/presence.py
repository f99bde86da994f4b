"""Which sites are connected, from their ``state`` messages.

Why this module exists: the operator must know whether a site is reachable
(the EdgeSite status, the Workflow ``Connected`` column) and, above all, when
a site comes back, because a broker may have silently dropped QoS 1 messages
queued for it; on every offline -> online transition the operator re-sends the
assignments and cancels that site has not acknowledged.

Each agent publishes a ``state`` message (online, heartbeat counters) every
heartbeat and registers an MQTT last will saying it is offline.  (Both are
retained, for people and tools; the bridge ignores retained copies, which a
clustered broker keeps per node: decision 0012.)

Order is the operator's, not the site's (decision 0029).  A site's clock is
not to be trusted for it: NTP steps it, an edge box's RTC resets on reboot,
and a site whose clock stepped back read stale (frozen counters, offline
while it talked) until its clock caught up.  An agent names its process in
every state message and in its will (``boot``), so messages are taken in
arrival order (one broker keeps a site's messages on its topic in order)
and the one thing arrival cannot settle, the late will of an *earlier*
process (a clustered broker's other node publishes it after the new
process's heartbeats), is told by its ``boot``: a process's messages are
refused once a newer process has been heard.  ``sentAt`` only reports the
site's clock skew.  Older agents send no ``boot``: their messages keep the
rule they had, by ``sentAt`` (a message older than the newest seen is
ignored, and an offline message must be newer than what came before the
current online period began).

Silence is judged on the registry's clock, by default a monotonic clock
read as wall time: the operator's own clock stepping neither expires every
site at once nor keeps a dead one online.

Pure bookkeeping: no MQTT, no Kubernetes, no clock except an injectable one.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tideflow.wire import StatePayload

from .applier import rfc3339

log = logging.getLogger(__name__)

# Agent processes remembered per site whose late messages are refused.
RETIRED_BOOTS = 8
# A site clock further off the operator's than this is logged (again when it moves this much).
SKEW_WARN_SECONDS = 60.0


def steady_clock() -> Callable[[], float]:
    """A clock that reads as wall time (for display) but never steps: monotonic + offset."""
    offset = time.time() - time.monotonic()
    return lambda: time.monotonic() + offset


@dataclass
class SiteInfo:
    """What is known about one site's agent."""

    site: str
    online: bool = False
    last_seen: float | None = None  # cloud clock: when the last accepted message arrived
    last_sent_at: float = float("-inf")  # site clock: newest sentAt accepted
    agent_version: str | None = None
    running: int = 0
    outbox_depth: int = 0
    last_acked_seq: int = 0
    epoch: str | None = None  # the agent database's identity (its seqs' numbering)
    labels: dict[str, str] = field(default_factory=dict)
    schedules: list[str] | None = None  # CronWorkflow uids the site holds (None: not said)
    online_since: float | None = None  # cloud clock
    offline_since: float | None = None  # cloud clock
    # Newest sentAt seen before the current online period began: an offline
    # message older than this belongs to an earlier session (agents without ``boot``).
    session_floor: float = float("-inf")
    boot: str | None = None  # the agent process last heard (its state messages' ``boot``)
    retired_boots: deque[str] = field(default_factory=lambda: deque(maxlen=RETIRED_BOOTS))
    clock_skew: float | None = None  # site clock minus ours, from the last message's sentAt
    skew_warned: float | None = None

    def to_status(self) -> dict[str, Any]:
        """EdgeSite ``.status`` content, camelCase; merge-patch safe (None clears)."""
        return {
            "connected": self.online,
            "lastSeen": rfc3339(self.last_seen),
            "agentVersion": self.agent_version,
            "running": self.running,
            "outboxDepth": self.outbox_depth,
            "lastAckedSeq": self.last_acked_seq,
            "databaseEpoch": self.epoch,
            "onlineSince": rfc3339(self.online_since) if self.online else None,
            "offlineSince": rfc3339(self.offline_since) if not self.online else None,
        }


@dataclass(frozen=True)
class PresenceUpdate:
    """The outcome of one ``state`` message."""

    site: str
    accepted: bool  # False: stale (older than what was already seen), ignored
    came_online: bool  # offline/unknown -> online: re-send unacknowledged assignments
    went_offline: bool
    info: SiteInfo  # a copy of the site's record after the message


class SitePresence:
    """Registry of site presence fed by ``state`` messages."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock if clock is not None else steady_clock()
        self._sites: dict[str, SiteInfo] = {}

    def observe(
        self,
        site: str,
        payload: StatePayload,
        sent_at: float,
        *,
        received_at: float | None = None,
    ) -> PresenceUpdate:
        """Record a ``state`` message (``sent_at`` is the envelope's ``sentAt``)."""
        now = self._clock() if received_at is None else received_at
        info = self._sites.get(site)
        if info is None:
            info = self._sites[site] = SiteInfo(site=site)
        was_online = info.online
        if payload.boot is not None:
            stale = self._stale_boot(info, payload)
        elif payload.online:
            stale = sent_at < info.last_sent_at
        else:
            # A will is older than its own session's online messages (see module doc).
            floor = info.session_floor if was_online else info.last_sent_at
            stale = sent_at < floor
        if stale:
            return PresenceUpdate(site, False, False, False, replace(info))

        if payload.online and not was_online:
            info.session_floor = info.last_sent_at
            info.online_since = now
        if not payload.online and (was_online or info.offline_since is None):
            info.offline_since = now
        info.online = payload.online
        info.last_seen = now
        if payload.boot is not None:
            info.last_sent_at = sent_at  # (arrival orders these; kept for an older agent)
        else:
            info.last_sent_at = max(info.last_sent_at, sent_at)
        self._skew(info, sent_at - now)
        if payload.agent_version is not None:
            info.agent_version = payload.agent_version
        if payload.online:
            # The last will's counters date from connect time; keep the last
            # heartbeat's (a disconnected site goes on running its tasks).
            info.running = payload.running
            info.outbox_depth = payload.outbox_depth
            info.labels = dict(payload.labels)
            # As reported (not a max): a lower value means the agent's store was
            # reset, which the epoch says for certain (the applier acts on it).
            info.last_acked_seq = payload.last_acked_seq
            if payload.epoch is not None:
                info.epoch = payload.epoch
            if payload.schedules is not None:
                info.schedules = list(payload.schedules)
        return PresenceUpdate(
            site,
            True,
            came_online=payload.online and not was_online,
            went_offline=was_online and not payload.online,
            info=replace(info),
        )

    @staticmethod
    def _stale_boot(info: SiteInfo, payload: StatePayload) -> bool:
        """Is this message of an agent process older than the one last heard?

        A process already replaced is refused.  A message of a process not
        heard before is a new process when it says online; offline, it is the
        late will of one that ran before the current one (a new process's
        heartbeat comes before its will), and is refused.
        """
        boot = payload.boot
        if boot is None or boot in info.retired_boots:
            return boot is not None
        if info.boot is None or boot == info.boot:
            info.boot = boot
            return False
        if not payload.online:
            info.retired_boots.append(boot)
            return True
        info.retired_boots.append(info.boot)
        info.boot = boot
        return False

    @staticmethod
    def _skew(info: SiteInfo, skew: float) -> None:
        """Keep (and log once per step) how far the site's clock is off ours."""
        info.clock_skew = skew
        if abs(skew) <= SKEW_WARN_SECONDS:
            info.skew_warned = None
            return
        if info.skew_warned is not None and abs(skew - info.skew_warned) <= SKEW_WARN_SECONDS:
            return
        info.skew_warned = skew
        log.warning(
            "site %s: its clock is %+.0fs off the operator's (sentAt of its state messages);"
            " presence is judged on arrival, not on the site's clock",
            info.site, skew,
        )  # fmt: skip

    def now(self) -> float:
        """This registry's clock (a message's arrival is stamped with it)."""
        return self._clock()

    def expire(
        self,
        max_silence: float,
        *,
        now: float | None = None,
        heard: Mapping[str, float] | None = None,
    ) -> list[str]:
        """Mark offline every online site not heard from for ``max_silence`` seconds.

        For when the operator's own link was down and a will may have been
        missed; returns the sites that went offline.  ``heard``: when each
        site's newest message *arrived*, handled or not (a backlog in the
        operator must not make a live site look silent).
        """
        now = self._clock() if now is None else now
        heard = heard or {}
        gone = []
        for info in self._sites.values():
            if info.online and info.last_seen is not None:
                last = max(info.last_seen, heard.get(info.site, info.last_seen))
                if now - last <= max_silence:
                    continue
                info.online = False
                info.offline_since = now
                info.session_floor = info.last_sent_at
                gone.append(info.site)
        return sorted(gone)

    def connected(self, site: str) -> bool:
        info = self._sites.get(site)
        return info is not None and info.online

    def get(self, site: str) -> SiteInfo | None:
        info = self._sites.get(site)
        return replace(info) if info is not None else None

    def online_sites(self) -> list[str]:
        return sorted(s for s, info in self._sites.items() if info.online)

    def snapshot(self) -> dict[str, SiteInfo]:
        """A copy of every site's record, by site name."""
        return {site: replace(info) for site, info in sorted(self._sites.items())}

    def forget(self, site: str) -> None:
        self._sites.pop(site, None)


__all__ = ["PresenceUpdate", "SiteInfo", "SitePresence"]
