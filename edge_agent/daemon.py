"""``tideflow-agent run``: the site daemon that joins the executor to the link.

Messages from the broker are handled one at a time, in arrival order, on the
asyncio loop: schedules are kept for the scheduler (:mod:`edge_agent.scheduler`,
which fires them from the site's clock), assignments become runs (an
assignment already held is answered with a receipt and not run twice),
controls cancel, suspend or resume runs,
acks compact the outbox (an ack beyond the highest seq this process sent is
refused: it would delete records the cloud never saw).  A cancel that
arrives before its assignment (MQTT does not order across topics) leaves a
marker, so the late assignment is cancelled on arrival; markers are bounded
in number and age (see :mod:`edge_agent.store`).  Anything malformed is
counted by a fixed :class:`tideflow.wire.DropReason` and dropped with one log
line; it never reaches the store.

The executor runs whether or not the link is up; the syncer drains the outbox
whenever it is.

Every background task (the inbox, the syncer, the heartbeat, each run's
driver, each write the link callbacks start) is supervised: if one dies, the
daemon logs the cause, says offline, stops, and :meth:`Agent.run` raises it —
``tideflow-agent run`` exits 4 for a full disk, 3 for an unusable database,
1 for anything else.  A daemon with a dead part never limps on reporting
"online".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.executor import Assignment, Executor
from edge_agent.link import (
    BrokerConnection,
    LinkConfig,
    MqttLink,
    agent_subscriptions,
    broker_file_problem,
    state_message,
)
from edge_agent.metrics import AgentMetrics, MetricsServer
from edge_agent.retention import (
    DEFAULT_INTERVAL_SECONDS,
    DEFAULT_RETENTION_SECONDS,
    retention_loop,
)
from edge_agent.scheduler import Scheduler
from edge_agent.state import RunState, TaskState
from edge_agent.stops import STOPPED_EARLY, early_stop_requested, on_stop_signals
from edge_agent.store import CANCEL_MARKER_UID_MAX, Store, StoreError
from edge_agent.sync import SyncConfig, Syncer
from edge_agent.tracing import AgentTracer
from tideflow import __version__, wire
from tideflow.aiotasks import BackgroundTaskDied, Supervisor
from tideflow.failpoints import failpoint
from tideflow.logs import LogBudget
from tideflow.phases import TaskPhase
from tideflow.spec import SpecError, parse_spec

log = logging.getLogger(__name__)


@dataclass
class AgentConfig:
    site: str
    broker: BrokerConnection
    db: Path
    concurrency: int | None = None
    pass_env: list[str] = field(default_factory=list)
    synchronous: str = "FULL"
    heartbeat_seconds: float = 15.0
    max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES
    metrics_port: int | None = None
    tracing: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    sync: SyncConfig = field(default_factory=SyncConfig)
    db_max_bytes: int | None = None  # a fail point: beyond it, writes fail as on a full disk
    retention_seconds: float = DEFAULT_RETENTION_SECONDS
    retention_interval: float = DEFAULT_INTERVAL_SECONDS


class AgentFailure(BackgroundTaskDied):
    """A background task of the agent died of something other than the store."""


class CannotStart(Exception):
    """The agent cannot start as configured (its metrics port taken, its broker's
    password or CA file unusable): it stops with nothing started."""


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.site = config.site
        self.metrics = AgentMetrics()
        self._metrics_server: MetricsServer | None = None
        # Every drop is counted; a flood of them is not a flood of log lines.
        self._drop_log = LogBudget()
        # This process's identity, in every state message and the last will: the
        # cloud orders presence by it and by arrival, never by our clock (decision 0029).
        self.boot = secrets.token_hex(8)
        self.store: Store
        self.executor: Executor
        self.syncer: Syncer
        self.scheduler: Scheduler
        self.link: MqttLink
        self._inbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self.supervisor = Supervisor(
            self.stop, passthrough=(StoreError,), failure_type=AgentFailure
        )
        self._state_cache = state_message(
            self.site, online=True, agentVersion=__version__, boot=self.boot
        )
        self._offline_since: float | None = time.time()

    # --------------------------------------------------------------- running
    async def run(self) -> None:
        cfg = self.config
        # The start-up check of the file (quick_check: seconds on a large one)
        # runs beside the start and the drain, which only read until it passes;
        # every write waits for it, and a corrupt file stops the daemon (exit 3)
        # with nothing written (decision 0024).
        self.store = await Store.open(
            cfg.db, synchronous=cfg.synchronous, max_bytes=cfg.db_max_bytes, check_behind=True
        )
        try:
            if early_stop_requested():  # (while it imported, opened, migrated: stops.py)
                log.info("%s; nothing resumed", STOPPED_EARLY)
                return
            # Before any run resumes: an agent that cannot serve its port or make its
            # link stops with nothing started (it used to resume its runs first, their
            # drivers racing towards their tasks' starts, then close the store under
            # them: a traceback, and the file called corrupt).
            loop = asyncio.get_running_loop()
            if cfg.metrics_port is not None:
                try:
                    self._metrics_server = await self.metrics.serve(cfg.metrics_port)
                except OSError as exc:
                    raise CannotStart(
                        f"--metrics-port {cfg.metrics_port}: cannot listen: {exc.strerror or exc}"
                    ) from None
            try:
                self.link = self._make_link(loop)
            except (OSError, UnicodeDecodeError) as exc:  # (ssl.SSLError is an OSError)
                raise CannotStart(broker_file_problem(cfg.broker, exc)) from None
            self.supervisor.spawn(self.store.checked(), "database-check")
            await self._claim_database()
            self.executor = Executor(
                self.store,
                work_dir=cfg.db.with_name(cfg.db.name + ".work"),
                concurrency=cfg.concurrency,
                pass_env=cfg.pass_env,
                listener=self._on_change,
                tracer=AgentTracer(self.store, self.site) if cfg.tracing else None,
            )
            self.syncer = Syncer(self.store, self.site, self._publish, cfg.sync)
            await self.syncer.load()
            self.scheduler = Scheduler(
                self.store,
                self.executor,
                self.site,
                on_started=self.supervisor.watch,
                on_change=self.syncer.kick,
            )
            await self.scheduler.load()
            if early_stop_requested():
                log.info("%s; nothing resumed", STOPPED_EARLY)
                await self.supervisor.stop()  # (the database's check)
                return
            resumed = await self.executor.recover()
            self.executor.reap_leftovers()  # (idle too: see its docstring)
            for run_id in resumed:  # the drivers recover() started, not yet scheduled
                self.supervisor.watch(self.executor.start(run_id))
            if resumed:
                log.info("resumed %d unfinished run(s)", len(resumed))
            failpoint("runs-resumed")  # (before the stop signals' handlers)
            await self._refresh_state()
            self.link.start()
            with contextlib.suppress(NotImplementedError, RuntimeError):  # (off the main thread)
                on_stop_signals(loop, self._on_signal, self.executor)
            self.supervisor.spawn(self._consume(), "inbox", forever=True)
            self.supervisor.spawn(self.syncer.run(), "sync", forever=True)
            self.supervisor.spawn(self._heartbeat(), "heartbeat", forever=True)
            self.supervisor.spawn(self.scheduler.run(), "scheduler", forever=True)
            self.supervisor.spawn(
                retention_loop(
                    self.store,
                    retention_seconds=cfg.retention_seconds,
                    interval=cfg.retention_interval,
                ),
                "retention",
                forever=True,
            )
            log.info("agent for site %s started (broker %s)", self.site, cfg.broker.url)
            await self._stopping.wait()
            await self._shutdown()
        finally:
            if self._metrics_server is not None:
                await self._metrics_server.close()
            await self.store.close()
        self.supervisor.raise_failure()

    def _make_link(self, loop: asyncio.AbstractEventLoop) -> MqttLink:
        """The link, not started; reads the broker's password and CA files (OSError)."""
        return MqttLink(
            LinkConfig(
                self.config.broker,
                client_id=wire.agent_client_id(self.site),
                subscriptions=agent_subscriptions(self.site),
                will_topic=wire.topic(self.site, wire.STATE),
                will_payload=state_message(
                    self.site, online=False, agentVersion=__version__, boot=self.boot
                ),
            ),
            loop,
            on_message=self._enqueue,
            on_state=self._on_link,
            on_connected_publish=lambda: [
                (wire.topic(self.site, wire.STATE), self._state_cache, True)
            ],
        )

    async def _shutdown(self) -> None:
        # First: from now on an attempt that ends is Interrupted, even one whose
        # task died of the same stop signal (systemd signals every process).
        self.executor.request_stop()
        await self.supervisor.stop()
        offline = state_message(self.site, online=False, agentVersion=__version__, boot=self.boot)
        await asyncio.get_running_loop().run_in_executor(
            None, self.link.stop, [(wire.topic(self.site, wire.STATE), offline, True)]
        )
        try:
            await self.executor.shutdown()
        except Exception as exc:  # the first failure is what the exit reports
            log.warning("while stopping the runs: %s", exc)

    def stop(self) -> None:
        self._stopping.set()

    def _on_signal(self) -> None:
        """First SIGTERM/SIGINT: stop cleanly.  Second: stop at once, no grace."""
        if self._stopping.is_set():
            log.warning("second stop signal: killing the running attempts now")
            self.executor.abort()
        self._stopping.set()

    async def _claim_database(self) -> None:
        owner = await self.store.get_meta("site")
        if owner is None:
            await self.store.set_meta("site", self.site)
        elif owner != self.site:
            raise StoreError(
                f"{self.config.db} belongs to site {owner!r}, not {self.site!r}; "
                "use that site's name or another database"
            )

    # ------------------------------------------------------------- link side
    def _enqueue(self, topic: str, data: bytes) -> None:
        self._inbox.put_nowait((topic, data))

    def _publish(self, topic: str, payload: bytes) -> bool:
        return self.link.publish(topic, payload)

    def _on_link(self, connected: bool) -> None:
        self.metrics.connected.set(1 if connected else 0)
        self._offline_since = None if connected else time.time()
        self.syncer.link_changed(connected)
        if not self._stopping.is_set():
            self.supervisor.spawn(self._record_link(connected), "record-link")

    async def _record_link(self, connected: bool) -> None:
        await self.store.set_meta("link_state", "online" if connected else "offline")
        await self.store.set_meta("link_changed_at", str(time.time()))
        log.info("link %s", "up" if connected else "down")

    async def _refresh_state(self) -> bytes:
        stats = await self.store.outbox_stats()
        m = self.metrics
        m.outbox_depth.set(stats.depth)
        m.outbox_bytes.set(stats.bytes)
        m.last_acked_seq.set(stats.last_acked_seq)
        m.sync_lag.set((stats.last_seq or stats.last_acked_seq) - stats.last_acked_seq)
        m.running.set(self.executor.running_count())
        m.offline_seconds.set(time.time() - self._offline_since if self._offline_since else 0)
        self._state_cache = state_message(
            self.site,
            online=True,
            agentVersion=__version__,
            boot=self.boot,
            running=self.executor.running_count(),
            outboxDepth=stats.depth,
            lastAckedSeq=stats.last_acked_seq,
            labels=self.config.labels,
            epoch=self.syncer.epoch,
            schedules=[row.uid for row in self.scheduler.schedules()][: wire.MAX_STATE_SCHEDULES],
        )
        return self._state_cache

    async def _heartbeat(self) -> None:
        while True:
            payload = await self._refresh_state()
            self._publish_retained_state(payload)
            await asyncio.sleep(self.config.heartbeat_seconds)

    def _publish_retained_state(self, payload: bytes) -> None:
        self.link.publish(wire.topic(self.site, wire.STATE), payload, retain=True)

    # ------------------------------------------------------------- messages
    async def _consume(self) -> None:
        while True:
            topic, data = await self._inbox.get()
            try:
                await self.handle(topic, data)
            except StoreError:
                raise
            except Exception:  # a bug must not stop the site; the message is dropped
                log.exception("message on %s could not be handled; dropped", topic)
                self.metrics.dropped.labels(wire.DropReason.ERROR.value).inc()

    async def handle(self, topic: str, data: bytes) -> None:
        try:
            envelope, payload = wire.decode(topic, data, max_bytes=self.config.max_message_bytes)
            if envelope.site != self.site:
                raise wire.WireError(
                    f"message for site {envelope.site!r} reached {self.site!r}",
                    wire.DropReason.WRONG_SITE,
                )
        except wire.WireError as exc:
            self._drop(topic, exc.reason, str(exc))
            return
        if isinstance(payload, wire.AssignPayload):
            await self._assign(payload, envelope.traceparent)
        elif isinstance(payload, wire.ControlPayload):
            await self._control(payload)
        elif isinstance(payload, wire.SchedulePayload):
            await self.scheduler.on_message(payload)
        elif isinstance(payload, wire.AckPayload):
            # Not awaited here: the ack opens the send window at once (its first
            # step, in arrival order), while its compaction commits behind the
            # next messages; acks that arrive during one commit share the next.
            self.supervisor.spawn(self._ack(topic, payload), "ack")
        else:
            self._drop(topic, wire.DropReason.WRONG_KIND, f"unexpected {envelope.kind!r} message")

    async def _ack(self, topic: str, payload: wire.AckPayload) -> None:
        try:
            accepted = await self.syncer.on_ack(
                payload.through, resend=payload.resend, epoch=payload.epoch
            )
        except StoreError:
            raise
        except Exception:  # as in _consume: a bug must not stop the site
            log.exception("ack on %s could not be handled; dropped", topic)
            self.metrics.dropped.labels(wire.DropReason.ERROR.value).inc()
            return
        if not accepted:
            self._drop(
                topic,
                wire.DropReason.ACK_BEYOND_SENT,
                f"ack through {payload.through} is beyond the highest seq sent "
                f"({self.syncer.max_sent}); nothing deleted",
            )

    def _drop(self, topic: str, reason: wire.DropReason, detail: str) -> None:
        self.metrics.dropped.labels(reason.value).inc()
        held = self._drop_log.allow(reason.value)
        if held is not None:
            more = f" ({held} more dropped for this reason since the last line)" if held else ""
            log.warning("dropped message on %s (%s): %s%s", topic, reason.value, detail[:300], more)

    def _receipt(self, uid: str, generation: int, phase: str) -> None:
        payload = wire.ReceiptPayload(uid=uid, generation=generation, phase=phase)
        self._publish(
            wire.topic(self.site, wire.EVENTS), wire.encode(wire.KIND_RECEIPT, self.site, payload)
        )

    async def _assign(self, payload: wire.AssignPayload, traceparent: str | None) -> None:
        held = await self.store.find_run(payload.uid, payload.generation)
        if held is not None:
            self._receipt(payload.uid, payload.generation, held.phase)
            return
        try:
            spec = parse_spec(payload.spec)
        except SpecError as exc:
            self._drop(
                wire.topic(self.site, wire.ASSIGN),
                wire.DropReason.INVALID_SPEC,
                f"invalid spec: {exc}",
            )
            self._receipt(payload.uid, payload.generation, "Rejected")
            return
        if await self.syncer.over_budget():
            log.error(
                "outbox over its budget: refusing assignment %s/%s until the link drains it",
                payload.namespace,
                payload.name,
            )
            self._receipt(payload.uid, payload.generation, "Rejected")
            return
        assignment = Assignment(
            payload.uid, payload.generation, payload.namespace, payload.name, spec, traceparent
        )
        run, created = await self.executor.submit(assignment)
        if not created:
            self._receipt(payload.uid, payload.generation, run.phase)
            return
        if await self.store.cancel_marker(payload.uid) is not None:
            await self.executor.cancel(run.run_id, "cancelled before the assignment arrived")
            await self.store.forget_cancel(payload.uid)
        self.supervisor.watch(self.executor.start(run.run_id))
        self.syncer.kick()

    async def _control(self, payload: wire.ControlPayload) -> None:
        runs = await self.store.runs_for_uid(payload.uid, payload.generation)
        if payload.action == "cancel":
            if not runs and len(payload.uid) <= CANCEL_MARKER_UID_MAX:
                await self.store.remember_cancel(payload.uid, payload.reason or "cancel")
            for run in runs:
                await self.executor.cancel(run.run_id, payload.reason or "cancelled by the cloud")
        else:
            for run in runs:
                await self.executor.suspend(run.run_id, payload.action == "suspend")
        self.syncer.kick()

    # ------------------------------------------------------------- executor
    def _on_change(self, run: RunState, task: TaskState | None) -> None:
        finished = (TaskPhase.SUCCEEDED, TaskPhase.FAILED, TaskPhase.RETRYING, TaskPhase.CANCELLED)
        if task is not None and task.phase in finished and task.attempt and task.started_at:
            self.metrics.tasks.labels(task.phase).inc()
            self.metrics.task_seconds.observe(max(0.0, time.time() - task.started_at))
        self.syncer.kick()
