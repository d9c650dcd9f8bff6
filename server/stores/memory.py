"""In-process store: dicts, for tests and throwaway runs. Commits are durable at once."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from datetime import datetime

from ..models import Task, TaskStatus
from ..query import Page, TaskQuery
from . import DONE, Ack, Conflict, LocalStore

_LIVE = (TaskStatus.PENDING, TaskStatus.PROCESSING)


class MemoryStore(LocalStore):
    """Snapshots plus a per-task event log bounded by count and bytes (``history``, ``history_bytes``),
    and by bytes across all tasks (``total_bytes``: over it, the oldest events of the largest logs go
    first; every task keeps its newest snapshot)."""

    def __init__(
        self, history: int = 256, history_bytes: int = 8 * 1024 * 1024, total_bytes: int = 1024 * 1024 * 1024
    ) -> None:
        self._tasks: dict[str, Task] = {}
        self.live_tasks = self._tasks  # read without the lock by TaskManager's report path (never rebound)
        self._logs: dict[str, deque[tuple[int, str]]] = {}
        self._log_bytes: dict[str, int] = {}
        self._history = history
        self._history_bytes = history_bytes
        self._total_limit = total_bytes
        self._total = 0  # bytes in every log
        self._lock = threading.Lock()

    def cached(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    def commit(self, task: Task, expected: int | None, body: str) -> Ack:
        with self._lock:
            current = self._tasks.get(task.task_id)
            if (current.version if current is not None else None) != expected:
                raise Conflict(task.task_id)
            self._tasks[task.task_id] = task
            log = self._logs.get(task.task_id)
            if log is None:
                log = self._logs[task.task_id] = deque()
                self._log_bytes[task.task_id] = 0
            log.append((task.version, body))
            before = self._log_bytes[task.task_id]
            size = before + len(body)
            # Oldest out, by count and by bytes; the newest snapshot always stays.
            while len(log) > 1 and (len(log) > self._history or size > self._history_bytes):
                size -= len(log.popleft()[1])
            self._log_bytes[task.task_id] = size
            self._total += size - before
            if self._total > self._total_limit:
                self._trim_total()
        return DONE

    def _trim_total(self) -> None:
        """Over the process budget: drop the oldest events of the largest logs (lock held)."""
        logs, sizes = self._logs, self._log_bytes
        while self._total > self._total_limit:
            trimmable = [task_id for task_id, log in logs.items() if len(log) > 1]
            if not trimmable:
                return
            task_id = max(trimmable, key=sizes.__getitem__)
            log = logs[task_id]
            while len(log) > 1 and self._total > self._total_limit:
                dropped = len(log.popleft()[1])
                sizes[task_id] -= dropped
                self._total -= dropped

    def remove(self, tasks: Iterable[Task]) -> list[Task]:
        removed: list[Task] = []
        with self._lock:
            for task in tasks:
                current = self._tasks.get(task.task_id)
                if current is None or current.version != task.version:
                    continue
                del self._tasks[task.task_id]
                self._logs.pop(task.task_id, None)
                self._total -= self._log_bytes.pop(task.task_id, 0)
                removed.append(current)
        return removed

    def list(self, query: TaskQuery) -> Page:
        with self._lock:
            snapshot = list(self._tasks.values())
        return query.apply(snapshot)

    def counts(self, query: TaskQuery) -> dict[TaskStatus, int]:
        counts = dict.fromkeys(TaskStatus, 0)
        with self._lock:
            snapshot = list(self._tasks.values())
        for task in snapshot:
            if query.matches(task):
                counts[task.status] += 1
        return counts

    def events(self, task_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        with self._lock:
            log = self._logs.get(task_id)
            if not log:
                return []
            out = [entry for entry in log if entry[0] > after]
        return out[:limit]

    def live(self) -> list[Task]:
        with self._lock:
            return [t for t in self._tasks.values() if t.status in _LIVE]

    def terminal_before(self, cutoff: datetime) -> list[Task]:
        with self._lock:
            return [t for t in self._tasks.values() if t.is_terminal and t.updated_at < cutoff]

    def close(self) -> None:
        with self._lock:
            self._tasks.clear()
            self._logs.clear()
            self._log_bytes.clear()
            self._total = 0

    # Everything is in memory: the loop may call straight through.
    async def alist(self, query: TaskQuery) -> Page:
        return self.list(query)

    async def acounts(self, query: TaskQuery) -> dict[TaskStatus, int]:
        return self.counts(query)

    async def aevents(self, task_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        return self.events(task_id, after, limit)

    async def aclose(self) -> None:
        self.close()
