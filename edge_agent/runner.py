"""Running one task attempt as an operating-system process.

The executor decides *when* an attempt runs; this module decides *how*: the
program is started without a shell (unless the task's ``script`` asks for
one), in a session of its own so that a timeout or a cancel can kill the whole
process group (grandchildren included: SIGTERM, a grace period, SIGKILL), with
stdout/stderr in files whose tails are kept, and with ``$TIDEFLOW_OUTPUTS``
naming the file where the task writes ``key=value`` outputs.

Tasks start from a minimal environment (``BASE_ENV_NAMES``), never the
agent's own: an agent's credentials do not reach its tasks unless the
operator of the site passes them by name (``pass_env``).

Every attempt is marked so that a restarted agent can find what its
predecessor left running, whether or not the pid was ever checkpointed:
``TIDEFLOW_ATTEMPT_ID`` (``<agent mark>/<run>/<task>/<attempt>``) is in the
process's environment, and where the agent has a writable cgroup v2 subtree
each attempt runs in a cgroup of its own (a reused slot that records the
attempt while it runs: decision 0043), which also holds grandchildren that
left the process group with ``setsid``.  ``reap_orphans`` kills both kinds.

A runner is anything with an ``async run(AttemptRequest) -> AttemptResult``;
the benchmarks use an in-process no-op runner to measure the executor and the
store alone.

Longer than most modules (~800 lines) because an attempt's process, its
marks, its cgroup and the recovery that reads them back are one concern: the
way an attempt is started decides what a restarted agent can find, and the
two are kept side by side (the process itself is in ``edge_agent.child``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import functools
import hashlib
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edge_agent.child import Child
from edge_agent.threads import in_own_thread

log = logging.getLogger(__name__)

OUTPUTS_MAX_BYTES = 64 * 1024
PIPE_DRAIN_SECONDS = 2.0
# An idle agent removes its (empty) cgroup root this long after its last attempt.
ROOT_IDLE_SECONDS = 1.0
_OUTPUT_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")
# What a task inherits from the agent's environment by default.
BASE_ENV_NAMES = ("PATH", "HOME", "LANG", "LC_*", "TZ", "TMPDIR", "USER")
# Agent settings (and any secret they name) are never handed to tasks.
_WITHHELD_ENV_PREFIXES = ("TIDEFLOW_",)
ATTEMPT_ID_ENV = "TIDEFLOW_ATTEMPT_ID"
# fork/exec failures that say nothing about the task: the retry policy applies.
_TRANSIENT_SPAWN_ERRORS = frozenset(
    {errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ETXTBSY, errno.EINTR}
)
IDEMPOTENCY_KEY_ENV = "TIDEFLOW_IDEMPOTENCY_KEY"


class Abort(asyncio.Event):
    """An attempt's stop request: an :class:`asyncio.Event` that also resolves a future.

    The runner waits for the process's exit *or* this, through callbacks on
    futures: ``future()`` gives one without starting a task to
    wait on the event (a task made, stepped and cancelled per attempt).
    """

    _future: asyncio.Future[bool] | None = None

    def set(self) -> None:
        super().set()
        future = self._future
        if future is not None and not future.done():
            future.set_result(True)

    def clear(self) -> None:
        super().clear()
        if self._future is not None and self._future.done():
            self._future = None

    def future(self) -> asyncio.Future[bool]:
        """Resolved once the event is set (at once if it is); never cancel it."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            if self.is_set():
                self._future.set_result(True)
        return self._future


@dataclass
class AttemptRequest:
    run_id: str
    task: str
    attempt: int
    argv: list[str]
    env: dict[str, str]
    working_dir: str | None
    timeout: float | None
    scratch: Path
    grace_seconds: float = 5.0
    abort: asyncio.Event = field(default_factory=Abort)
    on_started: Callable[[int, str | None], None] = lambda pid, start: None


@dataclass
class AttemptResult:
    exit_code: int | None
    outputs: dict[str, str] = field(default_factory=dict)
    message: str | None = None
    logs: dict[str, bytes] = field(default_factory=dict)
    timed_out: bool = False
    aborted: bool = False
    permanent: bool = False  # retrying cannot help (e.g. the program does not exist)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.aborted


class TaskRunner(Protocol):
    async def run(self, request: AttemptRequest) -> AttemptResult: ...


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid``: tells a live process from a reused pid.

    Read with two system calls and no file object.  A task's start usually
    needs no read at all (:func:`bracketed_start_time`); recovery does.
    """
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # Fields after the command (which may hold spaces and ")"); starttime is the 22nd.
    fields = data[data.rfind(b")") + 2 :].split(b" ", 20)
    return fields[19].decode() if len(fields) > 20 else None


# The kernel counts a process's start time in clock ticks since boot (USER_HZ).
_TICK_NS = 1_000_000_000 // (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def bracketed_start_time(before_ns: int, after_ns: int) -> str | None:
    """The start time ``/proc/<pid>/stat`` will show, from ``CLOCK_BOOTTIME`` read
    just before and just after the process was created; None if they straddle a tick.

    The kernel stamps a new process with the boot-time clock and shows it in
    ``/proc`` as whole clock ticks (10 ms), rounded down, in the reader's time
    namespace, which is also the one ``clock_gettime`` reads.  A start takes a
    fraction of a millisecond, so both readings usually fall in the same tick:
    then that tick is the start time, and no ``/proc`` read is needed.
    """
    tick = before_ns // _TICK_NS
    return str(tick) if after_ns // _TICK_NS == tick else None


def kill_orphaned_group(pid: int | None, start: str | None) -> bool:
    """Kill the process group an interrupted agent left behind, if it still runs."""
    if pid is None or start is None or process_start_time(pid) != start:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
        return True
    return False


def agent_mark(work_dir: Path) -> str:
    """A short id for one agent database (its work directory), shared by its attempts."""
    return hashlib.sha256(str(work_dir.resolve()).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class OrphanAttempt:
    """An attempt found alive (and killed) that a previous agent process started."""

    run_id: str
    task: str
    attempt: int


# Above any attempt number the agent gives (a task's attempts are bounded by its
# retries, at most 100, and its interruptions in a row, at most 100, between
# two): a larger one that recovery reads (a starts line, an attempt id in a
# process's environment or on a slot) is a task's own writing, and one past
# SQLite's INTEGER stopped the restarted agent at every start.
ATTEMPT_NOTED_MAX = 2**31


def _parse_attempt_id(text: str, mark: str) -> OrphanAttempt | None:
    parts = text.split("/")
    if len(parts) != 4 or parts[0] != mark or len(parts[3]) > 10:
        return None
    try:
        attempt = int(parts[3])
    except ValueError:
        return None
    if not 1 <= attempt <= ATTEMPT_NOTED_MAX:
        return None
    return OrphanAttempt(parts[1], parts[2], attempt)


ATTEMPT_XATTR = "user.tideflow.attempt"
# What a slot keeps open: itself (for its xattr), cgroup.procs, cgroup.events.
_SLOT_FILES = (
    (".", os.O_RDONLY | os.O_DIRECTORY),
    ("cgroup.procs", os.O_WRONLY),
    ("cgroup.events", os.O_RDONLY),
)


@dataclass(eq=False)
class _Slot:
    """A reusable attempt cgroup (``slot-<index>``) and the descriptors kept on it."""

    path: Path
    index: int
    dir: int  # the slot itself, for its xattr (half the cost of one by path)
    procs: int  # its cgroup.procs, written once to move the agent in
    events: int  # its cgroup.events: "populated" in one pread
    broken: bool = False  # could not be joined: removed after its attempt, not reused

    def close(self) -> None:
        for fd in (self.dir, self.procs, self.events):
            with contextlib.suppress(OSError):
                os.close(fd)


class CgroupScope:
    """Attempt cgroups under the agent's own cgroup v2 directory.

    Only used where that directory is writable (a systemd unit with
    ``Delegate=yes``, a privileged pod, a root agent on a cgroup v2 host);
    elsewhere attempts are held by their process group and their mark alone.

    How an attempt's process gets into its cgroup before it runs anything
    (:meth:`ProcessRunner._spawn`): the agent moves itself into the attempt's
    cgroup, starts the process (``vfork``: the child is born in the cgroup the
    agent is in), and moves itself back to ``home``, its own cgroup: two writes
    to ``cgroup.procs``, ~30 us here.  The alternative, a ``preexec_fn`` that
    joins from inside the child, makes Python fork the whole agent instead of
    ``vfork`` (3-5 ms per task here, far more under load); it is kept only as the
    fallback.  A cgroup the agent could not leave is never killed nor removed.
    Left knowingly: a task that freezes its own cgroup (``cgroup.freeze``) in
    the moment before the agent is back out, microseconds after the ``exec``
    (milliseconds if the agent is not scheduled), freezes the agent with it.
    Only ``clone3(CLONE_INTO_CGROUP)`` starts a process in a cgroup without
    the parent in it, and CPython 3.11 on glibc 2.36 has no way to ask for it.
    A task runs with the agent's rights, and could as well freeze the agent's
    own cgroup (``/proc/$PPID/cgroup`` names it) at any time.

    Which cgroup (decision 0043): a slot, ``slot-<k>``, one per attempt running
    at once, made when none is free and kept while the agent is busy, with
    descriptors of its ``cgroup.procs`` and ``cgroup.events`` open; the attempt
    is recorded on it as the user xattr ``user.tideflow.attempt`` (its
    ``TIDEFLOW_ATTEMPT_ID``) before the process starts, and the record is
    removed once everything in the slot is gone.  A ``mkdir``, an ``rmdir`` and
    an ``open`` per attempt were most of what a short task cost above a bare
    spawn.  Where the kernel has no user xattrs on cgroups (before 5.7),
    ``slots`` is False and each attempt gets a cgroup of its own, named after
    its id, as before.  Recovery (:meth:`reap`) reads both.
    """

    def __init__(self, root: Path, home: Path | None = None, *, slots: bool = True) -> None:
        self.root = root
        self.home = home  # the agent's own cgroup (None: join from the child instead)
        self.stuck: Path | None = None  # an attempt cgroup the agent failed to leave
        self.slots = slots  # reusable slots with an xattr; False: a cgroup per attempt
        self._free: list[_Slot] = []  # the last one given back is taken first
        self._taken: dict[Path, _Slot] = {}
        self._lock = threading.Lock()  # slots are given back from worker threads too
        # An agent that ends (or a scope dropped) leaves no free slot and no empty root.
        weakref.finalize(self, _remove_free, self._free, self._lock, root)

    @classmethod
    def detect(cls, mark: str) -> CgroupScope | None:
        own = own_cgroup_dir()
        if own is None:
            return None
        root = own / f"tideflow-{mark}"
        try:
            root.mkdir(exist_ok=True)
        except OSError:
            return None
        usable = (root / "cgroup.kill").exists() and os.access(root / "cgroup.procs", os.W_OK)
        slots = usable and _xattrs_work(root)
        with contextlib.suppress(OSError):  # made again by the first attempt; kept if busy
            root.rmdir()
        return cls(root, own, slots=slots) if usable else None

    def take(self, attempt_id: str) -> Path | None:
        """The cgroup ``attempt_id`` starts in, its id recorded; None if there is none.

        A free slot (the one given back last: a chain runs in one slot), else a
        new one; a cgroup of the attempt's own where slots cannot be had.
        """
        if self.slots:
            slot = self._take_slot(attempt_id)
            if slot is not None:
                return slot.path
        return self.create(attempt_id.replace("/", ":"))

    def _take_slot(self, attempt_id: str) -> _Slot | None:
        while True:
            with self._lock:
                slot = self._free.pop() if self._free else None
            if slot is None or _populated(slot) is False:
                break
            # Removed under us (another agent's recovery on this mark removes every
            # empty cgroup), joined by something else or frozen: not ours any more
            # (removed if it is empty).
            self._drop(slot)
        if slot is None:
            slot = self._new_slot()
            if slot is None:
                return None
        try:
            os.setxattr(slot.dir, ATTEMPT_XATTR, attempt_id.encode())
        except OSError as exc:
            self._drop(slot)
            if exc.errno == errno.EOPNOTSUPP:
                log.warning("cgroups here take no user xattrs; one cgroup per attempt")
                self.slots = False
            else:
                log.warning("cannot record attempt %s on %s: %s", attempt_id, slot.path, exc)
            return None
        with self._lock:
            self._taken[slot.path] = slot
        return slot

    def _new_slot(self) -> _Slot | None:
        with self._lock:
            used = {slot.index for slot in (*self._free, *self._taken.values())}
        index = 0
        for _ in range(100):
            while index in used:
                index += 1
            path = self.root / f"slot-{index}"
            try:
                os.mkdir(path)
            except FileExistsError:  # not ours to reuse: left busy, or another agent's
                used.add(index)
                continue
            except FileNotFoundError:  # no root: the agent was idle
                try:
                    os.mkdir(self.root)
                except FileExistsError:
                    pass
                except OSError as exc:
                    log.warning("no cgroup slot: %s", exc)
                    return None
                continue
            except OSError as exc:
                log.warning("no cgroup slot: %s", exc)
                return None
            fds: list[int] = []
            try:
                for name, flags in _SLOT_FILES:
                    fds.append(os.open(path / name, flags | os.O_CLOEXEC))
            except OSError as exc:
                for fd in fds:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    os.rmdir(path)
                log.warning("no cgroup slot: %s", exc)
                return None
            return _Slot(path, index, fds[0], fds[1], fds[2])
        log.warning("no cgroup slot: no free name under %s", self.root)
        return None

    def _drop(self, slot: _Slot) -> None:
        """Forget ``slot`` and remove it if it is empty."""
        self._forget(slot)
        with contextlib.suppress(OSError):
            _remove_cgroup(slot.path)

    def enter(self, path: Path) -> None:
        """Move the agent (every thread) into ``path``; raises OSError if it cannot."""
        slot = self._taken.get(path)
        if slot is None:
            _write_procs(path)
            return
        try:
            os.write(slot.procs, b"0")
        except OSError:
            self.spoil(path)
            raise

    def spoil(self, path: Path) -> None:
        """``path`` could not be joined: if it is a slot, it is not used again."""
        slot = self._taken.get(path)
        if slot is not None:
            slot.broken = True

    def leave(self, path: Path) -> bool:
        """Move the agent back to its own cgroup; False (and ``path`` is left alone
        for good) if that failed and the agent is still in ``path``."""
        assert self.home is not None
        try:
            _write_home_procs(self.home)
        except OSError as exc:
            log.error(
                "could not move the agent back to its cgroup %s (%s); attempts now join "
                "their cgroups from the child, and %s is never removed",
                self.home, exc.strerror, path,
            )  # fmt: skip
            self.stuck, self.home = path, None
            return False
        return True

    def give_back(self, path: Path, timeout: float = 5.0, *, wait: bool = True) -> bool:
        """Kill what an attempt left in its cgroup and free the cgroup.

        A slot's record of the attempt goes once nothing is left in it, and the
        slot serves the next attempt; an attempt's own cgroup, or a slot that
        cannot be reused, is removed (:meth:`destroy`).  ``wait=False``: one
        look, no sleeping (on the event loop); False if processes are still
        dying (call again with ``wait``).  True once done, or left in place for
        good: busy past ``timeout``, or holding the agent (never killed, never
        reused); such a slot keeps its record, as a cgroup named after its
        attempt would have kept its name.
        """
        slot = self._taken.get(path)
        if slot is None:
            return self.destroy(path, timeout, wait=wait)
        if path == self.stuck:  # the agent itself is in it
            self._forget(slot)
            return True
        busy = None if slot.broken else _populated(slot)
        if busy:
            _kill_all(path)
            deadline = time.monotonic() + timeout
            while busy:
                if not wait:
                    return False
                if time.monotonic() > deadline:
                    log.warning("cgroup %s still busy; left in place", path)
                    self._forget(slot)
                    return True
                time.sleep(0.01)
                busy = _populated(slot)
        if busy is None or not _unrecord(slot.dir):
            # Spoiled, unreadable, frozen or its record stuck: not reused, removed instead.
            if not self.destroy(path, timeout, wait=wait) and not wait:
                return False
            self._forget(slot)
            return True
        with self._lock:
            del self._taken[path]
            self._free.append(slot)
        return True

    def _forget(self, slot: _Slot) -> None:
        slot.close()
        with self._lock:
            self._taken.pop(slot.path, None)

    def create(self, name: str) -> Path | None:
        """Make the attempt's cgroup (and the root, if it is not there); None if impossible.

        One ``mkdir`` when the root exists, as it does while attempts come and go:
        attempts never remove it (:meth:`remove_root` does, once the agent is idle).
        """
        path = self.root / name
        for _ in range(10):  # the root may be removed (idle) by a concurrent remove_root
            try:
                os.mkdir(path)
                return path
            except FileExistsError:  # left by an attempt of the same id (it is empty)
                return path
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("no cgroup for attempt %s: %s", name, exc)
                return None
            try:
                os.mkdir(self.root)
            except FileExistsError:
                continue
            except OSError as exc:
                log.warning("no cgroup for attempt %s: %s", name, exc)
                return None
        log.warning("no cgroup for attempt %s: its root kept disappearing", name)
        return None

    def remove_root(self) -> bool:
        """Remove the free slots, then the scope's root if nothing else is left in
        it; True if gone."""
        return _remove_free(self._free, self._lock, self.root)

    def destroy(self, path: Path, timeout: float = 5.0, *, wait: bool = True) -> bool:
        """Kill everything left in ``path`` (setsid grandchildren too) and remove it.

        ``wait=False``: one try, no sleeping (on the event loop); False if the
        cgroup is still busy (its processes are dying), and it is left in place.
        """
        if path == self.stuck:  # the agent itself is in it
            return False
        # Most often the attempt left nothing behind: an empty cgroup is removed at
        # once, and there was nothing to kill.  (The root stays: see remove_root.)
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            pass
        _kill_all(path)
        deadline = time.monotonic() + timeout
        while True:
            try:
                _remove_cgroup(path)
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if not wait:
                    return False
                if time.monotonic() > deadline:
                    log.warning("cgroup %s still busy; left in place", path)
                    return False
                time.sleep(0.01)

    def reap(self, mark: str) -> list[OrphanAttempt]:
        found: list[OrphanAttempt] = []
        try:
            children = [p for p in self.root.iterdir() if p.is_dir()]
        except OSError:
            return found
        for child in children:
            # Alive or not, a cgroup left behind with an attempt recorded (a slot's
            # xattr, or the name of an agent of the previous version's cgroup) is an
            # attempt that was started and whose end the agent did not see through
            # (it removes the record after each one).  A slot without one held none.
            recorded = _recorded_attempt(child) or child.name.replace(":", "/")
            attempt = _parse_attempt_id(recorded, mark)
            if attempt is not None:
                found.append(attempt)
            self.destroy(child)
        with contextlib.suppress(OSError):
            self.root.rmdir()
        return found


def _remove_free(free: list[_Slot], lock: threading.Lock, root: Path) -> bool:
    """:meth:`CgroupScope.remove_root`, also run when the agent ends."""
    with lock:
        slots = free[:]
        free.clear()
    for slot in slots:
        slot.close()
        with contextlib.suppress(OSError):
            _remove_cgroup(slot.path)
    try:
        root.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _remove_cgroup(path: Path) -> None:
    """``rmdir`` a cgroup, and first the cgroups a task made inside it; raises as
    ``os.rmdir`` does (``EBUSY`` while a process is left in any of them).

    A task may make cgroups of its own in its slot (it runs with the agent's
    rights): ``rmdir`` refuses a cgroup with children, and the slot, then the
    agent's root, stayed for good.  Deepest first, without recursion (a task
    can nest them as deep as it likes); only when the plain ``rmdir`` failed.
    """
    try:
        os.rmdir(path)
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    found: list[str] = []
    pending = [os.fspath(path)]
    while pending:
        with contextlib.suppress(OSError), os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    found.append(entry.path)
                    pending.append(entry.path)
    for inner in reversed(found):  # a cgroup is found after its parent
        with contextlib.suppress(OSError):
            os.rmdir(inner)
    os.rmdir(path)


def _kill_all(cgroup: Path) -> None:
    """SIGKILL everything in ``cgroup`` (``cgroup.kill``); nothing if it is no cgroup."""
    with contextlib.suppress(OSError):  # never created: only a cgroup has this file
        fd = os.open(cgroup / "cgroup.kill", os.O_WRONLY)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)


def _populated(slot: _Slot) -> bool | None:
    """Whether anything is left in ``slot`` (one pread); None if it cannot be read,
    or if it is frozen.

    A task can freeze its own cgroup (``cgroup.freeze``), and the freeze outlives
    it: the agent, which moves itself into a slot to start the next attempt,
    would freeze for good there.  A frozen slot is never reused.
    """
    try:
        events = os.pread(slot.events, 64, 0)
    except OSError:
        return None
    if b"frozen 1" in events:
        return None
    return b"populated 1" in events


def _unrecord(cgroup: int) -> bool:
    """Remove the attempt recorded on ``cgroup`` (a descriptor); False if it stays."""
    try:
        os.removexattr(cgroup, ATTEMPT_XATTR)
    except OSError as exc:
        return exc.errno == errno.ENODATA
    return True


def _recorded_attempt(cgroup: Path) -> str | None:
    try:
        return os.getxattr(cgroup, ATTEMPT_XATTR).decode(errors="replace")
    except OSError:  # none recorded (ENODATA), or no user xattrs here
        return None


def _xattrs_work(cgroup: Path) -> bool:
    """Whether the kernel keeps user xattrs on cgroups (Linux 5.7+)."""
    try:
        os.setxattr(cgroup, ATTEMPT_XATTR, b"probe")
        os.removexattr(cgroup, ATTEMPT_XATTR)
    except OSError as exc:
        log.info("no user xattrs on cgroups (%s): one cgroup per attempt", exc.strerror)
        return False
    return True


def own_cgroup_dir() -> Path | None:
    """This process's cgroup v2 directory, if it can write there (else None)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    mount = next(
        (line.split()[4] for line in mounts if " - cgroup2 " in line),
        None,
    )
    if own is None or mount is None:
        return None
    path = Path(mount) / own.lstrip("/")
    return path if path.is_dir() and os.access(path, os.W_OK) else None


def reap_orphans(mark: str, cgroups: CgroupScope | None = None) -> list[OrphanAttempt]:
    """Kill every process a previous agent on this database left running.

    Found by cgroup (everything, where cgroups are available) and by the
    ``TIDEFLOW_ATTEMPT_ID`` mark in each process's environment (everything
    that kept the environment it was started with).  Called before any attempt
    of this agent starts, so nothing of ours carries the mark yet.
    """
    found: dict[OrphanAttempt, None] = {}
    if cgroups is not None:
        found.update(dict.fromkeys(cgroups.reap(mark)))
    needle = f"{ATTEMPT_ID_ENV}={mark}/".encode()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:
            continue
        at = environ.find(needle)
        if at < 0 or (at > 0 and environ[at - 1] != 0):
            continue
        value = environ[at + len(ATTEMPT_ID_ENV) + 1 :].split(b"\0", 1)[0]
        pid = int(entry)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
        attempt = _parse_attempt_id(value.decode(errors="replace"), mark)
        if attempt is not None:
            found[attempt] = None
    return list(found)


STARTS_FILE = "starts"
#: The agent's own files in a run's workspace: the starts file, each attempt's outputs.
RUN_FILES = ".tideflow"
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW


class RunFilesRefused(OSError):
    """A run's workspace or its ``.tideflow`` is a symbolic link or not a directory."""


def open_run_files(workspace: str, *, make: bool = False) -> int:
    """A descriptor of the run's ``.tideflow`` directory, reached through no symlink.

    The workspace (``<work dir>/<run id>``) is its tasks' working directory, so a
    task can replace it, or its ``.tideflow``, with a symbolic link: the agent's
    own writes there (the starts file, the removal of a stale outputs file) and
    its reads (the outputs) went wherever the link pointed.  Both are opened
    with ``O_NOFOLLOW`` (the work dir above them is the agent's, resolved at
    its start), and the files inside relative to the result.  ``make``: create
    what is missing (the run's first attempt).  Raises FileNotFoundError (not
    made yet), :class:`RunFilesRefused` (its ``strerror`` names the path) or
    another OSError.
    """
    top = _open_directory(workspace, None, make=make, shown=workspace)
    try:
        return _open_directory(RUN_FILES, top, make=make, shown=f"{workspace}/{RUN_FILES}")
    finally:
        os.close(top)


def _open_directory(path: str, dir_fd: int | None, *, make: bool, shown: str) -> int:
    for last_try in (not make, True):
        try:
            return os.open(path, _DIRECTORY_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            if last_try:
                raise
        except OSError as exc:
            # (A symlink is ENOTDIR with O_DIRECTORY, ELOOP without: say which it is.)
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            try:
                link = stat.S_ISLNK(os.lstat(path, dir_fd=dir_fd).st_mode)
            except OSError:
                link = False
            if link:
                raise RunFilesRefused(exc.errno, f"{shown} is a symbolic link; refused") from None
            raise RunFilesRefused(exc.errno, f"{shown} is not a directory") from None
        if dir_fd is None:
            os.makedirs(path, exist_ok=True)  # (the work dir too, the first time)
        else:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, dir_fd=dir_fd)
    raise AssertionError("unreachable")


def note_start(run_files: int, task: str, attempt: int) -> None:
    """Note, before the process exists, that ``attempt`` of ``task`` is starting.

    One appended line in the run's ``.tideflow`` (``run_files``, from
    :func:`open_run_files`), not synced: it survives the agent's own death
    (``kill -9``, OOM) though not the machine's.  Recovery reads it
    (:func:`recorded_starts`) so an attempt that took the agent down before its
    Running checkpoint committed, and left nothing alive to find, still counts
    as interrupted: TIDEFLOW_ATTEMPT increases, and the crash-loop bound holds
    on hosts without cgroups.  A failure is logged, not raised.
    """
    try:
        # Never blocks, never follows: a task may have put a FIFO (an open for
        # writing waited for a reader, on the event loop, for ever) or a symlink
        # there.  Such a file is not written (ENXIO, ELOOP): logged below.
        fd = os.open(
            STARTS_FILE,
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW,
            0o644,
            dir_fd=run_files,
        )
    except OSError as exc:
        log.warning("could not note the start of %s attempt %d: %s", task, attempt, exc.strerror)
        return
    try:
        os.write(fd, f"{task} {attempt}\n".encode())
    except OSError as exc:
        log.warning("could not note the start of %s attempt %d: %s", task, attempt, exc.strerror)
    finally:
        os.close(fd)


def recorded_starts(workspace: Path) -> dict[str, int]:
    """The highest attempt :func:`note_start` noted per task of a run's workspace.

    A regular file only (a task may have put a FIFO there: a blocking read of
    it held its thread, and so the agent's exit, for ever), read a window at a
    time: the task may also have written gigabytes there, which were read
    whole, then decoded.  A line longer than any the agent writes is skipped.
    Nothing is read through a symbolic link (:func:`open_run_files`).
    """
    try:
        run_files = open_run_files(os.fspath(workspace))
    except RunFilesRefused as exc:
        log.warning("the run's starts are not read: %s", exc.strerror)
        return {}
    except OSError:
        return {}
    try:
        fd = os.open(STARTS_FILE, _READ_FLAGS, dir_fd=run_files)
    except OSError:
        return {}
    finally:
        os.close(run_files)
    latest: dict[str, int] = {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            where = f"{workspace}/{RUN_FILES}/{STARTS_FILE}"
            log.warning("%s is not a regular file; ignored", where)
            return {}
        carried = b""  # the start of a line the last window cut
        while window := os.read(fd, _STARTS_WINDOW):
            lines = (carried + window).split(b"\n")
            carried = lines.pop()
            if len(carried) > _STARTS_LINE_MAX:
                carried = _TOO_LONG
            for line in lines:
                _note_start_line(latest, line)
        _note_start_line(latest, carried)
    except OSError:
        return {}
    finally:
        os.close(fd)
    return latest


_STARTS_WINDOW = 1 << 16
# A task name is a DNS label (63 bytes): "<task> <attempt>" fits easily.
_STARTS_LINE_MAX = 256
_TOO_LONG = b"\0"  # stands for a cut line until its end: never a valid one


def _note_start_line(latest: dict[str, int], line: bytes) -> None:
    if len(line) > _STARTS_LINE_MAX or line.startswith(_TOO_LONG):
        return
    task, _, number = line.decode("utf-8", "replace").partition(" ")
    # ("²".isdigit(), and int() refuses it)
    if number.isascii() and number.isdigit() and int(number) <= ATTEMPT_NOTED_MAX:
        latest[task] = max(latest.get(task, 0), int(number))


def read_outputs_file(path: Path) -> dict[str, str]:
    """Read a task's outputs file: at most the bound, a regular file only.

    Runs in a worker thread (never on the event loop); a FIFO, a device or a
    symlink in its place is refused rather than opened for a blocking read.
    """
    return _read_outputs_at(os.fspath(path), None)


def read_run_outputs(workspace: str, name: str) -> dict[str, str]:
    """:func:`read_outputs_file` of ``name`` in the run's ``.tideflow``, reached
    through no symbolic link (:func:`open_run_files`).  In a worker thread."""
    try:
        run_files = open_run_files(workspace)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise OutputsError(f"cannot open outputs file: {exc.strerror}") from None
    try:
        return _read_outputs_at(name, run_files)
    finally:
        os.close(run_files)


def _read_outputs_at(path: str, dir_fd: int | None) -> dict[str, str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise OutputsError(f"cannot open outputs file: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutputsError("outputs file is not a regular file; ignored")
        chunks: list[bytes] = []
        remaining = OUTPUTS_MAX_BYTES + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    return parse_outputs(b"".join(chunks))


class OutputsError(Exception):
    """The task's outputs file could not be taken."""


def parse_outputs(data: bytes) -> dict[str, str]:
    outputs: dict[str, str] = {}
    if len(data) > OUTPUTS_MAX_BYTES:
        # Keep only whole lines: a value cut at the bound would be wrong, not short.
        data = data[: data.rfind(b"\n", 0, OUTPUTS_MAX_BYTES + 1) + 1]
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if sep and _OUTPUT_KEY.fullmatch(key):
            outputs[key] = value
    return outputs


def task_environment(extra: dict[str, str], base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(base) if base is not None else inherited_environment()
    env.update(extra)
    return env


def inherited_environment(
    pass_env: Iterable[str] = (), environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """What every task starts from: the base names plus those the site passes.

    ``pass_env`` holds names or shell-style patterns (``AWS_*``); the agent's
    own ``TIDEFLOW_*`` settings are never passed, whatever the patterns say.
    """
    source = os.environ if environ is None else environ
    patterns = (*BASE_ENV_NAMES, *pass_env)
    return {
        key: value
        for key, value in source.items()
        if not key.startswith(_WITHHELD_ENV_PREFIXES)
        and any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)
    }


def use_pidfd_child_watcher() -> bool:
    """Watch task processes through pidfds, not one thread per process (Python 3.11).

    Python 3.11's default child watcher starts a thread for every child.  When
    a task's fork bomb has taken every process slot, that thread cannot start
    although the child did: ``create_subprocess_exec`` raised "can't start new
    thread", the child ran on unwatched and the agent died.  Python 3.12+
    uses pidfds by itself.  Call from inside the running loop; True if installed
    (then ``asyncio.set_child_watcher(None)`` before the loop ends).
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # pidfds not allowed here (an old kernel, a seccomp filter)
        return False
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)
    return True


async def _terminate_group(child: Child, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(child.exited(), grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    await child.exited()


class ProcessRunner:
    """Runs attempts as real processes, each in its own session.

    The inherited environment is read once, when the runner is made.

    The working directory is the run's workspace (shared by its tasks, made
    once per run) unless the task sets ``workingDir``; outputs go to a file
    per attempt that the task creates only if it has outputs; stdout and
    stderr are read through pipes into bounded tails.  Creating files and
    directories per attempt cost more than the process itself on ext4.
    """

    def __init__(
        self,
        *,
        mark: str = "local",
        pass_env: Iterable[str] = (),
        cgroups: CgroupScope | None = None,
    ) -> None:
        self.base_env = inherited_environment(pass_env)
        self.mark = mark
        self.cgroups = cgroups
        # bracketed_start_time is checked against /proc once; False: always read /proc.
        self._clock_agrees: bool | None = None
        self._live = 0  # attempts holding a cgroup
        self._root_timer: asyncio.TimerHandle | None = None

    async def run(self, request: AttemptRequest) -> AttemptResult:
        scratch = request.scratch
        workspace = os.fspath(scratch if scratch.is_absolute() else scratch.resolve())
        outputs_name = f"{request.task}.{request.attempt}.outputs"
        outputs_path = f"{workspace}/{RUN_FILES}/{outputs_name}"
        try:
            # Made at the run's first attempt (or after a task removed the workspace).
            run_files = open_run_files(workspace, make=True)
            try:
                note_start(run_files, request.task, request.attempt)
                with contextlib.suppress(FileNotFoundError):
                    # (a previous attempt's, of an agent that crashed)
                    os.unlink(outputs_name, dir_fd=run_files)
            finally:
                os.close(run_files)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # the agent stops, as on any full disk
            # The run's own files: a task may have put a file, or a symbolic link,
            # where the workspace or its .tideflow was.  That run's attempt fails;
            # the agent (which died here, and again at every restart, or wrote
            # where the link pointed) goes on.
            where = "" if isinstance(exc, RunFilesRefused) else f" {workspace}"
            return AttemptResult(
                None,
                message=f"cannot prepare the run's workspace{where}: {exc.strerror}",
                permanent=True,
            )
        attempt_id = f"{self.mark}/{request.run_id}/{request.task}/{request.attempt}"
        env = task_environment(
            {
                **request.env,
                "TIDEFLOW_OUTPUTS": str(outputs_path),
                "TIDEFLOW_TASK": request.task,
                "TIDEFLOW_ATTEMPT": str(request.attempt),
                "TIDEFLOW_RUN": request.run_id,
                IDEMPOTENCY_KEY_ENV: f"{request.run_id}/{request.task}",
                ATTEMPT_ID_ENV: attempt_id,
            },
            self.base_env,
        )
        cwd = request.working_dir or workspace
        cgroup = self.cgroups.take(attempt_id) if self.cgroups is not None else None
        try:
            try:
                child = self._spawn(request.argv, cwd, env, cgroup)
            except _CgroupUnusable as exc:  # the cgroup went away under us
                log.warning("attempt %s starts without its cgroup: %s", attempt_id, exc)
                self._release(cgroup)
                cgroup = None
                child = self._spawn(request.argv, cwd, env, None)
        except FileNotFoundError as exc:
            self._release(cgroup)
            missing = request.argv[0] if exc.filename in (None, request.argv[0]) else cwd
            what = "working directory" if missing == cwd else "executable"
            return AttemptResult(None, message=f"{what} not found: {missing}", permanent=True)
        except (PermissionError, NotADirectoryError, OSError) as exc:
            self._release(cgroup)
            return AttemptResult(
                None,
                message=f"cannot start {request.argv[0]}: {exc.strerror}",
                # Out of processes or memory (another task's fork bomb) passes: retry.
                permanent=exc.errno not in _TRANSIENT_SPAWN_ERRORS,
            )
        except ValueError:
            # A NUL byte in an argument or an environment value: the manifest's are
            # refused by validation, but a task's output can carry one into a
            # dependant's command through a template.  That attempt fails; the agent
            # (which used to die here, again on every restart) goes on.
            self._release(cgroup)
            return AttemptResult(
                None,
                message="cannot start: an argument or environment value contains a NUL byte",
                permanent=True,
            )
        pid_start = self._start_time(child.pid, *child.spawned_between)
        if cgroup is not None:
            self._live += 1
        request.on_started(child.pid, pid_start)
        timed_out = aborted = False
        waiter: asyncio.Future[Any] = child.exit
        abort = request.abort
        shared = isinstance(abort, Abort)
        aborter: asyncio.Future[Any] = (
            abort.future() if isinstance(abort, Abort) else asyncio.ensure_future(abort.wait())
        )
        # The exit (resolving it at once, when the child is reaped), the stop or the
        # timeout wakes one future: asyncio.wait's sets, closures and frame, and a
        # callback's turn of the loop, cost ~15 us per attempt more; same outcome.
        loop = child.loop
        wake: asyncio.Future[None] = loop.create_future()
        woken = functools.partial(_wake, wake)
        child.wake_on_exit(wake)
        aborter.add_done_callback(woken)
        timer = None if request.timeout is None else loop.call_later(request.timeout, woken, None)
        try:
            try:
                await wake
            finally:
                if timer is not None:
                    timer.cancel()
                aborter.remove_done_callback(woken)
            if not waiter.done():
                aborted = aborter.done()
                timed_out = not aborted
                await _terminate_group(child, request.grace_seconds)
        except asyncio.CancelledError:
            # Cancelled: the agent is going now (a second stop signal, a dead store),
            # even if a graceful stop of this attempt was under way.  No grace.
            await _terminate_group(child, 0)
            child.close()
            raise
        finally:
            if not shared:
                aborter.cancel()  # the task made to wait on a plain asyncio.Event
            # Whatever the task left running in its group (or cgroup) goes with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            if cgroup is not None:
                self._live -= 1
                if not self._release_now(cgroup):
                    await in_own_thread(self._release, cgroup)
                self._idle_soon()
        # A process that left the group (setsid) may hold the pipes open.  (Most
        # often both are at end of file by now: no task, no timer.)
        if child.reading:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.drained(), PIPE_DRAIN_SECONDS)
        child.close()
        code = child.returncode
        logs = {"stdout": child.stdout.value(), "stderr": child.stderr.value()}
        outputs: dict[str, str] = {}
        outputs_problem: str | None = None
        if code == 0 and not timed_out and not aborted and _exists(outputs_path):
            try:
                outputs = await in_own_thread(read_run_outputs, workspace, outputs_name)
            except OutputsError as exc:
                outputs_problem = str(exc)
        if outputs_problem is not None:
            return AttemptResult(1, {}, outputs_problem, logs, permanent=True)
        if timed_out:
            message = f"timed out after {request.timeout:g}s; process group killed"
        elif aborted:
            message = "stopped: process group killed"
        elif code == 0:
            message = None
        elif code is not None and code < 0:
            message = f"killed by signal {signal.Signals(-code).name}"
        else:
            message = f"exit code {code}"
        return AttemptResult(code, outputs, message, logs, timed_out=timed_out, aborted=aborted)

    def _spawn(self, argv: list[str], cwd: str, env: dict[str, str], cgroup: Path | None) -> Child:
        """Start the process, in ``cgroup`` (if any) before it runs anything.

        Raises :class:`_CgroupUnusable` if the cgroup cannot be joined (nothing
        was started), else what ``Popen`` raises.
        """
        scope = self.cgroups
        if cgroup is None or scope is None:
            return Child.spawn(argv, cwd, env)
        if scope.home is None:  # join from the child: Python forks the agent
            try:
                return Child.spawn(argv, cwd, env, _join_cgroup(cgroup))
            except subprocess.SubprocessError as exc:
                scope.spoil(cgroup)
                raise _CgroupUnusable(str(exc)) from None
        try:
            scope.enter(cgroup)
        except OSError as exc:
            raise _CgroupUnusable(exc.strerror or str(exc)) from None
        try:
            return Child.spawn(argv, cwd, env)  # vfork: born in the agent's cgroup
        finally:
            scope.leave(cgroup)

    def _start_time(self, pid: int, before_ns: int, after_ns: int) -> str | None:
        """The new process's kernel start time: from the clock when it can be, else /proc.

        ``before_ns``/``after_ns``: ``CLOCK_BOOTTIME`` read right around ``Popen``
        (:attr:`Child.spawned_between`), so that under load a start straddles a
        clock tick, and needs the /proc read, as rarely as can be.
        """
        if self._clock_agrees is not False:
            start = bracketed_start_time(before_ns, after_ns)
            if start is not None:
                if self._clock_agrees:
                    return start
                # The first time, make sure the kernel counts as assumed.
                read = process_start_time(pid)
                self._clock_agrees = read == start
                if not self._clock_agrees:
                    log.info("process start times come from /proc (clock gave %s, /proc %s)",
                             start, read)  # fmt: skip
                return read
        return process_start_time(pid)

    def _idle_soon(self) -> None:
        """Remove the cgroup root a second after the last attempt, if none started since.

        Attempts leave it in place (removing and making it again cost two more
        cgroup operations per task of a chain, and raced with starting ones).
        """
        if self._live or self._root_timer is not None:
            return

        def idle() -> None:
            self._root_timer = None
            if not self._live and self.cgroups is not None:
                self.cgroups.remove_root()

        self._root_timer = asyncio.get_running_loop().call_later(ROOT_IDLE_SECONDS, idle)

    def _release_now(self, cgroup: Path) -> bool:
        """Free an attempt's cgroup on the loop if that is quick (it usually is)."""
        assert self.cgroups is not None
        return self.cgroups.give_back(cgroup, timeout=0.0, wait=False)

    def _release(self, cgroup: Path | None) -> None:
        if cgroup is not None and self.cgroups is not None:
            self.cgroups.give_back(cgroup)


def _wake(wake: asyncio.Future[None], _: object) -> None:
    if not wake.done():
        wake.set_result(None)


def _exists(path: str) -> bool:
    """One ``lstat``: most tasks write no outputs, and then no thread is needed."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # let the reader say what is wrong with it
    return True


class _CgroupUnusable(Exception):
    """An attempt's cgroup could not be joined; no process was started."""


def _write_procs(cgroup: Path) -> None:
    """Move the calling process (all its threads) into ``cgroup``."""
    fd = os.open(cgroup / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


_home_procs: dict[Path, int] = {}


def _write_home_procs(home: Path) -> None:
    """Move the calling process back into ``home``, through a descriptor kept open.

    The agent goes back to its own cgroup after every start in an attempt's
    cgroup: one write instead of an open, a write and a close.
    """
    fd = _home_procs.get(home)
    if fd is None:
        fd = os.open(home / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        _home_procs[home] = fd
    os.write(fd, b"0")


def _join_cgroup(cgroup: Path) -> Callable[[], None]:
    """A pre-exec hook that moves the child into ``cgroup`` before it runs anything.

    Runs in the forked child: only system calls on values prepared beforehand.
    """
    procs = os.fsencode(cgroup / "cgroup.procs")

    def join() -> None:
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)

    return join


class NoopRunner:
    """Completes every attempt at once, in process: measures executor + store alone.

    It yields to the event loop once per attempt, as a real attempt's end does
    (the exit is seen by the loop): without that, a chain would run its steps
    back to back without the loop ever getting a turn (a chain's next attempt
    runs on in the same asyncio task), which no agent does, and a benchmark of
    it would leave out a cost every real step has.
    """

    async def run(self, request: AttemptRequest) -> AttemptResult:
        request.on_started(0, None)
        await asyncio.sleep(0)
        return AttemptResult(0)
