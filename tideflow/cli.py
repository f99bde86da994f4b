"""``tideflow``: the user's command.

``tideflow render my_flow.py [more.py ...] > wf.yaml`` runs each Python file
and prints the Workflows it defines as one multi-document YAML manifest, ready
for ``kubectl apply -f`` or ``tideflow-agent run-local``.  A file defines its
workflows, in order of precedence, by

* a ``build()`` function returning one Workflow or a list of them;
* a ``workflows`` variable (a list) or a ``workflow`` variable;
* otherwise every module-level variable holding a Workflow (names starting
  with ``_`` are skipped), in definition order.

A Workflow is a :class:`tideflow.builder.Workflow`, or an already-built
:class:`tideflow.spec.Workflow`.  The file runs with ``__name__`` set to
``"__tideflow_render__"`` (so an ``if __name__ == "__main__":`` block does
not run) and with its own folder first on ``sys.path``.

``tideflow get / watch / submit / list / sites / logs / console`` read the
fleet from the cloud (the current kubeconfig context): see
:mod:`tideflow.tools.fleet`; their options are declared here and their code
is imported only when one of them runs.

``tideflow demo [--ci]`` runs the whole story — two sites, one loses its
link and is killed while offline, everything lands exactly once — see
:mod:`tideflow.tools.demo`.  The demo is tooling above the contract (the
``demo`` extra): it is imported only when its command is parsed or run, so
``tideflow render`` loads no launcher, no kubernetes client, no cryptography.

Render exit codes: 0 rendered; 1 the file raised an exception (traceback on stderr);
2 invalid — a :class:`~tideflow.spec.SpecError` (the message names the field),
a file that cannot be read or defines no workflow, two workflows with the
same namespace/name.  Nothing is written to ``--output`` unless everything
rendered.

This package imports neither ``edge_agent`` nor ``tideflow_operator``.
"""

from __future__ import annotations

import argparse
import contextlib
import runpy
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (imported when ``render`` runs: pydantic takes half a second)
    from tideflow import builder, spec

    Renderable = builder.Workflow | builder.CronWorkflow | spec.Workflow | spec.CronWorkflow

EXIT_OK, EXIT_ERROR, EXIT_INVALID = 0, 1, 2
RUN_NAME = "__tideflow_render__"

Handler = Callable[[argparse.Namespace], int]

RENDER_DESCRIPTION = """\
Run each Python file and print the Workflows it defines as one multi-document
YAML manifest (for kubectl apply -f, or tideflow-agent run-local).  A file
defines them, in order of precedence, by a build() function returning one or
a list; a `workflows` or `workflow` variable; else every module-level variable
holding a tideflow.builder.Workflow (names starting with _ skipped).

exit codes: 0 rendered, 1 the file raised, 2 invalid (the message names the field)
"""


DEMO_DESCRIPTION = """\
A Workflow applied with kubectl runs at two sites; site-b loses its link, its
agent is killed with kill -9 and restarted while offline, keeps going, and when
the link returns everything lands in the cloud exactly once.  Uses the current
kubeconfig context if it answers, else kube-apiserver + etcd from
$KUBEBUILDER_ASSETS on loopback, else runs the edge-only part of the story.
Needs mosquitto on PATH.  Ctrl-C stops everything it started.

exit codes: 0 the verdict is OK, 1 it is not (or a step failed), 130 interrupted
"""


class RenderError(Exception):
    """A file that cannot be rendered, for a reason other than its spec (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per command, each mapped to its handler."""
    parser = argparse.ArgumentParser(
        prog="tideflow", description="Tideflow: workflows for edge sites that lose their link."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    render = sub.add_parser(
        "render",
        help="print the Workflows a Python file defines as a YAML manifest",
        description=RENDER_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    render.add_argument("files", nargs="+", type=Path, metavar="FILE.py")
    render.add_argument(
        "-o", "--output", type=Path, help="write here (only if everything rendered), not stdout"
    )
    render.set_defaults(handler=_render)
    story = sub.add_parser(
        "demo",
        help="the whole story: two sites, one loses its link and is killed; exactly once",
        description=DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from tideflow.tools import demo  # its options only; the story is imported when it runs

    demo.add_arguments(story)
    story.set_defaults(handler=_demo)
    _add_fleet_commands(sub)
    return parser


# --------------------------------------------------------------------- fleet
FLEET_EXIT_CODES = "exit codes: 0 done, 2 the command failed (the message on stderr says why)"


def _fleet(name: str) -> Handler:
    """The handler ``name`` of :mod:`tideflow.tools.fleet.commands`, imported when it runs."""

    def run(args: argparse.Namespace) -> int:
        from tideflow.tools.fleet import commands

        handler: Handler = getattr(commands, name)
        return handler(args)

    return run


def _add_fleet_commands(sub: Any) -> None:
    """``get / watch / submit / list / sites / logs / console`` (decision 0011).

    Declared here with argparse only: the fleet tooling (and the Kubernetes
    client) is imported when one of them runs.
    """
    context = argparse.ArgumentParser(add_help=False)
    context.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube)")
    context.add_argument("--context", help="kubeconfig context (default: the current one)")
    ns = argparse.ArgumentParser(add_help=False)
    ns.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    json_out = argparse.ArgumentParser(add_help=False)
    json_out.add_argument("-o", "--output", choices=["json", "yaml"], help="for scripts")
    timeout = argparse.ArgumentParser(add_help=False)
    timeout.add_argument(
        "--timeout", type=float, default=0, help="give up after this many seconds (0: never)"
    )

    def add(name: str, handler: str, help: str, *parents: argparse.ArgumentParser,
            epilog: str = FLEET_EXIT_CODES) -> argparse.ArgumentParser:  # fmt: skip
        parser: argparse.ArgumentParser = sub.add_parser(
            name, help=help, description=help, epilog=epilog, parents=[context, *parents]
        )
        parser.set_defaults(handler=_fleet(handler))
        return parser

    result_codes = "exit codes: 0 the run succeeded, 1 it did not (or --timeout passed), 2 failed"
    get = add("get", "get", "one Workflow: its tasks in DAG order, its site, trace, progress",
              ns, json_out)  # fmt: skip
    get.add_argument("workflow", metavar="WORKFLOW")
    watch = add("watch", "watch", "follow a Workflow live until it finishes", ns, timeout,
                epilog=result_codes)  # fmt: skip
    watch.add_argument("workflow", metavar="WORKFLOW")
    submit = add("submit", "submit", "create the Workflows of a manifest or a Python flow file",
                 ns, timeout, epilog=result_codes)  # fmt: skip
    submit.add_argument("file", type=Path, metavar="FILE")
    submit.add_argument("--watch", action="store_true", help="follow them; exit 0/1 by result")
    listing = add("list", "list_", "Workflows (or CronWorkflows), newest first", ns, json_out)
    listing.add_argument("-A", "--all-namespaces", action="store_true")
    listing.add_argument("--site", help="only runs placed on this site")
    listing.add_argument("--phase", help="only runs in this phase (e.g. Failed)")
    listing.add_argument("--cron", action="store_true", help="list CronWorkflows instead")
    sites = add("sites", "sites", "EdgeSites, dark ones first: connectivity, backlog, version",
                json_out)  # fmt: skip
    sites.add_argument("-l", "--selector", help="label selector, e.g. region=eu,tier!=lab")
    logs = add("logs", "logs", "the log tail of a task that reached the cloud", ns, json_out)
    logs.add_argument("workflow", metavar="WORKFLOW")
    logs.add_argument("task", metavar="TASK")
    console = add("console", "console", "the read-only web console (Fleet, Workflows, one run)")
    console.set_defaults(takes_stop=True)  # (SIGTERM held from main's first line: HeldStop)
    console.add_argument("--port", type=int, default=8080)
    console.add_argument(
        "--address", default="127.0.0.1", help="bind address (default loopback only)"
    )
    console.add_argument(
        "--trace-url", default="", help="trace link template with {traceId}, e.g. "
        "https://jaeger.example/trace/{traceId}"
    )  # fmt: skip
    console.add_argument(
        "--in-cluster", action="store_true", help="use the pod's ServiceAccount (the chart's)"
    )
    console.add_argument(
        "-n", "--namespace", action="append", dest="namespaces", metavar="NAMESPACE",
        help="show the runs of this namespace only (repeat for more; default: all); "
        "the chart sets its watchNamespaces",
    )  # fmt: skip


class HeldStop:
    """SIGTERM and Ctrl-C noted, not acted on, from :func:`main`'s first line until a
    command takes them.

    ``tideflow console`` runs as its container's PID 1 (the chart), which the
    kernel sends no signal it does not handle: a SIGTERM (a rollout of a pod
    that just started) before the console put its handler in place, after
    importing its web server and the Kubernetes client, was thrown away, and
    the console listened on until the kubelet's SIGKILL; a Ctrl-C then ended
    it with a traceback, or, its KeyboardInterrupt dropped by Python (raised in
    a finalizer), not at all.  The console takes the hold (:meth:`take`, in
    :func:`tideflow.tools.fleet.console.serve`: a stop noted here ends it with
    0, or 130 for Ctrl-C, before it listens); any other command gets it
    released first, a signal noted meanwhile delivered again to the handler
    found (as before).  One ignored from the start stays ignored.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.noted: signal.Signals | None = None
        self.found: dict[signal.Signals, Any] = {}  # the handlers found at install
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        with contextlib.suppress(ValueError):  # (not the main thread: signals are not ours)
            for sig in self.SIGNALS:
                previous = signal.getsignal(sig)
                if previous is not signal.SIG_IGN:
                    signal.signal(sig, self._note)
                    self._previous[sig] = self.found[sig] = previous

    def _note(self, signum: int, frame: object) -> None:
        if self.noted is None:
            self.noted = signal.Signals(signum)

    def release(self, *, deliver: bool = True) -> None:
        """Put the handlers found back where ours still is (a command may have put its own);
        a signal noted meanwhile goes to its handler now."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            if signal.getsignal(sig) == self._note:
                signal.signal(sig, handler)
        if deliver and previous and self.noted is not None:
            signal.raise_signal(self.noted)

    def take(self) -> signal.Signals | None:
        """For the command that handles stops itself: the handlers found back, and the
        stop noted meanwhile (None: none), for it to act on."""
        self.release(deliver=False)
        return self.noted


def main(argv: Sequence[str] | None = None) -> int:
    held = HeldStop()
    held.install()
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "takes_stop", False):
            args.held_stop = held  # (the console: it takes the stop noted, HeldStop.take)
        else:
            held.release()
        handler: Handler = args.handler
        code = handler(args)
    finally:
        held.release(deliver=False)  # (the command returned: it saw a stop noted)
    return code


# ---------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    from tideflow.tools import demo

    return demo.run_demo(ci=args.ci, cluster=args.cluster, keep=args.keep)


# -------------------------------------------------------------------- render
def load_workflows(path: Path) -> list[Renderable]:
    """Run a Python file and return the Workflows it defines (see the module doc)."""
    from tideflow.spec import SpecError

    if not path.is_file():
        raise RenderError(f"{path}: no such file")
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        namespace = runpy.run_path(str(path), run_name=RUN_NAME)
    except SpecError as exc:  # raised by the builder while the file ran
        raise SpecError([(f"{path}: {field}", msg) for field, msg in exc.problems]) from None
    finally:
        # Remove our entry (the file may have changed sys.path itself).
        if folder in sys.path:
            sys.path.remove(folder)
    found = _workflows_in(namespace)
    if not found:
        raise RenderError(
            f"{path}: defines no workflow (want a module-level tideflow.builder.Workflow, "
            "a `workflow` or `workflows` variable, or a `build()` function returning them)"
        )
    return found


def _renderable() -> tuple[
    type[builder.Workflow], type[builder.CronWorkflow], type[spec.Workflow], type[spec.CronWorkflow]
]:
    from tideflow import builder, spec

    return (builder.Workflow, builder.CronWorkflow, spec.Workflow, spec.CronWorkflow)


def _workflows_in(namespace: dict[str, Any]) -> list[Renderable]:
    build = namespace.get("build")
    if callable(build) and getattr(build, "__module__", None) == RUN_NAME:
        return _as_list(build(), "build()")
    if "workflows" in namespace:
        return _as_list(namespace["workflows"], "workflows")
    if "workflow" in namespace:
        return _as_list(namespace["workflow"], "workflow")
    found: list[Renderable] = []
    for name, value in namespace.items():
        if name.startswith("_") or not isinstance(value, _renderable()):
            continue
        if not any(value is seen for seen in found):
            found.append(value)
    return found


def _as_list(value: Any, what: str) -> list[Renderable]:
    items = list(value) if isinstance(value, list | tuple) else [value]
    for i, item in enumerate(items):
        if not isinstance(item, _renderable()):
            where = f"{what}[{i}]" if isinstance(value, list | tuple) else what
            raise RenderError(f"{where} is a {type(item).__name__}, not a Workflow")
    return items


def render_manifest(workflow: Renderable) -> dict[str, Any]:
    """The validated manifest of one Workflow or CronWorkflow (SpecError names the field)."""
    from tideflow import builder, spec

    if isinstance(workflow, builder.Workflow | builder.CronWorkflow):
        return workflow.to_manifest()
    manifest = workflow.model_dump(by_alias=True, exclude_unset=True, mode="json")
    # a model built with model_construct may be invalid
    if isinstance(workflow, spec.CronWorkflow):
        spec.parse_cron_workflow(manifest)
    else:
        spec.parse_workflow(manifest)
    return manifest


def _label(workflow: Renderable) -> str:
    from tideflow import builder, spec

    kind = "cronworkflow " if isinstance(workflow, builder.CronWorkflow | spec.CronWorkflow) else ""
    if isinstance(workflow, builder.Workflow | builder.CronWorkflow):
        return f"{kind}{workflow.namespace}/{workflow.name}"
    return f"{kind}{workflow.metadata.namespace}/{workflow.metadata.name}"


def render_files(paths: Sequence[Path]) -> str:
    """The multi-document YAML of every Workflow the files define."""
    from tideflow import builder
    from tideflow.spec import SpecError

    documents: list[str] = []
    seen: dict[str, Path] = {}
    for path in paths:
        for workflow in load_workflows(path):
            label = _label(workflow)
            if label in seen:
                raise RenderError(
                    f"{path}: workflow {label} is defined twice (also in {seen[label]}); "
                    "metadata.name must be unique within a namespace"
                )
            seen[label] = path
            try:
                manifest = render_manifest(workflow)
            except SpecError as exc:
                raise SpecError(
                    [(f"{path}: workflow {label}: {field}", msg) for field, msg in exc.problems]
                ) from None
            documents.append("---\n" + builder.manifest_yaml(manifest))
    header = "# Rendered by `tideflow render " + " ".join(str(p) for p in paths) + "`\n"
    return header + "".join(documents)


def _render(args: argparse.Namespace) -> int:
    from tideflow.spec import SpecError

    try:
        text = render_files(args.files)
    except SpecError as exc:
        print(f"tideflow render: invalid workflow: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except RenderError as exc:
        print(f"tideflow render: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except Exception:
        traceback.print_exc()
        print("tideflow render: the file raised an exception (above)", file=sys.stderr)
        return EXIT_ERROR
    if args.output is not None:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
