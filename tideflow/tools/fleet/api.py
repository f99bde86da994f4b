"""The fleet tools' Kubernetes access: reads (and ``submit``'s create) with clear errors.

Why a module of its own: every command must fail with one sentence a person
can act on -- the CRDs are not installed, the context does not answer, the
object does not exist, the user may not read it -- instead of a client
traceback.  :class:`FleetError` carries that sentence; :func:`explain` turns
the client's exceptions into it.

Reads use the ``kubernetes`` client with the current kubeconfig context (or
``--kubeconfig`` / ``--context``), or the in-cluster ServiceAccount when the
console runs in a pod.  Nothing here writes except :meth:`FleetApi.create`
(``tideflow submit``).  Decision 0011 says why this tooling may talk to
Kubernetes outside the operator.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from tideflow.tools.fleet.views import CRONWORKFLOWS, EDGESITES, GROUP, VERSION, WORKFLOWS

REQUEST_TIMEOUT = 15.0
KIND_OF = {WORKFLOWS: "Workflow", EDGESITES: "EdgeSite", CRONWORKFLOWS: "CronWorkflow"}


class FleetError(Exception):
    """A failure a person can act on; the message says what and what to do."""


def _body(exc: Any) -> dict[str, Any]:
    try:
        found = json.loads(getattr(exc, "body", None) or "{}")
    except (TypeError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def explain(
    exc: BaseException,
    plural: str,
    name: str | None = None,
    namespace: str | None = None,
    server: str = "?",
) -> FleetError:
    """The one sentence for a failed call on ``plural`` (object ``name``, if one)."""
    from kubernetes.client.exceptions import ApiException

    resource = f"{plural}.{GROUP}"
    where = f" in namespace {namespace}" if namespace else ""
    if isinstance(exc, ApiException):
        body = _body(exc)
        details = body.get("details") or {}
        if exc.status == 404:
            if name is not None and details.get("name") == name:
                return FleetError(f"{KIND_OF.get(plural, plural)} {name} not found{where}")
            return FleetError(
                f"the cluster has no {resource} resource: Tideflow's CRDs are not installed "
                f"(kubectl apply -f crds/, or install the tideflow-operator chart)"
            )
        if exc.status in (401, 403):
            verb = "get" if name else "list"
            return FleetError(
                f"the context's user may not {verb} {resource}{where}: "
                f"{body.get('message') or exc.reason}"
            )
        if exc.status == 409:
            return FleetError(f"{KIND_OF.get(plural, plural)} {name} already exists{where}")
        if exc.status == 422:
            return FleetError(f"the API server refused it: {body.get('message') or exc.reason}")
        return FleetError(f"the API server answered {exc.status}: {body.get('message') or exc}")
    return FleetError(f"the cluster at {server} does not answer: {type(exc).__name__}: {exc}")


def _unreachable(exc: BaseException) -> bool:
    import urllib3.exceptions

    return isinstance(exc, urllib3.exceptions.HTTPError | OSError | TimeoutError)


class FleetApi:
    """Tideflow's objects through one API client (kubeconfig context or in-cluster)."""

    def __init__(
        self, kubeconfig: str | None = None, context: str | None = None, in_cluster: bool = False
    ) -> None:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        try:
            if in_cluster:
                config.load_incluster_config()
                api_client = client.ApiClient()
            else:
                api_client = config.new_client_from_config(
                    config_file=kubeconfig or os.environ.get("KUBECONFIG") or None,
                    context=context,
                )
        except (ConfigException, OSError, TypeError, ValueError) as exc:
            raise FleetError(
                f"no usable Kubernetes context ({exc}); set KUBECONFIG or pass --kubeconfig"
            ) from None
        self.api_client = api_client
        self.server = str(api_client.configuration.host)
        self.objects = client.CustomObjectsApi(api_client)
        self.default_namespace = _context_namespace(kubeconfig, context, in_cluster)
        self._watching: set[Any] = set()  # the open watches' responses (urllib3)

    def close(self) -> None:
        self.api_client.close()

    def interrupt(self) -> None:
        """End the watches open now, from any thread: their reads return at once.

        A watch blocks its thread in a socket read until the server says
        something; ``tideflow console`` stopping left its watch threads there,
        and the interpreter's finalization crashed in them (SIGSEGV, abort)."""
        for response in list(self._watching):
            with contextlib.suppress(Exception):
                response.shutdown()  # (urllib3 >= 2.3: shuts the socket down for reading)

    def _call(
        self,
        plural: str,
        fn: Any,
        *args: Any,
        name: str | None = None,
        namespace: str | None = None,
        **kwargs: Any,
    ) -> Any:
        from kubernetes.client.exceptions import ApiException

        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            raise explain(exc, plural, name, namespace, self.server) from None
        except Exception as exc:
            if _unreachable(exc):
                raise explain(exc, plural, name, namespace, self.server) from None
            raise

    # -- reads ----------------------------------------------------------------
    def get(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        if plural == EDGESITES:
            return dict(
                self._call(
                    plural,
                    self.objects.get_cluster_custom_object,
                    GROUP,
                    VERSION,
                    plural,
                    name,
                    name=name,
                )
            )
        ns = namespace or self.default_namespace
        return dict(
            self._call(
                plural,
                self.objects.get_namespaced_custom_object,
                GROUP,
                VERSION,
                ns,
                plural,
                name,
                name=name,
                namespace=ns,
            )
        )

    def site(self, name: str | None) -> dict[str, Any] | None:
        """The EdgeSite ``name``, or None when there is none (or no name)."""
        if not name:
            return None
        try:
            return self.get(EDGESITES, name)
        except FleetError:
            return None

    def list_page(
        self,
        plural: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> dict[str, Any]:
        """The raw list (``items``, ``metadata.resourceVersion`` / ``continue``).

        ``namespace`` None: all namespaces (EdgeSites are cluster-scoped anyway).
        """
        kwargs: dict[str, Any] = {}
        if label_selector:
            kwargs["label_selector"] = label_selector
        if limit:
            kwargs["limit"] = limit
        if continue_token:
            kwargs["_continue"] = continue_token
        if plural == EDGESITES or namespace is None:
            every: Any = self.objects.list_cluster_custom_object
            return dict(self._call(plural, every, GROUP, VERSION, plural, **kwargs))
        fn: Any = self.objects.list_namespaced_custom_object
        return dict(
            self._call(plural, fn, GROUP, VERSION, namespace, plural, namespace=namespace, **kwargs)
        )

    def list_all(
        self,
        plural: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        page: int = 500,
    ) -> list[dict[str, Any]]:
        """Every item, fetched in pages of ``page``."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            answer = self.list_page(plural, namespace, label_selector, page, token)
            items.extend(answer.get("items") or [])
            token = (answer.get("metadata") or {}).get("continue")
            if not token:
                return items

    def watch(
        self,
        plural: str,
        namespace: str | None = None,
        *,
        resource_version: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int = 300,
    ) -> Iterator[dict[str, Any]]:
        """Watch events (``{"type", "object"}``) until the server ends the stream."""
        from kubernetes import watch

        fn: Any
        args: tuple[Any, ...]
        if plural == EDGESITES or namespace is None:
            fn, args = self.objects.list_cluster_custom_object, (GROUP, VERSION, plural)
        else:
            fn, args = (
                self.objects.list_namespaced_custom_object,
                (GROUP, VERSION, namespace, plural),
            )
        kwargs: dict[str, Any] = {"timeout_seconds": timeout_seconds}
        if resource_version:
            kwargs["resource_version"] = resource_version
        if field_selector:
            kwargs["field_selector"] = field_selector
        from kubernetes.client.exceptions import ApiException

        kwargs["_request_timeout"] = (REQUEST_TIMEOUT, timeout_seconds + REQUEST_TIMEOUT)
        opened: list[Any] = []

        @functools.wraps(fn)  # (the watch reads what fn returns from its docstring)
        def call(*call_args: Any, **call_kwargs: Any) -> Any:
            response = fn(*call_args, **call_kwargs)
            opened.append(response)
            self._watching.add(response)
            return response

        stream = watch.Watch()
        try:
            yield from stream.stream(call, *args, **kwargs)
        except ApiException as exc:
            raise explain(exc, plural, None, namespace, self.server) from None
        except Exception as exc:
            if _unreachable(exc):
                raise explain(exc, plural, None, namespace, self.server) from None
            raise
        finally:
            stream.stop()
            self._watching.difference_update(opened)

    # -- the one write --------------------------------------------------------
    def create(self, plural: str, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        name = (body.get("metadata") or {}).get("name")
        return dict(
            self._call(
                plural,
                self.objects.create_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                plural,
                dict(body),
                name=name,
                namespace=namespace,
            )
        )


def _context_namespace(kubeconfig: str | None, context: str | None, in_cluster: bool) -> str:
    """The context's namespace (``default`` when it names none)."""
    if in_cluster:
        try:
            with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                return f.read().strip() or "default"
        except OSError:
            return "default"
    from kubernetes import config

    try:
        contexts, active = config.list_kube_config_contexts(
            config_file=kubeconfig or os.environ.get("KUBECONFIG") or None
        )
    except Exception:
        return "default"
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    return str(((chosen or {}).get("context") or {}).get("namespace") or "default")


__all__ = ["FleetApi", "FleetError", "explain"]
