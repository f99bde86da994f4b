"""SIGHUP stops the operator cleanly and gives the Lease back, as SIGTERM does.

A terminal closed, an ssh session dropped (``tideflow-operator run`` started by
hand), or a stop that signals every process with SIGHUP too (systemd's
``SendSIGHUP``): its default action killed the operator (exit -1) with the
Lease held, so the standby waited out the Lease's 15 s.  The agent treats
SIGHUP as a clean stop (:mod:`edge_agent.stops`) unless it was ignored when it
started (``nohup``); the operator now does the same.

Proves, with the real operator command against a real API server:

* the leader, kopf running, a standby waiting: SIGHUP ends it with 0, the
  Lease's holder is cleared, and the standby acts within one retry;
* a standby waiting for the Lease: SIGHUP ends it with 0, it never acts, and
  the leader keeps the Lease;
* during start-up, right after the Lease was taken (fail point
  ``lease-acquired=hup``): 0 and the Lease given back;
* started with SIGHUP ignored (``nohup``): a SIGHUP changes nothing, the
  operator stays active (and SIGTERM still stops it with 0).
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from services.agent import wait_for
from services.world import OperatorProcess, World

pytestmark = pytest.mark.envtest


def _hang_up(op: OperatorProcess, seconds: float = 30) -> int | None:
    assert op.proc is not None
    op.proc.send_signal(signal.SIGHUP)
    try:
        return op.proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


def test_a_leader_hung_up_gives_the_lease_back_and_the_standby_acts(world: World) -> None:
    leader = world.operator("--leader-election")
    wait_for(lambda: "this replica is active" in leader.log_text(), 30, "the leader")
    standby = world.operator("--leader-election")
    wait_for(lambda: "waiting for the leader lease" in standby.log_text(), 30, "the standby")
    identity = leader.identity
    assert world.lease_holder().startswith(identity)
    code = _hang_up(leader)
    log = leader.log_text()
    assert code == 0, (code, log[-3000:])
    assert "leader lease tideflow-operator released" in log, log[-3000:]
    assert not world.lease_holder().startswith(identity), "the hung-up leader still holds the lease"
    wait_for(lambda: "this replica is active" in standby.log_text(), 10, "the standby to act")


def test_a_standby_hung_up_ends_and_the_leader_keeps_the_lease(world: World) -> None:
    leader = world.operator("--leader-election")
    wait_for(lambda: "this replica is active" in leader.log_text(), 30, "the leader")
    standby = world.operator("--leader-election")
    wait_for(lambda: "waiting for the leader lease" in standby.log_text(), 30, "the standby")
    code = _hang_up(standby, 20)
    log = standby.log_text()
    assert code == 0, (code, log[-3000:])
    assert "this replica is active" not in log
    assert world.lease_holder().startswith(leader.identity), "the leader lost its lease"
    assert leader.alive


def test_a_hang_up_right_after_the_lease_was_taken_gives_it_back(world: World) -> None:
    op = world.operator("--leader-election", env={"TIDEFLOW_FAILPOINTS": "lease-acquired=hup"})
    identity = op.identity
    assert op.proc is not None
    try:
        code = op.proc.wait(30)
    except subprocess.TimeoutExpired:
        code = None
    log = op.log_text()
    assert "leader lease acquired" in log, log[-3000:]
    assert code == 0, (code, log[-3000:])
    assert "stopped by SIGHUP while starting" in log, log[-3000:]
    assert not world.lease_holder().startswith(identity), (
        "the stopped operator still holds the lease"
    )
    nxt = world.operator("--leader-election")
    wait_for(lambda: "this replica is active" in nxt.log_text(), 10, "the next to take over")


def test_an_operator_started_with_sighup_ignored_runs_on(world: World) -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup: inherited through exec
    try:
        op = world.operator("--leader-election")
    finally:
        signal.signal(signal.SIGHUP, previous)
    wait_for(lambda: "this replica is active" in op.log_text(), 30, "the leader")
    assert op.proc is not None
    op.proc.send_signal(signal.SIGHUP)
    time.sleep(3)
    assert op.alive, op.log_text()[-3000:]
    assert world.lease_holder().startswith(op.identity)
    op.proc.terminate()
    assert op.proc.wait(30) == 0, op.log_text()[-3000:]
