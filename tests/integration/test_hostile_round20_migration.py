"""Migration 10 (the fired record, decision 0047) on real site databases (round 20).

A site database of the previous schema (9) that is big: 3,000 fired runs of
one schedule, as a site offline long holds (nothing acked, so nothing
pruned).  Real ``python -m edge_agent.cli run`` processes and a real
Mosquitto.  Proves:

* killed (SIGKILL, fail point ``store-migrating``) after the migration's
  statements ran and before it committed: the file is whole at schema 9, and
  the next start migrates it, keeping each schedule's newest 1,000 times;
* under ``--db-max-bytes`` too small for the record, the migration fails as on
  a full disk (exit 4, one line) and leaves the file whole at schema 9 and no
  bigger than the cap: the cap was set only after the migration ran, and the
  file grew past it (and once it was set first, the full disk's own rollback
  made migrate's ROLLBACK raise "no transaction is active", exit 3, in place
  of the full disk).  A bigger cap then migrates it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from services.agent import AgentProcess
from services.broker import Mosquitto

import edge_agent.store as store_module
from edge_agent.store import Store

FIRED = 3000
T_FIRST = 1_767_225_600.0  # 2026-01-01, every 10 s
SPEC = (
    '{"schedule": "@every 10s", "placement": {"site": "line-2"}, "suspend": true,'
    ' "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]}}'
)


def schema_9_site(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema-9 site database holding FIRED runs of schedule cwf-a (suspended)."""

    async def make() -> None:
        monkeypatch.setattr(store_module, "SCHEMA_VERSION", 9)
        store = await Store.open(path, synchronous="NORMAL")
        rows = [
            (f"r{i}.1", f"r{i}", f"etl-line-2-{i}", "x" * 300, T_FIRST + 10 * i, T_FIRST + 10 * i)
            for i in range(FIRED)
        ]

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO schedules (uid, generation, namespace, name, spec, received_at,"
                " last_scheduled) VALUES ('cwf-a', 1, 'plant-7', 'etl', ?, ?, ?)",
                (SPEC, T_FIRST - 10, T_FIRST + 10 * (FIRED - 1)),
            )
            db.executemany(
                "INSERT INTO runs (run_id, uid, generation, namespace, name, spec, phase,"
                " created_at, schedule_uid, scheduled_at) VALUES (?,?,1,'plant-7',?,?,"
                "'Succeeded',?,'cwf-a',?)",
                rows,
            )

        await store._submit(work)
        await store.close()
        monkeypatch.setattr(store_module, "SCHEMA_VERSION", len(store_module.MIGRATIONS))

    asyncio.run(make())


def version_and_fires(path: Path) -> tuple[int, list[float] | None]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        version = int(con.execute("PRAGMA user_version").fetchone()[0])
        try:
            rows = con.execute("SELECT scheduled_at FROM schedule_fires ORDER BY 1").fetchall()
        except sqlite3.OperationalError:
            return version, None
        return version, [float(r[0]) for r in rows]
    finally:
        con.close()


def wait_exit(agent: AgentProcess, timeout: float = 60) -> int:
    assert agent.proc is not None
    return agent.proc.wait(timeout)


def test_a_kill_mid_migration_leaves_schema_9_and_the_next_start_migrates_within_the_bound(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "site.db"
    schema_9_site(db, monkeypatch)
    agent = AgentProcess("line-2", mosquitto.url, db)
    try:
        assert wait_exit(agent.start(failpoints="store-migrating")) == -9
        assert version_and_fires(db) == (9, None)  # whole, nothing of the migration
        agent.start()
        newest = [T_FIRST + 10 * i for i in range(FIRED - store_module.FIRES_KEPT, FIRED)]
        for _ in range(300):
            version, fires = version_and_fires(db)
            if version == len(store_module.MIGRATIONS):
                break
            assert agent.alive, agent.log_tail()
            asyncio.run(asyncio.sleep(0.1))
        assert (version, fires) == (len(store_module.MIGRATIONS), newest)
    finally:
        agent.kill()


def test_a_cap_too_small_for_the_migration_stops_as_on_a_full_disk_and_keeps_the_file(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "site.db"
    schema_9_site(db, monkeypatch)
    cap = db.stat().st_size + 4096  # one page more than it holds: the record needs ~10
    agent = AgentProcess("line-2", mosquitto.url, db, "--db-max-bytes", str(cap))
    try:
        code = wait_exit(agent.start())
        log = agent.log_tail()
        assert code == 4, log
        assert "Traceback" not in log, log
        assert version_and_fires(db) == (9, None)
        assert db.stat().st_size <= cap
        # Room made (a bigger cap): it migrates.
        bigger = AgentProcess("line-2", mosquitto.url, db, "--db-max-bytes", str(cap * 2))
        bigger.start()
        try:
            for _ in range(300):
                if version_and_fires(db)[0] == len(store_module.MIGRATIONS):
                    break
                assert bigger.alive, bigger.log_tail()
                asyncio.run(asyncio.sleep(0.1))
            version, fires = version_and_fires(db)
            assert version == len(store_module.MIGRATIONS)
            assert fires is not None and len(fires) == store_module.FIRES_KEPT
        finally:
            bigger.kill()
    finally:
        agent.kill()
