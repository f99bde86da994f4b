"""Schedules on a site whose clock stepped back, against a hostile tester (round 20).

Decision 0047 moved a schedule's mark back when the site's clock steps back
and keeps a record of the times fired, so that no time fires twice.  Real
SQLite files, real task processes; the scheduler's clock is its own injected
one (the machine's is never touched).  Proves:

* a schedule withdrawn and delivered again (same uid) after a step back does
  not fire again a time that fired while the clock read ahead, its run pruned
  by the history limit: the withdrawal dropped the whole fired record, and
  the true clock fired those times a second time (decision 0049);
* a clock that steps ahead, back, ahead and back again around the mark fires
  every time once, and none twice;
* many schedules stepped back at once each move their own mark;
* a Replace schedule whose run fired ahead is still running when the clock
  steps back, the process then killed (SIGKILL, a real process): after the
  restart the corrected clock's next slot replaces that run once, and the
  time it fired for, reached by the true clock, is held, not fired again;
* a step back takes back the misses the jump ahead counted above the
  corrected clock (a year of them, kept for ever; they now fire as the clock
  reaches them): the count and the record say only the times truly missed;
* a run fired while the clock read ahead and still running when it steps back
  ends at its deadline (`deadlineSeconds`, from when the step is noticed): it
  kept the deadline set from the clock reading ahead, and ran on past it up to
  a year (decision 0049).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from test_scheduler import T0, UID, Clock, Site, payload, run_until_killed

from edge_agent import executor as executor_module

AHEAD = T0 + 366 * 86400  # a bad RTC's reading: a year (and a day) ahead


def fired_times(fired: list[Any]) -> list[tuple[float, bool]]:
    return [(f.scheduled.timestamp(), f.created) for f in fired]


async def acked_and_pruned(site: Site, history: dict[str, tuple[int, int]]) -> None:
    await site.settle()
    stats = await site.store.outbox_stats()
    assert stats.last_seq is not None
    await site.store.ack(stats.last_seq)  # the cloud has it all
    await site.store.prune(finished_before=0.0, history=history)


async def test_a_schedule_withdrawn_and_delivered_again_after_a_step_back_fires_nothing_twice(
    tmp_path: Path,
) -> None:
    clock = Clock(T0)
    site = await Site(tmp_path, clock).open()
    try:
        spec = {"successfulJobsHistoryLimit": 0}
        assert await site.scheduler.on_message(payload(spec)) == "Held"
        assert fired_times(await site.scheduler.tick(AHEAD + 10.5)) == [(AHEAD + 10, True)]
        await acked_and_pruned(site, {UID: (0, 0)})
        assert await site.runs() == []  # the history limit (0) pruned the run fired ahead
        clock.now = T0 + 30.5  # NTP set it right
        assert await site.scheduler.tick() == []
        # Placed elsewhere and back (a relabel), or deleted and restored with its uid.
        clock.now = T0 + 31
        assert await site.scheduler.on_message(payload(spec, action="withdraw")) == "Withdrawn"
        clock.now = T0 + 32
        assert await site.scheduler.on_message(payload(spec)) == "Held"
        assert fired_times(await site.scheduler.tick(T0 + 40.5)) == [(T0 + 40, True)]
        # A year on, the true clock reaches the time that fired ahead: never twice.
        clock.now = AHEAD + 10.5
        assert fired_times(await site.scheduler.tick()) == [(AHEAD + 10, False)]
        clock.now = AHEAD + 20.5
        assert fired_times(await site.scheduler.tick()) == [(AHEAD + 20, True)]
        await site.settle()
        times = sorted(r.cron["scheduledTime"] for r in await site.runs())
        assert times == [T0 + 40, AHEAD + 20]
    finally:
        await site.close()


class SteppedTime:
    """The executor's ``time`` module with a wall clock the test steps (real + offset)."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


async def test_a_run_fired_ahead_still_running_when_the_clock_steps_back_keeps_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = SteppedTime(366 * 86400)  # the RTC read a year ahead
    monkeypatch.setattr(executor_module, "time", clock)
    site = await Site(tmp_path, Clock(T0)).open()
    try:
        slow = {"deadlineSeconds": 2, "tasks": [{"name": "a", "command": ["sleep", "20"]}]}
        assert await site.scheduler.on_message(payload({"workflowSpec": slow})) == "Held"
        assert fired_times(await site.scheduler.tick(AHEAD + 10.5)) == [(AHEAD + 10, True)]
        (run,) = await site.runs()
        for _ in range(100):  # started (its deadline set from the clock that read ahead)
            if (await site.store.load_run(run.run_id))[0].phase == "Running":
                break
            await asyncio.sleep(0.05)
        caplog.set_level(logging.WARNING, logger="edge_agent.executor")
        clock.offset = 0.0  # NTP set it right, the run still running
        started = time.monotonic()
        # Its deadline (2 s) still ends it: not a year from now, nor when its task ends.
        await asyncio.wait_for(asyncio.gather(*site.tasks, return_exceptions=True), 12)
        assert time.monotonic() - started < 10
        ended, _ = await site.store.load_run(run.run_id)
        assert (ended.phase, ended.reason) == ("Failed", "DeadlineExceeded")
        assert any("stepped back" in r.getMessage() for r in caplog.records)
    finally:
        await site.close()


async def test_a_clock_stepping_ahead_and_back_repeatedly_fires_every_time_once(
    tmp_path: Path,
) -> None:
    site = await Site(tmp_path, Clock(T0)).open()
    try:
        assert await site.scheduler.on_message(payload()) == "Held"
        assert fired_times(await site.scheduler.tick(AHEAD + 10.5)) == [(AHEAD + 10, True)]
        assert await site.scheduler.tick(T0 + 30.5) == []  # back
        assert fired_times(await site.scheduler.tick(T0 + 40.5)) == [(T0 + 40, True)]
        # Ahead again (the RTC again): the latest time fires, AHEAD + 10 not again.
        assert fired_times(await site.scheduler.tick(AHEAD + 20.5)) == [(AHEAD + 20, True)]
        assert await site.scheduler.tick(T0 + 60.5) == []  # back again
        assert fired_times(await site.scheduler.tick(T0 + 70.5)) == [(T0 + 70, True)]
        # A small step around the mark is no step: nothing moves, nothing fires.
        assert await site.scheduler.tick(T0 + 69) == []
        assert fired_times(await site.scheduler.tick(T0 + 80.5)) == [(T0 + 80, True)]
        await site.settle()
        # Each step back was reported to the cloud, naming the mark it moved from.
        records = [r for r in await site.schedule_records() if "clockSteppedBackFrom" in r]
        assert [(r["clockSteppedBackFrom"], r["lastScheduledTime"]) for r in records] == [
            (AHEAD + 10, T0 + 30.5),
            (AHEAD + 20, T0 + 60.5),
        ]
        await acked_and_pruned(site, {UID: (0, 0)})  # every run pruned: the record alone
        # The true clock reaches the times that fired ahead: each held, none twice.
        assert fired_times(await site.scheduler.tick(AHEAD + 10.5)) == [(AHEAD + 10, False)]
        assert fired_times(await site.scheduler.tick(AHEAD + 20.5)) == [(AHEAD + 20, False)]
        assert fired_times(await site.scheduler.tick(AHEAD + 30.5)) == [(AHEAD + 30, True)]
        await site.settle()
        assert [r.cron["scheduledTime"] for r in await site.runs()] == [AHEAD + 30]
    finally:
        await site.close()


async def test_many_schedules_stepped_back_at_once_each_move_their_own_mark(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = await Site(tmp_path, Clock(T0)).open()
    uids = [f"cwf-{i:03d}" for i in range(60)]
    try:
        for uid in uids:
            assert await site.scheduler.on_message(payload(uid=uid)) == "Held"
        fired = await site.scheduler.tick(AHEAD + 10.5)
        assert sorted(f.schedule_uid for f in fired if f.created) == uids
        await site.settle()
        caplog.set_level(logging.WARNING, logger="edge_agent.scheduler")
        assert await site.scheduler.tick(T0 + 30.5) == []
        assert len([r for r in caplog.records if "stepped back" in r.getMessage()]) == len(uids)
        assert {row.last_scheduled for row in site.scheduler.schedules()} == {T0 + 30.5}
        fired = await site.scheduler.tick(T0 + 40.5)
        assert sorted((f.schedule_uid, f.scheduled.timestamp(), f.created) for f in fired) == [
            (uid, T0 + 40, True) for uid in uids
        ]
        await site.settle()
        fired = await site.scheduler.tick(AHEAD + 10.5)
        assert {(f.scheduled.timestamp(), f.created) for f in fired} == {(AHEAD + 10, False)}
        assert len(fired) == len(uids)
    finally:
        await site.close()


# A Replace site process: fires a slow run a year ahead, the clock steps back (the
# mark moves back, committed), then the process is killed (SIGKILL) with that run
# still running.
REPLACE_AHEAD_THEN_KILLED = """
import asyncio, os, signal, sys
from pathlib import Path
sys.path[:0] = [sys.argv[2], str(Path(sys.argv[2]).parent)]
from test_scheduler import T0, Clock, Site, payload

AHEAD = T0 + 366 * 86400

async def main() -> None:
    site = await Site(Path(sys.argv[1]), Clock(T0)).open()
    slow = {"tasks": [{"name": "a", "command": ["sleep", "30"]}]}
    await site.scheduler.on_message(payload({"concurrencyPolicy": "Replace", "workflowSpec": slow}))
    await site.scheduler.tick(AHEAD + 10.5)
    (run,) = await site.runs()
    for _ in range(100):
        if (await site.store.load_run(run.run_id))[0].phase == "Running":
            break
        await asyncio.sleep(0.05)
    await site.scheduler.tick(T0 + 30.5)  # stepped back: the mark moves back
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_replace_across_a_step_back_and_a_kill_replaces_the_run_fired_ahead_once(
    tmp_path: Path,
) -> None:
    await run_until_killed(REPLACE_AHEAD_THEN_KILLED, tmp_path)
    site = await Site(tmp_path, Clock(T0 + 40.5)).open()
    try:
        site.tasks += [site.executor.start(run_id) for run_id in await site.executor.recover()]
        (ahead,) = await site.runs()
        (row,) = site.scheduler.schedules()
        assert row.last_scheduled == T0 + 30.5  # the moved mark survived the kill
        # The next slot on the corrected clock replaces the run fired ahead.
        fired = await site.scheduler.tick(T0 + 40.5)
        assert fired_times(fired) == [(T0 + 40, True)]
        ended, _ = await site.store.load_run(ahead.run_id)
        for _ in range(200):
            ended, _ = await site.store.load_run(ahead.run_id)
            if ended.phase == "Cancelled":
                break
            await asyncio.sleep(0.05)
        assert ended.phase == "Cancelled"
        # The true clock reaches the time fired ahead: held, not fired (nor replaced) again.
        fired = await site.scheduler.tick(AHEAD + 10.5)
        assert fired_times(fired) == [(AHEAD + 10, False)]
        runs = await site.runs()
        assert sorted(r.cron["scheduledTime"] for r in runs) == [T0 + 40, AHEAD + 10]
        assert [r.phase for r in runs if r.run_id != ahead.run_id] != ["Cancelled"]
        for run in await site.store.schedule_runs(UID, unfinished=True):
            await site.executor.cancel(run.run_id, "test over")
        await site.settle()
    finally:
        await site.close()


async def test_a_step_back_takes_back_the_misses_the_jump_ahead_counted(
    tmp_path: Path,
) -> None:
    site = await Site(tmp_path, Clock(T0)).open()
    try:
        assert await site.scheduler.on_message(payload()) == "Held"
        assert fired_times(await site.scheduler.tick(AHEAD + 10.5)) == [(AHEAD + 10, True)]
        (row,) = site.scheduler.schedules()
        # The jump ahead counted every time between as missed: a year of them.
        assert row.missed_count == (AHEAD - T0) / 10
        assert await site.scheduler.tick(T0 + 30.5) == []  # stepped back
        # Only the times before the corrected clock were missed (T0+10, +20, +30): the
        # others fire as the clock reaches them (each was counted missed, for ever).
        (row,) = site.scheduler.schedules()
        assert (row.missed_count, row.last_missed) == (3, T0 + 30)
        (stored,) = await site.store.list_schedules()
        assert (stored.missed_count, stored.last_missed) == (3, T0 + 30)
        (record,) = [r for r in await site.schedule_records() if "clockSteppedBackFrom" in r]
        assert (record["missedCount"], record["lastMissedTime"]) == (3, T0 + 30)
        assert fired_times(await site.scheduler.tick(T0 + 40.5)) == [(T0 + 40, True)]
        await site.settle()
    finally:
        await site.close()
