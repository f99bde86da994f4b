"""ttlSecondsAfterFinished: the spec field, what a site is sent, and the operator's timers.

The deletions themselves against a real API server: tests/e2e/test_ttl.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tideflow import wire
from tideflow.spec import SpecError, parse_cron_spec, parse_spec, site_spec
from tideflow_operator import cli
from tideflow_operator.bridge import BridgeConfig, CloudBridge
from tideflow_operator.ledger import spec_digest
from tideflow_operator.ttl import Reaper, due_at, ttl_of

TASKS = [{"name": "a", "command": ["true"]}]


def body(
    phase: str | None = "Succeeded",
    ttl: int | None = None,
    finished: str | None = "2026-01-01T00:00:10Z",
    **meta: Any,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"tasks": TASKS}
    if ttl is not None:
        spec["ttlSecondsAfterFinished"] = ttl
    return {
        "metadata": {"namespace": "ns", "name": "wf", "uid": "u1", **meta},
        "spec": spec,
        "status": {"phase": phase, "finishedAt": finished},
    }


FINISHED_AT = 1767225610.0  # 2026-01-01T00:00:10Z


def test_the_field_is_validated_and_named() -> None:
    spec = parse_spec({"tasks": TASKS, "ttlSecondsAfterFinished": 0})
    assert spec.ttl_seconds_after_finished == 0
    with pytest.raises(SpecError) as err:
        parse_spec({"tasks": TASKS, "ttlSecondsAfterFinished": -1})
    assert "ttlSecondsAfterFinished" in str(err.value)


def test_a_cron_template_refuses_it_naming_the_history_limits() -> None:
    with pytest.raises(SpecError) as err:
        parse_cron_spec(
            {
                "schedule": "@every 1h",
                "placement": {"site": "s"},
                "workflowSpec": {"tasks": TASKS, "ttlSecondsAfterFinished": 5},
            }
        )
    assert "ttlSecondsAfterFinished" in str(err.value)
    assert "HistoryLimit" in str(err.value)


def test_a_site_is_sent_the_spec_without_it_and_the_digest_ignores_it() -> None:
    spec = {"tasks": TASKS, "ttlSecondsAfterFinished": 30}
    assert site_spec(spec) == {"tasks": TASKS}
    assert spec_digest(spec) == spec_digest({"tasks": TASKS})
    # What an agent (of any version) parses: the field never reaches it.
    bridge = CloudBridge(BridgeConfig(broker="mqtt://127.0.0.1:1"))
    payload = wire.AssignPayload(uid="u1", generation=1, namespace="ns", name="wf", spec=spec)
    bridge.assign("site-a", payload)
    sent = bridge.unconfirmed_assignment("site-a", "u1")
    assert sent is not None and sent["spec"] == {"tasks": TASKS}
    bridge.remember("site-a", payload)
    (held,) = bridge._site("site-a").held.values()
    assert json.loads(held)["payload"]["spec"] == {"tasks": TASKS}


def test_which_ttl_applies() -> None:
    assert ttl_of(body(ttl=5), default=100) == 5
    assert ttl_of(body(), default=100) == 100
    assert ttl_of(body(), default=None) is None
    fired = body(ttl=5, labels={"tideflow.io/cron-workflow": "nightly"})
    assert ttl_of(fired, default=100) is None  # kept by the CronWorkflow's history limits


def test_due_only_once_finished_from_finished_at() -> None:
    assert due_at(body(ttl=5), None, seen_finished=0.0) == FINISHED_AT + 5
    assert due_at(body(phase="Running", ttl=5), None, 0.0) is None
    assert due_at(body(phase="Assigned"), 7, 0.0) is None
    # A run the cloud ended (deadline) may carry no finishedAt: timed from when it was seen.
    assert due_at(body(phase="Failed", ttl=5, finished=None), None, seen_finished=42.0) == 47.0
    for phase in ("Succeeded", "Failed", "Cancelled"):
        assert due_at(body(phase=phase), 1, 0.0) == FINISHED_AT + 1


class FakeKube:
    def __init__(self) -> None:
        self.deleted: list[tuple[str, str, str]] = []
        self.fail = 0

    async def delete_workflow(self, namespace: str, name: str, uid: str) -> bool:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("API server away")
        self.deleted.append((namespace, name, uid))
        return True


async def settle(kube: FakeKube, count: int) -> None:
    async with asyncio.timeout(5):
        while len(kube.deleted) < count:
            await asyncio.sleep(0.01)


async def test_the_reaper_deletes_when_due_and_names_the_uid() -> None:
    kube = FakeKube()
    now = [FINISHED_AT + 100.0]
    reaper = Reaper(kube, default=None, clock=lambda: now[0])
    reaper.observe("MODIFIED", body(ttl=10))  # due 90 s ago
    await settle(kube, 1)
    assert kube.deleted == [("ns", "wf", "u1")]
    assert reaper.deleted == 1 and reaper.pending() == {}


async def test_the_reaper_rearms_on_a_changed_ttl_and_drops_on_delete() -> None:
    kube = FakeKube()
    reaper = Reaper(kube, default=None, clock=lambda: FINISHED_AT)
    reaper.observe("MODIFIED", body(ttl=3600))
    assert reaper.pending() == {("ns", "wf"): FINISHED_AT + 3600}
    reaper.observe("MODIFIED", body(ttl=7200))
    assert reaper.pending() == {("ns", "wf"): FINISHED_AT + 7200}
    reaper.observe("MODIFIED", body(phase="Running", ttl=7200))  # not finished (yet)
    assert reaper.pending() == {}
    reaper.observe("MODIFIED", body(ttl=60))
    reaper.observe("DELETED", body(ttl=60))
    assert reaper.pending() == {}
    reaper.observe("MODIFIED", body())  # no TTL, no default: kept
    assert reaper.pending() == {}
    await reaper.stop()
    assert kube.deleted == []


async def test_a_failed_delete_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube()
    kube.fail = 1
    loop = asyncio.get_running_loop()
    real_call_later = loop.call_later
    # The retry waits 10 s in production; here at once.
    monkeypatch.setattr(loop, "call_later", lambda delay, *a: real_call_later(0, *a))
    reaper = Reaper(kube, default=0, clock=lambda: FINISHED_AT + 1)
    reaper.observe("ADDED", body())
    await settle(kube, 1)
    assert kube.deleted == [("ns", "wf", "u1")]


def test_the_default_comes_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TIDEFLOW_TTL_SECONDS_AFTER_FINISHED", raising=False)
    args = cli.build_parser().parse_args(["run", "--broker", "x"])
    assert args.ttl_seconds_after_finished is None
    args = cli.build_parser().parse_args(
        ["run", "--broker", "x", "--ttl-seconds-after-finished", "3600"]
    )
    assert args.ttl_seconds_after_finished == 3600
    monkeypatch.setenv("TIDEFLOW_TTL_SECONDS_AFTER_FINISHED", "120")
    assert cli.build_parser().parse_args(["run", "--broker", "x"]).ttl_seconds_after_finished == 120
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(
            ["run", "--broker", "x", "--ttl-seconds-after-finished", "-1"]
        )
