"""Tideflow's shared contract: what the cloud operator and the edge agent agree on.

``spec`` is the Workflow model and its validation, ``wire`` the MQTT topics and
messages, ``tracing`` the trace-context helpers.  This package imports neither
``edge_agent`` nor ``tideflow_operator``.
"""

__version__ = "0.1.0"
