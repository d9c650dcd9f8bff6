"""TaskManager: the one owner of task state.

Every change goes validate -> bump version -> save -> publish, under one lock, so versions, stored
snapshots and published events agree and come in the same order whichever thread made the change.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any

from .bus import Event, EventBus, Subscriber, encode_json, removed_frame
from .models import (
    TRANSITIONS,
    Task,
    TaskNotFoundError,
    TaskStateError,
    TaskStatus,
    utcnow,
)
from .stores import TaskStore

__all__ = ["TaskManager", "validate_changes", "parse_limit", "parse_status", "MAX_LIST_LIMIT"]

MAX_LIST_LIMIT = 1000
MAX_TEXT = 10_000
MAX_DEPTH = 64  # nesting of metadata / progress_detail / result
INTERRUPTED = "interrupted: the server stopped before this task finished"

_TICK = timedelta(microseconds=1)  # the wire resolution of updated_at
_UPDATABLE = ("status", "progress", "message", "progress_detail", "result", "error")


def parse_status(value: Any) -> TaskStatus:
    if isinstance(value, TaskStatus):
        return value
    try:
        return TaskStatus(value)
    except ValueError:
        allowed = ", ".join(s.value for s in TaskStatus)
        raise ValueError(f"status must be one of: {allowed}") from None


def parse_limit(value: Any) -> int:
    """A listing limit, 1..1000, given as an int or as the text of a query parameter."""
    if isinstance(value, str):
        text = value.strip()
        value = int(text) if text.isascii() and text.isdigit() else None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIST_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")
    return value


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when objects/arrays nest more than ``limit`` levels (checked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _check_json(name: str, value: Any) -> None:
    # A snapshot is re-encoded inside deeper call stacks later (the listing, a response class): a value
    # that only just encodes here could fail there and break every later read, so nesting is capped.
    # Whether it encodes at all is found out once, when the change's event is encoded (_commit).
    if _too_deep(value):
        raise ValueError(f"{name} is nested too deeply (at most {MAX_DEPTH} levels)")


def _unencodable_field(task: Task) -> str:
    """Which of a snapshot's free-form fields does not encode (the slow path of a failed commit)."""
    for name in ("metadata", "progress_detail", "result"):
        try:
            encode_json(getattr(task, name))
        except (TypeError, ValueError, RecursionError):
            return name
    return "task"


def validate_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Check the fields of an update; returns them normalised. Raises ValueError naming the field."""
    unknown = sorted(set(changes) - set(_UPDATABLE))
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(_UPDATABLE)}")
    if not changes:
        raise ValueError(f"nothing to change: give at least one of {', '.join(_UPDATABLE)}")
    out: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "status":
            out[name] = parse_status(value)
        elif name == "progress":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
                raise ValueError("progress must be an integer from 0 to 100")
            out[name] = value
        elif name == "message":
            if not isinstance(value, str) or len(value) > MAX_TEXT:
                raise ValueError(f"message must be a string of at most {MAX_TEXT} characters")
            out[name] = value
        elif name == "error":
            if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT):
                raise ValueError(f"error must be null or a string of at most {MAX_TEXT} characters")
            out[name] = value
        elif name == "progress_detail":
            if not isinstance(value, dict):
                raise ValueError("progress_detail must be an object")
            _check_json(name, value)
            out[name] = value
        elif name == "result":
            if value is not None and not isinstance(value, dict):
                raise ValueError("result must be an object or null")
            _check_json(name, value)
            out[name] = value
    return out


def _validate_new(task_type: Any, metadata: Any) -> None:
    if not isinstance(task_type, str) or not task_type.strip() or len(task_type) > 200:
        raise ValueError("task_type must be a non-empty string of at most 200 characters")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise ValueError("metadata must be an object")
        _check_json("metadata", metadata)


class TaskManager:
    def __init__(self, store: TaskStore, bus: EventBus) -> None:
        self._store = store
        self._bus = bus
        self._lock = threading.Lock()

    @property
    def bus(self) -> EventBus:
        return self._bus

    # -- reads ---------------------------------------------------------------------------------
    def get_task(self, task_id: str) -> Task | None:
        return self._store.get(task_id)

    def list_tasks(
        self,
        task_type: str | None = None,
        status: TaskStatus | str | None = None,
        limit: int | str | None = None,
    ) -> list[Task]:
        """Newest first. ``status`` and ``limit`` (1..1000) may be given as query text; a bad one is a ValueError."""
        return self._store.list(
            task_type=task_type,
            status=parse_status(status) if status is not None else None,
            limit=parse_limit(limit) if limit is not None else None,
        )

    def count_by_status(self) -> dict[TaskStatus, int]:
        return self._store.count_by_status()

    # -- changes -------------------------------------------------------------------------------
    def create_task(self, task_type: str, metadata: dict[str, Any] | None = None) -> Task:
        _validate_new(task_type, metadata)
        with self._lock:
            now = utcnow()
            task = Task(
                task_id=str(uuid.uuid4()),
                task_type=task_type,
                status=TaskStatus.PENDING,
                created_at=now,
                updated_at=now,
                metadata=dict(metadata or {}),
            )
            self._commit(task)
        return task

    def update_task(
        self,
        task_id: str,
        *,
        status: TaskStatus | str | None = None,
        progress: int | None = None,
        message: str | None = None,
        progress_detail: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> Task:
        """Change the given fields (None leaves a field as it is), as the original TaskManager did.

        Raises TaskNotFoundError, ValueError (bad value, or nothing given) or TaskStateError
        (terminal task, illegal transition); in every case nothing changes.
        """
        given = {
            "status": status,
            "progress": progress,
            "message": message,
            "progress_detail": progress_detail,
            "result": result,
            "error": error,
        }
        return self._apply(task_id, validate_changes({k: v for k, v in given.items() if v is not None}))

    def patch_task(self, task_id: str, changes: Mapping[str, Any]) -> Task:
        """The producer API's PATCH: 404 first (TaskNotFoundError), then the body (ValueError; null
        clears ``result``/``error``), then the state (TaskStateError)."""
        if self._store.get(task_id) is None:
            raise TaskNotFoundError(task_id)
        return self._apply(task_id, validate_changes(changes))

    def complete_task(self, task_id: str, result: dict[str, Any] | None = None) -> Task:
        return self._apply(
            task_id,
            validate_changes(
                {"status": TaskStatus.COMPLETED, "progress": 100, "message": "Task completed", "result": result or {}}
            ),
        )

    def fail_task(self, task_id: str, error: str) -> Task:
        return self._apply(
            task_id, validate_changes({"status": TaskStatus.FAILED, "message": "Task failed", "error": error})
        )

    def _apply(self, task_id: str, fields: dict[str, Any]) -> Task:
        with self._lock:
            current = self._store.get(task_id)
            if current is None:
                raise TaskNotFoundError(task_id)
            if current.is_terminal:
                raise TaskStateError(f"task is {current.status.value}; a finished task cannot change")
            target = fields.get("status", current.status)
            if target not in TRANSITIONS[current.status]:
                raise TaskStateError(f"cannot move a task from {current.status.value} to {target.value}")
            if target is TaskStatus.COMPLETED and "progress" not in fields:
                fields["progress"] = 100
            now = utcnow()
            task = replace(
                current,
                **fields,
                # every change moves updated_at, even two within one clock tick or after a clock step back
                updated_at=max(now, current.updated_at + _TICK),
                version=current.version + 1,
            )
            self._commit(task)
        return task

    def _commit(self, task: Task) -> None:
        """Encode, save, publish. Called with the lock held; encoding first so a bad value changes nothing."""
        try:
            event = Event.for_task(task)
        except (TypeError, ValueError, RecursionError):
            raise ValueError(f"{_unencodable_field(task)} must be JSON-serialisable") from None
        self._store.save(task)
        self._bus.publish(event)

    def recover_interrupted(self) -> list[Task]:
        """At start-up: tasks a dead process left pending/processing come back failed, never stuck."""
        recovered: list[Task] = []
        for status in (TaskStatus.PENDING, TaskStatus.PROCESSING):
            for task in self._store.list(status=status):
                try:
                    recovered.append(self.fail_task(task.task_id, INTERRUPTED))
                except (TaskNotFoundError, TaskStateError):
                    continue  # changed by someone else meanwhile: nothing to recover
        return recovered

    def cleanup_old_tasks(self, max_age_hours: float) -> list[str]:
        """Remove terminal tasks whose last change is older than ``max_age_hours``; announce each."""
        try:
            cutoff = utcnow() - timedelta(hours=max_age_hours)
        except OverflowError:  # a retention reaching back before year 1: nothing can be that old
            return []
        removed: list[str] = []
        with self._lock:
            for task in self._store.terminal_before(cutoff):
                self._store.delete([task.task_id])
                self._bus.publish(Event.removed(task))
                removed.append(task.task_id)
        return removed

    # -- streams -------------------------------------------------------------------------------
    def open_subscription(self, task_id: str, after: int | None = None) -> TaskSubscription:
        """Follow one task: the snapshot (or the replay after ``after``), then every later change.

        The subscriber is registered before the snapshot is read, so no change can fall between.
        The caller owns the result and must ``close()`` it (``subscribe`` does that for you)."""
        subscriber = self._bus.subscribe(task_id)
        task = self._store.get(task_id)
        if task is None:
            self._bus.unsubscribe(subscriber)
            raise TaskNotFoundError(task_id)
        return TaskSubscription(self._bus, subscriber, task, after)

    def open_all_subscription(
        self, task_type: str | None = None, status: TaskStatus | None = None
    ) -> AllTasksSubscription:
        """Follow every task matching the filters; the caller must ``close()`` the result."""
        subscriber = self._bus.subscribe(None)
        try:
            tasks = self._store.list(task_type=task_type, status=status)
        except BaseException:
            self._bus.unsubscribe(subscriber)
            raise
        return AllTasksSubscription(self._bus, subscriber, tasks, task_type, status)

    @asynccontextmanager
    async def subscribe(self, task_id: str, after: int | None = None) -> AsyncIterator[TaskSubscription]:
        subscription = self.open_subscription(task_id, after)
        try:
            yield subscription
        finally:
            subscription.close()

    @asynccontextmanager
    async def subscribe_all(
        self, task_type: str | None = None, status: TaskStatus | None = None
    ) -> AsyncIterator[AllTasksSubscription]:
        subscription = self.open_all_subscription(task_type, status)
        try:
            yield subscription
        finally:
            subscription.close()


class TaskSubscription:
    """What a per-task stream sends: ``initial`` events, then ``fresh(batch)`` of each wake-up.

    It keeps no snapshot of its own: an open stream costs its subscriber and a few numbers."""

    __slots__ = ("_bus", "subscriber", "task_id", "initial", "no_content", "last_version", "finished")

    def __init__(self, bus: EventBus, subscriber: Subscriber, task: Task, after: int | None) -> None:
        self._bus = bus
        self.subscriber = subscriber
        self.task_id = task.task_id
        self.no_content = False  # the client already has the terminal version: 204
        if after is not None and not 0 <= after <= task.version:
            after = None  # above the current version (or nonsense): start from the snapshot
        replay = bus.history_after(task.task_id, after) if after is not None else None
        if after is not None and after == task.version:
            self.initial: list[Event] = []
            self.no_content = task.is_terminal
        elif replay is not None:
            self.initial = replay
        else:
            latest = bus.history_after(task.task_id, task.version - 1)
            self.initial = latest if latest else [Event.for_task(task)]
        self.last_version = self.initial[-1].version if self.initial else (after or 0)
        self.finished = self.no_content or any(e.terminal for e in self.initial)

    def close(self) -> None:
        self._bus.unsubscribe(self.subscriber)

    def take_initial(self) -> list[Event]:
        """The opening events, handed over once (the subscription does not keep them)."""
        initial, self.initial = self.initial, []
        return initial

    def fresh(self, events: list[Event]) -> list[Event]:
        """The events newer than what was sent, in order; marks the stream finished at the terminal one."""
        out: list[Event] = []
        for event in events:
            if event.kind == "task" and event.version > self.last_version and not self.finished:
                out.append(event)
                self.last_version = event.version
                self.finished = event.terminal
        return out

    async def __aiter__(self) -> AsyncIterator[Task]:
        """For Python consumers: each snapshot as a Task, ending after the terminal one."""
        for event in self.take_initial():
            yield Task.from_dict(event.task)  # type: ignore[arg-type]
        while not self.finished:
            await self.subscriber.wait()
            if self.subscriber.closed:
                return
            for event in self.fresh(self.subscriber.take()):
                yield Task.from_dict(event.task)  # type: ignore[arg-type]


class AllTasksSubscription:
    """The all-tasks stream's view: a snapshot list, then task/removed frames honouring the filters."""

    def __init__(
        self,
        bus: EventBus,
        subscriber: Subscriber,
        tasks: list[Task],
        task_type: str | None,
        status: TaskStatus | None,
    ) -> None:
        self._bus = bus
        self.subscriber = subscriber
        self.tasks = tasks
        self._task_type = task_type
        self._status = status
        self._seen = {t.task_id: t.version for t in tasks}  # drops changes already in the snapshot
        self._visible = set(self._seen)

    def close(self) -> None:
        self._bus.unsubscribe(self.subscriber)

    def take_tasks(self) -> list[Task]:
        """The opening snapshot, handed over once (the subscription does not keep it)."""
        tasks, self.tasks = self.tasks, []
        return tasks

    def frame_for(self, event: Event) -> bytes | None:
        if self._task_type is not None and event.task_type != self._task_type:
            return None
        task_id = event.task_id
        if event.kind == "removed":
            self._seen.pop(task_id, None)
            if task_id not in self._visible:
                return None
            self._visible.discard(task_id)
            return event.frame_all
        seen = self._seen.get(task_id)
        if seen is not None and event.version <= seen:
            return None
        self._seen[task_id] = event.version
        if self._status is None or event.status is self._status:
            self._visible.add(task_id)
            return event.frame_all
        if task_id in self._visible:  # moved out of the filter
            self._visible.discard(task_id)
            return removed_frame(task_id)
        return None

