"""What a test started left running: the processes under a pid, and which still live.

Stop tests (Ctrl-C, SIGTERM, kill -9 of the demo or an agent) note every
process under the one they stop while it runs, then ask which of those are
still alive afterwards.  A pid is matched with its start time, so a pid the
kernel reused for another process is not mistaken for one left behind.
They watch the stopped process's output for their moment (:func:`output_lines`).
"""

from __future__ import annotations

import queue
import subprocess
import threading

import psutil

Seen = dict[int, tuple[float, str]]  # pid -> (start time, command line)


def output_lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """``proc``'s output, a line at a time as it comes (read by a thread), then None."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def descendants(pid: int) -> Seen:
    """Every process under ``pid`` now, with its start time and command line."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    found = {}
    for child in children:
        try:
            found[child.pid] = (child.create_time(), " ".join(child.cmdline()))
        except psutil.Error:
            continue
    return found


def still_alive(seen: Seen) -> list[str]:
    """Those of ``seen`` still running (the same process, not a zombie): ``pid: cmdline``."""
    alive = []
    for pid, (created, cmdline) in seen.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid}: {cmdline}")
        except psutil.Error:
            continue
    return alive


def mentioning(text: str) -> list[str]:
    """Every live process whose command line holds ``text`` (a test's temp directory)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if text in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.info['pid']}: {cmdline}")
        except psutil.Error:
            continue
    return found
