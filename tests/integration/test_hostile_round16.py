"""The edge agent's newest code against a hostile tester (round 16).

Each test here started as a reproduction of a defect, with real processes:
the ``tideflow-agent`` console script, real SQLite files, real task
processes, real cgroups where the machine has them.  Proves:

* a task that puts a FIFO where its run's ``.tideflow/starts`` file is does
  not hang the agent: the next attempt's start note (on the event loop) used
  to block in ``open`` for ever, deaf to SIGTERM, and a restarted agent's
  read of the file at the run's start blocked its thread for ever;
* an agent that cannot start a thread for a moment (its unit's process limit
  reached: another task's fork bomb) waits for one instead of failing: a
  task's outputs file, read in a thread of its own since the pool went
  (edge_agent/threads.py), made "can't start new thread" stop the run;
* a run's workspace that its agent did not remove (killed between the run's
  end and the removal, or during it) is removed by the next agent on the
  database, before it starts an attempt; it stayed for ever;
* a task that freezes its own cgroup (``cgroup.freeze``) does not freeze the
  agent: the slot (decision 0043) was reused frozen, and the agent, which
  moves itself into the next attempt's cgroup to start it, froze for good,
  deaf to every signal but SIGKILL;
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from services.agent import wait_for
from services.tiers import machine_lacks
from test_hostile_agent import (  # noqa: F401 (pids_cgroup: the fixture)
    AGENT,
    agent_env,
    db_tasks,
    explain,
    manifest,
    pids_cgroup,
)

from edge_agent.runner import CgroupScope, agent_mark

EXIT_OK, EXIT_FAILED = 0, 1


def run_local(
    path: Path, db: Path, *extra: str, timeout: float = 20, failpoints: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``run-local``, killed (and the test failed) if it has not ended by ``timeout``."""
    argv = [AGENT, "run-local", str(path), "--db", str(db), "--quiet", *extra]
    env = agent_env()
    if failpoints:
        env["TIDEFLOW_FAILPOINTS"] = failpoints
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
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


def restarted_after_attempt_1_kills_the_agent(tmp_path: Path, before_the_kill: str) -> None:
    """Task ``k``'s attempt 1 runs ``before_the_kill``, then kill -9s its agent; a
    second ``run-local`` must finish the run, with ``k`` Succeeded at attempt 2."""
    script = f'if [ "$TIDEFLOW_ATTEMPT" = 1 ]; then {before_the_kill}; kill -9 "$PPID"; fi'
    path = manifest(tmp_path / "wf.yaml", [{"name": "k", "script": script}])
    db = tmp_path / "s.db"
    first = run_local(path, db)
    assert first.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), explain(first)
    second = run_local(path, db)
    assert second.returncode == EXIT_OK, explain(second)
    phase, attempt, _ = db_tasks(db)["k"]
    assert (phase, attempt) == ("Succeeded", 2)


def test_a_fifo_as_the_starts_file_does_not_hang_a_restarted_agent(tmp_path: Path) -> None:
    """The task leaves the FIFO and kills the agent; the next agent reads the
    file at the run's start (in a thread the agent waits for at exit)."""
    restarted_after_attempt_1_kills_the_agent(tmp_path, FIFO_STARTS)


# ------------------------------------------------- no thread to be had
WAIT_THEN_WRITE = """\
import os, sys, time
open(sys.argv[1], "w").close()  # ready
while not os.path.exists(sys.argv[2]):  # no fork: the limit holds while this waits
    time.sleep(0.02)
with open(os.environ["TIDEFLOW_OUTPUTS"], "w") as out:
    out.write("x=42\\n")
"""


def test_no_thread_to_be_had_for_a_moment_delays_the_outputs_not_the_run(
    tmp_path: Path,
    pids_cgroup: Path,  # noqa: F811
) -> None:
    """The agent's process limit is reached (a fork bomb, systemd's TasksMax) just
    as a task ends with an outputs file: the agent's thread to read it cannot start.

    "can't start new thread" went up through the runner and the executor stopped
    the run with the error (the agent exited 1 with a traceback).
    """
    (tmp_path / "w.py").write_text(WAIT_THEN_WRITE)
    ready, gate = tmp_path / "ready", tmp_path / "gate"
    path = manifest(
        tmp_path / "wf.yaml",
        [
            {"name": "w", "command": [sys.executable, str(tmp_path / "w.py"), str(ready),
                                      str(gate)]},
            {"name": "use", "dependsOn": ["w"], "command": ["test", "{{tasks.w.outputs.x}}",
                                                            "=", "42"]},
        ],
    )  # fmt: skip
    argv = [AGENT, "run-local", str(path), "--db", str(tmp_path / "s.db"), "--quiet"]
    enter = f'echo $$ > {pids_cgroup / "cgroup.procs"} && exec "$0" "$@"'
    with subprocess.Popen(
        ["sh", "-c", enter, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=agent_env(),
    ) as proc:  # fmt: skip
        try:
            wait_for(ready.exists, 30, "the task to start")
            # Not one more process or thread in the group (the kernel lets the limit
            # fall below what the group holds), then the task ends.
            (pids_cgroup / "pids.max").write_text("1")
            gate.touch()
            time.sleep(1.5)
        finally:
            (pids_cgroup / "pids.max").write_text("60")
        out, err = proc.communicate(timeout=60)
    done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    assert done.returncode == EXIT_OK, explain(done)
    assert "Traceback" not in done.stderr, explain(done)
    assert "cannot start a thread" in done.stderr, "the limit never bit\n" + explain(done)
    tasks = db_tasks(tmp_path / "s.db")
    assert tasks["w"][0] == "Succeeded" and tasks["use"][0] == "Succeeded", tasks


# ------------------------------------------------- a workspace left by a crash
def test_a_workspace_left_by_an_agent_killed_at_its_runs_end_is_removed_later(
    tmp_path: Path,
) -> None:
    path = manifest(
        tmp_path / "wf.yaml", [{"name": "a", "script": "mkdir -p d/e && echo x > d/e/f"}]
    )
    db, work = tmp_path / "s.db", tmp_path / "s.db.work"
    first = run_local(path, db, failpoints="run-finished")
    assert first.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), explain(first)
    left = list(work.iterdir())
    assert len(left) == 1 and (left[0] / "d" / "e" / "f").exists(), left
    # A partly removed one too (killed during the removal), and one with no run.
    (left[0] / "d" / "e" / "f").unlink()
    (work / "local-gone.1" / ".tideflow").mkdir(parents=True)
    second = run_local(path, db, "--new-run")
    assert second.returncode == EXIT_OK, explain(second)
    assert list(work.iterdir()) == []


def test_only_run_workspaces_are_swept_from_the_work_directory(tmp_path: Path) -> None:
    """What someone put in the work directory that is no run's workspace (its name is
    no run id, ``<uid>.<generation>``) is not the agent's to remove."""
    path = manifest(tmp_path / "wf.yaml", [{"name": "a", "command": ["true"]}])
    db, work = tmp_path / "s.db", tmp_path / "s.db.work"
    (work / "operator-notes").mkdir(parents=True)
    (work / "operator-notes" / "keep").write_text("mine")
    (work / "cache.d").mkdir()
    (work / "stale-run.3").mkdir()
    result = run_local(path, db)
    assert result.returncode == EXIT_OK, explain(result)
    assert (work / "operator-notes" / "keep").read_text() == "mine"
    assert (work / "cache.d").is_dir()
    assert not (work / "stale-run.3").exists()


# ------------------------------------------------- a task freezes its cgroup
# The task freezes its slot once the agent has moved back out of it.  Until then
# (the microseconds between the start and the agent's move back, milliseconds
# when the agent is not scheduled) a freeze takes the agent with it: a limit of
# starting a process in a cgroup without CLONE_INTO_CGROUP, left knowingly
# (CgroupScope's docstring).  What this test reproduces is the slot reused frozen.
FREEZE_MYSELF = """\
if [ "$TIDEFLOW_ATTEMPT" = 1 ]; then
  slot=$(sed -n 's/^0:://p' /proc/self/cgroup)
  while [ "$(sed -n 's/^0:://p' /proc/$PPID/cgroup)" = "$slot" ]; do :; done
  echo 1 > "$CGROUP2$slot/cgroup.freeze"
  sleep 30
fi
"""


def cgroup2_mount() -> str:
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    return next(line.split()[4] for line in mounts if " - cgroup2 " in line)


@pytest.fixture
def agent_cgroups(tmp_path: Path) -> Iterator[Path]:
    """The cgroup root a ``run-local`` on ``tmp_path / "s.db"`` makes; thawed and
    removed afterwards."""
    scope = CgroupScope.detect(agent_mark(tmp_path / "s.db.work"))
    if scope is None or scope.home is None:
        machine_lacks("a writable cgroup v2 subtree")
    if not scope.slots:
        machine_lacks("user xattrs on cgroup v2 (Linux 5.7+)")
    yield scope.root
    if scope.root.exists():
        for slot in (p for p in scope.root.iterdir() if p.is_dir()):
            with contextlib.suppress(OSError):
                (slot / "cgroup.freeze").write_text("0")
            scope.destroy(slot)
        with contextlib.suppress(OSError):
            scope.root.rmdir()


def test_a_task_that_freezes_its_cgroup_does_not_freeze_the_agent(
    tmp_path: Path, agent_cgroups: Path
) -> None:
    task = {
        "name": "a",
        "script": FREEZE_MYSELF,
        "env": {"CGROUP2": cgroup2_mount()},
        "timeoutSeconds": 1,
        "retry": {"limit": 1, "backoff": {"seconds": 0.1}},
    }
    path = manifest(tmp_path / "wf.yaml", [task])
    db = tmp_path / "s.db"
    done = run_local(path, db, timeout=15)
    assert done.returncode == EXIT_OK, explain(done)
    phase, attempt, _ = db_tasks(db)["a"]
    assert (phase, attempt) == ("Succeeded", 2)
    assert not agent_cgroups.exists(), list(agent_cgroups.iterdir())
