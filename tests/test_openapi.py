"""/openapi.json describes every endpoint the app serves (and nothing else), and schemathesis,
generating requests from it against the in-process app, finds no 5xx and no response that
breaks its schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.checks import not_a_server_error
from starlette.routing import Mount, Route

from server.app import create_app
from server.settings import Settings

pytestmark = pytest.mark.anyio

STREAM_ROUTES = {("GET", "/tasks/{task_id}/stream"), ("GET", "/tasks/stream")}  # served ahead of the router


def _app_routes(app) -> set[tuple[str, str]]:
    found = set()
    for route in app.routes:
        if isinstance(route, Mount):
            continue  # /static: files, not an API
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":
                found.add((method, route.path))
    return found | STREAM_ROUTES


async def test_every_route_is_documented_and_nothing_else(client):
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == _app_routes(client.app)
    for ops in doc["paths"].values():
        for op in ops.values():
            assert "default" in op["responses"]  # every error is the envelope


def test_api_conforms_to_its_schema(tmp_path: Path) -> None:
    """Bounded: a few examples per operation, derandomized, whole run well under a minute.

    (schemathesis's lazy pytest loader does not work with pytest 9, so each operation's
    strategy is run with hypothesis directly.)"""
    app = create_app(
        Settings(store_url="memory://", data_dir=tmp_path / "data", allowed_hosts=("testserver",), max_upload_mb=1)
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    tested = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("/stream") or operation.path == "/stream":
            continue  # SSE never ends; tests/test_streams.py covers the streams

        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def conforms(case) -> None:  # type: ignore[no-untyped-def]
            case.call_and_validate(checks=checks)

        conforms()
        tested.append((operation.method.upper(), operation.path))
    assert set(tested) == _app_routes(app) - STREAM_ROUTES - {("GET", "/openapi.json")}  # the document itself
