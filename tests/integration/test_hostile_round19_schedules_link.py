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
  read that again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_scheduler import T0, Clock, Site, payload


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
