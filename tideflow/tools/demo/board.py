"""The demo's live view: what it knows of each site, and the table that shows it.

A :class:`Snapshot` is one poll: the Workflows and EdgeSites as the cloud shows
them, and each site's truth from its own database (:mod:`.truth`).  The
:class:`Board` prints the story's lines and, on a terminal, a table that
updates in place beneath them (:func:`table`); otherwise one plain line each
time the picture changes (:func:`plain`).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tideflow.tools.demo.common import CUT_SITE
from tideflow.tools.demo.truth import SiteTruth

__all__ = ["Board", "Site", "Snapshot", "plain", "table"]


@dataclass
class Site:
    name: str
    workflow: str
    db: Path
    log: Path
    journal: Path
    broker_url: str
    proc: subprocess.Popen[bytes] | None = None
    agent: str = "not started"


@dataclass
class Snapshot:
    workflows: dict[str, dict[str, Any]] = field(default_factory=dict)
    edgesites: dict[str, dict[str, Any]] = field(default_factory=dict)
    truth: dict[str, SiteTruth] = field(default_factory=dict)

    def status(self, workflow: str) -> dict[str, Any]:
        return dict(self.workflows.get(workflow, {}).get("status") or {})

    def site(self, name: str) -> dict[str, Any]:
        return dict(self.edgesites.get(name, {}).get("status") or {})


class Board:
    """Story lines, plus a table that updates in place on a terminal (plain lines otherwise)."""

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out = out
        self.live = live
        self.t0 = time.monotonic()
        self._drawn: list[str] = []
        self._last_plain = ""

    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:6.1f}s]"

    def _erase(self) -> None:
        if self.live and self._drawn:
            self.out.write(f"\x1b[{len(self._drawn)}F\x1b[J")
            self._drawn = []

    def _draw(self, lines: list[str]) -> None:
        width = max(40, shutil.get_terminal_size((120, 40)).columns - 1)
        clipped = [line[:width] for line in lines]
        self.out.write("".join(line + "\n" for line in clipped))
        self._drawn = clipped
        self.out.flush()

    def say(self, text: str = "", *, stamp: bool = True) -> None:
        table = self._drawn
        self._erase()
        for line in text.splitlines() or [""]:
            self.out.write(f"{self._stamp()} {line}\n" if stamp and line else f"{line}\n")
        if table:
            self._draw(table)
        self.out.flush()

    def section(self, title: str) -> None:
        self.say(f"\n=== {title}", stamp=False)

    def update(self, table: list[str], plain: str) -> None:
        if self.live:
            if table != self._drawn:
                self._erase()
                self._draw(table)
        elif plain != self._last_plain:
            self._last_plain = plain
            self.out.write(f"{self._stamp()}   {plain}\n")
            self.out.flush()

    def freeze(self) -> None:
        """Leave the table where it is; what follows prints below it."""
        self._drawn = []


def _yes(value: Any) -> str:
    return "-" if value is None else ("true" if value else "false")


def table(sites: Iterable[Site], snap: Snapshot, *, link_cut: bool) -> list[str]:
    """The live table: per workflow cloud and site progress; per site agent, link and outbox."""
    sites = list(sites)
    lines = [
        f"  {'WORKFLOW':<12} {'SITE':<7} {'PHASE':<10} {'PROGRESS':<9} "
        f"{'CONNECTED':<10} AT THE SITE",
    ]
    for site in sites:
        status = snap.status(site.workflow)
        lines.append(
            f"  {site.workflow:<12} {site.name:<7} {status.get('phase') or '-':<10} "
            f"{status.get('progress') or '-':<9} {_yes(status.get('siteConnected')):<10} "
            f"{snap.truth[site.name].progress()}"
        )
    lines.append("")
    lines.append(
        f"  {'SITE':<7} {'AGENT':<19} {'LINK':<5} {'OUTBOX':>6}  {'CONNECTED':<10} {'ACKED SEQ':>9}"
    )
    for site in sites:
        link = "cut" if site.name == CUT_SITE and link_cut else "up"
        edge = snap.site(site.name)
        lines.append(
            f"  {site.name:<7} {site.agent:<19} {link:<5} "
            f"{snap.truth[site.name].outbox_depth:>6}  "
            f"{_yes(edge.get('connected')):<10} {edge.get('lastAckedSeq', '-')!s:>9}"
        )
    return lines


def plain(sites: Iterable[Site], snap: Snapshot) -> str:
    """The same in one line, printed when it changes (not a terminal, or ``--ci``)."""
    parts = []
    for site in sites:
        status = snap.status(site.workflow)
        flag = status.get("siteConnected")
        connected = "-" if flag is None else ("connected" if flag else "offline")
        parts.append(
            f"{site.workflow} {status.get('phase') or '-'} {status.get('progress') or '-'}"
            f" {connected} (site: {snap.truth[site.name].progress()})"
        )
    depths = ", ".join(f"{name} {truth.outbox_depth}" for name, truth in snap.truth.items())
    return " | ".join(parts) + f" | outbox {depths}" if parts else ""
