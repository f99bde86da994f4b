"""The cloud side of link tests, in process: the operator's real MQTT bridge and applier.

:class:`Cloud` wraps a :class:`~tideflow_operator.bridge.CloudBridge` (the
operator's only MQTT module, with its applier and its re-send bookkeeping)
without Kubernetes, so a test can assign, cancel and compare what the cloud
applied with the agent's own database (:func:`converged`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from services.agent import AgentProcess, agent_truth, has_schema, read_only
from tideflow import wire
from tideflow.mqtt import BrokerConnection
from tideflow_operator.bridge import BridgeConfig, CloudBridge


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


SITE = "line-2"


def chain_spec(n: int, seconds: float, *, outputs: bool = True) -> dict[str, Any]:
    tasks = []
    for i in range(n):
        script = f"sleep {seconds}"
        if outputs:
            script += f'; echo "n={i}" >> "$TIDEFLOW_OUTPUTS"'
        task: dict[str, Any] = {"name": f"t{i}", "script": script}
        if i >= 2:
            task["dependsOn"] = [f"t{i - 2}"]
        tasks.append(task)
    # The default retry policy (none): an agent killed mid-task is an interruption.
    return {"tasks": tasks}


class Cloud:
    """Assign, cancel and read what the cloud applied, through a real CloudBridge."""

    def __init__(self, bridge: CloudBridge) -> None:
        self.bridge = bridge
        self.link_ups = 0  # times the bridge's link came up (counted by running_cloud)

    def assign(
        self,
        spec: dict[str, Any],
        name: str = "wf",
        site: str = SITE,
        uid: str | None = None,
        traceparent: str | None = None,
    ) -> str:
        uid = uid or str(uuid.uuid4())
        payload = wire.AssignPayload(
            uid=uid, generation=1, namespace="default", name=name, spec=spec
        )
        self.bridge.applier.expect(
            "default", name, uid, 1, [t["name"] for t in spec["tasks"]], site=site
        )
        self.bridge.assign(site, payload, traceparent)
        return uid

    def cancel(self, uid: str, site: str = SITE, reason: str = "stop") -> None:
        self.bridge.control(site, wire.ControlPayload(action="cancel", uid=uid, reason=reason))

    def view_phase(self, name: str = "wf") -> str | None:
        view = self.bridge.applier.view("default", name)
        return view.phase if view else None

    def state(self) -> dict[str, Any]:
        runs = {}
        for view in self.bridge.applier.views():
            runs[f"{view.uid}.{view.generation}"] = {
                "phase": view.phase,
                "tasks": {
                    name: {
                        "phase": t.phase,
                        "attempt": t.attempt,
                        "exitCode": t.exit_code,
                        "outputs": t.outputs,
                    }
                    for name, t in view.tasks.items()
                },
            }
        return runs


async def converged(
    cloud: Cloud, agent: AgentProcess, timeout: float = 30, never_ran: tuple[str, ...] = ()
) -> None:
    """The cloud holds exactly the agent's truth, every seq consumed once.

    ``never_ran``: uids the cloud assigned that the site never took (left out).
    """

    # (What held at the moment of convergence: a running agent may write more after.)
    at_convergence: list[tuple[dict[str, Any], int]] = []

    def same() -> bool:
        truth = agent_truth(agent.db)
        state = {k: v for k, v in cloud.state().items() if k.split(".")[0] not in never_ran}
        applied = cloud.bridge.records_applied
        if (
            bool(truth["runs"])
            and state == truth["runs"]
            and cloud.bridge.applier.applied_through(agent.site) == truth["last_seq"]
        ):
            at_convergence.append((truth, applied))
            return True
        return False

    try:
        await until(same, timeout, "the cloud to converge on the agent's database")
    except AssertionError:
        print("agent:", json.dumps(agent_truth(agent.db), indent=1)[:3000])
        print("cloud:", json.dumps(cloud.state(), indent=1)[:3000])
        print(agent.log_tail())
        raise
    truth, applied = at_convergence[-1]
    assert applied <= truth["last_seq"], "a record applied twice"


def outbox_depth(db: Path) -> int:
    with read_only(db) as conn:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])


def outbox_bytes(db: Path) -> int:
    """The outbox's size as the agent measures it against ``--outbox-budget-bytes``."""
    if not db.exists():
        return 0
    with read_only(db) as conn:
        if not has_schema(conn):
            return 0
        row = conn.execute(
            "SELECT coalesce(sum(length(coalesce(s.body, o.body))), 0) FROM outbox o"
            " LEFT JOIN spans s ON s.rowid = o.span_rowid"
        ).fetchone()
        return int(row[0])


@contextlib.asynccontextmanager
async def running_cloud(broker_url: str, **kwargs: Any) -> AsyncIterator[Cloud]:
    """A started CloudBridge on ``broker_url``, stopped after.

    Keyword arguments that are :class:`BrokerConnection` fields (``username``,
    ``password_file``, ``tls_ca``) or :class:`BridgeConfig` fields
    (``client_id``, ...) configure the link; the rest go to
    :class:`CloudBridge` (``persist``, ``on_receipt``, ...).
    """
    login = {k: kwargs.pop(k) for k in list(kwargs) if k in BrokerConnection.__dataclass_fields__}
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in BridgeConfig.__dataclass_fields__}
    settings.setdefault("client_id", f"cloud-{uuid.uuid4().hex[:6]}")
    connection = BrokerConnection(broker_url, **login)
    bridge = CloudBridge(BridgeConfig(connection, **settings), **kwargs)
    cloud = Cloud(bridge)
    on_link = bridge._on_link

    def counted(connected: bool) -> None:
        cloud.link_ups += connected
        on_link(connected)

    bridge._on_link = counted  # (start() reads it)
    await bridge.start()
    await until(bridge.connected.is_set, 10, "the cloud bridge to connect")
    try:
        yield cloud
    finally:
        await bridge.stop()
