"""The embedded default: one SQLite file that survives restarts, written in groups off the loop.

* One writer thread owns the write connection. Commits queue up; the writer takes everything queued,
  writes it in one transaction (group commit) and then resolves the group's ``Ack`` once: a PATCH
  answers when its group is stored, and a burst of changes costs one transaction, not one each.
* The latest snapshot of every live task, and of every change not yet written, stays in memory, so
  the manager's read-compute-commit and the stream set-up never wait on disk. Readers of older data
  (listings, counts, event logs, finished tasks) use a connection of their own per thread (WAL: readers
  never wait on the writer), and the loop calls them through a worker thread.
* One process per file: an exclusive ``flock`` on ``<file>.lock``. A second process refuses to start
  with a message naming the file and pointing to ``redis://`` (sharing the file would need every
  process to re-read what the others wrote; Redis is the store made for that).
* ``synchronous=NORMAL`` in WAL mode: a committed transaction survives a process crash (kill -9);
  only a power loss can lose the last ones, which is acceptable for progress reports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import heapq
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable
from datetime import UTC as _UTC
from datetime import datetime
from pathlib import Path
from typing import Any

from ..bus import yield_on_wake
from ..models import Task, TaskStatus
from ..query import DEFAULT_PAGE, Page, TaskQuery, search_text, sort_key
from . import Ack, Conflict, LocalStore

__all__ = ["SqliteStore", "StoreLocked"]

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id    TEXT PRIMARY KEY,
    task_type  TEXT NOT NULL,
    status     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    version    INTEGER NOT NULL,
    body       TEXT NOT NULL,
    internal   TEXT NOT NULL,
    search     TEXT NOT NULL,
    sid        INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_by_created ON tasks (created_at, task_id);
CREATE INDEX IF NOT EXISTS tasks_by_updated ON tasks (updated_at, task_id);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, created_at, task_id);
CREATE INDEX IF NOT EXISTS tasks_by_status_updated ON tasks (status, updated_at, task_id);
DROP INDEX IF EXISTS tasks_by_type;
CREATE INDEX IF NOT EXISTS tasks_by_type_status ON tasks (task_type, status, created_at, task_id);
CREATE INDEX IF NOT EXISTS tasks_by_type_status_updated ON tasks (task_type, status, updated_at, task_id);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_by_sid ON tasks (sid);
CREATE VIRTUAL TABLE IF NOT EXISTS tasks_fts USING fts5(
    search, content='tasks', content_rowid='sid', tokenize='trigram', columnsize=0
);
CREATE TRIGGER IF NOT EXISTS tasks_fts_insert AFTER INSERT ON tasks BEGIN
    INSERT INTO tasks_fts (rowid, search) VALUES (new.sid, new.search);
END;
CREATE TRIGGER IF NOT EXISTS tasks_fts_delete AFTER DELETE ON tasks BEGIN
    INSERT INTO tasks_fts (tasks_fts, rowid, search) VALUES ('delete', old.sid, old.search);
END;
CREATE TRIGGER IF NOT EXISTS tasks_fts_update AFTER UPDATE OF search ON tasks WHEN old.search IS NOT new.search BEGIN
    INSERT INTO tasks_fts (tasks_fts, rowid, search) VALUES ('delete', old.sid, old.search);
    INSERT INTO tasks_fts (rowid, search) VALUES (new.sid, new.search);
END;
CREATE TABLE IF NOT EXISTS task_counts (
    task_type TEXT NOT NULL,
    status    TEXT NOT NULL,
    n         INTEGER NOT NULL,
    PRIMARY KEY (task_type, status)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS task_counts_insert AFTER INSERT ON tasks BEGIN
    INSERT INTO task_counts (task_type, status, n) VALUES (new.task_type, new.status, 1)
        ON CONFLICT (task_type, status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS task_counts_delete AFTER DELETE ON tasks BEGIN
    UPDATE task_counts SET n = n - 1 WHERE task_type = old.task_type AND status = old.status;
    DELETE FROM task_counts WHERE task_type = old.task_type AND status = old.status AND n <= 0;
END;
CREATE TRIGGER IF NOT EXISTS task_counts_update AFTER UPDATE OF status ON tasks WHEN old.status IS NOT new.status BEGIN
    UPDATE task_counts SET n = n - 1 WHERE task_type = old.task_type AND status = old.status;
    DELETE FROM task_counts WHERE task_type = old.task_type AND status = old.status AND n <= 0;
    INSERT INTO task_counts (task_type, status, n) VALUES (new.task_type, new.status, 1)
        ON CONFLICT (task_type, status) DO UPDATE SET n = n + 1;
END;
CREATE TABLE IF NOT EXISTS events (
    task_id TEXT NOT NULL,
    slot    INTEGER NOT NULL,
    version INTEGER NOT NULL,
    body    TEXT NOT NULL,
    PRIMARY KEY (task_id, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS store_meta (
    key   TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
"""
# The event log is a ring of ``history`` slots per task: version v goes to slot v % history, in place
# of version v - history. Versions are consecutive, so a task's slots hold exactly its newest
# ``history`` versions, and each change rewrites one page. Keyed by version instead, a change wrote
# the task's newest page and, trimming the oldest version, its oldest one too, with a page taken
# from or given to the free list every few changes: three WAL frames a change against one, and the
# sqlite writer's CPU per change went 22-26 -> 13-15 us (the in-process writer bench, groups of 15;
# 9-10 us with the in-place update below).
# ``store_meta`` keeps the slot count the log was written with ('event_slots').
# Search (issue 13): ``search`` holds the lower-cased text ``q`` looks in (query.search_text); the
# FTS5 table ``tasks_fts`` indexes it by trigrams (substring search, any position) as external
# content keyed by ``sid`` (a WITHOUT ROWID table has no rowid of its own: ``sid`` is a stable
# integer handed out at insert). The triggers keep it in step inside whatever transaction writes
# ``tasks`` (the writer's group commit, a migration); the update trigger skips changes that leave
# the text as it was. ``task_counts`` (tasks per type and status, kept by triggers too) answers the
# counts of a query without q or time range in a few rows, however many tasks are stored.
_TRIGRAM = 3  # a q shorter than this cannot use the trigram index: a substring scan instead
_RARE = 5000  # a trigram held by at most this many tasks makes the index worth driving a search
_PROBES = 16  # trigrams of a long q probed at most (the first ones; any rare one will do)
_STATUSES = [s.value for s in TaskStatus]


def _fts_string(text: str) -> str:
    """``text`` as one FTS5 string (a phrase of its trigrams)."""
    return '"' + text.replace('"', '""') + '"'


def _above(prefix: str) -> str:
    """Sorts after every task id that starts with ``prefix`` (ids are ASCII)."""
    return prefix + "\U0010ffff"

_LIVE = ("pending", "processing")
_GROUP_MAX = 1024  # changes per transaction at most
# A live task's row in ``tasks`` (and its indexes, trigram index, counts) is rewritten at most this
# often while only its progress/message/detail move: every change still goes to ``events`` (the
# durable log, written in the change's own group commit), which is what a restart rebuilds the row
# from. A change of status or a cancel request, and every finished task, is written at once.
ROW_LAG_S = 0.25
# Checkpoints: a thread of their own copies the WAL into the database file (PASSIVE: it never blocks
# the writer or the readers) every CHECKPOINT_S while changes come in. Under a steady stream of
# changes one copy never catches up with the newest frames (the writer appends while it runs), so
# the WAL could never start over. So the thread copies again while the last copy left more than
# _TAIL_FRAMES behind (each round copies only what the one before let through, so the rounds get
# short: a pre-copy), and once the WAL holds _RESTART_FRAMES or more, asks the writer to copy the
# last few frames between two groups: a stall of well under a millisecond instead of a full copy,
# and the next group starts the WAL from its beginning. _WAL_CAP_FRAMES is the backstop: there the
# writer copies whatever is left.
CHECKPOINT_S = 0.5
_TAIL_FRAMES = 64  # frames (4 KiB pages) the writer may be left to copy
_CONVERGE_ROUNDS = 4  # copies per checkpoint at most
_RESTART_FRAMES = 2048  # ~8 MiB: past this a checkpoint asks the writer to finish it
_WAL_CAP_FRAMES = 16384  # ~64 MiB of WAL


class StoreLocked(ValueError):
    """Another process has this sqlite file open."""


def _internal(task: Task) -> str:
    return json.dumps(
        {"owner": task.owner, "samples": [list(s) for s in task.samples], "cancel_at": task.cancel_at},
        separators=(",", ":"),
    )


def _task(body: str, internal: str) -> Task:
    data = json.loads(body)
    data.update(json.loads(internal))
    return Task.from_dict(data)


# a new task's sid: one past the largest (an index lookup); an update keeps its sid
_UPSERT = (
    "INSERT INTO tasks (task_id, task_type, status, created_at, updated_at, version, body, internal, search, sid)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, (SELECT COALESCE(MAX(sid), 0) + 1 FROM tasks))"
    " ON CONFLICT(task_id) DO UPDATE SET status=excluded.status,"
    " updated_at=excluded.updated_at, version=excluded.version, body=excluded.body,"
    " internal=excluded.internal, search=excluded.search"
)


def _row(task: Task, body: str) -> tuple[Any, ...]:
    return (
        task.task_id,
        task.task_type,
        task.status.value,
        task.created_at.isoformat(timespec="microseconds"),
        task.updated_at.isoformat(timespec="microseconds"),
        task.version,
        body,
        _internal(task),
        search_text(task),
    )


_EVENTS_CHUNK = 64  # event rows per INSERT statement at most (one sqlite3_step for them all)
_EVENTS_SQL = [""] + [
    "INSERT INTO events (task_id, slot, version, body) VALUES " + ", ".join(["(?, ?, ?, ?)"] * n)
    # (an update of the slot's row in place, not REPLACE's delete and insert: ~20 % less writer CPU)
    + " ON CONFLICT (task_id, slot) DO UPDATE SET version = excluded.version, body = excluded.body"
    for n in range(1, _EVENTS_CHUNK + 1)
]


# A row that only lags (ROW_LAG_S) is written after its group's waiters heard back, with the other
# rows due about then: one UPDATE for up to _ROWS_CHUNK of them (one sqlite3_step), at most that
# many after each group, so a burst of due rows never holds a group up.
_ROWS_CHUNK = 8
_ROWS_SQL = [""] + [
    "WITH v (task_id, status, updated_at, version, body, internal, search) AS (VALUES "
    + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * n)
    + ") UPDATE tasks SET status = v.status, updated_at = v.updated_at, version = v.version, body = v.body,"
    " internal = v.internal, search = v.search FROM v WHERE tasks.task_id = v.task_id"
    for n in range(1, _ROWS_CHUNK + 1)
]


class _Group(Ack):
    """One transaction's worth of commits: resolved once, for a thread or for the loop.

    Each coroutine awaiting it has a future of its own (one ``call_soon_threadsafe`` per loop wakes
    them all): a waiter that is cancelled cancels only its own, so no shield is needed, and a group of
    fifteen PATCHes costs fifteen futures, not fifteen shields and their thirty callbacks."""

    __slots__ = ("_event", "_error", "_waiters", "_lock")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._error: BaseException | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._lock = threading.Lock()

    @property
    def durable(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        if not self._event.wait(timeout):
            raise TimeoutError("the sqlite writer did not store the change in time")
        if self._error is not None:
            raise self._error

    async def done(self) -> None:
        if not self._event.is_set():
            future = asyncio.get_running_loop().create_future()
            with self._lock:
                pending = not self._event.is_set()
                if pending:
                    self._waiters.append(future)
            if pending:
                await future
        if self._error is not None:
            raise self._error

    def resolve(self, error: BaseException | None = None) -> None:
        with self._lock:
            self._error = error
            self._event.set()
            waiters, self._waiters = self._waiters, []
        by_loop: dict[Any, list[asyncio.Future[None]]] = {}
        for future in waiters:  # (one loop, as a rule)
            by_loop.setdefault(future.get_loop(), []).append(future)
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_set_done, futures)
            except RuntimeError:  # the loop is gone: nobody awaits it any more
                logger.debug("group commit finished after the loop closed")


def _set_done(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():  # (a waiter cancelled meanwhile)
            future.set_result(None)


class SqliteStore(LocalStore):
    def __init__(self, path: str | Path, history: int = 256, history_bytes: int | None = None) -> None:
        self.path = Path(path)
        if int(history) < 1:
            raise ValueError("history must be at least 1 (versions kept per task)")
        self._history = int(history)
        self._history_bytes = history_bytes
        # writer thread only: per live task, an upper bound of its log's size (chars of the bodies):
        # what an exact look found plus everything inserted since (the count trigger only removes).
        # Only once it passes history_bytes does the writer look again and trim (_trim_bytes).
        self._log_upper: dict[str, float] = {}
        memory = str(self.path) == ":memory:"
        if memory:
            raise ValueError("sqlite:///:memory: cannot be shared by the writer and readers; use memory://")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lockfile = self._take_process_lock()
        self._lock = threading.Lock()  # guards _latest, _pending_events, _queue, _group
        self._latest: dict[str, Task] = {}  # live tasks, and every change not yet written
        self.live_tasks = self._latest  # read without the lock by TaskManager's report path (never rebound)
        self._unflushed: dict[str, int] = {}  # task id -> version not yet written (its event, or its row)
        self._pending_events: dict[str, list[tuple[int, str]]] = {}
        self._queue: deque[tuple[str, Any, Any]] = deque()
        self._group = _Group()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._db = self._connect(writer=True)
        self._migrate_v1()
        self._upgrade_search()
        self._upgrade_events()
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR REPLACE INTO store_meta (key, value) VALUES ('event_slots', ?)", (self._history,))
        self._row_written: dict[str, tuple[float, TaskStatus, bool]] = {}  # writer thread only
        self._deferred: dict[str, tuple[Task, str]] = {}  # rows to write when their lag is up (writer only)
        self._next_due = float("inf")  # no deferred row is due before this (writer only)
        self._commits = 0  # group commits so far (the checkpointer looks whether there were new ones)
        self._wal_frames = 0  # frames in the WAL at the checkpointer's last look
        self._tail_ready = False  # the writer is to finish the copy (a big WAL nearly copied, or the cap)
        self._stop = threading.Event()
        for body, internal in self._db.execute(
            "SELECT body, internal FROM tasks WHERE status IN ('pending', 'processing')"
        ).fetchall():
            task = _task(body, internal)
            self._latest[task.task_id] = task
        self._catch_up_rows()
        self._writer = threading.Thread(target=self._write_loop, name="taskmon-sqlite-writer", daemon=True)
        self._writer.start()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="taskmon-sqlite-checkpointer", daemon=True
        )
        self._checkpointer.start()

    # -- set-up --------------------------------------------------------------------------------
    def _take_process_lock(self) -> int:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreLocked(
                f"the sqlite store {self.path} is in use by another taskmon process (pid {holder}); "
                "one process per sqlite file: use TASKMON_STORE=redis://... to run several"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _connect(self, *, writer: bool = False) -> sqlite3.Connection:
        db = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=10,
            cached_statements=256 if writer else 128,  # the writer's: _EVENTS_SQL's and a few more
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if writer:
            # Checkpoints (copying the WAL into the file, with two fsyncs) run in their own thread,
            # not in the COMMIT of whichever group crosses the threshold (see _checkpoint_loop).
            db.execute("PRAGMA wal_autocheckpoint=0")
            # the statement journal of a many-row INSERT stays in memory (not a temp file per group)
            db.execute("PRAGMA temp_store=MEMORY")
            db.execute(f"PRAGMA journal_size_limit={_WAL_CAP_FRAMES * 4096}")
        return db

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
            with self._lock:
                self._readers.append(db)
        return db

    def _migrate_v1(self) -> None:
        """v1 kept (seq, created_ts, updated_ts, body): move its tasks into the v1.1 layout once."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)").fetchall()}
        if "seq" not in columns:
            return
        rows = self._db.execute("SELECT body FROM tasks ORDER BY seq").fetchall()
        # One transaction: executescript commits a pending transaction before it runs, so the BEGIN
        # is the script's own first statement (the drop and the re-inserts commit together).
        schema = _SCHEMA.replace("CREATE TABLE IF NOT EXISTS events", "CREATE TABLE IF NOT EXISTS events_unused", 1)
        self._db.executescript("BEGIN IMMEDIATE;\nDROP TABLE tasks;\n" + schema)
        try:
            for (body,) in rows:
                task = Task.from_dict(json.loads(body))
                self._db.execute(*self._upsert(task, json.dumps(task.to_dict(), ensure_ascii=False, separators=(",", ":"))))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        logger.warning("sqlite store migrated to the v1.1 layout", extra={"tasks": len(rows)})

    def _upgrade_search(self) -> None:
        """A file written before search existed: give every task a ``sid``, build ``tasks_fts`` from
        the stored ``search`` text and ``task_counts`` from the rows (one transaction; later opens
        find both tables and skip this)."""
        tables = {name for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "tasks" not in tables or {"tasks_fts", "task_counts"} <= tables:
            return  # a new file (the schema makes everything) or already upgraded
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)").fetchall()}
        script = "BEGIN IMMEDIATE;\n"
        if "sid" not in columns:
            script += (
                "ALTER TABLE tasks ADD COLUMN sid INTEGER;\n"
                "UPDATE tasks SET sid = numbered.n FROM (SELECT task_id,"
                " row_number() OVER (ORDER BY created_at, task_id) AS n FROM tasks) AS numbered"
                " WHERE tasks.task_id = numbered.task_id;\n"
            )
        script += _SCHEMA
        if "tasks_fts" not in tables:
            script += "INSERT INTO tasks_fts (tasks_fts) VALUES ('rebuild');\n"
        if "task_counts" not in tables:
            script += "INSERT INTO task_counts SELECT task_type, status, COUNT(*) FROM tasks GROUP BY task_type, status;\n"
        try:
            self._db.executescript(script + "COMMIT;\n")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        (count,) = self._db.execute("SELECT COUNT(*) FROM tasks").fetchone()
        logger.warning("sqlite store: search index and counts built", extra={"tasks": count})

    def _upgrade_events(self) -> None:
        """A log written keyed by version (before the ring), or as a ring of another size (the
        ``history`` setting changed): rewritten once as this ``history``'s ring, each task keeping
        its newest ``history`` versions (one transaction)."""
        db = self._db
        columns = {row[1] for row in db.execute("PRAGMA table_info(events)").fetchall()}
        if not columns:
            return  # a new file: the schema makes the ring
        if "slot" in columns:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            slots = db.execute("SELECT value FROM store_meta WHERE key = 'event_slots'").fetchone() \
                if "store_meta" in tables else None
            if slots is not None and slots[0] == self._history:
                return
        ring = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS events ("):].replace(
            "CREATE TABLE IF NOT EXISTS events (", "CREATE TABLE events_ring (", 1)
        try:
            db.executescript(
                "BEGIN IMMEDIATE;\nDROP TABLE IF EXISTS events_ring;\n" + ring
                + "WITH newest AS (SELECT task_id, MAX(version) AS top FROM events GROUP BY task_id)"
                f" INSERT INTO events_ring (task_id, slot, version, body) SELECT e.task_id, e.version % {self._history},"
                f" e.version, e.body FROM events AS e JOIN newest USING (task_id) WHERE e.version > newest.top - {self._history};\n"
                "DROP TABLE events;\nALTER TABLE events_ring RENAME TO events;\n"
                f"INSERT OR REPLACE INTO store_meta (key, value) VALUES ('event_slots', {self._history});\nCOMMIT;\n"
            )
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        (count,) = db.execute("SELECT COUNT(*) FROM events").fetchone()
        logger.warning("sqlite store: event log rewritten as a ring", extra={"slots": self._history, "events": count})

    @staticmethod
    def _upsert(task: Task, body: str) -> tuple[str, tuple[Any, ...]]:
        return _UPSERT, _row(task, body)

    # -- writes ------------------------------------------------------------------------------
    def commit(self, task: Task, expected: int | None, body: str) -> Ack:
        with self._lock:
            if self._closing:
                raise RuntimeError("the sqlite store is closed")
            current = self._latest.get(task.task_id)
            if expected is None:
                if current is not None:
                    raise Conflict(task.task_id)
            elif current is None or current.version != expected:
                raise Conflict(task.task_id)  # not live (finished or removed) or changed meanwhile
            self._latest[task.task_id] = task
            self._unflushed[task.task_id] = task.version
            self._pending_events.setdefault(task.task_id, []).append((task.version, body))
            self._queue.append(("put", task, body))
            group = self._group
            self._wake.notify()
        return group

    def remove(self, tasks: Iterable[Task]) -> list[Task]:
        chosen = list(tasks)
        if not chosen:
            return []
        with self._lock:
            self._queue.append(("remove", chosen, None))
            group = self._group
            self._wake.notify()
        group.wait()
        return chosen

    def _catch_up_rows(self) -> None:
        """At open: a live task whose row lags its event log (the process stopped within ROW_LAG_S
        of a change) gets its row back from the newest logged snapshot."""
        if not self._latest:
            return
        rows = self._db.execute(
            "SELECT e.task_id, e.version, e.body FROM events AS e JOIN tasks AS t ON t.task_id = e.task_id"
            " WHERE t.status IN ('pending', 'processing') AND e.version > t.version ORDER BY e.task_id, e.version"
        ).fetchall()
        newest: dict[str, tuple[int, str]] = {}
        for task_id, version, body in rows:
            newest[task_id] = (version, body)
        if not newest:
            return
        self._db.execute("BEGIN IMMEDIATE")
        for task_id, (_version, body) in newest.items():
            old = self._latest[task_id]
            task = dataclasses.replace(
                Task.from_dict(json.loads(body)), owner=old.owner, samples=old.samples, cancel_at=old.cancel_at
            )
            self._db.execute(*self._upsert(task, body))
            self._latest[task_id] = task
        self._db.execute("COMMIT")
        logger.info("sqlite rows caught up with their event logs", extra={"tasks": len(newest)})

    def _rows_now(self, last: Iterable[tuple[Task, str]], now: float, force: bool) -> list[tuple[Any, ...]]:
        """The ``tasks`` rows to write with this group, of each task's last change in it: a new
        task, a change of status or of the cancel request, a finished task. A change that only moves
        progress/message/detail is deferred: ``_due_rows`` writes it once its lag is up (see
        ROW_LAG_S), with the other rows due about then. Writer thread."""
        out: list[tuple[Any, ...]] = []
        written, deferred = self._row_written, self._deferred
        for task, body in last:
            task_id, status = task.task_id, task.status
            seen = written.get(task_id)
            if force or seen is None or status.is_terminal or seen[1] is not status or seen[2] != task.cancel_requested:
                out.append(_row(task, body))
                deferred.pop(task_id, None)
                if status.is_terminal:
                    written.pop(task_id, None)
                else:
                    written[task_id] = (now, status, task.cancel_requested)
            else:
                deferred[task_id] = (task, body)
                due = seen[0] + ROW_LAG_S
                if due < self._next_due:
                    self._next_due = due
        return out

    def _due_rows(self, now: float, force: bool) -> list[tuple[Any, ...]]:
        """The deferred rows whose lag is up, as UPDATE parameters: at most _ROWS_CHUNK (the
        longest due first) unless ``force``. Looked at only when the first one is due; rows due
        within ROW_LAG_S / 8 go with it, so a steady stream of changes writes rows a few times a
        second, not after every group. Writer thread."""
        if not self._deferred or (not force and now < self._next_due):
            return []
        soon = now + ROW_LAG_S / 8
        due: list[tuple[float, str]] = []
        next_due = float("inf")
        written = self._row_written
        for task_id in self._deferred:
            at = written[task_id][0] + ROW_LAG_S
            if force or at <= soon:
                due.append((at, task_id))
            elif at < next_due:
                next_due = at
        if not force and len(due) > _ROWS_CHUNK:
            due.sort()
            del due[_ROWS_CHUNK:]
            next_due = now  # the rest after the next group
        self._next_due = next_due
        out: list[tuple[Any, ...]] = []
        for _at, task_id in due:
            task, body = self._deferred.pop(task_id)
            written[task_id] = (now, task.status, task.cancel_requested)
            out.append((
                task_id,
                task.status.value,
                task.updated_at.isoformat(timespec="microseconds"),
                task.version,
                body,
                _internal(task),
                search_text(task),
            ))
        return out

    def _write_rows(self, db: sqlite3.Connection, now: float, every: bool = False) -> None:
        """The due deferred rows (see _due_rows; ``every``: all of them), each chunk its own
        autocommit UPDATE: a row only saves a restart the replay of its task's log
        (``_catch_up_rows``), it holds no change."""
        rows = self._due_rows(now, self._closing or every)
        for start in range(0, len(rows), _ROWS_CHUNK):
            chunk = rows[start : start + _ROWS_CHUNK]
            try:
                db.execute(_ROWS_SQL[len(chunk)], [x for row in chunk for x in row])
            except sqlite3.Error:  # the changes stay laid over the old rows (``list``)
                logger.exception("sqlite: writing lagging rows failed", extra={"rows": len(chunk)})
                continue
            with self._lock:
                for row in chunk:
                    if self._unflushed.get(row[0]) == row[3]:
                        del self._unflushed[row[0]]

    def _events(self, puts: list[tuple[Task, str]], now: float, rows: list[tuple[Any, ...]]) -> list[Any]:
        """A run of changes as the parameters of the events INSERT (task_id, version, body per
        change); the rows to write of each task's last change in the run go to ``rows``."""
        flat: list[Any] = []
        last: dict[str, tuple[Task, str]] = {}
        history = self._history
        for task, body in puts:
            flat += (task.task_id, task.version % history, task.version, body)
            last[task.task_id] = (task, body)
        rows += self._rows_now(last.values(), now, self._closing)
        return flat

    @staticmethod
    def _insert_events(db: sqlite3.Connection, flat: list[Any]) -> None:
        """Every version into its slot of ``events``: one multi-row INSERT per _EVENTS_CHUNK changes
        (each replaces the version ``history`` back)."""
        step = 4 * _EVENTS_CHUNK
        for start in range(0, len(flat), step):
            chunk = flat[start : start + step] if len(flat) > step else flat
            db.execute(_EVENTS_SQL[len(chunk) // 4], chunk)

    def _write_remove(self, db: sqlite3.Connection, tasks: list[Task]) -> None:
        for task in tasks:
            latest = self._latest.get(task.task_id)
            if latest is not None and latest.version != task.version:
                continue  # changed since it was chosen (its row may lag: ROW_LAG_S)
            self._deferred.pop(task.task_id, None)
            self._row_written.pop(task.task_id, None)
            db.execute("DELETE FROM tasks WHERE task_id = ? AND version = ?", (task.task_id, task.version))
            db.execute("DELETE FROM events WHERE task_id = ?", (task.task_id,))

    def _write_group(self, db: sqlite3.Connection, batch: list[tuple[str, Any, Any]], touched: dict[str, int]) -> None:
        """One transaction for the batch. The common group (changes only, no row due, at most
        _EVENTS_CHUNK of them) is a single INSERT in autocommit mode: one sqlite3_step, so the
        writer gives the GIL up and takes it back once for the whole group."""
        now = time.monotonic()
        rows: list[tuple[Any, ...]] = []
        if all(op == "put" for op, _item, _body in batch):
            puts = [(item, body) for _op, item, body in batch]
            for task, _body in puts:
                touched[task.task_id] = task.version
            flat = self._events(puts, now, rows)
            if not rows:
                if 0 < len(puts) <= _EVENTS_CHUNK:
                    db.execute(_EVENTS_SQL[len(puts)], flat)
                if len(puts) <= _EVENTS_CHUNK:
                    return
            db.execute("BEGIN IMMEDIATE")  # (a failure: the writer loop rolls back)
            if rows:
                db.executemany(_UPSERT, rows)
            self._insert_events(db, flat)
            db.execute("COMMIT")
            return
        db.execute("BEGIN IMMEDIATE")
        puts = []
        for op, item, body in batch:
            if op == "put":
                puts.append((item, body))
                touched[item.task_id] = item.version
                continue
            if puts:  # a removal sees the changes queued before it written
                self._insert_events(db, self._events(puts, now, rows))
                puts = []
            if rows:
                db.executemany(_UPSERT, rows)
                rows = []
            self._write_remove(db, item)
        if puts:
            self._insert_events(db, self._events(puts, now, rows))
        if rows:
            db.executemany(_UPSERT, rows)
        db.execute("COMMIT")

    def _write_loop(self) -> None:
        # Woken by each change while the loop holds the GIL: without this the writer would be switched
        # to at once, find the GIL taken and switch back. It runs when the loop next waits instead,
        # with what arrived meanwhile in the same group (bench: ~10 changes a group -> ~15, PATCH/s +10 %).
        yield_on_wake()
        db = self._db
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    if self._deferred:
                        timeout = self._next_due - time.monotonic()
                        if timeout <= 0 or not self._wake.wait(timeout):
                            break  # time to write the deferred rows
                    else:
                        self._wake.wait()
                if not self._queue and self._closing and not self._deferred:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), _GROUP_MAX))]
                group = self._group
                # What is left (more than one transaction's worth) stays in this group: its waiters
                # hear back once all of it is written.
                if batch and not self._queue:
                    self._group = _Group()
            error: BaseException | None = None
            touched: dict[str, int] = {}
            rows_now = False  # a flush asked for every lagging row too (it waits on this group)
            if any(op == "rows" for op, _item, _body in batch):
                batch = [entry for entry in batch if entry[0] != "rows"]
                rows_now = True
            try:
                self._write_group(db, batch, touched)
            except BaseException as exc:  # a failed group: every waiter hears it; the loop goes on
                logger.exception("sqlite group commit failed", extra={"changes": len(batch)})
                error = exc
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        logger.debug("rollback after a failed group commit failed too")
            if batch:
                if self._history_bytes is not None and error is None:
                    self._trim_bytes(db, batch)  # before its waiters hear back: they read it trimmed
                self._settle(batch, touched, None if rows_now else group, error)
            self._write_rows(db, time.monotonic(), rows_now)
            if rows_now and group is not self._group:
                group.resolve(error)
            if self._tail_ready or self._wal_frames >= _WAL_CAP_FRAMES:
                busy, _frames, _copied = self._checkpoint(db)
                if not busy:  # (busy: the checkpointer's copy is running; after the next group, then)
                    self._tail_ready = False
                    self._wal_frames = 0

    def _settle(self, batch: list[tuple[str, Any, Any]], touched: dict[str, int], group: _Group | None, error: BaseException | None) -> None:
        """After a group's transaction: drop what is on disk now from memory, then tell its waiters
        (``group`` None: the caller tells them later)."""
        self._commits += 1
        with self._lock:
            for task_id, version in touched.items():
                if self._unflushed.get(task_id) == version:
                    self._pending_events.pop(task_id, None)
                    if task_id in self._deferred:
                        continue  # its row lags (ROW_LAG_S): listings lay the change over it until written
                    del self._unflushed[task_id]
                    latest = self._latest.get(task_id)
                    if latest is not None and latest.is_terminal:
                        del self._latest[task_id]  # on disk now; finished tasks are read from there
                else:
                    pending = self._pending_events.get(task_id)
                    if pending:
                        self._pending_events[task_id] = [e for e in pending if e[0] > version]
            for op, item, _body in batch:
                if op == "remove":
                    for task in item:
                        latest = self._latest.get(task.task_id)
                        if latest is not None and latest.version == task.version:
                            del self._latest[task.task_id]
        if group is not None and group is not self._group:
            group.resolve(error)

    def _trim_bytes(self, db: sqlite3.Connection, batch: list[tuple[str, Any, Any]]) -> None:
        """The byte bound of each task's history (``history_bytes``), after its group is written:
        the oldest versions go while the log is over it; the newest always stays. Writer thread."""
        limit = self._history_bytes
        assert limit is not None
        upper = self._log_upper
        over: set[str] = set()
        for op, item, body in batch:
            if op == "remove":
                for task in item:
                    upper.pop(task.task_id, None)
                continue
            task_id = item.task_id
            # a task made by this process starts empty; one found at open is measured first
            size = upper.get(task_id, 0.0 if item.version == 1 else float("inf")) + len(body)
            if item.is_terminal:
                upper.pop(task_id, None)  # a finished log does not grow any more
            else:
                upper[task_id] = size
            if size > limit:
                over.add(task_id)
        for task_id in over:
            try:
                sizes = db.execute(
                    "SELECT version, length(body) FROM events WHERE task_id = ? ORDER BY version DESC", (task_id,)
                ).fetchall()
                kept, cut = 0, None
                for index, (version, size) in enumerate(sizes):
                    if index and kept + size > limit:
                        cut = version
                        break
                    kept += size
                if cut is not None:
                    db.execute("DELETE FROM events WHERE task_id = ? AND version <= ?", (task_id, cut))
                if task_id in upper:
                    upper[task_id] = kept
            except sqlite3.Error:
                logger.exception("sqlite: trimming a history by bytes failed", extra={"task_id": task_id})

    def _checkpoint(self, db: sqlite3.Connection) -> tuple[int, int, int]:
        try:
            busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            logger.exception("sqlite checkpoint failed")  # the WAL keeps the changes; the next one retries
            return (1, 0, 0)
        return busy, frames, copied

    def _checkpoint_loop(self) -> None:
        # Copying the WAL is work for when the core is free: at a lower priority than the loop and
        # the writer, so a checkpoint never takes a share of the core from the changes' path.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            logger.debug("the sqlite checkpointer runs at normal priority")
        db = self._connect()
        try:
            seen = self._commits
            while not self._stop.wait(CHECKPOINT_S):
                if self._commits == seen or self._tail_ready:
                    continue  # (the writer is about to finish the last copy: no race with it)
                seen = self._commits
                busy, frames, copied = self._checkpoint(db)
                for _round in range(1, _CONVERGE_ROUNDS):
                    if busy or self._stop.is_set():
                        break
                    before = copied
                    busy, frames, copied = self._checkpoint(db)
                    if frames - before <= _TAIL_FRAMES:
                        break  # what the writer appended during the last round: little
                self._wal_frames = frames
                nearly_all = frames >= _RESTART_FRAMES and frames - copied <= _TAIL_FRAMES
                if not busy and (nearly_all or frames >= _WAL_CAP_FRAMES):
                    self._tail_ready = True  # the writer copies the rest; no copy of ours races it meanwhile
        finally:
            db.close()

    # -- reads -------------------------------------------------------------------------------
    def cached(self, task_id: str) -> Task | None | bool:
        task = self._latest.get(task_id)
        return task if task is not None else False

    def get(self, task_id: str) -> Task | None:
        task = self._latest.get(task_id)
        if task is not None:
            return task
        row = self._reader().execute("SELECT body, internal FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        if row is None:
            return self._latest.get(task_id)  # written and evicted between the two looks
        return _task(*row)

    # -- listing and counts: each filter and sort served by an index ----------------------------
    #
    # * One indexed query per status when the query names a task type or several statuses (indexes
    #   (task_type, status, time, id) and (status, time, id)), each reading at most one page in index
    #   order, merged here; else one query on (time, id) or (status, time, id). The keyset
    #   ``(time, task_id) < (?, ?)`` is a range on the same index: a page costs its own size, not the
    #   number of stored tasks.
    # * q of 3+ characters: the trigram index is probed for how many tasks hold each of q's
    #   trigrams (counting stops at _RARE). When one is rarer than that, the tasks holding q's two
    #   rarest trigrams (at most _RARE, plus the task-id prefix: a primary-key range) are the
    #   candidates; the other filters and the order apply to those only. When every trigram is
    #   common (or so common that a scan pays, ``_search_plan``), q matches many tasks: the
    #   index-ordered scan above with a substring test finds a page quickly. Either way ``instr``
    #   on the stored text keeps exactly what ``TaskQuery.matches`` keeps. A q shorter than 3
    #   cannot use trigrams: always the scan. Counts must see every match: candidates, or the
    #   phrase when no trigram is rare (cost: the number of matches).

    @staticmethod
    def _filters(query: TaskQuery, *, alias: str = "") -> tuple[list[str], list[Any]]:
        """The WHERE terms for the time ranges and q (status and task type are the caller's)."""
        where: list[str] = []
        args: list[Any] = []
        for column, op, moment in (
            ("created_at", ">", query.created_after),
            ("created_at", "<", query.created_before),
            ("updated_at", ">", query.updated_after),
            ("updated_at", "<", query.updated_before),
        ):
            if moment is not None:
                where.append(f"{alias}{column} {op} ?")
                args.append(moment.astimezone(_UTC).isoformat(timespec="microseconds"))
        if query.q is not None:
            where.append(f"(instr({alias}search, ?) > 0 OR ({alias}task_id >= ? AND {alias}task_id < ?))")
            args.extend([query.q, query.q, _above(query.q)])
        return where, args

    def _rare_match(self, q: str) -> tuple[str | None, int]:
        """An FTS5 query for the candidates of q (a superset, at most _RARE tasks) and how many
        tasks hold its rarest trigram; None when every trigram of q is common (or q is too short)."""
        if len(q) < _TRIGRAM:
            return None, 0
        db = self._reader()
        grams = list(dict.fromkeys(q[i : i + _TRIGRAM] for i in range(len(q) - _TRIGRAM + 1)))[:_PROBES]
        seen: list[tuple[int, str]] = []
        for gram in grams:
            term = _fts_string(gram)
            (n,) = db.execute(
                "SELECT COUNT(*) FROM (SELECT rowid FROM tasks_fts WHERE tasks_fts MATCH ? LIMIT ?)", (term, _RARE + 1)
            ).fetchone()
            if n == 0:
                return term, 0  # no task holds this trigram: no text match at all
            seen.append((n, term))
        seen.sort()
        if seen[0][0] > _RARE:
            return None, seen[0][0]
        return " AND ".join(term for _n, term in seen[:2]), seen[0][0]

    def _search_plan(self, q: str, limit: int) -> str | None:
        """The candidates' FTS5 query for a listing, or None to scan in index order instead.

        Candidates cost about ``m`` (tasks holding q's rarest trigram); a scan finds a page after
        about ``limit * total / m`` rows if matches are spread evenly. Candidates are preferred
        (their cost is bounded by _RARE; a scan's is not when matches are fewer than ``m`` says)."""
        match, m = self._rare_match(q)
        if match is None or m == 0:
            return match
        (total,) = self._reader().execute("SELECT COALESCE(SUM(n), 0) FROM task_counts").fetchone()
        return None if m * m > 4 * (limit + 1) * total else match

    @staticmethod
    def _hits(q: str, match: str) -> tuple[str, list[Any]]:
        sql = (
            "WITH hits (sid) AS MATERIALIZED (SELECT rowid FROM tasks_fts WHERE tasks_fts MATCH ?"
            " UNION SELECT sid FROM tasks WHERE task_id >= ? AND task_id < ?) "
        )
        return sql, [match, q, _above(q)]

    def _select(self, query: TaskQuery, match: str | None, after: tuple[str, str] | None, n: int) -> list[tuple[str, str, str, str]]:
        """Up to ``n`` rows (body, internal, sort time, task_id) after ``after``, in the query's order."""
        column = "created_at" if query.sort.endswith("created") else "updated_at"
        order = "DESC" if query.descending else "ASC"
        before = "<" if query.descending else ">"
        db = self._reader()
        if match is not None:
            assert query.q is not None
            cte, args = self._hits(query.q, match)
            where, more = self._filters(query, alias="t.")
            args += more
            if query.statuses is not None:
                where.append(f"t.status IN ({', '.join('?' * len(query.statuses))})")
                args.extend(sorted(s.value for s in query.statuses))
            if query.task_type is not None:
                where.append("t.task_type = ?")
                args.append(query.task_type)
            if after is not None:
                where.append(f"(t.{column}, t.task_id) {before} (?, ?)")
                args.extend(after)
            sql = (
                cte + f"SELECT t.body, t.internal, t.{column}, t.task_id FROM hits CROSS JOIN tasks AS t ON t.sid = hits.sid"
                + (" WHERE " + " AND ".join(where) if where else "")
                + f" ORDER BY t.{column} {order}, t.task_id {order} LIMIT ?"
            )
            return db.execute(sql, [*args, n]).fetchall()
        base, base_args = self._filters(query)
        if after is not None:
            base = [*base, f"({column}, task_id) {before} (?, ?)"]
            base_args = [*base_args, *after]
        results = []
        for terms, values in self._by_status(query):
            where = [*terms, *base]
            sql = (
                f"SELECT body, internal, {column}, task_id FROM tasks"
                + (" WHERE " + " AND ".join(where) if where else "")
                + f" ORDER BY {column} {order}, task_id {order} LIMIT ?"
            )
            results.append(db.execute(sql, [*values, *base_args, n]).fetchall())
        if len(results) == 1:
            return results[0]
        merged = heapq.merge(*results, key=lambda row: (row[2], row[3]), reverse=query.descending)
        return list(itertools.islice(merged, n))

    @staticmethod
    def _by_status(query: TaskQuery) -> list[tuple[list[str], list[Any]]]:
        """The (terms, args) of each per-status part of a query; one part when no split pays."""
        statuses = sorted(s.value for s in query.statuses) if query.statuses is not None else None
        if query.task_type is not None:
            return [(["task_type = ?", "status = ?"], [query.task_type, s]) for s in statuses or _STATUSES]
        if statuses is not None:
            return [(["status = ?"], [s]) for s in statuses]
        return [([], [])]

    def list(self, query: TaskQuery) -> Page:
        """One page of the stored rows with the changes not written yet laid over them.

        A row whose task has an unwritten change is left out; the change itself (which may sit
        elsewhere in the order, or outside the filter) competes with the rows up to the last one
        read, so a page never ends past a row it did not see."""
        limit = query.limit or DEFAULT_PAGE
        match = self._search_plan(query.q, limit) if query.q is not None else None
        with self._lock:  # taken before the read: a change is either here or already in the rows
            unwritten = {i: self._latest[i] for i in self._unflushed if i in self._latest}
        tasks: list[Task] = []
        after = query.after
        end: tuple[str, str] | None = None  # the last row read, when more rows may follow
        while True:
            want = limit + 1 - len(tasks)
            rows = self._select(query, match, after, want)
            for body, internal, _moment, _task_id in rows:
                task = _task(body, internal)
                newer = unwritten.get(task.task_id)
                if newer is not None and newer.version > task.version:
                    continue
                tasks.append(task)
            if len(rows) < want:
                end = None
                break
            end = after = (rows[-1][2], rows[-1][3])
            if len(tasks) > limit:
                break
        have = {t.task_id for t in tasks}
        for task in unwritten.values():
            if task.task_id in have or not (query.matches(task) and query.past_cursor(task)):
                continue
            key = sort_key(task, query.sort)
            if end is None or (key <= end if not query.descending else key >= end):
                tasks.append(task)
        tasks.sort(key=lambda t: sort_key(t, query.sort), reverse=query.descending)
        return query.page(tasks[: limit + 1], limit)

    def counts(self, query: TaskQuery) -> dict[TaskStatus, int]:
        counts = dict.fromkeys(TaskStatus, 0)
        db = self._reader()
        if query.q is not None and len(query.q) >= _TRIGRAM:
            # every match must be counted: the candidates of the rare trigrams, else the phrase
            match = self._rare_match(query.q)[0] or _fts_string(query.q)
            sql, args = self._hits(query.q, match)
            where, more = self._filters(query, alias="t.")
            args += more
            if query.task_type is not None:
                where.append("t.task_type = ?")
                args.append(query.task_type)
            if query.statuses is not None:
                where.append(f"t.status IN ({', '.join('?' * len(query.statuses))})")
                args.extend(sorted(s.value for s in query.statuses))
            sql += "SELECT t.status, COUNT(*) FROM hits CROSS JOIN tasks AS t ON t.sid = hits.sid"
            sql += (" WHERE " + " AND ".join(where) if where else "") + " GROUP BY t.status"
            for status, count in db.execute(sql, args).fetchall():
                counts[TaskStatus(status)] = count
            return counts
        base, base_args = self._filters(query)
        chosen = sorted(s.value for s in query.statuses) if query.statuses is not None else _STATUSES
        if not base:  # only status and type: the kept counts
            sql = "SELECT status, SUM(n) FROM task_counts"
            if query.task_type is not None:
                sql += " WHERE task_type = ?"
            kept = db.execute(sql + " GROUP BY status", [query.task_type] if query.task_type is not None else [])
            for status, count in kept.fetchall():
                if status in chosen:
                    counts[TaskStatus(status)] = count
            return counts
        # one index range count per status (faster than a GROUP BY over the whole index)
        for status in chosen:
            terms, values = ["status = ?"], [status]
            if query.task_type is not None:
                terms, values = ["task_type = ?", "status = ?"], [query.task_type, status]
            sql = "SELECT COUNT(*) FROM tasks WHERE " + " AND ".join([*terms, *base])
            (counts[TaskStatus(status)],) = db.execute(sql, [*values, *base_args]).fetchone()
        return counts

    def events(self, task_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        # The unwritten events first, then the disk: one the writer stores in between is then on disk
        # (read second) or still in our copy, never in neither (read the other way round, it could be).
        with self._lock:
            pending = [e for e in self._pending_events.get(task_id, ()) if e[0] > after]
        rows = self._reader().execute(
            "SELECT version, body FROM events WHERE task_id = ? AND version > ? ORDER BY version LIMIT ?",
            (task_id, after, limit),
        ).fetchall()
        merged = dict(pending)
        merged.update((int(v), b) for v, b in rows)
        return sorted(merged.items())[:limit]

    def live(self) -> list[Task]:
        with self._lock:
            return [t for t in self._latest.values() if not t.is_terminal]

    def terminal_before(self, cutoff: datetime) -> list[Task]:
        rows = self._reader().execute(
            "SELECT body, internal FROM tasks WHERE status IN ('completed', 'failed') AND updated_at < ?",
            (cutoff.astimezone(_UTC).isoformat(timespec="microseconds"),),
        ).fetchall()
        return [_task(*row) for row in rows]

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything committed so far is written, the lagging rows too."""
        with self._lock:
            if not self._queue and not self._unflushed:
                return
            self._queue.append(("rows", None, None))
            group = self._group
            self._wake.notify()
        group.wait(timeout)

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._wake.notify_all()
        self._writer.join(30)
        self._stop.set()
        self._checkpointer.join(30)
        with self._lock:
            readers, self._readers = self._readers, []
        for db in readers:
            db.close()
        self._db.close()
        os.close(self._lockfile)

