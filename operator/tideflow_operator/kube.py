"""The operator's Kubernetes writes that happen outside kopf handlers.

Status patches from site records, Kubernetes Events, and EdgeSite
registration happen when MQTT messages arrive, not when kopf calls a handler,
so they go through the official client here.  The client is synchronous; each
call runs in a worker thread so the operator's event loop never blocks.
Status writes are JSON merge patches of the ``status`` subresource only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import uuid
from typing import Any

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .ledger import LEDGER_LABEL

log = logging.getLogger(__name__)

GROUP, VERSION = "tideflow.io", "v1alpha1"
WORKFLOWS, EDGESITES = "workflows", "edgesites"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
PARTIAL_METADATA = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
# Objects per page of the operator's own listings of Workflows (issue 13).
LIST_CHUNK = 500
# Every API call's time limit (connect, then each read): the client's default is none,
# and a kept-alive connection gone dead without a word (a load balancer's failover, a
# NAT entry dropped) held its call and its thread until the kernel gave up on it, some
# 15 minutes, with the status writes (and the sites' acks) queued behind.  The read
# limit is per read, not for the whole answer: a long listing streams within it.
CALL_SECONDS = (5.0, 60.0)
COMPONENT = "tideflow-operator"
# Admission status patches get their own threads: a burst of Workflows is
# bounded by how many of those round trips are in flight at once, and the
# default executor (cores + 4 threads) is shared with everything else.  At
# 1,000 sites and 10,000 Workflows over 60 s, 32 threads were the wave's
# bottleneck: each was waiting on its round trip (py-spy: 88% in the socket's
# read), the event loop idle three quarters of the time and the API server
# with CPU to spare, 66 admissions a second against 167 applied (issue 13).
URGENT_THREADS = 128
EVENT_THREADS = 4
# The runs' status writes (Running, Succeeded: the sites' acks wait for them):
# on the default executor (6 threads here) they fell behind a fleet's wave by
# minutes, and every site sent its unacknowledged records again and again
# (340,000 duplicates at 1,000 sites and 10,000 Workflows; issue 13).
STATUS_THREADS = 32
# The ledger's group commits (an admission's send waits for its entry): threads
# of their own, never queued behind the runs' status writes on the default
# executor (at most one write in flight per ConfigMap: ledger.BUCKETS).
LEDGER_THREADS = 4


def load_settings() -> None:
    """The pod's in-cluster settings, else the kubeconfig's (``$KUBECONFIG``, else
    ``~/.kube/config``), made the client's default; ConfigException if neither."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def settings_problem() -> str | None:
    """What :func:`load_settings` finds wrong, in one line naming where it looked (None:
    nothing): checked before the operator starts anything, instead of the client
    library's traceback from the Lease's or the startup handler's first call.  The
    library's messages name keys and files, never a token or a key."""
    try:
        config.load_incluster_config()
        return None
    except config.ConfigException as exc:
        in_cluster = str(exc)
    # (The client reads $KUBECONFIG once, at import, into this default.)
    where = config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    named = f"{'KUBECONFIG' if os.environ.get('KUBECONFIG') else 'kubeconfig'} {where}"
    try:
        config.load_kube_config()
    except config.ConfigException as exc:
        return f"{named}: {exc} (in-cluster settings: {in_cluster})"
    except UnicodeDecodeError:
        return f"{named}: not UTF-8 text"
    except OSError as exc:  # (one the library did not see to first: a directory)
        return f"{named}: {exc.strerror or exc}"
    except yaml.YAMLError as exc:
        return f"{named}: not YAML: {_yaml_problem(exc)}"
    return None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's complaint and where, without the snippet of the file it can quote."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(exc, yaml.reader.ReaderError):
        return f"a character YAML does not allow at position {exc.position}"
    return type(exc).__name__


def load_config() -> client.ApiClient:
    load_settings()
    configuration = client.Configuration.get_default_copy()
    # One kept-alive connection per thread that may call at once (urllib3 drops the rest).
    configuration.connection_pool_maxsize = max(
        configuration.connection_pool_maxsize or 0, URGENT_THREADS + STATUS_THREADS + 16
    )
    return client.ApiClient(configuration)


class NotFound(LookupError):
    pass


class KubeError(RuntimeError):
    """A call the API server refused; ``str()`` is one line (status, reason, message).

    The client's own exception carries the response's HTTP headers, which made
    every refused call (an Event without RBAC, say) a dozen log lines.
    """

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status


class Conflict(KubeError):
    """The object changed since the resourceVersion a write was based on, or exists (409)."""


def _short(exc: ApiException) -> str:
    """One line about a refused call: status, reason and the server's message, no headers."""
    message = ""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        message = str(json.loads(exc.body or "{}").get("message") or "")
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")


def _resource_version(obj: Any) -> str | None:
    if isinstance(obj, dict):
        return (obj.get("metadata") or {}).get("resourceVersion")
    return None


class Kube:
    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or load_config()
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.host = socket.gethostname()
        self._urgent = concurrent.futures.ThreadPoolExecutor(
            URGENT_THREADS, thread_name_prefix="kube-urgent"
        )
        # Events get threads of their own: a flood of them (a fleet's phase changes)
        # must not queue ahead of the status writes the sites' acks wait for.
        self._events = concurrent.futures.ThreadPoolExecutor(
            EVENT_THREADS, thread_name_prefix="kube-events"
        )
        self._status = concurrent.futures.ThreadPoolExecutor(
            STATUS_THREADS, thread_name_prefix="kube-status"
        )
        self._ledger = concurrent.futures.ThreadPoolExecutor(
            LEDGER_THREADS, thread_name_prefix="kube-ledger"
        )

    async def _call(
        self,
        fn: Any,
        *args: Any,
        _executor: concurrent.futures.Executor | None = None,
        **kwargs: Any,
    ) -> Any:
        kwargs.setdefault("_request_timeout", CALL_SECONDS)
        try:
            if _executor is None:
                return await asyncio.to_thread(fn, *args, **kwargs)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(_executor, lambda: fn(*args, **kwargs))
        except urllib3.exceptions.HTTPError as exc:  # no answer (in time): the call failed
            raise KubeError(None, f"{type(exc).__name__}: {str(exc)[:300]}") from None
        except ApiException as exc:
            if exc.status == 404:
                raise NotFound(str(exc.reason)) from None
            if exc.status == 409:
                raise Conflict(409, _short(exc)) from None
            raise KubeError(exc.status, _short(exc)) from None

    # ----------------------------------------------------------- workflows
    async def patch_workflow_status(
        self,
        namespace: str,
        name: str,
        status: dict[str, Any],
        *,
        urgent: bool = False,
        resource_version: str | None = None,
    ) -> str | None:
        """Merge-patch ``.status``; returns the new resourceVersion.

        With ``resource_version`` the patch applies only to that version of the
        object (optimistic concurrency): a newer one raises :class:`Conflict`.
        ``urgent`` (admissions) runs on threads of its own, the others on theirs.
        """
        body: dict[str, Any] = {"status": status}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        result = await self._call(
            self.custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, namespace, WORKFLOWS, name, body,
            _content_type=MERGE_PATCH, _executor=self._urgent if urgent else self._status,
        )  # fmt: skip
        return _resource_version(result)

    async def get_workflow(self, namespace: str, name: str) -> dict[str, Any]:
        """One Workflow, read with ``list`` (the operator's RBAC has no ``get``)."""
        result = await self._call(
            self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, WORKFLOWS,
            field_selector=f"metadata.name={name}",
        )  # fmt: skip
        items = list(result.get("items", []))
        if not items:
            raise NotFound(f"workflow {namespace}/{name}")
        return dict(items[0])

    async def delete_workflow(self, namespace: str, name: str, uid: str) -> bool:
        """Delete one Workflow, only if it is still the object ``uid``; False if it is not."""
        options = client.V1DeleteOptions(
            preconditions=client.V1Preconditions(uid=uid), propagation_policy="Background"
        )
        try:
            await self._call(
                self.custom.delete_namespaced_custom_object,
                GROUP, VERSION, namespace, WORKFLOWS, name, body=options,
            )  # fmt: skip
        except (NotFound, Conflict):  # gone already, or another object of the same name
            return False
        return True

    async def remove_finalizer(
        self, namespace: str, name: str, finalizers: list[str], finalizer: str
    ) -> bool:
        """Remove ``finalizer`` from a Workflow whose finalizers were ``finalizers``.

        A JSON patch that first tests the list, so a finalizer another
        controller added meanwhile is never dropped; on a failed test the list
        is read again and the patch tried once more.  False if it is not there
        (or the object is gone).
        """
        for attempt in range(2):
            if finalizer not in finalizers:
                return False
            remaining = [f for f in finalizers if f != finalizer]
            ops = [
                {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
                {"op": "replace", "path": "/metadata/finalizers", "value": remaining},
            ]
            try:
                await self._call(
                    self.custom.patch_namespaced_custom_object,
                    GROUP, VERSION, namespace, WORKFLOWS, name, ops, _content_type=JSON_PATCH,
                )  # fmt: skip
                return True
            except NotFound:
                return False
            except KubeError as exc:
                if exc.status not in (409, 422) or attempt:
                    raise
            try:
                current = await self.get_workflow(namespace, name)
            except NotFound:
                return False
            finalizers = list(current["metadata"].get("finalizers") or [])
        return False

    async def list_workflow_uids(self, namespaces: list[str] | None = None) -> dict[str, bool]:
        """uid -> being deleted, for every Workflow (metadata only: specs can be large).

        ``LIST_CHUNK`` a page: one response of 10,000 Workflows' metadata was
        megabytes parsed at once, every reconcile (issue 13).  The pages share
        one snapshot; a continue token the API server no longer honours (410:
        compacted away while a busy API server served the pages) makes that
        listing one whole response instead, as before.
        """
        headers = {"Accept": PARTIAL_METADATA}
        custom = self.custom
        calls = (
            [(custom.list_cluster_custom_object, (GROUP, VERSION, WORKFLOWS))]
            if not namespaces
            else [(custom.list_namespaced_custom_object, (GROUP, VERSION, ns, WORKFLOWS))
                  for ns in namespaces]
        )  # fmt: skip
        found: dict[str, bool] = {}
        for fn, args in calls:
            try:
                found.update(await self._list_uids(fn, args, headers, LIST_CHUNK))
            except KubeError as exc:
                if exc.status != 410:
                    raise
                found.update(await self._list_uids(fn, args, headers, None))
        return found

    async def _list_uids(
        self, fn: Any, args: tuple[str, ...], headers: dict[str, str], limit: int | None
    ) -> dict[str, bool]:
        found: dict[str, bool] = {}
        token: str | None = None
        while True:
            more: dict[str, Any] = {"_continue": token} if token else {}
            if limit is not None:
                more["limit"] = limit
            result = await self._call(fn, *args, _headers=headers, **more)
            # (An empty list comes back as ``items: null`` with metadata only.)
            for item in (result or {}).get("items") or []:
                meta = item.get("metadata") or {}
                found[str(meta.get("uid"))] = bool(meta.get("deletionTimestamp"))
            token = ((result or {}).get("metadata") or {}).get("continue") or None
            if token is None:
                return found

    # ----------------------------------------------------------- the ledger
    async def patch_ledger(self, namespace: str, name: str, data: dict[str, str | None]) -> None:
        """Merge ``data`` into the ledger ConfigMap ``name`` (None removes a key)."""
        try:
            await self._call(
                self.core.patch_namespaced_config_map, name, namespace, {"data": data},
                _content_type=MERGE_PATCH, _executor=self._ledger,
            )  # fmt: skip
            return
        except NotFound:
            pass
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(
                name=name, namespace=namespace,
                labels={LEDGER_LABEL: "true", "app.kubernetes.io/managed-by": COMPONENT},
            ),
            data={k: v for k, v in data.items() if v is not None},
        )  # fmt: skip
        try:
            await self._call(
                self.core.create_namespaced_config_map, namespace, body, _executor=self._ledger
            )
        except Conflict:  # created meanwhile: merge into it
            await self._call(
                self.core.patch_namespaced_config_map, name, namespace, {"data": data},
                _content_type=MERGE_PATCH, _executor=self._ledger,
            )  # fmt: skip

    async def read_ledgers(self, namespace: str) -> dict[str, dict[str, str]]:
        """ConfigMap name -> its data, for every ledger ConfigMap (label ``LEDGER_LABEL``)."""
        result = await self._call(
            self.core.list_namespaced_config_map, namespace, label_selector=f"{LEDGER_LABEL}=true"
        )
        return {str(item.metadata.name): dict(item.data or {}) for item in result.items}

    async def list_workflows(self, namespaces: list[str] | None = None) -> list[dict[str, Any]]:
        """Workflows in ``namespaces`` (all namespaces when empty)."""
        if not namespaces:
            result = await self._call(
                self.custom.list_cluster_custom_object, GROUP, VERSION, WORKFLOWS
            )
            return list(result.get("items", []))
        items: list[dict[str, Any]] = []
        for namespace in namespaces:
            result = await self._call(
                self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, WORKFLOWS
            )
            items.extend(result.get("items", []))
        return items

    # ----------------------------------------------------------- edge sites
    async def list_edgesites(self) -> dict[str, dict[str, str]]:
        """Every EdgeSite's labels, by name (a sharded operator's owners: shards.py)."""
        result = await self._call(
            self.custom.list_cluster_custom_object, GROUP, VERSION, EDGESITES,
            _headers={"Accept": PARTIAL_METADATA},
        )  # fmt: skip
        return {
            str(item["metadata"]["name"]): dict(item["metadata"].get("labels") or {})
            for item in (result or {}).get("items") or []
        }

    async def create_edgesite(self, name: str, labels: dict[str, str]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "EdgeSite",
            "metadata": {"name": name, "labels": labels},
            "spec": {"description": "registered on first contact"},
        }
        with contextlib.suppress(Conflict):  # already there: someone else registered it
            await self._call(
                self.custom.create_cluster_custom_object, GROUP, VERSION, EDGESITES, body
            )

    async def patch_edgesite_labels(self, name: str, labels: dict[str, str]) -> None:
        """Merge ``labels`` into the EdgeSite's labels (other keys are left alone)."""
        await self._call(
            self.custom.patch_cluster_custom_object,
            GROUP, VERSION, EDGESITES, name, {"metadata": {"labels": labels}},
            _content_type=MERGE_PATCH,
        )  # fmt: skip

    async def patch_edgesite_status(self, name: str, status: dict[str, Any]) -> None:
        await self._call(
            self.custom.patch_cluster_custom_object_status,
            GROUP, VERSION, EDGESITES, name, {"status": status},
            _content_type=MERGE_PATCH,
        )  # fmt: skip

    # ----------------------------------------------------------- events
    async def event(
        self,
        obj: dict[str, Any],
        kind: str,
        reason: str,
        message: str,
        *,
        warning: bool = False,
        once: str | None = None,
    ) -> None:
        """Post a core/v1 Event about ``obj``; failures are logged in one line, never raised.

        ``once`` names the Event deterministically (from the object's uid and
        ``once``): a second operator, or a retry, posting the same Event finds it
        there and posts nothing.
        """
        meta = obj.get("metadata", {})
        namespace = meta.get("namespace") or "default"
        now = dt.datetime.now(dt.UTC)
        suffix = (
            uuid.uuid4().hex[:12]
            if once is None
            else f"{str(meta.get('uid', ''))[:8]}.{once}".lower()[:60]
        )
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                name=f"{meta.get('name', 'object')}.{suffix}", namespace=namespace
            ),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind=kind,
                name=meta.get("name"),
                namespace=meta.get("namespace"),
                uid=meta.get("uid"),
            ),
            reason=reason,
            message=message[:1024],
            type="Warning" if warning else "Normal",
            source=client.V1EventSource(component=COMPONENT, host=self.host),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            reporting_component=COMPONENT,
            reporting_instance=self.host,
        )
        try:
            await self._call(
                self.core.create_namespaced_event, namespace, body, _executor=self._events
            )
        except Conflict:
            log.debug("event %s for %s already posted", reason, meta.get("name"))
        except (KubeError, NotFound) as exc:
            log.warning("could not post event %s for %s: %s", reason, meta.get("name"), exc)
