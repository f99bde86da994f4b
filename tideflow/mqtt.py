"""A reconnecting paho-mqtt 2.x client shared by the agent and the operator.

Both sides need the same link discipline, so it lives in the shared package;
``edge_agent.link`` and ``tideflow_operator.bridge`` configure it (topics,
last will, handlers) and are the only modules that touch MQTT.

Why a thread of its own: connecting is blocking in paho (DNS, TCP, TLS), and a
site whose uplink silently drops packets would otherwise stall the caller's
event loop for the connect timeout.  Here the network runs in one thread that
owns the paho client; everything it receives is handed to the asyncio loop
with ``call_soon_threadsafe``, and publishing is thread-safe.  An event loop
never waits on the link.

What it keeps:

* a persistent session (``clean_session=False``, a fixed client id),
  so QoS 1 messages published while the site is offline are delivered when it
  reconnects;
* reconnect with capped exponential backoff and full jitter;
* a failover list: the broker's ``url`` may name several, comma-separated (the
  nodes of a clustered broker); each reconnect goes to the next one, a whole
  round of refusals is followed by a backoff, so a site whose node died is on
  another node after one short delay (docs/decisions/0012-clustered-broker.md);
* messages to publish on every (re)connect, and a last will;
* with ``ignore_retained``, nothing from the broker's retained store: a
  clustered broker keeps that store per node (RabbitMQ), so the copy a
  client gets on subscribe may be older than what the others got live;
* username/password (the password read from a file, never logged) and TLS.
  A URL that carries credentials (``mqtt://user:pass@host``) is refused, and
  shown with them starred out: they were dropped without a word (the broker then
  refused an anonymous client for ever) and echoed whole in the URL's errors.

With ``mqtt5`` the link speaks MQTT 5 (the operator does): its session
expires ``session_expiry_seconds`` after a disconnect, so a process that is
gone for good leaves no session queueing messages on the broker for ever, and
a broker that closes the session because another client connected with the
same client id says so (reason "Session taken over"), which is logged as a
WARNING: two processes sharing one client id keep disconnecting each other,
and each then sees only part of the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

SESSION_TAKEN_OVER = 142  # MQTT 5 reason code of a DISCONNECT from the broker
# Dropped this many times within this many seconds, each time right after the
# broker accepted us: another client is probably using our client id.
TAKEOVER_DROPS, TAKEOVER_WINDOW = 3, 60


def shown_url(url: str) -> str:
    """``url`` (or a list of them) for a message: any ``user:password@`` starred out."""
    shown = []
    for part in url.split(","):
        scheme, sep, rest = part.partition("://")
        if not sep:
            scheme, rest = "", part
        if "@" in rest:
            rest = "***@" + rest.rpartition("@")[2]
        shown.append(scheme + sep + rest)
    return ",".join(shown)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"broker URL {shown_url(url)!r}: scheme must be mqtt:// or mqtts://")
        if "@" in parsed.netloc:
            raise ValueError(
                f"broker URL {shown_url(url)!r} carries credentials, which are not used: "
                "give the user with --username and the password in --password-file"
            )
        if not parsed.hostname:
            raise ValueError(f"broker URL {shown_url(url)!r} has no host")
        tls = parsed.scheme in ("mqtts", "ssl")
        try:
            port = parsed.port
        except ValueError as exc:  # out of range, not a number
            raise ValueError(f"broker URL {shown_url(url)!r}: {exc}") from None
        return cls(parsed.hostname, port or (8883 if tls else 1883), tls)

    @classmethod
    def parse_list(cls, urls: str) -> list[BrokerAddress]:
        """A comma-separated failover list (one URL is a list of one); all TLS or none."""
        parts = [part.strip() for part in urls.split(",")]
        if not parts or not all(parts):
            raise ValueError(f"broker URL list {shown_url(urls)!r} has an empty entry")
        addresses = [cls.parse(part) for part in parts]
        if len({a.tls for a in addresses}) > 1:
            raise ValueError(
                f"broker URL list {shown_url(urls)!r} mixes mqtt:// and mqtts://; use one for all"
            )
        return addresses

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class BrokerFileError(ValueError):
    """A broker password file or CA file that cannot be used: ``str()`` is one line
    naming its option (:func:`broker_file_problem`), never a word of the file."""


@dataclass(frozen=True)
class BrokerConnection:
    """Where the broker is and how to log in: the same settings on both sides.

    ``url`` is ``mqtt://host[:port]`` or ``mqtts://host[:port]`` (TLS), or
    several of them comma-separated: the nodes of a clustered broker, tried
    in turn (:meth:`BrokerAddress.parse_list`).  ``password_file`` holds the
    password of ``username`` (read when connecting, never logged); ``tls_ca``
    is the CA that signed the broker's certificate (the system's CAs if unset
    on ``mqtts://``).  The daemons' command lines set it with ``--broker``,
    ``--username``, ``--password-file`` and ``--tls-ca`` (:mod:`tideflow.settings`).
    """

    url: str
    username: str | None = None
    password_file: Path | None = None
    tls_ca: Path | None = None

    def addresses(self) -> list[BrokerAddress]:
        """The failover list ``url`` names; ValueError if it names none properly."""
        return BrokerAddress.parse_list(self.url)

    def read_password(self) -> str | None:
        if self.password_file is None:
            return None
        return self.password_file.read_text().strip()

    def check_files(self) -> None:
        """Read the password file and the CA file now, as :class:`MqttLink` does when
        it is made, raising what that raises (OSError, ssl.SSLError, UnicodeDecodeError;
        :func:`broker_file_problem` says it in one line): a daemon that makes its link
        late (the operator, in kopf's startup handler) checks them before it starts
        anything.  A password file named without a username is read too: it is
        named to be used."""
        if self.password_file is not None:
            self.password_file.read_text()
        if self.tls_ca is not None:
            ssl.create_default_context(cafile=self.tls_ca)

    def check_usable(self) -> None:
        """:meth:`check_files`, raising :class:`BrokerFileError` in one line naming the
        option: for whoever makes the link later than its process checked (the
        operator's standby waits for its Lease between the two)."""
        try:
            self.check_files()
        except (OSError, UnicodeDecodeError) as exc:  # (ssl.SSLError is an OSError)
            raise BrokerFileError(broker_file_problem(self, exc)) from None


def broker_file_problem(broker: BrokerConnection, exc: OSError | UnicodeDecodeError) -> str:
    """What making an :class:`MqttLink` (or :meth:`BrokerConnection.check_files`) found
    wrong with the broker's password file or CA file, in one line naming the option:
    ``exc`` says which file only when it could not be opened (the password file is the
    only one decoded).  Never a word of the file's content (a decoding error's own
    text quotes a byte of it)."""
    if isinstance(exc, UnicodeDecodeError):
        return f"--password-file {broker.password_file}: not UTF-8 text"
    strerror = exc.strerror or str(exc)
    if broker.password_file is not None and exc.filename == os.fspath(broker.password_file):
        return f"--password-file {broker.password_file}: {strerror}"
    if broker.tls_ca is not None:
        return f"--tls-ca {broker.tls_ca}: {strerror}"
    return f"the broker's settings: {strerror}"


@dataclass
class LinkConfig:
    connection: BrokerConnection
    client_id: str
    keepalive: int = 30
    connect_timeout: float = 5.0
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    max_inflight: int = 100
    subscriptions: list[str] = field(default_factory=list)
    will_topic: str | None = None
    will_payload: bytes | None = None
    mqtt5: bool = False
    session_expiry_seconds: int = 600  # MQTT 5 only
    # Drop what the broker hands out from its retained store on subscribe: a
    # clustered broker keeps one store per node, so the copy can be stale.
    ignore_retained: bool = False

    def subscriptions_with_qos(self) -> list[tuple[str, int]]:
        return [(sub, 1) for sub in self.subscriptions]


STOP_GRACE_SECONDS = 2.0  # what a stop gives the link thread to write the DISCONNECT


def _write_on_the_link_thread(_client: mqtt.Client, _userdata: object, _sock: object) -> None:
    """paho's register-write hook: nothing to do, the link thread's select sees the write."""


MessageHandler = Callable[[str, bytes], None]
StateHandler = Callable[[bool], None]


def backoff_delays(minimum: float, maximum: float, rng: random.Random) -> Callable[[int], float]:
    """Capped exponential backoff with full jitter: attempt n waits U(0, min*2^n) <= max."""

    def delay(attempt: int) -> float:
        cap = min(maximum, minimum * (2 ** min(attempt, 30)))
        return max(minimum / 2, rng.uniform(0, cap))

    return delay


class MqttLink:
    """A paho client in its own thread, reconnecting forever until stopped."""

    def __init__(
        self,
        config: LinkConfig,
        loop: asyncio.AbstractEventLoop,
        on_message: MessageHandler,
        on_state: StateHandler,
        on_connected_publish: Callable[[], list[tuple[str, bytes, bool]]] | None = None,
    ) -> None:
        self.config = config
        self.addresses = config.connection.addresses()
        self._index = 0  # the address in use or tried next
        self._loop = loop
        self._on_message = on_message
        self._on_state = on_state
        self._on_connected_publish = on_connected_publish
        self._stop = threading.Event()
        self._abandon = threading.Event()  # stop waited long enough for the DISCONNECT
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()
        self._delay = backoff_delays(config.backoff_min, config.backoff_max, random.Random())
        self._drops: list[float] = []
        self._accepted = False  # the broker accepted the current connection
        self._round_start = 0  # where the current round of connection attempts began
        self._suback_mid: int | None = None  # the SUBSCRIBE whose answer makes us connected
        self._warned_at = float("-inf")
        # Subscriptions added while running (subscribe()): those sent on this connection.
        self._subs_lock = threading.Lock()
        self._subs_sent: list[str] | None = None  # None: not yet subscribed on this connection
        self._connect_subs: list[str] = []  # what the connect's SUBSCRIBE asked for
        self.client = self._make_client()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def address(self) -> BrokerAddress:
        """The broker address in use (or tried next)."""
        return self.addresses[self._index]

    def _next_address(self) -> bool:
        """Move on to the next address; True when that starts a new round of the list."""
        self._index = (self._index + 1) % len(self.addresses)
        return self._index == self._round_start

    def _make_client(self) -> mqtt.Client:
        cfg = self.config
        if cfg.mqtt5:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=cfg.client_id, protocol=mqtt.MQTTv5
            )
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=cfg.client_id,
                clean_session=False,
                protocol=mqtt.MQTTv311,
            )
        client.connect_timeout = cfg.connect_timeout
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(0)  # unbounded: the outbox, not paho, bounds us
        broker = cfg.connection
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.read_password())
        if self.address.tls or broker.tls_ca is not None:
            client.tls_set(
                ca_certs=str(broker.tls_ca) if broker.tls_ca else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        if cfg.will_topic is not None:
            client.will_set(cfg.will_topic, cfg.will_payload, qos=1, retain=True)
        # Every write to the socket on the link thread: paho, not started by
        # loop_start(), writes a packet queued from another thread in that thread,
        # beside this one's reads and writes (on TLS, two threads inside one OpenSSL
        # connection: "Fatal Python error: Aborted").  With a register-write hook it
        # only queues the packet and wakes this thread's select, as in its own
        # threaded mode.
        client.on_socket_register_write = _write_on_the_link_thread
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        return client

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
        self._thread.start()

    def stop(self, final: list[tuple[str, bytes, bool]] | None = None) -> None:
        """Publish ``final`` messages if connected, disconnect, join the thread."""
        if self.connected:
            for topic_name, payload, retain in final or []:
                info = self.client.publish(topic_name, payload, qos=1, retain=retain)
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(timeout=2)
        self._stop.set()  # no reconnect, no backoff wait from here
        with contextlib.suppress(Exception):
            self.client.disconnect()  # queued: the link thread writes it, then ends
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE_SECONDS)
        self._abandon.set()  # a link that could not write it in time: just close
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            address = self.address
            try:
                if self.config.mqtt5:
                    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call,unused-ignore]
                    props.SessionExpiryInterval = self.config.session_expiry_seconds
                    self.client.connect(
                        address.host, address.port, keepalive=self.config.keepalive,
                        clean_start=False, properties=props,
                    )  # fmt: skip
                else:
                    self.client.connect(address.host, address.port, keepalive=self.config.keepalive)
            except (OSError, ssl.SSLError, ValueError) as exc:
                if not self._next_address():
                    # Another node of the list may take us: try it now.
                    log.info("broker %s unreachable (%s); trying %s", address, exc, self.address)
                    continue
                wait = self._delay(attempt)
                log.info("broker %s unreachable (%s); retrying in %.1fs", address, exc, wait)
                attempt += 1
                self._stop.wait(wait)
                continue
            if self._stop.is_set():  # stopped while connecting: say goodbye at once
                with contextlib.suppress(Exception):
                    self.client.disconnect()
            rc = MQTTErrorCode.MQTT_ERR_SUCCESS
            # (A stop ends this loop by the DISCONNECT it queues: once written, paho
            # closes the socket and loop() answers "no connection".)
            while not self._abandon.is_set() and rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                rc = self.client.loop(timeout=0.2)
            if self._connected.is_set():
                attempt = 0
            if self._accepted and not self._stop.is_set():
                self._dropped_after_connect()
            self._accepted = False
            self._set_connected(False)
            if self._stop.is_set():
                break
            with contextlib.suppress(Exception):
                self.client.disconnect()
            # The node that dropped us may be going down: the next one is as good.
            self._next_address()
            self._round_start = self._index
            wait = self._delay(attempt)
            attempt += 1
            log.info(
                "link to %s lost (%s); reconnecting to %s in %.1fs", address, rc, self.address, wait
            )
            self._stop.wait(wait)

    # ------------------------------------------------------------- callbacks
    def _handle_connect(
        self, client: mqtt.Client, _ud: object, _flags: object, reason: object, _props: object
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker %s refused the connection: %s", self.address, reason)
            client.disconnect()
            return
        self._accepted = True
        with self._subs_lock:
            self._subs_sent = None
            self._connect_subs = list(self.config.subscriptions)
        subscriptions = [(sub, 1) for sub in self._connect_subs]
        if not subscriptions:
            self._subscribed(client)
            return
        # Connected once the broker confirms the subscriptions (see _handle_subscribe).
        _rc, self._suback_mid = client.subscribe(subscriptions)

    def _handle_subscribe(
        self, _c: mqtt.Client, _ud: object, mid: int, codes: list[Any], _props: object
    ) -> None:
        """The SUBACK: only now is what is published to our topics kept for us.

        A broker that makes the session's queue on SUBSCRIBE (RabbitMQ: a quorum
        queue replicated over the cluster) drops what arrives before it exists,
        so ``connected`` (what callers act on) waits for this.
        """
        if mid != self._suback_mid:
            return
        for sub, code in zip(self._connect_subs, codes, strict=False):
            if getattr(code, "is_failure", False):
                log.warning("broker %s refused the subscription to %s: %s", self.address, sub, code)
        self._subscribed(_c)

    def _subscribed(self, client: mqtt.Client) -> None:
        """Announce ourselves (the agent's state) only now: whoever answers it is heard."""
        with self._subs_lock:
            late = [t for t in self.config.subscriptions if t not in self._connect_subs]
            self._subs_sent = list(self.config.subscriptions)
        if late:  # added by subscribe() while the connect's SUBSCRIBE was on its way
            client.subscribe([(t, 1) for t in late])
        if self._on_connected_publish is not None:
            for topic_name, payload, retain in self._on_connected_publish():
                client.publish(topic_name, payload, qos=1, retain=retain)
        self._set_connected(True)

    def _dropped_after_connect(self) -> None:
        """An established connection ended without our asking: watch for a take-over.

        Brokers that do not say "Session taken over" (Mosquitto 2.0 just closes
        the socket) still show it: the broker accepts us at once every time and
        then drops us again, because a second client keeps reconnecting under
        the same client id.  Network trouble looks different (connecting fails).
        """
        now = time.monotonic()
        self._drops = [t for t in self._drops if now - t < TAKEOVER_WINDOW] + [now]
        if len(self._drops) >= TAKEOVER_DROPS and now - self._warned_at > TAKEOVER_WINDOW:
            self._warned_at = now
            log.warning(
                "MQTT SESSION TAKEN OVER? the broker %s accepted client id %s and dropped it "
                "again %d times in %ds: is another process connecting under the same client "
                "id? Two such processes keep taking the session from each other and each "
                "sees only part of the messages",
                self.address, self.config.client_id, len(self._drops), TAKEOVER_WINDOW,
            )  # fmt: skip

    def _handle_disconnect(
        self, _c: mqtt.Client, _ud: object, _flags: object, reason: object, _props: object
    ) -> None:
        if getattr(reason, "value", None) == SESSION_TAKEN_OVER:
            log.warning(
                "MQTT SESSION TAKEN OVER: another client connected to %s with this client id "
                "(%s) and the broker closed ours; two processes sharing a client id keep "
                "disconnecting each other and each sees only part of the messages",
                self.address, self.config.client_id,
            )  # fmt: skip
        self._set_connected(False)

    def _handle_message(self, _c: mqtt.Client, _ud: object, message: mqtt.MQTTMessage) -> None:
        if message.retain and self.config.ignore_retained:
            # Only a retained-store copy has the flag: live messages arrive without it.
            log.debug("ignored a retained message on %s", message.topic)
            return
        self._loop.call_soon_threadsafe(self._on_message, message.topic, bytes(message.payload))

    def _set_connected(self, value: bool) -> None:
        if value == self._connected.is_set():
            return
        if value:
            self._connected.set()
        else:
            self._connected.clear()
        with contextlib.suppress(RuntimeError):  # the loop may be closing
            self._loop.call_soon_threadsafe(self._on_state, value)

    def subscribe(self, topics: list[str]) -> None:
        """Add subscriptions: sent now if subscribed already, and made again on every connect."""
        with self._subs_lock:
            new = [t for t in topics if t not in self.config.subscriptions]
            if not new:
                return
            self.config.subscriptions.extend(new)
            if self._subs_sent is None:
                return  # the connect's SUBSCRIBE (or the one after its SUBACK) takes them
        self.client.subscribe([(t, 1) for t in new])

    # ------------------------------------------------------------- publishing
    def publish(self, topic_name: str, payload: bytes, *, retain: bool = False) -> bool:
        """Queue a QoS 1 publish; False if the link is down (the caller retries later)."""
        if not self.connected:
            return False
        info = self.client.publish(topic_name, payload, qos=1, retain=retain)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
