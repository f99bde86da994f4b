"""What the fleet tools show, as pure functions of the objects the operator writes.

Both the CLI (:mod:`.commands`) and the console (:mod:`.console`) turn the same
Workflow, EdgeSite and CronWorkflow objects into the same rows, so the rules
live here once and are tested without a cluster:

* a run's tasks in the DAG's order (a task after everything it depends on,
  spec order otherwise), each with its depth for drawing, its phase symbol,
  attempts, duration, exit code and message; ``onFailure`` tasks apart;
* sites with the dark ones first (longest offline first), then by name;
* durations and "how long ago" in one short form (``3m12s``).

Only the fields listed here leave this module: :func:`safe_workflow` keeps a
Workflow's names, dependencies and ``.status`` and drops everything else
(``env``, ``params``, commands, scripts, annotations such as kubectl's
last-applied copy of the whole manifest), so nothing that might hold a secret
reaches a terminal or a browser.

A task's log tail is ``status.tasks[].logs`` (``{stream: text}``, written
while the status has room).  A field the operator does not write yet is read
when present and reported as unknown otherwise: a task's interruption count
(``status.tasks[].interruptions``).
"""

from __future__ import annotations

import bisect
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from tideflow.phases import RUN_DONE

GROUP, VERSION = "tideflow.io", "v1alpha1"
WORKFLOWS, EDGESITES, CRONWORKFLOWS = "workflows", "edgesites", "cronworkflows"

PHASE_SYMBOLS: dict[str, str] = {
    "Succeeded": "✔",
    "Failed": "✖",
    "Running": "●",
    "Retrying": "↻",
    "Interrupted": "⚡",
    "Pending": "◷",
    "Assigned": "◷",
    "Skipped": "○",
    "Cancelled": "⊘",
}
UNKNOWN_PHASE = "Unknown"


def parse_time(text: Any) -> float | None:
    """RFC 3339 (``2024-05-01T12:00:00.123Z``) -> epoch seconds; None for None/empty/bad."""
    if not text or not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def short_duration(seconds: float | None) -> str:
    """``0.4s``, ``12s``, ``3m12s``, ``2h05m``, ``3d04h``; ``-`` for None."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def symbol(phase: str | None) -> str:
    return PHASE_SYMBOLS.get(phase or "", "?")


def run_done(phase: str | None) -> bool:
    return phase in RUN_DONE


# ---------------------------------------------------------------------- DAG
def dag_order(tasks: Sequence[Mapping[str, Any]]) -> list[tuple[str, int, list[str]]]:
    """``(name, depth, dependsOn)`` with every task after its dependencies, else spec order.

    Depth is the longest chain of dependencies above the task (0 for a root).
    A dependency on an unknown task is ignored; a cycle (never admitted by the
    spec's validation) leaves its tasks in spec order at the end.

    The order is that of passes over the list in spec order, each placing every
    task whose dependencies are placed, found in one topological walk: a task is
    placed in the pass of its latest-placed dependency, at its first place in the
    list after that dependency's, or else in the next pass.  (The passes
    themselves were quadratic: a chain listed last task first placed one task per
    pass, and 3,000 of them held the console for seconds.)
    """
    names = [str(t.get("name")) for t in tasks]
    places: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        places.setdefault(name, []).append(i)
    deps = {
        str(t.get("name")): [str(d) for d in t.get("dependsOn") or [] if str(d) in places]
        for t in tasks
    }
    waiting = {name: len(set(ds)) for name, ds in deps.items()}
    dependants: dict[str, list[str]] = {name: [] for name in places}
    for name, ds in deps.items():
        for d in set(ds):
            dependants[d].append(name)
    placed: dict[str, tuple[int, int]] = {}  # name -> (pass, place in the list)
    depth: dict[str, int] = {}
    ready = [name for name in places if waiting[name] == 0]
    while ready:
        name = ready.pop()
        ds = deps[name]
        after = max((placed[d] for d in ds), default=(0, -1))
        later = bisect.bisect_right(places[name], after[1])
        if later < len(places[name]):
            placed[name] = (after[0], places[name][later])
        else:
            placed[name] = (after[0] + 1, places[name][0])
        depth[name] = 1 + max((depth[d] for d in ds), default=-1)
        for dependant in dependants[name]:
            waiting[dependant] -= 1
            if waiting[dependant] == 0:
                ready.append(dependant)
    order = [(name, depth[name], deps[name]) for name in sorted(placed, key=placed.__getitem__)]
    order.extend((n, 0, deps[n]) for n in names if n not in placed)
    return order


def _task_row(
    name: str,
    depth: int,
    depends: list[str],
    entry: Mapping[str, Any] | None,
    now: float,
    missing: str = "Pending",
) -> dict[str, Any]:
    """One task; ``missing`` is its phase when the status does not list it."""
    entry = entry or {}
    started, finished = parse_time(entry.get("startedAt")), parse_time(entry.get("finishedAt"))
    duration = None
    if started is not None:
        duration = (finished if finished is not None else now) - started
    logs = entry.get("logs")
    return {
        "name": name,
        "depth": depth,
        "dependsOn": depends,
        "phase": str(entry.get("phase") or (missing if not entry else "Pending")),
        "attempt": int(entry.get("attempt") or 0),
        "interruptions": entry.get("interruptions"),
        "startedAt": entry.get("startedAt"),
        "finishedAt": entry.get("finishedAt"),
        "durationSeconds": None if duration is None else round(duration, 3),
        "exitCode": entry.get("exitCode"),
        "message": entry.get("message"),
        "outputs": dict(entry.get("outputs") or {}),
        "hasLogs": isinstance(logs, Mapping) and bool(logs),
    }


def _tree(
    spec_tasks: Sequence[Mapping[str, Any]],
    entries: Mapping[str, Mapping[str, Any]],
    now: float,
    truncated: bool,
) -> list[dict[str, Any]]:
    """Rows in DAG order; a task the status does not list is Unknown if the list was
    truncated (it may be anything), else Pending (nothing reported it yet)."""
    missing = UNKNOWN_PHASE if truncated else "Pending"
    rows = [
        _task_row(n, d, deps, entries.get(n), now, missing) for n, d, deps in dag_order(spec_tasks)
    ]
    listed = {r["name"] for r in rows}
    rows += [_task_row(n, 0, [], e, now) for n, e in entries.items() if n not in listed]
    return rows


def safe_workflow(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A Workflow reduced to what may be shown: names, the DAG's shape, ``.status``.

    Drops env, params, commands, scripts, annotations and managed fields.
    """
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}

    def shape(tasks: Any) -> list[dict[str, Any]]:
        return [
            {"name": str(t.get("name")), "dependsOn": [str(d) for d in t.get("dependsOn") or []]}
            for t in tasks or []
            if isinstance(t, Mapping)
        ]

    placement = spec.get("placement") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "creationTimestamp": meta.get("creationTimestamp"),
            "labels": dict(meta.get("labels") or {}),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "spec": {
            "tasks": shape(spec.get("tasks")),
            "onFailure": shape(spec.get("onFailure")),
            "placement": {
                "site": placement.get("site"),
                "siteSelector": placement.get("siteSelector"),
            },
            "suspend": bool(spec.get("suspend", False)),
        },
        "status": dict(obj.get("status") or {}),
    }


def workflow_detail(
    obj: Mapping[str, Any], site: Mapping[str, Any] | None = None, now: float | None = None
) -> dict[str, Any]:
    """One run as the tools show it: its tasks in DAG order, its site's connectivity."""
    now = time.time() if now is None else now
    safe = safe_workflow(obj)
    meta, spec, status = safe["metadata"], safe["spec"], safe["status"]
    entries: dict[str, dict[str, Any]] = {}
    comp_entries: dict[str, dict[str, Any]] = {}
    for entry in status.get("tasks") or []:
        if isinstance(entry, Mapping) and entry.get("name") is not None:
            target = comp_entries if entry.get("compensation") else entries
            target[str(entry["name"])] = dict(entry)
    started, finished = parse_time(status.get("startedAt")), parse_time(status.get("finishedAt"))
    truncated = bool(status.get("tasksTruncated", False))
    site_name = status.get("site") or spec["placement"].get("site")
    site_row = site_summary(site, now) if site else None
    connected = site_row["connected"] if site_row else status.get("siteConnected")
    return {
        "namespace": meta["namespace"],
        "name": meta["name"],
        "uid": meta["uid"],
        "created": meta["creationTimestamp"],
        "phase": status.get("phase") or "Pending",
        "reason": status.get("reason"),
        "message": status.get("message"),
        "suspended": bool(status.get("suspended", False)),
        "site": site_name,
        "siteConnected": connected,
        "siteLastSeen": site_row["lastSeen"] if site_row else None,
        "siteOfflineForSeconds": site_row["offlineForSeconds"] if site_row else None,
        "traceId": status.get("traceId"),
        "progress": status.get("progress") or f"0/{len(spec['tasks'])}",
        "startedAt": status.get("startedAt"),
        "finishedAt": status.get("finishedAt"),
        "durationSeconds": None
        if started is None
        else round((finished if finished is not None else now) - started, 3),
        "tasksTruncated": truncated,
        "tasks": _tree(spec["tasks"], entries, now, truncated),
        "onFailure": _tree(spec["onFailure"], comp_entries, now, truncated),
        "conditions": list(status.get("conditions") or []),
        "synced": status.get("syncedSeq") is not None,
    }


def task_logs(obj: Mapping[str, Any], task: str) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """``(status entry or None, {stream: tail})`` of one task of a Workflow."""
    for entry in (obj.get("status") or {}).get("tasks") or []:
        if isinstance(entry, Mapping) and entry.get("name") == task:
            logs = entry.get("logs")
            tails = {str(k): str(v) for k, v in logs.items()} if isinstance(logs, Mapping) else {}
            return dict(entry), tails
    return None, {}


def spec_task_names(obj: Mapping[str, Any]) -> list[str]:
    spec = obj.get("spec") or {}
    return [
        str(t.get("name")) for t in (*(spec.get("tasks") or []), *(spec.get("onFailure") or []))
    ]


# -------------------------------------------------------------------- lists
def workflow_row(obj: Mapping[str, Any], now: float | None = None) -> dict[str, Any]:
    """One line of ``tideflow list`` / the console's Workflows page."""
    now = time.time() if now is None else now
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    spec = obj.get("spec") or {}
    started, finished = parse_time(status.get("startedAt")), parse_time(status.get("finishedAt"))
    return {
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "phase": status.get("phase") or "Pending",
        "site": status.get("site") or (spec.get("placement") or {}).get("site"),
        "siteConnected": status.get("siteConnected"),
        "progress": status.get("progress") or f"0/{len(spec.get('tasks') or [])}",
        "created": meta.get("creationTimestamp"),
        "startedAt": status.get("startedAt"),
        "durationSeconds": None
        if started is None
        else round((finished if finished is not None else now) - started, 3),
        "message": status.get("message"),
        "cronWorkflow": (meta.get("labels") or {}).get("tideflow.io/cron-workflow"),
    }


def matches(row: Mapping[str, Any], *, namespace: str | None = None, site: str | None = None,
            phase: str | None = None) -> bool:  # fmt: skip
    """The list filters (exact match; phase case-insensitive)."""
    if namespace and row.get("namespace") != namespace:
        return False
    if site and row.get("site") != site:
        return False
    return not (phase and str(row.get("phase") or "").lower() != phase.lower())


def sort_workflows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Newest first, then namespace/name."""
    rows = list(rows)
    rows.sort(key=lambda r: (r.get("namespace") or "", r.get("name") or ""))
    rows.sort(key=lambda r: parse_time(r.get("created")) or 0.0, reverse=True)
    return rows


def cron_row(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    sites = [s.get("site") for s in status.get("sites") or [] if isinstance(s, Mapping)]
    return {
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "schedule": spec.get("schedule"),
        "timezone": spec.get("timezone") or spec.get("timeZone"),
        "suspend": bool(spec.get("suspend", False)),
        "siteCount": status.get("siteCount", len(sites)),
        "sites": sites,
        "active": status.get("active", 0),
        "lastScheduleTime": status.get("lastScheduleTime"),
        "created": meta.get("creationTimestamp"),
    }


def site_summary(obj: Mapping[str, Any], now: float | None = None) -> dict[str, Any]:
    """One site as ``tideflow sites`` and the Fleet page show it."""
    now = time.time() if now is None else now
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    connected = bool(status.get("connected", False))
    last_seen = parse_time(status.get("lastSeen"))
    offline_since = parse_time(status.get("offlineSince"))
    if not connected and offline_since is None:
        offline_since = last_seen
    return {
        "name": meta.get("name"),
        "connected": connected,
        "lastSeen": status.get("lastSeen"),
        "lastSeenAgoSeconds": None if last_seen is None else round(now - last_seen, 3),
        "offlineForSeconds": None
        if connected or offline_since is None
        else round(now - offline_since, 3),
        "running": status.get("running"),
        "outboxDepth": status.get("outboxDepth"),
        "agentVersion": status.get("agentVersion"),
        "labels": dict(meta.get("labels") or {}),
        "retired": str((meta.get("annotations") or {}).get("tideflow.io/retired", "")).lower()
        in ("true", "1", "yes"),
    }


def sort_sites(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dark sites first (longest offline first; never seen before those seen), then by name."""

    def key(row: Mapping[str, Any]) -> tuple[int, float, str]:
        if row.get("connected"):
            return (1, 0.0, str(row.get("name")))
        offline = row.get("offlineForSeconds")
        return (0, -(offline if offline is not None else float("inf")), str(row.get("name")))

    return sorted(rows, key=key)


# Terms a label selector may have: a person's selectors have a handful.  The console
# matches one against every site on its event loop, and an 8 KB URL of 4,000 terms,
# parsed again per site, held that loop over a second per request at 1,000 sites.
MAX_SELECTOR_TERMS = 32

SelectorTerm = tuple[str, str, str]  # (operator: "=", "!=", "exists", "!"; key; value)

# A label's name and value as Kubernetes writes them (a name may have a DNS prefix):
# a term whose key or value is neither was taken for a name to look for, so
# ``region in (eu,us)`` (set-based, which the API server takes) matched nothing.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(
    rf"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_LABEL_NAME}"
)
_LABEL_VALUE = re.compile(f"({_LABEL_NAME})?")


def _checked_term(op: str, key: str, value: str, raw: str) -> SelectorTerm:
    prefix = key.rpartition("/")[0]
    if not _LABEL_KEY.fullmatch(key) or len(prefix) > 253 or not _LABEL_VALUE.fullmatch(value):
        shown = raw if len(raw) <= 80 else raw[:80] + "..."
        raise ValueError(
            f"{shown!r} is not a term this console reads: key=value, key!=value, key or !key "
            "(label names and values; no set-based terms such as 'key in (a,b)')"
        )
    return (op, key, value)


def parse_label_selector(selector: str | None) -> list[SelectorTerm]:
    """A subset of Kubernetes' label selector syntax: ``k=v``, ``k!=v``, ``k``, ``!k``, commas.

    Raises ``ValueError`` for more than :data:`MAX_SELECTOR_TERMS` terms, and for a
    term whose key or value is no label name or value (a set-based term among them).
    """
    terms: list[SelectorTerm] = []
    for raw in (selector or "").split(","):
        term = raw.strip()
        if not term:
            continue
        if len(terms) >= MAX_SELECTOR_TERMS:
            raise ValueError(f"at most {MAX_SELECTOR_TERMS} terms")
        if "!=" in term:
            k, v = (s.strip() for s in term.split("!=", 1))
            terms.append(_checked_term("!=", k, v, term))
        elif "=" in term:
            k, v = (s.strip() for s in term.replace("==", "=", 1).split("=", 1))
            terms.append(_checked_term("=", k, v, term))
        elif term.startswith("!"):
            terms.append(_checked_term("!", term[1:].strip(), "", term))
        else:
            terms.append(_checked_term("exists", term, "", term))
    return terms


def selector_matches(labels: Mapping[str, str], terms: list[SelectorTerm]) -> bool:
    """Whether ``labels`` satisfy every term of a :func:`parse_label_selector` result."""
    for op, k, v in terms:
        if op == "!=":
            if labels.get(k) == v:
                return False
        elif op == "=":
            if labels.get(k) != v:
                return False
        elif op == "!":
            if k in labels:
                return False
        elif k not in labels:
            return False
    return True


def label_selector_matches(labels: Mapping[str, str], selector: str | None) -> bool:
    """:func:`selector_matches` of a selector as written (parsed each time)."""
    return selector_matches(labels, parse_label_selector(selector))


__all__ = [
    "CRONWORKFLOWS",
    "EDGESITES",
    "GROUP",
    "MAX_SELECTOR_TERMS",
    "PHASE_SYMBOLS",
    "VERSION",
    "WORKFLOWS",
    "cron_row",
    "dag_order",
    "label_selector_matches",
    "matches",
    "parse_label_selector",
    "parse_time",
    "safe_workflow",
    "selector_matches",
    "short_duration",
    "site_summary",
    "sort_sites",
    "sort_workflows",
    "symbol",
    "task_logs",
    "workflow_detail",
    "workflow_row",
]
