"""A stop signal whose exception Python swallows still stops the operator's start-up.

Until kopf's own handlers are in place, the operator's start-up turns SIGTERM
into an exception (``cli.Terminated``) and SIGINT into KeyboardInterrupt, to
unwind to the Lease's release.  Where the handler runs inside an at-fork
hook, a ``__del__`` or a weakref callback, Python prints "Exception ignored
in" and drops that exception: CI met it in ``tideflow demo`` (fixed in
a06d12c).  In the operator the stop was then lost for good: the handler had
set SIGTERM to be ignored (so that a second one could not cut the release),
so the operator went on to take the Lease and act as leader, deaf to the
kubelet's SIGTERM, until its SIGKILL 30 s later left the Lease held for
another 15 s; a standby waited for a Lease it would never use, unstoppable
but by SIGKILL.

Proves, against a real API server, with the real operator command and each
signal sent from a finalizer at the moment under test (fail points
``=term-swallowed`` / ``=int-swallowed``):

* Swallowed right after the Lease was taken (``lease-acquired``), or once the
  event loop runs but before the stop is the loop's to handle
  (``operator-loop``): the operator still ends (0 for SIGTERM, 130 for
  Ctrl-C, as a stop that is not swallowed) and the Lease's holder is cleared,
  so the next operator acts within one retry.  (SIGINT at ``operator-loop``
  was already safe: asyncio's own Ctrl-C handler cancels the main task, a
  state that cannot be dropped; it is kept here as the operator now puts its
  own handler there.)
* Swallowed while a standby waits for the Lease (``lease-waiting``): the
  standby ends within its next poll, never becomes active, and the leader
  keeps the Lease.
* A second stop while the Lease is given back (``lease-releasing``, after
  kopf stopped on the first): ignored, as during start-up.  Closing kopf's
  event loop had put the default handlers back, so a second SIGTERM killed
  the operator with the Lease held and a Ctrl-C cut the release short.

Each swallow itself is asserted (the operator's log holds "Exception ignored
in"), so none of those tests can pass by the stop simply not being dropped.
"""

from __future__ import annotations

import pytest
from services.agent import wait_for
from services.world import World

pytestmark = pytest.mark.envtest

CODES = {"term": 0, "int": 130}  # as a stop at that moment that is not swallowed


@pytest.mark.parametrize("sig", ["term", "int"])
@pytest.mark.parametrize("point", ["lease-acquired", "operator-loop"])
def test_a_stop_swallowed_after_the_lease_was_taken_still_gives_it_back(
    world: World, point: str, sig: str
) -> None:
    op = world.operator(
        "--leader-election", env={"TIDEFLOW_FAILPOINTS": f"{point}={sig}-swallowed"}
    )
    identity = op.identity
    code = op.ended(30)
    log = op.log_text()
    assert "leader lease acquired" in log, log[-3000:]
    assert "Exception ignored in" in log, log[-3000:]  # the stop's exception was swallowed
    assert code is not None, f"swallowed {sig} at {point}: the operator ran on\n{log[-3000:]}"
    assert code == CODES[sig], (code, log[-3000:])
    assert not world.lease_holder().startswith(identity), (
        "the stopped operator still holds the lease"
    )
    nxt = world.operator("--leader-election")
    wait_for(lambda: "this replica is active" in nxt.log_text(), 10, "the next to take over")


@pytest.mark.parametrize("sig", ["term", "int"])
def test_a_standby_whose_stop_was_swallowed_ends_while_it_waits(world: World, sig: str) -> None:
    leader = world.operator("--leader-election")
    wait_for(lambda: "this replica is active" in leader.log_text(), 30, "the leader")
    standby = world.operator(
        "--leader-election", env={"TIDEFLOW_FAILPOINTS": f"lease-waiting={sig}-swallowed"}
    )
    code = standby.ended(20)
    log = standby.log_text()
    assert "waiting for the leader lease" in log, log[-3000:]
    assert "Exception ignored in" in log, log[-3000:]
    assert code is not None, f"swallowed {sig}: the standby waits on, deaf\n{log[-3000:]}"
    assert code == CODES[sig], (code, log[-3000:])
    assert "this replica is active" not in log
    assert world.lease_holder().startswith(leader.identity), "the leader lost its lease"


@pytest.mark.parametrize("sig", ["term", "int"])
def test_a_second_stop_while_the_lease_is_given_back_does_not_cut_it(
    world: World, sig: str
) -> None:
    op = world.operator("--leader-election", env={"TIDEFLOW_FAILPOINTS": f"lease-releasing={sig}"})
    wait_for(lambda: "this replica is active" in op.log_text(), 30, "the leader")
    identity = op.identity
    assert op.proc is not None
    op.proc.terminate()  # the first stop: kopf stops, then the Lease is given back
    code = op.ended(30)
    log = op.log_text()
    assert code == 0, (code, log[-3000:])
    assert "leader lease tideflow-operator released" in log, log[-3000:]
    assert not world.lease_holder().startswith(identity), (
        "the stopped operator still holds the lease"
    )
