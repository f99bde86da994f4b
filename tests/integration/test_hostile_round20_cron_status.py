"""A site's clock stepped back, as the cloud shows it (round 20, operator side).

A site whose clock read ahead fired its schedule at times ahead of the true
one; NTP stepped it back and the site moved the schedule's mark back
(decision 0047), reporting the move (a ``schedule`` record with
``clockSteppedBackFrom``, decision 0049).  The operator kept the maximum
``lastScheduleTime`` per site, so the CronWorkflow went on showing the time
set while the clock read ahead, and said nothing of the step.  Real API
server (envtest); the site's records go through the operator's real applier
(seqs, exactly once).  Proves:

* after the report the site's ``lastScheduleTime`` and the CronWorkflow's
  follow the site's corrected clock (the newest run fired at or before it),
  with one Warning Event ``ClockSteppedBack`` naming the site and both times;
* the report replayed (an older seq) moves nothing and posts no second
  Event; a run fired ahead reported again later (its end) does not put the
  time back; a run fired after the step does move it on;
* a report that arrives once the operator's clock has passed the times fired
  ahead (a site offline since) moves nothing back;
* a restarted operator keeps it so: the mark the site's clock stepped back
  from is in the status it seeds from (it was in memory only, and a run fired
  ahead reported again after the restart put the time back).
"""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client
from services.kube import EnvtestCluster
from services.world import install_crds

from tideflow import wire
from tideflow_operator.applier import Applier
from tideflow_operator.cron import CRONWORKFLOWS, CronRuntime, _rfc3339, materialize
from tideflow_operator.kube import GROUP, VERSION, Kube

pytestmark = pytest.mark.envtest

NAMESPACE = "default"
SITE = "line-2"


class NoPresence:
    """The bridge's presence with no site online (the applier asks it)."""

    def online_sites(self) -> list[str]:
        return []

    def connected(self, site: str) -> bool:
        return False

    def get(self, site: str) -> None:
        return None


def stepped_back(uid: str, seq: int, to: Any, from_: Any, name: str = "etl") -> wire.EventRecord:
    """A site's ``schedule`` record saying its clock stepped back from ``from_`` to ``to``."""
    body = {
        "uid": uid,
        "generation": 1,
        "namespace": NAMESPACE,
        "name": name,
        "state": "Held",
        "lastScheduledTime": to,
        "missedCount": 0,
        "lastMissedTime": None,
        "clockSteppedBackFrom": from_,
    }
    return wire.EventRecord(seq=seq, kind="schedule", body=body)


async def test_a_site_s_clock_stepped_back_moves_last_schedule_time_back_with_a_warning(
    envtest: EnvtestCluster,
) -> None:
    install_crds(envtest)
    api = envtest.api_client()
    custom = client.CustomObjectsApi(api)
    name = f"etl-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CronWorkflow",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "schedule": "@every 10s",
            "placement": {"site": SITE},
            "workflowSpec": {"tasks": [{"name": "a", "command": ["true"]}]},
        },
    }
    made = custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, CRONWORKFLOWS, body)
    uid = made["metadata"]["uid"]
    try:
        applier = Applier()
        cron = CronRuntime()
        cron.plan.upsert(made)
        rt: Any = SimpleNamespace(
            kube=Kube(api),
            cron=cron,
            records={},
            applier=applier,
            shards=None,
            dirty=set(),
            bridge=SimpleNamespace(applier=applier, presence=NoPresence()),
        )
        cron.bridge = rt.bridge
        key = (NAMESPACE, name)
        now = time.time()
        true_fire, ahead_fire = float(int(now) - 20), float(int(now) + 300)
        # What the cloud saw: a run at the true time, then one fired while the clock
        # read five minutes ahead (within the window the operator accepts).
        cron.observe(NAMESPACE, name, SITE, f"{name}-{SITE}-1", true_fire, "Succeeded")
        cron.observe(NAMESPACE, name, SITE, f"{name}-{SITE}-2", ahead_fire, "Running")
        await materialize(rt)

        def status() -> dict[str, Any]:
            got = custom.get_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, CRONWORKFLOWS, name
            )
            return dict(got.get("status") or {})

        assert status()["lastScheduleTime"] == _rfc3339(ahead_fire)

        def events() -> list[Any]:
            found = client.CoreV1Api(api).list_namespaced_event(
                NAMESPACE, field_selector=f"involvedObject.name={name}"
            )
            return [e for e in found.items if e.reason == "ClockSteppedBack"]

        # NTP set the site's clock right: its schedule's mark moved back to it.
        record = stepped_back(uid, 1, float(int(now)), ahead_fire)
        assert applier.apply_batch(SITE, [record]).applied == 1
        cron.step()
        await materialize(rt)
        shown = status()
        assert shown["lastScheduleTime"] == _rfc3339(true_fire)
        assert shown["sites"][0]["lastScheduleTime"] == _rfc3339(true_fire)
        (event,) = events()
        assert event.type == "Warning"
        assert SITE in event.message
        assert _rfc3339(ahead_fire) in event.message and _rfc3339(float(int(now))) in event.message

        # Replayed (an older seq): nothing moves, no second Event.
        assert applier.apply_batch(SITE, [record]).duplicates == 1
        cron.step()
        # The run fired ahead ends, reported later: the time does not come back.
        cron.observe(NAMESPACE, name, SITE, f"{name}-{SITE}-2", ahead_fire, "Succeeded")
        await materialize(rt)
        assert status()["lastScheduleTime"] == _rfc3339(true_fire)
        assert len(events()) == 1
        # A run fired after the step, on the corrected clock: it moves on.
        cron.observe(NAMESPACE, name, SITE, f"{name}-{SITE}-3", true_fire + 30, "Running")
        await materialize(rt)
        assert status()["lastScheduleTime"] == _rfc3339(true_fire + 30)
        # A report arriving after the operator's clock passed what fired ahead (the
        # site was offline since): nothing it shows now is ahead; nothing moves.
        late = stepped_back(uid, 2, true_fire - 3600, true_fire - 1800)
        assert applier.apply_batch(SITE, [late]).applied == 1
        cron.step()
        await materialize(rt)
        assert status()["lastScheduleTime"] == _rfc3339(true_fire + 30)
        assert cron.seen[key][SITE].last_scheduled == true_fire + 30
        # The operator restarts (its memory gone; the status written is what it has),
        # then the run fired ahead is reported again (a resend): still not shown.
        again = CronRuntime()
        again.seed(key, status())
        again.plan.upsert(made)
        rt.cron = again
        again.bridge = rt.bridge
        again.observe(NAMESPACE, name, SITE, f"{name}-{SITE}-2", ahead_fire, "Failed")
        await materialize(rt)
        assert status()["lastScheduleTime"] == _rfc3339(true_fire + 30)
    finally:
        custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, CRONWORKFLOWS, name)
        api.close()
