"""The cgroups agents under test leave behind, removed when the session ends.

An agent killed while idle leaves its free slots (decision 0043) and their
root; its next start on the same database removes them, but a test's
database is never used again, so every run of the suite added a few dozen
empty cgroups to the machine for good.  Only cgroups that appeared during the
session are touched, and only with ``rmdir``, which the kernel refuses for a
cgroup with a process or a child in it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from edge_agent.runner import own_cgroup_dir


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
