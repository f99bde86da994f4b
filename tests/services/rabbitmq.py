"""A real 3-node RabbitMQ cluster (its MQTT plugin) on loopback, for the clustered-broker tests.

Why: a clustered broker behaves differently from one Mosquitto — retained
messages live on the node that received them, a node can die while the others
carry on, a client reconnects to another node — and only a real cluster shows
what Tideflow's link does then (docs/decisions/0012-clustered-broker.md).

Debian's ``rabbitmq-server`` (3.10) is used as installed: its scripts in
``/usr/lib/rabbitmq/bin`` (not the ``/usr/sbin`` wrappers, which switch to the
``rabbitmq`` user and the system's node), each node with its own name, ports,
database, log and config directory, ``rabbitmq_mqtt`` enabled through its own
``enabled_plugins`` file, and the system service never touched.  The cluster
has an Erlang cookie of its own (``$HOME`` points at the cluster's directory,
where the cookie file is) and an ``epmd`` of its own on a free port, started
and stopped here, so nothing is shared with a system node or another session.

Nodes start in parallel (about 15 s each on a busy 2-core machine); nodes 2 and
3 then ``join_cluster`` node 1 through ``rabbitmqctl -n``.  MQTT persistent
sessions are quorum queues (``mqtt.durable_queue_type = quorum``): they are
replicated on every node, so a session outlives the node it was made on.

Tests share the cluster (session scope) and isolate themselves with a virtual
host each (:meth:`RabbitCluster.vhost`): queues, sessions and retained messages
are per vhost.  An MQTT client picks its vhost with the username
``<vhost>:<user>``.

Process handling is the launchers' (:func:`~tideflow.tools.launchers.free_port`,
:func:`~tideflow.tools.launchers.die_with_parent`); each node runs in its own
process group, so :meth:`RabbitNode.kill` (SIGKILL) takes the node's shell
wrapper and its Erlang VM together, like a machine that lost power.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tideflow import wire
from tideflow.tools.launchers import HOST, die_with_parent, free_port
from tideflow.tools.launchers.broker import SITE_READ_CHANNELS, SITE_WRITE_CHANNELS

INSTALL_HINT = "install Debian's rabbitmq-server: apt-get install rabbitmq-server"
RABBIT_BIN = Path(os.environ.get("RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
USER, PASSWORD = "guest", "guest"  # RabbitMQ's default user; loopback only here

_GROUPS: set[int] = set()  # process groups we started and have not seen stopped


class RabbitError(RuntimeError):
    """A node did not start, join or answer; the message carries its log tail."""


def find_rabbitmq() -> Path | None:
    """The directory with ``rabbitmq-server`` and ``rabbitmqctl``, if they and ``epmd`` exist."""
    needed = (RABBIT_BIN / "rabbitmq-server", RABBIT_BIN / "rabbitmqctl")
    if all(os.access(p, os.X_OK) for p in needed) and shutil.which("epmd"):
        return RABBIT_BIN
    return None


def missing_reason() -> str | None:
    if find_rabbitmq() is None:
        return f"rabbitmq-server not found in {RABBIT_BIN}; {INSTALL_HINT}"
    return None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass(frozen=True)
class Vhost:
    """One test's corner of the cluster: MQTT URLs of every node, credentials for the vhost."""

    name: str
    urls: tuple[str, ...]
    ports: tuple[int, ...]
    password_file: Path

    @property
    def username(self) -> str:
        return f"{self.name}:{USER}"

    @property
    def password(self) -> str:
        return PASSWORD

    @property
    def url(self) -> str:
        """Every node, first to last: a failover list the link tries in turn."""
        return ",".join(self.urls)

    def url_from(self, index: int) -> str:
        """The failover list starting at node ``index``."""
        return ",".join(self.urls[index:] + self.urls[:index])

    def agent_args(self) -> list[str]:
        return ["--username", self.username, "--password-file", str(self.password_file)]


def site_permissions(site: str) -> tuple[tuple[str, str, str], tuple[str, str]]:
    """``rabbitmqctl set_permissions`` (configure, write, read) and topic (write, read) regexes.

    The site's agent connects as client id ``tideflow-agent-<site>``; the MQTT
    plugin keeps its session in the queue ``mqtt-subscription-<client id>qos1``.
    These keep another user from that session, not from the client id: RabbitMQ
    3.10 drops a live connection for any user who connects with its id
    (docs/decisions/0015-client-ids-bound-to-users.md).
    """
    queue = rf"mqtt-subscription-{wire.agent_client_id(site)}qos[01]"
    root = wire.TOPIC_ROOT.replace("/", r"\.")
    resources = (f"^{queue}$", rf"^(amq\.topic|{queue})$", rf"^(amq\.topic|{queue})$")
    topics = (
        rf"^{root}\.{site}\.({'|'.join(SITE_WRITE_CHANNELS)})$",
        rf"^{root}\.{site}\.({'|'.join(SITE_READ_CHANNELS)})$",
    )
    return resources, topics


class RabbitNode:
    """One RabbitMQ node of a :class:`RabbitCluster` (ports fixed for its whole life)."""

    def __init__(self, cluster: RabbitCluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"{cluster.prefix}{index}@localhost"
        self.dir = cluster.workdir / f"node{index}"
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.mqtt_port = free_port()
        self.log_dir = self.dir / "log"
        self.stdout_path = self.dir / "stdout.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.mqtt_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        return {
            **self.cluster.env(),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.cluster.workdir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    "# generated by tests/services/rabbitmq.py",
                    f"listeners.tcp.default = {HOST}:{self.amqp_port}",
                    f"mqtt.listeners.tcp.default = {HOST}:{self.mqtt_port}",
                    "mqtt.allow_anonymous = false",
                    "mqtt.durable_queue_type = quorum",
                    "loopback_users = none",
                    "log.console = false",
                    "log.file.level = info",
                    "cluster_partition_handling = ignore",
                    "",
                ]
            )
        )

    def spawn(self) -> None:
        if self.running:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.stdout_path.open("ab") as out:
            self._proc = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")],
                env=self.env(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # its own group: kill() takes the VM too
                preexec_fn=die_with_parent,
            )
        _GROUPS.add(self._proc.pid)

    def wait_up(self, timeout: float) -> None:
        """Until the node answers ``rabbitmqctl await_startup`` and listens for MQTT."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RabbitError(f"node {self.name} exited while starting\n{self.log_tail()}")
            if _port_open(self.mqtt_port):
                self.ctl("await_startup", timeout=max(5.0, deadline - time.monotonic()))
                return
            time.sleep(0.2)
        raise RabbitError(f"node {self.name} did not start in {timeout}s\n{self.log_tail()}")

    def start(self, timeout: float = 120.0) -> None:
        """Start again (a cluster member rejoins by itself) and wait until it serves MQTT."""
        self.spawn()
        self.wait_up(timeout)

    def kill(self) -> None:
        """SIGKILL the node's whole process group: a crash, nothing flushed."""
        proc = self._proc
        if proc is None:
            return
        _kill_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        _GROUPS.discard(proc.pid)
        self._wait_port_closed()

    def stop(self, timeout: float = 30.0) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        _kill_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        _kill_group(proc.pid)  # the VM's helpers, whatever is left
        _GROUPS.discard(proc.pid)

    def _wait_port_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while _port_open(self.mqtt_port):
            if time.monotonic() > deadline:
                raise RabbitError(f"node {self.name} still listens after being killed")
            time.sleep(0.05)

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl -n <this node> ...``; raises with its output on failure."""
        try:
            proc = subprocess.run(
                [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, *args],
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RabbitError(f"rabbitmqctl {' '.join(args)} on {self.name}: timed out") from exc
        if proc.returncode != 0:
            raise RabbitError(
                f"rabbitmqctl {' '.join(args)} on {self.name} exited {proc.returncode}\n"
                f"{proc.stdout}\n{proc.stderr}\n{self.log_tail()}"
            )
        return proc.stdout

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for path in [self.stdout_path, *sorted(self.log_dir.glob("*.log"))]:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()
                parts += [f"--- {path.name} (last {lines} lines) ---", *text[-lines:]]
        return "\n".join(parts) or f"(node {self.name} wrote no log)"


class RabbitCluster:
    """``size`` RabbitMQ nodes on loopback in one cluster, with the MQTT plugin on each."""

    def __init__(self, size: int = 3, *, parent_dir: str | Path | None = None) -> None:
        if find_rabbitmq() is None:
            raise RabbitError(missing_reason() or "rabbitmq-server missing")
        self.workdir = Path(tempfile.mkdtemp(prefix="tideflow-rabbitmq-", dir=parent_dir))
        self.prefix = f"tf{secrets.token_hex(3)}n"
        self.epmd_port = free_port()
        self.cookie = secrets.token_hex(16)
        self.nodes = [RabbitNode(self, i) for i in range(1, size + 1)]
        self._epmd: subprocess.Popen[bytes] | None = None
        self._vhosts = 0
        self._closed = False

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **keep,
            "HOME": str(self.workdir),  # the cookie file is here, for nodes and rabbitmqctl
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "rabbitmq-env.conf"),
            # rabbitmqctl's own distribution port: any free one (0: the kernel picks).
            "RABBITMQ_CTL_DIST_PORT_MIN": "0",
            "RABBITMQ_CTL_DIST_PORT_MAX": "0",
        }

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    # -- lifecycle -----------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> RabbitCluster:
        cookie = self.workdir / ".erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        (self.workdir / "rabbitmq-env.conf").write_text("# this cluster's nodes: see env()\n")
        # The HTTP auth backend is loaded but unused until a test points the nodes at
        # it (services/rabbit_http_auth.py: the README's client-id remedy).
        (self.workdir / "enabled_plugins").write_text(
            "[rabbitmq_mqtt,rabbitmq_auth_backend_http].\n"
        )
        with (self.workdir / "epmd.log").open("ab") as out:
            self._epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port), "-address", HOST],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        _GROUPS.add(self._epmd.pid)
        try:
            for node in self.nodes:
                node.write_config()
                node.spawn()
            errors: list[BaseException] = []

            def wait(node: RabbitNode) -> None:
                try:
                    node.wait_up(timeout)
                except BaseException as exc:  # reported below, with the node's log
                    errors.append(exc)

            threads = [threading.Thread(target=wait, args=(n,)) for n in self.nodes]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            first = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", first.name)
                node.ctl("start_app")
            self.wait_members(len(self.nodes))
        except BaseException:
            self.close()
            raise
        return self

    def wait_members(self, count: int, timeout: float = 60.0) -> None:
        """Until ``count`` nodes are running members of the cluster (as a live node sees it)."""
        deadline = time.monotonic() + timeout
        while True:
            live = next(n for n in self.nodes if n.running)
            text = live.ctl("cluster_status", "--formatter", "json")
            running = json.loads(text).get("running_nodes", [])
            if len(running) >= count:
                return
            if time.monotonic() > deadline:
                raise RabbitError(f"only {running} of {count} nodes running after {timeout}s")
            time.sleep(0.5)

    def ensure_running(self) -> None:
        """Start every node a test left killed, and wait until all are members again."""
        stopped = [node for node in self.nodes if not node.running]
        for node in stopped:
            node.start()
        if stopped:
            self.wait_members(len(self.nodes))

    def vhost(self) -> Vhost:
        """A new virtual host the default user may use (one per test: isolation)."""
        self._vhosts += 1
        name = f"t{self._vhosts}-{secrets.token_hex(3)}"
        node = next(n for n in self.nodes if n.running)
        node.ctl("add_vhost", name)
        node.ctl("set_permissions", "-p", name, USER, ".*", ".*", ".*")
        password_file = self.workdir / f"{name}.password"
        password_file.write_text(PASSWORD + "\n")
        return Vhost(
            name,
            tuple(n.url for n in self.nodes),
            tuple(n.mqtt_port for n in self.nodes),
            password_file,
        )

    def site_user(self, vhost: Vhost, site: str) -> tuple[str, Path]:
        """A user confined to one site's topics in ``vhost`` (the README's recipe).

        Returns (MQTT username ``<vhost>:<user>``, password file).  Resource
        permissions name the site's session queue and ``amq.topic``; topic
        permissions (on routing keys: MQTT ``/`` is AMQP ``.``) let it write
        its ``events`` and ``state`` and read its ``assign``, ``control`` and
        ``acks``, nothing else.
        """
        return self._add_user(vhost, site, *site_permissions(site))

    def _add_user(
        self, vhost: Vhost, user: str, resources: tuple[str, str, str], topics: tuple[str, str]
    ) -> tuple[str, Path]:
        node = next(n for n in self.nodes if n.running)
        password = secrets.token_hex(8)
        with contextlib.suppress(RabbitError):  # the same user in an earlier vhost
            node.ctl("add_user", user, password)
        node.ctl("change_password", user, password)
        node.ctl("set_permissions", "-p", vhost.name, user, *resources)
        node.ctl("set_topic_permissions", "-p", vhost.name, user, "amq.topic", *topics)
        password_file = self.workdir / f"{vhost.name}-{user}.password"
        password_file.write_text(password + "\n")
        return f"{vhost.name}:{user}", password_file

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for node in self.nodes:
            node.stop(timeout=15)
        if self._epmd is not None:
            _kill_group(self._epmd.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._epmd.wait(5)
            _GROUPS.discard(self._epmd.pid)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@atexit.register
def _kill_leftovers() -> None:
    for pgid in list(_GROUPS):
        _kill_group(pgid)
