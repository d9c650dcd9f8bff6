"""The SSE endpoints: ``/tasks/{task_id}/stream`` and ``/tasks/stream``.

These are plain ASGI handlers. They are real Starlette routes (``stream_routes()``: named, matched
with ``root_path`` and mounts like every route), but ``TaskmonApp`` dispatches their GET/HEAD ahead
of the middleware stack. The performance issue measured why: sse-starlette's EventSourceResponse
costs a task group of three or four tasks per connection (~30-42 KB) and a cancel scope per send,
Starlette's middleware adds a wrapper per send, and a per-stream ping task is a timer per
connection. Here a stream is one coroutine plus one small task that waits for the client to go
away; frames are encoded once per event by the publisher (sse-starlette's ServerSentEvent does the
framing); one heartbeat loop pings quiet streams; and the bus's flush writes each stream's pending
frames as one chunk without waking its coroutine (``_Stream``). Profiled and measured with
``bench/``: README, "Performance". The behaviour is sse-starlette's (disconnect, ping, shutdown)
and PROTOCOL.md's; shutdown belongs to the app (``server/app.py``).

Server assumptions, written down (DO NOT "simplify" them away without reading this):

1. Direct writes are an optimisation, never a requirement. Whether the server's ``send`` can be
   driven synchronously is decided once per connection, from what ``send`` returned for the
   response start: a real coroutine (uvicorn, hypercorn) is driven by hand from the bus's flush;
   anything else (granian's awaitable, a test double) makes the stream await every send from its
   own coroutine, as any ASGI app does. A driven send runs in a loop callback, outside any Task:
   it must not need ``asyncio.current_task()`` (a timeout or a cancel scope inside ``send``);
   uvicorn's and hypercorn's do not.
2. A driven send that suspends yields the future it waits on. We never await that future (asyncio
   marks it "blocking" for the Task that receives it, a private protocol): the stream's coroutine
   waits for it with ``asyncio.wait`` (a done callback) and then resumes the send. Only public
   coroutine and Future methods are used (``send``, ``close``, ``add_done_callback``).
3. Only GET and HEAD skip the middleware stack: OPTIONS (CORS preflight) and every other method go
   through it, so a stream answers a preflight exactly as the JSON endpoints do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine
from types import CoroutineType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from sse_starlette import ServerSentEvent
from starlette.datastructures import Headers
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .auth import check_read
from .bus import Event, EventBus, Subscriber, encode_json
from .manager import AllTasksSubscription, TaskSubscription
from .models import TaskNotFoundError, TaskStatus, is_task_id
from .query import TaskQuery
from .stores import StoreUnavailable

if TYPE_CHECKING:
    from .app import TaskmonApp

__all__ = ["serve_stream", "stream_routes"]

logger = logging.getLogger(__name__)

PING = ServerSentEvent(comment="ping", sep="\n").encode()
MAX_FOLLOW = 100

_BASE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]


def _end_frame(task_id: str, status: TaskStatus) -> bytes:
    data = encode_json({"task_id": task_id, "status": status.value})
    return ServerSentEvent(data=data, event="end", sep="\n").encode()


async def _error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    payload = encode_json({"success": False, "error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def _watch_disconnect(receive: Receive, subscriber: Subscriber) -> None:
    """The one task a stream owns: it ends the stream when the client goes away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            subscriber.close()
            return


def _last_event_id(headers: Headers, query: dict[str, str]) -> int | None:
    raw = headers.get("last-event-id")
    if raw is None:
        raw = query.get("last_event_id")
    if raw is None:
        return None
    raw = raw.strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 19 else None


async def serve_stream(app: TaskmonApp, scope: Scope, receive: Receive, send: Send, task_id: str | None) -> None:
    """Answer one stream request; never raises to the server.

    Everything up to the opening chunk happens in ``_open``, whose frame is gone by the time the
    stream idles: an open stream holds this coroutine, its ``_Stream`` and one watcher task."""
    stream = await _open(app, scope, send, task_id)
    if stream is None:
        return  # answered already (an error, 204, HEAD, or a finished task's whole stream)
    watcher = asyncio.create_task(_watch_disconnect(receive, stream.subscriber))
    try:
        await stream.run()
    except OSError as exc:  # ASGI 2.4: a send after the client went away may raise OSError
        logger.debug("stream client went away", extra={"task_id": task_id, "error": type(exc).__name__})
    except Exception:
        logger.exception("stream failed", extra={"task_id": task_id})
    finally:
        watcher.cancel()
        stream.close()


class _StreamEndpoint:
    """The ASGI endpoint of a stream route, for a request that reached the router.

    ``TaskmonApp`` serves GET/HEAD before the middleware stack; this serves them when the router is
    reached some other way (the route is the same object either way)."""

    __slots__ = ("all_tasks",)

    def __init__(self, all_tasks: bool) -> None:
        self.all_tasks = all_tasks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task_id = None if self.all_tasks else scope["path_params"]["task_id"]
        await serve_stream(scope["app"], scope, receive, send, task_id)


def stream_routes() -> list[Route]:
    """The two stream routes; their names work with ``request.url_for`` (root path and mount aware)."""
    return [
        Route("/tasks/stream", _StreamEndpoint(all_tasks=True), methods=["GET"], name="all_tasks_stream"),
        Route("/tasks/{task_id}/stream", _StreamEndpoint(all_tasks=False), methods=["GET"], name="task_stream"),
    ]


async def _open(app: TaskmonApp, scope: Scope, send: Send, task_id: str | None) -> _Stream | None:
    """Check the request, subscribe, send the headers and the opening chunk.

    Returns the open stream, or None once the request has been answered in full."""
    started = False
    subscription: TaskSubscription | AllTasksSubscription | None = None
    try:
        state = app.state
        settings = state.settings
        headers = Headers(scope=scope)
        query_items = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        query_map = dict(query_items)
        extra_headers = app.cors_headers(headers.get("origin"))

        if scope["method"] not in ("GET", "HEAD"):
            await _error(send, 405, "method not allowed", [(b"allow", b"GET, HEAD"), *extra_headers])
            return None
        reason = check_read(settings, headers, query_map, task_id)
        if reason:
            await _error(send, 401, reason, [(b"www-authenticate", b'Bearer realm="taskmon"'), *extra_headers])
            return None

        manager = state.manager
        query: TaskQuery | None = None
        follow: tuple[str, ...] = ()
        if task_id is not None:
            if not is_task_id(task_id):
                await _error(send, 404, "task not found", extra_headers)
                return None
        else:
            params = {k: v for k, v in query_items if k != "follow"}
            follow = tuple(dict.fromkeys(v for k, v in query_items if k == "follow"))
            try:
                if len(follow) > MAX_FOLLOW or not all(is_task_id(f) for f in follow):
                    raise ValueError(f"follow takes up to {MAX_FOLLOW} task ids")
                query = TaskQuery.from_params(params, allowed_extra=("access_token",))
            except ValueError as exc:
                await _error(send, 400, str(exc), extra_headers)
                return None

        bus = manager.bus
        if bus.open_streams >= settings.max_streams:
            retry_after = str(max(1, settings.retry_ms // 1000)).encode()
            await _error(send, 503, "too many open streams; retry later", [(b"retry-after", retry_after), *extra_headers])
            return None

        if task_id is not None:
            try:
                subscription = await manager.open_subscription(task_id, _last_event_id(headers, query_map))
            except TaskNotFoundError:
                await _error(send, 404, "task not found", extra_headers)
                return None
            if subscription.no_content:
                started = True
                await send({"type": "http.response.start", "status": 204, "headers": extra_headers})
                await send({"type": "http.response.body", "body": b""})
                return None
        else:
            subscription = await manager.open_all_subscription(query, follow)

        started = True
        starting = send({"type": "http.response.start", "status": 200, "headers": [*_BASE_HEADERS, *extra_headers]})
        drive = type(starting) is CoroutineType  # decided once per connection: see the module docstring, 1.
        await starting
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return None

        # The opening chunk goes out in pieces of about OPENING_CHUNK bytes, each write awaited (the
        # server's send waits while its buffer is over the high-water mark): a client that does not
        # read holds about one piece, never a whole snapshot page or history (live events meanwhile
        # wait, coalesced).
        writer = _ChunkWriter(send, ServerSentEvent(retry=settings.retry_ms, sep="\n").encode())
        stream: _Stream
        if isinstance(subscription, TaskSubscription):
            initial = subscription.take_initial()
            # A long replay is read page by page; each event is dropped once written.
            while True:
                bus.delivered += len(initial)
                initial.reverse()
                while initial:
                    await writer.add(initial.pop().frame)
                if not subscription.more:
                    break
                initial = await manager.replay_more(subscription)
            opening = writer.take()
            if subscription.finished:
                opening += _end_frame(subscription.task_id, subscription.final_status)
                await send({"type": "http.response.body", "body": opening, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return None
            stream = _TaskStream(send, subscription, bus, drive)
        else:
            for piece in subscription.snapshot_pieces():
                await writer.add(piece)
            opening = writer.take()
            stream = _AllTasksStream(send, subscription, bus, drive)
        await send({"type": "http.response.body", "body": opening, "more_body": True})
        subscription = None  # the stream owns it now
        return stream
    except StoreUnavailable:
        logger.warning("stream not opened: the store is unreachable", extra={"task_id": task_id})
        if not started:
            await _error(send, 503, "the task store is not reachable; retry later", [(b"retry-after", b"1")])
        return None
    except Exception:
        logger.exception("stream failed to open", extra={"path": scope.get("path"), "task_id": task_id})
        if not started:
            await _error(send, 500, "internal server error", [])
        return None
    finally:
        if subscription is not None:
            subscription.close()


OPENING_CHUNK = 64 * 1024


class _ChunkWriter:
    """Gathers the opening frames and writes (awaited) each time about OPENING_CHUNK bytes gathered."""

    __slots__ = ("_parts", "_send", "_size")

    def __init__(self, send: Send, first: bytes) -> None:
        self._send = send
        self._parts = [first]
        self._size = len(first)

    async def add(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= OPENING_CHUNK:
            await self._send({"type": "http.response.body", "body": self.take(), "more_body": True})

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts = []
        self._size = 0
        return data


class _Stream:
    """One open stream after its opening chunk: writes what its subscriber gathers.

    The bus calls ``deliver`` once per burst of events. It renders everything pending into one
    chunk and writes it. When the server's ``send`` is drivable (module docstring, 1.) the write is
    driven synchronously: with uvicorn that completes at once unless the socket's buffer is full,
    so a delivery costs no task switch and no await chain. When ``send`` does block (a slow reader)
    the half-done send is handed to the stream's own coroutine, which finishes it and picks up what
    gathered meanwhile (coalesced). When ``send`` is not drivable, every delivery hands the chunk's
    ``send(...)`` to the coroutine to await. A send that raises ends the stream."""

    __slots__ = ("_send", "subscription", "subscriber", "_bus", "_drive", "_inflight", "_later", "_failure", "finished")

    def __init__(
        self, send: Send, subscription: TaskSubscription | AllTasksSubscription, bus: EventBus, drive: bool
    ) -> None:
        self._send = send
        self.subscription = subscription
        self.subscriber = subscription.subscriber
        self._bus = bus
        self._drive = drive  # send(...) returns a coroutine we may drive by hand
        self._inflight: tuple[Coroutine[Any, Any, None], Any] | None = None  # a driven send that blocked
        self._later: Awaitable[None] | None = None  # a send for the coroutine to await
        self._failure: Exception | None = None  # what a send raised during delivery
        self.finished = False  # the stream's last frame has been written (or handed over)

    def render(self, events: list[Event]) -> bytes:
        """Pending events -> this client's frames (b"" when none is for it)."""
        raise NotImplementedError

    def close(self) -> None:
        self.subscription.close()

    def deliver(self) -> None:
        if self._inflight is not None or self._later is not None or self._failure is not None or self.finished:
            return  # the coroutine is finishing a send; it calls deliver() again after it
        subscriber = self.subscriber
        if subscriber.overflowed:  # too far behind to coalesce: end it; the client resyncs on reconnect
            self.finished = True
            subscriber.wake()
            return
        ping = subscriber.ping_due
        chunk = self.render(subscriber.take())
        if not chunk:
            if not ping:
                return
            chunk = PING
        try:
            sending = self._send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not self._drive or type(sending) is not CoroutineType:
                self._drive = False  # from now on every send is awaited by the coroutine
                self._later = sending
                subscriber.wake()
                return
            try:
                blocked_on = sending.send(None)
            except StopIteration:
                if self.finished:
                    subscriber.wake()  # the coroutine closes the response
                return
        except Exception as exc:
            self._failure = exc
            subscriber.wake()
            return
        self._inflight = (sending, blocked_on)
        subscriber.wake()

    async def run(self) -> None:
        """The stream's coroutine: direct delivery from the bus, blocked or awaited sends, then the close."""
        subscriber = self.subscriber
        subscriber.on_ready = self.deliver
        try:
            self.deliver()  # whatever arrived while the opening chunk was written
            while True:
                if self._failure is not None:
                    failure, self._failure = self._failure, None
                    raise failure
                if self._inflight is not None:
                    await self._finish_inflight()
                elif self._later is not None:
                    try:
                        await self._later
                    finally:
                        self._later = None
                elif self.finished or subscriber.closed:
                    break
                else:
                    await subscriber.wait_wake()
                    continue
                self.deliver()
        finally:
            subscriber.on_ready = None
            inflight, self._inflight = self._inflight, None
            if inflight is not None:
                inflight[0].close()  # handed over by a delivery the coroutine never got to (cancelled)
            later, self._later = self._later, None
            if isinstance(later, CoroutineType):
                later.close()  # never awaited: cancelled or failed before its turn
        await self._send({"type": "http.response.body", "body": b""})

    async def _finish_inflight(self) -> None:
        assert self._inflight is not None
        sending, blocked_on = self._inflight
        try:
            while True:
                if blocked_on is None:
                    await asyncio.sleep(0)  # a bare yield: give the loop one turn
                else:
                    # Wait for the future the send yielded without awaiting it ourselves (docstring, 2.).
                    await asyncio.wait((blocked_on,))
                try:
                    blocked_on = sending.send(None)
                except StopIteration:
                    return
        except BaseException:
            sending.close()
            raise
        finally:
            self._inflight = None


class _TaskStream(_Stream):
    __slots__ = ()
    subscription: TaskSubscription

    def render(self, events: list[Event]) -> bytes:
        subscription = self.subscription
        fresh = subscription.fresh(events)
        if not fresh:
            return b""
        self._bus.delivered += len(fresh)
        chunk = b"".join([event.frame for event in fresh])
        if subscription.finished:
            self.finished = True
            chunk += _end_frame(subscription.task_id, fresh[-1].status)
        return chunk


class _AllTasksStream(_Stream):
    __slots__ = ()
    subscription: AllTasksSubscription

    def render(self, events: list[Event]) -> bytes:
        frame_for = self.subscription.frame_for
        frames = [frame for frame in map(frame_for, events) if frame is not None]
        self._bus.delivered += len(frames)
        return b"".join(frames)
