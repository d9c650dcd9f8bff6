"""Task stores behind one small interface, chosen by URL scheme.

A store only keeps snapshots; ordering, validation, versions and events belong to the TaskManager,
which calls a store while holding its own lock. Stores must still be safe to call from any thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Protocol

from ..models import Task, TaskStatus

__all__ = ["TaskStore", "open_store"]


class TaskStore(Protocol):
    def get(self, task_id: str) -> Task | None: ...

    def save(self, task: Task) -> None:
        """Insert or replace the snapshot of ``task.task_id``."""

    def delete(self, task_ids: Iterable[str]) -> None: ...

    def list(
        self,
        task_type: str | None = None,
        status: TaskStatus | None = None,
        limit: int | None = None,
    ) -> list[Task]:
        """Newest first (creation time, then creation order)."""

    def terminal_before(self, cutoff: datetime) -> list[Task]:
        """Completed or failed tasks whose last change is older than ``cutoff``."""

    def count_by_status(self) -> dict[TaskStatus, int]: ...

    def close(self) -> None: ...


def open_store(url: str) -> TaskStore:
    """``memory://``, ``sqlite:///relative/or//absolute/path.db``."""
    if url.startswith("memory://"):
        from .memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:///"))
    if url.startswith(("redis://", "rediss://")):
        raise ValueError("the redis:// store is not available yet; use memory:// or sqlite:///PATH")
    raise ValueError(f"unsupported store URL scheme: {url.split(':', 1)[0]!r}")
