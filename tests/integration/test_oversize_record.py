"""A record larger than the link's message limit never blocks a site's outbox.

A real agent process and the operator's real bridge through a real Mosquitto
whose ``max_packet_size`` is the link's 1 MiB (as EMQX's default is): a
message over it is refused and the client disconnected.  A task whose
command renders to 1.2 MB fails to start, and its failure message quotes
the command: the task record alone was over the limit, refused on every
resend, and everything written after it never synced.  Now the agent cuts
the record's longest strings to fit (a marker says so, a log line names the
field), the record is applied once, and what follows syncs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from services.agent import AgentProcess
from services.broker import Mosquitto
from services.cloud import SITE, converged, running_cloud, until

from tideflow import wire


async def test_a_record_over_the_message_limit_does_not_block_the_outbox(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    broker = mosquitto_factory(max_packet_size=wire.DEFAULT_MAX_MESSAGE_BYTES + 1024)
    limit = wire.DEFAULT_MAX_MESSAGE_BYTES
    async with running_cloud(broker.url, max_message_bytes=limit) as cloud:
        agent = AgentProcess(SITE, broker.url, tmp_path / "a.db").start()
        try:
            await until(lambda: cloud.bridge.presence.connected(SITE), 20, "the site online")
            huge = {
                "params": {"p": "x" * 60_000},
                "tasks": [{"name": "a", "command": ["/" + "{{params.p}}" * 20]}],
            }
            cloud.assign(huge, name="huge")
            after = cloud.assign({"tasks": [{"name": "b", "script": "true"}]}, name="after")
            await until(lambda: cloud.view_phase("huge") == "Failed", 30, "huge Failed")
            await until(lambda: cloud.view_phase("after") == "Succeeded", 30, "after Succeeded")
            await converged(cloud, agent)
            view = cloud.bridge.applier.view("default", "huge")
            assert view is not None and view.tasks["a"].message is not None
            assert view.tasks["a"].message.startswith("cannot start /xxx")
            assert after
            log = agent.log_path.read_text(errors="replace")
            assert "over the" in log and "'message'" in log, agent.log_tail()
        finally:
            agent.kill()
