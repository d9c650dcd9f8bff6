"""JSON endpoints: the legacy snapshot GETs, the producer API, the event log, health and metrics."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from .auth import require_api_token, require_read_token, require_write
from .bodies import parse_json_object, read_json, receive_body
from .bus import encode_json
from .errors import ApiError
from .manager import FieldTooLarge, TaskManager
from .models import TaskNotFoundError, TaskStateError, is_task_id
from .query import MAX_LIST_LIMIT, TaskQuery, parse_limit
from .security import SECURITY_HEADERS, first_headers, request_refusal
from .stores import StoreUnavailable

__all__ = ["routes", "serve_patch"]

logger = logging.getLogger(__name__)

_JSON = "application/json"
_OFF_LOOP = 50  # listings longer than this are encoded in a worker thread


def _manager(request: Request) -> TaskManager:
    return request.app.state.manager


def _task_id(request: Request) -> str:
    task_id = request.path_params["task_id"]
    if not is_task_id(task_id):
        raise TaskNotFoundError(task_id)
    return task_id


def _task_response(body: str, status_code: int = 200) -> Response:
    """A task answer built around the snapshot's wire JSON, encoded once by the manager."""
    return Response('{"success":true,"data":' + body + "}", status_code=status_code, media_type=_JSON)


def _bad_value(exc: ValueError) -> ApiError:
    return ApiError(413 if isinstance(exc, FieldTooLarge) else 400, str(exc))


async def get_task(request: Request) -> Response:
    require_read_token(request)
    manager = _manager(request)
    task = await manager.aget_task(_task_id(request))
    if task is None:
        raise TaskNotFoundError(request.path_params["task_id"])
    return _task_response(encode_json(manager.wire(task)))


def _query(request: Request) -> TaskQuery:
    try:
        return TaskQuery.from_params(request.query_params, allowed_extra=("access_token",))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


async def list_tasks(request: Request) -> Response:
    require_read_token(request)
    manager = _manager(request)
    page = await manager.alist(_query(request))

    def encode() -> bytes:
        data = [manager.wire(t) for t in page.tasks]
        return encode_json({"success": True, "data": data, "count": len(data), "next_cursor": page.next_cursor}).encode()

    body = await anyio.to_thread.run_sync(encode) if len(page.tasks) > _OFF_LOOP else encode()
    return Response(body, media_type=_JSON)


async def count_tasks(request: Request) -> Response:
    require_read_token(request)
    query = _query(request)
    if query.after is not None or query.limit is not None:
        raise ApiError(400, "counts take filters only (no cursor or limit)")
    counts = await _manager(request).acounts(query)
    return JSONResponse({"success": True, "data": {s.value: n for s, n in counts.items()}})


async def create_task(request: Request) -> Response:
    require_api_token(request)
    body = await read_json(request)
    unknown = sorted(set(body) - {"task_type", "metadata", "lease_s"})
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}; allowed: task_type, metadata, lease_s")
    if "task_type" not in body:
        raise ApiError(400, "task_type is required")
    try:
        _task, encoded = await _manager(request).acreate(body["task_type"], body.get("metadata"), lease_s=body.get("lease_s"))
    except ValueError as exc:
        raise _bad_value(exc) from None
    return _task_response(encoded, 201)


async def patch_task(request: Request) -> Response:
    require_api_token(request)
    task_id = _task_id(request)
    manager = _manager(request)
    if await manager.aget_task(task_id) is None:  # 404 before the body is even read
        raise TaskNotFoundError(task_id)
    body = await read_json(request)
    try:
        _task, encoded = await manager.apatch(task_id, body)
    except ValueError as exc:
        raise _bad_value(exc) from None
    return _task_response(encoded)


async def serve_patch(app: Any, scope: Scope, receive: Receive, send: Send, task_id: str) -> None:
    """``PATCH /api/tasks/{id}`` as a plain ASGI handler, dispatched ahead of the middleware stack like
    the streams: it is the producer path every progress report takes, and Starlette's wrappers
    (error and exception middleware, the router, Request, Headers, a Response object) were most of
    its cost. It does what they do: the same checks in the same order (origin/content type, token,
    404, body, 409), the error envelope, the security and CORS headers, a 500 without a traceback.
    The headers are read once into a plain dict; the body straight from ``receive``."""
    status = 200
    extra: list[tuple[bytes, bytes]] = []
    headers = first_headers(scope["headers"])
    values = app.state_values
    try:
        settings = values["settings"]
        refusal = request_refusal(scope, headers, app.cors_origins)
        if refusal is not None:
            await refusal(scope, receive, _with_security_headers(send))
            return
        require_write(settings, headers)
        manager: TaskManager = values["manager"]
        if not is_task_id(task_id) or not await manager.aexists(task_id):
            raise TaskNotFoundError(task_id)
        bus = manager.bus
        if bus.open_streams and not bus.has_audience(task_id):
            # streams are open, none on this task: let the requests of this loop turn that others
            # watch go first (a flood of unwatched PATCHes must not queue ahead of a watched one)
            await asyncio.sleep(0)
        changes = parse_json_object(await receive_body(receive, headers.get("content-length")))
        try:
            _task, encoded = await manager.apatch(task_id, changes, known=True)
        except ValueError as exc:
            raise _bad_value(exc) from None
        payload = ('{"success":true,"data":' + encoded + "}").encode()
    except ApiError as exc:
        status, payload = exc.status, _envelope(exc.message, exc.extra)
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items()]
    except TaskNotFoundError:
        status, payload = 404, _envelope("task not found")
    except TaskStateError as exc:
        status, payload = 409, _envelope(str(exc))
    except StoreUnavailable as exc:
        logger.warning("store unavailable", extra={"path": scope.get("path"), "reason": str(exc)})
        status, payload = 503, _envelope("the task store is not reachable; retry later")
        extra = [(b"retry-after", b"1")]
    except Exception:
        logger.exception("unhandled error", extra={"path": scope.get("path"), "method": "PATCH"})
        status, payload = 500, _envelope("internal server error")
    origin = headers.get("origin")
    if origin is not None:
        extra += app.cors_headers(origin)
    await send({"type": "http.response.start", "status": status,
                "headers": [*_JSON_HEAD, (b"content-length", b"%d" % len(payload)), *extra, *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": payload})
    values["manager"].bus.flush_urgent()  # the change's first deliveries, right after its answer


_JSON_HEAD = ((b"content-type", b"application/json"),)


def _envelope(message: str, extra: dict[str, Any] | None = None) -> bytes:
    return encode_json({"success": False, "error": message, **(extra or {})}).encode()


def _with_security_headers(send: Send) -> Send:
    async def sender(message: Any) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *SECURITY_HEADERS]
        await send(message)

    return sender


async def cancel_task(request: Request) -> Response:
    require_api_token(request)
    _task, encoded = await _manager(request).acancel(_task_id(request))
    return _task_response(encoded, 202)


async def task_events(request: Request) -> Response:
    require_read_token(request)
    task_id = _task_id(request)
    manager = _manager(request)
    query = request.query_params
    unknown = sorted(set(query) - {"after", "limit", "access_token"})
    if unknown:
        raise ApiError(400, f"unknown query parameter(s): {', '.join(unknown)}")
    raw_after = query.get("after", "0").strip()
    if not (raw_after.isascii() and raw_after.isdigit() and len(raw_after) < 19):
        raise ApiError(400, "after must be a version number (0 or more)")
    try:
        limit = parse_limit(query["limit"]) if "limit" in query else 100
    except ValueError:
        raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIST_LIMIT}") from None
    if await manager.aget_task(task_id) is None:
        raise TaskNotFoundError(task_id)
    events = await manager.aevents(task_id, int(raw_after), limit + 1)
    more = len(events) > limit
    events = events[:limit]
    next_after = events[-1][0] if more else None
    body = '{"success":true,"data":[' + ",".join(b for _v, b in events) + '],"next_after":' + encode_json(next_after) + "}"
    return Response(body, media_type=_JSON)


async def healthz(request: Request) -> Response:
    bus = _manager(request).bus
    return JSONResponse({"success": True, "status": "ok", "streams": bus.open_streams})


async def readyz(request: Request) -> Response:
    try:
        await _manager(request).store.aping()
    except StoreUnavailable as exc:
        raise ApiError(503, f"the store is not reachable: {exc}") from None
    return JSONResponse({"success": True, "status": "ready"})


async def metrics(request: Request) -> Response:
    require_read_token(request)
    registry = request.app.state.registry
    return Response(await anyio.to_thread.run_sync(generate_latest, registry), media_type=CONTENT_TYPE_LATEST)


def routes() -> list[BaseRoute]:
    return [
        Route("/api/graph/task/{task_id}", get_task, methods=["GET"]),
        Route("/api/graph/tasks", list_tasks, methods=["GET"]),
        Route("/api/tasks", create_task, methods=["POST"]),
        Route("/api/tasks/counts", count_tasks, methods=["GET"]),
        Route("/api/tasks/{task_id}", patch_task, methods=["PATCH"], name="patch_task"),  # served by serve_patch
        Route("/api/tasks/{task_id}/cancel", cancel_task, methods=["POST"]),
        Route("/api/tasks/{task_id}/events", task_events, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
