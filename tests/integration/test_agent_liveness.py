"""The agent's metrics port: ``/healthz`` for the liveness probe, ``/metrics``.

Proves, with a real agent process and a real broker, and in process for a
loop blocked on purpose:

* a stopped agent (SIGSTOP; a frozen cgroup is the same to it) still has the
  kernel accept connections on its port (the chart's probe before was such a
  TCP connect), and answers no request; it answers again once it runs;
* an agent whose event loop is blocked answers nothing until it runs again:
  the endpoint is served from that loop;
* a flood of idle connections (300) costs the agent no thread (the server
  before took a thread per connection and kept it: 300 more threads, each
  moved at every task start with cgroups), and the probe still gets through;
* a request larger than the bound, or not sent within the time, is dropped
  without an answer, and other methods than GET and HEAD are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from services.agent import wait_for
from services.broker import Mosquitto
from services.metrics import metered_agent, scrape

from edge_agent import metrics as agent_metrics
from edge_agent.metrics import AgentMetrics


def health(port: int, timeout: float = 2.0) -> tuple[int, str]:
    """``/healthz``'s status and body; raises OSError (a timeout) if there is no answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def raw(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """What the server sends back for ``request`` until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


LINK_UP = b"\ntideflow_agent_link_connected 1.0\n"


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_a_stopped_agent_accepts_connections_but_answers_no_probe(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    agent, port = metered_agent("alive", mosquitto.url, tmp_path / "a.db")
    try:
        assert wait_for(lambda: health(port) == (200, "ok\n"), 10, "healthy")
        os.kill(agent.proc.pid, signal.SIGSTOP)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass  # the old probe: the kernel still completes the handshake
            with pytest.raises(OSError):  # a timeout: no answer at all
                health(port, timeout=2)
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        assert wait_for(lambda: health(port) == (200, "ok\n"), 10, "healthy again")
        assert "tideflow_agent_link_connected" in scrape(port)
    finally:
        agent.kill()


def test_a_flood_of_idle_connections_costs_no_thread_and_the_probe_gets_through(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    agent, port = metered_agent("flooded", mosquitto.url, tmp_path / "a.db")
    flood: list[socket.socket] = []
    try:
        assert wait_for(lambda: health(port) == (200, "ok\n"), 10, "healthy")
        # Counted once the link is up: its thread starts with it, and healthy can
        # come first (under load the count was taken before it: 2, then 4).
        assert wait_for(lambda: LINK_UP in raw(port, b"GET /metrics HTTP/1.0\r\n\r\n"), 10, "up")
        before = threads_of(agent.proc.pid)
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metr")  # and nothing more
            flood.append(sock)
        started = time.monotonic()
        assert health(port, timeout=5) == (200, "ok\n")
        assert time.monotonic() - started < 2
        time.sleep(1)
        # (The agent's own may start one meanwhile, its outbox reader; the server
        # before made 300.)
        assert threads_of(agent.proc.pid) <= before + 1, (before, threads_of(agent.proc.pid))
        # Only the newest MAX_CONNECTIONS stay open; the others were closed.
        closed = 0
        for sock in flood:
            sock.settimeout(0.01)
            try:
                closed += sock.recv(1) == b""
            except ConnectionResetError:  # closed by a reset (an abort)
                closed += 1
            except TimeoutError:  # still open
                pass
        assert closed >= len(flood) - agent_metrics.MAX_CONNECTIONS, closed
        assert agent.alive
    finally:
        for sock in flood:
            sock.close()
        agent.kill()


@contextlib.contextmanager
def served_on_a_loop_of_its_own() -> Iterator[tuple[asyncio.AbstractEventLoop, int]]:
    """An :class:`AgentMetrics` endpoint on a loop in a thread, and its port."""
    metrics = AgentMetrics()
    metrics.running.set(3)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        server = asyncio.run_coroutine_threadsafe(metrics.serve(0, "127.0.0.1"), loop).result(5)
        try:
            yield loop, server.port
        finally:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(5)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_a_blocked_event_loop_answers_no_probe_until_it_runs_again() -> None:
    with served_on_a_loop_of_its_own() as (loop, port):
        assert health(port) == (200, "ok\n")
        assert scrape(port)["tideflow_agent_running_tasks"] == 3
        loop.call_soon_threadsafe(time.sleep, 4.0)  # the loop does nothing else meanwhile
        time.sleep(0.2)
        with pytest.raises(OSError):
            health(port, timeout=2)
        assert wait_for(lambda: health(port) == (200, "ok\n"), 10, "healthy again")


def test_requests_too_large_too_slow_or_not_get_are_dropped_or_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(agent_metrics, "REQUEST_SECONDS", 0.5)
    with served_on_a_loop_of_its_own() as (_, port):
        assert raw(port, b"GET /healthz HTTP/1.1\r\n" + b"X: " + b"a" * 10_000 + b"\r\n\r\n") == b""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\n")
            started = time.monotonic()
            assert slow.recv(100) == b""  # closed, unanswered, after REQUEST_SECONDS
            assert time.monotonic() - started < 3
        assert raw(port, b"POST /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
        head = raw(port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
        openmetrics = raw(
            port, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n"
        )
        assert b"application/openmetrics-text" in openmetrics and openmetrics.endswith(b"# EOF\n")
        # prometheus_client's choice of format raises on a version that is no number.
        odd = raw(port, b"GET / HTTP/1.1\r\nAccept: text/plain; version=x.y\r\n\r\n")
        assert odd.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4")
        assert b"tideflow_agent_running_tasks 3.0" in odd
        assert health(port) == (200, "ok\n")
