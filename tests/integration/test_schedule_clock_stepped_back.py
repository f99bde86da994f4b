"""Schedules on a site whose clock read far ahead, then stepped back (round 20).

A bad RTC after a reboot reads a year ahead; the scheduler fires at those
future times and its high-water mark (the last scheduled time handled) moves
there.  Then NTP steps the clock back to the true time.  Real SQLite files,
real task processes; the scheduler's clock is its own injected one (the
machine's is never touched).  Proves:

* after the step back the schedule fires again at the corrected time's next
  slot (before: nothing fired until the clock read the mark again, a year),
  with a WARNING naming the schedule, its mark and the clock, and a restart
  keeps it so;
* a time that fired ahead never fires again when the true clock reaches it,
  across a kill -9 (a real process, fail point ``cron-fired``: the run
  committed, nothing else, so what records the fire is in the run's own
  transaction) and after the history limit pruned its run (the runs table
  alone cannot say what fired);
* after the step back a Forbid schedule skips while the run it fired ahead is
  still active, and an edit (a new generation, another run uid for the same
  time) keeps the moved mark and does not fire a time that fired ahead;
* a small step back (within the tolerance) is not treated as a step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from test_scheduler import T0, UID, Clock, Site, payload, run_until_killed

from edge_agent import scheduler as scheduler_module

AHEAD = T0 + 366 * 86400  # the bad RTC's reading: a year (and a day) ahead


def fired_times(fired: list[Any]) -> list[tuple[float, bool]]:
    return [(f.scheduled.timestamp(), f.created) for f in fired]


async def fired_ahead(site: Site, spec: dict[str, Any] | None = None) -> None:
    """Hold the schedule (received at T0, the true time) and fire it twice ahead."""
    assert await site.scheduler.on_message(payload(spec)) == "Held"
    assert fired_times(await site.scheduler.tick(AHEAD + 10.5)) == [(AHEAD + 10, True)]
    assert fired_times(await site.scheduler.tick(AHEAD + 20.5)) == [(AHEAD + 20, True)]
    await site.settle()


async def test_a_clock_stepped_back_fires_again_at_the_corrected_time_s_next_slot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = await Site(tmp_path, Clock(T0)).open()
    try:
        await fired_ahead(site)
        caplog.set_level(logging.WARNING, logger="edge_agent.scheduler")
        site.clock.now = T0 + 30.5  # NTP set it right
        assert await site.scheduler.tick(T0 + 30.5) == []
        (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
        text = warning.getMessage()
        assert "plant-7/etl" in text
        assert "2027-01-02T00:00:20" in text  # the mark
        assert "2026-01-01T00:00:30" in text  # the clock
        assert site.scheduler.next_fire(T0 + 30.5) == T0 + 40
    finally:
        await site.close()
    # A restart keeps it so: the mark stored is the corrected one.
    again = await Site(tmp_path, Clock(T0 + 40.5)).open()
    try:
        assert fired_times(await again.scheduler.tick(T0 + 40.5)) == [(T0 + 40, True)]
        assert fired_times(await again.scheduler.tick(T0 + 50.5)) == [(T0 + 50, True)]
        # A year on, the true clock reaches the times that fired ahead: never twice.
        assert fired_times(await again.scheduler.tick(AHEAD + 10.5)) == [(AHEAD + 10, False)]
        assert fired_times(await again.scheduler.tick(AHEAD + 20.5)) == [(AHEAD + 20, False)]
        assert fired_times(await again.scheduler.tick(AHEAD + 30.5)) == [(AHEAD + 30, True)]
        await again.settle()
        times = sorted(r.cron["scheduledTime"] for r in await again.runs())
        assert times == [T0 + 40, T0 + 50, AHEAD + 10, AHEAD + 20, AHEAD + 30]
    finally:
        await again.close()


async def test_a_small_step_back_is_not_a_step_and_fires_nothing_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = await Site(tmp_path, Clock(T0)).open()
    try:
        await site.scheduler.on_message(payload())
        assert fired_times(await site.scheduler.tick(T0 + 20.5)) == [(T0 + 20, True)]
        caplog.set_level(logging.WARNING, logger="edge_agent.scheduler")
        step = scheduler_module.CLOCK_STEP_SECONDS / 2
        assert await site.scheduler.tick(T0 + 20.5 - step) == []
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        (row,) = site.scheduler.schedules()
        assert row.last_scheduled == T0 + 20
        assert await site.scheduler.tick(T0 + 20.7) == []
        assert fired_times(await site.scheduler.tick(T0 + 30.5)) == [(T0 + 30, True)]
        await site.settle()
        assert [r.cron["scheduledTime"] for r in await site.runs()] == [T0 + 20, T0 + 30]
    finally:
        await site.close()


async def test_a_time_fired_ahead_whose_run_the_history_limit_pruned_never_fires_again(
    tmp_path: Path,
) -> None:
    site = await Site(tmp_path, Clock(T0)).open()
    try:
        await fired_ahead(site, {"successfulJobsHistoryLimit": 1})

        async def pruned() -> None:
            await site.settle()
            stats = await site.store.outbox_stats()
            assert stats.last_seq is not None
            await site.store.ack(stats.last_seq)  # the cloud has it all
            await site.store.prune(finished_before=0.0, history={UID: (1, 1)})

        await pruned()
        # Only the newest scheduled time's run is kept: AHEAD + 10's is gone.
        assert [r.cron["scheduledTime"] for r in await site.runs()] == [AHEAD + 20]
        assert await site.scheduler.tick(T0 + 30.5) == []  # stepped back
        assert fired_times(await site.scheduler.tick(T0 + 40.5)) == [(T0 + 40, True)]
        await pruned()
        assert [r.cron["scheduledTime"] for r in await site.runs()] == [AHEAD + 20]
        # The true clock reaches the times that fired ahead, their runs pruned or not.
        fired = await site.scheduler.tick(AHEAD + 10.5)
        assert fired_times(fired) == [(AHEAD + 10, False)]
        assert fired_times(await site.scheduler.tick(AHEAD + 20.5)) == [(AHEAD + 20, False)]
        assert fired_times(await site.scheduler.tick(AHEAD + 30.5)) == [(AHEAD + 30, True)]
        await site.settle()
        assert [r.cron["scheduledTime"] for r in await site.runs()] == [AHEAD + 20, AHEAD + 30]
    finally:
        await site.close()


# A site process that fires the schedule ahead (a year) at AHEAD + 10, then at
# AHEAD + 20 is killed (fail point "cron-fired", SIGKILL) once that run is
# committed: nothing after the run's own transaction happened.
FIRED_AHEAD_THEN_KILLED = """
import asyncio, sys
from pathlib import Path
sys.path[:0] = [sys.argv[2], str(Path(sys.argv[2]).parent)]
from test_scheduler import T0, Clock, Site, payload

AHEAD = T0 + 366 * 86400

async def main() -> None:
    site = await Site(Path(sys.argv[1]), Clock(T0)).open()
    await site.scheduler.on_message(payload({"successfulJobsHistoryLimit": 0}))
    await site.scheduler.tick(AHEAD + 10.5)
    await site.settle()
    await site.scheduler.tick(AHEAD + 20.5)  # killed at the fail point "cron-fired"
    print("not killed", flush=True)

asyncio.run(main())
"""


async def test_a_kill_after_a_fire_ahead_then_a_step_back_never_fires_a_time_twice(
    tmp_path: Path,
) -> None:
    await run_until_killed(FIRED_AHEAD_THEN_KILLED, tmp_path, "cron-fired@2")
    # Restarted after NTP set the clock right.
    site = await Site(tmp_path, Clock(T0 + 30.5)).open()
    try:
        site.tasks += [site.executor.start(run_id) for run_id in await site.executor.recover()]
        await site.settle()
        assert [r.cron["scheduledTime"] for r in await site.runs()] == [AHEAD + 10, AHEAD + 20]
        assert await site.scheduler.tick(T0 + 30.5) == []  # stepped back
        assert fired_times(await site.scheduler.tick(T0 + 40.5)) == [(T0 + 40, True)]
        await site.settle()
        stats = await site.store.outbox_stats()
        assert stats.last_seq is not None
        await site.store.ack(stats.last_seq)
        # The history limit (0) prunes every run: the killed fire's too.
        await site.store.prune(finished_before=0.0, history={UID: (0, 0)})
        assert await site.runs() == []
        fired = await site.scheduler.tick(AHEAD + 10.5)
        assert fired_times(fired) == [(AHEAD + 10, False)]
        assert fired_times(await site.scheduler.tick(AHEAD + 20.5)) == [(AHEAD + 20, False)]
        assert fired_times(await site.scheduler.tick(AHEAD + 30.5)) == [(AHEAD + 30, True)]
        await site.settle()
        assert [r.cron["scheduledTime"] for r in await site.runs()] == [AHEAD + 30]
    finally:
        await site.close()


async def test_after_a_step_back_forbid_sees_the_run_fired_ahead_and_an_edit_fires_nothing_twice(
    tmp_path: Path,
) -> None:
    site = await Site(tmp_path, Clock(T0)).open()
    try:
        slow = {"tasks": [{"name": "a", "command": ["sleep", "30"]}]}
        spec = {"concurrencyPolicy": "Forbid", "workflowSpec": slow}
        assert await site.scheduler.on_message(payload(spec)) == "Held"
        assert fired_times(await site.scheduler.tick(AHEAD + 10.5)) == [(AHEAD + 10, True)]
        assert await site.scheduler.tick(T0 + 30.5) == []  # stepped back
        # An edit (a new generation) keeps the moved mark and what fired.
        assert await site.scheduler.on_message(payload(spec, generation=2)) == "Held"
        (row,) = site.scheduler.schedules()
        assert row.generation == 2 and row.last_scheduled == T0 + 30.5
        # The run fired ahead is still active: Forbid skips the next slot.
        fired = await site.scheduler.tick(T0 + 40.5)
        assert [(f.scheduled.timestamp(), f.run_id) for f in fired] == [(T0 + 40, None)]
        (ahead,) = await site.runs()
        await site.executor.cancel(ahead.run_id, "test over")
        await site.settle()
        assert fired_times(await site.scheduler.tick(T0 + 50.5)) == [(T0 + 50, True)]
        # Generation 2 derives another uid for AHEAD + 10: still found, never fired again
        # (and not skipped as missed beside the active run of T0 + 50).
        fired = await site.scheduler.tick(AHEAD + 10.5)
        assert [(f.scheduled.timestamp(), f.created, f.run_id) for f in fired] == [
            (AHEAD + 10, False, ahead.run_id)
        ]
        runs = await site.runs()
        assert sorted(r.cron["scheduledTime"] for r in runs) == [T0 + 50, AHEAD + 10]
        for run in await site.store.schedule_runs(UID, unfinished=True):
            await site.executor.cancel(run.run_id, "test over")
        await site.settle()
    finally:
        await site.close()
