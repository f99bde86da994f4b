"""Tideflow's tooling: what runs *around* the system rather than in it.

:mod:`tideflow.tools.demo` (``tideflow demo``) and
:mod:`tideflow.tools.launchers` (a local Mosquitto, a link that can be cut, a
local kube-apiserver + etcd) sit in a layer above the contract modules of
:mod:`tideflow` (spec, wire, tracing, mqtt, builder, phases, failpoints, crd)
and above both sides: they may import the contract, the contract never imports
them (``.importlinter`` enforces it in ``.ci/run``), and they drive the
operator and the agent as subprocesses, never by importing them.  What only
they need comes with the ``demo`` extra (``pip install 'tideflow[demo]'``), and
``tideflow/cli.py`` imports them only when ``tideflow demo`` runs.  See
``docs/decisions/0009-tooling-layer.md`` for why they live here.
"""

__all__ = ["DEMO_EXTRA_HINT"]

# What installs the tooling's own dependencies (in a source checkout: pip install -e '.[demo]').
DEMO_EXTRA_HINT = "pip install 'tideflow[demo]'"
