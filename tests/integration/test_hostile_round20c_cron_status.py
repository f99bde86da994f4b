"""A site's clock-step reports and a CronWorkflow's status, attacked (round 20c).

Decision 0049 lets a site's ``schedule`` record carry ``clockSteppedBackFrom``:
the operator moves that site's ``lastScheduleTime`` back, keeps the mark in
the site's status entry and posts a ``ClockSteppedBack`` Warning Event.  Here
a compromised or buggy site, and a user who deletes and recreates a
CronWorkflow, go at it.  Real API server (envtest); the site's records go
through the operator's real applier (seqs, exactly once).  Proves:

* a mark or moved mark that is no time the status can show (1e300, -1e300,
  year 10000) is refused with a log line naming the field; nothing of it is
  kept, and the CronWorkflow's status is still written (the mark was kept
  before it was rendered, and every later status write raised);
* a mark far ahead (year 9999) is kept only as far as a run could be taken
  (the operator's clock plus the fired-run window): it no longer pins the
  site's entry, and keeps runs of a slightly fast clock from counting, for
  ever;
* a flood of step reports (a thousand in a batch, each with other times)
  posts one Event per CronWorkflow and site, not one each;
* a CronWorkflow deleted and made again under its name starts with a blank
  status: the old one's times, active runs and clock step are not shown on
  the new one.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client
from services.kube import EnvtestCluster
from services.world import install_crds
from test_hostile_round20_cron_status import NAMESPACE, SITE, NoPresence, stepped_back

from tideflow_operator.applier import Applier
from tideflow_operator.cron import (
    CRONWORKFLOWS,
    FIRE_SKEW_SECONDS,
    CronRuntime,
    _rfc3339,
    materialize,
)
from tideflow_operator.kube import GROUP, VERSION, Kube

pytestmark = pytest.mark.envtest


class World:
    """One CronWorkflow placed on SITE, and the operator's cron side around it."""

    def __init__(self, api: Any, name: str) -> None:
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.name = name
        self.applier = Applier()
        self.cron = CronRuntime()
        self.rt: Any = SimpleNamespace(
            kube=Kube(api),
            cron=self.cron,
            records={},
            applier=self.applier,
            shards=None,
            dirty=set(),
            bridge=SimpleNamespace(applier=self.applier, presence=NoPresence()),
        )
        self.cron.bridge = self.rt.bridge
        self.seq = 0
        self.made = self.create()

    def create(self) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CronWorkflow",
            "metadata": {"name": self.name, "namespace": NAMESPACE},
            "spec": {
                "schedule": "@every 10s",
                "placement": {"site": SITE},
                "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]},
            },
        }
        made: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, CRONWORKFLOWS, body
        )
        self.cron.plan.upsert(made)
        return made

    def delete(self) -> None:
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, CRONWORKFLOWS, self.name
        )

    @property
    def uid(self) -> str:
        return str(self.made["metadata"]["uid"])

    def report(self, *pairs: tuple[Any, Any]) -> None:
        records = []
        for to, from_ in pairs:
            self.seq += 1
            records.append(stepped_back(self.uid, self.seq, to, from_, self.name))
        self.applier.apply_batch(SITE, records)
        self.cron.step()

    def status(self) -> dict[str, Any]:
        got = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, CRONWORKFLOWS, self.name
        )
        return dict(got.get("status") or {})

    def events(self) -> list[Any]:
        found = client.CoreV1Api(self.api).list_namespaced_event(
            NAMESPACE, field_selector=f"involvedObject.name={self.name}"
        )
        return [e for e in found.items if e.reason == "ClockSteppedBack"]


@pytest.fixture
def world(envtest: EnvtestCluster) -> Iterator[World]:
    install_crds(envtest)
    api = envtest.api_client()
    made = World(api, f"etl-{uuid.uuid4().hex[:6]}")
    try:
        yield made
    finally:
        with contextlib.suppress(client.ApiException):
            made.delete()
        api.close()


@pytest.mark.parametrize(
    ("to", "from_", "field"),
    [
        ("now", 1e300, "clockSteppedBackFrom"),
        (-1e300, "ahead", "lastScheduledTime"),
        ("now", 253402300800.0 + 86400, "clockSteppedBackFrom"),  # year 10000
    ],
)
async def test_a_step_back_to_or_from_no_time_is_refused_naming_the_field(
    world: World, to: Any, from_: Any, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time()
    ahead = float(int(now) + 300)
    to = float(int(now)) if to == "now" else to
    from_ = ahead if from_ == "ahead" else from_
    name, cron = world.name, world.cron
    cron.observe(NAMESPACE, name, SITE, f"{name}-{SITE}-1", float(int(now) - 20), "Succeeded")
    cron.observe(NAMESPACE, name, SITE, f"{name}-{SITE}-2", ahead, "Running")
    await materialize(world.rt)
    assert world.status()["lastScheduleTime"] == _rfc3339(ahead)
    with caplog.at_level(logging.WARNING, logger="tideflow_operator.cron"):
        world.report((to, from_))
        await materialize(world.rt)
    assert field in caplog.text, caplog.text
    runs = cron.seen[(NAMESPACE, name)][SITE]
    assert runs.ahead_until is None and runs.last_scheduled == ahead
    # Later runs are still written to the status (it was unwritable for ever).
    cron.observe(NAMESPACE, name, SITE, f"{name}-{SITE}-3", ahead + 10, "Running")
    await materialize(world.rt)
    assert world.status()["lastScheduleTime"] == _rfc3339(ahead + 10)
    assert not world.events()


async def test_a_mark_far_ahead_is_kept_only_as_far_as_a_run_could_be_taken(world: World) -> None:
    now = time.time()
    ahead = float(int(now) + 300)
    name, cron = world.name, world.cron
    cron.observe(NAMESPACE, name, SITE, f"{name}-{SITE}-1", ahead, "Running")
    # The site's clock read the year 9999 (an RTC gone wrong), then stepped back.
    world.report((float(int(now)), 253402300000.0))
    await materialize(world.rt)
    (entry,) = world.status()["sites"]
    runs = cron.seen[(NAMESPACE, name)][SITE]
    assert runs.ahead_until is not None
    assert runs.ahead_until <= time.time() + FIRE_SKEW_SECONDS
    assert entry["clockSteppedBackFrom"] < "2100"
    assert len(world.events()) == 1  # the Event names what the site said
    assert "9999" in world.events()[0].message
    # A later (real) run 5 minutes ahead, once the window has passed, counts again.
    later = CronRuntime()
    later.plan.clock = lambda: now + 2 * FIRE_SKEW_SECONDS
    later.plan.upsert(world.made)
    later.seed((NAMESPACE, name), world.status())
    seeded = later.seen[(NAMESPACE, name)][SITE]
    assert seeded.counts(now + 3 * FIRE_SKEW_SECONDS, later.plan.clock())


async def test_a_cron_workflow_made_again_under_its_name_starts_with_a_blank_status(
    world: World,
) -> None:
    now = time.time()
    ahead = float(int(now) + 300)
    name, cron = world.name, world.cron
    cron.observe(NAMESPACE, name, SITE, f"{name}-{SITE}-1", float(int(now) - 20), "Succeeded")
    cron.observe(NAMESPACE, name, SITE, f"{name}-{SITE}-2", ahead, "Running")
    world.report((float(int(now)), ahead))
    await materialize(world.rt)
    assert world.status()["sites"][0]["active"] == 1
    # A user deletes it and makes it again under its name (a new uid), as kopf says.
    old_uid = world.uid
    world.delete()
    cron.remove(old_uid)  # what the CronWorkflow handler does on DELETED
    world.made = world.create()
    assert world.uid != old_uid
    cron.seed((NAMESPACE, name), world.made.get("status"))
    cron.dirty.add((NAMESPACE, name))
    await materialize(world.rt)
    (entry,) = world.status()["sites"]
    assert entry.get("lastScheduleTime") is None, entry
    assert entry["active"] == 0 and entry["activeRuns"] == []
    assert "clockSteppedBackFrom" not in entry
    assert world.status().get("lastScheduleTime") is None


async def test_a_flood_of_step_reports_posts_one_event_per_cron_workflow_and_site(
    world: World,
) -> None:
    now = float(int(time.time()))
    name, cron = world.name, world.cron
    cron.observe(NAMESPACE, name, SITE, f"{name}-{SITE}-1", now + 300, "Running")
    # A thousand reports in one batch, each with other times (each a new Event name).
    world.report(*[(now - i, now + 300 - i) for i in range(1000)])
    await materialize(world.rt)
    assert len(world.events()) == 1
    # More of them at once after: still none more (they are logged).
    world.report(*[(now - i - 0.5, now + 200 - i) for i in range(100)])
    await materialize(world.rt)
    assert len(world.events()) == 1
    assert len(cron.notices) <= 1
