"""``tideflow-operator run``: a thin wrapper over kopf with Tideflow's handlers.

Active/standby: with ``--leader-election`` (the default, in a cluster or not:
two operators can meet on any API server) the process first takes a
``coordination.k8s.io`` Lease; only the holder runs kopf and the MQTT bridge,
and a holder that loses its lease exits so that Kubernetes restarts it as a
standby.  ``--no-leader-election`` is for one operator you are sure is alone.
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
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import kopf

from tideflow.logs import configure_logging
from tideflow_operator import handlers, ttl  # registers the kopf handlers
from tideflow_operator.bridge import BrokerAddress
from tideflow_operator.runtime import OperatorConfig

log = logging.getLogger(__name__)
READINESS_PATH = "/readyz"
LOOP_ANSWER_SECONDS = 3.0  # under the chart's probe timeoutSeconds (5)


def _env(name: str, fallback: str | None = None) -> str | None:
    return os.environ.get(f"TIDEFLOW_{name}", fallback)


def _flag(name: str, default: bool) -> bool:
    value = _env(name)
    return default if value is None else value.lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tideflow-operator", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=_flag("LOG_JSON", False),
        help="log JSON lines (lines about a run carry its trace_id/span_id)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="reconcile Workflows and EdgeSites")
    # Also after ``run`` (where the other flags are); unset there, the top level's value stands.
    run.add_argument("--log-json", action="store_true", default=argparse.SUPPRESS)
    run.add_argument(
        "--broker",
        default=_env("BROKER"),
        required=_env("BROKER") is None,
        help="broker URL, or the nodes of a clustered broker comma-separated (failover)",
    )
    run.add_argument(
        "--mqtt-version",
        choices=("5", "3.1.1"),
        default=_env("MQTT_VERSION", "5"),
        help="3.1.1 for brokers without MQTT 5 (RabbitMQ before 3.13); see the README",
    )
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=None)
    scope.add_argument("--all-namespaces", "-A", action="store_true")
    run.add_argument("--username", default=_env("USERNAME"))
    run.add_argument("--password-file", type=Path, default=_env("PASSWORD_FILE"))
    run.add_argument("--tls-ca", type=Path, default=_env("TLS_CA"))
    run.add_argument(
        "--no-auto-register",
        action="store_true",
        default=_flag("NO_AUTO_REGISTER", False),
        help="do not create EdgeSites for unknown sites that report in",
    )
    run.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=_flag("LEADER_ELECTION", True),
        help="hold a Lease while active (default: on; two active operators would both act)",
    )
    run.add_argument(
        "--lease-namespace",
        default=_env("LEASE_NAMESPACE", _pod_namespace()),
        help="the operator's own namespace: its Lease and its ledger ConfigMaps",
    )
    run.add_argument("--lease-name", default=_env("LEASE_NAME", "tideflow-operator"))
    run.add_argument("--peering", default=_env("PEERING"), help="kopf peering object name")
    run.add_argument(
        "--liveness",
        default=_env("LIVENESS"),
        help=f"e.g. http://0.0.0.0:8080/healthz; readiness is {READINESS_PATH} on the same port",
    )
    run.add_argument("--metrics-port", type=int, default=_env("METRICS_PORT"))
    run.add_argument(
        "--client-id",
        default=_env("CLIENT_ID", "tideflow-operator"),
        help="MQTT client id prefix; each process adds its host and pid to stay unique",
    )
    run.add_argument(
        "--reconcile-seconds",
        type=float,
        default=float(_env("RECONCILE_SECONDS", "60") or 60),
        help="how often runs whose Workflow is gone are looked for (and at start-up)",
    )
    run.add_argument(
        "--site-silence-seconds",
        type=float,
        default=float(_env("SITE_SILENCE_SECONDS", "90") or 90),
        help="a site not heard from this long is offline (its last will can be lost with "
        "a broker node); keep it several times the agents' --heartbeat-seconds",
    )
    run.add_argument(
        "--ttl-seconds-after-finished",
        type=_ttl,
        default=_ttl(_env("TTL_SECONDS_AFTER_FINISHED")),
        help="delete finished Workflows this long after they finished, unless their "
        "spec.ttlSecondsAfterFinished says otherwise (default: keep them)",
    )
    return parser


def _ttl(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    seconds = int(value)
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{value}: a number of seconds, 0 or more")
    return seconds


def unique_client_id(prefix: str) -> str:
    """``prefix`` plus this host and process: no two operators share an MQTT session."""
    suffix = f"-{socket.gethostname()}-{os.getpid()}"
    return (
        (prefix[: 128 - len(suffix)] + suffix).replace("/", "-").replace("+", "-").replace("#", "-")
    )


def _pod_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    try:
        return path.read_text().strip()
    except OSError:
        return "default"


def _wait_for_lease(args: argparse.Namespace) -> None:
    """Block until this process holds the lease; exit the process when it is lost."""
    from kubernetes import config as kconfig
    from kubernetes.leaderelection import electionconfig, leaderelection
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

    try:
        kconfig.load_incluster_config()
    except kconfig.ConfigException:
        kconfig.load_kube_config()
    identity = f"{socket.gethostname()}-{os.getpid()}"
    acquired = threading.Event()

    def lost() -> None:
        log.error("lost the leader lease %s; exiting so a standby takes over", args.lease_name)
        os._exit(3)

    # The library logs every renewal (every retry_period) at INFO: only our own
    # lines about taking and losing the lease are worth an operator's log.
    logging.getLogger("leaderelection").setLevel(
        logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING
    )
    election = leaderelection.LeaderElection(
        electionconfig.Config(
            LeaseLock(args.lease_name, args.lease_namespace, identity),
            lease_duration=15,
            renew_deadline=10,
            retry_period=2,
            onstarted_leading=acquired.set,
            onstopped_leading=lost,
        )
    )
    threading.Thread(target=election.run, name="leader-election", daemon=True).start()
    log.info(
        "waiting for the leader lease %s/%s as %s", args.lease_namespace, args.lease_name, identity
    )
    acquired.wait()
    log.info("leader lease acquired: this replica is active")


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


def serve_health(url: str | None, health: Health) -> ThreadingHTTPServer | None:
    """Serve the liveness path and ``READINESS_PATH`` at ``url``'s address."""
    if not url:
        return None
    parsed = urlparse(url)
    live_path = parsed.path or "/"

    class Probe(BaseHTTPRequestHandler):
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

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer((parsed.hostname or "0.0.0.0", parsed.port or 8080), Probe)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, json_lines=args.log_json)
    if args.password_file is not None and not args.password_file.is_file():
        print(f"--password-file {args.password_file}: no such file", file=sys.stderr)
        return 2
    try:
        BrokerAddress.parse_list(args.broker)
    except ValueError as exc:
        print(f"--broker: {exc}", file=sys.stderr)
        return 2
    config = OperatorConfig(
        broker=args.broker,
        mqtt5=args.mqtt_version == "5",
        username=args.username,
        password_file=args.password_file,
        tls_ca=args.tls_ca,
        auto_register=not args.no_auto_register,
        client_id=unique_client_id(args.client_id),
        namespaces=list(args.namespace or []),
        ledger_namespace=args.lease_namespace,
        reconcile_seconds=args.reconcile_seconds,
        site_silence_seconds=args.site_silence_seconds,
    )
    # kopf hands this to every handler: the startup handler makes the runtime from
    # the config and stores it here (memo.runtime); the stop flag stops the operator.
    # The TTL reaper (ttl.py) finds the operator-wide default here too.
    memo = kopf.Memo(
        config=config, ttl=ttl.TtlConfig(default_seconds=args.ttl_seconds_after_finished)
    )
    health = Health()
    probes = serve_health(args.liveness, health)
    if args.leader_election:
        _wait_for_lease(args)
    if args.metrics_port:
        from tideflow_operator.metrics import serve_metrics

        serve_metrics(int(args.metrics_port), lambda: handlers.runtime_of(memo))
    namespaces = args.namespace or []

    async def operate() -> None:
        memo.stop_flag = asyncio.Event()
        health.started = asyncio.Event()
        health.loop = asyncio.get_running_loop()
        await kopf.operator(
            clusterwide=args.all_namespaces or not namespaces,
            namespaces=namespaces,
            standalone=args.peering is None,
            peering_name=args.peering,
            ready_flag=health.started,
            stop_flag=memo.stop_flag,
            memo=memo,
        )

    try:
        asyncio.run(operate())
    except KeyboardInterrupt:
        return 130
    finally:
        if probes is not None:
            probes.shutdown()
            probes.server_close()
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
