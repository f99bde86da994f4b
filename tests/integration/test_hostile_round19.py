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
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_hostile_agent import EXIT_DB, EXIT_FAILED, cli, db_tasks, explain, manifest


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
