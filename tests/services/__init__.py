"""Real services the tests start and stop themselves (Mosquitto, ...).

Tideflow's guarantees are about what happens when the link or the broker goes
away, so tests run against the real programs rather than fakes: a fake broker
would agree with whatever the code under test assumes about persistence,
queueing and ACLs.  Import from here as ``services.broker`` (pytest puts
``tests/`` on ``sys.path``).
"""
