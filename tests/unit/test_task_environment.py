"""What a task process gets from the agent: the base names, what the site passes, never more.

Proves (defect 13 of the stops issue): an agent's credentials do not reach
tasks by default; ``pass_env`` names or patterns add them; the agent's own
``TIDEFLOW_*`` settings are never passed whatever the patterns; the outputs
file is read bounded, never through a FIFO or a symlink, without blocking.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from edge_agent.runner import (
    OUTPUTS_MAX_BYTES,
    OutputsError,
    inherited_environment,
    read_outputs_file,
)
from tideflow.failpoints import _parse

AGENT_ENV = {
    "PATH": "/usr/bin",
    "HOME": "/home/agent",
    "LANG": "C.UTF-8",
    "LC_TIME": "de_DE.UTF-8",
    "TZ": "UTC",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t",
    "AWS_REGION": "eu-north-1",
    "KUBERNETES_SERVICE_HOST": "10.0.0.1",
    "TIDEFLOW_PASSWORD_FILE": "/run/secrets/pw",
    "DATABASE_URL": "postgres://u:p@db/x",
}


def test_tasks_get_only_the_base_names_by_default() -> None:
    assert inherited_environment(environ=AGENT_ENV) == {
        "PATH": "/usr/bin",
        "HOME": "/home/agent",
        "LANG": "C.UTF-8",
        "LC_TIME": "de_DE.UTF-8",
        "TZ": "UTC",
    }


def test_the_site_passes_more_by_name_or_pattern_but_never_agent_settings() -> None:
    env = inherited_environment(["AWS_*", "DATABASE_URL", "TIDEFLOW_*", "*"], environ=AGENT_ENV)
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and env["DATABASE_URL"].startswith("postgres")
    assert not [key for key in env if key.startswith("TIDEFLOW_")]


def test_outputs_are_read_up_to_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "out"
    with path.open("wb") as handle:
        handle.write(b"first=1\n")
        handle.truncate(500 * 1024 * 1024)  # a sparse 500 MB file: only the bound is read
    assert read_outputs_file(path) == {"first": "1"}


def test_a_fifo_in_place_of_the_outputs_file_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "out"
    os.mkfifo(path)
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(read_outputs_file(path))
        except OutputsError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert isinstance(outcome[0], OutputsError) and "not a regular file" in str(outcome[0])


def test_a_symlink_in_place_of_the_outputs_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("key=do-not-leak\n")
    (tmp_path / "out").symlink_to(secret)
    with pytest.raises(OutputsError):
        read_outputs_file(tmp_path / "out")


def test_a_missing_outputs_file_means_no_outputs(tmp_path: Path) -> None:
    assert read_outputs_file(tmp_path / "none") == {}
    assert OUTPUTS_MAX_BYTES == 64 * 1024


def test_fail_points_parse_names_and_hit_counts() -> None:
    assert _parse("") == {}
    assert _parse("process-exited, outcome-committed@3,bad@x") == {
        "process-exited": 1,
        "outcome-committed": 3,
        "bad": 1,
    }


async def test_an_attempt_whose_cgroup_cannot_be_joined_still_runs(tmp_path: Path) -> None:
    """A cgroup removed under the runner (or a scope that is no cgroup) must not kill the
    attempt, let alone the agent: it starts without the cgroup."""
    from edge_agent.runner import AttemptRequest, CgroupScope, ProcessRunner

    runner = ProcessRunner(mark="m", cgroups=CgroupScope(tmp_path / "not-a-cgroup"))
    result = await runner.run(
        AttemptRequest(
            run_id="r",
            task="t",
            attempt=1,
            argv=["sh", "-c", 'echo ok=1 > "$TIDEFLOW_OUTPUTS"'],
            env={},
            working_dir=None,
            timeout=10,
            scratch=tmp_path / "ws",
        )
    )
    assert result.ok and result.outputs == {"ok": "1"}, result
    root = tmp_path / "not-a-cgroup"
    assert not root.exists() or list(root.iterdir()) == []  # nothing left behind
