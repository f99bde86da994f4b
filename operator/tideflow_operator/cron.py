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
  kopf handlers (:mod:`.handlers`) feed it through :class:`CronRuntime`,
  which the operator's runtime owns, and it publishes through the bridge.

* **Fired runs become Workflow objects, once.**  A site reports a fired run
  like any run, its run record naming the schedule (``cron``).  The applier
  asks :meth:`CronPlan.accepts` whether that site may report it (the
  schedule is placed there; the run's name and uid are the ones derived for
  that time; the time is one the schedule produces, in its time zone, for the
  generation that fired it if this process knows that generation's schedule
  (they are kept in memory only), no further ahead of the operator's clock than
  :data:`FIRE_SKEW_SECONDS` and not before the CronWorkflow was made, less the
  same skew: else the run is refused as ``off_schedule``) and gives it a view;
  :func:`materialize`, called by the operator before the site's records are
  acked, creates the Workflow object (owner reference to the CronWorkflow,
  labels ``tideflow.io/cron-workflow`` and ``tideflow.io/site``, annotation
  ``tideflow.io/scheduled-time``) and marks its status assigned with the
  site's run uid (``status.runUid``).  "Already exists" counts as done only
  for the object the operator makes (:func:`not_made_for`), so a record
  re-sent after a crash never makes a second object; after a restart the
  object's status brings the view back like any Workflow's.  The name is
  predictable, so anyone who may create Workflows can make it first: a name
  held by another object, or by another Workflow's run, is refused (the run's
  records go to no object, the site is acked, and a Warning Event
  ``RunNameTaken`` on the CronWorkflow names it; decision 0048).
* **Status and history.**  Per CronWorkflow: ``siteCount``,
  ``lastScheduleTime`` and per site the last scheduled and last successful
  time and the active runs (counts, plus a list capped at
  :data:`MAX_STATUS_SITES` sites).  Finished Workflow objects beyond
  ``successfulJobsHistoryLimit``/``failedJobsHistoryLimit`` per site are
  deleted, oldest scheduled time first.  With operator shards each shard
  writes its own sites' entries into the one status, merged with the others'
  as read and conditional on that resourceVersion (:func:`_write_cron_status`).

* **Reconciled against what the sites hold.**  Delivery state is kept in
  memory; a restarted operator rebuilds the plan from the API server before
  it judges anything, and each site's heartbeat lists the schedules it holds
  (``state.schedules``): one no CronWorkflow places there any more (deleted
  while the operator was down, or unmatched) is withdrawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from tideflow import wire
from tideflow.schedule import Schedule, run_name, run_uid
from tideflow.spec import SpecError, parse_cron_workflow, parse_spec

from .applier import FiredRunRefused, parse_rfc3339
from .kube import EDGESITES, GROUP, VERSION, WORKFLOWS, Conflict, NotFound
from .model import CloudRecord
from .presence import SKEW_WARN_SECONDS

log = logging.getLogger(__name__)

CRONWORKFLOWS = "cronworkflows"
CRON_LABEL = "tideflow.io/cron-workflow"
SITE_LABEL = "tideflow.io/site"
SCHEDULED_ANNOTATION = "tideflow.io/scheduled-time"
MAX_STATUS_SITES = 50
STATUS_WRITE_ATTEMPTS = 5  # sharded: conditional writes retried after another shard's
_FINISHED = ("Succeeded", "Failed", "Cancelled")
RESEND_SECONDS = 5.0
#: How far a site's clock may be off the operator's when it reports a fired run.
FIRE_SKEW_SECONDS = 600.0
#: A site's run this far ahead of the operator's clock, after the site said its clock
#: stepped back, was fired while that clock read ahead (the site's own tolerance).
CLOCK_STEP_SECONDS = 60.0
#: Generations of one CronWorkflow whose schedules are kept to judge fired runs by.
SCHEDULE_GENERATIONS = 16
POLL_SECONDS = 0.5
#: At most one ClockSteppedBack Event per CronWorkflow and site this often.
STEP_NOTICE_SECONDS = 60.0
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
    # When the API server made it (metadata.creationTimestamp; None: not known).
    created: float | None = None
    # The schedule of each generation this process has seen (newest last, bounded):
    # a run fired by an earlier one is judged by its own (an edit while offline).
    schedules: dict[int, Schedule] = field(default_factory=dict)

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
    loaded: bool = False  # every CronWorkflow is known (listed at start, or in tests)
    clock: Callable[[], float] = time.time  # the operator's clock (accepts(), clock steps)
    # How far a site's clock may be off ours: a fired time further ahead than now (or
    # before the CronWorkflow was made) by more than this is refused.
    skew_seconds: float = FIRE_SKEW_SECONDS
    # How far a site's clock reads off ours, as presence measures it from the
    # ``sentAt`` of its messages (None: not measured).  Named in a refusal only:
    # the site writes ``sentAt``, so it never widens the window (a forging site
    # could send one heartbeat from the future first).
    site_skew: Callable[[str], float | None] = lambda _site: None

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
        entry.created = parse_rfc3339(meta.get("creationTimestamp"))
        schedules = dict(old.schedules) if old is not None else {}
        schedules.pop(entry.generation, None)
        schedules[entry.generation] = cron.spec.parsed_schedule()
        entry.schedules = dict(list(schedules.items())[-SCHEDULE_GENERATIONS:])
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

    def accepts(self, site: str, run: wire.RunRecord) -> bool:
        """May ``site`` report ``run`` as fired by one of the schedules placed on it?

        False: no schedule of ours fired it (the applier treats it as unknown).
        :class:`FiredRunRefused`, naming ``cron.scheduledTime``: the schedule is
        placed there, but the time is one it never produces (in its time zone,
        for the generation that fired it, when this process knows that
        generation's schedule), further ahead of the operator's clock than
        :attr:`skew_seconds`, or before the CronWorkflow was made (less the
        same skew).  A forged or buggy site made the cloud create a Workflow for
        any time it liked.
        """
        ref = run.cron
        if ref is None:
            return False
        cron = self.crons.get(ref.uid)
        if cron is None or cron.namespace != run.namespace or cron.name != ref.name:
            return False
        if not cron.matches(site, self.sites.get(site, {})):
            return False
        try:  # a time no schedule fires at (1e300, -1e20, Infinity) is no fire of ours
            at = datetime.fromtimestamp(ref.scheduled_time, UTC)
        except (OverflowError, OSError, ValueError):
            return False
        if run.name != run_name(cron.name, site, at) or run.uid != run_uid(
            cron.uid, ref.generation, at
        ):
            return False
        self._check_fire_time(cron, ref.generation, at, site)
        return True

    def _check_fire_time(self, cron: _Cron, generation: int, at: datetime, site: str) -> None:
        """Raise :class:`FiredRunRefused` unless ``at`` is a fire of ``cron`` in the window."""
        stamp = at.timestamp()
        shown = at.isoformat(timespec="microseconds")
        now = self.clock()
        if stamp > now + self.skew_seconds:
            skew = self.site_skew(site)
            blame = (
                f"; site {site}'s clock reads {skew:.0f} s ahead of the operator's (from "
                "its messages): set it right (NTP)"
                if skew is not None and skew > SKEW_WARN_SECONDS
                else ""
            )
            raise FiredRunRefused(
                f"cron.scheduledTime {shown} is in the future (more than "
                f"{self.skew_seconds:.0f} s ahead of the operator's clock){blame}"
            )
        if cron.created is not None and stamp < cron.created - self.skew_seconds:
            raise FiredRunRefused(
                f"cron.scheduledTime {shown} is before the CronWorkflow was made "
                f"({_rfc3339(cron.created)})"
            )
        schedule = cron.schedules.get(generation)
        if schedule is None:
            # A generation this process never saw (the schedules of earlier ones are
            # kept in memory only; a restart forgets them): a real run of it, fired
            # before an edit made while the site was offline, must not be refused by
            # another generation's schedule.  The window above is all that is checked.
            return
        try:
            fires = schedule.last_at_or_before(at) == at
        except (OverflowError, ValueError):  # out of the calendar cronsim walks
            fires = False
        if not fires:
            raise FiredRunRefused(
                f"cron.scheduledTime {shown} is not a time the schedule "
                f"{schedule.text[:64]!r} ({schedule.tz.key}) produces"
            )

    def stale(self, site: str, held: list[str]) -> list[Send]:
        """Withdraw what a site says it holds but should not (deleted, unmatched).

        Only once the plan knows every CronWorkflow (``loaded``): a restarted
        operator's memory is rebuilt from the API server first, so nothing the
        cloud still places there is withdrawn.  A withdrawal already pending
        is not queued again.
        """
        if not self.loaded:
            return []
        sends = []
        for uid in held:
            if (site, uid) in self.pending or site in self.targets(uid):
                continue
            cron = self.crons.get(uid)
            try:
                payload = (
                    cron.withdraw()
                    if cron is not None
                    else wire.SchedulePayload(  # gone: the site reports its own names back
                        action="withdraw", uid=uid, generation=1, namespace="deleted",
                        name="deleted",
                    )
                )  # fmt: skip
            except ValidationError:
                # No schedule of ours has such a uid (too long, say): nothing the
                # cloud placed, and nothing a withdrawal can name.  (It raised, and
                # stopped the delivery step for every site.)
                log.warning("site %s says it holds schedule %r, which no withdrawal can name;"
                            " ignored", site, uid[:80])  # fmt: skip
                continue
            sends.append(self._queue(site, payload))
        return sends

    def confirm(self, site: str, record: wire.ScheduleRecord) -> bool:
        """A site's ``schedule`` record: settle what it confirms.  True if it settled one."""
        # Nothing is kept per record: a site names any uid it likes, and keeping each
        # (site, uid) grew the operator's memory without bound (read nowhere).
        key = (site, record.uid)
        sent = self.pending.get(key)
        if sent is None:
            cron = self.crons.get(record.uid)
            if record.state == "Withdrawn" and cron is not None and site in self.targets(cron.uid):
                # Nothing asked for it (a withdrawal delivered again after the put: a
                # QoS 1 duplicate, a replay), yet the site dropped a schedule it should
                # hold; it fired nothing more until an edit or a restart.  Put it back.
                log.warning("site %s withdrew schedule %s/%s, which is placed there; "
                            "sending it again", site, cron.namespace, cron.name)  # fmt: skip
                self._queue(site, cron.put())
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
                    wire.shown(record.message, 200),
                )
            return True
        return False

    # ------------------------------------------------------------ outputs
    def unconfirmed(self, site: str | None = None) -> list[Send]:
        return [
            Send(s, self.pending[(s, uid)])
            for s, uid in sorted(self.pending)
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
class _SiteRuns:
    """One CronWorkflow at one site, as the cloud has seen its runs."""

    last_scheduled: float | None = None
    last_successful: float | None = None
    runs: dict[str, tuple[float, str]] = field(default_factory=dict)  # name -> (time, phase)
    # The site's clock stepped back from this mark (its ``schedule`` record's
    # ``clockSteppedBackFrom``): until the operator's clock passes it, a run's time
    # ahead of the operator's clock was fired while the site's clock read ahead and
    # does not set lastScheduleTime (decision 0049).  Written in the site's status
    # entry (``clockSteppedBackFrom``) until then, and seeded from it.
    ahead_until: float | None = None

    def counts(self, at: float, now: float) -> bool:
        """Does a run at ``at`` set the times shown (not one fired while the clock read ahead)?"""
        if self.ahead_until is None or now > self.ahead_until:
            return True
        return at <= now + CLOCK_STEP_SECONDS or at > self.ahead_until


@dataclass
class CronRuntime:
    """Feeds :class:`CronPlan` from kopf and the bridge; publishes what it says."""

    plan: CronPlan = field(default_factory=CronPlan)
    task: asyncio.Task[None] | None = None
    last_resend: dict[str, float] = field(default_factory=dict)
    # (namespace, cron name) -> site -> runs; what status and history limits use.
    seen: dict[tuple[str, str], dict[str, _SiteRuns]] = field(default_factory=dict)
    dirty: set[tuple[str, str]] = field(default_factory=set)
    # Fired runs whose Workflow object could not be made yet (API server away):
    # their views hold the site's ack back (StatusWriter.write) until made.
    awaiting: dict[tuple[str, str], tuple[str, wire.RunRecord]] = field(default_factory=dict)
    bridge: Any = None  # the operator's CloudBridge, once attach() ran
    # ClockSteppedBack Warning Events to post, the newest per (CronWorkflow uid, site):
    # (object, message, deterministic name).  A site sending a thousand step reports
    # made a thousand Event writes (decision 0050).
    notices: dict[tuple[str, str], tuple[dict[str, Any], str, str]] = field(default_factory=dict)
    # When each (CronWorkflow uid, site)'s last such Event was posted (monotonic).
    noticed: dict[tuple[str, str], float] = field(default_factory=dict)

    def awaiting_key(self, key: tuple[str, str]) -> bool:
        return key in self.awaiting

    def start(self, rt: Any) -> None:
        """Deliver (and retry making fired runs) every POLL_SECONDS from now on."""
        if self.task is None:
            self.task = asyncio.create_task(self.loop(rt), name="cron-delivery")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    def send(self, sends: list[Send]) -> None:
        bridge = self.bridge
        if bridge is None:
            return  # the loop sends everything pending once the bridge is up
        for item in sends:
            bridge.publish(item.site, wire.ASSIGN, item.encode())
            self.last_resend[item.site] = time.monotonic()

    async def loop(self, rt: Any) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                self.step()
            except Exception:  # never let one bad record stop delivery
                log.exception("CronWorkflow delivery step failed; will try again")
            try:
                if self.awaiting or self.dirty or self.notices:
                    # Retry what could not be made (a step that failed does not hold
                    # it back: the fired runs' sites wait for them to be acked), and
                    # write what a site's schedule records changed.
                    await materialize(rt)
            except Exception:
                log.exception("making fired runs' Workflows failed; will try again")

    def remove(self, uid: str) -> list[Send]:
        """A CronWorkflow was deleted: withdraw it, and forget its runs as seen.

        What the cloud saw is kept by name (status, history limits), so a
        CronWorkflow made again under the name showed the deleted one's times,
        active runs and clock step (decision 0050).
        """
        cron = self.plan.crons.get(uid)
        sends = self.plan.remove(uid)
        if cron is not None:
            key = (cron.namespace, cron.name)
            self.seen.pop(key, None)
            self.dirty.discard(key)
            for notice in [k for k in self.notices if k[0] == uid]:
                del self.notices[notice]
        return sends

    def seed(self, key: tuple[str, str], status: Mapping[str, Any] | None) -> None:
        """Start from the status already written (an operator restart), site by site.

        What this process has not seen yet comes from the CronWorkflow's own
        status, so the first write after a restart does not blank the sites
        whose schedules have not fired since (a nightly schedule would read
        "never" for a day).  What it then observes takes over.
        """
        sites = self.seen.setdefault(key, {})
        # (A status is anyone's to edit: only well-formed entries and times count.)
        written = status.get("sites") if isinstance(status, Mapping) else None
        for entry in written if isinstance(written, list) else []:
            site = entry.get("site") if isinstance(entry, Mapping) else None
            if isinstance(site, str) and site not in sites:
                sites[site] = _SiteRuns(
                    last_scheduled=_written_time(entry.get("lastScheduleTime")),
                    last_successful=_written_time(entry.get("lastSuccessfulTime")),
                    ahead_until=_ahead_until(
                        _written_time(entry.get("clockSteppedBackFrom")),
                        self.plan.clock() + self.plan.skew_seconds,
                    ),
                )

    def observe(
        self, namespace: str, cron: str, site: str, name: str, at: float, phase: str
    ) -> None:
        runs = self.seen.setdefault((namespace, cron), {}).setdefault(site, _SiteRuns())
        old = runs.runs.get(name)
        if old == (at, phase):
            return
        runs.runs[name] = (at, phase)
        if runs.counts(at, self.plan.clock()):
            runs.last_scheduled = max(at, runs.last_scheduled or at)
            if phase == "Succeeded":
                runs.last_successful = max(at, runs.last_successful or at)
        self.dirty.add((namespace, cron))

    def clock_stepped_back(self, site: str, record: wire.ScheduleRecord) -> None:
        """A site's schedule record says its clock stepped back: show its corrected time.

        The site moved the schedule's mark back from ``clockSteppedBackFrom`` to
        ``lastScheduledTime`` (decision 0047).  Its ``lastScheduleTime`` becomes
        the newest run it fired that is not ahead of the operator's clock (none:
        the moved mark), runs fired while its clock read ahead stop setting it
        until the operator's clock reaches them, and a Warning Event says so
        (decision 0049).  Records come once, in seq order (the applier); a report
        whose site shows nothing ahead any more (it arrives late) moves nothing.
        """
        stepped_from, to = record.clock_stepped_back_from, record.last_scheduled_time
        cron = self.plan.crons.get(record.uid)
        if (
            stepped_from is None
            or to is None
            or record.state != "Held"
            or cron is None
            or site not in self.plan.targets(cron.uid)
        ):
            return
        key = (cron.namespace, cron.name)
        why = _not_a_step(stepped_from, to, cron.created, self.plan.skew_seconds)
        if why is not None:
            # Checked before anything is kept: a mark kept and then rendered raised,
            # and every later status write of the CronWorkflow with it.
            log.warning(
                "site %s: schedule record for CronWorkflow %s/%s: %s; its clock step "
                "is ignored", site, *key, why,
            )  # fmt: skip
            return
        runs = self.seen.setdefault(key, {}).setdefault(site, _SiteRuns())
        now = self.plan.clock()
        # No run further ahead than the fired-run window is ever taken, so a mark
        # beyond it says nothing more (year 9999 pinned the entry, and kept a fast
        # clock's runs from counting, for ever).
        kept_from = min(stepped_from, now + self.plan.skew_seconds)
        runs.ahead_until = max(kept_from, runs.ahead_until or kept_from)
        limit = now + CLOCK_STEP_SECONDS
        if runs.last_scheduled is not None and runs.last_scheduled > limit:
            kept = [at for at, _ in runs.runs.values() if runs.counts(at, now)]
            runs.last_scheduled = max(kept) if kept else min(to, runs.last_scheduled)
        if runs.last_successful is not None and runs.last_successful > limit:
            good = [at for at, p in runs.runs.values() if p == "Succeeded" and runs.counts(at, now)]
            runs.last_successful = max(good) if good else None
        self.dirty.add(key)
        shown_from, shown_to = _rfc3339(stepped_from), _rfc3339(to)
        # One line per step while its Event waits (a flood of reports was a line each).
        log.log(
            logging.DEBUG if (cron.uid, site) in self.notices else logging.WARNING,
            "site %s's clock stepped back from %s to %s; CronWorkflow %s/%s shows its "
            "corrected time", site, shown_from, shown_to, *key,
        )  # fmt: skip
        digest = hashlib.sha256(f"{site}\0{stepped_from!r}\0{to!r}".encode()).hexdigest()[:16]
        self.notices[(cron.uid, site)] = (
            {"metadata": {"name": cron.name, "namespace": cron.namespace, "uid": cron.uid}},
            f"site {site}'s clock stepped back from {shown_from} to {shown_to}: "
            "lastScheduleTime follows the site's corrected clock; the runs fired "
            "while it read ahead ran, and their times do not fire again there",
            f"clockstep.{digest}",
        )

    def status(
        self,
        key: tuple[str, str],
        *,
        written: Mapping[str, Any] | None = None,
        owns: Callable[[str], bool] | None = None,
    ) -> dict[str, Any]:
        """The CronWorkflow's status from what this process has seen.

        Sharded (``owns`` given): this shard has seen only its own sites' runs;
        the other sites' entries are taken as ``written`` (the status as last
        read from the API server, which their shards keep).
        """
        sites = self.seen.get(key, {})
        cron = next((c for c in self.plan.crons.values() if (c.namespace, c.name) == key), None)
        placed = sorted(self.plan.targets(cron.uid)) if cron is not None else sorted(sites)
        theirs: dict[str, Mapping[str, Any]] = {}
        listed = written.get("sites") if isinstance(written, Mapping) else None
        for entry in listed if isinstance(listed, list) else []:
            if isinstance(entry, Mapping) and isinstance(entry.get("site"), str):
                theirs[entry["site"]] = entry
        entries = []
        active_total = 0
        last: float | None = None
        for site in placed[:MAX_STATUS_SITES]:
            if owns is not None and not owns(site):
                entry = _their_entry(site, theirs.get(site) or {})
                active_total += entry["active"]
                scheduled = parse_rfc3339(entry.get("lastScheduleTime"))
                if scheduled is not None:
                    last = max(last or scheduled, scheduled)
                entries.append(entry)
                continue
            runs = sites.get(site, _SiteRuns())
            active = sorted(n for n, (_, p) in runs.runs.items() if p not in _FINISHED)
            active_total += len(active)
            entry = {
                "site": site,
                "lastScheduleTime": _rfc3339(runs.last_scheduled),
                "lastSuccessfulTime": _rfc3339(runs.last_successful),
                "active": len(active),
                "activeRuns": active[:10],
            }
            if runs.ahead_until is not None and self.plan.clock() <= runs.ahead_until:
                # Kept in the status so that a restarted operator seeds it (seed()).
                entry["clockSteppedBackFrom"] = _rfc3339(runs.ahead_until)
            entries.append(entry)
        for site, runs in sites.items():
            if runs.last_scheduled is not None and (owns is None or owns(site)):
                last = max(last or runs.last_scheduled, runs.last_scheduled)
        return {
            "siteCount": len(placed),
            "lastScheduleTime": _rfc3339(last),
            "active": active_total,
            "sites": entries,
            "sitesTruncated": len(placed) > MAX_STATUS_SITES,
        }

    def step(self) -> None:
        bridge = self.bridge
        if bridge is None:
            return
        for site, record in bridge.applier.drain_schedules():
            self.plan.confirm(site, record)
            if record.clock_stepped_back_from is not None:
                try:
                    self.clock_stepped_back(site, record)
                except Exception:  # one record must not stop the others'
                    log.exception("site %s: applying its clock step failed", site)
        for site in bridge.presence.online_sites():
            info = bridge.presence.get(site)
            if info is not None and info.schedules:
                try:
                    self.send(self.plan.stale(site, info.schedules))
                except Exception:  # one site's report must not stop the others' delivery
                    log.exception("site %s: withdrawing its stale schedules failed", site)
        now = time.monotonic()
        for site in {s for s, _ in self.plan.pending}:
            if not bridge.presence.connected(site):
                continue
            if now - self.last_resend.get(site, 0.0) >= RESEND_SECONDS:
                self.send(self.plan.unconfirmed(site))


def _blank_entry(site: str) -> dict[str, Any]:
    return {
        "site": site,
        "lastScheduleTime": None,
        "lastSuccessfulTime": None,
        "active": 0,
        "activeRuns": [],
    }


def _their_entry(site: str, written: Mapping[str, Any]) -> dict[str, Any]:
    """Another shard's site entry as written, keeping only well-formed fields
    (a status is editable by anyone allowed to, and a shard never crashes on it)."""
    entry = _blank_entry(site)
    for field_name in ("lastScheduleTime", "lastSuccessfulTime"):
        value = written.get(field_name)
        if isinstance(value, str):
            entry[field_name] = _rfc3339(_written_time(value))
    active = written.get("active")
    if isinstance(active, int) and not isinstance(active, bool) and active >= 0:
        entry["active"] = active
    runs = written.get("activeRuns")
    if isinstance(runs, list) and all(isinstance(run, str) for run in runs):
        entry["activeRuns"] = runs[:10]
    stepped = _written_time(written.get("clockSteppedBackFrom"))
    if stepped is not None:
        entry["clockSteppedBackFrom"] = _rfc3339(stepped)
    return entry


def _ahead_until(mark: float | None, limit: float) -> float | None:
    """A seeded clock-step mark, no further ahead than a run could be taken."""
    return None if mark is None else min(mark, limit)


def _not_a_step(stepped_from: float, to: float, created: float | None, skew: float) -> str | None:
    """Why a site's report that its clock stepped back from ``stepped_from`` to ``to``
    is no step the cloud can show (the field named), or None."""
    for field_name, value in (("clockSteppedBackFrom", stepped_from), ("lastScheduledTime", to)):
        if _written_time(value) is None:
            return f"{field_name} {value!r} is not a time (one in the years 1 to 9999 UTC)"
    if to >= stepped_from:
        return (
            f"lastScheduledTime {_rfc3339(to)} is not before clockSteppedBackFrom "
            f"{_rfc3339(stepped_from)}"
        )
    if created is not None and to < created - skew:
        return (
            f"lastScheduledTime {_rfc3339(to)} is before the CronWorkflow was made "
            f"({_rfc3339(created)})"
        )
    return None


def _written_time(value: Any) -> float | None:
    """A time as written in a status: None unless an RFC 3339 time (or epoch
    seconds) that renders again.  Garbage there raised at start-up (the plan
    never loaded) and, out of range, failed every later status write."""
    if isinstance(value, bool):
        return None
    try:
        ts = parse_rfc3339(value)
        if ts is None or not math.isfinite(ts):
            return None
        _rfc3339(ts)
    except (ValueError, TypeError, OverflowError, OSError):
        return None
    return ts


def _rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def attach(rt: Any) -> None:
    """Before the bridge starts: know the schedules and sites, and judge fired runs.

    ``rt`` is the operator's :class:`~tideflow_operator.runtime.Runtime` (its
    ``cron``, ``kube``, ``applier``, ``bridge`` and ``config``).
    """
    cr: CronRuntime = rt.cron
    cr.bridge = rt.bridge
    plan = cr.plan
    kube = rt.kube
    try:
        sites = await kube._call(kube.custom.list_cluster_custom_object, GROUP, VERSION, EDGESITES)
        for item in sites.get("items", []):
            meta = item["metadata"]
            plan.site_changed(meta["name"], dict(meta.get("labels") or {}))
        namespaces = list(rt.config.namespaces or [])
        items: list[dict[str, Any]] = []
        if not namespaces:
            crons = await kube._call(
                kube.custom.list_cluster_custom_object, GROUP, VERSION, CRONWORKFLOWS
            )
            items = list(crons.get("items", []))
        for namespace in namespaces:  # namespace mode: only where it may look
            crons = await kube._call(
                kube.custom.list_namespaced_custom_object,
                GROUP, VERSION, namespace, CRONWORKFLOWS,
            )  # fmt: skip
            items += list(crons.get("items", []))
        for item in items:
            meta = item.get("metadata") or {}
            cr.seed((str(meta.get("namespace")), str(meta.get("name"))), item.get("status"))
            with contextlib.suppress(SpecError):
                plan.upsert(item)
        plan.loaded = True
    except Exception as exc:  # no CRD installed yet, or no permission: kopf feeds it later
        log.warning("could not list CronWorkflows/EdgeSites at start: %s", exc)
    connect_plan(plan, rt.applier, rt.bridge.presence)


def connect_plan(plan: CronPlan, applier: Any, presence: Any) -> None:
    """The applier asks ``plan`` about fired runs; ``plan`` asks presence about clocks."""
    plan.site_skew = lambda site: info.clock_skew if (info := presence.get(site)) else None
    applier.accept_cron = plan.accepts


async def materialize(rt: Any, changed: Iterable[tuple[str, str]] = ()) -> None:
    """Create the Workflow object of every fired run the applier accepted (exactly once).

    Then note the phases of the ``changed`` Workflows that are fired runs, for
    their CronWorkflow's status and history limits.
    """
    cr: CronRuntime = rt.cron
    for site, run in rt.applier.drain_cron_runs():
        cr.awaiting[(run.namespace, run.name)] = (site, run)
    for site, run in list(cr.awaiting.values()):
        ref = run.cron
        cron = cr.plan.crons.get(ref.uid) if ref is not None else None
        key = (run.namespace, run.name)
        if ref is None or cron is None:  # its CronWorkflow is gone: nothing to make
            cr.awaiting.pop(key, None)
            continue
        if await _make(rt, cron, site, run):
            cr.awaiting.pop(key, None)
            rt.dirty.add(key)
            changed = {*changed, key}
    # What the cloud knows of every fired run: status and history limits.
    for key in set(changed):
        view, record = rt.applier.view(*key), rt.records.get(key)
        if view is None or record is None:
            continue
        owner = _owner_of(rt, view.namespace, view.name)
        if owner is not None:
            cr.observe(
                view.namespace, owner, record.site, view.name, record.assigned_at, view.phase
            )
    for key in list(cr.dirty):
        cr.dirty.discard(key)
        await _write_cron_status(rt, cr, key)
        await _prune(rt, cr, key)
    await _post_notices(rt, cr)


async def _post_notices(rt: Any, cr: CronRuntime) -> None:
    """Post the ClockSteppedBack Events due: one per CronWorkflow and site per
    :data:`STEP_NOTICE_SECONDS` at most (the newest report's); the others wait."""
    now = time.monotonic()
    for key, (obj, message, once) in list(cr.notices.items()):
        last = cr.noticed.get(key)
        if last is not None and now - last < STEP_NOTICE_SECONDS:
            continue
        del cr.notices[key]
        cr.noticed[key] = now
        await rt.kube.event(
            obj, "CronWorkflow", "ClockSteppedBack", message, warning=True, once=once
        )
    for key, last in list(cr.noticed.items()):
        if now - last >= STEP_NOTICE_SECONDS and key not in cr.notices:
            del cr.noticed[key]


def _object_of(cron: _Cron, site: str, run: wire.RunRecord) -> dict[str, Any]:
    """The Workflow object the operator makes for a run ``cron`` fired at ``site``."""
    scheduled = run.cron.scheduled_time if run.cron is not None else None
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Workflow",
        "metadata": {
            "name": run.name,
            "namespace": run.namespace,
            "labels": {CRON_LABEL: cron.name, SITE_LABEL: site},
            "annotations": {SCHEDULED_ANNOTATION: _rfc3339(scheduled) or ""},
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "CronWorkflow",
                    "name": cron.name,
                    "uid": cron.uid,
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": {
            **{k: v for k, v in cron.spec["workflowSpec"].items() if k != "placement"},
            "placement": {"site": site},
        },
    }


def not_made_for(existing: Mapping[str, Any], body: Mapping[str, Any], run_uid: str) -> str | None:
    """Why ``existing`` (an object already of a fired run's name) is not the run's, or None.

    The name is predictable (``<cron>-<site>-<unix seconds>``): anyone who may
    create Workflows in the namespace can make it first.  It is the run's only
    if it is what :func:`materialize` makes: owned (as controller) by the
    CronWorkflow's uid, with its labels and scheduled time, and either already
    linked to this run by the operator (``status.runUid``: the status is the
    operator's to write) or, not linked yet (a crash between making it and
    writing its status), with the very spec the operator would give it.  An
    object that is all of that is the run's whoever made it: it says nothing
    the run does not.
    """
    meta, want = existing.get("metadata") or {}, body["metadata"]
    owner = want["ownerReferences"][0]
    owners = meta.get("ownerReferences") or []
    if not any(
        isinstance(o, Mapping) and o.get("uid") == owner["uid"] and o.get("controller")
        and o.get("kind") == "CronWorkflow"
        for o in owners
    ):  # fmt: skip
        return "it is not owned by the CronWorkflow"
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    if any(labels.get(k) != v for k, v in want["labels"].items()):
        return "its labels are not a fired run's"
    if any(annotations.get(k) != v for k, v in want["annotations"].items()):
        return "its scheduled time is not the run's"
    linked = (existing.get("status") or {}).get("runUid")
    if linked is not None:
        return None if linked == run_uid else f"it is linked to another run ({linked})"
    try:
        same = parse_spec(existing.get("spec")).dump() == parse_spec(body["spec"]).dump()
    except SpecError:
        same = False
    return None if same else "its spec is not the CronWorkflow's"


async def _make(rt: Any, cron: _Cron, site: str, run: wire.RunRecord) -> bool:
    """Make (or find) the run's Workflow object and link it; False: try again later.

    A name held by an object the operator did not make for this run (see
    :func:`not_made_for`) is refused: the run's records go to no object, the
    site is acked all the same, and a Warning Event on the CronWorkflow says so.
    """
    key = (run.namespace, run.name)
    ref = run.cron
    assert ref is not None
    view = rt.applier.view(*key)
    if view is not None and view.uid != run.uid:  # another Workflow's run holds the name
        _refuse(rt, cron, site, run, f"Workflow {run.name} is another run's (uid {view.uid})")
        return True
    body = _object_of(cron, site, run)
    kube = rt.kube
    try:
        made = await kube._call(
            kube.custom.create_namespaced_custom_object,
            GROUP, VERSION, run.namespace, WORKFLOWS, body,
        )  # fmt: skip
    except Exception as exc:
        if getattr(exc, "status", None) != 409:
            log.warning("could not create Workflow %s/%s (will retry): %s", *key, exc)
            return False
        try:  # made before a crash, or by someone else first
            made = await kube.get_workflow(*key)
        except NotFound:
            return False  # deleted meanwhile: made again next time
        except Exception as exc:
            log.warning("could not read Workflow %s/%s (will retry): %s", *key, exc)
            return False
        why = not_made_for(made, body, run.uid)
        if why is not None:
            _refuse(rt, cron, site, run, f"Workflow {run.name} was made by someone else: {why}")
            return True
    rt.records[key] = CloudRecord.assigned(
        namespace=run.namespace,
        name=run.name,
        uid=run.uid,
        generation=run.generation,
        site=site,
        object_uid=made["metadata"]["uid"],
        assigned_at=ref.scheduled_time,
    )
    with contextlib.suppress(NotFound):
        await kube.patch_workflow_status(
            run.namespace, run.name,
            {"assignedGeneration": run.generation, "runUid": run.uid, "site": site,
             "scheduledTime": _rfc3339(ref.scheduled_time)},
        )  # fmt: skip
    return True


def _refuse(rt: Any, cron: _Cron, site: str, run: wire.RunRecord, why: str) -> None:
    """The run's name is taken: drop its view (its later records are stale, so the site
    is acked) and post a Warning Event on the CronWorkflow, once per name."""
    view = rt.applier.view(run.namespace, run.name)
    if view is not None and view.uid == run.uid:
        rt.applier.forget(run.namespace, run.name)
    else:
        rt.applier.refuse_run(run.uid)
    message = (
        f"the run site {site} fired at {_rfc3339(run.cron.scheduled_time if run.cron else None)} "
        f"has no Workflow object: {why}; its records are not applied to it (the run "
        f"stays in the site's own records: tideflow-agent runs)"
    )
    log.warning("CronWorkflow %s/%s: %s", cron.namespace, cron.name, message)
    digest = hashlib.sha256(run.name.encode()).hexdigest()[:12]
    ref = {"metadata": {"name": cron.name, "namespace": cron.namespace, "uid": cron.uid}}
    rt.errands.soon(
        rt.kube.event(ref, "CronWorkflow", "RunNameTaken", message, warning=True,
                      once=f"taken.{digest}"),
        f"Event RunNameTaken for {cron.namespace}/{cron.name}",
    )  # fmt: skip


def _owner_of(rt: Any, namespace: str, name: str) -> str | None:
    cr: CronRuntime = rt.cron
    for cron in cr.plan.crons.values():
        if cron.namespace == namespace and name.startswith(f"{cron.name}-"):
            record = rt.records.get((namespace, name))
            if (
                record is not None
                # A fired run's: the site's run uid, not the object's (an ordinary
                # Workflow of such a name is not the CronWorkflow's to count or prune).
                and record.uid != record.object_uid
                and name == f"{cron.name}-{record.site}-{name.rsplit('-', 1)[-1]}"
            ):
                return cron.name
    return None


async def _write_cron_status(rt: Any, cr: CronRuntime, key: tuple[str, str]) -> None:
    """Write the status; sharded, merged with the other shards' sites, conditionally.

    Each shard knows only its own sites' runs and every shard writes the one
    ``status.sites`` list (a merge patch replaces a list whole).  So a shard
    reads the object, keeps the other shards' entries as written, and writes
    with that resourceVersion: if another shard wrote meanwhile the API server
    refuses (409) and this shard reads and merges again.  Nobody's entries go back.
    """
    kube = rt.kube
    namespace, name = key
    owns = rt.shards.owns if rt.shards is not None else None
    for _ in range(STATUS_WRITE_ATTEMPTS):
        try:
            body: dict[str, Any] = {"status": cr.status(key)}
            if owns is not None:
                current = await kube._call(
                    kube.custom.get_namespaced_custom_object,
                    GROUP, VERSION, namespace, CRONWORKFLOWS, name,
                )  # fmt: skip
                body = {
                    "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                    "status": cr.status(key, written=current.get("status"), owns=owns),
                }
            await kube._call(
                kube.custom.patch_namespaced_custom_object_status,
                GROUP, VERSION, namespace, CRONWORKFLOWS, name, body,
                _content_type="application/merge-patch+json",
            )  # fmt: skip
            return
        except NotFound:
            return
        except Conflict:
            continue  # another shard wrote its sites meanwhile: merge again
        except Exception as exc:
            log.warning("could not patch CronWorkflow %s/%s status: %s", *key, exc)
            break
    cr.dirty.add(key)


async def _prune(rt: Any, cr: CronRuntime, key: tuple[str, str]) -> None:
    """Delete finished Workflow objects beyond the history limits, per site."""
    cron = next((c for c in cr.plan.crons.values() if (c.namespace, c.name) == key), None)
    if cron is None:
        return
    namespace = cron.namespace
    keep = {
        "Succeeded": int(cron.spec.get("successfulJobsHistoryLimit", 3)),
        "Failed": int(cron.spec.get("failedJobsHistoryLimit", 1)),
    }
    for site, runs in cr.seen.get(key, {}).items():
        for phase, limit in keep.items():
            done = sorted(
                ((at, name) for name, (at, p) in runs.runs.items() if p == phase), reverse=True
            )
            for _, name in done[limit:]:
                kube = rt.kube
                try:
                    await kube._call(
                        kube.custom.delete_namespaced_custom_object,
                        GROUP, VERSION, namespace, WORKFLOWS, name,
                    )  # fmt: skip
                except NotFound:
                    pass
                except Exception as exc:
                    log.warning("could not prune Workflow %s/%s: %s", namespace, name, exc)
                    continue
                runs.runs.pop(name, None)
                rt.records.pop((namespace, name), None)
                rt.applier.forget(namespace, name)
                log.info(
                    "pruned %s/%s (%s, history limit %d at %s)", namespace, name, phase, limit, site
                )
