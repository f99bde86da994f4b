"""A real Mosquitto broker on a free loopback port, for tests.

The launcher lives in the distribution's tooling layer (:mod:`tideflow.tools.launchers.broker`,
the ``demo`` extra), since ``tideflow demo`` needs it too; this module keeps the
names the tests import.
"""

from __future__ import annotations

from tideflow.tools.launchers.broker import (
    HOST,
    INSTALL_HINT,
    SITE_READ_CHANNELS,
    SITE_WRITE_CHANNELS,
    BrokerError,
    LinkProxy,
    Mosquitto,
    dynsec_config,
    find_dynsec_plugin,
    find_mosquitto,
    free_port,
    password_hash,
)

__all__ = [
    "HOST",
    "INSTALL_HINT",
    "SITE_READ_CHANNELS",
    "SITE_WRITE_CHANNELS",
    "BrokerError",
    "LinkProxy",
    "Mosquitto",
    "dynsec_config",
    "find_dynsec_plugin",
    "find_mosquitto",
    "free_port",
    "password_hash",
]
