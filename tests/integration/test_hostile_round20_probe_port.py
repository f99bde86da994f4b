"""Round 20, the operator's probe and metrics ports against a hostile client.

The real servers (``serve_health``, ``serve_metrics``) each run in a process of
their own on 127.0.0.1; the attacks come from other processes or the test's.

* Complete requests while the event loop is slow.  Every complete request got a
  thread of its own, and the bound (``MAX_CONNECTIONS`` being answered) shut the
  oldest connection down but left its thread: a liveness answer waits for the
  event loop (up to ``LOOP_ANSWER_SECONDS``), so a flood of complete
  ``/healthz`` requests while the loop was busy made some 3,000 threads and
  3,000 open descriptors in a few seconds.  Now at most ``MAX_CONNECTIONS``
  threads answer; complete requests beyond wait, at most ``MAX_CONNECTIONS`` of
  them, the oldest closed.
* Out of descriptors.  ``accept`` failing with EMFILE left the listening socket
  readable: the serving thread spun on it at a full core (taking the GIL from the
  event loop) while the probe waited.  Now it closes the oldest connection that
  has not sent its head, and otherwise stops accepting for a moment.
* A head and its body in one read.  A request's head was measured with whatever
  came with it: a GET with a body of 9 KB sent at once was shut as a head too
  big to read, the same request sent in two writes was answered.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services.metrics import free_port

from tideflow.http_bounds import MAX_CONNECTIONS

SERVE = """
import asyncio, os, resource, sys, threading, time
from tideflow_operator.cli import Health, serve_health
from tideflow_operator.metrics import serve_metrics
which, port, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
health = Health()
if how == "stuck-loop":  # the event loop busy: every liveness answer waits for it
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    loop.call_soon_threadsafe(time.sleep, 600)
    health.loop = loop
if how.startswith("nofile="):
    n = int(how.split("=")[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
if which == "probes":
    serve_health(f"http://127.0.0.1:{port}/healthz", health)
else:
    serve_metrics(port, lambda: None, addr="127.0.0.1")
print("serving", flush=True)
time.sleep(600)
"""

COMPLETE_FLOOD = """
import socket, sys, time
port, until, path = int(sys.argv[1]), time.monotonic() + float(sys.argv[2]), sys.argv[3]
request = f"GET {path} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n".encode()
held = []
while time.monotonic() < until:
    sock = socket.socket()
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(request)  # and never reads the answer
    except OSError:
        sock.close()
        continue
    held.append(sock)
    if len(held) > 2000:
        held.pop(0).close()
"""


def _serve(which: str, how: str = "-") -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE, which, str(port), how],
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert server.stdout is not None and server.stdout.readline() == b"serving\n"
    return server, port


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _probe(port: int, path: str) -> str:
    """A kubelet-like probe, 1 s in all, from an address of its own ("" if answered 200)."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        sock.bind(("127.0.0.2", 0))
        began = time.monotonic()
        try:
            sock.connect(("127.0.0.1", port))
            sock.settimeout(max(0.01, 1.0 - (time.monotonic() - began)))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answer = sock.recv(12)
        except OSError as exc:
            return f"{exc!r} after {time.monotonic() - began:.2f} s"
        return "" if answer == b"HTTP/1.0 200" else f"answer: {answer!r}"


def _answer(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    answer = b""
    try:
        while data := sock.recv(65536):
            answer += data
    except OSError as exc:
        answer += f"<{exc!r}>".encode()
    return answer


def test_complete_requests_while_the_loop_is_slow_hold_a_bounded_number_of_threads() -> None:
    """Two processes send complete ``/healthz`` requests as fast as they are
    accepted, never reading; the event loop answers nothing meanwhile.  Threads
    and descriptors stay within a few times ``MAX_CONNECTIONS`` (they reached
    some 3,000 each)."""
    server, port = _serve("probes", "stuck-loop")
    floods: list[subprocess.Popen[bytes]] = []
    try:
        base = _descriptors(server.pid)
        floods = [
            subprocess.Popen([sys.executable, "-c", COMPLETE_FLOOD, str(port), "5", "/healthz"])
            for _ in range(2)
        ]
        most_threads = most_fds = 0
        until = time.monotonic() + 4
        while time.monotonic() < until:
            most_threads = max(most_threads, _status(server.pid, "Threads"))
            most_fds = max(most_fds, _descriptors(server.pid) - base)
            time.sleep(0.1)
        assert all(flood.poll() is None for flood in floods), "the flood ended early"
        # main, serving thread, the stuck loop's thread; a thread per request answered
        assert most_threads <= MAX_CONNECTIONS + 3, most_threads
        # waiting for their heads, waiting for a thread, being answered
        assert most_fds <= 3 * MAX_CONNECTIONS + 2, most_fds
    finally:
        for flood in floods:
            flood.kill()
            flood.wait()
        server.kill()
        server.wait()


@pytest.mark.parametrize("which", ["probes", "metrics"])
def test_out_of_descriptors_the_server_neither_spins_nor_starves_the_probe(which: str) -> None:
    """The server's process may hold 24 descriptors; 40 idle connections come
    (the listen queue keeps what it cannot accept).  It uses under a tenth of a
    core meanwhile (it spun on the listening socket), and a probe is answered
    within its second (it waited until the idle ones' time was up, 5 s)."""
    server, port = _serve(which, "nofile=24")
    path = "/healthz" if which == "probes" else "/metrics"
    idle: list[socket.socket] = []
    try:
        for _ in range(40):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            idle.append(sock)
        time.sleep(0.5)
        began, cpu = time.monotonic(), _cpu_seconds(server.pid)
        time.sleep(2)
        share = (_cpu_seconds(server.pid) - cpu) / (time.monotonic() - began)
        assert share < 0.1, share
        assert _probe(port, path) == ""
        assert server.poll() is None
    finally:
        for sock in idle:
            sock.close()
        server.kill()
        server.wait()


@pytest.mark.parametrize("which", ["probes", "metrics"])
def test_a_body_sent_with_its_head_does_not_count_as_head(which: str) -> None:
    server, port = _serve(which)
    path = "/healthz" if which == "probes" else "/metrics"
    try:
        for size in (10, 9000, 100_000):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                head = f"GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
                sock.sendall(head.encode() + b"x" * size)
                answer = _answer(sock)
            assert answer.startswith(b"HTTP/1.0 200"), (size, answer[-200:])
    finally:
        server.kill()
        server.wait()


def test_the_probe_port_listens_on_an_ipv6_address() -> None:
    """``--liveness http://[::1]:PORT/healthz`` (an IPv6-only cluster: ``[::]``)
    stopped the operator at its start: the probe server was IPv4 only ("Address
    family for hostname not supported"); the metrics port took the address's."""
    import urllib.request

    from tideflow_operator.cli import Health, serve_health

    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
            port = sock.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = serve_health(f"http://[::1]:{port}/healthz", Health())
    try:
        with urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=3) as response:
            assert response.status == 200
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
