"""A fake Zep v4 HTTP server for the graph tests: the endpoints the build uses, with faults on demand.

It speaks the wire format the real zep-cloud 4.x SDK parses (see ../shared/notes/zep-cloud-v4.md):
graphs, batches (create / add items / process / get), paged node and edge lists, graph delete.
State lives in memory; the server runs under uvicorn in a thread on a free port.

Behaviour worth knowing in tests:
- ``Authorization: Api-Key <api_key>`` is required; anything else is 401.
- Mutating requests honour ``Idempotency-Key``: a repeated key replays the first answer.
- An item whose text contains ``REJECT`` is rejected by ``add_items``; one containing ``FAIL`` fails
  in processing (so its batch ends ``partial``, or ``failed`` when every item fails).
- A processed batch advances one step per ``GET batches/{id}``: queued -> processing -> final.
- Processing extracts nodes (capitalised words) and edges (consecutive pairs) per item.
- ``page_size_cap`` limits list pages, to exercise cursor paging.
- ``fail(method, path_regex, status=..., retry_after=..., times=...)`` answers matching requests
  with an error instead; ``fail(..., hold=True)`` does the work but holds the answer until
  ``release()`` (or close), so a client with a short timeout gives up on it.
"""

from __future__ import annotations

import re
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

API_KEY = "fake-zep-key"
PREFIX = "/api/v4"
_CAPITALISED = re.compile(r"\b[A-Z][a-zA-Z]+\b")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int | None = None
    retry_after: str | None = None
    hold: bool = False
    times: int = 1
    hits: int = 0


@dataclass
class _Batch:
    uuid: str
    metadata: dict[str, Any]
    status: str = "draft"
    items: list[dict[str, Any]] = field(default_factory=list)
    created_at: str = field(default_factory=_now)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uuid": self.uuid, "status": self.status, "metadata": self.metadata, "created_at": self.created_at}
        if self.status not in ("draft",):
            total = len(self.items)
            succeeded = sum(1 for i in self.items if i["status"] == "succeeded")
            failed = sum(1 for i in self.items if i["status"] == "failed")
            processing = sum(1 for i in self.items if i["status"] == "processing")
            out["progress"] = {
                "stage": self.status,
                "total_items": total,
                "succeeded_items": succeeded,
                "failed_items": failed,
                "processing_items": processing,
            }
        return out


class FakeZep:
    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self.page_size_cap = 100
        self.graphs: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, _Batch] = {}
        self.nodes: dict[str, dict[str, dict[str, Any]]] = {}
        self.edges: dict[str, dict[str, dict[str, Any]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self._replies: dict[tuple[str, str, str], tuple[int, Any]] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()
        self.url = ""
        self.app = Starlette(
            routes=[
                Route(f"{PREFIX}/graphs", self._create_graph, methods=["POST"]),
                Route(f"{PREFIX}/graphs/{{g}}", self._delete_graph, methods=["DELETE"]),
                Route(f"{PREFIX}/graphs/{{g}}/ontology", self._set_ontology, methods=["PUT"]),
                Route(f"{PREFIX}/graphs/{{g}}/nodes/list", self._list_nodes, methods=["POST"]),
                Route(f"{PREFIX}/graphs/{{g}}/edges/list", self._list_edges, methods=["POST"]),
                Route(f"{PREFIX}/batches", self._create_batch, methods=["POST"]),
                Route(f"{PREFIX}/batches/{{b}}", self._get_batch, methods=["GET"]),
                Route(f"{PREFIX}/batches/{{b}}/items", self._add_items, methods=["POST"]),
                Route(f"{PREFIX}/batches/{{b}}/process", self._process, methods=["POST"]),
            ]
        )
        self.app.add_middleware(_FaultMiddleware, fake=self)

    # -- test controls -------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"{self.url}{PREFIX}"

    def fail(
        self,
        method: str,
        path_regex: str,
        *,
        status: int | None = None,
        retry_after: str | None = None,
        hold: bool = False,
        times: int = 1,
    ) -> Fault:
        fault = Fault(method.upper(), re.compile(path_regex), status, retry_after, hold, times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def release(self) -> None:
        self._release.set()

    def count(self, method: str, path_regex: str) -> int:
        pattern = re.compile(path_regex)
        with self._lock:
            return sum(1 for m, p in self.requests if m == method.upper() and pattern.search(p))

    def items_of(self, graph_uuid: str) -> list[dict[str, Any]]:
        with self._lock:
            return [i for b in self.batches.values() for i in b.items if i["graph_uuid"] == graph_uuid]

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for fault in self.faults:
                if fault.method == method and fault.path.search(path) and fault.hits < fault.times:
                    fault.hits += 1
                    return fault
        return None

    async def hold(self) -> None:
        await anyio.to_thread.run_sync(self._release.wait, 10)

    # -- helpers ----------------------------------------------------------------------------------
    def _replayed(self, request: Request) -> tuple[int, Any] | None:
        key = request.headers.get("idempotency-key")
        if key is None:
            return None
        return self._replies.get((request.method, request.url.path, key))

    def _remember(self, request: Request, status: int, body: Any) -> JSONResponse:
        key = request.headers.get("idempotency-key")
        if key is not None:
            self._replies[(request.method, request.url.path, key)] = (status, body)
        return JSONResponse(body, status_code=status)

    def _idempotent(self, request: Request) -> JSONResponse | None:
        replay = self._replayed(request)
        if replay is None:
            return None
        return JSONResponse(replay[1], status_code=replay[0])

    # -- endpoints -----------------------------------------------------------------------------
    async def _create_graph(self, request: Request) -> Response:
        if (replay := self._idempotent(request)) is not None:
            return replay
        body = await request.json()
        graph_uuid = str(uuid.uuid4())
        with self._lock:
            self.graphs[graph_uuid] = {"name": body.get("name"), "description": body.get("description"), "ontology": None}
            self.nodes[graph_uuid] = {}
            self.edges[graph_uuid] = {}
        graph = {"uuid": graph_uuid, "name": body.get("name"), "description": body.get("description"), "type": "standard", "created_at": _now()}
        return self._remember(request, 201, graph)

    async def _set_ontology(self, request: Request) -> Response:
        graph_uuid = request.path_params["g"]
        if graph_uuid not in self.graphs:
            return _error(404, "not_found", "graph not found")
        body = await request.json()
        self.graphs[graph_uuid]["ontology"] = body
        return JSONResponse({"entity_types": body.get("entity_types") or [], "edge_types": body.get("edge_types") or []})

    async def _delete_graph(self, request: Request) -> Response:
        if (replay := self._idempotent(request)) is not None:
            return replay
        graph_uuid = request.path_params["g"]
        with self._lock:
            if self.graphs.pop(graph_uuid, None) is None:
                return _error(404, "not_found", "graph not found")
            self.nodes.pop(graph_uuid, None)
            self.edges.pop(graph_uuid, None)
        task = {"uuid": str(uuid.uuid4()), "type": "graph_delete", "status": "pending", "created_at": _now()}
        return self._remember(request, 202, {"task": task})

    async def _create_batch(self, request: Request) -> Response:
        if (replay := self._idempotent(request)) is not None:
            return replay
        body = await request.json()
        batch = _Batch(str(uuid.uuid4()), body.get("metadata") or {})
        with self._lock:
            self.batches[batch.uuid] = batch
        return self._remember(request, 201, batch.as_json())

    async def _add_items(self, request: Request) -> Response:
        if (replay := self._idempotent(request)) is not None:
            return replay
        batch = self.batches.get(request.path_params["b"])
        if batch is None:
            return _error(404, "not_found", "batch not found")
        body = await request.json()
        items = body.get("items") or []
        if len(items) > 500:
            return _error(400, "too_many_items", "at most 500 items per call")
        accepted, rejected = [], []
        for index, item in enumerate(items):
            data = item.get("data") or ""
            if item.get("graph_uuid") not in self.graphs:
                rejected.append({"index": index, "reason": "unknown graph"})
            elif "REJECT" in data:
                rejected.append({"index": index, "reason": "content policy violation"})
            elif not data.strip() or len(data) > 10_000:
                rejected.append({"index": index, "reason": "data must be 1..10000 characters"})
            else:
                stored = {
                    "uuid": str(uuid.uuid4()),
                    "episode_uuid": str(uuid.uuid4()),
                    "graph_uuid": item["graph_uuid"],
                    "data": data,
                    "status": "pending",
                    "type": "graph_episode",
                }
                accepted.append(stored)
        with self._lock:
            batch.items.extend(accepted)
        public = [{k: v for k, v in i.items() if k != "data"} for i in accepted]
        return self._remember(request, 200, {"items": public, "rejected_items": rejected})

    async def _process(self, request: Request) -> Response:
        if (replay := self._idempotent(request)) is not None:
            return replay
        batch = self.batches.get(request.path_params["b"])
        if batch is None:
            return _error(404, "not_found", "batch not found")
        if not batch.items:
            return _error(400, "empty_batch", "the batch has no items")
        with self._lock:
            batch.status = "queued"
            for item in batch.items:
                item["status"] = "queued"
        task = {"uuid": str(uuid.uuid4()), "type": "batch_process", "status": "pending"}
        return self._remember(request, 202, {"batch": batch.as_json(), "task": task})

    async def _get_batch(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["b"])
        if batch is None:
            return _error(404, "not_found", "batch not found")
        with self._lock:
            if batch.status == "queued":
                batch.status = "processing"
                for item in batch.items:
                    item["status"] = "processing"
            elif batch.status == "processing":
                for item in batch.items:
                    item["status"] = "failed" if "FAIL" in item["data"] else "succeeded"
                    if item["status"] == "succeeded":
                        self._extract(item)
                failed = sum(1 for i in batch.items if i["status"] == "failed")
                batch.status = "succeeded" if failed == 0 else ("failed" if failed == len(batch.items) else "partial")
            return JSONResponse(batch.as_json())

    def _extract(self, item: dict[str, Any]) -> None:
        graph_uuid = item["graph_uuid"]
        nodes, edges = self.nodes[graph_uuid], self.edges[graph_uuid]
        names = list(dict.fromkeys(_CAPITALISED.findall(item["data"])))
        for name in names:
            node = nodes.setdefault(
                name,
                {
                    "uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{graph_uuid}/{name}")),
                    "name": name,
                    "labels": ["Entity"],
                    "summary": f"{name} appears in the text",
                    "attributes": {},
                    "created_at": _now(),
                    "graph_uuid": graph_uuid,
                    "episode_uuids": [],
                    "episode_uuids_truncated": False,
                },
            )
            node["episode_uuids"].append(item["episode_uuid"])
        for a, b in zip(names, names[1:], strict=False):
            key = f"{a}->{b}"
            if key not in edges:
                edges[key] = {
                    "uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{graph_uuid}/{key}")),
                    "name": "MENTIONED_WITH",
                    "fact": f"{a} is mentioned with {b}",
                    "source_node_uuid": nodes[a]["uuid"],
                    "target_node_uuid": nodes[b]["uuid"],
                    "created_at": _now(),
                    "graph_uuid": graph_uuid,
                    "episode_uuids": [item["episode_uuid"]],
                }

    def _page(self, request: Request, collection: dict[str, dict[str, dict[str, Any]]]) -> Response:
        graph_uuid = request.path_params["g"]
        with self._lock:
            if graph_uuid not in self.graphs:
                return _error(404, "not_found", "graph not found")
            items = sorted(collection[graph_uuid].values(), key=lambda x: x["uuid"])
        try:
            size = int(request.query_params.get("page_size", "50"))
        except ValueError:
            return _error(400, "bad_request", "page_size must be an integer")
        if not 1 <= size <= 100:
            return _error(400, "bad_request", "page_size must be 1..100")
        size = min(size, self.page_size_cap)
        start = int(request.query_params.get("cursor") or 0)
        page = items[start : start + size]
        body: dict[str, Any] = {"items": page}
        if start + size < len(items):
            body["next_cursor"] = str(start + size)
        return JSONResponse(body)

    async def _list_nodes(self, request: Request) -> Response:
        await request.body()
        return self._page(request, self.nodes)

    async def _list_edges(self, request: Request) -> Response:
        await request.body()
        return self._page(request, self.edges)


class _FaultMiddleware:
    """Auth check, then injected faults, in front of the routes (pure ASGI)."""

    def __init__(self, app: Any, fake: FakeZep) -> None:
        self.app = app
        self.fake = fake

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        fault = self.fake._take_fault(request.method, request.url.path)
        if request.headers.get("authorization") != f"Api-Key {self.fake.api_key}":
            await _error(401, "unauthorized", "invalid API key")(scope, receive, send)
            return
        if fault is not None and fault.status is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
            await _error(fault.status, "injected", f"injected HTTP {fault.status}", headers)(scope, receive, send)
            return
        if fault is not None and fault.hold:
            # Do the work now, answer late: a client that timed out retries with the same
            # Idempotency-Key and must get the stored answer, not a second copy of the work.
            messages: list[Any] = []

            async def capture(message: Any) -> None:
                messages.append(message)

            await self.app(scope, receive, capture)
            await self.fake.hold()
            for message in messages:
                await send(message)
            return
        await self.app(scope, receive, send)


@contextmanager
def running_fake_zep(api_key: str = API_KEY) -> Iterator[FakeZep]:
    """Serve a FakeZep on 127.0.0.1 at a free port for the duration of the block."""
    fake = FakeZep(api_key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this; without it every keep-alive request waits ~40 ms for a
    # delayed ACK (asyncio sets it only on sockets it creates itself).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections queue here until uvicorn accepts them: no start-up race
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(fake.app, lifespan="off", log_level="error", ws="none", http="h11", loop="asyncio", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fake-zep", daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.release()
        server.should_exit = True
        thread.join(10)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("fake Zep server did not stop")
