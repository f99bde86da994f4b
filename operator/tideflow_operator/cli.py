"""``tideflow-operator run``: a thin wrapper over kopf with Tideflow's handlers.

Active/standby: with ``--leader-election`` (the default, in a cluster or not:
two operators can meet on any API server) the process first takes a
``coordination.k8s.io`` Lease; only the holder runs kopf and the MQTT bridge,
and a holder that loses its lease exits so that Kubernetes restarts it as a
standby; so does one that cannot renew it (the API server away, or silent)
within the renew deadline, before the Lease can pass to another.
``--no-leader-election`` is for one operator you are sure is alone.
A stop (SIGTERM, Ctrl-C, or SIGHUP: the terminal closed, the ssh session
dropped; not when started with it ignored, ``nohup``) gives the Lease back at
any moment and ends the operator with 0 (130 for Ctrl-C), start-up
included: before the event loop takes the signals, ours unwinds start-up to
the release, and notes the stop first, since Python may drop the exception it
raises (:class:`StartupStops`).
Each process connects to the broker under a client id of its own (two
operators sharing one would keep taking each other's MQTT session over).
Two kopf operators of equal priority would both freeze (kopf's peering rule),
and the MQTT bridge has no peering at all, hence the lease.  kopf peering
stays on as a second guard when ``--peering`` names a peering object.

Health: one endpoint for the process's whole life, at ``--liveness``'s
address.  Its path (``/healthz``) answers 200 while the process is alive, the
standby included (a standby is healthy; restarting it gains nothing); once
active, only while kopf's event loop answers.  ``/readyz`` on the same port
answers 200 only while this replica holds the lease and kopf has started
(its startup handlers done), so Kubernetes counts the standby not Ready.
kopf's own liveness server is not used: it serves one path only.

Every flag can also come from a ``TIDEFLOW_*`` environment variable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import kopf

from tideflow.failpoints import failpoint
from tideflow.gc_tuning import tune_gc
from tideflow.logs import configure_logging
from tideflow.mqtt import BrokerFileError
from tideflow.settings import (
    EnvOptions,
    broker_from_args,
    env,
    log_level,
    port_number,
    positive_int,
    positive_seconds,
)
from tideflow_operator import handlers, heap, kube, ttl  # (handlers: registers the kopf handlers)
from tideflow_operator.http_servers import BoundedHTTPServer, QuietHandler
from tideflow_operator.runtime import OperatorConfig
from tideflow_operator.shards import ShardError, ShardSpec, shard_index
from tideflow_operator.stops import StartupStops, Terminated

log = logging.getLogger(__name__)
READINESS_PATH = "/readyz"
LOOP_ANSWER_SECONDS = 3.0  # under the chart's probe timeoutSeconds (5)
SAY_SECONDS = 30.0  # the leader lease's tries that fail for a reason: one line at most
# The leader Lease: held this long unrenewed before a standby may take it; a leader
# that has not renewed it for RETRY_SECONDS + RENEW_DEADLINE_SECONDS exits (the
# library's loop, and our own watchdog if a call hangs); each try every RETRY_SECONDS.
LEASE_SECONDS, RENEW_DEADLINE_SECONDS, RETRY_SECONDS = 15, 10, 2
LEASE_CALL_SECONDS = (3.0, 5.0)  # connect, read: one call on the Lease (a busy API server: 5 s)
STOP_POLL_SECONDS = 0.25  # how often a standby waiting for the Lease looks for a noted stop


def build_parser(fields: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line; ``fields`` (if given) gets each OperatorConfig field's flag."""
    parser = argparse.ArgumentParser(prog="tideflow-operator", description=__doc__.split("\n")[0])
    top = EnvOptions(parser)
    top.option("--log-level", default="INFO", type=log_level)
    top.switch("--log-json", help="log JSON lines (lines about a run carry its trace_id/span_id)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="reconcile Workflows and EdgeSites")
    # Also after ``run`` (where the other flags are); unset there, the top level's value stands.
    run.add_argument("--log-json", action="store_true", default=argparse.SUPPRESS)
    options = EnvOptions(run)
    options.broker()
    options.option(
        "--mqtt-version",
        field="mqtt5",
        choices=("5", "3.1.1"),
        default="5",
        help="3.1.1 for brokers without MQTT 5 (RabbitMQ before 3.13); see the README",
    )
    scope = run.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=None,
        help="watch this namespace (repeat for more; env TIDEFLOW_NAMESPACE, comma-separated)",
    )
    options.fields["namespaces"] = "--namespace"
    scope.add_argument("--all-namespaces", "-A", action="store_true")
    options.switch(
        "--no-auto-register",
        field="auto_register",
        help="do not create EdgeSites for unknown sites that report in",
    )
    options.switch(
        "--no-agent-labels",
        field="agent_labels",
        help="take the labels a site's agent reports only when registering its EdgeSite, "
        "never later: a site cannot relabel itself to draw siteSelector Workflows",
    )
    options.switch(
        "--leader-election",
        field="leader_election",
        default=True,
        negatable=True,
        help="hold a Lease while active (default: on; two active operators would both act)",
    )
    options.option(
        "--lease-namespace",
        field="ledger_namespace",
        default=_pod_namespace(),
        help="the operator's own namespace: its Lease and its ledger ConfigMaps",
    )
    options.option("--lease-name", field="lease_name", default="tideflow-operator")
    options.option("--peering", field="peering", help="kopf peering object name")
    options.option(
        "--liveness",
        field="liveness",
        help=f"e.g. http://0.0.0.0:8080/healthz; readiness is {READINESS_PATH} on the same port",
    )
    options.option("--metrics-port", field="metrics_port", type=port_number)
    options.option(
        "--client-id",
        field="client_id",
        default="tideflow-operator",
        help="MQTT client id prefix; each process adds its host, pid and a random part",
    )
    options.option(
        "--reconcile-seconds",
        field="reconcile_seconds",
        type=positive_seconds,
        default=60.0,
        help="how often runs whose Workflow is gone are looked for (and at start-up)",
    )
    options.option(
        "--site-silence-seconds",
        field="site_silence_seconds",
        type=positive_seconds,
        default=90.0,
        help="a site not heard from this long is offline (its last will can be lost with "
        "a broker node); keep it several times the agents' --heartbeat-seconds",
    )
    options.option(
        "--status-max-tasks",
        field="status_max_tasks",
        type=positive_int,
        default=500,
        help="tasks listed in a Workflow's status (the counts stay exact beyond it)",
    )
    options.option(
        "--housekeeping-seconds",
        field="housekeeping_seconds",
        type=positive_seconds,
        default=1.0,
        help="how often deadlines, held-back status writes and acks are seen to",
    )
    options.option(
        "--ttl-seconds-after-finished",
        field="ttl_seconds_after_finished",
        type=_ttl,
        help="delete finished Workflows this long after they finished, unless their "
        "spec.ttlSecondsAfterFinished says otherwise (default: keep them)",
    )
    options.option(
        "--shard-index",
        field="shard_index",
        default="0",
        help="this operator's shard, 0 to --shard-count - 1, or 'ordinal': the end of its "
        "StatefulSet pod name (README 'When to shard')",
    )
    options.option(
        "--shard-count",
        field="shard_count",
        type=positive_int,
        default=1,
        help="operator shards the sites are partitioned among (1: one operator, unsharded)",
    )
    if fields is not None:
        fields.update(options.fields)
    return parser


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    """The settings object the parsed command line describes (client id as given)."""
    namespaces = [] if args.all_namespaces else list(args.namespace or [])
    if not namespaces and not args.all_namespaces:
        namespaces = [n.strip() for n in (env("NAMESPACE") or "").split(",") if n.strip()]
    return OperatorConfig(
        broker=broker_from_args(args),
        mqtt5=args.mqtt_version == "5",
        auto_register=not args.no_auto_register,
        agent_labels=not args.no_agent_labels,
        client_id=args.client_id,
        status_max_tasks=args.status_max_tasks,
        housekeeping_seconds=args.housekeeping_seconds,
        namespaces=namespaces,
        ledger_namespace=args.lease_namespace,
        reconcile_seconds=args.reconcile_seconds,
        site_silence_seconds=args.site_silence_seconds,
        leader_election=args.leader_election,
        lease_name=args.lease_name,
        peering=args.peering,
        liveness=args.liveness,
        metrics_port=args.metrics_port,
        ttl_seconds_after_finished=args.ttl_seconds_after_finished,
        shard_index=shard_index(args.shard_index),
        shard_count=args.shard_count,
    )


def _ttl(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    seconds = int(value)
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{value}: a number of seconds, 0 or more")
    return seconds


def instance_identity() -> str:
    """``<host name>-<pid>-<random>``: this host and process, and a random part, since
    two processes may share both (pods with ``hostNetwork`` on one node: the node's
    host name, and each container's process pid 1)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def unique_client_id(prefix: str) -> str:
    """``prefix`` plus :func:`instance_identity`: no two operators share an MQTT session."""
    suffix = f"-{instance_identity()}"
    return (
        (prefix[: 128 - len(suffix)] + suffix).replace("/", "-").replace("+", "-").replace("#", "-")
    )


def _pod_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    try:
        return path.read_text().strip()
    except OSError:
        return "default"


class _Answers:
    """The Lease API the election's lock calls, each call within LEASE_CALL_SECONDS
    (the client's default is no limit: an API server that took the connection and
    never answered held the election's thread for ever), noting what the API server
    refuses: all but a read's 404 (the lock creates it then) and a 409 (another
    candidate's write came first), which are the election's ordinary course."""

    def __init__(self, api: Any, refusals: list[tuple[str, Exception]]) -> None:
        self._api = api
        self._refusals = refusals

    def __getattr__(self, name: str) -> Any:
        from kubernetes.client.exceptions import ApiException

        method = getattr(self._api, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("_request_timeout", LEASE_CALL_SECONDS)
            try:
                return method(*args, **kwargs)
            except ApiException as exc:
                ordinary = exc.status == 409 or (exc.status == 404 and name.startswith("read"))
                if not ordinary:
                    self._refusals.append((name.split("_", 1)[0], exc))
                raise

        return call


def _refusal(call: str, exc: Exception) -> str:
    """``create: 404 Not Found (namespaces "x" not found)``: the API server's answer."""
    status, reason = getattr(exc, "status", None), getattr(exc, "reason", None)
    message = ""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        message = str(json.loads(getattr(exc, "body", None) or "{}").get("message") or "")
    said = f"{call}: {status} {reason}"
    return f"{said} ({message[:300]})" if message else said


class LeaderLease:
    """This replica's hold on the leader Lease: taken before kopf starts, given
    back when the operator stops cleanly (client-go's ``ReleaseOnCancel``), so a
    standby takes over on its next retry instead of waiting out the lease."""

    def __init__(self, config: OperatorConfig) -> None:
        from kubernetes.leaderelection import electionconfig, leaderelection
        from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

        kube.load_settings()
        self.name, self.namespace = config.lease_name, config.ledger_namespace
        # (Identical for two processes, both "renewed" one Lease: two active operators.)
        self.identity = instance_identity()
        self._acquired = threading.Event()
        self._guard = threading.Lock()  # one API call on the Lease at a time
        self._released = False
        # Taken on the server: set the moment a try succeeded, before the library
        # calls onstarted_leading (a stop in between must still give it back).
        self._taken = False
        lease = self

        self._said_at = float("-inf")  # when a try that failed for a reason was logged
        self._renewal_began = float("-inf")  # when the last try that held the Lease began
        # The API server's refusals during the current try (the library only logs them,
        # at INFO, in a logger quieted for its renewal lines): (call, exception).
        self._refusals: list[tuple[str, Exception]] = []

        class Election(leaderelection.LeaderElection):
            def try_acquire_or_renew(self) -> bool:
                with lease._guard:
                    if lease._released:
                        return lease._acquired.is_set()  # renew nothing, lose nothing
                    lease._refusals.clear()
                    began = time.monotonic()
                    try:
                        took = bool(super().try_acquire_or_renew())  # type: ignore[no-untyped-call]
                    except Exception as exc:
                        # The library's lock catches the API server's answers, not a
                        # connection it cannot make: raised, it ended the election's
                        # thread, and a leader stopped renewing yet went on acting.
                        # A failed try: retried, and a leader past its renew deadline
                        # exits (onstopped_leading), as on any failed renewal.
                        lease._say(f"cannot reach the API server ({type(exc).__name__}: "
                                   f"{str(exc)[:300]})")  # fmt: skip
                        return False
                    lease._taken = lease._taken or took
                    if took:
                        lease._renewal_began = began
                    if not took and lease._refusals:
                        lease._say("; ".join(_refusal(c, e) for c, e in lease._refusals))
                    return took

        def lost() -> None:
            log.error("lost the leader lease %s; exiting so a standby takes over", self.name)
            os._exit(3)

        self._lost = lost

        lock = LeaseLock(self.name, self.namespace, self.identity)
        lock.api_instance = cast(Any, _Answers(lock.api_instance, self._refusals))
        self._election = Election(  # type: ignore[no-untyped-call]
            electionconfig.Config(
                lock,
                lease_duration=LEASE_SECONDS,
                renew_deadline=RENEW_DEADLINE_SECONDS,
                retry_period=RETRY_SECONDS,
                onstarted_leading=self._acquired.set,
                onstopped_leading=lost,
            )
        )

    def _say(self, why: str) -> None:
        """Why a try failed (not merely another's hold): at most every SAY_SECONDS."""
        now = time.monotonic()
        if now - self._said_at < SAY_SECONDS:
            return
        self._said_at = now
        log.warning("cannot take the leader lease %s/%s: %s; trying again every 2 s",
                    self.namespace, self.name, why)  # fmt: skip

    def wait(self, check: Callable[[], None] = lambda: None) -> None:
        """Block until this process holds the lease; exit the process when it is lost.

        ``check`` is called every STOP_POLL_SECONDS meanwhile: it raises to stop
        waiting (:meth:`StartupStops.check`, a stop whose exception was lost)."""
        # The library logs every renewal (every retry_period) at INFO: only our own
        # lines about taking and losing the lease are worth an operator's log.
        logging.getLogger("leaderelection").setLevel(
            logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING
        )
        threading.Thread(target=self._election.run, name="leader-election", daemon=True).start()
        log.info(
            "waiting for the leader lease %s/%s as %s", self.namespace, self.name, self.identity
        )
        failpoint("lease-waiting")
        while not self._acquired.wait(STOP_POLL_SECONDS):
            check()
        log.info("leader lease acquired: this replica is active")
        threading.Thread(target=self._watch_renewals, name="lease-watchdog", daemon=True).start()

    def _watch_renewals(self) -> None:
        """Exit when the last successful renewal began RETRY + RENEW_DEADLINE seconds ago
        (12 s: as the library's loop gives up, within the Lease's 15 s).

        The library's loop says the same only between its calls: a call that hangs
        (a partition drops packets; the client waits for its time limit, twice a
        try) kept a leader acting past the Lease, which a standby then took.  Timed
        from when the try began, before the API server wrote it, so the leader is
        gone before any standby can see the Lease run out."""
        limit = RETRY_SECONDS + RENEW_DEADLINE_SECONDS
        while not self._released:
            if time.monotonic() - self._renewal_began > limit:
                log.error("could not renew the leader lease %s for %ds", self.name, limit)
                self._lost()
                return
            time.sleep(0.25)

    def release(self) -> None:
        """Stop renewing and clear the holder, if it is still us (a conditional update)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        failpoint("lease-releasing")
        with self._guard:
            self._released = True
            if not (self._taken or self._acquired.is_set()):
                return
            api = client.CoordinationV1Api()
            limit = LEASE_CALL_SECONDS  # (a stop must not wait on a silent API server)
            try:
                current = api.read_namespaced_lease(
                    self.name, self.namespace, _request_timeout=limit
                )
                if current.spec is None or current.spec.holder_identity != self.identity:
                    return
                current.spec.holder_identity = None
                # resourceVersion travels with the object: a standby that took the
                # Lease meanwhile makes this a 409, and its hold stands.
                api.replace_namespaced_lease(
                    self.name, self.namespace, current, _request_timeout=limit
                )
            except ApiException as exc:
                log.warning("could not release the leader lease %s: %s", self.name, exc.reason)
                return
            except Exception as exc:  # the API server unreachable: the lease just expires
                log.warning("could not release the leader lease %s: %s", self.name, exc)
                return
            log.info("leader lease %s released", self.name)


class Health:
    """What the probes are told: alive (standby or active) and ready (active and started)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # kopf's, once active
        self.started: asyncio.Event | None = None  # kopf's ready flag

    def _loop_answers(self) -> bool:
        loop = self.loop
        if loop is None or loop.is_closed():
            return False

        async def noop() -> None:
            return None

        try:
            asyncio.run_coroutine_threadsafe(noop(), loop).result(LOOP_ANSWER_SECONDS)
        except Exception:  # a stuck or stopped loop: not alive, not ready
            return False
        return True

    def alive(self) -> bool:
        return self.loop is None or self._loop_answers()

    def ready(self) -> bool:
        started = self.started
        return started is not None and started.is_set() and self._loop_answers()


def serve_health(url: str | None, health: Health) -> BoundedHTTPServer | None:
    """Serve the liveness path and ``READINESS_PATH`` at ``url``'s address."""
    if not url:
        return None
    parsed = urlparse(url)
    live_path = parsed.path or "/"

    class Probe(QuietHandler):
        def do_GET(self) -> None:
            if self.path == live_path:
                ok, what = health.alive(), "alive"
            elif self.path == READINESS_PATH:
                ok, what = health.ready(), "ready"
            else:
                self.send_error(404)
                return
            body = json.dumps({what: ok, "standby": health.loop is None}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    host, port = parsed.hostname or "0.0.0.0", parsed.port or 8080
    # The address's own family (``[::]`` in an IPv6-only cluster: an IPv4 server
    # could not listen there, and the operator stopped at its start).
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    server_class = type("_Probes", (BoundedHTTPServer,), {"address_family": family[0][0]})
    server: BoundedHTTPServer = server_class((host, port), Probe)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server


def cannot_start(config: OperatorConfig) -> str | None:
    """A file the operator reads at its start that it cannot use, in one line naming
    its option (None: none).  Checked before the Lease is taken or anything is
    written: the broker's files were read only by kopf's startup handler, after the
    Lease, the ledger and the Workflows' listing, and a bad one failed there with a
    traceback, retried for ever; a bad kubeconfig ended it with the client's."""
    try:
        config.broker.check_usable()
    except BrokerFileError as exc:
        return str(exc)
    return kube.settings_problem()


def main(argv: Sequence[str] | None = None, stops: StartupStops | None = None) -> int:
    """``tideflow-operator``; ``stops``: the entry point's, holding stops since its
    first line (:mod:`tideflow_operator.entry`).  Without it they are held from here."""
    if stops is None:
        stops = StartupStops(raising=False)
    if not stops.installed:
        stops.install()
    try:
        return _start(argv, stops)
    finally:
        stops.restore()


def _start(argv: Sequence[str] | None, stops: StartupStops) -> int:
    args = build_parser().parse_args(argv)
    failpoint("operator-args-read")
    configure_logging(args.log_level, json_lines=args.log_json)
    try:
        config = config_from_args(args)
        shard = ShardSpec(config.shard_index, config.shard_count)
    except ShardError as exc:
        print(f"tideflow-operator: {exc}", file=sys.stderr)
        return 2
    try:
        config.broker.addresses()
    except ValueError as exc:
        print(f"--broker: {exc}", file=sys.stderr)
        return 2
    problem = cannot_start(config)
    if problem is not None:
        print(f"tideflow-operator: {problem}", file=sys.stderr)
        return 2
    # A shard has its own MQTT client id, Lease and kopf peering object (shards.py).
    config = dataclasses.replace(
        config,
        client_id=unique_client_id(shard.client_id(config.client_id)),
        lease_name=shard.lease_name(config.lease_name),
        peering=shard.lease_name(config.peering) if config.peering else None,
    )
    if shard.sharded:
        log.info("operator shard %d of %d", shard.index, shard.count)
    heap.limit_arenas()  # before the API client's threads (heap.py)
    # kopf hands this to every handler: the startup handler makes the runtime from
    # the config and stores it here (memo.runtime); the stop flag stops the operator.
    # The TTL reaper (ttl.py) finds the operator-wide default here too.
    memo = kopf.Memo(
        config=config, ttl=ttl.TtlConfig(default_seconds=config.ttl_seconds_after_finished)
    )
    health = Health()
    # Both ports are served before the Lease (a standby's metrics have no state
    # gauges): one taken is a line now, not a traceback (the metrics port's came
    # after the Lease was taken, at every takeover).
    metrics = None
    if config.metrics_port:
        from tideflow_operator.metrics import serve_metrics

        try:
            metrics = serve_metrics(config.metrics_port, lambda: handlers.runtime_of(memo))
        except OSError as exc:
            print(f"tideflow-operator: --metrics-port {config.metrics_port}: cannot listen: "
                  f"{exc.strerror or exc}", file=sys.stderr)  # fmt: skip
            return 2
    try:
        probes = serve_health(config.liveness, health)
    except (OSError, ValueError) as exc:  # (ValueError: the URL's port is no port)
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        why = f"cannot listen: {exc.strerror or exc}" if isinstance(exc, OSError) else exc
        print(f"tideflow-operator: --liveness {config.liveness}: {why}", file=sys.stderr)
        return 2
    # A stop request (SIGTERM: a rolling upgrade, a drained node) may come at any
    # moment of start-up.  Until kopf puts its own handler in place, the signal's
    # default action killed the process with the Lease held, and the standby
    # waited out the lease duration.  Now it unwinds start-up (Terminated) and the
    # Lease is given back; once the event loop runs, it sets kopf's stop flag.
    held: list[LeaderLease] = []
    try:
        stops.arm()  # (a stop held since the first line is raised here)
        return _operate(config, memo, health, held, stops)
    except Terminated as stop:
        log.info("stopped by %s while starting", stop.sig.name)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        stops.ignore()
        for lease in held:
            lease.release()
        for server in (probes, metrics):
            if server is not None:
                server.shutdown()
                server.server_close()
        stops.restore()


def _operate(
    config: OperatorConfig,
    memo: kopf.Memo,
    health: Health,
    held: list[LeaderLease],
    stops: StartupStops,
) -> int:
    """Take the Lease (into ``held``, for main to give back) and run kopf."""
    if config.leader_election:
        lease = LeaderLease(config)
        held.append(lease)
        lease.wait(stops.check)
        failpoint("lease-acquired")
    stops.check()
    namespaces = config.namespaces
    tune_gc()  # about to operate: draining sites' batches allocates heavily

    async def operate() -> None:
        failpoint("operator-loop")  # (the event loop runs; kopf's stop flag not yet made)
        memo.stop_flag = stop_flag = asyncio.Event()
        # From here a stop signal stops kopf through its stop flag (kopf puts its own
        # handlers in place once its tasks are spawned); one noted before is raised.
        for sig in stops.signals:
            asyncio.get_running_loop().add_signal_handler(sig, stop_flag.set)
        stops.check()
        health.started = asyncio.Event()
        health.loop = asyncio.get_running_loop()
        failpoint("operator-starting")
        await kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=config.peering is None,
            peering_name=config.peering,
            ready_flag=health.started,
            stop_flag=stop_flag,
            memo=memo,
        )

    try:
        with warnings.catch_warnings():
            # kopf, its startup refused, never awaited the credentials' task it made:
            # a RuntimeWarning of two lines, under the line that says why it stopped.
            warnings.filterwarnings("ignore", "coroutine 'authenticator' was never awaited")
            asyncio.run(operate())
    except Exception:
        problem = memo.get("cannot_start")  # (handlers.startup: a broker file spoiled)
        if problem is None:
            raise
        print(f"tideflow-operator: {problem}", file=sys.stderr)
        return 2
    runtime = handlers.runtime_of(memo)
    if runtime is not None and runtime.supervisor.failure is not None:
        print(
            f"tideflow-operator: stopped: background task {runtime.supervisor.failed_task} "
            f"died: {runtime.supervisor.failure!r}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
