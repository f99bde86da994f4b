"""The web console in a real headless browser, on a real fleet.

One world per module: a real operator and agent in a namespace of their own,
a second site that registered and went dark, and ``tideflow console`` run as
a user would (a subprocess on a free loopback port, the cluster's
kubeconfig).  Debian's chromium, driven by Selenium through Debian's
chromedriver, loads the pages; screenshots go to ``/tmp/tideflow-artifacts``
(``$TIDEFLOW_ARTIFACTS``), outside the repository.

Proves: the Fleet page lists the sites with the right connectivity, the dark
one first; a Workflow page draws the DAG (nodes and edges) with each task's
state and changes it live -- without a reload -- when a task finishes; a
status whose messages hold ``<script>`` and an ``onerror`` image shows those
characters as text and runs nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from services import browser
from services.agent import wait_for
from services.broker import Mosquitto
from services.world import World, install_crds, spec_for

pytestmark = [pytest.mark.envtest, pytest.mark.browser]

XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
TRACE_URL = "https://traces.example/trace/{traceId}"


class Console:
    def __init__(self, world: World, live: str, dark: str, url: str, driver: Any) -> None:
        self.world, self.live, self.dark, self.url, self.driver = world, live, dark, url, driver

    def open(self, fragment: str) -> None:
        self.driver.get(f"{self.url}#{fragment}")

    def until(self, check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = check()
            except Exception:  # the page is being redrawn: the element went stale
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                self.shot(f"timeout-{re.sub(r'[^a-z0-9]+', '-', what.lower())[:40]}.png")
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.1)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def shot(self, name: str) -> Path:
        path = browser.artifact(name)
        self.driver.save_screenshot(str(path))
        return path


@pytest.fixture(scope="module")
def console(envtest: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    from services.broker import find_mosquitto

    reason = browser.missing_reason()
    if reason:
        pytest.skip(reason)
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found")
    install_crds(envtest)
    suffix = uuid.uuid4().hex[:5]
    live, dark = f"plant-{suffix}", f"mine-{suffix}"
    tmp = tmp_path_factory.mktemp("console")
    with Mosquitto() as broker:
        world = World(envtest, broker, tmp)
        proc = None
        driver = None
        try:
            world.operator()
            world.agent(live)
            world.agent(dark)
            wait_for(lambda: _connected(world, dark) is True, 60, "the dark site to register")
            world.agents[dark].kill()
            wait_for(lambda: _connected(world, dark) is False, 60, "the dark site to go dark")
            env = {**envtest.env(), "PYTHONSAFEPATH": "1"}
            log = (tmp / "console.log").open("wb")
            proc = subprocess.Popen(
                [sys.executable, "-m", "tideflow.cli", "console", "--port", "0",
                 "--trace-url", TRACE_URL],
                stdout=subprocess.PIPE, stderr=log, env=env, cwd=tmp, start_new_session=True,
            )  # fmt: skip
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            assert found, f"console did not start: {line!r} {(tmp / 'console.log').read_text()}"
            driver = browser.chrome()
            yield Console(world, live, dark, found.group(0), driver)
        finally:
            if driver is not None:
                driver.quit()
            if proc is not None:
                proc.terminate()
                proc.wait(10)
            world.close()


def _connected(world: World, site: str) -> bool | None:
    got = world.kubectl("get", "edgesite", site, "-o", "json", check=False)
    if got.returncode != 0:
        return None
    return bool((json.loads(got.stdout).get("status") or {}).get("connected"))


def _rows(c: Console) -> dict[str, dict[str, str]]:
    return c.js("""
        const out = {};
        for (const tr of document.querySelectorAll('#sites tbody tr')) {
          const cells = [...tr.children].map(td => td.textContent);
          out[tr.dataset.site] = {connectivity: cells[1], offline: cells[3], version: cells[6],
                                  index: Object.keys(out).length};
        }
        return out;""")


def test_fleet_page_lists_the_sites_with_their_connectivity(console: Console) -> None:
    c = console
    c.open("/fleet")
    rows = c.until(lambda: (r := _rows(c)) and c.live in r and c.dark in r and r, "both sites")
    assert rows[c.dark]["connectivity"] == "✖ dark" and rows[c.dark]["offline"] not in ("", "-")
    assert rows[c.live]["connectivity"] == "● connected" and rows[c.live]["version"] != "-"
    assert rows[c.dark]["index"] < rows[c.live]["index"]  # dark sites first
    assert c.js("return document.querySelector('#fleet-summary').textContent").endswith("dark")
    c.until(lambda: "live" in c.js("return document.getElementById('live').textContent"), "SSE")
    c.shot("fleet.png")


def _nodes(c: Console, svg_id: str = "dag") -> dict[str, str]:
    return c.js(
        f"return Object.fromEntries([...document.querySelectorAll('#{svg_id} g.node')]"
        ".map(g => [g.dataset.task, g.dataset.phase]))"
    )


def test_workflow_page_draws_the_dag_and_updates_live(console: Console, tmp_path: Path) -> None:
    c = console
    gate = tmp_path / "gate"
    c.world.apply("pipeline", spec_for(c.live, [
        {"name": "extract", "script": "echo rows"},
        {"name": "transform", "dependsOn": ["extract"],
         "script": f"while [ ! -f {gate} ]; do sleep 0.1; done"},
        {"name": "load", "dependsOn": ["transform"], "script": "true"},
        {"name": "report", "dependsOn": ["extract"], "script": "true"},
    ]))  # fmt: skip
    c.open(f"/wf/{c.world.namespace}/pipeline")
    want = {"extract": "Succeeded", "transform": "Running", "load": "Pending",
            "report": "Succeeded"}  # fmt: skip
    c.until(lambda: _nodes(c) == want, f"the DAG drawn as {want}")
    edges = c.js(
        "return [...document.querySelectorAll('#dag path.edge')]"
        ".map(p => p.dataset.from + '>' + p.dataset.to).sort()"
    )
    assert edges == ["extract>report", "extract>transform", "transform>load"]
    fills = c.js(
        "return Object.fromEntries([...document.querySelectorAll('#dag g.node')]"
        ".map(g => [g.dataset.task, getComputedStyle(g.querySelector('rect')).fill]))"
    )
    assert fills["extract"] == fills["report"] != fills["transform"] != fills["load"]
    assert c.js("return document.querySelector('#site-state').textContent").endswith("connected")
    link = c.js("return document.querySelector('#trace-link').href")
    assert link == TRACE_URL.replace("{traceId}", c.world.status("pipeline")["traceId"])
    c.shot("workflow-running.png")
    c.js("window.__sameDocument = true")
    gate.touch()
    done = {k: "Succeeded" for k in want}
    c.until(lambda: _nodes(c) == done, "the DAG to turn green without a reload")
    assert c.js("return window.__sameDocument") is True  # updated in place (SSE), not reloaded
    c.until(lambda: "Succeeded" in c.js("return document.querySelector('#run-phase').textContent"),
            "the run's phase")  # fmt: skip
    c.js("document.querySelector('#dag g.node[data-task=transform]')"
         ".dispatchEvent(new MouseEvent('click', {bubbles: true}))")  # fmt: skip
    c.until(lambda: c.js("return document.querySelector('#task-name')?.textContent")
            == "transform", "the task panel")  # fmt: skip
    c.shot("workflow-succeeded.png")


def test_markup_in_a_status_renders_as_text(console: Console) -> None:
    c = console
    ns = f"xss-{uuid.uuid4().hex[:6]}"  # no operator watches it: the status stays as patched
    c.world.kubectl("create", "namespace", ns)
    try:
        manifest = {
            "apiVersion": "tideflow.io/v1alpha1", "kind": "Workflow",
            "metadata": {"name": "xss", "namespace": ns},
            "spec": {"placement": {"site": c.live},
                     "tasks": [{"name": "ok", "script": "true", "env": {"TOKEN": "s3cr3t-value"}}]},
        }  # fmt: skip
        c.world.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        status = {"status": {"phase": "Failed", "message": XSS, "site": c.live, "progress": "0/1",
                             "tasks": [{"name": "ok", "phase": "Failed", "attempt": 1,
                                        "message": XSS, "outputs": {"html": XSS}}]}}  # fmt: skip
        c.world.kubectl("patch", "workflow", "xss", "-n", ns, "--subresource=status",
                        "--type=merge", "-p", json.dumps(status))  # fmt: skip
        c.open(f"/wf/{ns}/xss")
        c.until(lambda: c.js("return document.querySelector('#run-message')?.textContent") == XSS,
                "the message shown as text")  # fmt: skip
        c.js("document.querySelector('#dag g.node[data-task=ok]')"
             ".dispatchEvent(new MouseEvent('click', {bubbles: true}))")  # fmt: skip
        c.until(lambda: c.js("return document.querySelector('#task-message')?.textContent") == XSS,
                "the task's message shown as text")  # fmt: skip
        assert c.js("return window.__xss") is None
        assert c.js("return document.querySelectorAll('main script, main img').length") == 0
        page = c.driver.page_source
        assert "s3cr3t-value" not in page and "TOKEN" not in page
        c.shot("xss.png")
        c.open("/workflows?namespace=" + ns)
        c.until(lambda: c.js("return document.querySelector('#workflows tbody tr td:last-child')"
                             "?.textContent") == XSS, "the list's message as text")  # fmt: skip
        assert c.js("return window.__xss") is None
    finally:
        c.world.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_the_console_answers_only_reads_and_shows_no_secrets(console: Console) -> None:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(console.url + "api/sites", method="POST", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405
    with urllib.request.urlopen(console.url, timeout=10) as page:
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]


def test_pages_give_their_event_stream_back_when_left(console: Console) -> None:
    """A browser holds six connections per server: ten page loads in a row must not stall.

    Each page holds a server-sent-event stream open; one left open after the page
    is gone kept a connection, and the ninth load waited about a minute.
    """
    c = console
    c.driver.set_page_load_timeout(10)  # a stalled load raises instead of waiting a minute
    try:
        for i in range(10):
            began = time.monotonic()
            c.driver.get("about:blank")
            c.open(f"/fleet?n={i}")
            c.until(lambda: c.js("return document.body.dataset.rendered"), f"load {i + 1}", 10)
            assert time.monotonic() - began < 10, f"page load {i + 1} stalled"
    finally:
        c.driver.set_page_load_timeout(300)
