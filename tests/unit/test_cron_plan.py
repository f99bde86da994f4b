"""The operator's CronWorkflow delivery plan: fan-out, withdrawal, resend until confirmed.

Pure: no API server, no broker (the kopf handlers in operator/cron.py feed it).
"""

from __future__ import annotations

from typing import Any

import pytest

from tideflow import wire
from tideflow.spec import SpecError
from tideflow_operator.cron import CronPlan, Send


def cron(
    *, generation: int = 1, placement: dict[str, Any] | None = None, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "CronWorkflow",
        "metadata": {"name": "etl", "namespace": "plant-7", "uid": "u-1", "generation": generation},
        "spec": {
            "schedule": "0 2 * * *",
            "placement": placement or {"siteSelector": {"matchLabels": {"region": "north"}}},
            "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]},
            **spec,
        },
    }


def summary(sends: list[Send]) -> list[tuple[str, str, int]]:
    return [(s.site, s.payload.action, s.payload.generation) for s in sends]


def record(uid: str, state: str, generation: int = 1) -> wire.ScheduleRecord:
    return wire.ScheduleRecord(
        uid=uid, generation=generation, namespace="plant-7", name="etl", state=state
    )


@pytest.fixture
def plan() -> CronPlan:
    p = CronPlan()
    p.site_changed("a", {"region": "north"})
    p.site_changed("b", {"region": "north", "tier": "1"})
    p.site_changed("c", {"region": "south"})
    return p


def test_a_selector_fans_out_to_matching_sites_only(plan: CronPlan) -> None:
    assert summary(plan.upsert(cron())) == [("a", "put", 1), ("b", "put", 1)]
    assert plan.targets("u-1") == {"a", "b"}
    # The message carries the whole spec, valid for the site's own parser.
    (first, _) = plan.unconfirmed()
    assert first.payload.spec is not None and first.payload.spec["schedule"] == "0 2 * * *"
    decoded = wire.decode(wire.topic("a", wire.ASSIGN), first.encode())
    assert isinstance(decoded[1], wire.SchedulePayload)


def test_relabelling_adds_and_removes_sites(plan: CronPlan) -> None:
    plan.upsert(cron())
    assert summary(plan.site_changed("c", {"region": "north"})) == [("c", "put", 1)]
    assert summary(plan.site_changed("a", {"region": "east"})) == [("a", "withdraw", 1)]
    assert summary(plan.site_changed("d", {"region": "north"})) == [("d", "put", 1)]
    assert summary(plan.site_changed("b", None)) == [("b", "withdraw", 1)]
    assert plan.targets("u-1") == {"c", "d"}


def test_delete_withdraws_everywhere_it_was_sent(plan: CronPlan) -> None:
    plan.upsert(cron())
    assert summary(plan.remove("u-1")) == [("a", "withdraw", 1), ("b", "withdraw", 1)]
    assert plan.remove("u-1") == []


def test_unconfirmed_messages_stay_until_the_site_confirms(plan: CronPlan) -> None:
    plan.upsert(cron())
    assert summary(plan.unconfirmed("a")) == [("a", "put", 1)]
    assert plan.confirm("a", record("u-1", "Held"))
    assert plan.unconfirmed("a") == []
    assert summary(plan.unconfirmed()) == [("b", "put", 1)]
    # An offline site's withdrawal waits for its confirmation, however long.
    plan.remove("u-1")
    assert summary(plan.unconfirmed("b")) == [("b", "withdraw", 1)]
    assert not plan.confirm("b", record("u-1", "Held"))  # an old confirmation of the put
    assert summary(plan.unconfirmed("b")) == [("b", "withdraw", 1)]
    assert plan.confirm("b", record("u-1", "Withdrawn"))
    assert summary(plan.unconfirmed()) == [("a", "withdraw", 1)]


def test_an_edit_is_a_new_put_and_an_old_confirmation_does_not_settle_it(
    plan: CronPlan,
) -> None:
    plan.upsert(cron())
    plan.confirm("a", record("u-1", "Held"))
    assert summary(plan.upsert(cron(generation=2, suspend=True))) == [
        ("a", "put", 2),
        ("b", "put", 2),
    ]
    assert not plan.confirm("a", record("u-1", "Held", generation=1))
    assert plan.confirm("a", record("u-1", "Held", generation=2))
    # The same generation seen again (a resync) sends nothing new.
    assert plan.upsert(cron(generation=2, suspend=True)) == []
    # An older generation arriving late changes nothing.
    assert plan.upsert(cron(generation=1)) == []


def test_explicit_site_needs_no_edgesite_and_invalid_specs_are_refused() -> None:
    plan = CronPlan()
    assert summary(plan.upsert(cron(placement={"site": "line-2"}))) == [("line-2", "put", 1)]
    with pytest.raises(SpecError, match=r"spec\.schedule"):
        plan.upsert(cron(schedule="0 2 * *"))


def test_what_a_site_holds_but_should_not_is_withdrawn_once_the_plan_is_loaded(
    plan: CronPlan,
) -> None:
    plan.upsert(cron())
    for site in ("a", "b"):
        plan.confirm(site, record("u-1", "Held"))
    # Before the operator knows every CronWorkflow, nothing is judged stale.
    assert plan.stale("a", ["u-1", "gone"]) == []
    plan.loaded = True
    # A schedule deleted while the operator was down: withdrawn (the site reports its names).
    assert summary(plan.stale("a", ["u-1", "gone"])) == [("a", "withdraw", 1)]
    assert plan.unconfirmed("a")[0].payload.uid == "gone"
    # Not queued twice while unconfirmed; settled by the site's Withdrawn.
    assert plan.stale("a", ["u-1", "gone"]) == []
    assert plan.confirm("a", record("gone", "Withdrawn"))
    # A site the selector no longer matches, found holding it: withdrawn too.
    plan.sites["c"] = {"region": "south"}
    assert summary(plan.stale("c", ["u-1"])) == [("c", "withdraw", 1)]
    # What the site should hold stays.
    assert plan.stale("b", ["u-1"]) == []


def test_a_restarted_operator_keeps_the_sites_it_has_not_seen_fire_yet() -> None:
    """The first status write after a restart must not blank the quiet sites."""
    from datetime import UTC, datetime

    from tideflow_operator.cron import CronRuntime

    cr = CronRuntime()
    key = ("plant-7", "nightly")
    yesterday, today = "2026-11-29T02:00:00Z", "2026-11-30T02:00:00Z"
    written = {
        "sites": [
            {"site": "a", "lastScheduleTime": yesterday, "lastSuccessfulTime": yesterday},
            {"site": "b", "lastScheduleTime": yesterday, "lastSuccessfulTime": None},
        ]
    }
    cr.seed(key, written)
    at = datetime(2026, 11, 30, 2, 0, tzinfo=UTC).timestamp()
    cr.observe("plant-7", "nightly", "a", "nightly-a-1", at, "Running")
    status = {entry["site"]: entry for entry in cr.status(key)["sites"]}
    assert (status["b"]["lastScheduleTime"], status["b"]["lastSuccessfulTime"]) == (
        yesterday,
        None,
    )
    assert (status["a"]["lastScheduleTime"], status["a"]["lastSuccessfulTime"]) == (
        today,
        yesterday,
    )
    assert status["a"]["active"] == 1
    cr.seed(key, {"sites": [{"site": "a", "lastScheduleTime": None}]})  # never over what it saw
    assert {e["site"]: e for e in cr.status(key)["sites"]}["a"]["lastScheduleTime"] == today


def test_a_shard_writes_its_own_sites_and_keeps_the_others_as_written() -> None:
    """Sharded: the other shard's sites come from the status as read, even when
    that status was hand-edited into nonsense (types a shard never writes)."""
    from datetime import UTC, datetime

    from tideflow_operator.cron import CronRuntime

    cr = CronRuntime()
    cr.plan.site_changed("a", {"region": "north"})
    cr.plan.site_changed("b", {"region": "north"})
    cr.plan.site_changed("c", {"region": "north"})
    cr.plan.upsert(cron())
    key = ("plant-7", "etl")
    at = datetime(2026, 11, 30, 2, 0, tzinfo=UTC).timestamp()
    cr.observe("plant-7", "etl", "a", "etl-a-1", at, "Running")
    cr.observe("plant-7", "etl", "b", "etl-b-1", at, "Running")  # b is not ours: ignored
    later = "2026-11-30T03:00:00Z"
    written = {
        "sites": [
            {"site": "a", "lastScheduleTime": "1999-01-01T00:00:00Z", "active": 9},
            {"site": "b", "lastScheduleTime": later, "lastSuccessfulTime": later, "active": 2,
             "activeRuns": ["etl-b-2", "etl-b-3"]},
            {"site": "c", "lastScheduleTime": "not a time", "active": "many",
             "activeRuns": {"x": 1}, "extra": "field"},
            "not an entry",
        ]
    }  # fmt: skip
    status = cr.status(key, written=written, owns=lambda site: site == "a")
    sites = {entry["site"]: entry for entry in status["sites"]}
    assert sites["a"]["lastScheduleTime"] == "2026-11-30T02:00:00Z", "its own, not as written"
    assert sites["a"]["active"] == 1
    assert sites["b"] == written["sites"][1], "the other shard's site, as written"  # type: ignore[index]
    assert sites["c"] == {
        "site": "c", "lastScheduleTime": None, "lastSuccessfulTime": None, "active": 0,
        "activeRuns": [],
    }, "nonsense is not copied"  # fmt: skip
    assert status["siteCount"] == 3 and status["active"] == 3
    assert status["lastScheduleTime"] == later


@pytest.mark.parametrize(
    "status",
    [
        "not an object",
        {"sites": 5},
        {"sites": [{"site": "a", "lastScheduleTime": "yesterday"}]},
        {"sites": [{"site": "a", "lastSuccessfulTime": True}]},
        {"sites": [{"site": "a", "lastScheduleTime": 1e300}]},
        {"sites": [{"site": "a", "lastScheduleTime": float("nan")}]},
        {"sites": [{"site": "a", "lastScheduleTime": "0001-01-01T00:00:00+01:00"}]},
        {"sites": [{"site": "a", "lastSuccessfulTime": "9999-12-31T23:59:59-14:00"}]},
    ],
)
def test_a_hand_edited_status_neither_stops_the_start_nor_the_status_writes(
    status: Any,
) -> None:
    """``status`` is anyone's to edit (kubectl --subresource=status; the CRD keeps
    unknown fields): a time that does not parse, or out of range, raised in
    ``seed`` — at start-up that left the plan unloaded (a deleted CronWorkflow never
    withdrawn from its sites), from the event handler the CronWorkflow never placed —
    and out of range in the sharded merge, every later status write failed."""
    from tideflow_operator.cron import CronRuntime

    cr = CronRuntime()
    cr.plan.site_changed("a", {"region": "north"})
    cr.plan.site_changed("b", {"region": "north"})
    cr.plan.upsert(cron())
    key = ("plant-7", "etl")
    cr.seed(key, status)
    for owns in (None, lambda site: site == "b"):
        result = cr.status(key, written=status, owns=owns)
        entry = {e["site"]: e for e in result["sites"]}["a"]
        assert entry["lastScheduleTime"] is None and entry["lastSuccessfulTime"] is None


def test_a_site_reporting_a_schedule_uid_no_withdrawal_can_carry_stops_no_other_site() -> None:
    """A state message's ``schedules`` may list any string: a uid over the 128
    characters a withdrawal carries raised in ``stale`` and stopped the delivery step
    for every site, every poll (no re-send of other sites' schedules, and fired runs
    never made into Workflows, which holds their sites' acks back)."""
    from tideflow.mqtt import BrokerConnection
    from tideflow_operator.bridge import BridgeConfig, CloudBridge
    from tideflow_operator.cron import CronRuntime

    bridge = CloudBridge(BridgeConfig(BrokerConnection("mqtt://127.0.0.1:1")))
    cr = CronRuntime()
    cr.bridge = bridge
    cr.plan.loaded = True
    cr.plan.site_changed("b", {"region": "north"})
    cr.plan.upsert(cron())
    assert cr.plan.unconfirmed("b")
    for site, held in (("a", ["x" * 200, "u-gone"]), ("b", [])):
        # (The wire now refuses such a uid too; stale() must still not raise on one.)
        state = wire.StatePayload.model_construct(online=True, schedules=held)
        bridge.presence.observe(site, state, sent_at=1.0)
    cr.step()
    assert "b" in cr.last_resend, "b's unconfirmed put is re-sent"
    assert [s.payload.uid for s in cr.plan.unconfirmed("a")] == ["u-gone"]


# ---------------------------------------------------------------- fired runs' times
CREATED = 1_764_460_800.0  # 2025-11-30T00:00:00Z, the CronWorkflow's creationTimestamp
NOW = CREATED + 86_400.0  # the operator's clock in these tests: a day later


def fired(at: float, *, site: str = "a", generation: int = 1, uid: str = "u-1") -> wire.RunRecord:
    """A run record as a site reports a fire of ``etl`` at ``at`` (name and uid derived)."""
    from datetime import UTC, datetime

    from tideflow.schedule import run_name, run_uid

    when = datetime.fromtimestamp(at, UTC)
    return wire.RunRecord.model_validate(
        {"uid": run_uid(uid, generation, when), "generation": 1, "namespace": "plant-7",
         "name": run_name("etl", site, when), "phase": "Running",
         "cron": {"uid": uid, "name": "etl", "generation": generation, "scheduledTime": at}}
    )  # fmt: skip


def timed_plan(**spec: Any) -> CronPlan:
    plan = CronPlan(clock=lambda: NOW)
    plan.site_changed("a", {"region": "north"})
    body = cron(**spec)
    body["metadata"]["creationTimestamp"] = "2025-11-30T00:00:00Z"
    plan.upsert(body)
    return plan


def test_a_fired_run_is_taken_only_at_a_time_its_schedule_produces() -> None:
    """A site could report a run fired at any time (12:34:56.789 for '*/5 * * * *', a
    year ahead, before the CronWorkflow existed) and the operator made it a Workflow."""
    from tideflow_operator.applier import FiredRunRefused

    plan = timed_plan(schedule="*/5 * * * *")
    assert plan.accepts("a", fired(NOW - 300))  # 23:55 the day before: a fire time
    assert plan.accepts("a", fired(NOW + 300))  # a site clock a little ahead
    off = CREATED + 12 * 3600 + 34 * 60 + 56.789
    for at, why in [
        (off, "not a time"),
        (float(int(off)), "not a time"),
        (NOW + 86_400 * 365, "in the future"),
        (CREATED - 86_400, "before the CronWorkflow"),
    ]:
        with pytest.raises(FiredRunRefused, match=r"cron\.scheduledTime") as refused:
            plan.accepts("a", fired(at))
        assert why in str(refused.value), (at, str(refused.value))


def test_a_refusal_for_a_site_whose_clock_runs_ahead_names_its_measured_skew() -> None:
    """A genuine fire from a site whose clock is 20 minutes fast is refused (its
    ``sentAt`` cannot be trusted to widen the window: a forging site could send one
    heartbeat from the future first).  The warning said only "in the future", and
    the user was left to guess why; it now says how far the site's clock reads off
    ours, as presence measured it, and what to do."""
    from tideflow_operator.applier import FiredRunRefused

    plan = timed_plan(schedule="*/5 * * * *")
    plan.site_skew = {"a": 1200.4}.get
    with pytest.raises(FiredRunRefused, match="in the future") as refused:
        plan.accepts("a", fired(NOW + 900))
    assert "site a's clock reads 1200 s ahead of the operator's" in str(refused.value)
    assert "NTP" in str(refused.value)

    plan.site_skew = {"a": 3.0}.get  # a site on time: nothing to blame on its clock
    with pytest.raises(FiredRunRefused) as refused:
        plan.accepts("a", fired(NOW + 900))
    assert "clock reads" not in str(refused.value)


def test_a_fired_runs_time_is_judged_in_the_schedules_time_zone() -> None:
    from tideflow_operator.applier import FiredRunRefused

    plan = timed_plan(schedule="0 2 * * *", timezone="Europe/Berlin")
    # 2025-11-30 02:00 in Berlin (UTC+1) is 01:00 UTC; 02:00 UTC is no fire of it.
    assert plan.accepts("a", fired(CREATED + 3600))
    with pytest.raises(FiredRunRefused, match="not a time"):
        plan.accepts("a", fired(CREATED + 7200))


def test_a_run_fired_by_an_earlier_generation_is_judged_by_that_generations_schedule() -> None:
    """An edit while the site was offline: its run of the old schedule is still real."""
    from tideflow_operator.applier import FiredRunRefused

    plan = timed_plan(schedule="0 2 * * *")
    body = cron(generation=2, schedule="30 3 * * *")
    body["metadata"]["creationTimestamp"] = "2025-11-30T00:00:00Z"
    plan.upsert(body)
    assert plan.accepts("a", fired(CREATED + 7200, generation=1))
    assert plan.accepts("a", fired(CREATED + 3 * 3600 + 1800, generation=2))
    with pytest.raises(FiredRunRefused, match="not a time"):
        plan.accepts("a", fired(CREATED + 7200, generation=2))


def test_a_run_of_a_generation_a_restarted_operator_never_saw_is_not_refused() -> None:
    """The plan keeps each generation's schedule in memory only.  Edited while the
    site was offline, then the operator restarted: the old generation's runs, real,
    were judged by the new schedule and refused (their records acked and dropped).
    Without that generation's schedule only the time window is checked."""
    from tideflow_operator.applier import FiredRunRefused

    restarted = timed_plan(schedule="30 3 * * *", generation=2)  # knows generation 2 only
    assert restarted.accepts("a", fired(CREATED + 7200, generation=1))  # 02:00, old schedule
    with pytest.raises(FiredRunRefused, match="in the future"):
        restarted.accepts("a", fired(NOW + 86_400 * 365, generation=1))
    with pytest.raises(FiredRunRefused, match="not a time"):  # a known generation still is
        restarted.accepts("a", fired(CREATED + 7200, generation=2))


def test_a_sites_refusal_message_reaches_the_log_bounded(
    plan: CronPlan, caplog: pytest.LogCaptureFixture
) -> None:
    """A site's Rejected schedule record carried a message of any length, logged whole
    (and with its own newlines: a forged log line)."""
    import logging

    plan.upsert(cron())
    message = "no\n2026-01-01 ERROR forged" + "x" * 100_000
    refused = wire.ScheduleRecord(
        uid="u-1", generation=1, namespace="plant-7", name="etl", state="Rejected",
        message=message,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert plan.confirm("a", refused)
    (line,) = [r.getMessage() for r in caplog.records if "refused schedule" in r.getMessage()]
    assert len(line) < 500 and "\n" not in line and "no\\n2026" in line, line[:600]
