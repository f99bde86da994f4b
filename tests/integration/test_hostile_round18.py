"""What the round-17 hostile pass left, each reproduced with real processes first.

* an agent stopped (SIGTERM) while clients held connections to its metrics
  port, silent, mid-request: its event loop's end cancelled their handlers,
  and Python 3.11's stream server logged each as an ``ERROR`` with a
  traceback, a clean stop reported as up to 32 errors; and so did every
  connection accepted in the last turns of the loop before the close, under a
  flood of connections at the stop;
* an agent restarted with its metrics port taken (the old agent still on it,
  another process), its broker password file missing (a Secret not mounted
  yet) or a CA file with no certificate resumed its runs first, then died of
  it with a traceback, the store closed under the runs' drivers; for the
  port it logged that its sound database "is corrupt ... restore it from a
  backup or move it aside";
* a request whose lines end in a bare LF (``printf ... | nc``, HTTP/1.0
  tools; ``prometheus_client``'s server answered it) went unanswered;
* a read of the database in flight when the store closed was reported so
  ("is corrupt ..."): the store is closed, nothing is wrong with the file;
* a task that named one of its attempts with a number past SQLite's INTEGER
  (a line of its run's starts file, ``TIDEFLOW_ATTEMPT_ID`` in a process it
  left, the attempt recorded on its cgroup slot) and then killed its agent
  stopped every restarted agent with an ``OverflowError``: the run never
  resumed;
* ``run-local`` whose output's reader went away (``| head``) logged every
  later progress line as an error with a traceback, and ended a run that
  succeeded with one more and exit 1;
* the readers (``status``, ``runs``, ``logs``, ``trace``) whose output's reader
  went away ended with a traceback and exit 1;
* an agent killed as its last run ended left its free slot, its cgroup root
  and the run's workspace; the next one, with nothing to run, looked for them
  only when a run of its own started, so an idle site kept them through any
  number of restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from services.agent import AgentProcess, until_the_cloud_holds_the_sites_truth, wait_for
from services.broker import Mosquitto
from services.metrics import metered_agent
from services.tiers import machine_lacks
from test_agent_liveness import raw, served_on_a_loop_of_its_own
from test_hostile_agent import (
    AGENT,
    agent_env,
    db_tasks,
    explain,
    manifest,
    require_unshare,
    without_cgroups,
)
from test_hostile_round16 import (  # noqa: F401 (agent_cgroups: the fixture)
    agent_cgroups,
    cgroup2_mount,
    restarted_after_attempt_1_kills_the_agent,
)
from test_stop_between_steps import start_daemon_run

from edge_agent import metrics as agent_metrics
from edge_agent.metrics import AgentMetrics
from edge_agent.runner import CgroupScope, agent_mark
from edge_agent.store import Store, StoreError


def test_a_stop_with_connections_open_on_the_metrics_port_logs_no_error(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    agent, port = metered_agent("quiet", mosquitto.url, tmp_path / "a.db")
    held: list[socket.socket] = []
    try:
        for _ in range(5):  # mid-request, silent
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metr")
            held.append(sock)
        for _ in range(3):  # half-closed after a whole request: answered
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            held.append(sock)
        time.sleep(0.3)  # every connection is with its handler
        assert agent.proc is not None
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(10) == 0, agent.log_tail()
        assert time.monotonic() - started < 3  # not held by the silent ones (5 s each)
        log = agent.log_path.read_text()
        assert "ERROR" not in log and "Traceback" not in log, agent.log_tail(60)
        for sock in held[:5]:  # closed by the agent, unanswered
            sock.settimeout(2)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
        for sock in held[5:]:
            sock.settimeout(2)
            assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")
    finally:
        for sock in held:
            sock.close()
        agent.kill()


def _port_taken(tmp: Path, held: list[socket.socket]) -> tuple[list[str], str]:
    taken = socket.socket()
    held.append(taken)
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    port = taken.getsockname()[1]
    return ["--metrics-port", str(port)], f"--metrics-port {port}: cannot listen: "


def _no_password_file(tmp: Path, held: list[socket.socket]) -> tuple[list[str], str]:
    return ["--username", "site", "--password-file", str(tmp / "nowhere")], "--password-file"


def _password_file_not_utf8(tmp: Path, held: list[socket.socket]) -> tuple[list[str], str]:
    (tmp / "password").write_bytes(b"\xff\xfe secret\n")
    return ["--username", "site", "--password-file", str(tmp / "password")], "--password-file"


def _ca_no_certificate(tmp: Path, held: list[socket.socket]) -> tuple[list[str], str]:
    (tmp / "ca.pem").write_text("not a certificate\n")
    return ["--tls-ca", str(tmp / "ca.pem")], "--tls-ca"


@pytest.mark.parametrize(
    "unusable", [_port_taken, _no_password_file, _password_file_not_utf8, _ca_no_certificate]
)
async def test_an_agent_it_cannot_start_as_configured_starts_nothing_and_says_so(
    mosquitto: Mosquitto, tmp_path: Path, unusable: Any
) -> None:
    """A metrics port taken, a password file missing (a Secret not mounted yet), a CA
    file that holds no certificate: the agent resumed its runs (their drivers racing
    to start their tasks), then died of it with a traceback, the store closed under
    the drivers."""
    journal = tmp_path / "journal"
    body = {
        "tasks": [{"name": "a", "script": f'echo "start $TIDEFLOW_ATTEMPT" >> {journal}; sleep 1'}]
    }
    bridge, agent = await start_daemon_run(mosquitto, tmp_path, "", body)
    held: list[socket.socket] = []
    try:
        assert await asyncio.to_thread(wait_for, journal.exists, 20, "a started")
        agent.kill()  # a run to resume, its task to run again
        extra, said = unusable(tmp_path, held)
        again = AgentProcess(agent.site, mosquitto.url, agent.db, *extra)
        again.start()
        assert again.proc is not None
        assert await asyncio.to_thread(again.proc.wait, 20) == 1
        log = again.log_tail(200)
        assert "Traceback" not in log and "corrupt" not in log, log
        assert f"tideflow-agent: {said}" in log, log
        time.sleep(0.2)
        assert journal.read_text().split() == ["start", "1"], "an attempt started: " + log
        for sock in held:
            sock.close()
        agent.start()  # as configured before: it resumes the run
        await until_the_cloud_holds_the_sites_truth(bridge, agent, agent.site)
        assert journal.read_text().split() == ["start", "1", "start", "2"]
    finally:
        for sock in held:
            sock.close()
        agent.kill()
        await bridge.stop()


async def test_a_read_in_flight_when_the_store_closes_is_no_corruption(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "a.db")
    reading = asyncio.ensure_future(store.list_runs(unfinished=True))
    await store.close()
    with pytest.raises(StoreError) as raised:
        await reading
    assert "corrupt" not in str(raised.value) and "closed" in str(raised.value), raised.value


# A task's way to name one of its attempts with a number no attempt reaches (SQLite's
# INTEGER holds at most 2**63 - 1): its run's starts file, the attempt id in a
# process's environment, the attempt recorded on its cgroup slot.
HUGE = "9" * 20
FORGED_STARTS = f"echo 'k {HUGE}' >> .tideflow/starts"
FORGED_ENVIRONMENT = (
    f'TIDEFLOW_ATTEMPT_ID="${{TIDEFLOW_ATTEMPT_ID%/*}}/{HUGE}" setsid sleep 300 > /dev/null 2>&1 &'
    " sleep 0.2"
)
FORGED_SLOT_RECORD = (
    'slot="$CGROUP2$(sed -n "s/^0:://p" /proc/self/cgroup)";'
    f" {sys.executable} -c \"import os, sys; os.setxattr(sys.argv[1], 'user.tideflow.attempt',"
    f' sys.argv[2].encode())" "$slot" "${{TIDEFLOW_ATTEMPT_ID%/*}}/{HUGE}"'
)


def test_an_attempt_number_too_large_to_store_in_the_starts_file_does_not_stop_the_agent(
    tmp_path: Path,
) -> None:
    restarted_after_attempt_1_kills_the_agent(tmp_path, FORGED_STARTS)


def test_an_attempt_number_too_large_to_store_in_an_environment_does_not_stop_the_agent(
    tmp_path: Path,
) -> None:
    """Without cgroups (with them the process dies with its slot before the
    environments are read): found by its environment alone."""
    require_unshare(tmp_path)
    script = f'if [ "$TIDEFLOW_ATTEMPT" = 1 ]; then {FORGED_ENVIRONMENT}; kill -9 "$PPID"; fi'
    path = manifest(tmp_path / "wf.yaml", [{"name": "k", "script": script}])
    db = tmp_path / "s.db"
    argv = without_cgroups(AGENT, "run-local", str(path), "--db", str(db), "--quiet")
    first = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=agent_env())
    assert first.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), explain(first)
    second = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=agent_env())
    assert second.returncode == 0, explain(second)
    phase, attempt, _ = db_tasks(db)["k"]
    assert (phase, attempt) == ("Succeeded", 2)


def test_an_attempt_number_too_large_to_store_on_a_slot_does_not_stop_the_restarted_agent(
    tmp_path: Path,
    agent_cgroups: Path,  # noqa: F811 (the fixture imported above)
) -> None:
    restarted_after_attempt_1_kills_the_agent(
        tmp_path, FORGED_SLOT_RECORD.replace("$CGROUP2", cgroup2_mount())
    )


def test_run_local_whose_reader_went_away_finishes_its_run_and_says_how_it_ended(
    tmp_path: Path,
) -> None:
    """``tideflow-agent run-local wf.yaml | head -n 1``: every later progress line was
    an ERROR with a traceback, and the summary's print ended the agent with one
    more and exit 1, for a run that succeeded."""
    tasks = [
        {"name": "a", "script": "sleep 0.2"},
        {"name": "b", "dependsOn": ["a"], "script": "sleep 0.2"},
    ]
    path = manifest(tmp_path / "wf.yaml", tasks)
    db = tmp_path / "s.db"
    argv = [AGENT, "run-local", str(path), "--db", str(db)]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=agent_env(), cwd=tmp_path
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline()  # the reader takes one line, then goes
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(30)
    assert code == 0, err
    assert "Traceback" not in err and "ERROR" not in err, err
    assert {task: row[0] for task, row in db_tasks(db).items()} == {
        "a": "Succeeded",
        "b": "Succeeded",
    }


@pytest.mark.parametrize(
    "command",
    [["status"], ["runs"], ["logs", "wf", "a"], ["trace", "wf"]],
    ids=lambda c: c[0],
)
def test_a_reader_whose_output_goes_nowhere_ends_quietly(
    tmp_path: Path, command: list[str]
) -> None:
    """``tideflow-agent logs wf a | head -n 1`` with the reader gone before the
    first line: a traceback (BrokenPipeError) and exit 1; now as a tool killed by
    SIGPIPE, silent, 141."""
    path = manifest(tmp_path / "wf.yaml", [{"name": "a", "script": "seq 1 20000"}])
    db = tmp_path / "s.db"
    done = subprocess.run(
        [AGENT, "run-local", str(path), "--db", str(db), "--quiet"],
        capture_output=True, text=True, timeout=60, env=agent_env(),
    )  # fmt: skip
    assert done.returncode == 0, explain(done)
    read, write = os.pipe()
    os.close(read)  # the reader went away before the first line
    try:
        ended = subprocess.run(
            [AGENT, *command, "--db", str(db)], stdout=write, stderr=subprocess.PIPE,
            text=True, timeout=60, env=agent_env(),
        )  # fmt: skip
    finally:
        os.close(write)
    assert "Traceback" not in ended.stderr and "Exception ignored" not in ended.stderr, ended.stderr
    assert ended.returncode == 128 + signal.SIGPIPE, ended.stderr


def test_connections_arriving_as_the_metrics_port_closes_log_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connections accepted in the last turns before the close were handed to their
    handlers only after it, and the loop's end cancelled those handlers before their
    first step: the same ``ERROR`` and traceback each, under a flood at the stop."""

    async def flooded_then_closed() -> None:
        server = await AgentMetrics().serve(0, "127.0.0.1")
        port = server.port
        stop = threading.Event()
        opened: list[socket.socket] = []

        def flood() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    sock = socket.create_connection(("127.0.0.1", port), timeout=1)
                    sock.sendall(b"GET /metr")
                    opened.append(sock)

        flooding = threading.Thread(target=flood)
        flooding.start()
        try:
            await asyncio.sleep(0.02)
            await server.close()
        finally:
            stop.set()
            flooding.join()
            for sock in opened:
                sock.close()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(20):
            asyncio.run(flooded_then_closed())
    assert not caplog.records, caplog.records[0].getMessage()


def test_a_request_whose_lines_end_in_a_bare_lf_is_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``printf 'GET /healthz HTTP/1.0\\n\\n' | nc host 9464`` (a probe script, an
    HTTP/1.0 tool): RFC 9112 lets a server take a bare LF as a line's end, and
    ``prometheus_client``'s server, before decision 0045, did; this one waited for
    a CRLF CRLF that never came, and closed the connection unanswered."""
    monkeypatch.setattr(agent_metrics, "REQUEST_SECONDS", 0.5)
    with served_on_a_loop_of_its_own() as (_, port):
        answer = raw(port, b"GET /healthz HTTP/1.0\nHost: x\n\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\nok\n"), answer
        openmetrics = raw(port, b"GET /metrics HTTP/1.0\nAccept: application/openmetrics-text\n\n")
        assert b"application/openmetrics-text" in openmetrics, openmetrics[:200]
        # Still bounded: a head over the bound in many short lines goes unanswered.
        assert raw(port, b"GET /healthz HTTP/1.1\n" + b"X: y\n" * 3000 + b"\n") == b""
        assert raw(port, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 OK")
        # An empty line before the request line is skipped (RFC 9112, 2.2).
        assert raw(port, b"\r\nGET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 OK")


async def test_an_agent_restarted_idle_removes_what_the_killed_one_left(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Killed as its last run ended (its free slot, its cgroup root and the run's
    workspace left), then restarted with nothing to run and stopped: the next agent
    looked for what an earlier one left only when a run of its own started, so an
    idle site kept them, through any number of restarts, until its next
    assignment."""
    work = tmp_path / "a.db.work"  # (start_daemon_run's database is a.db)
    scope = CgroupScope.detect(agent_mark(work))
    if scope is None or scope.home is None or not scope.slots:
        machine_lacks("a writable cgroup v2 subtree with user xattrs")
    body = {"tasks": [{"name": "a", "script": "mkdir -p d && echo x > d/f"}]}
    bridge, agent = await start_daemon_run(mosquitto, tmp_path, "run-finished", body)
    try:
        assert agent.proc is not None
        await asyncio.to_thread(agent.proc.wait, 30)
        assert agent.proc.returncode == -signal.SIGKILL, agent.log_tail()
        assert scope.root.exists() and list(work.iterdir()), "nothing left to remove"
        agent.start()  # nothing to run
        assert await asyncio.to_thread(
            wait_for, lambda: agent.log_path.read_text().count("link up") == 2, 20, "up again"
        )
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(agent.proc.wait, 20) == 0, agent.log_tail()
        assert not scope.root.exists(), [p.name for p in scope.root.iterdir() if p.is_dir()]
        assert list(work.iterdir()) == []
    finally:
        agent.kill()
        await bridge.stop()
        if scope.root.exists():
            for slot in (p for p in scope.root.iterdir() if p.is_dir()):
                scope.destroy(slot)
            with contextlib.suppress(OSError):
                scope.root.rmdir()
