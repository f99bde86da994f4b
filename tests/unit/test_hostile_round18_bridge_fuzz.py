"""Round 18: every kind of message a site sends, mutated at random, into the real bridge.

Each field of an ``events`` batch (run, task, log, schedule and span records), a
receipt and a heartbeat is now and then replaced by a hostile value (huge and
negative numbers, NaN, lone surrogates, NUL, deep and wrong types), dropped, or
joined by a stray key, and a byte is sometimes made non-UTF-8.  Whatever comes
of it, the bridge never counts a bug (``error``: a handler raised), and every
Workflow and EdgeSite status it holds renders as JSON the API server takes.
(An envelope without its payload raised KeyError in the fast pass, counted and
logged with a traceback as a bug for every such message.)
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from tideflow import wire
from tideflow.mqtt import BrokerConnection
from tideflow_operator.bridge import BridgeConfig, CloudBridge

HOSTILE: list[Any] = [
    None, True, False, 0, -1, 2**63, 2**64, 10**30, -(10**30), 1e308, -1e308, 0.5, -0.0,
    float("nan"), float("inf"), "", "x" * 300, "\ud800", "\udfff\ud800", "\x00", "1", "1e5",
    "Running", "Rejected", "2026-01-01T00:00:00Z", [], {}, [[[[]]]], {"a": {"b": {}}},
    "u1", 1, "s1", "A" * 64, "a/b", "+", "#",
]  # fmt: skip


def mutate(rng: random.Random, value: Any) -> Any:
    if isinstance(value, dict):
        out = dict(value)
        for key in list(out):
            roll = rng.random()
            if roll < 0.15:
                out[key] = rng.choice(HOSTILE)
            elif roll < 0.2:
                del out[key]
            else:
                out[key] = mutate(rng, out[key])
        if rng.random() < 0.1:
            out[rng.choice(["zz", "\ud800", "seq", ""])] = rng.choice(HOSTILE)
        return out
    if isinstance(value, list):
        return [mutate(rng, item) for item in value]
    return value


def messages() -> list[tuple[str, dict[str, Any]]]:
    ids = {"uid": "u1", "generation": 1, "namespace": "ns", "name": "w"}
    span = {"traceId": "0" * 31 + "1", "spanId": "0" * 15 + "2", "name": "x",
            "startTime": 1.0, "endTime": 2.0, "attributes": {"a": 1}}  # fmt: skip
    bodies = [
        ("run", {**ids, "phase": "Running", "startedAt": 1.0}),
        ("task", {**ids, "task": "a", "phase": "Succeeded", "attempt": 1, "exitCode": 0,
                  "outputs": {"o": "v"}, "message": "m",
                  "attemptSpan": {"traceId": "0" * 31 + "1", "spanId": "0" * 15 + "1",
                                  "site": "s1", "endedAt": 2.0}}),
        ("log", {**ids, "task": "a", "attempt": 1, "stream": "stdout", "tail": "t"}),
        ("schedule", {"uid": "c1", "generation": 1, "namespace": "ns", "name": "c",
                      "state": "Held", "lastScheduledTime": 1.0, "missedCount": 0}),
        ("span", span),
    ]  # fmt: skip
    records = [{"seq": i + 1, "kind": kind, "body": body} for i, (kind, body) in enumerate(bodies)]

    def envelope(kind: str, payload: dict[str, Any], seq: int | None = None) -> dict[str, Any]:
        return {"v": 1, "kind": kind, "site": "s1", "seq": seq, "sentAt": 5.0,
                "traceparent": None, "payload": payload}  # fmt: skip

    state = {"online": True, "agentVersion": "1", "running": 1, "outboxDepth": 3,
             "lastAckedSeq": 2, "labels": {"a": "b"}, "epoch": "e1", "schedules": ["c1"],
             "boot": "b1"}  # fmt: skip
    return [
        (wire.EVENTS, envelope("events", {"records": records, "epoch": "e1"}, 1)),
        (wire.EVENTS, envelope("receipt", {"uid": "u1", "generation": 1, "phase": "Running"})),
        (wire.STATE, envelope("state", state)),
    ]


@pytest.mark.parametrize("seed", range(4))
async def test_no_mutated_message_is_a_bug_and_every_status_renders(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        bridge = CloudBridge(BridgeConfig(BrokerConnection("mqtt://127.0.0.1:1")))
        bridge.applier.expect("ns", "w", "u1", 1, ["a"], site="s1")
        sent = []
        for channel, message in messages():
            data = json.dumps(mutate(rng, message)).encode("utf-8", "surrogatepass")
            if rng.random() < 0.1:
                data = data.replace(b"1", b"\xff", 1)
            sent.append((wire.topic("s1", channel), data))
        await bridge.handle_many(sent)
        assert not bridge.dropped.get("error"), sent
        for view in bridge.applier.views():
            json.dumps(view.to_status(), allow_nan=False)
        for info in bridge.presence.snapshot().values():
            json.dumps(info.to_status(), allow_nan=False)
