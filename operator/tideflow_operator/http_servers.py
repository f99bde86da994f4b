"""Threaded HTTP servers that a flood of connections cannot multiply.

The operator answers its probes from a thread (so that a stuck event loop is
reported as such, and a standby replica, which has no loop, still answers)
and serves its metrics with ``prometheus_client``'s WSGI app.  The standard
library's threading servers took a thread per connection, kept for as long as
the client stayed silent: 300 idle connections were 300 threads, for good.
These give a connection ``REQUEST_SECONDS`` to send its whole request and keep
at most ``MAX_CONNECTIONS`` open (``tideflow.http_bounds``): a new one shuts
the oldest down, so a probe still gets through a flood.  (The time was the
socket's, per read: a client sending a byte every few seconds kept its
connection, and its thread, for as long as it liked.)
"""

from __future__ import annotations

import contextlib
import io
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import BaseServer, StreamRequestHandler, ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from tideflow.http_bounds import MAX_CONNECTIONS, REQUEST_SECONDS


class BoundedConnections(BaseServer):
    """Mixed in before a threading server: at most ``max_connections`` open."""

    max_connections = MAX_CONNECTIONS
    daemon_threads = True
    # socketserver's listen backlog is 5: in a burst, a connection beyond it (the
    # kubelet's probe) had its SYN dropped and tried again a second later.
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: dict[Any, None] = {}  # oldest first
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open[request] = None
            while len(self._open) > self.max_connections:
                oldest = next(iter(self._open))
                del self._open[oldest]
                with contextlib.suppress(OSError):  # its thread reads an end and goes
                    oldest.shutdown(socket.SHUT_RDWR)
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection shut down or reset by either side is no error (socketserver
        printed a traceback for each: a flood was a flood of them on stderr)."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)


class BoundedHTTPServer(BoundedConnections, ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with bounded connections (handlers: :class:`QuietHandler`)."""


class _ReadBefore(io.RawIOBase):
    """A socket's reading side that raises ``TimeoutError`` once ``deadline`` passes."""

    def __init__(self, sock: socket.socket, deadline: float, each: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline
        self._each = each  # the socket's own timeout, for the writes after

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took longer than its time")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._each)


class _RequestTime(StreamRequestHandler):
    """Mixed in before a request handler: its ``timeout`` bounds the whole request's
    reading, not each read (a request dribbled a byte at a time is cut off)."""

    def setup(self) -> None:
        super().setup()
        if self.timeout is not None:
            deadline = time.monotonic() + self.timeout
            per_read = self.rfile
            self.rfile = io.BufferedReader(_ReadBefore(self.connection, deadline, self.timeout))
            per_read.close()  # (not the socket: the server closes that)


class QuietHandler(_RequestTime, BaseHTTPRequestHandler):
    """A request handler that reads its request within :data:`REQUEST_SECONDS` and logs no line."""

    timeout = REQUEST_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        return


class BoundedWSGIServer(BoundedConnections, ThreadingMixIn, WSGIServer):
    """wsgiref's server, a thread per request, with bounded connections."""


class QuietWSGIHandler(_RequestTime, WSGIRequestHandler):
    timeout = REQUEST_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        return
