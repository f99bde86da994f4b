"""The program of :class:`tideflow.tools.launchers.Janitor`: remove a directory after its owner.

Reads the directory from its first line of input, then whatever its owner
says until the owner's end closes the pipe (``kill -9`` included); "keep"
leaves the directory.  Then waits for every process still using the
directory (its working directory in it, or its path on its command line:
children told to stop at the owner's death) to be gone, ``USED_SECONDS`` at
most, and removes it.  Imports nothing but the standard library.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading

USED_SECONDS = 30.0
LOOK_SECONDS = 0.05


def _uses(pid: str, path: str) -> bool:
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = ""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
    except OSError:
        cmdline = ""
    return cwd == path or cwd.startswith(path + "/") or path in cmdline


def used(path: str) -> bool:
    """Whether a live process other than this one uses ``path`` (reads ``/proc``)."""
    me = str(os.getpid())
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    return any(e.isdigit() and e != me and _uses(e, path) for e in entries)


def main() -> int:
    path = sys.stdin.readline().rstrip("\n")
    if not path or "keep" in sys.stdin.read():
        return 0
    waited, pause = 0.0, threading.Event()
    while waited < USED_SECONDS and os.path.isdir(path) and used(path):
        pause.wait(LOOK_SECONDS)
        waited += LOOK_SECONDS
    shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
