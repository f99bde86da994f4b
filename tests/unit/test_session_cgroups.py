"""The test session's cgroup clean-up never takes what another session's agents need.

A slot an agent was killed in keeps the attempt it ran (decision 0043): its
next start on the same database reads it, so that attempt counts as
interrupted and is not run again as attempt 1.  Two test sessions on one
machine (a developer's, a helper's) each saw the other's agents' roots appear,
and the first to end removed them between another test's kill and its
restart: that test's agent ran attempt 1 again.  Plain directories stand in for
the cgroups here (``rmdir`` refuses a non-empty one too).
"""

from __future__ import annotations

from pathlib import Path

from services.cgroups import SessionCleanup


def _roots_in(parent: Path) -> set[Path]:
    return {p for p in parent.iterdir() if p.name.startswith("tideflow-")}


def test_a_session_removes_what_appeared_during_it_when_it_is_alone(tmp_path: Path) -> None:
    cgroups = tmp_path / "cgroups"
    cgroups.mkdir()
    (cgroups / "tideflow-old").mkdir()
    session = SessionCleanup(lambda: _roots_in(cgroups), tmp_path / "sessions.lock")
    (cgroups / "tideflow-new" / "slot-1").mkdir(parents=True)
    (cgroups / "tideflow-busy" / "slot-1").mkdir(parents=True)
    (cgroups / "tideflow-busy" / "slot-1" / "nested").mkdir()  # stands for a process in it
    assert session.finish() == [cgroups / "tideflow-new"]
    assert sorted(p.name for p in cgroups.iterdir()) == ["tideflow-busy", "tideflow-old"]


def test_a_session_ending_while_another_runs_removes_nothing(tmp_path: Path) -> None:
    cgroups = tmp_path / "cgroups"
    cgroups.mkdir()
    lock = tmp_path / "sessions.lock"
    ending = SessionCleanup(lambda: _roots_in(cgroups), lock)
    running = SessionCleanup(lambda: _roots_in(cgroups), lock)
    # The running session's agent was killed mid-attempt: its slot holds the record.
    (cgroups / "tideflow-killed" / "slot-1").mkdir(parents=True)
    assert ending.finish() == []
    assert (cgroups / "tideflow-killed" / "slot-1").is_dir()
    # Once it ends alone, it removes what it left.
    assert running.finish() == [cgroups / "tideflow-killed"]
