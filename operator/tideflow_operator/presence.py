"""Which sites are connected, from their ``state`` messages.

Why this module exists: the operator must know whether a site is reachable
(the EdgeSite status, the Workflow ``Connected`` column) and, above all, when
a site comes back, because a broker may have silently dropped QoS 1 messages
queued for it; on every offline -> online transition the operator re-sends the
assignments and cancels that site has not acknowledged.

Each agent publishes a ``state`` message (online, heartbeat counters) every
heartbeat and registers an MQTT last will saying it is offline.  (Both are
retained, for people and tools; the bridge ignores retained copies, which a
clustered broker keeps per node: decision 0012.)  Messages can arrive late
or twice (queued copies after the operator reconnects), so a message whose
``sentAt`` is older than the newest one seen is ignored.  The last will is
the exception that needs care: it is composed when the agent connects, so
its ``sentAt`` is a little *older* than the online messages of its own
session.  An offline message is therefore accepted when it is newer than
everything seen before the current online period began (the previous
session's messages), and a stale will of an earlier session is not.

Pure bookkeeping: no MQTT, no Kubernetes, no clock except an injectable one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tideflow.wire import StatePayload

from .applier import rfc3339


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
    # message older than this belongs to an earlier session.
    session_floor: float = float("-inf")

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

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
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
        if payload.online:
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
        info.last_sent_at = max(info.last_sent_at, sent_at)
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
