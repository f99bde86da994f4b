"""RabbitMQ's HTTP auth backend, answered by a test service: the README's client-id remedy.

RabbitMQ 3.10 registers an MQTT client id — dropping a live connection that
has it — after the login and before any permission check, so another site's
user can drop a site (docs/decisions/0015-client-ids-bound-to-users.md).  Its
HTTP auth backend (``rabbitmq_auth_backend_http``, shipped in Debian's
package) is asked at login with the username, password, vhost and the MQTT
``client_id``: a service that refuses a site's user under any id but its
agent's stops the drop.  :class:`ClientIdAuth` is such a service, small and
for tests only (passwords in memory, loopback); :func:`http_authn` points
every node of a running cluster at it for the duration of a ``with`` block
(authentication by HTTP, authorisation still by the internal database's
permissions) and puts the internal backend back afterwards.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from services.rabbitmq import RabbitCluster
from tideflow.tools.launchers import HOST


class ClientIdAuth:
    """``users``: name -> (password, the one client id it may use, or None for any)."""

    def __init__(self, users: dict[str, tuple[str, str | None]]) -> None:
        self.users = users
        self.asked: list[dict[str, str]] = []  # every login request, as RabbitMQ sent it
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
                owner.asked.append(query)
                body = b"allow" if owner.allows(query) else b"deny"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def user_url(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}/auth/user"

    def allows(self, query: dict[str, str]) -> bool:
        entry = self.users.get(query.get("username", ""))
        if entry is None or query.get("password") != entry[0]:
            return False
        bound = entry[1]
        return bound is None or query.get("client_id") == bound

    def __enter__(self) -> ClientIdAuth:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def http_authn(cluster: RabbitCluster, auth: ClientIdAuth) -> Iterator[ClientIdAuth]:
    """Every running node authenticates by ``auth`` (authorises as before) inside the block."""
    on = (
        "application:set_env(rabbitmq_auth_backend_http, http_method, get), "
        f'application:set_env(rabbitmq_auth_backend_http, user_path, "{auth.user_url}"), '
        "application:set_env(rabbit, auth_backends, "
        "[{rabbit_auth_backend_http, rabbit_auth_backend_internal}])."
    )
    off = "application:set_env(rabbit, auth_backends, [rabbit_auth_backend_internal])."
    with auth:
        nodes = [n for n in cluster.nodes if n.running]
        try:
            for node in nodes:
                node.ctl("eval", on)
            yield auth
        finally:
            for node in nodes:
                node.ctl("eval", off)
