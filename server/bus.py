"""In-process fan-out of task events to stream subscribers.

Design (see the performance issue and README's Performance section for the numbers behind it):

* An event's SSE bytes are encoded once, by the publisher, and shared by every subscriber.
* ``publish`` may be called from any thread. Events go into one FIFO and are fanned out on the
  event loop, one loop hop per burst of publishes (not per subscriber); a publish made on the loop
  thread drains the FIFO in place, so events are fanned out strictly in publish order.
* A subscriber is a bounded list of pending events plus one waiter. Publishing never awaits:
  when a subscriber's buffer is full it is coalesced to the newest event per task (so versions may
  skip, a stale snapshot never follows a newer one, and a terminal snapshot, being the last of its
  task, is never dropped).
* Fan-out only appends; the subscribers that got something are flushed once per burst, after the
  next poll for I/O: a stream writes everything pending as one chunk from that flush (see
  ``streams._Stream``), so under load more events share each write instead of each costing a wake-up.
* One heartbeat loop marks quiet subscribers instead of a timer per stream.
* ``Last-Event-ID`` replay reads the store's durable event log (``TaskStore.events``), not the bus.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from time import monotonic as _monotonic
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from sse_starlette import ServerSentEvent

from .models import Task, TaskStatus
from .wire import encode_json

__all__ = ["Event", "EventBus", "Subscriber", "encode_json", "removed_frame"]

logger = logging.getLogger(__name__)


def yield_on_wake() -> None:
    """For a thread woken by the loop or a job to take work on (the bus's waker, the reporter, the
    sqlite writer): waking it does not switch to it at once.

    Without this, Linux runs a woken thread ahead of the one that woke it, and on the same core it
    is the caller who waits: for the switch there and back, while the woken thread, needing the GIL
    the caller holds, can do nothing yet. ``SCHED_BATCH`` keeps the thread's share of the CPU and
    only drops that preemption on wake-up: the thread runs when the caller waits or yields the GIL."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed
        logger.debug("SCHED_BATCH is not available here: the thread keeps plain scheduling")

BATCH_WINDOW_S = 0.02  # events closer together than this: each flush waits one more poll, batching


def _frame(data: str, event: str, event_id: str | None = None) -> bytes:
    return ServerSentEvent(data=data, event=event, id=event_id, sep="\n").encode()


def removed_frame(task_id: str) -> bytes:
    return _frame(encode_json({"task_id": task_id}), "removed")


class Event:
    """One change (or announcement), encoded once. ``frame`` carries ``id: <version>`` (per-task
    streams); ``frame_all`` is the same event without an id (all-tasks stream). The frames are built
    on first use, on the loop, from the wire JSON the manager encoded once."""

    __slots__ = ("kind", "task_id", "task_type", "status", "version", "terminal", "body", "_task", "_frame", "_frame_all")

    def __init__(
        self,
        kind: str,
        task_id: str,
        task_type: str,
        status: TaskStatus,
        version: int,
        body: str | None,
        task: Task | None = None,
    ) -> None:
        self.kind = kind
        self.task_id = task_id
        self.task_type = task_type
        self.status = status
        self.version = version
        self.terminal = kind == "task" and status.is_terminal
        self.body = body
        self._task = task
        self._frame: bytes | None = None
        self._frame_all: bytes | None = None

    @classmethod
    def from_body(cls, task: Task, body: str) -> Event:
        return cls("task", task.task_id, task.task_type, task.status, task.version, body, task)

    @classmethod
    def for_task(cls, task: Task, stale: bool = False) -> Event:
        return cls.from_body(task, task.to_json(stale=stale))

    @classmethod
    def from_json(cls, body: str) -> Event:
        """From a stored snapshot's wire JSON (a replay). The parsed Task is not kept (``snapshot()``
        parses again if asked): a replay page holds only the bodies, which the store already holds."""
        data = json.loads(body)
        return cls("task", data["task_id"], data["task_type"], TaskStatus(data["status"]), data["version"], body)

    @classmethod
    def removed(cls, task: Task) -> Event:
        return cls("removed", task.task_id, task.task_type, task.status, task.version, encode_json({"task_id": task.task_id}))

    @classmethod
    def stale(cls, task_id: str, task_type: str, status: TaskStatus, stale: bool) -> Event:
        body = encode_json({"task_id": task_id, "stale": stale})
        return cls("stale", task_id, task_type, status, 0, body)

    @staticmethod
    def frame_of(kind: str, data: str, event_id: str | None = None) -> bytes:
        return _frame(data, kind, event_id)

    @property
    def frame_all(self) -> bytes:
        frame = self._frame_all
        if frame is None:
            frame = self._frame_all = _frame(self.body or "", self.kind)
        return frame

    @property
    def frame(self) -> bytes:
        frame = self._frame
        if frame is None:
            frame = self.frame_all
            if self.kind == "task":
                frame = b"id: %d\n" % self.version + frame
            self._frame = frame
        return frame

    @property
    def task(self) -> dict[str, Any]:
        """The snapshot as the wire dict."""
        return json.loads(self.body or "null")

    def snapshot(self) -> Task:
        if self._task is None:
            self._task = Task.from_dict(self.task)
        return self._task


class Subscriber:
    """A bounded buffer of pending events plus one waiter. Touched only on the event loop.

    When events arrive the bus marks the subscriber ready and, once per burst, calls its
    ``on_ready`` (a stream that writes directly) or wakes its waiter (a coroutine that waits)."""

    __slots__ = (
        "topic",
        "maxsize",
        "events",
        "waiter",
        "closed",
        "ping_due",
        "last_send",
        "queued",
        "on_ready",
        "overflowed",
        "_latest",
        "_bus",
    )

    def __init__(self, topic: str | None, maxsize: int, bus: EventBus) -> None:
        self.topic = topic  # a task id, or None for every task
        self.maxsize = maxsize
        self.events: list[Event] = []
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.ping_due = False
        self.last_send = bus.loop.time()
        self.queued = False  # already in the bus's ready list for the next flush
        self.on_ready: Callable[[], None] | None = None
        self.overflowed = False  # more distinct tasks pending than the buffer holds: resynchronise
        self._latest: dict[str, Event] | None = None  # coalescing mode: the newest pending event per task
        self._bus = bus

    def push(self, event: Event) -> None:
        """O(1) whatever the reader does: a full buffer turns into "newest event per task" once, and a
        reader with more distinct tasks pending than that is marked ``overflowed`` (its stream then
        closes, and the client reconnects to a fresh snapshot) instead of growing without bound."""
        if self.closed or self.overflowed:
            return  # an overflowed reader is about to be closed: hold nothing more for it
        latest = self._latest
        if latest is not None:
            key = event.task_id if event.kind != "stale" else "stale:" + event.task_id
            if latest.pop(key, None) is not None:
                self._bus.coalesced += 1
            latest[key] = event
            if len(latest) > self.maxsize * 4:
                self.overflowed = True
                latest.clear()
        elif len(self.events) >= self.maxsize:
            latest = self._latest = {}
            for pending in self.events:
                key = pending.task_id if pending.kind != "stale" else "stale:" + pending.task_id
                if latest.pop(key, None) is not None:
                    self._bus.coalesced += 1
                latest[key] = pending
            self.events = []
            self.push(event)
            return
        else:
            self.events.append(event)
        if not self.queued:
            self.queued = True
            self._bus.ready.append(self)

    def ping(self) -> None:
        self.ping_due = True
        if not self.queued:
            self.queued = True
            self._bus.ready.append(self)

    def close(self) -> None:
        self.closed = True
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> list[Event]:
        latest = self._latest
        if latest is not None:
            self._latest = None
            events = list(latest.values())
        else:
            events = self.events
        self.events = []
        self.ping_due = False
        self.last_send = self._bus.loop.time()
        return events

    async def wait(self) -> None:
        """Return once there is something to send (events or a ping) or the subscriber closed."""
        if self.events or self._latest or self.ping_due or self.closed or self.overflowed:
            return
        await self.wait_wake()

    async def wait_wake(self) -> None:
        """Return at the next ``wake()`` (or ``close()``)."""
        waiter = self._bus.loop.create_future()
        self.waiter = waiter
        try:
            await waiter
        finally:
            self.waiter = None


class EventBus:
    def __init__(self, queue_size: int = 64) -> None:
        self.loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._queue_size = queue_size
        self._pending: deque[Event] = deque()
        self._drain_scheduled = False
        self._wake = threading.Event()  # set by a publishing thread; the waker thread hops to the loop
        self._waker: threading.Thread | None = None
        self._waker_lock = threading.Lock()
        self.ready: list[Subscriber] = []  # subscribers with something new since the last flush
        self._flush_scheduled = False
        self._last_event = -BATCH_WINDOW_S  # when the last event with an audience was fanned out
        self._urgent = False  # the scheduled flush is for rare deliveries (see flush_urgent)
        self._by_task: dict[str, set[Subscriber]] = {}
        self._all: set[Subscriber] = set()
        self.hook: Callable[[Event], None] | None = None  # sees every event before its fan-out
        self._closed = False
        self.open_streams = 0
        # Plain ints, read by the metrics collector at scrape time: no per-event metric locks.
        self.published = 0
        # changes nobody was subscribed to: counted by the publisher (under the manager's lock), no
        # event built, no hop to the loop (a producer with no watchers pays for neither)
        self.unheard = 0
        self.delivered = 0
        self.coalesced = 0

    # -- publishing (any thread) ------------------------------------------------------------
    def publish(self, event: Event) -> None:
        """Hand an event to the fan-out. From a job thread this costs an append and, once per burst,
        a ``threading.Event.set``: the hop to the loop (a self-pipe write, after which the loop runs
        and holds the GIL) is made by the bus's waker thread, not by the publisher, so a job's
        progress report does not wait for the loop to finish its turn."""
        self._pending.append(event)
        if threading.get_ident() == self._loop_thread:
            self._drain()
        elif not self._drain_scheduled:
            self._drain_scheduled = True
            if self._waker is None:
                self._start_waker()
            self._wake.set()

    def _start_waker(self) -> None:
        with self._waker_lock:
            if self._waker is None:
                self._waker = threading.Thread(target=self._run_waker, name="taskmon-bus-waker", daemon=True)
                self._waker.start()

    def _run_waker(self) -> None:
        yield_on_wake()
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
                logger.debug("events dropped after shutdown", extra={"pending": len(self._pending)})
                return

    def _drain(self) -> None:
        self._drain_scheduled = False
        pending = self._pending
        while pending:
            try:
                event = pending.popleft()
            except IndexError:
                break
            self._fanout(event)

    def _fanout(self, event: Event) -> None:
        self.published += 1
        hook = self.hook
        if hook is not None:
            hook(event)
        subscribers = self._by_task.get(event.task_id)
        frequent = False
        if subscribers or self._all:
            # events with an audience closer together than BATCH_WINDOW_S: deliveries are frequent
            now = _monotonic()
            frequent = now - self._last_event < BATCH_WINDOW_S
            self._last_event = now
        if subscribers:
            for subscriber in subscribers:
                subscriber.push(event)
        for subscriber in self._all:
            subscriber.push(event)
        if self.ready and not self._flush_scheduled:
            self._schedule_flush(frequent)

    @property
    def changes_seen(self) -> int:
        """Every change published to this bus: fanned out, or unheard (no stream to reach)."""
        return self.published + self.unheard

    def has_audience(self, task_id: str) -> bool:
        """Whether an event of this task would reach a stream now (any thread: two dict reads). A
        stream registers before it reads its snapshot, so one that opens after this said no reads
        the change from the store instead."""
        return bool(self._all) or task_id in self._by_task

    def frequent(self) -> bool:
        """Whether deliveries are frequent now (the last event with an audience, or the end of the
        last flush, under BATCH_WINDOW_S ago): the bus is saturated and its flushes batch."""
        return _monotonic() - self._last_event < BATCH_WINDOW_S

    def fanout_now(self, event: Event) -> None:
        """Fan an event out at once (loop thread; e.g. from ``hook``, before the event it saw)."""
        self._fanout(event)

    def _schedule_flush(self, frequent: bool = False) -> None:
        # Not now: the publisher may hold the manager's lock. When deliveries are frequent (the
        # previous event with an audience came under BATCH_WINDOW_S ago), not at the next turn
        # either but after one more poll for I/O: publishes that arrived while the previous flush
        # was writing ride along in the same writes, which is what keeps the writes per event
        # falling as the load rises. When they are rare (a task at 20 updates/s), the next turn:
        # that extra poll would first run a whole batch of other requests (a producer flood on
        # another task, whose changes nobody watches) ahead of the delivery. The end of a flush
        # counts as an event: a flush to 1,000 streams at saturation takes ~20 ms, and the event
        # after it is not a rare one (flushing those at once cost 4.0 -> 7.1 us per delivery).
        self._flush_scheduled = True
        loop = self._loop
        if frequent:
            loop.call_soon(loop.call_soon, self._flush)
        else:
            self._urgent = True  # flush_urgent() may run it sooner, once the publisher let go
            loop.call_soon(self._flush)

    def flush_urgent(self) -> None:
        """Loop thread, holding no lock: run a flush scheduled for rare deliveries now instead of at
        the end of this turn. The PATCH fast path calls it once its answer is written, so an
        update's first delivery does not wait for the rest of a batch of other requests."""
        if self._urgent:
            self._flush()

    def _flush(self) -> None:
        """Once per burst: every subscriber with something new writes it (or is woken to)."""
        if not self._flush_scheduled:
            return  # flush_urgent() ran it already
        self._flush_scheduled = self._urgent = False
        ready = self.ready
        self.ready = []
        for subscriber in ready:
            subscriber.queued = False
            if subscriber.closed:
                continue
            on_ready = subscriber.on_ready
            if on_ready is None:
                subscriber.wake()
                continue
            try:
                on_ready()
            except Exception:
                logger.exception("stream delivery failed", extra={"task_id": subscriber.topic})
                subscriber.close()
        if ready:
            self._last_event = _monotonic()  # see _schedule_flush

    # -- subscribing (event loop only) ----------------------------------------------------------
    def subscribe(self, task_id: str | None) -> Subscriber:
        subscriber = Subscriber(task_id, self._queue_size, self)
        if self._closed:
            subscriber.closed = True
            return subscriber
        self.open_streams += 1
        if task_id is None:
            self._all.add(subscriber)
        else:
            self._by_task.setdefault(task_id, set()).add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        subscriber.closed = True
        if subscriber.topic is None:
            registered = self._all
        else:
            registered = self._by_task.get(subscriber.topic, set())
        if subscriber not in registered:
            return
        registered.discard(subscriber)
        self.open_streams -= 1
        if subscriber.topic is not None and not registered:
            del self._by_task[subscriber.topic]

    # -- housekeeping ---------------------------------------------------------------------------
    def subscribers(self) -> Iterator[Subscriber]:
        yield from self._all
        for subscribers in self._by_task.values():
            yield from subscribers

    def count(self) -> tuple[int, int]:
        """(per-task subscribers, all-tasks subscribers)."""
        return self.open_streams - len(self._all), len(self._all)

    def ping_quiet(self, quiet_s: float) -> None:
        """Mark every subscriber that has sent nothing for ``quiet_s`` as due a heartbeat."""
        deadline = self._loop.time() - quiet_s
        for subscriber in self.subscribers():
            if subscriber.last_send <= deadline and not subscriber.ping_due:
                subscriber.ping()
        if self.ready and not self._flush_scheduled:
            self._schedule_flush()

    async def run_heartbeat(self, interval_s: float) -> None:
        """One timer for all streams: a stream is pinged after at most ~1.25 x interval of quiet."""
        tick = interval_s / 4
        while True:
            await asyncio.sleep(tick)
            self.ping_quiet(interval_s)

    def close(self) -> None:
        """Shutdown: every open stream ends promptly; later subscribers start closed."""
        self._closed = True
        self._wake.set()  # the waker thread sees _closed and ends
        for subscriber in list(self.subscribers()):
            subscriber.close()
