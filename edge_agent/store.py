"""The agent's durable memory: one SQLite file per site, and the only SQL.

Why it is shaped this way:

* **Transactional outbox.**  Every state change of a run or a task and the
  outbox record that reports it are written in one transaction, so a crash can
  never lose a report nor report a change that did not happen.  Outbox records
  are numbered by ``AUTOINCREMENT``, which never reuses a number even after
  acknowledged records are compacted away: ``seq`` is the site's sequence.
* **Group commit.**  Writers queue their changes; everything queued during one
  turn of the event loop (and while a commit is under way) is committed in a
  single transaction.  Concurrent tasks share a fsync, which is what makes
  ``synchronous=FULL`` affordable.  A batch of step checkpoints commits on the
  event loop itself when nothing else is ready to run and commits have been
  fast (a chain step then pays its fsync and no thread hand-off); otherwise,
  and always for heavy work, on the database thread (see :meth:`_flush`).
* **One identity per database.**  :meth:`Store.epoch` is generated once, the
  first time it is asked for, and kept in ``meta``.  The sequence belongs to
  the database, not to the site name: an agent restarted on a new, empty file
  counts from 1 again, and the epoch is how the cloud tells the new numbering
  from the old one.
* **Never clobber.**  A file that is not a Tideflow database, is corrupt, or is
  from a newer schema is refused with :class:`StoreError`; it is never
  overwritten or "repaired".  A writer runs ``PRAGMA quick_check`` before it
  changes anything, so random bytes over a page are found at open, not after
  a new run was written into them.  The daemon checks *behind* the open
  (``check_behind``): on a second, read-only connection while it reads and
  sends, with every write held (and SQLite's ``query_only`` set on the
  connection) until the check passes, so a long check is off the path of a
  drain that only reads; a corrupt file still gets no byte written
  (decision 0024).
* **One writer per file.**  A writable open takes an exclusive ``flock`` on
  the database file itself (every name of it, symlink or hard link, shares
  it) and on ``<db>.lock`` (holding the owner's pid) before it reads a
  byte: a second agent on the same database gets :class:`StoreBusyError`
  naming that pid.
  The kernel drops the lock when the process dies, ``kill -9`` included, and
  the descriptor is not inherited by task processes.  Readers take no lock
  (WAL lets them read beside the writer); on a read-only copy, where SQLite
  cannot create its ``-shm`` file, they open the file as immutable.
* **The path is the path.**  ``--db`` is quoted into SQLite's ``file:`` URI,
  so ``site#1.db`` opens ``site#1.db`` and never ``site``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from edge_agent.state import RunState, TaskState, record_json
from edge_agent.threads import in_own_thread
from tideflow.failpoints import failpoint
from tideflow.tracing import attempt_span_of, stored_span
from tideflow.wire import (
    LOG_RECORD,
    RUN_RECORD,
    SCHEDULE_RECORD,
    SPAN_RECORD,
    TASK_RECORD,
    LogRecord,
)

log = logging.getLogger(__name__)

APP_ID = 0x54464C57  # "TFLW", in PRAGMA application_id
LOG_TAIL_BYTES = 16 * 1024
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
# A batch of step checkpoints commits on the event loop (nothing else ready to
# run) only while commits take less than this, on average: the loop is never
# held for a slow disk's fsync (an SD card's 20-50 ms ones go to the thread).
INLINE_COMMIT_MAX_SECONDS = 0.005
_COMMIT_AVERAGE_WEIGHT = 0.2  # of the newest commit in the moving average
_LIGHT_MANY = 16  # save_many of at most this many tasks may commit on the loop
# ...and a batch of at most this many jobs: a few steps' worth, never a backlog.
INLINE_MAX_JOBS = 32

# Migration 10 fills the fired record with the newest times of each schedule only,
# within the bound (FIRES_KEPT, below): a site offline long, nothing acked and so
# nothing pruned, may hold tens of thousands of fired runs.
_FIRES_KEPT_AT_MIGRATION = 1000

MIGRATIONS: list[str] = [
    # 1: runs, task runs, log tails, the outbox, key/value meta.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        uid TEXT NOT NULL,
        generation INTEGER NOT NULL,
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        traceparent TEXT,
        phase TEXT NOT NULL,
        reason TEXT,
        message TEXT,
        suspended INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        deadline_at REAL,
        UNIQUE (uid, generation)
    );
    CREATE INDEX runs_by_name ON runs (namespace, name, created_at);
    CREATE TABLE task_runs (
        run_id TEXT NOT NULL REFERENCES runs (run_id),
        task TEXT NOT NULL,
        compensation INTEGER NOT NULL DEFAULT 0,
        phase TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        started_at REAL,
        finished_at REAL,
        exit_code INTEGER,
        outputs TEXT NOT NULL DEFAULT '{}',
        message TEXT,
        next_attempt_at REAL,
        pid INTEGER,
        pid_start TEXT,
        PRIMARY KEY (run_id, task)
    );
    CREATE TABLE task_logs (
        run_id TEXT NOT NULL,
        task TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        stream TEXT NOT NULL,
        tail BLOB NOT NULL,
        PRIMARY KEY (run_id, task, attempt, stream)
    );
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        run_id TEXT,
        body TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 2: spans exported by the agent's tracer, kept for `tideflow-agent trace`.
    """
    CREATE TABLE spans (
        trace_id TEXT NOT NULL,
        span_id TEXT NOT NULL,
        parent_span_id TEXT,
        run_id TEXT,
        name TEXT NOT NULL,
        start_ns INTEGER NOT NULL,
        end_ns INTEGER NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX spans_by_trace ON spans (trace_id);
    """,
    # 3: span ids that must survive a crash (the run's, the current attempt's).
    """
    ALTER TABLE runs ADD COLUMN trace_id TEXT;
    ALTER TABLE runs ADD COLUMN span_id TEXT;
    ALTER TABLE task_runs ADD COLUMN span_id TEXT;
    ALTER TABLE outbox ADD COLUMN span_rowid INTEGER;
    """,
    # 4: consecutive interruptions of a task (agent stopped mid-attempt), and its
    # failed attempts (what retry.limit counts).
    """
    ALTER TABLE task_runs ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE task_runs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: CronWorkflow schedules the site keeps and fires from its own clock, and
    # which schedule fired a run for which time.  ``last_scheduled`` is the
    # high-water mark: every scheduled time at or before it fired or was missed.
    """
    CREATE TABLE schedules (
        uid TEXT PRIMARY KEY,
        generation INTEGER NOT NULL,
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        received_at REAL NOT NULL,
        last_scheduled REAL,
        last_fired REAL,
        missed_count INTEGER NOT NULL DEFAULT 0,
        last_missed REAL
    );
    ALTER TABLE runs ADD COLUMN schedule_uid TEXT;
    ALTER TABLE runs ADD COLUMN scheduled_at REAL;
    ALTER TABLE runs ADD COLUMN cron TEXT;
    CREATE INDEX runs_by_schedule ON runs (schedule_uid, scheduled_at);
    """,
    # 6: retention deletes a finished run's spans (and loose spans) by run_id;
    # without an index every pass scanned every span of the site.
    """
    CREATE INDEX spans_by_run ON spans (run_id);
    """,
    # 7: a task outcome's attempt span travels inside the outcome's own outbox
    # record (its body's "span"; decision 0022).  span_trace is that span's
    # trace id, set only on such rows; they are copied into spans in bulk
    # (_file_spans), up to the seq kept in meta as 'spans_filed'.
    """
    ALTER TABLE outbox ADD COLUMN span_trace TEXT;
    """,
    # 8: an outcome's record carries only its attempt span's ids ("attemptSpan";
    # decision 0036) and is filed into spans as is: the span is derived when
    # read.  No table changes; the version moves so that an older agent, which
    # would file such rows by "$.span" (NULL span ids: its run's last commit
    # fails) and read their bodies as spans, refuses the file.
    """
    SELECT 1;
    """,
    # 9: a task's final attempt keeps its span's ids in its own row (span_ref, the
    # outcome record's "attemptSpan"; decision 0038): its span is derived from the
    # row when read and never copied into spans.  Only attempts the row no longer
    # describes (retried, interrupted) and run spans are filed there.
    """
    ALTER TABLE task_runs ADD COLUMN span_ref TEXT;
    """,
    # 10: the scheduled times each schedule fired (decision 0047), written in the
    # transaction that creates the run, kept when retention prunes the run, and
    # bounded (FIRES_KEPT newest per schedule).  A clock stepped back moves a
    # schedule's mark back; this, not the runs table, says which times above the
    # mark already fired.  Filled from the runs an older agent fired (the newest
    # FIRES_KEPT times of each schedule, the first run made for each).
    f"""
    CREATE TABLE schedule_fires (
        schedule_uid TEXT NOT NULL,
        scheduled_at REAL NOT NULL,
        run_id TEXT NOT NULL,
        PRIMARY KEY (schedule_uid, scheduled_at)
    ) WITHOUT ROWID;
    INSERT OR IGNORE INTO schedule_fires (schedule_uid, scheduled_at, run_id)
        SELECT schedule_uid, scheduled_at, run_id FROM (
            SELECT schedule_uid, scheduled_at, run_id, rowid AS made, dense_rank()
                OVER (PARTITION BY schedule_uid ORDER BY scheduled_at DESC) AS newest
            FROM runs WHERE schedule_uid IS NOT NULL AND scheduled_at IS NOT NULL
        ) WHERE newest <= {_FIRES_KEPT_AT_MIGRATION} ORDER BY made;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
SPANS_IN_RECORDS = 7  # the schema from which outcome records carry their spans
# Outbox rows with their bodies (a span's body lives in the spans table).
_OUTBOX_ROWS = (
    "SELECT o.seq AS seq, o.kind AS kind, coalesce(s.body, o.body) AS body"
    " FROM outbox o LEFT JOIN spans s ON s.rowid = o.span_rowid"
)

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], Any]


class StoreError(RuntimeError):
    """The database cannot be used as it is; the file has not been modified."""


class StoreFullError(StoreError):
    """The disk (or the outbox budget) is full; what was committed is kept."""


class StoreBusyError(StoreError):
    """Another process holds the database for writing."""


# Cancels for runs this site has never seen (a cancel may overtake its
# assignment): remembered so the late assignment is cancelled on arrival, but
# bounded in number and age.  The cloud re-sends a cancel the site has not
# confirmed whenever the site comes online, so a forgotten marker costs a
# resend, never a lost cancel.  At most ~0.5 MB, far inside the outbox budget.
CANCEL_MARKERS_MAX = 1000
# Fired times kept per schedule (migration 10), the newest scheduled times: a
# clock that read ahead and fired more than this many times of one schedule
# before it stepped back leaves its oldest ones to the runs table (decision
# 0047).  About 100 bytes each.
FIRES_KEPT = _FIRES_KEPT_AT_MIGRATION
CANCEL_MARKER_TTL_SECONDS = 7 * 86400
CANCEL_MARKER_UID_MAX = 256
_CANCEL_PREFIX = "cancelled:"
# A marker's time; 0 for a marker an older agent wrote (plain text, no time).
_MARKER_AT = (
    "(CASE WHEN json_valid(value) THEN coalesce(json_extract(value, '$.at'), 0) ELSE 0 END)"
)


@dataclass(frozen=True)
class OutboxStats:
    depth: int
    bytes: int
    first_seq: int | None
    last_seq: int | None
    last_acked_seq: int


@dataclass(frozen=True)
class OutboxRecord:
    seq: int
    kind: str
    body: str


@dataclass(frozen=True)
class ScheduleRow:
    """One CronWorkflow the site keeps (see migration 5)."""

    uid: str
    generation: int
    namespace: str
    name: str
    spec_json: str
    received_at: float
    last_scheduled: float | None = None
    last_fired: float | None = None
    missed_count: int = 0
    last_missed: float | None = None

    def record(
        self, state: str, message: str | None = None, *, stepped_back_from: float | None = None
    ) -> dict[str, Any]:
        """The ``schedule`` outbox record that reports this row to the cloud.

        ``stepped_back_from``: the mark a clock stepped back moved it from
        (decision 0049); the record then reports the moved mark.
        """
        body: dict[str, Any] = {
            "uid": self.uid,
            "generation": self.generation,
            "namespace": self.namespace,
            "name": self.name,
            "state": state,
            "lastScheduledTime": self.last_scheduled,
            "missedCount": self.missed_count,
            "lastMissedTime": self.last_missed,
        }
        if message is not None:
            body["message"] = message[:1024]
        if stepped_back_from is not None:
            body["clockSteppedBackFrom"] = stepped_back_from
        return body


@dataclass
class _Job:
    work: Work
    future: asyncio.Future[Any]
    # A few rows (a step's checkpoint, a run's state, a span): may commit on
    # the event loop.  Anything else (a new run's task rows, a retention pass)
    # always goes to the database thread.
    light: bool = False
    # The task row (run id, task) whose every column this job's UPDATE writes
    # (save_task); work(conn, False) writes its records without that UPDATE
    # (and a progress checkpoint's work writes nothing at all).
    row: tuple[str, str] | None = None


def _uri(path: Path, mode: str, *, immutable: bool = False) -> str:
    """``path`` as a SQLite URI: quoted, so ``#``, ``?`` and ``%`` stay in the name."""
    query = f"mode={mode}" + ("&immutable=1" if immutable else "")
    # The path's own bytes (a name that is not UTF-8 raised UnicodeEncodeError).
    return f"file:{urllib.parse.quote(os.fsencode(path))}?{query}"


class _WriterLock:
    """Exclusive ``flock``s on the database file and on ``<db>.lock``.

    The lock on the database file itself is what makes one writing process
    per database: every name of the file (a symlink, a hard link) leads to
    it, and nobody deletes it from under a running agent.  (A lock on
    ``<db>.lock`` alone was lost to a tmp cleaner or a task deleting that
    file, and a hard link had a lock file of its own.)  SQLite's own locks are
    POSIX record locks, which do not meet ``flock``s.  The lock file holds
    the owner's pid (for the message a second agent prints; older agents lock
    only it) and is removed on release.  Removal is safe because a taker
    checks, once it holds the lock, that the file it locked is still the one
    at the path; if not (its owner removed it meanwhile) it tries again.
    """

    def __init__(self, path: Path, fd: int, db_fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._db_fd = db_fd

    @classmethod
    def acquire(cls, db: Path) -> _WriterLock:
        # Beside the file itself, not beside a symlink to it: a second agent that
        # reaches the database through another name must find the same lock.
        real = Path(os.path.realpath(db))
        path = real.with_name(real.name + ".lock")
        try:
            # An empty file is a new database to SQLite.
            db_fd = os.open(real, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot lock database {db}: {exc.strerror}") from None
        try:
            fcntl.flock(db_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(db_fd)  # no connection of ours has it open yet
            raise _busy(db, _holder_in(path)) from None
        try:
            lock_fd = cls._lock_file(db, path)
        except BaseException:
            os.close(db_fd)
            raise
        return cls(path, lock_fd, db_fd)

    @staticmethod
    def _lock_file(db: Path, path: Path) -> int:
        for _ in range(100):
            try:
                # Never through a symlink: it is truncated and written (the pid), so
                # a link there made the agent overwrite the file it pointed at.
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                why = f": {exc.strerror}"
                if exc.errno == errno.ELOOP:
                    why = " is a symbolic link; refusing to write through it (remove it)"
                raise StoreError(f"cannot lock database {db}: {path}{why}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise _busy(db, holder) from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError as exc:  # the pid is for messages only; the flock is the lock
                log.warning("could not write the pid into %s: %s", path, exc.strerror)
            return fd
        raise StoreBusyError(f"database {db}: could not take {path}")

    def release(self) -> None:
        """Called once SQLite's connection is closed (closing a descriptor of the
        database file drops every POSIX lock this process holds on it)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        os.close(self._db_fd)
        self._fd = None


def _busy(db: Path, holder: int | None) -> StoreBusyError:
    who = f"pid {holder}" if holder else "another process"
    return StoreBusyError(
        f"database {db} in use by {who}; one agent per database "
        "(the readers status, runs, logs and trace work beside it)"
    )


# The holder takes the database's lock a moment before it writes its pid (two
# agents started at once on a fresh file): the loser waits this long to name it.
HOLDER_PID_WAIT_SECONDS = 0.5


def _holder_in(path: Path) -> int | None:
    """The pid in the lock file at ``path``, waiting a moment for one being written."""
    deadline = time.monotonic() + HOLDER_PID_WAIT_SECONDS
    while (pid := _pid_in(path)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return pid


def _pid_in(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_pid(fd)
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _unreadable_without_writing(exc: sqlite3.Error) -> bool:
    """SQLite could not create or write its ``-shm`` file (a read-only copy)."""
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith("SQLITE_READONLY") or name.startswith("SQLITE_CANTOPEN")


def _check_working_directory(path: Path) -> None:
    """A relative path needs the current directory, which may have been removed (a
    shell left in a deleted tree): resolving it raised FileNotFoundError."""
    if path.is_absolute():
        return
    try:
        os.getcwd()
    except OSError as exc:
        raise StoreError(
            f"database {path}: the current directory cannot be used ({exc.strerror}: "
            "removed?); give the database as an absolute path"
        ) from None


def _check_file(path: Path) -> None:
    _check_journal(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot read database {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        # A FIFO or a device: SQLite would block reading it, or write into it.
        raise StoreError(f"{path} is not a regular file; refusing to touch it")
    if not stat.S_ISDIR(mode) and path.stat().st_size == 0:
        return
    try:
        with path.open("rb") as handle:
            header = handle.read(16)
    except OSError as exc:
        raise StoreError(f"cannot read database {path}: {exc.strerror}") from None
    if header != b"SQLite format 3\x00" and not _hot_journal_beside(path):
        raise StoreError(f"{path} is not a SQLite database; refusing to touch it")


def _check_journal(path: Path) -> None:
    """The rollback journal's name holds nothing or a file: SQLite (looking for a hot
    journal) and :func:`_hot_journal_beside` open it, and a FIFO blocked both for ever.

    And no file SQLite keeps beside the database (``-journal``, ``-wal``,
    ``-shm``, beside the file a symlink to it leads to) is a symbolic link:
    SQLite refuses one, saying only "unable to open database file"."""
    real = Path(os.path.realpath(path))
    for suffix in _COMPANIONS:
        companion = real.with_name(real.name + suffix)
        if os.path.islink(companion):
            raise StoreError(f"{companion} is a symbolic link; SQLite will not use "
                             f"{path} through it (remove it)")  # fmt: skip
    journal = path.with_name(path.name + "-journal")
    try:
        mode = journal.stat().st_mode
    except OSError:  # none (or the path's own fault, which the caller reports)
        return
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise StoreError(f"{journal} is not a regular file; refusing to touch {path}")


_COMPANIONS = ("-journal", "-wal", "-shm")


# The first bytes of a SQLite rollback journal (its header's magic number).
_JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")


def _hot_journal_beside(path: Path) -> bool:
    """A rollback journal SQLite wrote is beside the file: the file may hold
    pages of an uncommitted first transaction (its header not yet written)
    that SQLite rolls back, so the header alone does not say what it is."""
    try:
        with path.with_name(path.name + "-journal").open("rb") as handle:
            return handle.read(len(_JOURNAL_MAGIC)) == _JOURNAL_MAGIC
    except OSError:
        return False


class Store:
    """One site's database.  Create with :meth:`open`, finish with :meth:`close`."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        # Group commit (see _enqueue): jobs waiting for the next batch, whether a
        # batch is on the database thread, and who waits for both to be empty.
        self._pending: list[_Job] = []
        self._inflight = False
        self._flush_scheduled = False
        self._idle: list[asyncio.Future[None]] = []
        self._flush_handle: asyncio.Handle | None = None  # the scheduled flush's, if any
        self._closed = False
        self._lock: _WriterLock | None = None
        # The outbox's depth and bytes up to a seq, counted once and kept as
        # acks compact it (see outbox_stats); touched on the database thread.
        self._tally: _Tally | None = None
        # Held by whoever uses the connection: the database thread for each of
        # its calls, the event loop for an inline commit (which only ever tries it).
        self._conn_lock = threading.Lock()
        # Moving average of commit durations (seconds), both paths.
        self._commit_seconds = 0.0
        # A check behind the open (check_behind): writes are held while it runs
        # (None: no check pending) and refused for good if it failed.
        self._check: asyncio.Task[None] | None = None
        self._check_stop = threading.Event()  # set by close(): the check gives up
        self._check_conn: sqlite3.Connection | None = None
        self._refused: StoreError | None = None
        # The syncer's own read-only connection (see _read_beside), made on first use.
        self._reader: _Reader | None = None
        # The ``last_acked_seq`` the latest ack() committed (or found), 0 before one.
        self.acked_mark = 0
        self.inline_commits = 0  # how many batches committed on the event loop
        # Spans written inside outcome records since they were last filed
        # (decisions 0022 and 0032; see save_run).
        self._unfiled = 0

    # ----------------------------------------------------------------- opening
    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        readonly: bool = False,
        max_bytes: int | None = None,
        check_behind: bool = False,
    ) -> Store:
        """Open (creating if needed) and migrate a site database.

        ``max_bytes`` caps the database file (SQLite's ``max_page_count``):
        writes beyond it fail with :class:`StoreFullError` exactly as on a
        full disk, and what was committed before stays intact.

        ``check_behind``: an existing file at the current schema is opened at
        once and checked (``quick_check``) beside the reads that follow, on a
        read-only connection of its own; until the check passes every write
        waits (and the connection is ``query_only``, so none can slip past).
        A failed check fails the waiting writes and every later one with
        :class:`StoreError`, and :meth:`checked` raises it; nothing was
        written.  A file that needs migrating is checked first, as always.
        """
        path = Path(path)
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise StoreError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        _check_working_directory(path)
        _check_file(path)
        if readonly and not path.exists():
            raise StoreError(f"no database at {path}")
        lock = None if readonly else _WriterLock.acquire(path)
        try:
            store = await cls._connect(path, synchronous, readonly, check_behind, max_bytes)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        store._lock = lock
        try:
            if not readonly and SCHEMA_VERSION >= SPANS_IN_RECORDS:
                # Records past the filing mark may carry spans a killed writer left
                # unfiled: the next trigger files them.  (Not counted here: that
                # would scan a backlog of millions at every open.)
                store._unfiled = int(await store._read(_past_the_mark))
        except BaseException:
            await store.close()
            raise
        failpoint("store-opened")  # (migrated; a stop here is before the agent's handlers)
        return store

    @classmethod
    async def _connect(
        cls,
        path: Path,
        synchronous: str,
        readonly: bool,
        check_behind: bool = False,
        max_bytes: int | None = None,
    ) -> Store:
        immutable = False
        while True:
            uri = _uri(path, "ro" if readonly else "rwc", immutable=immutable)
            try:
                # check_same_thread=False: a batch may commit on the event loop's
                # thread; every use of the connection holds Store._conn_lock.
                db = await aiosqlite.connect(
                    uri, uri=True, isolation_level=None, check_same_thread=False
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open database {path}: {exc}") from None
            store = cls(db, path)
            try:
                if readonly and not immutable:
                    try:
                        await db.execute("SELECT count(*) FROM sqlite_master")
                    except sqlite3.OperationalError as exc:
                        if getattr(exc, "sqlite_errorname", "") == "SQLITE_READONLY_ROLLBACK":
                            # A hot rollback journal: the file holds pages of a
                            # transaction that never committed.  Reading it as is
                            # would show them; only a writer may roll it back.
                            await db.close()
                            raise StoreError(
                                f"{path}: its writer was stopped while writing it (a "
                                "rollback journal is left); run the agent on it once"
                            ) from None
                        if not _unreadable_without_writing(exc):
                            raise
                        # A read-only copy: nobody can write it, so read it as is.
                        await db.close()
                        immutable = True
                        continue
                await store._prepare(synchronous, readonly, check_behind, max_bytes)
            except sqlite3.DatabaseError as exc:
                await db.close()
                if _is_full(exc):
                    raise _translate(exc, path) from None
                raise StoreError(f"{path} is not a usable database: {exc}") from None
            except BaseException:
                await db.close()
                raise
            return store

    async def _prepare(
        self,
        synchronous: str,
        readonly: bool,
        check_behind: bool = False,
        max_bytes: int | None = None,
    ) -> None:
        db = self._db
        db.row_factory = sqlite3.Row
        try:
            await db.execute("PRAGMA busy_timeout = 5000")
            version = await self._scalar("PRAGMA user_version")
            app_id = await self._scalar("PRAGMA application_id")
            tables = await self._scalar("SELECT count(*) FROM sqlite_master")
        except sqlite3.DatabaseError as exc:
            if _is_full(exc):
                raise _translate(exc, self.path) from None
            raise StoreError(f"{self.path} is not a usable database: {exc}") from None
        if version == 0 and tables:
            raise StoreError(f"{self.path} holds another application's tables; refusing it")
        if version and app_id != APP_ID:
            raise StoreError(f"{self.path} is not a Tideflow database (application_id)")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this agent "
                f"({SCHEMA_VERSION}); upgrade the agent"
            )
        if readonly:
            if version < SCHEMA_VERSION:
                raise StoreError(f"{self.path} needs migrating; run the agent on it once")
            return
        behind = check_behind and bool(tables) and version == SCHEMA_VERSION
        if behind:
            # Nothing below writes at the current schema; the check runs beside
            # what follows, and writes wait for it (see _check_behind).
            await db.execute("PRAGMA query_only = ON")
        elif tables:
            await self._quick_check()
        else:
            # A new file frees pages as retention deletes (incremental_vacuum); it
            # must be set before the first table exists.  Older files switch in
            # their first retention pass (one VACUUM).
            await db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        try:
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute(f"PRAGMA synchronous = {synchronous}")
            await db.execute("PRAGMA foreign_keys = ON")
            if max_bytes is not None:
                # Before migrating: a migration that adds rows (10 fills the fired
                # record) grew the file past the cap, set only after it.
                page_size = await self._scalar("PRAGMA page_size")
                await db.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page_size)}")
            await self.migrate(SCHEMA_VERSION)
        except sqlite3.DatabaseError as exc:
            raise _translate(exc, self.path) from None
        if behind:
            self._check = asyncio.get_running_loop().create_task(
                self._check_behind(), name="database-check"
            )

    async def _quick_check(self) -> None:
        """Refuse a corrupt file before anything is written into it.

        ``quick_check`` reads every page and checks its structure, which is
        what random bytes over a page break; ``integrity_check`` also matches
        every index entry to its row, at O(N log N) instead of O(N).  On a
        50 MB site database both take about 1 s here (``bench.store_check``).
        """
        try:
            rows = await self._rows("PRAGMA quick_check(5)", raw=True)
        except sqlite3.DatabaseError as exc:
            problems = [str(exc)]
        else:
            problems = [str(row[0]) for row in rows if str(row[0]) != "ok"]
        if problems:
            raise StoreError(
                f"database {self.path} is corrupt ({'; '.join(problems)[:300]}); refusing "
                "to touch it: restore it from a backup or move it aside"
            )

    async def _check_behind(self) -> None:
        """``quick_check`` on a read-only connection of its own; then let writes go."""
        try:
            problems = await in_own_thread(self._quick_check_rows)
            if problems:
                raise StoreError(
                    f"database {self.path} is corrupt ({'; '.join(problems)[:300]}); refusing "
                    "to touch it: restore it from a backup or move it aside"
                )

            def writable(db: sqlite3.Connection) -> None:
                db.execute("PRAGMA query_only = OFF")

            await self._call(writable)
        except BaseException as exc:
            refused = (
                exc
                if isinstance(exc, StoreError)
                else StoreError(
                    f"database {self.path}: its check did not finish ({exc!r}); nothing written"
                )
            )
            self._refused = refused
            jobs, self._pending = self._pending, []
            self._batch_done(jobs, [(False, refused)] * len(jobs))
            if isinstance(exc, StoreError | asyncio.CancelledError):
                raise
            raise refused from exc
        self._check = None
        self._flush()

    def _quick_check_rows(self) -> list[str]:
        """On a worker thread: what ``quick_check`` finds wrong (nothing: the file is sound)."""
        try:
            conn = sqlite3.connect(_uri(self.path, "ro"), uri=True, timeout=5)
        except sqlite3.Error as exc:
            return [str(exc)]
        stop = self._check_stop
        # A store closed meanwhile stops the check: close()'s interrupt, which
        # the page walk looks at as it goes, and this handler every 1,000 steps
        # of the row checks (an interrupt that lands just before the statement
        # starts is lost; the handler still ends it after the page walk).
        conn.set_progress_handler(stop.is_set, 1000)
        self._check_conn = conn
        try:
            if stop.is_set():
                raise sqlite3.OperationalError("interrupted")
            rows = conn.execute("PRAGMA quick_check(5)").fetchall()
        except sqlite3.DatabaseError as exc:
            if stop.is_set():
                raise StoreError(f"database {self.path}: closed before its check ended") from None
            return [str(exc)]
        finally:
            self._check_conn = None
            conn.close()
        return [str(row[0]) for row in rows if str(row[0]) != "ok"]

    async def checked(self) -> None:
        """Wait for the check behind the open (:meth:`open`'s ``check_behind``).

        Returns at once when there is none or it passed; raises
        :class:`StoreError` if it found the file corrupt.
        """
        if self._refused is not None:
            raise self._refused
        if self._check is not None:
            await asyncio.shield(self._check)

    async def _may_write(self) -> None:
        """For a write that does not go through the group commit: wait for the check."""
        if self._refused is not None:
            raise self._refused
        if self._check is not None:
            await self.checked()

    async def migrate(self, target: int) -> None:
        """Apply migrations up to ``target``, each in its own transaction."""
        version = await self._scalar("PRAGMA user_version")
        for number in range(version + 1, target + 1):
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        await self._db.execute(statement)
                if number == 1:
                    await self._db.execute(f"PRAGMA application_id = {APP_ID}")
                await self._db.execute(f"PRAGMA user_version = {number}")
                failpoint("store-migrating")  # migrated, not committed
                await self._db.execute("COMMIT")
            except BaseException:
                # (A full disk may have rolled it back already: a ROLLBACK then raised
                # "no transaction is active" in place of the full disk.)
                if self._db.in_transaction:
                    await self._db.execute("ROLLBACK")
                raise
            log.info("database %s migrated to schema %d", self.path, number)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._drained()
        if self._check is not None:  # nothing waits for it: stop it, not the close
            self._check_stop.set()
            conn = self._check_conn
            if conn is not None:
                with contextlib.suppress(sqlite3.ProgrammingError):  # closed meanwhile
                    conn.interrupt()
            self._check.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreError):
                await self._check
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        try:
            await self._db.close()
        finally:
            if self._lock is not None:
                self._lock.release()

    async def _scalar(self, sql: str, params: Iterable[Any] = ()) -> Any:
        rows = await self._rows(sql, params)
        return rows[0][0] if rows else None

    async def _rows(
        self, sql: str, params: Iterable[Any] = (), *, raw: bool = False
    ) -> list[sqlite3.Row]:
        args = tuple(params)

        def read(db: sqlite3.Connection) -> list[sqlite3.Row]:
            return db.execute(sql, args).fetchall()

        return await self._read(read, raw=raw)

    async def _read(self, read: Callable[[sqlite3.Connection], T], *, raw: bool = False) -> T:
        """Run ``read`` on the database thread, holding the connection: one hop there and back.

        (aiosqlite's cursor API takes three: execute, fetch, close.)  A
        corrupt page met on the way is a :class:`StoreError`; with ``raw``
        the SQLite error itself is raised.
        """
        try:
            conn = self._db._conn
        except ValueError as exc:  # aiosqlite: the connection is gone (closed under us)
            raise StoreError(f"store is closed ({exc})") from None
        try:
            return await self._call(read, conn)
        except sqlite3.DatabaseError as exc:
            if self._closed and isinstance(exc, sqlite3.ProgrammingError):
                # Closed while the read waited its turn (a run's driver still reading
                # as the agent stops): nothing is wrong with the file.
                raise StoreError(f"store is closed ({exc})") from None
            if raw or (
                isinstance(exc, sqlite3.OperationalError)
                and not _is_corrupt(exc)
                and not _damaged_text(exc)
            ):
                raise
            raise StoreError(
                f"database {self.path} is corrupt ({exc}); refusing to go on: "
                "restore it from a backup or move it aside"
            ) from None

    async def _call(
        self, fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection | None = None
    ) -> T:
        """Run ``fn(connection)`` on the database thread, holding the connection.

        One hop each way, whatever ``fn`` does.  Every use of the connection
        off the event loop goes through here (or through a batch), so an inline
        commit (:meth:`_flush`) never meets a statement of the thread's.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if conn is None:
            conn = self._db._conn  # ValueError once closed, as aiosqlite's calls raise
        lock = self._conn_lock

        def on_database_thread() -> None:
            try:
                with lock:
                    result = fn(conn)
            except BaseException as exc:  # handed to the caller, as aiosqlite does
                loop.call_soon_threadsafe(_fail, future, exc)
            else:
                loop.call_soon_threadsafe(_resolve, future, result)

        self._db._tx.put_nowait((None, on_database_thread))
        return await future

    # ------------------------------------------------------------ group commit
    def _enqueue(
        self,
        work: Work,
        *,
        light: bool = False,
        row: tuple[str, str] | None = None,
        awaited: bool = False,
    ) -> asyncio.Future[Any]:
        """Queue a write now (its place in the commit order is fixed here).

        Everything queued during one turn of the event loop goes to the
        database thread together, at the end of that turn (``call_soon``), as
        one transaction; what is queued while a batch is committing goes with
        the next one, sent the moment the first is done.

        ``awaited``: the caller awaits this write at once.  If the batch could
        commit on the loop and the loop has nothing else ready, nothing else
        can join it before the end of the turn: it commits here and now (the
        future is resolved when this returns, so the caller's ``await`` does
        not even yield), sparing the turn to the flush and the turn back to
        the caller (a chain step's, decision 0027).
        """
        if self._closed:
            raise StoreError("store is closed")
        if self._refused is not None:
            raise self._refused
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append(_Job(work, future, light, row))
        if self._inflight or self._flush_scheduled or self._check is not None:
            return future  # (held until the check behind the open passes)
        if awaited and self._may_commit_inline(loop, self._pending):
            self._flush()
        else:
            self._flush_scheduled = True
            self._flush_handle = loop.call_soon(self._flush)
        return future

    async def _submit(self, work: Work, *, light: bool = False) -> Any:
        return await self._enqueue(work, light=light, awaited=True)

    def _flush(self) -> None:
        """Commit every queued job as one batch: on the loop, or on the database thread.

        On the event loop itself when the batch is a few step checkpoints
        (``light``, at most ``INLINE_MAX_JOBS``), nothing else is ready to run
        on the loop, commits have been fast (``INLINE_COMMIT_MAX_SECONDS`` on
        average) and the database thread is not using the connection: the
        loop had nothing to do during the fsync anyway, and a chain step is
        spared two thread hand-offs (bench/README.md, "Issue 15, second pass").  Otherwise one hop
        each way: the batch goes straight onto aiosqlite's own queue, and the
        thread hands the outcome back with one ``call_soon_threadsafe``, which
        resolves every job's future at once; the loop runs on meanwhile.
        Either way the commit is ``synchronous`` as configured, and a job's
        future resolves only once its transaction is committed.
        """
        self._flush_scheduled = False
        if self._inflight or not self._pending or self._check is not None:
            return
        jobs, self._pending = self._pending, []
        self._inflight = True
        loop = asyncio.get_running_loop()
        try:
            conn = self._db._conn
        except ValueError as exc:  # the connection is gone (closed under us)
            self._batch_done(jobs, [(False, exc)] * len(jobs))
            return
        lock = self._conn_lock
        try:
            inline = self._may_commit_inline(loop, jobs) and lock.acquire(blocking=False)
        except BaseException as exc:  # the batch is taken: fail its writes, never hold it
            self._batch_done(jobs, [(False, exc)] * len(jobs))
            if not isinstance(exc, Exception):
                raise
            return  # (each writer gets the exception from its future)
        if inline:
            try:
                started = time.perf_counter()
                outcome = _run_jobs(conn, jobs)
                self._note_commit(time.perf_counter() - started)
            except BaseException as exc:  # KeyboardInterrupt mid-commit: fail the batch
                self._batch_done(jobs, [(False, exc)] * len(jobs))
                raise
            finally:
                lock.release()
            self.inline_commits += 1
            self._batch_done(jobs, outcome)
            return

        def on_database_thread() -> None:
            with lock:
                started = time.perf_counter()
                outcome = _run_jobs(conn, jobs)
                seconds = time.perf_counter() - started
            loop.call_soon_threadsafe(self._batch_done, jobs, outcome, seconds)

        self._db._tx.put_nowait((None, on_database_thread))

    def _may_commit_inline(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> bool:
        # (``_ready`` is the loop's queue of callbacks ready to run: asyncio's
        # own loops have it; another loop implementation commits on the thread.)
        ready = getattr(loop, "_ready", None)
        return (
            ready is not None
            and self._nothing_else(ready)
            and self._commit_seconds < INLINE_COMMIT_MAX_SECONDS
            and len(jobs) <= INLINE_MAX_JOBS
            and all(job.light for job in jobs)
        )

    def _nothing_else(self, ready: collections.deque[asyncio.Handle]) -> bool:
        """Nothing but this store's own scheduled flush is ready to run (it will find
        its jobs already committed).

        Never iterates ``ready``: other threads append to it at any moment
        (``call_soon_threadsafe``: the database's thread, the link's, the
        agent's helper threads), and an iteration they cut raised "deque
        mutated during iteration", from the callback that ends a commit too,
        which then lost its batch and left the store committing nothing ever
        again.  Only the loop removes from it: its length, then its head, hold.
        """
        waiting = len(ready)
        return waiting == 0 or (waiting == 1 and ready[0] is self._flush_handle)

    def _note_commit(self, seconds: float) -> None:
        self._commit_seconds += _COMMIT_AVERAGE_WEIGHT * (seconds - self._commit_seconds)

    def _batch_done(
        self, jobs: list[_Job], outcome: list[tuple[bool, Any]], seconds: float | None = None
    ) -> None:
        if seconds is not None:
            self._note_commit(seconds)
        self._inflight = False
        if self._pending:  # queued meanwhile: the next group commit starts now
            self._flush()
        for job, (ok, value) in zip(jobs, outcome, strict=True):
            if job.future.done():
                continue
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(
                    _translate(value, self.path) if isinstance(value, sqlite3.Error) else value
                )
        if not self._inflight and not self._pending:
            idle, self._idle = self._idle, []
            for waiter in idle:
                if not waiter.done():
                    waiter.set_result(None)

    async def _drained(self) -> None:
        """Wait until every queued write has committed (or failed)."""
        while self._pending or self._inflight or self._flush_scheduled:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            if not self._inflight and not self._flush_scheduled:
                self._flush()
            await waiter

    # ------------------------------------------------------------------ writes
    async def create_run(self, run: RunState, tasks: list[TaskState]) -> bool:
        """Persist a new run with its tasks; False if (uid, generation) is held."""

        record = run.to_record()
        task_rows = [(t.run_id, t.name, int(t.compensation), t.phase) for t in tasks]

        columns = (
            "run_id, uid, generation, namespace, name, spec, traceparent, phase, suspended,"
            " created_at, deadline_at"
        )
        values: tuple[Any, ...] = (
            run.run_id,
            run.uid,
            run.generation,
            run.namespace,
            run.name,
            run.spec_json,
            run.traceparent,
            run.phase,
            int(run.suspended),
            run.created_at,
            run.deadline_at,
        )
        if run.cron is not None:  # a run a schedule fired (migration 5's columns)
            columns += ", schedule_uid, scheduled_at, cron"
            values += (
                run.cron["uid"],
                run.cron["scheduledTime"],
                json.dumps(run.cron, sort_keys=True),
            )
        insert = f"INSERT OR IGNORE INTO runs ({columns}) VALUES ({','.join('?' * len(values))})"

        def work(db: sqlite3.Connection) -> bool:
            cursor = db.execute(insert, values)
            if cursor.rowcount == 0:
                return False
            db.executemany(
                "INSERT INTO task_runs (run_id, task, compensation, phase) VALUES (?,?,?,?)",
                task_rows,
            )
            if run.cron is not None:
                _record_fire(db, run.cron["uid"], run.cron["scheduledTime"], run.run_id)
            _append(db, RUN_RECORD, run.run_id, record)
            return True

        result: bool = await self._submit(work)
        return result

    async def save_run(self, run: RunState) -> None:
        """Persist the run's state and its outbox record, atomically.

        A finished run's last record also files every span still carried
        only in outcome records (decisions 0022 and 0032), in the same
        transaction: once a run's end is committed (and so before it can be
        sent), its spans are in the ``spans`` table.  That, and the ack that
        compacts records, are the only points of filing: not on every step's
        path, and not at close (a close must not stall on a backlog).
        """
        work = _save_run_work(run)
        if not (run.done and self._unfiled):
            await self._submit(work, light=True)
            return
        unfiled, self._unfiled = self._unfiled, 0

        def ended(db: sqlite3.Connection) -> None:
            work(db)
            _file_spans(db)

        try:
            await self._submit(ended)
        except BaseException:
            self._unfiled += unfiled  # not filed: the next trigger files them
            raise

    def save_task(
        self,
        run: RunState,
        task: TaskState,
        logs: dict[str, bytes] | None = None,
        *,
        also_run: bool = False,
        awaited: bool = False,
        progress: bool = False,
    ) -> asyncio.Future[None]:
        """Persist a task transition (and log tails) with its outbox record(s).

        Everything is captured when this is called, so a caller may start the
        write, not await it, and go on changing ``task`` (write-behind).  (Not an
        ``async def``: its body would only run, and capture, at the first await.)
        ``task.span_ref`` (what of the finished attempt's span the record does
        not hold, if set) travels inside the task's outbox record as its
        ``attemptSpan`` (decision 0036: the span is derived from the record,
        :func:`tideflow.tracing.attempt_span_of`); ``task.span_record``, a
        whole span, as its ``span`` (decision 0022).  Either way one record
        per outcome, not a span row and record of their own.  The span is
        filed into the ``spans`` table later, in bulk, by the run's end or
        the ack that compacts it (:meth:`save_run`, :meth:`ack`);
        :meth:`spans_for_trace` sees it meanwhile.

        ``awaited``: the caller awaits the write at once (a step's outcome);
        on an idle loop it is then committed before this returns (see
        :meth:`_enqueue`).  Without it, writes queued in one turn share a
        transaction, as always.

        ``progress``: a checkpoint of an attempt still under way (its Running
        checkpoint, 20 ms after its start).  If a later ``save_task`` of the
        same task commits in the same transaction (the attempt's outcome), this
        one writes nothing, neither its row nor its record: no reader of the
        database, and no one the records reach, could have seen the task in
        that state, and the later record says all it said (decision 0042).
        """
        params = (
            task.phase,
            task.attempt,
            task.started_at,
            task.finished_at,
            task.exit_code,
            json.dumps(task.outputs) if task.outputs else "{}",
            task.message,
            task.next_attempt_at,
            task.pid,
            task.pid_start,
            task.span_id,
            task.interruptions,
            task.failures,
        )
        key = (task.run_id, task.name)
        record = task.to_record(run)
        span = task.span_record
        span_trace = None
        if span is not None:
            record["span"] = span
            span_trace = span["traceId"]
        elif task.span_ref is not None:
            span = record["attemptSpan"] = task.span_ref
            if task.done and task.finished_at is not None and not _ENDED_ELSEWHERE & span.keys():
                # The task's last attempt: its row keeps the ids, its span is derived
                # from the row when read (decision 0038), nothing is filed.
                task.kept_span, span = span, None
            else:
                span_trace = span["traceId"]
        kept = task.kept_span
        tails = [(stream, tail[-LOG_TAIL_BYTES:]) for stream, tail in (logs or {}).items()]
        run_work = _save_run_work(run) if also_run else None

        def work(db: sqlite3.Connection, row: bool = True) -> None:
            if not row and progress:
                return  # superseded in this transaction (see ``progress`` above)
            if row:
                db.execute(
                    "UPDATE task_runs SET phase=?, attempt=?, started_at=?, finished_at=?,"
                    " exit_code=?, outputs=?, message=?, next_attempt_at=?, pid=?, pid_start=?,"
                    " span_id=?, interruptions=?, failures=?, span_ref=? WHERE run_id=? AND task=?",
                    (*params, None if kept is None else record_json(kept), *key),
                )
            _append(db, TASK_RECORD, run.run_id, record, span_trace)
            for stream, tail in tails:
                db.execute(
                    "INSERT OR REPLACE INTO task_logs VALUES (?,?,?,?,?)",
                    (run.run_id, record["task"], record["attempt"], stream, tail),
                )
                body = LogRecord.model_construct(
                    uid=run.uid,
                    generation=run.generation,
                    namespace=run.namespace,
                    name=run.name,
                    task=record["task"],
                    attempt=record["attempt"],
                    stream="stdout" if stream == "stdout" else "stderr",
                    tail=tail.decode("utf-8", "replace"),
                ).model_dump()
                _append(db, LOG_RECORD, run.run_id, body)
            if run_work is not None:
                run_work(db)

        # (Its row's UPDATE is left out when a later save_task of the same task
        # commits in the same transaction, as a short task's Running does with its
        # outcome: that UPDATE writes every column again; see _run_batch.  A
        # progress checkpoint's record is left out then too.)
        job = self._enqueue(work, light=True, row=(task.run_id, task.name), awaited=awaited)
        if span is not None:
            self._unfiled += 1
        return job

    async def save_many(self, run: RunState, tasks: list[TaskState]) -> None:
        """Several task transitions (e.g. skipping a subtree) in one transaction."""

        rows = [
            (
                (
                    t.phase,
                    t.attempt,
                    t.finished_at,
                    t.message,
                    t.next_attempt_at,
                    t.started_at,
                    t.interruptions,
                    t.failures,
                    t.run_id,
                    t.name,
                ),
                t.to_record(run),
            )
            for t in tasks
        ]

        def work(db: sqlite3.Connection) -> None:
            for params, record in rows:
                db.execute(
                    "UPDATE task_runs SET phase=?, attempt=?, finished_at=?, message=?,"
                    " next_attempt_at=?, started_at=?, interruptions=?, failures=?, pid=NULL,"
                    " pid_start=NULL, span_id=NULL WHERE run_id=? AND task=?",
                    params,
                )
                _append(db, TASK_RECORD, run.run_id, record)

        await self._submit(work, light=len(rows) <= _LIGHT_MANY)

    def queue_span(self, record: dict[str, Any]) -> asyncio.Future[Any]:
        """Write a finished span (table + outbox record) with the next group commit.

        Not awaited by the tracer (span export must not block); the write is
        ordered before anything queued after it, such as the transition the
        span describes.
        """
        row = _span_row(record)

        def work(db: sqlite3.Connection) -> None:
            _insert_span(db, row)

        future = self._enqueue(work, light=True)
        future.add_done_callback(_log_span_failure)
        return future

    async def spans_for_trace(self, trace_id: str) -> list[dict[str, Any]]:
        """Every stored span of a trace: filed ones, and those still only in outcome records.

        One statement, so one snapshot: a span being filed meanwhile is seen once.
        """
        rows = await self._rows(
            " SELECT body, 0 AS unfiled, rowid AS n FROM spans WHERE trace_id=?"
            " UNION ALL"
            " SELECT body, 1, seq FROM outbox WHERE span_trace=? AND seq > ("
            "  SELECT coalesce(max(CAST(value AS INTEGER)), 0) FROM meta WHERE key='spans_filed')",
            (trace_id, trace_id),
        )
        found = []
        for row in rows:
            span = stored_span(json.loads(row["body"]))
            if span is not None:
                found.append((span.get("startTimeUnixNano") or 0, row["unfiled"], row["n"], span))
        # The last attempts of finished tasks, kept in their rows (decision 0038).
        # Never filed nor compacted, so a second snapshot cannot see one twice.
        for n, span in enumerate(await self.kept_spans(trace_id=trace_id)):
            found.append((span.get("startTimeUnixNano") or 0, 2, n, span))
        found.sort(key=lambda item: item[:3])
        return [item[3] for item in found]

    async def kept_spans(
        self, *, trace_id: str | None = None, run_id: str | None = None
    ) -> list[dict[str, Any]]:
        """The spans of finished tasks' last attempts, derived from the tasks' rows
        (decision 0038), of one trace or one run."""
        where, args = (
            # (json_valid first: json_extract raises on a damaged row, failing the read.)
            ("json_valid(t.span_ref) AND json_extract(t.span_ref, '$.traceId')=?", trace_id)
            if run_id is None
            else ("t.run_id=?", run_id)
        )
        rows = await self._rows(KEPT_SPANS + f" AND {where} ORDER BY t.rowid", (args,))
        return [span for row in rows if (span := kept_span_of(row)) is not None]

    async def set_meta(self, key: str, value: str) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

        await self._submit(work)

    async def remember_cancel(
        self,
        uid: str,
        reason: str,
        *,
        now: float | None = None,
        keep: int = CANCEL_MARKERS_MAX,
        ttl: float = CANCEL_MARKER_TTL_SECONDS,
    ) -> None:
        """Remember a cancel for a run not held yet; expired and oldest markers go.

        One transaction: drop markers older than ``ttl``, write this one, then
        keep only the ``keep`` newest.
        """
        at = time.time() if now is None else now
        value = json.dumps({"at": at, "reason": reason[:256]})

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                f"DELETE FROM meta WHERE key LIKE 'cancelled:%' AND {_MARKER_AT} < ?",
                (at - ttl,),
            )
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_CANCEL_PREFIX + uid, value))
            db.execute(
                "DELETE FROM meta WHERE key IN (SELECT key FROM meta"
                f" WHERE key LIKE 'cancelled:%' ORDER BY {_MARKER_AT} DESC, rowid DESC"
                " LIMIT -1 OFFSET ?)",
                (keep,),
            )

        await self._submit(work)

    async def cancel_marker(
        self, uid: str, *, now: float | None = None, ttl: float = CANCEL_MARKER_TTL_SECONDS
    ) -> str | None:
        """The reason of a remembered, unexpired cancel for ``uid``, else None."""
        raw = await self.get_meta(_CANCEL_PREFIX + uid)
        if raw is None:
            return None
        try:
            marker = json.loads(raw)
            at, reason = float(marker["at"]), str(marker["reason"])
        except (ValueError, TypeError, KeyError):  # written by an older agent: no age
            return None
        at_now = time.time() if now is None else now
        return reason if at >= at_now - ttl else None

    async def forget_cancel(self, uid: str) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM meta WHERE key=?", (_CANCEL_PREFIX + uid,))

        await self._submit(work)

    async def epoch(self) -> str:
        """This database's identity: made once (random), then always the same."""

        known = await self.get_meta("epoch")  # read first: a write waits for the check
        if known is not None:
            return known

        def work(db: sqlite3.Connection) -> str:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (secrets.token_hex(12),))
            return str(db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0])

        value: str = await self._submit(work)
        return value

    async def ack(self, seq: int) -> int:
        """The cloud applied everything through ``seq``: compact it away.

        Returns the number of records removed.  An ack below the last one is
        stale (a duplicate or a reorder) and changes nothing.
        """

        # What this compacts is filed first, in the same transaction, so no span
        # leaves the outbox unfiled (only that range: a backlog of millions is
        # not scanned per ack; the rows are about to be deleted anyway).
        file_spans = SCHEMA_VERSION >= SPANS_IN_RECORDS

        def work(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT value FROM meta WHERE key='last_acked_seq'").fetchone()
            last = int(row[0]) if row else 0
            marks.append(last)
            if seq <= last:
                return 0
            top = db.execute("SELECT max(seq) FROM outbox").fetchone()[0]
            seq_clamped = min(seq, top if top is not None else last)
            if seq_clamped <= last:
                return 0
            if file_spans:
                _file_spans(db, seq_clamped)
            tally = self._tally
            if tally is not None:  # what leaves the counted part of the outbox
                gone = _outbox_sum(db, "o.seq <= ?", (min(seq_clamped, tally.through),))
                removed_counted.extend(gone)
            cursor = db.execute("DELETE FROM outbox WHERE seq <= ?", (seq_clamped,))
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('last_acked_seq', ?)", (str(seq_clamped),)
            )
            marks.append(seq_clamped)
            return int(cursor.rowcount)

        removed_counted: list[int] = []
        marks: list[int] = []
        removed: int = await self._submit(work)
        if marks:  # committed: the stored mark, for the syncer (no read of it again)
            self.acked_mark = max(self.acked_mark, marks[-1])
        if removed_counted and self._tally is not None:  # committed: now it is gone
            self._tally.depth -= removed_counted[0]
            self._tally.bytes -= removed_counted[1]
        return removed

    # --------------------------------------------------------------- schedules
    async def put_schedule(self, row: ScheduleRow) -> tuple[ScheduleRow, bool]:
        """Keep a schedule (a newer generation replaces the held one); report it Held.

        What already fired stays fired: a replacement keeps the held row's
        high-water mark and counts.  Returns (the row now held, whether it
        changed).  A stale or equal generation changes nothing but is
        confirmed again (the cloud re-sends until it hears back).
        """

        def work(db: sqlite3.Connection) -> tuple[ScheduleRow, bool]:
            found = db.execute("SELECT * FROM schedules WHERE uid=?", (row.uid,)).fetchone()
            held = _schedule_from(found) if found is not None else None
            changed = held is None or row.generation > held.generation
            if held is None:
                new = row
            elif changed:
                new = ScheduleRow(
                    row.uid,
                    row.generation,
                    row.namespace,
                    row.name,
                    row.spec_json,
                    held.received_at,
                    held.last_scheduled,
                    held.last_fired,
                    held.missed_count,
                    held.last_missed,
                )
            else:
                new = held
            if changed:
                db.execute(
                    "INSERT OR REPLACE INTO schedules (uid, generation, namespace, name, spec,"
                    " received_at, last_scheduled, last_fired, missed_count, last_missed)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        new.uid,
                        new.generation,
                        new.namespace,
                        new.name,
                        new.spec_json,
                        new.received_at,
                        new.last_scheduled,
                        new.last_fired,
                        new.missed_count,
                        new.last_missed,
                    ),
                )
            _append(db, SCHEDULE_RECORD, None, new.record("Held"))
            return new, changed

        result: tuple[ScheduleRow, bool] = await self._submit(work)
        return result

    async def withdraw_schedule(
        self,
        row: ScheduleRow,
        state: str = "Withdrawn",
        message: str | None = None,
        *,
        keep_after: float | None = None,
    ) -> bool:
        """Drop a schedule (if held) and report ``state``; True if one was held.

        ``state`` "Rejected" reports a schedule refused on arrival (nothing held).
        Its fired record goes with it, but for the times after ``keep_after``
        (the clock): those fired while the clock read ahead, and the same uid
        delivered again must not fire them a second time when the clock reaches
        them (decision 0049).  Retention drops them once the clock passed them.
        """

        def work(db: sqlite3.Connection) -> bool:
            found = db.execute("SELECT * FROM schedules WHERE uid=?", (row.uid,)).fetchone()
            report = _schedule_from(found) if found is not None else row
            if state == "Rejected" and found is not None:
                # A bad new generation leaves the good held one in place.
                _append(db, SCHEDULE_RECORD, None, row.record(state, message))
                return False
            db.execute("DELETE FROM schedules WHERE uid=?", (row.uid,))
            if keep_after is None:
                db.execute("DELETE FROM schedule_fires WHERE schedule_uid=?", (row.uid,))
            else:
                db.execute(
                    "DELETE FROM schedule_fires WHERE schedule_uid=? AND scheduled_at <= ?",
                    (row.uid, keep_after),
                )
            _append(db, SCHEDULE_RECORD, None, report.record(state, message))
            return found is not None

        held: bool = await self._submit(work)
        return held

    async def advance_schedule(
        self,
        uid: str,
        *,
        last_scheduled: float,
        fired: float | None = None,
        missed: int = 0,
        last_missed: float | None = None,
    ) -> None:
        """Move a schedule's high-water mark; missed times are reported to the cloud."""

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE schedules SET last_scheduled=max(coalesce(last_scheduled, 0), ?),"
                " last_fired=coalesce(?, last_fired), missed_count=missed_count+?,"
                " last_missed=coalesce(?, last_missed) WHERE uid=?",
                (last_scheduled, fired, missed, last_missed, uid),
            )
            if missed:
                found = db.execute("SELECT * FROM schedules WHERE uid=?", (uid,)).fetchone()
                if found is not None:
                    _append(db, SCHEDULE_RECORD, None, _schedule_from(found).record("Held"))

        await self._submit(work)

    async def rewind_schedule(
        self, uid: str, to: float, *, unmissed: int = 0, last_missed: float | None = None
    ) -> ScheduleRow | None:
        """Move a schedule's high-water mark back to ``to`` (its clock stepped back).

        Only ever down (a mark at or below ``to`` is left as it is); the row as
        moved, None if it did not move.  The times above ``to`` that already fired stay in the fired
        record (:meth:`schedule_fired_at`), which the scheduler consults before
        it fires any time: none of them fires again.  The move is reported to
        the cloud in the same transaction (a ``schedule`` record naming the mark
        it moved from), so that it shows the site's corrected time (decision 0049).
        ``unmissed``: how many of the times counted missed lie above ``to`` (they
        now fire as the clock reaches them), taken off the count; a last missed
        time above ``to`` becomes ``last_missed`` (the latest one at or before it).
        """

        def work(db: sqlite3.Connection) -> ScheduleRow | None:
            found = db.execute("SELECT * FROM schedules WHERE uid=?", (uid,)).fetchone()
            if found is None:
                return None
            held = _schedule_from(found)
            mark = held.last_scheduled if held.last_scheduled is not None else held.received_at
            if mark <= to:
                return None
            missed = max(0, held.missed_count - unmissed)
            last = held.last_missed
            if (last is not None and last > to) or not missed:
                last = last_missed if missed else None
            db.execute(
                "UPDATE schedules SET last_scheduled=?, missed_count=?, last_missed=? WHERE uid=?",
                (to, missed, last, uid),
            )
            moved = replace(held, last_scheduled=to, missed_count=missed, last_missed=last)
            _append(db, SCHEDULE_RECORD, None, moved.record("Held", stepped_back_from=mark))
            return moved

        moved: ScheduleRow | None = await self._submit(work)
        return moved

    async def schedule_fired_between(self, schedule_uid: str, after: float, upto: float) -> int:
        """How many times in (``after``, ``upto``] the fired record holds for a schedule."""
        count = await self._scalar(
            "SELECT count(*) FROM schedule_fires WHERE schedule_uid=? AND scheduled_at > ?"
            " AND scheduled_at <= ?",
            (schedule_uid, after, upto),
        )
        return int(count or 0)

    async def list_schedules(self) -> list[ScheduleRow]:
        rows = await self._rows("SELECT * FROM schedules ORDER BY namespace, name")
        return [_schedule_from(row) for row in rows]

    async def schedule_runs(self, schedule_uid: str, *, unfinished: bool = False) -> list[RunState]:
        """Runs a schedule fired, oldest scheduled time first."""
        sql = "SELECT * FROM runs WHERE schedule_uid=?"
        if unfinished:
            sql += " AND phase NOT IN ('Succeeded','Failed','Cancelled')"
        rows = await self._rows(sql + " ORDER BY scheduled_at, rowid", (schedule_uid,))
        return [_run_from(row) for row in rows]

    async def request_cancel(self, run_id: str, reason: str) -> None:
        """Record that an unfinished run is to be cancelled (honoured when it next starts).

        For a run live in this process, whose driver holds the request in memory
        and commits its end later: a kill before that end resumed the run as if
        never asked (a run a Replace schedule replaced ran on beside its successor).
        """

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE runs SET cancel_requested=1, message=? WHERE run_id=?"
                " AND phase NOT IN ('Succeeded','Failed','Cancelled') AND cancel_requested=0",
                (reason, run_id),
            )

        await self._submit(work)

    async def schedule_runs_at(self, schedule_uid: str, times: list[float]) -> dict[float, str]:
        """The runs a schedule (any generation) holds for each of ``times``: time -> run id."""
        return await self._times_at("runs", schedule_uid, times)

    async def schedule_fired_at(self, schedule_uid: str, times: list[float]) -> dict[float, str]:
        """Which of ``times`` the schedule (any generation) fired: time -> the run it made.

        The fired record (migration 10) and the runs held: a run retention has
        pruned is still known by its record, and a fire whose record was dropped
        by the bound (``FIRES_KEPT``) by its run, while it is held.
        """
        found = await self._times_at("schedule_fires", schedule_uid, times)
        missing = [t for t in times if t not in found]
        if missing:
            found.update(await self._times_at("runs", schedule_uid, missing))
        return found

    async def _times_at(
        self, table: str, schedule_uid: str, times: list[float]
    ) -> dict[float, str]:
        found: dict[float, str] = {}
        # Of several runs held for one time (generations), the first made; the fired
        # record holds one per time.
        order = " ORDER BY rowid" if table == "runs" else ""
        for start in range(0, len(times), 500):  # within SQLite's bound parameters
            chunk = times[start : start + 500]
            rows = await self._rows(
                f"SELECT scheduled_at, run_id FROM {table} WHERE schedule_uid=? AND scheduled_at"
                f" IN ({','.join('?' * len(chunk))}){order}",
                (schedule_uid, *chunk),
            )
            for row in rows:
                found.setdefault(row[0], row[1])
        return found

    # ---------------------------------------------------------------- retention
    async def prune(
        self,
        *,
        finished_before: float,
        history: dict[str, tuple[int, int]] | None = None,
        chunk: int = 500,
    ) -> int:
        """Delete finished runs the cloud has acknowledged; returns how many.

        A run goes when it finished before ``finished_before``, or when its
        schedule (``history``: schedule uid -> (successful, failed) limits)
        has more finished runs than the limit (oldest scheduled time first).
        Never a run with a record still in the outbox (not acknowledged) nor
        an unfinished one.  Its tasks, log tails and spans go with it, in
        transactions of ``chunk`` runs, then the freed pages are returned to
        the file system (:meth:`vacuum`).
        """
        history = history or {}

        def victims(db: sqlite3.Connection) -> list[str]:
            finished = db.execute(
                "SELECT run_id, schedule_uid, phase, finished_at FROM runs"
                " WHERE phase IN ('Succeeded','Failed','Cancelled')"
                " ORDER BY scheduled_at DESC, finished_at DESC, rowid DESC"
            ).fetchall()
            if not _may_prune(finished, finished_before, history):
                return []
            # One pass over the outbox, not one per run (it has no index on run_id,
            # and a site back from offline can hold millions of records there).
            held = {
                row[0]
                for row in db.execute("SELECT DISTINCT run_id FROM outbox WHERE run_id IS NOT NULL")
            }
            rows = [row for row in finished if row[0] not in held]
            out: list[str] = []
            kept: dict[tuple[str, bool], int] = {}
            for run_id, schedule, phase, finished in rows:
                if finished is not None and finished < finished_before:
                    out.append(run_id)
                    continue
                if schedule is None or schedule not in history:
                    continue
                good = phase == "Succeeded"
                limit = history[schedule][0 if good else 1]
                kept[(schedule, good)] = kept.get((schedule, good), 0) + 1
                if kept[(schedule, good)] > limit:
                    out.append(run_id)
            return out

        doomed: list[str] = await self._submit(victims)
        for start in range(0, len(doomed), chunk):
            batch = [(run_id,) for run_id in doomed[start : start + chunk]]

            def delete(db: sqlite3.Connection, batch: list[tuple[str]] = batch) -> None:
                # Re-checked inside the transaction: a record may have been written since.
                db.execute("CREATE TEMP TABLE IF NOT EXISTS doomed (run_id TEXT PRIMARY KEY)")
                db.execute("DELETE FROM temp.doomed")
                db.executemany("INSERT OR IGNORE INTO temp.doomed VALUES (?)", batch)
                db.execute(
                    "DELETE FROM temp.doomed WHERE run_id IN"
                    " (SELECT run_id FROM outbox WHERE run_id IS NOT NULL)"
                )
                for table in ("task_logs", "task_runs", "spans", "runs"):
                    db.execute(
                        f"DELETE FROM {table} WHERE run_id IN (SELECT run_id FROM temp.doomed)"
                    )

            await self._submit(delete)
        cutoff_ns = int(finished_before * 1e9)

        def loose_spans(db: sqlite3.Connection) -> None:
            db.execute(
                "DELETE FROM spans WHERE run_id IS NULL AND end_ns < ? AND rowid NOT IN"
                " (SELECT span_rowid FROM outbox WHERE span_rowid IS NOT NULL)",
                (cutoff_ns,),
            )

        await self._submit(loose_spans)

        def loose_fires(db: sqlite3.Connection) -> None:
            # A withdrawn schedule's times fired ahead (withdraw_schedule's
            # keep_after), once the clock passed them: no delivery fires them now.
            db.execute(
                "DELETE FROM schedule_fires WHERE scheduled_at < ? AND schedule_uid NOT IN"
                " (SELECT uid FROM schedules)",
                (finished_before,),
            )

        await self._submit(loose_fires)
        await self.vacuum()
        return len(doomed)

    async def vacuum(self) -> None:
        """Give freed pages back to the file system (incremental; one full VACUUM
        the first time on a file made before incremental vacuum was set)."""
        await self._may_write()
        await self._drained()  # no batch half-way (each runs whole, holding the connection)

        def give_back(conn: sqlite3.Connection) -> None:
            mode = conn.execute("PRAGMA auto_vacuum").fetchone()[0]
            # (run to their end: Python's execute steps incremental_vacuum once, which
            # frees a single page; executescript runs it whole)
            if mode != 2:
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL").fetchall()
                conn.execute("VACUUM").fetchall()
            else:
                conn.executescript("PRAGMA incremental_vacuum;")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

        try:
            await self._call(give_back)
        except sqlite3.OperationalError as exc:
            # A statement of the running agent (a reader's cursor, a write queued
            # since the join) holds the file: giving pages back can wait for the
            # next pass; it must never stop the agent.
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            log.info("vacuum deferred to the next retention pass: %s", exc)

    def size(self) -> int:
        """Bytes the database file (with its WAL) takes on disk."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(f"{self.path}{suffix}")
        return total

    # ------------------------------------------------------------------- reads
    async def get_meta(self, key: str) -> str | None:
        value = await self._scalar("SELECT value FROM meta WHERE key=?", (key,))
        return None if value is None else str(value)

    async def load_run(self, run_id: str) -> tuple[RunState, list[TaskState]]:
        rows = await self._rows("SELECT * FROM runs WHERE run_id=?", (run_id,))
        if not rows:
            raise KeyError(run_id)
        run = _run_from(rows[0])
        tasks = [
            _task_from(row)
            for row in await self._rows(
                "SELECT * FROM task_runs WHERE run_id=? ORDER BY rowid", (run_id,)
            )
        ]
        return run, tasks

    async def find_run(self, uid: str, generation: int) -> RunState | None:
        rows = await self._rows(
            "SELECT * FROM runs WHERE uid=? AND generation=?", (uid, generation)
        )
        return _run_from(rows[0]) if rows else None

    async def runs_for_uid(self, uid: str, generation: int | None = None) -> list[RunState]:
        sql = "SELECT * FROM runs WHERE uid=?"
        params: list[Any] = [uid]
        if generation is not None:
            sql += " AND generation=?"
            params.append(generation)
        return [_run_from(row) for row in await self._rows(sql, params)]

    async def latest_run(self, namespace: str, name: str) -> RunState | None:
        rows = await self._rows(
            "SELECT * FROM runs WHERE namespace=? AND name=? ORDER BY created_at DESC, rowid DESC"
            " LIMIT 1",
            (namespace, name),
        )
        return _run_from(rows[0]) if rows else None

    async def list_runs(self, *, unfinished: bool = False) -> list[RunState]:
        sql = "SELECT * FROM runs"
        if unfinished:
            sql += " WHERE phase NOT IN ('Succeeded','Failed','Cancelled')"
        return [_run_from(row) for row in await self._rows(sql + " ORDER BY created_at, rowid")]

    async def task_counts(self, run_id: str) -> dict[str, int]:
        rows = await self._rows(
            "SELECT phase, count(*) AS n FROM task_runs WHERE run_id=? GROUP BY phase", (run_id,)
        )
        return {row["phase"]: row["n"] for row in rows}

    async def log_tails(
        self, run_id: str, task: str, attempt: int | None = None
    ) -> list[tuple[int, str, bytes]]:
        sql = "SELECT attempt, stream, tail FROM task_logs WHERE run_id=? AND task=?"
        params: list[Any] = [run_id, task]
        if attempt is not None:
            sql += " AND attempt=?"
            params.append(attempt)
        rows = await self._rows(sql + " ORDER BY attempt, stream DESC", params)
        return [(row["attempt"], row["stream"], bytes(row["tail"])) for row in rows]

    async def outbox_stats(self) -> OutboxStats:
        """Depth, bytes, first and last seq, and the acked mark of the outbox.

        A writer counts the whole outbox once (a site back from offline can
        hold millions of records: a scan of its bodies takes seconds), then
        only what was written since, and subtracts what each ack compacts.
        """
        # Only the writer sees every ack: a reader counts afresh each time.
        writer = self._lock is not None
        tally = self._tally if writer else None

        def read(db: sqlite3.Connection) -> OutboxStats:
            nonlocal tally
            if tally is None:
                depth, size, through = _outbox_sum(db, "1", ())
                tally = _Tally(through, depth, size)
            else:
                depth, size, through = _outbox_sum(db, "o.seq > ?", (tally.through,))
                if depth:
                    tally.through, tally.depth, tally.bytes = (
                        through, tally.depth + depth, tally.bytes + size
                    )  # fmt: skip
            # (Two subqueries: each is one b-tree seek; min and max in one SELECT scan it all.)
            lo, hi = db.execute(
                "SELECT (SELECT min(seq) FROM outbox), (SELECT max(seq) FROM outbox)"
            ).fetchone()
            acked = db.execute("SELECT value FROM meta WHERE key='last_acked_seq'").fetchone()
            return OutboxStats(tally.depth, tally.bytes, lo, hi, int(acked[0]) if acked else 0)

        stats = await self._read(read)
        if self._tally is None and writer:
            self._tally = tally
        return stats

    async def outbox_after(
        self, seq: int, *, max_count: int = 500, max_bytes: int = 256 * 1024
    ) -> list[OutboxRecord]:
        """Records after ``seq`` in order, bounded by count and total bytes."""
        rows = await self.outbox_batch(seq, max_count=max_count, max_bytes=max_bytes)
        return [OutboxRecord(*row) for row in rows]

    async def outbox_batch(
        self, seq: int, *, max_count: int = 500, max_bytes: int = 256 * 1024
    ) -> list[tuple[int, str, str]]:
        """:meth:`outbox_after` as ``(seq, kind, body)`` tuples: what the syncer sends.

        Read in one hop, stopping at the byte bound (rows past it are not read).
        """

        def read(db: sqlite3.Connection) -> list[tuple[int, str, str]]:
            cursor = db.cursor()
            cursor.row_factory = None
            batch: list[tuple[int, str, str]] = []
            size = 0
            try:
                for row in cursor.execute(
                    f"{_OUTBOX_ROWS} WHERE o.seq > ? ORDER BY o.seq LIMIT ?", (seq, max_count)
                ):
                    size += len(row[2]) + 32
                    if batch and size > max_bytes:
                        break
                    batch.append(row)
            finally:
                cursor.close()
            return batch

        return await self._read_beside(read)

    async def _read_beside(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``read`` on a read-only connection of its own (the syncer's reads).

        WAL lets it read beside the writer: a batch to send is read while the
        previous ack's compaction waits for its fsync on the database thread,
        not after it (the send window opens on the ack; an fsync under load
        takes 5-50 ms).  It sees what is committed, as a read between the
        writer's transactions does.  A store opened read-only has one
        connection and reads there.
        """
        if self._lock is None:
            return await self._read(read)
        if self._closed:
            raise StoreError("store is closed")
        if self._reader is None:
            self._reader = _Reader(self.path)
        try:
            return await self._reader.run(read)
        except sqlite3.DatabaseError as exc:
            if self._closed and isinstance(exc, sqlite3.ProgrammingError):  # (as in _read)
                raise StoreError(f"store is closed ({exc})") from None
            if isinstance(exc, sqlite3.OperationalError) and not _is_corrupt(exc):
                raise
            raise StoreError(
                f"database {self.path} is corrupt ({exc}); refusing to go on: "
                "restore it from a backup or move it aside"
            ) from None

    async def outbox_records(self, run_id: str | None = None) -> list[OutboxRecord]:
        sql = _OUTBOX_ROWS
        params: tuple[Any, ...] = ()
        if run_id is not None:
            sql += " WHERE o.run_id=?"
            params = (run_id,)
        rows = await self._rows(sql + " ORDER BY o.seq", params)
        return [OutboxRecord(row["seq"], row["kind"], row["body"]) for row in rows]

    async def integrity_check(self) -> str:
        return str(await self._scalar("PRAGMA integrity_check"))


# --------------------------------------------------------------------- helpers
class _Reader:
    """A read-only connection on a thread of its own (``Store._read_beside``)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-reader")
        self._conn: sqlite3.Connection | None = None  # made and used on that thread only

    def _call(self, read: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = sqlite3.connect(_uri(self._path, "ro"), uri=True, timeout=5)
        return read(self._conn)

    async def run(self, read: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, read)

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        with contextlib.suppress(RuntimeError):  # (the pool was shut down already)
            await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=True)


@dataclass
class _Tally:
    """The outbox records with seq <= ``through``: how many, and their body bytes."""

    through: int
    depth: int
    bytes: int


def _outbox_sum(db: sqlite3.Connection, where: str, params: tuple[Any, ...]) -> list[int]:
    """Count, body bytes and highest seq of the outbox records matching ``where``.

    (Bytes as a BLOB's length: SQLite counts a TEXT's characters by decoding
    it, twice the CPU over a million-record outbox; bodies are ASCII JSON,
    so the two agree.)
    """
    row = db.execute(
        "SELECT count(*), coalesce(sum(length(CAST(coalesce(s.body, o.body) AS BLOB))), 0),"
        " coalesce(max(o.seq), 0) FROM outbox o LEFT JOIN spans s ON s.rowid = o.span_rowid"
        f" WHERE {where}",
        params,
    ).fetchone()
    return [int(row[0]), int(row[1]), int(row[2])]


def _append(
    db: sqlite3.Connection, kind: str, run_id: str | None, body: Any, span_trace: str | None = None
) -> None:
    if span_trace is None:
        db.execute(
            "INSERT INTO outbox (kind, run_id, body, created_at) VALUES (?,?,?,?)",
            (kind, run_id, record_json(body), time.time()),
        )
    else:
        db.execute(
            "INSERT INTO outbox (kind, run_id, body, created_at, span_trace) VALUES (?,?,?,?,?)",
            (kind, run_id, record_json(body), time.time(), span_trace),
        )


# The rows of finished tasks whose last attempt's span is kept there (decision 0038),
# with their runs' names: what kept_span_of derives each span from.
KEPT_SPANS = (
    "SELECT r.uid, r.generation, r.namespace, r.name, t.* FROM task_runs t"
    " JOIN runs r ON r.run_id = t.run_id WHERE t.span_ref IS NOT NULL"
)


def kept_span_of(row: sqlite3.Row) -> dict[str, Any] | None:
    """The span a row of :data:`KEPT_SPANS` keeps: the outcome record the task's last
    attempt sent, rebuilt from the row, and the span derived from it as the cloud does."""
    run = RunState(row["run_id"], row["uid"], row["generation"], row["namespace"], row["name"], "")
    try:
        record = _task_from(row).to_record(run)
        record["attemptSpan"] = json.loads(row["span_ref"])
        return attempt_span_of(record)
    except (ValueError, TypeError, KeyError, AttributeError):  # a damaged row: no span
        log.warning("task %s of run %s keeps an unreadable span", row["task"], row["run_id"])
        return None


# An attempt span's ids that say its end lies outside its record (an outcome
# without ``finishedAt``): such a span is filed, never kept in the task's row.
_ENDED_ELSEWHERE = frozenset({"endedAt", "retryDelaySeconds"})

# The spans carried in outcome records after the filing mark, copied into spans
# in seq order.  An outcome with an ``attemptSpan`` (decision 0036) is filed as
# the record itself (its span is derived when read: tideflow.tracing.stored_span);
# a whole ``span`` (decision 0022) as that span's text, as written.  SQLite parses each
# body once per row for all of them.
_FILE_SPANS = (
    "INSERT INTO spans (trace_id, span_id, parent_span_id, run_id, name, start_ns, end_ns, body)"
    " SELECT span_trace, coalesce(ref_id, json_extract(body, '$.span.spanId')),"
    " CASE WHEN ref_id IS NOT NULL THEN json_extract(body, '$.attemptSpan.parentSpanId')"
    "  ELSE json_extract(body, '$.span.parentSpanId') END,"
    " run_id,"
    " CASE WHEN ref_id IS NOT NULL THEN 'task ' || json_extract(body, '$.task')"
    "  ELSE json_extract(body, '$.span.name') END,"
    " CASE WHEN ref_id IS NOT NULL THEN coalesce(CAST(round(json_extract(body, '$.startedAt')"
    "  * 1e6) AS INTEGER) * 1000, 0)"
    "  ELSE coalesce(json_extract(body, '$.span.startTimeUnixNano'), 0) END,"
    " CASE WHEN ref_id IS NOT NULL THEN coalesce(CAST(round(coalesce(json_extract(body,"
    "   '$.attemptSpan.endedAt'), json_extract(body, '$.finishedAt')) * 1e6) AS INTEGER)"
    "  * 1000, 0)"
    "  ELSE coalesce(json_extract(body, '$.span.endTimeUnixNano'), 0) END,"
    " CASE WHEN ref_id IS NOT NULL THEN body ELSE json_extract(body, '$.span') END"
    " FROM (SELECT seq, run_id, span_trace, body, json_extract(body, '$.attemptSpan.spanId')"
    "  AS ref_id FROM outbox WHERE seq > ? AND seq <= ? AND span_trace IS NOT NULL)"
    # (A record cut to fit the size limit may have had its span's ids emptied away.)
    " WHERE coalesce(ref_id, json_extract(body, '$.span.spanId')) IS NOT NULL ORDER BY seq"
)


def _filed_through(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE key='spans_filed'").fetchone()
    return int(row[0]) if row else 0


def _file_spans(db: sqlite3.Connection, through: int | None = None) -> int:
    """File the spans carried in outcome records after the mark (up to seq ``through``,
    default all); move the mark (one transaction with the caller's, so each span
    is filed exactly once)."""
    mark = _filed_through(db)
    top = db.execute("SELECT max(seq) FROM outbox").fetchone()[0]
    if through is not None and top is not None:
        top = min(top, through)
    if top is None or top <= mark:
        return 0
    cursor = db.execute(_FILE_SPANS, (mark, top))
    db.execute("INSERT OR REPLACE INTO meta VALUES ('spans_filed', ?)", (str(top),))
    return int(cursor.rowcount)


def _past_the_mark(db: sqlite3.Connection) -> bool:
    top = db.execute("SELECT max(seq) FROM outbox").fetchone()[0]
    return top is not None and top > _filed_through(db)


SpanRow = tuple[str, str, str | None, str | None, str, int, int, str]


def _span_row(record: dict[str, Any]) -> SpanRow:
    return (
        record["traceId"],
        record["spanId"],
        record.get("parentSpanId"),
        record.get("attributes", {}).get("tideflow.run_id"),
        record["name"],
        record["startTimeUnixNano"],
        record["endTimeUnixNano"],
        record_json(record),
    )


def _insert_span(db: sqlite3.Connection, row: SpanRow) -> None:
    # The body is stored once, in spans (kept for `trace` after the outbox row
    # is acked and compacted); the outbox row points at it.
    cursor = db.execute("INSERT INTO spans VALUES (?,?,?,?,?,?,?,?)", row)
    db.execute(
        "INSERT INTO outbox (kind, run_id, body, created_at, span_rowid) VALUES (?,?,'',?,?)",
        (SPAN_RECORD, row[3], time.time(), cursor.lastrowid),
    )


def _save_run_work(run: RunState) -> Work:
    params = (
        run.phase,
        run.reason,
        run.message,
        int(run.suspended),
        int(run.cancel_requested),
        run.started_at,
        run.finished_at,
        run.deadline_at,
        run.trace_id,
        run.span_id,
        run.run_id,
    )
    record = run.to_record()

    def work(db: sqlite3.Connection) -> None:
        db.execute(
            "UPDATE runs SET phase=?, reason=?, message=?, suspended=?, cancel_requested=?,"
            " started_at=?, finished_at=?, deadline_at=?, trace_id=?, span_id=? WHERE run_id=?",
            params,
        )
        _append(db, RUN_RECORD, run.run_id, record)

    return work


def _may_prune(
    finished: list[sqlite3.Row], before: float, history: dict[str, tuple[int, int]]
) -> bool:
    """Could any of these finished runs go, before looking at the outbox?

    True if one finished before ``before``, or a schedule has more finished runs
    than its history limit (counting them all: a superset of what can go).
    """
    counts: dict[tuple[str, bool], int] = {}
    for _run_id, schedule, phase, finished_at in finished:
        if finished_at is not None and finished_at < before:
            return True
        if schedule is not None and schedule in history:
            good = phase == "Succeeded"
            counts[(schedule, good)] = counts.get((schedule, good), 0) + 1
            if counts[(schedule, good)] > history[schedule][0 if good else 1]:
                return True
    return False


def _run_from(row: sqlite3.Row) -> RunState:
    return RunState(
        run_id=row["run_id"],
        uid=row["uid"],
        generation=row["generation"],
        namespace=row["namespace"],
        name=row["name"],
        spec_json=row["spec"],
        phase=row["phase"],
        reason=row["reason"],
        message=row["message"],
        suspended=bool(row["suspended"]),
        cancel_requested=bool(row["cancel_requested"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        deadline_at=row["deadline_at"],
        traceparent=row["traceparent"],
        trace_id=row["trace_id"],
        span_id=row["span_id"],
        # (sqlite3.Row's `in` looks at values: the column test needs keys())
        cron=json.loads(row["cron"]) if "cron" in row.keys() and row["cron"] else None,  # noqa: SIM118
    )


def _record_fire(db: sqlite3.Connection, schedule_uid: str, at: float, run_id: str) -> None:
    """Record that ``schedule_uid`` fired its time ``at``; keep its FIRES_KEPT newest."""
    db.execute(
        "INSERT OR IGNORE INTO schedule_fires (schedule_uid, scheduled_at, run_id) VALUES (?,?,?)",
        (schedule_uid, at, run_id),
    )
    # The FIRES_KEPT-th newest time, if there are that many; everything older goes.
    db.execute(
        "DELETE FROM schedule_fires WHERE schedule_uid=? AND scheduled_at < (SELECT scheduled_at"
        " FROM schedule_fires WHERE schedule_uid=? ORDER BY scheduled_at DESC LIMIT 1 OFFSET ?)",
        (schedule_uid, schedule_uid, FIRES_KEPT - 1),
    )


def _schedule_from(row: sqlite3.Row) -> ScheduleRow:
    return ScheduleRow(
        uid=row["uid"],
        generation=row["generation"],
        namespace=row["namespace"],
        name=row["name"],
        spec_json=row["spec"],
        received_at=row["received_at"],
        last_scheduled=row["last_scheduled"],
        last_fired=row["last_fired"],
        missed_count=row["missed_count"],
        last_missed=row["last_missed"],
    )


def _task_from(row: sqlite3.Row) -> TaskState:
    return TaskState(
        run_id=row["run_id"],
        name=row["task"],
        compensation=bool(row["compensation"]),
        phase=row["phase"],
        attempt=row["attempt"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        exit_code=row["exit_code"],
        outputs=json.loads(row["outputs"] or "{}"),
        message=row["message"],
        next_attempt_at=row["next_attempt_at"],
        pid=row["pid"],
        pid_start=row["pid_start"],
        span_id=row["span_id"],
        interruptions=row["interruptions"],
        failures=row["failures"],
        kept_span=json.loads(row["span_ref"]) if row["span_ref"] else None,
    )


def _run_jobs(conn: sqlite3.Connection, jobs: list[_Job]) -> list[tuple[bool, Any]]:
    """Commit ``jobs`` as one transaction, on the database's own thread.

    If the batch fails, each job is tried again in a transaction of its own,
    in order: the failing change is isolated, and when the disk is full what
    still fits is kept.  Returns (ok, result or exception) per job.
    """
    try:
        return [(True, result) for result in _run_batch(conn, jobs)]
    except Exception as exc:  # not only SQLite's: a lost batch would hang its writers
        if len(jobs) == 1:
            return [(False, exc)]
    outcome: list[tuple[bool, Any]] = []
    for job in jobs:
        try:
            outcome.append((True, _run_batch(conn, [job])[0]))
        except Exception as exc:
            outcome.append((False, exc))
    return outcome


def _run_batch(conn: sqlite3.Connection, jobs: list[_Job]) -> list[Any]:
    """One transaction for a whole batch, run on the database's own thread.

    A single hop to that thread per batch (not one per statement) is what
    keeps a short step's checkpoints cheap.  A task row that a later job of
    the batch writes again (a short task's Running and its outcome) is
    updated once, by that later job: each such UPDATE writes every column, so
    the committed row is the same; every job's records are written, in order,
    but a progress checkpoint's (``save_task(progress=True)``), which the later
    job's record supersedes.
    """
    last: dict[tuple[str, str], int] = {}
    if len(jobs) > 1:
        last = {job.row: index for index, job in enumerate(jobs) if job.row is not None}
    conn.execute("BEGIN IMMEDIATE")
    try:
        results = [
            job.work(conn)
            if job.row is None or last.get(job.row, index) == index
            # (only save_task's work has the flag; Work's signature keeps it out of sight)
            else job.work(conn, False)  # type: ignore[call-arg]
            for index, job in enumerate(jobs)
        ]
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return results


def _resolve(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _log_span_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("a span could not be stored: %s", future.exception())


def _is_corrupt(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith("SQLITE_CORRUPT") or name.startswith("SQLITE_NOTADB")


def _damaged_text(exc: sqlite3.Error) -> bool:
    """A stored text is not UTF-8: its page is sound (``quick_check`` does not look
    inside text) but its bytes took damage; nothing this agent writes is so."""
    return str(exc).startswith("Could not decode to UTF-8")


def _is_full(exc: sqlite3.Error) -> bool:
    # SHMSIZE: the WAL's shared-memory file could not grow, which is how a full
    # disk shows when a database is opened (reads included), not as SQLITE_FULL.
    name = getattr(exc, "sqlite_errorname", "")
    return name == "SQLITE_IOERR_SHMSIZE" or (
        isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()
    )


def _translate(exc: sqlite3.Error, path: Path) -> StoreError:
    if _is_full(exc):
        return StoreFullError(f"disk full at {path}: {exc}; committed state is kept")
    return StoreError(f"database {path}: {exc}")
