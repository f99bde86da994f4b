"""What the round-16 hostile pass left, each reproduced with real processes first.

* a task that makes cgroups of its own inside its slot, with a process in
  one: the slot could never be removed (``rmdir`` refuses a cgroup with
  children), and the agent's cgroup root stayed for good;
* a task that writes a huge starts file (``.tideflow/starts``) cost a
  restarted agent that much memory, twice (the whole file read, then
  decoded), when it read the file at the run's start;
* a line there with a digit that is not ASCII (``a ²``) made that read raise,
  and the restarted agent died on it at every start, the run never resumed.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from test_hostile_agent import db_tasks, explain, manifest
from test_hostile_round16 import (  # noqa: F401 (agent_cgroups: the fixture)
    EXIT_OK,
    agent_cgroups,
    cgroup2_mount,
    restarted_after_attempt_1_kills_the_agent,
    run_local,
)

from edge_agent.runner import STARTS_FILE, recorded_starts

NESTED_CGROUPS = """\
slot=$CGROUP2$(sed -n 's/^0:://p' /proc/self/cgroup)
mkdir -p "$slot/inner/deeper" "$slot/empty"
setsid sh -c 'echo $$ > "$1/inner/deeper/cgroup.procs" && exec sleep 300' - "$slot" &
until grep -q . "$slot/inner/deeper/cgroup.procs"; do :; done
"""


def test_cgroups_a_task_made_in_its_slot_are_removed_with_it(
    tmp_path: Path,
    agent_cgroups: Path,  # noqa: F811 (the fixture imported above)
) -> None:
    tasks = [
        {"name": "nest", "script": NESTED_CGROUPS, "env": {"CGROUP2": cgroup2_mount()}},
        {"name": "after", "dependsOn": ["nest"], "command": ["true"]},
    ]
    path = manifest(tmp_path / "wf.yaml", tasks)
    db = tmp_path / "s.db"
    done = run_local(path, db, timeout=30)
    assert done.returncode == EXIT_OK, explain(done)
    assert {task: row[0] for task, row in db_tasks(db).items()} == {
        "nest": "Succeeded",
        "after": "Succeeded",
    }
    left = (
        sorted(str(p.relative_to(agent_cgroups)) for p in agent_cgroups.rglob("*") if p.is_dir())
        if agent_cgroups.exists()
        else []
    )
    assert not agent_cgroups.exists(), left


def test_a_huge_starts_file_is_read_in_bounded_memory(tmp_path: Path) -> None:
    workspace = tmp_path / "run.1"
    (workspace / ".tideflow").mkdir(parents=True)
    junk = b"x" * (1 << 20)
    with open(workspace / ".tideflow" / STARTS_FILE, "wb") as starts:
        starts.write(b"a 1\n")
        for _ in range(48):  # 48 MiB with no line end: one line a task could write
            starts.write(junk)
        starts.write(b"\nb 2\na 3\n" + junk[:300] + b" 7\nb 1\n")
        # Not a start line the agent writes: a digit that is not ASCII (int() refused
        # it, and the run's recovery with it), more digits than int() takes.
        starts.write("c \u00b2\nc 1\nd ".encode() + b"9" * 5000 + b"\n")
    tracemalloc.start()
    try:
        latest = recorded_starts(workspace)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert latest == {"a": 3, "b": 2, "c": 1}
    assert peak < 4 << 20, f"{peak / (1 << 20):.0f} MiB held to read a 48 MiB starts file"


def test_a_starts_line_with_a_digit_int_refuses_does_not_stop_the_restarted_agent(
    tmp_path: Path,
) -> None:
    non_ascii_digit = r"printf 'k \302\262\n' >> .tideflow/starts"  # "k ²"
    restarted_after_attempt_1_kills_the_agent(tmp_path, non_ascii_digit)
