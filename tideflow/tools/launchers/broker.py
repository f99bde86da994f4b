"""A real Mosquitto broker on a free loopback port (and, re-exported, a link to it that can be cut).

Why a real broker: the properties Tideflow relies on — persistent sessions,
QoS 1 messages queued for an offline client and kept across a broker restart,
the queue limit, per-site ACLs — are the broker's behaviour, and only the
broker can tell us what it really does.

:class:`Mosquitto` writes a generated ``mosquitto.conf`` (plus password,
ACL and client-id binding files when asked) into its own directory and runs
``mosquitto -c`` as a child process.  The directory (persistence database,
log) outlives :meth:`Mosquitto.stop` and :meth:`Mosquitto.kill`, and :meth:`Mosquitto.start`
reuses the same port and directory, so a test can take the broker away and
bring it back mid-test.  :meth:`Mosquitto.close` (or leaving the ``with``
block) stops it and removes the directory; an ``atexit`` hook kills any broker
a crashed test left running.  With ``die_with_parent=True`` the broker also
gets SIGKILL when the thread that started it goes away (``tideflow demo``).

Client ids (docs/decisions/0015-client-ids-bound-to-users.md): with users,
the broker also loads Mosquitto's dynamic-security plugin with a file that
names, for every user but the admins, the one client id it may connect with
(a site's user: its agent's :func:`tideflow.wire.agent_client_id`).  The
plugin refuses the wrong id and defers everything else to the password and
ACL files, so another site's credentials can no longer take a site's
session.  A plugin that could not read that file would bind nothing, so
:meth:`Mosquitto.start` fails then.

Persistence: Mosquitto writes its database on a clean stop (SIGTERM) and every
``autosave_interval`` seconds — or, with ``autosave_on_changes=True``, after
every ``autosave_interval`` changes.  After :meth:`Mosquitto.kill` (SIGKILL)
whatever arrived since the last save is gone, exactly as in production; pass
``autosave_on_changes=True, autosave_interval=1`` to save after every change,
and :meth:`Mosquitto.wait_persisted` to know a message has been written.

:class:`~tideflow.tools.launchers.link.LinkProxy` (re-exported here) is a
loopback TCP relay between one client and the broker whose link can be cut.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import glob
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

from tideflow import wire
from tideflow.tools.launchers import HOST, die_with_parent, free_port
from tideflow.tools.launchers.link import LinkProxy

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

INSTALL_HINT = "install Debian's mosquitto: apt-get install mosquitto"

# Site users may only read what the cloud sends them and write what they report.
SITE_READ_CHANNELS = (wire.ASSIGN, wire.CONTROL, wire.ACKS)
SITE_WRITE_CHANNELS = (wire.EVENTS, wire.STATE)

# Every process we started and have not seen exit; the atexit hook kills these.
_RUNNING: set[subprocess.Popen[bytes]] = set()


class BrokerError(RuntimeError):
    """Mosquitto did not start (or misbehaved); the message carries its log tail."""


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary: ``$MOSQUITTO``, then ``PATH``, then ``/usr/sbin``."""
    explicit = os.environ.get("MOSQUITTO")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"
# Mosquitto logs this (and carries on, binding nothing) when the plugin cannot read its file.
_DYNSEC_LOAD_ERROR = "Error loading Dynamic security plugin config"


def find_dynsec_plugin() -> str | None:
    """Mosquitto's dynamic-security plugin: ``$MOSQUITTO_DYNSEC``, then the usual lib dirs."""
    explicit = os.environ.get("MOSQUITTO_DYNSEC")
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    for pattern in ("/usr/lib/*/", "/usr/lib/", "/usr/local/lib/*/", "/usr/local/lib/"):
        found = sorted(glob.glob(pattern + DYNSEC_PLUGIN))
        if found:
            return found[0]
    return None


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def password_hash(password: str, *, iterations: int = 101) -> str:
    """A ``$7$`` (PBKDF2-SHA512) entry as ``mosquitto_passwd`` 2.x writes it."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


class Mosquitto:
    """One Mosquitto process on ``127.0.0.1:<port>`` with its config in ``workdir``.

    ``users`` ({name: password}) turns authentication on (``allow_anonymous
    false`` unless said otherwise) and writes an ACL: each user in
    ``acl_sites`` ({user: site}) may read its own site's ``assign``,
    ``control`` and ``acks`` and write its own ``events`` and ``state``;
    each user in ``admin_users`` may read and write ``tideflow/v1/sites/#``.
    Any other user gets no topic access at all.

    Every user but the admins may connect with one client id only: a site's
    user with its agent's (``tideflow-agent-<site>``), any other with
    ``client_ids[user]``, else its own name.  Admins (the operator, whose
    processes and tools each use an id of their own) are not bound.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        workdir: str | Path | None = None,
        users: Mapping[str, str] | None = None,
        acl_sites: Mapping[str, str] | None = None,
        admin_users: Iterable[str] = (),
        client_ids: Mapping[str, str] | None = None,
        allow_anonymous: bool | None = None,
        persistence: bool = True,
        max_queued_messages: int = 100_000,
        max_inflight_messages: int | None = None,
        max_packet_size: int | None = None,
        autosave_interval: int = 1,
        autosave_on_changes: bool = False,
        extra_config: str = "",
        binary: str | None = None,
        startup_timeout: float = 10.0,
        die_with_parent: bool = False,
    ) -> None:
        found = binary or find_mosquitto()
        if not found:
            raise BrokerError(f"mosquitto binary not found; {INSTALL_HINT}")
        self.binary = found
        self.host = HOST
        self.port = port or free_port()
        self._port_fixed = port is not None
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tideflow-mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users: dict[str, str] = dict(users or {})
        self.acl_sites: dict[str, str] = dict(acl_sites or {})
        self.admin_users: list[str] = list(admin_users)
        self.client_ids: dict[str, str] = dict(client_ids or {})
        unknown = (set(self.acl_sites) | set(self.admin_users) | set(self.client_ids)) - set(
            self.users
        )
        if unknown:
            raise ValueError(f"ACL names users without passwords: {sorted(unknown)}")
        twice = set(self.client_ids) & (set(self.admin_users) | set(self.acl_sites))
        if twice:
            raise ValueError(
                f"client_ids names admins (never bound) or site users (bound to their "
                f"agent's id): {sorted(twice)}"
            )
        self.dynsec_plugin = find_dynsec_plugin() if self.users else None
        if self.users and self.dynsec_plugin is None:
            raise BrokerError(
                f"{DYNSEC_PLUGIN} not found (it binds each user to its client id); "
                f"{INSTALL_HINT}, or set MOSQUITTO_DYNSEC"
            )
        self.allow_anonymous = not self.users if allow_anonymous is None else allow_anonymous
        self.persistence = persistence
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        self.max_packet_size = max_packet_size
        self.autosave_interval = autosave_interval
        self.autosave_on_changes = autosave_on_changes
        self.extra_config = extra_config
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.stderr_path = self.workdir / "mosquitto.stderr"
        self.data_dir = self.workdir / "data"
        self.passwd_path = self.workdir / "passwd"
        self.acl_path = self.workdir / "acl"
        self.dynsec_path = self.workdir / "client-ids.json"
        self.db_path = self.data_dir / "mosquitto.db"
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False

    # -- addresses -----------------------------------------------------------------

    def client_id_of(self, user: str) -> str | None:
        """The one client id ``user`` may connect with; ``None``: any (admins, no users)."""
        if user not in self.users or user in self.admin_users:
            return None
        if user in self.acl_sites:
            return wire.agent_client_id(self.acl_sites[user])
        return self.client_ids.get(user, user)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Mosquitto:
        """Start (or restart) on the same port and directory; wait until it listens."""
        if self._closed:
            raise BrokerError("this broker was closed; make a new one")
        if self.running:
            return self
        self._write_files()
        attempts = 1 if (self._port_fixed or self._proc is not None) else 3
        for attempt in range(attempts):
            try:
                self._spawn_and_wait()
                return self
            except BrokerError as exc:
                # A freshly picked port may have been taken by someone else in between.
                retry = attempt + 1 < attempts and "in use" in str(exc).lower()
                if not retry:
                    raise
                self.port = free_port()
                self._write_files()
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: Mosquitto saves its persistence database on the way out."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is not None:
            _RUNNING.discard(proc)
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise BrokerError(
                f"mosquitto did not exit {timeout}s after SIGTERM; killed it\n{self.log_tail()}"
            ) from None
        finally:
            _RUNNING.discard(proc)

    def kill(self) -> None:
        """SIGKILL: a crash; changes since the last autosave are lost."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc is not None:
            _RUNNING.discard(proc)

    def restart(self) -> Mosquitto:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop (kill if it will not stop) and remove the directory if we made it."""
        if self._closed:
            return
        try:
            self.stop()
        except BrokerError:
            pass
        finally:
            self.kill()
            self._closed = True
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Mosquitto {self.url} {state} in {self.workdir}>"

    # -- diagnostics ---------------------------------------------------------------

    def wait_persisted(self, marker: bytes, timeout: float = 5.0) -> None:
        """Wait until the persistence database holds ``marker`` (e.g. a message payload).

        Mosquitto stores payloads verbatim, so this tells a test that a message the
        broker accepted will survive :meth:`kill`.  Needs persistence and, to be quick,
        ``autosave_on_changes=True, autosave_interval=1``.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if marker in self.db_path.read_bytes():
                    return
            time.sleep(0.02)
        raise BrokerError(f"{marker!r} not in {self.db_path} after {timeout}s\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self.log_path, self.stderr_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()
                if text:
                    parts.append(f"--- {path.name} (last {lines} lines) ---")
                    parts.extend(text[-lines:])
        return "\n".join(parts) or "(mosquitto wrote no log)"

    # -- internals -----------------------------------------------------------------

    def _runs_logged(self) -> int:
        """How many times the log says this broker came up (it logs that after listening)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return 0
        return sum(
            1
            for line in text.splitlines()
            if "mosquitto version" in line and line.endswith(" running")
        )

    def _spawn_and_wait(self) -> None:
        runs_before = self._runs_logged()
        with open(self.stderr_path, "ab") as err:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,  # Ctrl-C reaches our process, which stops us in order.
                preexec_fn=die_with_parent if self.die_with_parent else None,
            )
        _RUNNING.add(self._proc)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                _RUNNING.discard(self._proc)
                raise BrokerError(
                    f"mosquitto exited with status {self._proc.returncode} before listening "
                    f"on {self.host}:{self.port}\n{self.log_tail()}"
                )
            # The port alone could be someone else's listener; the log line is ours.
            if self._runs_logged() > runs_before and _port_open(self.host, self.port):
                self._check_bindings_loaded()
                return
            time.sleep(0.02)
        self.kill()
        raise BrokerError(
            f"mosquitto did not listen on {self.host}:{self.port} within "
            f"{self.startup_timeout}s\n{self.log_tail()}"
        )

    def _write_files(self) -> None:
        self.data_dir.mkdir(exist_ok=True)
        lines = [
            "# generated by tideflow.tools.launchers.broker",
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"max_queued_messages {self.max_queued_messages}",
            "queue_qos0_messages false",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_type subscribe",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if os.geteuid() == 0:
            # Mosquitto drops root for user "mosquitto", who cannot write our temp dir.
            lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.data_dir}/",
                f"autosave_interval {self.autosave_interval}",
                f"autosave_on_changes {'true' if self.autosave_on_changes else 'false'}",
            ]
        else:
            lines.append("persistence false")
        if self.max_inflight_messages is not None:
            lines.append(f"max_inflight_messages {self.max_inflight_messages}")
        if self.max_packet_size is not None:
            lines.append(f"max_packet_size {self.max_packet_size}")
        if self.users:
            self._write_passwords()
            self._write_acl()
            self._write_client_ids()
            lines += [
                f"password_file {self.passwd_path}",
                f"acl_file {self.acl_path}",
                # Mosquitto asks plugins before these files, whatever the order here:
                # it refuses a user's wrong client id and defers the rest to them.
                f"plugin {self.dynsec_plugin}",
                f"plugin_opt_config_file {self.dynsec_path}",
            ]
        if self.extra_config:
            lines.append(self.extra_config)
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _write_passwords(self) -> None:
        self.passwd_path.write_text(
            "".join(f"{name}:{password_hash(pw)}\n" for name, pw in self.users.items())
        )
        self.passwd_path.chmod(0o600)

    def _write_client_ids(self) -> None:
        """The dynamic-security file: each bound user and its client id, nothing else.

        No passwords and no roles, and every default access "deny": for a listed
        user the plugin then checks only the client id and defers the password
        and every topic check to the password and ACL files (and for any other
        user it defers everything).  Mosquitto runs the plugin first.
        """
        clients = []
        for user in self.users:
            client_id = self.client_id_of(user)
            if client_id is not None:
                clients.append({"username": user, "clientid": client_id})
        self.dynsec_path.write_text(json.dumps(dynsec_config(clients), indent=1) + "\n")
        self.dynsec_path.chmod(0o600)

    def _check_bindings_loaded(self) -> None:
        """Fail closed: a plugin that could not load its file would bind no client id."""
        logged = ""
        for path in (self.log_path, self.stderr_path):
            with contextlib.suppress(OSError):
                logged += path.read_text(errors="replace")
        if self.users and _DYNSEC_LOAD_ERROR in logged:
            self.kill()
            raise BrokerError(f"the client-id bindings did not load\n{self.log_tail()}")

    def _write_acl(self) -> None:
        blocks = ["# generated by tideflow.tools.launchers.broker: one block per user"]
        for user, site in self.acl_sites.items():
            blocks.append(f"user {user}")
            blocks += [f"topic read {wire.topic(site, ch)}" for ch in SITE_READ_CHANNELS]
            blocks += [f"topic write {wire.topic(site, ch)}" for ch in SITE_WRITE_CHANNELS]
            blocks.append("")
        for user in self.admin_users:
            blocks += [f"user {user}", f"topic readwrite {wire.TOPIC_ROOT}/#", ""]
        self.acl_path.write_text("\n".join(blocks) + "\n")
        self.acl_path.chmod(0o600)


def dynsec_config(clients: list[dict[str, str]]) -> dict[str, object]:
    """A dynamic-security plugin file holding only ``clients`` (username, clientid).

    The four default accesses are "deny", which the plugin turns into deferring
    to the next check (the ACL file): it grants no topic itself.
    """
    kinds = ("publishClientSend", "publishClientReceive", "subscribe", "unsubscribe")
    return {
        "defaultACLAccess": [{"acltype": kind, "allow": False} for kind in kinds],
        "clients": clients,
        "groups": [],
        "roles": [],
    }


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_RUNNING):
        with contextlib.suppress(Exception):
            proc.kill()
            proc.wait(5)
