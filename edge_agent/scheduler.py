"""Fires CronWorkflow runs from the site's own clock, online or offline.

Why here and not in the cloud: a site that is offline at 02:00 must still run
its 02:00 job.  The cloud delivers each schedule once (``assign`` channel,
kind ``schedule``); from then on this module alone decides when it fires, and
the runs sync back like any run when the link returns.

Invariants:

* **A scheduled time fires at most once per site**, whatever happens to the
  process.  A fired run's uid is derived from (schedule uid, generation,
  scheduled time) (:func:`tideflow.schedule.run_uid`), the run is committed
  first and the schedule's high-water mark after it.  A kill -9 between the
  two leaves the mark behind, so the next start computes the same time, the
  same uid, and finds the run already held (``Executor.submit`` returns it
  without creating another).  Nothing is held in memory that the database
  does not also hold.
* **Catch-up** follows :func:`tideflow.schedule.due`: of the times missed
  while the agent was down, only the latest fires (within
  ``startingDeadlineSeconds``); the others are counted as missed and reported
  to the cloud in a ``schedule`` record.  Counting them after a long outage
  is done in a thread (``LONG_CATCH_UP_SECONDS``), never on the event loop;
  a withdraw or an edit handled meanwhile wins over that catch-up.
* **Concurrency policy, per site**: Allow starts the new run beside active
  ones; Forbid skips the time while a run of the schedule is active (counted
  as missed); Replace cancels the active runs, then starts the new one.
* **A clock stepped back** (an RTC that read ahead, set right by NTP): a
  clock more than ``CLOCK_STEP_SECONDS`` before a schedule's mark moves the
  mark back to it, with a WARNING, and firing resumes from the clock's time.
  What fired above the new mark is in the store's fired record, written in
  the run's own transaction and kept when retention prunes the run (and when
  the schedule is withdrawn, for the times after the clock): no time in it
  fires again (decision 0047).  The move is reported to the cloud, and the
  misses counted above the new mark are taken back (decision 0049).
* **Suspend**: while suspended nothing fires; the times that pass are
  recorded as missed (a resumed schedule does not replay them).
* **The clock is injected** (``clock``), so tests drive :meth:`tick` with a
  chosen time; :meth:`run` sleeps until the earliest next fire time, or until
  a schedule changes, and at most ``max_sleep`` seconds (a wall clock set
  forwards is noticed within that).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from edge_agent.executor import Assignment, Executor
from edge_agent.state import RunState
from edge_agent.store import ScheduleRow, Store
from edge_agent.threads import in_own_thread
from tideflow import wire
from tideflow.failpoints import failpoint
from tideflow.schedule import Schedule, due, run_name, run_uid
from tideflow.spec import CronWorkflowSpec, SpecError, parse_cron_spec

log = logging.getLogger(__name__)

# A catch-up walks each time missed (up to MAX_COUNTED_MISSES, 10-25 us each): one
# every-minute schedule after a week down is 80-250 ms of arithmetic.  Past this
# much downtime it is done in a thread of its own, so that the link, the liveness
# probe's answer and running tasks go on meanwhile (an hour: at most 60 times of
# a cron expression, ~1-2 ms, and any fire of an hourly or rarer schedule, where
# the thread's ~0.1 ms is nothing).
LONG_CATCH_UP_SECONDS = 3600.0

# A clock that reads this much before a schedule's mark (the last scheduled time it
# handled) was stepped back (NTP setting right an RTC that read ahead), not merely
# read a moment early: the mark moves back to it (decision 0047).
CLOCK_STEP_SECONDS = 60.0

Clock = Callable[[], float]
RunStarted = Callable[["asyncio.Task[RunState]"], Any]


@dataclass(frozen=True)
class _Held:
    row: ScheduleRow
    spec: CronWorkflowSpec
    schedule: Schedule


@dataclass(frozen=True)
class Fired:
    """What one :meth:`Scheduler.tick` did for one schedule."""

    schedule_uid: str
    scheduled: datetime
    run_id: str | None  # None: skipped (Forbid) or missed
    created: bool


def _ts(t: datetime) -> float:
    return t.timestamp()


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Scheduler:
    """Keeps the site's schedules and fires their runs through the executor."""

    def __init__(
        self,
        store: Store,
        executor: Executor,
        site: str,
        *,
        clock: Clock = time.time,
        on_started: RunStarted | None = None,
        on_change: Callable[[], None] | None = None,
        max_sleep: float = 30.0,
    ) -> None:
        self.store = store
        self.executor = executor
        self.site = site
        self.clock = clock
        self.on_started = on_started
        self.on_change = on_change
        self.max_sleep = max_sleep
        self._held: dict[str, _Held] = {}
        self._wake = asyncio.Event()
        # One long catch-up at a time: each holds the GIL while it counts, and the
        # loop's share of it shrinks with every thread that wants it too.
        self._catching_up = asyncio.Lock()

    # ------------------------------------------------------------- schedules
    async def load(self) -> None:
        """Read the schedules the database holds (a restart forgets nothing)."""
        self._held.clear()
        for row in await self.store.list_schedules():
            held = _parse(row)
            if held is None:
                log.error(
                    "schedule %s/%s in the database no longer parses", row.namespace, row.name
                )
                continue
            self._held[row.uid] = held

    def schedules(self) -> list[ScheduleRow]:
        return [h.row for h in self._held.values()]

    async def on_message(self, payload: wire.SchedulePayload) -> str:
        """Apply a ``schedule`` message; returns the state reported (Held/Withdrawn/Rejected)."""
        row = ScheduleRow(
            uid=payload.uid,
            generation=payload.generation,
            namespace=payload.namespace,
            name=payload.name,
            spec_json="{}",
            received_at=self.clock(),
        )
        if payload.action == "withdraw":
            # (The times fired while the clock read ahead stay recorded: delivered
            # again, the schedule does not fire them twice; decision 0049.)
            await self.store.withdraw_schedule(row, keep_after=row.received_at)
            self._held.pop(payload.uid, None)
            self._changed()
            return "Withdrawn"
        try:
            spec = parse_cron_spec(payload.spec if payload.spec is not None else None)
        except SpecError as exc:
            log.warning("schedule %s/%s refused: %s", payload.namespace, payload.name, exc)
            await self.store.withdraw_schedule(
                row, "Rejected", str(exc), keep_after=row.received_at
            )
            self._changed()
            return "Rejected"
        row = ScheduleRow(
            row.uid,
            row.generation,
            row.namespace,
            row.name,
            json.dumps(spec.dump(), sort_keys=True),
            row.received_at,
        )
        held_row, changed = await self.store.put_schedule(row)
        if changed:
            self._held[row.uid] = _Held(held_row, spec, spec.parsed_schedule())
            log.info(
                "schedule %s/%s generation %d held (%s)",
                row.namespace,
                row.name,
                row.generation,
                spec.schedule,
            )
        self._changed()
        return "Held"

    def _changed(self) -> None:
        self._wake.set()
        if self.on_change is not None:
            self.on_change()

    # ------------------------------------------------------------------ firing
    def next_fire(self, now: float | None = None) -> float | None:
        """The earliest next fire time over every unsuspended schedule."""
        at = _dt(self.clock() if now is None else now)
        times = [_ts(h.schedule.next_after(at)) for h in self._held.values() if not h.spec.suspend]
        return min(times) if times else None

    async def tick(self, now: float | None = None) -> list[Fired]:
        """Fire whatever is due at ``now`` (default: the clock)."""
        at = self.clock() if now is None else now
        # Schedules are independent: fired together, their writes share group commits
        # (one after another, 100 schedules due in the same second waited in line).
        results = await asyncio.gather(
            *(self._tick_one(held, at) for held in list(self._held.values()))
        )
        return [fired for result in results for fired in result]

    async def _tick_one(self, held: _Held, now: float) -> list[Fired]:
        row, spec = held.row, held.spec
        since = row.last_scheduled if row.last_scheduled is not None else row.received_at
        # Nothing handled yet: any step back below the receipt.  Once a time was, only
        # a step (a clock a moment behind its last fire just waits for it).
        if now < since - (0.0 if row.last_scheduled is None else CLOCK_STEP_SECONDS):
            await self._stepped_back(held, since, now)
            return []
        since_at, now_at, deadline = _dt(since), _dt(now), spec.starting_deadline_seconds
        if now - since <= LONG_CATCH_UP_SECONDS:
            catch = due(
                held.schedule, since=since_at, now=now_at, starting_deadline_seconds=deadline
            )
        else:
            async with self._catching_up:
                catch = await in_own_thread(
                    due,
                    held.schedule,
                    since=since_at,
                    now=now_at,
                    starting_deadline_seconds=deadline,
                )
            if self._held.get(row.uid) is not held:
                return []  # withdrawn or edited meanwhile: the next tick takes what is held
        if catch.last is None:
            return []
        # A crash after a run was committed but before the mark moved: a "missed"
        # time may in fact have fired (not only the earliest: the fire of a
        # catch-up is the latest of its times).  Never count it missed.
        # So can the fire itself, and a new generation held since (an edit delivered
        # while the site was down) derives another uid for that time: never twice.
        looked_up = (*catch.missed, catch.fire) if catch.fire is not None else catch.missed
        held_runs = await self._fired_at(held, looked_up) if looked_up else {}
        fired_before = {t for t in held_runs if catch.fire is None or t != _ts(catch.fire)}
        missed = catch.missed_count - len(fired_before)
        unfired = [_ts(t) for t in catch.missed if _ts(t) not in fired_before]
        last_missed = unfired[-1] if unfired else None
        if catch.fire is None and catch.missed_count and _ts(catch.last) not in fired_before:
            last_missed = _ts(catch.last)
        out: list[Fired] = []
        fired_at: float | None = None
        if catch.fire is not None and _ts(catch.fire) in held_runs:
            out.append(Fired(row.uid, catch.fire, held_runs[_ts(catch.fire)], False))
            fired_at = _ts(catch.fire)
        elif catch.fire is not None and spec.suspend:
            missed += 1
            last_missed = _ts(catch.fire)
        elif catch.fire is not None:
            fire = await self._fire(held, catch.fire)
            out.append(fire)
            if fire.run_id is None:
                missed += 1
                last_missed = _ts(catch.fire)
            else:
                fired_at = _ts(catch.fire)
        failpoint("cron-fired")  # the run is committed, the high-water mark not yet
        await self.store.advance_schedule(
            row.uid,
            last_scheduled=_ts(catch.last),
            fired=fired_at,
            missed=max(0, missed),
            last_missed=last_missed if missed > 0 else None,
        )
        # A message handled while this fire awaited the database is not undone by
        # it: a withdrawn schedule stays withdrawn (it fired on, in memory, until a
        # restart), and an edit stays the schedule held, from the mark moved here.
        current = self._held.get(row.uid)
        if current is not None:
            self._held[row.uid] = _Held(
                _advanced(current.row, _ts(catch.last), fired_at, max(0, missed), last_missed),
                current.spec,
                current.schedule,
            )
        return out

    async def _stepped_back(self, held: _Held, since: float, now: float) -> None:
        """The clock reads well before the schedule's mark: move the mark back to it.

        The site's clock read ahead (a bad RTC after a reboot) and has been set
        right (NTP): the mark the times fired ahead left would hold every fire back
        until the clock read it again, up to a year.  Firing resumes from the
        clock's time; a time that already fired is in the store's fired record
        and :meth:`_tick_one` never fires it again.
        """
        row = held.row
        log.warning(
            "schedule %s/%s: the clock reads %s, %.0fs before the schedule's %s %s "
            "(the clock stepped back); firing from the clock's time, and no time that "
            "already fired fires again",
            row.namespace,
            row.name,
            _dt(now).isoformat(),
            since - now,
            "receipt" if row.last_scheduled is None else "mark",
            _dt(since).isoformat(),
        )
        unmissed, last_missed = 0, None
        if row.missed_count:
            unmissed, last_missed = await self._unmissed(held, since, now)
        moved = await self.store.rewind_schedule(
            row.uid, now, unmissed=unmissed, last_missed=last_missed
        )
        current = self._held.get(row.uid)  # an edit handled meanwhile keeps the rewind
        if moved is not None and current is not None:
            self._held[row.uid] = _Held(
                replace(
                    current.row,
                    last_scheduled=moved.last_scheduled,
                    missed_count=moved.missed_count,
                    last_missed=moved.last_missed,
                ),
                current.spec,
                current.schedule,
            )
        elif current is not None:  # (stored already at or below it: memory follows)
            mark = current.row.last_scheduled
            if (mark if mark is not None else current.row.received_at) > now:
                self._held[row.uid] = _Held(
                    replace(current.row, last_scheduled=now), current.spec, current.schedule
                )

    async def _unmissed(self, held: _Held, since: float, now: float) -> tuple[int, float | None]:
        """Of the times counted missed, how many lie above ``now`` (the clock stepped
        back there); and the latest scheduled time at or before ``now``.

        The jump ahead counted every time it passed over as missed; above the
        corrected clock they fire as it reaches them, so they are taken off the
        count (the times above ``now`` that are not in the fired record; times
        before the schedule was received were never counted).
        """
        lowest = max(now, held.row.received_at)
        if since <= lowest:
            return 0, None
        if since - lowest <= LONG_CATCH_UP_SECONDS:
            span = due(held.schedule, since=_dt(lowest), now=_dt(since))
        else:
            async with self._catching_up:
                span = await in_own_thread(due, held.schedule, since=_dt(lowest), now=_dt(since))
        times = span.missed_count + (1 if span.fire is not None else 0)
        fired = await self.store.schedule_fired_between(held.row.uid, lowest, since)
        latest = held.schedule.last_at_or_before(_dt(now))
        return max(0, times - fired), _ts(latest) if latest is not None else None

    async def _fired_at(self, held: _Held, times: tuple[datetime, ...]) -> dict[float, str]:
        """Which of ``times`` the schedule (any generation) fired: the run it made.

        The store's fired record, which outlives the runs the history limit
        prunes: after a clock stepped back, times above the mark may have fired.
        """
        return await self.store.schedule_fired_at(held.row.uid, [_ts(t) for t in times])

    async def _fire(self, held: _Held, scheduled: datetime) -> Fired:
        row, spec = held.row, held.spec
        uid = run_uid(row.uid, row.generation, scheduled)
        # (Fired before a crash? Executor.submit finds the run held and creates none.)
        active: list[RunState] = []
        if spec.concurrency_policy != "Allow":
            active = await self.store.schedule_runs(row.uid, unfinished=True)
            if any(r.uid == uid for r in active):  # fired before a crash: never twice
                return Fired(
                    row.uid, scheduled, next(r.run_id for r in active if r.uid == uid), False
                )
        if active and spec.concurrency_policy == "Forbid":
            log.info(
                "schedule %s/%s: %s skipped, a run is still active (Forbid)",
                row.namespace,
                row.name,
                scheduled.isoformat(),
            )
            return Fired(row.uid, scheduled, None, False)
        if active and spec.concurrency_policy == "Replace":
            for run in active:
                await self.executor.cancel(run.run_id, "replaced by a newer scheduled run")
        assignment = Assignment(
            uid=uid,
            generation=1,
            namespace=row.namespace,
            name=run_name(row.name, self.site, scheduled),
            spec=spec.workflow_spec,
            cron={
                "uid": row.uid,
                "name": row.name,
                "generation": row.generation,
                "scheduledTime": _ts(scheduled),
            },
        )
        run, created = await self.executor.submit(assignment)
        if created:
            task = self.executor.start(run.run_id)
            if self.on_started is not None:
                self.on_started(task)
            log.info(
                "schedule %s/%s fired %s for %s",
                row.namespace,
                row.name,
                run.name,
                scheduled.isoformat(),
            )
        return Fired(row.uid, scheduled, run.run_id, created)

    async def run(self) -> None:
        """Fire schedules for ever: tick, then sleep until the next time or a change."""
        while True:
            self._wake.clear()
            await self.tick()
            next_at = self.next_fire()
            delay = self.max_sleep if next_at is None else next_at - self.clock()
            delay = min(self.max_sleep, max(0.0, delay))
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)


def _advanced(
    row: ScheduleRow, last: float, fired: float | None, missed: int, last_missed: float | None
) -> ScheduleRow:
    return ScheduleRow(
        row.uid,
        row.generation,
        row.namespace,
        row.name,
        row.spec_json,
        row.received_at,
        max(last, row.last_scheduled or 0.0),
        fired if fired is not None else row.last_fired,
        row.missed_count + missed,
        last_missed if missed and last_missed is not None else row.last_missed,
    )


def _parse(row: ScheduleRow) -> _Held | None:
    try:
        spec = parse_cron_spec(json.loads(row.spec_json))
    except (SpecError, ValueError):
        return None
    return _Held(row, spec, spec.parsed_schedule())


def next_fire_time(row: ScheduleRow, now: float) -> float | None:
    """When ``row`` fires next after ``now`` (None if suspended or unparsable)."""
    held = _parse(row)
    if held is None or held.spec.suspend:
        return None
    return _ts(held.schedule.next_after(_dt(now)))
