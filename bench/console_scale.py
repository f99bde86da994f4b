"""The console at fleet scale: 1,000 sites and 10,000 Workflows.

What a person waits for: the API answers behind each page (a page of
Workflows, newest first, filtered by site or phase; a page of sites, dark
ones first; one Workflow's detail) and, where Debian's chromium is
installed, the whole page in a headless browser (navigation until the page's
first render).  The console serves from its in-memory cache, fed here
directly (:meth:`Hub.replace`) with synthetic objects of the shape the
operator writes (5 tasks each, statuses with times, a third of the sites
dark), so what is measured is the console, not the API server.

Also measured: the first Workflows request after a change (the sorted index
is rebuilt once per change of the cache), and 1,000 watch events applied.

Baseline, same run: ``GET /healthz`` (the server's fixed cost per request).
Printed: the median and worst of N requests per case, and ``ratio`` lines
against the baseline; the target is every API answer under 100 ms and the
browser's page under 1 s at this scale (printed as met or not; nothing fails).

Run ``python -m bench.console_scale [--quick] [--sites N] [--workflows N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tideflow.tools.fleet.console import running
from tideflow.tools.fleet.console.hub import Hub
from tideflow.tools.fleet.views import CRONWORKFLOWS, EDGESITES, WORKFLOWS

PHASES = ["Succeeded"] * 6 + ["Running", "Failed", "Assigned", "Cancelled"]
TARGET_API_MS = 100.0
TARGET_PAGE_MS = 1000.0


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def synthetic(n_sites: int, n_workflows: int, seed: int = 7) -> tuple[list[Any], list[Any]]:
    rng = random.Random(seed)
    now = time.time()
    sites = []
    for i in range(n_sites):
        connected = i % 3 != 0
        sites.append({
            "metadata": {"name": f"site-{i:04d}", "labels": {"region": f"r{i % 7}",
                                                            "tier": "prod" if i % 2 else "lab"}},
            "status": {"connected": connected, "lastSeen": iso(now - rng.uniform(0, 600)),
                       "agentVersion": "0.1.0", "running": rng.randint(0, 4),
                       "outboxDepth": 0 if connected else rng.randint(0, 5000),
                       "offlineSince": None if connected else iso(now - rng.uniform(60, 86400))},
        })  # fmt: skip
    workflows = []
    for i in range(n_workflows):
        phase = rng.choice(PHASES)
        start = now - rng.uniform(0, 7 * 86400)
        tasks = []
        for t in range(5):
            task_phase = phase if t == 4 else "Succeeded"
            tasks.append({"name": f"step-{t}", "phase": task_phase, "attempt": 1,
                          "startedAt": iso(start + t), "finishedAt": iso(start + t + 0.5),
                          "exitCode": 0})  # fmt: skip
        workflows.append({
            "metadata": {"name": f"run-{i:05d}", "namespace": f"team-{i % 20}", "uid": str(i),
                         "creationTimestamp": iso(start - 1)},
            "spec": {"placement": {"site": f"site-{i % n_sites:04d}"},
                     "tasks": [{"name": f"step-{t}", "script": "true",
                                **({"dependsOn": [f"step-{t - 1}"]} if t else {})}
                               for t in range(5)]},
            "status": {"phase": phase, "site": f"site-{i % n_sites:04d}", "progress": "4/5",
                       "startedAt": iso(start), "finishedAt": iso(start + 5),
                       "traceId": f"{i:032x}", "tasks": tasks},
        })  # fmt: skip
    return sites, workflows


async def timed(session: Any, url: str, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        async with session.get(url) as answer:
            await answer.read()
            assert answer.status == 200, (url, answer.status)
        times.append((time.perf_counter() - began) * 1000)
    return times


def browser_page_ms(url: str, fragments: list[str], rounds: int) -> dict[str, list[float]] | None:
    """Navigation to first render in headless chromium, per page; None without chromium."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return None
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(shutil.which("chromedriver"))), options=options)
    results: dict[str, list[float]] = {}
    try:
        driver.get(url)  # warm the browser
        for fragment in fragments:
            results[fragment] = []
            for _ in range(rounds):
                driver.get("about:blank")
                began = time.perf_counter()
                driver.get(f"{url}#{fragment}")
                deadline = time.monotonic() + 30
                while not driver.execute_script("return document.body.dataset.rendered"):
                    if time.monotonic() > deadline:
                        raise TimeoutError(fragment)
                    time.sleep(0.005)
                results[fragment].append((time.perf_counter() - began) * 1000)
    finally:
        driver.quit()
    return results


async def main_async(n_sites: int, n_workflows: int, rounds: int, use_browser: bool) -> None:
    import aiohttp

    began = time.perf_counter()
    sites, workflows = synthetic(n_sites, n_workflows)
    hub = Hub()
    hub.replace(EDGESITES, sites)
    hub.replace(WORKFLOWS, workflows)
    hub.replace(CRONWORKFLOWS, [])
    load_ms = (time.perf_counter() - began) * 1000
    print(f"console_scale: {n_sites} sites, {n_workflows} workflows (5 tasks each), "
          f"built and cached in {load_ms:.0f} ms; {rounds} requests per case")  # fmt: skip
    async with running(hub, "127.0.0.1", 0) as port, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{port}/"
        cases = {
            "baseline GET /healthz": "healthz",
            "workflows page 1 (newest first)": "api/workflows?limit=50",
            "workflows page 100": "api/workflows?limit=50&offset=4950",
            "workflows filtered by site": f"api/workflows?site=site-{n_sites // 2:04d}",
            "workflows filtered by phase": "api/workflows?phase=Failed&limit=50",
            "sites page 1 (dark first)": "api/sites?limit=50",
            "sites by label selector": "api/sites?selector=region%3Dr3,tier%3Dprod&limit=50",
            "one workflow's detail": "api/workflows/team-3/run-00123",
            "the page itself (index.html)": "",
        }
        results: dict[str, list[float]] = {}
        for label, path in cases.items():
            await timed(session, base + path, 2)  # warm
            results[label] = await timed(session, base + path, rounds)
        # The first query after a change rebuilds the sorted index once.
        rebuilt = []
        for i in range(min(rounds, 20)):
            hub.apply(WORKFLOWS, "MODIFIED", workflows[i])
            rebuilt += await timed(session, base + "api/workflows?limit=50", 1)
        results["workflows page 1 after a change"] = rebuilt
        began = time.perf_counter()
        for obj in workflows[:1000]:
            hub.apply(WORKFLOWS, "MODIFIED", obj)
        events_ms = (time.perf_counter() - began) * 1000
        pages = None
        if use_browser:  # in a thread: the console serves from this loop meanwhile
            fragments = ["/workflows", "/fleet", "/wf/team-3/run-00123"]
            n = max(3, rounds // 10)
            pages = await asyncio.to_thread(browser_page_ms, base, fragments, n)
    baseline = statistics.median(results["baseline GET /healthz"])
    print(f"{'case':<36} {'median ms':>10} {'worst ms':>10} {'x baseline':>11}")
    for label, times in results.items():
        med = statistics.median(times)
        print(f"{label:<36} {med:>10.2f} {max(times):>10.2f} {med / baseline:>11.1f}")
    print(f"1,000 watch events applied to the cache: {events_ms:.1f} ms")
    worst_api = max(
        statistics.median(t) for k, t in results.items() if k != "baseline GET /healthz"
    )
    print(f"ratio worst API median / baseline: {worst_api / baseline:.1f}x")
    met = "met" if worst_api < TARGET_API_MS else "NOT met"
    print(f"target every API answer < {TARGET_API_MS:.0f} ms (median): {met} "
          f"(worst {worst_api:.1f} ms)")  # fmt: skip
    if pages is None:
        print("browser page load: skipped (chromium, chromedriver or selenium missing)")
        return
    for fragment, times in pages.items():
        print(f"browser page #{fragment:<28} median {statistics.median(times):7.1f} ms, "
              f"worst {max(times):7.1f} ms")  # fmt: skip
    worst_page = max(statistics.median(t) for t in pages.values())
    met = "met" if worst_page < TARGET_PAGE_MS else "NOT met"
    print(
        f"target page load < {TARGET_PAGE_MS:.0f} ms (median): {met} "
        f"(worst {worst_page:.0f} ms; ratio to the API's worst {worst_page / worst_api:.1f}x)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 sites, 1,000 workflows")
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--workflows", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.sites, args.workflows, args.rounds = 100, 1000, 10
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args.sites, args.workflows, args.rounds, not args.no_browser))


if __name__ == "__main__":
    main()
