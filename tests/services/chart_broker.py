"""The operator chart's broker, for real: its rendered config on a real Mosquitto, and a probe.

:func:`chart_mosquitto` runs Mosquitto with the ``mosquitto.conf``, ACL and
client-id bindings (``client-ids.json``) the chart renders (from a render or
from the ConfigMap a release put on the API server); :class:`MqttProbe` is a
client that records what it receives, to check what each user may read and
write.  A probe logs in with the client id the chart binds its user to (the
site's agent's), as the agent does.
"""

from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import Any

import pytest

CONFIG_DIR = "/mosquitto/config/"
CLIENT_IDS = "client-ids.json"


def chart_mosquitto(
    conf: str, acl: str, users: dict[str, str], workdir: Path, client_ids: str | None = None
) -> Any:
    """A real Mosquitto run with the chart's generated config, ACL and client ids (not started).

    ``client_ids``: the ConfigMap's ``client-ids.json``, required when the
    config loads the plugin that reads it.  Only what a pod gets from its
    volumes and Service differs: the password file (made from ``users``), file
    paths (the plugin's too), and a loopback port.
    """
    import os
    import pwd

    from services.broker import Mosquitto, find_dynsec_plugin, password_hash

    plugin_line = next((ln for ln in conf.splitlines() if ln.strip().startswith("plugin ")), None)
    assert plugin_line is None or client_ids is not None, f"pass the ConfigMap's {CLIENT_IDS}"
    bindings = {
        c["username"]: c["clientid"]
        for c in (json.loads(client_ids)["clients"] if client_ids else [])
        if "clientid" in c
    }

    class ChartMosquitto(Mosquitto):
        def client_id_of(self, user: str) -> str | None:
            return bindings.get(user)

        def _write_files(self) -> None:
            self.data_dir.mkdir(exist_ok=True)
            self.passwd_path.write_text(
                "".join(f"{u}:{password_hash(p)}\n" for u, p in users.items())
            )
            self.acl_path.write_text(acl)
            self.dynsec_path.write_text(client_ids or "")
            for path in (self.passwd_path, self.acl_path, self.dynsec_path):
                path.chmod(0o600)
            text = conf
            if plugin_line is not None:
                local = f"plugin {find_dynsec_plugin()}"
                text = text.replace(plugin_line.strip(), local)
            text = (
                text.replace("/mosquitto/secret/passwd", str(self.passwd_path))
                .replace(CONFIG_DIR + CLIENT_IDS, str(self.dynsec_path))
                .replace("/mosquitto/config/acl", str(self.acl_path))
                .replace("/mosquitto/data/", f"{self.data_dir}/")
                .replace("listener 1883", f"listener {self.port} {self.host}")
                .replace("log_dest stdout", f"log_dest file {self.log_path}")
            )
            assert "listener 8883" not in text, "render the broker without TLS for this"
            if os.geteuid() == 0:  # Mosquitto would switch to the user "mosquitto"
                text += f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
            self.conf_path.write_text(text)

    return ChartMosquitto(workdir=workdir, users=users)


class MqttProbe:
    """A paho client on its own network thread that records what it receives."""

    WAIT, QUIET = 5.0, 0.7

    def __init__(
        self,
        broker: Any,
        username: str | None,
        password: str | None,
        client_id: str | None = None,
    ) -> None:
        """Connect; ``client_id`` defaults to the one the broker binds ``username`` to."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        if client_id is None:
            bound = broker.client_id_of(username) if username is not None else None
            client_id = bound or f"probe-{username}"
        self.client_id = client_id
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connacks: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[Any] = queue.Queue()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connacks.put(rc)
        self.client.on_subscribe = lambda _c, _u, mid, rcs, _p: self.subacks.put((mid, rcs))
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        self.rc = self.connacks.get(timeout=self.WAIT)
        if self.rc.is_failure:
            self.close()
        else:
            assert not self.rc.is_failure, f"{username} refused: {self.rc}"

    @classmethod
    def refused(
        cls, broker: Any, username: str | None, password: str | None, client_id: str | None = None
    ) -> bool:
        probe = cls(broker, username, password, client_id)
        probe.close()
        return bool(probe.rc.is_failure)

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        got, rcs = self.subacks.get(timeout=self.WAIT)
        assert got == mid and all(not rc.is_failure for rc in rcs), (topic, rcs)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=self.WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def expect(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=self.WAIT)

    def expect_nothing(self) -> None:
        try:
            got = self.messages.get(timeout=self.QUIET)
        except queue.Empty:
            return
        pytest.fail(f"received {got} but should not have")

    def close(self) -> None:
        if self.client.is_connected():
            self.client.disconnect()
        self.client.loop_stop()
