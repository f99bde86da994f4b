"""One Kubernetes watch per resource kind, shared by every browser of the console.

Why: a console that asked the API server on every page view, or opened a
watch per browser tab, would turn ten people looking at a 1,000-site fleet
into a polling storm.  The hub keeps an in-memory copy of Workflows,
EdgeSites and CronWorkflows -- already reduced to what may be shown
(:func:`~tideflow.tools.fleet.views.safe_workflow` and friends: no env, no
params, no commands, no annotations) -- fed by exactly one list+watch per
kind, and tells subscribers (the SSE streams, one per browser) which objects
changed.  Pages are then served from memory.

Namespaces: given some (``tideflow console -n``; the chart's
``watchNamespaces``), Workflows and CronWorkflows are listed and watched in
those alone, one list+watch per namespace and kind, and nothing of another
namespace is ever held or shown (its account may read no more).

Threads: each kind's list+watch runs in a thread of its own (the
``kubernetes`` client is synchronous) and hands every change to the event
loop with ``call_soon_threadsafe``; the caches are touched only on the loop.
A watch that ends (the server's timeout) resumes from the last
resourceVersion; one that fails (410 Gone, the API server away) lists again
after a back-off, and the kind's ``error`` says why meanwhile (the page shows it).

A watch can also go silent with its connection open (an API server stopped, a
proxy or load balancer that black-holes): nothing says so but time.  The server
ends each watch after :data:`WATCH_SECONDS` and a read waits at most the API
client's request time more (``api.REQUEST_TIMEOUT``), so a silent watch fails,
and is shown as failed, within :data:`STALE_AFTER_SECONDS` of its last word
(it was 240 s + 15 s: four minutes of an old page shown as current).  A watch
ended by the server resumes without a list, so the shorter time costs one
watch request per kind every 30 s, not a listing.

Tests and the benchmark feed a hub directly with :meth:`Hub.replace` and
:meth:`Hub.apply`, without a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tideflow.tools.fleet.api import REQUEST_TIMEOUT
from tideflow.tools.fleet.views import (
    CRONWORKFLOWS,
    EDGESITES,
    WORKFLOWS,
    parse_time,
    safe_workflow,
)

log = logging.getLogger(__name__)

KINDS = (EDGESITES, WORKFLOWS, CRONWORKFLOWS)
WATCH_SECONDS = 30
#: How long after a watch's last word the console says it is stale, at most.
STALE_AFTER_SECONDS = WATCH_SECONDS + REQUEST_TIMEOUT
MAX_BACKOFF = 30.0
# How many changes a subscriber may have queued before it is told to reload everything.
MAX_PENDING = 2000


def safe_site(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    retired = (meta.get("annotations") or {}).get("tideflow.io/retired")
    return {
        "metadata": {
            "name": meta.get("name"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": {"tideflow.io/retired": retired} if retired else {},
            "creationTimestamp": meta.get("creationTimestamp"),
        },
        "status": dict(obj.get("status") or {}),
    }


def safe_cron(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    placement = spec.get("placement") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "labels": dict(meta.get("labels") or {}),
            "creationTimestamp": meta.get("creationTimestamp"),
        },
        "spec": {
            "schedule": spec.get("schedule"),
            "timezone": spec.get("timezone"),
            "suspend": bool(spec.get("suspend", False)),
            "placement": {
                "site": placement.get("site"),
                "siteSelector": placement.get("siteSelector"),
            },
        },
        "status": dict(obj.get("status") or {}),
    }


REDUCE: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    WORKFLOWS: safe_workflow,
    EDGESITES: safe_site,
    CRONWORKFLOWS: safe_cron,
}


IndexEntry = tuple[float, str, str, str, str, str]


def workflow_entry(key: str, obj: Mapping[str, Any]) -> IndexEntry:
    """(-created, key, namespace, site, phase lowercased, cron) of a shown Workflow.

    Kept per object and updated with it, so that sorting 10,000 of them after a
    change costs a sort, not 10,000 timestamp parses.
    """
    meta, status = obj["metadata"], obj["status"]
    site = status.get("site") or obj["spec"]["placement"].get("site") or ""
    created = parse_time(meta.get("creationTimestamp")) or 0.0
    cron = (meta.get("labels") or {}).get("tideflow.io/cron-workflow") or ""
    phase = str(status.get("phase") or "Pending").lower()
    return (-created, key, meta.get("namespace") or "", site, phase, cron)


def key_of(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


@dataclass
class Cache:
    """The shown form of every object of one kind, by key (``ns/name``, or name)."""

    plural: str
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    entries: dict[str, IndexEntry] = field(default_factory=dict)  # Workflows only
    version: int = 0  # bumped on every change: derived views are cached per version
    synced: bool = False
    error: str | None = None
    derived: dict[str, tuple[int, Any]] = field(default_factory=dict)

    def memo(self, name: str, build: Callable[[], Any]) -> Any:
        """``build()``'s result, recomputed only when the cache changed since."""
        held = self.derived.get(name)
        if held is not None and held[0] == self.version:
            return held[1]
        value = build()
        self.derived[name] = (self.version, value)
        return value


class Hub:
    """The console's caches and the subscribers told about their changes."""

    def __init__(self, namespaces: Iterable[str] | None = None) -> None:
        # Workflows and CronWorkflows of these namespaces only, one list+watch each
        # (empty: every namespace, one for all); EdgeSites are cluster-scoped.
        self.namespaces = sorted(set(namespaces or ()))
        self.caches = {plural: Cache(plural) for plural in KINDS}
        self.subscribers: set[asyncio.Queue[tuple[str, str] | None]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._apis: list[Any] = []  # each thread's FleetApi, to interrupt its watch
        self.watches_opened: dict[str, int] = dict.fromkeys(KINDS, 0)
        # Per site: (time, connected) transitions this console has seen (24 h kept).
        self.timeline: dict[str, list[tuple[float, bool]]] = {}

    # -- feeding (on the loop) --------------------------------------------------
    def replace(
        self, plural: str, objects: Iterable[Mapping[str, Any]], namespace: str | None = None
    ) -> None:
        """A fresh listing: the cache becomes exactly these objects (``namespace``: its
        part of the cache does; the other namespaces' listings stand)."""
        cache = self.caches[plural]
        reduce = REDUCE[plural]
        fresh = {key_of(o): reduce(o) for o in objects}
        if namespace is not None:
            kept = {
                key: obj
                for key, obj in cache.items.items()
                if (obj.get("metadata") or {}).get("namespace") != namespace
            }
            gone = set(cache.items) - set(kept) - set(fresh)
            fresh = {**kept, **fresh}
        else:
            gone = set(cache.items) - set(fresh)
        cache.items = fresh
        if plural == WORKFLOWS:
            cache.entries = {key: workflow_entry(key, obj) for key, obj in fresh.items()}
        cache.version += 1
        cache.synced, cache.error = True, None
        if plural == EDGESITES:
            for key, obj in fresh.items():
                self._observe_site(key, obj)
        self._notify(plural, "*" if gone or len(fresh) > 50 else None, list(fresh))

    def apply(self, plural: str, kind: str, obj: Mapping[str, Any]) -> None:
        """One watch event (``ADDED``/``MODIFIED``/``DELETED``)."""
        cache = self.caches[plural]
        key = key_of(obj)
        if kind == "DELETED":
            cache.items.pop(key, None)
            cache.entries.pop(key, None)
        else:
            cache.items[key] = REDUCE[plural](obj)
            if plural == WORKFLOWS:
                cache.entries[key] = workflow_entry(key, cache.items[key])
            if plural == EDGESITES:
                self._observe_site(key, cache.items[key])
        cache.version += 1
        self._notify(plural, None, [key])

    def failed(self, plural: str, reason: str) -> None:
        self.caches[plural].error = reason
        self._notify(plural, None, [])

    def _observe_site(self, name: str, obj: Mapping[str, Any]) -> None:
        connected = bool((obj.get("status") or {}).get("connected", False))
        seen = self.timeline.setdefault(name, [])
        if seen and seen[-1][1] == connected:
            return
        now = time.time()
        if not seen:  # start the line where the site's own status says it changed
            status = obj.get("status") or {}
            since = parse_time(status.get("onlineSince" if connected else "offlineSince"))
            now = min(now, since) if since else now
        seen.append((now, connected))
        horizon = time.time() - 24 * 3600
        while len(seen) > 1 and seen[1][0] < horizon:
            seen.pop(0)

    def _notify(self, plural: str, everything: str | None, keys: list[str]) -> None:
        for queue in list(self.subscribers):
            if queue.qsize() > MAX_PENDING:
                continue  # it will be told to reload everything (see subscribe)
            if everything or not keys:
                queue.put_nowait((plural, "*"))
            else:
                for key in keys:
                    queue.put_nowait((plural, key))

    # -- subscribers -------------------------------------------------------------
    def subscribe(self) -> asyncio.Queue[tuple[str, str] | None]:
        queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[tuple[str, str] | None]) -> None:
        self.subscribers.discard(queue)

    # -- the watches (threads) -----------------------------------------------------
    def start(self, make_api: Callable[[], Any]) -> None:
        """One thread per kind: list, then watch from the listing's resourceVersion."""
        self.loop = asyncio.get_running_loop()
        for plural in KINDS:
            scopes: list[str | None] = [None]
            if plural != EDGESITES and self.namespaces:
                scopes = list(self.namespaces)
            for scope in scopes:
                thread = threading.Thread(
                    target=self._follow, args=(plural, make_api, scope),
                    name=f"watch-{plural}" + (f"-{scope}" if scope else ""), daemon=True,
                )  # fmt: skip
                thread.start()
                self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for queue in list(self.subscribers):
            queue.put_nowait(None)
        for api in list(self._apis):
            interrupt = getattr(api, "interrupt", None)  # (a test's stand-in may have none)
            if interrupt is not None:
                interrupt()

    def join(self, timeout: float) -> bool:
        """Wait for the watch threads to end (after :meth:`stop`); True if all did.

        A daemon thread still in a read when the interpreter finalizes crashed
        the process (SIGSEGV, abort) as it exited."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self.loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed: shutting down
            self.loop.call_soon_threadsafe(fn, *args)

    def _follow(
        self, plural: str, make_api: Callable[[], Any], namespace: str | None = None
    ) -> None:
        """List and watch ``plural`` (in ``namespace``; None: everywhere) until stopped."""
        from tideflow.tools.fleet.api import FleetError

        backoff = 1.0
        api = None
        while not self._stop.is_set():
            try:
                if api is None:
                    api = make_api()
                    self._apis.append(api)
                    if self._stop.is_set():  # (stopped while it was made: not interrupted)
                        return
                listing = api.list_page(plural, namespace)
                version = (listing.get("metadata") or {}).get("resourceVersion")
                items = list(listing.get("items") or [])
                token = (listing.get("metadata") or {}).get("continue")
                while token:  # (a list without limit has no continue; kept for safety)
                    more = api.list_page(plural, namespace, continue_token=token)
                    items += more.get("items") or []
                    token = (more.get("metadata") or {}).get("continue")
                self._post(self.replace, plural, items, namespace)
                backoff = 1.0
                while not self._stop.is_set():
                    self.watches_opened[plural] += 1
                    for event in api.watch(
                        plural, namespace, resource_version=version, timeout_seconds=WATCH_SECONDS
                    ):
                        kind, obj = event.get("type"), event.get("object")
                        if kind == "ERROR" or not isinstance(obj, dict):
                            raise FleetError(f"watch error: {obj}")
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        self._post(self.apply, plural, str(kind), obj)
                        if self._stop.is_set():
                            return
            except FleetError as exc:
                if self._stop.is_set():
                    return  # (its watch interrupted by stop)
                log.warning("console: %s: %s; listing again in %.0fs", plural, exc, backoff)
                self._post(self.failed, plural, str(exc))
            except Exception as exc:  # never let one kind's thread die silently
                if self._stop.is_set():
                    return
                log.exception("console: %s watch failed", plural)
                self._post(self.failed, plural, f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(ValueError):
                    self._apis.remove(api)
                api = None
            self._stop.wait(backoff)
            backoff = min(MAX_BACKOFF, backoff * 2)


__all__ = [
    "KINDS",
    "STALE_AFTER_SECONDS",
    "Cache",
    "Hub",
    "IndexEntry",
    "key_of",
    "safe_cron",
    "safe_site",
    "workflow_entry",
]
