"""The start time an attempt is checkpointed with is the kernel's, without reading /proc.

Recovery tells a live task process from a reused pid by the kernel's start
time (``kill_orphaned_group``).  The runner used to read ``/proc/<pid>/stat``
for it at every start; it now reads ``CLOCK_BOOTTIME`` around the start and,
when both readings fall in the same clock tick, takes that tick (checked once
against /proc per runner).  Proves, with real processes: whenever the clock
answers, the answer is /proc's and most starts get one; and every start time a
runner reports to ``on_started``, attempt after attempt, is the one /proc shows
for that process while it runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from edge_agent.child import Child
from edge_agent.runner import (
    AttemptRequest,
    ProcessRunner,
    bracketed_start_time,
    process_start_time,
)


async def test_the_clock_read_around_a_start_gives_the_kernels_start_time() -> None:
    # Every answer must be the kernel's; ten answers show the bracket is really used.  How
    # many starts fall within one tick depends on the load (8 of 40 under CI's), so it
    # starts until ten did, at most 400 times.
    answered = tries = 0
    while answered < 10 and tries < 400:
        tries += 1
        before = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        child = Child.spawn(["sleep", "5"], "/", {"PATH": "/usr/bin:/bin"})
        after = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        try:
            start = bracketed_start_time(before, after)
            if start is not None:
                answered += 1
                assert start == process_start_time(child.pid)
        finally:
            child.popen.kill()
            await child.exited()
            child.close()
    assert answered >= 10, f"only {answered} of {tries} starts fell within one clock tick"


async def test_every_reported_start_time_is_the_kernels(tmp_path: Path) -> None:
    runner = ProcessRunner(mark="m")
    reported: list[tuple[str | None, str | None]] = []

    def started(pid: int, start: str | None) -> None:
        reported.append((start, process_start_time(pid)))  # the process has not ended yet

    for attempt in range(1, 13):
        request = AttemptRequest(
            run_id="r",
            task="t",
            attempt=attempt,
            argv=["sleep", "0.02"],
            env={},
            working_dir=None,
            timeout=30,
            scratch=tmp_path / "ws",
            on_started=started,
        )
        result = await runner.run(request)
        assert result.ok, result
    assert len(reported) == 12
    assert all(start is not None and start == kernel for start, kernel in reported), reported
