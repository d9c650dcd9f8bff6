"""The task object of PROTOCOL.md, its lifecycle, and the errors that guard it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

__all__ = [
    "Task",
    "TaskNotFoundError",
    "TaskStateError",
    "TaskStatus",
    "is_task_id",
    "utcnow",
]


class TaskStatus(str, Enum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED})

# status -> the statuses it may move to (staying put is always allowed for a live task)
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset({TaskStatus.PENDING, TaskStatus.PROCESSING, TaskStatus.FAILED}),
    TaskStatus.PROCESSING: frozenset({TaskStatus.PROCESSING, TaskStatus.COMPLETED, TaskStatus.FAILED}),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset(),
}


class TaskNotFoundError(LookupError):
    """No task with that id (never existed, malformed, or removed by retention)."""


class TaskStateError(Exception):
    """The change is not allowed in the task's current state (terminal, or an illegal transition)."""


class TaskCancelled(Exception):
    """A cancel was requested for this task: the job should stop; the task ends failed "cancelled"."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def is_task_id(value: str) -> bool:
    """True for a UUID in canonical lower-case hyphenated form (what we hand out)."""
    if len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class Task:
    """One immutable snapshot of a task. Changes make a new snapshot with a higher version."""

    task_id: str
    task_type: str
    status: TaskStatus
    created_at: datetime
    updated_at: datetime
    progress: int = 0
    message: str = ""
    progress_detail: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = 1

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    def to_dict(self) -> dict[str, Any]:
        """The wire form: the original MiroFish keys in their order, then `version`."""
        return {
            "task_id": self.task_id,
            "task_type": self.task_type,
            "status": self.status.value,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "progress": self.progress,
            "message": self.message,
            "progress_detail": self.progress_detail,
            "result": self.result,
            "error": self.error,
            "metadata": self.metadata,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        return cls(
            task_id=data["task_id"],
            task_type=data["task_type"],
            status=TaskStatus(data["status"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            updated_at=datetime.fromisoformat(data["updated_at"]),
            progress=data["progress"],
            message=data["message"],
            progress_detail=data["progress_detail"],
            result=data["result"],
            error=data["error"],
            metadata=data["metadata"],
            version=data["version"],
        )
