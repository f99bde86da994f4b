"""A task's process on the event loop, without asyncio's subprocess machinery.

Why it exists: a ``command: ["true"]`` task should cost little more than the
process itself, and asyncio's subprocess support costs more than that.  On
Python 3.11 every ``create_subprocess_exec`` waits for its child with a
thread of its own (``ThreadedChildWatcher``: a thread start per task), builds
a transport and two stream protocols, and ``Process.wait`` returns only once
the pipes are closed too.  Here the process is started with
:class:`subprocess.Popen` (which uses ``vfork`` when it can), its end is
watched through a pidfd, it is reaped at once with ``waitpid(WNOHANG)``, and
its stdout and stderr are read straight into bounded tails, from pipes made
here (``Popen``'s own would wrap each read end in a buffered file object
nobody reads: four more system calls and two objects per task).  Nothing else
reaps it: asyncio's child watchers only wait for pids they started themselves.

The pidfd and both pipes of every child go into one epoll set per event loop
(:class:`_Watcher`), which the loop watches as a single reader: registering a
descriptor is one ``epoll_ctl`` from C, where the loop's own ``add_reader`` /
``remove_reader`` cost a selector key, a handle and bookkeeping in Python for
each of the three, at every start and every end (about a sixth of the agent's
CPU per ``true`` task).

Without pidfds (Linux before 5.3, a seccomp filter) the exit is polled with
``waitpid(WNOHANG)`` instead, at most every 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import select
import subprocess
import time
import weakref
from collections.abc import Callable

TAIL_BYTES = 16 * 1024
_CHUNK = 65536
_POLL_MAX_SECONDS = 0.05
_devnull: int | None = None


def _stdin() -> int:
    """``/dev/null``, opened once for every child's stdin (``DEVNULL`` opens it per child)."""
    global _devnull
    if _devnull is None:
        _devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull


class _Watcher:
    """One epoll set for the descriptors of every child of one event loop.

    The loop watches the set's own descriptor; when it is readable, each ready
    descriptor's handler runs (level-triggered: one not fully handled shows up
    again).  Handlers only read, reap and unregister; none starts a process, so
    a descriptor number cannot be reused while one round of events is handled.
    The set is closed with its loop (the loop's reader holds the only strong
    reference; the registry below is weak).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.epoll = select.epoll()  # close-on-exec
        self.handlers: dict[int, Callable[[], None]] = {}
        loop.add_reader(self.epoll.fileno(), self._dispatch)

    def add(self, fd: int, handler: Callable[[], None]) -> None:
        self.epoll.register(fd, select.EPOLLIN)
        self.handlers[fd] = handler

    def remove(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)

    def _dispatch(self) -> None:
        handlers = self.handlers
        for fd, _ in self.epoll.poll(0):
            handler = handlers.get(fd)
            if handler is not None:
                handler()


_watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watcher] = (
    weakref.WeakKeyDictionary()
)


def _watcher(loop: asyncio.AbstractEventLoop) -> _Watcher:
    watcher = _watchers.get(loop)
    if watcher is None:
        watcher = _watchers[loop] = _Watcher(loop)
    return watcher


class Tail:
    """The last TAIL_BYTES of a stream, kept as it is read."""

    def __init__(self) -> None:
        self.data = bytearray()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > 2 * TAIL_BYTES:
            del self.data[:-TAIL_BYTES]

    def value(self) -> bytes:
        return bytes(self.data[-TAIL_BYTES:])


class Child:
    """A started process: its exit and its two output streams, on the running loop."""

    def __init__(self, popen: subprocess.Popen[bytes], stdout: int, stderr: int) -> None:
        """``stdout``, ``stderr``: the read ends of the process's pipes (this object
        owns them from now on)."""
        self.popen = popen
        self.pid = popen.pid
        self.stdout, self.stderr = Tail(), Tail()
        # CLOCK_BOOTTIME just before and just after the process was created
        # (set by spawn; the runner derives the kernel's start time from them).
        self.spawned_between = (0, 0)
        self._loop = asyncio.get_running_loop()
        self._watcher = _watcher(self._loop)
        self._exit: asyncio.Future[int] = self._loop.create_future()
        self._pidfd: int | None = None
        self._poller: asyncio.Task[None] | None = None
        self._open: dict[int, asyncio.Future[None]] = {}
        self._fds = [stdout, stderr]
        self._read(stdout, self.stdout)
        self._read(stderr, self.stderr)
        self._watch_exit()

    @classmethod
    def spawn(
        cls,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        preexec_fn: Callable[[], None] | None = None,
    ) -> Child:
        """Start ``argv`` in a session of its own; raises what ``Popen`` raises."""
        out_read, out_write = os.pipe()  # close-on-exec: the child gets its dup2 copies
        try:
            err_read, err_write = os.pipe()
        except OSError:
            os.close(out_read)
            os.close(out_write)
            raise
        try:
            before = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
            popen = subprocess.Popen(
                argv,
                stdin=_stdin(),
                stdout=out_write,
                stderr=err_write,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=preexec_fn,
            )
            after = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        except BaseException:
            os.close(out_read)
            os.close(err_read)
            raise
        finally:
            os.close(out_write)
            os.close(err_write)
        child = cls(popen, out_read, err_read)
        child.spawned_between = (before, after)
        return child

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def exited(self) -> int:
        """Wait for the process itself (not for every holder of its pipes)."""
        return await asyncio.shield(self._exit)

    @property
    def exit(self) -> asyncio.Future[int]:
        """The process's exit code, once it has ended and been reaped.

        For ``asyncio.wait`` (which never cancels what it waits for): no task is
        made to wrap :meth:`exited`.  Do not cancel it.
        """
        return self._exit

    @property
    def reading(self) -> bool:
        """A pipe is still open (not at end of file)."""
        return bool(self._open)

    async def drained(self) -> None:
        """Wait until both pipes are at end of file (every writer has closed them)."""
        if self._open:
            await asyncio.gather(*(asyncio.shield(done) for done in self._open.values()))

    def close(self) -> None:
        """Stop reading and close the pipes (a setsid grandchild may hold them open)."""
        for fd in list(self._open):
            self._finish(fd)
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    # ------------------------------------------------------------ exit
    def _watch_exit(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (OSError, AttributeError):  # no pidfds here (or already reaped: poll says)
            self._poller = self._loop.create_task(self._poll())
            return
        self._watcher.add(self._pidfd, self._on_pidfd)

    def _on_pidfd(self) -> None:
        # Readable once the process has ended: it can be reaped without waiting.
        if self._reap() is None:
            return
        assert self._pidfd is not None
        self._watcher.remove(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None

    async def _poll(self) -> None:
        delay = 0.001
        while self._reap() is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_SECONDS)

    def _reap(self) -> int | None:
        code = self.popen.poll()
        if code is not None and not self._exit.done():
            self._exit.set_result(code)
        return code

    # ------------------------------------------------------------ pipes
    def _read(self, fd: int, tail: Tail) -> None:
        os.set_blocking(fd, False)
        self._open[fd] = self._loop.create_future()
        self._watcher.add(fd, functools.partial(self._on_readable, fd, tail))

    def _on_readable(self, fd: int, tail: Tail) -> None:
        try:
            chunk = os.read(fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            tail.add(chunk)
        else:
            self._finish(fd)

    def _finish(self, fd: int) -> None:
        done = self._open.pop(fd, None)
        if done is None:
            return
        self._watcher.remove(fd)
        if not done.done():
            done.set_result(None)
