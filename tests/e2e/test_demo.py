"""``tideflow demo``: the README's main command, run the way a user runs it.

Proves: ``tideflow demo --ci`` tells the whole story against envtest binaries
it starts itself — and against the current kubeconfig context when one
answers — within its three-minute budget, and asserts its own verdict (every
task once, every record applied once); Ctrl-C in the middle of the story,
after site B's agent was killed with ``kill -9`` (so its task processes are
orphans), stops every process the demo started, down to those orphans, and
removes its directory; with neither a cluster nor envtest binaries it says how
to get one and tells the edge-only half of the story; and the link cut is a
real one: open connections drop, new ones get nothing until the link returns.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from services import kube
from services.broker import INSTALL_HINT, LinkProxy, find_mosquitto
from services.process_tree import descendants, mentioning, output_lines, still_alive

REPO = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "tideflow.cli", "demo"]
BUDGET = 180


def _require_services() -> None:
    reason = kube.missing_reason()
    if reason:
        pytest.skip(reason)
    if find_mosquitto() is None:
        pytest.skip(f"mosquitto binary not found; {INSTALL_HINT}")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No kubeconfig of the machine's (unless given); temp files inside the test's folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
    env["KUBECONFIG"] = str(tmp_path / "no-kubeconfig")
    env["TMPDIR"] = str(tmp_path)
    env.update(extra)
    return env


def _run(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEMO, *args],
        capture_output=True,
        text=True,
        timeout=BUDGET,
        cwd=tmp_path,
        env=env,
        check=False,
    )


def _verdict(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("verdict: ")]
    assert len(lines) == 1, output[-6000:]
    return lines[0]


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-8000:]}"
        f"\n--- stderr\n{result.stderr[-4000:]}"
    )


@pytest.mark.envtest
@pytest.mark.broker
@pytest.mark.timeout(BUDGET + 30)
def test_demo_ci_tells_the_whole_story_and_asserts_its_verdict(tmp_path: Path) -> None:
    _require_services()
    started = time.monotonic()
    result = _run(tmp_path, "--ci", env=_env(tmp_path))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, _explain(result)
    assert elapsed < BUDGET
    out = result.stdout
    verdict = _verdict(out)
    assert verdict.startswith("verdict: OK — every task ran once (14 tasks at 2 sites"), verdict
    assert "every record applied once" in verdict
    assert "starting kube-apiserver + etcd" in out
    # The story, in order.
    story = [
        "applied the CRDs",
        "kubectl apply -f examples/demo-site-a.yaml",
        "cut site-b's link",
        "the cloud sees site-b offline",
        "kill -9 the agent of site-b",
        "again, still offline, on the same database",
        "on site, offline: tideflow-agent status",
        "site-b finished offline: Succeeded 8/8 at the site",
        "restored site-b's link",
        "=== kubectl get twf -A",
        "=== site-b's run, span by span",
        "verdict: OK",
    ]
    positions = [out.find(marker) for marker in story]
    assert all(p >= 0 for p in positions), dict(zip(story, positions, strict=True))
    assert positions == sorted(positions), dict(zip(story, positions, strict=True))
    # kubectl get twf -A: both Succeeded, both sites connected again.
    table = out[out.index("=== kubectl get twf -A") :].splitlines()[1:4]
    assert table[0].split() == [
        "NAMESPACE", "NAME", "PHASE", "SITE", "PROGRESS", "CONNECTED", "AGE",
    ]  # fmt: skip
    assert table[1].split()[:6] == [
        "tideflow-demo", "etl-site-a", "Succeeded", "site-a", "6/6", "true",
    ]  # fmt: skip
    assert table[2].split()[:6] == [
        "tideflow-demo", "etl-site-b", "Succeeded", "site-b", "8/8", "true",
    ]  # fmt: skip
    # The span tree: the interrupted attempt of aggregate, then the one that succeeded.
    tree = out[out.index("=== site-b's run, span by span") : out.index("verdict: ")]
    aggregate = [line.split() for line in tree.splitlines() if "task aggregate" in line]
    assert [a[3:] for a in aggregate] == [["Interrupted", "[interrupted]"], ["Succeeded"]], tree
    # Plain lines (not a terminal): no cursor movement; nothing left in the temp folder.
    assert "\x1b[" not in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tideflow-")]


@pytest.mark.envtest
@pytest.mark.broker
@pytest.mark.timeout(BUDGET + 30)
def test_ctrl_c_mid_story_leaves_no_process_behind(tmp_path: Path) -> None:
    _require_services()
    demo = subprocess.Popen(
        [*DEMO, "--ci"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=_env(tmp_path),
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )
    lines = output_lines(demo)
    output: list[str] = []
    seen: dict[int, tuple[float, str]] = {}
    deadline = time.monotonic() + BUDGET
    try:
        while True:
            seen.update(descendants(demo.pid))
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                assert time.monotonic() < deadline, "".join(output)
                continue
            assert line is not None, "the demo ended before the kill:\n" + "".join(output)
            output.append(line)
            if "kill -9 the agent of site-b" in line:
                break
        seen.update(descendants(demo.pid))
        # Site B's agent is dead; its task is an orphan, adopted by the demo (a subreaper).
        assert any("sleep 9" in cmdline for _, cmdline in seen.values()), seen
        assert any("kube-apiserver" in cmdline for _, cmdline in seen.values()), seen
        os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
        code = demo.wait(60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
    while (line := lines.get(timeout=10)) is not None:
        output.append(line)
    text = "".join(output)
    assert code == 130, text
    assert "interrupted: stopping everything the demo started" in text
    assert still_alive(seen) == [], text
    assert mentioning(str(tmp_path)) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tideflow-")]


@pytest.mark.broker
@pytest.mark.timeout(BUDGET + 30)
def test_demo_uses_the_current_kubeconfig_context_and_cleans_up_after_itself(
    tmp_path: Path, envtest: Any
) -> None:
    if find_mosquitto() is None:
        pytest.skip(f"mosquitto binary not found; {INSTALL_HINT}")
    env = _env(tmp_path, KUBECONFIG=str(envtest.kubeconfig))
    result = _run(tmp_path, "--ci", "--cluster", "current", env=env)
    assert result.returncode == 0, _explain(result)
    assert "Kubernetes: your current kubeconfig context envtest" in result.stdout
    assert "starting kube-apiserver" not in result.stdout
    assert _verdict(result.stdout).startswith("verdict: OK"), result.stdout[-4000:]
    # Its Workflows and the EdgeSites it registered are gone again; the CRDs stay.
    left = envtest.kubectl("get", "twf", "-n", "tideflow-demo", "-o", "json").stdout
    assert json.loads(left)["items"] == []
    sites = json.loads(envtest.kubectl("get", "edgesites", "-o", "json").stdout)["items"]
    assert not {"site-a", "site-b"} & {s["metadata"]["name"] for s in sites}


@pytest.mark.timeout(120)
def test_without_a_cluster_it_says_how_to_get_one_and_tells_the_edge_story(
    tmp_path: Path,
) -> None:
    env = _env(tmp_path, KUBEBUILDER_ASSETS=str(tmp_path / "no-assets"))
    result = _run(tmp_path, "--ci", env=env)
    assert result.returncode == 0, _explain(result)
    out = " ".join(result.stdout.split())
    assert "kube-apiserver not found" in out
    for hint in (
        "kind create cluster",
        "k3d cluster create",
        "setup-envtest",
        "KUBEBUILDER_ASSETS",
    ):
        assert hint in out, result.stdout
    assert "=== verdict: OK" in result.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tideflow-")]


def test_the_link_proxy_cuts_for_real_and_delivers_held_bytes_on_restore() -> None:
    """The demo's link cut: open connections drop, new ones are held, restore delivers."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def echo() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue

            def serve(c: socket.socket) -> None:
                with c:
                    while data := c.recv(1024):
                        c.sendall(data)

            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=echo, daemon=True).start()
    try:
        with LinkProxy("127.0.0.1", server.getsockname()[1]) as proxy:
            first = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            first.sendall(b"up")
            assert first.recv(16) == b"up"
            proxy.cut()
            assert first.recv(16) == b""  # the open connection is gone
            held = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            held.sendall(b"queued")
            held.settimeout(0.5)
            with pytest.raises(TimeoutError):
                held.recv(16)  # nothing passes while the link is cut
            assert not proxy.up and proxy.connections == 1
            proxy.restore()
            held.settimeout(5)
            assert held.recv(16) == b"queued"
            held.sendall(b"again")
            assert held.recv(16) == b"again"
            first.close()
            held.close()
    finally:
        stop.set()
        server.close()


@pytest.mark.envtest
@pytest.mark.broker
@pytest.mark.timeout(BUDGET + 30)
def test_kill_minus_nine_of_the_demo_stops_its_agents_tasks(tmp_path: Path) -> None:
    """``kill -9`` of the demo itself (nothing of it runs again): its agents got SIGKILL
    at its death (``PR_SET_PDEATHSIG``) and their task processes, which outlive an
    agent's SIGKILL by design, ran on, orphans of init, in a directory nobody would
    remove (site B's ``aggregate`` for 9 s).  Now the agents and the operator get
    SIGTERM at the demo's death: a stop, which ends an agent's attempts.  The work
    directory stayed too; its janitor now removes it once nothing uses it."""
    _require_services()
    demo = subprocess.Popen(
        [*DEMO, "--ci"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        env=_env(tmp_path),
        start_new_session=True,
    )
    seen: dict[int, tuple[float, str]] = {}
    deadline = time.monotonic() + BUDGET
    try:
        while not any("sleep 9" in cmdline for _, cmdline in seen.values()):
            assert demo.poll() is None, "the demo ended before site-b's aggregate ran"
            assert time.monotonic() < deadline
            seen.update(descendants(demo.pid))
            time.sleep(0.05)
        seen.update(descendants(demo.pid))
        os.kill(demo.pid, signal.SIGKILL)  # (the demo kills site-b's agent 1 s into it)
        demo.wait(10)
        time.sleep(4)  # an agent stops its attempts at once; the task sleeps 9 s
        tasks = [c for _, c in seen.values() if "sleep" in c]
        assert [a for a in still_alive(seen) if "sleep" in a] == [], tasks
        wait_until = time.monotonic() + 20
        while still_alive(seen) and time.monotonic() < wait_until:
            time.sleep(0.2)
        assert still_alive(seen) == []
        # Its work directory (databases, logs, etcd's data) too: its janitor removed it;
        # and nothing else of it is left in TMPDIR (the API client's copies of the
        # kubeconfig's client key and certificates, removed only at a clean exit).
        removed_by = time.monotonic() + 10
        while list(tmp_path.iterdir()) and time.monotonic() < removed_by:
            time.sleep(0.2)
        assert [p.name for p in tmp_path.iterdir()] == []
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
