"""``create_app(settings)``: the Starlette application, its lifespan, and its shutdown.

Nothing is built at import time. The lifespan opens the store, the event bus, the TaskManager, the
job runner and the graph service, keeps them on ``app.state``, runs the heartbeat, retention and
server-exit loops, and closes everything in reverse order.

Run it under any ASGI server with ``server.app:create_app`` as a factory (``uvicorn --factory``,
``granian --factory``, ``hypercorn 'server.app:create_app()'``), or mount it in a host app and run
its lifespan there (``Starlette(routes=[Mount("/progress", app=taskmon)], lifespan=taskmon.lifespan)``).
README, "Run it under your server / inside your app".

Shutdown is the app's own business, whichever server runs it: open streams end as soon as the app
learns that the server is exiting, so the server's wait for open connections is short. It learns it
from the first of
  * uvicorn's exit flag, which uvicorn sets on SIGINT/SIGTERM but only acts on after it has waited
    for every connection; found as sse-starlette finds it (its issues #132/#151): the Server bound
    to the SIGTERM handler, and sse-starlette's own ``AppStatus.should_exit``, polled by one loop,
  * ``app.request_shutdown()``, for code that stops a server from another thread,
  * the ASGI lifespan ``shutdown`` message, for a server that sends it before it drains.
hypercorn (0.18) and granian (2.x) tell an app nothing before they drain (their lifespan shutdown
comes after), so there the server's own timeout ends the streams: ``--graceful-timeout`` (hypercorn,
default 3 s) and ``--workers-kill-timeout`` (granian, default: never). README has the table.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from sse_starlette.sse import AppStatus
from starlette._utils import get_route_path  # the rule Route.matches uses for root_path / mounts
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from . import api
from .auth import auth_routes
from .bus import EventBus
from .errors import error_response, exception_handlers
from .graph import build_graph_service, graph_routes
from .jobs import JobRunner
from .manager import TaskManager
from .metrics import build_registry
from .openapi import openapi_json
from .security import SecurityMiddleware, host_refusal
from .settings import Settings
from .stores import open_store
from .streams import serve_stream, stream_routes

__all__ = ["TaskmonApp", "create_app"]

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
EXIT_POLL_S = 0.25  # how often the server-exit loop looks at uvicorn's flag (sse-starlette: 0.5 s)
_NOT_STARTED = b'{"success":false,"error":"taskmon is not started: run its lifespan (README: Run it inside your app)"}'
_STOPPED = b'{"success":false,"error":"taskmon is shutting down"}'
_PATCH_PREFIX = "/api/tasks/"
_PATCH_AT = len(_PATCH_PREFIX)


class TaskmonApp(Starlette):
    """Starlette, with the stream routes' GET/HEAD served ahead of the middleware stack (streams.py).

    The stream routes are real routes: they are matched with ``root_path`` and mounts as the router
    would match them, and ``url_for("task_stream", task_id=...)`` builds their URLs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stream_routes = [route for route in self.routes if route.name in ("task_stream", "all_tasks_stream")]
        self._patch_route = next(route for route in self.routes if getattr(route, "name", None) == "patch_task")
        self._started = False  # the lifespan is running
        self._cors: frozenset[str] = frozenset()
        self._cors_for: object = None
        self._stopped = False  # the lifespan has ended
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        # app.state's own dict (settings, manager...): what the per-request paths read, without
        # State.__getattr__'s failed attribute lookup first (it was five of them on every PATCH)
        self.state_values: dict[str, Any] = self.state._state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = host_refusal(self.state_values["settings"], scope)  # streams too: DNS rebinding
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            if not self._started:
                await _answer_503(send, _STOPPED if self._stopped else _NOT_STARTED)
                return
            method = scope["method"]
            if method in ("GET", "HEAD"):
                for route in self._stream_routes:
                    match, child = route.matches(scope)
                    if match is Match.FULL:
                        scope["app"] = self
                        await serve_stream(self, scope, receive, send, child["path_params"].get("task_id"))
                        return
            elif method == "PATCH":
                # the route "/api/tasks/{task_id}" matched by hand: its regex and child scope were a
                # measurable share of every progress report (Starlette's get_route_path rule for mounts)
                path = get_route_path(scope)
                task_id = path[_PATCH_AT:]
                if path.startswith(_PATCH_PREFIX) and task_id and "/" not in task_id:
                    scope["app"] = self
                    scope["endpoint"] = self._patch_route.endpoint
                    scope["path_params"] = {"task_id": task_id}
                    await api.serve_patch(self, scope, receive, send, task_id)
                    return
        await super().__call__(scope, receive, send)

    def lifespan(self, host: object = None) -> AbstractAsyncContextManager[None]:
        """taskmon's lifespan as a context manager, for a host app that mounts taskmon.

        Starlette does not run a mounted app's lifespan; the host passes this one on
        (``Starlette(..., lifespan=taskmon.lifespan)``, ``FastAPI(lifespan=taskmon.lifespan)``) or
        enters it from its own (``async with taskmon.lifespan(): yield``)."""
        return self.router.lifespan_context(self)

    @property
    def cors_origins(self) -> frozenset[str]:
        """TASKMON_CORS_ORIGINS as a set, kept while the settings stay the same object."""
        settings = self.state_values["settings"]
        if self._cors_for is not settings:
            self._cors, self._cors_for = frozenset(settings.cors_origins), settings
        return self._cors

    def cors_headers(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        allowed = self.state.settings.cors_origins
        if not origin or not allowed or (origin not in allowed and "*" not in allowed):
            return []
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]

    def request_shutdown(self) -> None:
        """End every open stream now; later streams end at once. Thread-safe, idempotent."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            self._end_streams()
        else:
            try:
                loop.call_soon_threadsafe(self._end_streams)
            except RuntimeError:  # the loop closed meanwhile: nothing is streaming any more
                logger.debug("shutdown requested after the loop closed")

    def _end_streams(self) -> None:
        manager = getattr(self.state, "manager", None)
        if manager is not None:
            manager.bus.close()


async def _answer_503(send: Send, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _CORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, with a refused preflight answered in the JSON error envelope."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        headers = {k: v for k, v in response.headers.items() if not k.startswith("content-")}
        return error_response(response.status_code, f"CORS preflight refused: {refused} not allowed", headers=headers)


def _uvicorn_exit_flags() -> list[Callable[[], bool]]:
    """What says "uvicorn is exiting" in this process, found as sse-starlette finds it.

    uvicorn sets ``Server.should_exit`` on SIGINT/SIGTERM, then waits for open connections before
    it sends the lifespan shutdown (``--timeout-graceful-shutdown``, default: forever), so an app
    with open streams must notice the flag itself. The Server is the owner of the SIGTERM handler
    (a bound method) when uvicorn captured the signals (its main thread; sse-starlette #151), and
    sse-starlette patches ``Server.handle_exit`` to set ``AppStatus.should_exit`` (#132: too late
    for the uvicorn CLI, which is why the handler is looked at too)."""
    flags: list[Callable[[], bool]] = []
    handler = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    if isinstance(server, uvicorn.Server):
        flags.append(lambda: bool(server.should_exit))
    if not AppStatus.should_exit:  # already set: left over from an earlier server in this process
        flags.append(lambda: bool(AppStatus.should_exit))
    return flags


async def _watch_server_exit(app: TaskmonApp, flags: list[Callable[[], bool]]) -> None:
    """One loop per app: end the streams once the server says it is exiting (sse-starlette's way)."""
    try:
        while not any(flag() for flag in flags):
            await asyncio.sleep(EXIT_POLL_S)
        logger.info("server exiting: ending open streams")
        app._end_streams()
    except Exception:
        logger.exception("the server-exit watch failed; streams end only at the lifespan shutdown")


async def _index(request: Request) -> Response:
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        return error_response(404, "the page is not installed")
    return FileResponse(index, headers={"cache-control": "no-cache"})


async def _retention_loop(app: TaskmonApp, manager: TaskManager) -> None:
    settings = app.state.settings
    while True:
        await anyio.sleep(settings.cleanup_interval_s)
        try:
            removed = await anyio.to_thread.run_sync(manager.cleanup_old_tasks, settings.retention_hours)
        except Exception:
            logger.exception("retention cleanup failed")
            continue
        if removed:
            logger.info("retention cleanup", extra={"removed": len(removed)})


async def _sweep(manager: TaskManager) -> None:
    """Lease and cancel-grace decisions; they commit changes, so they run off the loop."""
    failed = await anyio.to_thread.run_sync(manager.sweep)
    for reason, ids in failed.items():
        if ids:
            logger.warning("tasks failed by the monitor", extra={"reason": reason, "count": len(ids)})


@asynccontextmanager
async def _lifespan(app: TaskmonApp) -> AsyncIterator[None]:
    settings = app.state.settings
    store = await anyio.to_thread.run_sync(
        lambda: open_store(
            settings.store_url,
            history=settings.history,
            history_bytes=settings.history_kb * 1024,
            history_total_bytes=settings.history_max_mb * 1024 * 1024,
        )
    )
    bus = EventBus(queue_size=settings.queue_size)
    manager = TaskManager(
        store,
        bus,
        stale_after_s=settings.stale_after_s,
        cancel_grace_s=settings.cancel_grace_s,
        default_lease_s=settings.lease_s,
    )
    bus.hook = manager.recover_stale
    store.register_owner(manager.owner)  # a shared store keeps this job pool's heartbeat
    await store.start(manager.on_feed)
    recovered = await anyio.to_thread.run_sync(manager.recover_interrupted)
    if recovered:
        logger.warning("tasks interrupted by the previous shutdown marked failed", extra={"count": len(recovered)})
    jobs = JobRunner(manager, settings.job_workers)
    graph = build_graph_service(settings, manager, jobs)
    app.state.manager = manager
    app.state.jobs = jobs
    app.state.graph = graph
    app.state.registry = build_registry(manager)
    background = {
        asyncio.create_task(bus.run_heartbeat(settings.heartbeat_s), name="taskmon-heartbeat"),
        asyncio.create_task(_retention_loop(app, manager), name="taskmon-retention"),
        asyncio.create_task(
            manager.run_monitor(settings.monitor_interval_s, lambda: _sweep(manager)), name="taskmon-monitor"
        ),
    }
    exit_flags = _uvicorn_exit_flags()
    if exit_flags:
        background.add(asyncio.create_task(_watch_server_exit(app, exit_flags), name="taskmon-server-exit"))
    app._loop = asyncio.get_running_loop()
    app._loop_thread = threading.get_ident()
    app._started = True
    gc.freeze()  # the long-lived start-up objects leave the GC's generations: cheaper collections
    logger.info("taskmon started", extra={"store": settings.store_url.split(":", 1)[0]})
    try:
        yield
    finally:
        app._started = False
        app._stopped = True
        bus.close()  # the lifespan shutdown (what a server that sends it before draining relies on)
        manager.stop_holds()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await anyio.to_thread.run_sync(jobs.shutdown)
        await anyio.to_thread.run_sync(manager.stop_reports)  # the jobs' last reports, before the store closes
        graph.close()
        await store.aclose()
        logger.info("taskmon stopped")


def create_app(settings: Settings | None = None) -> TaskmonApp:
    settings = settings or Settings.from_env()
    middleware = [Middleware(SecurityMiddleware, cors_origins=settings.cors_origins)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                _CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            )
        )
    routes = [
        Route("/", _index, methods=["GET"]),
        *api.routes(),
        *stream_routes(),
        *auth_routes(),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        *graph_routes(),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
    ]
    app = TaskmonApp(
        routes=routes,
        middleware=middleware,
        exception_handlers=exception_handlers,
        lifespan=_lifespan,
    )
    app.state.settings = settings
    return app
