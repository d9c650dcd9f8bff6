"""The listing, counts and all-tasks stream parameters over HTTP: parsing, 400s naming the parameter,
cursors, counts semantics, and the filtered stream (snapshot page, counts, follow) on a real server."""

from __future__ import annotations

import json

import httpx
import pytest
from httpx_sse import ServerSentEvent
from conftest import updated
from test_api import assert_error, create
from test_streams import collect, serving

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"status": "done"}, "status"),
        ({"status": "pending,,failed"}, "status"),
        ({"sort": "newest"}, "sort"),
        ({"limit": "0"}, "limit"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_before": "2026-01-01T00:00:00"}, "created_before"),  # no UTC offset
        ({"updated_after": "2026-13-01T00:00:00Z"}, "updated_after"),
        ({"updated_before": "x"}, "updated_before"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"q": "x" * 201}, "q"),
        ({"colour": "red"}, "colour"),
    ],
)
@pytest.mark.parametrize("path", ["/api/graph/tasks", "/api/tasks/counts"])
async def test_bad_parameters_are_400_naming_the_parameter(client, params, named, path):
    message = assert_error(await client.get(path, params=params), 400)
    assert named in message


async def test_a_cursor_from_another_sort_is_400(client):
    for _ in range(3):
        await create(client)
    first = (await client.get("/api/graph/tasks", params={"sort": "-updated", "limit": 1})).json()
    assert first["next_cursor"]
    response = await client.get("/api/graph/tasks", params={"sort": "created", "cursor": first["next_cursor"]})
    assert "cursor" in assert_error(response, 400)


async def test_listing_pages_through_every_task_with_the_cursor(client):
    made = [(await create(client, "import_csv", metadata={"n": i}))["task_id"] for i in range(7)]
    seen: list[str] = []
    params: dict[str, str | int] = {"limit": 3, "sort": "created", "q": "import"}
    while True:
        body = (await client.get("/api/graph/tasks", params=params)).json()
        assert body["count"] == len(body["data"]) <= 3
        seen += [t["task_id"] for t in body["data"]]
        if body["next_cursor"] is None:
            break
        params["cursor"] = body["next_cursor"]
    assert seen == made


async def test_search_is_case_insensitive_over_type_message_error_metadata_and_id_prefix(client):
    a = await create(client, "IMPORT_CSV", metadata={"customer": {"name": "Globex Corp"}})
    b = await create(client, "resize")
    await client.patch(f"/api/tasks/{b['task_id']}", json={"status": "processing", "message": "Reading Sheet 3"})
    c = await create(client, "mail")
    await client.patch(f"/api/tasks/{c['task_id']}", json={"status": "failed", "error": "SMTP Refused"})

    async def found(q: str) -> set[str]:
        body = (await client.get("/api/graph/tasks", params={"q": q})).json()
        return {t["task_id"] for t in body["data"]}

    assert await found("import") == {a["task_id"]}
    assert await found("globex corp") == {a["task_id"]}
    assert await found("SHEET 3") == {b["task_id"]}
    assert await found("smtp refused") == {c["task_id"]}
    assert await found(c["task_id"][:8]) == {c["task_id"]}
    assert await found(c["task_id"][10:20]) == set()  # ids match by prefix only
    assert await found("nothing like it") == set()


async def test_counts_take_every_filter_but_status(client):
    await create(client, "import_csv")
    p = await create(client, "import_csv")
    await client.patch(f"/api/tasks/{p['task_id']}", json={"status": "processing"})
    await create(client, "resize")
    response = await client.get("/api/tasks/counts", params={"task_type": "import_csv", "status": "processing"})
    assert response.status_code == 200
    assert response.json() == {"success": True, "data": {"pending": 1, "processing": 1, "completed": 0, "failed": 0}}
    everything = (await client.get("/api/tasks/counts")).json()["data"]
    assert everything == {"pending": 2, "processing": 1, "completed": 0, "failed": 0}
    assert (await client.get("/api/tasks/counts", params={"q": "resize"})).json()["data"]["pending"] == 1
    cursor = (await client.get("/api/graph/tasks", params={"limit": 1})).json()["next_cursor"]
    for extra in ({"limit": "5"}, {"cursor": cursor}):
        assert "counts take filters only" in assert_error(await client.get("/api/tasks/counts", params=extra), 400)


# -- the all-tasks stream with filters, on a real server -----------------------------------------


async def test_filtered_stream_opens_with_a_page_counts_and_cursor(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        manager = srv.manager
        live = []
        for i in range(5):
            task = manager.create_task("import_csv", {"i": i})
            live.append(updated(manager, task.task_id, status="processing"))
        manager.create_task("import_csv")  # pending: counted, not listed
        events = await collect(http, "/tasks/stream?status=processing&limit=2", stop="snapshot")
        snapshot = json.loads(events[0].data)
        assert [t["task_id"] for t in snapshot["tasks"]] == [live[4].task_id, live[3].task_id]
        assert snapshot["counts"] == {"pending": 1, "processing": 5, "completed": 0, "failed": 0}
        rest = (await http.get("/api/graph/tasks", params={"status": "processing", "cursor": snapshot["next_cursor"]})).json()
        assert [t["task_id"] for t in rest["data"]] == [t.task_id for t in live[2::-1]]
        assert "followed" not in snapshot


async def test_stream_defaults_to_a_page_of_100(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        for _ in range(101):
            srv.manager.create_task("bulk")
        events = await collect(http, "/tasks/stream", stop="snapshot")
        snapshot = json.loads(events[0].data)
        assert len(snapshot["tasks"]) == 100 and snapshot["next_cursor"] is not None
        assert snapshot["counts"]["pending"] == 101


async def test_filtered_stream_sends_matching_changes_only_and_followed_tasks(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        manager = srv.manager
        watched = manager.create_task("resize")  # does not match q, followed
        ignored = manager.create_task("resize")

        def produce(event: ServerSentEvent) -> None:
            if event.event == "snapshot":
                manager.update_task(ignored.task_id, status="processing")  # unseen
                manager.update_task(watched.task_id, status="processing")  # followed: seen
                hit = manager.create_task("import_csv", {"customer": "Acme"})  # matches q: seen
                manager.update_task(hit.task_id, message="no longer about that")  # text still matches (type)
                manager.update_task(ignored.task_id, message="ACME mentioned")  # moves in
                manager.update_task(ignored.task_id, message="gone again")  # moves out
                manager.fail_task(watched.task_id, "x")

        events = await collect(
            http, f"/tasks/stream?q=acme&follow={watched.task_id}", stop="removed", react=produce
        )
        snapshot = json.loads(events[0].data)
        assert snapshot["tasks"] == []
        assert [t["task_id"] for t in snapshot["followed"]] == [watched.task_id]
        seen = [(e.event, json.loads(e.data)) for e in events[1:]]
        kinds = [(kind, data["task_id"] == watched.task_id, data.get("message")) for kind, data in seen]
        assert kinds[0] == ("task", True, "")
        assert [k for k, _ in seen][:4] == ["task", "task", "task", "task"]
        assert seen[1][1]["task_type"] == "import_csv" and seen[1][1]["metadata"] == {"customer": "Acme"}
        assert seen[2][1]["message"] == "no longer about that"
        assert seen[3][1]["task_id"] == ignored.task_id and seen[3][1]["message"] == "ACME mentioned"
        assert seen[4] == ("removed", {"task_id": ignored.task_id})


async def test_a_followed_task_keeps_coming_after_it_finishes(live_server, settings):
    async with serving(live_server, settings) as (srv, http):
        manager = srv.manager
        watched = manager.create_task("resize")

        def produce(event: ServerSentEvent) -> None:
            if event.event == "snapshot":
                manager.update_task(watched.task_id, status="processing")
                manager.fail_task(watched.task_id, "x")
                manager.cleanup_old_tasks(0)

        events = await collect(http, f"/tasks/stream?status=pending&follow={watched.task_id}", stop="removed", react=produce)
        assert [e.event for e in events] == ["snapshot", "task", "task", "removed"]
        snapshot = json.loads(events[0].data)
        assert [t["task_id"] for t in snapshot["tasks"]] == [watched.task_id]
        assert [json.loads(e.data)["status"] for e in events[1:3]] == ["processing", "failed"]


async def test_stream_cursor_and_follow_errors_are_400(live_server, settings):
    async with serving(live_server, settings) as (_srv, http):
        for query, named in (("cursor=zzz", "cursor"), ("follow=not-an-id", "follow"), ("q=" + "x" * 201, "q")):
            response = await http.get(f"/tasks/stream?{query}")
            assert response.status_code == 400
            assert named in response.json()["error"]


async def test_sqlite_listing_over_http(settings, tmp_path):
    """The same parameters served by the sqlite store through the app."""
    from conftest import running

    from server.app import create_app

    app = create_app(settings.with_changes(store_url=f"sqlite:///{tmp_path}/q.db"))
    async with running(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
        a = await create(client, "import_csv", metadata={"customer": "Acme-0042"})
        await create(client, "resize")
        body = (await client.get("/api/graph/tasks", params={"q": "acme-0042", "status": "pending"})).json()
        assert [t["task_id"] for t in body["data"]] == [a["task_id"]]
        counts = (await client.get("/api/tasks/counts", params={"q": "acme", "status": "failed"})).json()["data"]
        assert counts == {"pending": 1, "processing": 0, "completed": 0, "failed": 0}
