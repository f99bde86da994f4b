"""kill -9 of a real ``tideflow-agent run-local`` during a chain of short tasks.

Decision 0042: an attempt's Running checkpoint is written only if the attempt
is still running 20 ms after its start, and a chain's next attempt runs on in
the asyncio task of the one before it.  The tasks here last 0-40 ms, around
that timer, so a kill lands before the checkpoint, between it and the
outcome, between an outcome and the next start, and so on.  Each trial kills
the agent several times at random moments, then lets a last one finish.  The
tasks' own journal (their ``TIDEFLOW_ATTEMPT`` at start) is the witness:

* the run finishes and every task ran;
* no task whose success was committed at a kill ran again;
* a task's attempts never repeat a number (an interrupted attempt is counted
  even when its Running checkpoint never committed), and the database's last
  attempt is the last one the journal saw start;
* the outbox's records per task form a valid order, a Running left out only
  right before an outcome of that same, new attempt; each state once.
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

TRIALS = 6
N = 40
SCRIPT = 'echo "start $TIDEFLOW_TASK $TIDEFLOW_ATTEMPT" >> "$J"; sleep "$NAP"'

# What a task's records may say next (a Running put back where it was left out).
ALLOWED_NEXT = {
    None: {"Running", "Skipped", "Cancelled"},
    "Running": {"Succeeded", "Retrying", "Failed", "Cancelled", "Interrupted"},
    "Retrying": {"Running", "Failed", "Cancelled", "Interrupted"},
    "Interrupted": {"Running", "Failed", "Cancelled"},
}


def manifest(journal: Path, rng: random.Random) -> dict[str, Any]:
    tasks = [
        {
            "name": f"t{i:02d}",
            "script": SCRIPT,
            "env": {"J": str(journal), "NAP": f"{rng.choice((0, 0.01, 0.02, 0.03, 0.04)):.2f}"},
            **({"dependsOn": [f"t{i - 1:02d}"]} if i else {}),
        }
        for i in range(N)
    ]
    return {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "chain", "namespace": "default"},
        "spec": {"tasks": tasks},
    }


def agent(manifest_path: Path, db: Path) -> list[str]:
    return [sys.executable, "-m", "edge_agent.cli", "run-local", str(manifest_path),
            "--db", str(db), "--quiet"]  # fmt: skip


def committed_successes(db: Path) -> set[str]:
    if not db.exists():
        return set()
    with read_only(db) as conn:
        if not has_schema(conn):
            return set()
        rows = conn.execute("SELECT task FROM task_runs WHERE phase='Succeeded'").fetchall()
    return {row[0] for row in rows}


def starts(journal: Path) -> list[tuple[str, int]]:
    if not journal.exists():
        return []
    return [
        (parts[1], int(parts[2]))
        for parts in (line.split() for line in journal.read_text().splitlines())
        if len(parts) == 3 and parts[0] == "start"
    ]


def check_outbox(db: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        records = conn.execute("SELECT kind, body FROM outbox ORDER BY seq").fetchall()
        final = {
            t: (p, a) for t, p, a in conn.execute("SELECT task, phase, attempt FROM task_runs")
        }
    per_task: dict[str, list[tuple[str, int]]] = {}
    for kind, body in records:
        if kind == "task":
            data = json.loads(body)
            per_task.setdefault(data["task"], []).append((data["phase"], data["attempt"]))
    for task, chain in per_task.items():
        assert len(chain) == len(set(chain)), f"{task}: a state reported twice: {chain}"
        previous: str | None = None
        previous_attempt = 0
        for phase, attempt in chain:
            if phase != "Running" and attempt != previous_attempt:
                # A new attempt's outcome without its Running (decision 0042, or its
                # Running never committed before a kill): put it back.
                assert attempt == previous_attempt + 1, f"{task}: {chain}"
                assert "Running" in ALLOWED_NEXT.get(previous, set()), f"{task}: {chain}"
                previous = "Running"
            elif phase == "Running":
                assert attempt == previous_attempt + 1, f"{task}: {chain}"
            assert phase in ALLOWED_NEXT.get(previous, set()), (
                f"{task}: {previous}->{phase} {chain}"
            )
            previous, previous_attempt = phase, attempt
        assert chain[-1] == final[task], f"{task}: last record {chain[-1]} != db {final[task]}"
    assert set(per_task) == set(final)
    return final


@pytest.mark.parametrize("seed", range(TRIALS))
def test_kill_minus_nine_during_a_chain_of_short_tasks_then_resume(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    journal, db, path = tmp_path / "journal", tmp_path / "site.db", tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(manifest(journal, rng)))
    runs_at_commit: dict[str, int] = {}
    for _ in range(3):
        proc = subprocess.Popen(
            agent(path, db), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        time.sleep(rng.uniform(0.4, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.06)  # an orphan's start line, if any, is in the journal
        seen = [task for task, _ in starts(journal)]
        for task in committed_successes(db) - set(runs_at_commit):
            runs_at_commit[task] = seen.count(task)
            assert runs_at_commit[task] >= 1, f"{task} committed Succeeded without running"
    result = subprocess.run(agent(path, db), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    journal_starts = starts(journal)
    names = [task for task, _ in journal_starts]
    for task, count in runs_at_commit.items():
        assert names.count(task) == count, f"{task} ran again after it had committed Succeeded"
    final = check_outbox(db)
    for i in range(N):
        task = f"t{i:02d}"
        attempts = [a for t, a in journal_starts if t == task]
        assert attempts, f"{task} never ran"
        assert attempts == sorted(set(attempts)), f"{task}: attempts {attempts} repeat"
        assert final[task] == ("Succeeded", attempts[-1]), (task, final[task], attempts)


@pytest.mark.parametrize("seed", range(3))
def test_a_clean_stop_during_a_chain_of_short_tasks_records_every_attempt_it_started(
    tmp_path: Path, seed: int
) -> None:
    """SIGTERM at a random moment: the agent exits once every attempt it started is
    recorded (Succeeded, or Interrupted with that attempt's number), whether its
    Running checkpoint was written or not; the next agent resumes the chain."""
    rng = random.Random(1000 + seed)
    journal, db, path = tmp_path / "journal", tmp_path / "site.db", tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(manifest(journal, rng)))
    for stops in range(1, 4):
        proc = subprocess.Popen(
            agent(path, db), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        time.sleep(rng.uniform(0.4, 1.2))
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        # (130: interrupted; -15: stopped before its handler was set, nothing started)
        assert proc.returncode in (0, 130, -signal.SIGTERM), stderr
        assert b"Traceback" not in stderr, stderr.decode()
        time.sleep(0.06)  # the journal holds every start by now
        if not db.exists():
            continue  # (stopped before it made its database)
        with read_only(db) as conn:
            if not has_schema(conn):  # stopped while making it: nothing had started
                assert not starts(journal), "an attempt started before the schema existed"
                continue
            rows = {
                t: (p, a) for t, p, a in conn.execute("SELECT task, phase, attempt FROM task_runs")
            }
        latest: dict[str, int] = {}
        for task, attempt in starts(journal):
            latest[task] = max(latest.get(task, 0), attempt)
        for task, (phase, attempt) in rows.items():
            seen = latest.get(task, 0)
            if phase == "Succeeded":
                assert attempt == seen, (task, phase, attempt, seen)
            elif phase == "Interrupted":
                # (An attempt stopped before its shell wrote its start line: one more,
                # at most one per stop so far: the chain restarts at this task each
                # time, and agents start in much the same time, so a stop can land
                # in the same window twice running: ('t00', 'Interrupted', 2, 0).)
                assert seen <= attempt <= seen + stops, (task, phase, attempt, seen, stops)
            else:
                assert (phase, attempt, seen) == ("Pending", 0, 0), (task, phase, attempt, seen)
    result = subprocess.run(agent(path, db), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    final = check_outbox(db)
    journal_starts = starts(journal)
    for i in range(N):
        task = f"t{i:02d}"
        attempts = [a for t, a in journal_starts if t == task]
        assert attempts == sorted(set(attempts)) and attempts, (task, attempts)
        assert final[task] == ("Succeeded", attempts[-1]), (task, final[task], attempts)
