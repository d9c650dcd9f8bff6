"""The graph endpoints over HTTP with the embedded local backend: projects, uploads (and their
abuse), builds followed on /tasks/{id}/stream, conflicts, forced rebuilds, graph data."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from graph_helpers import assert_well_ordered, files_outside, follow_stream, make_pdf

from server.graph.backends import LocalBackend, SubmittedBatch
from server.graph.service import GraphService
from server.models import TaskStatus
from server.retry import Retrier
from server.settings import Settings

pytestmark = pytest.mark.anyio

MAX_UPLOAD_MB = 0.05  # 51,200 bytes: small, so the limit is cheap to exceed
LIMIT = int(MAX_UPLOAD_MB * 1024 * 1024)
STORY = (
    "Marie Curie worked with Pierre Curie at the University of Paris. They studied radioactivity together.\n\n"
    "In 1903 Marie Curie won the Nobel Prize with Henri Becquerel. The University of Paris hired her in 1906.\n\n"
    "Pierre Curie was born in Paris. NASA later named a crater after Marie Curie."
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(store_url="memory://", data_dir=tmp_path / "data", max_upload_mb=MAX_UPLOAD_MB)


def _multipart(parts: Sequence[tuple[bytes, bytes]], boundary: bytes = b"taskmon-boundary") -> tuple[bytes, dict[str, str]]:
    """A multipart body built by hand, so file names reach the server byte for byte (httpx would
    percent-encode a NUL)."""
    body = b""
    for filename, content in parts:
        body += (
            b"--" + boundary + b"\r\n"
            b'Content-Disposition: form-data; name="files"; filename="' + filename + b'"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n"
        )
    body += b"--" + boundary + b"--\r\n"
    return body, {"content-type": f"multipart/form-data; boundary={boundary.decode()}"}


def _service(client: httpx.AsyncClient) -> GraphService:
    service: GraphService = client.app.state.graph  # type: ignore[attr-defined]
    return service


async def _create(client: httpx.AsyncClient, text: str = STORY, name: str = "curie") -> str:
    response = await client.post("/api/graph/project", json={"name": name, "text": text})
    assert response.status_code == 201, response.text
    project_id: str = response.json()["data"]["project_id"]
    return project_id


async def _wait_for(manager: Any, task_id: str, predicate: Any) -> dict[str, Any]:
    """The first snapshot of the task that satisfies ``predicate`` (event-driven, no polling)."""
    with anyio.fail_after(10):
        async with manager.subscribe(task_id) as subscription:
            async for task in subscription:
                snapshot: dict[str, Any] = task.to_dict()
                if predicate(snapshot):
                    return snapshot
    raise AssertionError("the task ended before the condition held")


class _GatedBackend(LocalBackend):
    """The local backend, but ``submit_batch`` waits until the test opens the gate."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.gate = threading.Event()

    def submit_batch(self, graph_id: str, chunks: Sequence[str], retrier: Retrier) -> SubmittedBatch:
        self.gate.wait(10)
        return super().submit_batch(graph_id, chunks, retrier)


# ------------------------------------------------------------------------------ end to end


async def test_build_from_text_end_to_end(live_server: Any, settings: Settings) -> None:
    async with live_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        project_id = await _create(http)
        response = await http.post("/api/graph/build", json={"project_id": project_id, "chunk_size": 120, "chunk_overlap": 20})
        assert response.status_code == 202
        body = response.json()
        task_id = body["data"]["task_id"]
        assert body == {"success": True, "data": {"project_id": project_id, "task_id": task_id, "message": "Graph build started"}}

        snapshots, end = await follow_stream(srv.url, task_id)
        assert end == {"task_id": task_id, "status": "completed"}
        assert_well_ordered(snapshots)
        assert snapshots[0]["task_type"] == "graph_build" and snapshots[0]["status"] == "pending"
        assert snapshots[0]["metadata"]["backend"] == "local"
        phases = [s["progress_detail"].get("phase") for s in snapshots[:-1]]
        for phase in ("reading", "chunking", "creating_graph", "adding", "processing", "reading_graph"):
            assert phase in phases
        result = snapshots[-1]["result"]
        assert result["project_id"] == project_id and result["backend"] == "local"
        assert result["chunk_count"] == snapshots[-1]["progress_detail"]["chunk_count"] >= 3
        assert result["items_succeeded"] == result["chunk_count"]

        response = await http.get(f"/api/graph/data/{result['graph_id']}")
        assert response.status_code == 200
        data = response.json()["data"]
        assert data["node_count"] == result["node_count"] == len(data["nodes"]) > 0
        assert data["edge_count"] == result["edge_count"] == len(data["edges"]) > 0
        assert "Marie Curie" in {n["name"] for n in data["nodes"]}

        project = (await http.get(f"/api/graph/project/{project_id}")).json()["data"]
        assert project["status"] == "graph_completed"
        assert project["graph_id"] == result["graph_id"] and project["graph_build_task_id"] == task_id

        legacy = (await http.get(f"/api/graph/task/{task_id}")).json()["data"]
        assert legacy == snapshots[-1]


async def test_queued_builds_stay_pending(client: httpx.AsyncClient) -> None:
    service = _service(client)
    service.backend = gated = _GatedBackend(service.settings.data_dir)
    first = await _create(client, name="one")
    second = await _create(client, name="two")
    workers = client.app.state.settings.job_workers  # type: ignore[attr-defined]
    # Fill the pool: one real build that is gated, plus idle jobs waiting on the same gate.
    manager = client.app.state.manager  # type: ignore[attr-defined]
    blockers = [manager.create_task("blocker") for _ in range(workers - 1)]
    for task in blockers:
        client.app.state.jobs.submit(task.task_id, lambda ctx: {"waited": gated.gate.wait(10)})  # type: ignore[attr-defined]
    one = (await client.post("/api/graph/build", json={"project_id": first})).json()["data"]["task_id"]
    await _wait_for(manager, one, lambda t: t["progress_detail"].get("phase") == "adding")
    two = (await client.post("/api/graph/build", json={"project_id": second})).json()["data"]["task_id"]
    assert manager.get_task(two).status is TaskStatus.PENDING
    assert (await client.get(f"/api/graph/project/{second}")).json()["data"]["status"] == "graph_building"

    # Forcing a rebuild of a queued build: the queued one fails as superseded when a worker
    # reaches it, and the new one runs.
    response = await client.post("/api/graph/build", json={"project_id": second, "force": True})
    assert response.status_code == 202
    three = response.json()["data"]["task_id"]
    gated.gate.set()
    superseded = await _wait_for(manager, two, lambda t: t["status"] in ("completed", "failed"))
    assert superseded["status"] == "failed" and superseded["error"] == "superseded by a forced rebuild of the same project"
    done = await _wait_for(manager, three, lambda t: t["status"] in ("completed", "failed"))
    assert done["status"] == "completed"
    project = (await client.get(f"/api/graph/project/{second}")).json()["data"]
    assert project["status"] == "graph_completed" and project["graph_build_task_id"] == three


async def test_second_build_conflicts_and_force_restarts(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    service = _service(client)
    service.backend = gated = _GatedBackend(service.settings.data_dir)
    manager = client.app.state.manager  # type: ignore[attr-defined]
    project_id = await _create(client)
    first = (await client.post("/api/graph/build", json={"project_id": project_id})).json()["data"]["task_id"]
    await _wait_for(manager, first, lambda t: t["progress_detail"].get("phase") == "adding")

    response = await client.post("/api/graph/build", json={"project_id": project_id})
    assert response.status_code == 409
    assert response.json() == {"success": False, "error": "a graph build is already running for this project", "task_id": first}
    response = await client.delete(f"/api/graph/project/{project_id}")
    assert response.status_code == 409 and response.json()["task_id"] == first

    with caplog.at_level(logging.INFO):
        response = await client.post("/api/graph/build", json={"project_id": project_id, "force": True, "chunk_size": 80, "chunk_overlap": 10})
        assert response.status_code == 202
        second = response.json()["data"]["task_id"]
        assert second != first
        old = manager.get_task(first)
        assert old.status is TaskStatus.FAILED and old.error == "superseded by a forced rebuild of the same project"
        gated.gate.set()
        done = await _wait_for(manager, second, lambda t: t["status"] in ("completed", "failed"))
    assert done["status"] == "completed", done["error"]
    assert done["metadata"]["chunk_size"] == 80
    project = (await client.get(f"/api/graph/project/{project_id}")).json()["data"]
    assert project["status"] == "graph_completed"
    assert project["graph_build_task_id"] == second and project["graph_id"] == done["result"]["graph_id"]
    assert project["chunk_size"] == 80
    assert manager.get_task(first).error == "superseded by a forced rebuild of the same project"  # unchanged
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    # A finished build no longer blocks: building again (no force) is accepted.
    response = await client.post("/api/graph/build", json={"project_id": project_id})
    assert response.status_code == 202


async def test_failure_ends_the_task_and_the_project_failed(client: httpx.AsyncClient) -> None:
    service = _service(client)

    class _Broken(LocalBackend):
        def counts(self, graph_id: str, retrier: Retrier) -> tuple[int, int]:
            raise RuntimeError("disk on fire")

    service.backend = _Broken(service.settings.data_dir)
    project_id = await _create(client)
    task_id = (await client.post("/api/graph/build", json={"project_id": project_id})).json()["data"]["task_id"]
    done = await _wait_for(client.app.state.manager, task_id, lambda t: t["status"] in ("completed", "failed"))  # type: ignore[attr-defined]
    assert done["status"] == "failed"
    assert done["error"] == "internal error while running the job"  # no traceback, no internals
    project = (await client.get(f"/api/graph/project/{project_id}")).json()["data"]
    assert project["status"] == "failed" and project["error"] == "internal error while building the graph"


# ------------------------------------------------------------------------------ projects


async def test_project_from_uploaded_files(client: httpx.AsyncClient, settings: Settings) -> None:
    pdf = make_pdf(["Ada Lovelace wrote the first program."])
    response = await client.post(
        "/api/graph/project",
        data={"name": "sources"},
        files=[
            ("files", ("notes.txt", "Grace Hopper built a compiler at Remington Rand, déjà vu.".encode("cp1252"), "text/plain")),
            ("files", ("readme.md", b"# Heading\n\nAlan Turing in Manchester.", "text/markdown")),
            ("files", ("paper.pdf", pdf, "application/pdf")),
        ],
    )
    assert response.status_code == 201, response.text
    project = response.json()["data"]
    assert project["name"] == "sources" and project["status"] == "created"
    assert [f["filename"] for f in project["files"]] == ["notes.txt", "readme.md", "paper.pdf"]
    assert "déjà vu" in project["text_preview"]
    assert "Alan Turing in Manchester." in project["text_preview"]
    assert "Ada Lovelace wrote the first program." in project["text_preview"]
    stored = settings.data_dir / "projects" / project["project_id"] / "files"
    assert sorted(p.name for p in stored.iterdir()) == ["upload-001.txt", "upload-002.md", "upload-003.pdf"]
    assert (stored / "upload-003.pdf").read_bytes() == pdf


async def test_project_get_list_delete(client: httpx.AsyncClient) -> None:
    ids = [await _create(client, name=f"p{i}") for i in range(3)]
    listing = (await client.get("/api/graph/project/list")).json()
    assert listing["success"] is True and listing["count"] == 3
    assert [p["project_id"] for p in listing["data"]] == list(reversed(ids))
    one = (await client.get(f"/api/graph/project/{ids[0]}")).json()["data"]
    assert one["name"] == "p0" and one["total_text_length"] == len(STORY)
    assert (await client.delete(f"/api/graph/project/{ids[0]}")).json() == {"success": True, "data": {"project_id": ids[0], "deleted": True}}
    response = await client.get(f"/api/graph/project/{ids[0]}")
    assert response.status_code == 404 and response.json() == {"success": False, "error": "project not found"}
    assert (await client.delete(f"/api/graph/project/{ids[0]}")).status_code == 404


@pytest.mark.parametrize(
    ("parts", "status", "error"),
    [
        ([(b"../../x.txt", b"hello")], 400, "invalid file: file name must not contain a path"),
        ([(b"..\\..\\x.txt", b"hello")], 400, "invalid file: file name must not contain a path"),
        ([(b"a\x00b.txt", b"hello")], 400, "invalid file: file name contains control characters"),
        ([(b"x" * 300 + b".txt", b"hello")], 400, "invalid file: file name is longer than 255 characters"),
        ([(b"setup.exe", b"MZ\x90\x00")], 400, "invalid file: unsupported file type .exe; allowed: .txt, .md, .markdown, .pdf"),
        ([(b"fake.pdf", b"just text, not a PDF at all")], 400, "fake.pdf: file is not a valid PDF"),
        ([(b"ok.txt", b"fine"), (b"big.txt", b"a" * (LIMIT + 1))], 413, "upload exceeds the limit of 0.05 MB"),
        ([(b"huge.txt", b"a" * (LIMIT + 100_000))], 413, "upload exceeds the limit of 0.05 MB"),
        ([(b"empty.txt", b"   ")], 400, "empty.txt: file contains no text"),
        ([(b"binary.txt", bytes(range(256)) * 8)], 400, "binary.txt: file is not readable text (unknown encoding or binary content)"),
    ],
)
async def test_upload_abuse_is_refused_and_writes_nothing(
    client: httpx.AsyncClient, settings: Settings, tmp_path: Path, parts: list[tuple[bytes, bytes]], status: int, error: str
) -> None:
    body, headers = _multipart(parts)
    response = await client.post("/api/graph/project", content=body, headers=headers)
    assert response.status_code == status
    assert response.json() == {"success": False, "error": error}
    assert list((settings.data_dir / "projects").iterdir()) == []
    assert files_outside(tmp_path, settings.data_dir) == []
    assert not list(tmp_path.parent.rglob("x.txt"))


async def test_upload_limit_is_enforced_while_reading_without_content_length(client: httpx.AsyncClient, settings: Settings) -> None:
    body, headers = _multipart([(b"streamed.txt", b"b" * (LIMIT * 3))])

    async def chunked() -> Any:
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    response = await client.post("/api/graph/project", content=chunked(), headers=headers)
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json() == {"success": False, "error": "upload exceeds the limit of 0.05 MB"}
    assert list((settings.data_dir / "projects").iterdir()) == []


async def test_content_length_over_the_limit_is_refused_before_reading(client: httpx.AsyncClient) -> None:
    read = 0

    async def never_sent() -> Any:
        nonlocal read
        read += 1
        yield b"x"

    headers = {"content-type": "multipart/form-data; boundary=b", "content-length": str(LIMIT * 10)}
    response = await client.post("/api/graph/project", content=never_sent(), headers=headers)
    assert response.status_code == 413
    assert read == 0


@pytest.mark.parametrize(
    ("kwargs", "status", "error"),
    [
        ({"json": {"name": "x"}}, 400, "text is required and must be a string"),
        ({"json": {"name": "x", "text": "   \n "}}, 400, "text must not be empty"),
        ({"json": {"name": "x" * 201, "text": "t"}}, 400, "name must be at most 200 characters"),
        ({"json": {"name": 5, "text": "t"}}, 400, "name must be a string"),
        ({"json": {"text": "t", "extra": 1}}, 400, "unknown field(s): extra; allowed: name, text"),
        ({"json": ["not", "an", "object"]}, 400, "request body must be a JSON object"),
        ({"content": b"{broken", "headers": {"content-type": "application/json"}}, 400, "request body must be a JSON object"),
        ({"json": {"name": "x", "text": "a" * (LIMIT + 1)}}, 413, "upload exceeds the limit of 0.05 MB"),
        ({"content": b"text", "headers": {"content-type": "text/plain"}}, 415, "send multipart/form-data with 'files', or application/json with 'name' and 'text'"),
        ({"data": {"name": "no files"}, "files": {}}, 415, "send multipart/form-data with 'files', or application/json with 'name' and 'text'"),
    ],
)
async def test_bad_project_requests(client: httpx.AsyncClient, settings: Settings, kwargs: dict[str, Any], status: int, error: str) -> None:
    response = await client.post("/api/graph/project", **kwargs)
    assert response.status_code == status
    assert response.json() == {"success": False, "error": error}
    assert list((settings.data_dir / "projects").iterdir()) == []


async def test_multipart_without_files_is_a_400(client: httpx.AsyncClient) -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nonly a name\r\n--b--\r\n'
    response = await client.post("/api/graph/project", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400
    assert response.json() == {"success": False, "error": "no files: send one or more files in the multipart field 'files'"}


# ------------------------------------------------------------------------------ build requests


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({}, 400, "project_id is required"),
        ({"project_id": "proj_000000000000"}, 404, "project not found"),
        ({"project_id": "../../etc"}, 404, "project not found"),
        ({"project_id": "{pid}", "chunk_size": 100, "chunk_overlap": 100}, 400, "chunk_overlap must be smaller than chunk_size"),
        ({"project_id": "{pid}", "chunk_size": 20_000}, 400, "chunk_size must be between 1 and 10000"),
        ({"project_id": "{pid}", "chunk_size": "big"}, 400, "chunk_size must be an integer"),
        ({"project_id": "{pid}", "force": "yes"}, 400, "force must be true or false"),
        ({"project_id": "{pid}", "graph_name": ""}, 400, "graph_name must not be empty"),
        ({"project_id": "{pid}", "colour": "red"}, 400, "unknown field(s): colour; allowed: chunk_overlap, chunk_size, force, graph_name, project_id"),
    ],
)
async def test_bad_build_requests_change_nothing(client: httpx.AsyncClient, body: dict[str, Any], status: int, error: str) -> None:
    project_id = await _create(client)
    body = {k: (project_id if v == "{pid}" else v) for k, v in body.items()}
    response = await client.post("/api/graph/build", json=body)
    assert response.status_code == status
    assert response.json() == {"success": False, "error": error}
    assert client.app.state.manager.list_tasks() == []  # type: ignore[attr-defined]
    assert (await client.get(f"/api/graph/project/{project_id}")).json()["data"]["status"] == "created"


async def test_bad_graph_ids_are_404(client: httpx.AsyncClient, tmp_path: Path) -> None:
    (tmp_path / "secret.json").write_text("{}")
    for method, path, error in (
        ("GET", "/api/graph/data/local_" + "0" * 32, "graph not found"),
        ("GET", "/api/graph/data/not%20an%20id", "graph not found"),
        ("GET", "/api/graph/data/%2E%2E", "graph not found"),
        ("GET", "/api/graph/data/..%2F..%2Fsecret", "not found"),  # no route has a slash in the id
        ("DELETE", "/api/graph/delete/local_" + "0" * 32, "graph not found"),
        ("DELETE", "/api/graph/delete/%2E%2E", "graph not found"),
    ):
        response = await client.request(method, path)
        assert response.status_code == 404, path
        assert response.json() == {"success": False, "error": error}
    assert (tmp_path / "secret.json").exists()


async def test_delete_graph(client: httpx.AsyncClient, settings: Settings) -> None:
    service = _service(client)
    graph_id = service.backend.create_graph("g", "", Retrier())
    assert (await client.delete(f"/api/graph/delete/{graph_id}")).json() == {"success": True, "data": {"graph_id": graph_id, "deleted": True}}
    assert not (settings.data_dir / "graphs" / f"{graph_id}.json").exists()
    assert (await client.get(f"/api/graph/data/{graph_id}")).status_code == 404


async def test_tokens_guard_the_graph_endpoints(tmp_path: Path) -> None:
    from contextlib import AsyncExitStack

    from server.app import create_app

    settings = Settings(store_url="memory://", data_dir=tmp_path / "data", api_token="write-secret", read_token="read-secret")
    app = create_app(settings)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        http = await stack.enter_async_context(httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost"))
        response = await http.post("/api/graph/project", json={"text": "t"})
        assert response.status_code == 401 and response.json()["success"] is False
        assert list((settings.data_dir / "projects").iterdir()) == []
        write = {"authorization": "Bearer write-secret"}
        project_id = (await http.post("/api/graph/project", json={"text": "Alice met Bob."}, headers=write)).json()["data"]["project_id"]
        assert (await http.get(f"/api/graph/project/{project_id}")).status_code == 401
        assert (await http.get(f"/api/graph/project/{project_id}", headers={"authorization": "Bearer read-secret"})).status_code == 200
        assert (await http.post("/api/graph/build", json={"project_id": project_id}, headers={"authorization": "Bearer read-secret"})).status_code == 401
        assert (await http.delete(f"/api/graph/project/{project_id}")).status_code == 401


async def test_build_during_shutdown_is_a_503_and_leaves_nothing_pending(client: httpx.AsyncClient) -> None:
    project_id = await _create(client)
    manager = client.app.state.manager  # type: ignore[attr-defined]
    assert await anyio.to_thread.run_sync(client.app.state.jobs.shutdown)  # type: ignore[attr-defined]
    response = await client.post("/api/graph/build", json={"project_id": project_id})
    assert response.status_code == 503
    assert response.json() == {"success": False, "error": "the server is shutting down; try again shortly"}
    (task,) = manager.list_tasks()
    assert task.status is TaskStatus.FAILED
    project = (await client.get(f"/api/graph/project/{project_id}")).json()["data"]
    assert project["status"] == "failed"


async def test_deeply_nested_build_request_is_400_never_500(client: httpx.AsyncClient, settings: Settings) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000  # ~200 KB: inside the 1 MiB limit, past the parser's recursion
    response = await client.post(
        "/api/graph/build", content=b'{"project_id": ' + nested + b"}", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {"success": False, "error": "request body is nested too deeply"}
    assert list((settings.data_dir / "projects").iterdir()) == []
