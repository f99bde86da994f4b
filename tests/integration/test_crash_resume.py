"""kill -9 of a real ``tideflow-agent run-local`` process at random moments.

Each trial starts the agent on a workflow whose tasks append their name to a
journal, SIGKILLs it at a random moment (sometimes twice), reads what the
database had committed at the kill, restarts the agent on the same database
and lets it finish.  Asserted every time:

* the run finishes (exit 0) and every task ran, with the default retry policy
  (no retries): a kill is an interruption, never a task failure;
* no task whose success was committed before a kill ran again;
* the outbox holds exactly one record per state change: per task, the
  records are a valid chain of distinct transitions ending in the state the
  database holds, and the same for the run;
* ``PRAGMA integrity_check`` is ok.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from services.agent import has_schema, read_only

TRIALS = 20
TASKS = ["a", "b1", "b2", "b3", "c", "d1", "d2", "e"]
DEPS = {
    "b1": ["a"],
    "b2": ["a"],
    "b3": ["a"],
    "c": ["b1", "b2", "b3"],
    "d1": ["c"],
    "d2": ["c"],
    "e": ["d1", "d2"],
}


def manifest(journal: Path, rng: random.Random) -> dict[str, Any]:
    tasks = [
        {
            "name": name,
            "dependsOn": DEPS.get(name, []),
            "command": [
                "sh",
                "-c",
                f'sleep {rng.uniform(0.05, 0.3):.2f}; echo "$0" >> "$1"',
                name,
                str(journal),
            ],
        }
        for name in TASKS
    ]
    return {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "crashy", "namespace": "default"},
        "spec": {"tasks": tasks},
    }


def committed_successes(db: Path) -> set[str]:
    """Read-only (see services.agent.read_only): the WAL the kill left must reach the restart."""
    if not db.exists():
        return set()
    wal = db.with_name(db.name + "-wal")
    wal_before = wal.read_bytes() if wal.exists() else b""
    with read_only(db) as conn:
        if not has_schema(conn):  # killed before the schema was created
            return set()
        rows = conn.execute("SELECT task FROM task_runs WHERE phase='Succeeded'").fetchall()
    wal_after = wal.read_bytes() if wal.exists() else b""  # (an empty one may appear)
    assert wal_after == wal_before, "reading the killed agent's database changed its WAL"
    return {row[0] for row in rows}


# What a task's outbox records may say next.  "Interrupted": the agent was
# killed mid-attempt (found Running, or found alive by its mark though its
# Running record never committed); it runs again without using a retry.
ALLOWED_NEXT = {
    None: {"Running", "Skipped", "Cancelled", "Retrying", "Failed", "Interrupted"},
    "Pending": {"Running", "Interrupted"},
    "Running": {"Succeeded", "Retrying", "Failed", "Cancelled", "Interrupted"},
    "Retrying": {"Running", "Failed", "Cancelled", "Interrupted"},
    "Interrupted": {"Running", "Interrupted", "Failed", "Cancelled"},
}


def check_outbox(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        records = conn.execute(
            "SELECT o.seq, o.kind, coalesce(s.body, o.body) FROM outbox o"
            " LEFT JOIN spans s ON s.rowid = o.span_rowid ORDER BY o.seq"
        ).fetchall()
        final = {
            row[0]: (row[1], row[2])
            for row in conn.execute("SELECT task, phase, attempt FROM task_runs")
        }
        run_phase = conn.execute("SELECT phase FROM runs").fetchone()[0]
    seqs = [r[0] for r in records]
    assert seqs == sorted(set(seqs)), "seq must be strictly increasing"
    per_task: dict[str, list[tuple[str, int]]] = {}
    run_phases: list[str] = []
    for _, kind, body in records:
        data = json.loads(body)
        if kind == "task":
            per_task.setdefault(data["task"], []).append((data["phase"], data["attempt"]))
        elif kind == "run":
            run_phases.append(data["phase"])
    assert run_phases[0] == "Pending" and run_phases[-1] == run_phase == "Succeeded"
    assert len(run_phases) == len(set(run_phases)), f"run reported twice: {run_phases}"
    for task, chain in per_task.items():
        assert len(chain) == len(set(chain)), f"{task}: a state reported twice: {chain}"
        previous: str | None = None
        previous_attempt = 0
        for phase, attempt in chain:
            if phase != "Running" and attempt > previous_attempt:
                # A new attempt's outcome without its Running record: that one was
                # superseded in the outcome's own transaction (decision 0042; a
                # commit under way can hold a 50 ms task's Running checkpoint until
                # the outcome joins it).  The order must hold with it put back.
                assert "Running" in ALLOWED_NEXT.get(previous, set()), (
                    f"{task}: {previous}->Running (left out) in {chain}"
                )
                previous = "Running"
            assert phase in ALLOWED_NEXT.get(previous, set()), (
                f"{task}: {previous}->{phase} in {chain}"
            )
            previous, previous_attempt = phase, attempt
        assert chain[-1] == final[task], f"{task}: last record {chain[-1]} != db {final[task]}"
    assert set(per_task) == set(TASKS)


def agent(manifest_path: Path, db: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edge_agent.cli",
        "run-local",
        str(manifest_path),
        "--db",
        str(db),
        "--concurrency",
        "3",
        "--quiet",
    ]


@pytest.mark.parametrize("seed", range(TRIALS))
def test_kill_minus_nine_at_a_random_moment_then_resume(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    journal, db, path = tmp_path / "journal", tmp_path / "site.db", tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(manifest(journal, rng)))
    # task -> how many times it had run when its success was first seen committed
    runs_at_commit: dict[str, int] = {}
    kills = 1 + (seed % 3 == 0)  # every third trial is killed twice
    for _ in range(kills):
        proc = subprocess.Popen(
            agent(path, db),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        time.sleep(rng.uniform(0.1, 1.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen = journal.read_text().split() if journal.exists() else []
        for task in committed_successes(db) - set(runs_at_commit):
            runs_at_commit[task] = seen.count(task)
            assert runs_at_commit[task] >= 1, f"{task} committed Succeeded without running"
    result = subprocess.run(agent(path, db), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = journal.read_text().split()
    for task in TASKS:
        assert task in lines, f"{task} never ran"
    for task, count in runs_at_commit.items():
        assert lines.count(task) == count, f"{task} ran again after it had committed Succeeded"
    check_outbox(db)
