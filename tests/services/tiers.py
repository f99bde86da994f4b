"""The ``tiers:`` line at the end of a test session, and the CI rule behind it.

The suite has these tiers, as the README names them:

* ``unit`` — ``tests/unit``: pure logic, no process but pytest's;
* ``processes`` — real processes and a real Mosquitto (``tests/integration``
  and anything else that is not envtest); the machine can run it when the
  ``mosquitto`` binary is there;
* ``cluster`` — a real 3-node RabbitMQ cluster (tests marked ``rabbitmq``,
  :mod:`services.rabbitmq`); the machine can run it when Debian's
  ``rabbitmq-server`` is installed;
* ``envtest`` — a real Kubernetes API server (tests marked ``envtest``); the
  machine can run it when kube-apiserver, etcd and kubectl are there;
* ``browser`` — the console in a real headless browser (tests marked
  ``browser``, which need envtest too); the machine can run it when Debian's
  ``chromium`` and ``chromedriver`` and the ``selenium`` package are there
  (``.ci/setup`` installs them, so under ``CI`` a missing one fails).

A tier's line says how many tests ran and names every skip inside it with its
reason — including whole modules skipped at import (``pytest.importorskip``
of a missing library), which pytest reports as collection skips and a count
of test outcomes never shows.

With the environment variable ``CI`` set, a skip inside a tier this machine
can run fails the session: a missing library that ``.ci/setup`` should have
installed must not turn a tier green.  A test that cannot run because the
*machine* lacks something no setup script provides (mount permission, a
container builder) says so with :func:`machine_lacks`; such skips are
reported but allowed.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

TIERS = ("unit", "processes", "cluster", "envtest", "browser")
MACHINE_PREFIX = "this machine lacks "


def machine_lacks(what: str) -> NoReturn:
    """Skip: the machine cannot do ``what`` (allowed under ``CI``, unlike other skips)."""
    pytest.skip(MACHINE_PREFIX + what)


def ci_enabled() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def tier_of_nodeid(nodeid: str) -> str:
    """By directory (node ids are relative to the rootdir): unit/, e2e/, anything else."""
    parts = Path(nodeid.split("::")[0]).parts
    if "unit" in parts:
        return "unit"
    if "e2e" in parts:
        return "envtest"
    return "processes"


def machine_cannot_run(tier: str) -> str | None:
    """None when this machine has what ``tier`` needs; else what it lacks."""
    if tier == "processes":
        from services.broker import INSTALL_HINT, find_mosquitto

        return None if find_mosquitto() else f"mosquitto binary not found; {INSTALL_HINT}"
    if tier == "cluster":
        from services import rabbitmq

        return rabbitmq.missing_reason()
    if tier == "envtest":
        from services import kube

        return kube.missing_reason()
    if tier == "browser":
        from services import browser

        return browser.missing_reason() or machine_cannot_run("envtest")
    return None


@dataclass
class TierLog:
    """What each tier did this session."""

    of: dict[str, str] = field(default_factory=dict)  # nodeid -> tier
    ran: Counter[str] = field(default_factory=Counter)
    skips: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # tier -> (where, why)
    problems: list[str] = field(default_factory=list)
    envtest_version: str = "?"

    # -- hooks ---------------------------------------------------------------------

    def collected(self, report: pytest.CollectReport) -> None:
        """A module (or class) skipped while being collected: every test in it is gone."""
        if not report.skipped:
            return
        self._skip(tier_of_nodeid(report.nodeid), report.nodeid, _reason(report))

    def selected(self, item: pytest.Item) -> None:
        envtest = item.get_closest_marker("envtest") is not None
        browser = item.get_closest_marker("browser") is not None
        rabbitmq = item.get_closest_marker("rabbitmq") is not None
        self.of[item.nodeid] = _tier_of(
            item.nodeid, envtest=envtest, browser=browser, rabbitmq=rabbitmq
        )

    def reported(self, report: pytest.TestReport) -> None:
        # Under pytest-xdist the controller collects nothing: the tier comes from
        # the report itself (its keywords carry the test's markers).
        tier = self.of.get(report.nodeid)
        if tier is None:
            tier = _tier_of(
                report.nodeid,
                envtest="envtest" in report.keywords,
                browser="browser" in report.keywords,
                rabbitmq="rabbitmq" in report.keywords,
            )
            self.of[report.nodeid] = tier
        if report.skipped and not hasattr(report, "wasxfail"):
            self._skip(tier, report.nodeid, _reason(report))
        elif report.when == "call" or (report.when == "setup" and report.failed):
            self.ran[tier] += 1

    def _skip(self, tier: str, where: str, why: str) -> None:
        self.skips.setdefault(tier, []).append((where, why))

    # -- verdict -------------------------------------------------------------------

    def judge(self, session: pytest.Session) -> None:
        """Under ``CI``: fail the session if a tier this machine can run skipped anything."""
        self.problems = []
        for tier in TIERS:
            if machine_cannot_run(tier) is not None:
                continue
            for where, why in self.skips.get(tier, []):
                if not why.startswith(MACHINE_PREFIX):
                    self.problems.append(f"{tier}: {where} skipped: {why}")
        if (
            ci_enabled()
            and self.problems
            and session.exitstatus
            in (
                pytest.ExitCode.OK,
                pytest.ExitCode.NO_TESTS_COLLECTED,
            )
        ):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def summary_lines(self) -> list[str]:
        parts, details = [], []
        for tier in TIERS:
            selected = any(t == tier for t in self.of.values()) or tier in self.skips
            skipped = self.skips.get(tier, [])
            cannot = machine_cannot_run(tier)
            if self.ran[tier]:
                detail = {
                    "processes": " (mosquitto found)",
                    "cluster": " (3 rabbitmq nodes)",
                    "envtest": f" (kube-apiserver {self.envtest_version})",
                    "browser": " (chromium)",
                }.get(tier, "")
                text = f"{tier} ran {self.ran[tier]}{detail}"
                if skipped:
                    text += f", {len(skipped)} skipped inside"
            elif skipped:
                text = f"{tier} SKIPPED ({len(skipped)})"
            elif selected:
                text = f"{tier} did not run"
            else:
                text = f"{tier} not selected"
            if cannot and not self.ran[tier] and selected:
                text += f": {cannot}"
            parts.append(text)
            by_reason = Counter(why for _, why in skipped)
            for why, n in by_reason.most_common():
                if why == cannot:  # the whole tier, already said on the line
                    continue
                where = next(w for w, y in skipped if y == why)
                more = f" and {n - 1} more" if n > 1 else ""
                details.append(f"  {tier} skipped {n}: {why} ({where}{more})")
        lines = ["tiers: " + "; ".join(parts), *details]
        if self.problems:
            verdict = "FAILED the run" if ci_enabled() else "would fail the run with CI set"
            lines.append(
                f"tiers: {len(self.problems)} skip(s) in tiers this machine can run {verdict}"
            )
        return lines


def _tier_of(nodeid: str, *, envtest: bool, browser: bool = False, rabbitmq: bool = False) -> str:
    if browser:
        return "browser"
    if envtest:
        return "envtest"
    if rabbitmq:
        return "cluster"
    tier = tier_of_nodeid(nodeid)
    return "processes" if tier == "envtest" else tier  # an e2e test without the marker


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return str(reason).removeprefix("Skipped: ")
