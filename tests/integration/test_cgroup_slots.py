"""Attempts run in reusable cgroup slots that record their attempt (issue 15).

Making and removing a cgroup per attempt (``mkdir``, ``rmdir``, opening the new
cgroup's ``cgroup.procs``) was most of what a ``true`` task cost above a bare
spawn with cgroups.  The runner keeps a pool of cgroups instead (``slot-<k>``
under the scope's root, one per attempt running at once) and records the
attempt on its slot as a user xattr while it runs: what the per-attempt
cgroup's name told a restarted agent.  Proves, with real cgroups (root on a
cgroup v2 host) and real agent processes: a chain of attempts runs in one slot;
the slot holds the running attempt's id and not the finished one's; a
grandchild that left the process group is killed before the outcome is
reported and the slot serves the next attempt; an agent killed mid-attempt is
followed by one that finds the attempt through the slot's xattr alone
(``TIDEFLOW_ATTEMPT`` increases, its orphan is killed); recovery also reads the
per-attempt cgroups an agent of the previous version left.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from services.agent import wait_for
from services.tiers import machine_lacks

from edge_agent.runner import (
    AttemptRequest,
    CgroupScope,
    OrphanAttempt,
    ProcessRunner,
    agent_mark,
    reap_orphans,
)

XATTR = "user.tideflow.attempt"


def _scope(tmp_path: Path) -> CgroupScope:
    scope = CgroupScope.detect(agent_mark(tmp_path / "agent.work"))
    if scope is None or scope.home is None:
        machine_lacks("a writable cgroup v2 subtree")
    if not scope.slots:
        machine_lacks("user xattrs on cgroup v2 (Linux 5.7+)")
    return scope


@pytest.fixture
def scope(tmp_path: Path) -> Iterator[CgroupScope]:
    scope = _scope(tmp_path)
    yield scope
    scope.remove_root()
    if scope.root.exists():  # a test failed midway: leave nothing running
        for child in scope.root.iterdir():
            if child.is_dir():
                scope.destroy(child)
        with contextlib.suppress(OSError):
            scope.root.rmdir()


def _request(tmp_path: Path, task: str, script: str, attempt: int = 1) -> AttemptRequest:
    return AttemptRequest(
        run_id="r",
        task=task,
        attempt=attempt,
        argv=["sh", "-c", script],
        env={},
        working_dir=None,
        timeout=30,
        scratch=tmp_path / "ws",
    )


def _cgroup_of(stdout: bytes) -> str:
    return next(line for line in stdout.decode().splitlines() if line.startswith("0::"))


def _recorded(path: Path) -> str | None:
    try:
        return os.getxattr(path, XATTR).decode()
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def _children(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_a_chain_of_attempts_runs_in_one_slot(tmp_path: Path, scope: CgroupScope) -> None:
    runner = ProcessRunner(mark="m", cgroups=scope)
    for task in ("a", "b", "c", "d"):
        result = await runner.run(_request(tmp_path, task, "cat /proc/self/cgroup"))
        assert result.ok, result
        assert _cgroup_of(result.logs["stdout"]).endswith(f"/{scope.root.name}/slot-0")
        # No cgroup made or removed per attempt: the one slot stays, with no attempt.
        assert _children(scope.root) == ["slot-0"]
        assert _recorded(scope.root / "slot-0") is None


async def test_attempts_running_at_once_get_a_slot_each(tmp_path: Path, scope: CgroupScope) -> None:
    runner = ProcessRunner(mark="m", cgroups=scope)
    gate = tmp_path / "go"
    script = f'cat /proc/self/cgroup; while [ ! -e "{gate}" ]; do sleep 0.01; done'
    runs = [asyncio.ensure_future(runner.run(_request(tmp_path, t, script))) for t in "abc"]
    wait = 0.0
    while len(_children(scope.root)) < 3 and wait < 10:
        await asyncio.sleep(0.02)
        wait += 0.02
    assert _children(scope.root) == ["slot-0", "slot-1", "slot-2"]
    assert sorted(_recorded(scope.root / f"slot-{k}") or "" for k in range(3)) == [
        "m/r/a/1",
        "m/r/b/1",
        "m/r/c/1",
    ]
    gate.touch()
    results = await asyncio.gather(*runs)
    assert all(result.ok for result in results), results
    assert sorted(_cgroup_of(r.logs["stdout"]).rsplit("/", 1)[1] for r in results) == [
        "slot-0",
        "slot-1",
        "slot-2",
    ]
    assert [_recorded(scope.root / f"slot-{k}") for k in range(3)] == [None, None, None]
    # The next attempt takes a slot already made.
    result = await runner.run(_request(tmp_path, "d", "cat /proc/self/cgroup"))
    assert result.ok and _children(scope.root) == ["slot-0", "slot-1", "slot-2"], result


async def test_the_slot_holds_the_running_attempts_id_and_not_after(
    tmp_path: Path, scope: CgroupScope
) -> None:
    runner = ProcessRunner(mark="m", cgroups=scope)
    seen, gate = tmp_path / "seen", tmp_path / "go"
    script = f'cat /proc/self/cgroup > "{seen}"; while [ ! -e "{gate}" ]; do sleep 0.01; done'
    running = asyncio.ensure_future(runner.run(_request(tmp_path, "t", script, attempt=3)))
    wait = 0.0
    while not (seen.exists() and seen.read_text()) and wait < 10:
        await asyncio.sleep(0.02)
        wait += 0.02
    slot = scope.root / _cgroup_of(seen.read_bytes()).rsplit("/", 1)[1]
    assert slot.name == "slot-0"
    assert _recorded(slot) == "m/r/t/3", "the running attempt is not recorded on its slot"
    gate.touch()
    result = await running
    assert result.ok, result
    assert _recorded(slot) is None, "a finished attempt is still recorded on its slot"


async def test_an_escaped_grandchild_is_killed_before_the_outcome_and_the_slot_reused(
    tmp_path: Path, scope: CgroupScope
) -> None:
    runner = ProcessRunner(mark="m", cgroups=scope)
    pids = tmp_path / "pids"
    escape = (
        f"setsid sh -c 'echo $$ > \"{pids}\"; exec sleep 300' & "
        f'while [ ! -s "{pids}" ]; do sleep 0.01; done; cat /proc/self/cgroup'
    )
    result = await runner.run(_request(tmp_path, "e", escape))
    assert result.ok, result
    grandchild = int(pids.read_text().split()[0])
    # Dead by the time the outcome is reported, not some time after.
    assert not pid_alive(grandchild), "the setsid grandchild outlived its attempt"
    assert _cgroup_of(result.logs["stdout"]).endswith("/slot-0")
    assert _recorded(scope.root / "slot-0") is None
    result = await runner.run(_request(tmp_path, "next", "cat /proc/self/cgroup"))
    assert result.ok and _cgroup_of(result.logs["stdout"]).endswith("/slot-0"), result
    assert _children(scope.root) == ["slot-0"]


def _hold(cgroup: Path) -> subprocess.Popen[bytes]:
    """A process (without the attempt mark) moved into ``cgroup``."""
    proc = subprocess.Popen(
        ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec sleep 300'],
        env={"PATH": os.environ["PATH"]},
        start_new_session=True,
    )
    wait_for(
        lambda: str(proc.pid) in (cgroup / "cgroup.procs").read_text().split(),
        10,
        f"a process in {cgroup.name}",
    )
    return proc


def test_recovery_reads_slots_and_the_cgroups_of_the_previous_version(tmp_path: Path) -> None:
    mark = agent_mark(tmp_path / "agent.work")
    scope = _scope(tmp_path)
    root = scope.root
    root.mkdir()
    made = {
        "slot-0": f"{mark}/run-1/a/3",  # an attempt that was running
        "slot-1": None,  # a slot with no attempt: nothing started in it
        "slot-2": "elsewhere/run-1/b/1",  # another agent's mark: not ours to count
        f"{mark}:run-1:old:2": None,  # a per-attempt cgroup of the previous version
    }
    procs = []
    try:
        for name, attempt in made.items():
            (root / name).mkdir()
            if attempt is not None:
                os.setxattr(root / name, XATTR, attempt.encode())
            procs.append(_hold(root / name))
        found = reap_orphans(mark, scope)
        assert sorted(found, key=lambda o: o.task) == [
            OrphanAttempt("run-1", "a", 3),
            OrphanAttempt("run-1", "old", 2),
        ]
        for proc in procs:
            assert proc.wait(10) == -9
        assert not root.exists(), "recovery left cgroups behind"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for name in made:
            with contextlib.suppress(OSError):
                (root / name).rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()


def _mount() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if " - cgroup2 " in line:
            return Path(line.split()[4])
    raise AssertionError("no cgroup v2 mount")


def test_an_attempt_interrupted_by_a_crash_is_found_through_its_slot(tmp_path: Path) -> None:
    """kill -9 of the agent by its task's first acts; only the slot's xattr is left.

    The task removes the run's ``starts`` note, leaves a grandchild with no
    attempt mark (``setsid env -i``) and kills the agent before its Running
    checkpoint; the restarted agent learns of the attempt from the slot alone.
    """
    _scope(tmp_path)
    journal, pids = tmp_path / "journal", tmp_path / "pids"
    db, manifest = tmp_path / "site.db", tmp_path / "wf.yaml"
    first = (
        'echo "start $TIDEFLOW_ATTEMPT $TIDEFLOW_ATTEMPT_ID $(grep ^0:: /proc/self/cgroup)" '
        '>> "$J"; '
        'if [ "$TIDEFLOW_ATTEMPT" = 1 ]; then '
        "rm -f .tideflow/starts; "
        'setsid env -i sh -c \'echo $$ > "$0"; exec sleep 300\' "$P" & '
        'while [ ! -s "$P" ]; do sleep 0.01; done; kill -9 "$PPID"; fi'
    )
    spec = {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "crash", "namespace": "default"},
        "spec": {
            "tasks": [{"name": "t", "script": first, "env": {"J": str(journal), "P": str(pids)}}]
        },
    }
    manifest.write_text(yaml.safe_dump(spec))
    argv = [sys.executable, "-m", "edge_agent.cli", "run-local", str(manifest), "--db", str(db)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
    grandchild = 0
    try:
        crashed = subprocess.run(
            [*argv, "--quiet"], capture_output=True, text=True, timeout=60, env=env
        )
        assert crashed.returncode == -9, crashed.stdout + crashed.stderr
        grandchild = int(pids.read_text().split()[0])
        (start,) = (line.split() for line in journal.read_text().splitlines())
        assert start[1] == "1"
        slot = _mount() / start[3].removeprefix("0::/")
        assert slot.name.startswith("slot-"), slot
        assert _recorded(slot) == start[2], "the attempt is not recorded on its slot"
        again = subprocess.run(
            [*argv, "--quiet"], capture_output=True, text=True, timeout=60, env=env
        )
        assert again.returncode == 0, again.stdout + again.stderr
        assert not pid_alive(grandchild), "the orphan of the interrupted attempt survived"
        attempts = [line.split()[1] for line in journal.read_text().splitlines()]
        assert attempts == ["1", "2"], attempts  # TIDEFLOW_ATTEMPT increased
    finally:  # a failed check may leave the (last) grandchild running
        for pid in {grandchild, *(int(p) for p in pids.read_text().split() if pids.exists())}:
            if pid and pid_alive(pid):
                os.kill(pid, 9)


def test_an_agent_that_ends_leaves_no_slot_behind(tmp_path: Path) -> None:
    """``run-local`` ends right after its run, before the idle root's timer: its
    slots (and the root) go with it, rather than wait for the next agent's recovery."""
    _scope(tmp_path)
    seen, db, manifest = tmp_path / "seen", tmp_path / "site.db", tmp_path / "wf.yaml"
    tasks = [
        {"name": f"t{i}", "script": f'grep ^0:: /proc/self/cgroup >> "{seen}"; sleep 0.2'}
        for i in range(3)
    ]
    spec = {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "ends", "namespace": "default"},
        "spec": {"tasks": tasks},
    }
    manifest.write_text(yaml.safe_dump(spec))
    argv = [sys.executable, "-m", "edge_agent.cli", "run-local", str(manifest), "--db", str(db)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
    done = subprocess.run(
        [*argv, "--quiet", "--concurrency", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    slots = {_mount() / line.removeprefix("0::/") for line in seen.read_text().split()}
    assert len(slots) == 3 and all(slot.name.startswith("slot-") for slot in slots), slots
    (root,) = {slot.parent for slot in slots}
    assert not root.exists(), f"left behind: {_children(root)}"


async def test_a_free_slot_removed_under_the_agent_is_not_used(
    tmp_path: Path, scope: CgroupScope
) -> None:
    """Another agent's recovery on the same mark removes every empty cgroup under
    the root, free slots included: the next attempt still runs in a slot."""
    runner = ProcessRunner(mark="m", cgroups=scope)
    result = await runner.run(_request(tmp_path, "a", "cat /proc/self/cgroup"))
    assert result.ok and _children(scope.root) == ["slot-0"], result
    (scope.root / "slot-0").rmdir()
    result = await runner.run(_request(tmp_path, "b", "cat /proc/self/cgroup"))
    assert result.ok, result
    assert _cgroup_of(result.logs["stdout"]).endswith(f"/{scope.root.name}/slot-0")
    assert _children(scope.root) == ["slot-0"]
