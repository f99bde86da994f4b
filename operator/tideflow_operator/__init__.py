"""The Tideflow cloud operator (import name ``tideflow_operator``).

A kopf operator that reconciles Workflow and EdgeSite custom resources and
bridges them to the sites over MQTT.  It imports ``tideflow`` and never the
edge agent.
"""
