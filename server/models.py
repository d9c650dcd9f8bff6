"""The task object of PROTOCOL.md, its lifecycle, and the errors that guard it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from .wire import encode_json, encode_str

__all__ = [
    "RATE_WINDOW",
    "Task",
    "TaskCancelled",
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


_TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_task_id(value: str) -> bool:
    """True for a UUID in canonical lower-case hyphenated form (what we hand out); on every request's
    path, so a pattern rather than a parse."""
    return len(value) == 36 and _TASK_ID.fullmatch(value) is not None


_ISO_CACHE: dict[datetime, str] = {}
_ISO_CACHE_SIZE = 4096


_SECONDS: dict[tuple[int, ...], str] = {}  # (y, m, d, H, M, S) -> "YYYY-MM-DDTHH:MM:SS", bounded as _ISO_CACHE


def _iso(moment: datetime) -> str:
    """``moment.isoformat(timespec="microseconds")``; for UTC (every moment a task gets) the text up
    to the second is looked up and the microseconds appended: isoformat's formatting was the most
    expensive step of encoding a changed snapshot (tests/test_models.py checks the two agree)."""
    if moment.tzinfo is not UTC:
        return moment.isoformat(timespec="microseconds")
    key = (moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)
    text = _SECONDS.get(key)
    if text is None:
        if len(_SECONDS) >= _ISO_CACHE_SIZE:
            _SECONDS.clear()
        text = _SECONDS[key] = moment.isoformat(timespec="seconds")[:-6]  # without "+00:00"
    return f"{text}.{moment.microsecond:06d}+00:00"


def _iso_kept(moment: datetime) -> str:
    """``_iso`` for the moments a task repeats in every snapshot (created_at, started_at): formatted
    once, then looked up (isoformat was a quarter of encoding a snapshot). Bounded: cleared when full."""
    if moment.tzinfo is not UTC:  # equal instants in other zones must keep their own offset
        return moment.isoformat(timespec="microseconds")
    text = _ISO_CACHE.get(moment)
    if text is None:
        if len(_ISO_CACHE) >= _ISO_CACHE_SIZE:
            _ISO_CACHE.clear()
        text = _ISO_CACHE[moment] = moment.isoformat(timespec="microseconds")
    return text


RATE_WINDOW = 10  # progress samples the rate is estimated over


def _iso_or_none(moment: datetime | None) -> str | None:
    return None if moment is None else _iso(moment)


def _dt_or_none(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


@dataclass(frozen=True, slots=True)
class Task:
    """One immutable snapshot of a task. Changes make a new snapshot with a higher version.

    The wire keys come first (PROTOCOL.md's order). ``owner``, ``samples`` and ``cancel_at`` are
    internal: stored with the snapshot (``to_record``) but never sent to clients."""

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
    started_at: datetime | None = None
    finished_at: datetime | None = None
    rate: float | None = None
    eta_s: float | None = None
    cancel_requested: bool = False
    lease_s: float | None = None
    # -- internal ------------------------------------------------------------------------------
    # (not compared: two snapshots are equal when a client would see them as equal)
    owner: str | None = field(default=None, compare=False)  # the job pool that runs it; None: a producer
    samples: tuple[tuple[float, int], ...] = field(default=(), compare=False)  # recent (epoch s, progress)
    cancel_at: float | None = field(default=None, compare=False)  # epoch seconds of the cancel request

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    def to_dict(self, stale: bool = False) -> dict[str, Any]:
        """The wire form: the original MiroFish keys in their order, then `version`, then v1.1's keys.

        ``stale`` is computed by the reader (it is not a change); a freshly changed task is never stale."""
        return {
            "task_id": self.task_id,
            "task_type": self.task_type,
            "status": self.status.value,
            "created_at": _iso_kept(self.created_at),
            "updated_at": _iso(self.updated_at),
            "progress": self.progress,
            "message": self.message,
            "progress_detail": self.progress_detail,
            "result": self.result,
            "error": self.error,
            "metadata": self.metadata,
            "version": self.version,
            "started_at": None if self.started_at is None else _iso_kept(self.started_at),
            "finished_at": _iso_or_none(self.finished_at),
            "rate": self.rate,
            "eta_s": self.eta_s,
            "stale": stale,
            "cancel_requested": self.cancel_requested,
            "lease_s": self.lease_s,
        }

    def to_json(self, stale: bool = False) -> str:
        """``encode_json(self.to_dict(stale))``, built from its parts: the producer path encodes every
        snapshot once, and this skips the dict and the key encoding (tests/test_models.py checks
        it against ``to_dict`` on generated tasks). Raises as ``encode_json`` does."""
        rate, eta, lease = self.rate, self.eta_s, self.lease_s
        return "".join((
            '{"task_id":', encode_str(self.task_id),
            ',"task_type":', encode_str(self.task_type),
            ',"status":"', self.status._value_,  # (the attribute: Enum's value property is a Python call)
            '","created_at":"', _iso_kept(self.created_at),
            '","updated_at":"', _iso(self.updated_at),
            '","progress":', encode_json(self.progress),
            ',"message":', encode_json(self.message),
            ',"progress_detail":', encode_json(self.progress_detail),
            ',"result":', "null" if self.result is None else encode_json(self.result),
            ',"error":', "null" if self.error is None else encode_json(self.error),
            ',"metadata":', encode_json(self.metadata),
            ',"version":', encode_json(self.version),
            ',"started_at":', "null" if self.started_at is None else '"' + _iso_kept(self.started_at) + '"',
            ',"finished_at":', "null" if self.finished_at is None else '"' + _iso(self.finished_at) + '"',
            ',"rate":', "null" if rate is None else encode_json(rate),
            ',"eta_s":', "null" if eta is None else encode_json(eta),
            ',"stale":', "true" if stale else "false",
            ',"cancel_requested":', "true" if self.cancel_requested else "false",
            ',"lease_s":', "null" if lease is None else encode_json(lease),
            "}",
        ))

    def to_record(self) -> dict[str, Any]:
        """What a store keeps: the wire form plus the internal fields."""
        record = self.to_dict()
        del record["stale"]
        record["owner"] = self.owner
        record["samples"] = [list(sample) for sample in self.samples]
        record["cancel_at"] = self.cancel_at
        return record

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        """From the wire form or a store record (keys a v1 snapshot lacks take their defaults)."""
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
            started_at=_dt_or_none(data.get("started_at")),
            finished_at=_dt_or_none(data.get("finished_at")),
            rate=data.get("rate"),
            eta_s=data.get("eta_s"),
            cancel_requested=bool(data.get("cancel_requested", False)),
            lease_s=data.get("lease_s"),
            owner=data.get("owner"),
            samples=tuple((float(t), int(p)) for t, p in data.get("samples") or ()),
            cancel_at=data.get("cancel_at"),
        )


def estimate_rate(samples: tuple[tuple[float, int], ...]) -> float | None:
    """Percentage points per second over the sample window; None with too little data or no movement.

    The window is the last RATE_WINDOW changes (each one a (time, progress) sample), so the rate
    follows the recent pace and falls to None once progress has not moved for a whole window."""
    if len(samples) < 2:
        return None
    (t0, p0), (t1, p1) = samples[0], samples[-1]
    if t1 <= t0 or p1 <= p0:
        return None
    return (p1 - p0) / (t1 - t0)
