"""Operator shards: sites partitioned among operators, each acting only for its own.

Why this module exists: one operator process carries every site's link
session and every Workflow's status, and on one core that stops keeping up
somewhere past a thousand sites (README "When to shard").  With
``--shard-count N`` (``N`` > 1) each operator process is shard
``--shard-index`` of ``N``: it reconciles only the Workflows of the sites it
owns and holds only their link sessions.  With a count of 1 (the default)
nothing here is made and the operator is what it always was.

Who owns a site (:class:`ShardMap`, pure):

* an EdgeSite label ``tideflow.io/shard: "<index>"`` (an index below the
  count) names its shard outright — to move one busy site on its own;
* otherwise rendezvous hashing of the site's name: every shard computes the
  same owner from the name alone, with no shared state and no EdgeSite
  needed (a site that has never reported in is owned all the same), and a
  change of count moves only the sites the new shards win (2 -> 3 moves about
  a third of the sites, all to shard 2; none between 0 and 1).
  :func:`moves` lists them.

What a shard does with it (:class:`ShardRouter`, the hooks the runtime,
admission, the bridge and kopf's handlers call):

* **Workflows.** A Workflow placed on a site (``placement.site``) belongs to
  the site's owner; the others never touch it (kopf's handlers are filtered
  by :func:`kopf_filter`).  No operator adds a finalizer (decision 0019):
  deletions are cancelled at the site from the DELETED event and the ledger
  (decision 0007).  A Workflow that
  selects by label (``siteSelector``) is placed by one shard, its *placer*
  (rendezvous hash of ``namespace/name``), over every shard's sites (their
  EdgeSites: labels, ``connected``, ``running``).  If the chosen site is the
  placer's own it admits the Workflow at once; otherwise it writes the
  choice into the status (``phase: Pending``, ``reason: Placed``, ``site``)
  over the resourceVersion it decided on, and the site's owner admits it from
  the watch event that shows it.  One write more for a selector Workflow
  placed across shards; none for the others.
* **Link.** The bridge subscribes to ``events`` of the owned sites only
  (one subscription per site, made when the site is first known: from its
  EdgeSite, its ledger or its Workflows at start-up, or its first ``state``),
  and to ``state`` of every site — small heartbeats, the only way to hear a
  site that has no EdgeSite yet — handling only its own sites' (the topic is
  checked before anything is decoded).  Nothing is published to another
  shard's site.  Each shard has its own MQTT client id and its own Lease
  (``<lease>-<index>``).
* **Moves.** Ownership is fixed for a process's life: a change of count is
  a restart of every shard with the new count, and an EdgeSite whose shard
  label changes makes the shards it leaves and joins stop (exit 0: their
  Deployment starts them again) — :meth:`ShardRouter.site_seen`.  A moved
  site's records are handled by the protocol as after any operator restart:
  the agent sends again what was not acknowledged, the new owner restores
  the site's mark from the agent's ``state`` (``lastAckedSeq``, as far as
  the gap the site's records show: ``Applier.accept_claim``) and its runs
  from their statuses and the site's ledger, and applies each record once
  (seq order, duplicates ignored); the old owner, stopped, acks nothing.

Docs: ``docs/decisions/0016-operator-shards.md``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from tideflow import wire
from tideflow.spec import SpecError, parse_spec

from .placement import NoSiteError, SiteCandidate, choose_site

log = logging.getLogger(__name__)

SHARD_LABEL = "tideflow.io/shard"
PLACED_REASON = "Placed"  # a selector Workflow placed by another shard, waiting for the owner


class ShardError(ValueError):
    """A shard index or count that cannot be (the message names the setting)."""


@dataclass(frozen=True)
class ShardSpec:
    """This process's shard: ``index`` of ``count`` (``count`` 1: not sharded)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ShardError(f"--shard-count {self.count}: 1 or more")
        if not 0 <= self.index < self.count:
            raise ShardError(
                f"--shard-index {self.index}: from 0 to --shard-count - 1 ({self.count - 1})"
            )

    @property
    def sharded(self) -> bool:
        return self.count > 1

    def lease_name(self, base: str) -> str:
        """Each shard's own Lease; unchanged when not sharded."""
        return f"{base}-{self.index}" if self.sharded else base

    def client_id(self, prefix: str) -> str:
        return f"{prefix}-shard-{self.index}" if self.sharded else prefix


_ORDINAL = re.compile(r"-(\d+)$")


def shard_index(value: str | int | None, hostname: str | None = None) -> int:
    """``--shard-index``: a number, or ``ordinal`` (a StatefulSet pod's: its name's end)."""
    if value is None or value == "":
        return 0
    if isinstance(value, int):
        return value
    if value.strip().lower() == "ordinal":
        name = hostname if hostname is not None else os.environ.get("HOSTNAME", "")
        match = _ORDINAL.search(name)
        if match is None:
            raise ShardError(
                f"--shard-index ordinal: the host name {name!r} does not end in -<number> "
                "(a StatefulSet pod's does)"
            )
        return int(match.group(1))
    try:
        return int(value)
    except ValueError:
        raise ShardError(f"--shard-index {value!r}: a number, or 'ordinal'") from None


def _weight(key: str, shard: int) -> int:
    digest = hashlib.sha256(f"{key}\x00{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def rendezvous(key: str, count: int) -> int:
    """The shard with the highest hash weight for ``key`` (stable across processes and runs)."""
    return max(range(count), key=lambda shard: (_weight(key, shard), -shard))


def label_shard(labels: Mapping[str, str] | None, count: int) -> int | None:
    """The shard an EdgeSite's ``tideflow.io/shard`` label names, if it is one of ``count``."""
    value = (labels or {}).get(SHARD_LABEL)
    if value is None:
        return None
    try:
        shard = int(str(value))
    except ValueError:
        return None
    return shard if 0 <= shard < count else None


def owner(site: str, count: int, labels: Mapping[str, str] | None = None) -> int:
    """The shard that owns ``site``: its label if valid, else the rendezvous hash of its name."""
    labelled = label_shard(labels, count)
    return labelled if labelled is not None else rendezvous(site, count)


def moves(
    sites: Iterable[str],
    before: int,
    after: int,
    labels: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, tuple[int, int]]:
    """Sites whose owner differs between ``before`` and ``after`` shards: site -> (old, new)."""
    labels = labels or {}
    moved = {}
    for site in sites:
        old, new = owner(site, before, labels.get(site)), owner(site, after, labels.get(site))
        if old != new:
            moved[site] = (old, new)
    return moved


class ShardMap:
    """Who owns each site, for one shard; EdgeSite labels as they come."""

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec
        self._labelled: dict[str, int] = {}  # site -> shard its label names
        self._cache: dict[str, int] = {}

    def owner(self, site: str) -> int:
        labelled = self._labelled.get(site)
        if labelled is not None:
            return labelled
        cached = self._cache.get(site)
        if cached is None:
            cached = self._cache[site] = rendezvous(site, self.spec.count)
        return cached

    def owns(self, site: str) -> bool:
        return self.owner(site) == self.spec.index

    def set_labels(self, site: str, labels: Mapping[str, str] | None) -> tuple[int, int]:
        """Note a site's labels; returns its (old, new) owner."""
        old = self.owner(site)
        labelled = label_shard(labels, self.spec.count)
        if (labels or {}).get(SHARD_LABEL) is not None and labelled is None:
            log.warning(
                "EdgeSite %s: label %s=%r is not a shard of %d; placed by its name's hash",
                site, SHARD_LABEL, (labels or {}).get(SHARD_LABEL), self.spec.count,
            )  # fmt: skip
        if labelled is None:
            self._labelled.pop(site, None)
        else:
            self._labelled[site] = labelled
        return old, self.owner(site)

    def placer(self, namespace: str, name: str) -> int:
        """The shard that places a selector Workflow (spreads the placing work)."""
        return rendezvous(f"{namespace}/{name}", self.spec.count)


class Claim(Enum):
    NOT_MINE = "not-mine"
    MINE = "mine"


@dataclass(frozen=True)
class Decision:
    """What a shard does with a Workflow not yet assigned."""

    claim: Claim
    site: str | None = None  # MINE with a site: admit there (the placement is decided)


NOT_MINE = Decision(Claim.NOT_MINE)

# (namespace, name, status, resourceVersion) -> written; the placement status.
PatchStatus = Callable[[str, str, dict[str, Any], str | None], Any]


class ShardRouter:
    """The hooks a sharded operator calls; the single operator makes none of this."""

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec
        self.map = ShardMap(spec)
        self.on_new_site: Callable[[str], None] = lambda site: None
        self.on_moved: Callable[[str, int, int], None] = lambda site, old, new: None

    def owns(self, site: str) -> bool:
        return self.map.owns(site)

    def owns_topic(self, topic: str) -> bool:
        """A message's topic is one of this shard's sites' (checked before decoding)."""
        try:
            site, _ = wire.parse_topic(topic)
        except wire.WireError:
            return True  # the bridge drops it and says why
        return self.owns(site)

    # ------------------------------------------------------------- sites
    def site_seen(
        self, site: str, labels: Mapping[str, str] | None, *, starting: bool = False
    ) -> None:
        """An EdgeSite seen (``starting``: listed before anything is held): its owner.

        Later, an owner that changes to or from this shard (its ``tideflow.io/shard``
        label) stops this shard: it starts again owning what it now owns.
        """
        old, new = self.map.set_labels(site, labels)
        if not starting and old != new and self.spec.index in (old, new):
            log.warning(
                "site %s moves from shard %d to shard %d (label %s): this shard restarts to "
                "hand it over", site, old, new, SHARD_LABEL,
            )  # fmt: skip
            self.on_moved(site, old, new)
            return
        if new == self.spec.index:
            self.on_new_site(site)

    def owned(self, sites: Iterable[str]) -> list[str]:
        return sorted(s for s in set(sites) if self.owns(s))

    # ------------------------------------------------------------- Workflows
    def decide(
        self, body: Mapping[str, Any], candidates: Callable[[], list[SiteCandidate]]
    ) -> tuple[Decision, dict[str, Any] | None]:
        """Whether this shard admits a Workflow, and the placement status to write if it places.

        Returns ``(decision, placement)``: ``placement`` is the status that
        hands a selector Workflow to another shard (the caller writes it over
        the Workflow's resourceVersion).
        """
        meta = body["metadata"]
        status = body.get("status") or {}
        if status.get("assignedGeneration"):
            return (Decision(Claim.MINE) if self.owns(str(status.get("site"))) else NOT_MINE), None
        placed = status.get("site") if status.get("reason") == PLACED_REASON else None
        if isinstance(placed, str) and placed:
            return (Decision(Claim.MINE, placed) if self.owns(placed) else NOT_MINE), None
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError:
            # Reported once, by the shard that would place it.
            mine = self.map.placer(meta["namespace"], meta["name"]) == self.spec.index
            site = _explicit_site(body.get("spec"))
            if site is not None:
                mine = self.owns(site)
            return (Decision(Claim.MINE) if mine else NOT_MINE), None
        if spec.placement is not None and spec.placement.site is not None:
            site = spec.placement.site
            return (Decision(Claim.MINE) if self.owns(site) else NOT_MINE), None
        if self.map.placer(meta["namespace"], meta["name"]) != self.spec.index:
            return NOT_MINE, None
        try:
            site = choose_site(spec.placement, candidates())
        except NoSiteError:
            return Decision(Claim.MINE), None  # admission reports it (Pending) and retries
        if self.owns(site):
            return Decision(Claim.MINE, site), None
        shard = self.map.owner(site)
        placement = {
            "phase": "Pending", "reason": PLACED_REASON, "site": site,
            "message": f"placed on site {site} (operator shard {shard} of {self.spec.count})",
            "observedGeneration": int(meta.get("generation") or 1),
        }  # fmt: skip
        return NOT_MINE, placement

    def candidates(
        self, local: list[SiteCandidate], known: Mapping[str, Mapping[str, Any]]
    ) -> list[SiteCandidate]:
        """Placement's candidates over every shard: another shard's sites as their EdgeSites say."""
        out = []
        for candidate in local:
            if self.owns(candidate.name):
                out.append(candidate)
                continue
            status = (known.get(candidate.name) or {}).get("status") or {}
            out.append(
                SiteCandidate(
                    name=candidate.name, labels=candidate.labels,
                    connected=bool(status.get("connected")),
                    load=int(status.get("running") or 0),
                )
            )  # fmt: skip
        return out

    def workflow_mine(self, body: Mapping[str, Any]) -> bool:
        """kopf's filter: the Workflow is (or would be, once placed) this shard's."""
        status = body.get("status") or {}
        site = status.get("site")
        if (
            isinstance(site, str)
            and site
            and (status.get("assignedGeneration") or status.get("reason") == PLACED_REASON)
        ):
            return self.owns(site)
        explicit = _explicit_site(body.get("spec"))
        if explicit is not None:
            return self.owns(explicit)
        meta = body.get("metadata") or {}
        return self.map.placer(str(meta.get("namespace")), str(meta.get("name"))) == self.spec.index


def _explicit_site(spec: Any) -> str | None:
    placement = (spec or {}).get("placement") if isinstance(spec, Mapping) else None
    site = placement.get("site") if isinstance(placement, Mapping) else None
    return site if isinstance(site, str) and site else None


def kopf_filter(memo: Any = None, body: Any = None, **_: Any) -> bool:
    """kopf's ``when=`` for the Workflow handlers: only this shard's (all when not sharded)."""
    runtime = memo.get("runtime") if memo is not None else None
    router = getattr(runtime, "shards", None)
    if router is None or body is None:
        return True
    return bool(router.workflow_mine(body))


__all__ = [
    "NOT_MINE",
    "PLACED_REASON",
    "SHARD_LABEL",
    "Claim",
    "Decision",
    "ShardError",
    "ShardMap",
    "ShardRouter",
    "ShardSpec",
    "kopf_filter",
    "label_shard",
    "moves",
    "owner",
    "rendezvous",
    "shard_index",
]
