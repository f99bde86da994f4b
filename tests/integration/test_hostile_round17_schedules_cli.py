"""The site's schedules and the agent's read-only commands against a hostile tester (round 17).

Each test here started as a reproduction of a defect, with real parts: real
SQLite files, real task processes, the ``tideflow-agent`` console script as a
subprocess; the scheduler's clock is its own injected one (the machine's is
never touched).  Proves:

* a ``*/15 * * * *`` schedule in Europe/Berlin fires in both passes of the
  hour the fall-back repeats, each time once and none counted missed, and the
  cloud's check of a fired run's time takes the second pass's times: the
  latest-time-at-or-before lookup lost the repeated hour's fold, so for that
  whole hour the site fired nothing and then reported its four times missed,
  and the operator would have refused such a run;
* a time zone named ``localtime`` or ``posixrules`` (files in the zone
  directory that are this host's own choice, not IANA zones) is refused
  naming ``spec.timezone``, by the spec and by the site, as ``/etc/localtime``
  was: it was held, so the site fired on its host's zone while the cloud
  judged its runs' times in the cloud host's;
* a withdraw handled while a fire awaits the database stays withdrawn, and an
  edit (a new generation) stays the schedule held: the fire put its own copy
  of the old schedule back in memory when it ended, so a withdrawn schedule
  fired on at the site until a restart (the cloud told "Withdrawn"), and an
  edit was undone until one;
* a kill between a catch-up fire's run and the schedule's mark, then a
  restart past the next time: the time that did fire is not counted missed
  (only the earliest missed time was looked up, so a catch-up's fired time
  was reported missed as well);
* the readers (``status``, ``runs``, ``schedules``, ``logs``, ``trace``) given
  hostile arguments (an ``--attempt`` past SQLite's integers, a workflow or
  task name or a ``--db`` path with bytes that are not UTF-8) answer with one
  line and a non-zero exit, or read the file: each was a traceback
  (OverflowError, UnicodeEncodeError), and a ``--db`` named so could not be
  read at all;
* a database whose pages keep their structure but whose stored text took
  damage (bytes that are not UTF-8 in a run's spec; a span's JSON broken
  by one byte) makes every reader that meets it print one line and exit 3,
  the file untouched; ``quick_check`` does not look inside text, and the
  readers died with a traceback (sqlite3's "Could not decode to UTF-8",
  JSONDecodeError);
* a FIFO where SQLite looks for the database's ``-journal`` gets one line
  and exit 3 from the readers and from ``run-local``, the file untouched:
  each blocked for ever opening it (SQLite looks for a hot journal), and a
  file that is not SQLite blocked the same way in the agent's own look.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_hostile_agent import AGENT, agent_env, manifest
from test_scheduler import (
    T0,
    UID,
    Clock,
    Site,
    payload,
    restarted_after_a_kill_before_the_mark,
)

from tideflow.schedule import parse_schedule
from tideflow.spec import SpecError, parse_cron_spec

BERLIN_FALL_BACK = datetime(2026, 10, 25, 1, 0, tzinfo=UTC)  # 03:00 CEST -> 02:00 CET


async def test_fall_back_fires_both_passes_of_a_stream_schedule_once_each(
    tmp_path: Path,
) -> None:
    start = BERLIN_FALL_BACK - timedelta(hours=2)
    site = await Site(tmp_path, Clock(start.timestamp())).open()
    try:
        spec = {"schedule": "*/15 * * * *", "timezone": "Europe/Berlin"}
        assert await site.scheduler.on_message(payload(spec)) == "Held"
        schedule = parse_schedule("*/15 * * * *", "Europe/Berlin")
        expected = list(schedule.times(start, BERLIN_FALL_BACK + timedelta(hours=2)))
        repeated = (BERLIN_FALL_BACK, BERLIN_FALL_BACK + timedelta(hours=1))
        second_pass = [t for t in expected if repeated[0] <= t < repeated[1]]
        assert len(second_pass) == 4  # 02:00, 02:15, 02:30, 02:45 CET
        # The cloud accepts a fired run only at a time its schedule produces.
        assert [schedule.last_at_or_before(t) for t in second_pass] == second_pass
        fired: list[float] = []
        for t in expected:  # the agent ticks a second after each time, as its loop does
            fired += [f.scheduled.timestamp() for f in await site.scheduler.tick(t.timestamp() + 1)]
            # The loop sleeps until the next fire time; it must be the next one.
            nxt = site.scheduler.next_fire(t.timestamp() + 1)
            assert nxt is not None and nxt > t.timestamp()
        assert fired == [t.timestamp() for t in expected]
        (row,) = site.scheduler.schedules()
        assert row.missed_count == 0
        await site.settle()
        runs = await site.store.schedule_runs(UID)
        assert sorted(r.cron["scheduledTime"] for r in runs) == [t.timestamp() for t in expected]
    finally:
        await site.close()


async def test_a_host_chosen_zone_file_is_not_a_time_zone(tmp_path: Path) -> None:
    for name in ("localtime", "posixrules"):
        spec = {
            "schedule": "0 2 * * *",
            "timezone": name,
            "placement": {"site": "line-2"},
            "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]},
        }
        with pytest.raises(SpecError, match=r"spec\.timezone.*not an IANA time zone"):
            parse_cron_spec(spec)
    site = await Site(tmp_path, Clock(T0)).open()
    try:
        assert await site.scheduler.on_message(payload({"timezone": "localtime"})) == "Rejected"
        assert site.scheduler.schedules() == []
        (record,) = await site.schedule_records()
        assert record["state"] == "Rejected" and "timezone" in record["message"]
    finally:
        await site.close()


async def test_a_withdraw_or_an_edit_during_a_fire_is_not_undone_by_it(tmp_path: Path) -> None:
    site = await Site(tmp_path, Clock(T0)).open()
    try:
        assert await site.scheduler.on_message(payload()) == "Held"
        # The withdraw arrives while the tick is firing T0+10 (both on the loop).
        await asyncio.gather(
            site.scheduler.tick(T0 + 10.5), site.scheduler.on_message(payload(action="withdraw"))
        )
        assert site.scheduler.schedules() == []
        assert await site.store.list_schedules() == []
        assert await site.scheduler.tick(T0 + 20.5) == []  # withdrawn: fires no more
        # An edit (generation 4) while a fire is under way is the schedule held after it.
        await site.scheduler.on_message(payload(generation=3))
        await asyncio.gather(
            site.scheduler.tick(T0 + 30.5),
            site.scheduler.on_message(payload({"schedule": "@every 7s"}, generation=4)),
        )
        (row,) = site.scheduler.schedules()
        assert row.generation == 4 and row.last_scheduled == T0 + 30
        fired = await site.scheduler.tick(T0 + 35.5)  # 35 = 5 x 7: generation 4's time
        assert [(f.scheduled.timestamp(), f.created) for f in fired] == [(T0 + 35, True)]
        await site.settle()
        times = sorted(r.cron["scheduledTime"] for r in await site.store.schedule_runs(UID))
        assert times == [T0 + 10, T0 + 30, T0 + 35]
    finally:
        await site.close()


async def test_a_catch_up_fire_killed_before_its_mark_is_not_also_counted_missed(
    tmp_path: Path,
) -> None:
    # Down since T0: 10 and 20 are missed, 30 fires; the kill loses the mark.
    second = await restarted_after_a_kill_before_the_mark(tmp_path, T0 + 31)
    try:
        fired = await second.scheduler.tick(T0 + 41)  # restarted after 40
        assert [(f.scheduled.timestamp(), f.created) for f in fired] == [(T0 + 40, True)]
        await second.settle()
        times = sorted(r.cron["scheduledTime"] for r in await second.store.schedule_runs(UID))
        assert times == [T0 + 30, T0 + 40]
        (row,) = second.scheduler.schedules()
        assert (row.missed_count, row.last_missed) == (2, T0 + 20)
        (stored,) = await second.store.list_schedules()
        assert (stored.missed_count, stored.last_missed) == (2, T0 + 20)
    finally:
        await second.close()


def reader(*args: str | bytes, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """A read-only command as a real process; killed (and the test failed) after 30 s."""
    return subprocess.run(
        [AGENT, *args], capture_output=True, timeout=30, cwd=cwd, env=agent_env(), check=False
    )


def fingerprint(db: Path) -> tuple[str, int]:
    return hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns


def one_line_error(done: subprocess.CompletedProcess[bytes]) -> str:
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode != 0 and "Traceback" not in err, err[-2000:]
    lines = [line for line in err.strip().splitlines() if not line.startswith("usage: ")]
    assert len(lines) == 1, err[-2000:]  # (argparse's usage line aside, for exit 2)
    return err


def site_db(tmp: Path, name: str = "site.db") -> Path:
    """A database a real ``run-local`` wrote: workflow ``wf``, task ``a`` with logs."""
    path = manifest(tmp / "wf.yaml", [{"name": "a", "command": ["sh", "-c", "echo hi"]}])
    db = tmp / name
    done = subprocess.run(
        [AGENT, "run-local", str(path), "--db", str(db), "--quiet"],
        capture_output=True, timeout=60, env=agent_env(), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return db


def test_hostile_arguments_to_the_readers_get_one_line_and_no_write(tmp_path: Path) -> None:
    db = site_db(tmp_path)
    before = fingerprint(db)
    huge = str(10**30)
    for args in (
        ["logs", "--db", str(db), "wf", "a", "--attempt", huge],
        ["logs", "--db", str(db), b"w\xfff", "a"],
        ["logs", "--db", str(db), "wf", b"\xff"],
        ["trace", "--db", str(db), b"default/\xfe"],
    ):
        one_line_error(reader(*args, cwd=tmp_path))
    assert fingerprint(db) == before
    # A database whose name is not UTF-8 is read like any other.
    odd = tmp_path / os.fsdecode(b"site-\xff.db")
    os.link(db, odd)
    for command in (["status"], ["runs"], ["schedules"], ["logs", "wf", "a"], ["trace", "wf"]):
        done = reader(command[0], "--db", os.fsencode(odd), *command[1:], cwd=tmp_path)
        assert done.returncode == 0, done.stderr.decode("utf-8", "replace")[-2000:]
    assert b"hi" in reader("logs", "--db", os.fsencode(odd), "wf", "a", cwd=tmp_path).stdout
    assert fingerprint(db) == before


def damaged_copy(db: Path, name: str, old: bytes, new: bytes) -> Path:
    """A copy of ``db`` with every ``old`` in its bytes replaced by ``new`` (same length)."""
    assert len(old) == len(new)
    data = db.read_bytes()
    assert old in data
    copy = db.with_name(name)
    copy.write_bytes(data.replace(old, new))
    return copy


def test_text_damaged_inside_a_sound_page_gets_one_line_from_every_reader(tmp_path: Path) -> None:
    db = site_db(tmp_path)
    not_utf8 = damaged_copy(db, "not-utf8.db", b"echo hi", b"echo \xff\xfe")
    for command in (["runs"], ["runs", "--json"], ["logs", "wf", "a"], ["trace", "wf"]):
        before = fingerprint(not_utf8)
        done = reader(command[0], "--db", str(not_utf8), *command[1:], cwd=tmp_path)
        assert "corrupt" in one_line_error(done) and done.returncode == 3
        assert fingerprint(not_utf8) == before
    broken_json = damaged_copy(db, "span-json.db", b'"endTimeUnixNano"', b'"endTimeUnixNano\x01')
    before = fingerprint(broken_json)
    done = reader("trace", "--db", str(broken_json), "wf", cwd=tmp_path)
    assert "corrupt" in one_line_error(done) and done.returncode == 3
    assert fingerprint(broken_json) == before


def test_a_fifo_as_the_databases_journal_gets_one_line_not_a_hang(tmp_path: Path) -> None:
    suffix = "-journal"
    db = site_db(tmp_path)
    not_sqlite = tmp_path / "random.db"
    not_sqlite.write_bytes(os.urandom(3000))
    for path in (db, not_sqlite):
        os.mkfifo(path.with_name(path.name + suffix))
        before = fingerprint(path)
        for command in (["status"], ["runs"], ["schedules"], ["logs", "wf", "a"], ["trace", "wf"]):
            done = reader(command[0], "--db", str(path), *command[1:], cwd=tmp_path)
            assert done.returncode == 3 and suffix in one_line_error(done)
        done = reader("run-local", "--db", str(path), str(tmp_path / "wf.yaml"), cwd=tmp_path)
        assert done.returncode == 3 and suffix in one_line_error(done)
        assert fingerprint(path) == before
