"""EdgeSites as the operator sees them: registered, labelled, kept current, and chosen from.

* The EdgeSite objects (labels, status, the ``retired`` annotation) come in
  through kopf's EdgeSite event handler (:meth:`Sites.seen`, :meth:`Sites.gone`).
* A site's agent reports in over MQTT (:meth:`Sites.on_presence`): an unknown
  site is registered (unless auto-registration is off) with the labels the
  agent reports; the label keys the agent reports are its own and put back
  when they differ (keys it does not report are never touched); the status
  is written only when something other than ``lastSeen`` changed: a
  heartbeat that changes nothing writes nothing (a thousand idle sites
  heartbeating every 15 s cost 120,000 writes an hour when ``lastSeen`` was
  refreshed every 30 s), so ``lastSeen`` is when the site last reported a
  change.  Whether it is reachable now is ``connected``, which its last will
  turns false.
  When a site comes or goes, its unfinished runs' statuses are written
  (their ``SiteConnected`` condition).
* An agent on a new database is said on its EdgeSite as an Event
  (:meth:`Sites.on_epoch`).
* Placement's candidates (:meth:`Sites.candidates`): every site not retired,
  with its load (what its agent runs, plus the runs assigned and unfinished);
  :attr:`Sites.version` moves when they may have changed, and the Workflows
  waiting for a site are tried again (:mod:`.watch`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

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

_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_LABEL_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def label_ok(key: str, value: str) -> bool:
    """A Kubernetes label: ``[prefix/]name`` with a name and a value of at most 63 characters."""
    prefix, _, name = key.rpartition("/")
    return (
        bool(name)
        and _LABEL_NAME.fullmatch(name) is not None
        and (not prefix or _LABEL_PREFIX.fullmatch(prefix) is not None)
        and _LABEL_NAME.fullmatch(value) is not None
    )


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.presence = presence
        self.applier = applier
        self.status = status
        self.held = held
        self.auto_register = auto_register
        self.clock = clock
        self.known: dict[
            str, dict[str, Any]
        ] = {}  # EdgeSite name -> {uid, labels, status, retired}
        self._written: dict[str, _Written] = {}
        # Bumped when a site appears, goes, or changes what placement reads: the
        # Workflows waiting for a site are tried again (watch.py).
        self.version = 0
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
        info = update.info
        labels = self._agent_labels(info.site, info.labels)
        if info.site not in self.known and self.auto_register:
            try:
                check_site_name(info.site)
                # Registered with the labels the agent reports (--labels).
                await self.kube.create_edgesite(info.site, labels)
                self.known[info.site] = {"labels": labels, "status": {}}
            except Exception as exc:
                log.warning("could not register EdgeSite %s: %s", info.site, exc)
        elif info.site in self.known and labels:
            await self._merge_agent_labels(info.site, labels)
        status = info.to_status()
        written = self._written.get(info.site)
        now = self.clock()
        essentials = {k: v for k, v in status.items() if k != "lastSeen"}
        if written and written.essentials == essentials:
            return  # a heartbeat that changes nothing writes nothing
        try:
            await self.kube.patch_edgesite_status(info.site, status)
            self._written[info.site] = _Written(essentials, now)
        except NotFound:
            log.info("site %s is not registered (auto-register is off)", info.site)
        except Exception as exc:
            log.warning("could not update EdgeSite %s: %s", info.site, exc)
        if update.came_online or update.went_offline:
            # Unfinished runs, and finished ones last written as on an offline site: a
            # finished run's SiteConnected is not worth a write each time its site
            # reconnects (a broker restart reconnects every site of a fleet at once),
            # but one that finished before the operator first heard the site (its
            # retained state is not trusted, decision 0012) must not read offline for
            # ever.
            for key, record in list(self.held.records.items()):
                if record.site != info.site:
                    continue
                view = self.applier.view(*key)
                unfinished = view is None or not view.done
                written_offline = (record.written or {}).get("siteConnected") is False
                if unfinished or (update.came_online and written_offline):
                    await self.status.write(key)

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
            log.warning("site %s reports labels Kubernetes refuses (%s); left out", site, bad)
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
