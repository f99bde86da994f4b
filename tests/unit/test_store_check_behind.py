"""``Store.open(check_behind=True)``: the start-up check beside the reads, writes held.

The daemon opens its database this way so that a large file's
``quick_check`` (seconds) is off the path of a drain that only reads
(decision 0024).  Proves, on real SQLite files:

* a corrupt file opens, reads still answer, and then the check refuses it:
  :meth:`Store.checked` raises, a write queued meanwhile fails, a later write
  is refused at once, and the files are byte-for-byte what they were;
* on a sound file a write waits for the check: it is not committed (nor
  visible to another reader) while the check runs, the connection itself
  refuses a write that would go round the queue (``query_only``), and once
  the check passes the write commits;
* a file that needs migrating, or a new one, is checked first as before.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.state import RunState, TaskState
from edge_agent.store import Store, StoreError


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


async def _seed(path: Path, runs: int = 3) -> None:
    store = await Store.open(path, synchronous="NORMAL")
    for i in range(runs):
        run = RunState(
            run_id=f"u{i}.1", uid=f"u{i}", generation=1, namespace="d", name=f"n{i}",
            spec_json="{}", created_at=1.0,
        )  # fmt: skip
        assert await store.create_run(run, [TaskState(run.run_id, f"t{j}") for j in range(20)])
    await store.close()


def _scribble(path: Path, index: str) -> None:
    with sqlite3.connect(path) as con:
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
        (root,) = con.execute(
            "SELECT rootpage FROM sqlite_master WHERE name=?", (index,)
        ).fetchone()
    con.close()
    with path.open("r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(random.Random(root).randbytes(page_size))


@pytest.fixture
def held_check(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The check waits for this event before it reads the file."""
    release = threading.Event()
    original = Store._quick_check_rows

    def held(self: Store) -> list[str]:
        assert release.wait(10), "the test never released the check"
        return original(self)

    monkeypatch.setattr(Store, "_quick_check_rows", held)
    yield release
    release.set()


async def test_corrupt_file_is_refused_behind_the_open_and_left_untouched(
    tmp_path: Path, held_check: threading.Event
) -> None:
    path = tmp_path / "site.db"
    await _seed(path)
    _scribble(path, "runs_by_name")
    files = _snapshot(tmp_path)
    store = await Store.open(path, check_behind=True)
    try:
        batch = await store.outbox_batch(0, max_count=10)  # reads answer meanwhile
        assert [seq for seq, _, _ in batch] == list(range(1, 4))
        queued = asyncio.ensure_future(store.set_meta("note", "written before the check"))
        await asyncio.sleep(0)
        assert not queued.done()
        held_check.set()
        with pytest.raises(StoreError, match="corrupt"):
            await asyncio.wait_for(store.checked(), 10)
        with pytest.raises(StoreError, match="corrupt"):
            await queued
        with pytest.raises(StoreError, match="corrupt"):
            await store.ack(3)
    finally:
        await store.close()
    assert _snapshot(tmp_path) == files, "a refused database must be left as it was"


async def test_writes_wait_for_the_check_then_commit(
    tmp_path: Path, held_check: threading.Event
) -> None:
    path = tmp_path / "site.db"
    await _seed(path)
    store = await Store.open(path, check_behind=True)
    try:
        queued = asyncio.ensure_future(store.ack(2))
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert not queued.done(), "a write went ahead of the check"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as reader:
            assert reader.execute("SELECT count(*) FROM outbox").fetchone()[0] == 3
        reader.close()

        def around_the_queue(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO meta VALUES ('sneaky', 'x')")

        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            await store._call(around_the_queue)
        held_check.set()
        await asyncio.wait_for(store.checked(), 10)
        assert await asyncio.wait_for(queued, 10) == 2
        assert (await store.outbox_stats()).depth == 1
        await store.set_meta("after", "the check")  # the connection writes again
        assert await store.get_meta("after") == "the check"
    finally:
        await store.close()


async def test_new_file_needs_no_check_behind(tmp_path: Path, held_check: threading.Event) -> None:
    # (held_check would hang a check; a new file has nothing to check.)
    store = await Store.open(tmp_path / "new.db", check_behind=True)
    try:
        await asyncio.wait_for(store.checked(), 1)
        await asyncio.wait_for(store.set_meta("site", "s"), 5)
    finally:
        await store.close()
