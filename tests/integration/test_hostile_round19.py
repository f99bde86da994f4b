"""What the round-19 hostile pass found, each reproduced with real processes first.

* a task that replaced its run's ``.tideflow`` directory (or the run's whole
  workspace) with a symbolic link redirected the agent's own writes through
  it: the next attempt's start was appended to ``<target>/starts`` (made if
  missing), a file named as that attempt's outputs was deleted there, and the
  outputs were read from there; now the attempt is refused in one line naming
  the path, and nothing outside the workspace is touched;
"""

from __future__ import annotations

from pathlib import Path

from test_hostile_agent import EXIT_FAILED, cli, db_tasks, explain, manifest


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
