"""The edge agent against a hostile tester: defects found by trying to break its promises.

Each test here started as a reproduction of a defect, with real processes:
the ``tideflow-agent`` console script (``run-local`` and ``run`` beside a real
Mosquitto), real SQLite files, real task processes.  Proves:

* a NUL byte in a manifest's command, script, env or workingDir is a clear
  validation error (exit 2), never a traceback; a NUL byte a task writes into
  an output that a dependant's command uses fails that dependant, and never
  takes the agent down (it used to, on every restart);
* a number too long for Python's int conversion in a manifest is a clear
  error (exit 2), never a traceback;
* ``run``: an assignment the site cannot hold (a uid too long for a file
  name, a number too long to convert) is dropped with one log line; the
  daemon neither dies nor dies again on every restart;
* an assignment's invalid traceparent (a NUL byte, 300 KB) is ignored, not put
  in its tasks' environment, where it failed every task of the run to start;
* two uids that name the same files (``a/b``, ``a_b``) are not two runs of one
  id: the one outside the file-name alphabet is dropped naming its uid (the
  executor raised AssertionError on it at every re-send);
* one agent per database holds through a symlink or a hard link to the
  database file, and after its lock file was deleted;
* an agent started on a full disk exits 4 saying so, fresh database or not,
  and runs once space is freed;
* every attempt gets its own cgroup (where there are cgroups) even while
  other attempts end and remove the scope's root;
* on a host without cgroups, a task that kills the agent as its first act is
  bounded by ``maxInterruptions`` (it used to loop for ever as attempt 1);
* a stop that signals every process at once (systemd's stop, a clean reboot)
  is an interruption even when the task dies of its SIGTERM first;
* a second stop signal ends the stop at once (no second grace period);
* a task that cannot start because another task's fork bomb took every
  process slot is retried by its policy, not failed for good; and the agent
  survives taking the last slot itself (no thread per child process);
* a task that puts a file where its run's workspace was fails that run's
  next attempt, not the agent (it used to crash it at every restart);
* a FIFO where the database should be is refused (exit 3), never read:
  the readers used to block on it for ever;
* a wall clock stepped back (NTP) does not hold a retry back beyond
  ``backoff.maxSeconds`` (it waited the whole step);
* five SIGTERMs or kill -9s at random moments while runs execute and sync
  lose nothing: the cloud converges on the site's database, the database is
  intact (a regression battery; it found nothing);
* a flood of 3,000 malformed messages is counted message by message but
  logged in a bounded number of lines (it was one line each);
* another site's credentials cannot connect with a site's client id: the
  CONNECT is refused and the site's agent stays connected and syncing (the
  broker used to hand the site's session to the other site and kick the
  real agent, for ever).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode
from services.agent import AgentProcess, agent_truth, wait_for
from services.broker import Mosquitto
from services.cloud import SITE as CLOUD_SITE
from services.cloud import chain_spec, converged, running_cloud, until
from services.tiers import machine_lacks
from test_agent_daemon import FakeCloud, run_phase

from edge_agent.runner import CgroupScope, agent_mark
from tideflow import wire

AGENT = str(Path(sys.executable).with_name("tideflow-agent"))
EXIT_FAILED, EXIT_INVALID, EXIT_DB, EXIT_FULL = 1, 2, 3, 4


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


def cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AGENT, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env=agent_env(), check=False,
    )  # fmt: skip


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def db_tasks(db: Path) -> dict[str, tuple[str, int, str | None]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT task, phase, attempt, message FROM task_runs").fetchall()
    finally:
        conn.close()
    return {task: (phase, attempt, message) for task, phase, attempt, message in rows}


# ------------------------------------------------------------- NUL bytes
NUL_CASES = {
    "command": ({"command": ["echo", "a\0b"]}, "spec.tasks[0].command"),
    "script": ({"script": "echo a\0b"}, "spec.tasks[0].script"),
    "env": ({"command": ["env"], "env": {"A": "a\0b"}}, "spec.tasks[0].env"),
    "workingDir": ({"command": ["pwd"], "workingDir": "/tmp/\0x"}, "spec.tasks[0].workingDir"),
}


@pytest.mark.parametrize("case", sorted(NUL_CASES))
def test_a_nul_byte_in_a_manifest_is_a_validation_error(tmp_path: Path, case: str) -> None:
    task, field = NUL_CASES[case]
    document = {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "n"},
        "spec": {"tasks": [{"name": "t", **task}]},
    }
    path = tmp_path / "wf.yaml"
    # JSON is YAML, and "\u0000" is how a NUL byte gets past YAML's reader.
    path.write_text(json.dumps(document))
    result = cli("run-local", str(path), "--db", str(tmp_path / "s.db"), cwd=tmp_path)
    assert result.returncode == EXIT_INVALID, explain(result)
    assert field in result.stderr and "NUL" in result.stderr, explain(result)
    assert "Traceback" not in result.stderr, explain(result)
    assert not (tmp_path / "s.db").exists()


def test_a_nul_byte_in_an_output_fails_the_dependant_not_the_agent(tmp_path: Path) -> None:
    path = manifest(
        tmp_path / "wf.yaml",
        [
            {"name": "p", "script": 'printf "x=a\\000b\\n" > "$TIDEFLOW_OUTPUTS"'},
            {"name": "c", "dependsOn": ["p"], "command": ["echo", "{{tasks.p.outputs.x}}"]},
        ],
    )
    db = tmp_path / "s.db"
    for _ in range(2):  # the second start used to crash again on the same committed output
        result = cli("run-local", str(path), "--db", str(db), "--quiet", cwd=tmp_path)
        assert result.returncode == EXIT_FAILED, explain(result)
        assert "Traceback" not in result.stderr, explain(result)
    tasks = db_tasks(db)
    assert tasks["p"][0] == "Succeeded"
    phase, attempt, message = tasks["c"]
    assert (phase, attempt) == ("Failed", 1), tasks
    assert message is not None and "NUL" in message, message


def test_a_number_too_long_to_convert_is_a_validation_error(tmp_path: Path) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(
        "apiVersion: tideflow.io/v1alpha1\nkind: Workflow\nmetadata: {name: n}\nspec:\n"
        f"  tasks: [{{name: t, command: ['true'], timeoutSeconds: {'9' * 5000}}}]\n"
    )
    result = cli("run-local", str(path), "--db", str(tmp_path / "s.db"), cwd=tmp_path)
    assert result.returncode == EXIT_INVALID, explain(result)
    assert "Traceback" not in result.stderr and "wf.yaml" in result.stderr, explain(result)
    assert not (tmp_path / "s.db").exists()


# ------------------------------------------------------------- the daemon
@pytest.fixture
def cloud(mosquitto: Mosquitto) -> Iterator[FakeCloud]:
    fake = FakeCloud(mosquitto)
    yield fake
    fake.close()


def test_a_poison_assignment_neither_kills_the_daemon_nor_loops_it(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    """An assignment whose uid is too long for a file name, or whose JSON holds a
    number Python refuses to convert, is dropped with one log line; the daemon
    goes on and runs the next assignment.  (The long uid used to kill the daemon
    with exit 1 at the first attempt, and again at every restart: the run was
    stored, so it resumed and died.)"""
    agent = AgentProcess(cloud.site, f"mqtt://{mosquitto.host}:{mosquitto.port}", tmp_path / "s.db")
    with agent:
        wait_for(lambda: cloud.states, 30, "the agent to come online")
        task = {"name": "a", "command": ["true"]}
        body = {"uid": "x", "generation": 1, "namespace": "default", "name": "wf",
                "spec": {"tasks": [task]}}  # fmt: skip
        long_uid = wire.encode(wire.KIND_ASSIGN, cloud.site, {**body, "uid": "u" * 300})
        cloud.publish(wire.ASSIGN, long_uid)
        huge = wire.encode(wire.KIND_ASSIGN, cloud.site, body)
        cloud.publish(wire.ASSIGN, huge.replace(b'"generation":1', b'"generation":' + b"9" * 5000))
        good = cloud.assign({"tasks": [task]})
        wait_for(lambda: run_phase(agent.db, good) == "Succeeded", 30, "the good run to succeed")
        assert agent.alive, agent.log_tail()
        log = agent.log_path.read_text(errors="replace")
        assert "Traceback" not in log, agent.log_tail()
        assert log.count("dropped message on") == 2, agent.log_tail()
        assert set(agent_truth(agent.db)["runs"]) == {f"{good}.1"}


def test_a_control_with_an_oversized_uid_is_refused_naming_the_field(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    """A control's uid had no bound on the wire (an assignment's and a receipt's have
    64 characters): a cancel or suspend naming a uid of a megabyte was taken, and
    looked up in the site's database.  Now it is dropped naming the field; the
    daemon goes on and runs the next assignment."""
    agent = AgentProcess(cloud.site, f"mqtt://{mosquitto.host}:{mosquitto.port}", tmp_path / "s.db")
    with agent:
        wait_for(lambda: cloud.states, 30, "the agent to come online")
        for action, uid in (("cancel", "u" * (wire.UID_MAX + 1)), ("suspend", "u" * 500_000)):
            body = {"action": action, "uid": uid, "generation": 1}
            cloud.publish(wire.CONTROL, wire.encode(wire.KIND_CONTROL, cloud.site, body))
        good = cloud.assign({"tasks": [{"name": "a", "command": ["true"]}]})
        wait_for(lambda: run_phase(agent.db, good) == "Succeeded", 30, "the good run to succeed")
        assert agent.alive, agent.log_tail()
        log = agent.log_path.read_text(errors="replace")
        assert "Traceback" not in log, agent.log_tail()
        dropped = [line for line in log.splitlines() if "dropped message on" in line]
        assert len(dropped) == 2, agent.log_tail()
        assert all("control" in line and "uid" in line for line in dropped), dropped
        assert all(len(line) < 1000 for line in dropped), dropped


def test_a_broken_traceparent_is_ignored_not_handed_to_every_task(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    """An assignment's traceparent went to its tasks' environment as sent when the
    agent records no spans (``--no-tracing``): one holding a NUL byte, or of 300 KB
    (over the kernel's limit for one environment string), failed every task of the
    run with "cannot start", naming neither the traceparent nor the message.  W3C
    trace context says an invalid traceparent is ignored; a valid one still reaches
    the tasks."""
    agent = AgentProcess(cloud.site, mosquitto.url, tmp_path / "s.db", "--no-tracing")
    valid = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    script = 'echo "tp=${TRACEPARENT:-none}" >> "$TIDEFLOW_OUTPUTS"'
    spec = {"tasks": [{"name": "a", "script": script}]}
    with agent:
        wait_for(lambda: cloud.states, 30, "the agent to come online")
        uids = {}
        for case, traceparent in (("nul", "00-\x00"), ("huge", "y" * 300_000), ("valid", valid)):
            uids[case] = uid = f"tp-{case}"
            body = wire.AssignPayload(
                uid=uid, generation=1, namespace="default", name=uid, spec=spec
            )
            message = wire.encode(wire.KIND_ASSIGN, cloud.site, body, traceparent=traceparent)
            cloud.publish(wire.ASSIGN, message)
        done = ("Succeeded", "Failed")
        finished = lambda: all(run_phase(agent.db, uid) in done for uid in uids.values())  # noqa: E731
        wait_for(finished, 30, "the three runs to finish")
        runs = agent_truth(agent.db)["runs"]
        outputs = {case: runs[f"{uid}.1"]["tasks"]["a"] for case, uid in uids.items()}
        assert outputs["valid"]["outputs"] == {"tp": valid}, outputs["valid"]
        for case in ("nul", "huge"):
            assert outputs[case]["phase"] == "Succeeded", (case, outputs[case])
            assert outputs[case]["outputs"] == {"tp": "none"}, outputs[case]
        assert agent.alive, agent.log_tail()


def test_two_uids_that_name_the_same_files_are_not_two_runs_of_one_id(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    """uids ``a/b`` and ``a_b`` named the same run id (its files, workspace and cgroup
    are named after the uid with other characters made ``_``): the second assignment
    raised AssertionError in the executor, a traceback with no receipt, for ever at
    each re-send.  A uid outside that alphabet is now dropped naming the field."""
    agent = AgentProcess(cloud.site, mosquitto.url, tmp_path / "s.db")
    spec = {"tasks": [{"name": "a", "command": ["true"]}]}
    with agent:
        wait_for(lambda: cloud.states, 30, "the agent to come online")
        for uid in ("a_b", "a/b"):
            body = {"uid": uid, "generation": 1, "namespace": "default", "name": "wf", "spec": spec}
            cloud.publish(wire.ASSIGN, wire.encode(wire.KIND_ASSIGN, cloud.site, body))
        good = cloud.assign(spec, name="good")
        wait_for(lambda: run_phase(agent.db, good) == "Succeeded", 30, "the sentinel run")
        # (Runs go side by side: a_b's may end a moment after the sentinel's.)
        wait_for(lambda: run_phase(agent.db, "a_b") == "Succeeded", 30, "a_b's run")
        log = agent.log_path.read_text(errors="replace")
        assert "Traceback" not in log, agent.log_tail()
        dropped = [line for line in log.splitlines() if "dropped message on" in line]
        assert len(dropped) == 1 and "uid" in dropped[0], dropped
        assert agent.alive, agent.log_tail()


def test_a_flood_of_malformed_messages_is_counted_each_but_logged_in_a_bounded_number_of_lines(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    """Each dropped message was one warning line: a cloud (or anything holding its
    credentials) publishing 3,000 malformed messages wrote 3,000 lines to the
    site's log, which fills the disk a site's outbox lives on.  Now the metric
    counts every one, while the log says why in the first few lines of each
    window and then how many more were dropped (as the cloud's bridge does)."""
    from services.metrics import metered, scrape

    flood = 3000
    with metered(cloud.site, mosquitto.url, tmp_path / "s.db") as (agent, port):
        wait_for(lambda: cloud.states, 30, "the agent to come online")
        for n in range(flood):
            cloud.publish(wire.CONTROL, b"not json %d" % n)
        good = cloud.assign({"tasks": [{"name": "a", "command": ["true"]}]})
        wait_for(lambda: run_phase(agent.db, good) == "Succeeded", 60, "the good run to succeed")
        series = "tideflow_agent_dropped_messages_total{reason=not-json}"
        wait_for(lambda: scrape(port).get(series) == flood, 30, "every drop counted")
        assert agent.alive, agent.log_tail()
        log = agent.log_path.read_text(errors="replace")
    dropped = [line for line in log.splitlines() if "dropped message on" in line]
    assert 1 <= len(dropped) <= 20, (len(dropped), dropped[:3])
    assert "not-json" in dropped[0]


# ------------------------------------------------------- one agent per database
@pytest.mark.parametrize("way", ["symlink", "hardlink", "lock-file-deleted"])
def test_a_second_agent_by_another_way_to_the_database_exits_3(tmp_path: Path, way: str) -> None:
    """A second agent on the database through a symlink, a hard link, or after
    its lock file was deleted (a tmp cleaner, a careless task: the lock was a
    name beside the database) exits 3.

    It used to take a lock of its own, resume the first agent's run, kill its
    task as an orphan and run it again: the first agent's run ended Failed
    ("killed by signal SIGKILL") while the second's succeeded.
    """
    journal, db = tmp_path / "journal", tmp_path / "real.db"
    alias = tmp_path / "alias.db"
    # The task holds until the test releases it: the second agent must meet a live first
    # one however slowly it starts (a fixed sleep let the first finish on a loaded machine).
    release = tmp_path / "release"
    script = (
        'echo "start $TIDEFLOW_ATTEMPT" >> "$J"; '
        'while [ ! -e "$R" ]; do sleep 0.05; done; echo end >> "$J"'
    )
    env = {"J": str(journal), "R": str(release)}
    path = manifest(tmp_path / "wf.yaml", [{"name": "a", "script": script, "env": env}])
    first = subprocess.Popen(
        [AGENT, "run-local", str(path), "--db", str(db), "--quiet"], cwd=tmp_path,
        env=agent_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: journal.exists() and "start" in journal.read_text(), 30, "task a")
        if way == "symlink":
            alias.symlink_to(db.name)
        elif way == "hardlink":
            os.link(db, alias)
        else:
            (tmp_path / "real.db.lock").unlink()
            alias = db
        second = cli("run-local", str(path), "--db", str(alias), "--quiet", cwd=tmp_path)
        assert second.returncode == EXIT_DB, explain(second)
        assert "in use by" in second.stderr, explain(second)
        if way == "symlink":
            assert f"in use by pid {first.pid}" in second.stderr, explain(second)
        release.touch()
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0, out + err
    finally:
        release.touch()
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.communicate(timeout=10)
    assert journal.read_text().split("\n") == ["start 1", "end", ""]


# ----------------------------------------------------------------- full disk
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a disk the test can fill and free (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        machine_lacks(f"a small tmpfs mount (root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
    return filler


def test_an_agent_started_on_a_full_disk_exits_4(tmp_path: Path, small_disk: Path) -> None:
    """Started on a full disk, fresh file or not, the agent says so with exit 4.

    It used to die with an OSError traceback writing its pid into the lock file
    (exit 1) and, past that, call an existing database unusable (exit 3,
    "disk I/O error": SQLite could not size its shared-memory file).
    """
    journal, db = tmp_path / "journal", small_disk / "s.db"
    task = {"name": "a", "script": 'echo run >> "$J"', "env": {"J": str(journal)}}
    path = manifest(tmp_path / "wf.yaml", [task])
    for fresh in (True, False):
        filler = fill(small_disk)
        args = ["run-local", str(path), "--db", str(db), "--quiet", "--new-run"]
        full = cli(*args, cwd=tmp_path)
        assert full.returncode == EXIT_FULL, explain(full)
        assert "Traceback" not in full.stderr and "disk" in full.stderr, explain(full)
        filler.unlink()
        freed = cli(*args, cwd=tmp_path)
        assert freed.returncode == 0, (fresh, explain(freed))
    assert journal.read_text().split() == ["run", "run"]


# ------------------------------------------------------------------- cgroups
def test_every_attempt_gets_its_cgroup_while_others_end(tmp_path: Path) -> None:
    """Attempts start while others end: each still gets a cgroup of its own.

    Ending an attempt removes the scope's root when it is left empty; an attempt
    starting at that moment found the root "existing" (EEXIST) then gone, and
    ran without a cgroup (2 attempts of a 5,000-task fan-out here), so its
    setsid grandchildren could outlive a crash.
    """
    scope = CgroupScope.detect(agent_mark(tmp_path / "race.work"))
    if scope is None:
        machine_lacks("a writable cgroup v2 subtree")
    missing: list[str] = []

    def churn(worker: int) -> None:
        for i in range(1500):
            name = f"w{worker}-{i}"
            path = scope.create(name)
            if path is None:
                missing.append(name)
            else:
                scope.destroy(path)

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    with contextlib.suppress(OSError):
        scope.root.rmdir()
    assert missing == [], f"{len(missing)} attempts ran without a cgroup"


# --------------------------------------------------- hosts without cgroups
NO_CGROUPS = (
    # A private mount namespace where the cgroup v2 tree is read-only: what an
    # agent sees on a host (or in a pod) without a writable cgroup subtree.
    "mount --make-rprivate / && "
    "for m in $(awk '$3 == \"cgroup2\" {print $2}' /proc/mounts); do "
    'mount -o remount,ro,bind "$m" "$m" || exit 97; done && exec "$0" "$@"'
)


def without_cgroups(*args: str) -> list[str]:
    return ["unshare", "-m", "sh", "-c", NO_CGROUPS, *args]


def require_unshare(tmp_path: Path) -> None:
    probe = subprocess.run(without_cgroups("true"), capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        machine_lacks(f"a private mount namespace (root, unshare): {probe.stderr.strip()}")


def test_a_task_that_kills_the_agent_at_once_is_bounded_without_cgroups(tmp_path: Path) -> None:
    """``kill -9 $PPID`` as a task's first act, on a host without cgroups.

    The task is gone before its Running checkpoint (written behind the start)
    commits, and without a cgroup nothing of it is left to find: every restart
    ran it again as attempt 1, for ever, never InterruptedTooOften.
    """
    require_unshare(tmp_path)
    journal, db = tmp_path / "journal", tmp_path / "s.db"
    script = 'echo "start $TIDEFLOW_ATTEMPT" >> "$J"; kill -9 "$PPID"'
    path = manifest(
        tmp_path / "wf.yaml", [{"name": "k", "script": script, "env": {"J": str(journal)}}]
    )
    codes = []
    for _ in range(6):
        argv = without_cgroups(AGENT, "run-local", str(path), "--db", str(db), "--quiet")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=agent_env())
        codes.append(done.returncode)
        if done.returncode != -signal.SIGKILL and done.returncode != 128 + signal.SIGKILL:
            break
    assert journal.read_text().split("\n") == ["start 1", "start 2", "start 3", ""], codes
    assert codes[-1] == EXIT_FAILED, codes
    phase, _attempt, message = db_tasks(db)["k"]
    assert phase == "Failed" and "InterruptedTooOften" in (message or ""), message


def test_a_task_that_must_not_run_twice_is_not_rerun_without_cgroups(tmp_path: Path) -> None:
    """``onInterruption: Fail``, the agent killed the moment the task starts, no cgroups.

    Nothing was committed and nothing was left alive: the next agent used to
    see the task Pending and run it a second time.
    """
    require_unshare(tmp_path)
    journal, db = tmp_path / "journal", tmp_path / "s.db"
    script = 'echo "start $TIDEFLOW_ATTEMPT" >> "$J"; kill -9 "$PPID"'
    task = {"name": "once", "script": script, "env": {"J": str(journal)}, "onInterruption": "Fail"}
    path = manifest(tmp_path / "wf.yaml", [task])
    argv = without_cgroups(AGENT, "run-local", str(path), "--db", str(db), "--quiet")
    first = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=agent_env())
    assert first.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), explain(first)
    second = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=agent_env())
    assert second.returncode == EXIT_FAILED, explain(second)
    assert journal.read_text().split("\n") == ["start 1", ""]
    phase, _attempt, message = db_tasks(db)["once"]
    assert phase == "Failed" and "InterruptedNotRerun" in (message or ""), message


# ------------------------------------------------- a stop that signals everyone
def test_a_stop_that_signals_the_task_first_is_still_an_interruption(tmp_path: Path) -> None:
    """``systemctl stop`` / ``restart`` (KillMode=control-group, the default) and a
    clean reboot send SIGTERM to every process of the unit at once, the agent's
    tasks included, in no particular order.

    A task that died of that SIGTERM a moment before the agent got its own was
    recorded Failed ("killed by signal SIGTERM"), its retry budget used, its
    run Failed: the stop counted as the task's failure.
    """
    journal, db = tmp_path / "journal", tmp_path / "s.db"
    script = (
        'echo "start $TIDEFLOW_ATTEMPT $$" >> "$J"; '
        '[ "$TIDEFLOW_ATTEMPT" = 1 ] && sleep 30; echo end >> "$J"'
    )
    slow = {"name": "a", "script": script, "env": {"J": str(journal)}}
    path = manifest(tmp_path / "wf.yaml", [slow])
    argv = [AGENT, "--log-level", "INFO", "run-local", str(path), "--db", str(db), "--quiet"]
    log = tmp_path / "agent.log"
    with log.open("w") as sink:
        agent = subprocess.Popen(argv, cwd=tmp_path, env=agent_env(), stdout=sink, stderr=sink,
                                 start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: journal.exists() and journal.read_text().strip(), 30, "task a to start")
        task_pid = int(journal.read_text().split()[2])
        os.killpg(task_pid, signal.SIGTERM)  # the unit's processes, the task's first
        # The agent either settles the task at once (the defect: it exits 1) or
        # says it waits for its own stop signal, which then comes.
        wait_for(lambda: agent.poll() is not None or "waiting" in log.read_text(), 30,
                 "the agent to see its task die")  # fmt: skip
        with contextlib.suppress(ProcessLookupError):
            agent.send_signal(signal.SIGTERM)
        agent.wait(30)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(10)
    out = log.read_text()
    assert agent.returncode == 130, out
    phase, attempt, message = db_tasks(db)["a"]
    assert (phase, attempt) == ("Interrupted", 1), message
    again = cli("run-local", str(path), "--db", str(db), "--quiet", cwd=tmp_path)
    assert again.returncode == 0, explain(again)
    assert db_tasks(db)["a"][:2] == ("Succeeded", 2)


def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    """Ctrl-C twice: the second does not wait for a task that ignores SIGTERM.

    The first stop gives the task its grace period (5 s); the second signal
    used to start that grace period again instead of ending it.
    """
    journal, db = tmp_path / "journal", tmp_path / "s.db"
    script = 'trap "echo term >> $J" TERM; echo "start $TIDEFLOW_ATTEMPT" >> "$J"; ' + (
        "while :; do sleep 0.05; done"
    )
    path = manifest(
        tmp_path / "wf.yaml", [{"name": "a", "script": script, "env": {"J": str(journal)}}]
    )
    argv = [AGENT, "run-local", str(path), "--db", str(db), "--quiet"]
    agent = subprocess.Popen(argv, cwd=tmp_path, env=agent_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: journal.exists() and "start" in journal.read_text(), 30, "task a")
        agent.send_signal(signal.SIGTERM)
        wait_for(lambda: "term" in journal.read_text(), 10, "the task to get its SIGTERM")
        agent.send_signal(signal.SIGTERM)
        second = time.monotonic()
        agent.communicate(timeout=30)
        took = time.monotonic() - second
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.communicate(timeout=10)
    assert agent.returncode == 130
    assert took < 2.5, f"the second signal took {took:.1f}s to stop the agent (grace is 5 s)"
    left = [
        p
        for p in psutil.process_iter(["environ"])
        if (p.info["environ"] or {}).get("J") == str(journal)
    ]
    assert not left, "the task survived"


def test_a_second_signal_stops_the_daemon_at_once(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    journal = tmp_path / "journal"
    script = 'trap "echo term >> $J" TERM; echo "start $TIDEFLOW_ATTEMPT" >> "$J"; ' + (
        "while :; do sleep 0.05; done"
    )
    agent = AgentProcess(cloud.site, f"mqtt://{mosquitto.host}:{mosquitto.port}", tmp_path / "s.db")
    with agent:
        wait_for(lambda: cloud.states, 30, "the agent to come online")
        cloud.assign({"tasks": [{"name": "a", "script": script, "env": {"J": str(journal)}}]})
        wait_for(lambda: journal.exists() and "start" in journal.read_text(), 30, "task a")
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "term" in journal.read_text(), 10, "the task to get its SIGTERM")
        agent.proc.send_signal(signal.SIGTERM)
        second = time.monotonic()
        agent.proc.wait(30)
        took = time.monotonic() - second
    assert took < 2.5, f"the second signal took {took:.1f}s to stop the daemon (grace is 5 s)"


# ---------------------------------------------------------------- fork bombs
HOG = """\
import os, sys, time
def grab():
    try:
        child = os.fork()
    except OSError:
        return None
    if child == 0:
        time.sleep(30)
        os._exit(0)
    return child
pid = None
while (child := grab()) is not None:
    pid = child
if len(sys.argv) > 2:  # free exactly one process slot: the agent's next fork takes it
    os.kill(pid, 9)
    os.waitpid(pid, 0)
open(sys.argv[1], "w").close()
# Keep taking every slot that frees up (a thread of the agent ending, say) while the
# gate is open, so that nothing else can start; in free-one-slot mode leave it.
end = time.monotonic() + 3
while time.monotonic() < end:
    if len(sys.argv) <= 2:
        grab()
    time.sleep(0.002)
"""


@pytest.fixture
def pids_cgroup(tmp_path: Path) -> Iterator[Path]:
    """A cgroup v1 ``pids`` group allowing 60 processes and threads (root only)."""
    group = Path("/sys/fs/cgroup/pids") / f"tideflow-test-{os.getpid()}-{tmp_path.name[-20:]}"
    try:
        group.mkdir()
        (group / "pids.max").write_text("60")
    except OSError as exc:
        machine_lacks(f"a writable cgroup v1 pids controller to bound a fork bomb: {exc}")
    try:
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        wait_for(lambda: not (group / "cgroup.procs").read_text().strip(), 10, "the group to empty")
        group.rmdir()


def test_a_fork_bomb_does_not_fail_other_tasks_for_good(tmp_path: Path, pids_cgroup: Path) -> None:
    """One task forks until the process limit; another cannot start meanwhile.

    "Resource temporarily unavailable" (EAGAIN) at spawn was a permanent
    failure: the victim failed at once, whatever its retry policy said.
    """
    (tmp_path / "hog.py").write_text(HOG)
    gate, journal = tmp_path / "gate", tmp_path / "journal"
    victim = 'echo "try $TIDEFLOW_ATTEMPT" >> "$J"; [ -e "$GATE" ] || exit 1'
    path = manifest(
        tmp_path / "wf.yaml",
        [
            {"name": "hog", "command": [sys.executable, str(tmp_path / "hog.py"), str(gate)]},
            {"name": "victim", "script": victim, "env": {"J": str(journal), "GATE": str(gate)},
             "retry": {"limit": 30, "backoff": {"seconds": 1, "factor": 1}}},
        ],
    )  # fmt: skip
    argv = [AGENT, "run-local", str(path), "--db", str(tmp_path / "s.db"), "--concurrency", "2"]
    enter = f'echo $$ > {pids_cgroup / "cgroup.procs"} && exec "$0" "$@"'
    done = subprocess.run(["sh", "-c", enter, *argv], capture_output=True, text=True,
                          timeout=120, env=agent_env())  # fmt: skip
    assert done.returncode == 0, explain(done)
    assert "Resource temporarily unavailable" in done.stdout, "the fork bomb never bit"
    tasks = db_tasks(tmp_path / "s.db")
    assert tasks["victim"][0] == "Succeeded" and tasks["hog"][0] == "Succeeded", tasks


def test_a_fork_bomb_that_leaves_one_slot_does_not_kill_the_agent(
    tmp_path: Path, pids_cgroup: Path
) -> None:
    """The agent's fork takes the last process slot a fork bomb left.

    Python 3.11's child watcher then needed a thread (one more slot) to watch
    the child: "can't start new thread" escaped create_subprocess_exec, the
    child ran on unwatched and the agent died with a traceback (exit 1).
    """
    (tmp_path / "hog.py").write_text(HOG)
    gate, journal = tmp_path / "gate", tmp_path / "journal"
    victim = 'echo "try $TIDEFLOW_ATTEMPT" >> "$J"; [ -e "$GATE" ] || exit 1'
    hog = [sys.executable, str(tmp_path / "hog.py"), str(gate), "leave-one"]
    path = manifest(
        tmp_path / "wf.yaml",
        [
            {"name": "hog", "command": hog},
            {"name": "victim", "script": victim, "env": {"J": str(journal), "GATE": str(gate)},
             "retry": {"limit": 30, "backoff": {"seconds": 0.5, "factor": 1}}},
        ],
    )  # fmt: skip
    argv = [AGENT, "run-local", str(path), "--db", str(tmp_path / "s.db"), "--concurrency", "2"]
    enter = f'echo $$ > {pids_cgroup / "cgroup.procs"} && exec "$0" "$@"'
    done = subprocess.run(["sh", "-c", enter, *argv], capture_output=True, text=True,
                          timeout=120, env=agent_env())  # fmt: skip
    # (stderr may hold "Exception ignored" from OpenTelemetry's at-fork hook in a
    # forked child that could not start a thread: the child, not the agent.)
    assert done.returncode == 0, explain(done)
    tasks = db_tasks(tmp_path / "s.db")
    assert tasks["victim"][0] == "Succeeded" and tasks["hog"][0] == "Succeeded", tasks


# ------------------------------------------------------- a hostile workspace
def test_a_task_that_replaces_its_workspace_with_a_file_fails_only_its_run(
    tmp_path: Path,
) -> None:
    """A task replaces the run's workspace directory with a file.

    The next attempt of that run raised NotADirectoryError out of the runner:
    the agent died with a traceback, and again at every restart (the attempt
    dies before it starts, so no interruption is ever counted).
    """
    sabotage = 'd=$PWD; cd /; rm -rf "$d"; echo x > "$d"'
    path = manifest(tmp_path / "wf.yaml", [{"name": "s", "script": sabotage}])
    document = yaml.safe_load(path.read_text())
    document["spec"]["onFailure"] = [{"name": "cleanup", "command": ["true"]}]
    path.write_text(yaml.safe_dump(document))
    db = tmp_path / "s.db"
    for _ in range(2):
        done = cli("run-local", str(path), "--db", str(db), "--quiet", cwd=tmp_path)
        assert done.returncode == EXIT_FAILED, explain(done)
        assert "Traceback" not in done.stderr, explain(done)
    phase, attempt, message = db_tasks(db)["cleanup"]
    assert (phase, attempt) == ("Failed", 1), message
    assert "workspace" in (message or ""), message


@pytest.mark.parametrize("command", ["run-local", "status", "runs"])
def test_a_fifo_in_place_of_the_database_is_refused_without_hanging(
    tmp_path: Path, command: str
) -> None:
    """``status`` on a FIFO where the database should be blocked for ever (SQLite
    read it); ``run-local`` called it a "disk I/O error"."""
    db = tmp_path / "s.db"
    os.mkfifo(db)
    path = manifest(tmp_path / "wf.yaml", [{"name": "a", "command": ["true"]}])
    args = [command, str(path)] if command == "run-local" else [command]
    done = cli(*args, "--db", str(db), cwd=tmp_path, timeout=20)
    assert done.returncode == EXIT_DB, explain(done)
    assert "not a regular file" in done.stderr, explain(done)


# --------------------------------------------------------------- clock jumps
CLOCK_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
/* CLOCK_REALTIME plus the seconds in $FAKE_CLOCK_OFFSET_FILE: a wall clock a
   test can move (NTP stepping it back), leaving the monotonic clock alone. */
int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int r = real(id, ts);
    const char *path = getenv("FAKE_CLOCK_OFFSET_FILE");
    if (r == 0 && id == CLOCK_REALTIME && path) {
        FILE *f = fopen(path, "r");
        long offset = 0;
        if (f) {
            if (fscanf(f, "%ld", &offset) == 1) ts->tv_sec += offset;
            fclose(f);
        }
    }
    return r;
}
"""


def test_a_clock_stepped_back_does_not_hold_a_retry_back(tmp_path: Path) -> None:
    """NTP steps the site's clock back an hour while a task waits for its retry.

    Retry times are wall-clock (they must survive a restart): the retry, due in
    2 s, then waited the whole hour.  No retry delay is longer than
    ``backoff.maxSeconds``, so a due time beyond that is a clock that moved.
    """
    source, shim = tmp_path / "clock.c", tmp_path / "clock.so"
    source.write_text(CLOCK_SHIM)
    built = subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim), str(source), "-ldl"],
                           capture_output=True, text=True, check=False)  # fmt: skip
    if built.returncode != 0:
        machine_lacks(f"a C compiler for the clock shim: {built.stderr.strip()[:200]}")
    offset, journal = tmp_path / "offset", tmp_path / "journal"
    offset.write_text("0")
    script = 'echo "try $TIDEFLOW_ATTEMPT" >> "$J"; [ "$TIDEFLOW_ATTEMPT" -ge 2 ]'
    retry = {"limit": 1, "backoff": {"seconds": 2, "maxSeconds": 30}}
    path = manifest(
        tmp_path / "wf.yaml",
        [{"name": "flaky", "script": script, "env": {"J": str(journal)}, "retry": retry}],
    )
    env = {**agent_env(), "LD_PRELOAD": str(shim), "FAKE_CLOCK_OFFSET_FILE": str(offset)}
    argv = [AGENT, "run-local", str(path), "--db", str(tmp_path / "s.db"), "--quiet"]
    agent = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: journal.exists() and "try 1" in journal.read_text(), 30, "attempt 1")
        offset.write_text("-3600")
        out, err = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.communicate(timeout=10)
    assert agent.returncode == 0, out + err
    assert journal.read_text().split("\n") == ["try 1", "try 2", ""]


# ----------------------------------------------- stops at random, while syncing
@pytest.mark.parametrize("seed", range(3))
async def test_sigterm_and_kill_at_random_while_running_and_syncing_lose_nothing(
    tmp_path: Path, mosquitto: Mosquitto, seed: int
) -> None:
    """Five stops at random moments, each a SIGTERM or a kill -9, while three runs
    execute and their records sync to a real cloud (a cancel sent now and then):
    the cloud ends holding exactly the site's database, each seq applied once, and
    the database passes SQLite's integrity check.  (A regression battery: this
    pass's tries found nothing here.)"""
    import asyncio
    import random

    rng = random.Random(seed)
    agent = AgentProcess(CLOUD_SITE, mosquitto.url, tmp_path / "s.db")
    async with running_cloud(mosquitto.url) as cloud:
        agent.start()
        uids = [cloud.assign(chain_spec(10, 0.05), name=f"wf{i}") for i in range(3)]
        for _ in range(5):
            await asyncio.sleep(rng.uniform(0.05, 1.2))
            agent.kill() if rng.random() < 0.5 else agent.terminate()
            if rng.random() < 0.3:
                cloud.cancel(rng.choice(uids))
            agent.start()
        ended = ("Succeeded", "Failed", "Cancelled")
        await until(
            lambda: all(run_phase(agent.db, uid) in ended for uid in uids), 60, "the runs to end"
        )
        await converged(cloud, agent, timeout=60)
        agent.terminate()
    with contextlib.closing(sqlite3.connect(agent.db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert "Traceback" not in agent.log_path.read_text(errors="replace"), agent.log_tail(80)


# ------------------------------------------------------------- another site's session
def connack(broker: Mosquitto, user: str, client_id: str, *, clean: bool) -> ReasonCode:
    """One CONNECT as ``user`` with ``client_id`` (no reconnecting); the broker's answer."""
    got: list[ReasonCode] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                         protocol=MQTTProtocolVersion.MQTTv311)  # fmt: skip
    client.username_pw_set(user, broker.users[user])
    client.on_connect = lambda _c, _u, _f, rc, _p: got.append(rc)
    client.connect(broker.host, broker.port)
    deadline = time.monotonic() + 10
    while not got and client.socket() is not None and time.monotonic() < deadline:
        client.loop(0.1)
    client.disconnect()
    assert got, f"no CONNACK for {user} as {client_id}"
    return got[0]


@pytest.mark.broker
async def test_a_site_cannot_take_another_sites_session(
    secure_mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Site b's credentials with site a's client id (its persistent session).

    The ACL confined b to its own topics but nothing bound the client id to the
    user: Mosquitto closed a's live connection and handed b a's session, a's
    agent reconnected, and the two took it from each other for ever (site a
    denied service, its queued messages delivered to the wrong client).  The
    CONNECT must be refused, and the real agent stay connected and syncing.
    """
    broker, site = secure_mosquitto, "a"
    passwords = {}
    for user in ("site-a", "operator"):
        passwords[user] = tmp_path / f"{user}.pw"
        passwords[user].write_text(broker.users[user] + "\n")
    agent = AgentProcess(site, broker.url, tmp_path / "a.db", "--username", "site-a",
                         "--password-file", str(passwords["site-a"]))  # fmt: skip
    async with running_cloud(broker.url, username="operator",
                             password_file=passwords["operator"]) as cloud:  # fmt: skip
        with agent:
            await until(lambda: cloud.bridge.presence.connected(site), 20, "site a online")
            for clean in (False, True):
                rc = connack(broker, "site-b", wire.agent_client_id(site), clean=clean)
                assert rc.is_failure and rc.getName() == "Not authorized", rc
            # Its own id still works for b, and the operator's own ids are free.
            assert not connack(broker, "site-b", wire.agent_client_id("b"), clean=True).is_failure
            assert not connack(broker, "operator", "tideflow-tool-1", clean=True).is_failure
            cloud.assign(chain_spec(3, 0.05), site=site)
            await until(lambda: cloud.view_phase() == "Succeeded", 30, "Succeeded in the cloud")
            await converged(cloud, agent)
            log = agent.log_tail(100_000)
            assert log.count("link up") == 1 and "link down" not in log, log
    assert "already connected, closing old connection" not in broker.log_tail(100_000)
