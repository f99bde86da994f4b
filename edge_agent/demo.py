"""The edge-only demo: a workflow survives ``kill -9`` of its agent, with no cloud.

It runs ``tideflow-agent run-local`` on a sample workflow whose tasks append a
line to a journal file, kills the agent with SIGKILL in the middle of the run,
shows what the database remembers, starts the agent again on the same
database and lets it finish.  It ends with a verdict: every task that had
committed before the kill ran exactly once.

Stopping it: every process it starts runs in a session of its own and gets
SIGTERM if the demo dies (``PR_SET_PDEATHSIG``), ``kill -9`` included: an agent
then ends its attempts (SIGKILL left their processes running on); the demo is a child
subreaper, so the task processes the killed agent leaves behind come back to
it.  A Ctrl-C, SIGTERM or SIGHUP at any point (one ignored when the demo
starts stays ignored: ``nohup``) stops the agent that runs as a stop does
(SIGTERM: its attempts are killed and recorded Interrupted), SIGKILLs whatever
is left below the demo, then removes the temporary directory; the demo exits
130, as ``tideflow demo`` does on any stop.  (A first agent in a session of
its own never got the terminal's Ctrl-C and ran on in a deleted directory.)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import FrameType

import yaml

AGENT = [sys.executable, "-m", "edge_agent.cli"]
TASK_NAMES = ["extract", *(f"transform-{i}" for i in range(4)), "aggregate", "load", "report"]
EXIT_INTERRUPTED = 130  # any stop, as ``tideflow demo``
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


class Interrupted(KeyboardInterrupt):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP) arrived: stop everything, exit 130."""


def _prctl(option: int, arg: int) -> None:
    with contextlib.suppress(OSError, AttributeError):  # (not Linux: nothing to do)
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)


def _stop_with_parent() -> None:
    """SIGTERM (a stop: an agent ends its attempts) when the demo dies, even by kill -9.
    (SIGKILL left the task processes of the agent that ran going on, orphans of init:
    they outlive their agent's SIGKILL by design.)"""
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _children_of(parent: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    if int(stat.rpartition(")")[2].split()[1]) == parent:
                        found.append(int(entry))
    return found


class Children:
    """What the demo starts: each in its own session, stopped (and reaped) by :meth:`stop_all`."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []
        self.stop: signal.Signals | None = None  # noted here before anything is raised
        self.stopping = False

    def check(self) -> None:
        """Raise :class:`Interrupted` if a stop signal arrived (its exception may be lost:
        Python drops one raised inside an at-fork hook while a child starts)."""
        if self.stop is not None:
            raise Interrupted(self.stop.name)

    def start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=_stop_with_parent)
        self.running.append(proc)
        self.check()
        return proc

    def wait(self, proc: subprocess.Popen[bytes]) -> int:
        while True:
            self.check()
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(0.2)
                self.running.remove(proc)
                return code

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        os.kill(proc.pid, signal.SIGKILL)  # the agent alone: its tasks run on, as after a crash
        proc.wait()
        self.running.remove(proc)

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM what runs (an agent stops its attempts), then SIGKILL everything below us."""
        for proc in self.running:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in self.running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        self.running.clear()
        # Whatever is left below us: a child that did not stop, its session's processes,
        # and task processes of a killed agent (ours as a subreaper), each with its group.
        for _round in range(50):
            left = _children_of(os.getpid())
            if not left:
                break
            for pid in left:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, 0)


def _manifest(journal: Path) -> dict[str, object]:
    def step(name: str, deps: list[str], seconds: float) -> dict[str, object]:
        return {
            "name": name,
            "dependsOn": deps,
            "command": ["sh", "-c", f'sleep {seconds}; echo "$0" >> "$1"', name, str(journal)],
        }

    tasks = [
        step("extract", [], 0.8),
        *(step(f"transform-{i}", ["extract"], 0.6 + 0.2 * i) for i in range(4)),
        step("aggregate", [f"transform-{i}" for i in range(4)], 0.8),
        step("load", ["aggregate"], 0.8),
        step("report", ["load"], 0.4),
    ]
    return {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "demo-etl", "namespace": "plant-7"},
        "spec": {"defaults": {"retry": {"limit": 2}}, "tasks": tasks},
    }


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _succeeded_tasks(db: Path) -> set[str]:
    import sqlite3

    if not db.exists():  # killed before it made its database: nothing committed
        return set()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT task FROM task_runs WHERE phase='Succeeded'").fetchall()
    return {row[0] for row in rows}


def _wait_for_first_task(journal: Path, agent: subprocess.Popen[bytes], children: Children) -> None:
    """Until the first task has written its line (mid-run on any machine, loaded or not)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and agent.poll() is None:
        children.check()
        if journal.exists() and journal.read_text().split():
            time.sleep(0.3)  # the transforms have started: the kill lands mid-run
            return
        time.sleep(0.05)


def main() -> int:
    children = Children()

    def stop(signum: int, _frame: FrameType | None) -> None:
        if children.stop is None:
            children.stop = signal.Signals(signum)
            if not children.stopping:  # (while they are stopped: noted, nothing raised)
                children.check()

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:  # (nohup; a shell's background job and SIGINT)
            signal.signal(sig, stop)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    code = EXIT_INTERRUPTED
    try:
        with tempfile.TemporaryDirectory(prefix="tideflow-demo-") as tmp:
            try:
                code = _story(Path(tmp), children)
            finally:
                children.stopping = True  # the directory goes only after them
                children.stop_all()
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if children.stop is not None:
        print("\ninterrupted: stopped everything the demo started", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


def _story(work: Path, children: Children) -> int:
    journal, db, manifest = work / "journal.txt", work / "site.db", work / "workflow.yaml"
    manifest.write_text(yaml.safe_dump(_manifest(journal), sort_keys=False))
    _banner("Tideflow edge agent: run a workflow with no cloud, kill -9 the agent mid-run")
    print(textwrap.indent(manifest.read_text(), "    "))
    cmd = [*AGENT, "run-local", str(manifest), "--db", str(db), "--concurrency", "2"]
    first = children.start(cmd)
    _wait_for_first_task(journal, first, children)
    _banner(f"kill -9 the agent (pid {first.pid}) while tasks are running")
    children.kill9(first)
    committed = _succeeded_tasks(db)
    print(f"committed before the kill: {', '.join(sorted(committed)) or 'nothing yet'}")
    children.wait(children.start([*AGENT, "status", "--db", str(db)]))
    _banner("start the agent again on the same database: it resumes")
    code = children.wait(children.start(cmd))
    children.check()
    lines = journal.read_text().split()
    _banner("journal (one line per task execution)")
    print("    " + " ".join(lines))
    repeated_committed = sorted(t for t in committed if lines.count(t) != 1)
    all_ran = all(name in lines for name in TASK_NAMES)
    ok = code == 0 and not repeated_committed and all_ran
    _banner(
        "verdict: "
        + (
            "OK — the run finished, and no task that had committed before the kill ran again"
            if ok
            else f"FAILED (exit {code}, re-ran: {repeated_committed}, all ran: {all_ran})"
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
