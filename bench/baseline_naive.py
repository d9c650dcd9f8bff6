"""The "typical app" of issue 5: the baseline every taskmon figure is compared with.

Deliberately typical, not sabotaged -- this is what a careful first version of a
task-progress SSE service usually looks like:

* Starlette routes behind a CORS middleware, ``sse_starlette.EventSourceResponse``
  with its defaults (a 15 s ping task per connection, a disconnect listener, a
  shutdown watcher, a per-send ``anyio.move_on_after``);
* one ``asyncio.Queue`` per client (bounded; when full the oldest item is dropped),
  fed with the task *dict*: each client re-encodes it with ``json.dumps``;
* a thread-safe ``update_task`` for job threads that hands the snapshot to every
  subscriber queue with ``loop.call_soon_threadsafe``.

It speaks the same minimal wire as taskmon (see ../shared/PROTOCOL.md):
``POST /api/tasks``, ``PATCH /api/tasks/{id}``, ``GET /api/graph/task/{id}``,
``GET /tasks/{id}/stream`` (``retry:``, snapshot first, ``id: <version>``,
``event: task``, ``event: end`` after the terminal snapshot) and ``GET /healthz``.

Run:  python -m bench.baseline_naive --host 127.0.0.1 --port 8766
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import uuid
from collections import defaultdict
from datetime import datetime, timezone

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

TERMINAL = {"completed", "failed"}
TRANSITIONS = {
    "pending": {"pending", "processing", "failed"},
    "processing": {"processing", "completed", "failed"},
}
PATCH_FIELDS = {"status", "progress", "message", "progress_detail", "result", "error"}
QUEUE_SIZE = 256


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class Hub:
    """Tasks in a dict, one asyncio.Queue per stream client."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict] = {}
        self.subscribers: dict[str, set[asyncio.Queue]] = defaultdict(set)
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- producer side -------------------------------------------------------
    def create_task(self, task_type: str, metadata: dict | None = None) -> dict:
        now = _now()
        task = {
            "task_id": str(uuid.uuid4()),
            "task_type": task_type,
            "status": "pending",
            "created_at": now,
            "updated_at": now,
            "progress": 0,
            "message": "",
            "progress_detail": {},
            "result": None,
            "error": None,
            "metadata": metadata or {},
            "version": 1,
        }
        with self.lock:
            self.tasks[task["task_id"]] = task
        return dict(task)

    def update_task(self, task_id: str, **fields) -> dict:
        """Thread-safe: callable from the event loop or from a job thread."""
        with self.lock:
            current = self.tasks.get(task_id)
            if current is None:
                raise KeyError(task_id)
            if current["status"] in TERMINAL:
                raise RuntimeError("task is terminal")
            status = fields.get("status")
            if status is not None and status not in TRANSITIONS[current["status"]]:
                raise RuntimeError("illegal transition")
            task = dict(current)
            task.update({k: v for k, v in fields.items() if v is not None})
            if task["status"] == "completed":
                task["progress"] = 100
            task["version"] = current["version"] + 1
            task["updated_at"] = _now()
            self.tasks[task_id] = task
            queues = list(self.subscribers.get(task_id, ()))
        self._notify(queues, task)
        return dict(task)

    def _notify(self, queues: list[asyncio.Queue], task: dict) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            for q in queues:
                _put_drop_oldest(q, task)
        else:
            for q in queues:
                self.loop.call_soon_threadsafe(_put_drop_oldest, q, task)

    # -- consumer side -------------------------------------------------------
    def subscribe(self, task_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_SIZE)
        with self.lock:
            self.subscribers[task_id].add(q)
        return q

    def unsubscribe(self, task_id: str, q: asyncio.Queue) -> None:
        with self.lock:
            subs = self.subscribers.get(task_id)
            if subs is not None:
                subs.discard(q)
                if not subs:
                    del self.subscribers[task_id]


def _put_drop_oldest(q: asyncio.Queue, item: dict) -> None:
    try:
        q.put_nowait(item)
    except asyncio.QueueFull:
        q.get_nowait()
        q.put_nowait(item)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"success": False, "error": message}, status_code=status)


async def create_task(request: Request) -> Response:
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "invalid JSON")
    if not isinstance(body, dict) or not isinstance(body.get("task_type"), str):
        return _error(400, "task_type is required")
    task = request.app.state.hub.create_task(body["task_type"], body.get("metadata"))
    return JSONResponse({"success": True, "data": task}, status_code=201)


async def patch_task(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    task_id = request.path_params["task_id"]
    if task_id not in hub.tasks:
        return _error(404, "task not found")
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "invalid JSON")
    if not isinstance(body, dict) or not body or set(body) - PATCH_FIELDS:
        return _error(400, "bad fields")
    try:
        task = hub.update_task(task_id, **body)
    except RuntimeError as exc:
        return _error(409, str(exc))
    return JSONResponse({"success": True, "data": task})


async def get_task(request: Request) -> Response:
    task = request.app.state.hub.tasks.get(request.path_params["task_id"])
    if task is None:
        return _error(404, "task not found")
    return JSONResponse({"success": True, "data": task})


async def stream_task(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    task_id = request.path_params["task_id"]
    if task_id not in hub.tasks:
        return _error(404, "task not found")
    queue = hub.subscribe(task_id)  # subscribe before reading the snapshot: no gap

    async def events():
        try:
            yield {"retry": 3000}
            last = 0
            task = hub.tasks[task_id]
            while True:
                if task["version"] > last:
                    last = task["version"]
                    yield {"event": "task", "id": str(last), "data": json.dumps(task)}
                    if task["status"] in TERMINAL:
                        end = {"task_id": task_id, "status": task["status"]}
                        yield {"event": "end", "data": json.dumps(end)}
                        return
                task = await queue.get()
        finally:
            hub.unsubscribe(task_id, queue)

    return EventSourceResponse(events())


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app() -> Starlette:
    hub = Hub()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        hub.loop = asyncio.get_running_loop()
        yield

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/api/tasks", create_task, methods=["POST"]),
            Route("/api/tasks/{task_id}", patch_task, methods=["PATCH"]),
            Route("/api/graph/task/{task_id}", get_task),
            Route("/tasks/{task_id}/stream", stream_task),
        ],
        middleware=[Middleware(CORSMiddleware, allow_origins=["*"])],
        lifespan=lifespan,
    )
    app.state.hub = hub
    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args(argv)
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
