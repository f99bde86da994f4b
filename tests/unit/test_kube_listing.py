"""The operator's own listings of Workflows come a page at a time (issue 13).

The reconcile (every ``--reconcile-seconds``) lists every Workflow's metadata;
at 10,000 Workflows one response was megabytes of JSON parsed at once, every
minute, during a fleet's wave: a jump in the operator's RSS that the heap kept.
Pages of a listing share one snapshot (the continue token's resourceVersion),
so what the reconcile judges is unchanged.  No API server here: a fake client.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tideflow_operator.kube import LIST_CHUNK, Kube


class PagedCustom:
    """``CustomObjectsApi`` listing ``total`` Workflows ``limit`` at a time."""

    def __init__(self, total: int) -> None:
        self.items = [{"metadata": {"uid": f"u{i}", "name": f"wf-{i}"}} for i in range(total)]
        self.calls: list[dict[str, Any]] = []
        self.expire = 0  # continue tokens refused with 410 (compacted away)

    def list_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        if kwargs.get("_continue") and self.expire:
            self.expire -= 1
            raise ApiException(status=410, reason="Expired")
        limit = int(kwargs.get("limit") or len(self.items) or 1)
        start = int(kwargs.get("_continue") or 0)
        page = self.items[start : start + limit]
        more = start + limit < len(self.items)
        return {"items": page, "metadata": {"continue": str(start + limit) if more else ""}}

    list_cluster_custom_object = list_namespaced_custom_object


async def test_the_reconciles_listing_comes_a_page_at_a_time() -> None:
    kube = Kube(client.ApiClient())
    custom = PagedCustom(LIST_CHUNK * 2 + 7)
    kube.custom = custom  # type: ignore[assignment]
    found = await kube.list_workflow_uids(["bench"])
    assert len(found) == LIST_CHUNK * 2 + 7 and found["u0"] is False
    assert len(custom.calls) == 3
    assert all(call["limit"] == LIST_CHUNK for call in custom.calls)
    found = await kube.list_workflow_uids()  # cluster-wide too
    assert len(found) == LIST_CHUNK * 2 + 7 and len(custom.calls) == 6


async def test_a_page_refused_with_410_makes_the_listing_one_response_as_before() -> None:
    kube = Kube(client.ApiClient())
    custom = PagedCustom(LIST_CHUNK + 3)
    custom.expire = 1
    kube.custom = custom  # type: ignore[assignment]
    found = await kube.list_workflow_uids(["bench"])
    assert len(found) == LIST_CHUNK + 3
    assert [c.get("limit") for c in custom.calls] == [LIST_CHUNK, LIST_CHUNK, None]
