"""The operator's probe and metrics servers against a flood of connections.

Both answer from threads (the probe server so that a stuck event loop is
reported as such).  They were the standard library's threading servers: a
thread per connection, kept while the client stayed silent.  Proves, on
loopback with the real servers: 300 idle connections cost at most
``MAX_CONNECTIONS`` threads, the oldest are shut down as new ones come, the
probe and the metrics still answer at once, and an idle connection is closed
after ``REQUEST_SECONDS``.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from services.metrics import free_port

from tideflow import http_bounds
from tideflow_operator import http_servers
from tideflow_operator.cli import Health, serve_health
from tideflow_operator.metrics import serve_metrics


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=3) as response:
        return response.status, response.read()


@contextlib.contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /")  # and nothing more
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def closed_count(socks: list[socket.socket]) -> int:
    closed = 0
    for sock in socks:
        sock.settimeout(0.05)
        try:
            closed += sock.recv(1) == b""
        except ConnectionResetError:
            closed += 1
        except TimeoutError:
            pass
    return closed


def started(serve: Callable[[int], Any]) -> tuple[Any, int]:
    for _ in range(5):
        port = free_port()
        with contextlib.suppress(OSError):  # taken meanwhile
            return serve(port), port
    raise AssertionError("no free port")


@pytest.mark.parametrize("which", ["probes", "metrics"])
def test_a_flood_of_idle_connections_is_bounded_and_the_server_still_answers(
    which: str,
) -> None:
    if which == "probes":
        server, port = started(lambda p: serve_health(f"http://127.0.0.1:{p}/healthz", Health()))
        url = f"http://127.0.0.1:{port}/healthz"
    else:
        server, port = started(lambda p: serve_metrics(p, lambda: None, addr="127.0.0.1"))
        url = f"http://127.0.0.1:{port}/metrics"
    try:
        assert get(url)[0] == 200
        before = threading.active_count()
        with idle_connections(port, 300) as socks:
            time.sleep(0.5)
            held = threading.active_count() - before
            began = time.monotonic()
            assert get(url)[0] == 200
            assert time.monotonic() - began < 2
            assert held <= http_bounds.MAX_CONNECTIONS + 1, held
            assert closed_count(socks) >= 300 - http_bounds.MAX_CONNECTIONS
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


def test_an_idle_connection_is_closed_after_the_request_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_servers.QuietHandler, "timeout", 0.5)
    server, port = started(lambda p: serve_health(f"http://127.0.0.1:{p}/healthz", Health()))
    try:
        with idle_connections(port, 1) as (sock,):
            sock.settimeout(5)
            began = time.monotonic()
            assert sock.recv(100) == b""  # closed without an answer
            assert time.monotonic() - began < 3
    finally:
        server.shutdown()
        server.server_close()


def test_the_metrics_answer_plain_text_to_an_accept_header_they_cannot_read() -> None:
    server, port = started(lambda p: serve_metrics(p, lambda: None, addr="127.0.0.1"))
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", headers={"Accept": "text/plain; version=x.y"}
        )
        with urllib.request.urlopen(request, timeout=3) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert b"tideflow_operator_" in response.read()
    finally:
        server.shutdown()
        server.server_close()


def dribble(port: int, request: bytes, every: float, limit: float) -> tuple[float, bytes]:
    """Send ``request`` a byte at a time, ``every`` seconds apart, until the server
    answers or closes (or ``limit`` seconds pass): (seconds taken, what it answered)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        began = time.monotonic()
        answer = b""
        for byte in request:
            if time.monotonic() - began > limit:
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # closed by the server
                break
            readable, _, _ = select.select([sock], [], [], every)
            if readable:
                with contextlib.suppress(OSError):
                    answer = sock.recv(100)
                break
        else:
            answer = sock.recv(100)
        return time.monotonic() - began, answer


@pytest.mark.parametrize("which", ["probes", "metrics"])
def test_a_request_dribbled_a_byte_at_a_time_gets_the_request_time_in_all(
    which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request time bounds reading the whole request, as the agent's endpoint does.

    The timeout was the socket's, per read: a client sending a byte every few
    seconds (slowloris) kept its connection, and a thread, for as long as it
    liked, and was answered after 30 s.  Here a byte every 0.2 s against a request
    time of 0.5 s: cut off with no answer within about the request time."""
    monkeypatch.setattr(http_servers.QuietHandler, "timeout", 0.5)
    monkeypatch.setattr(http_servers.QuietWSGIHandler, "timeout", 0.5)
    if which == "probes":
        server, port = started(lambda p: serve_health(f"http://127.0.0.1:{p}/healthz", Health()))
        path = "/healthz"
    else:
        server, port = started(lambda p: serve_metrics(p, lambda: None, addr="127.0.0.1"))
        path = "/metrics"
    try:
        request = f"GET {path} HTTP/1.0\r\nX-Slow: {'a' * 20}\r\n\r\n".encode()
        taken, answer = dribble(port, request, every=0.2, limit=6.0)
        assert answer == b"", (taken, answer)
        assert taken < 2.0, taken
        assert get(f"http://127.0.0.1:{port}{path}")[0] == 200  # and it answers the next
    finally:
        server.shutdown()
        server.server_close()
