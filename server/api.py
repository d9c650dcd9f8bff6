"""JSON endpoints: the legacy snapshot GETs, the producer API, health and metrics."""

from __future__ import annotations


from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .auth import require_api_token, require_read_token
from .bodies import read_json
from .errors import ApiError
from .manager import TaskManager
from .models import TaskNotFoundError, is_task_id

__all__ = ["routes"]

def _manager(request: Request) -> TaskManager:
    return request.app.state.manager


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
    try:
        tasks = _manager(request).list_tasks(
            task_type=query.get("task_type"), status=query.get("status"), limit=query.get("limit")
        )
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
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
