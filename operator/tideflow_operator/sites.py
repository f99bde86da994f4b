"""EdgeSites as the operator sees them: registered, labelled, kept current, and chosen from.

* The EdgeSite objects (labels, status, the ``retired`` annotation) come in
  through kopf's EdgeSite event handler (:meth:`Sites.seen`, :meth:`Sites.gone`).
* A site's agent reports in over MQTT (:meth:`Sites.on_presence`): an unknown
  site is registered (unless auto-registration is off) with the labels the
  agent reports; the label keys the agent reports are its own and put back
  when they differ (keys it does not report are never touched), unless the
  operator runs with ``--no-agent-labels``: then an EdgeSite's labels after
  its registration are only what people set, and a site cannot relabel
  itself to draw ``siteSelector`` Workflows; the status
  is written only when something other than ``lastSeen`` changed: a
  heartbeat that changes nothing writes nothing (a thousand idle sites
  heartbeating every 15 s cost 120,000 writes an hour when ``lastSeen`` was
  refreshed every 30 s), so ``lastSeen`` is when the site last reported a
  change.  Whether it is reachable now is ``connected``, which its last will
  turns false.
  When a site comes or goes, its unfinished runs' statuses are written
  (their ``SiteConnected`` condition).
* None of it on the caller's path (:meth:`Sites.offer`, the bridge's one
  worker): at a thousand sites with ~1 s API latency the worker waited on
  EdgeSite writes, heartbeats queued past the silence limit and events
  batches (and their acks) waited behind them.  The newest status of each
  site waits in ``_due`` (coalesced) for one of ``SITE_WRITERS`` writers;
  registration, label put-backs, ``connected`` flips and any change but the
  counters go first; counters alone at most every ``SITE_COUNTERS_SECONDS``
  per site.  A failed write is tried again unless a newer status replaced it.
* An agent on a new database is said on its EdgeSite as an Event
  (:meth:`Sites.on_epoch`).
* Placement's candidates (:meth:`Sites.candidates`): every site not retired,
  with its load (what its agent runs, plus the runs assigned and unfinished);
  :attr:`Sites.version` moves when they may have changed, and the Workflows
  waiting for a site are tried again (:mod:`.watch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from tideflow import wire

from .applier import Applier, EpochChange
from .bridge import check_site_name
from .kube import Kube, NotFound
from .model import Held
from .placement import SiteCandidate
from .presence import PresenceUpdate, SitePresence
from .status import StatusWriter

log = logging.getLogger(__name__)

RETIRED_ANNOTATION = "tideflow.io/retired"
PLACED_BY = ("uid", "labels", "retired")  # what of an EdgeSite placement reads

# The status fields that only count (what the agent runs, its outbox, its acked
# seq): during a wave each heartbeat changes them, so each of a thousand sites'
# heartbeats was a write.  Written at most this often per site: at most 100
# writes a second for a thousand sites (and the writers' bound caps the rate
# below that; coalescing absorbs the rest).  They are for people and tools
# (``kubectl get site``, the demo's verdict waits for ``lastAckedSeq`` to reach
# the site's last seq): this late, not later.  Placement reads the live counts
# from presence; a shard's placer reads other shards' from EdgeSites.
SITE_COUNTERS = frozenset({"running", "outboxDepth", "lastAckedSeq"})
SITE_COUNTERS_SECONDS = 10.0
# EdgeSite writes in flight at once: enough to keep up with a fleet's flips at
# ~100 ms an API call, few enough not to crowd the Workflow status writes out.
SITE_WRITERS = 4
SITE_RETRY_SECONDS = 2.0  # a failed EdgeSite write is tried again after this

_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
# A DNS-1123 subdomain: dot-separated parts, each starting and ending with a letter
# or digit.  Checking only the characters let 'a..b/' and 'a-.b/' through, which the
# API server refuses, and with them the whole EdgeSite: the site was never registered.
_LABEL_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def label_ok(key: str, value: str) -> bool:
    """A Kubernetes label: ``[prefix/]name`` with a name and a value of at most 63
    characters, the prefix a DNS-1123 subdomain of at most 253."""
    prefix, _, name = key.rpartition("/")
    return (
        bool(name)
        and _LABEL_NAME.fullmatch(name) is not None
        and (not prefix or (len(prefix) <= 253 and _LABEL_PREFIX.fullmatch(prefix) is not None))
        and _LABEL_NAME.fullmatch(value) is not None
    )


class _Due(NamedTuple):
    """What is still to be written for one site: the newest status, and what else it needs."""

    status: dict[str, Any]
    essentials: dict[str, Any]  # the status but ``lastSeen``
    labels: dict[str, str]
    register: bool  # not an EdgeSite yet (auto-registration)
    merge: bool  # the agent's labels differ from the EdgeSite's
    rewrite_runs: bool  # the site came or went: its runs' SiteConnected
    came_online: bool


class _Written(NamedTuple):
    """What was last written to an EdgeSite's status (``lastSeen`` aside), and when."""

    essentials: dict[str, Any]
    at: float  # monotonic


class Sites:
    """The EdgeSites known to this operator, and what their agents report."""

    def __init__(
        self,
        kube: Kube,
        presence: SitePresence,
        applier: Applier,
        status: StatusWriter,
        held: Held,
        *,
        auto_register: bool,
        agent_labels: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.presence = presence
        self.applier = applier
        self.status = status
        self.held = held
        self.auto_register = auto_register
        self.agent_labels = agent_labels
        self.clock = clock
        self.known: dict[
            str, dict[str, Any]
        ] = {}  # EdgeSite name -> {uid, labels, status, retired}
        self._written: dict[str, _Written] = {}
        # Bumped when a site appears, goes, or changes what placement reads: the
        # Workflows waiting for a site are tried again (watch.py).
        self.version = 0
        self._due: dict[str, _Due] = {}  # site -> the newest status not written yet
        self._urgent: dict[str, None] = {}  # sites whose due write goes first (in order)
        self._writing: set[str] = set()  # one write per site at a time, in order
        self._retry_at: dict[str, float] = {}  # a failed write is retried, not before
        self._writers: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._bad_labels_warned: set[str] = set()

    # ------------------------------------------------------------- the objects
    def seen(self, name: str, body: Mapping[str, Any]) -> None:
        """kopf saw the EdgeSite ``name`` (added or changed)."""
        meta = body["metadata"]
        annotations = meta.get("annotations") or {}
        before = self.known.get(name)
        self.known[name] = {
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            "status": dict(body.get("status") or {}),
            "retired": str(annotations.get(RETIRED_ANNOTATION, "")).lower() in ("true", "1", "yes"),
        }
        if before is None or any(before.get(k) != self.known[name][k] for k in PLACED_BY):
            self.version += 1

    def gone(self, name: str) -> None:
        if self.known.pop(name, None) is not None:
            self.version += 1

    def retired(self, site: str) -> bool:
        return bool((self.known.get(site) or {}).get("retired"))

    # ------------------------------------------------------------- the agents
    async def on_presence(self, update: PresenceUpdate) -> None:
        """Take a site's presence and write what it changed before returning.

        For callers that may wait (tests, tools); the bridge uses :meth:`offer`.
        """
        self._take(update)
        due = self._due.pop(update.site, None)
        if due is not None:
            self._urgent.pop(update.site, None)
            await self._write(update.site, due)

    async def offer(self, update: PresenceUpdate) -> None:
        """Take a site's presence; its EdgeSite is written later, off the caller's path.

        Never waits on the API server: the newest status of each site waits in
        ``_due`` (coalescing) for one of ``SITE_WRITERS`` writers.  Registration,
        a ``connected`` flip or any change but the counters go first; counters
        alone wait until ``SITE_COUNTERS_SECONDS`` after the site's last write.
        """
        if self._take(update):
            self._kick()

    def _take(self, update: PresenceUpdate) -> bool:
        """Note what ``update`` leaves to write for its site; False: nothing."""
        info = update.info
        status = info.to_status()
        essentials = {k: v for k, v in status.items() if k != "lastSeen"}
        labels = self._agent_labels(info.site, info.labels)
        register = info.site not in self.known and self.auto_register
        merge = (
            self.agent_labels and info.site in self.known and self._labels_differ(info.site, labels)
        )
        rewrite = update.came_online or update.went_offline
        earlier = self._due.get(info.site)
        written = self._written.get(info.site)
        quiet = earlier is None and not (register or merge or rewrite)
        if quiet and written and written.essentials == essentials:
            return False  # a heartbeat that changes nothing writes nothing
        due = _Due(
            status=status,
            essentials=essentials,
            labels=labels,
            register=register,
            merge=merge or bool(earlier and earlier.merge),
            rewrite_runs=rewrite or bool(earlier and earlier.rewrite_runs),
            came_online=update.came_online or bool(earlier and earlier.came_online),
        )
        self._due[info.site] = due
        counters_only = (
            written is not None
            and not (register or due.merge or due.rewrite_runs)
            and {k: v for k, v in essentials.items() if k not in SITE_COUNTERS}
            == {k: v for k, v in written.essentials.items() if k not in SITE_COUNTERS}
        )
        if not counters_only:
            self._urgent[info.site] = None
        return True

    def _labels_differ(self, site: str, labels: Mapping[str, str]) -> bool:
        current = self.known[site].get("labels") or {}
        return any(current.get(k) != v for k, v in labels.items())

    # ------------------------------------------------------------- the writers
    def _kick(self) -> None:
        self._wake.set()
        running = [task for task in self._writers if not task.done()]
        for task in self._writers:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("EdgeSite writer failed: %r; started again", task.exception())
        while len(running) < SITE_WRITERS:
            running.append(asyncio.create_task(self._writer(), name="edgesite-writer"))
        self._writers = running

    def _next(self) -> tuple[str | None, float]:
        """The next site to write (urgent first), or how long until one is due."""
        for site in self._urgent:
            if site not in self._writing:
                del self._urgent[site]
                return site, 0.0
        now = self.clock()
        wait = SITE_COUNTERS_SECONDS
        for site in self._due:
            if site in self._writing or site in self._urgent:
                continue
            written = self._written.get(site)
            ready_at = (written.at if written else now) + SITE_COUNTERS_SECONDS
            ready_at = self._retry_at.get(site, ready_at)
            if ready_at <= now:
                return site, 0.0
            wait = min(wait, ready_at - now)
        return None, wait

    async def _writer(self) -> None:
        while True:
            site, wait = self._next()
            if site is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(wait, 0.05))
                continue
            due = self._due.pop(site)
            self._writing.add(site)
            try:
                await self._write(site, due)
            except Exception:  # a bug for one site must not stop the others
                log.exception("writing EdgeSite %s failed", site)
            finally:
                self._writing.discard(site)

    async def _write(self, site: str, due: _Due) -> None:
        """Register, put back labels, write the status, rewrite the runs: one site's turn."""
        self._retry_at.pop(site, None)
        if due.register and site not in self.known:
            try:
                check_site_name(site)
                # Registered with the labels the agent reports (--labels).
                await self.kube.create_edgesite(site, due.labels)
                self.known[site] = {"labels": due.labels, "status": {}}
            except Exception as exc:
                log.warning("could not register EdgeSite %s: %s", site, exc)
        elif due.merge and site in self.known:
            await self._merge_agent_labels(site, due.labels)
        now = self.clock()
        try:
            await self.kube.patch_edgesite_status(site, due.status)
            self._written[site] = _Written(due.essentials, now)
        except NotFound:
            log.info("site %s is not registered (auto-register is off)", site)
        except Exception as exc:
            log.warning("could not update EdgeSite %s: %s; will retry", site, exc)
            if site not in self._due:  # nothing newer came: this one is still the last
                self._due[site] = due._replace(rewrite_runs=False, came_online=False)
                self._retry_at[site] = now + SITE_RETRY_SECONDS
                self._kick()
        if due.rewrite_runs:
            await self._rewrite_runs(site, came_online=due.came_online)

    async def _rewrite_runs(self, site: str, *, came_online: bool) -> None:
        """The site came or went: its runs' ``SiteConnected``, through the StatusWriter."""
        # Unfinished runs, and finished ones last written as on an offline site: a
        # finished run's SiteConnected is not worth a write each time its site
        # reconnects (a broker restart reconnects every site of a fleet at once),
        # but one that finished before the operator first heard the site (its
        # retained state is not trusted, decision 0012) must not read offline for
        # ever.
        for key, record in list(self.held.records.items()):
            if record.site != site:
                continue
            view = self.applier.view(*key)
            unfinished = view is None or not view.done
            written_offline = record.written is not None and record.written.siteConnected is False
            if unfinished or (came_online and written_offline):
                await self.status.write(key)

    async def stop(self) -> None:
        """Stop the writers (what is still due is written by whoever runs next)."""
        for task in self._writers:
            task.cancel()
        for task in self._writers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._writers = []

    async def on_epoch(self, change: EpochChange) -> None:
        """A site's agent runs on a new database: say so on its EdgeSite."""
        if change.old is None:
            message = (
                f"the agent's database {change.new} does not hold {len(change.lost)} unfinished"
                " runs synced from another database; they were sent again"
            )
        else:
            message = (
                f"the agent now runs on a new database ({change.old} -> {change.new}): the"
                f" site's sequence starts again and {len(change.lost)} unfinished runs were"
                " sent again"
            )
        uid = (self.known.get(change.site) or {}).get("uid")
        await self.kube.event(
            {"metadata": {"name": change.site, "uid": uid}}, "EdgeSite", "DatabaseReplaced",
            message, warning=True,
        )  # fmt: skip

    def _agent_labels(self, site: str, labels: Mapping[str, str]) -> dict[str, str]:
        """The agent's labels that Kubernetes accepts; the rest are said once and left out."""
        good = {k: v for k, v in labels.items() if label_ok(k, v)}
        bad = sorted(set(labels) - set(good))
        if bad and site not in self._bad_labels_warned:
            self._bad_labels_warned.add(site)
            log.warning(
                "site %s reports labels Kubernetes refuses (%s%s); left out",
                site, ", ".join(wire.shown(key) for key in bad[:5]),
                f" and {len(bad) - 5} more" if len(bad) > 5 else "",
            )  # fmt: skip
        return good

    async def _merge_agent_labels(self, site: str, labels: Mapping[str, str]) -> None:
        """The agent owns the label keys it reports: put back any that differ.

        Keys the agent does not report belong to whoever set them (kubectl);
        they are never touched.  A key the agent stops reporting stays as it was.
        """
        current = self.known[site].get("labels") or {}
        changed = {k: v for k, v in labels.items() if current.get(k) != v}
        if not changed:
            return
        try:
            await self.kube.patch_edgesite_labels(site, changed)
            self.known[site]["labels"] = {**current, **changed}
        except NotFound:
            pass
        except Exception as exc:
            log.warning("could not update the labels of EdgeSite %s: %s", site, exc)

    # ------------------------------------------------------------- placement
    def candidates(self) -> list[SiteCandidate]:
        """Every site not retired, with its load (a pass over every held run)."""
        load: dict[str, int] = {}
        for record in self.held.records.values():
            view = self.applier.view(record.namespace, record.name)
            if view is None or not view.done:
                load[record.site] = load.get(record.site, 0) + 1
        candidates = []
        for name, site in self.known.items():
            if site.get("retired"):
                continue
            info = self.presence.get(name)
            running = info.running if info else int((site.get("status") or {}).get("running") or 0)
            candidates.append(
                SiteCandidate(
                    name=name,
                    labels=site.get("labels") or {},
                    connected=self.presence.connected(name),
                    load=running + load.get(name, 0),
                )
            )
        return candidates
