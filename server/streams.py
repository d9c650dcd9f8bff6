"""The SSE endpoints: ``/tasks/{task_id}/stream`` and ``/tasks/stream``.

These are plain ASGI handlers, dispatched by ``TaskmonApp`` ahead of the middleware stack. The
performance issue measured why: sse-starlette's EventSourceResponse costs a task group of three or
four tasks per connection (~30-42 KB) and a cancel scope per send, Starlette's middleware adds a
wrapper per send, and a per-stream ping task is a timer per connection. Here a stream is one
coroutine plus one small task that waits for the client to go away; frames are encoded once per
event by the publisher (sse-starlette's ServerSentEvent does the framing); one heartbeat loop pings
quiet streams; and a stream that wakes sends everything pending as one chunk. The behaviour is
sse-starlette's (disconnect, ping, shutdown) and PROTOCOL.md's.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from sse_starlette import ServerSentEvent
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from .auth import check_read
from .bus import Subscriber, encode_json
from .manager import AllTasksSubscription, TaskSubscription, parse_status
from .models import TaskNotFoundError, TaskStatus, is_task_id

if TYPE_CHECKING:
    from .app import TaskmonApp

__all__ = ["STREAM_PATH", "serve_stream"]

logger = logging.getLogger(__name__)

STREAM_PATH = re.compile(r"^/tasks/(?:([^/]+)/)?stream/?$")
PING = ServerSentEvent(comment="ping", sep="\n").encode()

_BASE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]


def _end_frame(task_id: str, status: TaskStatus) -> bytes:
    data = encode_json({"task_id": task_id, "status": status.value})
    return ServerSentEvent(data=data, event="end", sep="\n").encode()


async def _json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    payload = encode_json(body).encode()
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


async def _error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    await _json(send, status, {"success": False, "error": message}, headers)


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
    """Answer one stream request; never raises to the server."""
    started = False

    async def tracked_send(message: dict[str, Any]) -> None:
        nonlocal started
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        await _serve(app, scope, receive, tracked_send, task_id)
    except Exception:
        logger.exception("stream failed", extra={"path": scope.get("path"), "task_id": task_id})
        if not started:
            await _error(send, 500, "internal server error", [])


async def _serve(app: TaskmonApp, scope: Scope, receive: Receive, send: Send, task_id: str | None) -> None:
    state = app.state
    settings = state.settings
    headers = Headers(scope=scope)
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
    extra_headers = app.cors_headers(headers.get("origin"))

    if scope["method"] not in ("GET", "HEAD"):
        await _error(send, 405, "method not allowed", [(b"allow", b"GET, HEAD"), *extra_headers])
        return
    reason = check_read(settings, headers, query)
    if reason:
        await _error(send, 401, reason, [(b"www-authenticate", b'Bearer realm="taskmon"'), *extra_headers])
        return

    manager = state.manager
    status_filter: TaskStatus | None = None
    if task_id is not None:
        if not is_task_id(task_id) or manager.get_task(task_id) is None:
            await _error(send, 404, "task not found", extra_headers)
            return
    else:
        unknown = sorted(set(query) - {"task_type", "status", "access_token"})
        if unknown:
            await _error(send, 400, f"unknown query parameter(s): {', '.join(unknown)}", extra_headers)
            return
        if "status" in query:
            try:
                status_filter = parse_status(query["status"])
            except ValueError as exc:
                await _error(send, 400, str(exc), extra_headers)
                return

    bus = manager.bus
    if bus.open_streams >= settings.max_streams:
        retry_after = str(max(1, settings.retry_ms // 1000)).encode()
        await _error(send, 503, "too many open streams; retry later", [(b"retry-after", retry_after), *extra_headers])
        return

    start = {"type": "http.response.start", "status": 200, "headers": [*_BASE_HEADERS, *extra_headers]}
    retry = ServerSentEvent(retry=settings.retry_ms, sep="\n").encode()
    head_only = scope["method"] == "HEAD"

    if task_id is not None:
        try:
            async with manager.subscribe(task_id, _last_event_id(headers, query)) as sub:
                if sub.no_content:
                    await send({"type": "http.response.start", "status": 204, "headers": extra_headers})
                    await send({"type": "http.response.body", "body": b""})
                    return
                await send(start)
                if head_only:
                    await send({"type": "http.response.body", "body": b""})
                    return
                await _pump_task(app, receive, send, sub, retry)
        except TaskNotFoundError:  # removed between the check and the subscribe
            await _error(send, 404, "task not found", extra_headers)
    else:
        async with manager.subscribe_all(query.get("task_type"), status_filter) as all_sub:
            await send(start)
            if head_only:
                await send({"type": "http.response.body", "body": b""})
                return
            await _pump_all(app, receive, send, all_sub, retry)


async def _pump_task(app: TaskmonApp, receive: Receive, send: Send, sub: TaskSubscription, retry: bytes) -> None:
    bus = app.state.manager.bus
    task = sub.snapshot
    body = retry + b"".join(event.frame for event in sub.initial)
    bus.delivered += len(sub.initial)
    if sub.finished:
        last = sub.initial[-1]
        await send({"type": "http.response.body", "body": body + _end_frame(task.task_id, last.status), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.body", "body": body, "more_body": True})

    subscriber = sub.subscriber
    watcher = asyncio.create_task(_watch_disconnect(receive, subscriber))
    try:
        while True:
            await subscriber.wait()
            if subscriber.closed:
                break
            ping = subscriber.ping_due
            events = sub.fresh(subscriber.take())
            if events:
                chunk = b"".join(event.frame for event in events)
                bus.delivered += len(events)
                if sub.finished:
                    chunk += _end_frame(task.task_id, events[-1].status)
            elif ping:
                chunk = PING
            else:
                continue
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if sub.finished:
                break
        await send({"type": "http.response.body", "body": b""})
    finally:
        watcher.cancel()


async def _pump_all(
    app: TaskmonApp, receive: Receive, send: Send, sub: AllTasksSubscription, retry: bytes
) -> None:
    bus = app.state.manager.bus
    snapshot = ServerSentEvent(
        data=encode_json({"tasks": [task.to_dict() for task in sub.tasks]}), event="snapshot", sep="\n"
    ).encode()
    await send({"type": "http.response.body", "body": retry + snapshot, "more_body": True})

    subscriber = sub.subscriber
    watcher = asyncio.create_task(_watch_disconnect(receive, subscriber))
    try:
        while True:
            await subscriber.wait()
            if subscriber.closed:
                break
            ping = subscriber.ping_due
            frames = [frame for frame in map(sub.frame_for, subscriber.take()) if frame is not None]
            if frames:
                chunk = b"".join(frames)
                bus.delivered += len(frames)
            elif ping:
                chunk = PING
            else:
                continue
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        watcher.cancel()
