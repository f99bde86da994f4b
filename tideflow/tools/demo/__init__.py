"""``tideflow demo``: the whole story in one command.

A workflow applied with ``kubectl`` runs at each of two sites.  Site B loses
its link mid-run, its agent is killed with ``kill -9`` and restarted while
still offline, and it keeps going; when the link returns, everything —
results and traces — lands in the cloud exactly once.  Step by step:

1. **A Kubernetes API.**  The current kubeconfig context if it answers within
   a few seconds; else kube-apiserver + etcd from ``$KUBEBUILDER_ASSETS``,
   started on loopback (:class:`tideflow.tools.launchers.cluster.EnvtestCluster`); else one
   paragraph on how to get kind, k3d or envtest binaries, and the edge-only
   half of the story (``python -m edge_agent.demo``: one site, no cloud, its
   agent killed mid-run).  ``--cluster current|envtest`` insists on one.
2. **A broker.**  Mosquitto from ``PATH`` on a free loopback port.
3. The CRDs (rendered by :func:`tideflow.crd.render_crds`, so they match this
   version) and the namespace ``tideflow-demo``; the operator
   (``python -m tideflow_operator.cli run``) and two agents
   (``python -m edge_agent.cli run --site site-a|site-b``) as local processes.
   Agent B reaches the broker through a :class:`tideflow.tools.launchers.link.LinkProxy`,
   so its link can be cut for real: the TCP connections go away.
4. ``examples/demo-site-a.yaml`` and ``examples/demo-site-b.yaml`` are applied
   (their ``data_dir`` pointed at the demo's directory).  They ship inside this
   package (``manifests/``, read with ``importlib.resources``; the files under
   ``examples/`` link there), so an installed wheel runs the demo from any
   directory.
5. After B's first task, B's link is cut.  While B's ``aggregate`` task runs,
   agent B is killed with SIGKILL (its process group), and started again on
   the same database while still offline.  It resumes — the interrupted
   attempt runs again, an interruption that uses no retry — and finishes the
   run with no cloud.
6. The link is restored; the demo waits until the cloud has applied every
   record, then prints ``kubectl get twf -A``, the span tree of site B's run
   (``tideflow-agent trace``) and a one-line verdict:

   * **every task once** — per site, each task wrote exactly one journal line,
     from the attempt that committed Succeeded, and the agent recorded exactly
     one successful attempt (span) per task; at site B every task that had
     committed before the kill kept its attempt number;
   * **every record applied once** — the EdgeSite's ``lastAckedSeq`` equals the
     agent's last outbox ``seq``, the outbox is empty, and the Workflow status
     (phase; per task phase, attempt, outputs) equals the agent's database.

Live progress: a table that updates in place on a terminal (plain lines
otherwise): per workflow the phase and progress the cloud shows, what the site
itself has done, and whether the site is connected; per site its agent, its
link, its outbox depth and the last sequence number the cloud acknowledged.
The cloud is read through the Kubernetes API; each site through its agent's
SQLite database, opened read-only (as ``tideflow-agent status`` does) — the
demo's independent witness, which is why it does not ask the agents.

Processes: everything the demo starts runs in a session of its own (Ctrl-C
reaches only the demo, which stops them in order) and is stopped if the demo
itself dies (``PR_SET_PDEATHSIG``: SIGTERM for the agents, the operator and
the edge story, SIGKILL for the broker and the API server).  The demo is a
child subreaper, so the task processes that an agent killed with ``kill -9``
leaves behind come back to it.
Ctrl-C, SIGTERM or SIGHUP at any point stops everything it started (the
``finally`` clause, and an ``atexit`` hook as a second net) and nothing is left
running.  Run against your own cluster, it deletes its Workflows and EdgeSites
again (the CRDs stay).

``--ci``: plain output, a time budget (it fails rather than run past about
three minutes), exit 1 unless the verdict is OK.  Exit codes: 0 the verdict
is OK, 1 it is not or a step failed (the work directory is kept, its path
printed), 130 interrupted.

The parts: :mod:`.story` (the steps and the clean-up), :mod:`.processes`
(process supervision), :mod:`.board` (the live table), :mod:`.truth` (the
site databases read as a witness), :mod:`.verdict`, :mod:`.cloud` (kubectl and
the API client).  This module holds only the command's options, so building
``tideflow``'s argument parser imports none of them: the story (and with it the
launchers and ``cryptography``, the ``demo`` extra) is imported when it runs.

Nothing here imports ``edge_agent`` or ``tideflow_operator``: the demo drives
them as subprocesses, as a user would.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

__all__ = ["add_arguments", "main", "run_demo"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tideflow demo`` (``--ci``, ``--cluster``, ``--keep``)."""
    parser.add_argument(
        "--ci",
        action="store_true",
        help="non-interactive: plain output, a time budget, exit 1 unless the verdict is OK",
    )
    parser.add_argument(
        "--cluster",
        choices=["auto", "current", "envtest"],
        default="auto",
        help="the Kubernetes API: auto (the current kubeconfig context if it answers, "
        "else envtest binaries), current, or envtest (never touch your own cluster)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, site databases)"
    )


def run_demo(
    *, ci: bool = False, cluster: str = "auto", keep: bool = False, out: TextIO | None = None
) -> int:
    """Run the story; the exit code (0 the verdict is OK)."""
    from tideflow.tools.demo.story import Demo  # the launchers come with it: only now

    return Demo(ci=ci, cluster=cluster, keep=keep, out=out or sys.stdout).run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tideflow demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_demo(ci=args.ci, cluster=args.cluster, keep=args.keep)
