"""Who sets an EdgeSite's labels: its agent's keys, or only people (``--no-agent-labels``).

By default the label keys a site's agent reports are the agent's: set at
registration and put back when changed by hand.  A ``siteSelector`` places
Workflows by those labels, so with that default a site can relabel itself to
draw Workflows meant for others.  With ``--no-agent-labels`` the agent's
labels are taken once, when its EdgeSite is registered, and never again.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tideflow import wire
from tideflow_operator.cli import build_parser, config_from_args
from tideflow_operator.model import Held
from tideflow_operator.presence import SitePresence
from tideflow_operator.sites import Sites

EPOCH = "e1"


class LabelKube:
    """Records EdgeSite creates and label patches."""

    def __init__(self) -> None:
        self.created: dict[str, dict[str, str]] = {}
        self.label_patches: list[tuple[str, dict[str, str]]] = []

    async def create_edgesite(self, name: str, labels: dict[str, str]) -> None:
        self.created[name] = dict(labels)

    async def patch_edgesite_labels(self, name: str, labels: dict[str, str]) -> None:
        self.label_patches.append((name, dict(labels)))

    async def patch_edgesite_status(self, name: str, status: dict[str, Any]) -> None:
        return None

    async def patch_workflow_status(self, *_: Any, **__: Any) -> str:
        return "1"

    async def event(self, *_: Any, **__: Any) -> None:
        return None


async def _heartbeats(agent_labels: bool) -> LabelKube:
    """A new site reports zone=north; a person relabels it zone=south; it heartbeats
    zone=north again, then claims zone=eu; a second site, registered by hand, claims
    tier=gold.  (``on_presence``: each heartbeat's writes are done when it returns.)"""
    kube = LabelKube()
    presence = SitePresence()
    sites = Sites(
        kube, presence, None, None, Held(),  # type: ignore[arg-type]
        auto_register=True, agent_labels=agent_labels,
    )  # fmt: skip

    async def heartbeat(site: str, labels: dict[str, str]) -> None:
        payload = wire.StatePayload(online=True, epoch=EPOCH, labels=labels)
        await sites.on_presence(presence.observe(site, payload, sent_at=time.time()))

    try:
        await heartbeat("line-1", {"zone": "north"})
        sites.seen("line-1", {"metadata": {"uid": "u1", "labels": {"zone": "south"}}})
        sites.seen("line-2", {"metadata": {"uid": "u2", "labels": {"tier": "iron"}}})
        await heartbeat("line-1", {"zone": "north"})
        await heartbeat("line-2", {"tier": "gold"})
        await heartbeat("line-1", {"zone": "eu"})
    finally:
        await sites.stop()
    return kube


async def test_by_default_the_agent_owns_the_keys_it_reports() -> None:
    kube = await _heartbeats(agent_labels=True)
    assert kube.created == {"line-1": {"zone": "north"}}
    assert kube.label_patches == [
        ("line-1", {"zone": "north"}),  # put back over a person's zone=south
        ("line-2", {"tier": "gold"}),
        ("line-1", {"zone": "eu"}),
    ]


async def test_with_no_agent_labels_a_site_cannot_relabel_itself() -> None:
    kube = await _heartbeats(agent_labels=False)
    assert kube.created == {"line-1": {"zone": "north"}}  # taken at registration
    assert kube.label_patches == []  # never after


@pytest.mark.parametrize(("argv", "expected"), [([], True), (["--no-agent-labels"], False)])
def test_the_flag_reaches_the_settings(argv: list[str], expected: bool) -> None:
    args = build_parser().parse_args(["run", "--broker", "mqtt://127.0.0.1:1", *argv])
    assert config_from_args(args).agent_labels is expected
