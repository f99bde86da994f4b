"""Choosing the site that runs a Workflow: pure logic, no I/O.

``placement.site`` names the site outright (it need not be registered or
online: the assignment waits in the broker and is re-sent when the site
comes online).  ``placement.siteSelector`` picks among registered EdgeSites
whose labels match, preferring connected sites, then the least loaded
(running tasks reported by the site plus workflows assigned and unfinished),
then the name, so the choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tideflow.spec import Placement


@dataclass(frozen=True)
class SiteCandidate:
    name: str
    labels: Mapping[str, str]
    connected: bool
    load: int


class NoSiteError(LookupError):
    """No registered site matches the selector."""


def choose_site(placement: Placement | None, candidates: Iterable[SiteCandidate]) -> str:
    if placement is None:
        raise NoSiteError("spec.placement is required to run a Workflow from the cloud")
    if placement.site is not None:
        return placement.site
    assert placement.site_selector is not None
    wanted = placement.site_selector.match_labels
    matching = [c for c in candidates if all(c.labels.get(k) == v for k, v in wanted.items())]
    if not matching:
        selector = ",".join(f"{k}={v}" for k, v in sorted(wanted.items())) or "(any)"
        raise NoSiteError(f"no EdgeSite matches siteSelector {selector}")
    best = min(matching, key=lambda c: (not c.connected, c.load, c.name))
    return best.name
