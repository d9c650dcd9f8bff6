"""Cooperative cancel (PROTOCOL v1.1): ``POST /api/tasks/{id}/cancel`` and how each kind of producer
learns it (HTTP PATCH answer, the Python API's TaskCancelled, the job pool and the in-process graph
build), the server-side grace, and the errors."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import TASK_KEYS, FakeClock, running, updated
from httpx_sse import aconnect_sse

from server.app import create_app
from server.bus import EventBus
from server.graph.backends import LocalBackend, SubmittedBatch
from server.jobs import JobRunner
from server.manager import CANCELLED, TaskManager
from server.models import TaskCancelled, TaskStateError, TaskStatus
from server.retry import Retrier
from server.stores.memory import MemoryStore

pytestmark = pytest.mark.anyio


async def _wait_until(predicate: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


# ------------------------------------------------------------------------------ HTTP producer


async def test_http_producer_learns_the_cancel_from_its_patch_and_ends_the_task(live_server, settings):
    async with live_server(settings) as srv, httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
        task = (await http.post("/api/tasks", json={"task_type": "import"})).json()["data"]
        task_id = task["task_id"]
        await http.patch(f"/api/tasks/{task_id}", json={"status": "processing", "progress": 10})
        seen: list[dict[str, Any]] = []

        async def watch() -> None:
            async with aconnect_sse(http, "GET", f"/tasks/{task_id}/stream") as source:
                async for event in source.aiter_sse():
                    if event.event == "task":
                        seen.append(json.loads(event.data))
                    elif event.event == "end":
                        return

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await _wait_until(lambda: len(seen) == 1)

                response = await http.post(f"/api/tasks/{task_id}/cancel")
                assert response.status_code == 202
                body = response.json()
                assert body["success"] is True and list(body["data"]) == TASK_KEYS
                assert body["data"]["cancel_requested"] is True and body["data"]["status"] == "processing"
                assert body["data"]["version"] == 3  # a change
                got = (await http.get(f"/api/graph/task/{task_id}")).json()["data"]
                assert got["cancel_requested"] is True

                # the producer's next report answers with the request ...
                patched = await http.patch(f"/api/tasks/{task_id}", json={"progress": 20})
                assert patched.status_code == 200 and patched.json()["data"]["cancel_requested"] is True
                # ... and it stops, ending the task as the protocol says
                ended = await http.patch(f"/api/tasks/{task_id}", json={"status": "failed", "error": "cancelled"})
                assert ended.status_code == 200
                final = ended.json()["data"]
                assert final["status"] == "failed" and final["error"] == CANCELLED
                assert final["cancel_requested"] is False  # only while the task is live
    # watchers saw the request announced, then the end
    assert [t["version"] for t in seen] == [2, 3, 4, 5]
    assert [t["cancel_requested"] for t in seen] == [False, True, True, False]
    assert seen[-1]["status"] == "failed" and seen[-1]["error"] == "cancelled"


async def test_cancel_a_pending_task_and_a_repeated_cancel(client):
    task_id = (await client.post("/api/tasks", json={"task_type": "x"})).json()["data"]["task_id"]
    first = await client.post(f"/api/tasks/{task_id}/cancel")
    again = await client.post(f"/api/tasks/{task_id}/cancel")
    assert first.status_code == again.status_code == 202
    assert first.json()["data"]["status"] == "pending" and again.json()["data"]["cancel_requested"] is True
    assert again.json()["data"]["version"] == first.json()["data"]["version"] + 1


async def test_cancelling_a_finished_task_is_409_and_changes_nothing(client):
    for ending in ({"status": "failed", "error": "boom"}, {"status": "completed"}):
        task_id = (await client.post("/api/tasks", json={"task_type": "x"})).json()["data"]["task_id"]
        if ending["status"] == "completed":
            await client.patch(f"/api/tasks/{task_id}", json={"status": "processing"})
        before = (await client.patch(f"/api/tasks/{task_id}", json=ending)).json()["data"]
        response = await client.post(f"/api/tasks/{task_id}/cancel")
        assert response.status_code == 409
        assert response.json()["success"] is False and response.json()["error"]
        assert (await client.get(f"/api/graph/task/{task_id}")).json()["data"] == before


@pytest.mark.parametrize("task_id", [str(uuid.uuid4()), "nope", str(uuid.uuid4()).upper()])
async def test_cancelling_an_unknown_task_is_404(client, task_id):
    response = await client.post(f"/api/tasks/{task_id}/cancel")
    assert response.status_code == 404
    assert response.json() == {"success": False, "error": "task not found"}


async def test_cancel_needs_the_api_token_when_one_is_set(settings):
    app = create_app(settings.with_changes(api_token="s3cret", read_token="r3ad"))
    async with running(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as http:
        task = app.state.manager.create_task("x")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer r3ad"}):
            refused = await http.post(f"/api/tasks/{task.task_id}/cancel", headers=headers)
            assert refused.status_code == 401 and refused.json()["success"] is False
        assert app.state.manager.get_task(task.task_id).cancel_requested is False
        ok = await http.post(f"/api/tasks/{task.task_id}/cancel", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 202


# ------------------------------------------------------------------------------ Python API and jobs


async def test_python_producer_gets_task_cancelled_at_its_next_report():
    manager = TaskManager(MemoryStore(), None)
    task = manager.create_task("import")
    manager.update_task(task.task_id, status="processing", progress=10)
    requested = manager.cancel_task(task.task_id)
    assert requested.cancel_requested is True and requested.version == 3
    with pytest.raises(TaskCancelled):
        manager.update_task(task.task_id, progress=20)
    assert manager.get_task(task.task_id).version == 3  # the refused report changed nothing
    failed = manager.fail_task(task.task_id, CANCELLED)
    assert failed.status is TaskStatus.FAILED and failed.error == "cancelled" and failed.cancel_requested is False
    with pytest.raises(TaskStateError):
        manager.cancel_task(task.task_id)


async def test_a_cancelled_producer_may_still_finish_its_own_way():
    manager = TaskManager(MemoryStore(), None)
    task = manager.create_task("import")
    manager.update_task(task.task_id, status="processing")
    manager.cancel_task(task.task_id)
    done = updated(manager, task.task_id, status="completed", result={"partial": False})
    assert done.status is TaskStatus.COMPLETED and done.cancel_requested is False


async def test_a_pool_job_ends_failed_cancelled_at_its_next_report():
    manager = TaskManager(MemoryStore(), EventBus())
    jobs = JobRunner(manager, workers=1)
    go = threading.Event()
    reports: list[int] = []

    def job(ctx: Any) -> dict[str, Any]:
        for step in range(1, 100):
            ctx.report(progress=step, message=f"step {step}")
            reports.append(step)
            go.wait(10)
        return {"finished": True}

    task = manager.create_task("job", owned=True)
    try:
        jobs.submit(task.task_id, job)
        await _wait_until(lambda: reports == [1])
        manager.cancel_task(task.task_id)
        go.set()
        await _wait_until(lambda: manager.get_task(task.task_id).is_terminal)
    finally:
        go.set()
        await anyio.to_thread.run_sync(jobs.shutdown)
    final = manager.get_task(task.task_id)
    assert final.status is TaskStatus.FAILED and final.error == "cancelled"
    assert reports == [1]  # it never reported past the cancel


# ------------------------------------------------------------------------------ graph build


class _GatedBackend(LocalBackend):
    """The local backend; ``submit_batch`` waits until the test opens the gate, and counts."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.gate = threading.Event()
        self.submitted = 0

    def submit_batch(self, graph_id: str, chunks: Sequence[str], retrier: Retrier) -> SubmittedBatch:
        self.submitted += 1
        self.gate.wait(10)
        return super().submit_batch(graph_id, chunks, retrier)


STORY = (
    "Marie Curie worked with Pierre Curie at the University of Paris. They studied radioactivity together.\n\n"
    "In 1903 Marie Curie won the Nobel Prize with Henri Becquerel. The University of Paris hired her in 1906.\n\n"
)


async def test_the_graph_build_stops_at_its_next_batch_and_ends_failed_cancelled(client):
    service = client.app.state.graph
    manager = client.app.state.manager
    service.backend = gated = _GatedBackend(service.settings.data_dir)
    try:
        project = await client.post("/api/graph/project", json={"name": "curie", "text": STORY * 60})
        project_id = project.json()["data"]["project_id"]
        build = await client.post("/api/graph/build", json={"project_id": project_id, "chunk_size": 120, "chunk_overlap": 20})
        assert build.status_code == 202
        task_id = build.json()["data"]["task_id"]
        await _wait_until(lambda: manager.get_task(task_id).progress_detail.get("phase") == "adding")
        assert manager.get_task(task_id).progress_detail["total_batches"] >= 3

        response = await client.post(f"/api/tasks/{task_id}/cancel")
        assert response.status_code == 202 and response.json()["data"]["cancel_requested"] is True
        gated.gate.set()
        await _wait_until(lambda: manager.get_task(task_id).is_terminal)
    finally:
        gated.gate.set()
    final = (await client.get(f"/api/graph/task/{task_id}")).json()["data"]
    assert final["status"] == "failed" and final["error"] == "cancelled" and final["cancel_requested"] is False
    assert gated.submitted == 1  # no batch after the cancel
    project = (await client.get(f"/api/graph/project/{project_id}")).json()["data"]
    assert project["status"] == "failed" and project["error"] == "cancelled"


# ------------------------------------------------------------------------------ the grace


async def test_a_producer_that_ignores_the_cancel_is_failed_after_the_grace():
    clock = FakeClock()
    manager = TaskManager(MemoryStore(), None, clock=clock, cancel_grace_s=60.0)
    task = manager.create_task("stubborn")
    manager.update_task(task.task_id, status="processing")
    other = manager.create_task("fine")
    manager.cancel_task(task.task_id)
    clock.advance(30)
    manager.patch_task(task.task_id, {"progress": 50})  # HTTP-style reports keep coming: not a stop
    clock.advance(29)
    assert manager.sweep() == {"lease": [], "cancel": [], "interrupted": []}
    clock.advance(2)
    assert manager.sweep() == {"lease": [], "cancel": [task.task_id], "interrupted": []}
    final = manager.get_task(task.task_id)
    assert final.status is TaskStatus.FAILED and final.error == "cancelled" and final.progress == 50
    assert manager.get_task(other.task_id).status is TaskStatus.PENDING
    assert manager.sweep() == {"lease": [], "cancel": [], "interrupted": []}


async def test_asking_again_does_not_extend_the_grace():
    clock = FakeClock()
    manager = TaskManager(MemoryStore(), None, clock=clock, cancel_grace_s=60.0)
    task = manager.create_task("stubborn")
    manager.cancel_task(task.task_id)
    clock.advance(50)
    manager.cancel_task(task.task_id)
    clock.advance(11)
    assert manager.sweep()["cancel"] == [task.task_id]


async def test_the_grace_setting_reaches_the_manager(settings):
    app = create_app(settings.with_changes(cancel_grace_s=5.0, stale_after_s=42.0))
    async with running(app):
        assert app.state.manager.cancel_grace_s == 5.0 and app.state.manager.stale_after_s == 42.0


async def test_a_graph_build_failed_by_the_grace_records_cancelled_on_its_project(client):
    service = client.app.state.graph
    manager = client.app.state.manager
    service.backend = gated = _GatedBackend(service.settings.data_dir)
    try:
        project = await client.post("/api/graph/project", json={"name": "curie", "text": STORY * 60})
        project_id = project.json()["data"]["project_id"]
        task_id = (await client.post("/api/graph/build", json={"project_id": project_id})).json()["data"]["task_id"]
        await _wait_until(lambda: manager.get_task(task_id).progress_detail.get("phase") == "adding")
        assert (await client.post(f"/api/tasks/{task_id}/cancel")).status_code == 202
        # the build is stuck in a backend call; the grace ends (the sweep, run as the monitor would, later)
        later = manager.get_task(task_id).updated_at + timedelta(seconds=manager.cancel_grace_s + 1)
        assert await anyio.to_thread.run_sync(manager.sweep, later) == {"lease": [], "cancel": [task_id], "interrupted": []}
        gated.gate.set()
        await _wait_until(lambda: service.projects.get(project_id)["status"] == "failed")
    finally:
        gated.gate.set()
    final = (await client.get(f"/api/graph/task/{task_id}")).json()["data"]
    assert final["status"] == "failed" and final["error"] == "cancelled"
    project = (await client.get(f"/api/graph/project/{project_id}")).json()["data"]
    assert project["status"] == "failed" and project["error"] == "cancelled"
    assert gated.submitted == 1
