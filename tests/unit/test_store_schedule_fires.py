"""The record of the times each schedule fired (migration 10, decision 0047).

Proves, on real SQLite files: a fired run's record is written in the run's own
transaction and outlives the run (retention); it is bounded to the newest
``FIRES_KEPT`` scheduled times per schedule, whatever order they fired in; a
withdrawn schedule's record goes with it; a database from before the record
(schema 9, an existing site) gets it filled from the runs it holds, within
the bound from the migration on; a schedule's mark is moved back only down,
and the move is reported to the cloud.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

import edge_agent.store as store_module
from edge_agent.state import RunState, TaskState
from edge_agent.store import MIGRATIONS, SCHEMA_VERSION, ScheduleRow, Store

SCHEDULE = "cwf-1"


def fired_run(at: float, schedule: str = SCHEDULE) -> RunState:
    return RunState(
        run_id=f"{schedule}-{int(at)}.1",
        uid=f"{schedule}-{int(at)}",
        generation=1,
        namespace="plant-7",
        name=f"etl-line-2-{int(at)}",
        spec_json='{"tasks": [{"name": "a", "command": ["true"]}]}',
        created_at=at,
        cron={"uid": schedule, "name": "etl", "generation": 1, "scheduledTime": at},
    )


async def fire(store: Store, at: float, schedule: str = SCHEDULE) -> str:
    run = fired_run(at, schedule)
    assert await store.create_run(run, [TaskState(run.run_id, "a")])
    return run.run_id


def fires(path: Path) -> list[tuple[str, float, str]]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT schedule_uid, scheduled_at, run_id FROM schedule_fires")
        return sorted((str(a), float(b), str(c)) for a, b, c in rows)
    finally:
        con.close()


async def drop_runs(store: Store) -> None:
    """As retention would (no outbox, no history check): every run is gone."""

    def work(db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM task_runs")
        db.execute("DELETE FROM runs")

    await store._submit(work)


async def test_a_fire_is_recorded_with_its_run_and_outlives_it(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    store = await Store.open(path, synchronous="NORMAL")
    try:
        run_id = await fire(store, 100.0)
        # The same time again (another generation's uid): the first run stays the record.
        again = fired_run(100.0)
        again.uid, again.run_id = "other-uid", "other-uid.1"
        assert await store.create_run(again, [TaskState(again.run_id, "a")])
        assert fires(path) == [(SCHEDULE, 100.0, run_id)]
        await drop_runs(store)
        assert await store.schedule_runs_at(SCHEDULE, [100.0, 110.0]) == {}
        assert await store.schedule_fired_at(SCHEDULE, [100.0, 110.0]) == {100.0: run_id}
        assert await store.schedule_fired_at("another", [100.0]) == {}
    finally:
        await store.close()


async def test_the_record_keeps_the_newest_times_per_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "FIRES_KEPT", 3)
    path = tmp_path / "site.db"
    store = await Store.open(path, synchronous="NORMAL")
    try:
        # Fired ahead (a clock a year fast), then at the true times after it stepped back.
        for at in (1000.0, 1010.0, 1020.0, 10.0, 20.0):
            await fire(store, at)
        await fire(store, 5.0, schedule="other")
        kept = [(s, at) for s, at, _ in fires(path)]
        assert kept == [(SCHEDULE, 1000.0), (SCHEDULE, 1010.0), (SCHEDULE, 1020.0), ("other", 5.0)]
        # A fire the bound dropped is still known while its run is held.
        times = [10.0, 20.0, 1000.0]
        assert set(await store.schedule_fired_at(SCHEDULE, times)) == set(times)
        await drop_runs(store)
        assert set(await store.schedule_fired_at(SCHEDULE, times)) == {1000.0}
    finally:
        await store.close()


async def test_a_withdrawn_schedule_s_record_goes_with_it(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    store = await Store.open(path, synchronous="NORMAL")
    try:
        row = ScheduleRow(SCHEDULE, 1, "plant-7", "etl", "{}", received_at=1.0)
        await store.put_schedule(row)
        await fire(store, 100.0)
        await fire(store, 100.0, schedule="other")
        assert await store.withdraw_schedule(row)
        assert [s for s, _, _ in fires(path)] == ["other"]
    finally:
        await store.close()


async def test_a_database_from_before_the_record_gets_it_from_its_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(MIGRATIONS) == SCHEMA_VERSION
    path = tmp_path / "site.db"
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 9)
    old = await Store.open(path, synchronous="NORMAL")
    # What an agent of schema 9 wrote: fired runs (two generations for one time) and
    # a run no schedule fired.
    for run_id, uid, schedule, at in (
        ("a.1", "a", SCHEDULE, 100.0),
        ("b.1", "b", SCHEDULE, 110.0),
        ("c.1", "c", SCHEDULE, 110.0),
        ("d.1", "d", None, None),
    ):
        await old._db.execute(
            "INSERT INTO runs (run_id, uid, generation, namespace, name, spec, phase,"
            " created_at, schedule_uid, scheduled_at) VALUES (?,?,1,'ns',?,'{}','Succeeded',"
            " 1.0,?,?)",
            (run_id, uid, uid, schedule, at),
        )
    await old.close()
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", len(MIGRATIONS))
    store = await Store.open(path, synchronous="NORMAL")
    try:
        assert await store._scalar("PRAGMA user_version") == len(MIGRATIONS)
        assert fires(path) == [(SCHEDULE, 100.0, "a.1"), (SCHEDULE, 110.0, "b.1")]
        await drop_runs(store)
        found = await store.schedule_fired_at(SCHEDULE, [100.0, 110.0])
        assert found == {100.0: "a.1", 110.0: "b.1"}
    finally:
        await store.close()


async def test_a_mark_is_rewound_only_down(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    try:
        row = ScheduleRow(SCHEDULE, 1, "plant-7", "etl", "{}", received_at=50.0)
        await store.put_schedule(row)
        assert not await store.rewind_schedule(SCHEDULE, 60.0)  # received at 50: nothing
        assert await store.rewind_schedule(SCHEDULE, 40.0)  # received "ahead" of the clock
        await store.advance_schedule(SCHEDULE, last_scheduled=1000.0, fired=1000.0)
        assert not await store.rewind_schedule(SCHEDULE, 1000.0)
        assert await store.rewind_schedule(SCHEDULE, 70.0)
        (held,) = await store.list_schedules()
        assert held.last_scheduled == 70.0 and held.last_fired == 1000.0
        assert not await store.rewind_schedule("not-held", 1.0)
    finally:
        await store.close()


async def test_a_withdrawal_keeps_the_times_after_the_clock_until_retention_passes_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "site.db"
    store = await Store.open(path, synchronous="NORMAL")
    try:
        row = ScheduleRow(SCHEDULE, 1, "plant-7", "etl", "{}", received_at=1.0)
        await store.put_schedule(row)
        await fire(store, 40.0)
        await fire(store, 100.0)  # fired while the clock read ahead
        await fire(store, 30.0, schedule="other")
        await store.put_schedule(ScheduleRow("other", 1, "plant-7", "etl2", "{}", 1.0))
        # Withdrawn with the clock at 50: the time after it stays recorded.
        assert await store.withdraw_schedule(row, keep_after=50.0)
        assert [(s, at) for s, at, _ in fires(path)] == [("cwf-1", 100.0), ("other", 30.0)]
        await drop_runs(store)
        await store.prune(finished_before=90.0)
        assert [(s, at) for s, at, _ in fires(path)] == [("cwf-1", 100.0), ("other", 30.0)]
        # Once the clock passed it, no delivery can fire it: retention drops it (a
        # held schedule's record is its own bound's, untouched).
        await store.prune(finished_before=101.0)
        assert [(s, at) for s, at, _ in fires(path)] == [("other", 30.0)]
    finally:
        await store.close()


async def test_a_rewind_is_reported_to_the_cloud_in_its_own_transaction(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    try:
        row = ScheduleRow(SCHEDULE, 1, "plant-7", "etl", "{}", received_at=50.0)
        await store.put_schedule(row)
        await store.advance_schedule(SCHEDULE, last_scheduled=1000.0, fired=1000.0)
        before = len(await store.outbox_records())
        assert await store.rewind_schedule(SCHEDULE, 70.0)
        records = [json.loads(r.body) for r in await store.outbox_records()][before:]
        (record,) = records
        assert record["state"] == "Held"
        assert record["lastScheduledTime"] == 70.0
        assert record["clockSteppedBackFrom"] == 1000.0
        # Not moved (already at or below): nothing reported.
        assert not await store.rewind_schedule(SCHEDULE, 80.0)
        assert len(await store.outbox_records()) == before + 1
    finally:
        await store.close()


async def test_the_migration_keeps_only_the_newest_times_of_a_big_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "site.db"
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 9)
    old = await Store.open(path, synchronous="NORMAL")
    many = store_module.FIRES_KEPT + 500  # a site offline long: nothing acked, nothing pruned
    rows = [(f"r{i}.1", f"r{i}", f"etl-{i}", SCHEDULE, 1000.0 + 10 * i) for i in range(many)]
    rows += [("o.1", "o", "other-1", "other", 5.0)]
    await old._db.executemany(
        "INSERT INTO runs (run_id, uid, generation, namespace, name, spec, phase, created_at,"
        " schedule_uid, scheduled_at) VALUES (?,?,1,'ns',?,'{}','Succeeded',1.0,?,?)",
        rows,
    )
    await old.close()
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", len(MIGRATIONS))
    store = await Store.open(path, synchronous="NORMAL")
    try:
        kept = fires(path)
        # The bound holds from the migration on, not only from the schedule's next fire.
        assert len([f for f in kept if f[0] == SCHEDULE]) == store_module.FIRES_KEPT
        newest = [1000.0 + 10 * i for i in range(many - store_module.FIRES_KEPT, many)]
        assert [at for s, at, _ in kept if s == SCHEDULE] == newest
        assert ("other", 5.0, "o.1") in kept
    finally:
        await store.close()
