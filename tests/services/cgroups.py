"""The cgroups agents under test leave behind, removed when the session ends.

An agent killed while idle leaves its free slots (decision 0043) and their
root; its next start on the same database removes them, but a test's
database is never used again, so every run of the suite added a few dozen
empty cgroups to the machine for good.  Only cgroups that appeared during the
session are touched, and only with ``rmdir``, which the kernel refuses for a
cgroup with a process or a child in it.

Never while another test session runs on the machine: its agents' roots
appear during this one too, and a slot an agent was killed in keeps the
attempt it ran for that agent's restart, which then ran the attempt again as
attempt 1.  Each session holds a shared ``flock`` on one file for its life and
cleans up only if it can turn that into an exclusive one, so a session
starting meanwhile waits for the clean-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from edge_agent.runner import own_cgroup_dir

SESSIONS_LOCK = Path(tempfile.gettempdir()) / "tideflow-test-sessions.lock"


def agent_cgroup_roots() -> set[Path]:
    """The agents' cgroup roots (``tideflow-<mark>``) beside this process's cgroup."""
    own = own_cgroup_dir()  # (where the agents it starts make theirs)
    if own is None:
        return set()
    with contextlib.suppress(OSError):
        return {p for p in own.iterdir() if p.name.startswith("tideflow-") and p.is_dir()}
    return set()


def remove_empty(root: Path) -> bool:
    """Remove ``root`` and the empty cgroups in it; True if it is gone."""
    with contextlib.suppress(OSError):
        for child in root.iterdir():
            if child.is_dir():
                with contextlib.suppress(OSError):
                    os.rmdir(child)
    try:
        os.rmdir(root)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


class SessionCleanup:
    """Taken at a session's start; :meth:`finish` at its end removes what its agents left."""

    def __init__(
        self,
        roots: Callable[[], set[Path]] = agent_cgroup_roots,
        lock: Path = SESSIONS_LOCK,
    ) -> None:
        self._roots = roots
        self._fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        fcntl.flock(self._fd, fcntl.LOCK_SH)  # (waits out another session's clean-up)
        self._before = roots()

    def finish(self) -> list[Path]:
        """The roots removed: none while another session holds its lock."""
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []
            return sorted(root for root in self._roots() - self._before if remove_empty(root))
        finally:
            os.close(self._fd)
