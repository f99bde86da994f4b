"""What the round-19 hostile pass found, each reproduced with real processes first.

* a task that replaced its run's ``.tideflow`` directory (or the run's whole
  workspace) with a symbolic link redirected the agent's own writes through
  it: the next attempt's start was appended to ``<target>/starts`` (made if
  missing), a file named as that attempt's outputs was deleted there, and the
  outputs were read from there; now the attempt is refused in one line naming
  the path, and nothing outside the workspace is touched;
* a symlink at ``<db>.lock`` made the next agent truncate the file it pointed
  at and write its pid there; a symlink at ``<db>.work`` made it remove, at
  its start, every directory in the target named as a run is (``python3.11``
  in ``/usr/lib``); both are refused (exit 3) in one line naming the path, and
  so is a symlink where SQLite's ``-wal``, ``-shm`` or ``-journal`` goes (SQLite
  refused it, saying only "unable to open database file");
* a SIGTERM before the agent installed its handlers (while it imported itself,
  half a second; as its store opened or migrated; as it resumed its runs)
  killed it (exit 143, as a crash) where a stop is documented as clean (the
  daemon 0, ``run-local`` 130); now it is held from the entry point's first
  line, nothing is resumed once it came, and a second one stops at once;
* on a terminal that is not UTF-8 (PYTHONIOENCODING=ascii, a Latin-1 locale),
  ``logs`` of a task that wrote non-ASCII called the sound database "corrupt"
  (exit 3), and ``run-local`` ended a finished run in a traceback at its
  summary's em dash; what the output cannot encode is now escaped;
* started in a working directory that was removed, with ``--db`` relative:
  a traceback (exit 1); now one line naming the database (exit 3);
* ``--log-level`` (or ``TIDEFLOW_LOG_LEVEL``) that logging does not know, and a
  ``--username`` that is not UTF-8, ended in a traceback (exit 1; the latter
  after the database was opened), and ``--labels`` that is not UTF-8 was sent;
  now each is exit 2 naming the option, before anything is opened; so is
  ``--db ""`` (run-local: a ValueError traceback; the readers: "corrupt");
* a hangup (the terminal that ran ``run-local`` went away) ended the agent
  with exit 129, its task running on unwatched and recorded Running; SIGHUP
  is now a stop signal like SIGTERM (unless ignored from the start: nohup).
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from services.agent import wait_for
from test_hostile_agent import (
    AGENT,
    EXIT_DB,
    EXIT_FAILED,
    agent_env,
    cli,
    db_tasks,
    explain,
    manifest,
)

from edge_agent.runner import STARTS_FILE

EXIT_OK, EXIT_INTERRUPTED = 0, 130


# ---------------------------------------------------- a workspace of symlinks
def _redirected(tmp_path: Path, sabotage: str) -> tuple[Path, Path]:
    """Run ``sabotage`` as task ``a``, then ``b`` after it; the place the link
    points at, with a file named as ``b``'s first outputs in it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.1.outputs").write_text("precious\n")
    tasks = [
        {"name": "a", "script": sabotage.replace("TARGET", str(elsewhere))},
        {"name": "b", "dependsOn": ["a"], "command": ["true"]},
    ]
    return manifest(tmp_path / "wf.yaml", tasks), elsewhere


def _assert_refused_untouched(tmp_path: Path, path: Path, elsewhere: Path, named: str) -> None:
    db = tmp_path / "s.db"
    done = cli("run-local", str(path), "--db", str(db), "--quiet", cwd=tmp_path)
    assert done.returncode == EXIT_FAILED, explain(done)
    assert "Traceback" not in done.stderr, explain(done)
    assert sorted(p.name for p in elsewhere.rglob("*")) == ["b.1.outputs"]
    assert (elsewhere / "b.1.outputs").read_text() == "precious\n"
    phase, _, message = db_tasks(db)["b"]
    assert phase == "Failed", (phase, message)
    assert named in (message or "") and "symbolic link" in (message or ""), message
    assert "\n" not in (message or ""), message


def test_a_tideflow_dir_replaced_by_a_symlink_does_not_redirect_the_agents_writes(
    tmp_path: Path,
) -> None:
    path, elsewhere = _redirected(tmp_path, "rm -rf .tideflow && ln -s TARGET .tideflow")
    _assert_refused_untouched(tmp_path, path, elsewhere, ".tideflow")


def test_a_workspace_replaced_by_a_symlink_does_not_redirect_the_agents_writes(
    tmp_path: Path,
) -> None:
    path, elsewhere = _redirected(tmp_path, 'd=$PWD; cd /; rm -rf "$d"; ln -s TARGET "$d"')
    _assert_refused_untouched(tmp_path, path, elsewhere, "s.db.work/")


# --------------------------------------------- a data dir of symlinks
LOCAL_WF = [{"name": "a", "command": ["true"]}]


def _agent_on(tmp_path: Path, command: str) -> subprocess.CompletedProcess[str]:
    db = tmp_path / "s.db"
    if command == "run-local":
        path = manifest(tmp_path / "wf.yaml", LOCAL_WF)
        return cli("run-local", str(path), "--db", str(db), "--quiet", cwd=tmp_path, timeout=30)
    return cli(
        "run", "--site", "s1", "--broker", "mqtt://127.0.0.1:1", "--db", str(db),
        cwd=tmp_path, timeout=30,
    )  # fmt: skip


def _one_line_naming(done: subprocess.CompletedProcess[str], named: str) -> None:
    assert done.returncode == EXIT_DB, explain(done)
    lines = [line for line in done.stderr.splitlines() if line.startswith("tideflow-agent:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, explain(done)
    assert named in lines[0] and "symbolic link" in lines[0], lines


@pytest.mark.parametrize("command", ["run-local", "run"])
def test_a_lock_file_replaced_by_a_symlink_is_not_written_through(
    tmp_path: Path, command: str
) -> None:
    """``<db>.lock`` is the agent's (made at start, removed at stop): a symlink there
    made the next agent truncate the file it pointed at and write its pid into it."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "s.db.lock").symlink_to(victim)
    done = _agent_on(tmp_path, command)
    assert victim.read_text() == "precious\n"
    _one_line_naming(done, "s.db.lock")


@pytest.mark.parametrize("command", ["run-local", "run"])
def test_a_work_dir_replaced_by_a_symlink_is_refused_and_nothing_there_removed(
    tmp_path: Path, command: str
) -> None:
    """``<db>.work`` is where the runs' workspaces are, and the agent removes, at its
    start, every directory there named as a run is (``<x>.<digits>``) that no run
    holds: through a symlink to ``/usr/lib`` that was ``python3.11`` and the rest."""
    elsewhere = tmp_path / "elsewhere"
    for name in ("python3.11", "libfoo.so.6", "local-x.1"):
        (elsewhere / name).mkdir(parents=True)
        (elsewhere / name / "file").write_text("precious\n")
    (tmp_path / "s.db.work").symlink_to(elsewhere)
    done = _agent_on(tmp_path, command)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["libfoo.so.6", "local-x.1", "python3.11"]
    assert all((p / "file").read_text() == "precious\n" for p in elsewhere.iterdir())
    _one_line_naming(done, "s.db.work")


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_a_symlink_beside_the_database_is_named(tmp_path: Path, suffix: str) -> None:
    """SQLite refuses a symlink where its ``-wal``, ``-shm`` or ``-journal`` file goes,
    saying only 'unable to open database file'; the agent names it."""
    first = _agent_on(tmp_path, "run-local")
    assert first.returncode == 0, explain(first)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / f"s.db{suffix}").symlink_to(victim)
    for command in ("run-local", "status"):
        done = (
            _agent_on(tmp_path, command)
            if command == "run-local"
            else cli("status", "--db", str(tmp_path / "s.db"), cwd=tmp_path)
        )
        assert victim.read_text() == "precious\n"
        _one_line_naming(done, f"s.db{suffix}")


# ------------------------------------------- a stop before start-up finished
def _agent(*args: str, failpoints: str = "") -> subprocess.Popen[str]:
    env = agent_env()
    if failpoints:
        env["TIDEFLOW_FAILPOINTS"] = failpoints
    return subprocess.Popen(
        [AGENT, "--log-level", "INFO", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _daemon_args(db: Path) -> list[str]:
    return ["run", "--site", "s1", "--broker", "mqtt://127.0.0.1:1", "--db", str(db)]


def _finished(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"did not stop: {err}") from None
    return proc.returncode, err


def _left_running(tmp_path: Path) -> Path:
    """A database with task ``a`` Running (its agent killed -9 in the middle of it).

    (The task's command names the test's directory: the fixtures kill it at the end.)"""
    db = tmp_path / "s.db"
    path = manifest(tmp_path / "wf.yaml", [{"name": "a", "script": f"sleep 300; : {tmp_path}"}])
    proc = _agent("run-local", str(path), "--db", str(db), "--quiet")
    try:
        wait_for(lambda: _phase(db, "a") == "Running", 20, "task a Running")
    finally:
        proc.kill()
        proc.communicate()
    return db


def _phase(db: Path, task: str) -> str | None:
    try:
        return db_tasks(db).get(task, (None,))[0]
    except sqlite3.Error:  # (not made yet)
        return None


def _starts(db: Path) -> list[str]:
    return sorted(
        line
        for path in db.with_name(db.name + ".work").glob(f"*/.tideflow/{STARTS_FILE}")
        for line in path.read_text().splitlines()
    )


@pytest.mark.parametrize("command", ["run", "run-local"])
def test_a_stop_while_the_database_opens_is_a_clean_stop_that_starts_nothing(
    tmp_path: Path, command: str
) -> None:
    """A SIGTERM before the agent installed its handlers (here: as its store opened;
    as well while it imported, migrated or checked its file) killed it: exit -15, as
    if it crashed; the documented clean stop is 0 (the daemon), 130 (run-local)."""
    db = _left_running(tmp_path)
    args = _daemon_args(db) if command == "run" else ["run-local", str(tmp_path / "wf.yaml"),
                                                      "--db", str(db), "--quiet"]  # fmt: skip
    code, err = _finished(_agent(*args, failpoints="store-opened=term"))
    assert code == (EXIT_OK if command == "run" else EXIT_INTERRUPTED), (code, err)
    assert "Traceback" not in err, err
    assert "stopped before its start finished" in err, err
    assert _starts(db) == ["a 1"]  # nothing resumed
    assert db_tasks(db)["a"][:2] == ("Running", 1)


def test_a_stop_as_the_daemon_resumes_its_runs_stops_them_cleanly(tmp_path: Path) -> None:
    """The drivers of the resumed runs start before the handlers are in place: the
    stop that comes then is the documented clean one, its attempt Interrupted."""
    db = _left_running(tmp_path)
    code, err = _finished(_agent(*_daemon_args(db), failpoints="runs-resumed=term"))
    assert code == EXIT_OK, (code, err)
    assert "Traceback" not in err, err
    assert "second stop signal" not in err, err
    phase, attempt, _ = db_tasks(db)["a"]
    assert phase != "Failed", (phase, attempt)


# Libraries the agent loads as it imports itself, the first one early, and its lock
# file, made as its store opens: a SIGTERM at each of those moments (no fail point).
MOMENTS = ["_asyncio", "_sqlite3", "pydantic_core", "s.db.lock"]


def _reached(pid: int, db: Path, moment: str) -> bool:
    if moment.endswith(".lock"):
        return db.with_name(moment).exists()
    try:
        return moment in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_sigterm_while_the_daemon_starts_is_a_clean_stop(tmp_path: Path, moment: str) -> None:
    db = tmp_path / "s.db"
    proc = _agent(*_daemon_args(db))
    deadline = time.monotonic() + 20
    while not _reached(proc.pid, db, moment) and proc.poll() is None:
        assert time.monotonic() < deadline, moment
    proc.send_signal(signal.SIGTERM)
    code, err = _finished(proc)
    assert code == EXIT_OK, (code, err)
    assert "Traceback" not in err, err


def test_a_second_stop_signal_while_the_daemon_starts_stops_it_at_once(tmp_path: Path) -> None:
    """(SIGTERM then SIGINT: two of one signal may merge into one.)"""
    db = tmp_path / "s.db"
    proc = _agent(*_daemon_args(db))
    deadline = time.monotonic() + 20
    while not _reached(proc.pid, db, "pydantic_core") and proc.poll() is None:
        assert time.monotonic() < deadline
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    code, err = _finished(proc)
    assert code in (EXIT_OK, EXIT_INTERRUPTED), (code, err)
    assert "Traceback" not in err, err
    if code == EXIT_INTERRUPTED:
        assert "second stop signal" in err, err


# ------------------------------------------------ an output that is not UTF-8
# A task that writes non-ASCII (and bytes that are not UTF-8 at all); its run's
# summary line has an em dash of its own.
NON_ASCII = (
    r"printf 'h\303\251llo \360\237\230\200 bad:\377\376\n'; echo 'k=v\303\251' > $TIDEFLOW_OUTPUTS"
)


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_the_cli_on_a_terminal_that_is_not_utf8_prints_what_it_cannot_encode_escaped(
    tmp_path: Path, encoding: str
) -> None:
    """A terminal whose encoding is not UTF-8 (PYTHONIOENCODING, a Latin-1 locale, a
    serial console): ``logs`` of a task that wrote non-ASCII said "database ...: a
    stored row cannot be read ... it may be corrupt" (exit 3) of a sound database, and
    ``run-local`` ended a finished run with a traceback at its summary line."""
    path = manifest(tmp_path / "wf.yaml", [{"name": "a", "script": NON_ASCII}])
    db = tmp_path / "s.db"
    env = {**agent_env(), "PYTHONIOENCODING": encoding}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([AGENT, *args, "--db", str(db)], capture_output=True,
                              text=True, errors="replace", env=env, timeout=30)  # fmt: skip

    done = run("run-local", str(path))
    assert done.returncode == EXIT_OK, explain(done)
    assert "Traceback" not in done.stderr and "Succeeded" in done.stdout, explain(done)
    for args in (["logs", "wf", "a"], ["runs"], ["status"], ["trace", "wf"], ["runs", "--json"]):
        done = run(*args)
        assert done.returncode == EXIT_OK, (args, explain(done))
        assert "corrupt" not in done.stderr and "Traceback" not in done.stderr, explain(done)
    assert "llo" in run("logs", "wf", "a").stdout


# ------------------------------------------------ a working directory removed
@pytest.mark.parametrize("command", ["run-local", "status", "run"])
def test_a_relative_database_in_a_removed_working_directory_is_one_line(
    tmp_path: Path, command: str
) -> None:
    """Started in a directory that was removed (a shell left in a deleted tree, a
    cleaned temporary directory), with ``--db`` relative: a traceback
    (FileNotFoundError from the path's resolution), exit 1."""
    path = manifest(tmp_path / "wf.yaml", LOCAL_WF)
    gone = tmp_path / "gone"
    gone.mkdir()
    args = {
        "run-local": ["run-local", str(path), "--quiet"],
        "status": ["status"],
        "run": _daemon_args(Path("s.db"))[:-2],
    }[command]
    done = subprocess.run(
        ["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "-", str(gone),
         AGENT, *args, "--db", "s.db"],
        capture_output=True, text=True, env=agent_env(), timeout=30,
    )  # fmt: skip
    assert done.returncode == EXIT_DB, explain(done)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "current directory" in lines[0] and "s.db" in lines[0], lines


# ------------------------------------------------------------ odd settings
ODD_SETTINGS = {
    "log-level": (["--log-level", "LOUD", "status"], {}, "--log-level"),
    "log-level-env": (["status"], {"TIDEFLOW_LOG_LEVEL": "verbose"}, "--log-level"),
    "username": (["run", "--site", "s1", "--username", b"u\xff"], {}, "--username"),
    "labels": (["run", "--site", "s1", "--labels", b"zone=\xff"], {}, "--labels"),
}


@pytest.mark.parametrize("case", sorted(ODD_SETTINGS))
def test_an_unusable_setting_is_exit_2_naming_the_option(tmp_path: Path, case: str) -> None:
    """A log level logging does not know ended in a ValueError traceback (exit 1), as
    did a user name that is not UTF-8 (paho's encode) once the daemon had opened its
    database."""
    args, extra_env, option = ODD_SETTINGS[case]
    argv: list[str | bytes] = [AGENT, *args, "--db", str(tmp_path / "s.db")]
    done = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                          env={**agent_env(), **extra_env}, timeout=20)  # fmt: skip
    assert done.returncode == 2, explain(done)
    assert "Traceback" not in done.stderr and option in done.stderr, explain(done)
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("command", ["run-local", "status", "run"])
def test_an_empty_database_path_is_exit_2_naming_the_option(tmp_path: Path, command: str) -> None:
    """``--db ""`` (a variable that expanded to nothing): run-local ended in a ValueError
    traceback, the readers called the database corrupt."""
    path = manifest(tmp_path / "wf.yaml", LOCAL_WF)
    args = {
        "run-local": ["run-local", str(path)],
        "status": ["status"],
        "run": _daemon_args(Path("x"))[:-2],
    }[command]
    done = cli(*args, "--db", "", cwd=tmp_path, timeout=20)
    assert done.returncode == 2, explain(done)
    assert "Traceback" not in done.stderr and "--db" in done.stderr, explain(done)
    assert "corrupt" not in done.stderr, explain(done)


# ------------------------------------------------------------------ SIGHUP
def _hup_wf(tmp_path: Path) -> Path:
    # (the task names the test's directory: the fixtures kill what is left of it)
    return manifest(tmp_path / "wf.yaml", [{"name": "a", "script": f"sleep 30; : {tmp_path}"}])


def _sleeping_tasks(tmp_path: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(tmp_path).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_hangup_stops_run_local_cleanly(tmp_path: Path) -> None:
    """The terminal that ran ``run-local`` went away (an ssh session dropped): SIGHUP's
    default action ended the agent (exit 129) with its task running on, unwatched,
    recorded Running; the agent already counts a task's SIGHUP as a stop's."""
    path = _hup_wf(tmp_path)
    db = tmp_path / "s.db"
    proc = _agent("run-local", str(path), "--db", str(db), "--quiet")
    wait_for(lambda: _phase(db, "a") == "Running", 20, "task a Running")
    proc.send_signal(signal.SIGHUP)
    code, err = _finished(proc)
    assert code == EXIT_INTERRUPTED, (code, err)
    assert "run again to resume" in err, err
    assert _phase(db, "a") != "Running"
    assert _sleeping_tasks(tmp_path) == []


def test_a_hangup_ignored_from_the_start_stays_ignored(tmp_path: Path) -> None:
    """``nohup tideflow-agent ...``: a hangup it was started to survive."""
    path = _hup_wf(tmp_path)
    db = tmp_path / "s.db"
    proc = subprocess.Popen(
        ["nohup", AGENT, "run-local", str(path), "--db", str(db), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=agent_env(),
    )  # fmt: skip
    wait_for(lambda: _phase(db, "a") == "Running", 20, "task a Running")
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    code, err = _finished(proc)
    assert code == EXIT_INTERRUPTED, (code, err)
