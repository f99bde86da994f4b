"""The edge-only demo: a workflow survives ``kill -9`` of its agent, with no cloud.

It runs ``tideflow-agent run-local`` on a sample workflow whose tasks append a
line to a journal file, kills the agent with SIGKILL in the middle of the run,
shows what the database remembers, starts the agent again on the same
database and lets it finish.  It ends with a verdict: every task that had
committed before the kill ran exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

AGENT = [sys.executable, "-m", "edge_agent.cli"]
TASK_NAMES = ["extract", *(f"transform-{i}" for i in range(4)), "aggregate", "load", "report"]


def _manifest(journal: Path) -> dict[str, object]:
    def step(name: str, deps: list[str], seconds: float) -> dict[str, object]:
        return {
            "name": name,
            "dependsOn": deps,
            "command": ["sh", "-c", f'sleep {seconds}; echo "$0" >> "$1"', name, str(journal)],
        }

    tasks = [
        step("extract", [], 0.8),
        *(step(f"transform-{i}", ["extract"], 0.6 + 0.2 * i) for i in range(4)),
        step("aggregate", [f"transform-{i}" for i in range(4)], 0.8),
        step("load", ["aggregate"], 0.8),
        step("report", ["load"], 0.4),
    ]
    return {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "demo-etl", "namespace": "plant-7"},
        "spec": {"defaults": {"retry": {"limit": 2}}, "tasks": tasks},
    }


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _succeeded_tasks(db: Path) -> set[str]:
    import sqlite3

    if not db.exists():  # killed before it made its database: nothing committed
        return set()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT task FROM task_runs WHERE phase='Succeeded'").fetchall()
    return {row[0] for row in rows}


def _wait_for_first_task(journal: Path, agent: subprocess.Popen[bytes]) -> None:
    """Until the first task has written its line (mid-run on any machine, loaded or not)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and agent.poll() is None:
        if journal.exists() and journal.read_text().split():
            time.sleep(0.3)  # the transforms have started: the kill lands mid-run
            return
        time.sleep(0.05)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tideflow-demo-") as tmp:
        work = Path(tmp)
        journal, db, manifest = work / "journal.txt", work / "site.db", work / "workflow.yaml"
        manifest.write_text(yaml.safe_dump(_manifest(journal), sort_keys=False))
        _banner("Tideflow edge agent: run a workflow with no cloud, kill -9 the agent mid-run")
        print(textwrap.indent(manifest.read_text(), "    "))
        cmd = [*AGENT, "run-local", str(manifest), "--db", str(db), "--concurrency", "2"]
        first = subprocess.Popen(cmd, start_new_session=True)
        _wait_for_first_task(journal, first)
        _banner(f"kill -9 the agent (pid {first.pid}) while tasks are running")
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        committed = _succeeded_tasks(db)
        print(f"committed before the kill: {', '.join(sorted(committed)) or 'nothing yet'}")
        subprocess.run([*AGENT, "status", "--db", str(db)], check=False)
        _banner("start the agent again on the same database: it resumes")
        code = subprocess.run(cmd, check=False).returncode
        lines = journal.read_text().split()
        _banner("journal (one line per task execution)")
        print("    " + " ".join(lines))
        repeated_committed = sorted(t for t in committed if lines.count(t) != 1)
        all_ran = all(name in lines for name in TASK_NAMES)
        ok = code == 0 and not repeated_committed and all_ran
        _banner(
            "verdict: "
            + (
                "OK — the run finished, and no task that had committed before the kill ran again"
                if ok
                else f"FAILED (exit {code}, re-ran: {repeated_committed}, all ran: {all_ran})"
            )
        )
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
