"""Exactly-once through a real gap, and the outbox budget, with real processes.

**A gap.**  The cloud's link to the broker is cut (a loopback TCP relay,
:class:`~services.broker.LinkProxy`) while the site keeps reporting; the
broker, with ``max_queued_messages 1``, keeps the first ``events`` batch for
the cloud's session and drops the rest (it logs that it did).  When the link
returns the cloud gets that batch and then the site's next ones: a hole in
``seq``.  It must hold back what follows the hole, ask for a resend (an ack
with ``resend``), and the agent must send again from there.  The agent runs
with an ack timeout far beyond the test, so only the cloud's request can
close the hole; in the end every record is applied exactly once.

**The outbox budget.**  The cloud cannot persist (its API server is away), so
it acks nothing and the site's outbox grows past ``--outbox-budget-bytes``;
a new assignment is then refused with a ``Rejected`` receipt while the run in
progress keeps recording.  When the cloud can persist again the outbox
drains; the site comes back and the refused assignment must be re-sent and
run, and no record may have been dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from services.agent import AgentProcess, agent_truth
from services.broker import LinkProxy, Mosquitto
from services.cloud import (
    SITE,
    Cloud,
    chain_spec,
    converged,
    outbox_bytes,
    running_cloud,
    until,
)

from tideflow import wire
from tideflow_operator.applier import ApplyResult


async def test_a_gap_is_held_back_resent_on_request_and_applied_once(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    broker = mosquitto_factory(max_queued_messages=1)
    with LinkProxy(broker.host, broker.port) as proxy:
        async with running_cloud(proxy.url, client_id="cloud-gap") as cloud:
            agent = AgentProcess(SITE, broker.url, tmp_path / "a.db", "--ack-timeout", "600")
            with agent:
                cloud.assign(chain_spec(30, 0.2))
                applier = cloud.bridge.applier
                await until(lambda: applier.applied_through(SITE) > 0, 30, "records applied")
                ups = cloud.link_ups
                proxy.cut()
                at_cut = applier.applied_through(SITE)
                # The fault landed: the broker dropped events queued for the cloud.
                await until(
                    lambda: (
                        "Outgoing messages are being dropped for client cloud-gap"
                        in broker.log_path.read_text(errors="replace")
                    ),
                    30,
                    "the broker to drop events queued for the cloud",
                )
                await until(
                    lambda: agent_truth(agent.db)["last_seq"] >= at_cut + 10, 30, "more records"
                )
                assert any(
                    r["phase"] == "Running" for r in agent_truth(agent.db)["runs"].values()
                ), "the run must still be reporting after the link returns"
                proxy.restore()
                await until(lambda: cloud.link_ups > ups, 20, "the cloud to reconnect")
                await until(lambda: cloud.view_phase() == "Succeeded", 60, "Succeeded in the cloud")
                await converged(cloud, agent)
                truth = agent_truth(agent.db)
                assert cloud.bridge.gaps >= 1, "the cloud never saw the gap"
                assert cloud.bridge.records_applied == truth["last_seq"], "applied once each"
                assert "no ack for" not in agent.log_tail(1000), "the ack timeout closed the gap"
                assert agent.alive


BUDGET = 4000


class BudgetScene:
    """A cloud that cannot persist (so acks nothing) and a site with a small outbox budget."""

    def __init__(self, tmp_path: Path, broker: Mosquitto) -> None:
        self.api_up = asyncio.Event()
        self.receipts: list[wire.ReceiptPayload] = []
        self.db = tmp_path / "a.db"
        self.agent = AgentProcess(SITE, broker.url, self.db, "--outbox-budget-bytes", str(BUDGET))
        self.cloud: Cloud

    async def persist(self, result: ApplyResult) -> None:  # the operator's status writes
        await self.api_up.wait()
        applier = self.cloud.bridge.applier
        for key in result.changed:
            view = applier.view(*key)
            if view is not None:
                applier.mark_persisted(key[0], key[1], view.synced_seq)

    async def on_receipt(self, _site: str, receipt: wire.ReceiptPayload) -> None:
        self.receipts.append(receipt)

    async def refuse_one(self) -> str:
        """Fill the outbox past the budget, have an assignment refused, then let it drain."""
        cloud, agent, db = self.cloud, self.agent, self.db
        cloud.assign(chain_spec(12, 0.3), name="first")
        await until(lambda: outbox_bytes(db) > BUDGET, 30, "the outbox over its budget")
        second = cloud.assign(chain_spec(2, 0.05), name="second")
        await until(lambda: "refusing assignment" in agent.log_tail(200), 20, "the refusal")
        assert not any(k.startswith(second) for k in agent_truth(db)["runs"]), "it was taken"
        self.api_up.set()
        await until(
            lambda: any(r.uid == second and r.phase == "Rejected" for r in self.receipts),
            20,
            "the Rejected receipt at the cloud",
        )
        # The run in progress kept recording all along; every record reaches the cloud.
        await until(lambda: cloud.view_phase("first") == "Succeeded", 60, "first Succeeded")
        await until(lambda: outbox_bytes(db) < BUDGET, 30, "the outbox to drain")
        return second


async def test_over_the_outbox_budget_an_assignment_is_rejected_and_no_record_is_dropped(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    scene = BudgetScene(tmp_path, mosquitto)
    async with running_cloud(
        mosquitto.url, persist=scene.persist, on_receipt=scene.on_receipt
    ) as scene.cloud:
        with scene.agent:
            second = await scene.refuse_one()
            await converged(scene.cloud, scene.agent, never_ran=(second,))
            truth = agent_truth(scene.db)
            assert scene.cloud.bridge.records_applied == truth["last_seq"], "a record was lost"
            assert not any(k.startswith(second) for k in truth["runs"])
            assert scene.agent.alive


async def test_a_rejected_assignment_is_re_sent_when_the_site_comes_back_with_room(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    scene = BudgetScene(tmp_path, mosquitto)
    async with running_cloud(
        mosquitto.url, persist=scene.persist, on_receipt=scene.on_receipt
    ) as scene.cloud:
        with scene.agent:
            await scene.refuse_one()
            scene.agent.terminate()  # the site goes away, and comes back with room
            scene.agent.start()
            await until(
                lambda: scene.cloud.view_phase("second") == "Succeeded", 30, "second to run"
            )
            await converged(scene.cloud, scene.agent)
