"""A compromised site's schedule records against the operator's cron plan (round 20c).

A site's ``schedule`` record names a CronWorkflow by uid, any uid the site
likes (bounded in length only).  The plan kept every (site, uid) a record
named, for ever, and read it nowhere: a site sending records with new uids
grew the operator's memory without bound.  A clock-step report for a
CronWorkflow not placed at the site moves nothing.
"""

from __future__ import annotations

from tideflow import wire
from tideflow_operator.cron import CronPlan, CronRuntime


def _record(uid: str, **extra: object) -> wire.ScheduleRecord:
    return wire.ScheduleRecord.model_validate(
        {"uid": uid, "generation": 1, "namespace": "ns", "name": "etl", "state": "Held", **extra}
    )


def _cron(site: str) -> dict[str, object]:
    return {
        "apiVersion": "tideflow.io/v1alpha1",
        "kind": "CronWorkflow",
        "metadata": {"name": "etl", "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": {
            "schedule": "@every 10s",
            "placement": {"site": site},
            "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]},
        },
    }


def test_records_naming_new_uids_keep_nothing_in_the_plan() -> None:
    plan = CronPlan()
    plan.loaded = True
    for i in range(20_000):
        assert plan.confirm("a", _record(f"forged-{i:06d}-" + "x" * 60)) is False
    kept = {
        name: len(value)
        for name, value in vars(plan).items()
        if isinstance(value, dict | set | list)
    }
    assert max(kept.values()) == 0, kept


def test_a_step_report_for_a_schedule_placed_elsewhere_moves_nothing() -> None:
    cron = CronRuntime()
    cron.plan.upsert(_cron("b"))
    cron.plan.clock = lambda: 1_800_000_000.0
    cron.observe("ns", "etl", "b", "etl-b-1", 1_800_000_300.0, "Running")
    before = repr(cron.seen)
    report = _record("u-1", lastScheduledTime=1_800_000_000.0, clockSteppedBackFrom=1_800_000_300.0)
    cron.clock_stepped_back("a", report)  # site a: not where it is placed
    assert repr(cron.seen) == before and not cron.notices
