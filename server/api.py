"""JSON endpoints: the legacy snapshot GETs, the producer API, health and metrics."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .auth import require_api_token, require_read_token
from .errors import ApiError
from .manager import MAX_LIST_LIMIT, TaskManager, parse_status
from .models import TaskNotFoundError, is_task_id

__all__ = ["read_json", "routes"]

MAX_JSON_BYTES = 1024 * 1024


def _manager(request: Request) -> TaskManager:
    return request.app.state.manager


async def read_json(request: Request, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413 ApiError."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes")
    if not body.strip():
        raise ApiError(400, "request body is empty; a JSON object is required")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    except RecursionError:  # e.g. 100,000 nested arrays: well within the size limit
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def _task_id(request: Request) -> str:
    task_id = request.path_params["task_id"]
    if not is_task_id(task_id):
        raise TaskNotFoundError(task_id)
    return task_id


async def get_task(request: Request) -> Response:
    require_read_token(request)
    task = _manager(request).get_task(_task_id(request))
    if task is None:
        raise TaskNotFoundError(request.path_params["task_id"])
    return JSONResponse({"success": True, "data": task.to_dict()})


async def list_tasks(request: Request) -> Response:
    require_read_token(request)
    query = request.query_params
    status = None
    if "status" in query:
        try:
            status = parse_status(query["status"])
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
    limit = None
    if "limit" in query:
        raw = query["limit"].strip()
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIST_LIMIT:
            raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")
        limit = int(raw)
    tasks = _manager(request).list_tasks(task_type=query.get("task_type"), status=status, limit=limit)
    return JSONResponse({"success": True, "data": [t.to_dict() for t in tasks], "count": len(tasks)})


async def create_task(request: Request) -> Response:
    require_api_token(request)
    body = await read_json(request)
    unknown = sorted(set(body) - {"task_type", "metadata"})
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}; allowed: task_type, metadata")
    if "task_type" not in body:
        raise ApiError(400, "task_type is required")
    try:
        task = _manager(request).create_task(body["task_type"], body.get("metadata"))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return JSONResponse({"success": True, "data": task.to_dict()}, status_code=201)


async def patch_task(request: Request) -> Response:
    require_api_token(request)
    task_id = _task_id(request)
    manager = _manager(request)
    if manager.get_task(task_id) is None:  # 404 before the body is even read
        raise TaskNotFoundError(task_id)
    body = await read_json(request)
    try:
        task = manager.patch_task(task_id, body)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return JSONResponse({"success": True, "data": task.to_dict()})


async def healthz(request: Request) -> Response:
    bus = _manager(request).bus
    return JSONResponse({"success": True, "status": "ok", "streams": bus.open_streams})


async def metrics(request: Request) -> Response:
    require_read_token(request)
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


def routes() -> list[BaseRoute]:
    return [
        Route("/api/graph/task/{task_id}", get_task, methods=["GET"]),
        Route("/api/graph/tasks", list_tasks, methods=["GET"]),
        Route("/api/tasks", create_task, methods=["POST"]),
        Route("/api/tasks/{task_id}", patch_task, methods=["PATCH"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
