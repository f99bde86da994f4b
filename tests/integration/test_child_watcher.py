"""Every child's pidfd and pipes share one epoll set per event loop.

``edge_agent.child`` registers the descriptors of all of a loop's children in
one epoll set the loop watches as a single reader (no selector key and handle
per descriptor).  Proves, with real processes: children running at once, each
writing more than a pipe holds to both streams, are all read to their tails
and reaped with their own exit codes; an abort stops an attempt through the
``Abort`` future (no task waits on it); and a loop that ends takes its epoll
set with it: attempts run in many short-lived loops leave no descriptor open.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from pathlib import Path

from edge_agent.child import TAIL_BYTES, Child
from edge_agent.runner import Abort, AttemptRequest, ProcessRunner

_ENV = {"PATH": "/usr/bin:/bin"}


async def test_children_running_at_once_are_each_read_and_reaped() -> None:
    # 200 KB to each stream: more than a pipe holds, so each child blocks until
    # its own pipes are read.
    script = (
        "import os, sys; n = int(sys.argv[1]); chunk = (b'%d' % n) * 1000;"
        "[(os.write(1, chunk), os.write(2, chunk)) for _ in range(200)]; sys.exit(n)"
    )
    children = [Child.spawn([sys.executable, "-c", script, str(n)], "/", _ENV) for n in range(1, 7)]
    try:
        codes = await asyncio.wait_for(asyncio.gather(*(c.exited() for c in children)), 60)
        await asyncio.wait_for(asyncio.gather(*(c.drained() for c in children)), 60)
    finally:
        for child in children:
            child.close()
    assert codes == list(range(1, 7))
    for n, child in enumerate(children, start=1):
        for tail in (child.stdout.value(), child.stderr.value()):
            assert len(tail) == TAIL_BYTES
            assert tail == str(n).encode() * TAIL_BYTES


async def test_an_abort_stops_the_attempt_without_a_waiting_task(tmp_path: Path) -> None:
    abort = Abort()
    request = AttemptRequest(
        run_id="r",
        task="t",
        attempt=1,
        argv=["sleep", "30"],
        env={},
        working_dir=None,
        timeout=60,
        scratch=tmp_path / "ws",
        grace_seconds=5,
        abort=abort,
        on_started=lambda pid, start: asyncio.get_running_loop().call_soon(abort.set),
    )
    tasks_before = len(asyncio.all_tasks())
    result = await asyncio.wait_for(ProcessRunner(mark="m").run(request), 30)
    assert result.aborted and result.message == "stopped: process group killed"
    assert len(asyncio.all_tasks()) == tasks_before


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_loops_that_end_leave_no_descriptor_open() -> None:
    async def one() -> int:
        child = Child.spawn(["true"], "/", _ENV)
        code = await asyncio.wait_for(child.exited(), 30)
        await asyncio.wait_for(child.drained(), 30)
        child.close()
        return code

    assert asyncio.run(one()) == 0  # anything opened once per process is open now
    gc.collect()
    before = _open_descriptors()
    for _ in range(20):
        assert asyncio.run(one()) == 0
    gc.collect()
    assert _open_descriptors() == before
