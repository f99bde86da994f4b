"""A real ``tideflow-agent run`` process for tests, and its database as truth.

The tests compare what the cloud applied with what the agent's SQLite file
says; :func:`agent_truth` reads that file read-only while the agent runs (WAL
allows it) or after it died, and raises if it cannot read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tideflow import tracing


class AgentProcess:
    def __init__(self, site: str, broker_url: str, db: Path, *extra: str) -> None:
        self.site = site
        self.broker_url = broker_url
        self.db = db
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = db.with_suffix(".log")

    def start(self, failpoints: str | None = None) -> AgentProcess:
        """Start the agent; ``failpoints`` arms TIDEFLOW_FAILPOINTS for this start only."""
        assert self.proc is None or self.proc.poll() is not None
        args = [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "--log-level",
            "INFO",
            "run",
            "--site",
            self.site,
            "--broker",
            self.broker_url,
            "--db",
            str(self.db),
            "--heartbeat-seconds",
            "1",
            "--ack-timeout",
            "2",
            "--concurrency",
            "2",
            *self.extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
        if failpoints:
            env["TIDEFLOW_FAILPOINTS"] = failpoints
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


class TruthUnreadable(AssertionError):
    """The agent's database could not be read: never taken as "nothing there"."""


@contextlib.contextmanager
def read_only(db: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection (``mode=ro``) to a database an agent wrote, maybe mid-crash.

    Read-only matters between a kill and a restart: a read-write connection
    that is the last to close checkpoints the WAL into the database and
    deletes it, so the restarted agent would recover from something other
    than what the crash left.  A read-only connection can neither checkpoint
    nor remove the WAL; it still reads the committed frames in it.
    """
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        yield conn
    finally:
        conn.close()


def has_schema(conn: sqlite3.Connection) -> bool:
    """False only while the agent is still creating the database (migrations not all done).

    A hot rollback journal (the agent killed inside its first transaction,
    before it switched the file to WAL) stops a read-only connection, which
    may not roll it back: what is committed then is the empty file.  Every
    later write is in WAL mode, so no schema is behind such a journal.
    """
    from edge_agent.store import SCHEMA_VERSION

    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_READONLY_ROLLBACK":
            return False
        raise
    return version >= SCHEMA_VERSION


# Every span a site stored: those filed into ``spans`` and those an outcome record
# still carries (filed when the ack that compacts it commits; decision 0032).  An
# outcome's record stands for its attempt's span, derived from it (decision 0036).
STORED_SPANS = (
    "SELECT body FROM spans UNION ALL SELECT body FROM outbox"
    " WHERE span_trace IS NOT NULL AND seq > (SELECT coalesce(max(CAST(value AS INTEGER)), 0)"
    " FROM meta WHERE key='spans_filed')"
)


def stored_span_bodies(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every span the site's database holds, filed, in records or kept in task rows
    (decision 0038), each once."""
    from edge_agent.store import KEPT_SPANS, kept_span_of

    spans = [tracing.stored_span(json.loads(row[0])) for row in conn.execute(STORED_SPANS)]
    factory, conn.row_factory = conn.row_factory, sqlite3.Row
    try:
        spans += [kept_span_of(row) for row in conn.execute(KEPT_SPANS)]
    finally:
        conn.row_factory = factory
    return [span for span in spans if span is not None]


def agent_truth(db: Path) -> dict[str, Any]:
    """Runs and tasks as the agent's database holds them, plus its sequence.

    Empty only when there is truly nothing: no file, or a file the agent is
    still migrating to its schema.  Any error while reading raises
    :class:`TruthUnreadable`, so a failed read can never make an absence
    check ("no run was created") pass.
    """
    if not db.exists():
        return {"runs": {}, "last_seq": 0}
    try:
        with read_only(db) as conn:
            conn.execute("BEGIN")  # one snapshot: a run created between the reads is not half-seen
            if not has_schema(conn):
                return {"runs": {}, "last_seq": 0}
            runs: dict[str, Any] = {}
            for uid, gen, phase in conn.execute("SELECT uid, generation, phase FROM runs"):
                runs[f"{uid}.{gen}"] = {"phase": phase, "tasks": {}}
            for run_id, task, phase, attempt, code, outputs in conn.execute(
                "SELECT r.uid || '.' || r.generation, t.task, t.phase, t.attempt, t.exit_code,"
                " t.outputs FROM task_runs t JOIN runs r USING (run_id)"
            ):
                runs[run_id]["tasks"][task] = {
                    "phase": phase,
                    "attempt": attempt,
                    "exitCode": code,
                    "outputs": json.loads(outputs),
                }
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
            return {"runs": runs, "last_seq": row[0] if row else 0}
    except sqlite3.Error as exc:
        raise TruthUnreadable(f"cannot read the agent's database {db}: {exc!r}") from exc


async def until_the_cloud_holds_the_sites_truth(
    bridge: Any, agent: Any, site: str, name: str = "wf", *, tries: int = 600
) -> dict[str, Any]:
    """Wait until ``bridge`` has applied every record ``agent``'s database holds and
    its view of Workflow ``default/name`` is Succeeded; the site's truth then."""
    for _ in range(tries):
        truth = agent_truth(agent.db)
        view = bridge.applier.view("default", name)
        if (
            view is not None
            and view.phase == "Succeeded"
            and bridge.applier.applied_through(site) == truth["last_seq"]
        ):
            return truth
        await asyncio.sleep(0.05)
    raise AssertionError(f"did not converge: {agent.log_tail()}")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def task_rows(db: Path) -> dict[str, tuple[str, int]]:
    """Each task's (phase, attempt) in the agent's database, read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {t: (p, a) for t, p, a in conn.execute("SELECT task, phase, attempt FROM task_runs")}
    finally:
        conn.close()
