"""Hand-made ``receipt`` and ``events`` messages against the operator's real bridge.

A test-owned MQTT client (the :class:`Forger` of ``test_hostile_heartbeats``)
publishes on a site's own topics through a real Mosquitto, as a buggy or lying
agent could; the operator's real :class:`~tideflow_operator.bridge.CloudBridge`
receives.  Proves:

* a receipt's ``uid`` and ``phase`` are bounded (a Kubernetes uid, a phase
  word): an oversized one is dropped as a bad payload naming the field;
* no log line carries more than a bounded, repr-escaped prefix of anything a
  site wrote (uids, names, field names, phases, messages): a site cannot flood
  the operator's log, nor forge log lines with a newline.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from services.broker import Mosquitto
from services.cloud import running_cloud, until
from test_hostile_heartbeats import SITE, Forger, forger  # noqa: F401 (the fixture)

from tideflow import wire

BIG = 200_000
# A line a site would like to see in the operator's log, after a newline of its own.
FORGED_LINE = "\n2026-01-01 00:00:00,000 ERROR operator: FORGED"
LOG_LINE_MAX = 1_000


def big(prefix: str) -> str:
    return prefix + FORGED_LINE + "x" * BIG


@contextlib.asynccontextmanager
async def cloud_hearing_receipts(url: str) -> AsyncIterator[tuple[Any, list[Any]]]:
    """A running cloud and the receipts it took, in order."""
    heard: list[Any] = []

    async def on_receipt(site: str, got: Any) -> None:
        heard.append(got)

    async with running_cloud(url, on_receipt=on_receipt) as cloud:
        yield cloud, heard


def receipt(by: Forger, payload: dict[str, Any]) -> None:
    message = wire.encode(wire.KIND_RECEIPT, SITE, payload)
    by.client.publish(wire.topic(SITE, wire.EVENTS), message, qos=1).wait_for_publish(10)


def assert_bounded(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        text = record.getMessage()
        assert len(text) <= LOG_LINE_MAX, (len(text), text[:300])
        assert "\n2026-01-01" not in text, text[:300]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"uid": big("u"), "generation": 1, "phase": "Rejected"}, "uid"),
        ({"uid": big("u"), "generation": 1, "phase": "Running"}, "uid"),
        ({"uid": "u-1", "generation": 1, "phase": big("Rejected")}, "phase"),
        ({"uid": "u-1", "generation": 1, "phase": "Running", big("extra"): 1}, "extra"),
        ({"uid": "", "generation": 1, "phase": "Running"}, "uid"),
        ({"uid": "u-1", "generation": 0, "phase": "Running"}, "generation"),
    ],
)
async def test_an_oversized_receipt_is_dropped_naming_the_field_and_logged_bounded(
    mosquitto: Mosquitto,
    forger: Forger,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    payload: dict[str, Any],
    field: str,
) -> None:
    """A receipt with a 200,000-character uid (or phase, or field name) was taken and
    its uid logged whole on every Rejected receipt: a site could flood the operator's
    log, and write lines into it after a newline of its own."""
    async with cloud_hearing_receipts(mosquitto.url) as (cloud, heard):
        bridge = cloud.bridge
        with caplog.at_level(logging.DEBUG):
            receipt(forger, payload)
            receipt(forger, {"uid": "u-2", "generation": 1, "phase": "Running"})  # sentinel
            await until(lambda: heard and heard[-1].uid == "u-2", 20, "the sentinel")
        assert len(heard) == 1, heard[:1]
        assert bridge.dropped["bad-payload"] == 1, dict(bridge.dropped)
        lines = [r.getMessage() for r in caplog.records if "bad receipt payload" in r.getMessage()]
        assert len(lines) == 1 and field in lines[0], lines
        assert_bounded(caplog)


async def test_site_strings_in_records_reach_the_log_bounded(
    mosquitto: Mosquitto,
    forger: Forger,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Records naming runs the cloud does not know (logged as discarded, with their
    namespace, name and uid), and malformed ones (logged with the field that failed,
    which may be a key the site chose), put every character the site wrote in the log."""
    # (A uid is at most 64 characters: a longer one is malformed, not unknown.)
    unknown = {"uid": big("u")[: wire.UID_MAX], "generation": 1, "namespace": big("ns"),
               "name": big("n"), "phase": "Running"}  # fmt: skip
    malformed = {"uid": "u-1", "generation": 1, "namespace": "default", "name": "wf",
                 "task": "a", "phase": "Running", "outputs": {big("key"): 1}}  # fmt: skip
    async with running_cloud(mosquitto.url) as cloud:
        applier = cloud.bridge.applier
        with caplog.at_level(logging.DEBUG):
            forger.events([(1, "run", unknown)])
            await until(lambda: applier.applied_through(SITE) == 1, 20, "the first consumed")
            forger.events([(2, "task", malformed)])
            await until(lambda: applier.applied_through(SITE) == 2, 20, "the second consumed")
        said = "\n".join(r.getMessage() for r in caplog.records)
        assert "discarded 1 unknown" in said and "malformed" in said, said[:2000]
        assert_bounded(caplog)
        assert json.dumps(FORGED_LINE)[1:8] in said  # the newline shown escaped


async def test_repeated_rejected_receipts_are_logged_once_and_only_for_real_assignments(
    mosquitto: Mosquitto,
    forger: Forger,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every ``Rejected`` receipt was logged as "site refused assignment ...", for any
    uid the site named, assigned or not: a site sending them in a loop wrote a warning
    line per message.  Now only an assignment outstanding at that site is said to be
    refused, once until it settles; it stays outstanding as before."""
    async with cloud_hearing_receipts(mosquitto.url) as (cloud, heard):
        uid = cloud.assign({"tasks": [{"name": "a", "command": ["true"]}]}, site=SITE)
        with caplog.at_level(logging.INFO):
            for n in range(100):
                receipt(forger, {"uid": f"never-{n}", "generation": 1, "phase": "Rejected"})
                receipt(forger, {"uid": uid, "generation": 1, "phase": "Rejected"})
            await until(lambda: len(heard) == 200, 20, "every receipt handled")
        refused = [r.getMessage() for r in caplog.records if "refused assignment" in r.getMessage()]
        assert len(refused) == 1 and uid in refused[0], refused[:3]
        assert (uid, 1) in cloud.bridge._site(SITE).assignments  # still sent again
        # Settled (the site holds it now), a later refusal is news again.
        receipt(forger, {"uid": uid, "generation": 1, "phase": "Running"})
        await until(lambda: len(heard) == 201, 20, "the settling receipt")
        assert (uid, 1) not in cloud.bridge._site(SITE).assignments


def envelope(kind: str, payload: Any, site: str = SITE) -> bytes:
    return json.dumps({"v": 1, "kind": kind, "site": site, "seq": None, "sentAt": 1.0,
                       "traceparent": None, "payload": payload}).encode()  # fmt: skip


GARBAGE = [
    (wire.EVENTS, b"\xff\xfe\xfa garbage", "not-json"),
    (wire.STATE, b"\xff\xfe\xfa garbage", "not-json"),
    (wire.STATE, b'{"v":1,"kind":"state","site":"site-a","payload":{"online":"\xff"}}', "not-json"),
    (wire.EVENTS, b"[" * 100_000 + b"]" * 100_000, "too-deep"),
    (wire.STATE, envelope("state", {"online": True, "labels": {"a": [[[[[[[[[[]]]]]]]]]]}}),
     "bad-payload"),
    (wire.STATE, b'"a string"', "bad-envelope"),
    (wire.EVENTS, b"[]", "bad-envelope"),
    (wire.STATE, envelope("state", [], ), "bad-envelope"),
    (wire.STATE, envelope("state", {"online": True}, site="site-b"), "wrong-site"),
    (wire.EVENTS, envelope("receipt", {"uid": "u", "generation": 1, "phase": "Running"},
                           site="site-b"), "wrong-site"),
    (wire.STATE, envelope("receipt", {"uid": "u", "generation": 1, "phase": "Running"}),
     "wrong-kind"),
    (wire.EVENTS, envelope("state", {"online": False}), "wrong-kind"),
    (wire.EVENTS, envelope("receipt", {"uid": "u", "generation": 10**30, "phase": "Running"}),
     "bad-payload"),
    (wire.EVENTS, b'{"v":1,"kind":"receipt","site":"site-a","payload":{"uid":"u",'
     b'"generation":1e400,"phase":"Running"}}', "bad-payload"),
    (wire.STATE, b'{"v":1,"kind":"state","site":"site-a","sentAt":NaN,"payload":{"online":true}}',
     "bad-envelope"),
    (wire.STATE, envelope("state", {"online": True, "running": -1}), "bad-payload"),
    (wire.STATE, envelope("state", {"online": True, "schedules": ["u"] * 1001}), "bad-payload"),
    # No schedule of ours has a uid that long (wire.SchedulePayload): kept per site in
    # memory, 1,000 of them made a megabyte per site.
    (wire.STATE, envelope("state", {"online": True, "schedules": ["u" * 10_000]}), "bad-payload"),
]  # fmt: skip


@pytest.mark.parametrize(("channel", "data", "reason"), GARBAGE)
async def test_garbage_on_a_sites_topics_is_dropped_with_its_reason_and_nothing_else(
    mosquitto: Mosquitto,
    forger: Forger,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    channel: str,
    data: bytes,
    reason: str,
) -> None:
    """Non-UTF-8, deep nesting, the wrong shape, another site's name in the envelope,
    a kind on the wrong topic, numbers out of range: each dropped, counted by its
    reason, logged bounded; the bridge goes on (the sentinel after it is taken), and
    the site's presence is not changed by what was dropped."""
    async with cloud_hearing_receipts(mosquitto.url) as (cloud, heard):
        bridge = cloud.bridge
        with caplog.at_level(logging.DEBUG):
            forger.client.publish(wire.topic(SITE, channel), data, qos=1).wait_for_publish(10)
            receipt(forger, {"uid": "u-2", "generation": 1, "phase": "Running"})  # sentinel
            await until(lambda: heard, 20, "the sentinel")
        assert [r.uid for r in heard] == ["u-2"]
        assert dict(bridge.dropped) == {reason: 1}, dict(bridge.dropped)
        assert bridge.presence.get(SITE) is None and bridge.presence.get("site-b") is None
        assert_bounded(caplog)


async def test_a_site_sending_garbage_in_a_loop_is_counted_in_full_and_logged_sparingly(
    mosquitto: Mosquitto,
    forger: Forger,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every message dropped as malformed wrote a warning line: a site publishing
    garbage as fast as it could wrote as many lines a second.  Each is still counted
    by its reason; the lines about one site come at most one per DROP_LOG_SECONDS."""
    async with cloud_hearing_receipts(mosquitto.url) as (cloud, heard):
        bridge = cloud.bridge
        with caplog.at_level(logging.INFO):
            for n in range(200):
                forger.client.publish(wire.topic(SITE, wire.EVENTS), b"garbage %d" % n, qos=1)
            receipt(forger, {"uid": "u-2", "generation": 1, "phase": "Running"})  # sentinel
            await until(lambda: heard, 20, "the sentinel")
        assert bridge.dropped["not-json"] == 200, dict(bridge.dropped)
        lines = [r.getMessage() for r in caplog.records if "dropped message" in r.getMessage()]
        assert 1 <= len(lines) <= 2, len(lines)


async def test_a_batch_of_malformed_records_is_one_log_line(
    mosquitto: Mosquitto,
    forger: Forger,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each malformed record of a batch wrote its own warning line (other discards are
    one line per reason per batch): one events message of 500 bad records, 500 lines."""
    bad = {"uid": "u-1", "generation": 1, "namespace": "default", "name": "wf", "task": "a",
           "phase": "Nowhere"}  # fmt: skip
    async with running_cloud(mosquitto.url) as cloud:
        applier = cloud.bridge.applier
        with caplog.at_level(logging.INFO):
            forger.events([(n, "task", bad) for n in range(1, 501)])
            await until(lambda: applier.applied_through(SITE) == 500, 20, "all consumed")
        assert applier.malformed_total == 500
        lines = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
        assert len(lines) == 1 and "500" in lines[0] and "phase" in lines[0], lines[:3]


async def test_batch_after_batch_of_refused_records_is_logged_sparingly(
    mosquitto: Mosquitto,
    forger: Forger,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refused records are one line per reason per batch, so a site sending batch
    after batch of one record each for a run assigned to another site wrote a
    warning line per batch.  Each is still counted; the lines about one site and
    reason come at most one per DISCARD_LOG_SECONDS, saying how many were not."""
    from tideflow_operator.applier import Discard

    other = {"uid": "u-b", "generation": 1, "namespace": "default", "name": "wf-b",
             "task": "a", "phase": "Running"}  # fmt: skip
    async with running_cloud(mosquitto.url) as cloud:
        applier = cloud.bridge.applier
        applier.expect("default", "wf-b", "u-b", 1, ["a"], site="site-b")
        with caplog.at_level(logging.INFO):
            for seq in range(1, 101):
                forger.events([(seq, "task", other)])
            await until(lambda: applier.applied_through(SITE) == 100, 20, "all consumed")
        assert applier.discarded[Discard.FORGED] == 100
        lines = [r.getMessage() for r in caplog.records if "forged" in r.getMessage()]
        assert 1 <= len(lines) <= 2, len(lines)
