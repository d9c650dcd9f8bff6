"""The durable per-task event log (PROTOCOL v1.1): Last-Event-ID replay across a real restart (sqlite),
``GET /api/tasks/{id}/events`` paging and errors, the TASKMON_HISTORY bound, and a long replay sent in
pages under back-pressure."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import TASK_KEYS, running
from httpx_sse import aconnect_sse

from server.app import create_app
from server.manager import REPLAY_PAGE
from server.settings import Settings
from server.streams import OPENING_CHUNK

pytestmark = pytest.mark.anyio


def _sqlite(settings: Settings, tmp_path: Path, **changes: Any) -> Settings:
    return settings.with_changes(store_url=f"sqlite:///{tmp_path / 'tasks.db'}", **changes)


async def _patch(http: httpx.AsyncClient, task_id: str, **body: Any) -> str:
    """PATCH, returning the task JSON exactly as the response carried it."""
    response = await http.patch(f"/api/tasks/{task_id}", json=body)
    assert response.status_code == 200, response.text
    return json.dumps(response.json()["data"], ensure_ascii=False, separators=(",", ":"))


async def _read_stream(url: str, task_id: str, last_event_id: str | None) -> list[tuple[str, str | None, str]]:
    """(event, id, data) of a per-task stream until its ``end``."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    out: list[tuple[str, str | None, str]] = []
    async with (
        httpx.AsyncClient(base_url=url, timeout=10) as http,
        aconnect_sse(http, "GET", f"/tasks/{task_id}/stream", headers=headers) as source,
    ):
        assert source.response.status_code == 200
        async for event in source.aiter_sse():
            out.append((event.event, event.id or None, event.data))
            if event.event == "end":
                return out
    raise AssertionError("the stream closed without an end event")


# ------------------------------------------------------------------------------ restart


async def test_replay_after_a_restart_sends_exactly_the_missed_events(live_server, settings, tmp_path):
    async with live_server(_sqlite(settings, tmp_path)) as srv:
        with anyio.fail_after(30):
            async with httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
                created = (await http.post("/api/tasks", json={"task_type": "import"})).json()["data"]
                task_id = created["task_id"]
                await _patch(http, task_id, status="processing", message="started")
                seen = await _patch(http, task_id, progress=10)  # the watcher saw up to version 3
                missed = [await _patch(http, task_id, progress=20), await _patch(http, task_id, progress=30)]

            await srv.stop()
            await srv.start()  # a new process's app on the same sqlite file

            async with httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
                after = (await http.get(f"/api/graph/task/{task_id}")).json()["data"]
                assert after["version"] == 5 and after["status"] == "processing"  # a producer's task stays
                missed.append(await _patch(http, task_id, progress=40, message="after the restart"))
                events = (await http.get(f"/api/tasks/{task_id}/events")).json()
                assert [t["version"] for t in events["data"]] == [1, 2, 3, 4, 5, 6]
                assert events["data"][2] == json.loads(seen)
                final = None

                async def finish_when_replayed() -> None:
                    nonlocal final
                    while srv.manager.bus.open_streams < 1:
                        await anyio.sleep(0.01)
                    final = await _patch(http, task_id, status="completed", result={"rows": 4})

                async with anyio.create_task_group() as tg:
                    tg.start_soon(finish_when_replayed)
                    frames = await _read_stream(srv.url, task_id, "3")
    tasks = [(event_id, data) for kind, event_id, data in frames if kind == "task"]
    assert [event_id for event_id, _ in tasks] == ["4", "5", "6", "7"]  # nothing before, nothing twice
    assert [data for _, data in tasks] == [*missed, final]  # byte for byte what the PATCHes answered
    assert frames[-1][0] == "end" and json.loads(frames[-1][2]) == {"task_id": task_id, "status": "completed"}


async def test_a_finished_task_replays_after_a_restart_then_204(live_server, settings, tmp_path):
    async with live_server(_sqlite(settings, tmp_path)) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
            task_id = (await http.post("/api/tasks", json={"task_type": "x"})).json()["data"]["task_id"]
            await _patch(http, task_id, status="processing")
            await _patch(http, task_id, status="failed", error="boom")
        await srv.stop()
        await srv.start()
        with anyio.fail_after(15):
            frames = await _read_stream(srv.url, task_id, "1")
            assert [i for k, i, _ in frames if k == "task"] == ["2", "3"]
            async with httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
                done = await http.get(f"/tasks/{task_id}/stream", headers={"Last-Event-ID": "3"})
        assert done.status_code == 204


# ------------------------------------------------------------------------------ the endpoint


async def test_events_endpoint_pages_with_after_and_limit(client):
    task_id = (await client.post("/api/tasks", json={"task_type": "x"})).json()["data"]["task_id"]
    await client.patch(f"/api/tasks/{task_id}", json={"status": "processing"})
    for progress in range(10, 100, 10):
        await client.patch(f"/api/tasks/{task_id}", json={"progress": progress, "message": f"at {progress}"})
    current = (await client.get(f"/api/graph/task/{task_id}")).json()["data"]
    assert current["version"] == 11

    pages, after = [], 0
    while after is not None:
        response = await client.get(f"/api/tasks/{task_id}/events", params={"after": after, "limit": 4})
        assert response.status_code == 200
        body = response.json()
        assert body["success"] is True and list(body) == ["success", "data", "next_after"]
        pages.append([t["version"] for t in body["data"]])
        after = body["next_after"]
    assert pages == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]

    whole = (await client.get(f"/api/tasks/{task_id}/events")).json()
    assert whole["next_after"] is None and [t["version"] for t in whole["data"]] == list(range(1, 12))
    assert all(list(t) == TASK_KEYS for t in whole["data"])
    assert whole["data"][-1] == current
    assert [t["message"] for t in whole["data"][2:]] == [f"at {p}" for p in range(10, 100, 10)]
    exact = (await client.get(f"/api/tasks/{task_id}/events", params={"after": 7, "limit": 4})).json()
    assert [t["version"] for t in exact["data"]] == [8, 9, 10, 11] and exact["next_after"] is None
    beyond = (await client.get(f"/api/tasks/{task_id}/events", params={"after": 11})).json()
    assert beyond == {"success": True, "data": [], "next_after": None}


@pytest.mark.parametrize("task_id", [str(uuid.uuid4()), "not-a-task", str(uuid.uuid4()).upper()])
async def test_events_of_an_unknown_task_is_404(client, task_id):
    response = await client.get(f"/api/tasks/{task_id}/events")
    assert response.status_code == 404
    assert response.json() == {"success": False, "error": "task not found"}


@pytest.mark.parametrize(
    "params",
    [{"after": "x"}, {"after": "-1"}, {"after": "1.5"}, {"after": ""}, {"after": "9" * 30}, {"limit": "0"},
     {"limit": "1001"}, {"limit": "many"}, {"before": "3"}],
)
async def test_bad_events_queries_are_400(client, params):
    task_id = (await client.post("/api/tasks", json={"task_type": "x"})).json()["data"]["task_id"]
    response = await client.get(f"/api/tasks/{task_id}/events", params=params)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["success"] is False and body["error"]


async def test_events_need_the_read_token(settings):
    app = create_app(settings.with_changes(read_token="r3ad"))
    async with running(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as http:
        task = app.state.manager.create_task("x")
        assert (await http.get(f"/api/tasks/{task.task_id}/events")).status_code == 401
        ok = await http.get(f"/api/tasks/{task.task_id}/events", headers={"Authorization": "Bearer r3ad"})
        assert ok.status_code == 200 and len(ok.json()["data"]) == 1


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_the_log_is_bounded_by_history_oldest_out(settings, tmp_path, store):
    changed = _sqlite(settings, tmp_path, history=5) if store == "sqlite" else settings.with_changes(history=5)
    app = create_app(changed)
    async with running(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as http:
        task_id = (await http.post("/api/tasks", json={"task_type": "x"})).json()["data"]["task_id"]
        for progress in range(1, 11):
            await http.patch(f"/api/tasks/{task_id}", json={"progress": progress})
        held = (await http.get(f"/api/tasks/{task_id}/events")).json()["data"]
        assert [t["version"] for t in held] == [7, 8, 9, 10, 11]
        assert [t["progress"] for t in held] == [6, 7, 8, 9, 10]
        # a Last-Event-ID older than the log starts from the snapshot instead (no gap is papered over)
        await http.patch(f"/api/tasks/{task_id}", json={"status": "failed", "error": "stop"})
        with anyio.fail_after(10):
            text = (await http.get(f"/tasks/{task_id}/stream", headers={"Last-Event-ID": "2"})).text
            replay = (await http.get(f"/tasks/{task_id}/stream", headers={"Last-Event-ID": "8"})).text
    assert [line[4:] for line in text.splitlines() if line.startswith("id: ")] == ["12"]
    assert [line[4:] for line in replay.splitlines() if line.startswith("id: ")] == ["9", "10", "11", "12"]


# ------------------------------------------------------------------------------ long replays


def _fill(manager: Any, versions: int, size: int) -> str:
    """A task with ``versions`` versions whose snapshots are ``size``-ish bytes each, finished."""
    task = manager.create_task("big", {"note": "n" * 100})
    manager.update_task(task.task_id, status="processing")
    for number in range(3, versions):
        manager.update_task(task.task_id, progress=number * 99 // versions, progress_detail={"blob": f"{number:05d}" + "x" * size})
    manager.complete_task(task.task_id, {"versions": versions})
    return task.task_id


def _count_pages(manager: Any) -> list[int]:
    calls: list[int] = []
    original = manager.replay_more

    async def counted(subscription: Any) -> Any:
        calls.append(subscription.last_version)
        return await original(subscription)

    manager.replay_more = counted
    return calls


async def test_a_long_replay_goes_out_page_by_page_as_the_client_reads(settings):
    """Driven through the ASGI interface with a ``send`` the test holds: while the client has not
    taken a page, the stream reads no further page from the store."""
    app = create_app(settings.with_changes(history=256, history_kb=64 * 1024))
    async with running(app):
        manager = app.state.manager
        task_id = _fill(manager, 256, 20_000)
        calls = _count_pages(manager)
        chunks: list[bytes] = []
        permits = anyio.Semaphore(0)
        disconnected = anyio.Event()

        async def receive() -> dict[str, Any]:
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                await permits.acquire()  # the client reads one chunk per permit
                chunks.append(message["body"])

        scope = {
            "type": "http",
            "method": "GET",
            "path": f"/tasks/{task_id}/stream",
            "query_string": b"",
            "headers": [(b"host", b"localhost"), (b"last-event-id", b"0")],
        }
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(app, scope, receive, send)
                pages = -(-256 // REPLAY_PAGE)
                per_chunk = OPENING_CHUNK // 20_000 + 1  # events in one write, at most
                while not (chunks and b"event: end" in chunks[-1]):
                    await anyio.wait_all_tasks_blocked()
                    taken = b"".join(chunks).count(b"id: ")
                    # the next page is read only once the client has taken (nearly) all of this one
                    assert len(calls) * REPLAY_PAGE <= taken + per_chunk, (len(calls), taken)
                    permits.release()
                await anyio.wait_all_tasks_blocked()
                assert len(calls) == pages - 1
                disconnected.set()
    text = b"".join(chunks).decode()
    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    assert ids == list(range(1, 257))
    assert text.rstrip().endswith(json.dumps({"task_id": task_id, "status": "completed"}, separators=(",", ":")))
    assert max(len(c) for c in chunks) < OPENING_CHUNK + 21_000  # a piece, never the whole history


async def test_a_long_replay_over_a_real_server_arrives_whole_and_in_order(live_server, settings, tmp_path):
    async with live_server(_sqlite(settings, tmp_path, history=256)) as srv:
        task_id = _fill(srv.manager, 300, 20_000)  # more than the history holds: the log keeps the last 256
        srv.manager.store.flush()
        calls = _count_pages(srv.manager)
        with anyio.fail_after(30):
            frames = await _read_stream(srv.url, task_id, "44")  # the first version still held is 45
    tasks = [json.loads(data) for kind, _i, data in frames if kind == "task"]
    assert [t["version"] for t in tasks] == list(range(45, 301))
    assert all(t["progress_detail"]["blob"].startswith(f"{t['version']:05d}") for t in tasks[:-1])
    assert tasks[-1]["status"] == "completed" and frames[-1][0] == "end"
    assert len(calls) == -(-256 // REPLAY_PAGE) - 1
