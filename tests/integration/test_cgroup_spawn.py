"""An attempt is born in its cgroup, and the agent is never left in one (issue 15).

The runner moves the agent into the attempt's cgroup, starts the process with
``vfork`` (the child is born there) and moves the agent back: no ``preexec_fn``,
so Python does not fork the whole agent.  Proves, with real cgroups (a
writable cgroup v2 subtree: root on a cgroup v2 host): the task's process reads
its own attempt cgroup; the agent (this process) is back in its own cgroup
after every start, and its threads with it; the cgroup is freed after the
attempt (a slot's record of it removed, or the attempt's own cgroup where
there are no slots: decision 0043); the scope's root stays while attempts
come and go (removing and making it again per attempt cost two more cgroup
operations per task of a chain) and is removed once the agent is idle; and
if the agent cannot move back, that cgroup is never killed nor removed nor
reused (the agent is in it) and later attempts join theirs from the child.
Each test runs with slots and with a cgroup per attempt.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path

import pytest
from services.cloud import until
from services.tiers import machine_lacks

from edge_agent.runner import AttemptRequest, CgroupScope, ProcessRunner, agent_mark


def _own_cgroup() -> str:
    return next(
        line for line in Path("/proc/self/cgroup").read_text().splitlines() if line[:3] == "0::"
    )


def _thread_cgroups() -> set[str]:
    return {
        next(line for line in (task / "cgroup").read_text().splitlines() if line[:3] == "0::")
        for task in Path("/proc/self/task").iterdir()
    }


def _scope(tmp_path: Path, slots: bool) -> CgroupScope:
    scope = CgroupScope.detect(agent_mark(tmp_path / "agent.work"))
    if scope is None or scope.home is None:
        machine_lacks("a writable cgroup v2 subtree")
    if slots and not scope.slots:
        machine_lacks("user xattrs on cgroup v2 (Linux 5.7+)")
    scope.slots = slots
    return scope


def _cgroup(task: str, slots: bool, slot: int = 0) -> str:
    """The name of the cgroup attempt 1 of ``task`` runs in."""
    return f"slot-{slot}" if slots else f"m:r:{task}:1"


def _freed(scope: CgroupScope, task: str, slots: bool) -> bool:
    """Whether attempt 1 of ``task`` left no cgroup or record behind."""
    if not slots:
        return not (scope.root / f"m:r:{task}:1").exists()
    try:
        os.getxattr(scope.root / "slot-0", "user.tideflow.attempt")
    except OSError as exc:
        return exc.errno == errno.ENODATA
    return False


SLOTS = pytest.mark.parametrize("slots", [True, False], ids=["slots", "per-attempt"])


def _request(tmp_path: Path, task: str) -> AttemptRequest:
    return AttemptRequest(
        run_id="r",
        task=task,
        attempt=1,
        argv=["cat", "/proc/self/cgroup"],
        env={},
        working_dir=None,
        timeout=30,
        scratch=tmp_path / "ws",
    )


@SLOTS
async def test_an_attempt_is_born_in_its_cgroup_and_the_agent_moves_back(
    tmp_path: Path, slots: bool
) -> None:
    scope = _scope(tmp_path, slots)
    runner = ProcessRunner(mark="m", cgroups=scope)
    mine = _own_cgroup()
    idle = threading.Event()
    helper = threading.Thread(target=idle.wait)  # a thread of the agent's besides the loop's
    helper.start()
    try:
        for task in ("a", "b"):
            result = await runner.run(_request(tmp_path, task))
            assert result.ok, result
            line = next(
                ln for ln in result.logs["stdout"].decode().splitlines() if ln.startswith("0::")
            )
            assert line.endswith(f"/{scope.root.name}/{_cgroup(task, slots)}"), line
            assert _own_cgroup() == mine
            assert _thread_cgroups() == {mine}
            assert _freed(scope, task, slots), "the attempt's cgroup stays"
    finally:
        idle.set()
        helper.join(5)


@SLOTS
async def test_the_root_stays_between_attempts_and_goes_when_idle(
    tmp_path: Path, slots: bool
) -> None:
    scope = _scope(tmp_path, slots)
    runner = ProcessRunner(mark="m", cgroups=scope)
    try:
        for task in ("a", "b", "c"):
            result = await runner.run(_request(tmp_path, task))
            assert result.ok, result
            assert _freed(scope, task, slots), "the attempt's cgroup stays"
            assert scope.root.is_dir(), "the root was removed while attempts came and went"
        await until(lambda: not scope.root.exists(), 10, "the idle root to be removed")
        # And the next attempt makes it again.
        result = await runner.run(_request(tmp_path, "d"))
        assert result.ok and f"/{_cgroup('d', slots)}\n".encode() in result.logs["stdout"]
    finally:
        scope.remove_root()


@SLOTS
async def test_a_cgroup_the_agent_could_not_leave_is_never_killed(
    tmp_path: Path, slots: bool
) -> None:
    scope = _scope(tmp_path, slots)
    home = scope.home
    assert home is not None
    runner = ProcessRunner(mark="m", cgroups=scope)
    scope.home = tmp_path  # not a cgroup: moving back there fails
    stuck = scope.root / _cgroup("stuck", slots)
    later = scope.root / _cgroup("later", slots, slot=1)
    try:
        result = await runner.run(_request(tmp_path, "stuck"))
        assert result.ok, result
        assert scope.stuck == stuck and scope.home is None
        assert _own_cgroup().endswith(f"/{stuck.name}"), "the agent is in the attempt's cgroup"
        assert stuck.is_dir(), "a cgroup holding the agent was removed (or killed)"
        if slots:  # not reused, and a restart still finds its attempt
            assert os.getxattr(stuck, "user.tideflow.attempt") == b"m/r/stuck/1"
        # Later attempts join their cgroups from the child, and are held as before.
        result = await runner.run(_request(tmp_path, "later"))
        assert result.ok and f"/{later.name}\n".encode() in result.logs["stdout"], result
        assert _own_cgroup().endswith(f"/{stuck.name}")
    finally:
        fd = os.open(home / "cgroup.procs", os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
        for cgroup in (stuck, later):
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        scope.remove_root()
