"""Local services for the demo and the tests: real programs on loopback, started and stopped here.

``tideflow demo`` and the test suite need the same things — a Mosquitto broker,
a Kubernetes API server, a link to the broker that can be cut — so they live in
the distribution rather than under ``tests/`` (installed code must not import
tests), in the tooling layer (:mod:`tideflow.tools`) above the contract: no
contract module imports them (``.importlinter`` enforces it), and what only
they need (``cryptography``) comes with the ``demo`` extra:

* :mod:`~tideflow.tools.launchers.broker` — ``Mosquitto`` on a free loopback port;
* :mod:`~tideflow.tools.launchers.link` — ``LinkProxy``, a loopback TCP relay
  whose link can be cut and restored;
* :mod:`~tideflow.tools.launchers.cluster` — ``EnvtestCluster``, kube-apiserver
  + etcd the envtest way (no nodes; certificates from
  :mod:`~tideflow.tools.launchers.pki`), and ``find_kubectl``.

This module holds what both need: :func:`free_port`, and the Linux process
helpers that let a parent leave nothing behind — :func:`die_with_parent` and
:func:`stop_with_parent` (for ``preexec_fn``), :func:`become_subreaper`
(orphans of our children come back to us instead of to init),
:func:`descendants`, :func:`reap_zombies` and :func:`kill_descendants`;
and :class:`Janitor`, which removes a work directory after its owner's end,
``kill -9`` included.  They read ``/proc``; elsewhere they do nothing.

Like the rest of ``tideflow``, this package imports neither ``edge_agent`` nor
``tideflow_operator``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

__all__ = [
    "HOST",
    "Janitor",
    "become_subreaper",
    "descendants",
    "die_with_parent",
    "free_port",
    "kill_descendants",
    "reap_zombies",
    "stop_with_parent",
]

HOST = "127.0.0.1"

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (someone may take it before you bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _prctl(option: int, arg: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, arg, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent (thread) goes away.

    For ``subprocess.Popen(preexec_fn=die_with_parent)``.  The signal fires when
    the *thread* that started the child exits, so start such children from a
    thread that lives as long as they should (the main thread).
    """
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def stop_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent (thread) goes away.

    For children that stop cleanly on SIGTERM and have something of their own to
    stop (an agent's task processes, the edge demo's agents): SIGKILL would leave
    those behind when the parent itself was killed with ``kill -9``.  Same
    caveat as :func:`die_with_parent`.
    """
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux); True if it is.

    A process whose parent dies is normally re-parented to init, out of our
    reach: an edge agent killed with ``kill -9`` leaves its tasks' process
    groups behind.  As a subreaper we inherit them, so :func:`descendants`
    still finds them and :func:`kill_descendants` can end them.
    """
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) from ``/proc``; empty where there is no ``/proc``."""
    table: dict[int, tuple[int, str]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ..." — comm may hold spaces and parentheses.
        fields = stat.rpartition(")")[2].split()
        if len(fields) >= 2:
            table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants(
    pid: int | None = None, *, include_zombies: bool = False, spare: Collection[int] = ()
) -> list[int]:
    """Every process below ``pid`` (default: this process), parents before children.

    Processes in ``spare`` and everything below them are left out.
    """
    root = os.getpid() if pid is None else pid
    table = _process_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _state) in table.items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    queue = [c for c in children.get(root, []) if c not in spare]
    while queue:
        current = queue.pop(0)
        if include_zombies or table.get(current, (0, "Z"))[1] != "Z":
            found.append(current)
        queue.extend(c for c in children.get(current, []) if c not in spare)
    return found


def reap_zombies(keep: Collection[int] = ()) -> int:
    """Collect exited children of this process except ``keep`` (pids a Popen will wait for).

    A subreaper inherits orphans it never started; when they exit they stay
    zombies until someone waits for them.  Returns how many were collected.
    """
    reaped = 0
    me = os.getpid()
    for pid, (parent, state) in _process_table().items():
        if parent == me and state == "Z" and pid not in keep:
            with contextlib.suppress(ChildProcessError, OSError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped += 1
    return reaped


def kill_descendants(
    pid: int | None = None, *, spare: Collection[int] = (), timeout: float = 5.0
) -> list[int]:
    """SIGKILL every process below ``pid`` (default: this process) until none is left.

    Processes in ``spare`` and everything below them are left alone (a caller
    that is not the main program spares the children it had before).
    Processes forked while we kill are caught by the next round, and our
    zombie children are collected (except those in ``spare``: someone else's
    Popen will wait for them).  Returns the pids that were killed.
    """
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        alive = descendants(pid, spare=spare)
        if not alive or time.monotonic() > deadline:
            break
        for target in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(target, signal.SIGKILL)
                killed.append(target)
        time.sleep(0.02)
        if pid is None:
            reap_zombies(keep=spare)
    if pid is None:
        reap_zombies(keep=spare)
    return killed


class Janitor:
    """A process of its own that removes ``path`` once its owner (this process) is gone.

    For a ``kill -9`` of the owner, which runs nothing of its own: the directory
    (databases, logs, an etcd data directory) stayed for ever.  The janitor
    waits for the end of a pipe only the owner holds, then for every process
    still using the directory (its working directory in it, or its path on its
    command line: children told to stop at the owner's death) to be gone, 30 s
    at most, and removes it.  It runs in a session of its own (a Ctrl-C at the
    terminal is not for it); the owner spares it when it stops its descendants
    (:attr:`pid`) and ends it with :meth:`done`.
    """

    def __init__(self, path: Path) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tideflow.tools.launchers.janitor"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self._proc.pid
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{path}\n".encode())
        self._proc.stdin.flush()

    def done(self, *, keep: bool = False) -> None:
        """The owner ends: remove the directory now (unless ``keep``), and wait for that."""
        stdin = self._proc.stdin
        if stdin is not None and not stdin.closed:
            with contextlib.suppress(OSError):
                if keep:
                    stdin.write(b"keep\n")
                stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(10)
