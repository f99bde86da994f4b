"""``tideflow console`` stops on SIGTERM: its streams end, its port closes, exit 0.

The chart's console Deployment runs ``tideflow console`` as the container's
first process (``command: ["tideflow"]``, no init), PID 1 of its PID
namespace.  The kernel delivers a signal to such a process from outside only
if it handles that signal: the console left SIGTERM at its default action, so
``kubectl delete pod``, a rollout or ``docker stop`` was ignored and the pod
waited out its grace period (30 s) for SIGKILL.  Elsewhere (systemd) the
default action killed it (-15) with its browsers' event streams cut.

Proves, with the real command against a real API server and an open
server-sent events stream: SIGTERM sent from outside to the console running as
PID 1 of a PID namespace of its own (``unshare --pid``, as a container's
runtime does), and to one running as an ordinary process, ends it within the
grace period with 0, the event stream ended (not reset) and the port closed;
Ctrl-C the same with 130.  (Its watch threads, left in a read, crashed the
interpreter's exit: SIGSEGV or abort instead of 130.)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = pytest.mark.envtest

GRACE = 10.0  # well inside Kubernetes' default 30 s and docker stop's 10 s


def _start(envtest: Any, tmp_path: Path, pid1: bool) -> tuple[subprocess.Popen[bytes], int, int]:
    """(the process we wait for, the console's pid as seen from here, its port)."""
    argv = [sys.executable, "-m", "tideflow.cli", "console", "--port", "0"]
    if pid1:
        unshare = shutil.which("unshare")
        if unshare is None:
            pytest.skip("unshare (util-linux) not found")
        argv = [unshare, "--pid", "--fork", "--kill-child", *argv]
    env = {**os.environ, **envtest.env()}
    log = (tmp_path / "console.log").open("wb")
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=log, env=env, cwd=tmp_path, start_new_session=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not found and pid1 and "unshare" in (tmp_path / "console.log").read_text():
        pytest.skip(f"unshare --pid is not allowed here: {(tmp_path / 'console.log').read_text()}")
    assert found, f"console did not start: {line!r} {(tmp_path / 'console.log').read_text()}"
    console = proc.pid
    if pid1:
        children = psutil.Process(proc.pid).children()
        assert len(children) == 1, children
        console = children[0].pid
        with open(f"/proc/{console}/status") as status:
            nspid = next(ln for ln in status if ln.startswith("NSpid:")).split()
        assert nspid[-1] == "1", nspid  # PID 1 in its own namespace
    return proc, console, int(found.group(1))


def _open_stream(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    got = b""
    while b"event: hello" not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    return sock


def _stream_end(sock: socket.socket, seconds: float) -> str:
    """How the stream ended: "eof" (closed), "reset", or "open" (still open)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(4096):
                return "eof"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "open"
    return "open"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("pid1", "sig", "expected"),
    [(True, signal.SIGTERM, 0), (False, signal.SIGTERM, 0), (False, signal.SIGINT, 130)],
    ids=["sigterm-pid-1-of-a-container", "sigterm-plain-process", "ctrl-c-plain-process"],
)
def test_a_stop_ends_the_console_its_streams_and_its_port_closed(
    envtest: Any, tmp_path: Path, pid1: bool, sig: signal.Signals, expected: int
) -> None:
    proc, console, port = _start(envtest, tmp_path, pid1)
    try:
        stream = _open_stream(port)
        started = time.monotonic()
        os.kill(console, sig)  # from outside its PID namespace, as a runtime does
        try:
            code: int | None = proc.wait(GRACE)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - started
        log = (tmp_path / "console.log").read_text()
        assert code is not None, f"the console ignored {sig.name} for {GRACE:.0f}s\n{log[-3000:]}"
        assert code == expected, (code, log[-3000:])
        assert took < GRACE
        assert _stream_end(stream, 2) == "eof"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.timeout(60)
def test_a_sigterm_to_pid_1_while_the_console_starts_ends_it_before_it_listens(
    envtest: Any, tmp_path: Path
) -> None:
    """SIGTERM to the console as its container's PID 1 while it imports its web server
    and the Kubernetes client (fail point ``console-importing``, the signal sent by
    the process to itself there: a rollout of a pod that just started): its
    handler came only after those imports (a second of CPU, more on a loaded
    node), so the kernel threw the signal away and the console listened on, the
    pod waiting out its grace period for SIGKILL.  Now ``tideflow`` holds SIGTERM
    from its ``main``'s first line (its heavy imports made lazy): the console
    ends with 0 before it listens."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) not found")
    probe = subprocess.run([unshare, "--pid", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid is not allowed here: {probe.stderr.strip()}")
    argv = [sys.executable, "-m", "tideflow.cli", "console", "--port", "0"]
    env = {**os.environ, **envtest.env(), "TIDEFLOW_FAILPOINTS": "console-importing=term"}
    proc = subprocess.Popen(
        [unshare, "--pid", "--fork", "--kill-child", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=GRACE)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
    told = f"exit {code}\n{out.decode()}\n{err.decode()[-3000:]}"
    assert code is not None, f"the console ignored SIGTERM for {GRACE:.0f}s\n{told}"
    assert code == 0, told
    assert b"http://" not in out, told  # it never listened


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action", ["int", "int-swallowed"])
def test_a_ctrl_c_while_the_console_starts_ends_it_with_130_and_no_traceback(
    envtest: Any, tmp_path: Path, action: str
) -> None:
    """Ctrl-C while the console imports its web server and the Kubernetes client (fail
    point ``console-importing``): it ended with 130 but a traceback; and one whose
    KeyboardInterrupt Python dropped (raised in a finalizer, ``int-swallowed``)
    was lost: the console listened on.  Now Ctrl-C is held from ``tideflow``'s
    first line as SIGTERM is: 130 before it listens, no traceback."""
    argv = [sys.executable, "-m", "tideflow.cli", "console", "--port", "0"]
    env = {**os.environ, **envtest.env(), "TIDEFLOW_FAILPOINTS": f"console-importing={action}"}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path
    )
    try:
        out, err = proc.communicate(timeout=GRACE)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
        proc.kill()
        out, err = proc.communicate(timeout=10)
    told = f"exit {code}\n{out.decode()}\n{err.decode()[-3000:]}"
    assert code == 130, told
    assert b"http://" not in out, told  # it never listened
    assert b"Traceback" not in err, told
