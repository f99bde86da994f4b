"""Schedules and the link against a hostile tester (round 19).

Each test here started as a reproduction of a defect, with real parts: real
SQLite files, real task processes; the scheduler's clock is its own injected
one (the machine's is never touched).  Proves:

* a kill between a fire's run and the schedule's mark, then an edit of the
  schedule (a new generation, delivered while the site was down or re-sent
  by the cloud) before the next tick: the time that fired does not fire again
  under the new generation (its run uid differs, so the executor took it for
  a new run: two runs of one scheduled time under Allow, and under Forbid the
  time was counted missed though it ran);
* a schedule received while the site's clock read ahead (a year), the clock
  then stepped back (NTP, an RTC set right): it fires on the clock as it now
  reads; its receipt time was its mark, and nothing fired until the clock
  read that again;
* a Replace schedule's site killed (SIGKILL, a real process) right after the
  fire that replaced a run, before that run's end committed (its task slow to
  stop): the replaced run is cancelled after the restart; the request was held
  in its driver's memory only, so the run resumed and ran on beside its
  successor (and the same for a cancel from the cloud, until it was re-sent).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from test_scheduler import T0, Clock, Site, payload, run_until_killed


async def killed_before_the_mark(tmp_path: Path, tick_at: float, spec: dict[str, Any]) -> Site:
    """A site holding the schedule ``spec`` (generation 1), killed at its tick at
    ``tick_at`` after the fire's run was committed and before the schedule's mark
    moved; then opened again on the same database (the caller closes it)."""
    clock = Clock(T0)
    first = await Site(tmp_path, clock).open()
    await first.scheduler.on_message(payload(spec))

    async def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed before the high-water mark moved")

    first.store.advance_schedule = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await first.scheduler.tick(tick_at)
    await first.settle()
    await first.close()
    return await Site(tmp_path, clock).open()


async def test_an_edit_after_a_kill_before_the_mark_does_not_fire_the_time_again(
    tmp_path: Path,
) -> None:
    for policy in ("Allow", "Forbid", "Replace"):
        where = tmp_path / policy
        where.mkdir()
        spec = {"concurrencyPolicy": policy}
        second = await killed_before_the_mark(where, T0 + 10.5, spec)
        try:
            # The edit (generation 2) arrives before the restarted agent's first tick.
            assert await second.scheduler.on_message(payload(spec, generation=2)) == "Held"
            fired = await second.scheduler.tick(T0 + 11)
            assert [(f.scheduled.timestamp(), f.created) for f in fired] == [(T0 + 10, False)]
            assert all(f.run_id is not None for f in fired)
            fired = await second.scheduler.tick(T0 + 20.5)  # generation 2's own next time
            assert [(f.scheduled.timestamp(), f.created) for f in fired] == [(T0 + 20, True)]
            await second.settle()
            runs = await second.runs()
            assert sorted(r.cron["scheduledTime"] for r in runs) == [T0 + 10, T0 + 20], policy
            (row,) = second.scheduler.schedules()
            assert row.missed_count == 0, policy
        finally:
            await second.close()


async def test_a_schedule_received_before_the_clock_stepped_back_fires_on_the_new_time(
    tmp_path: Path,
) -> None:
    # The site's clock read a year ahead when the schedule arrived; then NTP set it right.
    ahead = T0 + 366 * 86400
    site = await Site(tmp_path, Clock(ahead)).open()
    try:
        assert await site.scheduler.on_message(payload()) == "Held"
        site.clock.now = T0
        assert await site.scheduler.tick(T0 + 0.5) == []
        fired = await site.scheduler.tick(T0 + 10.5)
        assert [(f.scheduled.timestamp(), f.created) for f in fired] == [(T0 + 10, True)]
        fired = await site.scheduler.tick(T0 + 20.5)
        assert [(f.scheduled.timestamp(), f.created) for f in fired] == [(T0 + 20, True)]
        nxt = site.scheduler.next_fire(T0 + 20.5)
        assert nxt == T0 + 30
        await site.settle()
        (row,) = site.scheduler.schedules()
        assert row.missed_count == 0
    finally:
        await site.close()
    # A restart keeps it so: the stored mark is on the site's clock as it now reads.
    again = await Site(tmp_path, Clock(T0 + 30.5)).open()
    try:
        fired = await again.scheduler.tick(T0 + 30.5)
        assert [(f.scheduled.timestamp(), f.created) for f in fired] == [(T0 + 30, True)]
        await again.settle()
    finally:
        await again.close()


# A site process that fires a Replace schedule at T0+10 (a task slow to stop), then
# at T0+20 replaces that run, and is killed (fail point) once the new run is
# committed: before the schedule's mark moves, and before the old run's end.
REPLACE_THEN_KILLED = """
import asyncio, sys
from pathlib import Path
sys.path[:0] = [sys.argv[2], str(Path(sys.argv[2]).parent)]
from test_scheduler import T0, Clock, Site, payload

async def main() -> None:
    site = await Site(Path(sys.argv[1]), Clock(T0)).open()
    # A task that takes its time to stop (its TERM is ignored): its run ends
    # (Cancelled) only after the grace, well after the new run is committed.
    task = {"name": "a", "command": ["sh", "-c", "trap '' TERM; sleep 2"]}
    spec = {"concurrencyPolicy": "Replace", "workflowSpec": {"tasks": [task]}}
    await site.scheduler.on_message(payload(spec))
    await site.scheduler.tick(T0 + 10.5)
    await asyncio.sleep(0.5)  # the first run's task is running
    site.executor.grace_seconds = 3.0
    await site.scheduler.tick(T0 + 20.5)  # killed at the fail point "cron-fired"
    print("not killed", flush=True)

asyncio.run(main())
"""


async def test_a_replace_killed_right_after_its_fire_still_ends_the_replaced_run(
    tmp_path: Path,
) -> None:
    await run_until_killed(REPLACE_THEN_KILLED, tmp_path, "cron-fired@2")
    await asyncio.sleep(2.5)  # the orphaned task ends by itself
    site = await Site(tmp_path, Clock(T0 + 21)).open()
    try:
        runs = await site.runs()
        assert [r.cron["scheduledTime"] for r in runs] == [T0 + 10, T0 + 20]
        # The replaced run's cancellation was asked for before its successor was made.
        assert runs[0].cancel_requested or runs[0].phase == "Cancelled"
        site.tasks += [site.executor.start(run_id) for run_id in await site.executor.recover()]
        fired = await site.scheduler.tick(T0 + 21)  # the mark did not move: found held
        assert [(f.scheduled.timestamp(), f.created) for f in fired] == [(T0 + 20, False)]
        await site.settle()
        phases = [r.phase for r in await site.runs()]
        assert phases == ["Cancelled", "Succeeded"]
    finally:
        await site.close()
