"""The demo's independent witness: what each site's own database and journal say.

The demo never asks the agents how they are doing; it opens each agent's
SQLite database read-only (WAL allows it, as ``tideflow-agent status`` does)
and reads the journal every demo task appends to when its work is done.  What
it finds is the site's truth, against which the cloud's ``.status`` is judged
(decision 0005: the demo reads the site databases, so a schema change there
must update this module; its tests run in CI).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tideflow.phases import TASK_DONE
from tideflow.tracing import attempt_span_of, stored_span

__all__ = ["SiteTruth", "TaskTruth", "read_journal", "read_site_db"]


@dataclass
class TaskTruth:
    phase: str
    attempt: int
    outputs: dict[str, str]
    started_at: float | None


@dataclass
class SiteTruth:
    """One workflow's run as the agent's database holds it, plus the outbox."""

    run_phase: str | None = None
    tasks: dict[str, TaskTruth] = field(default_factory=dict)
    last_seq: int = 0
    outbox_depth: int = 0
    link: str | None = None
    succeeded_spans: dict[str, int] = field(default_factory=dict)  # task -> attempts

    @property
    def done(self) -> int:
        return sum(1 for t in self.tasks.values() if t.phase in TASK_DONE)

    def count_span(self, span: dict[str, Any]) -> None:
        attributes = span.get("attributes", {})
        task_name = attributes.get("tideflow.task")
        if task_name and attributes.get("tideflow.outcome") == "Succeeded":
            self.succeeded_spans[task_name] = self.succeeded_spans.get(task_name, 0) + 1

    def progress(self) -> str:
        if self.run_phase is None:
            return "-"
        return f"{self.run_phase} {self.done}/{len(self.tasks)}"


def read_site_db(db: Path, namespace: str, name: str) -> SiteTruth:
    """The latest run of ``namespace/name`` in an agent's database, read-only (WAL allows it)."""
    truth = SiteTruth()
    if not db.exists():
        return truth
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
    except sqlite3.Error:
        return truth
    try:
        row = conn.execute(
            "SELECT run_id, phase FROM runs WHERE namespace=? AND name=?"
            " ORDER BY created_at DESC LIMIT 1",
            (namespace, name),
        ).fetchone()
        if row is not None:
            run_id, truth.run_phase = row
            for task, phase, attempt, outputs, started in conn.execute(
                "SELECT task, phase, attempt, outputs, started_at FROM task_runs WHERE run_id=?",
                (run_id,),
            ):
                truth.tasks[task] = TaskTruth(phase, attempt, json.loads(outputs), started)
            # Filed spans, and those still carried only in outcome records (decision 0022).
            # An outcome record's span is derived from it (decision 0036).
            for (body,) in conn.execute(
                "SELECT body FROM spans WHERE run_id=? UNION ALL"
                " SELECT body FROM outbox WHERE run_id=?"
                " AND span_trace IS NOT NULL AND seq > (SELECT coalesce(max(CAST(value AS"
                " INTEGER)), 0) FROM meta WHERE key='spans_filed')",
                (run_id, run_id),
            ):
                truth.count_span(stored_span(json.loads(body)) or {})
            # A finished task's last attempt keeps its span's ids in its own row, and
            # its span is derived from the row (decision 0038).
            for *names, task, phase, attempt, started, finished, ref in conn.execute(
                "SELECT r.uid, r.generation, r.namespace, r.name, t.task, t.phase, t.attempt,"
                " t.started_at, t.finished_at, t.span_ref FROM task_runs t"
                " JOIN runs r ON r.run_id = t.run_id WHERE t.run_id=? AND t.span_ref IS NOT NULL",
                (run_id,),
            ):
                record = dict(zip(("uid", "generation", "namespace", "name"), names, strict=True))
                record |= {"task": task, "phase": phase, "attempt": attempt, "startedAt": started}
                record |= {"finishedAt": finished, "attemptSpan": json.loads(ref)}
                truth.count_span(attempt_span_of(record) or {})
        seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
        truth.last_seq = int(seq[0]) if seq else 0
        truth.outbox_depth = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
        link = conn.execute("SELECT value FROM meta WHERE key='link_state'").fetchone()
        truth.link = link[0] if link else None
    except (sqlite3.Error, ValueError):
        return SiteTruth()  # not initialised yet, or busy: the next poll will see it
    finally:
        conn.close()
    return truth


def read_journal(path: Path) -> list[tuple[str, int]]:
    """``(task, attempt)`` for every line a task wrote when its work was done."""
    try:
        text = path.read_text(errors="replace")  # (a task's line may be anything)
    except OSError:
        return []
    lines = []
    for line in text.splitlines():
        task, _, attempt = line.strip().partition(" ")
        if task:
            lines.append((task, int(attempt) if attempt.isascii() and attempt.isdigit() else 0))
    return lines
