"""A full disk stops the agent with exit code 4 and everything committed intact — a real one.

The database lives on a 2 MiB tmpfs mounted for the test (we run as root in
CI; where mounting is not permitted the test skips, saying so).  The tasks
print more than the filesystem holds (each stdout tail is kept, 16 KiB), so
SQLite hits ENOSPC part-way.  Then:

* the process exits 4 — ``run-local`` and the ``run`` daemon alike;
* the database passes ``PRAGMA integrity_check`` as the full disk left it
  (read read-only, so the WAL is not touched);
* the filesystem is grown (``mount -o remount,size=...``) and the agent
  started again on the same database: it finishes the run, and no task whose
  success was committed before the disk filled runs again (each task leaves
  a line in a journal kept off the tmpfs).  For the daemon, the cloud (the
  operator's bridge) ends up with exactly the agent's truth.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from services.agent import AgentProcess, has_schema, read_only
from services.broker import Mosquitto
from services.cloud import SITE, converged, running_cloud, until
from services.tiers import machine_lacks

TASKS = 160  # x 16 KiB of stdout tail each: well over 2 MiB


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of the test's own; grow it with :func:`grow`."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        machine_lacks(f"permission to mount a tmpfs ({done.stderr.strip() or done.returncode})")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def grow(mountpoint: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=64m", str(mountpoint)], check=True)


def heavy_spec(journal: Path) -> dict[str, Any]:
    tasks = [
        {
            "name": f"t{i:03d}",
            "script": f'echo t{i:03d} >> "{journal}"; head -c 12300 /dev/zero | base64 -w 0',
        }
        for i in range(TASKS)
    ]
    return {"tasks": tasks, "defaults": {"retry": {"limit": 3, "backoff": {"seconds": 0.05}}}}


def committed(db: Path) -> dict[str, str]:
    with read_only(db) as conn:
        assert has_schema(conn)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return dict(conn.execute("SELECT task, phase FROM task_runs").fetchall())


def journal_counts(journal: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in journal.read_text().split() if journal.exists() else []:
        counts[line] = counts.get(line, 0) + 1
    return counts


def check_resumed_run(journal: Path, before: dict[str, str], ran_before: dict[str, int]) -> None:
    after = journal_counts(journal)
    assert sorted(after) == sorted(f"t{i:03d}" for i in range(TASKS)), "every task ran"
    succeeded = [task for task, phase in before.items() if phase == "Succeeded"]
    assert succeeded, "the disk filled before any task had committed its success"
    for task in succeeded:
        assert after[task] == ran_before[task], f"{task} ran again after committing Succeeded"


def test_run_local_on_a_full_filesystem_exits_4_and_resumes_intact(
    small_fs: Path, tmp_path: Path
) -> None:
    journal, manifest, db = tmp_path / "journal", tmp_path / "wf.yaml", small_fs / "site.db"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "tideflow.io/v1alpha1", "kind": "Workflow",
        "metadata": {"name": "heavy"}, "spec": heavy_spec(journal),
    }))  # fmt: skip
    command = [sys.executable, "-m", "edge_agent.cli", "run-local", str(manifest),
               "--db", str(db), "--quiet", "--concurrency", "4"]  # fmt: skip
    full = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert full.returncode == 4, (full.returncode, full.stderr[-2000:])
    assert "disk full" in full.stderr, full.stderr[-2000:]
    before, ran_before = committed(db), journal_counts(journal)
    grow(small_fs)
    again = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming run" in again.stdout
    check_resumed_run(journal, before, ran_before)
    assert set(committed(db).values()) == {"Succeeded"}


async def test_the_daemon_on_a_full_filesystem_exits_4_and_resumes_intact(
    small_fs: Path, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    journal, db = tmp_path / "journal", small_fs / "site.db"
    async with running_cloud(mosquitto.url) as cloud:
        agent = AgentProcess(SITE, mosquitto.url, db)
        agent.log_path = tmp_path / "agent.log"  # off the small filesystem
        agent.start()
        try:
            await until(lambda: cloud.bridge.presence.connected(SITE), 20, "the site online")
            cloud.assign(heavy_spec(journal), name="heavy")
            proc = agent.proc
            assert proc is not None
            await until(lambda: proc.poll() is not None, 60, "the agent to stop on a full disk")
            assert proc.returncode == 4, agent.log_tail()
            before, ran_before = committed(db), journal_counts(journal)
            grow(small_fs)
            agent.start()
            await until(lambda: cloud.view_phase("heavy") == "Succeeded", 120, "Succeeded")
            await converged(cloud, agent)
            check_resumed_run(journal, before, ran_before)
        finally:
            agent.kill()
