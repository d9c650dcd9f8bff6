"""In-process store: a dict in creation order. For tests and throwaway runs."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime

from ..models import Task, TaskStatus


def _created_at(task: Task) -> datetime:
    return task.created_at


class MemoryStore:
    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}  # insertion order: the tie-break for equal created_at
        self._lock = threading.Lock()

    def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    def save(self, task: Task) -> None:
        with self._lock:
            self._tasks[task.task_id] = task

    def delete(self, task_ids: Iterable[str]) -> None:
        with self._lock:
            for task_id in task_ids:
                self._tasks.pop(task_id, None)

    def list(
        self,
        task_type: str | None = None,
        status: TaskStatus | None = None,
        limit: int | None = None,
    ) -> list[Task]:
        with self._lock:
            snapshot = list(self._tasks.values())
        # Newest first by creation time, then by creation (insertion) order, as the interface says and
        # as sqlite orders: saves can arrive out of creation-time order (threads, a clock step back).
        # Timsort is O(n) on the usual already-ordered input; reverse=True keeps ties stable.
        snapshot.reverse()
        snapshot.sort(key=_created_at, reverse=True)
        out: list[Task] = []
        for task in snapshot:
            if task_type is not None and task.task_type != task_type:
                continue
            if status is not None and task.status is not status:
                continue
            out.append(task)
            if limit is not None and len(out) >= limit:
                break
        return out

    def terminal_before(self, cutoff: datetime) -> list[Task]:
        with self._lock:
            return [t for t in self._tasks.values() if t.is_terminal and t.updated_at < cutoff]

    def count_by_status(self) -> dict[TaskStatus, int]:
        counts = dict.fromkeys(TaskStatus, 0)
        with self._lock:
            for task in self._tasks.values():
                counts[task.status] += 1
        return counts

    def close(self) -> None:
        with self._lock:
            self._tasks.clear()
