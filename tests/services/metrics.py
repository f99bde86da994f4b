"""Scraping a Prometheus endpoint in tests, and starting an agent on a free metrics port.

Ports: a port found free and released can be taken by someone else before the
process under test binds it.  :func:`metered_agent` therefore retries: if the
agent could not bind (it exits saying the address is in use), it starts it
again on another port; it returns only once the endpoint answers with the
agent's own series while the agent is alive.
"""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from services.agent import AgentProcess


def free_port() -> int:
    """A port free right now: only for processes that retry when it was taken meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def answering(port: int, series: str) -> bool:
    try:
        return series in scrape(port)
    except OSError:
        return False


def metered_agent(
    site: str, broker_url: str, db: Path, *extra: str, attempts: int = 3, timeout: float = 30
) -> tuple[AgentProcess, int]:
    """A started agent with ``--metrics-port`` on a free port, and that port."""
    for _ in range(attempts):
        port = free_port()
        agent = AgentProcess(site, broker_url, db, "--metrics-port", str(port), *extra).start()
        deadline = time.monotonic() + timeout
        while agent.alive and time.monotonic() < deadline:
            if answering(port, "tideflow_agent_link_connected") and agent.alive:
                return agent, port
            time.sleep(0.05)
        agent.kill()
        if "in use" not in agent.log_tail(20).lower():
            raise AssertionError(f"the agent's metrics endpoint never answered\n{agent.log_tail()}")
    raise AssertionError(f"no free metrics port after {attempts} attempts")


@contextlib.contextmanager
def metered(
    site: str, broker_url: str, db: Path, *extra: str
) -> Iterator[tuple[AgentProcess, int]]:
    """:func:`metered_agent` as a ``with`` block: the agent is killed at its end."""
    agent, port = metered_agent(site, broker_url, db, *extra)
    try:
        yield agent, port
    finally:
        agent.kill()
