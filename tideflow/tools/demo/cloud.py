"""The Kubernetes API the demo uses: kubectl for changes, the Python client for reads.

Changes go through ``kubectl`` because that is what the story shows a user
doing; the live table reads through the Python client, which is cheap to poll.
:func:`current_context` decides whether the user's own kubeconfig context
answers (then the demo uses it and cleans up after itself).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tideflow.tools.demo.common import GROUP, NAMESPACE, VERSION, DemoError

__all__ = ["Cloud", "current_context"]


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

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Until each CRD is Established.

        Not ``kubectl wait --for=condition=Established``: on a CRD whose status
        has no conditions yet (just applied) it fails at once with
        ``.status.conditions accessor error`` instead of waiting.
        """
        deadline = time.monotonic() + timeout
        query = '-o=jsonpath={.status.conditions[?(@.type=="Established")].status}'
        for crd in crds:
            while True:
                got = self.kubectl("get", f"crd/{crd}", query, check=False)
                if got.returncode == 0 and got.stdout.strip() == "True":
                    break
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"crd/{crd} not Established within {timeout:.0f}s: "
                        f"{(got.stderr or got.stdout).strip() or 'no condition yet'}"
                    )
                time.sleep(0.2)

    def _api(self) -> Any:
        if self._objects is None:
            from kubernetes import client, config

            # The client copies a kubeconfig's inline client key and certificates into
            # files it removes only at a clean exit: in TMPDIR, a kill -9 of the demo
            # left them there (your cluster's client key, with the current context).
            # In the work directory they go with it (its janitor, after a kill -9).
            settings = client.Configuration()
            config.load_kube_config(
                config_file=str(self.kubeconfig) if self.kubeconfig else None,
                client_configuration=settings,
                temp_file_path=str(self.workdir / ".kube-files"),
            )
            self._objects = client.CustomObjectsApi(client.ApiClient(configuration=settings))
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

    # -- cleaning up a cluster that is not the demo's own ---------------------------
    def remove_workflows(self, *, force: bool) -> None:
        """Delete the demo's Workflows.

        While the operator runs it handles their finalizers; ``force`` removes
        the finalizers first (no operator is there to do it).
        """
        names = self.kubectl(
            "get", "twf", "-n", NAMESPACE, "-o", "name", check=False, timeout=20
        ).stdout.split()
        if not names:
            return
        if force:
            for name in names:
                self.kubectl(
                    "patch", name, "-n", NAMESPACE, "--type=merge",
                    "-p", '{"metadata":{"finalizers":null}}', check=False, timeout=20,
                )  # fmt: skip
        done = self.kubectl(
            "delete", "twf", "--all", "-n", NAMESPACE, "--timeout=20s", check=False, timeout=30
        )  # fmt: skip
        if done.returncode != 0 and not force:
            self.remove_workflows(force=True)

    def remove_registrations(self, edgesites: list[str], *, namespace: bool) -> None:
        """Delete the EdgeSites (and the namespace) a run created, after its agents stopped."""
        if edgesites:
            self.kubectl(
                "delete", "edgesites", *edgesites, "--ignore-not-found",
                "--wait=false", check=False, timeout=20,
            )  # fmt: skip
        if namespace:
            self.kubectl(
                "delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=false",
                check=False, timeout=20,
            )  # fmt: skip


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
