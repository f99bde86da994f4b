"""The cloud applier: exactly-once, in-order application of each site's records.

The property tests deliver the same records the way MQTT and reconnects can
(split, reordered, duplicated, dropped and resent) and require the result to
equal applying them once, in order.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tideflow.wire import EventRecord, EventsPayload
from tideflow_operator.applier import (
    STATUS_LOG_CHARS,
    TASK_PHASES,
    Applier,
    ApplyResult,
    Discard,
    EpochChange,
    WorkflowView,
    parse_rfc3339,
    rfc3339,
)

T0 = 1_700_000_000.0
RUN_PHASES = ("Pending", "Running", "Succeeded", "Failed", "Cancelled")
WORKFLOWS = {  # site -> [(namespace, name, uid)]; sites never share a workflow
    "site-a": [("default", "wf-a", "uid-a"), ("team", "wf-b", "uid-b")],
    "site-b": [("default", "wf-c", "uid-c")],
}


# --------------------------------------------------------------- record helpers
def ident(wf: tuple[str, str, str], gen: int = 1) -> dict[str, Any]:
    ns, name, uid = wf
    return {"uid": uid, "generation": gen, "namespace": ns, "name": name}


def run_body(wf: tuple[str, str, str], phase: str, gen: int = 1, **kw: Any) -> dict[str, Any]:
    body = {
        **ident(wf, gen),
        "phase": phase,
        "reason": kw.get("reason"),
        "message": kw.get("message"),
        "suspended": kw.get("suspended", False),
        "startedAt": kw.get("startedAt"),
        "finishedAt": kw.get("finishedAt"),
    }
    return body


def task_body(
    wf: tuple[str, str, str], task: str, phase: str, gen: int = 1, **kw: Any
) -> dict[str, Any]:
    return {
        **ident(wf, gen),
        "task": task,
        "compensation": kw.get("compensation", False),
        "phase": phase,
        "attempt": kw.get("attempt", 1),
        "startedAt": kw.get("startedAt"),
        "finishedAt": kw.get("finishedAt"),
        "exitCode": kw.get("exitCode"),
        "outputs": kw.get("outputs", {}),
        "message": kw.get("message"),
    }


def log_body(
    wf: tuple[str, str, str], task: str, tail: str, attempt: int = 1, stream: str = "stdout"
) -> dict[str, Any]:
    return {**ident(wf), "task": task, "attempt": attempt, "stream": stream, "tail": tail}


def span_body(n: int) -> dict[str, Any]:
    return {"traceId": "ab" * 16, "spanId": f"{n:016x}", "name": f"task-{n}"}


def records(*items: tuple[str, dict[str, Any]], start: int = 1) -> list[EventRecord]:
    return [
        EventRecord(seq=start + i, kind=kind, body=body)  # type: ignore[arg-type]
        for i, (kind, body) in enumerate(items)
    ]


def batch(recs: list[EventRecord]) -> EventsPayload:
    return EventsPayload(records=recs)


WF = WORKFLOWS["site-a"][0]
A = "site-a"


def assigned(ap: Applier | None = None) -> Applier:
    """``ap`` with every workflow of WORKFLOWS assigned (expected) to its site."""
    ap = ap or Applier()
    for site, wfs in WORKFLOWS.items():
        for ns, name, uid in wfs:
            ap.expect(ns, name, uid, 1, [], site=site)
    return ap


# ------------------------------------------------------------------ basic apply
def test_in_order_batch_builds_the_view() -> None:
    ap = Applier()
    ap.expect(
        "default", "wf-a", "uid-a", 1, ["t1", "t2", "t3"], compensation_names=["undo"], site=A
    )
    recs = records(
        ("run", run_body(WF, "Running", startedAt=T0)),
        ("task", task_body(WF, "t1", "Running", startedAt=T0 + 1)),
        (
            "task",
            task_body(
                WF,
                "t1",
                "Succeeded",
                startedAt=T0 + 1,
                finishedAt=T0 + 2,
                exitCode=0,
                outputs={"x": "1"},
            ),
        ),
        ("log", log_body(WF, "t1", "hello\n")),
        ("task", task_body(WF, "t2", "Running", startedAt=T0 + 2)),
    )
    res = ap.apply_batch("site-a", batch(recs))
    assert (res.applied, res.duplicates, res.malformed, res.stale) == (5, 0, 0, 0)
    assert res.ack_through == 5 and res.gap is None and not res.needs_resend
    assert res.changed == {("default", "wf-a")}
    assert [(c.old, c.new) for c in res.transitions] == [("Pending", "Running")]

    view = ap.view("default", "wf-a")
    assert view is not None
    assert (view.phase, view.site, view.synced_seq, view.uid, view.generation) == (
        "Running",
        "site-a",
        5,
        "uid-a",
        1,
    )
    assert view.progress == "1/3"
    assert view.task_counts() == {
        **dict.fromkeys(TASK_PHASES, 0),
        "Succeeded": 1,
        "Running": 1,
        "Pending": 1,
    }
    assert view.compensation_counts()["Pending"] == 1
    assert view.tasks["t1"].outputs == {"x": "1"} and view.tasks["t1"].exit_code == 0
    assert view.log_tail("t1") == {"stdout": "hello\n"}
    assert list(view.tasks) == ["t1", "t2", "t3", "undo"]  # spec order


def test_duplicates_are_counted_and_ignored() -> None:
    ap = assigned()
    recs = records(("run", run_body(WF, "Running")), ("task", task_body(WF, "t1", "Running")))
    ap.apply_batch("site-a", batch(recs))
    res = ap.apply_batch("site-a", batch(recs + recs))
    assert (res.applied, res.duplicates, res.ack_through) == (0, 4, 2)
    assert res.changed == set() and res.gap is None


def test_gap_holds_back_and_requests_resend() -> None:
    ap = assigned()
    recs = records(*[("task", task_body(WF, f"t{i}", "Running")) for i in range(1, 6)])
    res = ap.apply_batch("site-a", batch(recs[2:4]))  # seqs 3, 4
    assert (res.applied, res.ack_through, res.held) == (0, 0, 2)
    assert res.gap == 1 and res.resend_from == 1 and res.needs_resend
    before = ap.view("default", "wf-a")  # nothing beyond the gap is visible
    assert before is not None and not before.tasks and before.synced_seq == 0

    res = ap.apply_batch("site-a", batch(recs[3:5]))  # 4 again (held: duplicate), 5
    assert (res.duplicates, res.held, res.gap) == (1, 3, 1)

    res = ap.apply_batch("site-a", batch(recs[0:2]))  # fills the gap
    assert (res.applied, res.ack_through, res.held, res.gap) == (5, 5, 0, None)
    view = ap.view("default", "wf-a")
    assert view is not None and set(view.tasks) == {f"t{i}" for i in range(1, 6)}


def test_unsorted_batch_is_applied_in_seq_order() -> None:
    ap = assigned()
    recs = records(
        ("task", task_body(WF, "t1", "Running")), ("task", task_body(WF, "t1", "Succeeded"))
    )
    res = ap.apply_batch("site-a", [recs[1], recs[0]])
    assert res.applied == 2
    view = ap.view("default", "wf-a")
    assert view is not None and view.tasks["t1"].phase == "Succeeded"


def test_malformed_record_is_counted_skipped_and_consumed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ap = assigned()
    bad = {k: v for k, v in task_body(WF, "t1", "Running").items() if k != "task"}
    recs = records(
        ("task", task_body(WF, "t0", "Running")),
        ("task", bad),
        ("run", {**run_body(WF, "Running"), "phase": "Exploded"}),
        ("task", task_body(WF, "t2", "Running")),
    )
    with caplog.at_level(logging.WARNING, logger="tideflow_operator.applier"):
        res = ap.apply_batch("site-a", batch(recs))
    assert (res.applied, res.malformed, res.ack_through, res.gap) == (2, 2, 4, None)
    # One line for the batch's malformed records (a line each flooded the log),
    # saying how many and naming the first.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and all("\n" not in r.getMessage() for r in warnings)
    assert "2 malformed" in warnings[0].getMessage() and "seq 2" in warnings[0].getMessage()
    view = ap.view("default", "wf-a")
    assert view is not None and set(view.tasks) == {"t0", "t2"}
    assert ap.malformed_total == 2


def test_hold_back_buffer_is_bounded_and_recovers_by_resend() -> None:
    ap = assigned(Applier(max_held=5))
    recs = records(*[("task", task_body(WF, f"t{i}", "Running")) for i in range(1, 21)])
    res = ap.apply_batch("site-a", batch(recs[1:]))  # seqs 2..20
    assert (res.held, res.dropped, res.gap, res.ack_through) == (5, 14, 1, 0)
    assert ap.held("site-a") == 5
    res = ap.apply_batch("site-a", batch(recs[:1]))
    # 1..6 applied; 7..20 were dropped, so the site must still resend them.
    assert (res.applied, res.ack_through, res.held, res.gap) == (6, 6, 0, 7)
    res = ap.apply_batch("site-a", batch(recs[6:]))
    assert (res.applied, res.ack_through, res.gap) == (14, 20, None)


def test_sites_are_independent() -> None:
    ap = assigned()
    wf_c = WORKFLOWS["site-b"][0]
    ap.apply_batch("site-a", batch(records(("task", task_body(WF, "t1", "Running")))))
    res = ap.apply_batch("site-b", batch(records(("task", task_body(wf_c, "t1", "Running")))))
    assert res.applied == 1 and res.ack_through == 1
    assert ap.state() == {"site-a": 1, "site-b": 1}
    view = ap.view("default", "wf-c")
    assert view is not None and view.site == "site-b"


# --------------------------------------------------------- identity/generations
def test_older_generation_does_not_overwrite_the_expected_one() -> None:
    ap = Applier()
    ap.expect("default", "wf-a", "uid-a", 2, ["t1"], site=A)
    res = ap.apply_batch(
        "site-a",
        batch(
            records(
                ("run", run_body(WF, "Failed", gen=1, reason="TaskFailed")),
                ("task", task_body(WF, "t1", "Failed", gen=1)),
                ("run", run_body(WF, "Running", gen=2)),
                ("task", task_body(WF, "t1", "Running", gen=2)),
                ("run", run_body(WF, "Cancelled", gen=1)),
            )
        ),
    )
    assert (res.applied, res.stale, res.ack_through) == (2, 3, 5)
    view = ap.view("default", "wf-a")
    assert view is not None
    assert (view.generation, view.phase, view.tasks["t1"].phase) == (2, "Running", "Running")


def test_newer_generation_in_records_replaces_the_view() -> None:
    ap = Applier()
    ap.expect("default", "wf-a", "uid-a", 1, ["t1", "t2"], site=A)
    ap.apply_batch("site-a", batch(records(("task", task_body(WF, "t1", "Succeeded")))))
    ap.apply_batch(
        "site-a", batch(records(("task", task_body(WF, "t9", "Running", gen=2)), start=2))
    )
    view = ap.view("default", "wf-a")
    assert view is not None and view.generation == 2 and list(view.tasks) == ["t9"]
    # An expectation older than what the site already runs is ignored.
    assert ap.expect("default", "wf-a", "uid-a", 1, ["t1"], site=A).generation == 2
    # and records of generation 1 are stale now
    res = ap.apply_batch("site-a", batch(records(("task", task_body(WF, "t1", "Failed")), start=3)))
    assert res.stale == 1


def test_other_uid_is_stale_and_records_of_unassigned_workflows_are_unknown() -> None:
    ap = Applier()
    old = ("default", "wf-a", "uid-old")
    ap.expect("default", "wf-a", "uid-a", 1, ["t1"], site=A)
    res = ap.apply_batch("site-a", batch(records(("task", task_body(old, "t1", "Failed")))))
    assert res.stale == 1
    view = ap.view("default", "wf-a")
    assert view is not None and view.uid == "uid-a" and view.tasks["t1"].phase == "Pending"

    ap2 = Applier()  # not assigned: records of either uid are for an unknown Workflow
    ap2.apply_batch("site-a", batch(records(("task", task_body(old, "t1", "Failed")))))
    res = ap2.apply_batch(
        "site-a", batch(records(("task", task_body(WF, "t2", "Running")), start=2))
    )
    assert (res.unknown, res.ack_through) == (1, 2) and ap2.view("default", "wf-a") is None


def test_forgotten_workflow_is_not_resurrected_by_late_records() -> None:
    ap = assigned()
    ap.apply_batch("site-a", batch(records(("task", task_body(WF, "t1", "Running")))))
    ap.forget("default", "wf-a")
    res = ap.apply_batch("site-a", batch(records(("run", run_body(WF, "Cancelled")), start=2)))
    assert res.stale == 1 and ap.view("default", "wf-a") is None and res.ack_through == 2


# ------------------------------------------------------------- spans, logs, acks
def test_spans_are_collected_and_drained() -> None:
    ap = Applier()
    ap.apply_batch("site-a", batch(records(("span", span_body(1)), ("span", span_body(2)))))
    spans = ap.drain_spans()
    assert [(s.site, s.seq, s.body["spanId"]) for s in spans] == [
        ("site-a", 1, span_body(1)["spanId"]),
        ("site-a", 2, span_body(2)["spanId"]),
    ]
    assert ap.drain_spans() == []


def test_a_span_carried_by_a_task_record_is_collected_as_a_span_record_is() -> None:
    """Decision 0022: the new agent's form (the outcome carries its span) and an older
    agent's (a span record of its own) give the same spans and the same view."""
    span = {**span_body(7), "parentSpanId": "a3ce929d0e0e4736", "attributes": {"k": 1}}
    done = task_body(WF, "t1", "Succeeded", exitCode=0)
    old, new = assigned(), assigned()
    old.apply_batch(A, batch(records(("span", span), ("task", done))))
    new.apply_batch(A, batch(records(("task", {**done, "span": span}))))
    assert (
        [(s.site, s.body) for s in new.drain_spans()]
        == [(s.site, s.body) for s in old.drain_spans()]
        == [(A, span)]
    )
    old_view, new_view = old.view("default", "wf-a"), new.view("default", "wf-a")
    assert old_view is not None and new_view is not None
    old_status, new_status = old_view.to_status(), new_view.to_status()
    assert (old_status.pop("syncedSeq"), new_status.pop("syncedSeq")) == (2, 1)  # 2 records, 1
    assert new_status == old_status
    # Like a span record, it is kept whatever becomes of the record that carries it.
    # (Another attempt's span: the same span twice is collected once.)
    unknown = task_body(("default", "nobody", "uid-z"), "t1", "Failed")
    other = {**span, "spanId": span_body(8)["spanId"]}
    res = new.apply_batch(A, batch(records(("task", {**unknown, "span": other}), start=2)))
    assert res.unknown == 1 and [s.body for s in new.drain_spans()] == [other]


def test_span_buffer_is_bounded() -> None:
    ap = Applier(max_spans=3)
    ap.apply_batch("site-a", batch(records(*[("span", span_body(i)) for i in range(5)])))
    assert [s.seq for s in ap.drain_spans()] == [3, 4, 5] and ap.spans_dropped == 2


def test_log_tails_are_bounded_and_follow_the_latest_attempt() -> None:
    ap = assigned(Applier(max_log_chars=10, max_log_tails=2))
    ap.apply_batch(
        "site-a",
        batch(
            records(
                ("log", log_body(WF, "t1", "0123456789abcdef", attempt=2)),
                ("log", log_body(WF, "t1", "older attempt", attempt=1)),
                ("log", log_body(WF, "t1", "err", attempt=2, stream="stderr")),
                ("log", log_body(WF, "t2", "two")),
            )
        ),
    )
    view = ap.view("default", "wf-a")
    assert view is not None
    assert view.log_tail("t1") == {"stderr": "err"}  # oldest tail evicted (2 kept)
    assert view.log_tail("t2") == {"stdout": "two"}
    ap2 = assigned(Applier(max_log_chars=10))
    ap2.apply_batch("site-a", batch(records(("log", log_body(WF, "t1", "0123456789abcdef")))))
    v2 = ap2.view("default", "wf-a")
    assert v2 is not None and v2.log_tail("t1") == {"stdout": "6789abcdef"}


def test_a_task_s_outputs_are_held_as_the_status_shows_them() -> None:
    """A record may carry up to MAX_RECORD_BYTES of outputs (a site's own agent
    never sends more than 64 KiB, another sender may); the view held all of it
    for every task, where the status keeps ~2 KiB of each."""
    ap = assigned()
    huge = {f"k{j}": "v" * 10_000 for j in range(40)}  # 400 KB, as one record may carry
    huge["x" * 1000] = "a key no agent makes"
    ap.apply_batch(
        "site-a", batch(records(("task", task_body(WF, "t1", "Succeeded", outputs=huge))))
    )
    view = ap.view("default", "wf-a")
    assert view is not None
    held = view.tasks["t1"]
    assert sum(len(k) + len(v) for k, v in held.outputs.items()) <= 2048 + 64  # (+ a key)
    assert held.outputs_truncated
    entry = held.to_status()
    assert entry["outputs"] == held.outputs and entry["outputsTruncated"] is True
    small = {"a": "1", "b": "2"}
    ap.apply_batch(
        "site-a",
        batch(records(("task", task_body(WF, "t2", "Succeeded", outputs=small)), start=2)),
    )
    assert view.tasks["t2"].outputs == small and not view.tasks["t2"].outputs_truncated
    assert "outputsTruncated" not in view.tasks["t2"].to_status()


def test_ackable_through_waits_for_persistence() -> None:
    ap = assigned()
    wf_b = WORKFLOWS["site-a"][1]
    res = ap.apply_batch(
        "site-a",
        batch(
            records(
                ("span", span_body(1)),
                ("task", task_body(WF, "t1", "Running")),
                ("task", task_body(wf_b, "t1", "Running")),
            )
        ),
    )
    assert res.ack_through == 3
    assert ap.ackable_through("site-a") == 1  # seq 2 changed wf-a, not yet persisted
    view_a = ap.view("default", "wf-a")
    view_b = ap.view("team", "wf-b")
    assert view_a is not None and view_b is not None
    ap.mark_persisted("default", "wf-a", view_a.synced_seq)
    assert ap.ackable_through("site-a") == 2
    ap.mark_persisted("team", "wf-b", view_b.synced_seq - 1)  # an older render: not enough
    assert ap.ackable_through("site-a") == 2
    ap.mark_persisted("team", "wf-b", view_b.synced_seq)
    assert ap.ackable_through("site-a") == 3
    assert ap.ackable_through("nowhere") == 0


# ----------------------------------------------------------------- status shape
def test_to_status_shape_and_merge_patch_safety() -> None:
    ap = Applier()
    ap.expect("default", "wf-a", "uid-a", 1, ["t1", "t2"], site=A)
    ap.apply_batch(
        "site-a",
        batch(
            records(
                ("run", run_body(WF, "Running", startedAt=T0 + 0.25)),
                (
                    "task",
                    task_body(
                        WF,
                        "t1",
                        "Succeeded",
                        startedAt=T0,
                        finishedAt=T0 + 1.5,
                        exitCode=0,
                        outputs={"out": "v"},
                    ),
                ),
            )
        ),
    )
    view = ap.view("default", "wf-a")
    assert view is not None
    status = view.to_status()
    assert status["phase"] == "Running" and status["site"] == "site-a"
    assert status["progress"] == "1/2" and status["syncedSeq"] == 2
    assert status["observedGeneration"] == 1
    assert status["startedAt"] == "2023-11-14T22:13:20.250Z"
    assert status["finishedAt"] is None and status["reason"] is None  # present: clears
    assert status["taskCounts"] == {**dict.fromkeys(TASK_PHASES, 0), "Succeeded": 1, "Pending": 1}
    assert status["compensationCounts"] is None
    assert status["tasksTruncated"] is False
    assert status["tasks"] == [
        {
            "name": "t1",
            "phase": "Succeeded",
            "attempt": 1,
            "startedAt": "2023-11-14T22:13:20.000Z",
            "finishedAt": "2023-11-14T22:13:21.500Z",
            "exitCode": 0,
            "outputs": {"out": "v"},
        },
        {"name": "t2", "phase": "Pending", "attempt": 0},
    ]
    json.dumps(status)  # plain JSON


def test_rfc3339_round_trip() -> None:
    assert rfc3339(None) is None and parse_rfc3339(None) is None
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert parse_rfc3339("2023-11-14T22:13:20Z") == T0
    assert parse_rfc3339("2023-11-14T23:13:20.5+01:00") == T0 + 0.5


def _big_workflow(n: int = 5000) -> tuple[Applier, list[str]]:
    ap = Applier()
    names = [f"task-{i:05d}-" + "x" * 40 for i in range(n)]
    ap.expect("default", "wf-a", "uid-a", 1, names, compensation_names=["undo"], site=A)
    recs: list[tuple[str, dict[str, Any]]] = []
    for i, name in enumerate(names):
        if i % 10 == 9:
            continue  # stays Pending
        phase = ("Succeeded", "Failed", "Running", "Retrying", "Skipped")[i % 5]
        done = phase in ("Succeeded", "Failed", "Skipped")
        recs.append(
            (
                "task",
                task_body(
                    WF,
                    name,
                    phase,
                    startedAt=T0 + i,
                    finishedAt=T0 + i + 1 if done else None,
                    exitCode=0 if phase == "Succeeded" else None,
                    outputs={f"k{j}": "v" * 900 for j in range(5)},
                    message="m" * 5000,
                ),
            )
        )
    ap.apply_batch("site-a", batch(records(*recs)))
    return ap, names


def test_status_of_5000_task_workflow_stays_under_256_kib() -> None:
    ap, names = _big_workflow()
    view = ap.view("default", "wf-a")
    assert view is not None
    status = view.to_status()
    size = len(json.dumps(status).encode())
    assert size < 256 * 1024, size
    assert status["tasksTruncated"] is True
    counts = status["taskCounts"]
    assert sum(counts.values()) == 5000
    assert counts == {
        **dict.fromkeys(TASK_PHASES, 0),
        "Succeeded": 1000,
        "Failed": 1000,
        "Running": 1000,
        "Retrying": 1000,
        "Skipped": 500,
        "Pending": 500,
    }
    assert status["progress"] == "1000/5000"
    assert status["compensationCounts"]["Pending"] == 1
    listed = status["tasks"]
    assert 0 < len(listed) <= 500
    # Live tasks are listed first; the list is shown in spec order.
    assert {t["phase"] for t in listed} <= {"Running", "Retrying"}
    order = {n: i for i, n in enumerate(names)}
    assert [order[t["name"]] for t in listed] == sorted(order[t["name"]] for t in listed)
    assert all(len(t["message"]) <= 512 for t in listed)
    # A small cap lists fewer; counts are unaffected.
    small = view.to_status(max_tasks=10)
    assert len(small["tasks"]) == 10 and small["taskCounts"] == counts


def test_status_round_trip_from_truncated_status_keeps_exact_counts() -> None:
    ap, _ = _big_workflow()
    view = ap.view("default", "wf-a")
    assert view is not None
    status = view.to_status(max_tasks=50)
    rebuilt = WorkflowView.from_status(status, namespace="default", name="wf-a", uid="uid-a")
    assert rebuilt.to_status(max_tasks=50) == status
    assert rebuilt.task_counts() == view.task_counts()
    assert rebuilt.compensation_counts() == view.compensation_counts()
    assert (rebuilt.generation, rebuilt.site, rebuilt.synced_seq) == (1, "site-a", 4500)


def test_status_round_trip_untruncated() -> None:
    ap = Applier()
    ap.expect("default", "wf-a", "uid-a", 3, ["t1", "t2"], compensation_names=["c"], site=A)
    ap.apply_batch(
        "site-a",
        batch(
            records(
                (
                    "run",
                    run_body(
                        WF,
                        "Failed",
                        gen=3,
                        startedAt=T0,
                        finishedAt=T0 + 9,
                        reason="TaskFailed",
                        message="t2 failed",
                    ),
                ),
                ("task", task_body(WF, "t2", "Failed", gen=3, exitCode=3, message="boom")),
                ("task", task_body(WF, "c", "Running", gen=3, compensation=True)),
            )
        ),
    )
    view = ap.view("default", "wf-a")
    assert view is not None
    status = view.to_status()
    rebuilt = WorkflowView.from_status(status, namespace="default", name="wf-a", uid="uid-a")
    assert rebuilt == view
    assert rebuilt.to_status() == status and not rebuilt.residual


# -------------------------------------------------------------------- restoring
def test_restore_site_raises_the_mark_and_skips_reflected_records() -> None:
    wf_b = WORKFLOWS["site-a"][1]
    recs = records(
        ("task", task_body(WF, "t1", "Running")),
        ("task", task_body(wf_b, "t1", "Running")),
        ("task", task_body(WF, "t1", "Succeeded")),
        ("task", task_body(wf_b, "t1", "Succeeded")),
    )
    ref = assigned()
    ref.apply_batch("site-a", batch(recs))

    # The operator persisted wf-a at seq 3 and wf-b at seq 2, acked only 1, then restarted.
    fresh = Applier()
    ap = assigned()
    ap.apply_batch("site-a", batch(recs[:3]))
    statuses = {}
    for ns, name, uid in WORKFLOWS["site-a"]:
        v = ap.view(ns, name)
        assert v is not None
        statuses[(ns, name, uid)] = v.to_status()
    for (ns, name, uid), status in statuses.items():
        fresh.load(WorkflowView.from_status(status, namespace=ns, name=name, uid=uid))
    fresh.restore_site("site-a", 1)  # the site's lastAckedSeq
    res = fresh.apply_batch("site-a", batch(recs[1:]))  # the site resends 2..4
    # seqs 2 and 3 are already in the rebuilt views; only 4 is new.
    assert (res.applied, res.stale, res.ack_through) == (1, 2, 4)
    for ns, name, _ in WORKFLOWS["site-a"]:
        got, want = fresh.view(ns, name), ref.view(ns, name)
        assert got is not None and want is not None
        assert got.to_status() == want.to_status()

    # Never lowers; held records that become contiguous are applied.
    ap3 = assigned()
    ap3.apply_batch("site-a", batch(recs[3:]))
    assert ap3.held("site-a") == 1
    res = ap3.restore_site("site-a", 3)
    assert (res.applied, res.ack_through, res.gap) == (1, 4, None)
    assert ap3.restore_site("site-a", 2).ack_through == 4
    assert ap3.reset_site("site-a") == {("team", "wf-b")}
    assert ap3.applied_through("site-a") == 0
    # A reinstalled agent numbers from 1 again: its records are not "already reflected".
    res = ap3.apply_batch("site-a", batch(records(("task", task_body(wf_b, "t1", "Failed")))))
    assert res.applied == 1
    reset_view = ap3.view("team", "wf-b")
    assert reset_view is not None and reset_view.tasks["t1"].phase == "Failed"
    ap4 = Applier()
    ap4.restore({"site-a": 7, "site-b": 2})
    assert ap4.state() == {"site-a": 7, "site-b": 2}


def test_expect_after_load_does_not_double_count_unlisted_tasks() -> None:
    ap, names = _big_workflow(200)
    view = ap.view("default", "wf-a")
    assert view is not None
    status = view.to_status(max_tasks=20)
    fresh = Applier()
    fresh.load(WorkflowView.from_status(status, namespace="default", name="wf-a", uid="uid-a"))
    again = fresh.expect("default", "wf-a", "uid-a", 1, names, compensation_names=["undo"], site=A)
    assert again.task_counts() == view.task_counts()
    assert again.compensation_counts() == view.compensation_counts()


# ------------------------------------------------- what a site may (not) change
def test_a_record_for_another_sites_run_is_forged_counted_and_still_acked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ap = assigned()
    wf_c = WORKFLOWS["site-b"][0]
    forged = records(
        ("run", run_body(wf_c, "Succeeded", message="done")),
        ("task", task_body(wf_c, "t1", "Succeeded")),
        ("log", log_body(wf_c, "t1", "lies")),
    )
    with caplog.at_level(logging.WARNING, logger="tideflow_operator.applier"):
        res = ap.apply_batch(A, batch(forged))
    assert (res.applied, res.forged, res.ack_through, res.gap) == (0, 3, 3, None)
    assert res.changed == set() and res.transitions == []
    view = ap.view("default", "wf-c")
    assert view is not None
    assert (view.phase, view.site, view.tasks, view.synced_seq) == ("Pending", "site-b", {}, 0)
    assert ap.ackable_through(A) == 3  # discarded records do not hold the ack back
    assert ap.discarded[Discard.FORGED] == 3
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "forged" in warning and "site-a" in warning and "site-b" in warning
    assert "default/wf-c" in warning
    # The assigned site's own records still apply.
    res = ap.apply_batch("site-b", batch(records(("run", run_body(wf_c, "Running")))))
    assert res.applied == 1 and view.phase == "Running" and view.site == "site-b"


def test_records_for_unknown_workflows_are_acked_and_keep_no_view() -> None:
    ap = assigned()
    baseline = len(ap.views())
    gone = [("default", f"gone-{i}", f"uid-gone-{i}") for i in range(10_000)]
    recs = [
        EventRecord(seq=i + 1, kind="task", body=task_body(wf, "t1", "Running"))
        for i, wf in enumerate(gone)
    ]
    for start in range(0, len(recs), 1000):
        res = ap.apply_batch(A, batch(recs[start : start + 1000]))
        assert res.unknown == 1000 and res.changed == set()
    assert len(ap.views()) == baseline
    assert ap.ackable_through(A) == ap.applied_through(A) == 10_000
    assert ap.discarded[Discard.UNKNOWN] == 10_000
    # A deleted Workflow's late records are stale, and acked too.
    ap.apply_batch(A, batch(records(("task", task_body(WF, "t1", "Running")), start=10_001)))
    ap.forget("default", "wf-a")
    res = ap.apply_batch(A, batch(records(("run", run_body(WF, "Cancelled")), start=10_002)))
    assert res.stale == 1 and ap.ackable_through(A) == 10_002
    assert len(ap.views()) == baseline - 1


def test_a_finished_run_is_final() -> None:
    ap = assigned()
    res = ap.apply_batch(
        A,
        batch(
            records(
                ("run", run_body(WF, "Running", startedAt=T0)),
                ("run", run_body(WF, "Succeeded", startedAt=T0, finishedAt=T0 + 5)),
                ("run", run_body(WF, "Running", startedAt=T0 + 9)),
                ("run", run_body(WF, "Failed", startedAt=T0, finishedAt=T0 + 9)),
                ("task", task_body(WF, "t1", "Succeeded")),
            )
        ),
    )
    assert (res.applied, res.final, res.ack_through) == (3, 2, 5)
    assert [(c.old, c.new) for c in res.transitions] == [
        ("Pending", "Running"),
        ("Running", "Succeeded"),
    ]
    view = ap.view("default", "wf-a")
    assert view is not None and (view.phase, view.finished_at) == ("Succeeded", T0 + 5)
    assert ap.discarded[Discard.FINAL] == 2


def test_a_far_ahead_seq_is_dropped_and_logged_not_held(caplog: pytest.LogCaptureFixture) -> None:
    ap = assigned(Applier(window=100))
    forged = EventRecord(seq=1_000_000, kind="run", body=run_body(WF, "Succeeded"))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="tideflow_operator.applier"):
        res = ap.apply_batch(A, batch([forged]))
    assert (res.beyond_window, res.held, res.gap, res.ack_through) == (1, 0, None, 0)
    assert ap.held(A) == 0 and ap.discarded[Discard.BEYOND_WINDOW] == 1
    assert any("1000000" in r.getMessage() for r in caplog.records)
    # Within the window records are held; beyond it they are dropped, whatever the count.
    recs = records(*[("task", task_body(WF, f"t{i}", "Running")) for i in range(1, 151)])
    res = ap.apply_batch(A, batch(recs[1:]))
    assert (res.held, res.beyond_window, res.gap) == (99, 50, 1)
    res = ap.apply_batch(A, batch(recs[:1]))
    assert (res.applied, res.ack_through, res.gap) == (100, 100, None)
    res = ap.apply_batch(A, batch(recs[100:]))
    assert (res.applied, res.ack_through) == (50, 150)
    view = ap.view("default", "wf-a")
    assert view is not None and view.phase == "Pending"  # the forged Succeeded never applied


def test_the_first_record_to_arrive_for_a_seq_wins() -> None:
    ap = assigned()
    first = EventRecord(seq=2, kind="task", body=task_body(WF, "t1", "Running"))  # type: ignore[arg-type]
    second = EventRecord(seq=2, kind="task", body=task_body(WF, "t1", "Failed"))  # type: ignore[arg-type]
    assert ap.apply_batch(A, batch([first])).held == 1
    assert ap.apply_batch(A, batch([second])).duplicates == 1
    res = ap.apply_batch(A, batch(records(("run", run_body(WF, "Running")))))
    view = ap.view("default", "wf-a")
    assert res.ack_through == 2 and view is not None and view.tasks["t1"].phase == "Running"


# -------------------------------------------------------------------- epochs
def _epoch_batch(epoch: str | None, *items: tuple[str, dict[str, Any]], start: int = 1) -> Any:
    return EventsPayload(records=records(*items, start=start), epoch=epoch)


def test_a_new_database_epoch_starts_the_sites_sequence_again() -> None:
    ap = assigned()
    wf_b = WORKFLOWS["site-a"][1]
    res = ap.apply_batch(
        A,
        _epoch_batch(
            "e1",
            ("run", run_body(WF, "Running")),
            ("run", run_body(WF, "Succeeded")),
            ("run", run_body(wf_b, "Running")),
            ("task", task_body(wf_b, "t1", "Running")),
            ("task", task_body(wf_b, "t1", "Succeeded")),
        ),
    )
    assert res.ack_through == 5 and res.epoch_change is None and ap.epoch(A) == "e1"
    for view in ap.views():
        ap.mark_persisted(view.namespace, view.name, view.synced_seq)
    # The site's database was replaced: its seqs start at 1 again.
    res = ap.apply_batch(A, _epoch_batch("e2", ("task", task_body(wf_b, "t2", "Running"))))
    assert res.epoch_change == EpochChange(A, "e1", "e2", [("team", "wf-b")])  # wf-a is done
    assert (res.applied, res.duplicates, res.ack_through) == (1, 0, 1)
    assert ap.epoch(A) == "e2" and ap.ackable_through(A) == 0  # wf-b changed, unpersisted
    view_b = ap.view("team", "wf-b")
    assert view_b is not None and view_b.tasks["t2"].phase == "Running"
    assert (view_b.synced_seq, view_b.synced_epoch) == (1, "e2")
    # A late batch of the old database is discarded and changes no mark.
    res = ap.apply_batch(A, _epoch_batch("e1", ("run", run_body(wf_b, "Failed")), start=6))
    assert (res.retired, res.applied, res.ack_through, res.epoch_change) == (1, 0, 1, None)
    assert view_b.phase == "Running" and ap.epoch(A) == "e2"
    # Batches without an epoch (an agent that predates them) keep the current numbering.
    res = ap.apply_batch(A, _epoch_batch(None, ("task", task_body(wf_b, "t2", "Failed")), start=2))
    assert (res.applied, res.ack_through, res.epoch_change) == (1, 2, None)


def test_after_an_operator_restart_runs_synced_in_another_epoch_are_reported_lost() -> None:
    ap = assigned()
    wf_b = WORKFLOWS["site-a"][1]
    ap.apply_batch(
        A,
        _epoch_batch(
            "e1",
            ("run", run_body(WF, "Succeeded")),
            ("run", run_body(wf_b, "Running")),
            ("task", task_body(wf_b, "t1", "Running")),
        ),
    )
    statuses = {wf: ap.view(wf[0], wf[1]).to_status() for wf in (WF, wf_b)}  # type: ignore[union-attr]
    assert statuses[wf_b]["syncedEpoch"] == "e1"

    def restarted() -> Applier:
        fresh = Applier()
        for (ns, name, uid), status in statuses.items():
            fresh.load(WorkflowView.from_status(status, namespace=ns, name=name, uid=uid))
        return fresh

    # Same database: records already reflected in the statuses are stale.
    same = restarted()
    same.restore_site(A, 2)  # the site's lastAckedSeq
    res = same.apply_batch(
        A, _epoch_batch("e1", ("task", task_body(wf_b, "t1", "Running")), start=3)
    )
    assert (res.stale, res.epoch_change) == (1, None)
    # A new database: its seq 1 is not "already reflected", and wf-b's run was lost there.
    fresh = restarted()
    assert fresh.observe_epoch(A, "e2") == EpochChange(A, None, "e2", [("team", "wf-b")])
    res = fresh.apply_batch(A, _epoch_batch("e2", ("task", task_body(wf_b, "t1", "Succeeded"))))
    assert (res.applied, res.epoch_change) == (1, None)
    assert fresh.observe_epoch(A, "e2") is None


# ------------------------------------------------------------- property tests
def _random_records(rng: random.Random, site: str, n: int) -> list[EventRecord]:
    wfs = WORKFLOWS[site]
    others = [wf for other, owned in WORKFLOWS.items() if other != site for wf in owned]
    out: list[EventRecord] = []
    for seq in range(1, n + 1):
        wf = rng.choice(wfs)
        odd = rng.random()
        if odd < 0.05:  # another site's run: forged
            wf = rng.choice(others)
        elif odd < 0.1:  # a Workflow the cloud does not know (deleted, never assigned)
            wf = ("default", f"unknown-{seq % 3}", f"uid-unknown-{seq % 3}")
        gen = rng.choice((1, 1, 1, 2))
        roll = rng.random()
        kind: str
        if roll < 0.2:
            kind, body = (
                "run",
                run_body(
                    wf,
                    rng.choice(RUN_PHASES),
                    gen=gen,
                    suspended=rng.random() < 0.2,
                    startedAt=T0 + seq,
                    message=rng.choice((None, "m")),
                ),
            )
        elif roll < 0.7:
            kind, body = (
                "task",
                task_body(
                    wf,
                    rng.choice(("t1", "t2", "t3", "undo")),
                    rng.choice(TASK_PHASES),
                    gen=gen,
                    attempt=rng.randint(0, 3),
                    compensation=rng.random() < 0.1,
                    outputs={"o": str(seq)} if rng.random() < 0.3 else {},
                ),
            )
        elif roll < 0.82:
            kind, body = (
                "log",
                log_body(
                    wf,
                    rng.choice(("t1", "t2")),
                    f"line {seq}\n" * rng.randint(0, 3),
                    attempt=rng.randint(1, 2),
                    stream=rng.choice(("stdout", "stderr")),
                ),
            )
        elif roll < 0.92:
            kind, body = "span", span_body(seq)
        else:
            kind, body = "task", {"garbage": seq}
        out.append(EventRecord(seq=seq, kind=kind, body=body))  # type: ignore[arg-type]
    return out


def _split(rng: random.Random, recs: list[EventRecord]) -> list[list[EventRecord]]:
    batches, i = [], 0
    while i < len(recs):
        size = rng.randint(1, 6)
        batches.append(recs[i : i + size])
        i += size
    return batches


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    sizes=st.tuples(st.integers(1, 60), st.integers(1, 40)),
    max_held=st.integers(1, 30),
)
def test_any_delivery_equals_applying_once_in_order(
    seed: int, sizes: tuple[int, int], max_held: int
) -> None:
    rng = random.Random(seed)
    per_site = {
        "site-a": _random_records(rng, "site-a", sizes[0]),
        "site-b": _random_records(rng, "site-b", sizes[1]),
    }

    reference = assigned()
    ref_totals: dict[str, Counter[str]] = {}
    for site, recs in per_site.items():
        res = reference.apply_batch(site, batch(recs))
        assert res.ack_through == len(recs) and res.consumed == len(recs)
        ref_totals[site] = Counter(
            applied=res.applied, stale=res.stale, malformed=res.malformed,
            forged=res.forged, unknown=res.unknown, final=res.final,
        )  # fmt: skip
    ref_spans = reference.drain_spans()

    # What the network does: split, shuffle across sites, duplicate, hold some back.
    deliveries = [(site, b) for site, recs in per_site.items() for b in _split(rng, recs)]
    deliveries += [d for d in deliveries if rng.random() < 0.3]  # duplicated
    rng.shuffle(deliveries)
    late = [d for d in deliveries if rng.random() < 0.2]  # delayed past everything
    schedule = [d for d in deliveries if not any(d is x for x in late)] + late

    ap = assigned(Applier(max_held=max_held))
    totals: dict[str, Counter[str]] = {site: Counter() for site in per_site}
    last_ack = dict.fromkeys(per_site, 0)

    def deliver(site: str, recs: list[EventRecord]) -> ApplyResult:
        res = ap.apply_batch(site, batch(recs))
        assert res.ack_through >= last_ack[site]  # never decreases
        last_ack[site] = res.ack_through
        assert res.ack_through == ap.applied_through(site)
        assert res.held <= max_held
        if res.gap is None:
            assert res.held == 0
        if res.held:
            assert res.gap == res.ack_through + 1
        totals[site].update(
            applied=res.applied, stale=res.stale, malformed=res.malformed,
            forged=res.forged, unknown=res.unknown, final=res.final,
        )  # fmt: skip
        for what in ("held", "dropped", "duplicates", "malformed", "stale", "forged", "unknown"):
            if getattr(res, what):
                event(f"delivery had {what}")
        return res

    for site, recs in schedule:
        deliver(site, recs)
    # The site resends everything not acknowledged, in order, until all is acked.
    for site, recs in per_site.items():
        rounds = 0
        while last_ack[site] < len(recs):
            rounds += 1
            assert rounds <= len(recs) + 1
            start = last_ack[site]
            deliver(site, recs[start : start + rng.randint(1, 8)])
        assert ap.held(site) == 0
        final = ap.apply_batch(site, batch(recs[-1:]))
        assert final.gap is None and final.duplicates == 1

    for site, recs in per_site.items():
        # Every record consumed exactly once, classified as the in-order run did.
        assert sum(totals[site].values()) == len(recs)
        assert totals[site] == ref_totals[site]
    assert sorted(ap.views(), key=lambda v: v.key) == sorted(reference.views(), key=lambda v: v.key)
    for v in ap.views():
        want = reference.view(*v.key)
        assert want is not None and v.to_status() == want.to_status()
    # Every record ended applied or discarded: once the views are stored, all is acked.
    for v in ap.views():
        ap.mark_persisted(v.namespace, v.name, v.synced_seq)
    for site, recs in per_site.items():
        assert ap.ackable_through(site) == len(recs)
    spans = ap.drain_spans()
    for site in per_site:
        assert [s for s in spans if s.site == site] == [s for s in ref_spans if s.site == site]


def _lifecycle(
    rng: random.Random, wf: tuple[str, str, str], n_tasks: int, live_cap: int
) -> list[tuple[str, dict[str, Any]]]:
    """Realistic records: each task goes Pending -> Running (-> Retrying -> Running)* -> done."""
    names = [f"t{i}" for i in range(n_tasks)]
    phase = dict.fromkeys(names, "Pending")
    attempt = dict.fromkeys(names, 0)
    clock = [T0]

    def now() -> float:
        clock[0] += rng.randint(1, 5000) / 1000
        return round(clock[0] * 1000) / 1000

    def task(name: str, new: str, comp: bool = False, **kw: Any) -> tuple[str, dict[str, Any]]:
        phase[name] = new
        return ("task", task_body(wf, name, new, attempt=attempt[name], compensation=comp, **kw))

    out = [("run", run_body(wf, "Running", startedAt=now()))]
    while any(p not in ("Succeeded", "Failed", "Skipped") for p in phase.values()):
        live = [n for n in names if phase[n] in ("Running", "Retrying")]
        pending = [n for n in names if phase[n] == "Pending"]
        moves = []
        if pending and len(live) < live_cap:
            moves.append("start")
        if pending and rng.random() < 0.1:
            moves.append("skip")
        if live:
            moves += ["advance", "advance"]
        move = rng.choice(moves)
        if move == "start":
            name = rng.choice(pending)
            attempt[name] = 1
            out.append(task(name, "Running", startedAt=now()))
        elif move == "skip":
            out.append(task(rng.choice(pending), "Skipped", finishedAt=now()))
        else:
            name = rng.choice(live)
            if phase[name] == "Retrying":
                attempt[name] += 1
                out.append(task(name, "Running", startedAt=now()))
            else:
                new = rng.choice(("Succeeded", "Succeeded", "Failed", "Retrying"))
                out.append(
                    task(
                        name,
                        new,
                        finishedAt=now() if new != "Retrying" else None,
                        exitCode=0 if new == "Succeeded" else 1,
                    )
                )
                if rng.random() < 0.3:
                    out.append(("log", log_body(wf, name, f"{name} done", attempt[name])))
    failed = any(p == "Failed" for p in phase.values())
    attempt["undo"] = 1 if failed else 0
    if failed:
        out.append(task("undo", "Running", comp=True, startedAt=now()))
        out.append(task("undo", "Succeeded", comp=True, finishedAt=now()))
    else:
        out.append(task("undo", "Skipped", comp=True, finishedAt=now()))
    out.append(("run", run_body(wf, "Failed" if failed else "Succeeded", finishedAt=now())))
    return out


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_tasks=st.integers(1, 25),
    max_tasks=st.integers(2, 12),
    cut=st.floats(0, 1),
    back=st.floats(0, 1),
)
def test_restart_from_truncated_status_keeps_counts_exact(
    seed: int, n_tasks: int, max_tasks: int, cut: float, back: float
) -> None:
    rng = random.Random(seed)
    wf = WORKFLOWS["site-a"][0]
    items = _lifecycle(rng, wf, n_tasks, live_cap=max_tasks)
    recs = records(*items)
    names = [f"t{i}" for i in range(n_tasks)]

    reference = Applier()
    reference.expect("default", "wf-a", "uid-a", 1, names, compensation_names=["undo"], site=A)
    k = int(cut * len(recs))
    reference.apply_batch("site-a", recs[:k])
    view = reference.view("default", "wf-a")
    assert view is not None
    status = view.to_status(max_tasks=max_tasks)

    # Restart: the view from its status, the mark from an older ack (<= k).
    restarted = Applier()
    restarted.load(WorkflowView.from_status(status, namespace="default", name="wf-a", uid="uid-a"))
    restarted.expect("default", "wf-a", "uid-a", 1, names, compensation_names=["undo"], site=A)
    acked = int(back * k)
    restarted.restore_site("site-a", acked)
    got = restarted.view("default", "wf-a")
    assert got is not None and got.task_counts() == view.task_counts()
    event("restored from a truncated status" if got.residual else "restored in full")

    reference.apply_batch("site-a", recs[k:])
    restarted.apply_batch("site-a", recs[acked:])
    got, want = restarted.view("default", "wf-a"), reference.view("default", "wf-a")
    assert got is not None and want is not None
    assert got.task_counts() == want.task_counts()
    assert got.compensation_counts() == want.compensation_counts()
    assert got.progress == want.progress
    assert (got.phase, got.synced_seq, got.finished_at) == (
        want.phase,
        want.synced_seq,
        want.finished_at,
    )
    for name, task in got.tasks.items():
        assert task == want.tasks[name]
    g, w = got.to_status(max_tasks=max_tasks), want.to_status(max_tasks=max_tasks)
    for drop in ("tasks", "tasksTruncated"):
        g.pop(drop)
        w.pop(drop)
    assert g == w


@settings(max_examples=100, deadline=None)
@given(
    phases=st.lists(st.sampled_from(TASK_PHASES), min_size=0, max_size=30),
    max_tasks=st.integers(0, 10),
    millis=st.integers(0, 4_000_000_000_000),
    text=st.text(max_size=40),
)
def test_status_round_trip_property(
    phases: list[str], max_tasks: int, millis: int, text: str
) -> None:
    ap = Applier()
    names = [f"t{i}" for i in range(len(phases))]
    ap.expect("ns", "wf", "uid", 4, names, compensation_names=["c"], site="site-x")
    ts = millis / 1000
    items = [
        ("run", run_body(("ns", "wf", "uid"), "Running", gen=4, startedAt=ts, message=text or None))
    ]
    items += [
        (
            "task",
            task_body(
                ("ns", "wf", "uid"), n, p, gen=4, startedAt=ts, message=text, outputs={"k": text}
            ),
        )
        for n, p in zip(names, phases, strict=True)
    ]
    ap.apply_batch("site-x", batch(records(*items)))
    view = ap.view("ns", "wf")
    assert view is not None
    status = view.to_status(max_tasks=max_tasks)
    rebuilt = WorkflowView.from_status(status, namespace="ns", name="wf", uid="uid")
    assert rebuilt.to_status(max_tasks=max_tasks) == status
    assert rebuilt.task_counts() == view.task_counts()
    assert rebuilt.started_at == ts


# ------------------------------------------------------------- log tails in status
def test_the_status_carries_each_listed_tasks_log_tail() -> None:
    """``tideflow logs`` and the console read what reached the cloud from the status."""
    ap = Applier()
    ap.expect("default", "wf-a", "uid-a", 1, ["t1", "t2"], site=A)
    ap.apply_batch(
        "site-a",
        batch(
            records(
                ("task", task_body(WF, "t1", "Failed", attempt=2, exitCode=3)),
                ("log", log_body(WF, "t1", "old attempt", attempt=1)),
                ("log", log_body(WF, "t1", "x" * 5000 + "the end\n", attempt=2)),
                ("log", log_body(WF, "t1", "boom", attempt=2, stream="stderr")),
            )
        ),
    )
    view = ap.view("default", "wf-a")
    assert view is not None
    tasks = {t["name"]: t for t in view.to_status()["tasks"]}
    logs = tasks["t1"]["logs"]
    assert logs["stderr"] == "boom"
    # The tail: the end of the output, clipped from the front.
    assert logs["stdout"].endswith("the end\n")
    assert len(logs["stdout"]) <= STATUS_LOG_CHARS
    assert "logs" not in tasks["t2"]
    # An operator restart rebuilds the view from its status: the tails survive it.
    rebuilt = WorkflowView.from_status(
        view.to_status(), namespace="default", name="wf-a", uid="uid-a"
    )
    assert rebuilt.to_status() == view.to_status()
    assert rebuilt.log_tail("t1") == logs


def test_log_tails_never_crowd_tasks_out_of_a_capped_status() -> None:
    ap, names = _big_workflow(2000)  # 1,800 task records, seqs 1..1800
    logs = [("log", log_body(WF, name, "y" * 4000)) for name in names]
    ap.apply_batch("site-a", batch(records(*logs, start=1801)))
    view = ap.view("default", "wf-a")
    assert view is not None
    full = view.to_status()  # the byte cap is reached by tasks alone
    few = view.to_status(max_tasks=20)  # room left: every listed task gets its tail
    assert len(json.dumps(full).encode()) < 256 * 1024
    assert len(few["tasks"]) == 20 and all(len(t["logs"]["stdout"]) == 1024 for t in few["tasks"])
    tails = dict(view.logs)
    view.logs.clear()
    assert [t["name"] for t in view.to_status()["tasks"]] == [t["name"] for t in full["tasks"]]
    assert [t["name"] for t in view.to_status(max_tasks=20)["tasks"]] == [
        t["name"] for t in few["tasks"]
    ]
    view.logs.update(tails)


def test_every_status_the_applier_renders_is_the_contracts_workflow_status() -> None:
    """The CRD's status schema and what the operator writes come from one model."""
    from tideflow.crd import WorkflowStatus

    ap, names = _big_workflow(300)
    ap.apply_batch("site-a", batch(records(("log", log_body(WF, names[0], "hi")), start=271)))
    view = ap.view("default", "wf-a")
    assert view is not None
    for status in (view.to_status(), view.to_status(max_tasks=5)):
        # The operator adds these beside the applier's rendering (status.py).
        status |= {"siteConnected": True, "traceId": "ab" * 16, "conditions": []}
        parsed = WorkflowStatus.model_validate(status)
        assert parsed.model_extra == {}, f"not in the model: {sorted(parsed.model_extra or {})}"
        for task in parsed.tasks or []:
            assert task.model_extra == {}, f"not in the model: {sorted(task.model_extra or {})}"
        assert parsed.model_dump(by_alias=True, mode="json", exclude_unset=True).keys() == (
            status.keys()
        )


def _without_short_runnings(
    rng: random.Random, items: list[tuple[str, dict[str, Any]]]
) -> list[tuple[str, dict[str, Any]]]:
    """Leave out the Running record of some attempts whose outcome is that task's next
    record, as the agent does for an attempt that ends within 20 ms (decision 0042)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for i, (kind, body) in enumerate(items):
        if kind == "task" and body["phase"] == "Running" and rng.random() < 0.5:
            after = next(
                (b for k, b in items[i + 1 :] if k == "task" and b["task"] == body["task"]), None
            )
            if after is not None and after["attempt"] == body["attempt"]:
                continue
        out.append((kind, body))
    return out


def test_a_task_that_goes_from_pending_straight_to_its_outcome_after_a_restart() -> None:
    """Decision 0042: a short attempt reports its outcome alone.  After an operator
    restart from a truncated status, an unlisted Pending task that now reports
    Succeeded was Pending, not one of the unlisted Succeeded ones (they report
    nothing new): the counts stay exact, and no Pending is left at the end."""
    names = [f"t{i}" for i in range(6)]
    items = [("run", run_body(WF, "Running", startedAt=T0))]
    for i, name in enumerate(names):
        done = {"startedAt": T0 + i, "finishedAt": T0 + i + 0.01, "exitCode": 0}
        items.append(("task", task_body(WF, name, "Succeeded", **done)))
    items.append(("run", run_body(WF, "Succeeded", startedAt=T0, finishedAt=T0 + 9)))
    recs = records(*items)
    reference = Applier()
    reference.expect("default", "wf-a", "uid-a", 1, names, site=A)
    reference.apply_batch("site-a", batch(recs[:3]))  # t0 and t1 Succeeded
    view = reference.view("default", "wf-a")
    assert view is not None
    status = view.to_status(max_tasks=1)  # one of them listed, the other a count
    restarted = Applier()
    restarted.load(WorkflowView.from_status(status, namespace="default", name="wf-a", uid="uid-a"))
    restarted.expect("default", "wf-a", "uid-a", 1, names, site=A)
    restarted.restore_site("site-a", 3)
    reference.apply_batch("site-a", batch(recs[3:]))
    restarted.apply_batch("site-a", batch(recs[3:]))
    got, want = restarted.view("default", "wf-a"), reference.view("default", "wf-a")
    assert got is not None and want is not None
    assert want.task_counts()["Succeeded"] == 6
    assert got.task_counts() == want.task_counts()
    assert got.progress == want.progress == "6/6"


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_tasks=st.integers(1, 25),
    max_tasks=st.integers(2, 12),
    cut=st.floats(0, 1),
    back=st.floats(0, 1),
)
def test_restart_from_truncated_status_keeps_counts_exact_without_short_runnings(
    seed: int, n_tasks: int, max_tasks: int, cut: float, back: float
) -> None:
    """As test_restart_from_truncated_status_keeps_counts_exact, with the records a
    site sends since decision 0042: some attempts' outcomes come without their Running."""
    rng = random.Random(seed)
    wf = WORKFLOWS["site-a"][0]
    recs = records(*_without_short_runnings(rng, _lifecycle(rng, wf, n_tasks, max_tasks)))
    names = [f"t{i}" for i in range(n_tasks)]
    reference = Applier()
    reference.expect("default", "wf-a", "uid-a", 1, names, compensation_names=["undo"], site=A)
    k = int(cut * len(recs))
    reference.apply_batch("site-a", recs[:k])
    view = reference.view("default", "wf-a")
    assert view is not None
    status = view.to_status(max_tasks=max_tasks)
    restarted = Applier()
    restarted.load(WorkflowView.from_status(status, namespace="default", name="wf-a", uid="uid-a"))
    restarted.expect("default", "wf-a", "uid-a", 1, names, compensation_names=["undo"], site=A)
    acked = int(back * k)
    restarted.restore_site("site-a", acked)
    reference.apply_batch("site-a", recs[k:])
    restarted.apply_batch("site-a", recs[acked:])
    got, want = restarted.view("default", "wf-a"), reference.view("default", "wf-a")
    assert got is not None and want is not None
    assert got.task_counts() == want.task_counts()
    assert got.compensation_counts() == want.compensation_counts()
    assert got.progress == want.progress
