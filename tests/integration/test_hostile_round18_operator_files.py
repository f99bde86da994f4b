"""Round 18, cloud side: files the operator cannot use, given at its start.

The agent was made to refuse a broker password file or CA file it cannot use
before anything starts, in one line naming the option (test_hostile_round18).
The operator (``tideflow-operator run``) reads the same files through the same
link (:mod:`tideflow.mqtt`): given a password file that is not UTF-8, a CA
file missing or holding no certificate, it took the leader Lease, loaded its
ledger and listed the Workflows, then failed in kopf's startup handler with a
traceback, retried there for ever.  A password file that is a directory was
called "no such file".  A kubeconfig (``$KUBECONFIG``) missing, not YAML, not
UTF-8 or a directory ended it with the client library's traceback.  Each is
tried against the real command here (real API server, real broker on
loopback): exit non-zero, one line naming the option, no traceback, no Lease
and no ConfigMap written, and never a word of the password or token.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from services.broker import Mosquitto
from services.kube import EnvtestCluster

SECRET = "hunter2-s3cr3t"

Case = Callable[[Path], tuple[list[str], dict[str, str], str]]


def _password_missing(tmp: Path) -> tuple[list[str], dict[str, str], str]:
    return ["--username", "cloud", "--password-file", str(tmp / "nowhere")], {}, "--password-file"


def _password_not_utf8(tmp: Path) -> tuple[list[str], dict[str, str], str]:
    (tmp / "password").write_bytes(b"\xff\xfe" + SECRET.encode() + b"\n")
    return ["--username", "cloud", "--password-file", str(tmp / "password")], {}, "--password-file"


def _password_a_directory(tmp: Path) -> tuple[list[str], dict[str, str], str]:
    (tmp / "secret").mkdir()
    return ["--username", "cloud", "--password-file", str(tmp / "secret")], {}, "--password-file"


def _ca_missing(tmp: Path) -> tuple[list[str], dict[str, str], str]:
    return ["--tls-ca", str(tmp / "nowhere.pem")], {}, "--tls-ca"


def _ca_no_certificate(tmp: Path) -> tuple[list[str], dict[str, str], str]:
    (tmp / "ca.pem").write_text(f"not a certificate {SECRET}\n")
    return ["--tls-ca", str(tmp / "ca.pem")], {}, "--tls-ca"


def _kubeconfig_missing(tmp: Path) -> tuple[list[str], dict[str, str], str]:
    return [], {"KUBECONFIG": str(tmp / "nowhere.yaml")}, "KUBECONFIG"


def _kubeconfig_garbled(tmp: Path) -> tuple[list[str], dict[str, str], str]:
    (tmp / "kubeconfig").write_text("apiVersion: v1\nclusters: [\n")
    return [], {"KUBECONFIG": str(tmp / "kubeconfig")}, "KUBECONFIG"


def _kubeconfig_a_directory(tmp: Path) -> tuple[list[str], dict[str, str], str]:
    (tmp / "kube").mkdir()
    return [], {"KUBECONFIG": str(tmp / "kube")}, "KUBECONFIG"


def _kubeconfig_token_cut_short(tmp: Path) -> tuple[list[str], dict[str, str], str]:
    text = f'apiVersion: v1\nusers:\n- name: u\n  user: {{token: "{SECRET}\n'
    (tmp / "kubeconfig").write_text(text)
    return [], {"KUBECONFIG": str(tmp / "kubeconfig")}, "KUBECONFIG"


def _kubeconfig_not_utf8(tmp: Path) -> tuple[list[str], dict[str, str], str]:
    (tmp / "kubeconfig").write_bytes(b"\xff\xfe\x00apiVersion: v1\n")
    return [], {"KUBECONFIG": str(tmp / "kubeconfig")}, "KUBECONFIG"


@pytest.mark.parametrize(
    "unusable",
    [
        _password_missing,
        _password_not_utf8,
        _password_a_directory,
        _ca_missing,
        _ca_no_certificate,
        _kubeconfig_missing,
        _kubeconfig_garbled,
        _kubeconfig_token_cut_short,
        _kubeconfig_not_utf8,
        _kubeconfig_a_directory,
    ],
)
def test_an_operator_given_a_file_it_cannot_use_starts_nothing_and_says_so(
    envtest: EnvtestCluster, mosquitto: Mosquitto, tmp_path: Path, unusable: Case
) -> None:
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    envtest.kubectl("create", "namespace", namespace)
    extra, extra_env, said = unusable(tmp_path)
    env = {k: v for k, v in envtest.env().items() if not k.startswith("TIDEFLOW_")}
    env.update(extra_env)
    command = [
        sys.executable, "-m", "tideflow_operator.cli", "run", "--broker", mosquitto.url,
        "--namespace", namespace, "--lease-namespace", namespace, *extra,
    ]  # fmt: skip
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"still running after 30 s: {exc.stderr!r}")
    err = done.stderr
    assert done.returncode != 0, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tideflow-operator: {said}"), err
    assert SECRET not in err and SECRET not in done.stdout
    written = envtest.kubectl("get", "leases,configmaps", "-n", namespace, "-o", "name")
    assert written.stdout.strip() == "", written.stdout
