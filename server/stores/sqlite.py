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

import fcntl
import json
import logging
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Iterable
from datetime import UTC as _UTC
from datetime import datetime
from pathlib import Path
from typing import Any

from ..models import Task, TaskStatus
from ..query import Page, TaskQuery, search_text
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
    search     TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_by_created ON tasks (created_at, task_id);
CREATE INDEX IF NOT EXISTS tasks_by_updated ON tasks (updated_at, task_id);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, created_at, task_id);
CREATE INDEX IF NOT EXISTS tasks_by_type ON tasks (task_type, created_at, task_id);
CREATE TABLE IF NOT EXISTS events (
    task_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    body    TEXT NOT NULL,
    PRIMARY KEY (task_id, version)
) WITHOUT ROWID;
"""
_LIVE = ("pending", "processing")
_GROUP_MAX = 1024  # changes per transaction at most


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


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class _Group(Ack):
    """One transaction's worth of commits: resolved once, for a thread or for the loop."""

    __slots__ = ("_event", "_error", "_loop", "_loop_future", "_lock")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._error: BaseException | None = None
        self._loop: Any = None
        self._loop_future: Any = None
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
        import asyncio

        with self._lock:
            if not self._event.is_set() and self._loop_future is None:
                self._loop = asyncio.get_running_loop()
                self._loop_future = self._loop.create_future()
            future = self._loop_future
        if future is not None:
            await asyncio.shield(future)
        if self._error is not None:
            raise self._error

    def resolve(self, error: BaseException | None = None) -> None:
        with self._lock:
            self._error = error
            self._event.set()
            future, loop = self._loop_future, self._loop
        if future is not None:
            try:
                loop.call_soon_threadsafe(_set_done, future)
            except RuntimeError:  # the loop is gone: nobody awaits it any more
                logger.debug("group commit finished after the loop closed")


def _set_done(future: Any) -> None:
    if not future.done():
        future.set_result(None)


class SqliteStore(LocalStore):
    def __init__(self, path: str | Path, history: int = 256) -> None:
        self.path = Path(path)
        self._history = history
        memory = str(self.path) == ":memory:"
        if memory:
            raise ValueError("sqlite:///:memory: cannot be shared by the writer and readers; use memory://")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lockfile = self._take_process_lock()
        self._lock = threading.Lock()  # guards _latest, _pending_events, _queue, _group
        self._latest: dict[str, Task] = {}  # live tasks, and every change not yet written
        self._unflushed: dict[str, int] = {}  # task id -> version not yet written
        self._pending_events: dict[str, list[tuple[int, str]]] = {}
        self._queue: deque[tuple[str, Any, Any]] = deque()
        self._group = _Group()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._db = self._connect()
        self._migrate_v1()
        self._db.executescript(_SCHEMA)
        for body, internal in self._db.execute(
            "SELECT body, internal FROM tasks WHERE status IN ('pending', 'processing')"
        ).fetchall():
            task = _task(body, internal)
            self._latest[task.task_id] = task
        self._writer = threading.Thread(target=self._write_loop, name="taskmon-sqlite-writer", daemon=True)
        self._writer.start()

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

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
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
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("DROP TABLE tasks")
        self._db.executescript(_SCHEMA.replace("CREATE TABLE IF NOT EXISTS events", "CREATE TABLE IF NOT EXISTS events_unused", 0))
        for (body,) in rows:
            task = Task.from_dict(json.loads(body))
            self._db.execute(*self._upsert(task, json.dumps(task.to_dict(), ensure_ascii=False, separators=(",", ":"))))
        self._db.execute("COMMIT")
        logger.warning("sqlite store migrated to the v1.1 layout", extra={"tasks": len(rows)})

    @staticmethod
    def _upsert(task: Task, body: str) -> tuple[str, tuple[Any, ...]]:
        return (
            "INSERT INTO tasks (task_id, task_type, status, created_at, updated_at, version, body, internal, search)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(task_id) DO UPDATE SET status=excluded.status,"
            " updated_at=excluded.updated_at, version=excluded.version, body=excluded.body,"
            " internal=excluded.internal, search=excluded.search",
            (
                task.task_id,
                task.task_type,
                task.status.value,
                task.created_at.isoformat(timespec="microseconds"),
                task.updated_at.isoformat(timespec="microseconds"),
                task.version,
                body,
                _internal(task),
                search_text(task),
            ),
        )

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

    def _write_loop(self) -> None:
        db = self._db
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue and self._closing:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), _GROUP_MAX))]
                group = self._group
                # What is left (more than one transaction's worth) stays in this group: its waiters
                # hear back once all of it is written.
                if not self._queue:
                    self._group = _Group()
            error: BaseException | None = None
            touched: dict[str, int] = {}
            try:
                db.execute("BEGIN IMMEDIATE")
                for op, item, body in batch:
                    if op == "put":
                        db.execute(*self._upsert(item, body))
                        db.execute(
                            "INSERT OR REPLACE INTO events (task_id, version, body) VALUES (?, ?, ?)",
                            (item.task_id, item.version, body),
                        )
                        touched[item.task_id] = item.version
                    else:
                        for task in item:
                            db.execute("DELETE FROM tasks WHERE task_id = ? AND version = ?", (task.task_id, task.version))
                            db.execute("DELETE FROM events WHERE task_id = ?", (task.task_id,))
                for task_id, version in touched.items():
                    if version > self._history:
                        db.execute(
                            "DELETE FROM events WHERE task_id = ? AND version <= ?", (task_id, version - self._history)
                        )
                db.execute("COMMIT")
            except BaseException as exc:  # a failed group: every waiter hears it; the loop goes on
                logger.exception("sqlite group commit failed", extra={"changes": len(batch)})
                error = exc
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    logger.debug("rollback after a failed group commit failed too")
            with self._lock:
                for task_id, version in touched.items():
                    if self._unflushed.get(task_id) == version:
                        del self._unflushed[task_id]
                        self._pending_events.pop(task_id, None)
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
            if group is not self._group:
                group.resolve(error)

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

    def _where(self, query: TaskQuery) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        args: list[Any] = []
        if query.statuses is not None:
            where.append(f"status IN ({', '.join('?' * len(query.statuses))})")
            args.extend(sorted(s.value for s in query.statuses))
        if query.task_type is not None:
            where.append("task_type = ?")
            args.append(query.task_type)
        for column, op, moment in (
            ("created_at", ">", query.created_after),
            ("created_at", "<", query.created_before),
            ("updated_at", ">", query.updated_after),
            ("updated_at", "<", query.updated_before),
        ):
            if moment is not None:
                where.append(f"{column} {op} ?")
                args.append(moment.astimezone(_UTC).isoformat(timespec="microseconds"))
        if query.q is not None:
            where.append("(task_id LIKE ? ESCAPE '\\' OR search LIKE ? ESCAPE '\\')")
            args.extend([_like(query.q) + "%", "%" + _like(query.q) + "%"])
        return where, args

    def list(self, query: TaskQuery) -> Page:
        from ..query import DEFAULT_PAGE

        limit = query.limit or DEFAULT_PAGE
        where, args = self._where(query)
        column = "created_at" if query.sort.endswith("created") else "updated_at"
        order = "DESC" if query.descending else "ASC"
        if query.after is not None:
            where.append(f"({column}, task_id) {'<' if query.descending else '>'} (?, ?)")
            args.extend(query.after)
        sql = "SELECT body, internal FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {column} {order}, task_id {order} LIMIT ?"
        args.append(limit + 1)
        rows = self._reader().execute(sql, args).fetchall()
        tasks = []
        for body, internal in rows:
            task = _task(body, internal)
            newer = self._latest.get(task.task_id)
            if newer is not None and newer.version > task.version:
                if not query.matches(newer):
                    continue
                task = newer
            tasks.append(task)
        return query.page(tasks, limit)

    def counts(self, query: TaskQuery) -> dict[TaskStatus, int]:
        where, args = self._where(query)
        sql = "SELECT status, COUNT(*) FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " GROUP BY status"
        counts = dict.fromkeys(TaskStatus, 0)
        for status, count in self._reader().execute(sql, args).fetchall():
            counts[TaskStatus(status)] = count
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
        """Wait until everything committed so far is written."""
        with self._lock:
            group = self._group if self._queue else None
        if group is not None:
            group.wait(timeout)

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._wake.notify_all()
        self._writer.join(30)
        with self._lock:
            readers, self._readers = self._readers, []
        for db in readers:
            db.close()
        self._db.close()
        os.close(self._lockfile)

