"""The operator's CronWorkflow delivery plan against a replayed withdrawal (round 19).

Pure: no API server, no broker.  A site drops a schedule on any ``withdraw``
naming its uid, whatever the generation (the operator withdraws a deleted
CronWorkflow it no longer knows with generation 1), so a withdrawal delivered
again after the schedule was put back (a QoS 1 duplicate after a reconnect, a
replay on the site's topic) leaves the site without a schedule the cloud still
places there.  The site says so (its ``schedule`` record, state Withdrawn); the
plan took that only as the settlement of a pending withdrawal, and otherwise
ignored it: the site fired nothing more until the CronWorkflow was edited or
the operator restarted.
"""

from __future__ import annotations

from test_cron_plan import cron, record, summary

from tideflow_operator.cron import CronPlan


def test_a_withdrawn_record_for_a_schedule_still_placed_there_puts_it_back() -> None:
    plan = CronPlan()
    plan.site_changed("a", {"region": "north"})
    plan.site_changed("b", {"region": "north"})
    plan.upsert(cron(generation=2))
    assert plan.confirm("a", record("u-1", "Held", generation=2))
    assert plan.confirm("b", record("u-1", "Held", generation=2))
    assert plan.unconfirmed() == []
    # A withdrawal replayed to site a: it drops the schedule and reports it.
    assert not plan.confirm("a", record("u-1", "Withdrawn", generation=2))
    assert summary(plan.unconfirmed()) == [("a", "put", 2)]
    assert plan.confirm("a", record("u-1", "Held", generation=2))
    assert plan.unconfirmed() == []


def test_a_withdrawn_record_for_a_schedule_not_placed_there_changes_nothing() -> None:
    plan = CronPlan()
    plan.site_changed("a", {"region": "north"})
    plan.site_changed("c", {"region": "south"})
    plan.upsert(cron())
    assert plan.confirm("a", record("u-1", "Held"))
    # Site c never had it (or an old withdrawal settled already): nothing to put back.
    assert not plan.confirm("c", record("u-1", "Withdrawn"))
    assert not plan.confirm("c", record("u-gone", "Withdrawn"))
    assert plan.unconfirmed() == []
    # Unmatched, then withdrawn and confirmed: settled, and not put back.
    assert summary(plan.site_changed("a", {"region": "east"})) == [("a", "withdraw", 1)]
    assert plan.confirm("a", record("u-1", "Withdrawn"))
    assert not plan.confirm("a", record("u-1", "Withdrawn"))
    assert plan.unconfirmed() == []
