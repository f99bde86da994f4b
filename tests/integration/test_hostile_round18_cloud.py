"""Round 18, cloud side: hostile clients of the web console, and the ledger's room.

* The console (``tideflow console``) is an HTTP endpoint like the operator's
  probes and metrics, and is served on all of its pod's addresses by the chart,
  but kept none of the bounds ``tideflow.http_bounds`` names: a connection that
  never finished its request was kept for aiohttp's default of an hour, and any
  number of them at once, each a file descriptor of the process that also holds
  the cluster watches.  Real console (aiohttp on loopback), real sockets.
* The ledger (``tideflow_operator.ledger``) keeps every site's entries in four
  shared ConfigMaps of at most 1 MiB each.  Real API server (envtest).
* The bridge's fast pass over an events batch (``tideflow.wire_events``) met
  envelopes the models take and it did not: a test-owned MQTT client publishes
  them on a site's own topic through a real Mosquitto (``test_hostile_heartbeats``'
  Forger), the operator's real bridge receives.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from services.broker import Mosquitto
from services.cloud import running_cloud, until
from services.kube import EnvtestCluster
from test_hostile_heartbeats import SITE, Forger, forger  # noqa: F401 (the fixture)

from tideflow import http_bounds, wire
from tideflow.tools.fleet import console
from tideflow.tools.fleet.console.hub import Hub
from tideflow_operator.kube import Kube
from tideflow_operator.ledger import Entry, Ledger, configmap_name


@contextlib.asynccontextmanager
async def a_console() -> AsyncIterator[int]:
    hub = Hub()
    for kind in ("workflows", "edgesites", "cronworkflows"):
        hub.replace(kind, [])
    async with console.running(hub, "127.0.0.1", 0) as port:
        yield port


def half_requests(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that start a request and never finish it."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: never done
        sock.setblocking(False)
        socks.append(sock)
    return socks


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


async def healthz(port: int) -> int:
    timeout = aiohttp.ClientTimeout(total=3)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://127.0.0.1:{port}/healthz") as response,
    ):
        return response.status


async def test_a_request_never_finished_is_closed_after_the_request_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kept for an hour (aiohttp's keep-alive default) before; now the request time."""
    monkeypatch.setattr(http_bounds, "REQUEST_SECONDS", 0.5)
    async with a_console() as port:
        (sock,) = await asyncio.to_thread(half_requests, port, 1)
        try:
            began = time.monotonic()
            while not closed(sock) and time.monotonic() - began < 4:
                await asyncio.sleep(0.1)
            assert closed(sock), "a half-sent request still held its connection after 4 s"
            assert await healthz(port) == 200
        finally:
            sock.close()


async def test_a_flood_of_unfinished_requests_is_bounded_and_the_console_still_answers() -> None:
    """Every connection was kept: a flood was a file descriptor each, for an hour."""
    limit = http_bounds.CONSOLE_MAX_CONNECTIONS
    async with a_console() as port:
        # (From a thread: the console answers on this loop.)
        socks = await asyncio.to_thread(half_requests, port, limit + 100)
        try:
            await asyncio.sleep(0.5)
            began = time.monotonic()
            assert await healthz(port) == 200
            assert time.monotonic() - began < 2
            await asyncio.sleep(0.2)
            still_open = sum(not closed(sock) for sock in socks)
            assert still_open <= limit, still_open
        finally:
            for sock in socks:
                sock.close()


async def test_an_events_stream_outlives_the_request_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request time bounds sending a request, not a stream being answered: a
    browser's events stream still tells of a change made well after it."""
    monkeypatch.setattr(http_bounds, "REQUEST_SECONDS", 0.3)
    hub = Hub()
    for kind in ("workflows", "edgesites", "cronworkflows"):
        hub.replace(kind, [])
    async with (
        console.running(hub, "127.0.0.1", 0) as port,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(f"http://127.0.0.1:{port}/api/events") as stream,
    ):
        assert b"hello" in await stream.content.readuntil(b"\n\n")
        await asyncio.sleep(1.0)
        hub.replace("edgesites", [{"metadata": {"name": "s1"}, "status": {}}])
        assert b"edgesites" in await stream.content.readuntil(b"\n\n")


def _sites_sharing_a_configmap(count: int) -> list[str]:
    first = f"r18-{uuid.uuid4().hex[:6]}"
    sites = [first]
    for n in range(10_000):
        other = f"{first}-{n}"
        if configmap_name(other) == configmap_name(first):
            sites.append(other)
            if len(sites) == count:
                return sites
    raise AssertionError("not enough site names share a ConfigMap")


@pytest.mark.envtest
async def test_assignments_too_big_to_keep_do_not_stop_the_ledger_of_other_sites(
    envtest: EnvtestCluster,
) -> None:
    """A spec edited before its site confirmed the assignment has the assignment kept
    in the ledger (gzip, base64).  Specs of up to 960 KiB that do not compress (an
    embedded file, say) packed to more than the 1 MiB a ConfigMap holds, two of
    them (or one of random text) in one ConfigMap: the API server refused the
    write, and the refused values went into every later write of that ConfigMap,
    so no assignment of any site sharing it (a quarter of the fleet) could be
    recorded, or sent, until those Workflows were deleted."""
    namespace = f"r18-{uuid.uuid4().hex[:8]}"
    envtest.kubectl("create", "namespace", namespace)
    api = envtest.api_client()
    try:
        kube = Kube(api)
        ledger = Ledger(kube, namespace, spacing=0.0)
        *big_sites, other_site = _sites_sharing_a_configmap(3)
        for n, site in enumerate(big_sites):
            uid = f"u-big-{n}"
            await ledger.record(Entry(site, uid, namespace, f"big-{n}", 1, "d" * 32))
            blob = base64.b64encode(os.urandom(450 * 1024)).decode()  # 600 KiB, packs no smaller
            payload = {"uid": uid, "generation": 1, "namespace": namespace, "name": f"big-{n}",
                       "spec": {"tasks": [{"name": "a", "script": blob}]}}  # fmt: skip
            with contextlib.suppress(Exception):  # (the operator logs it and goes on)
                await ledger.keep_assigned(site, uid, payload)
        await ledger.record(Entry(other_site, "u-other", namespace, "other", 1, "e" * 32))
        stored = await kube.read_ledgers(namespace)
        assert "u-other" in stored[configmap_name(other_site)]
    finally:
        api.close()


async def test_an_events_envelope_without_a_payload_is_a_bad_payload_not_a_bug(
    mosquitto: Mosquitto,
    forger: Forger,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An envelope's ``payload`` may be left out (it defaults to empty): the fast pass
    then raised KeyError, which the bridge counted as a bug (``error``) and logged
    with a traceback, for every such message a site sent.  It is a bad payload
    (``records`` missing), counted so and logged at most a line per
    ``DROP_LOG_SECONDS``; the site's next batch is applied."""
    data = b'{"v":1,"kind":"events","site":"%s","seq":1,"sentAt":1.0}' % SITE.encode()
    async with running_cloud(mosquitto.url) as cloud:
        bridge = cloud.bridge
        with caplog.at_level(logging.INFO):
            for _ in range(20):
                forger.client.publish(wire.topic(SITE, wire.EVENTS), data, qos=1)
            sentinel = wire.encode_events(SITE, [(1, "span", '{"traceId":"a","spanId":"b"}')])
            forger.client.publish(wire.topic(SITE, wire.EVENTS), sentinel, qos=1)
            await until(lambda: bridge.applier.applied_through(SITE) == 1, 20, "the sentinel")
        assert dict(bridge.dropped) == {"bad-payload": 20}, dict(bridge.dropped)
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        lines = [r.getMessage() for r in caplog.records if "dropped message" in r.getMessage()]
        assert 1 <= len(lines) <= 2, lines


class _BusyRuntime:
    """What the metrics read of a runtime, changed by its own event loop all the time
    (admissions and finished runs coming and going, sites first heard)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        from tideflow.mqtt import BrokerConnection
        from tideflow_operator.bridge import BridgeConfig, CloudBridge

        self.loop = loop
        self.records: dict[tuple[str, str], None] = {}
        self.bridge = CloudBridge(BridgeConfig(BrokerConnection("mqtt://127.0.0.1:1")))
        self.applier = self.bridge.applier
        self.running = True

    def public_phase(self, key: tuple[str, str]) -> str:
        return "Running"

    async def churn(self) -> None:
        n = 0
        while self.running:
            added = [("ns", f"w-{n}-{i}") for i in range(200)]
            self.records.update(dict.fromkeys(added))
            for key in added:
                del self.records[key]
            site = f"s-{n}"
            payload = wire.StatePayload(online=True)
            self.bridge.presence.observe(site, payload, time.time())
            self.bridge.dropped[f"reason-{n % 50}"] += 1
            n += 1
            await asyncio.sleep(0)


def test_scrapes_while_the_operator_is_busy_all_answer() -> None:
    """The state gauges were read from the metrics server's thread while the event
    loop changed what they read (the applier and the registries are used from the
    loop only): a scrape during a burst of admissions or of new sites failed with
    500 and a traceback ('dictionary changed size during iteration')."""
    import urllib.request

    from services.metrics import free_port

    from tideflow_operator.metrics import serve_metrics

    loop = asyncio.new_event_loop()
    runtime = _BusyRuntime(loop)
    for n in range(20_000):  # a fleet's worth to iterate
        runtime.records[("ns", f"seed-{n}")] = None
    churning = loop.create_task(runtime.churn())
    thread = threading.Thread(target=loop.run_until_complete, args=(churning,))
    thread.start()
    port = free_port()
    server = serve_metrics(port, lambda: runtime, addr="127.0.0.1")
    failed = []
    try:
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    assert b"tideflow_operator_sites_connected" in r.read()
            except Exception as exc:  # (the 500s)
                failed.append(repr(exc))
    finally:
        runtime.running = False
        thread.join(10)
        loop.close()
        server.shutdown()
        server.server_close()
    assert not failed, (len(failed), failed[:3])


async def test_a_selector_of_thousands_of_terms_is_refused_not_matched_against_every_site() -> None:
    """The sites page matched its ``selector`` by parsing it again for every site,
    on the console's one event loop: 4,000 terms (an 8 KB URL) against 1,000 sites
    held the loop for over a second per request, every browser's pages and
    streams with it.  Too many terms is a 400 naming the parameter; the console
    keeps answering."""
    hub = Hub()
    sites = [{"metadata": {"name": f"s{i}", "labels": {"a": "1"}}, "status": {}}
             for i in range(1000)]  # fmt: skip
    hub.replace("edgesites", sites)
    hub.replace("workflows", [])
    hub.replace("cronworkflows", [])
    selector = ",".join(["a"] * 4000)
    async with (
        console.running(hub, "127.0.0.1", 0) as port,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
    ):
        base = f"http://127.0.0.1:{port}"

        async def hostile() -> tuple[int, str]:
            async with session.get(f"{base}/api/sites", params={"selector": selector}) as r:
                return r.status, await r.text()

        async with session.get(f"{base}/api/sites", params={"selector": "a=1,!gpu"}) as r:
            assert r.status == 200 and (await r.json())["total"] == 1000
        # (The console serves from this test's loop: the time the requests take is
        # the time the loop was held.)
        began = time.monotonic()
        for status, text in await asyncio.gather(*(hostile() for _ in range(3))):
            assert status == 400 and "selector" in text, (status, text[:200])
        taken = time.monotonic() - began
        assert taken < 1.0, f"the console's loop was held {taken:.1f}s"
        assert await healthz(port) == 200


async def test_a_long_chain_listed_backwards_is_ordered_without_holding_the_console() -> None:
    """A run's page orders its tasks dependencies first.  The order was found by
    passes over the whole list until nothing moved: a chain listed last task first
    (a valid spec: 15,000 such tasks fit one) placed one task per pass, and 3,000 of
    them held the console's loop for seconds on every view of that run."""
    n = 3000
    tasks = [{"name": f"t{i}", "dependsOn": [f"t{i - 1}"] if i else []} for i in range(n)]
    workflow = {"metadata": {"name": "chain", "namespace": "ns", "uid": "u1"},
                "spec": {"placement": {"site": "s1"}, "tasks": tasks[::-1]},
                "status": {"phase": "Running", "site": "s1"}}  # fmt: skip
    hub = Hub()
    hub.replace("workflows", [workflow])
    hub.replace("edgesites", [])
    hub.replace("cronworkflows", [])
    async with (
        console.running(hub, "127.0.0.1", 0) as port,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):

        async def detail() -> Any:
            async with session.get(f"http://127.0.0.1:{port}/api/workflows/ns/chain") as r:
                assert r.status == 200
                return await r.json()

        # (The console serves from this test's loop: the time a request takes is the
        # time the loop was held.)
        began = time.monotonic()
        shown = await detail()
        taken = time.monotonic() - began
    assert [t["name"] for t in shown["tasks"]] == [f"t{i}" for i in range(n)]
    assert taken < 1.0, f"the console's loop was held {taken:.1f}s"
