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
import datetime as dt
import logging
import socket
import uuid
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)

GROUP, VERSION = "tideflow.io", "v1alpha1"
WORKFLOWS, EDGESITES = "workflows", "edgesites"
MERGE_PATCH = "application/merge-patch+json"
COMPONENT = "tideflow-operator"
# Admission status patches get their own threads: a burst of Workflows is
# bounded by how many of those round trips are in flight at once, and the
# default executor (cores + 4 threads) is shared with everything else.
URGENT_THREADS = 32


def load_config() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    # One kept-alive connection per thread that may call at once (urllib3 drops the rest).
    configuration.connection_pool_maxsize = max(
        configuration.connection_pool_maxsize or 0, URGENT_THREADS + 16
    )
    return client.ApiClient(configuration)


class NotFound(LookupError):
    pass


class Kube:
    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or load_config()
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.host = socket.gethostname()
        self._urgent = concurrent.futures.ThreadPoolExecutor(
            URGENT_THREADS, thread_name_prefix="kube-urgent"
        )

    async def _call(
        self,
        fn: Any,
        *args: Any,
        _executor: concurrent.futures.Executor | None = None,
        **kwargs: Any,
    ) -> Any:
        try:
            if _executor is None:
                return await asyncio.to_thread(fn, *args, **kwargs)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(_executor, lambda: fn(*args, **kwargs))
        except ApiException as exc:
            if exc.status == 404:
                raise NotFound(str(exc.reason)) from None
            raise

    # ----------------------------------------------------------- workflows
    async def patch_workflow_status(
        self, namespace: str, name: str, status: dict[str, Any], *, urgent: bool = False
    ) -> None:
        """Merge-patch ``.status``; ``urgent`` (admissions) runs on threads of its own."""
        await self._call(
            self.custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, namespace, WORKFLOWS, name, {"status": status},
            _content_type=MERGE_PATCH, _executor=self._urgent if urgent else None,
        )  # fmt: skip

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
    async def create_edgesite(self, name: str, labels: dict[str, str]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "EdgeSite",
            "metadata": {"name": name, "labels": labels},
            "spec": {"description": "registered on first contact"},
        }
        try:
            await self._call(
                self.custom.create_cluster_custom_object, GROUP, VERSION, EDGESITES, body
            )
        except ApiException as exc:
            if exc.status != 409:  # already there: someone else registered it
                raise

    async def patch_edgesite_status(self, name: str, status: dict[str, Any]) -> None:
        await self._call(
            self.custom.patch_cluster_custom_object_status,
            GROUP, VERSION, EDGESITES, name, {"status": status},
            _content_type=MERGE_PATCH,
        )  # fmt: skip

    # ----------------------------------------------------------- events
    async def event(
        self, obj: dict[str, Any], kind: str, reason: str, message: str, *, warning: bool = False
    ) -> None:
        """Post a core/v1 Event about ``obj``; failures are logged, never raised."""
        meta = obj.get("metadata", {})
        namespace = meta.get("namespace") or "default"
        now = dt.datetime.now(dt.UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                name=f"{meta.get('name', 'object')}.{uuid.uuid4().hex[:12]}", namespace=namespace
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
            await self._call(self.core.create_namespaced_event, namespace, body)
        except (ApiException, NotFound) as exc:
            log.warning("could not post event %s for %s: %s", reason, meta.get("name"), exc)
