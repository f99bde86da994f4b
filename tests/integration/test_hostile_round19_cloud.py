"""Round 19, cloud side: what the operator meets between its checks and its work.

* The broker's files, checked again where the link is made.  The operator
  checks its broker password file and CA file before it takes the Lease
  (``cli.cannot_start``, round 18), but a standby may wait minutes for the
  Lease, and a file replaced meanwhile (a Secret rotated wrong) was read again
  only when kopf's startup handler made the link: after the ledger was loaded
  and every Workflow listed, with a traceback, retried for ever.  Now
  :meth:`Runtime.start` checks them first and the operator stops in the same
  one line.  Fake API client here (it records what it was asked); the whole
  command against a real API server and a real Mosquitto below.
* A probe or metrics port the operator cannot listen on.  The agent refuses a
  taken metrics port in one line before it starts anything (round 18); the
  operator died with a traceback: at once for ``--liveness``, and for
  ``--metrics-port`` only after it had taken the Lease, so a standby crashed
  at every takeover.  Both ports are now bound before the Lease, and a taken
  one is one line naming the option (exit 2), with no Lease written; so is a
  ``--liveness`` URL whose port is no port.
* A Lease the operator may never take, said.  A ``--lease-namespace`` that does
  not exist, or an account the API server refuses the Lease (a lease name the
  chart's Role does not name), left a standby waiting for ever with "waiting
  for the leader lease" as its last line: the election library's reasons are
  INFO lines of a logger the operator quiets (it logs every renewal).  Now a
  refusal is a WARNING naming the call and the API server's answer, at most
  every 30 s.  Real API server, real operator command.
* A leader cut off from the API server stops acting before its Lease runs out.
  The Lease's calls had no time limit: partitioned (packets dropped, not
  refused), a leader's renewal waited for ever, the election thread with it,
  so it never gave up leading; 15 s later a standby took the Lease while the
  old leader went on acting.  Now each call has a time limit and a watchdog of
  the operator's own ends a leader whose last successful renewal began 12 s
  ago (a retry period and the renew deadline, when the library's own loop
  gives up), before the Lease (15 s) can pass to another.  The real operator,
  its API traffic through a loopback proxy the test turns into a black hole.
* An API call on a connection gone silent.  The operator's API calls (status
  writes, the ledger, Events, listings) had no time limit: a kept-alive
  connection that went dead without a word (a load balancer's failover, a NAT
  entry dropped) held its call, and its thread, until the kernel gave up on
  the connection (some 15 minutes), while the writes queued behind it and the
  sites' acks waited on them.  Now every call ends within its time limit and
  the next goes out on a fresh connection.  Real API server behind the
  loopback proxy, which silences the connections open at a moment.
* Two operators on one host name and pid.  The Lease holder's identity and the
  MQTT client id were ``<host name>-<pid>``: two replicas with ``hostNetwork``
  on one node (the node's host name; each container's process is pid 1) were
  one identity, so the second "renewed" the first's Lease and both were
  active, and each connection took the other's MQTT session.  Each now adds a
  random part.  Two Leases of one process (one host name, one pid) against a
  real API server.
* The console's sites selector, read as it is meant.  It takes ``k=v``,
  ``k!=v``, ``k`` and ``!k``, split at commas; Kubernetes' set-based terms
  (``region in (eu,us)``, which kubectl and the API server take) were split
  inside their parentheses and each piece taken as a label name to look for,
  so the page said "0 sites" instead of refusing the query; ``a=b=c`` looked
  for the value ``b=c``.  Now a term that is not a label name or value is a
  400 naming it.  Real console (aiohttp on loopback).
* The chart's RBAC with ``agentLabels: false``: the operator then never patches
  an EdgeSite (only its status), yet the ClusterRole still let it patch every
  EdgeSite's labels: the permission the option exists to take away from a
  site's agent stayed with the operator's account.  Rendered by Helm itself.
* The console in namespace mode.  With ``watchNamespaces`` the operator reads
  Workflows only there, but the console's account could read every
  namespace's, and the console (no login, by design) showed them all: another
  team's run names, outputs and log tails to anyone who can reach one team's
  console.  Now the chart gives it Roles in the watched namespaces only (the
  EdgeSites, cluster-scoped, stay a ClusterRole) and runs it with
  ``--namespace`` for each; the console follows those namespaces alone.
  Rendered by Helm; run as that account against a real API server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import kopf
import pytest
from services.broker import Mosquitto
from services.kube import EnvtestCluster, service_account_kubeconfig
from services.world import install_crds

from tideflow.mqtt import BrokerConnection, BrokerFileError
from tideflow_operator import handlers
from tideflow_operator.bridge import CloudBridge
from tideflow_operator.runtime import OperatorConfig, Runtime

SECRET = "hunter2-r0und19"


class RecordingKube:
    """An API client that records every call and answers none."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return {} if name.startswith(("read", "list_edgesites")) else []

        return call


def _spoiled_after_the_check(tmp_path: Path) -> tuple[OperatorConfig, Path]:
    password = tmp_path / "password"
    password.write_text(SECRET + "\n")
    config = OperatorConfig(
        broker=BrokerConnection("mqtt://127.0.0.1:1", username="cloud", password_file=password)
    )
    config.broker.check_files()  # what cli.cannot_start found fine
    password.write_bytes(b"\xff\xfe" + SECRET.encode())  # then the Secret was rotated wrong
    return config, password


async def test_a_broker_file_spoiled_after_the_cli_checked_it_stops_the_runtime_first(
    tmp_path: Path,
) -> None:
    config, password = _spoiled_after_the_check(tmp_path)
    kube = RecordingKube()
    runtime = Runtime(config, kube=kube, bridge=CloudBridge(config.bridge_config()))  # type: ignore[arg-type]
    with pytest.raises(BrokerFileError) as info:
        await runtime.start()
    assert str(info.value) == f"--password-file {password}: not UTF-8 text"
    assert SECRET not in str(info.value)
    assert kube.calls == []  # no ledger read, no listing: nothing done before the check
    assert runtime.bridge.link is None


async def test_the_startup_handler_makes_it_permanent_not_retried_for_ever(
    tmp_path: Path,
) -> None:
    config, password = _spoiled_after_the_check(tmp_path)
    runtime = Runtime(config, kube=RecordingKube(), bridge=CloudBridge(config.bridge_config()))  # type: ignore[arg-type]
    memo = kopf.Memo(config=config, runtime=runtime)
    with pytest.raises(kopf.PermanentError) as info:
        await handlers.startup(settings=kopf.OperatorSettings(), memo=memo)
    assert str(info.value) == f"--password-file {password}: not UTF-8 text"
    assert memo.get("cannot_start") == str(info.value)


def _lease(envtest: EnvtestCluster, namespace: str) -> dict[str, Any]:
    done = envtest.kubectl("get", "lease", "tideflow-operator", "-n", namespace, "-o", "json")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_a_standby_whose_password_file_is_spoiled_while_it_waits_stops_in_one_line(
    envtest: EnvtestCluster, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The whole command: the check before the Lease passes, the file is spoiled while
    another holds the Lease, the Lease is freed; the operator stops in the one line."""
    install_crds(envtest)
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    envtest.kubectl("create", "namespace", namespace)
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    envtest.kubectl("apply", "-f", "-", input=(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\n"
        f"metadata: {{name: tideflow-operator, namespace: {namespace}}}\n"
        f"spec: {{holderIdentity: another-operator, leaseDurationSeconds: 3600, "
        f"acquireTime: '{now}', renewTime: '{now}'}}\n"
    ))  # fmt: skip
    password = tmp_path / "password"
    password.write_text(SECRET + "\n")
    env = {k: v for k, v in envtest.env().items() if not k.startswith("TIDEFLOW_")}
    command = [
        sys.executable, "-m", "tideflow_operator.cli", "run", "--broker", mosquitto.url,
        "--namespace", namespace, "--lease-namespace", namespace,
        "--username", "cloud", "--password-file", str(password),
    ]  # fmt: skip
    err_path = tmp_path / "stderr"
    with err_path.open("w") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while "waiting for the leader lease" not in err_path.read_text():
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.1)
        password.write_bytes(b"\xff\xfe" + SECRET.encode())  # a Secret rotated wrong
        envtest.kubectl("delete", "lease", "tideflow-operator", "-n", namespace)
        try:
            code = proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 40 s after the Lease was freed: {err_path.read_text()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err_text = err_path.read_text()
    assert code == 2, err_text
    assert "Traceback" not in err_text and "never awaited" not in err_text, err_text
    said = f"tideflow-operator: --password-file {password}: not UTF-8 text"
    assert err_text.splitlines().count(said) == 1, err_text
    assert "leader lease acquired" in err_text, err_text  # (it was the holder when it failed)
    assert SECRET not in err_text
    # Given back at the stop; and nothing of the ledger written.
    assert not _lease(envtest, namespace)["spec"].get("holderIdentity")
    written = envtest.kubectl("get", "configmaps", "-n", namespace, "-o", "name")
    assert "tideflow-ledger" not in written.stdout, written.stdout


def test_without_agent_labels_the_operator_may_not_patch_edgesites() -> None:
    from test_charts import OPERATOR_CHART, OPERATOR_DEFAULTS, one, render, rules_of

    def edgesite_verbs(values: dict[str, Any]) -> set[str]:
        rules = rules_of(one(render(OPERATOR_CHART, values), "ClusterRole"))
        return {verb for group, resource, verb, _ in rules if resource == "edgesites"}

    assert edgesite_verbs(OPERATOR_DEFAULTS) == {"list", "watch", "patch", "create"}
    assert edgesite_verbs({**OPERATOR_DEFAULTS, "agentLabels": False}) == {
        "list", "watch", "create"
    }  # fmt: skip
    assert edgesite_verbs(
        {**OPERATOR_DEFAULTS, "agentLabels": False, "autoRegisterSites": False}
    ) == {"list", "watch"}


def _waits_and_says(
    envtest: EnvtestCluster,
    mosquitto: Mosquitto,
    tmp_path: Path,
    extra: list[str],
    env_extra: dict[str, str],
    namespace: str,
) -> str:
    """Run the operator for ~8 s (it never gets the Lease); its stderr."""
    env = {k: v for k, v in envtest.env().items() if not k.startswith("TIDEFLOW_")}
    env.update(env_extra)
    command = [
        sys.executable, "-m", "tideflow_operator.cli", "run", "--broker", mosquitto.url,
        "--namespace", namespace, *extra,
    ]  # fmt: skip
    err_path = tmp_path / "stderr"
    with err_path.open("w") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        time.sleep(8)
        assert proc.poll() is None, err_path.read_text()  # a standby: still waiting
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return err_path.read_text()


def test_a_lease_namespace_that_does_not_exist_is_said_not_waited_on_in_silence(
    envtest: EnvtestCluster, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    envtest.kubectl("create", "namespace", namespace)
    missing = f"nowhere-{uuid.uuid4().hex[:6]}"
    err = _waits_and_says(envtest, mosquitto, tmp_path, ["--lease-namespace", missing], {},
                          namespace)  # fmt: skip
    said = [line for line in err.splitlines() if "WARNING" in line and "leader lease" in line]
    assert len(said) == 1, err  # said, and not at every try (one every 2 s)
    assert f"{missing}/tideflow-operator" in said[0] and "404" in said[0], err
    assert "not found" in said[0], err
    assert "Traceback" not in err, err


def test_an_account_refused_the_lease_is_said_not_waited_on_in_silence(
    envtest: EnvtestCluster, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    envtest.kubectl("create", "namespace", namespace)
    kubeconfig, _ = service_account_kubeconfig(
        envtest, namespace, "no-lease", tmp_path / "kubeconfig", cluster_admin=False
    )
    err = _waits_and_says(envtest, mosquitto, tmp_path, ["--lease-namespace", namespace],
                          {"KUBECONFIG": str(kubeconfig)}, namespace)  # fmt: skip
    said = [line for line in err.splitlines() if "WARNING" in line and "leader lease" in line]
    assert len(said) == 1, err
    assert "403" in said[0] and "forbidden" in said[0].lower(), err
    assert "Traceback" not in err, err


def _console_in_namespace_mode(namespaces: list[str], release_ns: str) -> list[dict[str, Any]]:
    from test_charts import OPERATOR_CHART, OPERATOR_DEFAULTS, render

    values = {**OPERATOR_DEFAULTS, "watchNamespaces": namespaces, "console": {"enabled": True}}
    name = "tf-tideflow-operator-console"
    docs = render(OPERATOR_CHART, values, namespace=release_ns)
    return [d for d in docs if d["metadata"]["name"] == name]


def test_in_namespace_mode_the_chart_lets_the_console_read_runs_only_there() -> None:
    from test_charts import rules_of

    docs = _console_in_namespace_mode(["team-a", "team-b"], "tideflow")
    cluster = [rules_of(d) for d in docs if d["kind"] == "ClusterRole"]
    assert [{resource for _, resource, _, _ in rules} for rules in cluster] == [{"edgesites"}]
    roles = {d["metadata"]["namespace"]: rules_of(d) for d in docs if d["kind"] == "Role"}
    assert set(roles) == {"team-a", "team-b"}
    for rules in roles.values():
        assert rules == {
            ("tideflow.io", plural, verb, ())
            for plural in ("workflows", "cronworkflows")
            for verb in ("get", "list", "watch")
        }
    bound = {d["metadata"]["namespace"] for d in docs if d["kind"] == "RoleBinding"}
    assert bound == {"team-a", "team-b"}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_a_console_in_namespace_mode_shows_only_its_namespaces_runs(
    envtest: EnvtestCluster, tmp_path: Path
) -> None:
    import re
    import urllib.request

    import yaml

    install_crds(envtest)
    mine, theirs = (f"n-{uuid.uuid4().hex[:6]}" for _ in range(2))
    for namespace in (mine, theirs):
        envtest.kubectl("create", "namespace", namespace)
    docs = _console_in_namespace_mode([mine], mine)
    account = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    kubeconfig, user = service_account_kubeconfig(
        envtest, mine, account, tmp_path / "console.kubeconfig", cluster_admin=False
    )
    rbac = [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role",
                                            "RoleBinding")]  # fmt: skip
    envtest.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
    listed = envtest.kubectl("auth", "can-i", "list", "workflows.tideflow.io", f"--as={user}",
                             "-n", theirs, check=False)  # fmt: skip
    assert listed.stdout.strip() == "no"
    for namespace, name in ((mine, "mine"), (theirs, "theirs")):
        envtest.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "tideflow.io/v1alpha1", "kind": "Workflow",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"placement": {"site": "s"}, "tasks": [{"name": "a", "script": "true"}]},
        }))  # fmt: skip
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    chart_args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    namespaces = [a for a in chart_args if a.startswith("--namespace=")]
    command = [sys.executable, "-m", "tideflow.cli", "console", "--port", "0",
               "--kubeconfig", str(kubeconfig), *namespaces]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=envtest.env(), start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        found = re.search(r"http://127\.0\.0\.1:\d+/", proc.stdout.readline().decode())
        assert found, proc.stderr.read().decode()
        url = found.group(0)

        def get(path: str) -> Any:
            with urllib.request.urlopen(url + path, timeout=10) as answer:
                return json.loads(answer.read())

        deadline = time.monotonic() + 30
        while not get("api/workflows")["items"]:
            assert time.monotonic() < deadline, get("api/workflows")
            time.sleep(0.2)
        time.sleep(1)  # (anything else it could see arrives with the same listing)
        shown = get("api/workflows")
        assert [(r["namespace"], r["name"]) for r in shown["items"]] == [(mine, "mine")]
        assert all(not s["error"] for s in shown["status"].values()), shown["status"]
    finally:
        proc.terminate()
        proc.wait(10)


TWO_LEASES = """
import sys, threading, time
from tideflow_operator.cli import LeaderLease, build_parser, config_from_args, unique_client_id
args = ["run", "--broker", "mqtt://127.0.0.1:1", "--lease-namespace", sys.argv[1]]
config = config_from_args(build_parser().parse_args(args))
first, second = LeaderLease(config), LeaderLease(config)
first.wait()
threading.Thread(target=second._election.run, daemon=True).start()
time.sleep(4)
print(first.identity, second.identity, second._acquired.is_set(),
      unique_client_id("op") != unique_client_id("op"), flush=True)
first.release()
second.release()
"""


def test_two_operators_of_one_host_name_and_pid_are_never_both_leaders(
    envtest: EnvtestCluster, tmp_path: Path
) -> None:
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    envtest.kubectl("create", "namespace", namespace)
    done = subprocess.run(
        [sys.executable, "-c", TWO_LEASES, namespace], env=envtest.env(), capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    first, second, second_leads, client_ids_differ = done.stdout.split()
    assert first != second
    assert second_leads == "False", "both leaders"
    assert client_ids_differ == "True"
    assert _lease(envtest, namespace)["spec"].get("holderIdentity") in (None, "")


async def test_a_selector_the_console_cannot_read_is_refused_not_answered_with_no_sites() -> None:
    import aiohttp

    from tideflow.tools.fleet import console
    from tideflow.tools.fleet.console.hub import Hub

    hub = Hub()
    sites = [{"metadata": {"name": f"s{i}", "labels": {"region": "eu" if i % 2 else "us"}},
              "status": {}} for i in range(10)]  # fmt: skip
    hub.replace("edgesites", sites)
    hub.replace("workflows", [])
    hub.replace("cronworkflows", [])
    async with (
        console.running(hub, "127.0.0.1", 0) as port,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
    ):

        async def sites_for(selector: str) -> tuple[int, str]:
            url = f"http://127.0.0.1:{port}/api/sites"
            async with session.get(url, params={"selector": selector}) as r:
                return r.status, await r.text()

        for fine, total in (("region=eu", 5), ("region==us,!gpu", 5), ("region", 10),
                            ("region!=eu", 5), ("example.com/tier", 0), ("", 10)):  # fmt: skip
            status, text = await sites_for(fine)
            assert status == 200 and json.loads(text)["total"] == total, (fine, text[:200])
        for unread in ("region in (eu,us)", "region notin (eu)", "region=eu=us", "a b",
                       "region>1", "=eu", "!", "x/y/z"):  # fmt: skip
            status, text = await sites_for(unread)
            assert status == 400 and "selector" in text, (unread, status, text[:200])


class CuttableProxy:
    """A loopback TCP proxy to ``target``; :meth:`blackhole` makes it a partition: every
    connection, open or new, is held and nothing passes either way."""

    def __init__(self, target: tuple[str, int]) -> None:
        import socket
        import threading

        self.target = target
        self.cut = threading.Event()
        self.generation = 0  # silence_existing() leaves older connections' pipes dead
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import contextlib
        import socket
        import threading

        with contextlib.suppress(OSError):
            while True:
                client = self.server.accept()[0]
                self.socks.append(client)
                if self.cut.is_set():
                    continue  # held, never answered
                upstream = socket.create_connection(self.target)
                self.socks.append(upstream)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(
                        target=self._pipe, args=(a, b, self.generation), daemon=True
                    ).start()

    def _pipe(self, source: Any, sink: Any, generation: int) -> None:
        import contextlib

        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.cut.is_set() or generation != self.generation:
                    continue  # dropped
                sink.sendall(data)

    def silence_existing(self) -> None:
        """The connections open now go dead without a word; new ones pass."""
        self.generation += 1

    def blackhole(self) -> None:
        self.cut.set()

    def close(self) -> None:
        self.server.close()
        for sock in self.socks:
            sock.close()


def test_a_leader_cut_off_from_the_api_server_exits_before_its_lease_passes(
    envtest: EnvtestCluster, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    from urllib.parse import urlparse

    import yaml

    install_crds(envtest)
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    envtest.kubectl("create", "namespace", namespace)
    config = yaml.safe_load(envtest.kubeconfig.read_text())
    server = urlparse(config["clusters"][0]["cluster"]["server"])
    proxy = CuttableProxy((server.hostname or "127.0.0.1", int(server.port or 443)))
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in envtest.env().items() if not k.startswith("TIDEFLOW_")}
    env["KUBECONFIG"] = str(kubeconfig)
    command = [
        sys.executable, "-m", "tideflow_operator.cli", "run", "--broker", mosquitto.url,
        "--namespace", namespace, "--lease-namespace", namespace,
    ]  # fmt: skip
    err_path = tmp_path / "stderr"
    with err_path.open("w") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while "this replica is active" not in err_path.read_text():
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.1)
        time.sleep(3)  # leading, renewing
        holder = _lease(envtest, namespace)["spec"]
        renewed = holder["renewTime"]
        proxy.blackhole()
        cut_at = time.monotonic()
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still acting 30 s after it was cut off: {err_path.read_text()[-2000:]}")
        stopped_after = time.monotonic() - cut_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proxy.close()
    assert code == 3, err_path.read_text()[-2000:]
    # Its last renewal began before the cut: gone 12 s after that (a retry period and
    # the renew deadline), before the Lease's 15 s could pass to a standby.
    assert stopped_after < 14, (stopped_after, renewed)
    # (The Lease was not given back: a standby takes it when it runs out, as it would
    # from a leader whose node died.)
    assert _lease(envtest, namespace)["spec"]["holderIdentity"] == holder["holderIdentity"]


def _through(proxy: CuttableProxy, envtest: EnvtestCluster, tmp_path: Path) -> Path:
    import yaml

    config = yaml.safe_load(envtest.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    kubeconfig = tmp_path / "proxied.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    return kubeconfig


async def test_an_api_call_on_a_connection_gone_silent_ends_and_the_next_goes_through(
    envtest: EnvtestCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    from urllib.parse import urlparse

    import yaml

    from tideflow_operator import kube

    install_crds(envtest)
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    envtest.kubectl("create", "namespace", namespace)
    envtest.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "tideflow.io/v1alpha1", "kind": "Workflow",
        "metadata": {"name": "w", "namespace": namespace},
        "spec": {"placement": {"site": "s"}, "tasks": [{"name": "a", "script": "true"}]},
    }))  # fmt: skip
    server = urlparse(
        yaml.safe_load(envtest.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    )
    proxy = CuttableProxy((server.hostname or "127.0.0.1", int(server.port or 443)))
    monkeypatch.setattr(
        "kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION",
        str(_through(proxy, envtest, tmp_path)),
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube, "CALL_SECONDS", (1.0, 2.0), raising=False)  # (the test's pace)
    api = kube.Kube()
    try:
        await api.patch_workflow_status(namespace, "w", {"message": "one"})  # a kept connection
        proxy.silence_existing()
        began = time.monotonic()
        with pytest.raises(kube.KubeError):
            await asyncio.wait_for(
                api.patch_workflow_status(namespace, "w", {"message": "two"}), 20
            )
        assert time.monotonic() - began < 10
        await asyncio.wait_for(api.patch_workflow_status(namespace, "w", {"message": "three"}), 20)
        shown = envtest.kubectl("get", "workflow", "w", "-n", namespace, "-o", "json")
        assert json.loads(shown.stdout)["status"]["message"] == "three"
    finally:
        proxy.close()


@pytest.mark.parametrize("option", ["--liveness", "--metrics-port"])
def test_a_port_the_operator_cannot_listen_on_is_one_line_before_the_lease(
    envtest: EnvtestCluster, mosquitto: Mosquitto, tmp_path: Path, option: str
) -> None:
    import socket

    namespace = f"t-{uuid.uuid4().hex[:8]}"
    envtest.kubectl("create", "namespace", namespace)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        value = f"http://127.0.0.1:{port}/healthz" if option == "--liveness" else str(port)
        env = {k: v for k, v in envtest.env().items() if not k.startswith("TIDEFLOW_")}
        command = [
            sys.executable, "-m", "tideflow_operator.cli", "run", "--broker", mosquitto.url,
            "--namespace", namespace, "--lease-namespace", namespace, option, value,
        ]  # fmt: skip
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"still running after 30 s: {exc.stderr!r}")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"tideflow-operator: {option} {value}: cannot listen: "), lines[0]
    leases = envtest.kubectl("get", "leases", "-n", namespace, "-o", "name")
    assert leases.stdout.strip() == "", leases.stdout


def test_a_liveness_address_with_no_port_number_is_one_line(tmp_path: Path) -> None:
    """``--liveness http://host:99999/healthz``: a traceback from the URL parser before."""
    import yaml

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "http://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIDEFLOW_", "KUBERNETES_"))}
    env["KUBECONFIG"] = str(kubeconfig)
    url = "http://127.0.0.1:99999/healthz"
    command = [sys.executable, "-m", "tideflow_operator.cli", "run", "--broker",
               "mqtt://127.0.0.1:1", "--no-leader-election", "--liveness", url]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"tideflow-operator: --liveness {url}: Port out of range 0-65535"
    ], done.stderr
