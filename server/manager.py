"""TaskManager: the one owner of task state.

Every change is computed here, once for every store: validate, check the transition, version + 1,
timing (started/finished, rate, ETA), encode the snapshot once. The store then commits it with a
compare-and-set on the version (``stores/__init__.py``). In-process stores (memory, sqlite) are
guarded by the manager's lock, so a change and its publish are atomic with respect to other changes
and events reach the bus in version order; the shared store (redis) needs no lock: a racing change
gets ``Conflict``, is recomputed from the new snapshot and either applies or fails as the rules say,
and events reach every process's bus from the store's one ordered stream.

Two faces: plain methods for job threads and other processes (``update_task`` costs the caller no
store I/O on memory/sqlite: the write happens in the store's writer, and a progress report is only
checked and queued, see ``update_task``), and ``a``-prefixed coroutines for the routes, which never
block the event loop and return once the change is durable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import operator
import threading
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from time import time as _epoch
from typing import Any

from .bus import Event, EventBus, Subscriber, encode_json, removed_frame, yield_on_wake
from .wire import encode_chunks
from .models import (
    RATE_WINDOW,
    TRANSITIONS,
    Task,
    TaskCancelled,
    TaskNotFoundError,
    TaskStateError,
    TaskStatus,
    estimate_rate,
    utcnow,
)
from .query import MAX_LIST_LIMIT, Page, TaskQuery, parse_limit, parse_status
from .stores import DONE, Ack, Conflict, StoreUnavailable, TaskStore

__all__ = [
    "CANCELLED",
    "INTERRUPTED",
    "MAX_LIST_LIMIT",
    "TaskManager",
    "parse_limit",
    "parse_status",
    "validate_changes",
]

logger = logging.getLogger(__name__)

MAX_TEXT = 10_000
MAX_DEPTH = 64  # nesting of metadata / progress_detail / result
# Encoded size limits per free-form field (bytes of JSON): a snapshot stays small enough that a
# history of them, a replay and a listing stay bounded.
FIELD_LIMITS = {"metadata": 64 * 1024, "progress_detail": 64 * 1024, "result": 256 * 1024}
_SMALL = min(FIELD_LIMITS.values())
MAX_LEASE_S = 7 * 24 * 3600.0
INTERRUPTED = "interrupted: the server stopped before this task finished"
CANCELLED = "cancelled"
REPLAY_PAGE = 32  # events read from the store per step of a Last-Event-ID replay
REPLAY_PAGE_BYTES = 1024 * 1024  # ... fewer when they are large: a page of about this many bytes
SNAPSHOT_BYTES = 512 * 1024  # the all-tasks stream's first page holds at most this much (then next_cursor)
# Stream openings reading a page from the store at once (a page of large tasks parsed from sqlite is
# megabytes while it is read: many clients connecting together must not each hold one).
OPENING_READS = 4

_TICK = timedelta(microseconds=1)  # the wire resolution of updated_at
_UPDATABLE = ("status", "progress", "message", "progress_detail", "result", "error")
_UPDATABLE_SET = frozenset(_UPDATABLE)
_RETRIES = 20  # compare-and-set attempts of one change on a shared store
_LEAD = object()  # handed to the change that commits the next chain (shared store)
_SYNC_BASES = 1024  # shared store: last committed snapshots kept for the thread path
# shared store, saturated fan-out: how long a watched task's events wait for its next chain (see _publish_shared)
_HOLD_S = 0.005
_PUBLISHED_MAX = 10_000  # shared store: tasks whose last published version is remembered (see _publish_shared)
# memory/sqlite: progress reports from job threads queued for the reporter (see ``update_task``); past
# this many the caller applies them itself (backpressure: a flooding job pays for its own reports)
_REPORTS_MAX = 1024
_REPORT_DETAIL = 16 * 1024  # characters: a detail this short is under its byte limit whatever it holds
_PROCESSING = TaskStatus.PROCESSING


class FieldTooLarge(ValueError):
    """A free-form field is over its size limit (HTTP 413, naming the field)."""


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when objects/arrays nest more than ``limit`` levels (checked without recursion)."""
    if isinstance(value, dict) and not any(isinstance(v, (dict, list, tuple)) for v in value.values()):
        return False  # the usual progress_detail: one flat object
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
    if _too_deep(value):
        raise ValueError(f"{name} is nested too deeply (at most {MAX_DEPTH} levels)")


def validate_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Check the fields of an update; returns them normalised. Raises ValueError naming the field."""
    unknown = sorted(set(changes) - _UPDATABLE_SET) if not _UPDATABLE_SET.issuperset(changes) else None
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


def validate_lease(lease_s: Any) -> float | None:
    if lease_s is None:
        return None
    if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or not 0 < lease_s <= MAX_LEASE_S:
        raise ValueError(f"lease_s must be a positive number of seconds, at most {MAX_LEASE_S:g}")
    return float(lease_s)


def _validate_new(task_type: Any, metadata: Any) -> None:
    if not isinstance(task_type, str) or not task_type.strip() or len(task_type) > 200:
        raise ValueError("task_type must be a non-empty string of at most 200 characters")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise ValueError("metadata must be an object")
        _check_json("metadata", metadata)


def encode_task(task: Task) -> str:
    """The snapshot's wire JSON, once; a value that does not encode or is too large is a ValueError."""
    try:
        body = task.to_json()
    except (TypeError, ValueError, RecursionError):
        raise ValueError(f"{_unencodable_field(task)} must be JSON-serialisable") from None
    if len(body) > _SMALL:
        for name, limit in FIELD_LIMITS.items():
            size = len(encode_json(getattr(task, name)).encode())
            if size > limit:
                raise FieldTooLarge(f"{name} is too large ({size} bytes encoded; at most {limit})")
    return body


def _unencodable_field(task: Task) -> str:
    for name in ("metadata", "progress_detail", "result"):
        try:
            encode_json(getattr(task, name))
        except (TypeError, ValueError, RecursionError):
            return name
    return "task"


_FIELDS = tuple(f.name for f in dataclasses.fields(Task))
_ALL_FIELDS = operator.attrgetter(*_FIELDS)


_SLOT_SETTERS = tuple(getattr(Task, name).__set__ for name in _FIELDS)
_FIELD_INDEX = {name: i for i, name in enumerate(_FIELDS)}
_new_object = object.__new__

# ``_fill(new, values)``: each slot of a new snapshot stored in turn, one straight call per field
# (what a dataclass's own __init__ is, generated the same way, minus frozen's object.__setattr__)
_FILL_SOURCE = "def _fill(new, v):\n" + "".join(f"    set{i}(new, v[{i}])\n" for i in range(len(_FIELDS)))
_fill_scope = {f"set{i}": setter for i, setter in enumerate(_SLOT_SETTERS)}
exec(_FILL_SOURCE, _fill_scope)  # noqa: S102 - our own source, built from Task's fields above
_fill = _fill_scope["_fill"]


def _replace(task: Task, fields: dict[str, Any], **more: Any) -> Task:
    """``dataclasses.replace`` without its per-call introspection (it is on every change's path).

    Task is a frozen slots dataclass with no ``__post_init__``: its ``__init__`` only stores each
    field through ``object.__setattr__``, so the new snapshot's slots are filled directly."""
    values = list(_ALL_FIELDS(task))
    index = _FIELD_INDEX
    try:
        for name, value in fields.items():
            values[index[name]] = value
        for name, value in more.items():
            values[index[name]] = value
    except KeyError:  # a name that is not a field: Task's own TypeError
        return Task(**{**dict(zip(_FIELDS, _ALL_FIELDS(task))), **fields, **more})
    new = _new_object(Task)
    _fill(new, values)
    return new


def _after_next_poll() -> asyncio.Future[None]:
    """A future done after the loop's next poll for I/O (as the bus schedules its flush): what
    arrived meanwhile, e.g. other PATCHes of the same task, has run up to its first wait."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def done() -> None:
        if not future.done():
            future.set_result(None)

    loop.call_soon(loop.call_soon, done)
    return future


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _ts(moment: datetime) -> float:
    """Epoch seconds to the microsecond: ``round(moment.timestamp(), 6)``, in integers. The whole
    microseconds are exact and one division gives the double nearest to them, which is what that
    round gives (tests/test_manager.py checks it); round's decimal conversion cost 4x as much."""
    if moment.tzinfo is None:
        return round(moment.timestamp(), 6)
    return (moment - _EPOCH) // _MICROSECOND / 1e6


class TaskManager:
    def __init__(
        self,
        store: TaskStore,
        bus: EventBus | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        stale_after_s: float = 300.0,
        cancel_grace_s: float = 60.0,
        default_lease_s: float | None = None,
        snapshot_page: int = 100,
    ) -> None:
        self._store = store
        self._bus = bus
        self._clock = clock
        self._shared = store.shared
        # In-process stores: the lock makes a change and its publish atomic. The shared store needs no
        # lock for correctness (compare-and-set), but one process's own threads and coroutines queue
        # per task instead of racing each other through Redis (optimistic retries starve under load).
        self._lock: Any = threading.Lock()
        self._pending: dict[str, list[list[Any]]] = {}  # shared store: task id -> changes waiting for the next chain
        self._chain_base: dict[str, Task] = {}  # shared store: the last chain's snapshot, while more wait
        self._sync_base: dict[str, Task] = {}  # shared store: the thread path's last commits (under _lock)
        # memory/sqlite: job threads' progress reports, accepted and waiting to be applied in order
        # (under _lock; None on the shared store and once stopped); see ``update_task``
        self._reports: deque[tuple[str, int | None, str | None, str | None, datetime | float]] | None = (
            None if self._shared else deque()
        )
        self._reporter: threading.Thread | None = None
        self._report_wake = threading.Lock()  # released: reports are waiting for the reporter
        self._report_wake.acquire()
        # the store's live snapshots (memory, sqlite: a dict it keeps current under our lock), read
        # by the report path; a store without one takes every report through the general path
        self._live: dict[str, Task] | None = None if self._shared else getattr(store, "live_tasks", None)
        self.reports_dropped = 0  # accepted reports that could not be applied (logged; never expected)
        # shared store, loop thread only: the last version of each task handed to the local bus, by this
        # process's own commits (at once) or by the reader (every process's); see ``_publish_shared``
        self._published: dict[str, int] = {}
        self._ahead: dict[str, int] = {}  # tasks published by an own commit that the reader has not echoed yet
        # a task's chain that returned while the next one was already queued waits for it, and so do the
        # reader's events of that task meanwhile: both chains reach the bus in one burst (one write per stream)
        self._held: dict[str, list[tuple[Any, ...]]] = {}
        self._hold_waits: set[str] = set()  # held while deliveries are saturated: until the next chain returns
        self._hold_timers: dict[str, asyncio.TimerHandle] = {}  # every hold ends by _HOLD_S at the latest
        self.holds_timed_out = 0  # saturated holds that no next chain ended (plain int: a scrape reads it)
        self.owner = uuid.uuid4().hex[:16]  # this process's job pool, for tasks it runs itself
        self.stale_after_s = stale_after_s
        self.cancel_grace_s = cancel_grace_s
        self.default_lease_s = default_lease_s
        self.snapshot_page = snapshot_page
        self._last_created: datetime | None = None
        self._stale: set[str] = set()  # live tasks announced stale (loop thread only)
        self._opening_reads = asyncio.Semaphore(OPENING_READS)

    @property
    def store(self) -> TaskStore:
        """The store, holding every change accepted so far (queued progress reports are applied first)."""
        self._settle()
        return self._store

    @property
    def bus(self) -> EventBus:
        assert self._bus is not None, "this TaskManager has no event bus (a producer-only manager)"
        return self._bus

    @classmethod
    def open(cls, url: str, **options: Any) -> TaskManager:
        """A producer-only manager on a store URL (e.g. a job on another host reporting through Redis).

        On a shared store it keeps this process's job-pool heartbeat (until ``close()``), so tasks it
        creates with ``owned=True`` are failed as interrupted only once this process is gone."""
        from .stores import open_store

        manager = cls(open_store(url), None, **options)
        keep_alive = getattr(manager._store, "keep_owner_alive", None)
        if keep_alive is not None:  # shared store: this process's job pool (``owned`` tasks) heartbeats
            try:
                keep_alive(manager.owner)
            except BaseException:
                manager.close()
                raise
        return manager

    def close(self) -> None:
        self.stop_reports()
        self._store.close()

    def stop_reports(self) -> None:
        """At shutdown: the queued progress reports are applied now, later ones are applied by their
        callers (``update_task`` takes its general path) and the reporter thread ends."""
        with self._lock:
            reports, self._reports = self._reports, None
            if reports:
                self._apply_reports(reports)
            thread, self._reporter = self._reporter, None
            if thread is not None:
                _release(self._report_wake)
        if thread is not None:
            thread.join(timeout=5)

    def stop_holds(self) -> None:
        """At shutdown (loop thread): the hold timers go; what they held is not published (the bus
        is closing, the streams end)."""
        for timer in self._hold_timers.values():
            timer.cancel()
        self._hold_timers.clear()
        self._hold_waits.clear()
        self._held.clear()

    # -- reads ---------------------------------------------------------------------------------
    # Every read first applies the progress reports accepted before it (see ``update_task``): what a job
    # has reported is what anyone reads next, from any thread.
    def get_task(self, task_id: str) -> Task | None:
        self._settle()
        return self._store.get(task_id)

    async def aget_task(self, task_id: str) -> Task | None:
        self._settle()
        return await self._store.aget(task_id)

    async def aexists(self, task_id: str) -> bool:
        """Whether the task exists (the PATCH route's 404 check). A live task held in memory (memory,
        sqlite) answers without I/O; so does, on the shared store, a task this process is changing (a
        chain in flight) or has seen live: were it removed meanwhile (only finished tasks are), the
        change itself finds it gone and raises TaskNotFoundError all the same."""
        if self._shared:
            if task_id in self._pending or task_id in self._published:
                return True
            return await self._store.aget(task_id) is not None
        cached = getattr(self._store, "cached", None)
        if cached is not None and cached(task_id):
            return True
        return await self._store.aget(task_id) is not None

    def is_stale(self, task: Task, now: datetime | None = None) -> bool:
        if task.is_terminal:
            return False
        now = now or self._clock()
        return (now - task.updated_at).total_seconds() > self.stale_after_s

    def wire(self, task: Task) -> dict[str, Any]:
        """The task as a client sees it now (``stale`` computed)."""
        return task.to_dict(stale=self.is_stale(task))

    def list_tasks(
        self,
        task_type: str | None = None,
        status: TaskStatus | str | None = None,
        limit: int | str | None = None,
    ) -> list[Task]:
        """Newest first. ``status`` and ``limit`` (1..1000) may be given as query text; a bad one is a ValueError."""
        query = TaskQuery(
            task_type=task_type,
            statuses=frozenset({parse_status(status)}) if status is not None else None,
            limit=parse_limit(limit) if limit is not None else None,
        )
        self._settle()
        return self._store.list(query).tasks

    def list_page(self, query: TaskQuery) -> Page:
        self._settle()
        return self._store.list(query)

    async def alist(self, query: TaskQuery) -> Page:
        self._settle()
        return await self._store.alist(query)

    def count_by_status(self, query: TaskQuery | None = None) -> dict[TaskStatus, int]:
        """Tasks per status for every filter of ``query`` but ``status`` (tabs show all four)."""
        return self._store.counts(replace(query, statuses=None) if query else TaskQuery())

    async def acounts(self, query: TaskQuery | None = None) -> dict[TaskStatus, int]:
        return await self._store.acounts(replace(query, statuses=None) if query else TaskQuery())

    async def aevents(self, task_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        self._settle()
        return await self._store.aevents(task_id, after, limit)

    # -- computing a change (pure) ----------------------------------------------------------------
    def _new_task(self, task_type: str, metadata: dict[str, Any] | None, lease_s: Any, owned: bool) -> Task:
        _validate_new(task_type, metadata)
        # the server's default lease is for producers; a job of our own pool may wait queued as pending
        lease = validate_lease(lease_s) if lease_s is not None else (None if owned else self.default_lease_s)
        now = self._clock()
        if self._last_created is not None and now <= self._last_created:
            now = self._last_created + _TICK  # creation order is listing order, even within one tick
        self._last_created = now
        return Task(
            task_id=str(uuid.uuid4()),
            task_type=task_type,
            status=TaskStatus.PENDING,
            created_at=now,
            updated_at=now,
            metadata=dict(metadata or {}),
            lease_s=lease,
            owner=self.owner if owned else None,
            samples=((_ts(now), 0),),
        )

    def _plan(
        self, current: Task | None, task_id: str, fields: dict[str, Any], at: datetime | None = None
    ) -> tuple[Task, str]:
        """The next snapshot of ``current`` with ``fields`` applied (``at``: when the change was
        made, if not now), and its wire JSON."""
        if current is None:
            raise TaskNotFoundError(task_id)
        allowed = TRANSITIONS[current.status]
        if not allowed:  # (only the terminal statuses allow no move; the properties cost a call each)
            raise TaskStateError(f"task is {current.status.value}; a finished task cannot change")
        fields = dict(fields)
        target = fields.get("status", current.status)
        if target not in allowed:
            raise TaskStateError(f"cannot move a task from {current.status.value} to {target.value}")
        if target is TaskStatus.COMPLETED and "progress" not in fields:
            fields["progress"] = 100
        # every change moves updated_at, even two within one clock tick or after a clock step back
        now = max(at or self._clock(), current.updated_at + _TICK)
        progress = fields.get("progress", current.progress)
        terminal = not TRANSITIONS[target]
        if target is TaskStatus.PROCESSING and current.status is not TaskStatus.PROCESSING:
            samples: tuple[tuple[float, int], ...] = ((_ts(now), progress),)  # the pace counts from the start
        else:
            samples = (*current.samples, (_ts(now), progress))[-RATE_WINDOW:]
        rate = estimate_rate(samples)
        if "cancel" in fields:
            fields.pop("cancel")
            fields["cancel_requested"] = True
            # a repeated cancel keeps the first request's time: clicking again never extends the grace
            fields["cancel_at"] = current.cancel_at if current.cancel_requested and current.cancel_at is not None else _ts(now)
        task = _replace(
            current,
            fields,
            updated_at=now,
            version=current.version + 1,
            started_at=current.started_at or (now if target is TaskStatus.PROCESSING else None),
            finished_at=now if terminal else None,
            samples=samples,
            rate=None if rate is None else round(rate, 6),
            eta_s=None if rate is None or terminal else round((100 - progress) / rate, 3),
        )
        if terminal and task.cancel_requested:
            task = replace(task, cancel_requested=False)
        return task, encode_task(task)

    # -- changes from threads (and other processes) -----------------------------------------------
    def create_task(
        self,
        task_type: str,
        metadata: dict[str, Any] | None = None,
        *,
        lease_s: float | None = None,
        owned: bool = False,
    ) -> Task:
        """A new pending task. ``owned``: run by this process's job pool (failed as interrupted when
        the process dies); producer tasks (the default) survive restarts."""
        task = self._new_task(task_type, metadata, lease_s, owned)
        body = encode_task(task)
        with self._lock:
            if self._reports:  # accepted before this change: applied before it
                self._apply_reports(self._reports)
            ack = self._store.commit(task, None, body)
            self._publish_local(task, body)
        ack.wait()
        return task

    def _change(
        self,
        task_id: str,
        fields: dict[str, Any],
        *,
        wait: bool = False,
        cancel_check: bool = False,
        only_version: int | None = None,
    ) -> Task:
        for attempt in range(_RETRIES):
            with self._lock:
                if self._reports:  # accepted before this change: applied before it
                    self._apply_reports(self._reports)
                # shared store: this thread's last commit of the task saves a read (a stale one conflicts)
                current = self._sync_base.pop(task_id, None) if self._shared and attempt == 0 else None
                if current is None:
                    current = self._store.get(task_id)
                if cancel_check and current is not None and current.cancel_requested:
                    raise TaskCancelled(task_id)
                if only_version is not None and current is not None and current.version != only_version:
                    raise TaskStateError("the task changed since the decision was taken")
                task, body = self._plan(current, task_id, fields)
                try:
                    ack = self._store.commit(task, current.version, body)  # type: ignore[union-attr]
                except Conflict:
                    continue
                if self._shared and not task.is_terminal:
                    self._sync_base[task_id] = task
                    if len(self._sync_base) > _SYNC_BASES:
                        del self._sync_base[next(iter(self._sync_base))]
                self._publish_local(task, body)
            if wait or task.is_terminal:
                ack.wait()
            return task
        raise TaskStateError("the task changed too often to apply this change; retry")

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
    ) -> None:
        """Change the given fields (None leaves a field as it is), as the original TaskManager did.

        Raises TaskNotFoundError, ValueError (bad value, or nothing given), TaskStateError (terminal
        task, illegal transition) or TaskCancelled (a cancel was requested: stop, and fail the task
        with ``fail_task(id, "cancelled")``); in every case nothing changes. Returns once the change
        is accepted, in order after every change before it: every read (``get_task``, the routes, the
        streams) sees it from then on. A progress report (progress / message / progress_detail of a
        processing task) is applied and published by the reporter within a loop turn, so the job
        thread pays only for the checks; a status change is applied before the call returns. Either
        way the store's writer puts it on disk. Read the new snapshot back with ``get_task``."""
        # A progress report (memory/sqlite) is checked here and queued for the reporter: see below.
        quick = (
            result is None and error is None and (status is None or status == "processing")
            and self._live is not None
            and (progress is None or (type(progress) is int and 0 <= progress <= 100))
            and (message is None or (type(message) is str and len(message) <= MAX_TEXT))
            and (progress is not None or message is not None or progress_detail is not None)
        )
        detail = None
        if quick and progress_detail is not None:
            quick = type(progress_detail) is dict
            if quick:
                try:
                    detail = "".join(encode_chunks(progress_detail, 0))
                except (TypeError, ValueError, RecursionError):
                    quick = False
                else:
                    quick = len(detail) <= _REPORT_DETAIL and detail.count("{") + detail.count("[") <= MAX_DEPTH
        if quick:
            clock = self._clock  # the real clock's time as the epoch float it reads (cheaper)
            at = _epoch() if clock is utcnow else clock()
            with self._lock:
                reports, current = self._reports, self._live.get(task_id)  # type: ignore[union-attr]
                if reports is not None and current is not None and current.status is _PROCESSING and len(reports) < _REPORTS_MAX:
                    if current.cancel_requested:
                        raise TaskCancelled(task_id)
                    reports.append((task_id, progress, message, detail, at))
                    if len(reports) == 1:  # the first of a burst wakes the reporter
                        if self._reporter is None:
                            self._start_reporter()
                        try:
                            self._report_wake.release()  # (cheaper than _release's look first)
                        except RuntimeError:  # woken already: a wake-up is pending, nothing to add
                            pass
                    return
        given = {
            "status": status,
            "progress": progress,
            "message": message,
            "progress_detail": progress_detail,
            "result": result,
            "error": error,
        }
        fields = validate_changes({k: v for k, v in given.items() if v is not None})
        terminal = fields.get("status") in (TaskStatus.COMPLETED, TaskStatus.FAILED)
        self._change(task_id, fields, cancel_check=not terminal)

    # A progress report from a job thread (memory/sqlite), above: the cheap, exact half of
    # ``validate_changes`` (a value it does not take outright -- an int subclass, a long or deeply
    # nested detail, a task that is not processing, a full queue -- goes on to the general path,
    # which accepts or raises), then the report is queued under the lock. The reporter plans,
    # commits and publishes it later, in order: on the event loop when one runs the bus, else on its
    # own thread. Every other change, and every read, applies the queued reports first (under the
    # lock), so none is overtaken and none is unseen. The detail is kept as the JSON it was checked
    # as (the caller may reuse its dict at once) and the report keeps the time it was made. It is
    # one function with few lines on purpose: it runs on every report a job makes, and after the
    # job's pause between two reports every line costs several times what it costs warm.
    def _start_reporter(self) -> None:
        thread = threading.Thread(
            target=_run_reporter, args=(weakref.ref(self), self._report_wake), name="taskmon-reporter", daemon=True
        )
        weakref.finalize(self, _release, self._report_wake)  # a manager never closed still ends it
        self._reporter = thread
        thread.start()

    def _hand_reports(self) -> None:
        """The reporter's turn: the loop running the bus applies the queued reports (their events
        go straight to the fan-out), or, with no loop, this thread does."""
        loop = self._bus.loop if self._bus is not None else None
        if loop is None or not loop.is_running():
            self._settle()
            return
        try:
            loop.call_soon_threadsafe(self._settle)
        except RuntimeError:  # the loop closed meanwhile: this thread applies them
            self._settle()

    def _settle(self) -> None:
        """Apply the queued reports now (a read does, first: it sees every accepted change)."""
        if self._reports:
            with self._lock:
                if self._reports:
                    self._apply_reports(self._reports)

    def _apply_reports(self, reports: deque[Any]) -> None:
        """Under the lock: every queued report, in order."""
        while reports:
            task_id, progress, message, detail, at = reports.popleft()
            fields: dict[str, Any] = {}
            if progress is not None:
                fields["progress"] = progress
            if message is not None:
                fields["message"] = message
            if detail is not None:
                fields["progress_detail"] = json.loads(detail)
            try:
                current = self._store.cached(task_id)  # type: ignore[attr-defined]
                when = datetime.fromtimestamp(at, UTC) if type(at) is float else at
                task, body = self._plan(current or None, task_id, fields, when)
                self._store.commit(task, current.version, body)
            except Exception:  # the checks made it applicable, and every change since applied first
                self.reports_dropped += 1
                logger.exception("a progress report could not be applied", extra={"task_id": task_id})
                continue
            self._publish_local(task, body)

    def patch_task(self, task_id: str, changes: Mapping[str, Any]) -> Task:
        """The producer API's PATCH from a thread (the route uses ``apatch``)."""
        if self._store.get(task_id) is None:
            raise TaskNotFoundError(task_id)
        return self._change(task_id, validate_changes(changes), wait=True)

    def complete_task(self, task_id: str, result: dict[str, Any] | None = None) -> Task:
        return self._change(task_id, validate_changes(_completed(result)))

    def fail_task(self, task_id: str, error: str) -> Task:
        return self._change(task_id, validate_changes(_failed(error)))

    def cancel_task(self, task_id: str) -> Task:
        return self._change(task_id, {"cancel": True}, wait=True)

    # -- changes on the event loop (the routes) ---------------------------------------------------
    async def acreate(self, task_type: str, metadata: dict[str, Any] | None = None, *, lease_s: Any = None) -> tuple[Task, str]:
        task = self._new_task(task_type, metadata, lease_s, False)
        body = encode_task(task)
        if self._shared:
            await self._store.acommit(task, None, body)
            self._publish_shared(task.task_id, None, [(task, body)])
            return task, body
        with self._lock:
            if self._reports:  # accepted before this change: applied before it
                self._apply_reports(self._reports)
            ack = self._store.commit(task, None, body)
            self._publish_local(task, body)
        await ack.done()
        return task, body

    async def _achange(self, task_id: str, fields: dict[str, Any]) -> tuple[Task, str]:
        if self._shared and hasattr(self._store, "acommit_chain"):
            return await self._achange_chained(task_id, fields)
        return await self._achange_once(task_id, fields)

    # -- the shared store: a process's changes to one task go out as chains -----------------------
    # While one chain of changes to a task is being committed, the changes that arrive for it wait;
    # the next chain takes all of them: planned one after the other from the last snapshot and
    # committed as one compare-and-set (``acommit_chain``). A burst of PATCHes costs one round trip
    # and reaches every reader as one batch; this process never races itself on the version.
    async def _achange_chained(self, task_id: str, fields: dict[str, Any]) -> tuple[Task, str]:
        loop = asyncio.get_running_loop()
        item: list[Any] = [fields, loop.create_future()]
        waiting = self._pending.get(task_id)
        if waiting is not None:  # a chain is in flight: ride along in the next one
            waiting.append(item)
            future = item[1]
            try:
                outcome = await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled() and future.result() is _LEAD:
                    item[1].cancel()  # handed the lead as we were cancelled: pass it on
                    self._hand_over(task_id)
                raise
            if outcome is not _LEAD:
                return outcome  # type: ignore[no-any-return]
        else:
            self._pending[task_id] = [item]
            try:  # until after the next poll: the changes that arrive with this one join its chain
                await _after_next_poll()
            except asyncio.CancelledError:
                item[1].cancel()
                self._hand_over(task_id)
                raise
        # this caller leads: commit chains until its own change is settled, then hand over
        try:
            while not item[1].done():
                queue = self._pending[task_id]
                batch, queue[:] = list(queue), []
                await self._commit_chain(task_id, batch)
        finally:
            self._hand_over(task_id)
        return item[1].result()  # type: ignore[no-any-return]

    def _hand_over(self, task_id: str) -> None:
        """The oldest waiting change leads the next chain; with none left the task's queue goes."""
        queue = self._pending[task_id]
        queue[:] = [i for i in queue if not i[1].done()]
        if queue:
            lead, queue[0][1] = queue[0][1], asyncio.get_running_loop().create_future()
            lead.set_result(_LEAD)
        else:
            del self._pending[task_id]
            self._chain_base.pop(task_id, None)
            if task_id not in self._hold_waits:
                self._release(task_id)  # nothing queued any more: a held chain goes out now

    async def _commit_chain(self, task_id: str, batch: list[list[Any]]) -> None:
        """Plan ``batch`` in order from the stored snapshot; commit the ones that apply in one step."""
        held_before = task_id in self._held
        try:
            await self._commit_chain_once(task_id, batch)
        finally:
            if held_before and task_id in self._held:
                self._release(task_id)  # this chain published nothing: the held one goes out alone

    async def _commit_chain_once(self, task_id: str, batch: list[list[Any]]) -> None:
        try:
            for attempt in range(_RETRIES):
                live = [i for i in batch if not i[1].done()]  # a caller may have gone (cancelled)
                if not live:
                    return
                # the previous chain's last snapshot while changes keep coming (a stale one conflicts)
                current = self._chain_base.pop(task_id, None) if attempt == 0 else None
                if current is None:
                    current = await self._store.aget(task_id)
                base, planned, refused = current, [], []
                for item in live:
                    try:
                        task, body = self._plan(base, task_id, item[0])
                    except (TaskNotFoundError, TaskStateError, ValueError) as exc:
                        refused.append((item, exc))  # e.g. a change after a terminal one in the chain
                        continue
                    planned.append((item, task, body))
                    base = task
                if planned:
                    try:
                        await self._store.acommit_chain(  # type: ignore[attr-defined]
                            [(task, body) for _i, task, body in planned], current.version  # type: ignore[union-attr]
                        )
                    except Conflict:
                        continue  # another process moved the task: plan the whole batch again
                if base is not None:
                    self._chain_base[task_id] = base
                if planned:
                    self._publish_shared(task_id, current.version, [(task, body) for _i, task, body in planned])  # type: ignore[union-attr]
                for item, task, body in planned:
                    if not item[1].done():
                        item[1].set_result((task, body))
                for item, exc in refused:
                    if not item[1].done():
                        item[1].set_exception(exc)
                return
            error: BaseException = TaskStateError("the task changed too often to apply this change; retry")
        except BaseException as exc:  # the store failed (or this leader was cancelled): nobody waits forever
            error = exc
        for item in batch:
            if not item[1].done():
                item[1].set_exception(error if not isinstance(error, asyncio.CancelledError) else StoreUnavailable("cancelled"))
        if isinstance(error, asyncio.CancelledError):
            raise error

    async def _achange_once(self, task_id: str, fields: dict[str, Any]) -> tuple[Task, str]:
        for _ in range(_RETRIES):
            if self._shared:
                current = await self._store.aget(task_id)
                task, body = self._plan(current, task_id, fields)
                try:
                    await self._store.acommit(task, current.version, body)  # type: ignore[union-attr]
                except Conflict:
                    continue
                return task, body
            # memory/sqlite keep every live task in memory: read, compute and commit under the lock;
            # a task they do not hold in memory is finished or gone, read (off the loop) to say which
            current = self._store.cached(task_id)  # type: ignore[attr-defined]
            if current is False:
                self._plan(await self._store.aget(task_id), task_id, fields)  # raises: not live
            with self._lock:
                if self._reports:  # accepted before this change: applied before it
                    self._apply_reports(self._reports)
                current = self._store.cached(task_id)  # type: ignore[attr-defined]
                if current is False:
                    continue  # finished meanwhile: the next round says so
                task, body = self._plan(current, task_id, fields)
                try:
                    ack = self._store.commit(task, current.version, body)  # type: ignore[union-attr]
                except Conflict:
                    continue
                self._publish_local(task, body)
            await ack.done()
            return task, body
        raise TaskStateError("the task changed too often to apply this change; retry")

    async def apatch(self, task_id: str, changes: Mapping[str, Any], *, known: bool = False) -> tuple[Task, str]:
        """PATCH: unknown id (TaskNotFoundError), then the body (ValueError), then the state (TaskStateError).
        ``known``: the caller has just checked that the task exists (the route does, before the body)."""
        if not known and await self._store.aget(task_id) is None:
            raise TaskNotFoundError(task_id)
        fields = validate_changes(changes)
        if not self._shared:
            # the producer path's common case, with no coroutine in between: a live task held in
            # memory is planned, committed and published at once; only a group commit is awaited
            done = self._change_cached(task_id, fields)
            if done is not None:
                task, body, ack = done
                if ack is not DONE and not ack.durable:  # (memory's is always DONE)
                    await ack.done()
                return task, body
        return await self._achange(task_id, fields)

    def _change_cached(self, task_id: str, fields: dict[str, Any]) -> tuple[Task, str, Ack] | None:
        """memory/sqlite: the change applied to the live snapshot held in memory, under the lock;
        None when the task is not held (finished, gone, or unknown: ``_achange`` says which)."""
        with self._lock:
            if self._reports:  # accepted before this change: applied before it
                self._apply_reports(self._reports)
            current = self._store.cached(task_id)  # type: ignore[attr-defined]
            if not current:
                return None
            task, body = self._plan(current, task_id, fields)
            try:
                ack = self._store.commit(task, current.version, body)
            except Conflict:
                return None  # not under this lock's rule: the general path retries
            self._publish_local(task, body)
        return task, body, ack

    async def acancel(self, task_id: str) -> tuple[Task, str]:
        return await self._achange(task_id, {"cancel": True})

    async def afail(self, task_id: str, error: str) -> tuple[Task, str]:
        return await self._achange(task_id, validate_changes(_failed(error)))

    # -- events ----------------------------------------------------------------------------------
    def _publish_local(self, task: Task, body: str) -> None:
        """Under the lock (memory, sqlite): the change to the local bus, unless no stream would see it
        (and it does not end a stale announcement): then only counted."""
        bus = self._bus
        if bus is None or self._shared:
            return
        if bus.has_audience(task.task_id) or task.task_id in self._stale:
            bus.publish(Event.from_body(task, body))
        else:
            bus.unheard += 1

    # The shared store: the reader hands every process's changes to the local bus, in the store's
    # order. This process's own commits are published at once when they return (no wait for the
    # reader's echo, and a chain reaches the bus as one burst), on one rule that keeps each task's
    # versions on the bus strictly consecutive, with no gap and no duplicate:
    # * an own commit of versions e+1..e+k is published iff the last version published is e (else the
    #   reader, which sees every version in order, publishes them);
    # * the reader publishes a version only above the last one published, and skips the rest.
    # The map forgets a task once its terminal version or its removal went through the reader; past
    # _PUBLISHED_MAX tasks, the oldest entries the reader has caught up with go (a forgotten task's
    # next own commit is left to the reader). Entries ahead of the reader are never dropped: they are
    # what tells the reader to skip its echo.
    # Under load, a chain that returns while changes already wait for the next one is held until that
    # one returns (its callers have their answers already), and the reader's events of the task are
    # held behind it, so that both chains reach the bus together; ``_release`` replays everything held
    # in order through the same rule. When deliveries are saturated (``EventBus.frequent``) and the
    # task is watched, the same holds even with nothing queued yet: the reader's echo of a chain in
    # flight and the chain itself wait for the next chain (the callers, answered, send the next
    # changes), so one flush writes two chains to each stream instead of one: fewer writes per
    # delivered event, as the in-process stores batch the changes that arrive during a flush. Every
    # hold ends within _HOLD_S of its last chain, whatever comes (a timer), and at once when the next
    # chain returns or fails; a task at a steady 20 updates/s is never saturated, so never held.
    def _saturated(self, task_id: str) -> bool:
        bus = self._bus
        return bus is not None and bus.frequent() and bus.has_audience(task_id)

    def _hold(self, task_id: str, item: tuple[Any, ...], wait: bool) -> None:
        self._held[task_id] = [item]
        if wait:
            self._hold_waits.add(task_id)
        self._arm(task_id)

    def _disarm(self, task_id: str) -> None:
        timer = self._hold_timers.pop(task_id, None)
        if timer is not None:
            timer.cancel()

    def _arm(self, task_id: str) -> None:
        self._disarm(task_id)
        self._hold_timers[task_id] = asyncio.get_running_loop().call_later(_HOLD_S, self._hold_expired, task_id)

    def _hold_expired(self, task_id: str) -> None:
        self._hold_timers.pop(task_id, None)
        if task_id in self._held:
            self.holds_timed_out += 1
            self._release(task_id)

    def _publish_shared(self, task_id: str, expected: int | None, chain: list[tuple[Task, str]]) -> None:
        if self._bus is None:
            return
        item = ("own", expected, chain)
        held = self._held.get(task_id)
        if held is None:
            if self._pending.get(task_id):
                self._hold(task_id, item, False)
            elif self._published.get(task_id) == expected and self._saturated(task_id):
                self._hold(task_id, item, True)  # (a chain the reader has published already is not held)
            else:
                self._publish_own(task_id, expected, chain)
            return
        held.append(item)
        if not any(i[0] == "own" for i in held[:-1]) and self._saturated(task_id):
            self._hold_waits.add(task_id)  # held since the reader's echo of this chain: wait for the next
            self._arm(task_id)
            return
        self._release(task_id)

    def _release(self, task_id: str) -> None:
        self._hold_waits.discard(task_id)
        self._disarm(task_id)
        for item in self._held.pop(task_id, ()):
            if item[0] == "own":
                self._publish_own(task_id, item[1], item[2])
            else:
                self._feed_now(item[1], item[2], item[3])

    def _publish_own(self, task_id: str, expected: int | None, chain: list[tuple[Task, str]]) -> None:
        assert self._bus is not None
        published = self._published
        last = published.get(task_id)
        if expected is None:
            if last is not None:
                return  # the reader was quicker (it has seen a created task)
        elif last != expected:
            return
        for task, body in chain:
            self._bus.publish(Event.from_body(task, body))
        version = chain[-1][0].version
        published.pop(task_id, None)  # re-inserted: the dict's order is least recently published first
        published[task_id] = self._ahead[task_id] = version
        if len(published) > _PUBLISHED_MAX:
            self._forget_published()

    def _forget_published(self) -> None:
        """Drop the oldest entries the reader has caught up with, down to 3/4 of the bound."""
        excess = len(self._published) - _PUBLISHED_MAX * 3 // 4
        old = [k for k in self._published if k not in self._ahead][:excess]
        for task_id in old:
            del self._published[task_id]

    def on_feed(self, kind: str, task: Task, body: str | None) -> None:
        """The shared store's reader: every process's changes, in the store's order (loop thread)."""
        if self._bus is None:
            return
        held = self._held.get(task.task_id)
        if held is not None:
            held.append(("feed", kind, task, body))
            return
        if kind == "task" and task.task_id in self._pending and self._saturated(task.task_id):
            self._hold(task.task_id, ("feed", kind, task, body), False)  # a chain of ours is in flight
            return
        self._feed_now(kind, task, body)

    def _feed_now(self, kind: str, task: Task, body: str | None) -> None:
        assert self._bus is not None
        task_id = task.task_id
        if kind == "task" and body is not None:
            version = task.version
            ahead = self._ahead.get(task_id)
            if ahead is not None and version >= ahead:
                del self._ahead[task_id]  # the reader has caught up with our own commits
            last = self._published.get(task_id)
            if last is None or version > last:
                self._bus.publish(Event.from_body(task, body))
                self._published.pop(task_id, None)
                self._published[task_id] = version
                if len(self._published) > _PUBLISHED_MAX:
                    self._forget_published()
            if task.is_terminal and task_id not in self._ahead:
                self._published.pop(task_id, None)  # no later version can come
        elif kind == "removed":
            self._ahead.pop(task_id, None)
            self._published.pop(task_id, None)
            self._bus.publish(Event.removed(task))

    def recover_stale(self, event: Event) -> None:
        """Bus hook: a change to a task announced stale announces its recovery first."""
        if event.kind == "task" and event.task_id in self._stale:
            self._stale.discard(event.task_id)
            self.bus.fanout_now(Event.stale(event.task_id, event.task_type, event.status, False))

    # -- housekeeping (the monitor loop) -----------------------------------------------------------
    def recover_interrupted(self) -> list[Task]:
        """At start-up: live tasks whose job pool died with its process come back failed, never stuck.

        Only tasks run by an in-process job pool (``owned``) are failed; a producer's task keeps going.
        On a shared store a pool counts as dead once its process stopped renewing its lease."""
        recovered: list[Task] = []
        alive = getattr(self._store, "owner_alive", None)
        for task in self._store.live():
            if task.owner is None or task.owner == self.owner:
                continue
            if alive is not None and alive(task.owner):
                continue
            try:
                recovered.append(self.fail_task(task.task_id, INTERRUPTED))
            except (TaskNotFoundError, TaskStateError):
                continue  # changed by someone else meanwhile: nothing to recover
        return recovered

    def sweep(self, now: datetime | None = None) -> dict[str, list[str]]:
        """Fail tasks whose lease ran out or whose cancel grace ended; returns the ids by reason.
        Runs in a worker thread (it commits through the sync path)."""
        now = now or self._clock()
        out: dict[str, list[str]] = {"lease": [], "cancel": [], "interrupted": []}
        if not self._store.try_lead("sweep", 30.0):
            return out  # another process sweeps now
        alive = getattr(self._store, "owner_alive", None)  # shared store: job pools of other processes
        pools: dict[str, bool] = {}
        for task in self._store.live():
            quiet = (now - task.updated_at).total_seconds()
            try:
                if alive is not None and task.owner is not None and task.owner != self.owner:
                    if task.owner not in pools:
                        pools[task.owner] = alive(task.owner)
                    if not pools[task.owner]:  # its process died (heartbeat expired) while we ran
                        self.fail_task(task.task_id, INTERRUPTED)
                        out["interrupted"].append(task.task_id)
                        continue
                if task.cancel_requested and task.cancel_at is not None and now.timestamp() - task.cancel_at > self.cancel_grace_s:
                    self.fail_task(task.task_id, CANCELLED)
                    out["cancel"].append(task.task_id)
                elif task.lease_s is not None and quiet > task.lease_s:
                    # only the snapshot judged quiet: an update that landed meanwhile renewed the lease
                    failed = validate_changes(_failed(f"no update for {task.lease_s:g} s"))
                    self._change(task.task_id, failed, only_version=task.version)
                    out["lease"].append(task.task_id)
            except (TaskNotFoundError, TaskStateError):
                continue  # it moved on meanwhile
        return out

    def mark_stale(self, live: list[Task], now: datetime | None = None) -> list[str]:
        """Announce live tasks that became stale (loop thread). Returns their ids."""
        now = now or self._clock()
        became: list[str] = []
        live_ids = set()
        for task in live:
            live_ids.add(task.task_id)
            if task.task_id not in self._stale and self.is_stale(task, now):
                self._stale.add(task.task_id)
                became.append(task.task_id)
                if self._bus is not None:
                    self._bus.publish(Event.stale(task.task_id, task.task_type, task.status, True))
        self._stale &= live_ids
        return became

    def cleanup_old_tasks(self, max_age_hours: float) -> list[str]:
        """Remove terminal tasks whose last change is older than ``max_age_hours``; announce each."""
        try:
            cutoff = self._clock() - timedelta(hours=max_age_hours)
        except OverflowError:  # a retention reaching back before year 1: nothing can be that old
            return []
        if not self._store.try_lead("retention", 60.0):
            return []  # another process sweeps now (each removal is announced once, by the store)
        with self._lock:
            if self._reports:  # accepted before this change: applied before it
                self._apply_reports(self._reports)
            removed = self._store.remove(self._store.terminal_before(cutoff))
            if self._bus is not None and not self._shared:
                for task in removed:
                    self._bus.publish(Event.removed(task))
        return [task.task_id for task in removed]

    async def run_monitor(self, interval_s: float, sweep: Callable[[], Any]) -> None:
        """Every ``interval_s``: stale announcements (here) and the lease/cancel sweep (``sweep``)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self._settle()
                live = await self._store.alive()  # type: ignore[attr-defined]
                self.mark_stale(live)
                await sweep()
            except Exception:
                logger.exception("task monitor failed")

    # -- streams -------------------------------------------------------------------------------
    async def open_subscription(self, task_id: str, after: int | None = None) -> TaskSubscription:
        """Follow one task: the snapshot (or the replay after ``after``), then every later change.

        The subscriber is registered before the snapshot is read, so no change can fall between.
        The caller owns the result and must ``close()`` it (``subscribe`` does that for you)."""
        bus = self.bus
        subscriber = bus.subscribe(task_id)
        try:
            self._settle()
            task = await self._store.aget(task_id)
            if task is None:
                raise TaskNotFoundError(task_id)
            subscription = TaskSubscription(bus, subscriber, task)
            if after is not None and not 0 <= after <= task.version:
                after = None  # above the current version (or nonsense): start from the snapshot
            if after is not None and after == task.version:
                subscription.no_content = task.is_terminal
            elif after is not None:
                async with self._opening_reads:
                    replay = await self._store.aevents(task_id, after, REPLAY_PAGE)
                if replay and replay[0][0] == after + 1:
                    if task.task_id in self._stale:  # the log's snapshots say stale: false; it is not
                        subscription.stale_tail = Event.stale(task.task_id, task.task_type, task.status, True)
                    subscription.start_replay(replay, task, more=len(replay) == REPLAY_PAGE)
                else:
                    subscription.start_snapshot(task, self.is_stale(task))
            else:
                subscription.start_snapshot(task, self.is_stale(task))
            return subscription
        except BaseException:
            bus.unsubscribe(subscriber)
            raise

    async def replay_more(self, subscription: TaskSubscription) -> list[Event]:
        """The next page of a long replay (the stream asks after writing the previous one)."""
        limit = subscription.page_limit
        async with self._opening_reads:
            replay = await self._store.aevents(subscription.task_id, subscription.last_version, limit)
        return subscription.take_replay(replay, more=len(replay) == limit)

    async def open_all_subscription(
        self, query: TaskQuery | None = None, follow: tuple[str, ...] = ()
    ) -> AllTasksSubscription:
        """Follow every task matching ``query`` (plus ``follow``ed ones); the caller must ``close()`` it."""
        query = query or TaskQuery()
        bus = self.bus
        subscriber = bus.subscribe(None)
        try:
            self._settle()
            first = query if query.limit is not None else replace(query, limit=self.snapshot_page)
            async with self._opening_reads:
                page = await self._store.alist(first)
                counts = await self.acounts(query)
                followed = [t for t in [await self._store.aget(i) for i in follow] if t is not None]
                return AllTasksSubscription(bus, subscriber, page, counts, query, followed, self)
        except BaseException:
            bus.unsubscribe(subscriber)
            raise

    @asynccontextmanager
    async def subscribe(self, task_id: str, after: int | None = None) -> AsyncIterator[TaskSubscription]:
        subscription = await self.open_subscription(task_id, after)
        try:
            yield subscription
        finally:
            subscription.close()

    @asynccontextmanager
    async def subscribe_all(self, query: TaskQuery | None = None) -> AsyncIterator[AllTasksSubscription]:
        subscription = await self.open_all_subscription(query)
        try:
            yield subscription
        finally:
            subscription.close()


def _completed(result: dict[str, Any] | None) -> dict[str, Any]:
    return {"status": TaskStatus.COMPLETED, "progress": 100, "message": "Task completed", "result": result or {}}


def _failed(error: str) -> dict[str, Any]:
    return {"status": TaskStatus.FAILED, "message": "Task failed", "error": error}


class TaskSubscription:
    """What a per-task stream sends: ``take_initial()`` events, then ``fresh(batch)`` of each wake-up.

    It keeps no snapshot of its own: an open stream costs its subscriber and a few numbers."""

    __slots__ = (
        "_bus",
        "subscriber",
        "task_id",
        "initial",
        "no_content",
        "last_version",
        "finished",
        "final_status",
        "more",
        "page_limit",
        "stale_tail",
    )

    def __init__(self, bus: EventBus, subscriber: Subscriber, task: Task) -> None:
        self._bus = bus
        self.subscriber = subscriber
        self.task_id = task.task_id
        self.no_content = False  # the client already has the terminal version: 204
        self.initial: list[Event] = []
        self.last_version = task.version
        self.finished = False
        self.final_status = task.status
        self.more = False  # a replay has further pages in the store
        self.page_limit = REPLAY_PAGE  # events to read for the next page
        self.stale_tail: Event | None = None  # sent after the last replay page: the task is stale now

    def start_snapshot(self, task: Task, stale: bool) -> None:
        self.initial = [Event.for_task(task, stale=stale)]
        self.last_version = task.version
        self.finished = task.is_terminal

    def start_replay(self, replay: list[tuple[int, str]], task: Task, more: bool) -> None:
        self.last_version = replay[0][0] - 1
        self.initial = self.take_replay(replay, more)
        if not self.more and self.last_version < task.version and not self.finished:
            # the log ended short of the snapshot we read (it cannot, but never leave a gap)
            self.initial.append(Event.for_task(task))
            self.last_version = task.version
            self.finished = task.is_terminal

    def take_replay(self, replay: list[tuple[int, str]], more: bool) -> list[Event]:
        out: list[Event] = []
        size = sum(len(body) for _v, body in replay)
        if size:  # about REPLAY_PAGE_BYTES per page whatever the size of the snapshots
            self.page_limit = max(1, min(REPLAY_PAGE, REPLAY_PAGE_BYTES * len(replay) // size))
        for version, body in replay:
            if version > self.last_version and not self.finished:
                event = Event.from_json(body)
                out.append(event)
                self.last_version = version
                self.finished = event.terminal
                self.final_status = event.status
        self.more = more and not self.finished
        if not self.more and self.stale_tail is not None:
            if not self.finished:
                out.append(self.stale_tail)
            self.stale_tail = None
        return out

    def close(self) -> None:
        self._bus.unsubscribe(self.subscriber)

    def take_initial(self) -> list[Event]:
        """The opening events, handed over once (the subscription does not keep them)."""
        initial, self.initial = self.initial, []
        return initial

    def fresh(self, events: list[Event]) -> list[Event]:
        """The events newer than what was sent, in order; marks the stream finished at the terminal one.
        Stale announcements pass through (they carry no version)."""
        out: list[Event] = []
        for event in events:
            if self.finished:
                break
            if event.kind == "task":
                if event.version > self.last_version:
                    out.append(event)
                    self.last_version = event.version
                    self.finished = event.terminal
                    self.final_status = event.status
            elif event.kind == "stale":
                out.append(event)
        return out

    async def __aiter__(self) -> AsyncIterator[Task]:
        """For Python consumers: each snapshot as a Task, ending after the terminal one."""
        for event in self.take_initial():
            if event.kind == "task":
                yield Task.from_dict(event.task)
        while not self.finished:
            await self.subscriber.wait()
            if self.subscriber.closed:
                return
            for event in self.fresh(self.subscriber.take()):
                if event.kind == "task":
                    yield Task.from_dict(event.task)


class AllTasksSubscription:
    """The all-tasks stream's view: one page of the list, then task/removed/stale frames for every
    change that matches the query (or concerns a followed task)."""

    def __init__(
        self,
        bus: EventBus,
        subscriber: Subscriber,
        page: Page,
        counts: dict[TaskStatus, int],
        query: TaskQuery,
        followed: list[Task],
        manager: TaskManager,
    ) -> None:
        self._bus = bus
        self.subscriber = subscriber
        self.counts = counts
        self._query = query
        self._narrow = query.filtered
        self._follow = frozenset(t.task_id for t in followed)
        self._manager = manager
        # The page, encoded now: at most SNAPSHOT_BYTES of it (then next_cursor points past the last
        # task kept), so a client that does not read holds that, not the store's objects.
        wire = manager.wire
        tasks: list[Task] = []
        self._bodies: list[bytes] = []
        size = 0
        self.next_cursor = page.next_cursor
        for task in page.tasks:
            body = encode_json(wire(task)).encode()
            if tasks and size + len(body) > SNAPSHOT_BYTES:
                self.next_cursor = query.cursor_for(tasks[-1])
                break
            tasks.append(task)
            self._bodies.append(body)
            size += len(body)
        self._followed = [encode_json(wire(t)).encode() for t in followed]
        # changes already in the snapshot are dropped; the task ids the client holds as matching
        self._seen = {t.task_id: t.version for t in (*tasks, *followed)}
        self._visible = set(self._seen)

    def close(self) -> None:
        self._bus.unsubscribe(self.subscriber)

    def snapshot_pieces(self) -> Iterator[bytes]:
        """The opening ``snapshot`` event in pieces (one per task), so the stream can write it under
        back-pressure; each piece is dropped once handed over. Handed over once."""
        bodies, self._bodies = self._bodies, []
        followed, self._followed = self._followed, []
        bodies.reverse()
        yield b'event: snapshot\ndata: {"tasks":['
        first = True
        while bodies:
            yield bodies.pop() if first else b"," + bodies.pop()
            first = False
        tail: dict[str, Any] = {"counts": {s.value: n for s, n in self.counts.items()}, "next_cursor": self.next_cursor}
        rest = encode_json(tail)[1:-1]
        if followed:
            yield ("]," + rest + ',"followed":[').encode()
            yield b",".join(followed)
            yield b"]}\n\n"
        else:
            yield ("]," + rest + "}\n\n").encode()

    def snapshot_frame(self) -> bytes:
        """The opening ``snapshot`` event whole (handed over once)."""
        return b"".join(self.snapshot_pieces())

    def frame_for(self, event: Event) -> bytes | None:
        task_id = event.task_id
        # An unfiltered stream announces every removal and stale change (its client may hold any task,
        # read through later cursor pages); a filtered one those of the tasks it has shown.
        if event.kind == "removed":
            self._seen.pop(task_id, None)
            if task_id not in self._visible and self._narrow:
                return None
            self._visible.discard(task_id)
            return event.frame_all
        if event.kind == "stale":
            return event.frame_all if task_id in self._visible or not self._narrow else None
        seen = self._seen.get(task_id)
        if seen is not None and event.version <= seen:
            return None
        self._seen[task_id] = event.version
        if task_id in self._follow or not self._narrow or self._query.matches(event.snapshot()):
            self._visible.add(task_id)
            return event.frame_all
        if task_id in self._visible:  # moved out of the filter
            self._visible.discard(task_id)
            return removed_frame(task_id)
        return None


def _release(wake: Any) -> None:
    """Wake the reporter, unless it is woken already. Only the reporter locks ``wake`` again, and
    every release is made under the manager's lock (or, by the finalizer, once no one else can), so
    it cannot be unlocked between the look and the release."""
    if wake.locked():
        wake.release()


def _run_reporter(ref: weakref.ref[TaskManager], wake: Any) -> None:
    """The reporter thread: one turn per burst of reports; ends with its manager."""
    yield_on_wake()
    while True:
        wake.acquire()
        manager = ref()
        if manager is None or manager._reporter is not threading.current_thread():
            return
        try:
            manager._hand_reports()
        except Exception:
            logger.exception("the reporter failed; the queued reports wait for the next change or read")
        del manager
