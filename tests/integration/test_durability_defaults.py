"""``synchronous=FULL`` is the default, on the connection the agent really writes with.

The README promises that each commit is on disk before the agent acts on it
(WAL with ``synchronous=FULL``); with NORMAL a power cut can take back the
last commits.  The store tests pass NORMAL for speed, so nothing else would
notice if the default changed.  ``PRAGMA synchronous`` is per connection:
these tests read it on the store the daemon and ``run-local`` open, not on a
connection of their own (2 is FULL, 1 is NORMAL).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from services.broker import Mosquitto

from edge_agent import cli
from edge_agent.daemon import Agent
from edge_agent.store import Store

FULL = 2


async def _synchronous(store: Store) -> int:
    return int(await store._scalar("PRAGMA synchronous"))


async def test_a_store_opened_with_no_options_is_full(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "site.db")
    try:
        assert await _synchronous(store) == FULL
        assert str(await store._scalar("PRAGMA journal_mode")).lower() == "wal"
    finally:
        await store.close()


async def test_the_daemon_with_default_settings_writes_with_full(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TIDEFLOW_SYNCHRONOUS", raising=False)
    args = cli.build_parser().parse_args(
        ["run", "--site", "durable", "--broker", mosquitto.url, "--db", str(tmp_path / "a.db")]
    )
    agent = Agent(cli.config_from_args(args))
    task = asyncio.create_task(agent.run())
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while not hasattr(agent, "link"):
            assert not task.done(), task
            assert asyncio.get_running_loop().time() < deadline, "the agent did not start"
            await asyncio.sleep(0.05)
        assert await _synchronous(agent.store) == FULL
    finally:
        agent.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 20)


async def test_run_local_with_default_settings_writes_with_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TIDEFLOW_SYNCHRONOUS", raising=False)
    seen: list[int] = []
    real_open = Store.open

    async def observed_open(*args: Any, **kwargs: Any) -> Store:
        store = await real_open(*args, **kwargs)
        seen.append(await _synchronous(store))
        return store

    monkeypatch.setattr(Store, "open", observed_open)
    manifest = tmp_path / "wf.yaml"
    manifest.write_text(
        "apiVersion: tideflow.io/v1alpha1\nkind: Workflow\nmetadata: {name: d}\n"
        "spec: {tasks: [{name: a, command: ['true']}]}\n"
    )
    args = cli.build_parser().parse_args(
        ["run-local", str(manifest), "--db", str(tmp_path / "site.db"), "--quiet"]
    )
    assert await cli._run_local(args) == cli.EXIT_OK
    assert seen == [FULL]
