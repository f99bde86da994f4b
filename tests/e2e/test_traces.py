"""One trace per workflow run, across the cloud and an offline period.

A test-owned OTLP/HTTP receiver decodes the protobuf the operator sends.  The
site goes offline mid-run and its agent is killed -9 while a task runs; after
the link returns the receiver must hold one complete tree: the operator's
root span, the site's run span under it, a span per task attempt under that
(the interrupted attempt marked as such), and no span twice.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from services.agent import agent_truth, read_only, stored_span_bodies, wait_for
from services.world import World, site_name, spec_for

pytestmark = pytest.mark.envtest


class OtlpReceiver:
    """A minimal OTLP/HTTP traces endpoint on loopback that keeps what it gets."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource_spans in request.resource_spans:
                    service = {
                        a.key: a.value.string_value for a in resource_spans.resource.attributes
                    }.get("service.name")
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            receiver.spans.append(
                                {
                                    "service": service,
                                    "trace_id": span.trace_id.hex(),
                                    "span_id": span.span_id.hex(),
                                    "parent": span.parent_span_id.hex() or None,
                                    "name": span.name,
                                    "start": span.start_time_unix_nano,
                                    "end": span.end_time_unix_nano,
                                    "attributes": {a.key: _value(a.value) for a in span.attributes},
                                }
                            )
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def test_one_trace_across_the_offline_period_and_a_kill(world: World, otlp: OtlpReceiver) -> None:
    site = site_name()
    world.operator(env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint})
    agent = world.agent(site)
    tasks = [
        {"name": "first", "command": ["sleep", "0.3"]},
        {"name": "long", "dependsOn": ["first"], "command": ["sleep", "2"]},
        {"name": "last", "dependsOn": ["long"], "command": ["true"]},
    ]
    world.apply("traced", spec_for(site, tasks))
    # Wait until "long" is running at the site, then cut the link and kill the agent.
    wait_for(
        lambda: any(
            r["tasks"].get("long", {}).get("phase") == "Running"
            for r in agent_truth(agent.db)["runs"].values()
        ),
        60,
        "task long to run",
    )
    world.broker.stop()
    agent.kill()
    agent.start()  # offline: resumes, closes the cut attempt, retries it
    wait_for(
        lambda: next(iter(agent_truth(agent.db)["runs"].values()))["phase"] == "Succeeded",
        60,
        "the run to finish offline",
    )
    world.broker.start()
    status = world.wait_phase("traced", "Succeeded", timeout=60)
    trace_id = status["traceId"]
    # 1 root + 1 run + first, long (interrupted), long (retry), last
    wait_for(lambda: len(otlp.spans) >= 6, 30, "spans at the OTLP receiver")
    # The cloud exports a batch's spans before it acks it: once the site's last record is
    # acked, everything that will ever be exported has been.
    last = agent_truth(agent.db)["last_seq"]
    site = lambda: json.loads(world.kubectl("get", "site", agent.site, "-o", "json").stdout)  # noqa: E731
    wait_for(lambda: site()["status"].get("lastAckedSeq") == last, 30, "the site's records acked")
    spans = list(otlp.spans)
    assert len({s["span_id"] for s in spans}) == len(spans), "a span was exported twice"
    assert {s["trace_id"] for s in spans} == {trace_id}
    roots = [s for s in spans if s["parent"] is None]
    assert len(roots) == 1 and roots[0]["service"] == "tideflow-operator"
    root = roots[0]
    assert root["span_id"] == status["rootSpanId"]
    (run,) = [s for s in spans if s["parent"] == root["span_id"]]
    assert (
        run["service"] == "tideflow-agent" and run["name"] == f"workflow {world.namespace}/traced"
    )
    attempts = [s for s in spans if s["parent"] == run["span_id"]]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for span in attempts:
        by_task.setdefault(span["attributes"]["tideflow.task"], []).append(span)
    assert sorted(by_task) == ["first", "last", "long"]
    assert len(by_task["first"]) == 1 and len(by_task["last"]) == 1
    long_attempts = sorted(by_task["long"], key=lambda s: s["attributes"]["tideflow.attempt"])
    assert [s["attributes"]["tideflow.attempt"] for s in long_attempts] == [1, 2]
    assert long_attempts[0]["attributes"].get("tideflow.interrupted") is True
    assert long_attempts[1]["attributes"]["tideflow.outcome"] == "Succeeded"
    # Re-exported with the ids and the times the site recorded, not re-stamped on the way.
    with read_only(agent.db) as conn:
        stored = {body["spanId"]: body for body in stored_span_bodies(conn)}
    site_spans = [s for s in spans if s["service"] == "tideflow-agent"]
    assert {s["span_id"] for s in site_spans} == set(stored)
    for span in site_spans:
        original = stored[span["span_id"]]
        assert (span["start"], span["end"]) == (
            original["startTimeUnixNano"],
            original["endTimeUnixNano"],
        ), span["name"]
        assert span["parent"] == original["parentSpanId"]
    # Children sit inside their parents in time.
    assert root["start"] <= run["start"] <= run["end"] <= root["end"] + 5 * 10**9
    for span in attempts:
        assert run["start"] <= span["start"] <= span["end"] <= run["end"]
