"""``create_app(settings)``: the Starlette application and its lifespan.

Nothing is built at import time. The lifespan opens the store, the event bus, the TaskManager, the
job runner and the graph service, keeps them on ``app.state``, runs the heartbeat and retention
loops, and closes everything in reverse order.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from . import api
from .bus import EventBus
from .errors import error_response, exception_handlers
from .graph import build_graph_service, graph_routes
from .jobs import JobRunner
from .manager import TaskManager
from .metrics import build_registry
from .settings import Settings
from .stores import open_store
from .streams import STREAM_PATH, serve_stream

__all__ = ["TaskmonApp", "create_app"]

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


class TaskmonApp(Starlette):
    """Starlette, with the two SSE routes served ahead of the middleware stack (see streams.py)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            match = STREAM_PATH.match(scope["path"])
            if match is not None:
                scope["app"] = self
                await serve_stream(self, scope, receive, send, match.group(1))
                return
        await super().__call__(scope, receive, send)

    def cors_headers(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        allowed = self.state.settings.cors_origins
        if not origin or not allowed or (origin not in allowed and "*" not in allowed):
            return []
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]

    def shutdown_streams(self) -> None:
        """End every open stream now (called from the server's exit signal, before the lifespan ends)."""
        manager = getattr(self.state, "manager", None)
        if manager is not None:
            manager.bus.close()


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
        lambda: open_store(settings.store_url, history=settings.history, history_bytes=settings.history_kb * 1024)
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
    gc.freeze()  # the long-lived start-up objects leave the GC's generations: cheaper collections
    logger.info("taskmon started", extra={"store": settings.store_url.split(":", 1)[0]})
    try:
        yield
    finally:
        bus.close()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await anyio.to_thread.run_sync(jobs.shutdown)
        graph.close()
        await store.aclose()
        logger.info("taskmon stopped")


def create_app(settings: Settings | None = None) -> TaskmonApp:
    settings = settings or Settings.from_env()
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            )
        )
    routes = [
        Route("/", _index, methods=["GET"]),
        *api.routes(),
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
