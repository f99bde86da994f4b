"""The README's Mosquitto client-id binding file is the one the launcher writes (decision 0015).

The launcher's file is proved on a real Mosquitto (tests/integration/
test_broker_fixture.py); this keeps the README's copy of it from drifting.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tideflow import wire
from tideflow.tools.launchers.broker import dynsec_config

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_binding_file_is_the_launchers() -> None:
    (block,) = re.findall(r"```json\n(.*?)```", README.read_text(), re.S)
    site = "line-2"
    clients = [{"username": site, "clientid": wire.agent_client_id(site)}]
    assert json.loads(block) == dynsec_config(clients)


def test_an_agents_client_id_is_named_after_its_site() -> None:
    # RabbitMQ permissions and the chart's bindings spell this out; it must not move.
    assert wire.agent_client_id("line-2") == "tideflow-agent-line-2"
