"""CronWorkflow delivery: each schedule to every matching EdgeSite, until confirmed.

Why the cloud only delivers: the sites fire their schedules from their own
clocks (``edge_agent/scheduler.py``), so a site offline at 02:00 still runs
its 02:00 job.  The operator's part is to get the right schedules onto the
right sites and off the wrong ones:

* **Fan-out.**  ``placement.site`` names one site; ``placement.siteSelector``
  matches every EdgeSite whose labels carry ``matchLabels`` (connected or
  not).  A site that starts matching later (relabelled, newly registered)
  gets the schedule; a site that stops matching, and every site on delete,
  gets a ``withdraw``.
* **Resend until confirmed**, as assignments: every ``put``/``withdraw`` a
  site has not confirmed (its ``schedule`` record, state Held at that
  generation or newer, or Withdrawn) is sent again every ``resend_seconds``
  while the site is connected, and at once when it changes.  The site's
  handling is idempotent, so a duplicate costs nothing.  An edit (new
  generation, suspend/resume) is a new ``put`` that replaces the old one.
* **Pure core.**  :class:`CronPlan` does no I/O: given the CronWorkflows and
  the EdgeSites' labels it says what to send; tests drive it directly.  The
  kopf handlers below feed it and publish through the bridge.

Not done here yet (see the README's Schedules section): Workflow objects for
the runs the sites fire, the CronWorkflow's per-site status and the history
limits in the cloud; delivery state is kept in memory, so a withdrawal not
yet confirmed when the operator restarts is not re-sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from tideflow import wire
from tideflow.spec import SpecError, parse_cron_workflow

from .kube import EDGESITES, GROUP, VERSION

log = logging.getLogger(__name__)

CRONWORKFLOWS = "cronworkflows"
RESEND_SECONDS = 5.0
POLL_SECONDS = 0.5
Labels = Mapping[str, str]


@dataclass(frozen=True)
class Send:
    """One message for one site (``put`` or ``withdraw``)."""

    site: str
    payload: wire.SchedulePayload

    def encode(self) -> bytes:
        return wire.encode(wire.KIND_SCHEDULE, self.site, self.payload)


@dataclass
class _Cron:
    uid: str
    generation: int
    namespace: str
    name: str
    spec: dict[str, Any]
    site: str | None
    selector: dict[str, str] | None

    def matches(self, site: str, labels: Labels) -> bool:
        if self.site is not None:
            return site == self.site
        assert self.selector is not None
        return all(labels.get(k) == v for k, v in self.selector.items())

    def put(self) -> wire.SchedulePayload:
        return wire.SchedulePayload(
            action="put",
            uid=self.uid,
            generation=self.generation,
            namespace=self.namespace,
            name=self.name,
            spec=self.spec,
        )

    def withdraw(self) -> wire.SchedulePayload:
        return wire.SchedulePayload(
            action="withdraw",
            uid=self.uid,
            generation=self.generation,
            namespace=self.namespace,
            name=self.name,
        )


@dataclass
class CronPlan:
    """Which site should hold which schedule, and what is still unconfirmed."""

    crons: dict[str, _Cron] = field(default_factory=dict)  # by CronWorkflow uid
    sites: dict[str, dict[str, str]] = field(default_factory=dict)  # EdgeSite -> labels
    placed: dict[str, set[str]] = field(default_factory=dict)  # uid -> sites sent a put
    pending: dict[tuple[str, str], wire.SchedulePayload] = field(default_factory=dict)
    confirmed: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)

    # ------------------------------------------------------------ inputs
    def upsert(self, body: Mapping[str, Any]) -> list[Send]:
        """A CronWorkflow was created or changed: (re)place it.  Invalid: raises SpecError."""
        cron = parse_cron_workflow(
            {k: v for k, v in body.items() if k in ("apiVersion", "kind", "metadata", "spec")}
        )
        meta = body["metadata"]
        placement = cron.spec.placement
        entry = _Cron(
            uid=str(meta["uid"]),
            generation=int(meta.get("generation") or 1),
            namespace=cron.metadata.namespace,
            name=cron.metadata.name,
            spec=cron.spec.dump(),
            site=placement.site,
            selector=dict(placement.site_selector.match_labels)
            if placement.site_selector is not None
            else None,
        )
        old = self.crons.get(entry.uid)
        if old is not None and old.generation > entry.generation:
            return []
        self.crons[entry.uid] = entry
        return self._place(entry, force=old is None or old.generation != entry.generation)

    def remove(self, uid: str) -> list[Send]:
        """A CronWorkflow was deleted: withdraw it from every site it was sent to."""
        cron = self.crons.pop(uid, None)
        if cron is None:
            return []
        return [self._queue(site, cron.withdraw()) for site in sorted(self.placed.pop(uid, set()))]

    def site_changed(self, site: str, labels: Labels | None) -> list[Send]:
        """An EdgeSite appeared, was relabelled (labels) or deleted (None)."""
        if labels is None:
            self.sites.pop(site, None)
        else:
            self.sites[site] = dict(labels)
        sends: list[Send] = []
        for cron in list(self.crons.values()):
            sends += self._place(cron, force=False)
        return sends

    def confirm(self, site: str, record: wire.ScheduleRecord) -> bool:
        """A site's ``schedule`` record: settle what it confirms.  True if it settled one."""
        key = (site, record.uid)
        self.confirmed[key] = (record.state, record.generation)
        sent = self.pending.get(key)
        if sent is None:
            return False
        if sent.action == "withdraw" and record.state == "Withdrawn":
            del self.pending[key]
            return True
        if (
            sent.action == "put"
            and record.generation >= sent.generation
            and record.state
            in (
                "Held",
                "Rejected",
            )
        ):
            del self.pending[key]
            if record.state == "Rejected":
                log.warning(
                    "site %s refused schedule %s/%s: %s",
                    site,
                    sent.namespace,
                    sent.name,
                    record.message,
                )
            return True
        return False

    # ------------------------------------------------------------ outputs
    def unconfirmed(self, site: str | None = None) -> list[Send]:
        return [
            Send(s, payload)
            for (s, _), payload in sorted(self.pending.items(), key=lambda kv: kv[0])
            if site is None or s == site
        ]

    def targets(self, uid: str) -> set[str]:
        """Sites the schedule should be on now."""
        cron = self.crons.get(uid)
        if cron is None:
            return set()
        if cron.site is not None:
            return {cron.site}
        return {s for s, labels in self.sites.items() if cron.matches(s, labels)}

    # ------------------------------------------------------------ internals
    def _place(self, cron: _Cron, *, force: bool) -> list[Send]:
        want = self.targets(cron.uid)
        have = self.placed.setdefault(cron.uid, set())
        sends = []
        for site in sorted(want - have if not force else want):
            sends.append(self._queue(site, cron.put()))
        for site in sorted(have - want):
            sends.append(self._queue(site, cron.withdraw()))
        self.placed[cron.uid] = set(want)
        return sends

    def _queue(self, site: str, payload: wire.SchedulePayload) -> Send:
        self.pending[(site, payload.uid)] = payload
        return Send(site, payload)


# ---------------------------------------------------------------- the runtime
@dataclass
class CronRuntime:
    """Feeds :class:`CronPlan` from kopf and the bridge; publishes what it says."""

    plan: CronPlan = field(default_factory=CronPlan)
    task: asyncio.Task[None] | None = None
    last_resend: dict[str, float] = field(default_factory=dict)

    def send(self, sends: list[Send]) -> None:
        bridge = _bridge()
        if bridge is None:
            return  # the loop sends everything pending once the bridge is up
        for item in sends:
            bridge.publish(item.site, wire.ASSIGN, item.encode())
            self.last_resend[item.site] = time.monotonic()

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                self.step()
            except Exception:  # never let one bad record stop delivery
                log.exception("CronWorkflow delivery step failed; will try again")

    def step(self) -> None:
        bridge = _bridge()
        if bridge is None:
            return
        for site, record in bridge.applier.drain_schedules():
            self.plan.confirm(site, record)
        now = time.monotonic()
        for site in {s for s, _ in self.plan.pending}:
            if not bridge.presence.connected(site):
                continue
            if now - self.last_resend.get(site, 0.0) >= RESEND_SECONDS:
                self.send(self.plan.unconfirmed(site))


CRON: CronRuntime | None = None


def _bridge() -> Any:
    from . import handlers  # the runtime is made by handlers' startup handler

    return handlers.RUNTIME.bridge if handlers.RUNTIME is not None else None


def _cron() -> CronRuntime:
    global CRON
    if CRON is None:
        CRON = CronRuntime()
    return CRON


@kopf.on.startup()
async def cron_startup(**_: Any) -> None:
    rt = _cron()
    if rt.task is None:
        rt.task = asyncio.create_task(rt.loop(), name="cron-delivery")


@kopf.on.cleanup()
async def cron_cleanup(**_: Any) -> None:
    rt = CRON
    if rt is not None and rt.task is not None:
        rt.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rt.task
        rt.task = None


@kopf.on.event(GROUP, VERSION, CRONWORKFLOWS)
async def cronworkflow_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    rt = _cron()
    uid = str(body["metadata"].get("uid"))
    if type == "DELETED" or body["metadata"].get("deletionTimestamp"):
        rt.send(rt.plan.remove(uid))
        return
    try:
        sends = rt.plan.upsert(dict(body))
    except SpecError as exc:
        log.warning(
            "CronWorkflow %s/%s is invalid: %s",
            body["metadata"].get("namespace"),
            body["metadata"].get("name"),
            exc,
        )
        rt.send(rt.plan.remove(uid))
        return
    rt.send(sends)


@kopf.on.event(GROUP, VERSION, EDGESITES)
async def cron_edgesite_event(type: str | None, body: kopf.Body, name: str, **_: Any) -> None:
    rt = _cron()
    labels = None if type == "DELETED" else dict(body["metadata"].get("labels") or {})
    rt.send(rt.plan.site_changed(name, labels))
