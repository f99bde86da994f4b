"""The cloud-side commands: ``tideflow get / watch / submit / list / sites / logs``.

Each handler takes the parsed options (declared in ``tideflow/cli.py``) and
returns the exit code: 0 done, 1 the run it watched did not succeed (``watch``,
``submit --watch``), 2 the command could not do its job -- the CRDs are
missing, the context does not answer, the object does not exist, a manifest is
invalid -- with one line on stderr saying which.

Output: rich tables when stdout is a terminal, aligned plain text otherwise
(pipes, files, CI logs), ``-o json`` (and ``-o yaml`` where it fits) for
scripts.  The rows come from :mod:`.views`; nothing printed comes from a
Workflow's env, params or commands.  Much of it was written by a site (task and
run messages, agent versions), and a site may lie: every line and cell goes
through :func:`terminal_text`, so control characters (an ESC sequence that
clears the screen or writes the clipboard, a carriage return over a row, C1
controls, bidirectional overrides) are shown as escapes, never obeyed.
``tideflow logs`` prints a task's output as it is, as ``kubectl logs`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from tideflow.failpoints import failpoint
from tideflow.tools.fleet import views
from tideflow.tools.fleet.api import FleetApi, FleetError
from tideflow.tools.fleet.views import CRONWORKFLOWS, EDGESITES, WORKFLOWS, short_duration

EXIT_OK, EXIT_NOT_SUCCEEDED, EXIT_ERROR = 0, 1, 2

PHASE_STYLES = {
    "Succeeded": "green",
    "Failed": "red",
    "Running": "cyan",
    "Retrying": "yellow",
    "Interrupted": "yellow",
    "Cancelled": "magenta",
    "Skipped": "dim",
    "Pending": "dim",
    "Assigned": "dim",
}


# ------------------------------------------------------------------- output
# Format characters that reorder what follows (bidirectional embeddings,
# overrides and isolates): a row could show text other than what it holds.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def terminal_text(text: str) -> str:
    """``text`` with every control character (C0, DEL, C1) and bidirectional
    format character shown as its escape (``\\x1b``), so it cannot drive a terminal."""
    if text.isprintable():
        return text
    return "".join(
        c.encode("unicode_escape").decode("ascii")
        if c in _BIDI or unicodedata.category(c) == "Cc"
        else c
        for c in text
    )


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Out:
    """Tables and lines, rich on a terminal, plain otherwise."""

    def __init__(self, stream: TextIO | None = None, rich: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.rich = _is_tty(self.stream) if rich is None else rich
        self.console: Any = None
        if self.rich:
            try:
                from rich.console import Console
            except ImportError:  # the fleet extra is not installed: plain text
                self.rich = False
            else:
                self.console = Console(file=self.stream, highlight=False)

    def line(self, text: str = "") -> None:
        text = terminal_text(text)
        if self.console is not None:
            from rich.text import Text

            self.console.print(Text(text))
        else:
            print(text, file=self.stream)

    def table(
        self,
        headers: Sequence[str],
        rows: Iterable[Sequence[str]],
        styles: Sequence[str | None] | None = None,
        title: str | None = None,
    ) -> None:
        rows = [[terminal_text(str(c)) for c in r] for r in rows]
        if self.console is not None:
            from rich.table import Table
            from rich.text import Text

            table = Table(title=title, title_justify="left", box=None, header_style="bold")
            for h in headers:
                table.add_column(h, overflow="fold")
            for i, row in enumerate(rows):
                style = styles[i] if styles else None
                table.add_row(*(Text(c) for c in row), style=style)
            self.console.print(table)
            return
        if title:
            print(title, file=self.stream)
        widths = [len(h) for h in headers]
        for row in rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=False)]
        for row in [list(headers), *rows]:
            cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
            print("  ".join(cells).rstrip(), file=self.stream)


def _dump(data: Any, fmt: str, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    if fmt == "yaml":
        import yaml

        stream.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    else:
        stream.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _fail(command: str, message: str) -> int:
    print(f"tideflow {command}: {message}", file=sys.stderr)
    return EXIT_ERROR


def _api(args: argparse.Namespace) -> FleetApi:
    return FleetApi(kubeconfig=args.kubeconfig, context=args.context)


def guarded(
    command: str,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Turn a :class:`FleetError` (or a Ctrl-C) into one line on stderr and exit 2 (130)."""

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except FleetError as exc:
                return _fail(command, str(exc))
            except KeyboardInterrupt:
                return 130

        return run

    return wrap


# ---------------------------------------------------------------------- get
def _site_text(detail: dict[str, Any]) -> str:
    site = detail.get("site") or "(not placed yet)"
    connected = detail.get("siteConnected")
    if connected is True:
        return f"{site}  connected"
    if connected is False:
        off = detail.get("siteOfflineForSeconds")
        since = f" for {short_duration(off)}" if off is not None else ""
        seen = detail.get("siteLastSeen")
        return f"{site}  OFFLINE{since}" + (f" (last seen {seen})" if seen else "")
    return f"{site}  connectivity unknown"


def _attempts(task: dict[str, Any]) -> str:
    text = str(task["attempt"])
    if task.get("interruptions"):
        text += f" ({task['interruptions']} interrupted)"
    return text


def _task_rows(tasks: list[dict[str, Any]]) -> tuple[list[list[str]], list[str | None]]:
    rows, styles = [], []
    for t in tasks:
        indent = "  " * t["depth"] + ("└ " if t["depth"] else "")
        code = "" if t["exitCode"] is None else str(t["exitCode"])
        message = (t.get("message") or "").replace("\n", " ")
        rows.append(
            [
                f"{indent}{views.symbol(t['phase'])} {t['name']}",
                t["phase"],
                _attempts(t),
                short_duration(t["durationSeconds"]),
                code,
                message,
            ]
        )
        styles.append(PHASE_STYLES.get(t["phase"]))
    return rows, styles


def show_detail(detail: dict[str, Any], out: Out) -> None:
    """The human form of ``tideflow get``."""
    phase = detail["phase"]
    reason = f" ({detail['reason']})" if detail.get("reason") and detail["reason"] != phase else ""
    out.line(f"Name:      {detail['namespace']}/{detail['name']}")
    out.line(
        f"Phase:     {views.symbol(phase)} {phase}{reason}"
        + ("  [suspended]" if detail.get("suspended") else "")
    )
    if detail.get("message"):
        out.line(f"Message:   {detail['message']}")
    out.line(f"Site:      {_site_text(detail)}")
    out.line(
        f"Progress:  {detail['progress']}   Duration: {short_duration(detail['durationSeconds'])}"
    )
    out.line(f"Trace:     {detail.get('traceId') or '-'}")
    headers = ["TASK", "PHASE", "ATTEMPTS", "DURATION", "EXIT", "MESSAGE"]
    out.line()
    rows, styles = _task_rows(detail["tasks"])
    out.table(headers, rows, styles)
    if detail["onFailure"]:
        out.line()
        out.line("onFailure:")
        rows, styles = _task_rows(detail["onFailure"])
        out.table(headers, rows, styles)
    if detail.get("tasksTruncated"):
        out.line("(the status lists only some tasks; the others show as Unknown)")


def fetch_detail(api: FleetApi, name: str, namespace: str | None) -> dict[str, Any]:
    obj = api.get(WORKFLOWS, name, namespace)
    site = views.workflow_detail(obj).get("site")
    return views.workflow_detail(obj, api.site(site))


@guarded("get")
def get(args: argparse.Namespace) -> int:
    detail = fetch_detail(_api(args), args.workflow, args.namespace)
    if args.output:
        _dump(detail, args.output)
    else:
        show_detail(detail, Out())
    return EXIT_OK


# -------------------------------------------------------------------- watch
def _changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    stamp = time.strftime("%H:%M:%S")
    lines = []
    if old is None or (old["phase"], old["progress"]) != (new["phase"], new["progress"]):
        lines.append(f"{stamp} {new['namespace']}/{new['name']} {new['phase']} {new['progress']}")
    before = {
        t["name"]: t for t in ((old or {}).get("tasks", []) + (old or {}).get("onFailure", []))
    }
    for t in new["tasks"] + new["onFailure"]:
        was = before.get(t["name"])
        if was is None or (was["phase"], was["attempt"]) != (t["phase"], t["attempt"]):
            if old is None and t["phase"] in ("Pending", "Unknown"):
                continue
            msg = f": {t['message']}" if t.get("message") else ""
            lines.append(
                f"{stamp}   {views.symbol(t['phase'])} {t['name']} {t['phase']}"
                f" (attempt {t['attempt']}){msg}"
            )
    return lines


def follow(
    api: FleetApi,
    name: str,
    namespace: str | None,
    timeout: float,
    on_change: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Call ``on_change`` with each new detail until the run finishes; return the last one.

    Uses one Kubernetes watch on the object (re-opened when the server ends it).
    Raises :class:`TimeoutError` when ``timeout`` (> 0) passes first.
    """
    deadline = time.monotonic() + timeout if timeout > 0 else None
    ns = namespace or api.default_namespace
    obj = api.get(WORKFLOWS, name, ns)
    while True:
        detail = views.workflow_detail(obj, api.site(views.workflow_detail(obj)["site"]))
        on_change(detail)
        if views.run_done(detail["phase"]):
            return detail
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(detail["phase"])
        window = 30 if left is None else max(1, min(30, int(left) + 1))
        version = (obj.get("metadata") or {}).get("resourceVersion")
        newer = None
        try:
            for event in api.watch(
                WORKFLOWS,
                ns,
                resource_version=version,
                field_selector=f"metadata.name={name}",
                timeout_seconds=window,
            ):
                if event.get("type") == "DELETED":
                    raise FleetError(f"Workflow {name} was deleted in namespace {ns}")
                if event.get("type") in ("ADDED", "MODIFIED"):
                    newer = event["object"]
                    break
        except FleetError as exc:
            if "deleted" in str(exc) or "not found" in str(exc):
                raise
        obj = newer if isinstance(newer, dict) else api.get(WORKFLOWS, name, ns)


def _watch_until_done(api: FleetApi, name: str, namespace: str | None, timeout: float) -> int:
    out = Out()
    if out.console is not None:
        from rich.live import Live

        with Live(console=out.console, auto_refresh=False) as live:

            def draw(detail: dict[str, Any]) -> None:
                from io import StringIO

                from rich.text import Text

                buffer = StringIO()
                show_detail(detail, Out(buffer, rich=False))
                # Text, not a str (which rich reads as markup): a site's '[/x]' ended
                # the command with MarkupError, its '[link=...]' made a link.
                live.update(Text(buffer.getvalue().rstrip()), refresh=True)

            final = _follow_or_timeout(api, name, namespace, timeout, draw)
    else:
        last: list[dict[str, Any] | None] = [None]

        def log(detail: dict[str, Any]) -> None:
            for line in _changes(last[0], detail):
                out.line(line)
            last[0] = detail

        final = _follow_or_timeout(api, name, namespace, timeout, log)
        if final is not None:
            out.line()
            show_detail(final, out)
    if final is None:
        return EXIT_NOT_SUCCEEDED
    return EXIT_OK if final["phase"] == "Succeeded" else EXIT_NOT_SUCCEEDED


def _follow_or_timeout(
    api: FleetApi,
    name: str,
    namespace: str | None,
    timeout: float,
    on_change: Callable[[dict[str, Any]], None],
) -> dict[str, Any] | None:
    try:
        return follow(api, name, namespace, timeout, on_change)
    except TimeoutError as exc:
        print(f"tideflow watch: {name} is still {exc} after {timeout:g}s", file=sys.stderr)
        return None


@guarded("watch")
def watch(args: argparse.Namespace) -> int:
    return _watch_until_done(_api(args), args.workflow, args.namespace, args.timeout)


# ------------------------------------------------------------------- submit
def load_documents(path: Path) -> list[dict[str, Any]]:
    """The Workflows/CronWorkflows a YAML manifest or a Python flow file defines, validated."""
    from tideflow import manifest, spec

    if path.suffix == ".py":
        from tideflow import cli

        return [cli.render_manifest(w) for w in cli.load_workflows(path)]
    text = path.read_text(encoding="utf-8") if path.is_file() else None
    if text is None:
        raise spec.SpecError([(str(path), "no such file")])
    import yaml

    try:
        docs = [d for d in yaml.load_all(text, Loader=manifest.ManifestLoader) if d is not None]
    except yaml.YAMLError as exc:
        raise spec.SpecError([(str(path), f"not valid YAML: {exc}")]) from None
    for i, doc in enumerate(docs):
        kind = doc.get("kind") if isinstance(doc, dict) else None
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        probe = dict(doc) if isinstance(doc, dict) else doc
        if isinstance(meta, dict) and not meta.get("name") and meta.get("generateName"):
            probe = {**doc, "metadata": {**meta, "name": str(meta["generateName"]) + "x"}}
        if kind == "Workflow":
            spec.parse_workflow(probe)
        elif kind == "CronWorkflow":
            spec.parse_cron_workflow(probe)
        else:
            raise spec.SpecError(
                [(f"{path}: document {i + 1}: kind", "want Workflow or CronWorkflow")]
            )
    if not docs:
        raise spec.SpecError([(str(path), "holds no document")])
    return docs


@guarded("submit")
def submit(args: argparse.Namespace) -> int:
    from tideflow import spec
    from tideflow.cli import RenderError

    try:
        docs = load_documents(args.file)
    except (spec.SpecError, RenderError) as exc:
        return _fail("submit", f"invalid: {exc}")
    api = _api(args)
    created: list[tuple[str, str]] = []
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        namespace = args.namespace or meta.get("namespace") or api.default_namespace
        meta["namespace"] = namespace
        plural = CRONWORKFLOWS if doc.get("kind") == "CronWorkflow" else WORKFLOWS
        answer = api.create(plural, namespace, doc)
        name = answer["metadata"]["name"]
        print(f"{doc['kind'].lower()} {namespace}/{name} created", flush=True)
        if plural == WORKFLOWS:
            created.append((namespace, name))
    if not args.watch:
        return EXIT_OK
    codes = [_watch_until_done(api, name, ns, args.timeout) for ns, name in created]
    return max(codes, default=EXIT_OK)


# --------------------------------------------------------------------- list
@guarded("list")
def list_(args: argparse.Namespace) -> int:
    api = _api(args)
    namespace = None if args.all_namespaces else (args.namespace or api.default_namespace)
    if args.cron:
        rows = [views.cron_row(o) for o in api.list_all(CRONWORKFLOWS, namespace)]
        rows = [
            r
            for r in rows
            if views.matches(r, site=None) and (not args.site or args.site in r["sites"])
        ]
        if args.output:
            _dump(rows, args.output)
            return EXIT_OK
        Out().table(
            ["NAMESPACE", "NAME", "SCHEDULE", "SITES", "ACTIVE", "LAST SCHEDULED", "SUSPENDED"],
            [
                [
                    r["namespace"],
                    r["name"],
                    r["schedule"],
                    str(r["siteCount"]),
                    str(r["active"]),
                    r["lastScheduleTime"] or "-",
                    "yes" if r["suspend"] else "",
                ]
                for r in rows
            ],
        )
        return EXIT_OK
    now = time.time()
    rows = [views.workflow_row(o, now) for o in api.list_all(WORKFLOWS, namespace)]
    rows = views.sort_workflows(
        r for r in rows if views.matches(r, site=args.site, phase=args.phase)
    )
    if args.output:
        _dump(rows, args.output)
        return EXIT_OK
    Out().table(
        ["NAMESPACE", "NAME", "PHASE", "SITE", "PROGRESS", "DURATION", "MESSAGE"],
        [
            [
                r["namespace"],
                r["name"],
                f"{views.symbol(r['phase'])} {r['phase']}",
                r["site"] or "-",
                r["progress"],
                short_duration(r["durationSeconds"]),
                (r["message"] or "").replace("\n", " ")[:80],
            ]
            for r in rows
        ],
        [PHASE_STYLES.get(r["phase"]) for r in rows],
    )
    return EXIT_OK


# -------------------------------------------------------------------- sites
@guarded("sites")
def sites(args: argparse.Namespace) -> int:
    api = _api(args)
    now = time.time()
    rows = views.sort_sites(
        views.site_summary(o, now) for o in api.list_all(EDGESITES, None, args.selector)
    )
    if args.output:
        _dump(rows, args.output)
        return EXIT_OK

    def count(value: Any) -> str:
        return "-" if value is None else str(value)

    Out().table(
        ["SITE", "CONNECTED", "LAST SEEN", "OFFLINE FOR", "RUNNING", "OUTBOX", "VERSION", "LABELS"],
        [
            [
                r["name"],
                "yes" if r["connected"] else "NO",
                f"{short_duration(r['lastSeenAgoSeconds'])} ago" if r["lastSeen"] else "never",
                short_duration(r["offlineForSeconds"]) if not r["connected"] else "",
                count(r["running"]),
                count(r["outboxDepth"]),
                r["agentVersion"] or "-",
                ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())),
            ]
            for r in rows
        ],
        [None if r["connected"] else "red" for r in rows],
    )
    return EXIT_OK


# --------------------------------------------------------------------- logs
@guarded("logs")
def logs(args: argparse.Namespace) -> int:
    api = _api(args)
    obj = api.get(WORKFLOWS, args.workflow, args.namespace)
    if args.task not in views.spec_task_names(obj):
        return _fail("logs", f"Workflow {args.workflow} has no task {args.task}")
    entry, tails = views.task_logs(obj, args.task)
    detail = views.workflow_detail(obj)
    site = api.site(detail["site"])
    synced = entry is not None and entry.get("phase") not in (None, "Pending")
    if args.output:
        _dump(
            {
                "workflow": args.workflow,
                "task": args.task,
                "synced": synced,
                "attempt": (entry or {}).get("attempt"),
                "logs": tails,
            },
            args.output,
        )
        return EXIT_OK
    if tails:
        for stream, text in sorted(tails.items()):
            print(f"==> {args.task} {stream} (attempt {(entry or {}).get('attempt')}) <==")
            sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
        return EXIT_OK
    where = detail["site"] or "its site"
    if not synced:
        offline = site is not None and not views.site_summary(site)["connected"]
        why = f"site {where} is offline" if offline else f"site {where} has not synced it yet"
        print(
            f"no log tail in the cloud for {args.task}: {why} (on the site: tideflow-agent logs)",
            file=sys.stderr,
        )
    else:
        print(
            f"no log tail in the cloud for {args.task}: the Workflow's status holds none "
            f"(the task wrote nothing, or the status had no room left for it; on site "
            f"{where}: tideflow-agent logs)",
            file=sys.stderr,
        )
    return EXIT_OK


# ------------------------------------------------------------------ console
def console(args: argparse.Namespace) -> int:
    failpoint("console-importing")  # (its web server and the Kubernetes client not imported)
    from tideflow.tools.fleet.console import ConsoleError, serve

    try:
        return serve(args)
    except (FleetError, ConsoleError) as exc:
        return _fail("console", str(exc))
    except KeyboardInterrupt:
        return 130


__all__ = ["console", "get", "list_", "logs", "sites", "submit", "watch"]
