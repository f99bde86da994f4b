"""Forged spans against the cloud's collection and re-export (decision 0022): hostile tests.

A hand-made ``events`` batch goes through a real Mosquitto to the operator's
real bridge and applier; what they collect is forwarded by the operator's
:class:`SpanForwarder` with the real OTLP/HTTP exporter to a test-owned
receiver on loopback.  Proves:

* a span whose fields have the wrong types (a ``status`` that is not an
  object), or ids and times out of OTLP's range, is dropped alone: the good
  spans beside it are still exported (one bad span used to lose every span
  drained with it, every site's);
* a task record a site sends for another site's Workflow is refused whole:
  the span it carries is not exported into that run's trace either;
* the same span sent twice (inside its outcome and as a span record) is
  exported once; the good records of the batch are applied once;
* held: a span nested past the depth limit, or holding non-UTF-8 bytes,
  loses its message with a named reason (``too-deep``, ``not-json``); a
  late span on a finished run's record is kept; state messages with bad
  outbox depths or another site's name are dropped by reason, and the
  operator asks a site for its records once per link (decision 0025).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from paho.mqtt.enums import CallbackAPIVersion
from services.broker import Mosquitto
from services.cloud import running_cloud, until

from tideflow import wire
from tideflow_operator.telemetry import SpanForwarder

SITE, OTHER = "site-a", "site-b"


class Receiver:
    """An OTLP/HTTP traces endpoint on loopback keeping the span ids it gets."""

    def __init__(self) -> None:
        self.span_ids: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        receiver.span_ids += [span.span_id.hex() for span in scope.spans]
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        thread.join(10)


def span(span_id: str, trace_id: str = "ab" * 16, **fields: Any) -> dict[str, Any]:
    now = time.time_ns()
    body = {"traceId": trace_id, "spanId": span_id, "name": f"task {span_id}",
            "startTimeUnixNano": now - 1000, "endTimeUnixNano": now}  # fmt: skip
    return body | fields


def task(uid: str, name: str, phase: str = "Succeeded", **fields: Any) -> dict[str, Any]:
    return {"uid": uid, "generation": 1, "namespace": "default", "name": name, "task": "a",
            "phase": phase, "attempt": 1, "finishedAt": time.time()} | fields  # fmt: skip


def forge(broker: Mosquitto, site: str, records: list[tuple[int, str, dict[str, Any]]]) -> None:
    """Publish one events batch on ``site``'s own topic, as a hostile agent could."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"forger-{site}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        rows = [(seq, kind, json.dumps(body)) for seq, kind, body in records]
        info = client.publish(wire.topic(site, wire.EVENTS), wire.encode_events(site, rows), qos=1)
        info.wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


async def test_a_malformed_span_is_dropped_alone_and_the_good_ones_are_exported(
    mosquitto: Mosquitto, receiver: Receiver
) -> None:
    good = ["01" * 8, "02" * 8]
    async with running_cloud(mosquitto.url) as cloud:
        cloud.bridge.applier.expect("default", "wf", "u-1", 1, ["a"], site=SITE)
        records = [
            (1, "task", task("u-1", "wf", span=span(good[0]))),
            (2, "span", span("03" * 8, status="not an object")),
            (3, "span", span("04" * 8, trace_id="f" * 40)),  # over 128 bits
            (4, "span", span("05" * 8, startTimeUnixNano=10**30)),  # over 64 bits
            (5, "span", span(good[1])),
        ]
        forge(mosquitto, SITE, records)
        await until(lambda: cloud.bridge.applier.applied_through(SITE) == 5, 20, "the batch")
        forwarder = SpanForwarder(OTLPSpanExporter(endpoint=receiver.endpoint, timeout=10))
        spans = cloud.bridge.applier.drain_spans()
        await forwarder.forward([(s.site, s.body) for s in spans])
        forwarder.shutdown()
    assert sorted(receiver.span_ids) == good
    assert (forwarder.exported, forwarder.failed) == (2, 0)
    view = cloud.bridge.applier.view("default", "wf")
    assert view is not None and view.tasks["a"].phase == "Succeeded"


async def test_a_span_carried_by_a_forged_record_is_not_collected(mosquitto: Mosquitto) -> None:
    async with running_cloud(mosquitto.url) as cloud:
        applier = cloud.bridge.applier
        applier.expect("default", "theirs", "u-b", 1, ["a"], site=OTHER)
        applier.expect("default", "mine", "u-a", 1, ["a"], site=SITE)
        their_trace = "cd" * 16
        records = [
            (1, "task", task("u-b", "theirs", span=span("0b" * 8, trace_id=their_trace))),
            (2, "task", task("u-a", "mine", span=span("0a" * 8))),
        ]
        forge(mosquitto, SITE, records)
        await until(lambda: applier.applied_through(SITE) == 2, 20, "the batch")
        collected = applier.drain_spans()
        theirs, mine = applier.view("default", "theirs"), applier.view("default", "mine")
    assert theirs is not None and theirs.tasks["a"].phase == "Pending"
    assert mine is not None and mine.tasks["a"].phase == "Succeeded"
    assert [s.body["spanId"] for s in collected] == ["0a" * 8]
    assert applier.discarded[next(d for d in applier.discarded if d.value == "forged")] == 1


async def test_forged_heartbeats_ask_once_per_link_and_break_nothing(mosquitto: Mosquitto) -> None:
    """Decision 0025's ask, against hand-made state messages: bad depths and types,
    another site's name in the envelope; asked once however often the site says so."""
    acks: list[dict[str, Any]] = []
    listener = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ack-listener")
    listener.on_message = lambda _c, _u, m: acks.append(json.loads(m.payload))
    listener.connect(mosquitto.host, mosquitto.port)
    listener.subscribe(wire.topic(SITE, wire.ACKS), qos=1)
    listener.loop_start()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"forger-{SITE}")
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()

    def state(payload: dict[str, Any], envelope_site: str = SITE) -> None:
        message = wire.encode(wire.KIND_STATE, envelope_site, {"online": True} | payload)
        client.publish(wire.topic(SITE, wire.STATE), message, qos=1).wait_for_publish(10)

    try:
        async with running_cloud(mosquitto.url) as cloud:
            bridge = cloud.bridge
            for depth in (-5, 0, "many", 1.5, None, [3], {"n": 3}):
                state({"outboxDepth": depth})
            state({"outboxDepth": 7}, envelope_site=OTHER)  # another site's name
            await until(lambda: bridge.dropped["bad-payload"] >= 5, 20, "the bad payloads")
            assert acks == [] and bridge._asked == set()
            bad = bridge.dropped["bad-payload"]
            for _ in range(5):  # past int64: refused, naming the field (the EdgeSite's schema)
                state({"outboxDepth": 10**40})
            await until(lambda: bridge.dropped["bad-payload"] == bad + 5, 20, "the huge depths")
            for _ in range(3):  # (asked at the second such heartbeat, and only once)
                state({"outboxDepth": 3, "lastAckedSeq": 2})
            await until(lambda: SITE in bridge._asked, 20, "the ask")
            await until(lambda: acks, 10, "the ask's ack")
            # The last state message, handled after the ask, proves the rest are in.
            state({"outboxDepth": 1, "running": 99})
            await until(lambda: bridge.presence.get(SITE).running == 99, 20, "the last state")
        assert bridge.dropped["wrong-site"] == 1, bridge.dropped
        assert [(a["payload"]["through"], a["payload"]["resend"]) for a in acks] == [(0, True)]
    finally:
        for c in (client, listener):
            c.loop_stop()
            c.disconnect()


async def test_a_span_sent_both_inside_its_outcome_and_as_a_record_is_collected_once(
    mosquitto: Mosquitto,
) -> None:
    async with running_cloud(mosquitto.url) as cloud:
        applier = cloud.bridge.applier
        applier.expect("default", "wf", "u-1", 1, ["a"], site=SITE)
        twice = span("0c" * 8)
        records = [
            (1, "task", task("u-1", "wf", "Running", span=None)),
            (2, "task", task("u-1", "wf", span=twice)),
            (3, "span", twice),
        ]
        forge(mosquitto, SITE, records)
        await until(lambda: applier.applied_through(SITE) == 3, 20, "the first batch")
        first = applier.drain_spans()
        forge(mosquitto, SITE, [(4, "span", twice)])  # and again, after the drain
        await until(lambda: applier.applied_through(SITE) == 4, 20, "the second batch")
        second = applier.drain_spans()
        view = applier.view("default", "wf")
    assert [s.body["spanId"] for s in first + second] == ["0c" * 8]
    assert view is not None and view.tasks["a"].phase == "Succeeded"
    assert cloud.bridge.records_applied == 4


async def test_spans_too_deep_not_utf8_or_on_a_finished_run_are_handled(
    mosquitto: Mosquitto,
) -> None:
    """Held: a span nested past the depth limit or holding non-UTF-8 bytes loses its
    message with a named reason; a late span on a finished run's record is kept."""
    deep: Any = "x"
    for _ in range(wire.MAX_JSON_DEPTH + 5):
        deep = {"a": deep}
    async with running_cloud(mosquitto.url) as cloud:
        bridge, applier = cloud.bridge, cloud.bridge.applier
        applier.expect("default", "wf", "u-1", 1, ["a"], site=SITE)
        forge(
            mosquitto, SITE, [(1, "task", task("u-1", "wf", span=span("0d" * 8, attributes=deep)))]
        )
        await until(lambda: bridge.dropped["too-deep"] == 1, 20, "the deep span's message")
        rows = wire.encode_events(
            SITE, [(1, "task", json.dumps(task("u-1", "wf", span=span("0e" * 8))))]
        )
        raw = rows.replace(b'"name": "task ', b'"name": "\xff\xfe ')
        assert raw != rows
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="forger-bytes")
        client.connect(mosquitto.host, mosquitto.port)
        client.loop_start()
        client.publish(wire.topic(SITE, wire.EVENTS), raw, qos=1).wait_for_publish(10)
        client.loop_stop()
        client.disconnect()
        await until(lambda: bridge.dropped["not-json"] == 1, 20, "the non-UTF-8 span's message")
        assert applier.applied_through(SITE) == 0 and applier.drain_spans() == []
        run = {"uid": "u-1", "generation": 1, "namespace": "default", "name": "wf",
               "phase": "Succeeded", "finishedAt": time.time()}  # fmt: skip
        forge(mosquitto, SITE, [(1, "task", task("u-1", "wf")), (2, "run", run),
                                (3, "task", task("u-1", "wf", span=span("0f" * 8)))])  # fmt: skip
        await until(lambda: applier.applied_through(SITE) == 3, 20, "the run's records")
        view = applier.view("default", "wf")
        assert view is not None and view.phase == "Succeeded"
        assert [s.body["spanId"] for s in applier.drain_spans()] == ["0f" * 8]


async def test_a_heartbeat_sent_at_infinity_does_not_silence_the_site(mosquitto: Mosquitto) -> None:
    """``sentAt: Infinity`` (JSON as Python reads it) made every later heartbeat of the
    site stale: its presence, lastAckedSeq and the ask (decision 0025) froze."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"forger-{SITE}")
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()

    def state(running: int, sent_at: str | None = None) -> None:
        message = wire.encode(wire.KIND_STATE, SITE, {"online": True, "running": running})
        if sent_at is not None:
            message = re.sub(rb'"sentAt":[^,]+', b'"sentAt":' + sent_at.encode(), message)
        client.publish(wire.topic(SITE, wire.STATE), message, qos=1).wait_for_publish(10)

    try:
        async with running_cloud(mosquitto.url) as cloud:
            presence = cloud.bridge.presence
            for bad in ("Infinity", "NaN"):
                state(1, bad)
            state(2)
            await until(lambda: presence.get(SITE) is not None, 20, "a state message")
            await until(lambda: presence.get(SITE).running == 2, 20, "the good heartbeat")
            assert cloud.bridge.dropped["bad-envelope"] == 2
    finally:
        client.loop_stop()
        client.disconnect()
