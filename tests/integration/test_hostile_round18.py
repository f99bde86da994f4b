"""What the round-17 hostile pass left, each reproduced with real processes first.

* an agent stopped (SIGTERM) while clients held connections to its metrics
  port, silent, mid-request: its event loop's end cancelled their handlers,
  and Python 3.11's stream server logged each as an ``ERROR`` with a
  traceback, a clean stop reported as up to 32 errors.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from pathlib import Path

from services.broker import Mosquitto
from services.metrics import metered_agent


def test_a_stop_with_connections_open_on_the_metrics_port_logs_no_error(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    agent, port = metered_agent("quiet", mosquitto.url, tmp_path / "a.db")
    held: list[socket.socket] = []
    try:
        for _ in range(5):  # mid-request, silent
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metr")
            held.append(sock)
        for _ in range(3):  # half-closed after a whole request: answered
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            held.append(sock)
        time.sleep(0.3)  # every connection is with its handler
        assert agent.proc is not None
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(10) == 0, agent.log_tail()
        assert time.monotonic() - started < 3  # not held by the silent ones (5 s each)
        log = agent.log_path.read_text()
        assert "ERROR" not in log and "Traceback" not in log, agent.log_tail(60)
        for sock in held[:5]:  # closed by the agent, unanswered
            sock.settimeout(2)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
        for sock in held[5:]:
            sock.settimeout(2)
            assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")
    finally:
        for sock in held:
            sock.close()
        agent.kill()
