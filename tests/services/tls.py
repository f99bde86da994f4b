"""A test certificate authority for TLS to Mosquitto (the launchers' :class:`Pki`).

:func:`make_ca` writes a CA and a serving certificate for 127.0.0.1/localhost
signed by it; :func:`tls_listener_config` is the Mosquitto configuration that
turns the broker's listener into a TLS one.  A second, unrelated CA is the
"wrong CA" a client must refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tideflow.tools.launchers.pki import Pki


@dataclass
class TestCa:
    ca: Path  # the CA certificate (what clients trust)
    cert: Path  # the broker's serving certificate
    key: Path  # its private key


def make_ca(directory: Path, label: str = "tideflow-test") -> TestCa:
    pki = Pki(directory, label=label)
    return TestCa(pki.ca, pki.serving_crt, pki.serving_key)


def tls_listener_config(ca: TestCa) -> str:
    """Mosquitto settings that make the (single) listener before them a TLS listener."""
    return f"certfile {ca.cert}\nkeyfile {ca.key}\ntls_version tlsv1.2\n"
