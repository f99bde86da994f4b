"""The demo's verdict: every task once, every record applied once.

Judged only from what the demo can see for itself — each site's database and
journal (:mod:`.truth`), the cloud's Workflows and EdgeSites — never from what
the agents or the operator say about themselves:

* **every task once** — per site, each task wrote exactly one journal line,
  from the attempt that committed Succeeded, and the agent recorded exactly one
  successful attempt (span) per task; at the cut site every task that had
  committed before the kill kept its attempt number;
* **every record applied once** — the EdgeSite's ``lastAckedSeq`` equals the
  agent's last outbox ``seq``, the outbox is empty, and the Workflow status
  (phase; per task phase, attempt, outputs) equals the agent's database.

Pure functions of what was observed, so they can be tested without a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tideflow.phases import RunPhase, TaskPhase
from tideflow.tools.demo.board import Site, Snapshot
from tideflow.tools.demo.common import CUT_SITE, NAMESPACE
from tideflow.tools.demo.truth import SiteTruth, read_journal, read_site_db

__all__ = ["converged", "status_mismatches", "verdict"]


def status_mismatches(status: Mapping[str, Any], truth: SiteTruth) -> list[str]:
    """How a Workflow's ``.status`` differs from the agent's database (empty: equal)."""
    problems = []
    if status.get("phase") != truth.run_phase:
        problems.append(f"phase {status.get('phase')} in the cloud, {truth.run_phase} at the site")
    listed = {t.get("name"): t for t in status.get("tasks") or []}
    for name, task in sorted(truth.tasks.items()):
        cloud = listed.get(name)
        if cloud is None:
            problems.append(f"task {name} is missing in the cloud")
        elif (cloud.get("phase"), cloud.get("attempt"), cloud.get("outputs") or {}) != (
            task.phase,
            task.attempt,
            task.outputs,
        ):
            problems.append(
                f"task {name}: {cloud.get('phase')} attempt {cloud.get('attempt')} in the "
                f"cloud, {task.phase} attempt {task.attempt} at the site"
            )
    return problems


def converged(sites: Mapping[str, Site], snap: Snapshot) -> bool:
    """Both runs Succeeded in the cloud, every outbox drained and acknowledged, statuses equal."""
    for site in sites.values():
        truth = snap.truth[site.name]
        status = snap.status(site.workflow)
        if status.get("phase") != RunPhase.SUCCEEDED or truth.outbox_depth != 0:
            return False
        if snap.site(site.name).get("lastAckedSeq") != truth.last_seq:
            return False
        if status_mismatches(status, truth):
            return False
    return True


def verdict(
    sites: Mapping[str, Site],
    snap: Snapshot,
    *,
    committed_at_kill: Mapping[str, int],
    interrupted_task: str | None,
) -> tuple[bool, str]:
    """``(ok, text)``: every task once, every record applied once (see the module doc)."""
    task_problems: list[str] = []
    record_problems: list[str] = []
    tasks = records = 0
    for site in sites.values():
        truth = read_site_db(site.db, NAMESPACE, site.workflow)
        journal = read_journal(site.journal)
        tasks += len(truth.tasks)
        records += truth.last_seq
        if truth.run_phase != RunPhase.SUCCEEDED:
            task_problems.append(f"{site.name}: the run is {truth.run_phase}")
        for name, task in sorted(truth.tasks.items()):
            ran = [attempt for (task_name, attempt) in journal if task_name == name]
            if len(ran) != 1:
                task_problems.append(f"{site.name}: {name} ran {len(ran)} times")
            elif task.phase == TaskPhase.SUCCEEDED and ran[0] != task.attempt:
                task_problems.append(
                    f"{site.name}: {name} did its work in attempt {ran[0]}, "
                    f"but attempt {task.attempt} committed"
                )
            if task.phase == TaskPhase.SUCCEEDED and truth.succeeded_spans.get(name, 0) != 1:
                task_problems.append(
                    f"{site.name}: {name} has {truth.succeeded_spans.get(name, 0)} "
                    "successful attempts"
                )
        if site.name == CUT_SITE:
            if not committed_at_kill:
                task_problems.append("site-b: its agent was never killed mid-run")
            for name, attempt in sorted(committed_at_kill.items()):
                after = truth.tasks.get(name)
                if after is None or after.attempt != attempt or after.phase != TaskPhase.SUCCEEDED:
                    task_problems.append(f"site-b: {name} committed before the kill, ran again")
        acked = snap.site(site.name).get("lastAckedSeq")
        if acked != truth.last_seq or truth.outbox_depth:
            record_problems.append(
                f"{site.name}: cloud acked seq {acked}, the site's last is {truth.last_seq}"
                f" ({truth.outbox_depth} unacknowledged)"
            )
        mismatches = status_mismatches(snap.status(site.workflow), truth)
        record_problems += [f"{site.workflow}: {m}" for m in mismatches[:3]]
    if task_problems or record_problems:
        return False, "FAILED — " + "; ".join(task_problems + record_problems)
    retried = (
        f"; the attempt of {interrupted_task} that kill -9 cut short did no work "
        "and ran again as an interruption, using no retry"
        if interrupted_task
        else ""
    )
    return True, (
        f"OK — every task ran once ({tasks} tasks at {len(sites)} sites{retried}), "
        f"every record applied once ({records} records, each acknowledged; "
        "the cloud's status equals each site's database)"
    )
