"""Prometheus metrics of one agent, in a registry of its own, and its health endpoint.

A registry per agent (not the process-global default) keeps tests that run
several agents in one process honest, and lets ``--metrics-port`` expose
exactly these series.  The same port answers ``/healthz``, the liveness
probe's: from the event loop that drives everything the agent does, so an
agent whose loop is blocked, stopped or frozen answers nothing, and the
probe's timeout fails it (a TCP connect, the probe before, is accepted by the
kernel for such an agent alike).

Served on the event loop, not from threads: ``prometheus_client``'s server
took a thread per connection and kept it for as long as the client liked (300
idle connections made 300 threads; every task start with cgroups moves every
thread of the agent, see ``CgroupScope``), and its own thread for good.  Each
connection here gets one request, read within a few seconds and a few KiB,
and at most :data:`MAX_CONNECTIONS` are open: a new one closes the oldest, so
a probe always gets through a flood.

The agent's stop closes the port and resets the connections still open before
its loop ends, and waits for their handlers: a handler the loop's end
cancelled instead was logged by Python 3.11's stream server as an error with
a traceback, one per silent client, on a clean stop.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from tideflow.http_bounds import MAX_CONNECTIONS, REQUEST_SECONDS

HEALTH_PATH = "/healthz"
REQUEST_HEAD_MAX_BYTES = 8192
# Turns of the loop from a connection's accept to its handler's first step (the
# accept's own task, the transport's connection_made, the handler's task), and one more.
_HANDOVER_TURNS = 4


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tasks = Counter(
            "tideflow_agent_task_attempts",
            "Finished task attempts by outcome",
            ["outcome"],
            registry=r,
        )
        self.task_seconds = Histogram(
            "tideflow_agent_task_duration_seconds",
            "Duration of task attempts",
            buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
            registry=r,
        )
        self.running = Gauge("tideflow_agent_running_tasks", "Attempts running now", registry=r)
        self.outbox_depth = Gauge(
            "tideflow_agent_outbox_records", "Records not yet acked", registry=r
        )
        self.outbox_bytes = Gauge("tideflow_agent_outbox_bytes", "Bytes not yet acked", registry=r)
        self.connected = Gauge(
            "tideflow_agent_link_connected", "1 if the MQTT link is up", registry=r
        )
        self.offline_seconds = Gauge(
            "tideflow_agent_offline_seconds",
            "Seconds since the link went down (0 when up)",
            registry=r,
        )
        self.last_acked_seq = Gauge(
            "tideflow_agent_last_acked_seq", "Highest seq the cloud has applied", registry=r
        )
        self.sync_lag = Gauge(
            "tideflow_agent_sync_lag_records",
            "Records written but not yet acked (last seq - acked seq)",
            registry=r,
        )
        self.dropped = Counter(
            "tideflow_agent_dropped_messages",
            "Malformed or misaddressed messages dropped",
            ["reason"],
            registry=r,
        )

    async def serve(self, port: int, addr: str = "0.0.0.0") -> MetricsServer:
        """Serve the metrics (every path, as ``prometheus_client`` does) and
        ``/healthz`` on the running loop; returns the server (``await
        close()`` it to stop).

        Raises ``OSError`` if the port cannot be bound.
        """
        endpoint = _Endpoint(self.registry)
        server = await asyncio.start_server(
            endpoint.handle, addr, port, limit=REQUEST_HEAD_MAX_BYTES, reuse_address=True
        )
        return MetricsServer(server, endpoint)


class MetricsServer:
    """The listening port and the connections it accepted."""

    def __init__(self, server: asyncio.Server, endpoint: _Endpoint) -> None:
        self._server = server
        self._endpoint = endpoint

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening, reset every connection still open, and return once
        their handlers have ended (at once: each ends on its reset)."""
        self._server.close()
        await self._endpoint.close()


class _Endpoint:
    """One request per connection, bounded in time, size and number."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._open: dict[asyncio.StreamWriter, None] = {}  # oldest first
        self._handlers: set[asyncio.Future[None]] = set()  # evicted ones too, until they end
        self._closing = False

    async def close(self) -> None:
        """(The listening socket is closed.)  Reset every connection, and wait for
        their handlers, those of connections accepted just before too."""
        self._closing = True
        # A connection accepted before the close reaches its handler a few turns of
        # the loop later (accepted, then made a transport, then handed over); one
        # still on its way when the loop ends had its handler cancelled before its
        # first step, which logged the same error.  Each of them now resets itself.
        for _ in range(_HANDOVER_TURNS):
            await asyncio.sleep(0)
        for writer in self._open:
            writer.transport.abort()
        self._open.clear()
        if self._handlers:
            await asyncio.wait(self._handlers)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
            return
        handler = asyncio.current_task()
        assert handler is not None  # (the stream server runs each in a task)
        self._handlers.add(handler)
        self._open[writer] = None
        while len(self._open) > MAX_CONNECTIONS:  # (many arrive in one turn of the loop)
            oldest = next(iter(self._open))
            del self._open[oldest]
            oldest.transport.abort()  # its handler ends on the reset
        try:
            head = await asyncio.wait_for(_read_head(reader), REQUEST_SECONDS)
            if head is not None:
                writer.write(self._answer(head))
                await asyncio.wait_for(writer.drain(), REQUEST_SECONDS)
        except (TimeoutError, ValueError, OSError):
            pass  # slow, too large, or reset: the connection just goes
        finally:
            self._handlers.discard(handler)
            self._open.pop(writer, None)
            writer.close()

    def _answer(self, lines: list[str]) -> bytes:
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", "text/plain", b"GET only\n", method)
        if path == HEALTH_PATH:
            return _response("200 OK", "text/plain; charset=utf-8", b"ok\n", method)
        accept = next(
            (line.partition(":")[2].strip() for line in lines[1:]
             if line.partition(":")[0].strip().lower() == "accept"),
            "",
        )  # fmt: skip
        try:
            encoder, content_type = choose_encoder(accept)
        except (TypeError, ValueError):  # e.g. "version=abc": the plain text format then
            encoder, content_type = choose_encoder("")
        return _response("200 OK", content_type, encoder(self.registry), method)


async def _read_head(reader: asyncio.StreamReader) -> list[str] | None:
    """The request line and header lines, without their ends; None if the client
    stopped sending first.  Raises ``ValueError`` past
    :data:`REQUEST_HEAD_MAX_BYTES`.

    Line by line: a line may end in a bare LF (RFC 9112 lets a server take it
    so, and ``prometheus_client``'s server did): ``printf 'GET /healthz
    HTTP/1.0\\n\\n' | nc`` waited for a CRLF CRLF that never came.
    """
    lines: list[str] = []
    size = 0
    while True:
        line = await reader.readline()  # (ValueError past the reader's limit)
        size += len(line)
        if size > REQUEST_HEAD_MAX_BYTES:
            raise ValueError("request head too large")
        if not line.endswith(b"\n"):
            return None  # end of stream before the head's end
        text = line.decode("latin-1").rstrip("\r\n")
        if text:
            lines.append(text)
        elif lines:
            return lines
        # (An empty line before the request line is skipped, as RFC 9112 asks.)


def _response(status: str, content_type: str, body: bytes, method: str) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + (b"" if method == "HEAD" else body)
