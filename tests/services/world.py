"""Processes of an end-to-end test: the operator, agents, a namespace of its own.

:class:`World` gives a test one namespace on the shared API server, the
test's broker, and operator and agent processes that it can start, kill and
restart; :meth:`World.close` kills them all.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml

from services.agent import AgentProcess, wait_for
from services.broker import Mosquitto

CRDS = Path(__file__).resolve().parents[2] / "crds"


def install_crds(envtest: Any) -> None:
    """Apply the repository's CRDs and wait until the API server serves them.

    Applied, a new CRD is not served at once: a Workflow applied in the next
    moment was refused ("no matches for kind Workflow") when the machine was
    busy, so every test that installs them waits for ``Established``.
    """
    envtest.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    envtest.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS), timeout=90
    )


class OperatorProcess:
    def __init__(
        self,
        cluster: Any,
        broker: Mosquitto,
        log: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        namespace: str | None = None,
        broker_url: str | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.cluster, self.broker, self.log, self.extra = cluster, broker, log, list(extra)
        self.command = command or [sys.executable, "-m", "tideflow_operator.cli"]
        self.broker_url = broker_url or broker.url
        self.extra_env = dict(env or {})
        # The shared API server keeps earlier tests' Workflows (it has no controller-manager
        # to finish namespace deletions): an operator that watched them all would make
        # results depend on test order.
        self.scope = ["--namespace", namespace] if namespace else ["--all-namespaces"]
        self.proc: subprocess.Popen[bytes] | None = None
        # The Lease (leader election is on by default) and the ledger live in the
        # test's own namespace: a killed operator's lease must not hold up the next test.
        self.defaults: list[str] = []

    def start(self) -> OperatorProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
        env.update(self.cluster.env())
        env.update(self.extra_env)
        handle = self.log.open("ab")
        self.proc = subprocess.Popen(
            [*self.command, "run", "--broker", self.broker_url,
             *self.scope, *self.defaults, *self.extra],
            env=env, stdout=handle, stderr=handle, start_new_session=True,
        )  # fmt: skip
        handle.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def identity(self) -> str:
        """The start of its Lease identity (a random part follows: cli.instance_identity)."""
        assert self.proc is not None
        return f"{socket.gethostname()}-{self.proc.pid}-"

    def ended(self, seconds: float) -> int | None:
        """Its exit code within ``seconds``, or None (then it is killed)."""
        assert self.proc is not None
        try:
            return self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class World:
    """One test's namespace, broker, operator and agents."""

    def __init__(self, cluster: Any, broker: Mosquitto, tmp: Path) -> None:
        self.cluster, self.broker, self.tmp = cluster, broker, tmp
        self.namespace = f"t-{uuid.uuid4().hex[:8]}"
        cluster.kubectl("create", "namespace", self.namespace)
        self.operators: list[OperatorProcess] = []
        self.agents: dict[str, AgentProcess] = {}

    def operator(
        self,
        *extra: str,
        env: dict[str, str] | None = None,
        broker_url: str | None = None,
        command: list[str] | None = None,
    ) -> OperatorProcess:
        """An operator process that watches only this test's namespace (``command``:
        how to start it, ``python -m tideflow_operator.cli`` unless told)."""
        op = OperatorProcess(
            self.cluster,
            self.broker,
            self.tmp / f"operator-{len(self.operators)}.log",
            *extra,
            env=env,
            namespace=self.namespace,
            broker_url=broker_url,
            command=command,
        )
        op.defaults = ["--lease-namespace", self.namespace]
        self.operators.append(op.start())
        return op

    def metered_operator(
        self, *extra: str, broker_url: str | None = None, attempts: int = 3
    ) -> tuple[OperatorProcess, int]:
        """An operator with ``--metrics-port`` on a free port (another one if it was taken)."""
        from services.metrics import answering, free_port

        for _ in range(attempts):
            port = free_port()
            op = self.operator("--metrics-port", str(port), *extra, broker_url=broker_url)
            wait_for(
                lambda op=op, port=port: (
                    not op.alive or answering(port, "tideflow_operator_sites_connected")
                ),
                60,
                "the operator's metrics endpoint",
            )
            if op.alive:
                return op, port
            if "in use" not in op.log_text()[-2000:].lower():
                raise AssertionError(f"the operator died\n{op.log_text()[-3000:]}")
        raise AssertionError("no free metrics port")

    def agent(
        self, site: str, start: bool = True, *extra: str, broker_url: str | None = None
    ) -> AgentProcess:
        agent = self.agents.get(site) or AgentProcess(
            site, broker_url or self.broker.url, self.tmp / f"{site}.db", *extra
        )
        self.agents[site] = agent
        if start:
            agent.start()
        return agent

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> Any:
        return self.cluster.kubectl(*args, input=input, check=check)

    def apply(self, name: str, spec: dict[str, Any], check: bool = True) -> Any:
        manifest = {
            "apiVersion": "tideflow.io/v1alpha1", "kind": "Workflow",
            "metadata": {"name": name, "namespace": self.namespace}, "spec": spec,
        }  # fmt: skip
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=check)

    def lease_holder(self, name: str = "tideflow-operator") -> str:
        """The holder of the operators' Lease in this test's namespace ("" when none)."""
        lease = self.kubectl("get", "lease", name, "-n", self.namespace, "-o", "json")
        return str(json.loads(lease.stdout)["spec"].get("holderIdentity") or "")

    def get(self, name: str) -> dict[str, Any]:
        out = self.kubectl("get", "twf", name, "-n", self.namespace, "-o", "json").stdout
        return dict(json.loads(out))

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def wait_phase(
        self, name: str, phases: str | tuple[str, ...], timeout: float = 60
    ) -> dict[str, Any]:
        wanted = (phases,) if isinstance(phases, str) else phases
        try:
            wait_for(lambda: self.status(name).get("phase") in wanted, timeout, f"{name} {wanted}")
        except AssertionError:
            print(json.dumps(self.status(name), indent=1)[:4000])
            for op in self.operators:
                print(op.log_text()[-4000:])
            for agent in self.agents.values():
                print(agent.log_tail(60))
            raise
        return self.status(name)

    def close(self) -> None:
        for agent in self.agents.values():
            agent.kill()
        for op in self.operators:
            op.kill()
        self.kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)


def site_name() -> str:
    return f"s-{uuid.uuid4().hex[:6]}"


def spec_for(site: str, tasks: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "placement": {"site": site},
        "tasks": tasks,
        **extra,
    }


def sample_tasks(seconds: float = 0.2, n: int = 3) -> list[dict[str, Any]]:
    tasks = [{"name": "extract", "script": f'sleep {seconds}; echo rows=42 >> "$TIDEFLOW_OUTPUTS"'}]
    for i in range(n):
        tasks.append(
            {
                "name": f"step{i}",
                "dependsOn": [tasks[-1]["name"]],
                "command": [
                    "sh",
                    "-c",
                    f"sleep {seconds}; echo $0",
                    "{{tasks.extract.outputs.rows}}",
                ],
            }
        )
    return tasks
