"""Simulated edge sites for ``bench/fleet.py``: many sites per process, the real protocol.

Each simulated site is what the operator sees of a real agent, made from the
agent's own parts wherever a part is not a process or a database:

* the link is :class:`tideflow.mqtt.MqttLink` configured exactly as
  ``edge_agent.daemon`` configures it: client id ``tideflow-agent-<site>``,
  persistent session (MQTT 3.1.1, ``clean_session=False``), the retained
  offline last will, username and password file, the agent's subscriptions,
  reconnect with the agent's capped exponential backoff and full jitter
  (``LinkConfig`` defaults: attempt n waits U(0, 0.5 s * 2^n), at least
  0.25 s, at most 30 s);
* the outbox is drained by the agent's :class:`edge_agent.sync.Syncer`
  (batches, window, resend after ``ack_timeout`` of silence and on every
  reconnect, acks checked against the highest seq sent and the epoch) over an
  in-memory store (:class:`MemoryOutbox`) instead of SQLite;
* records are built by the agent's :class:`edge_agent.state.RunState` /
  ``TaskState`` ``to_record``; a run reports what a real run of the same spec
  reports: run Pending, run Running, each task Running then Succeeded (in
  dependency order, ``--task-seconds`` each, no process), run Succeeded;
* an assignment already held is answered with a receipt, as the agent does,
  and counted (the fleet benchmark checks no run started twice); a cancel
  ends the run Cancelled; heartbeats every ``heartbeat_seconds`` publish the
  agent's retained ``state`` message.

One process runs many sites on one asyncio loop (each link has its paho
thread, as in the agent).  It prints one JSON status line on stdout every
``status_seconds`` (sites connected, records not yet acknowledged, runs) and,
on SIGTERM, stops every link as the agent does (retained offline state), writes
its log (every run: uid, generation, its records' seqs; every site: epoch,
last seq, acked seq, duplicate assignments) to ``--log`` and exits.

Run by ``bench/fleet.py`` as ``python -m bench.fleet_sim CONFIG.json``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import random
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from edge_agent.link import agent_subscriptions, state_message
from edge_agent.state import RunState, TaskState, record_json
from edge_agent.store import OutboxRecord, OutboxStats
from edge_agent.sync import SyncConfig, Syncer
from tideflow import __version__, wire
from tideflow.mqtt import BrokerConnection, LinkConfig, MqttLink
from tideflow.phases import RunPhase, TaskPhase

log = logging.getLogger("fleet-sim")


class MemoryOutbox:
    """The part of :class:`edge_agent.store.Store` the :class:`Syncer` uses, in memory."""

    def __init__(self) -> None:
        self._epoch = secrets.token_hex(12)
        self.records: list[OutboxRecord] = []  # unacknowledged, seq ascending
        self.last_seq = 0
        self.last_acked = 0
        self.bytes = 0

    def append(self, kind: str, body: dict[str, Any]) -> int:
        self.last_seq += 1
        text = record_json(body)
        self.records.append(OutboxRecord(self.last_seq, kind, text))
        self.bytes += len(text)
        return self.last_seq

    async def epoch(self) -> str:
        return self._epoch

    async def outbox_stats(self) -> OutboxStats:
        first = self.records[0].seq if self.records else None
        return OutboxStats(
            len(self.records), self.bytes, first, self.last_seq or None, self.last_acked
        )

    async def get_meta(self, key: str) -> str | None:
        return str(self.last_acked) if key == "last_acked_seq" else None

    @property
    def acked_mark(self) -> int:
        """The stored acked mark, as ``Store.acked_mark`` keeps it after each ack."""
        return self.last_acked

    async def ack(self, seq: int) -> int:
        if seq <= self.last_acked:
            return 0
        seq = min(seq, self.last_seq)
        keep = [r for r in self.records if r.seq > seq]
        removed = len(self.records) - len(keep)
        self.bytes -= sum(len(r.body) for r in self.records if r.seq <= seq)
        self.records = keep
        self.last_acked = seq
        return removed

    async def outbox_batch(
        self, seq: int, *, max_count: int = 500, max_bytes: int = 256 * 1024
    ) -> list[tuple[int, str, str]]:
        """What the syncer sends next, as ``(seq, kind, body)``, like ``Store.outbox_batch``."""
        batch = await self.outbox_after(seq, max_count=max_count, max_bytes=max_bytes)
        return [(record.seq, record.kind, record.body) for record in batch]

    async def outbox_after(
        self, seq: int, *, max_count: int = 500, max_bytes: int = 256 * 1024
    ) -> list[OutboxRecord]:
        batch: list[OutboxRecord] = []
        size = 0
        for record in self.records:
            if record.seq <= seq:
                continue
            size += len(record.body) + 32
            if batch and (size > max_bytes or len(batch) >= max_count):
                break
            batch.append(record)
        return batch


@dataclass
class SimRun:
    state: RunState
    tasks: list[TaskState]
    order: list[str]
    seqs: list[int] = field(default_factory=list)
    cancel: asyncio.Event = field(default_factory=asyncio.Event)


def _order(spec: dict[str, Any]) -> list[str]:
    """Task names in an order that respects ``dependsOn`` (the spec was validated by the cloud)."""
    deps = {t["name"]: list(t.get("dependsOn") or []) for t in spec.get("tasks") or []}
    done: list[str] = []
    left = dict(deps)
    while left:
        ready = [n for n, d in left.items() if all(x in done for x in d)]
        if not ready:  # not a DAG: the cloud would have refused it; run the rest as listed
            ready = list(left)
        for name in ready:
            done.append(name)
            left.pop(name)
    return done


class SimSite:
    """One site: its link, its outbox and syncer, its runs."""

    def __init__(self, sim: Simulator, site: str) -> None:
        self.sim = sim
        self.site = site
        self.outbox = MemoryOutbox()
        cfg = sim.config
        self.syncer = Syncer(
            self.outbox,  # type: ignore[arg-type]  # the Store methods Syncer calls
            site,
            self._publish,
            SyncConfig(ack_timeout=float(cfg.get("ack_timeout", 10.0))),
        )
        self.runs: dict[tuple[str, int], SimRun] = {}
        self.duplicate_assignments = 0
        self.controls = 0
        self.dropped = 0
        self.connects = 0
        self.link: MqttLink | None = None
        # Set by SIGUSR1 (the broker is about to restart): (last seq, connects) then.
        self.mark: tuple[int, int] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        cfg = self.sim.config
        password_dir = cfg.get("password_dir")
        self.link = MqttLink(
            LinkConfig(
                BrokerConnection(
                    cfg["broker"],
                    username=self.site if password_dir else None,
                    password_file=Path(password_dir) / self.site if password_dir else None,
                ),
                client_id=wire.agent_client_id(self.site),
                subscriptions=agent_subscriptions(self.site),
                will_topic=wire.topic(self.site, wire.STATE),
                will_payload=state_message(self.site, online=False, agentVersion=__version__),
            ),
            loop,
            on_message=self._on_message,
            on_state=self._on_link,
            on_connected_publish=lambda: [(wire.topic(self.site, wire.STATE), self._state(), True)],
        )
        self.link.start()

    # ------------------------------------------------------------- link
    def _publish(self, topic: str, payload: bytes) -> bool:
        return self.link is not None and self.link.publish(topic, payload)

    def _on_link(self, connected: bool) -> None:
        if connected:
            self.connects += 1
        self.syncer.link_changed(connected)

    def _state(self) -> bytes:
        running = sum(1 for r in self.runs.values() if not r.state.done)
        return state_message(
            self.site, online=True, agentVersion=__version__, running=running,
            outboxDepth=len(self.outbox.records), lastAckedSeq=self.outbox.last_acked,
            epoch=self.syncer.epoch, schedules=[],
        )  # fmt: skip

    def heartbeat(self) -> None:
        self._publish_retained(self._state())

    def _publish_retained(self, payload: bytes) -> None:
        if self.link is not None:
            self.link.publish(wire.topic(self.site, wire.STATE), payload, retain=True)

    def _on_message(self, topic: str, data: bytes) -> None:
        try:
            _envelope, payload = wire.decode(topic, data)
        except wire.WireError as exc:
            self.dropped += 1
            log.warning("%s: dropped message on %s: %s", self.site, topic, exc)
            return
        if isinstance(payload, wire.AssignPayload):
            self._assign(payload)
        elif isinstance(payload, wire.ControlPayload):
            self.controls += 1
            for (uid, _gen), run in self.runs.items():
                if uid == payload.uid and payload.action == "cancel":
                    run.cancel.set()
        elif isinstance(payload, wire.AckPayload):
            self.sim.spawn(self.syncer.on_ack(payload.through, resend=payload.resend,
                                              epoch=payload.epoch))  # fmt: skip

    def _assign(self, payload: wire.AssignPayload) -> None:
        key = (payload.uid, payload.generation)
        held = self.runs.get(key)
        if held is not None:
            self.duplicate_assignments += 1
            receipt = wire.ReceiptPayload(
                uid=payload.uid, generation=payload.generation, phase=held.state.phase
            )
            self._publish(
                wire.topic(self.site, wire.EVENTS),
                wire.encode(wire.KIND_RECEIPT, self.site, receipt),
            )
            return
        now = time.time()
        state = RunState(
            run_id=f"{payload.uid}-{payload.generation}", uid=payload.uid,
            generation=payload.generation, namespace=payload.namespace, name=payload.name,
            spec_json="{}", created_at=now,
        )  # fmt: skip
        order = _order(payload.spec)
        run = SimRun(state, [TaskState(state.run_id, n) for n in order], order)
        self.runs[key] = run
        self._record(run, wire.RUN_RECORD, state.to_record())
        self.sim.spawn(self._drive(run))

    def _record(self, run: SimRun, kind: str, body: dict[str, Any]) -> None:
        run.seqs.append(self.outbox.append(kind, body))
        self.syncer.kick()

    async def _drive(self, run: SimRun) -> None:
        state = run.state
        state.phase, state.started_at = RunPhase.RUNNING, time.time()
        self._record(run, wire.RUN_RECORD, state.to_record())
        seconds = float(self.sim.config.get("task_seconds", 0.5))
        for task in run.tasks:
            task.phase, task.attempt, task.started_at = TaskPhase.RUNNING, 1, time.time()
            self._record(run, wire.TASK_RECORD, task.to_record(state))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await run.cancel.wait()
            task.finished_at = time.time()
            if run.cancel.is_set():
                task.phase, task.message = TaskPhase.CANCELLED, "cancelled by the cloud"
                self._record(run, wire.TASK_RECORD, task.to_record(state))
                state.phase, state.finished_at = RunPhase.CANCELLED, time.time()
                self._record(run, wire.RUN_RECORD, state.to_record())
                return
            task.phase, task.exit_code = TaskPhase.SUCCEEDED, 0
            self._record(run, wire.TASK_RECORD, task.to_record(state))
        state.phase, state.finished_at = RunPhase.SUCCEEDED, time.time()
        self._record(run, wire.RUN_RECORD, state.to_record())

    # ------------------------------------------------------------- report
    def unacked(self) -> int:
        return self.outbox.last_seq - self.outbox.last_acked

    def unapplied_since_mark(self) -> bool:
        return self.mark is not None and self.outbox.last_acked < self.mark[0]

    def unconnected_since_mark(self) -> bool:
        """Not connected again since the mark (a new connection counts, not the old one)."""
        connected = self.link is not None and self.link.connected
        return self.mark is not None and not (connected and self.connects > self.mark[1])

    def report(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "epoch": self.syncer.epoch,
            "last_seq": self.outbox.last_seq,
            "acked": self.outbox.last_acked,
            "duplicate_assignments": self.duplicate_assignments,
            "connects": self.connects,
            "dropped": self.dropped,
            "batches_sent": self.syncer.batches_sent,
            "records_sent": self.syncer.records_sent,
            "runs": [
                {
                    "uid": r.state.uid,
                    "generation": r.state.generation,
                    "namespace": r.state.namespace,
                    "name": r.state.name,
                    "phase": r.state.phase,
                    "seqs": r.seqs,
                }
                for r in self.runs.values()
            ],
        }


class Simulator:
    """Every site of one process on one asyncio loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.sites: list[SimSite] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self.failures = 0

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failures += 1
            log.error("simulated site task failed: %r", task.exception())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self._mark)
        spread = float(self.config.get("start_spread", 1.0))
        for name in self.config["sites"]:
            site = SimSite(self, name)
            await site.syncer.load()
            self.sites.append(site)
            site.start(loop)
            self.spawn(site.syncer.run())
            await asyncio.sleep(spread / max(1, len(self.config["sites"])))
        self.spawn(self._heartbeats())
        self.spawn(self._status())
        await self._stop.wait()
        await self._shutdown()

    def _mark(self) -> None:
        for site in self.sites:
            site.mark = (site.outbox.last_seq, site.connects)

    async def _heartbeats(self) -> None:
        every = float(self.config.get("heartbeat_seconds", 15.0))
        rng = random.Random()
        await asyncio.sleep(rng.uniform(0, every))
        while True:
            for site in self.sites:
                site.heartbeat()
            await asyncio.sleep(every)

    def status(self) -> dict[str, Any]:
        runs = [r for s in self.sites for r in s.runs.values()]
        return {
            "t": time.time(),
            "sites": len(self.sites),
            "connected": sum(1 for s in self.sites if s.link is not None and s.link.connected),
            "unacked_sites": sum(1 for s in self.sites if s.unacked()),
            "unacked_records": sum(s.unacked() for s in self.sites),
            "records": sum(s.outbox.last_seq for s in self.sites),
            "runs": len(runs),
            "finished": sum(1 for r in runs if r.state.phase in ("Succeeded", "Cancelled")),
            "duplicate_assignments": sum(s.duplicate_assignments for s in self.sites),
            "failures": self.failures,
            "mark_unapplied": sum(1 for s in self.sites if s.unapplied_since_mark()),
            "mark_unconnected": sum(1 for s in self.sites if s.unconnected_since_mark()),
        }

    async def _status(self) -> None:
        every = float(self.config.get("status_seconds", 0.5))
        while True:
            sys.stdout.write(json.dumps(self.status()) + "\n")
            sys.stdout.flush()
            await asyncio.sleep(every)

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        report = {"status": self.status(), "sites": [s.report() for s in self.sites]}
        Path(self.config["log"]).write_text(json.dumps(report))

        def stop(site: SimSite) -> None:
            if site.link is not None:
                offline = state_message(site.site, online=False, agentVersion=__version__)
                site.link.stop([(wire.topic(site.site, wire.STATE), offline, True)])

        # Each stop joins its link's thread (up to one 0.2 s loop turn): many at once.
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            list(pool.map(stop, self.sites))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = json.loads(Path(args[0]).read_text())
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr,
        format=f"%(asctime)s fleet-sim[{os.getpid()}] %(levelname)s %(message)s",
    )  # fmt: skip
    asyncio.run(Simulator(config).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
