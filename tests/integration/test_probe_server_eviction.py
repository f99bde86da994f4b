"""A connection whose request head has come is answered, never shed as idle.

The operator's probe and metrics servers (:mod:`tideflow_operator.http_servers`)
keep at most ``max_waiting`` accepted connections that have not sent their
request head, and shed the oldest when a new one comes.  In a flood of idle
connections (CI met it: "answer: b''"), a kubelet's probe accepted before its
head arrived became the oldest within a few batches of accepts, and was shed
with its head already there, unread: the probe got a closed connection.

Proves, on real loopback sockets with the server's own turns driven by the
test (so the order is the one that lost the probe, every time): a connection
accepted before its head came, then sent its head, then pushed to the front of
the line by idle ones, is answered 200; an idle one is shed in its place.
"""

from __future__ import annotations

import selectors
import socket
import threading
from typing import Any

from tideflow_operator.http_servers import BoundedHTTPServer, QuietHandler


class Ok(QuietHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def _wait_readable(sock: socket.socket, server: Any) -> None:
    """Until the server's side of ``sock`` has data (what its selector would see)."""
    with selectors.DefaultSelector() as selector:
        for waiting in server._waiting:
            if waiting.getpeername() == sock.getsockname():
                selector.register(waiting, selectors.EVENT_READ)
                assert selector.select(5), "the head never reached the server"
                return
    raise AssertionError("the probe is not among the connections waiting for a head")


def test_a_probe_whose_head_came_is_answered_when_idle_ones_push_it_to_the_front() -> None:
    server = BoundedHTTPServer(("127.0.0.1", 0), Ok)
    server.max_waiting = 2
    server.socket.setblocking(False)  # (as serve_forever sets it)
    server._paused_until = None
    port = server.server_address[1]
    selector = selectors.DefaultSelector()
    idle: list[socket.socket] = []
    try:
        probe = _connect(port)
        server._accept_some(selector)  # accepted; its head not sent yet
        probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        _wait_readable(probe, server)
        idle = [_connect(port) for _ in range(3)]
        for _ in idle:
            server._accept_some(selector)  # each pushes the oldest out (the probe first)
        answer = probe.recv(12)
        assert answer == b"HTTP/1.0 200", answer
        assert len(server._waiting) <= server.max_waiting
        idle[0].settimeout(5)
        assert idle[0].recv(1) == b""  # an idle one was shed in its place
    finally:
        for sock in idle:
            sock.close()
        probe.close()
        for sock in list(server._waiting):
            server._drop(sock, selector)
        selector.close()
        server.server_close()


def test_the_server_thread_answers_as_before() -> None:
    server = BoundedHTTPServer(("127.0.0.1", 0), Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with _connect(server.server_address[1]) as probe:
            probe.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert probe.recv(12) == b"HTTP/1.0 200"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
