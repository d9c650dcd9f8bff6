"""``GET /openapi.json``: an OpenAPI 3.1 document for every endpoint, written by hand from one
table (``OPERATIONS``). tests/test_openapi.py checks it against the app's routes both ways and
runs schemathesis over it, so it cannot drift from what the server does."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

__all__ = ["OPERATIONS", "document", "openapi_json"]

_TASK_ID = {"type": "string", "format": "uuid", "description": "a task id (canonical lower-case UUID)"}
_ISO = {"type": "string", "description": "ISO 8601, UTC"}

TASK = {
    "type": "object",
    "required": ["task_id", "task_type", "status", "created_at", "updated_at", "progress", "message",
                 "progress_detail", "result", "error", "metadata", "version"],
    "properties": {
        "task_id": {"type": "string"},
        "task_type": {"type": "string"},
        "status": {"type": "string", "enum": ["pending", "processing", "completed", "failed"]},
        "created_at": _ISO,
        "updated_at": _ISO,
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "message": {"type": "string"},
        "progress_detail": {"type": "object"},
        "result": {"type": ["object", "null"]},
        "error": {"type": ["string", "null"]},
        "metadata": {"type": "object"},
        "version": {"type": "integer", "minimum": 1},
        "started_at": {"type": ["string", "null"]},
        "finished_at": {"type": ["string", "null"]},
        "rate": {"type": ["number", "null"]},
        "eta_s": {"type": ["number", "null"]},
        "stale": {"type": "boolean"},
        "cancel_requested": {"type": "boolean"},
        "lease_s": {"type": ["number", "null"]},
    },
}
COUNTS = {
    "type": "object",
    "required": ["pending", "processing", "completed", "failed"],
    "properties": {s: {"type": "integer", "minimum": 0} for s in ("pending", "processing", "completed", "failed")},
}
ERROR = {
    "type": "object",
    "required": ["success", "error"],
    "properties": {"success": {"const": False}, "error": {"type": "string"}},
}
PROJECT = {
    "type": "object",
    "required": ["project_id", "name", "status", "created_at", "updated_at", "files", "total_text_length"],
    "properties": {
        "project_id": {"type": "string", "pattern": "^proj_[0-9a-f]{12}$"},
        "name": {"type": "string"},
        "status": {"type": "string", "enum": ["created", "graph_building", "graph_completed", "failed"]},
        "created_at": _ISO,
        "updated_at": _ISO,
        "files": {"type": "array", "items": {"type": "object"}},
        "total_text_length": {"type": "integer", "minimum": 0},
        "graph_id": {"type": ["string", "null"]},
        "graph_build_task_id": {"type": ["string", "null"]},
        "text_preview": {"type": "string"},
    },
}
GRAPH = {
    "type": "object",
    "required": ["graph_id", "nodes", "edges", "node_count", "edge_count"],
    "properties": {
        "graph_id": {"type": "string"},
        "nodes": {"type": "array", "items": {"type": "object"}},
        "edges": {"type": "array", "items": {"type": "object"}},
        "node_count": {"type": "integer", "minimum": 0},
        "edge_count": {"type": "integer", "minimum": 0},
    },
}


def _ok(data: dict[str, Any], *, count: bool = False) -> dict[str, Any]:
    props: dict[str, Any] = {"success": {"const": True}, "data": data}
    required = ["success", "data"]
    if count:
        props["count"] = {"type": "integer", "minimum": 0}
        required.append("count")
    return {"type": "object", "required": required, "properties": props}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_FILTERS = [
    _query("q", {"type": "string", "maxLength": 200}, "text in type, message, error, metadata values; id prefix"),
    _query("status", {"type": "string", "pattern": "^(pending|processing|completed|failed)(,(pending|processing|completed|failed))*$"}),
    _query("task_type", {"type": "string"}),
    _query("created_after", _ISO), _query("created_before", _ISO),
    _query("updated_after", _ISO), _query("updated_before", _ISO),
]
_ACCESS_TOKEN = _query("access_token", {"type": "string"}, "read token or per-task token (never the API token)")
_READ = [{"bearer": []}, {"accessToken": []}, {}]
_WRITE = [{"bearer": []}, {}]
_SSE = {"text/event-stream": {"schema": {"type": "string"}}}

# (method, path) -> operation (responses get the error envelope as "default")
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/"): {"summary": "The web page", "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}},
    ("GET", "/healthz"): {
        "summary": "Liveness (no token)",
        "responses": {"200": {"description": "ok", "content": _json({"type": "object", "required": ["success", "status", "streams"], "properties": {"success": {"const": True}, "status": {"const": "ok"}, "streams": {"type": "integer", "minimum": 0}}})}},
    },
    ("GET", "/metrics"): {
        "summary": "Prometheus metrics", "security": _READ,
        "responses": {"200": {"description": "exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}},
    },
    ("GET", "/openapi.json"): {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1", "content": _json({"type": "object"})}}},
    ("GET", "/api/graph/task/{task_id}"): {
        "summary": "One task (a per-task token is enough)", "security": _READ,
        "parameters": [_path_param("task_id", {"type": "string"}), _ACCESS_TOKEN],
        "responses": {"200": {"description": "the task", "content": _json(_ok(TASK))}},
    },
    ("GET", "/api/graph/tasks"): {
        "summary": "List tasks, newest first", "security": _READ,
        "parameters": [
            *_FILTERS,
            _query("sort", {"type": "string", "enum": ["-created", "created", "-updated", "updated"]}),
            _query("cursor", {"type": "string"}, "the next_cursor of the previous page"),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
            _ACCESS_TOKEN,
        ],
        "responses": {"200": {"description": "tasks", "content": _json(_ok({"type": "array", "items": TASK}, count=True))}},
    },
    ("GET", "/api/tasks/counts"): {
        "summary": "Tasks per status for the filters (every filter but status)", "security": _READ,
        "parameters": [*_FILTERS, _ACCESS_TOKEN],
        "responses": {"200": {"description": "counts", "content": _json(_ok(COUNTS))}},
    },
    ("GET", "/readyz"): {
        "summary": "Readiness: the store is reachable",
        "responses": {"200": {"description": "ready", "content": _json({"type": "object"})}},
    },
    ("POST", "/api/tasks/{task_id}/cancel"): {
        "summary": "Ask the producer to stop (cooperative cancel)", "security": _WRITE,
        "parameters": [_path_param("task_id", {"type": "string"})],
        "responses": {"202": {"description": "cancel requested", "content": _json(_ok(TASK))}},
    },
    ("GET", "/api/tasks/{task_id}/events"): {
        "summary": "The task's durable event log (snapshots, oldest first)", "security": _READ,
        "parameters": [
            _path_param("task_id", {"type": "string"}),
            _query("after", {"type": "integer", "minimum": 0}),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
            _ACCESS_TOKEN,
        ],
        "responses": {"200": {"description": "events", "content": _json({
            "type": "object", "required": ["success", "data", "next_after"],
            "properties": {"success": {"const": True}, "data": {"type": "array", "items": TASK},
                           "next_after": {"type": ["integer", "null"]}},
        })}},
    },
    ("POST", "/api/tasks"): {
        "summary": "Create a task", "security": _WRITE,
        "requestBody": {"required": True, "content": _json({
            "type": "object", "required": ["task_type"], "additionalProperties": False,
            "properties": {"task_type": {"type": "string", "minLength": 1}, "metadata": {"type": "object"},
                           "lease_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 604800}},
        })},
        "responses": {"201": {"description": "created", "content": _json(_ok(TASK))}},
    },
    ("PATCH", "/api/tasks/{task_id}"): {
        "summary": "Change a task", "security": _WRITE,
        "parameters": [_path_param("task_id", {"type": "string"})],
        "requestBody": {"required": True, "content": _json({
            "type": "object", "additionalProperties": False, "minProperties": 1,
            "properties": {
                "status": {"type": "string", "enum": ["pending", "processing", "completed", "failed"]},
                "progress": {"type": "integer", "minimum": 0, "maximum": 100},
                "message": {"type": "string"},
                "progress_detail": {"type": "object"},
                "result": {"type": "object"},
                "error": {"type": "string"},
            },
        })},
        "responses": {"200": {"description": "changed", "content": _json(_ok(TASK))}},
    },
    ("POST", "/api/tasks/{task_id}/token"): {
        "summary": "Mint a read token for this one task (README, Protocol additions)", "security": _WRITE,
        "parameters": [_path_param("task_id", {"type": "string"})],
        "requestBody": {"required": False, "content": _json({
            "type": "object", "additionalProperties": False,
            "properties": {"ttl_s": {"type": "integer", "minimum": 1}},
        })},
        "responses": {"200": {"description": "token", "content": _json(_ok({
            "type": "object", "required": ["task_id", "token", "expires_at"],
            "properties": {"task_id": {"type": "string"}, "token": {"type": "string"}, "expires_at": _ISO},
        }))}},
    },
    ("GET", "/tasks/{task_id}/stream"): {
        "summary": "One task's events (SSE)", "security": _READ,
        "parameters": [_path_param("task_id", {"type": "string"}), _ACCESS_TOKEN,
                       {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "event stream", "content": _SSE}, "204": {"description": "the client already holds the final version"}},
    },
    ("GET", "/tasks/stream"): {
        "summary": "Every task's events (SSE)", "security": _READ,
        "parameters": [_query("task_type", {"type": "string"}), _query("status", {"type": "string"}), _ACCESS_TOKEN],
        "responses": {"200": {"description": "event stream", "content": _SSE}},
    },
    ("POST", "/api/graph/project"): {
        "summary": "Create a project from uploaded files or JSON text", "security": _WRITE,
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["files"],
                "properties": {"name": {"type": "string"}, "files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
            }},
            "application/json": {"schema": {
                "type": "object", "required": ["text"], "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "text": {"type": "string"}},
            }},
        }},
        "responses": {"201": {"description": "created", "content": _json(_ok(PROJECT))}},
    },
    ("GET", "/api/graph/project/list"): {
        "summary": "Every project", "security": _READ, "parameters": [_ACCESS_TOKEN],
        "responses": {"200": {"description": "projects", "content": _json(_ok({"type": "array", "items": PROJECT}, count=True))}},
    },
    ("GET", "/api/graph/project/{project_id}"): {
        "summary": "One project", "security": _READ,
        "parameters": [_path_param("project_id", {"type": "string"}), _ACCESS_TOKEN],
        "responses": {"200": {"description": "the project", "content": _json(_ok(PROJECT))}},
    },
    ("DELETE", "/api/graph/project/{project_id}"): {
        "summary": "Delete a project", "security": _WRITE,
        "parameters": [_path_param("project_id", {"type": "string"})],
        "responses": {"200": {"description": "deleted", "content": _json(_ok({"type": "object", "required": ["project_id", "deleted"]}))}},
    },
    ("POST", "/api/graph/build"): {
        "summary": "Start a graph build job", "security": _WRITE,
        "requestBody": {"required": True, "content": _json({
            "type": "object", "required": ["project_id"], "additionalProperties": False,
            "properties": {
                "project_id": {"type": "string"}, "graph_name": {"type": "string"},
                "chunk_size": {"type": "integer", "minimum": 1, "maximum": 10000},
                "chunk_overlap": {"type": "integer", "minimum": 0}, "force": {"type": "boolean"},
            },
        })},
        "responses": {"202": {"description": "started", "content": _json(_ok({"type": "object", "required": ["project_id", "task_id", "message"]}))}},
    },
    ("GET", "/api/graph/data/{graph_id}"): {
        "summary": "A graph's nodes and edges", "security": _READ,
        "parameters": [_path_param("graph_id", {"type": "string"}), _ACCESS_TOKEN],
        "responses": {"200": {"description": "graph", "content": _json(_ok(GRAPH))}},
    },
    ("DELETE", "/api/graph/delete/{graph_id}"): {
        "summary": "Delete a graph", "security": _WRITE,
        "parameters": [_path_param("graph_id", {"type": "string"})],
        "responses": {"200": {"description": "deleted", "content": _json(_ok({"type": "object", "required": ["graph_id", "deleted"]}))}},
    },
}


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), operation in OPERATIONS.items():
        op = {**operation, "responses": {**operation["responses"], "default": {"description": "error", "content": _json(ERROR)}}}
        op.setdefault("security", [])
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "taskmon", "version": "1.1", "description": "Real-time task progress service (PROTOCOL.md; README, Protocol additions)"},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "accessToken": {"type": "apiKey", "in": "query", "name": "access_token"},
            }
        },
    }


_DOCUMENT = document()


async def openapi_json(request: Request) -> JSONResponse:
    return JSONResponse(_DOCUMENT)
