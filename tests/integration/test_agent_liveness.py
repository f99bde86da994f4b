"""The agent's liveness endpoint, ``/healthz`` on its metrics port.

Proves that it fails for an agent that can do nothing any more, which the
chart's probe before it (a TCP connect to the metrics port) did not:

* a stopped agent (SIGSTOP; a frozen cgroup is the same to it) still has the
  kernel accept connections on its port, and answers no request; the probe's
  timeout fails it, and it answers again once it runs;
* an agent whose event loop is blocked answers 503 and says so from the HTTP
  thread, then 200 once its loop runs again;
* ``/metrics`` is still served on every other path.
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
from services.metrics import free_port, metered_agent, scrape

from edge_agent.liveness import LoopHeartbeat
from edge_agent.metrics import AgentMetrics


def health(port: int, timeout: float = 2.0) -> tuple[int, str]:
    """``/healthz``'s status and body; raises OSError (a timeout) if there is no answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_stopped_agent_accepts_connections_but_fails_its_health_check(
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


@contextlib.contextmanager
def loop_in_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_a_blocked_event_loop_fails_the_health_check_and_recovers() -> None:
    heartbeat = LoopHeartbeat(stale_after=3.0)
    metrics = AgentMetrics()
    metrics.running.set(3)
    with loop_in_thread() as loop:
        ticking = asyncio.run_coroutine_threadsafe(heartbeat.run(), loop)
        for _ in range(3):
            port = free_port()
            try:
                server = metrics.serve(port, "127.0.0.1", health=heartbeat.problem)
                break
            except OSError:  # taken meanwhile
                continue
        try:
            assert wait_for(lambda: health(port) == (200, "ok\n"), 5, "healthy")
            loop.call_soon_threadsafe(time.sleep, 5.0)  # the loop does nothing else meanwhile
            status, body = wait_for(
                lambda: (answer := health(port))[0] == 503 and answer, 8, "the 503"
            )
            assert status == 503 and "event loop has not run for" in body, body
            assert scrape(port)["tideflow_agent_running_tasks"] == 3  # metrics still served
            assert wait_for(lambda: health(port) == (200, "ok\n"), 10, "healthy again")
        finally:
            server.shutdown()
            ticking.cancel()
            for _ in range(2):  # the loop sees the cancel through before it stops
                asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(5)


def test_a_staleness_shorter_than_a_few_ticks_is_raised_to_them() -> None:
    """A loop that ticks every second is not called dead between two ticks."""
    assert LoopHeartbeat(stale_after=0.5).stale_after == 3.0
    assert LoopHeartbeat(stale_after=90).stale_after == 90
