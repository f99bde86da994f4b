"""A stop, a crash or a reboot of the agent is not a task failure.

Real ``tideflow-agent run-local`` processes on real SQLite files, with the
default retry policy (no retries).  Each workflow's tasks write a journal of
their own (start/end lines with their attempt, idempotency key and pid): the
journal, not the agent's database, is the witness of what ran.

The stop matrix (each mid-task, the fault asserted to land while task ``b``
runs): SIGTERM, SIGINT, kill -9 of the agent alone (its task keeps running
until the next agent reaps it), kill -9 of the agent's whole process tree, a
full database (exit 4) then space freed.  Every case ends Succeeded with each
task's side effect present once, no finished task re-run, and no two live
copies of one attempt.  Then the crash-loop bound (``maxInterruptions``), the
opt-out (``onInterruption: Fail``), 60-task fan-out orphans, and a grandchild
that escaped with ``setsid``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from services.agent import wait_for
from services.tiers import machine_lacks

from edge_agent.runner import CgroupScope, agent_mark

JOURNAL_SCRIPT = (
    'echo "start $TIDEFLOW_TASK $TIDEFLOW_ATTEMPT $TIDEFLOW_IDEMPOTENCY_KEY $$" >> "$J"; '
    'sleep "$NAP"; '
    'echo "end $TIDEFLOW_TASK $TIDEFLOW_ATTEMPT" >> "$J"'
)


def workflow(
    journal: Path, naps: dict[str, float], deps: dict[str, list[str]], **task_extra: Any
) -> dict[str, Any]:
    tasks = []
    for name, nap in naps.items():
        task: dict[str, Any] = {
            "name": name,
            "script": JOURNAL_SCRIPT,
            "env": {"J": str(journal), "NAP": str(nap)},
            "dependsOn": deps.get(name, []),
        }
        task.update(task_extra.get(name, {}))
        tasks.append(task)
    return {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "stoppable", "namespace": "default"},
        "spec": {"tasks": tasks},
    }


def agent_argv(manifest: Path, db: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "edge_agent.cli", "run-local", str(manifest),
        "--db", str(db), "--quiet", *extra,
    ]  # fmt: skip


def start_agent(manifest: Path, db: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
    return subprocess.Popen(
        agent_argv(manifest, db, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        return [line.split() for line in self.path.read_text().splitlines() if line.strip()]

    def starts(self, task: str) -> list[list[str]]:
        return [line for line in self.lines() if line[0] == "start" and line[1] == task]

    def ends(self, task: str) -> list[list[str]]:
        return [line for line in self.lines() if line[0] == "end" and line[1] == task]


def db_tasks(db: Path) -> dict[str, tuple[str, int, str | None]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT task, phase, attempt, message FROM task_runs").fetchall()
    finally:
        conn.close()
    return {task: (phase, attempt, message) for task, phase, attempt, message in rows}


def kill_tree(pid: int) -> None:
    procs = [psutil.Process(pid)]
    with contextlib.suppress(psutil.NoSuchProcess):
        procs += procs[0].children(recursive=True)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def cgroups_here(tmp: Path) -> bool:
    return CgroupScope.detect(agent_mark(tmp / "probe.work")) is not None


def pid_alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


NAPS = {"a": 0.05, "b": 4.0, "c": 0.05}
DEPS = {"b": ["a"], "c": ["b"]}


def stop_mid_b(fault: str, manifest: Path, db: Path, journal: Journal) -> int:
    """Start the agent, land ``fault`` while b's first attempt runs; returns b's pid."""
    proc = start_agent(manifest, db)
    started = wait_for(lambda: journal.starts("b"), 30, "task b to start")
    b_pid = int(started[0][4])
    assert proc.poll() is None, "the agent ended before the fault"
    assert not journal.ends("b"), "b finished before the fault: not mid-task"
    if fault == "sigterm":
        proc.send_signal(signal.SIGTERM)
    elif fault == "sigint":
        proc.send_signal(signal.SIGINT)
    elif fault == "kill-agent":
        proc.kill()
    elif fault == "kill-tree":
        kill_tree(proc.pid)
    _out, err = proc.communicate(timeout=30)
    assert not journal.ends("b"), "the fault landed after b finished"
    if fault in ("sigterm", "sigint"):
        assert proc.returncode == 130, err
        # A clean stop kills its attempt's process group and records it Interrupted.
        assert not pid_alive(b_pid), "a clean stop left b's process running"
        phase, attempt, message = db_tasks(db)["b"]
        assert (phase, attempt) == ("Interrupted", 1), (phase, attempt, message)
    else:
        assert proc.returncode == -signal.SIGKILL
    return b_pid


def check_finished_once(journal: Journal, db: Path, interrupted: str = "b") -> None:
    for task in NAPS:
        assert len(journal.ends(task)) == 1, f"{task}: side effect present {journal.ends(task)}"
    for task in set(NAPS) - {interrupted}:
        assert len(journal.starts(task)) == 1, f"{task} ran again: {journal.starts(task)}"
    starts = journal.starts(interrupted)
    assert [s[2] for s in starts] == ["1", "2"], starts  # TIDEFLOW_ATTEMPT increased
    assert starts[0][3] == starts[1][3], "the idempotency key changed between attempts"
    assert starts[0][3].endswith(f"/{interrupted}")
    # No two live copies: the first attempt never reached its end line.
    assert journal.ends(interrupted)[0][2] == "2"
    tasks = db_tasks(db)
    assert {t: (p, a) for t, (p, a, _) in tasks.items()} == {
        "a": ("Succeeded", 1),
        "b": ("Succeeded", 2),
        "c": ("Succeeded", 1),
    }


@pytest.mark.parametrize("fault", ["sigterm", "sigint", "kill-agent", "kill-tree"])
def test_a_stop_mid_task_resumes_to_success_with_the_default_retry_policy(
    tmp_path: Path, fault: str
) -> None:
    journal = Journal(tmp_path / "journal")
    db, manifest = tmp_path / "site.db", tmp_path / "wf.yaml"
    manifest.write_text(yaml.safe_dump(workflow(journal.path, NAPS, DEPS)))
    b_pid = stop_mid_b(fault, manifest, db, journal)
    if fault == "kill-agent":
        assert pid_alive(b_pid), "kill -9 of the agent alone should leave its task running"
    again = subprocess.run(agent_argv(manifest, db), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Succeeded" in again.stdout
    assert not pid_alive(b_pid)
    check_finished_once(journal, db)


def test_a_full_database_then_space_freed_resumes_to_success(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    db, manifest = tmp_path / "site.db", tmp_path / "wf.yaml"
    noisy = "head -c 16000 /dev/zero | tr '\\0' x >&2; " + JOURNAL_SCRIPT
    naps = {f"t{i}": 0.01 for i in range(40)}
    spec = workflow(journal.path, naps, {})
    for task in spec["spec"]["tasks"]:
        task["script"] = noisy
    manifest.write_text(yaml.safe_dump(spec))
    full = subprocess.run(
        agent_argv(manifest, db, "--db-max-bytes", "262144", "--concurrency", "4"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert full.returncode == 4, full.stdout + full.stderr
    committed = {t for t, (phase, _, _) in db_tasks(db).items() if phase == "Succeeded"}
    assert 0 < len(committed) < len(naps), "the disk did not fill mid-run"
    ends_before = {t: len(journal.ends(t)) for t in naps}
    freed = subprocess.run(agent_argv(manifest, db), capture_output=True, text=True, timeout=60)
    assert freed.returncode == 0, freed.stdout + freed.stderr
    for task in naps:
        assert journal.ends(task), f"{task} never ran"
    for task in committed:
        assert len(journal.ends(task)) == ends_before[task], f"{task} re-ran after committing"
    assert {phase for phase, _, _ in db_tasks(db).values()} == {"Succeeded"}


def test_a_task_that_keeps_killing_the_agent_fails_interrupted_too_often(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    db, manifest = tmp_path / "site.db", tmp_path / "wf.yaml"
    killer = 'echo "start $TIDEFLOW_TASK $TIDEFLOW_ATTEMPT" >> "$J"; kill -9 "$PPID"; sleep 5'
    spec = workflow(journal.path, {"ok": 0.01, "killer": 0.01}, {"killer": ["ok"]})
    spec["spec"]["tasks"][1]["script"] = killer
    manifest.write_text(yaml.safe_dump(spec))
    codes = []
    for _ in range(6):
        result = subprocess.run(agent_argv(manifest, db), capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        codes.append(result.returncode)
        if result.returncode != -signal.SIGKILL:
            break
    assert codes == [-9, -9, -9, 1], codes
    phase, _attempt, message = db_tasks(db)["killer"]
    assert phase == "Failed" and message is not None and "InterruptedTooOften" in message
    assert len(journal.starts("killer")) == 3
    assert len(journal.starts("ok")) == 1


def test_max_interruptions_is_settable_per_task(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    db, manifest = tmp_path / "site.db", tmp_path / "wf.yaml"
    killer = 'echo "start $TIDEFLOW_TASK $TIDEFLOW_ATTEMPT" >> "$J"; kill -9 "$PPID"; sleep 5'
    spec = workflow(journal.path, {"killer": 0.01}, {}, killer={"maxInterruptions": 1})
    spec["spec"]["tasks"][0]["script"] = killer
    manifest.write_text(yaml.safe_dump(spec))
    first = subprocess.run(agent_argv(manifest, db), capture_output=True, text=True, timeout=60)
    second = subprocess.run(agent_argv(manifest, db), capture_output=True, text=True, timeout=60)
    assert (first.returncode, second.returncode) == (-9, 1), second.stdout + second.stderr
    assert "InterruptedTooOften" in (db_tasks(db)["killer"][2] or "")
    assert len(journal.starts("killer")) == 1


def test_a_task_that_must_not_run_twice_fails_instead_of_rerunning(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    db, manifest = tmp_path / "site.db", tmp_path / "wf.yaml"
    spec = workflow(journal.path, NAPS, DEPS, b={"onInterruption": "Fail"})
    manifest.write_text(yaml.safe_dump(spec))
    stop_mid_b("sigterm", manifest, db, journal)
    again = subprocess.run(agent_argv(manifest, db), capture_output=True, text=True, timeout=60)
    assert again.returncode == 1, again.stdout + again.stderr
    tasks = db_tasks(db)
    assert tasks["b"][0] == "Failed" and "InterruptedNotRerun" in (tasks["b"][2] or "")
    assert tasks["c"][0] == "Skipped"
    assert len(journal.starts("b")) == 1 and not journal.ends("b")


@pytest.mark.parametrize("seed", range(3))
def test_no_orphan_of_a_sixty_task_fan_out_survives_a_kill(tmp_path: Path, seed: int) -> None:
    """kill -9 of the agent alone, at a random moment of a 60-task fan-out.

    Many task processes are started but their Running checkpoint (written
    behind the start) has not landed; the next agent must still kill every one
    before it starts its own attempts.
    """
    rng = random.Random(seed)
    journal = Journal(tmp_path / "journal")
    db, manifest = tmp_path / "site.db", tmp_path / "wf.yaml"
    naps = {f"t{i:02d}": 8.0 for i in range(60)}  # longer than any restart takes
    manifest.write_text(yaml.safe_dump(workflow(journal.path, naps, {})))
    proc = start_agent(manifest, db, "--concurrency", "60")
    want = rng.randint(5, 55)
    wait_for(lambda: len(journal.lines()) >= want, 30, f"{want} tasks to start")
    proc.kill()
    proc.wait(10)
    before = journal.lines()
    old = {(line[1], line[2]): int(line[4]) for line in before if line[0] == "start"}
    assert old and any(pid_alive(pid) for pid in old.values()), "nothing was left running"
    again = subprocess.run(
        agent_argv(manifest, db, "--concurrency", "60"), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    survivors = [key for key, pid in old.items() if pid_alive(pid)]
    assert not survivors, f"orphans survived: {survivors}"
    after = journal.lines()[len(before) :]
    for task in naps:
        assert journal.ends(task), f"{task} never ran to its end"
    # Once the new agent started, no attempt of the old one reached its end: every
    # end written from then on belongs to an attempt the new agent started.
    late = [line for line in after if line[0] == "end" and (line[1], line[2]) in old]
    assert not late, f"orphaned attempts ran to their end beside the new agent: {late}"
    # (A task that had ended before the kill but whose outcome was not yet
    # committed runs again: at-least-once, keyed by its idempotency key.)


def test_a_grandchild_that_escaped_with_setsid_is_killed(tmp_path: Path) -> None:
    if not cgroups_here(tmp_path):
        machine_lacks("a writable cgroup v2 subtree: setsid escapes are held by mark only")
    pids = tmp_path / "pids"
    db, manifest = tmp_path / "site.db", tmp_path / "wf.yaml"
    escape = (
        # The grandchild clears its environment too: only its cgroup can find it.
        'setsid env -i sh -c \'echo $$ >> "$0"; exec sleep 300\' "$P" & '
        'while [ ! -s "$P" ]; do sleep 0.01; done'
    )
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "tideflow.io/v1alpha1",
                "kind": "Workflow",
                "metadata": {"name": "escape", "namespace": "default"},
                "spec": {"tasks": [{"name": "e", "script": escape, "env": {"P": str(pids)}}]},
            }
        )
    )
    result = subprocess.run(agent_argv(manifest, db), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    grandchild = int(pids.read_text().split()[0])
    wait_for(lambda: not pid_alive(grandchild), 10, "the setsid grandchild to be killed")


def one_task(tmp_path: Path, script: str, **task: Any) -> Path:
    manifest = tmp_path / "wf.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "tideflow.io/v1alpha1",
                "kind": "Workflow",
                "metadata": {"name": "one", "namespace": "default"},
                "spec": {"tasks": [{"name": "t", "script": script, **task}]},
            }
        )
    )
    return manifest


def test_tasks_do_not_inherit_the_agents_secrets_unless_passed(tmp_path: Path) -> None:
    dump = tmp_path / "env"
    manifest = one_task(tmp_path, 'env > "$D"', env={"D": str(dump)})
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")},
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "TIDEFLOW_PASSWORD_FILE": "/run/secrets/pw",
    }
    argv = agent_argv(manifest, tmp_path / "a.db")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert "AWS_SECRET_ACCESS_KEY" not in seen and "TIDEFLOW_PASSWORD_FILE" not in seen
    assert seen["PATH"] == os.environ["PATH"]
    argv = agent_argv(manifest, tmp_path / "b.db", "--pass-env", "AWS_*,TIDEFLOW_*")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert seen["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert "TIDEFLOW_PASSWORD_FILE" not in seen


def test_a_fifo_as_outputs_file_does_not_hang_the_agent(tmp_path: Path) -> None:
    manifest = one_task(tmp_path, 'mkfifo "$TIDEFLOW_OUTPUTS"')
    done = subprocess.run(
        agent_argv(manifest, tmp_path / "site.db"), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stdout + done.stderr
    phase, _, message = db_tasks(tmp_path / "site.db")["t"]
    assert phase == "Failed" and "not a regular file" in (message or "")


def test_a_huge_outputs_file_is_read_only_up_to_the_bound(tmp_path: Path) -> None:
    script = (
        'echo first=1 > "$TIDEFLOW_OUTPUTS"; '
        'head -c 300000000 /dev/zero | tr "\\0" x >> "$TIDEFLOW_OUTPUTS"'
    )
    manifest = one_task(tmp_path, script)
    proc = subprocess.Popen(
        agent_argv(manifest, tmp_path / "site.db"), stdout=subprocess.PIPE, text=True
    )
    peak = 0
    watched = psutil.Process(proc.pid)
    while proc.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            peak = max(peak, watched.memory_info().rss)
        time.sleep(0.01)
    assert proc.returncode == 0
    assert peak < 150 * 1024 * 1024, f"agent peak RSS {peak / 2**20:.0f} MiB"
    conn = sqlite3.connect(f"file:{tmp_path / 'site.db'}?mode=ro", uri=True)
    (outputs,) = conn.execute("SELECT outputs FROM task_runs").fetchone()
    conn.close()
    assert outputs == '{"first": "1"}'
