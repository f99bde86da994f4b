"""Process supervision for the demo: every child in its own session, none left behind.

Each process the demo starts (the operator, the agents) runs in a session of
its own, so a Ctrl-C at the terminal reaches only the demo, which stops them
in order; each gets SIGTERM if the demo itself dies (``PR_SET_PDEATHSIG``): a
stop, so an agent ends its task processes and the operator gives its Lease
back.  (SIGKILL, as before, left an agent's tasks running on, orphans of init,
after a ``kill -9`` of the demo: they outlive their agent's SIGKILL by design.)
``kill -9`` of an agent takes its whole process group, as the story needs.
The subreaper and the last sweep of descendants are in
:mod:`tideflow.tools.launchers`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tideflow.tools import launchers
from tideflow.tools.demo.common import DemoError

__all__ = ["Processes"]


class Processes:
    """The demo's child processes: each in its own session, stopped if the demo dies."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.running: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}

    def start(
        self, name: str, argv: Sequence[str], *, log: Path, env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=dict(env),
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=launchers.stop_with_parent,
            )
        self.running[proc.pid] = (name, proc)
        return proc

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process group (the process and whatever shares its group)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 8.0) -> None:
        """SIGTERM, then SIGKILL of its group if it has not exited within ``timeout``."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self.kill9(proc)  # its group too: nothing of it may stay
        self.running.pop(proc.pid, None)

    def pids(self) -> set[int]:
        return set(self.running)

    def check_alive(self) -> None:
        for name, proc in list(self.running.values()):
            if proc.poll() is not None:
                raise DemoError(f"{name} (pid {proc.pid}) exited with status {proc.returncode}")
