"""The ``dependsOn`` graph and the templates of a Workflow spec, checked without running it.

Part of the Workflow spec's validation (:mod:`tideflow.spec`, which runs
:func:`check_graph` from ``WorkflowSpec``'s model validator and re-exports
what the agent uses: :func:`template_refs`, :func:`render`,
:func:`template_values`).  Kept apart because it is a module's worth of
algorithm on its own — Kahn's algorithm for cycles, the ancestry of
``{{tasks.X.outputs.K}}`` references as bitsets over only the referenced
tasks, and the ``sh -c`` script check — and because :mod:`tideflow.spec` is
the models; the costs are in :mod:`tideflow.spec`'s docstring.

Imports :mod:`tideflow.spec` for its types only, so the two never import each
other at run time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tideflow.spec import Task, WorkflowSpec

TEMPLATE_RE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_TASK_OUTPUT_REF = re.compile(
    r"^tasks\.([A-Za-z0-9][A-Za-z0-9_-]*)\.outputs\.([A-Za-z_][A-Za-z0-9_.-]*)$"
)
_PARAM_REF = re.compile(r"^params\.([A-Za-z_][A-Za-z0-9_.-]*)$")
WORKFLOW_REFS = ("workflow.name", "workflow.namespace", "workflow.uid")


def template_refs(text: str) -> list[str]:
    return TEMPLATE_RE.findall(text)


# ---------------------------------------------------------------- shell -c
#: Shells whose ``-c`` makes the next argument script text.  Matched on the
#: base name, so ``/bin/sh`` and ``/usr/bin/bash`` count too.
SHELLS = frozenset(
    [
        "sh",
        "bash",
        "rbash",
        "dash",
        "zsh",
        "ksh",
        "ksh93",
        "mksh",
        "pdksh",
        "ash",
        "hush",
        "yash",
        "fish",
        "csh",
        "tcsh",
    ]
)
#: Options of those shells that take the next argument as their value.
_SHELL_OPTIONS_WITH_VALUE = frozenset({"o", "O"})
_SHELL_LONG_OPTIONS_WITH_VALUE = frozenset({"--rcfile", "--init-file", "--init-command"})
_SHELL_HINT = (
    "a template in the script of a shell's -c would be parsed as shell code; pass the "
    "value through env (env: {V: '{{...}}'}) and use \"$V\" in the script"
)


def _shell_script_args(argv: list[str]) -> Iterable[int]:
    """Indexes of ``argv`` a shell reads as code: the ``-c`` script and the options before it.

    Every element whose base name is a shell (or a ``busybox`` applet named
    like one) starts a shell command line, wherever it stands, so wrappers
    (``env``, ``timeout 5``, ``nice``) are covered without knowing them.
    Arguments after the script are ``$0``, ``$1``...: data, not code.
    """
    for start, arg in enumerate(argv):
        # "busybox sh -c" is covered too: the applet name is the shell.
        if arg.rpartition("/")[2] not in SHELLS:
            continue
        options: list[int] = []
        takes_script = False
        i = start + 1
        while i < len(argv):
            opt = argv[i]
            if opt == "--":
                i += 1
                break
            if opt.startswith("--"):
                options.append(i)
                i += 2 if opt in _SHELL_LONG_OPTIONS_WITH_VALUE else 1
                continue
            if len(opt) > 1 and opt[0] in "-+":
                options.append(i)
                letters = opt[1:]
                if opt[0] == "-" and "c" in letters:
                    takes_script = True
                if any(letter in _SHELL_OPTIONS_WITH_VALUE for letter in letters):
                    i += 1
                    if i < len(argv):
                        options.append(i)
                i += 1
                continue
            break
        if takes_script:
            yield from options
            if i < len(argv):
                yield i


def _shell_problems(task: Task, where: str) -> Iterable[tuple[str, str]]:
    if task.command is None:
        return
    for index in sorted(set(_shell_script_args(task.command))):
        if TEMPLATE_RE.search(task.command[index]):
            yield f"{where}.command[{index}]", _SHELL_HINT


# ---------------------------------------------------------------- templates
def _task_refs(
    task: Task, where: str, params: Mapping[str, str]
) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """Problems with ``task``'s templates, and its output references (field, ref, task).

    Only text holding ``{{`` is looked at (most arguments hold none).
    """
    problems: list[tuple[str, str]] = []
    refs: list[tuple[str, str, str]] = []
    fields: list[tuple[str, str]] = []
    if task.command is not None:
        fields += [
            (f"{where}.command[{i}]", arg) for i, arg in enumerate(task.command) if "{{" in arg
        ]
        if fields:
            problems += _shell_problems(task, where)
    fields += [(f"{where}.env.{key}", value) for key, value in task.env.items() if "{{" in value]
    for field, text in fields:
        for ref in template_refs(text):
            if ref in WORKFLOW_REFS:
                continue
            param = _PARAM_REF.match(ref)
            if param:
                if param.group(1) not in params:
                    problems.append(
                        (field, f"unknown parameter {param.group(1)!r} in {{{{{ref}}}}}")
                    )
                continue
            out = _TASK_OUTPUT_REF.match(ref)
            if out:
                refs.append((field, ref, out.group(1)))
                continue
            problems.append((field, f"unknown template {{{{{ref}}}}}"))
    return problems, refs


def _not_ancestor(field: str, ref: str, name: str) -> tuple[str, str]:
    return (
        field,
        f"{{{{{ref}}}}} names task {name!r}, which is not an ancestor of this task "
        "(add it to dependsOn)",
    )


class _Dag:
    """One checked task list: its topological order and each task's dependencies."""

    def __init__(self, tasks: list[Task], order: list[int], deps: list[list[int]]) -> None:
        self.tasks = tasks
        self.order = order  # indexes into tasks, dependencies first
        self.deps = deps  # per task, indexes of its distinct dependencies
        self.index = {t.name: i for i, t in enumerate(tasks)}


def _check_dag(
    tasks: list[Task], where: str, known_outside: Iterable[str]
) -> tuple[list[tuple[str, str]], _Dag | None]:
    """Names, dependencies and cycles of one task list, in O(tasks + edges)."""
    problems: list[tuple[str, str]] = []
    index: dict[str, int] = {}
    known_outside = set(known_outside)
    folded = {name.casefold(): name for name in known_outside}
    for i, task in enumerate(tasks):
        key = task.name.casefold()
        if task.name in index or task.name in known_outside:
            problems.append((f"{where}[{i}].name", f"duplicate task name {task.name!r}"))
        elif key in folded:
            problems.append(
                (
                    f"{where}[{i}].name",
                    f"duplicate task name {task.name!r}: it and {folded[key]!r} differ only "
                    "in case, and would share files on a case-insensitive file system",
                )
            )
        index.setdefault(task.name, i)
        folded.setdefault(key, task.name)
    deps: list[list[int]] = []
    for i, task in enumerate(tasks):
        distinct: dict[int, None] = {}
        for j, dep in enumerate(task.depends_on):
            if dep not in index:
                problems.append((f"{where}[{i}].dependsOn[{j}]", f"unknown task {dep!r}"))
            elif dep == task.name:
                problems.append((f"{where}[{i}].dependsOn[{j}]", "a task cannot depend on itself"))
            else:
                distinct[index[dep]] = None
        deps.append(list(distinct))
    if problems:
        return problems, None
    # Kahn's algorithm; whatever is left over sits on or downstream of a cycle.
    indegree = [len(d) for d in deps]
    children: list[list[int]] = [[] for _ in tasks]
    for i, mine in enumerate(deps):
        for parent in mine:
            children[parent].append(i)
    order = [i for i, deg in enumerate(indegree) if deg == 0]
    for i in order:
        for child in children[i]:
            indegree[child] -= 1
            if indegree[child] == 0:
                order.append(child)
    if len(order) != len(tasks):
        # Every left-over task has a left-over dependency, so following those
        # from any of them must revisit a task: the walk's loop is a cycle.
        # (Naming all left-overs would also blame tasks that merely depend on one.)
        walk = [next(i for i, deg in enumerate(indegree) if deg > 0)]
        seen: set[int] = set()
        while walk[-1] not in seen:
            seen.add(walk[-1])
            walk.append(next(d for d in deps[walk[-1]] if indegree[d] > 0))
        cycle = walk[walk.index(walk[-1]) : -1]
        names = sorted(tasks[i].name for i in cycle)
        return [
            (f"{where}[{min(cycle)}].dependsOn", f"cycle through tasks {', '.join(names)}")
        ], None
    return [], _Dag(tasks, order, deps)


def _check_ancestry(
    dag: _Dag, pending: dict[int, list[tuple[str, str, str]]]
) -> list[tuple[str, str]]:
    """Answer "is X an ancestor of T?" for every pending (T, X) in one topological pass.

    Each task carries a bitset (a Python int) over the referenced tasks only;
    a task's set is freed when its last dependant has read it.
    """
    targets: dict[int, int] = {}  # task index -> bit
    for refs in pending.values():
        for _, _, name in refs:
            target = dag.index.get(name)
            if target is not None:
                targets.setdefault(target, len(targets))
    readers = [0] * len(dag.tasks)
    for mine in dag.deps:
        for dep in mine:
            readers[dep] += 1
    live: dict[int, int] = {}
    problems: list[tuple[str, str]] = []
    for i in dag.order:
        bits = 0
        for dep in dag.deps[i]:
            bits |= live.get(dep, 0)
            if dep in targets:
                bits |= 1 << targets[dep]
            readers[dep] -= 1
            if readers[dep] == 0:
                live.pop(dep, None)
        for field, ref, name in pending.get(i, ()):
            target = dag.index.get(name)
            if target is None or not (bits >> targets[target]) & 1:
                problems.append(_not_ancestor(field, ref, name))
        if bits and readers[i]:
            live[i] = bits
    return problems


def _check_templates(
    dag: _Dag, where: str, params: Mapping[str, str], visible: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """Template problems of one task list; ``visible`` names tasks every task may read."""
    problems: list[tuple[str, str]] = []
    pending: dict[int, list[tuple[str, str, str]]] = {}
    index = dag.index
    for i, task in enumerate(dag.tasks):
        if task.command is None and not task.env:
            continue
        mine, refs = _task_refs(task, f"{where}[{i}]", params)
        problems += mine
        direct: set[int] | None = None
        for field, ref, name in refs:
            if name in visible:
                continue
            target = index.get(name)
            if target is None or target == i:
                problems.append(_not_ancestor(field, ref, name))
                continue
            if direct is None:
                direct = set(dag.deps[i])
            if target not in direct:
                pending.setdefault(i, []).append((field, ref, name))
    if pending:
        problems += _check_ancestry(dag, pending)
    return problems


def check_graph(spec: WorkflowSpec) -> list[tuple[str, str]]:
    """Graph and template problems as (field path below spec, message).

    Linear in tasks + edges (see the module docstring for the one factor).
    """
    problems, dag = _check_dag(spec.tasks, "tasks", ())
    main_names = frozenset(t.name for t in spec.tasks)
    comp_problems, comp_dag = _check_dag(spec.on_failure, "onFailure", main_names)
    problems += comp_problems
    if problems or dag is None or comp_dag is None:
        return problems
    problems += _check_templates(dag, "tasks", spec.params)
    # Compensation may read any main task's outputs: those that exist.
    problems += _check_templates(comp_dag, "onFailure", spec.params, main_names)
    return sorted(problems, key=_problem_order)


def _problem_order(problem: tuple[str, str]) -> tuple[int, int]:
    """Main tasks first, then compensation, each by position (a stable sort)."""
    match = re.match(r"(tasks|onFailure)\[(\d+)\]", problem[0])
    if match is None:
        return (2, 0)
    return (0 if match.group(1) == "tasks" else 1, int(match.group(2)))


def render(text: str, values: Mapping[str, str]) -> str:
    """Substitute templates in one argv element or env value.

    ``values`` maps a reference (``params.batch``) to its value; a reference
    missing from it raises KeyError naming the reference.
    """

    def substitute(match: re.Match[str]) -> str:
        ref = match.group(1)
        if ref not in values:
            raise KeyError(ref)
        return values[ref]

    return TEMPLATE_RE.sub(substitute, text)


def template_values(
    spec: WorkflowSpec,
    *,
    name: str,
    namespace: str,
    uid: str,
    outputs: Mapping[str, Mapping[str, str]],
) -> dict[str, str]:
    values = {"workflow.name": name, "workflow.namespace": namespace, "workflow.uid": uid}
    values.update({f"params.{k}": v for k, v in spec.params.items()})
    for task, outs in outputs.items():
        values.update({f"tasks.{task}.outputs.{k}": v for k, v in outs.items()})
    return values
