"""The agent's files in a run's workspace are reached through no symbolic link.

A task's working directory is its run's workspace: it can put a symlink where
the workspace's ``.tideflow`` (or the workspace) was.  Recovery's read of the
starts file and the read of an attempt's outputs must not follow it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_agent.runner import (
    RUN_FILES,
    STARTS_FILE,
    OutputsError,
    RunFilesRefused,
    open_run_files,
    read_run_outputs,
    recorded_starts,
)


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / STARTS_FILE).write_text("k 7\n")
    (target / "k.1.outputs").write_text("secret=1\n")
    return target


def test_recovery_reads_no_starts_file_through_a_symlinked_run_files_dir(
    tmp_path: Path, elsewhere: Path
) -> None:
    workspace = tmp_path / "work" / "run.1"
    workspace.mkdir(parents=True)
    (workspace / RUN_FILES).symlink_to(elsewhere)
    assert recorded_starts(workspace) == {}


def test_recovery_reads_no_starts_file_through_a_symlinked_workspace(
    tmp_path: Path, elsewhere: Path
) -> None:
    (elsewhere / RUN_FILES).mkdir()
    (elsewhere / RUN_FILES / STARTS_FILE).write_text("k 7\n")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "run.1").symlink_to(elsewhere)
    assert recorded_starts(tmp_path / "work" / "run.1") == {}


def test_outputs_are_not_read_through_a_symlinked_run_files_dir(
    tmp_path: Path, elsewhere: Path
) -> None:
    workspace = tmp_path / "run.1"
    workspace.mkdir()
    (workspace / RUN_FILES).symlink_to(elsewhere)
    with pytest.raises(OutputsError, match=r"\.tideflow is a symbolic link; refused"):
        read_run_outputs(os.fspath(workspace), "k.1.outputs")


def test_a_file_in_place_of_the_run_files_dir_is_named(tmp_path: Path) -> None:
    workspace = tmp_path / "run.1"
    workspace.mkdir()
    (workspace / RUN_FILES).write_text("")
    with pytest.raises(RunFilesRefused) as refused:
        open_run_files(os.fspath(workspace), make=True)
    assert refused.value.strerror == f"{workspace}/{RUN_FILES} is not a directory"


def test_the_run_files_dir_is_made_with_the_workspace_and_the_work_dir(tmp_path: Path) -> None:
    workspace = tmp_path / "work" / "run.1"
    fd = open_run_files(os.fspath(workspace), make=True)
    os.close(fd)
    assert (workspace / RUN_FILES).is_dir()
    with pytest.raises(FileNotFoundError):
        open_run_files(os.fspath(tmp_path / "work" / "run.2"))
