"""The test harness's view of an agent's database: loud on errors, harmless to a crash's WAL.

``agent_truth`` decides absence checks ("the garbage created no run"); if a
failed read looked like an empty database those checks would pass for the
wrong reason.  ``read_only`` is what the crash tests read with between a kill
and a restart; a read-write connection would checkpoint and delete the WAL
the crash left, and the restart would recover from something else.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from services.agent import TruthUnreadable, agent_truth, read_only

from edge_agent.store import SCHEMA_VERSION

# Writes one committed row in WAL mode and dies without closing (as kill -9 would).
CRASHING_WRITER = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA wal_autocheckpoint=0")
conn.execute("CREATE TABLE runs (uid TEXT, generation INT, phase TEXT, run_id TEXT)")
conn.execute("CREATE TABLE task_runs (run_id TEXT, task TEXT, phase TEXT, attempt INT,"
             " exit_code INT, outputs TEXT)")
conn.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT)")
conn.execute("INSERT INTO runs VALUES ('u', 1, 'Running', 'r1')")
conn.execute("INSERT INTO outbox (body) VALUES ('x')")
conn.execute(f"PRAGMA user_version = {sys.argv[2]}")
os._exit(0)
"""


def _crashed_db(tmp_path: Path) -> Path:
    db = tmp_path / "site.db"
    subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(db), str(SCHEMA_VERSION)],
        check=True,
        timeout=30,
    )
    assert (tmp_path / "site.db-wal").stat().st_size > 0
    return db


def test_an_unreadable_database_raises_instead_of_looking_empty(tmp_path: Path) -> None:
    db = tmp_path / "site.db"
    db.write_bytes(b"this is not a SQLite database, it only has the name" * 100)
    with pytest.raises(TruthUnreadable, match=r"site\.db"):
        agent_truth(db)


def test_a_database_with_a_broken_schema_raises(tmp_path: Path) -> None:
    db = tmp_path / "site.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE runs (uid TEXT)")  # no task_runs, wrong columns
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    with pytest.raises(TruthUnreadable):
        agent_truth(db)


def test_no_file_or_no_schema_yet_is_empty(tmp_path: Path) -> None:
    assert agent_truth(tmp_path / "absent.db") == {"runs": {}, "last_seq": 0}
    db = tmp_path / "fresh.db"
    sqlite3.connect(db).close()
    assert agent_truth(db) == {"runs": {}, "last_seq": 0}


def test_reading_after_a_crash_sees_the_wal_and_leaves_it_in_place(tmp_path: Path) -> None:
    db = _crashed_db(tmp_path)
    wal = tmp_path / "site.db-wal"
    before = wal.read_bytes()
    truth = agent_truth(db)
    assert truth == {"runs": {"u.1": {"phase": "Running", "tasks": {}}}, "last_seq": 1}
    with read_only(db) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    assert wal.read_bytes() == before


def test_the_wal_check_would_notice_a_read_write_connection(tmp_path: Path) -> None:
    """The contrast that makes the test above mean something."""
    db = _crashed_db(tmp_path)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    conn.close()  # the last connection closing: checkpoint, WAL removed
    assert not (tmp_path / "site.db-wal").exists()
