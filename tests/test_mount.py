"""taskmon inside a host app (``Mount("/progress", app=taskmon)``) and behind a proxy's root path
(``uvicorn --root-path /progress``): streams, a legacy GET, the page, ``url_for`` and CORS preflight,
each against a real uvicorn on a free port (streams) or in-process (the rest).
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from httpx_sse import aconnect_sse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from conftest import free_port, running
from server.app import TaskmonApp, create_app
from server.cli import Server
from server.settings import Settings

pytestmark = pytest.mark.anyio

PREFIX = "/progress"
ORIGIN = "https://app.example"


def host_app(taskmon: TaskmonApp) -> Starlette:
    """The README's embedding example: a host app of its own, taskmon mounted, its lifespan run."""

    async def home(request: Request) -> Response:
        return JSONResponse({"host": True})

    async def link(request: Request) -> Response:
        url = request.url_for("taskmon:task_stream", task_id=request.path_params["task_id"])
        return JSONResponse({"stream": str(url)})

    return Starlette(
        routes=[
            Route("/", home),
            Route("/links/{task_id}", link),
            Mount(PREFIX, app=taskmon, name="taskmon"),
        ],
        lifespan=taskmon.lifespan,
    )


@asynccontextmanager
async def serve(app: ASGIApp, taskmon: TaskmonApp, **config: Any) -> AsyncIterator[str]:
    """A real uvicorn serving ``app`` in a thread; yields its base URL."""
    port = free_port()
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on", **config), taskmon)
    thread = threading.Thread(target=server.run, name="mount-uvicorn", daemon=True)
    thread.start()
    try:
        with anyio.fail_after(10):
            while not server.started:
                assert thread.is_alive(), "uvicorn exited during start-up"
                await anyio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.request_stop()
        await anyio.to_thread.run_sync(thread.join, 10)
        assert not thread.is_alive(), "uvicorn did not stop"


async def follow(http: httpx.AsyncClient, stream_url: str, task_id: str) -> list[tuple[str, Any]]:
    """Follow a per-task stream while the producer API moves the task to its end."""
    changes = [{"status": "processing", "progress": 50}, {"status": "completed", "result": {"ok": True}}]
    seen: list[tuple[str, Any]] = []
    with anyio.fail_after(10):
        async with aconnect_sse(http, "GET", stream_url) as source:
            assert source.response.status_code == 200, await source.response.aread()
            async for event in source.aiter_sse():
                if not event.data:
                    continue
                data = json.loads(event.data)
                seen.append((event.event, data.get("version", data.get("status"))))
                if event.event == "task" and changes:
                    response = await http.patch(f"{PREFIX}/api/tasks/{task_id}", json=changes.pop(0))
                    assert response.status_code == 200, response.text
                if event.event == "end":
                    break
    return seen


async def test_mounted_streams_legacy_get_page_and_url_for(settings: Settings) -> None:
    taskmon = create_app(settings)
    async with (
        serve(host_app(taskmon), taskmon) as url,
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(5)) as http,
    ):
        created = await http.post(f"{PREFIX}/api/tasks", json={"task_type": "mounted"})
        assert created.status_code == 201, created.text
        task_id = created.json()["data"]["task_id"]

        # the host's own routes still work beside taskmon's
        assert (await http.get("/")).json() == {"host": True}
        # url_for through the mount names the prefixed stream URL ...
        link = (await http.get(f"/links/{task_id}")).json()["stream"]
        assert link == f"{url}{PREFIX}/tasks/{task_id}/stream"
        # ... which streams: snapshot, the producer's changes, end
        seen = await follow(http, link, task_id)
        assert seen == [("task", 1), ("task", 2), ("task", 3), ("end", "completed")]

        # the all-tasks stream under the prefix
        with anyio.fail_after(10):
            async with aconnect_sse(http, "GET", f"{PREFIX}/tasks/stream") as source:
                async for event in source.aiter_sse():
                    if event.event == "snapshot":
                        assert [t["task_id"] for t in json.loads(event.data)["tasks"]] == [task_id]
                        break

        legacy = await http.get(f"{PREFIX}/api/graph/task/{task_id}")
        assert legacy.status_code == 200
        assert legacy.json()["data"]["status"] == "completed"

        page = await http.get(f"{PREFIX}/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert (await http.get(f"{PREFIX}/static/app.js")).status_code == 200

        # outside the prefix there is no taskmon
        assert (await http.get(f"/tasks/{task_id}/stream")).status_code == 404


async def test_root_path_streams_legacy_get_and_page(settings: Settings) -> None:
    """Behind a proxy that strips /progress: uvicorn --root-path /progress."""
    taskmon = create_app(settings)
    async with (
        serve(taskmon, taskmon, root_path=PREFIX) as url,
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(5)) as http,
    ):
        # the proxy forwards /progress/tasks/... as /tasks/...; the app sees root_path=/progress
        created = await http.post("/api/tasks", json={"task_type": "proxied"})
        assert created.status_code == 201, created.text
        task_id = created.json()["data"]["task_id"]
        changes = [{"status": "processing", "progress": 50}, {"status": "failed", "error": "boom"}]
        seen: list[tuple[str, Any]] = []
        with anyio.fail_after(10):
            async with aconnect_sse(http, "GET", f"/tasks/{task_id}/stream") as source:
                assert source.response.status_code == 200
                async for event in source.aiter_sse():
                    if not event.data:
                        continue
                    data = json.loads(event.data)
                    seen.append((event.event, data.get("version", data.get("status"))))
                    if event.event == "task" and changes:
                        assert (await http.patch(f"/api/tasks/{task_id}", json=changes.pop(0))).status_code == 200
                    if event.event == "end":
                        break
        assert seen == [("task", 1), ("task", 2), ("task", 3), ("end", "failed")]
        assert (await http.get(f"/api/graph/task/{task_id}")).json()["data"]["status"] == "failed"
        page = await http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


async def test_a_mount_without_the_lifespan_says_what_to_add(settings: Settings) -> None:
    host = Starlette(routes=[Mount(PREFIX, app=create_app(settings))])  # lifespan=taskmon.lifespan forgotten
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=host), base_url="http://localhost") as http:
        for path in ("/api/graph/tasks", "/tasks/stream", "/healthz"):
            response = await http.get(f"{PREFIX}{path}")
            assert response.status_code == 503
            body = response.json()
            assert body["success"] is False
            assert "lifespan" in body["error"]


async def test_the_lifespan_can_be_entered_from_the_hosts_own(settings: Settings) -> None:
    taskmon = create_app(settings)
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("host up")
        async with taskmon.lifespan():
            yield
        events.append("host down")

    host = Starlette(routes=[Mount(PREFIX, app=taskmon)], lifespan=lifespan)
    async with running(host):  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=host), base_url="http://localhost") as http:
            assert (await http.get(f"{PREFIX}/healthz")).json()["status"] == "ok"
    assert events == ["host up", "host down"]


PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "GET",
    "Access-Control-Request-Headers": "last-event-id",
}


def preflight_view(response: httpx.Response) -> tuple[int, dict[str, str]]:
    keep = ("access-control-allow-origin", "access-control-allow-methods", "access-control-allow-headers", "vary")
    return response.status_code, {k: v for k, v in response.headers.items() if k in keep}


@pytest.mark.parametrize("prefix", ["", PREFIX])
async def test_stream_preflight_answers_as_the_json_endpoints(settings: Settings, prefix: str) -> None:
    taskmon = create_app(settings.with_changes(cors_origins=(ORIGIN,)))
    app: ASGIApp = host_app(taskmon) if prefix else taskmon
    async with running(app):  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as http:
            task_id = (await http.post(f"{prefix}/api/tasks", json={"task_type": "cors"})).json()["data"]["task_id"]
            json_preflight = await http.options(f"{prefix}/api/graph/task/{task_id}", headers=PREFLIGHT)
            status, headers = preflight_view(json_preflight)
            assert status == 200
            assert headers["access-control-allow-origin"] == ORIGIN
            assert "last-event-id" in headers["access-control-allow-headers"].lower()
            for path in (f"/tasks/{task_id}/stream", "/tasks/stream"):
                stream_preflight = await http.options(f"{prefix}{path}", headers=PREFLIGHT)
                assert preflight_view(stream_preflight) == (status, headers)

            # a refused preflight is the JSON envelope, on a stream as on a JSON endpoint
            for path in (f"/tasks/{task_id}/stream", f"/api/graph/task/{task_id}"):
                refused = await http.options(f"{prefix}{path}", headers={**PREFLIGHT, "Origin": "https://evil.example"})
                assert refused.status_code == 400
                assert refused.headers["content-type"] == "application/json"
                assert refused.json() == {"success": False, "error": "CORS preflight refused: origin not allowed"}

            # any other method on a stream: the JSON 405, as the JSON endpoints answer it
            not_allowed = await http.post(f"{prefix}/tasks/{task_id}/stream")
            assert not_allowed.status_code == 405
            assert not_allowed.json() == {"success": False, "error": "method not allowed"}
            assert "GET" in not_allowed.headers["allow"]


async def test_a_fastapi_host_adds_live_progress_with_two_lines(settings: Settings) -> None:
    """The README's FastAPI example, served by a real uvicorn: the stream follows a task under /progress."""
    taskmon = create_app(settings)
    app = FastAPI(lifespan=taskmon.lifespan)  # line 1: taskmon's lifespan runs with the host's
    app.mount(PREFIX, taskmon, name="taskmon")  # line 2: taskmon under /progress

    @app.get("/jobs/{task_id}")
    async def job(task_id: str, request: Request) -> dict[str, str]:
        return {"progress": str(request.url_for("taskmon:task_stream", task_id=task_id))}

    async with serve(app, taskmon) as url, httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(5)) as http:
        task_id = (await http.post(f"{PREFIX}/api/tasks", json={"task_type": "fastapi"})).json()["data"]["task_id"]
        link = (await http.get(f"/jobs/{task_id}")).json()["progress"]
        assert link == f"{url}{PREFIX}/tasks/{task_id}/stream"
        assert await follow(http, link, task_id) == [("task", 1), ("task", 2), ("task", 3), ("end", "completed")]


async def test_a_mounted_upload_is_multipart_like_at_the_root(settings: Settings) -> None:
    # The content-type check knows the one multipart endpoint by its path inside taskmon, not by
    # the host's full path (under a mount, scope["path"] still carries the prefix).
    taskmon = create_app(settings)
    host = Starlette(routes=[Mount(PREFIX, app=taskmon)], lifespan=taskmon.lifespan)
    async with running(host):  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=host), base_url="http://localhost") as http:
            response = await http.post(
                f"{PREFIX}/api/graph/project",
                data={"name": "mounted"},
                files=[("files", ("notes.txt", b"Ada Lovelace wrote the first program.", "text/plain"))],
            )
            assert response.status_code == 201, response.text
            assert response.json()["data"]["name"] == "mounted"
            # and a multipart body anywhere else is still refused
            refused = await http.post(f"{PREFIX}/api/tasks", files=[("files", ("x.txt", b"x", "text/plain"))])
            assert refused.status_code == 415
