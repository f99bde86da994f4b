"""``python -m edge_agent.demo`` stopped by Ctrl-C, SIGTERM or SIGHUP leaves nothing running.

The edge-only demo (what ``tideflow demo`` tells when there is no cluster, and
a command of its own) starts agents and, through them, task processes, inside
a temporary directory.  Its first agent ran in a session of its own, so a
Ctrl-C at the terminal (SIGINT to the foreground process group) never reached
it: the demo ended, deleted its directory, and the agent ran on; the
restarted agent, in the demo's own group, was SIGKILLed by ``subprocess.run``
on the Ctrl-C, its task processes left running.  A SIGTERM or SIGHUP sent to
the demo alone (``kill``, a closed terminal) left whichever agent ran.

Proves, with the real command: a Ctrl-C (SIGINT to the demo's process group)
while the first agent runs, a SIGTERM to the demo alone while the restarted
agent runs, and a SIGHUP to the demo alone while the first agent runs each
end the demo with 130 (as ``tideflow demo``: any stop is an interruption,
:mod:`tideflow.tools.demo.story`), with every process it started, and every
task process under them, gone, and its directory removed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services.process_tree import descendants, mentioning, output_lines, still_alive

DEMO = [sys.executable, "-m", "edge_agent.demo"]
FIRST = "=== kill -9 the agent (pid"  # printed just before the first agent is killed
SECOND = "start the agent again on the same database"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("sig", "group", "stage"),
    [
        (signal.SIGINT, True, "first"),  # Ctrl-C at the terminal, before the kill -9
        (signal.SIGTERM, False, "second"),  # kill <demo pid>, while the agent resumes
        (signal.SIGHUP, False, "first"),  # the terminal went away
    ],
    ids=["ctrl-c-first-agent", "sigterm-restarted-agent", "sighup-first-agent"],
)
def test_a_stop_ends_the_edge_demo_with_130_and_nothing_it_started(
    tmp_path: Path, sig: signal.Signals, group: bool, stage: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
    env["TMPDIR"] = str(tmp_path)
    demo = subprocess.Popen(
        DEMO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=env,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )
    lines = output_lines(demo)
    output: list[str] = []
    seen: dict[int, tuple[float, str]] = {}
    deadline = time.monotonic() + 60
    reached = False
    try:
        while True:
            now = descendants(demo.pid)
            seen.update(now)
            tasks_running = any("sleep" in cmdline for _, cmdline in now.values())
            if reached and tasks_running:
                break
            try:
                line = lines.get(timeout=0.02)
            except queue.Empty:
                assert time.monotonic() < deadline, "".join(output)
                continue
            assert line is not None, "the demo ended first:\n" + "".join(output)
            output.append(line)
            if stage == "second" and SECOND in line:
                reached = True
            if stage == "first" and "=== Tideflow edge agent" in line:
                reached = True
            assert stage != "first" or FIRST not in line, "too late:\n" + "".join(output)
        assert any("run-local" in cmdline for _, cmdline in now.values()), now
        if group:
            os.killpg(demo.pid, sig)  # what Ctrl-C at a terminal does
        else:
            os.kill(demo.pid, sig)
        code = demo.wait(60)
        time.sleep(0.5)  # (a process left behind would still be there; a dying one is gone)
        # Judged now: one left behind holds the pipe, so the output's end waits for it.
        alive, named = still_alive(seen), mentioning(str(tmp_path))
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
    with contextlib.suppress(queue.Empty):
        while (line := lines.get(timeout=10)) is not None:
            output.append(line)
    text = "".join(output)
    assert alive == [], text
    assert named == [], text
    assert code == 130, text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tideflow-")], text


@pytest.mark.timeout(120)
def test_kill_minus_nine_of_tideflow_demo_stops_its_edge_story_too(tmp_path: Path) -> None:
    """``tideflow demo`` with no cluster tells the edge story through ``edge_agent.demo``;
    killed with ``kill -9`` (nothing of it runs again), that story ran on to its
    end without it, its agents and their tasks with it, in a directory nobody
    would remove.  Now it is told to stop (SIGTERM at its parent's death) and
    stops what it started; and the demo's work directory, which nothing removed
    after its kill -9, goes once nothing uses it (its janitor process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
    env.update(
        TMPDIR=str(tmp_path),
        KUBECONFIG=str(tmp_path / "no-kubeconfig"),
        KUBEBUILDER_ASSETS=str(tmp_path / "no-assets"),
    )
    demo = subprocess.Popen(
        [sys.executable, "-m", "tideflow.cli", "demo", "--ci"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
    )
    lines = output_lines(demo)
    output: list[str] = []
    seen: dict[int, tuple[float, str]] = {}
    deadline = time.monotonic() + 60
    try:
        while True:
            now = descendants(demo.pid)
            seen.update(now)
            if any("run-local" in c for _, c in now.values()) and any(
                "sleep" in c for _, c in now.values()
            ):
                break
            with contextlib.suppress(queue.Empty):
                line = lines.get(timeout=0.02)
                assert line is not None, "the demo ended first:\n" + "".join(output)
                output.append(line)
            assert time.monotonic() < deadline, "".join(output)
        os.kill(demo.pid, signal.SIGKILL)
        demo.wait(10)
        ended = time.monotonic() + 30
        while (line := lines.get(timeout=max(0.1, ended - time.monotonic()))) is not None:
            output.append(line)  # (until every holder of the pipe is gone)
        text = "".join(output)
        time.sleep(0.5)
        assert still_alive(seen) == [], text
        assert mentioning(str(tmp_path)) == [], text
        assert "=== verdict" not in text, "the edge story ran on without its parent:\n" + text
        removed_by = time.monotonic() + 20
        while [p for p in tmp_path.iterdir() if p.name.startswith("tideflow-")]:
            assert time.monotonic() < removed_by, list(tmp_path.iterdir())
            time.sleep(0.1)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)


@pytest.mark.timeout(60)
def test_kill_minus_nine_of_the_edge_demo_stops_its_agents_tasks(tmp_path: Path) -> None:
    """``kill -9`` of ``python -m edge_agent.demo`` itself while its first agent runs
    tasks: its agents got SIGKILL at its death (``PR_SET_PDEATHSIG``) and their task
    processes, which outlive an agent's SIGKILL by design, ran on as orphans of
    init, appending to a journal nobody reads.  Now its agents get SIGTERM at its
    death, as ``tideflow demo``'s do: a stop, which ends an agent's attempts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
    env["TMPDIR"] = str(tmp_path)
    demo = subprocess.Popen(
        DEMO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
    )
    seen: dict[int, tuple[float, str]] = {}
    deadline = time.monotonic() + 40
    try:
        while True:  # two tasks (extract's dependants) running under the first agent
            assert demo.poll() is None, "the demo ended first"
            assert time.monotonic() < deadline
            now = descendants(demo.pid)
            seen.update(now)
            if sum("transform-" in c for _, c in now.values()) >= 2:
                break
            time.sleep(0.01)
        os.kill(demo.pid, signal.SIGKILL)
        demo.wait(10)
        time.sleep(0.4)  # an agent stops its attempts at once; a task sleeps 0.6 to 1.2 s
        assert [c for c in still_alive(seen) if "sleep" in c or "transform-" in c] == []
        stopped_by = time.monotonic() + 10
        while still_alive(seen) and time.monotonic() < stopped_by:
            time.sleep(0.1)
        assert still_alive(seen) == []
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
        for pid in seen:  # (a task left behind: not to outlive the test)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
