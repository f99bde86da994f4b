"""The edge agent's newest code against a hostile tester (round 16).

Each test here started as a reproduction of a defect, with real processes:
the ``tideflow-agent`` console script, real SQLite files, real task
processes, real cgroups where the machine has them.  Proves:

* a task that puts a FIFO where its run's ``.tideflow/starts`` file is does
  not hang the agent: the next attempt's start note (on the event loop) used
  to block in ``open`` for ever, deaf to SIGTERM, and a restarted agent's
  read of the file at the run's start blocked its thread for ever;
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from test_hostile_agent import db_tasks, explain

AGENT = str(Path(sys.executable).with_name("tideflow-agent"))
EXIT_OK, EXIT_FAILED = 0, 1


def manifest(path: Path, tasks: list[dict[str, Any]], name: str = "wf") -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "tideflow.io/v1alpha1",
                "kind": "Workflow",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"tasks": tasks},
            }
        )
    )
    return path


def agent_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}


def run_local(path: Path, db: Path, *, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """``run-local``, killed (and the test failed) if it has not ended by ``timeout``."""
    argv = [AGENT, "run-local", str(path), "--db", str(db), "--quiet"]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=agent_env(),
        cwd=path.parent,
    ) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # a hung loop does not even see this
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                raise AssertionError(
                    f"the agent hung (and ignored SIGTERM)\n{out}\n{err}"
                ) from None
            raise AssertionError(f"the agent hung past {timeout}s\n{out}\n{err}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# ------------------------------------------------- a FIFO as the starts file
FIFO_STARTS = "rm -f .tideflow/starts && mkfifo .tideflow/starts"


def test_a_fifo_as_the_starts_file_does_not_hang_the_next_attempt(tmp_path: Path) -> None:
    path = manifest(
        tmp_path / "wf.yaml",
        [
            {"name": "a", "script": FIFO_STARTS},
            {"name": "b", "dependsOn": ["a"], "command": ["true"]},
        ],
    )
    db = tmp_path / "s.db"
    done = run_local(path, db)
    assert done.returncode == EXIT_OK, explain(done)
    assert {task: row[0] for task, row in db_tasks(db).items()} == {
        "a": "Succeeded",
        "b": "Succeeded",
    }


def test_a_fifo_as_the_starts_file_does_not_hang_a_restarted_agent(tmp_path: Path) -> None:
    """The task leaves the FIFO and kills the agent; the next agent reads the
    file at the run's start (in a thread the agent waits for at exit)."""
    script = f'if [ "$TIDEFLOW_ATTEMPT" = 1 ]; then {FIFO_STARTS}; kill -9 "$PPID"; fi'
    path = manifest(tmp_path / "wf.yaml", [{"name": "k", "script": script}])
    db = tmp_path / "s.db"
    first = run_local(path, db)
    assert first.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), explain(first)
    second = run_local(path, db)
    assert second.returncode == EXIT_OK, explain(second)
    phase, attempt, _ = db_tasks(db)["k"]
    assert (phase, attempt) == ("Succeeded", 2)
