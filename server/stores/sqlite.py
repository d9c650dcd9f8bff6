"""The embedded default: one SQLite file that survives restarts.

One connection shared by all threads behind a lock (SQLite serialises writers anyway); WAL so a
reader never waits on the writer; ``synchronous=NORMAL`` since a lost last change on power loss is
acceptable for progress reports and fsync per progress update is not.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from ..models import Task, TaskStatus

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id    TEXT NOT NULL UNIQUE,
    task_type  TEXT NOT NULL,
    status     TEXT NOT NULL,
    created_ts REAL NOT NULL,
    updated_ts REAL NOT NULL,
    body       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_created ON tasks (created_ts DESC, seq DESC);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status, updated_ts);
"""


class SqliteStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Task]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [Task.from_dict(json.loads(row[0])) for row in rows]

    def get(self, task_id: str) -> Task | None:
        rows = self._query("SELECT body FROM tasks WHERE task_id = ?", (task_id,))
        return rows[0] if rows else None

    def save(self, task: Task) -> None:
        body = json.dumps(task.to_dict(), ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            self._db.execute(
                "INSERT INTO tasks (task_id, task_type, status, created_ts, updated_ts, body)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(task_id) DO UPDATE SET status=excluded.status,"
                " updated_ts=excluded.updated_ts, body=excluded.body",
                (
                    task.task_id,
                    task.task_type,
                    task.status.value,
                    task.created_at.timestamp(),
                    task.updated_at.timestamp(),
                    body,
                ),
            )

    def delete(self, task_ids: Iterable[str]) -> None:
        ids = [(task_id,) for task_id in task_ids]
        with self._lock:
            self._db.executemany("DELETE FROM tasks WHERE task_id = ?", ids)

    def list(
        self,
        task_type: str | None = None,
        status: TaskStatus | None = None,
        limit: int | None = None,
    ) -> list[Task]:
        where: list[str] = []
        args: list[Any] = []
        if task_type is not None:
            where.append("task_type = ?")
            args.append(task_type)
        if status is not None:
            where.append("status = ?")
            args.append(status.value)
        sql = "SELECT body FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_ts DESC, seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return self._query(sql, tuple(args))

    def terminal_before(self, cutoff: datetime) -> list[Task]:
        return self._query(
            "SELECT body FROM tasks WHERE status IN ('completed', 'failed') AND updated_ts < ?",
            (cutoff.timestamp(),),
        )

    def count_by_status(self) -> dict[TaskStatus, int]:
        counts = dict.fromkeys(TaskStatus, 0)
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall()
        for status, count in rows:
            counts[TaskStatus(status)] = count
        return counts

    def close(self) -> None:
        with self._lock:
            self._db.close()
