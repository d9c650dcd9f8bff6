"""HTTP endpoints of the graph build job (PROTOCOL.md, "Graph build job").

Plain async functions; blocking work (file I/O, PDF extraction, backend calls) runs in a worker
thread. Every problem with the input is a 4xx JSON envelope raised as ApiError before anything is
written; upstream (Zep) failures are 502 with a short, safe message.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio.to_thread
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from ..auth import require_api_token, require_read_token
from ..bodies import limited_stream, read_json
from ..errors import ApiError
from .backends import BackendError, GraphNotFound, is_graph_id
from .build import BuildSpec
from .projects import MAX_NAME_LENGTH, ProjectNotFound, SourceFile, clean_name, is_project_id
from .service import BuildConflict, GraphService, ShuttingDown
from .text import (
    DEFAULT_CHUNK_OVERLAP,
    DEFAULT_CHUNK_SIZE,
    TextBudget,
    TextError,
    TextTooLarge,
    check_filename,
    extract_text,
    normalize_text,
    validate_chunk_settings,
)

logger = logging.getLogger(__name__)

MAX_FILES = 20
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the file bytes
DEFAULT_PROJECT_NAME = "Untitled project"


def _service(request: Request) -> GraphService:
    service: GraphService = request.app.state.graph
    return service


def _too_large(request: Request) -> ApiError:
    return ApiError(413, f"upload exceeds the limit of {_service(request).settings.max_upload_mb:g} MB")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


# ----------------------------------------------------------------------------------- projects


async def _files_from_multipart(request: Request, limit: int) -> tuple[str | None, list[tuple[str, bytes]]]:
    """The form's ``name`` and every ``files`` part as (filename, bytes), sizes enforced as read."""
    parser = MultiPartParser(
        request.headers,
        limited_stream(request, limit + MULTIPART_OVERHEAD, _too_large(request)),
        max_files=MAX_FILES,
        max_fields=10,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"invalid multipart body: {exc.message}") from None
    try:
        name = form.get("name")
        if name is not None and not isinstance(name, str):
            raise ApiError(400, "name must be a text field")
        uploads = form.getlist("files")
        if not uploads:
            raise ApiError(400, "no files: send one or more files in the multipart field 'files'")
        files: list[tuple[str, bytes]] = []
        total = 0
        for upload in uploads:
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "'files' must carry files, not text fields")
            try:
                check_filename(upload.filename)
            except TextError as exc:
                raise ApiError(400, f"invalid file: {exc}") from None
            data = await upload.read()
            total += len(data)
            if total > limit:
                raise _too_large(request)
            files.append((str(upload.filename), data))
        return name, files
    finally:
        await form.close()


def _extract_all(files: list[tuple[str, bytes]], budget: TextBudget) -> tuple[list[SourceFile], str]:
    sources = []
    for filename, data in files:
        try:
            text = extract_text(filename, data, budget)
        except TextTooLarge as exc:
            raise ApiError(413, f"{filename}: {exc}") from None
        except TextError as exc:
            raise ApiError(400, f"{filename}: {exc}") from None
        sources.append(SourceFile(filename=filename, suffix=check_filename(filename), data=data, text=text))
    combined = "\n\n".join(s.text for s in sources)
    return sources, combined


async def create_project(request: Request) -> JSONResponse:
    require_api_token(request)
    service = _service(request)
    limit = service.settings.max_upload_bytes
    media = _media_type(request)
    if media == "multipart/form-data":
        name, files = await _files_from_multipart(request, limit)
        budget = TextBudget(service.settings.max_project_chars, service.settings.pdf_time_budget_s)
        sources, text = await anyio.to_thread.run_sync(_extract_all, files, budget)
        if name is None or not name.strip():
            name = sources[0].filename[:MAX_NAME_LENGTH]
    elif media == "application/json":
        body = await read_json(request, limit, _too_large(request))
        unknown = sorted(set(body) - {"name", "text"})
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(unknown)}; allowed: name, text")
        raw_text = body.get("text")
        if not isinstance(raw_text, str):
            raise ApiError(400, "text is required and must be a string")
        text = normalize_text(raw_text)
        if not text:
            raise ApiError(400, "text must not be empty")
        name = body.get("name", DEFAULT_PROJECT_NAME)
        sources = []
    else:
        raise ApiError(415, "send multipart/form-data with 'files', or application/json with 'name' and 'text'")
    if len(text) > service.settings.max_project_chars:
        raise ApiError(413, f"the project's text is longer than the limit of {service.settings.max_project_chars} characters")
    try:
        name = clean_name(name)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    meta = await anyio.to_thread.run_sync(service.projects.create, name, text, sources)
    data = await anyio.to_thread.run_sync(service.projects.public, meta)
    return JSONResponse({"success": True, "data": data}, status_code=201)


async def list_projects(request: Request) -> JSONResponse:
    require_read_token(request)
    service = _service(request)
    projects = await anyio.to_thread.run_sync(service.projects.list)
    data = [service.projects.public(p, preview=False) for p in projects]
    return JSONResponse({"success": True, "data": data, "count": len(data)})


def _project_id(request: Request) -> str:
    project_id = request.path_params["project_id"]
    if not is_project_id(project_id):
        raise ApiError(404, "project not found")
    return str(project_id)


async def get_project(request: Request) -> JSONResponse:
    require_read_token(request)
    service = _service(request)
    project_id = _project_id(request)
    try:
        meta = await anyio.to_thread.run_sync(service.projects.get, project_id)
        data = await anyio.to_thread.run_sync(service.projects.public, meta)
    except ProjectNotFound:
        raise ApiError(404, "project not found") from None
    return JSONResponse({"success": True, "data": data})


async def delete_project(request: Request) -> JSONResponse:
    require_api_token(request)
    service = _service(request)
    project_id = _project_id(request)
    try:
        await anyio.to_thread.run_sync(service.delete_project, project_id)
    except ProjectNotFound:
        raise ApiError(404, "project not found") from None
    except BuildConflict as exc:
        raise ApiError(409, "a graph build is running for this project", task_id=exc.task_id) from None
    return JSONResponse({"success": True, "data": {"project_id": project_id, "deleted": True}})


# ------------------------------------------------------------------------------------- build

_BUILD_FIELDS = {"project_id", "graph_name", "chunk_size", "chunk_overlap", "force"}


def _build_spec(body: dict[str, Any], default_name: str) -> BuildSpec:
    try:
        chunk_size, chunk_overlap = validate_chunk_settings(
            body.get("chunk_size", DEFAULT_CHUNK_SIZE), body.get("chunk_overlap", DEFAULT_CHUNK_OVERLAP)
        )
    except TextError as exc:
        raise ApiError(400, str(exc)) from None
    graph_name = body.get("graph_name")
    try:
        graph_name = default_name if graph_name is None else clean_name(graph_name, field="graph_name")
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return BuildSpec(body["project_id"], graph_name, chunk_size, chunk_overlap)


async def build_graph(request: Request) -> JSONResponse:
    require_api_token(request)
    service = _service(request)
    body = await read_json(request)
    unknown = sorted(set(body) - _BUILD_FIELDS)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(_BUILD_FIELDS))}")
    project_id = body.get("project_id")
    if not isinstance(project_id, str) or not project_id:
        raise ApiError(400, "project_id is required")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise ApiError(400, "force must be true or false")
    if not is_project_id(project_id):
        raise ApiError(404, "project not found")
    try:
        meta = await anyio.to_thread.run_sync(service.projects.get, project_id)
    except ProjectNotFound:
        raise ApiError(404, "project not found") from None
    limit = service.settings.max_project_chars
    if int(meta.get("total_text_length") or 0) > limit:
        raise ApiError(413, f"the project's text is longer than the limit of {limit} characters (TASKMON_MAX_PROJECT_CHARS)")
    spec = _build_spec(body, meta["name"])
    try:
        task = await anyio.to_thread.run_sync(lambda: service.start_build(spec, force=force))
    except ProjectNotFound:
        raise ApiError(404, "project not found") from None
    except BuildConflict as exc:
        raise ApiError(409, "a graph build is already running for this project", task_id=exc.task_id) from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down; try again shortly", headers={"Retry-After": "5"}) from None
    return JSONResponse(
        {"success": True, "data": {"project_id": project_id, "task_id": task.task_id, "message": "Graph build started"}},
        status_code=202,
    )


# ------------------------------------------------------------------------------------- graphs


def _graph_id(request: Request) -> str:
    graph_id = request.path_params["graph_id"]
    if not is_graph_id(graph_id):
        raise ApiError(404, "graph not found")
    return str(graph_id)


async def graph_data(request: Request) -> JSONResponse:
    require_read_token(request)
    service = _service(request)
    graph_id = _graph_id(request)
    try:
        data = await anyio.to_thread.run_sync(service.backend.graph_data, graph_id, service.request_retrier())
    except GraphNotFound:
        raise ApiError(404, "graph not found") from None
    except BackendError as exc:
        raise ApiError(502, str(exc)) from None
    return JSONResponse({"success": True, "data": data})


async def delete_graph(request: Request) -> JSONResponse:
    require_api_token(request)
    service = _service(request)
    graph_id = _graph_id(request)
    try:
        await anyio.to_thread.run_sync(service.backend.delete_graph, graph_id, service.request_retrier())
    except GraphNotFound:
        raise ApiError(404, "graph not found") from None
    except BackendError as exc:
        raise ApiError(502, str(exc)) from None
    return JSONResponse({"success": True, "data": {"graph_id": graph_id, "deleted": True}})


def graph_routes() -> list[BaseRoute]:
    return [
        Route("/api/graph/project", create_project, methods=["POST"]),
        Route("/api/graph/project/list", list_projects, methods=["GET"]),
        Route("/api/graph/project/{project_id}", get_project, methods=["GET"]),
        Route("/api/graph/project/{project_id}", delete_project, methods=["DELETE"]),
        Route("/api/graph/build", build_graph, methods=["POST"]),
        Route("/api/graph/data/{graph_id}", graph_data, methods=["GET"]),
        Route("/api/graph/delete/{graph_id}", delete_graph, methods=["DELETE"]),
    ]
