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
* A Lease the operator may never take, said.  A ``--lease-namespace`` that does
  not exist, or an account the API server refuses the Lease (a lease name the
  chart's Role does not name), left a standby waiting for ever with "waiting
  for the leader lease" as its last line: the election library's reasons are
  INFO lines of a logger the operator quiets (it logs every renewal).  Now a
  refusal is a WARNING naming the call and the API server's answer, at most
  every 30 s.  Real API server, real operator command.
* The chart's RBAC with ``agentLabels: false``: the operator then never patches
  an EdgeSite (only its status), yet the ClusterRole still let it patch every
  EdgeSite's labels: the permission the option exists to take away from a
  site's agent stayed with the operator's account.  Rendered by Helm itself.
"""

from __future__ import annotations

import json
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
