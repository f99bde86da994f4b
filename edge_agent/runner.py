"""Running one task attempt as an operating-system process.

The executor decides *when* an attempt runs; this module decides *how*: the
program is started without a shell (unless the task's ``script`` asks for
one), in a session of its own so that a timeout or a cancel can kill the whole
process group (grandchildren included: SIGTERM, a grace period, SIGKILL), with
stdout/stderr in files whose tails are kept, and with ``$TIDEFLOW_OUTPUTS``
naming the file where the task writes ``key=value`` outputs.

A runner is anything with an ``async run(AttemptRequest) -> AttemptResult``;
the benchmarks use an in-process no-op runner to measure the executor and the
store alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

OUTPUTS_MAX_BYTES = 64 * 1024
TAIL_BYTES = 16 * 1024
PIPE_DRAIN_SECONDS = 2.0
_OUTPUT_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")
# Agent settings (and any secret they name) are not handed to tasks.
_WITHHELD_ENV_PREFIXES = ("TIDEFLOW_",)


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
    abort: asyncio.Event = field(default_factory=asyncio.Event)
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
    """The kernel's start time of ``pid``: tells a live process from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def kill_orphaned_group(pid: int | None, start: str | None) -> bool:
    """Kill the process group an interrupted agent left behind, if it still runs."""
    if pid is None or start is None or process_start_time(pid) != start:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
        return True
    return False


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


def inherited_environment() -> dict[str, str]:
    """The agent's environment minus its own settings: what every task starts from."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_WITHHELD_ENV_PREFIXES)}


async def _terminate_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


class _Tail:
    """The last TAIL_BYTES of a stream, read as it comes (no file per attempt)."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def drain(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        while chunk := await stream.read(65536):
            self.data += chunk
            if len(self.data) > 2 * TAIL_BYTES:
                del self.data[:-TAIL_BYTES]

    def value(self) -> bytes:
        return bytes(self.data[-TAIL_BYTES:])


class ProcessRunner:
    """Runs attempts as real processes, each in its own session.

    The inherited environment is read once, when the runner is made.

    The working directory is the run's workspace (shared by its tasks, made
    once per run) unless the task sets ``workingDir``; outputs go to a file
    per attempt that the task creates only if it has outputs; stdout and
    stderr are read through pipes into bounded tails.  Creating files and
    directories per attempt cost more than the process itself on ext4.
    """

    def __init__(self) -> None:
        self.base_env = inherited_environment()

    async def run(self, request: AttemptRequest) -> AttemptResult:
        workspace = request.scratch if request.scratch.is_absolute() else request.scratch.resolve()
        outputs_path = workspace / ".tideflow" / f"{request.task}.{request.attempt}.outputs"
        if not outputs_path.parent.is_dir():
            outputs_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            outputs_path.unlink()  # a previous attempt of a crashed agent
        env = task_environment(
            {
                **request.env,
                "TIDEFLOW_OUTPUTS": str(outputs_path),
                "TIDEFLOW_TASK": request.task,
                "TIDEFLOW_ATTEMPT": str(request.attempt),
                "TIDEFLOW_RUN": request.run_id,
            },
            self.base_env,
        )
        cwd = request.working_dir or str(workspace)
        try:
            proc = await asyncio.create_subprocess_exec(
                *request.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            missing = request.argv[0] if exc.filename in (None, request.argv[0]) else cwd
            what = "working directory" if missing == cwd else "executable"
            return AttemptResult(None, message=f"{what} not found: {missing}", permanent=True)
        except (PermissionError, NotADirectoryError, OSError) as exc:
            return AttemptResult(
                None, message=f"cannot start {request.argv[0]}: {exc.strerror}", permanent=True
            )
        request.on_started(proc.pid, process_start_time(proc.pid))
        out, err = _Tail(), _Tail()
        readers = asyncio.gather(out.drain(proc.stdout), err.drain(proc.stderr))
        timed_out = aborted = False
        waiter = asyncio.ensure_future(proc.wait())
        aborter = asyncio.ensure_future(request.abort.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, aborter}, timeout=request.timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if waiter not in done:
                timed_out = not done
                aborted = bool(done)
                await _terminate_group(proc, request.grace_seconds)
        except asyncio.CancelledError:
            await _terminate_group(proc, request.grace_seconds)
            readers.cancel()
            raise
        finally:
            aborter.cancel()
            # Whatever the task left running in its group goes with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        # A process that left the group (setsid) may hold the pipes open.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(readers, PIPE_DRAIN_SECONDS)
        code = proc.returncode
        logs = {"stdout": out.value(), "stderr": err.value()}
        outputs: dict[str, str] = {}
        if code == 0:
            with contextlib.suppress(FileNotFoundError):
                outputs = parse_outputs(outputs_path.read_bytes())
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


class NoopRunner:
    """Completes every attempt at once, in process: measures executor + store alone."""

    async def run(self, request: AttemptRequest) -> AttemptResult:
        request.on_started(0, None)
        return AttemptResult(0)
