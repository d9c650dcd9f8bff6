"""PROTOCOL.md's stream rules, checked on the bytes a real client receives from a real uvicorn."""

from __future__ import annotations

import inspect
import json
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from server.settings import Settings

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def serving(live_server: Any, settings: Settings, **changes: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    async with (
        live_server(settings.with_changes(**changes)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=httpx.Timeout(10)) as http,
    ):
        yield srv, http


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


async def collect(
    http: httpx.AsyncClient,
    url: str,
    *,
    stop: str | None = "end",
    react: Callable[[ServerSentEvent], Awaitable[None] | None] | None = None,
    **kw: Any,
) -> list[ServerSentEvent]:
    """Every event until ``stop`` (inclusive; None: until the server closes the stream).

    ``react(event)`` runs on each event as it arrives (sync or async), to change tasks mid-stream."""
    events: list[ServerSentEvent] = []
    with anyio.fail_after(10):
        async with aconnect_sse(http, "GET", url, **kw) as source:
            async for event in source.aiter_sse():
                if event.data == "":
                    continue  # a block without data (our opening `retry:`) dispatches no event (SSE spec)
                events.append(event)
                if react is not None:
                    outcome = react(event)
                    if inspect.isawaitable(outcome):
                        await outcome
                if event.event == stop:
                    break
    return events


def versions(events: list[ServerSentEvent]) -> list[int]:
    return [json.loads(e.data)["version"] for e in events if e.event == "task"]


class RawReader:
    """The raw bytes of a streaming response, read up to a marker under a deadline."""

    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.aiter_raw()
        self.buffer = b""

    async def until(self, marker: bytes, count: int = 1, timeout: float = 5.0) -> bytes:
        with anyio.fail_after(timeout):
            while self.buffer.count(marker) < count:
                try:
                    self.buffer += await self._chunks.__anext__()
                except StopAsyncIteration:
                    raise AssertionError(f"stream closed before {marker!r}; got {self.buffer!r}") from None
        return self.buffer

    async def to_end(self, timeout: float = 5.0) -> bytes:
        with anyio.fail_after(timeout):
            async for chunk in self._chunks:
                self.buffer += chunk
        return self.buffer


async def test_stream_opens_with_retry_then_snapshot(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        task = srv.manager.create_task("demo", {"k": "v"})
        async with http.stream("GET", f"/tasks/{task.task_id}/stream") as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert response.headers["cache-control"] == "no-store"
            assert response.headers["x-accel-buffering"] == "no"
            assert "content-encoding" not in response.headers
            raw = await RawReader(response).until(b"\n\n", count=2)
        retry, first = raw.split(b"\n\n")[:2]
        assert retry == b"retry: 1500"
        lines = first.split(b"\n")
        assert lines[0] == b"id: 1"
        assert lines[1] == b"event: task"
        assert lines[2].startswith(b"data: ")
        assert json.loads(lines[2][6:]) == task.to_dict()


async def test_every_change_in_order_then_end_and_close(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        created = (await http.post("/api/tasks", json={"task_type": "demo"})).json()["data"]
        tid = created["task_id"]

        async def produce(event: ServerSentEvent) -> None:
            if event.event == "task" and event.id == "1":
                await http.patch(f"/api/tasks/{tid}", json={"status": "processing", "progress": 10})
                await http.patch(f"/api/tasks/{tid}", json={"progress": 50, "message": "half"})
                await http.patch(f"/api/tasks/{tid}", json={"status": "completed", "result": {"n": 1}})

        # stop=None: collecting ends only because the server closes the stream after `end`
        events = await collect(http, f"/tasks/{tid}/stream", stop=None, react=produce)
        assert [e.event for e in events] == ["task", "task", "task", "task", "end"]
        assert [e.id for e in events[:4]] == ["1", "2", "3", "4"]
        assert versions(events) == [1, 2, 3, 4]
        final = json.loads(events[3].data)
        assert final["status"] == "completed" and final["result"] == {"n": 1} and final["progress"] == 100
        assert json.loads(events[4].data) == {"task_id": created["task_id"], "status": "completed"}
        assert events[4].id == "4"  # `end` carries no id of its own: the last event id stays the terminal version


async def test_reconnect_at_terminal_version_is_204(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        task = srv.manager.create_task("demo")
        srv.manager.fail_task(task.task_id, "boom")
        response = await http.get(f"/tasks/{task.task_id}/stream", headers={"Last-Event-ID": "2"})
        assert response.status_code == 204
        assert response.content == b""
        # an older id still gets the terminal snapshot and the end event
        events = await collect(http, f"/tasks/{task.task_id}/stream", headers={"Last-Event-ID": "1"})
        assert versions(events) == [2]
        assert events[-1].event == "end"


async def test_last_event_id_replays_what_is_held(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        manager = srv.manager
        task = manager.create_task("demo")
        manager.update_task(task.task_id, status="processing")
        for progress in (10, 20, 30, 40):
            manager.update_task(task.task_id, progress=progress)
        manager.complete_task(task.task_id, {"ok": True})  # version 7
        events = await collect(http, f"/tasks/{task.task_id}/stream", headers={"Last-Event-ID": "2"})
        assert versions(events) == [3, 4, 5, 6, 7]
        assert events[-1].event == "end"
        by_query = await collect(http, f"/tasks/{task.task_id}/stream?last_event_id=5")
        assert versions(by_query) == [6, 7]
        header_wins = await collect(
            http, f"/tasks/{task.task_id}/stream?last_event_id=1", headers={"Last-Event-ID": "6"}
        )
        assert versions(header_wins) == [7]


@pytest.mark.parametrize("bad", ["abc", "999", "-1", "", "3.5"])
async def test_unusable_last_event_id_starts_from_snapshot(live_server, settings, bad):
    async with serving(live_server, settings) as (srv, http):
        task = srv.manager.create_task("demo")
        srv.manager.update_task(task.task_id, status="processing")
        srv.manager.fail_task(task.task_id, "stop")
        events = await collect(http, f"/tasks/{task.task_id}/stream", headers={"Last-Event-ID": bad})
        assert versions(events) == [3]


async def test_history_is_bounded_then_snapshot(live_server, settings):
    async with serving(live_server, settings, history=3) as (srv, http):
        task = srv.manager.create_task("demo")
        srv.manager.update_task(task.task_id, status="processing")
        for progress in range(1, 8):
            srv.manager.update_task(task.task_id, progress=progress)
        srv.manager.complete_task(task.task_id)  # version 10; history holds 8, 9, 10
        replay = await collect(http, f"/tasks/{task.task_id}/stream", headers={"Last-Event-ID": "7"})
        assert versions(replay) == [8, 9, 10]
        too_old = await collect(http, f"/tasks/{task.task_id}/stream", headers={"Last-Event-ID": "2"})
        assert versions(too_old) == [10]


async def test_no_gap_between_snapshot_and_changes(live_server, settings):
    """Changes made from a thread while streams are being set up are all seen, none twice."""
    async with serving(live_server, settings) as (srv, http):
        manager = srv.manager
        task = manager.create_task("demo")
        manager.update_task(task.task_id, status="processing")
        stop = threading.Event()

        def produce() -> None:
            progress = 0
            while not stop.is_set() and progress < 100:
                progress += 1
                manager.update_task(task.task_id, progress=progress)
            manager.complete_task(task.task_id)

        thread = threading.Thread(target=produce)
        thread.start()
        try:
            results = []
            for _ in range(5):
                results.append(await collect(http, f"/tasks/{task.task_id}/stream"))
        finally:
            stop.set()
            thread.join()
        for events in results:
            seen = versions(events)
            assert seen == sorted(set(seen)), seen
            assert json.loads([e for e in events if e.event == "task"][-1].data)["status"] == "completed"


async def test_unknown_or_malformed_task_is_404_json(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        for path in ("/tasks/8f14e45f-ceea-4e67-a2cb-5d1f0e0e7a11/stream", "/tasks/not-a-uuid/stream"):
            response = await http.get(path)
            assert response.status_code == 404
            assert response.headers["content-type"].startswith("application/json")
            assert response.json() == {"success": False, "error": "task not found"}


async def test_head_answers_headers_and_does_not_hold(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        task = srv.manager.create_task("demo")
        with anyio.fail_after(3):
            response = await http.head(f"/tasks/{task.task_id}/stream")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.content == b""
        await wait_for(lambda: srv.manager.bus.open_streams == 0)


async def test_other_methods_are_405_json(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        task = srv.manager.create_task("demo")
        response = await http.post(f"/tasks/{task.task_id}/stream")
        assert response.status_code == 405
        assert response.json()["success"] is False
        assert "GET" in response.headers["allow"]


async def test_heartbeat_when_quiet(live_server, settings):
    async with serving(live_server, settings, heartbeat_s=0.2) as (srv, http):
        task = srv.manager.create_task("demo")
        async with http.stream("GET", f"/tasks/{task.task_id}/stream") as response:
            raw = await RawReader(response).until(b": ping\n\n", timeout=3)
        assert raw.startswith(b"retry: 1500\n\n")


async def test_read_token_guards_streams(live_server, settings):
    async with serving(live_server, settings, read_token="r3ad") as (srv, http):
        task = srv.manager.create_task("demo")
        srv.manager.fail_task(task.task_id, "x")
        denied = await http.get(f"/tasks/{task.task_id}/stream")
        assert denied.status_code == 401 and denied.json()["success"] is False
        assert "r3ad" not in denied.text
        by_query = await collect(http, f"/tasks/{task.task_id}/stream?access_token=r3ad")
        assert versions(by_query) == [2]
        by_header = await collect(http, f"/tasks/{task.task_id}/stream", headers={"Authorization": "Bearer r3ad"})
        assert versions(by_header) == [2]


async def test_max_streams_gives_503_with_retry_after(live_server, settings):
    async with serving(live_server, settings, max_streams=2) as (srv, http):
        task = srv.manager.create_task("demo")
        async with http.stream("GET", f"/tasks/{task.task_id}/stream"), http.stream("GET", "/tasks/stream"):
            await wait_for(lambda: srv.manager.bus.open_streams == 2)
            refused = await http.get(f"/tasks/{task.task_id}/stream")
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["success"] is False
        await wait_for(lambda: srv.manager.bus.open_streams == 0)
        events = await collect(http, f"/tasks/{task.task_id}/stream", stop="task")
        assert versions(events) == [1]


async def _metric(http: httpx.AsyncClient, line_prefix: str) -> float:
    text = (await http.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix))


async def test_dropped_clients_leave_no_subscriber(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        task = srv.manager.create_task("demo")
        ports: list[socket.socket] = []
        request = f"GET /tasks/{task.task_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        for index in range(200):
            sock = socket.create_connection(("127.0.0.1", srv.settings.port))
            path = request if index % 2 else b"GET /tasks/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            sock.sendall(path)
            ports.append(sock)
        await wait_for(lambda: srv.manager.bus.open_streams == 200, timeout=10)
        assert await _metric(http, "taskmon_subscribers") == 200
        for sock in ports:
            sock.close()
        await wait_for(lambda: srv.manager.bus.open_streams == 0, timeout=10)
        assert await _metric(http, "taskmon_subscribers") == 0
        # a change after the drop reaches nobody and breaks nothing
        srv.manager.update_task(task.task_id, progress=1)
        assert (await http.get(f"/api/graph/task/{task.task_id}")).json()["data"]["version"] == 2


async def test_slow_reader_neither_delays_others_nor_grows(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        manager = srv.manager
        task = manager.create_task("demo")
        manager.update_task(task.task_id, status="processing")
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", srv.settings.port))
        stalled.sendall(f"GET /tasks/{task.task_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await wait_for(lambda: manager.bus.open_streams == 1)
        pad = "x" * 2000  # 10,000 x ~2.3 KB: far more than the socket buffers hold, so the reader stalls
        last = 2 + 10_000
        try:
            seen: list[int] = []
            with anyio.fail_after(60):
                async with aconnect_sse(http, "GET", f"/tasks/{task.task_id}/stream") as source:
                    thread: threading.Thread | None = None
                    async for event in source.aiter_sse():
                        if event.event != "task":
                            continue
                        seen.append(int(event.id))
                        if thread is None:

                            def produce() -> None:
                                for i in range(10_000):
                                    manager.update_task(task.task_id, progress=i % 100, message=pad)

                            thread = threading.Thread(target=produce)
                            thread.start()
                        if seen[-1] == last:
                            break
                    assert thread is not None
                    thread.join()
                    # the fast reader got the newest state while the stalled one is still open
                    assert manager.bus.open_streams == 2
                    buffers = [len(s.events) for s in manager.bus.subscribers()]
                    assert max(buffers) <= settings.queue_size
                    assert manager.bus.coalesced > 0
            assert seen == sorted(set(seen))
        finally:
            stalled.close()
        await wait_for(lambda: manager.bus.open_streams == 0, timeout=10)


async def test_threads_and_readers_agree(live_server, settings):
    """8 threads x 1,000 updates while 20 readers follow: no lost or doubled change, ordered streams."""
    async with serving(live_server, settings) as (srv, http):
        manager = srv.manager
        task = manager.create_task("demo")
        manager.update_task(task.task_id, status="processing")
        accepted = 0
        lock = threading.Lock()

        def work() -> None:
            nonlocal accepted
            for i in range(1000):
                manager.update_task(task.task_id, progress=i % 101, progress_detail={"i": i})
                with lock:
                    accepted += 1

        results: dict[int, list[int]] = {}
        finals: dict[int, dict[str, Any]] = {}

        async def reader(n: int) -> None:
            events = await collect(http, f"/tasks/{task.task_id}/stream")
            results[n] = versions(events)
            finals[n] = json.loads([e for e in events if e.event == "task"][-1].data)

        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(reader, n)
            await wait_for(lambda: manager.bus.open_streams == 20)
            threads = [threading.Thread(target=work) for _ in range(8)]
            for thread in threads:
                thread.start()
            await anyio.to_thread.run_sync(lambda: [t.join() for t in threads])
            manager.complete_task(task.task_id, {"done": True})
        final_version = 1 + 1 + accepted + 1  # created, processing, updates, completed
        assert accepted == 8000
        assert manager.get_task(task.task_id).version == final_version
        for n in range(20):
            seen = results[n]
            assert all(a < b for a, b in zip(seen, seen[1:])), f"reader {n} out of order"
            assert seen[-1] == final_version
            assert finals[n]["status"] == "completed"


async def test_all_tasks_stream(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        manager = srv.manager
        existing = manager.create_task("import")
        created = []

        def produce(event: ServerSentEvent) -> None:
            if event.event == "snapshot":
                created.append(new := manager.create_task("graph_build"))
                manager.update_task(new.task_id, status="processing", progress=5)
                manager.update_task(existing.task_id, status="failed", error="x")
                manager.cleanup_old_tasks(0)

        events = await collect(http, "/tasks/stream", stop="removed", react=produce)
        (new,) = created
        snapshot = json.loads(events[0].data)
        assert [t["task_id"] for t in snapshot["tasks"]] == [existing.task_id]
        kinds = [(e.event, json.loads(e.data).get("task_id")) for e in events[1:]]
        assert kinds == [
            ("task", new.task_id),
            ("task", new.task_id),
            ("task", existing.task_id),
            ("removed", existing.task_id),
        ]
        assert all(e.id in ("", None) for e in events)  # no ids: a reconnect starts from a snapshot


async def test_all_tasks_stream_filters(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        manager = srv.manager
        other = manager.create_task("import")
        mine = manager.create_task("graph_build")

        def produce(event: ServerSentEvent) -> None:
            if event.event == "snapshot":
                manager.update_task(other.task_id, status="processing")  # wrong type: unseen
                manager.update_task(mine.task_id, status="processing")  # moves in
                manager.update_task(mine.task_id, progress=50)
                manager.update_task(mine.task_id, status="failed", error="e")  # moves out

        events = await collect(
            http, "/tasks/stream?status=processing&task_type=graph_build", stop="removed", react=produce
        )
        assert json.loads(events[0].data) == {"tasks": [], "counts": {"pending": 1, "processing": 0, "completed": 0, "failed": 0}, "next_cursor": None}
        seen = [(e.event, json.loads(e.data)) for e in events[1:]]
        assert [kind for kind, _ in seen] == ["task", "task", "removed"]
        assert [data["version"] for kind, data in seen if kind == "task"] == [2, 3]
        assert seen[-1][1] == {"task_id": mine.task_id}


@pytest.mark.parametrize("query", ["status=done", "limit=0", "status=", "sort=sideways", "follow=nope"])
async def test_all_tasks_stream_rejects_bad_filters(live_server, settings, query):
    async with serving(live_server, settings) as (srv, http):
        response = await http.get(f"/tasks/stream?{query}")
        assert response.status_code == 400
        assert response.json()["success"] is False
        assert srv.manager.bus.open_streams == 0


async def test_retention_runs_by_itself_and_announces_removal(live_server, settings):
    async with serving(live_server, settings, retention_hours=0.5 / 3600, cleanup_interval_s=0.1) as (srv, http):
        task = srv.manager.create_task("demo")
        srv.manager.fail_task(task.task_id, "old")
        events = await collect(http, "/tasks/stream", stop="removed")
        assert events[-1].event == "removed"
        assert json.loads(events[-1].data) == {"task_id": task.task_id}
        assert (await http.get(f"/api/graph/task/{task.task_id}")).status_code == 404


async def test_stop_ends_open_streams_promptly(live_server, settings):
    async with live_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        task = srv.manager.create_task("demo")
        async with http.stream("GET", f"/tasks/{task.task_id}/stream") as response:
            reader = RawReader(response)
            await reader.until(b"id: 1\n")
            with anyio.fail_after(3):
                await srv.stop()
                await reader.to_end()  # the server finished the response: the stream ends cleanly


async def test_in_process_stream_of_finished_task(client):
    """The ASGI app alone (no server): a finished task's stream is snapshot, end, close."""
    created = (await client.post("/api/tasks", json={"task_type": "demo"})).json()["data"]
    tid = created["task_id"]
    await client.patch(f"/api/tasks/{tid}", json={"status": "failed", "error": "bad input"})
    with anyio.fail_after(5):
        response = await client.get(f"/tasks/{tid}/stream")
    assert response.status_code == 200
    body = response.text
    assert body.startswith("retry: 1500\n\nid: 2\nevent: task\ndata: ")
    assert body.endswith(f'event: end\ndata: {{"task_id":"{tid}","status":"failed"}}\n\n')
    assert client.app.state.manager.bus.open_streams == 0
