"""The site database: safe opening and migration, and the transactional outbox.

Proves, on real SQLite files: a schema-1 database is migrated to the current
schema keeping its rows; a database from a newer agent, another application's
database, and files that are not SQLite are refused with StoreError and left
byte-identical; a missing file is not created by a read-only open.  Every
state change writes exactly its outbox record(s) in the same transaction, seq
numbers only grow (never reused after compaction), acks compact and are
idempotent, batches are bounded, concurrent writers share commits (group
commit) without losing or mixing up changes, and log tails are bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from services.agent import has_schema, read_only

import edge_agent.store as store_module
from edge_agent.state import RunState, TaskState, record_json
from edge_agent.store import (
    APP_ID,
    LOG_TAIL_BYTES,
    MIGRATIONS,
    SCHEMA_VERSION,
    OutboxRecord,
    Store,
    StoreBusyError,
    StoreError,
)


def make_run(uid: str = "wf-uid", generation: int = 1, name: str = "wf") -> RunState:
    return RunState(
        run_id=f"{uid}.{generation}",
        uid=uid,
        generation=generation,
        namespace="plant-7",
        name=name,
        spec_json='{"tasks": []}',
        created_at=1000.0,
    )


def make_tasks(run: RunState, n: int) -> list[TaskState]:
    return [TaskState(run.run_id, f"t{i}") for i in range(n)]


async def seeded(path: Path, n_tasks: int = 3) -> tuple[Store, RunState, list[TaskState]]:
    store = await Store.open(path, synchronous="NORMAL")
    run = make_run()
    tasks = make_tasks(run, n_tasks)
    assert await store.create_run(run, tasks)
    return store, run, tasks


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[tuple[Store, RunState, list[TaskState]]]:
    store, run, tasks = await seeded(tmp_path / "site.db")
    yield store, run, tasks
    await store.close()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def sqlite_file(path: Path, *, user_version: int, application_id: int, tables: bool) -> None:
    con = sqlite3.connect(path)
    if tables:
        con.execute("CREATE TABLE things (id INTEGER PRIMARY KEY, what TEXT)")
        con.execute("INSERT INTO things (what) VALUES ('precious')")
    con.execute(f"PRAGMA application_id = {application_id}")
    con.execute(f"PRAGMA user_version = {user_version}")
    con.commit()
    con.close()


def pragma(path: Path, name: str) -> object:
    con = sqlite3.connect(path)
    try:
        return con.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        con.close()


def phases(records: list[store_module.OutboxRecord]) -> list[tuple[str, str, str]]:
    out = []
    for r in records:
        body = json.loads(r.body)
        out.append((r.kind, body.get("task", ""), body.get("phase", body.get("stream", ""))))
    return out


# ------------------------------------------------------------------ opening
async def test_fresh_database_gets_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    store = await Store.open(path)
    await store.close()
    assert pragma(path, "user_version") == SCHEMA_VERSION
    assert pragma(path, "application_id") == APP_ID
    assert pragma(path, "journal_mode") == "wal"
    con = sqlite3.connect(path)
    names = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    con.close()
    assert {"meta", "runs", "task_runs", "task_logs", "outbox", "spans"} <= names


async def test_empty_file_is_initialised(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    path.touch()
    store = await Store.open(path)
    await store.close()
    assert pragma(path, "user_version") == SCHEMA_VERSION


async def test_schema_1_database_is_migrated_keeping_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "site.db"
    # An agent that only knew migration 1 wrote this database.
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 1)
    old, run, tasks = await seeded(path)
    tasks[0].phase, tasks[0].attempt, tasks[0].outputs = "Succeeded", 1, {"rows": "7"}
    # What that agent wrote for a task transition, in schema 1's columns.
    for sql, params in [
        ("UPDATE task_runs SET phase='Succeeded', attempt=1, outputs=? WHERE task='t0'",
         ('{"rows": "7"}',)),
        ("INSERT INTO task_logs VALUES (?, 't0', 1, 'stdout', ?)", (run.run_id, b"hello")),
        ("INSERT INTO outbox (kind, run_id, body, created_at) VALUES ('task', ?, ?, 1.0)",
         (run.run_id, json.dumps(tasks[0].to_record(run)))),
    ]:  # fmt: skip
        await old._db.execute(sql, params)
    await old.ack(1)
    # (read as schema 1 stored it: the current reader joins a later table)
    before = [
        OutboxRecord(seq, kind, body)
        for seq, kind, body in await old._db.execute_fetchall(
            "SELECT seq, kind, body FROM outbox ORDER BY seq"
        )
    ]
    await old.close()
    assert pragma(path, "user_version") == 1
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM sqlite_master WHERE name='spans'").fetchone() == (0,)
    con.close()

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", len(MIGRATIONS))
    # A read-only open does not migrate: it refuses, and leaves the file alone.
    # (SQLite may add the WAL's -wal/-shm side files; the database is unchanged.)
    original = path.read_bytes()
    with pytest.raises(StoreError, match="needs migrating"):
        await Store.open(path, readonly=True)
    assert path.read_bytes() == original
    assert pragma(path, "user_version") == 1

    store = await Store.open(path)
    try:
        assert await store._scalar("PRAGMA user_version") == SCHEMA_VERSION
        assert await store._scalar("SELECT count(*) FROM spans") == 0
        loaded_run, loaded_tasks = await store.load_run(run.run_id)
        assert loaded_run == run
        assert [t.name for t in loaded_tasks] == ["t0", "t1", "t2"]
        assert loaded_tasks[0].outputs == {"rows": "7"} and loaded_tasks[0].phase == "Succeeded"
        assert await store.log_tails(run.run_id, "t0") == [(1, "stdout", b"hello")]
        assert await store.outbox_records() == before
        assert (await store.outbox_stats()).last_acked_seq == 1
        # the sequence continues where the old agent left it
        await store.save_task(run, tasks[1])
        newest = (await store.outbox_records())[-1]
        assert newest.seq == before[-1].seq + 1
    finally:
        await store.close()


async def test_migrate_applies_only_missing_steps(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    con = sqlite3.connect(path)
    con.executescript(MIGRATIONS[0])
    con.execute(f"PRAGMA application_id = {APP_ID}")
    con.execute("PRAGMA user_version = 1")
    con.execute(
        "INSERT INTO runs (run_id, uid, generation, namespace, name, spec, phase, created_at)"
        " VALUES ('u.1', 'u', 1, 'ns', 'wf', '{}', 'Running', 1.0)"
    )
    con.execute(
        "INSERT INTO outbox (kind, run_id, body, created_at) VALUES ('run', 'u.1', '{}', 1)"
    )
    con.commit()
    con.close()
    store = await Store.open(path)
    try:
        assert await store._scalar("PRAGMA user_version") == SCHEMA_VERSION
        assert [r.run_id for r in await store.list_runs(unfinished=True)] == ["u.1"]
        assert [r.seq for r in await store.outbox_records()] == [1]
        await store.migrate(SCHEMA_VERSION)  # nothing left to do: no error, no change
        assert await store._scalar("PRAGMA user_version") == SCHEMA_VERSION
    finally:
        await store.close()
    # reopening an up-to-date database changes nothing either
    store = await Store.open(path)
    assert [r.seq for r in await store.outbox_records()] == [1]
    await store.close()


@pytest.mark.parametrize(
    ("user_version", "application_id", "tables", "message"),
    [
        (SCHEMA_VERSION + 1, APP_ID, True, "newer than this agent"),
        (SCHEMA_VERSION + 40, APP_ID, False, "newer than this agent"),
        (1, 0x12345678, True, "not a Tideflow database"),
        (0, 0, True, "another application's tables"),
        (0, 0x12345678, True, "another application's tables"),
    ],
    ids=["newer", "much-newer", "foreign-application-id", "foreign-tables", "foreign-both"],
)
@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
async def test_unusable_sqlite_database_is_refused_untouched(
    tmp_path: Path,
    user_version: int,
    application_id: int,
    tables: bool,
    message: str,
    readonly: bool,
) -> None:
    path = tmp_path / "site.db"
    sqlite_file(path, user_version=user_version, application_id=application_id, tables=tables)
    files = snapshot(tmp_path)
    with pytest.raises(StoreError, match=message):
        await Store.open(path, readonly=readonly)
    assert snapshot(tmp_path) == files


def _random_bytes() -> bytes:
    return random.Random(7).randbytes(8192)


@pytest.mark.parametrize(
    "content",
    [
        _random_bytes(),
        b"runs:\n  - nightly\n" * 100,
        b"hi",
        b"SQLite format 3\x00" + _random_bytes(),  # the magic, then garbage
    ],
    ids=["random-bytes", "text", "tiny", "sqlite-magic-then-garbage"],
)
@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
async def test_non_sqlite_file_is_refused_untouched(
    tmp_path: Path, content: bytes, readonly: bool
) -> None:
    path = tmp_path / "site.db"
    path.write_bytes(content)
    files = snapshot(tmp_path)
    with pytest.raises(StoreError, match=r"site\.db"):
        await Store.open(path, readonly=readonly)
    assert snapshot(tmp_path) == files


async def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        await Store.open(tmp_path)


async def test_readonly_open_of_missing_file_errors_without_creating_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.db"
    with pytest.raises(StoreError, match="no database"):
        await Store.open(path, readonly=True)
    assert snapshot(tmp_path) == {}


# A writer killed inside its first transaction, before the file was in WAL mode:
# pages of the uncommitted transaction are in the file and the rollback journal
# that undoes them is beside it ("hot").  An agent killed while creating its
# database leaves this (its switch to WAL writes page 1 under a rollback journal).
KILLED_MID_FIRST_WRITE = """
import os, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA cache_size = 1")  # spill the transaction's pages into the file
con.execute("BEGIN")
con.execute("CREATE TABLE half_written (x)")
for _ in range(300):
    con.execute("INSERT INTO half_written VALUES (randomblob(1000))")
os._exit(0)
"""


async def test_database_killed_while_being_created_is_never_read_half_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "site.db"
    subprocess.run([sys.executable, "-c", KILLED_MID_FIRST_WRITE, str(path)], check=True)
    assert path.with_name("site.db-journal").exists() and path.stat().st_size > 0
    left = snapshot(tmp_path)

    with pytest.raises(StoreError, match=r"stopped while writing it.*run the agent on it once"):
        await Store.open(path, readonly=True)
    with read_only(path) as conn:
        assert not has_schema(conn), "nothing was committed: there is no schema yet"
    assert snapshot(tmp_path) == left, "a reader rolled back or changed nothing"

    store = await Store.open(path)  # the writer rolls the journal back, then creates
    try:
        assert await store._scalar("PRAGMA user_version") == SCHEMA_VERSION
        names = {row[0] for row in await store._rows("SELECT name FROM sqlite_master", raw=True)}
        assert "half_written" not in names and "outbox" in names
    finally:
        await store.close()
    assert not path.with_name("site.db-journal").exists()


async def test_readonly_store_reads_but_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    store, run, tasks = await seeded(path)
    await store.close()
    reader = await Store.open(path, readonly=True)
    try:
        assert (await reader.load_run(run.run_id))[0] == run
        assert len(await reader.outbox_records()) == 1
        with pytest.raises(StoreError, match="readonly"):
            await reader.save_task(run, tasks[0])
        assert len(await reader.outbox_records()) == 1
    finally:
        await reader.close()


async def test_a_second_writer_names_the_holder_whose_pid_comes_a_moment_later(
    tmp_path: Path,
) -> None:
    """Two agents started at once on a fresh file: the winner holds the database's
    lock a moment before it writes its pid; the loser waits that moment for it and
    names it, not "another process" (CI met the race)."""
    import fcntl
    import threading

    path = tmp_path / "site.db"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the winner, its pid not written yet
    writes_pid = threading.Timer(0.1, lambda: (tmp_path / "site.db.lock").write_text("4242\n"))
    writes_pid.start()
    try:
        with pytest.raises(StoreBusyError, match="in use by pid 4242"):
            await Store.open(path)
    finally:
        writes_pid.join()
        os.close(fd)


async def test_one_writer_per_database_readers_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    writer, run, _ = await seeded(path)
    try:
        with pytest.raises(StoreBusyError, match=f"in use by pid {os.getpid()}"):
            await Store.open(path)
        reader = await Store.open(path, readonly=True)
        assert (await reader.load_run(run.run_id))[0] == run
        await reader.close()
    finally:
        await writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.db"], "the lock file is removed"
    again = await Store.open(path)  # released on close
    await again.close()


async def test_refused_database_releases_its_lock(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    sqlite_file(path, user_version=SCHEMA_VERSION + 1, application_id=APP_ID, tables=True)
    for _ in range(2):  # the first refusal must not leave the file locked
        with pytest.raises(StoreError, match="newer"):
            await Store.open(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.db"]


@pytest.mark.parametrize("name", ["a#b.db", "q?mode=ro", "x%20y.db"])
async def test_the_path_opened_is_the_path_given(tmp_path: Path, name: str) -> None:
    store = await Store.open(tmp_path / name)
    await store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("target", ["spans", "spans_by_trace", "task_runs", "runs_by_name"])
async def test_corrupt_page_is_refused_untouched(tmp_path: Path, target: str) -> None:
    path = tmp_path / "site.db"
    store, _, _ = await seeded(path, n_tasks=20)
    await store.close()
    with sqlite3.connect(path) as con:
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
        (root,) = con.execute(
            "SELECT rootpage FROM sqlite_master WHERE name=?", (target,)
        ).fetchone()
    with path.open("r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(random.Random(root).randbytes(page_size))
    files = snapshot(tmp_path)
    with pytest.raises(StoreError, match="corrupt"):
        await Store.open(path)
    assert snapshot(tmp_path) == files


async def test_bad_synchronous_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="synchronous"):
        await Store.open(tmp_path / "site.db", synchronous="SOMETIMES")
    assert snapshot(tmp_path) == {}


async def test_closed_store_refuses_writes(tmp_path: Path) -> None:
    store, run, tasks = await seeded(tmp_path / "site.db")
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await store.save_task(run, tasks[0])


# ------------------------------------------------------------------ outbox
async def test_create_run_writes_run_tasks_and_one_record(
    db: tuple[Store, RunState, list[TaskState]],
) -> None:
    store, run, tasks = db
    records = await store.outbox_records()
    assert len(records) == 1
    assert records[0].kind == "run"
    assert records[0].body == record_json(run.to_record())
    loaded_run, loaded = await store.load_run(run.run_id)
    assert loaded_run == run
    assert loaded == tasks
    assert await store.task_counts(run.run_id) == {"Pending": 3}


async def test_create_run_twice_is_refused_and_adds_nothing(
    db: tuple[Store, RunState, list[TaskState]],
) -> None:
    store, run, tasks = db
    assert await store.create_run(run, tasks) is False
    # the same (uid, generation) under another run id is the same run
    other = make_run()
    other.run_id = "different"
    assert await store.create_run(other, make_tasks(other, 1)) is False
    assert len(await store.outbox_records()) == 1
    assert [r.run_id for r in await store.list_runs()] == [run.run_id]
    # a new generation is a new run
    assert await store.create_run(make_run(generation=2), []) is True
    assert len(await store.outbox_records()) == 2


async def test_each_task_transition_writes_one_record_with_increasing_seq(
    db: tuple[Store, RunState, list[TaskState]],
) -> None:
    store, run, tasks = db
    t = tasks[1]
    t.phase, t.attempt, t.started_at = "Running", 1, 5.0
    await store.save_task(run, t)
    t.phase, t.finished_at, t.exit_code, t.outputs = "Succeeded", 6.0, 0, {"k": "v"}
    await store.save_task(run, t)
    records = await store.outbox_records()
    assert phases(records) == [
        ("run", "", "Pending"),
        ("task", "t1", "Running"),
        ("task", "t1", "Succeeded"),
    ]
    assert [r.seq for r in records] == sorted({r.seq for r in records})
    assert json.loads(records[-1].body) == t.to_record(run)
    _, loaded = await store.load_run(run.run_id)
    assert loaded[1] == t


async def test_logs_add_one_log_record_per_stream_in_the_same_commit(
    db: tuple[Store, RunState, list[TaskState]],
) -> None:
    store, run, tasks = db
    t = tasks[0]
    t.phase, t.attempt = "Failed", 2
    await store.save_task(run, t, {"stdout": b"out\n", "stderr": b"err \xff\n"})
    records = (await store.outbox_records())[1:]
    assert phases(records) == [
        ("task", "t0", "Failed"),
        ("log", "t0", "stdout"),
        ("log", "t0", "stderr"),
    ]
    bodies = [json.loads(r.body) for r in records[1:]]
    assert [(b["attempt"], b["tail"]) for b in bodies] == [(2, "out\n"), (2, "err \ufffd\n")]
    assert await store.log_tails(run.run_id, "t0") == [
        (2, "stdout", b"out\n"),
        (2, "stderr", b"err \xff\n"),
    ]
    assert await store.log_tails(run.run_id, "t0", attempt=1) == []


async def test_log_tails_are_bounded(db: tuple[Store, RunState, list[TaskState]]) -> None:
    store, run, tasks = db
    big = bytes(random.Random(1).choices(b"abcdefgh\n", k=LOG_TAIL_BYTES * 3 + 17))
    tasks[0].attempt = 1
    await store.save_task(run, tasks[0], {"stdout": big, "stderr": b"small"})
    tails = {stream: tail for _, stream, tail in await store.log_tails(run.run_id, "t0")}
    assert tails["stdout"] == big[-LOG_TAIL_BYTES:]
    assert tails["stderr"] == b"small"
    log_bodies = [json.loads(r.body) for r in await store.outbox_records() if r.kind == "log"]
    assert [len(b["tail"]) for b in log_bodies] == [LOG_TAIL_BYTES, 5]


async def test_save_task_with_also_run_writes_both_records(
    db: tuple[Store, RunState, list[TaskState]],
) -> None:
    store, run, tasks = db
    tasks[2].phase = "Cancelled"
    run.phase, run.reason = "Cancelled", "Cancelled"
    await store.save_task(run, tasks[2], also_run=True)
    assert phases((await store.outbox_records())[1:]) == [
        ("task", "t2", "Cancelled"),
        ("run", "", "Cancelled"),
    ]
    assert (await store.load_run(run.run_id))[0].phase == "Cancelled"


async def test_save_many_and_save_run_write_one_record_per_change(
    db: tuple[Store, RunState, list[TaskState]],
) -> None:
    store, run, tasks = db
    for t in tasks:
        t.phase, t.message = "Skipped", "dependency failed"
    await store.save_many(run, tasks)
    run.phase = "Failed"
    await store.save_run(run)
    assert phases((await store.outbox_records())[1:]) == [
        ("task", "t0", "Skipped"),
        ("task", "t1", "Skipped"),
        ("task", "t2", "Skipped"),
        ("run", "", "Failed"),
    ]
    assert await store.task_counts(run.run_id) == {"Skipped": 3}


async def test_save_task_captures_state_when_called(
    db: tuple[Store, RunState, list[TaskState]],
) -> None:
    """Write-behind: the executor starts the write and keeps changing the task."""
    store, run, tasks = db
    t = tasks[0]
    t.phase, t.attempt = "Running", 1
    pending = asyncio.ensure_future(store.save_task(run, t))
    t.phase = "Succeeded"
    await pending
    assert phases((await store.outbox_records())[1:]) == [("task", "t0", "Running")]
    assert (await store.load_run(run.run_id))[1][0].phase == "Running"


async def test_failed_change_leaves_no_trace(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "site.db", synchronous="NORMAL")
    try:
        run = make_run()
        duplicate_tasks = [TaskState(run.run_id, "a"), TaskState(run.run_id, "a")]
        with pytest.raises(StoreError, match="UNIQUE"):
            await store.create_run(run, duplicate_tasks)
        assert await store.list_runs() == []
        assert await store.outbox_records() == []
        assert await store.find_run(run.uid, run.generation) is None
    finally:
        await store.close()


# ------------------------------------------------------------------ acks
async def fill(store: Store, run: RunState, tasks: list[TaskState], rounds: int) -> None:
    for i in range(rounds):
        for t in tasks:
            t.attempt = i + 1
            await store.save_task(run, t)


async def test_ack_compacts_through_seq_and_is_idempotent(
    db: tuple[Store, RunState, list[TaskState]],
) -> None:
    store, run, tasks = db
    await fill(store, run, tasks, 3)  # 1 + 9 records
    seqs = [r.seq for r in await store.outbox_records()]
    assert len(seqs) == 10
    assert await store.ack(seqs[3]) == 4
    assert [r.seq for r in await store.outbox_records()] == seqs[4:]
    stats = await store.outbox_stats()
    assert (stats.depth, stats.first_seq, stats.last_seq) == (6, seqs[4], seqs[-1])
    assert stats.last_acked_seq == seqs[3]
    assert await store.get_meta("last_acked_seq") == str(seqs[3])
    # duplicates and stale (reordered) acks change nothing
    for stale in (seqs[3], seqs[1], 0, -5):
        assert await store.ack(stale) == 0
        assert [r.seq for r in await store.outbox_records()] == seqs[4:]
        assert (await store.outbox_stats()).last_acked_seq == seqs[3]
    assert await store.ack(seqs[-1]) == 6
    stats = await store.outbox_stats()
    assert (stats.depth, stats.bytes, stats.first_seq, stats.last_seq) == (0, 0, None, None)
    assert stats.last_acked_seq == seqs[-1]


async def test_ack_beyond_newest_record_does_not_swallow_future_records(
    db: tuple[Store, RunState, list[TaskState]],
) -> None:
    store, run, tasks = db
    top = (await store.outbox_records())[-1].seq
    assert await store.ack(top + 100) == 1
    assert (await store.outbox_stats()).last_acked_seq == top
    await store.save_task(run, tasks[0])
    later = await store.outbox_after((await store.outbox_stats()).last_acked_seq)
    assert [r.seq for r in later] == [top + 1]


async def test_seq_is_never_reused_after_compaction(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    store, run, tasks = await seeded(path)
    await fill(store, run, tasks, 2)
    top = (await store.outbox_records())[-1].seq
    await store.ack(top)
    assert await store.outbox_records() == []
    await store.save_task(run, tasks[0])
    assert [r.seq for r in await store.outbox_records()] == [top + 1]
    await store.ack(top + 1)
    await store.close()
    # nor after reopening an empty outbox
    store = await Store.open(path, synchronous="NORMAL")
    try:
        await store.save_task(run, tasks[1])
        assert [r.seq for r in await store.outbox_records()] == [top + 2]
        assert (await store.outbox_stats()).last_acked_seq == top + 1
    finally:
        await store.close()


async def test_cancel_markers_are_bounded_in_number_and_age(
    db: tuple[Store, RunState, list[TaskState]],
) -> None:
    store, _, _ = db
    for i in range(30):
        await store.remember_cancel(f"u{i}", "stop", now=1000.0 + i, keep=10, ttl=100)
    kept = [i for i in range(30) if await store.cancel_marker(f"u{i}", now=1030.0, ttl=100)]
    assert kept == list(range(20, 30)), "the newest ten are kept"
    assert await store.cancel_marker("u29", now=1029.0 + 101, ttl=100) is None, "expired"
    # an expired marker is deleted by the next write, not only ignored
    await store.remember_cancel("late", "x" * 10_000, now=1029.0 + 101, keep=10, ttl=100)
    rows = await store._rows("SELECT key, value FROM meta WHERE key LIKE 'cancelled:%'")
    assert [row["key"] for row in rows] == ["cancelled:late"]
    assert len(rows[0]["value"]) < 400, "the reason is bounded"
    assert await store.cancel_marker("late", now=1030.0 + 101, ttl=100) == "x" * 256
    await store.forget_cancel("late")
    assert await store.cancel_marker("late", now=1030.0 + 101, ttl=100) is None


async def test_cancel_marker_from_an_older_agent_is_ignored(
    db: tuple[Store, RunState, list[TaskState]],
) -> None:
    store, _, _ = db
    await store.set_meta("cancelled:old", "cancelled by the cloud")
    assert await store.cancel_marker("old") is None
    await store.remember_cancel("new", "stop")  # and it is swept as expired
    assert await store.get_meta("cancelled:old") is None


# ------------------------------------------------------------------ batches
async def test_outbox_after_respects_seq_count_and_bytes(
    db: tuple[Store, RunState, list[TaskState]],
) -> None:
    store, run, tasks = db
    await fill(store, run, tasks, 4)  # 13 records
    records = await store.outbox_records()
    seqs = [r.seq for r in records]
    assert [r.seq for r in await store.outbox_after(0)] == seqs
    assert [r.seq for r in await store.outbox_after(seqs[4])] == seqs[5:]
    assert [r.seq for r in await store.outbox_after(seqs[4], max_count=3)] == seqs[5:8]
    assert await store.outbox_after(seqs[-1]) == []
    # by bytes: the batch stops before the record that would exceed the budget
    sizes = [len(r.body) + 32 for r in records]
    budget = sum(sizes[:5]) + sizes[5] // 2
    assert [r.seq for r in await store.outbox_after(0, max_bytes=budget)] == seqs[:5]
    assert [r.seq for r in await store.outbox_after(0, max_bytes=sum(sizes[:5]))] == seqs[:5]
    # ...but always makes progress: one record even if it alone is too big
    assert [r.seq for r in await store.outbox_after(0, max_bytes=1)] == seqs[:1]
    assert [r.seq for r in await store.outbox_after(seqs[2], max_bytes=0)] == seqs[3:4]
    assert (await store.outbox_stats()).bytes == sum(len(r.body) for r in records)


async def test_group_commit_concurrent_writers_all_commit_sharing_transactions(
    tmp_path: Path,
) -> None:
    store, run, tasks = await seeded(tmp_path / "site.db", n_tasks=60)
    commits: list[str] = []
    await store._db.set_trace_callback(
        lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None
    )
    try:
        for t in tasks:
            t.phase, t.attempt, t.outputs = "Succeeded", 1, {"n": t.name}
        await asyncio.gather(*(store.save_task(run, t, {"stdout": t.name.encode()}) for t in tasks))
        await store._db.set_trace_callback(None)
        records = (await store.outbox_records())[1:]
        assert len(records) == 120  # one task + one log record per writer
        task_bodies = [json.loads(r.body) for r in records if r.kind == "task"]
        assert sorted(b["task"] for b in task_bodies) == sorted(t.name for t in tasks)
        assert all(b["outputs"] == {"n": b["task"]} for b in task_bodies)
        assert [r.seq for r in records] == list(range(records[0].seq, records[0].seq + 120))
        _, loaded = await store.load_run(run.run_id)
        assert loaded == tasks
        assert 1 <= len(commits) < len(tasks) // 2, commits
        assert await store.integrity_check() == "ok"
    finally:
        await store.close()


async def test_a_change_that_raises_fails_alone_and_the_writer_lives_on(tmp_path: Path) -> None:
    """Not only SQLite errors: a bug in one change must not kill the group-commit writer.

    (A dead writer would leave every later write waiting forever.)
    """
    store, run, tasks = await seeded(tmp_path / "site.db", n_tasks=2)
    try:

        def buggy(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO meta VALUES ('half', 'done')")
            raise TypeError("a bug in a change")

        results = await asyncio.gather(
            store.save_task(run, tasks[0]),
            store._submit(buggy),
            store.save_task(run, tasks[1]),
            return_exceptions=True,
        )
        assert isinstance(results[1], TypeError)
        assert results[0] is None and results[2] is None
        assert await store.get_meta("half") is None, "the failed change left no trace"
        await asyncio.wait_for(store.set_meta("after", "yes"), 5)
        assert await store.get_meta("after") == "yes"
    finally:
        await store.close()


async def test_group_commit_isolates_a_failing_change(tmp_path: Path) -> None:
    store, run, tasks = await seeded(tmp_path / "site.db", n_tasks=5)
    try:
        bad = make_run(uid="bad")
        for t in tasks:
            t.phase = "Running"
        results = await asyncio.gather(
            store.save_task(run, tasks[0]),
            store.create_run(bad, [TaskState(bad.run_id, "x"), TaskState(bad.run_id, "x")]),
            *(store.save_task(run, t) for t in tasks[1:]),
            return_exceptions=True,
        )
        assert isinstance(results[1], StoreError)
        assert [r for i, r in enumerate(results) if i != 1] == [None] * 5
        assert await store.find_run("bad", 1) is None
        assert phases((await store.outbox_records())[1:]) == [
            ("task", f"t{i}", "Running") for i in range(5)
        ]
        assert await store.task_counts(run.run_id) == {"Running": 5}
    finally:
        await store.close()


async def test_integrity_after_mixed_workload(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    store, run, tasks = await seeded(path, n_tasks=10)
    await fill(store, run, tasks, 5)
    await store.ack(20)
    await store.set_meta("site", "line-2")
    assert await store.integrity_check() == "ok"
    await store.close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("PRAGMA foreign_key_check").fetchall() == []
    assert con.execute("SELECT value FROM meta WHERE key='site'").fetchone() == ("line-2",)
    con.close()


async def test_retention_finds_a_runs_spans_by_index_also_in_an_older_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention deletes a run's spans by ``run_id``: an index, not a scan of every span.

    A database written before the index existed (schema 5) gets it when an
    agent opens it, keeping its rows.
    """
    path = tmp_path / "site.db"
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 5)
    old, run, _ = await seeded(path)
    await old._db.execute(
        "INSERT INTO spans VALUES ('t1', 's1', NULL, ?, 'task t0', 1, 2, '{}')", (run.run_id,)
    )
    await old.close()
    assert pragma(path, "user_version") == 5
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", len(MIGRATIONS))
    store = await Store.open(path)
    try:
        assert await store._scalar("PRAGMA user_version") == SCHEMA_VERSION
        assert await store._scalar("SELECT count(*) FROM spans WHERE run_id=?", (run.run_id,)) == 1
        for sql in (
            "DELETE FROM spans WHERE run_id IN (SELECT run_id FROM temp.doomed)",
            "DELETE FROM spans WHERE run_id IS NULL AND end_ns < 5",
        ):
            await store._db.execute("CREATE TEMP TABLE IF NOT EXISTS doomed (run_id TEXT)")
            plan = " | ".join(
                str(row[3]) for row in await store._db.execute_fetchall(f"EXPLAIN QUERY PLAN {sql}")
            )
            assert "SCAN spans" not in plan and "spans_by_run" in plan, plan
    finally:
        await store.close()


async def test_outbox_stats_stay_exact_through_appends_spans_and_acks(tmp_path: Path) -> None:
    """The writer keeps the outbox's depth and bytes as it goes (no scan of the whole
    outbox each heartbeat); after every change they equal a full count of the file."""
    path = tmp_path / "site.db"
    store, run, tasks = await seeded(path, n_tasks=4)

    def counted() -> tuple[int, int]:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
            row = con.execute(
                "SELECT count(*), coalesce(sum(length(coalesce(s.body, o.body))), 0)"
                " FROM outbox o LEFT JOIN spans s ON s.rowid = o.span_rowid"
            ).fetchone()
        return int(row[0]), int(row[1])

    async def check() -> None:
        stats = await store.outbox_stats()
        assert (stats.depth, stats.bytes) == counted()

    try:
        await check()
        for i, task in enumerate(tasks):
            task.phase, task.attempt = "Running", 1
            await store.save_task(run, task, {"stdout": b"x" * (100 * i + 1)})
            await check()
        await store.queue_span(
            {"traceId": "ab" * 16, "spanId": "cd" * 8, "name": "task t0", "startTimeUnixNano": 1,
             "endTimeUnixNano": 2, "attributes": {"tideflow.run_id": run.run_id}}
        )  # fmt: skip
        await check()
        top = (await store.outbox_stats()).last_seq
        assert top is not None
        await store.ack(top - 3)
        await check()
        run.message = "more"
        await store.save_run(run)
        await store.ack(top + 1)
        await check()
        assert (await store.outbox_stats()).depth == 0
    finally:
        await store.close()
