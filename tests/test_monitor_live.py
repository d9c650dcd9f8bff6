"""The server's monitor loop on a real server: ``event: stale`` on both kinds of stream and the recovery,
computed ``stale`` in snapshots, and the lease and cancel grace decided by the loop (tiny thresholds,
every wait a condition under a deadline)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

pytestmark = pytest.mark.anyio


async def _pump(http: httpx.AsyncClient, path: str, name: str, out: Any) -> None:
    async with aconnect_sse(http, "GET", path) as source:
        assert source.response.status_code == 200
        async for event in source.aiter_sse():
            if event.data:  # (the opening `retry:` alone is no event)
                await out.send((name, event.event, json.loads(event.data)))


async def _next(inbox: Any, name: str, pending: dict[str, list]) -> tuple[str, dict]:
    """The next (event, data) of stream ``name`` (events of the other stream are kept for later)."""
    while not pending[name]:
        source, kind, data = await inbox.receive()
        pending[source].append((kind, data))
    return pending[name].pop(0)


async def test_stale_is_announced_on_both_streams_and_recovers(live_server, settings):
    fast = settings.with_changes(stale_after_s=0.3, monitor_interval_s=0.05)
    async with live_server(fast) as srv, httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
        task_id = (await http.post("/api/tasks", json={"task_type": "quiet"})).json()["data"]["task_id"]
        send, inbox = anyio.create_memory_object_stream[tuple[str, str, dict]](100)
        pending: dict[str, list] = {"one": [], "all": []}
        with anyio.fail_after(15), send, inbox:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_pump, http, f"/tasks/{task_id}/stream", "one", send)
                tg.start_soon(_pump, http, "/tasks/stream", "all", send)
                assert await _next(inbox, "one", pending) == ("task", (await http.get(f"/api/graph/task/{task_id}")).json()["data"])
                assert (await _next(inbox, "all", pending))[0] == "snapshot"
                patched = (await http.patch(f"/api/tasks/{task_id}", json={"status": "processing"})).json()["data"]
                for name in ("one", "all"):
                    event = await _next(inbox, name, pending)
                    while event[0] == "stale":  # (a slow machine may see the new task go stale first)
                        event = await _next(inbox, name, pending)
                    assert event == ("task", patched)

                # quiet for longer than TASKMON_STALE_AFTER_S: announced on both streams, no id, no version bump
                stale = ("stale", {"task_id": task_id, "stale": True})
                for name in ("one", "all"):
                    assert await _next(inbox, name, pending) == stale
                got = (await http.get(f"/api/graph/task/{task_id}")).json()["data"]
                assert got["stale"] is True and got["version"] == patched["version"]
                listed = (await http.get("/api/graph/tasks")).json()["data"]
                assert [t["stale"] for t in listed] == [True]
                async with aconnect_sse(http, "GET", "/tasks/stream") as source:  # a late watcher's snapshot
                    events = source.aiter_sse()
                    first = await events.__anext__()
                    while not first.data:
                        first = await events.__anext__()
                    assert first.event == "snapshot"
                    assert [t["stale"] for t in json.loads(first.data)["tasks"]] == [True]

                # the next change: the recovery first, then the change
                moved = (await http.patch(f"/api/tasks/{task_id}", json={"progress": 30})).json()["data"]
                assert moved["stale"] is False
                for name in ("one", "all"):
                    assert await _next(inbox, name, pending) == ("stale", {"task_id": task_id, "stale": False})
                    assert await _next(inbox, name, pending) == ("task", moved)
                tg.cancel_scope.cancel()


async def test_the_monitor_fails_an_expired_lease_and_an_ignored_cancel(live_server, settings):
    fast = settings.with_changes(cancel_grace_s=0.2, monitor_interval_s=0.05)
    async with live_server(fast) as srv, httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
        leased = (await http.post("/api/tasks", json={"task_type": "x", "lease_s": 0.3})).json()["data"]["task_id"]
        ignored = (await http.post("/api/tasks", json={"task_type": "x"})).json()["data"]["task_id"]
        kept = (await http.post("/api/tasks", json={"task_type": "x"})).json()["data"]["task_id"]
        assert (await http.post(f"/api/tasks/{ignored}/cancel")).status_code == 202
        ends: dict[str, dict] = {}
        with anyio.fail_after(15):
            for task_id in (leased, ignored):
                async with aconnect_sse(http, "GET", f"/tasks/{task_id}/stream") as source:
                    async for event in source.aiter_sse():
                        if event.event == "task":
                            ends[task_id] = json.loads(event.data)
                        elif event.event == "end":
                            break
        assert ends[leased]["status"] == "failed" and ends[leased]["error"] == "no update for 0.3 s"
        assert ends[ignored]["status"] == "failed" and ends[ignored]["error"] == "cancelled"
        assert (await http.get(f"/api/graph/task/{kept}")).json()["data"]["status"] == "pending"
