"""A task's process on the event loop, without asyncio's subprocess machinery.

Why it exists: a ``command: ["true"]`` task should cost little more than the
process itself, and asyncio's subprocess support costs more than that.  On
Python 3.11 every ``create_subprocess_exec`` waits for its child with a
thread of its own (``ThreadedChildWatcher``: a thread start per task), builds
a transport and two stream protocols, and ``Process.wait`` returns only once
the pipes are closed too.  Here the process is started with the C function
:class:`subprocess.Popen` itself calls (``_posixsubprocess.fork_exec``, which
uses ``vfork``), its end is watched through a pidfd, it is reaped at once with
``waitpid(WNOHANG)``, and its stdout and stderr are read straight into bounded
tails, from pipes made here (``Popen``'s own would wrap each read end in a
buffered file object nobody reads: four more system calls and two objects per
task).  Nothing else reaps it: asyncio's child watchers only wait for pids
they started themselves.

``Popen``'s Python around that call (argument checks for every platform and
option, the environment encoded key by key, a ``Popen`` object, ``__del__``
bookkeeping) cost 40-60 us per start, about a tenth of the runner's CPU per
``true`` attempt, while the event loop served nothing else (bench/README.md,
"Issue 15, ninth pass").
:func:`_fork_exec` does only what these arguments need and reports a failed
start exactly as ``Popen`` does (the same exception type, ``errno``, message
and ``filename``); on a Python whose ``fork_exec`` it does not know it calls
``Popen``.

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
import builtins
import contextlib
import functools
import os
import select
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

try:
    import _posixsubprocess
except ImportError:  # (not POSIX)
    _posixsubprocess = None  # type: ignore[assignment]

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


# ``fork_exec``'s arguments as subprocess.Popen passes them on 3.11-3.13 (3.14
# dropped ``allow_vfork``); elsewhere Popen itself starts the process.
_FORK_EXEC_KNOWN = _posixsubprocess is not None and (3, 11) <= sys.version_info[:2] <= (3, 13)
# What os.fsencode encodes with.
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
# Whether this Python's Popen blames the working directory for any failure before
# ``exec`` ("noexec"), or only for ``chdir``'s ("noexec:chdir", newer Pythons; then
# another such failure names no file): read from Popen itself, so both agree.
_POPEN_CODE = getattr(getattr(subprocess.Popen, "_execute_child", None), "__code__", None)
_NOEXEC_NAMES_CWD = _POPEN_CODE is None or "noexec:chdir" not in _POPEN_CODE.co_consts


class Process:
    """A started process's pid and exit status: what ``Popen`` offered, without it.

    ``poll`` reaps it without waiting (``returncode``: the exit code, or minus
    the signal that ended it); ``kill`` signals it only while it is unreaped, so
    a pid reused since is never hit.
    """

    __slots__ = ("pid", "returncode")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                # Reaped elsewhere (SIGCHLD ignored): no status, as Popen reports it.
                self.returncode = 0
            else:
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _fork_exec(
    argv: list[str],
    cwd: str,
    env: dict[str, str],
    stdin: int,
    stdout: int,
    stderr: int,
    preexec_fn: Callable[[], None] | None,
) -> int:
    """Start ``argv`` in a new session as ``subprocess.Popen`` would; returns its pid.

    The same ``fork_exec`` call ``Popen`` makes for these arguments (close
    every other descriptor, restore signals, ``setsid``; ``vfork`` unless a
    ``preexec_fn`` is given), and a failure reported from the child raised as
    ``Popen`` raises it: an ``OSError`` subclass with ``errno``, ``strerror``
    and the executable (or, for a failure before ``exec``, the working
    directory) as ``filename``; ``SubprocessError`` if ``preexec_fn`` raised.
    """
    executable = os.fsencode(argv[0])
    if os.path.dirname(executable):
        executables: tuple[bytes, ...] = (executable,)
    else:  # as os._execvpe (and Popen) search: the task's own PATH
        executables = tuple(
            os.path.join(os.fsencode(folder), executable) for folder in os.get_exec_path(env)
        )
    env_list = []
    for key, value in env.items():
        # (os.fsencode, without its Python call per string)
        name = key.encode(_FS_ENCODING, _FS_ERRORS) if type(key) is str else os.fsencode(key)
        if b"=" in name:
            raise ValueError("illegal environment variable name")
        env_list.append(
            name
            + b"="
            + (value.encode(_FS_ENCODING, _FS_ERRORS) if type(value) is str else os.fsencode(value))
        )
    sys.audit("subprocess.Popen", argv[0], argv, cwd, env)
    errpipe_read, errpipe_write = os.pipe()  # close-on-exec: EOF once exec succeeds
    try:
        try:
            fork_exec: Any = _posixsubprocess.fork_exec
            pid: int = fork_exec(
                argv, executables, True, (errpipe_write,), cwd, env_list,
                stdin, -1, -1, stdout, -1, stderr,
                errpipe_read, errpipe_write,
                True, True, -1, None, None, None, -1, preexec_fn, True,
            )  # fmt: skip
        finally:
            os.close(errpipe_write)
        report = bytearray()
        while True:  # (as Popen: at most ~50,000 bytes)
            part = os.read(errpipe_read, 50000)
            report += part
            if not part or len(report) > 50000:
                break
    finally:
        os.close(errpipe_read)
    if report:
        _raise_start_failure(pid, report, argv[0], cwd)
    return pid


def _raise_start_failure(pid: int, report: bytes | bytearray, program: str, cwd: str) -> None:
    """Reap the child that could not start and raise what ``Popen`` raises for it."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    try:
        name, hex_errno, raw_message = bytes(report).split(b":", 2)
        message = raw_message.decode()
    except ValueError:
        name, hex_errno = b"SubprocessError", b"0"
        message = f"Bad exception data from child: {bytes(report)!r}"
    kind = getattr(builtins, name.decode("ascii"), subprocess.SubprocessError)
    if issubclass(kind, OSError) and hex_errno:
        number = int(hex_errno, 16)
        filename: str | None = program
        if message == "noexec:chdir" or (message == "noexec" and _NOEXEC_NAMES_CWD):
            message, filename = "", cwd
        elif message == "noexec":
            message, filename = "", None
        if number != 0:
            message = os.strerror(number)
        if filename is None:
            raise kind(number, message)
        raise kind(number, message, filename)
    raise kind(message)


class Child:
    """A started process: its exit and its two output streams, on the running loop."""

    def __init__(self, popen: Process, stdout: int, stderr: int) -> None:
        """``stdout``, ``stderr``: the read ends of the process's pipes (this object
        owns them from now on)."""
        self.popen = popen  # (the name it had as a subprocess.Popen)
        self.pid = popen.pid
        self.stdout, self.stderr = Tail(), Tail()
        # CLOCK_BOOTTIME just before and just after the process was created
        # (set by spawn; the runner derives the kernel's start time from them).
        self.spawned_between = (0, 0)
        self.loop = asyncio.get_running_loop()  # (the loop that watches it)
        self._watcher = _watcher(self.loop)
        self._exit: asyncio.Future[int] = self.loop.create_future()
        self._wake: asyncio.Future[None] | None = None
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
            if _FORK_EXEC_KNOWN:
                before = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
                popen = Process(_fork_exec(argv, cwd, env, _stdin(), out_write, err_write,
                                           preexec_fn))  # fmt: skip
                after = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
            else:
                before = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
                started = subprocess.Popen(
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
                popen = Process(started.pid)
                started.returncode = 0  # reaped by Process.poll, not by Popen
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

    def wake_on_exit(self, wake: asyncio.Future[None]) -> None:
        """Resolve ``wake`` as soon as the process is reaped (if it is not done);
        one such future per child (a second call replaces the first).

        At once, in the same turn of the loop: a callback on :attr:`exit` would
        run one turn later, and the waiter's own wake-up one more.
        """
        self._wake = wake
        if self._exit.done() and not wake.done():
            wake.set_result(None)

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
            self._poller = self.loop.create_task(self._poll())
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
            wake = self._wake
            if wake is not None and not wake.done():
                wake.set_result(None)
        return code

    # ------------------------------------------------------------ pipes
    def _read(self, fd: int, tail: Tail) -> None:
        os.set_blocking(fd, False)
        self._open[fd] = self.loop.create_future()
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
