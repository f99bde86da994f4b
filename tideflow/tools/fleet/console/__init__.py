"""``tideflow console``: a read-only web console of the fleet, served with aiohttp.

Why: a person running hundreds of sites wants to see at a glance which are
dark, since when and how much they hold back, and for one run its DAG with
each task's state -- from the cloud, in a browser, without logging into a
plant.

How it fits: aiohttp comes with kopf, so the console adds no dependency.  Its
data come from one :class:`~.hub.Hub` (one list+watch per kind for every
browser); pages are plain HTML/JS from ``static/`` (no build step, no
vendored library) that fetch JSON from ``/api/...`` and refetch when the
server-sent events stream (``/api/events``) says something they show changed.

Read-only and careful by construction:

* it only lists and watches (the chart's ServiceAccount may do nothing else);
* it binds to 127.0.0.1 unless told otherwise;
* it never sends env, params, commands, scripts or annotations (the hub keeps
  only :func:`~tideflow.tools.fleet.views.safe_workflow`'s fields) and reads
  no Secret;
* the page builds every node with ``textContent`` (never ``innerHTML``) and a
  Content-Security-Policy forbids inline scripts, so a task message that
  says ``<script>`` is shown as those characters;
* the trace link is built from ``--trace-url`` (``{traceId}`` replaced), and
  only an http(s) template is accepted;
* it keeps the bounds of every Tideflow HTTP endpoint (:mod:`tideflow.http_bounds`):
  a connection sends its request within ``REQUEST_SECONDS`` (and is closed that
  long after its last answer), and at most ``CONSOLE_MAX_CONNECTIONS`` are open,
  a new one closing the oldest.  (aiohttp's defaults kept a request never
  finished for an hour, and any number of them: a file descriptor each.)

Stopping: SIGTERM (``kubectl delete pod``, a rollout, ``docker stop``,
``systemctl stop``) ends the event streams, closes the port and exits 0, as
Ctrl-C does (130).  Handled, not left at its default action: the chart runs the
console as its container's PID 1, which the kernel sends no signal it does not
handle, so the pod waited out its grace period for SIGKILL.  Held from
``tideflow``'s first line (:class:`tideflow.cli.HeldStop`): one that came while
the web server and the Kubernetes client were imported, before this module's
handler, was thrown away too, and the console listened on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any
from urllib.parse import quote

from aiohttp import web

from tideflow import http_bounds
from tideflow.tools.fleet import views
from tideflow.tools.fleet.console.hub import Hub, IndexEntry
from tideflow.tools.fleet.views import CRONWORKFLOWS, EDGESITES, WORKFLOWS

HUB: web.AppKey[Hub] = web.AppKey("hub", Hub)
TRACE_URL: web.AppKey[str] = web.AppKey("trace_url", str)
MAX_PAGE = 500
SSE_COALESCE_SECONDS = 0.25
SSE_KEEPALIVE_SECONDS = 15.0
JOIN_SECONDS = 3.0  # how long a stop waits for the watch threads
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATIC = ("index.html", "app.js", "style.css")
TYPES = {"html": "text/html", "js": "text/javascript", "css": "text/css"}


class ConsoleError(ValueError):
    """A console option that cannot work (the message names it)."""


def check_trace_url(template: str) -> str:
    if template and not template.startswith(("http://", "https://")):
        raise ConsoleError("--trace-url: want an http:// or https:// URL with {traceId}")
    if template and "{traceId}" not in template:
        raise ConsoleError("--trace-url: the template has no {traceId}")
    return template


def trace_link(template: str, trace_id: str | None) -> str | None:
    if not template or not trace_id:
        return None
    return template.replace("{traceId}", quote(str(trace_id), safe=""))


# -------------------------------------------------------------------- pages
def _int(request: web.Request, name: str, default: int, top: int) -> int:
    try:
        return max(0, min(top, int(request.query.get(name, default))))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name}: want a whole number") from None


def _status(hub: Hub) -> dict[str, Any]:
    return {
        plural: {"synced": c.synced, "error": c.error, "count": len(c.items)}
        for plural, c in hub.caches.items()
    }


async def api_sites(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    try:  # once, not per site
        selector = views.parse_label_selector(request.query.get("selector"))
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"selector: {exc}") from None
    offset, limit = _int(request, "offset", 0, 10**9), _int(request, "limit", 100, MAX_PAGE)
    now = time.time()
    cache = hub.caches[EDGESITES]
    rows = views.sort_sites(
        views.site_summary(o, now)
        for o in cache.items.values()
        if views.selector_matches((o.get("metadata") or {}).get("labels") or {}, selector)
    )
    for row in rows[offset : offset + limit]:
        line = hub.timeline.get(row["name"], [])
        row["timeline"] = [[t, c] for t, c in line]
    dark = sum(1 for r in rows if not r["connected"])
    return web.json_response({
        "total": len(rows), "dark": dark, "offset": offset, "items": rows[offset : offset + limit],
        "status": _status(hub), "now": now,
    })  # fmt: skip


def _workflow_index(hub: Hub) -> list[IndexEntry]:
    """Every Workflow's index entry, newest first (rebuilt once per change of the cache)."""
    cache = hub.caches[WORKFLOWS]
    result: list[IndexEntry] = cache.memo("index", lambda: sorted(cache.entries.values()))
    return result


async def api_workflows(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    q = request.query
    namespace, site, phase = q.get("namespace") or "", q.get("site") or "", q.get("phase") or ""
    cron = q.get("cron") or ""
    offset, limit = _int(request, "offset", 0, 10**9), _int(request, "limit", 50, MAX_PAGE)
    chosen = [
        entry[1]
        for entry in _workflow_index(hub)
        if (not namespace or entry[2] == namespace)
        and (not site or entry[3] == site)
        and (not phase or entry[4] == phase.lower())
        and (not cron or entry[5] == cron)
    ]
    now = time.time()
    items = hub.caches[WORKFLOWS].items
    page = [views.workflow_row(items[k], now) for k in chosen[offset : offset + limit]]
    sites = hub.caches[EDGESITES].items
    for row in page:  # the site's connectivity now, not when the run's status was written
        known = sites.get(str(row["site"]))
        if known is not None:
            row["siteConnected"] = bool((known.get("status") or {}).get("connected", False))
    facets = hub.caches[WORKFLOWS].memo("facets", lambda: _facets(hub))
    return web.json_response({
        "total": len(chosen), "offset": offset, "items": page, "facets": facets,
        "status": _status(hub),
    })  # fmt: skip


def _facets(hub: Hub) -> dict[str, list[str]]:
    index = _workflow_index(hub)
    return {
        "namespaces": sorted({e[2] for e in index}),
        "sites": sorted({e[3] for e in index if e[3]}),
        "phases": sorted({e[4] for e in index}),
    }


async def api_crons(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    namespace, site = request.query.get("namespace") or "", request.query.get("site") or ""
    offset, limit = _int(request, "offset", 0, 10**9), _int(request, "limit", 50, MAX_PAGE)
    rows = [views.cron_row(o) for o in hub.caches[CRONWORKFLOWS].items.values()]
    rows = [
        r
        for r in rows
        if (not namespace or r["namespace"] == namespace) and (not site or site in r["sites"])
    ]
    rows.sort(key=lambda r: (r["namespace"] or "", r["name"] or ""))
    return web.json_response(
        {"total": len(rows), "offset": offset, "items": rows[offset : offset + limit]}
    )


async def api_workflow(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    key = f"{request.match_info['namespace']}/{request.match_info['name']}"
    obj = hub.caches[WORKFLOWS].items.get(key)
    if obj is None:
        raise web.HTTPNotFound(
            text=json.dumps({"error": f"Workflow {key} not found"}), content_type="application/json"
        )
    site_name = obj["status"].get("site") or obj["spec"]["placement"].get("site")
    site = hub.caches[EDGESITES].items.get(str(site_name)) if site_name else None
    detail = views.workflow_detail(obj, site)
    detail["traceUrl"] = trace_link(request.app[TRACE_URL], detail.get("traceId"))
    logs: dict[str, dict[str, str]] = {}
    for entry in obj["status"].get("tasks") or []:
        tails = entry.get("logs") if isinstance(entry, dict) else None
        if isinstance(tails, dict) and tails:
            logs[str(entry.get("name"))] = {str(k): str(v) for k, v in tails.items()}
    detail["logs"] = logs
    return web.json_response(detail)


async def api_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``{"changes": [[kind, key], ...]}`` (``key`` ``*``: reload all)."""
    hub = request.app[HUB]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    queue = hub.subscribe()
    try:
        await response.write(b"retry: 2000\nevent: hello\ndata: {}\n\n")
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE_SECONDS)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if first is None:
                break
            await asyncio.sleep(SSE_COALESCE_SECONDS)  # gather a burst into one message
            changes = {first}
            while not queue.empty():
                item = queue.get_nowait()
                if item is None:
                    break
                changes.add(item)
            listed = sorted(changes)
            if len(listed) > 200:
                listed = sorted({(kind, "*") for kind, _ in listed})
            await response.write(f"data: {json.dumps({'changes': listed})}\n\n".encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        hub.unsubscribe(queue)
    return response


async def static(request: web.Request) -> web.Response:
    name = request.match_info.get("name") or "index.html"
    if name not in STATIC:
        raise web.HTTPNotFound()
    body = resources.files(__package__).joinpath("static", name).read_bytes()
    return web.Response(body=body, content_type=TYPES[name.rsplit(".", 1)[1]])


def _secured(headers: Any) -> None:
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"


@web.middleware
async def headers(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every answer carries the headers, errors too: a 404 names the path asked for."""
    try:
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        _secured(exc.headers)
        raise
    _secured(response.headers)
    return response


def make_app(hub: Hub, trace_url: str = "") -> web.Application:
    app = web.Application(middlewares=[headers])
    app[HUB] = hub
    app[TRACE_URL] = check_trace_url(trace_url)
    app.router.add_get("/", static)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/sites", api_sites)
    app.router.add_get("/api/workflows", api_workflows)
    app.router.add_get("/api/workflows/{namespace}/{name}", api_workflow)
    app.router.add_get("/api/cronworkflows", api_crons)
    app.router.add_get("/api/events", api_events)
    app.router.add_get("/healthz", lambda _: _ok())
    return app


async def _ok() -> web.Response:
    return web.Response(text="ok")


class _BoundedConnections:
    """A console's protocol factory: a new connection closes the oldest past ``limit``."""

    def __init__(self, server: web.Server, limit: int) -> None:
        self.server = server
        self.limit = limit
        self.closing: set[Any] = set()  # told to close, not gone yet

    def __call__(self) -> Any:
        live = self.server.connections  # connected, oldest first
        self.closing.intersection_update(live)
        still = [handler for handler in live if handler not in self.closing]
        for oldest in still[: max(0, len(still) + 1 - self.limit)]:
            self.closing.add(oldest)
            transport = oldest.transport
            oldest.force_close()
            if transport is not None:
                transport.abort()  # (closing waits for what a stalled reader left unread)
        return self.server()


class _BoundedRunner(web.AppRunner):
    """An ``AppRunner`` whose sites listen through :class:`_BoundedConnections`."""

    @property
    def server(self) -> Any:
        inner = super().server
        if inner is None:
            return None
        return _BoundedConnections(inner, http_bounds.CONSOLE_MAX_CONNECTIONS)


@contextlib.asynccontextmanager
async def running(hub: Hub, address: str, port: int, trace_url: str = "") -> AsyncIterator[int]:
    """The console serving on ``address:port`` (0: a free port, yielded), stopped after."""
    runner = _BoundedRunner(
        make_app(hub, trace_url),
        handle_signals=False,
        shutdown_timeout=2,
        # Also from the connection's start: a request must be whole by then.
        keepalive_timeout=http_bounds.REQUEST_SECONDS,
    )
    await runner.setup()
    site = web.TCPSite(runner, address, port)
    await site.start()
    bound = port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        bound = server.sockets[0].getsockname()[1]
    try:
        yield bound
    finally:
        hub.stop()
        await runner.cleanup()


class Terminated(Exception):
    """SIGTERM before the event loop has it: unwinds the start-up, exit 0."""


def serve(args: argparse.Namespace) -> int:
    """``tideflow console``: watch the cluster and serve until interrupted or SIGTERM."""
    from tideflow.tools.fleet.api import FleetApi

    noted: list[int] = []  # a SIGTERM, kept should its exception be dropped (a finalizer)

    def terminate(signum: int, _frame: object) -> None:
        noted.append(signum)
        raise Terminated

    previous: Any = None
    with contextlib.suppress(ValueError):  # (not the main thread: signals are not ours)
        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        # Held since ``tideflow``'s first line (tideflow.cli.HeldStop): one before our
        # handler, while the web server and the Kubernetes client were imported.
        held = getattr(args, "held_stop", None)
        stop = None
        if held is not None:
            previous = held.found.get(signal.SIGTERM, previous)  # (restored at the end)
            stop = held.take()
        if stop == signal.SIGINT:
            raise KeyboardInterrupt  # (130, tideflow.tools.fleet.commands.console)
        if stop is not None:
            print("tideflow console: stopped (SIGTERM) while starting", file=sys.stderr)
            return 0
        check_trace_url(args.trace_url)

        def make_api() -> FleetApi:
            return FleetApi(
                kubeconfig=args.kubeconfig, context=args.context, in_cluster=args.in_cluster
            )

        make_api().close()  # a missing or broken context fails now, with its sentence

        async def main() -> None:
            stopped = asyncio.Event()
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
            if noted:
                return
            hub = Hub(namespaces=getattr(args, "namespaces", None))
            hub.start(make_api)
            try:
                async with running(hub, args.address, args.port, args.trace_url) as port:
                    url = f"http://{args.address}:{port}/"
                    print(f"tideflow console: {url} (read-only)", flush=True)
                    await stopped.wait()
                print("tideflow console: stopped (SIGTERM)", file=sys.stderr, flush=True)
            finally:  # (Ctrl-C too: the watch threads end before the interpreter does)
                hub.stop()
                if not hub.join(JOIN_SECONDS):  # (one in a listing: up to its time limit)
                    print("tideflow console: a watch did not end in time", file=sys.stderr)

        asyncio.run(main())
    except Terminated:
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


__all__ = [
    "ConsoleError",
    "Terminated",
    "check_trace_url",
    "make_app",
    "running",
    "serve",
    "trace_link",
]
