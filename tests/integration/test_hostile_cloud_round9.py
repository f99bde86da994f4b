"""Hostile inputs against the cloud side (round 9), with real parts: a real API server
(envtest tier) and a real Mosquitto where a test needs the bridge.

Proves:

* a Workflow whose name is at Kubernetes' length limit (253 characters) still gets
  its Events: an Event is named ``NAME.SUFFIX``, past 253 characters, which the
  API server takes for Events (a regression guard; it found nothing).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from kubernetes import client
from services.kube import EnvtestCluster

from tideflow_operator.kube import Kube

NAMESPACE = "default"


def _long_name(length: int = 253) -> str:
    """A valid DNS-1123 subdomain of ``length`` characters, unique to the test."""
    head = f"h9-{uuid.uuid4().hex[:8]}."
    body = ("a" * 62 + ".") * 4
    return (head + body)[: length - 1] + "z"


@pytest.mark.envtest
@pytest.mark.parametrize("once", [None, "invalid-spec-g1"])
async def test_a_workflow_named_at_the_length_limit_still_gets_its_events(
    envtest: EnvtestCluster, once: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    name = _long_name()
    assert len(name) == 253
    api = envtest.api_client()
    kube = Kube(api)
    caplog.set_level(logging.WARNING, logger="tideflow_operator.kube")
    obj: dict[str, Any] = {
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": str(uuid.uuid4())}
    }
    try:
        await kube.event(obj, "Workflow", "InvalidSpec", "spec.tasks: bad", once=once)
        await kube.event(obj, "Workflow", "InvalidSpec", "spec.tasks: bad", once=once)
        events = client.CoreV1Api(api).list_namespaced_event(
            NAMESPACE, field_selector=f"involvedObject.name={name}"
        )
    finally:
        api.close()
    refused = [r.getMessage() for r in caplog.records if "could not post event" in r.getMessage()]
    assert not refused, refused
    # once: posted once however often it is said; else one Event per call.
    assert len(events.items) == (1 if once else 2), [e.metadata.name for e in events.items]
    for event in events.items:
        assert event.involved_object.name == name
