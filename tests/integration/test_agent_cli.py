"""The ``tideflow-agent`` command against hostile use, as real processes.

Proves, each with the real console script as a subprocess:

* one agent per database: a second ``run-local`` or ``run`` on a database an
  agent holds exits 3 naming the holder's pid and runs nothing; the lock dies
  with the process (``kill -9``), so the next agent resumes; two agents
  started at once on a fresh file run the workflow once;
* the readers (``status``, ``runs``, ``logs``, ``trace``) work while an agent
  runs, and on a read-only copy of the database;
* ``--db`` names the file exactly, whatever characters it holds (``#``,
  ``?``, ``%``): the path checked is the path opened;
* a corrupt database (random bytes over an index page or a table page) is
  refused with exit 3 and a clear message, byte-for-byte untouched, even
  with ``--new-run``;
* ``--concurrency`` that is not a positive integer is a usage error (exit 2),
  not a traceback; so are ``--ack-timeout`` and ``--max-ack-timeout`` that
  are not a positive, finite number of seconds.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from services.agent import wait_for
from services.metrics import free_port
from services.tiers import machine_lacks

AGENT = str(Path(sys.executable).with_name("tideflow-agent"))
EXIT_INVALID, EXIT_DB = 2, 3


def write_manifest(path: Path, tasks: list[dict[str, Any]], name: str = "wf") -> Path:
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


def journaled(name: str, journal: Path, seconds: float = 0.0, **extra: Any) -> dict[str, Any]:
    """A task that appends its name to ``journal``, then sleeps."""
    script = f'echo "$0" >> "$1"; echo "{name} says hi"; sleep {seconds}'
    return {"name": name, "command": ["sh", "-c", script, name, str(journal)], **extra}


def cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AGENT, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


def popen(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [AGENT, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)


# ------------------------------------------------------- one agent per database
def test_second_run_local_exits_3_naming_the_holder_and_readers_keep_working(
    tmp_path: Path,
) -> None:
    journal, db = tmp_path / "journal", tmp_path / "site.db"
    manifest = write_manifest(
        tmp_path / "wf.yaml",
        [
            journaled("quick", journal),
            # Long enough to outlast seven CLI start-ups on a loaded machine (30 s did
            # not: the run ended before `status` read it); the test kills it anyway.
            {**journaled("slow", journal, 600), "dependsOn": ["quick"], "retry": {"limit": 1}},
            {**journaled("after", journal), "dependsOn": ["slow"]},
        ],
    )
    first = popen("run-local", str(manifest), "--db", str(db), "--quiet", cwd=tmp_path)
    try:
        wait_for(lambda: "slow" in lines(journal), 30, "the first agent to start its task")
        second = cli("run-local", str(manifest), "--db", str(db), "--quiet", cwd=tmp_path)
        assert second.returncode == EXIT_DB, explain(second)
        assert f"in use by pid {first.pid}" in second.stderr, explain(second)
        assert "Traceback" not in second.stderr
        again = cli(
            "run-local", str(manifest), "--db", str(db), "--new-run", "--quiet", cwd=tmp_path
        )
        assert again.returncode == EXIT_DB, explain(again)
        assert lines(journal) == ["quick", "slow"], "the second agent ran a task"
        # Readers work beside the running agent.
        for args in (["status"], ["runs"], ["logs", "wf", "quick"], ["trace", "wf"]):
            result = cli(*args, "--db", str(db), cwd=tmp_path)
            assert result.returncode == 0, f"{args}: {explain(result)}"
        assert "default/wf Running" in cli("status", "--db", str(db), cwd=tmp_path).stdout
        # kill -9: the lock dies with the process and the next agent resumes.
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        resumed = popen("run-local", str(manifest), "--db", str(db), "--quiet", cwd=tmp_path)
        try:
            wait_for(lambda: lines(journal).count("slow") == 2, 30, "the next agent to resume")
            assert "in use" not in (resumed.stderr.read() if resumed.poll() is not None else "")
        finally:
            stop(resumed)
    finally:
        stop(first)


def test_second_daemon_and_run_local_beside_a_daemon_exit_3(tmp_path: Path) -> None:
    db = tmp_path / "site.db"
    broker = f"mqtt://127.0.0.1:{free_port()}"  # nobody listens: the agent runs offline
    daemon = ["run", "--site", "s1", "--broker", broker, "--db", str(db)]
    first = popen(*daemon, cwd=tmp_path)
    try:
        wait_for(lambda: _site_claimed(db), 30, "the daemon to claim its database")
        second = cli(*daemon, cwd=tmp_path)
        assert second.returncode == EXIT_DB, explain(second)
        assert f"in use by pid {first.pid}" in second.stderr, explain(second)
        manifest = write_manifest(tmp_path / "wf.yaml", [journaled("x", tmp_path / "journal")])
        local = cli("run-local", str(manifest), "--db", str(db), "--quiet", cwd=tmp_path)
        assert local.returncode == EXIT_DB, explain(local)
        assert not (tmp_path / "journal").exists()
        status = cli("status", "--db", str(db), cwd=tmp_path)
        assert status.returncode == 0 and "site:            s1" in status.stdout, explain(status)
        assert first.poll() is None, "the first daemon must keep running"
    finally:
        stop(first)


def _site_claimed(db: Path) -> bool:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return bool(conn.execute("SELECT 1 FROM meta WHERE key='site'").fetchone())
    except sqlite3.Error:
        return False


def test_two_agents_started_at_once_on_a_fresh_file_run_the_workflow_once(
    tmp_path: Path,
) -> None:
    journal, db = tmp_path / "journal", tmp_path / "fresh.db"
    release = tmp_path / "release"
    # Each task holds until the loser has given up: on a loaded machine the second
    # process can take longer to start than fixed-length tasks take to finish.
    hold = 'echo "$0" >> "$1"; while [ ! -e "$2" ]; do sleep 0.05; done'
    manifest = write_manifest(
        tmp_path / "wf.yaml",
        [
            {"name": f"t{i}", "command": ["sh", "-c", hold, f"t{i}", str(journal), str(release)]}
            for i in range(4)
        ],
    )
    procs = [
        popen("run-local", str(manifest), "--db", str(db), "--quiet", cwd=tmp_path)
        for _ in range(2)
    ]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), 60, "one agent to give up")
    finally:
        release.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        results.append((proc.returncode, out, err))
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, EXIT_DB], results
    assert sorted(lines(journal)) == ["t0", "t1", "t2", "t3"], "each task exactly once"
    loser = next(err for code, _, err in results if code == EXIT_DB)
    assert "in use by pid" in loser


def test_readers_work_on_a_read_only_copy(tmp_path: Path) -> None:
    journal, db = tmp_path / "journal", tmp_path / "site.db"
    manifest = write_manifest(tmp_path / "wf.yaml", [journaled("only", journal)])
    result = cli("run-local", str(manifest), "--db", str(db), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, explain(result)
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    shutil.copy2(db, copy_dir / "site.db")
    copy = copy_dir / "site.db"
    before = sha256(copy)
    copy.chmod(0o444)
    copy_dir.chmod(0o555)
    try:
        for args, expect in (
            (["status"], "runs in progress: 0"),
            (["runs"], "Succeeded"),
            (["logs", "wf", "only"], "only says hi"),
            (["trace", "wf"], "Succeeded"),
        ):
            out = _as_unprivileged([AGENT, *args, "--db", str(copy)], cwd=tmp_path)
            assert out.returncode == 0, f"{args}: {explain(out)}"
            assert expect in out.stdout, f"{args}: {explain(out)}"
        assert sorted(p.name for p in copy_dir.iterdir()) == ["site.db"]
        assert sha256(copy) == before
    finally:
        copy_dir.chmod(0o755)


def _as_unprivileged(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` so that file permissions bind it (root ignores them otherwise)."""
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            machine_lacks("setpriv (running as root): cannot make a file read-only")
        drop = "-dac_override,-dac_read_search,-fowner,-linux_immutable"
        argv = [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


# ----------------------------------------------------------------- --db names
@pytest.mark.parametrize("name", ["site#1.db", "q?mode=ro.db", "pct%41.db", "sp ace.db"])
def test_db_path_is_taken_literally(tmp_path: Path, name: str) -> None:
    manifest = write_manifest(tmp_path / "wf.yaml", [journaled("a", tmp_path / "journal")])
    result = cli("run-local", str(manifest), "--db", name, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, explain(result)
    made = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert name in made, made
    assert made == sorted([name, "journal", "wf.yaml"]), made
    status = cli("status", "--db", name, cwd=tmp_path)
    assert status.returncode == 0, explain(status)


def test_db_path_with_hash_never_opens_the_file_before_the_hash(tmp_path: Path) -> None:
    precious = tmp_path / "prec"
    with sqlite3.connect(precious) as conn:
        conn.execute("CREATE TABLE ledger (entry TEXT)")
        conn.execute("INSERT INTO ledger VALUES ('precious')")
    digest = sha256(precious)
    manifest = write_manifest(tmp_path / "wf.yaml", [journaled("a", tmp_path / "journal")])
    result = cli("run-local", str(manifest), "--db", "prec#.db", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, explain(result)
    assert (tmp_path / "prec#.db").exists()
    assert sha256(precious) == digest


# ---------------------------------------------------------------- corruption
def _page_of(db: Path, table_or_index: str) -> tuple[int, int]:
    """(page number, page size) of the root page of ``table_or_index``."""
    with sqlite3.connect(db) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name=?", (table_or_index,)
        ).fetchone()
    return int(root), int(page_size)


def _scribble(db: Path, page: int, page_size: int, seed: int) -> None:
    noise = random.Random(seed).randbytes(page_size)
    with db.open("r+b") as handle:
        handle.seek((page - 1) * page_size)
        handle.write(noise)


@pytest.mark.parametrize(
    ("target", "extra"),
    [
        ("runs_by_name", []),
        ("runs_by_name", ["--new-run"]),
        ("spans", ["--new-run"]),
        ("task_runs", []),
    ],
    ids=["index", "index-new-run", "spans-new-run", "task-runs"],
)
def test_corrupt_database_is_refused_untouched(
    tmp_path: Path, target: str, extra: list[str]
) -> None:
    journal, db = tmp_path / "journal", tmp_path / "site.db"
    manifest = write_manifest(
        tmp_path / "wf.yaml",
        [
            journaled(f"t{i}", journal, **({"dependsOn": [f"t{i - 1}"]} if i else {}))
            for i in range(6)
        ],
    )
    result = cli("run-local", str(manifest), "--db", str(db), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, explain(result)
    assert not db.with_name(db.name + "-wal").exists(), "a clean exit leaves no WAL behind"
    page, page_size = _page_of(db, target)
    _scribble(db, page, page_size, seed=page)
    digest = sha256(db)
    ran = len(lines(journal))
    result = cli("run-local", str(manifest), "--db", str(db), "--quiet", *extra, cwd=tmp_path)
    assert result.returncode == EXIT_DB, explain(result)
    assert "Traceback" not in result.stderr, explain(result)
    assert "corrupt" in result.stderr and "site.db" in result.stderr, explain(result)
    assert sha256(db) == digest, "a refused database must be left byte-for-byte as it was"
    assert len(lines(journal)) == ran, "nothing may run on a corrupt database"
    # The readers say so too, with the same exit code and no traceback.
    for args in (["status"], ["runs"]):
        read = cli(*args, "--db", str(db), cwd=tmp_path)
        assert read.returncode in (0, EXIT_DB) and "Traceback" not in read.stderr, explain(read)
    assert sha256(db) == digest


# --------------------------------------------------------------- --concurrency
@pytest.mark.parametrize("value", ["-1", "0", "1.5", "two", ""])
@pytest.mark.parametrize("command", ["run-local", "run"])
def test_bad_concurrency_is_a_usage_error(tmp_path: Path, value: str, command: str) -> None:
    manifest = write_manifest(tmp_path / "wf.yaml", [journaled("a", tmp_path / "journal")])
    target = [str(manifest)] if command == "run-local" else ["--site", "s1"]
    result = cli(command, *target, "--db", "x.db", "--concurrency", value, cwd=tmp_path)
    assert result.returncode == EXIT_INVALID, explain(result)
    assert "--concurrency" in result.stderr and "Traceback" not in result.stderr, explain(result)
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "ten"])
@pytest.mark.parametrize("flag", ["--ack-timeout", "--max-ack-timeout"])
def test_bad_ack_timeouts_are_usage_errors(tmp_path: Path, flag: str, value: str) -> None:
    """0, negative or nan used to resend the whole window on every loop of the sender."""
    result = cli("run", "--site", "s1", "--db", "x.db", flag, value, cwd=tmp_path, timeout=20)
    assert result.returncode == EXIT_INVALID, explain(result)
    assert flag in result.stderr and "Traceback" not in result.stderr, explain(result)
    assert not (tmp_path / "x.db").exists()


def test_more_labels_than_a_heartbeat_may_carry_is_a_usage_error(tmp_path: Path) -> None:
    """The cloud refuses a state message with more labels (the EdgeSite holding them
    grew past what the API server stores): such an agent would never be heard."""
    from tideflow import wire

    labels = ",".join(f"k{i}=v" for i in range(wire.MAX_STATE_LABELS + 1))
    result = cli("run", "--site", "s1", "--db", "x.db", "--broker", "mqtt://127.0.0.1:1",
                 "--labels", labels, cwd=tmp_path, timeout=20)  # fmt: skip
    assert result.returncode == EXIT_INVALID, explain(result)
    assert "--labels" in result.stderr and "Traceback" not in result.stderr, explain(result)
    assert not (tmp_path / "x.db").exists()


def test_bad_concurrency_from_the_environment_is_a_usage_error(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "wf.yaml", [journaled("a", tmp_path / "journal")])
    result = subprocess.run(
        [AGENT, "run-local", str(manifest), "--db", "x.db"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "TIDEFLOW_CONCURRENCY": "-3"},
        check=False,
    )
    assert result.returncode == EXIT_INVALID, explain(result)
    assert "--concurrency" in result.stderr and "Traceback" not in result.stderr, explain(result)


def test_good_concurrency_still_runs(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "wf.yaml", [journaled("a", tmp_path / "journal")])
    result = cli(
        "run-local", str(manifest), "--db", "x.db", "--concurrency", "3", "--quiet", cwd=tmp_path
    )
    assert result.returncode == 0, explain(result)
    assert stat.S_ISREG((tmp_path / "x.db").stat().st_mode)
