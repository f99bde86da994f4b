"""See the fleet from the cloud: ``tideflow get / watch / submit / list / sites / logs`` and
``tideflow console``.

Why it exists: a run's truth reaches the cloud as the ``.status`` the operator
writes on Workflow, EdgeSite and CronWorkflow objects; ``kubectl get`` shows a
phase and ``n/m``.  These commands read those objects with the current
kubeconfig context and show, at a glance, which sites are dark and, for one
run, its DAG with every task's state.

How it fits (decision 0011): tooling above both sides, like the demo.  It
reads Kubernetes through the ``kubernetes`` client (read-only; ``submit`` is
the one command that creates objects, as ``kubectl apply`` would), never the
operator's or the agent's modules, and only what the operator *writes* into
``.status``.  Pieces:

* :mod:`.views` -- pure functions from objects to rows (DAG order, durations,
  dark sites first), shared by the CLI and the console;
* :mod:`.api` -- the Kubernetes reads and their clear errors;
* :mod:`.commands` -- the CLI's handlers and their output (rich tables on a
  terminal, plain text otherwise, ``-o json`` everywhere);
* :mod:`.console` -- the read-only web console (aiohttp, one shared watch per
  kind, server-sent events).

``tideflow/cli.py`` declares the commands' options itself and imports this
package only when one of them runs, so ``tideflow render`` loads none of it.
"""
