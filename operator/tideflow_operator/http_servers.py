"""HTTP servers that a flood of connections cannot multiply nor starve.

The operator answers its probes from a thread (so that a stuck event loop is
reported as such, and a standby replica, which has no loop, still answers)
and serves its metrics with ``prometheus_client``'s WSGI app.  The standard
library's threading servers took a thread per connection, kept for as long as
the client stayed silent: 300 idle connections were 300 threads, for good.
These give a connection ``REQUEST_SECONDS`` to send its whole request.  (The
time was the socket's, per read: a client sending a byte every few seconds
kept its connection, and its thread, for as long as it liked.)

One thread accepts and reads every request head, a thread more answers each
complete one (:class:`BoundedConnections`).  A thread per accepted connection,
evicting the oldest beyond ``MAX_CONNECTIONS``, lost the kubelet's probe in a
flood of new idle connections: the accept loop, starting a thread each, fell
behind (the listen queue full, the probe's SYN dropped until its second was
up), and a probe accepted was shut as the oldest before its thread read it.
Now idle connections cost no thread and are the only ones evicted; a request
that arrives whole is answered at once.

At most ``MAX_CONNECTIONS`` threads answer.  A thread per complete request,
the oldest connection shut down beyond the bound, bounded the connections but
not the threads: a liveness answer waits for the event loop, and a flood of
complete requests while it was busy made thousands of threads (and kept as
many descriptors).  Complete requests beyond the bound now wait for a thread
that is done (the newest first), at most ``MAX_CONNECTIONS`` of them, the
oldest closed.  Out of descriptors (EMFILE), the serving thread closes the
oldest connection still without its head to accept the next, or stops
accepting for a moment: the listening socket stayed readable and it spun.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import math
import selectors
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import BaseServer, StreamRequestHandler, ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from tideflow.http_bounds import MAX_CONNECTIONS, MAX_HEAD_BYTES, REQUEST_SECONDS

_Socket = socket.socket


class BoundedConnections(BaseServer):
    """Mixed in before a threading server: requests read by one thread, then answered.

    The serving thread accepts connections in batches and reads each one's
    request head itself, without a thread (at once on accept, then whenever
    more arrives): only a connection whose head is complete gets a thread to
    answer it.  At most ``max_waiting`` connections wait for their heads (a
    new one closes the oldest) and each waits ``REQUEST_SECONDS`` in all; at
    most ``max_connections`` threads answer, and at most ``max_waiting``
    complete requests wait for one of them (the newest answered first, the
    oldest closed).  A flood of idle or slow connections therefore never holds
    a thread, and cannot push out a fresh request: a kubelet's probe sends its
    head with its connection, and is answered as soon as it is accepted.
    """

    max_connections = MAX_CONNECTIONS  # being answered (a thread each)
    max_waiting = MAX_CONNECTIONS  # accepted, head not complete yet (no thread)
    accept_batch = 8  # accepted per turn, between reads of the waiting
    # Out of descriptors with none to free: the listening socket is left alone this long.
    accept_pause = 0.1
    # Read and dropped before closing a connection answered: a body sent with its
    # head, left unread, made the close a reset, which may lose the answer sent.
    drain_bytes = 256 * 1024
    max_head = MAX_HEAD_BYTES
    daemon_threads = True
    # socketserver's listen backlog is 5: in a burst, a connection beyond it (the
    # kubelet's probe) had its SYN dropped and tried again a second later.  The
    # queue is drained fast (an accept costs no thread), so a long one costs little.
    request_queue_size = 1024
    socket: _Socket  # (the listening socket: TCPServer's)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = threading.Lock()  # the two below
        self._answering = 0  # threads answering (each takes the next complete request)
        self._ready: collections.deque[tuple[Any, Any]] = collections.deque()  # for a thread
        # Accepted, head not complete: (deadline, address, bytes so far); oldest first.
        # Only the serving thread touches it.
        self._waiting: dict[_Socket, tuple[float, Any, bytearray]] = {}
        self._watched: set[_Socket] = set()  # waiting and registered with the selector
        self._heads: dict[Any, tuple[bytes, float]] = {}  # read for a handler: (head, deadline)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        super().__init__(*args, **kwargs)

    # -- the serving thread ------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        if self._stopping.is_set():
            return
        self._stopped.clear()
        self.socket.setblocking(False)
        selector = selectors.DefaultSelector()
        selector.register(self.socket, selectors.EVENT_READ, None)
        self._paused_until: float | None = None  # not accepting (out of descriptors)
        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(timeout=min(poll_interval, 0.1)):
                    if key.data is None:
                        self._accept_some(selector)
                    elif key.fileobj in self._waiting:  # (not dropped in this turn)
                        self._read_head(key.fileobj, selector)
                self._expire(selector)
                if self._paused_until is not None and time.monotonic() >= self._paused_until:
                    self._paused_until = None
                    selector.register(self.socket, selectors.EVENT_READ, None)
        finally:
            for sock in list(self._waiting):
                self._drop(sock, selector)
            with self._lock:
                ready, self._ready = list(self._ready), collections.deque()
            for request, _ in ready:
                self.shutdown_request(request)
            selector.close()
            self._stopped.set()

    def shutdown(self) -> None:
        self._stopping.set()
        self._stopped.wait()

    def _request_seconds(self) -> float:
        return float(getattr(self.RequestHandlerClass, "timeout", None) or REQUEST_SECONDS)

    def _accept_some(self, selector: selectors.BaseSelector) -> None:
        for _ in range(self.accept_batch):
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):  # none left
                return
            except OSError as exc:
                short = exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
                if short and self._out_of_descriptors(selector):
                    continue
                return  # (else one aborted before its accept: the next turn)
            sock.setblocking(False)
            deadline = time.monotonic() + self._request_seconds()
            self._waiting[sock] = (deadline, address, bytearray())
            if self._read_head(sock):  # often there already: answered on accept
                selector.register(sock, selectors.EVENT_READ, address)
                self._watched.add(sock)
            while len(self._waiting) > self.max_waiting:
                # Read before shedding: the oldest may have sent its head since (a
                # probe accepted before it, pushed to the front by idle ones).
                oldest = next(iter(self._waiting))
                if self._read_head(oldest, selector):
                    self._drop(oldest, selector)

    def _out_of_descriptors(self, selector: selectors.BaseSelector) -> bool:
        """``accept`` failed for want of a descriptor: the listening socket stays
        readable, and was selected again at once, for ever (a core spent, the GIL
        taken from the event loop).  Close the oldest connection that has not
        sent its head (the one a new connection would push out anyway), else
        leave the listening socket alone for ``accept_pause``.  True: one closed."""
        if self._waiting:
            self._drop(next(iter(self._waiting)), selector)
            return True
        if self._paused_until is None:
            selector.unregister(self.socket)
            self._paused_until = time.monotonic() + self.accept_pause
        return False

    def _read_head(self, sock: _Socket, selector: selectors.BaseSelector | None = None) -> bool:
        """Read what ``sock`` sent; True while its head is still to come."""
        deadline, address, head = self._waiting[sock]
        try:
            data = sock.recv(self.max_head + 1 - len(head))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        head += data
        ended = b"\r\n\r\n" in head or b"\n\n" in head  # (a body may have come with it)
        if not data or (not ended and len(head) > self.max_head):  # gone, or too big to read
            self._drop(sock, selector)
            return False
        if not ended:
            return True
        self._unwatch(sock, selector)  # before its thread may close it (and the fd be reused)
        del self._waiting[sock]
        sock.setblocking(True)
        self._heads[sock] = (bytes(head), deadline)
        try:
            self.process_request(sock, address)
        except Exception:
            self._heads.pop(sock, None)
            self.handle_error(sock, address)
            self.shutdown_request(sock)
        return False

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for sock, (deadline, _, _) in list(self._waiting.items()):
            if deadline > now:
                break  # (oldest first, each given the same time)
            self._drop(sock, selector)

    def _drop(self, sock: _Socket, selector: selectors.BaseSelector | None = None) -> None:
        self._unwatch(sock, selector)
        del self._waiting[sock]
        sock.close()

    def _unwatch(self, sock: _Socket, selector: selectors.BaseSelector | None) -> None:
        if sock in self._watched:
            self._watched.discard(sock)
            if selector is not None:
                selector.unregister(sock)

    def take_head(self, request: Any) -> tuple[bytes, float] | None:
        """What the serving thread read of ``request``'s head, and its deadline (a handler's)."""
        return self._heads.pop(request, None)

    # -- answering (at most max_connections threads) ---------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        """Answer a complete request in a thread, or have it wait for one that is done."""
        shed = []
        with self._lock:
            if self._answering < self.max_connections:
                self._answering += 1
                start = True
            else:
                start = False
                self._ready.append((request, client_address))
                while len(self._ready) > self.max_waiting:
                    shed.append(self._ready.popleft()[0])
        for oldest in shed:  # waited longest: most likely given up on by its client
            self.shutdown_request(oldest)
        if start:
            thread = threading.Thread(
                target=self._answer, args=(request, client_address), daemon=True
            )
            try:
                thread.start()
            except BaseException:
                with self._lock:
                    self._answering -= 1
                raise

    def _answer(self, request: Any, client_address: Any) -> None:
        """A thread's work: the request it was started for, then the newest waiting."""
        while True:
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
            with self._lock:
                if not self._ready:
                    self._answering -= 1
                    return
                request, client_address = self._ready.pop()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection shut down or reset by either side is no error (socketserver
        printed a traceback for each: a flood was a flood of them on stderr)."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self._heads.pop(request, None)
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)  # the answer's end, then what is left unread:
            request.setblocking(False)
            left = self.drain_bytes
            while left > 0 and (data := request.recv(min(left, 65536))):
                left -= len(data)
        request.close()


class BoundedHTTPServer(BoundedConnections, ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with bounded connections (handlers: :class:`QuietHandler`)."""


class _ReadBefore(io.RawIOBase):
    """A socket's reading side that raises ``TimeoutError`` once ``deadline`` passes."""

    def __init__(
        self, sock: socket.socket, deadline: float, each: float | None, head: bytes = b""
    ) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline
        self._each = each  # the socket's own timeout, for the writes after
        self._head = memoryview(head)  # read already by the serving thread

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
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
        taken = getattr(self.server, "take_head", None)
        head, accepted_deadline = (taken(self.request) if taken else None) or (b"", math.inf)
        if self.timeout is not None or head:
            each = self.timeout
            deadline = min(accepted_deadline, time.monotonic() + (each or math.inf))
            per_read = self.rfile
            reader = _ReadBefore(self.connection, deadline, each, head)
            self.rfile = io.BufferedReader(reader)
            per_read.close()  # (not the socket: the server closes that)


class QuietHandler(_RequestTime, BaseHTTPRequestHandler):
    """A request handler that reads its request within :data:`REQUEST_SECONDS` and logs no line."""

    timeout = REQUEST_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        return


class BoundedWSGIServer(BoundedConnections, ThreadingMixIn, WSGIServer):
    """wsgiref's server, answering from threads, with bounded connections."""


class QuietWSGIHandler(_RequestTime, WSGIRequestHandler):
    timeout = REQUEST_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        return
