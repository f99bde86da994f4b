"""A loopback TCP link to a broker that can be cut and restored, for real.

:class:`LinkProxy` sits between one client (an edge agent) and the broker.
:meth:`LinkProxy.cut` takes the link down the way a dead uplink does — the
TCP connections go away and nothing passes in either direction — and
:meth:`LinkProxy.restore` brings it back; see the class for what exactly
happens to connections.  ``tideflow demo`` cuts site B's link with it, and the
tests drive link outages through it.  It is its own module because it shares
nothing with the broker launcher but the loopback host.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

from tideflow.tools.launchers import HOST

__all__ = ["LinkProxy"]


class _Pair:
    """One client connection and, while the link is up, its connection to the target."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.to_client = bytearray()
        self.to_upstream = bytearray()  # while held: everything the client sent so far


class LinkProxy:
    """A loopback TCP relay to ``target`` (a broker) whose link can be cut and restored.

    Point one client at :attr:`url` (an edge agent's ``--broker``) and the proxy
    relays each of its connections to a fresh connection to the target.

    :meth:`cut` takes the link down.  Every relayed connection is closed on both
    sides at once — the broker sees the client vanish (and publishes its last
    will), the client sees its link drop, as both would after their keepalive
    expired on a dead uplink.  From then on nothing passes in either direction:
    new connections are accepted but *held*, what the client sends is kept and
    nothing is answered, like packets queued behind the dead link.

    :meth:`restore` brings it back: each held connection is connected to the
    target and what the client sent meanwhile is delivered (a client still
    waiting for its CONNACK gets it), and new connections are relayed again.
    A client that gives up on a held connection closes it, and it is forgotten.
    """

    BUFFER_LIMIT = 4 * 1024 * 1024  # per direction; beyond it we stop reading that side

    def __init__(
        self, target_host: str, target_port: int, *, host: str = HOST, port: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._pairs: list[_Pair] = []
        self._up = True
        self._commands: list[tuple[str, threading.Event]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.cuts = 0

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def up(self) -> bool:
        return self._up

    @property
    def connections(self) -> int:
        """Client connections open right now (relayed or held)."""
        return len(self._pairs)

    def start(self) -> LinkProxy:
        if self._thread is None:
            self._selector.register(self._listener, selectors.EVENT_READ, "listen")
            self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._thread = threading.Thread(target=self._run, name="link-proxy", daemon=True)
            self._thread.start()
        return self

    def cut(self) -> None:
        """Take the link down (returns once every relayed connection is closed)."""
        self._command("cut")

    def restore(self) -> None:
        """Bring the link back (returns once held connections are connected through)."""
        self._command("restore")

    def close(self) -> None:
        """Close every connection and the listener; stop the relay thread."""
        if self._closed:
            return
        if self._thread is not None and self._thread.is_alive():
            self._command("close")
            self._thread.join(5)
        else:
            self._shutdown()
        self._closed = True

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "up" if self._up else "cut"
        return f"<LinkProxy {self.url} -> {self.target[0]}:{self.target[1]} {state}>"

    # -- the relay thread ----------------------------------------------------------

    def _command(self, name: str, timeout: float = 10.0) -> None:
        if self._thread is None or not self._thread.is_alive():
            if name == "cut":
                self._up = False
            elif name == "restore":
                self._up = True
            return
        done = threading.Event()
        with self._lock:
            self._commands.append((name, done))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if not done.wait(timeout):
            raise TimeoutError(f"link proxy did not {name} within {timeout}s")

    def _run(self) -> None:
        try:
            while True:
                for key, events in self._selector.select(timeout=1.0):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        if self._run_commands():
                            return
                    else:
                        pair, side = key.data
                        self._service(pair, side, events)
        finally:
            self._shutdown()

    def _run_commands(self) -> bool:
        with contextlib.suppress(OSError):
            self._wake_r.recv(4096)
        with self._lock:
            commands, self._commands = self._commands, []
        stop = False
        for name, done in commands:
            if name == "cut":
                self._up = False
                self.cuts += 1
                for pair in [p for p in self._pairs if p.upstream is not None]:
                    self._drop(pair)
            elif name == "restore":
                self._up = True
                for pair in list(self._pairs):
                    if pair.upstream is None:
                        self._connect(pair)
            elif name == "close":
                stop = True
            done.set()
        return stop

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            client.setblocking(False)
            pair = _Pair(client)
            self._pairs.append(pair)
            self._selector.register(client, selectors.EVENT_READ, (pair, "client"))
            if self._up:
                self._connect(pair)

    def _connect(self, pair: _Pair) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            self._drop(pair)  # the target is down: the client sees its link fail
            return
        upstream.setblocking(False)
        pair.upstream = upstream
        self._selector.register(upstream, selectors.EVENT_READ, (pair, "upstream"))
        self._interest(pair)

    def _service(self, pair: _Pair, side: str, events: int) -> None:
        if pair not in self._pairs:
            return
        sock = pair.client if side == "client" else pair.upstream
        assert sock is not None
        if events & selectors.EVENT_READ:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._drop(pair)
                return
            if data:
                (pair.to_upstream if side == "client" else pair.to_client).extend(data)
        if events & selectors.EVENT_WRITE:
            buffer = pair.to_client if side == "client" else pair.to_upstream
            try:
                sent = sock.send(buffer)
                del buffer[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop(pair)
                return
        self._interest(pair)

    def _interest(self, pair: _Pair) -> None:
        """Read a side while the other side's buffer has room; write while ours has data."""
        client_events = selectors.EVENT_WRITE if pair.to_client else 0
        if len(pair.to_upstream) < self.BUFFER_LIMIT:
            client_events |= selectors.EVENT_READ
        self._watch(pair.client, client_events, (pair, "client"))
        if pair.upstream is not None:
            up_events = selectors.EVENT_WRITE if pair.to_upstream else 0
            if len(pair.to_client) < self.BUFFER_LIMIT:
                up_events |= selectors.EVENT_READ
            self._watch(pair.upstream, up_events, (pair, "upstream"))

    def _watch(self, sock: socket.socket, events: int, data: tuple[_Pair, str]) -> None:
        registered = sock in self._selector.get_map()
        if events and registered:
            self._selector.modify(sock, events, data)
        elif events:
            self._selector.register(sock, events, data)
        elif registered:
            self._selector.unregister(sock)

    def _drop(self, pair: _Pair) -> None:
        for sock in (pair.client, pair.upstream):
            if sock is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if pair in self._pairs:
            self._pairs.remove(pair)

    def _shutdown(self) -> None:
        for pair in list(self._pairs):
            self._drop(pair)
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        self._selector.close()
