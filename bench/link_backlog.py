"""Offline backlog: how fast a site that ran offline drains its outbox to the cloud.

The scenario: an agent ran disconnected long enough to pile up N outbox
records (100,000 by default), then its link comes back.  What is measured,
all in one run on the filesystem holding the repository:

* **setup (not timed)** - an agent database built through the real
  :class:`edge_agent.store.Store` API, as the executor writes it: per run
  ``create_run``, Running, then per task a Running and a Succeeded
  transition (most with a stdout tail, some with stderr too, so ``task``
  and ``log`` records), then the run's Succeeded; every run finished, so the
  agent has nothing to resume and only drains.  ``synchronous=NORMAL`` for
  speed; the record count is exact.
* **ours** - a real Mosquitto (``max_queued_messages`` set explicitly, with
  persistence as shipped), the cloud side in this process (a
  :class:`CloudBridge` with its :class:`Applier`, acking after every batch as
  the operator does), then the agent as a real ``tideflow-agent run``
  subprocess with its production defaults (``synchronous=FULL``, default
  :class:`SyncConfig`).  Timed from starting the agent process until the
  applier has applied every record (``applied_through(site) == last seq``),
  and until the agent's outbox is compacted to zero rows (polled read-only
  in its SQLite file).  The agent's RSS is sampled with psutil throughout;
  the peak reported is the larger of the samples and the kernel's
  high-water mark (``VmHWM``) read just before the agent is stopped.
* **raw paho** - through the same broker, one paho-mqtt client publishes at
  QoS 1 exactly as many messages, of exactly the sizes, as the cloud received
  on ``events`` in the run above, to one subscriber; timed from the first
  publish until the subscriber has received the last one.  Both clients are
  configured like Tideflow's link (MQTT 3.1.1, persistent session, 100 in
  flight), so the ratio is the cost of Tideflow itself (SQLite reads and
  compaction, JSON, validation, applying, the ack window) over moving the
  same bytes.

Printed: the drain time, records/s, peak agent RSS, the raw time and the
ratio ours/raw.  Target: the 100,000-record drain in <= 10 s on a 2-core
machine (the line says whether it was met).

Run ``python -m bench.link_backlog [--quick] [-n N]`` (``--quick``: 10,000
records; the target is judged only at 100,000).  ``--profile-cloud FILE``
writes a cProfile of this process during the drain, ``--profile-agent FILE``
py-spy's collapsed stacks of the agent (``pip install py-spy``; needs ptrace).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from bench._util import (
    filesystem_of,
    load_test_service,
    print_table,
    python_info,
    rate,
    ratio_line,
    scratch_dir,
)
from edge_agent.executor import run_id_for
from edge_agent.state import RunState, TaskState
from edge_agent.store import Store
from edge_agent.sync import SyncConfig
from edge_agent.tracing import AttemptIds
from tideflow import wire
from tideflow.gc_tuning import tune_gc
from tideflow.mqtt import BrokerConnection
from tideflow.spec import parse_spec
from tideflow.tools.launchers.broker import Mosquitto
from tideflow.tracing import attempt_span_ref
from tideflow_operator.bridge import BridgeConfig, CloudBridge

SITE = "plant-7"
FULL_RECORDS = 100_000
QUICK_RECORDS = 10_000
TARGET_SECONDS = 10.0
MILLION = 1_000_000
MILLION_SECONDS = 20.0
MILLION_AGENT_RSS = 100 * 2**20
MAX_QUEUED = 100_000  # set explicitly, as every broker config we ship does
TASKS_PER_RUN = 20
RSS_INTERVAL = 0.02
DRAIN_TIMEOUT = 600.0
RAW_REPEATS = 3


AgentProcess = load_test_service("agent").AgentProcess


# ------------------------------------------------------------------- setup
def _plan_tasks(rng: random.Random, budget: int) -> list[int]:
    """Records per task (2: no log tail, 3: stdout, 4: stdout+stderr) summing to ``budget``."""
    sizes: list[int] = []
    while budget > 0:
        if budget in (2, 3, 4):
            size = budget
        else:
            size = rng.choices((2, 3, 4), weights=(2, 7, 1))[0]
            if budget - size == 1:
                size = 3 if size != 3 else 2
        sizes.append(size)
        budget -= size
    return sizes


def _log_tail(rng: random.Random, task: str, lines: int) -> bytes:
    out = [
        f"{time.strftime('%H:%M:%S')} {task}: processed batch {i} "
        f"rows={rng.randint(100, 99_999)} checksum={rng.getrandbits(64):016x}"
        for i in range(lines)
    ]
    return ("\n".join(out) + "\n").encode()


async def build_backlog(
    db: Path, records: int, seed: int = 7, traced: bool = False
) -> dict[str, Any]:
    """Fill ``db`` through the Store API with exactly ``records`` outbox records.

    ``traced``: each outcome carries its attempt span's ids, as a traced agent's do
    (filed into the spans table by the ack that compacts it, decision 0032).
    """
    rng = random.Random(seed)
    store = await Store.open(db, synchronous="NORMAL")
    runs = 0
    try:
        await store.set_meta("site", SITE)
        # The agent that wrote the backlog made its database's epoch when it first
        # started (on an empty file): a site's file always holds one.
        await store.epoch()
        remaining = records
        while remaining > 0:
            # A normal run writes 3 run-level records plus 2..4 per task; the
            # last run takes exactly what is left (at least 5).
            normal = 3 + 3 * TASKS_PER_RUN
            if remaining < 5:
                raise ValueError("need at least 5 records")
            budget = remaining if remaining <= normal + 20 else normal
            plan = _plan_tasks(rng, budget - 3)
            await _one_run(store, rng, runs, plan, traced)
            remaining -= budget
            runs += 1
        stats = await store.outbox_stats()
    finally:
        await store.close()
    assert stats.depth == records, (stats.depth, records)
    return {"runs": runs, "last_seq": stats.last_seq, "bytes": stats.bytes}


async def _describe(db: Path) -> dict[str, Any]:
    """What :func:`build_backlog` returns, for a database it built earlier."""
    store = await Store.open(db, synchronous="NORMAL")
    try:
        await store.epoch()  # (a file kept by an older version of this benchmark lacks it)
        stats = await store.outbox_stats()
        runs = len(await store.list_runs())
    finally:
        await store.close()
    return {"runs": runs, "last_seq": stats.last_seq, "bytes": stats.bytes}


async def _one_run(
    store: Store, rng: random.Random, index: int, plan: list[int], traced: bool = False
) -> None:
    names = [f"step-{i:02d}" for i in range(len(plan))]
    spec = parse_spec(
        {
            "tasks": [
                {
                    "name": name,
                    "command": ["python", "-m", "etl.stage", "--stage", name],
                    **({"dependsOn": [names[i - 1]]} if i else {}),
                    "retry": {"limit": 2},
                }
                for i, name in enumerate(names)
            ]
        }
    )
    uid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    now = time.time()
    run = RunState(
        run_id=run_id_for(uid, 1),
        uid=uid,
        generation=1,
        namespace="plant-7",
        name=f"line-ingest-{index:06d}",
        spec_json=json.dumps(spec.dump(), sort_keys=True),
        created_at=now,
        traceparent=f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01",
    )
    tasks = [TaskState(run.run_id, name) for name in names]
    assert await store.create_run(run, tasks)
    run.phase, run.started_at = "Running", now
    writes = []
    for task, size in zip(tasks, plan, strict=True):
        task.phase, task.attempt, task.started_at = "Running", 1, time.time()
        task.pid, task.pid_start = rng.randint(1000, 60000), str(rng.randint(10**6, 10**7))
        writes.append(store.save_task(run, task, also_run=task is tasks[0]))
        task.phase, task.finished_at, task.exit_code = "Succeeded", time.time(), 0
        task.pid = task.pid_start = None
        task.outputs = {"rows": str(rng.randint(0, 10**6))}
        logs: dict[str, bytes] = {}
        if size >= 3:
            logs["stdout"] = _log_tail(rng, task.name, rng.randint(2, 8))
        if size == 4:
            logs["stderr"] = b"WARNING: schema drift in column 'temp_c', coerced\n"
        last = task is tasks[-1]
        if last:
            run.phase, run.finished_at = "Succeeded", time.time()
        if traced:  # the span's ids, as a traced agent's outcome carries them (0036)
            trace_id, parent = rng.getrandbits(128) or 1, rng.getrandbits(64) or 1
            ids = AttemptIds(f"{trace_id:032x}", f"{parent:016x}")
            task.span_ref = attempt_span_ref(ids.trace_id_hex, ids.span_id_hex,
                                             ids.parent_span_id_hex, SITE)  # fmt: skip
        writes.append(store.save_task(run, task, logs or None, also_run=last))
        task.span_ref = None
    await asyncio.gather(*writes)


# --------------------------------------------------------------- measuring
class RssSampler:
    """Samples a process's RSS in a thread; ``peak`` in bytes."""

    def __init__(self, pid: int, interval: float = RSS_INTERVAL) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop.wait(self.interval)


def _vm_hwm(pid: int) -> int:
    """The kernel's RSS high-water mark of ``pid`` in bytes (0 if unavailable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _outbox_empty(db: Path) -> bool:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT NOT EXISTS (SELECT 1 FROM outbox)").fetchone()[0] == 1
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


@dataclass
class OursResult:
    records: int
    payload_bytes: int
    first_batch: float
    applied: float
    compacted: float
    peak_rss: int
    rss_samples: int
    sizes: list[int] = field(default_factory=list)
    # The cloud side (bridge + applier) runs in this process: its RSS when the
    # agent starts and its peak while the backlog drains.
    cloud_rss_start: int = 0
    cloud_rss_peak: int = 0
    # CPU seconds (user + system) each process used from the agent's start until
    # all was applied: how busy each stage of the pipeline was.
    cpu: dict[str, float] = field(default_factory=dict)
    # The cloud side's CPU seconds by thread (the event loop, the MQTT network thread...).
    cloud_threads: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    gaps: int = 0
    dropped: int = 0
    spans: int = 0  # spans the applier collected (taken away as the operator does)


async def measure_ours(
    broker_url: str,
    db: Path,
    last_seq: int,
    profile: cProfile.Profile | None,
    agent_profile: Path | None = None,
    broker_pid: int | None = None,
    agent_args: tuple[str, ...] = (),
    default_gc: bool = False,
) -> OursResult:
    if not default_gc:
        tune_gc()  # as `tideflow-operator run` does before it loads anything
    bridge = CloudBridge(BridgeConfig(BrokerConnection(broker_url), client_id="bench-operator"))
    sizes: list[int] = []
    first: list[float] = []
    handle_many = bridge.handle_many

    async def recording(messages: list[tuple[str, bytes]], **kwargs: Any) -> None:
        # The bridge takes queued messages in groups; record every events message.
        for topic, data in messages:
            if topic.endswith("/" + wire.EVENTS):
                if not first:
                    first.append(time.monotonic())
                sizes.append(len(data))
        await handle_many(messages, **kwargs)

    bridge.handle_many = recording  # type: ignore[method-assign]
    # The cloud assigned these runs (the applier discards records of unassigned ones).
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT uid, generation, namespace, name, spec FROM runs").fetchall()
    for uid, generation, namespace, name, spec in rows:
        names = [t["name"] for t in json.loads(spec)["tasks"]]
        bridge.applier.expect(namespace, name, uid, generation, names, site=SITE)
    await bridge.start()
    await asyncio.wait_for(bridge.connected.wait(), 10)
    agent = AgentProcess(
        SITE,
        broker_url,
        db,
        # AgentProcess passes test settings; put the production defaults back.
        "--heartbeat-seconds", "15",
        "--ack-timeout", str(SyncConfig().ack_timeout),
        "--synchronous", "FULL",
        *agent_args,
    )  # fmt: skip
    if profile is not None:
        profile.enable()
    cloud = RssSampler(os.getpid()).start()
    cloud_start = psutil.Process().memory_info().rss
    procs = {"cloud (bridge + applier)": psutil.Process()}
    if broker_pid is not None:
        procs["broker"] = psutil.Process(broker_pid)
    cpu0 = {name: _cpu(proc) for name, proc in procs.items()}
    threads0 = _thread_cpu()
    t0 = time.monotonic()
    agent.start()
    procs["agent"] = psutil.Process(agent.proc.pid)
    cpu0["agent"] = 0.0
    sampler = RssSampler(agent.proc.pid).start()
    spy = _py_spy(agent.proc.pid, agent_profile) if agent_profile else None
    try:
        deadline = t0 + DRAIN_TIMEOUT
        spans_collected = 0
        while bridge.applier.applied_through(SITE) < last_seq:
            if not agent.alive:
                raise RuntimeError(f"agent exited early:\n{agent.log_tail()}")
            worker = bridge.worker
            if worker is not None and worker.done():  # e.g. a bridge API change
                raise RuntimeError("the bridge's worker died") from (
                    None if worker.cancelled() else worker.exception()
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"applied through {bridge.applier.applied_through(SITE)} of {last_seq}"
                    f" after {DRAIN_TIMEOUT}s:\n{agent.log_tail()}"
                )
            # The operator takes the collected spans after every status flush
            # (exported, or dropped when no collector is set): so does this.
            spans_collected += len(bridge.applier.drain_spans())
            await asyncio.sleep(0.005)
        spans_collected += len(bridge.applier.drain_spans())
        t_applied = time.monotonic()
        cpu = {name: _cpu(proc) - cpu0[name] for name, proc in procs.items()}
        threads = {k: v - threads0.get(k, 0.0) for k, v in _thread_cpu().items()}
        if profile is not None:
            profile.disable()
        while not await asyncio.to_thread(_outbox_empty, db):
            if time.monotonic() > deadline:
                raise RuntimeError(f"outbox not compacted after {DRAIN_TIMEOUT}s")
            await asyncio.sleep(0.01)
        t_compacted = time.monotonic()
        if bridge.applier.discarded:
            raise RuntimeError(f"records not applied: {dict(bridge.applier.discarded)}")
    finally:
        sampler.stop()
        cloud.stop()
        hwm = _vm_hwm(agent.proc.pid)
        await asyncio.to_thread(agent.terminate)
        await bridge.stop()
        if spy is not None:
            await asyncio.to_thread(spy.wait, 30)
    return OursResult(
        records=last_seq,
        payload_bytes=sum(sizes),
        first_batch=(first[0] - t0) if first else float("nan"),
        applied=t_applied - t0,
        compacted=t_compacted - t0,
        peak_rss=max(sampler.peak, hwm),
        rss_samples=sampler.samples,
        sizes=sizes,
        cloud_rss_start=cloud_start,
        cloud_rss_peak=max(cloud.peak, cloud_start),
        duplicates=bridge.duplicates_ignored,
        gaps=bridge.gaps,
        dropped=sum(bridge.dropped.values()),
        spans=spans_collected,
        cpu=cpu,
        cloud_threads={k: v for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v > 0.05},
    )


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each of this process's threads, by thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for t in psutil.Process().threads():
        name = names.get(t.id, "other")
        out[name] = out.get(name, 0.0) + t.user_time + t.system_time
    return out


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Sample ``pid`` with py-spy (``pip install py-spy``) until it exits."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
         "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def _client(client_id: str) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
        protocol=mqtt.MQTTv311,
    )  # fmt: skip
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    return client


def measure_raw(host: str, port: int, sizes: list[int], run: int = 0) -> float:
    """Seconds for one paho client to get ``sizes`` QoS 1 messages to one subscriber."""
    topic = f"bench/raw/{run}/events"
    done = threading.Event()
    subscribed = threading.Event()
    received = [0]
    t_last = [0.0]
    rng = random.Random(1)
    payloads = [rng.randbytes(size) for size in sizes]

    sub = _client(f"bench-raw-sub-{run}")
    sub.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    sub.on_subscribe = lambda *_: subscribed.set()

    def on_message(_c: mqtt.Client, _u: object, _m: mqtt.MQTTMessage) -> None:
        received[0] += 1
        if received[0] == len(payloads):
            t_last[0] = time.monotonic()
            done.set()

    sub.on_message = on_message
    pub = _client(f"bench-raw-pub-{run}")
    connected = threading.Event()
    pub.on_connect = lambda *_: connected.set()
    sub.connect(host, port)
    sub.loop_start()
    pub.connect(host, port)
    pub.loop_start()
    try:
        if not (subscribed.wait(10) and connected.wait(10)):
            raise RuntimeError("raw paho clients did not connect")
        t0 = time.monotonic()
        for payload in payloads:
            pub.publish(topic, payload, qos=1)
        if not done.wait(DRAIN_TIMEOUT):
            raise RuntimeError(f"raw paho: received {received[0]} of {len(payloads)}")
        return t_last[0] - t0
    finally:
        for client in (pub, sub):
            client.disconnect()
            client.loop_stop()


# -------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RECORDS:,} records")
    parser.add_argument("-n", "--records", type=int, help="outbox records to drain")
    parser.add_argument(
        "--profile-cloud", type=Path, help="cProfile the cloud side of the drain into FILE"
    )
    parser.add_argument(
        "--profile-agent",
        type=Path,
        help="py-spy the agent process during the drain; collapsed stacks into FILE",
    )
    parser.add_argument("--keep-db", type=Path, help="also copy the built backlog database to FILE")
    parser.add_argument(
        "--reuse-db",
        type=Path,
        help="start from a copy of FILE (made by --keep-db with the same -n) instead of building",
    )
    parser.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more `tideflow-agent run` argument (repeat: --agent-arg=--sync-batch-count=2000)",
    )
    parser.add_argument(
        "--traced",
        action="store_true",
        help="each outcome carries its attempt's span (as with tracing on at the site)",
    )
    parser.add_argument(
        "--default-gc",
        action="store_true",
        help="leave the cloud side's garbage collector as CPython sets it (the operator tunes it)",
    )
    args = parser.parse_args(argv)
    n = args.records or (QUICK_RECORDS if args.quick else FULL_RECORDS)

    print(f"offline backlog drain: {n:,} outbox records, site {SITE!r}; {python_info()}")
    with scratch_dir("link-backlog") as tmp:
        print(f"scratch: {filesystem_of(tmp)}")
        db = tmp / "agent.db"
        t = time.monotonic()
        if args.reuse_db:
            with sqlite3.connect(args.reuse_db) as src, sqlite3.connect(db) as dst:
                src.backup(dst)
            built = asyncio.run(_describe(db))
            if built["last_seq"] != n:
                raise SystemExit(f"{args.reuse_db} holds {built['last_seq']:,} records, not {n:,}")
        else:
            built = asyncio.run(build_backlog(db, n, traced=args.traced))
        print(
            f"setup (not timed): {built['runs']:,} finished runs,"
            f" outbox seq 1..{built['last_seq']:,}, {built['bytes'] / 1e6:.1f} MB of record bodies,"
            f" {time.monotonic() - t:.1f}s"
        )
        if args.keep_db:
            with sqlite3.connect(db) as src, sqlite3.connect(args.keep_db) as dst:
                src.backup(dst)
        cfg = SyncConfig()
        print(
            f"sync config: batch_count={cfg.batch_count}, batch_bytes={cfg.batch_bytes // 1024} KiB"
            f", window_batches={cfg.window_batches}; broker max_queued_messages={MAX_QUEUED:,}"
            + (f"; agent arguments {' '.join(args.agent_arg)}" if args.agent_arg else "")
        )
        with Mosquitto(workdir=tmp / "broker", max_queued_messages=MAX_QUEUED) as broker:
            profile = cProfile.Profile() if args.profile_cloud else None
            ours = asyncio.run(
                measure_ours(
                    broker.url,
                    db,
                    built["last_seq"],
                    profile,
                    args.profile_agent,
                    broker._proc.pid if broker._proc is not None else None,
                    tuple(args.agent_arg),
                    args.default_gc,
                )
            )
            if profile is not None:
                profile.dump_stats(str(args.profile_cloud))
                print(f"cloud-side profile written to {args.profile_cloud}")
            # The raw time is ~0.1 s, so one scheduler hiccup moves it a lot: take
            # the median of RAW_REPEATS.
            raws = [
                measure_raw(broker.host, broker.port, ours.sizes, i) for i in range(RAW_REPEATS)
            ]
            raw = statistics.median(raws)

    batches = len(ours.sizes)
    drain = ours.applied
    print()
    print_table(
        ["what", "seconds", "records/s", "messages", "MB", "peak agent RSS MB"],
        [
            [
                "ours: agent start -> all applied",
                drain,
                rate(n, drain),
                batches,
                ours.payload_bytes / 1e6,
                ours.peak_rss / 2**20,
            ],
            [
                "ours: agent start -> outbox compacted to 0",
                ours.compacted,
                rate(n, ours.compacted),
                batches,
                ours.payload_bytes / 1e6,
                ours.peak_rss / 2**20,
            ],
            [
                f"raw paho QoS 1, same messages (median of {RAW_REPEATS})",
                raw,
                rate(n, raw),
                batches,
                ours.payload_bytes / 1e6,
                "-",
            ],
        ],
    )
    print()
    print(
        f"agent start -> first batch at the cloud: {ours.first_batch:.2f}s;"
        f" {batches} events messages (avg {ours.payload_bytes / max(batches, 1) / 1024:.0f} KiB,"
        f" {n / max(batches, 1):.0f} records); duplicates ignored {ours.duplicates},"
        f" gaps {ours.gaps}, dropped {ours.dropped}; spans collected {ours.spans:,};"
        f" RSS samples {ours.rss_samples}"
    )
    print(
        f"cloud side (bridge + applier, this process): RSS {ours.cloud_rss_start / 2**20:.0f} MB"
        f" when the agent started, peak {ours.cloud_rss_peak / 2**20:.0f} MB while draining"
        f" (+{(ours.cloud_rss_peak - ours.cloud_rss_start) / 2**20:.0f} MB)"
    )
    print(
        f"CPU from the agent's start until all applied ({drain:.1f}s): "
        + ", ".join(
            f"{name} {seconds:.1f}s ({seconds / drain:.0%})" for name, seconds in ours.cpu.items()
        )
    )
    print(
        "cloud side's CPU by thread: "
        + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in ours.cloud_threads.items())
    )
    print("raw paho runs: " + ", ".join(f"{r:.3f}s" for r in raws))
    print(ratio_line("ours/raw (all applied)", drain / raw))
    print(ratio_line("ours/raw (compacted)", ours.compacted / raw))
    target = f"target: {FULL_RECORDS:,} records applied <= {TARGET_SECONDS:.0f}s"
    if n == FULL_RECORDS:
        verdict = "met" if drain <= TARGET_SECONDS else "MISSED"
        print(f"{target} -> {verdict} ({drain:.2f}s)")
    elif n == MILLION:
        ok = drain <= MILLION_SECONDS and ours.peak_rss <= MILLION_AGENT_RSS
        print(
            f"target: {MILLION:,} records applied <= {MILLION_SECONDS:.0f}s with the agent's RSS"
            f" <= {MILLION_AGENT_RSS // 2**20} MB -> {'met' if ok else 'MISSED'}"
            f" ({drain:.2f}s, {ours.peak_rss / 2**20:.1f} MB)"
        )
    else:
        # Not a verdict: the drain is not linear in the backlog (see README).
        print(f"{target} -> not judged at {n:,} records; run without --quick / -n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
