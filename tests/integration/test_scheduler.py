"""The site's scheduler with a real SQLite file, real task processes and a chosen clock.

The clock is injected: each test says what time it is and calls ``tick``;
runs are real (``true``/``sleep`` processes) and waited on with timeouts.
Proves: a time fires once, with the derived run identity; a restart between
the run's commit and the schedule's high-water mark does not fire it twice;
catch-up after downtime; Forbid, Replace and Allow; suspend; a new
generation keeps what already fired; withdraw; bad input is refused with a
Rejected record and never stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from services.loop_watch import LoopWatch

from edge_agent import scheduler as scheduler_module
from edge_agent.executor import Executor
from edge_agent.scheduler import Scheduler
from edge_agent.store import Store
from tideflow import wire
from tideflow.schedule import MAX_COUNTED_MISSES, due, run_name, run_uid

T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
UID = "cwf-uid-1"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def payload(
    spec: dict[str, Any] | None = None,
    *,
    generation: int = 1,
    action: str = "put",
    uid: str = UID,
) -> wire.SchedulePayload:
    body = {
        "schedule": "@every 10s",
        "placement": {"site": "line-2"},
        "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]},
    }
    body.update(spec or {})
    return wire.SchedulePayload(
        action=action,  # type: ignore[arg-type]
        uid=uid,
        generation=generation,
        namespace="plant-7",
        name="etl",
        spec=body,
    )


class Site:
    def __init__(self, tmp: Path, clock: Clock) -> None:
        self.tmp = tmp
        self.clock = clock
        self.tasks: list[asyncio.Task[Any]] = []

    async def open(self) -> Site:
        self.store = await Store.open(self.tmp / "site.db", synchronous="NORMAL")
        self.executor = Executor(
            self.store, work_dir=self.tmp / "work", concurrency=4, grace_seconds=0.5
        )
        self.scheduler = Scheduler(
            self.store, self.executor, "line-2", clock=self.clock, on_started=self.tasks.append
        )
        await self.scheduler.load()
        return self

    async def close(self) -> None:
        await self.executor.shutdown()
        await self.store.close()

    async def settle(self) -> None:
        """Wait (bounded) for every run started so far to finish."""
        if self.tasks:
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 30)

    async def runs(self) -> list[Any]:
        return await self.store.schedule_runs(UID)

    async def schedule_records(self) -> list[dict[str, Any]]:
        return [
            json.loads(r.body)
            for r in await self.store.outbox_records()
            if r.kind == wire.SCHEDULE_RECORD
        ]


@pytest.fixture
async def site(tmp_path: Path) -> Any:
    s = await Site(tmp_path, Clock(T0)).open()
    yield s
    await s.close()


async def run_until_killed(script: str, directory: Path, failpoints: str = "") -> None:
    """Run ``script`` (a site in a process of its own: argv 1 its directory, argv 2
    this folder, for ``from test_scheduler import ...``) until SIGKILL ends it (the
    fail points ``failpoints``, or the script itself); fail if it ends any other way."""
    env = {**os.environ, "TIDEFLOW_FAILPOINTS": failpoints}
    tests = str(Path(__file__).parent)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(directory), tests, env=env
    )
    try:
        assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_time_fires_once_with_the_derived_identity(site: Site) -> None:
    assert await site.scheduler.on_message(payload()) == "Held"
    assert await site.scheduler.tick(T0 + 5) == []
    fired = await site.scheduler.tick(T0 + 10.2)
    assert [f.created for f in fired] == [True]
    scheduled = datetime.fromtimestamp(T0 + 10, UTC)
    (run,) = await site.runs()
    assert run.uid == run_uid(UID, 1, scheduled)
    assert run.name == run_name("etl", "line-2", scheduled)
    assert run.namespace == "plant-7"
    assert await site.scheduler.tick(T0 + 10.2) == []
    assert await site.scheduler.tick(T0 + 19.9) == []
    await site.settle()
    (run,) = await site.runs()
    assert run.phase == "Succeeded"
    # The run's records tell the cloud which schedule fired it, for which time.
    records = [json.loads(r.body) for r in await site.store.outbox_records(run.run_id)]
    crons = {json.dumps(r.get("cron"), sort_keys=True) for r in records if "phase" in r}
    assert crons >= {
        json.dumps(
            {"uid": UID, "name": "etl", "generation": 1, "scheduledTime": T0 + 10},
            sort_keys=True,
        )
    }
    # And the site confirmed the schedule in its outbox.
    (held,) = await site.schedule_records()
    assert held["state"] == "Held" and held["generation"] == 1


async def restarted_after_a_kill_before_the_mark(tmp_path: Path, tick_at: float) -> Site:
    """A site holding the schedule, killed at its tick at ``tick_at`` after the
    fire's run was committed and before the schedule's mark moved; then opened
    again on the same database (the caller closes it)."""
    clock = Clock(T0)
    first = await Site(tmp_path, clock).open()
    await first.scheduler.on_message(payload())

    async def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed before the high-water mark moved")

    first.store.advance_schedule = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await first.scheduler.tick(tick_at)
    await first.settle()
    await first.close()
    return await Site(tmp_path, clock).open()


async def test_a_restart_between_the_run_and_the_mark_does_not_fire_twice(
    tmp_path: Path,
) -> None:
    second = await restarted_after_a_kill_before_the_mark(tmp_path, T0 + 10.5)
    try:
        # Same time again: the run is found, not created.
        fired = await second.scheduler.tick(T0 + 11)
        assert [(f.created, f.run_id is not None) for f in fired] == [(False, True)]
        assert len(await second.runs()) == 1
        # Much later (past the next window): the held time is not counted as missed.
        fired = await second.scheduler.tick(T0 + 20.5)
        assert [f.created for f in fired] == [True]
        await second.settle()
        runs = await second.runs()
        assert sorted(r.cron["scheduledTime"] for r in runs) == [T0 + 10, T0 + 20]
        (row,) = second.scheduler.schedules()
        assert row.missed_count == 0
    finally:
        await second.close()


async def test_catch_up_fires_the_latest_missed_time_once_and_counts_the_rest(
    site: Site,
) -> None:
    await site.scheduler.on_message(payload({"startingDeadlineSeconds": 3}))
    fired = await site.scheduler.tick(T0 + 61)  # 10..60 passed while "down"
    assert [f.scheduled.timestamp() for f in fired] == [T0 + 60]
    (row,) = site.scheduler.schedules()
    assert row.missed_count == 5 and row.last_missed == T0 + 50
    records = await site.schedule_records()
    assert records[-1]["missedCount"] == 5
    # Past the deadline nothing fires; the times are missed.
    fired = await site.scheduler.tick(T0 + 205)  # 200 is 5 s late
    assert fired == []
    (row,) = site.scheduler.schedules()
    assert row.missed_count == 5 + 14 and row.last_scheduled == T0 + 200
    assert row.last_missed == T0 + 200
    await site.settle()
    assert len(await site.runs()) == 1


async def test_forbid_skips_while_a_run_is_active(site: Site) -> None:
    slow = {"tasks": [{"name": "a", "command": ["sleep", "30"]}]}
    await site.scheduler.on_message(payload({"concurrencyPolicy": "Forbid", "workflowSpec": slow}))
    assert [f.created for f in await site.scheduler.tick(T0 + 10)] == [True]
    assert [f.run_id for f in await site.scheduler.tick(T0 + 20)] == [None]
    runs = await site.runs()
    assert len(runs) == 1
    (row,) = site.scheduler.schedules()
    assert row.missed_count == 1
    await site.executor.cancel(runs[0].run_id, "test over")
    await site.settle()
    assert [f.created for f in await site.scheduler.tick(T0 + 30)] == [True]


async def test_replace_cancels_the_active_run(site: Site) -> None:
    slow = {"tasks": [{"name": "a", "command": ["sleep", "30"]}]}
    await site.scheduler.on_message(payload({"concurrencyPolicy": "Replace", "workflowSpec": slow}))
    await site.scheduler.tick(T0 + 10)
    await site.scheduler.tick(T0 + 20)
    first = site.tasks[0]
    final = await asyncio.wait_for(first, 30)
    assert final.phase == "Cancelled"
    runs = {r.cron["scheduledTime"]: r for r in await site.runs()}
    assert set(runs) == {T0 + 10, T0 + 20}
    assert not runs[T0 + 20].done
    await site.executor.cancel(runs[T0 + 20].run_id, "test over")
    await site.settle()


async def test_allow_overlaps(site: Site) -> None:
    slow = {"tasks": [{"name": "a", "command": ["sleep", "30"]}]}
    await site.scheduler.on_message(payload({"workflowSpec": slow}))
    await site.scheduler.tick(T0 + 10)
    await site.scheduler.tick(T0 + 20)
    active = await site.store.schedule_runs(UID, unfinished=True)
    assert len(active) == 2
    for run in active:
        await site.executor.cancel(run.run_id, "test over")
    await site.settle()


async def test_suspend_fires_nothing_and_records_the_times_missed(site: Site) -> None:
    await site.scheduler.on_message(payload({"suspend": True}))
    assert site.scheduler.next_fire(T0) is None
    assert await site.scheduler.tick(T0 + 35) == []
    (row,) = site.scheduler.schedules()
    assert row.missed_count == 3 and row.last_scheduled == T0 + 30  # 10, 20 and 30
    # Resumed (a new generation): the next time fires, the suspended ones never do.
    await site.scheduler.on_message(payload({"suspend": False}, generation=2))
    fired = await site.scheduler.tick(T0 + 40)
    assert [f.scheduled.timestamp() for f in fired] == [T0 + 40]
    await site.settle()


async def test_a_new_generation_keeps_what_fired_and_an_old_one_changes_nothing(
    site: Site,
) -> None:
    await site.scheduler.on_message(payload())
    await site.scheduler.tick(T0 + 10)
    await site.scheduler.on_message(payload({"schedule": "@every 20s"}, generation=2))
    # The time 10 already fired under generation 1; generation 2 does not re-fire it.
    assert await site.scheduler.tick(T0 + 15) == []
    fired = await site.scheduler.tick(T0 + 20)
    assert [f.scheduled.timestamp() for f in fired] == [T0 + 20]
    (run_20,) = [r for r in await site.runs() if r.cron["scheduledTime"] == T0 + 20]
    assert run_20.uid == run_uid(UID, 2, datetime.fromtimestamp(T0 + 20, UTC))
    # A stale generation is confirmed again but does not replace generation 2.
    assert await site.scheduler.on_message(payload({"suspend": True}, generation=1)) == "Held"
    (row,) = site.scheduler.schedules()
    assert row.generation == 2 and json.loads(row.spec_json)["schedule"] == "@every 20s"
    records = await site.schedule_records()
    assert [r["generation"] for r in records] == [1, 2, 2]
    await site.settle()


async def test_withdraw_stops_firing_and_is_confirmed(site: Site) -> None:
    await site.scheduler.on_message(payload())
    assert await site.scheduler.on_message(payload(action="withdraw")) == "Withdrawn"
    assert site.scheduler.schedules() == []
    assert await site.scheduler.tick(T0 + 100) == []
    # Withdrawing what is not held is confirmed too (the cloud stops re-sending).
    assert await site.scheduler.on_message(payload(action="withdraw", uid="other")) == "Withdrawn"
    states = [(r["uid"], r["state"]) for r in await site.schedule_records()]
    assert states == [(UID, "Held"), (UID, "Withdrawn"), ("other", "Withdrawn")]
    assert await site.store.list_schedules() == []


async def test_a_bad_schedule_is_rejected_and_the_held_one_kept(site: Site) -> None:
    await site.scheduler.on_message(payload())
    state = await site.scheduler.on_message(payload({"schedule": "0 2 * *"}, generation=2))
    assert state == "Rejected"
    (row,) = await site.store.list_schedules()
    assert row.generation == 1
    rejected = (await site.schedule_records())[-1]
    assert rejected["state"] == "Rejected" and "spec.schedule" in rejected["message"]
    assert await site.scheduler.on_message(payload({"timezone": "Nowhere/None"}, uid="x")) == (
        "Rejected"
    )
    assert [r.uid for r in await site.store.list_schedules()] == [UID]


async def test_schedules_survive_a_restart(tmp_path: Path) -> None:
    clock = Clock(T0)
    first = await Site(tmp_path, clock).open()
    await first.scheduler.on_message(
        payload({"schedule": "0 2 * * *", "timezone": "Europe/Berlin"})
    )
    await first.close()
    second = await Site(tmp_path, clock).open()
    try:
        (row,) = second.scheduler.schedules()
        assert row.name == "etl"
        # 02:00 Berlin in January is 01:00 UTC.
        assert second.scheduler.next_fire(T0) == T0 + 3600
    finally:
        await second.close()


async def test_a_long_outage_s_catch_up_leaves_the_event_loop_free(site: Site) -> None:
    """After a week down, each every-minute schedule walks its missed times (up to
    MAX_COUNTED_MISSES, 10-25 us each): 80-250 ms of one schedule's arithmetic.
    Done on the event loop, twelve of them held it for seconds, and with it the
    link, the liveness probe's answer and every running task's wake-up."""
    every_minute = {"schedule": "* * * * *", "timezone": "Europe/Berlin"}
    uids = [f"cwf-uid-{i}" for i in range(12)]
    for uid in uids:
        assert await site.scheduler.on_message(payload(every_minute, uid=uid)) == "Held"
    began = time.monotonic()
    async with LoopWatch() as watch:
        fired = await site.scheduler.tick(T0 + 7 * 86400 + 30)
    took = time.monotonic() - began
    assert sorted(f.schedule_uid for f in fired) == sorted(uids)
    assert all(f.created for f in fired)
    # Held on the loop, the whole catch-up was one stall (1.3-1.5 s here, quiet).  Off
    # it, no stall is more than a small part of it, however loaded the machine.
    assert watch.worst_lag < took / 4, f"the loop stalled {watch.worst_lag:.2f}s of {took:.2f}s"
    for row in site.scheduler.schedules():
        assert row.missed_count == MAX_COUNTED_MISSES and row.last_scheduled == T0 + 7 * 86400
    await site.settle()


async def test_a_schedule_withdrawn_during_its_long_catch_up_does_not_fire(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catch-up runs in a thread while the loop handles messages: a withdraw
    taken meanwhile wins, as one taken before the tick does."""
    await site.scheduler.on_message(payload({"schedule": "* * * * *"}))
    walking = threading.Event()
    withdrawn = threading.Event()

    def due_after_the_withdraw(*args: Any, **kwargs: Any) -> Any:
        walking.set()
        withdrawn.wait(10)
        return due(*args, **kwargs)

    monkeypatch.setattr(scheduler_module, "due", due_after_the_withdraw)
    ticking = asyncio.create_task(site.scheduler.tick(T0 + 7 * 86400 + 30))
    while not walking.is_set():
        await asyncio.sleep(0.001)
    assert await site.scheduler.on_message(payload(action="withdraw")) == "Withdrawn"
    withdrawn.set()
    assert await ticking == []
    assert await site.runs() == []
    assert await site.store.list_schedules() == []
