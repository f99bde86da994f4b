"""One operator process: its collaborators, wired together, and what follows an assignment.

How the pieces fit:

* :class:`Runtime` is made by kopf's startup handler (:mod:`.handlers`) with
  its collaborators passed in — the API client (:class:`~.kube.Kube`) and
  the MQTT bridge (:class:`~.bridge.CloudBridge`) — and put in kopf's
  ``memo``, where every handler finds it.  Tests pass fakes the same way.
* It composes the parts, each in its own module: :mod:`.admission` (a new
  Workflow validated, placed, marked Assigned, sent), :mod:`.status` (a
  status rendered and written), :mod:`.sites` (EdgeSites and what their
  agents report), :mod:`.housekeeping` (deadlines, held-back writes, acks,
  the reconcile of missed deletions) and :mod:`.cron` (CronWorkflows).
* The Workflows' watch events are read by :mod:`.watch` (admission, spec
  edits, deletion, the finalizer of an older operator; kopf has no changing
  handler for Workflows and writes nothing on them, decision 0019).
* What happens to a run after admission is here: the bridge applied the
  sites' records (:meth:`Runtime.persist`: each changed status written once
  per batch, an Event when a run fails, and only then the site's ack), spec
  edits (refused but for ``suspend``), and deletion (cancel at the site).
* Nothing is kept only in memory that cannot be rebuilt: on start the views
  come back from ``.status``, each site's applied mark from its own
  ``state`` message, and what each site was sent from the ledger
  (:mod:`.ledger`), which is how a Workflow deleted while no operator ran is
  still cancelled at its site.
* Operator shards (:mod:`.shards`, ``--shard-count`` > 1): the runtime asks
  its :class:`~.shards.ShardRouter` whether a Workflow is this shard's to
  admit (and on which site), restores only its own sites' runs and ledger,
  and its bridge follows only its own sites.  With one shard none of it is
  made.
* Two operators cannot both act unseen: the Assigned status is written only
  over the version admission was decided on, later status writes carry the
  resourceVersion they were based on, and Events are named by Workflow uid
  and reason so a second copy is refused.

A Workflow is a run, not a template: once assigned, spec edits other than
``suspend`` are refused with a condition and an Event.  Deleting a Workflow
cancels its run at the site; an offline site never blocks the deletion (the
cancel waits in the broker and is re-sent when the site comes back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tideflow import wire
from tideflow.aiotasks import BackgroundTaskDied, Supervisor
from tideflow.mqtt import BrokerConnection
from tideflow.phases import RUN_DONE, RunPhase

from . import cron
from .admission import QUIET_SECONDS, Admission, AdmissionGate, Outcome
from .applier import ApplyResult
from .bridge import BridgeConfig, CloudBridge
from .heap import HeapTrim
from .housekeeping import Housekeeper, cancel_at_site
from .kube import Conflict, Kube
from .ledger import Ledger, spec_digest
from .model import CloudRecord, Errands, Held, Key, newer, watched
from .placement import SiteCandidate
from .shards import Claim, ShardRouter, ShardSpec
from .sites import Sites
from .status import StatusWriter
from .telemetry import SpanForwarder, exporter_from_environment
from .watch import WorkflowWatch

log = logging.getLogger(__name__)

# The phases a Workflow's Event says: the ones a user acts on.  Assigned, Running
# and Succeeded are in the status (and kubectl get); an Event for each was three
# of a fleet's eight API writes per Workflow (decision 0019).
EVENT_PHASES = frozenset({RunPhase.FAILED})


@dataclass
class OperatorConfig:
    """Every setting of one operator process; each has a flag and a ``TIDEFLOW_*`` (cli.py)."""

    broker: BrokerConnection
    mqtt5: bool = True  # False: MQTT 3.1.1, for brokers without 5 (RabbitMQ < 3.13)
    auto_register: bool = True
    agent_labels: bool = True  # False: an agent's labels only at its site's registration
    client_id: str = "tideflow-operator"  # the CLI adds host, pid, random (cli.unique_client_id)
    status_max_tasks: int = 500
    housekeeping_seconds: float = 1.0
    namespaces: list[str] = field(default_factory=list)  # empty: all namespaces
    # The operator's own namespace: its Lease and its ledger of assignments.
    ledger_namespace: str = "default"
    # How often what the sites were sent is compared with the Workflows that exist.
    reconcile_seconds: float = 60.0
    # A site silent this long is offline (its will may be lost with a broker node).
    site_silence_seconds: float = 90.0
    leader_election: bool = True
    lease_name: str = "tideflow-operator"
    peering: str | None = None  # kopf peering object name (None: standalone)
    liveness: str | None = None  # e.g. http://0.0.0.0:8080/healthz
    metrics_port: int | None = None
    # Finished Workflows are deleted this long after finishing unless their own
    # spec.ttlSecondsAfterFinished says otherwise (None: kept); ttl.py.
    ttl_seconds_after_finished: int | None = None
    # Operator shards (shards.py): this process is shard_index of shard_count;
    # a count of 1 is the single operator, exactly as without shards.
    shard_index: int = 0
    shard_count: int = 1

    def bridge_config(self) -> BridgeConfig:
        return BridgeConfig(
            self.broker,
            client_id=self.client_id,
            mqtt5=self.mqtt5,
            site_silence_seconds=self.site_silence_seconds,
        )


class OperatorFailure(BackgroundTaskDied):
    """A background task of the operator died: the operator exits non-zero."""


class Runtime:
    """Everything one operator process holds; made by the startup handler, kept in ``memo``."""

    def __init__(
        self,
        config: OperatorConfig,
        *,
        kube: Kube,
        bridge: CloudBridge,
        spans: SpanForwarder | None = None,
        stop: Callable[[], None] = lambda: None,
        quiet_seconds: float = QUIET_SECONDS,
    ) -> None:
        self.config = config
        self.kube = kube
        self.bridge = bridge
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start()
        # Sharded (count > 1): only this shard's sites and their Workflows (shards.py).
        self.shards: ShardRouter | None = None
        if config.shard_count > 1:
            self.shards = ShardRouter(ShardSpec(config.shard_index, config.shard_count))
            self.shards.on_new_site = bridge.follow
            self.shards.on_moved = lambda site, old, new: stop()
            bridge.shard = self.shards
        self.applier = bridge.applier
        self.held = Held()
        self.records = self.held.records  # (cron.py and the metrics read these)
        self.dirty = self.held.dirty
        self.errands = Errands()
        self.spans = spans if spans is not None else SpanForwarder(exporter_from_environment())
        self.ledger = Ledger(kube, config.ledger_namespace)
        self.cron = cron.CronRuntime()
        self.status = StatusWriter(
            kube, self.applier, bridge.presence, self.ledger, self.spans, self.held,
            max_tasks=config.status_max_tasks, awaiting=self.cron.awaiting_key,
        )  # fmt: skip
        self.sites = Sites(
            kube, bridge.presence, self.applier, self.status, self.held,
            auto_register=config.auto_register, agent_labels=config.agent_labels,
        )  # fmt: skip
        bridge.persist = self.persist
        # EdgeSites are written off the bridge worker's path (sites.py: the writers).
        bridge.on_presence, bridge.on_epoch = self.sites.offer, self.sites.on_epoch
        self.gate = AdmissionGate(quiet_seconds)
        self.admission = Admission(
            kube, bridge, self.applier, self.ledger, self.status, self.sites, self.held,
            self.gate, self.errands,
        )  # fmt: skip
        self.watch = WorkflowWatch(
            self.admission, self.held, self.gate, self.errands, kube,
            admit=self.admit, observed=self.observed, gone=self.gone,
            sites_version=lambda: self.sites.version,
        )  # fmt: skip
        if self.shards is not None:
            self.admission.candidates = self._shard_candidates
        self.housekeeper = Housekeeper(
            kube, bridge, self.applier, self.ledger, self.status, self.held, self.deleted,
            namespaces=config.namespaces, every_seconds=config.housekeeping_seconds,
            reconcile_seconds=config.reconcile_seconds, retry=self.watch.retry,
            heap=HeapTrim(),
        )  # fmt: skip
        # A worker that dies stops the operator (non-zero exit), never a silent limp.
        self.supervisor = Supervisor(stop, failure_type=OperatorFailure)

    @classmethod
    def connect(cls, config: OperatorConfig, stop: Callable[[], None] = lambda: None) -> Runtime:
        """The production collaborators: the cluster's API server and the broker."""
        return cls(config, kube=Kube(), bridge=CloudBridge(config.bridge_config()), stop=stop)

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        # The broker's files first, before anything is read or written: the CLI
        # checked them before the Lease, but a standby may wait long for it, and a
        # file spoiled meanwhile failed only when the link was made, after the
        # ledger and the listing (BrokerFileError: one line naming the option).
        self.bridge.config.broker.check_usable()
        # The loop its state is read on (the metrics' scrapes: metrics.py).
        self.loop = asyncio.get_running_loop()
        # Views must be back from .status before the first record arrives:
        # a record applied to a blank view would be lost when the view loads.
        if self.shards is not None:
            for name, labels in (await self.kube.list_edgesites()).items():
                self.shards.site_seen(name, labels, starting=True)
        await self.ledger.load()
        if self.shards is not None:
            self.ledger.keep_sites(self.shards.owns)
            for site in self.ledger.entries:
                self.bridge.follow(site)
        items = await self.kube.list_workflows(self.config.namespaces)
        for item in items:
            status = dict(item.get("status") or {})
            if self.shards is not None and not self.shards.owns(str(status.get("site"))):
                continue  # another shard's (or not assigned yet)
            if status.get("assignedGeneration"):
                # A Workflow being deleted (held by an older operator's finalizer) is
                # restored too: its first watch event cancels its run (watch.py).
                self.admission.restore(item, status)
        if self.shards is not None:
            for record in self.records.values():
                self.bridge.follow(record.site)
        existing = {str(item["metadata"]["uid"]) for item in items}
        self.housekeeper.cancel_gone(
            existing, self.housekeeper.my_entries(), "deleted while the operator was away"
        )
        await cron.attach(self)  # before the first record: fired runs must be recognised
        await self.bridge.start()
        if self.bridge.worker is not None:
            self.supervisor.watch(self.bridge.worker, forever=True)
        self.housekeeper.last_reconcile = time.monotonic()
        self.supervisor.spawn(self.housekeeper.run(), "housekeeping", forever=True)
        self.cron.start(self)

    async def stop(self) -> None:
        await self.watch.stop()
        await self.cron.stop()
        self.spans.shutdown()
        await self.supervisor.stop()
        await self.errands.wait(limit_seconds=5)
        await self.bridge.stop()
        await self.sites.stop()

    # ------------------------------------------------------------- entry points
    async def admit(self, body: Mapping[str, Any]) -> Outcome:
        site = None
        if self.shards is not None:
            mine, site = await self._shard_claim(body)
            if not mine:
                return Outcome.HELD  # another shard's (or handed over to it)
        return await self.admission.admit(body, site=site)

    async def _shard_claim(self, body: Mapping[str, Any]) -> tuple[bool, str | None]:
        """Sharded: is this Workflow ours to admit, and on which site (shards.py)."""
        assert self.shards is not None
        meta = body["metadata"]
        record = self.records.get((meta["namespace"], meta["name"]))
        if record is not None and record.uid == meta["uid"]:
            return True, None  # ours already
        decision, placement = self.shards.decide(body, self._shard_candidates_all)
        if placement is not None:
            # Chosen on another shard's site: hand it over through the status.
            # (A conflict: changed meanwhile; the next watch event decides again.)
            with contextlib.suppress(Conflict):
                await self.status.patch(
                    meta["namespace"], meta["name"], placement, urgent=True,
                    resource_version=meta.get("resourceVersion"),
                )  # fmt: skip
            return False, None
        return decision.claim is Claim.MINE, decision.site

    def _shard_candidates_all(self) -> list[SiteCandidate]:
        assert self.shards is not None
        return self.shards.candidates(self.sites.candidates(), self.sites.known)

    def _shard_candidates(self) -> list[SiteCandidate]:
        """Admission's own choice (no placer's): never another shard's site."""
        assert self.shards is not None
        return [c for c in self.sites.candidates() if self.shards.owns(c.name)]

    async def event(self, kind: str | None, body: Mapping[str, Any]) -> None:
        """A watch event of a Workflow (kopf's event handler)."""
        await self.watch.event(kind, body)

    async def write_status(self, key: Key) -> bool:
        return await self.status.write(key)

    async def reconcile(self) -> int:
        return await self.housekeeper.reconcile()

    def public_phase(self, key: Key) -> str:
        return self.status.public_phase(key)

    # ------------------------------------------------------------- site records
    async def persist(self, result: ApplyResult) -> None:
        """The bridge applied records: write each changed status once, post Events.

        Progress alone is written at most every ``PROGRESS_SECONDS`` per
        Workflow, and a Workflow whose last status patch was slow (a huge one:
        the API server validates the whole object on every write) at most every
        few patch durations; phase changes and ``suspended`` go at once; the
        rest waits in ``dirty`` (and its records' ack with it) for housekeeping.
        Back-to-back writes of one object waste the API server's time on
        progress nobody reads that fast.  A Failed run's Event goes after, off
        the ack's path (``EVENT_PHASES``: no Event for the phases nobody acts on).
        """
        await self.gate.settled()
        await cron.materialize(self, result.changed)  # objects for fired runs, before the ack
        now = time.monotonic()
        # Written at once: phase changes, and a run suspended or resumed at its
        # site; progress alone waits for the record's write_after (housekeeping).
        moved = {change.key for change in result.transitions}
        for key in result.changed:
            view, record = self.applier.view(*key), self.records.get(key)
            written = record.written if record is not None else None
            suspended = None if written is None else bool(written.suspended)
            if view is not None and suspended is not None and suspended != view.suspended:
                moved.add(key)
        due = []
        for key in result.changed:
            record = self.records.get(key)
            if record is not None and key not in moved and now < record.write_after:
                self.dirty.add(key)
            else:
                due.append(key)
        await asyncio.gather(*(self.status.write(key) for key in due))
        await self.status.export_traces([c.key for c in result.transitions if c.new in RUN_DONE])
        for change in result.transitions:
            record = self.records.get(change.key)
            if record is None or record.observer or change.new not in EVENT_PHASES:
                continue
            message = f"{change.old} -> {change.new}"
            if change.message:
                message += f": {change.message}"
            # Named by phase: a retry, or a second operator, cannot post it twice.
            # Off the ack path: an Event is for people, and posting hundreds of them
            # one by one before the ack made a fleet's agents send everything again.
            self.errands.soon(
                self.kube.event(
                    record.body_ref, "Workflow", change.new, message,
                    warning=True, once=change.new.lower(),
                ),
                f"Event {change.new} for {change.key[0]}/{change.key[1]}",
            )  # fmt: skip

    # ------------------------------------------------------------- spec edits
    async def spec_seen(self, body: Mapping[str, Any]) -> None:
        """A new spec generation of an assigned Workflow, seen on the watch.

        ``suspend`` is applied (sent to the site when it differs from what the
        site was last told); any other change is refused with a condition and
        an Event: a Workflow is a run, not a template.  What counts as a change
        is a digest of the spec against the assigned one's (ledger.spec_digest:
        ``suspend`` and cloud-only fields left out), so an edit made while no
        operator ran is judged too (``observedGeneration`` says what an
        operator last handled).  Idempotent: a generation is handled once.
        """
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        record = self.records.get(key)
        generation = int(meta.get("generation") or 1)
        if record is None or record.uid != meta.get("uid") or record.observer:
            return
        if generation <= record.seen_generation:
            return
        record.seen_generation = generation
        spec = body.get("spec") or {}
        patch: dict[str, Any] = {"observedGeneration": generation}
        if record.assigned_digest is not None and spec_digest(spec) != record.assigned_digest:
            await self._keep_unconfirmed(record)
            message = (
                "a Workflow is a run, not a template: spec changes after assignment are "
                "ignored (only spec.suspend applies); create a new Workflow instead"
            )
            patch["conditions"] = self.status.conditions(record, refused=message)
            await self.kube.event(
                dict(body), "Workflow", "SpecChangeRefused", message, warning=True,
                once=f"refused-g{generation}",
            )  # fmt: skip
        await self._apply_suspend(body, record, bool(spec.get("suspend", False)))
        await self.status.patch(*key, patch)

    async def _keep_unconfirmed(self, record: CloudRecord) -> None:
        """Not yet confirmed by the site: keep what was sent, so a restart re-sends that."""
        sent = self.bridge.unconfirmed_assignment(record.site, record.uid)
        if sent is None:
            return
        try:
            await self.ledger.keep_assigned(record.site, record.uid, sent)
        except Exception as exc:
            log.warning(
                "%s/%s: could not keep the assignment: %s", *record.key, exc,
                extra=record.log_extra,
            )  # fmt: skip

    async def _apply_suspend(self, body: Mapping[str, Any], record: CloudRecord, now: bool) -> None:
        """Tell the site when ``spec.suspend`` differs from what it was last told (idempotent)."""
        if now == record.suspend:
            return
        record.suspend = now
        generation = int(body["metadata"].get("generation") or 1)
        action = "suspend" if now else "resume"
        self.bridge.control(record.site, wire.ControlPayload(action=action, uid=record.uid))
        await self.kube.event(
            dict(body), "Workflow", "Suspended" if now else "Resumed",
            f"{action} sent to site {record.site}", once=f"{action}-g{generation}",
        )  # fmt: skip

    def observed(self, body: Mapping[str, Any]) -> None:
        """A watch event of a held Workflow: note its version; a status not ours is suspect.

        A status that differs from what this process last wrote, at a newer
        version than that write (a hand edit, or another writer), is written
        over from this process's view at the next housekeeping round.
        """
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        record = self.records.get(key)
        if record is None or record.uid != meta.get("uid"):
            return
        if int(meta.get("generation") or 1) > record.seen_generation:
            self.errands.soon(self.spec_seen(body), "spec of {}/{}".format(*key))
        version = meta.get("resourceVersion")
        if not newer(version, record.resource_version):
            return
        record.resource_version = version
        if record.written is not None and watched(body.get("status") or {}) != record.written:
            self.held.suspect.add(key)

    # ------------------------------------------------------------- deletion
    async def deleted(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        record = self.records.pop(key, None)
        view = self.applier.view(*key)
        if record is not None and (view is None or not view.done):
            if cancel_at_site(self.bridge, record.site, record.uid, "Workflow deleted"):
                self.ledger.discard(record.site, record.uid)
            # else: the ledger keeps it; the periodic reconcile sends the cancel again
        elif record is not None:
            self.ledger.discard(record.site, record.uid)
        if record is not None:
            self.bridge.forget_assignment(record.site, record.uid)
        self.applier.forget(*key)
        self.dirty.discard(key)
        self.admission.forget(key)

    async def gone(self, body: Mapping[str, Any]) -> None:
        """The Workflow is deleted (or being deleted): cancel its run if this process holds it."""
        meta = body["metadata"]
        record = self.records.get((meta["namespace"], meta["name"]))
        if record is not None and record.uid == meta["uid"]:
            await self.deleted(body)
