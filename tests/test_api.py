"""The JSON API as a client sees it: snapshot GETs, producer POST/PATCH, tokens, errors, health, metrics, CORS."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import anyio
import httpx
import pytest
from conftest import TASK_KEYS, running
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.settings import Settings

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024


def assert_error(response: httpx.Response, status: int) -> str:
    """The PROTOCOL.md error envelope with ``status``; returns the message."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body)[:2] == ["success", "error"], body
    assert body["success"] is False
    assert isinstance(body["error"], str) and body["error"]
    return body["error"]


@asynccontextmanager
async def client_for(settings: Settings, *, raise_app_exceptions: bool = True, **changes) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.with_changes(**changes))
    async with running(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            http.app = app  # type: ignore[attr-defined]
            yield http


async def create(client: httpx.AsyncClient, task_type: str = "graph_build", **body) -> dict:
    response = await client.post("/api/tasks", json={"task_type": task_type, **body})
    assert response.status_code == 201, response.text
    return response.json()["data"]


async def count(client: httpx.AsyncClient) -> int:
    return len(client.app.state.manager.list_tasks())  # type: ignore[attr-defined]


def manager(client: httpx.AsyncClient):
    return client.app.state.manager  # type: ignore[attr-defined]


# -- GET /api/graph/task/{id} --------------------------------------------------------------------


async def test_get_task_envelope_and_shape(client):
    created = await create(client, metadata={"project_id": "p1"})
    response = await client.get(f"/api/graph/task/{created['task_id']}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["success", "data"]
    assert body["success"] is True
    data = body["data"]
    assert list(data) == TASK_KEYS
    assert data == created
    assert data["status"] == "pending" and data["version"] == 1
    assert data["metadata"] == {"project_id": "p1"}
    assert str(uuid.UUID(data["task_id"])) == data["task_id"]
    assert uuid.UUID(data["task_id"]).version == 4
    assert data["created_at"].endswith("+00:00")
    assert datetime.fromisoformat(data["created_at"]).utcoffset().total_seconds() == 0


async def test_get_task_reflects_manager_changes(client):
    task = manager(client).create_task("t")
    manager(client).update_task(task.task_id, status="processing", progress=30, message="m")
    data = (await client.get(f"/api/graph/task/{task.task_id}")).json()["data"]
    assert (data["status"], data["progress"], data["message"], data["version"]) == ("processing", 30, "m", 2)


@pytest.mark.parametrize(
    "task_id",
    [
        str(uuid.uuid4()),  # well-formed, unknown
        "nope",
        "..%2Fetc",
        "..%2F..%2Fetc%2Fpasswd",
        "%00",
        "x" * 5000,
    ],
)
async def test_get_unknown_or_malformed_task_is_404_envelope(client, task_id):
    assert_error(await client.get(f"/api/graph/task/{task_id}"), 404)


async def test_get_task_by_uppercase_or_unhyphenated_id_is_404(client):
    created = await create(client)
    assert_error(await client.get(f"/api/graph/task/{created['task_id'].upper()}"), 404)
    assert_error(await client.get(f"/api/graph/task/{created['task_id'].replace('-', '')}"), 404)
    assert (await client.get(f"/api/graph/task/{created['task_id']}")).status_code == 200


async def test_dot_dot_path_is_a_404_envelope(client):
    assert_error(await client.get("/api/graph/task/../etc"), 404)


# -- GET /api/graph/tasks ------------------------------------------------------------------------


async def test_list_tasks_newest_first_with_count(client):
    empty = (await client.get("/api/graph/tasks")).json()
    assert empty == {"success": True, "data": [], "count": 0, "next_cursor": None}
    ids = [(await create(client, "a" if n % 2 else "b"))["task_id"] for n in range(5)]
    body = (await client.get("/api/graph/tasks")).json()
    assert list(body) == ["success", "data", "count", "next_cursor"]
    assert body["success"] is True
    assert [t["task_id"] for t in body["data"]] == ids[::-1]
    assert body["count"] == 5
    assert all(list(t) == TASK_KEYS for t in body["data"])


async def test_list_tasks_filters(client):
    a1 = await create(client, "a")
    b1 = await create(client, "b")
    a2 = await create(client, "a")
    await client.patch(f"/api/tasks/{a1['task_id']}", json={"status": "processing"})
    await client.patch(f"/api/tasks/{b1['task_id']}", json={"status": "failed", "error": "x"})

    async def ids(**params) -> list[str]:
        response = await client.get("/api/graph/tasks", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["count"] == len(body["data"])
        return [t["task_id"] for t in body["data"]]

    assert await ids(task_type="a") == [a2["task_id"], a1["task_id"]]
    assert await ids(task_type="zzz") == []
    assert await ids(status="processing") == [a1["task_id"]]
    assert await ids(status="failed") == [b1["task_id"]]
    assert await ids(status="completed") == []
    assert await ids(task_type="a", status="pending") == [a2["task_id"]]
    assert await ids(limit=1) == [a2["task_id"]]
    assert await ids(limit=2) == [a2["task_id"], b1["task_id"]]
    assert await ids(limit=1000) == [a2["task_id"], b1["task_id"], a1["task_id"]]
    assert await ids(task_type="a", limit=1) == [a2["task_id"]]


@pytest.mark.parametrize("limit", ["0", "1001", "x", "-1", "", "1.5", "1e3", "99999999999999999999999", "²", "٣"])
async def test_list_tasks_bad_limit_is_400(client, limit):
    await create(client)
    message = assert_error(await client.get("/api/graph/tasks", params={"limit": limit}), 400)
    assert "limit" in message


@pytest.mark.parametrize("status", ["done", "PENDING", "", "pending,done", ","])
async def test_list_tasks_bad_status_is_400(client, status):
    message = assert_error(await client.get("/api/graph/tasks", params={"status": status}), 400)
    assert "status" in message


# -- POST /api/tasks -----------------------------------------------------------------------------


async def test_post_creates_a_task(client):
    response = await client.post("/api/tasks", json={"task_type": "report", "metadata": {"k": [1, 2]}})
    assert response.status_code == 201
    body = response.json()
    assert list(body) == ["success", "data"] and body["success"] is True
    data = body["data"]
    assert list(data) == TASK_KEYS
    assert data["task_type"] == "report"
    assert data["metadata"] == {"k": [1, 2]}
    assert data["status"] == "pending" and data["version"] == 1 and data["progress"] == 0
    assert data["created_at"] == data["updated_at"]
    assert (await client.get(f"/api/graph/task/{data['task_id']}")).json()["data"] == data


async def test_post_without_metadata_gives_empty_object(client):
    data = await create(client)
    assert data["metadata"] == {}


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"{", 400),
        (b"not json", 400),
        (b"[]", 400),
        (b'[{"task_type": "t"}]', 400),
        (b"null", 400),
        (b'"task_type"', 400),
        (b"", 400),
        (b"   \n", 400),
        (b"{}", 400),
        (b'{"metadata": {}}', 400),
        (b'{"task_type": "t", "extra": 1}', 400),
        (b'{"task_type": "t", "metadata": []}', 400),
        (b'{"task_type": "t", "metadata": "m"}', 400),
        (b'{"task_type": "t", "metadata": {"x": NaN}}', 400),
        (b'{"task_type": ""}', 400),
        (b'{"task_type": 5}', 400),
        (b'{"task_type": null}', 400),
        (b'{"task_type": "\xff"}', 400),
    ],
)
async def test_post_bad_bodies_are_4xx_and_create_nothing(client, content, status):
    before = await count(client)
    response = await client.post("/api/tasks", content=content, headers={"content-type": "application/json"})
    assert_error(response, status)
    assert await count(client) == before
    assert (await client.get("/api/graph/tasks")).json()["count"] == before


async def test_post_body_over_one_mib_is_413_and_creates_nothing(client):
    padding = "x" * MIB
    response = await client.post("/api/tasks", json={"task_type": "t", "metadata": {"pad": padding}})
    assert_error(response, 413)

    async def chunked():  # no Content-Length: the limit must hold while reading
        yield b'{"task_type": "t", "metadata": {"pad": "'
        for _ in range(17):
            yield b"y" * 65536
        yield b'"}}'

    response = await client.post("/api/tasks", content=chunked(), headers={"content-type": "application/json"})
    assert_error(response, 413)
    assert await count(client) == 0


async def test_post_body_of_exactly_one_mib_is_accepted(client):
    # (each field has its own, smaller limit: the padding here is white space between JSON tokens)
    head, tail = b'{"task_type": "t", "metadata": {"pad": "z"}', b"}"
    content = head + b" " * (MIB - len(head) - len(tail)) + tail
    assert len(content) == MIB
    response = await client.post("/api/tasks", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 201, response.text[:200]


async def test_deeply_nested_json_is_400_never_500(settings):
    async with client_for(settings, raise_app_exceptions=False) as http:
        deep = b"[" * 100_000 + b"]" * 100_000  # 200 KB: within the size limit, beyond any parser stack
        response = await http.post("/api/tasks", content=b'{"task_type": "t", "metadata": {"a": ' + deep + b"}}", headers={"content-type": "application/json"})
        assert_error(response, 400)
        task = await create(http)
        response = await http.patch(f"/api/tasks/{task['task_id']}", content=b'{"progress_detail": {"a": ' + deep + b"}}", headers={"content-type": "application/json"})
        assert_error(response, 400)
        assert await count(http) == 1


async def test_an_accepted_task_can_always_be_served(settings):
    # Whatever nesting the API accepts, the snapshot and the listing must still render it: a task that
    # is stored but breaks GET /api/graph/tasks would 500 the listing for every poller until retention.
    async with client_for(settings, raise_app_exceptions=False) as http:
        for depth in [20, 100, 500, *range(800, 1000)]:
            nested = b"[" * depth + b"]" * depth
            response = await http.post("/api/tasks", content=b'{"task_type": "t", "metadata": {"a": ' + nested + b"}}", headers={"content-type": "application/json"})
            if response.status_code != 201:
                assert_error(response, 400)
                continue
            task_id = response.json()["data"]["task_id"]
            assert (await http.get(f"/api/graph/task/{task_id}")).status_code == 200, depth
            assert (await http.get("/api/graph/tasks", params={"limit": 1})).status_code == 200, depth
        listing = await http.get("/api/graph/tasks")
        assert listing.status_code == 200


# -- PATCH /api/tasks/{id} -----------------------------------------------------------------------


async def test_patch_sequence_bumps_version_and_updated_at_every_time(client):
    task = await create(client)
    bodies = [
        {"status": "processing"},
        {"progress": 10, "message": "batch 1"},
        {"progress_detail": {"batch": 1, "total_batches": 10}},
        {"progress": 10},  # same values again: still an accepted change
        {"message": "batch 1"},
        {"status": "processing"},
        {"error": None},
        {"status": "completed", "result": {"nodes": 4}},
    ]
    previous = task
    for body in bodies:
        response = await client.patch(f"/api/tasks/{task['task_id']}", json=body)
        assert response.status_code == 200, response.text
        envelope = response.json()
        assert list(envelope) == ["success", "data"] and envelope["success"] is True
        data = envelope["data"]
        assert list(data) == TASK_KEYS
        assert data["version"] == previous["version"] + 1
        assert data["updated_at"] > previous["updated_at"], (body, previous["updated_at"], data["updated_at"])
        assert data["created_at"] == task["created_at"]
        for key, value in body.items():
            assert data[key] == value
        assert (await client.get(f"/api/graph/task/{task['task_id']}")).json()["data"] == data
        previous = data
    assert previous["progress"] == 100
    assert previous["progress_detail"] == {"batch": 1, "total_batches": 10}


async def test_patch_fail_from_pending(client):
    task = await create(client)
    response = await client.patch(f"/api/tasks/{task['task_id']}", json={"status": "failed", "error": "no input"})
    assert response.status_code == 200
    assert response.json()["data"]["status"] == "failed"
    assert response.json()["data"]["error"] == "no input"


async def _terminal(client) -> dict:
    task = await create(client)
    await client.patch(f"/api/tasks/{task['task_id']}", json={"status": "processing"})
    done = await client.patch(f"/api/tasks/{task['task_id']}", json={"status": "completed", "result": {"a": 1}})
    assert done.status_code == 200
    return done.json()["data"]


GOOD = {"progress": 50}
BAD = {"progress": 101}


@pytest.mark.parametrize(
    ("case", "body", "status"),
    [
        ("unknown", GOOD, 404),
        ("unknown", BAD, 404),
        ("unknown", None, 404),  # not even a body
        ("malformed", GOOD, 404),
        ("malformed", b"{", 404),
        ("terminal", BAD, 400),
        ("terminal", {}, 400),
        ("terminal", None, 400),
        ("terminal", {"unknown": 1}, 400),
        ("terminal", GOOD, 409),
        ("terminal", {"status": "processing"}, 409),
        ("terminal", {"error": None}, 409),
        ("pending", {"status": "completed"}, 409),
        ("pending", {"status": "completed", "progress": 1000}, 400),
        ("processing", {"status": "pending"}, 409),
    ],
)
async def test_patch_check_order_404_then_400_then_409(client, case, body, status):
    if case == "unknown":
        task_id = str(uuid.uuid4())
    elif case == "malformed":
        task_id = "NOT-A-UUID"
    elif case == "terminal":
        task_id = (await _terminal(client))["task_id"]
    else:
        task_id = (await create(client))["task_id"]
        if case == "processing":
            await client.patch(f"/api/tasks/{task_id}", json={"status": "processing"})
    before = (await client.get(f"/api/graph/task/{task_id}")).json()
    if body is None:
        response = await client.patch(f"/api/tasks/{task_id}")
    elif isinstance(body, bytes):
        response = await client.patch(f"/api/tasks/{task_id}", content=body, headers={"content-type": "application/json"})
    else:
        response = await client.patch(f"/api/tasks/{task_id}", json=body)
    assert_error(response, status)
    assert (await client.get(f"/api/graph/task/{task_id}")).json() == before


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{}",
        b"[]",
        b'[{"progress": 1}]',
        b"{",
        b'{"progress": true}',
        b'{"progress": false}',
        b'{"progress": 101}',
        b'{"progress": -1}',
        b'{"progress": 50.5}',
        b'{"progress": "50"}',
        b'{"progress": null}',
        b'{"status": "done"}',
        b'{"status": null}',
        b'{"message": 5}',
        b'{"message": null}',
        b'{"progress_detail": []}',
        b'{"progress_detail": null}',
        b'{"result": "x"}',
        b'{"error": 5}',
        b'{"version": 99}',
        b'{"task_type": "other"}',
        b'{"created_at": "2020-01-01T00:00:00+00:00"}',
        b'{"progress": 5, "bogus": 1}',
        b'{"progress_detail": {"x": NaN}}',
    ],
)
async def test_patch_bad_body_is_400_and_changes_nothing(client, content):
    task = await create(client)
    await client.patch(f"/api/tasks/{task['task_id']}", json={"status": "processing", "progress": 5})
    before = (await client.get(f"/api/graph/task/{task['task_id']}")).json()
    assert_error(await client.patch(f"/api/tasks/{task['task_id']}", content=content, headers={"content-type": "application/json"}), 400)
    assert (await client.get(f"/api/graph/task/{task['task_id']}")).json() == before


async def test_patch_over_one_mib_is_413(client):
    task = await create(client)
    response = await client.patch(f"/api/tasks/{task['task_id']}", json={"message": "m" * MIB})
    assert_error(response, 413)
    assert (await client.get(f"/api/graph/task/{task['task_id']}")).json()["data"]["version"] == 1


# -- tokens --------------------------------------------------------------------------------------


async def test_api_token_guards_post_and_patch(settings):
    async with client_for(settings, api_token="s3cret") as http:
        good = {"Authorization": "Bearer s3cret"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "s3cret"}, {"Authorization": "Bearer "}, {"Authorization": "Bearer s3cret2"}):
            response = await http.post("/api/tasks", json={"task_type": "t"}, headers=headers)
            assert_error(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert await count(http) == 0
        assert (await http.post("/api/tasks", json={"task_type": "t"}, headers={"authorization": "bearer s3cret"})).status_code == 201
        created = (await http.post("/api/tasks", json={"task_type": "t"}, headers=good)).json()["data"]
        url = f"/api/tasks/{created['task_id']}"
        assert_error(await http.patch(url, json={"progress": 5}), 401)
        assert_error(await http.patch(url, json={"progress": 5}, headers={"Authorization": "Bearer nope"}), 401)
        assert_error(await http.patch(url, json={"progress": 5}, params={"access_token": "s3cret"}), 401)
        assert (await http.get(f"/api/graph/task/{created['task_id']}")).json()["data"]["version"] == 1
        response = await http.patch(url, json={"progress": 5}, headers=good)
        assert response.status_code == 200 and response.json()["data"]["version"] == 2
        # reads stay open when only the API token is set
        assert (await http.get("/api/graph/tasks")).status_code == 200


async def test_read_token_guards_reads(settings):
    async with client_for(settings, read_token="r3ad", api_token="wr1te") as http:
        task = manager(http).create_task("t")
        paths = [f"/api/graph/task/{task.task_id}", "/api/graph/tasks", "/metrics"]
        for path in paths:
            assert_error(await http.get(path), 401)
            assert_error(await http.get(path, headers={"Authorization": "Bearer wrong"}), 401)
            assert_error(await http.get(path, params={"access_token": "wrong"}), 401)
            assert (await http.get(path, headers={"Authorization": "Bearer r3ad"})).status_code == 200
            assert (await http.get(path, params={"access_token": "r3ad"})).status_code == 200
            # the API token may read too
            assert (await http.get(path, headers={"Authorization": "Bearer wr1te"})).status_code == 200
        # an unknown task behind the token is still a 401 first (no probing ids without a token)
        assert_error(await http.get(f"/api/graph/task/{uuid.uuid4()}"), 401)
        # health stays open for load balancers
        assert (await http.get("/healthz")).status_code == 200


async def test_read_token_guards_streams(settings, live_server):
    async with live_server(settings.with_changes(read_token="r3ad")) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        task = srv.manager.create_task("t")
        for path in (f"/tasks/{task.task_id}/stream", "/tasks/stream"):
            response = await http.get(path)
            assert_error(response, 401)
            assert_error(await http.get(path, params={"access_token": "nope"}), 401)
        assert srv.manager.bus.open_streams == 0
        srv.manager.fail_task(task.task_id, "x")  # a terminal task's stream ends by itself
        with anyio.fail_after(5):
            response = await http.get(f"/tasks/{task.task_id}/stream", params={"access_token": "r3ad"})
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert b"event: end" in response.content
            response = await http.get(f"/tasks/{task.task_id}/stream", headers={"Authorization": "Bearer r3ad"})
            assert response.status_code == 200
            async with aconnect_sse(http, "GET", "/tasks/stream", params={"access_token": "r3ad"}) as source:
                assert source.response.status_code == 200
                async for event in source.aiter_sse():
                    if not event.data:  # the leading `retry:` field (httpx-sse yields it as an empty event)
                        continue
                    assert event.event == "snapshot"
                    assert [t["task_id"] for t in json.loads(event.data)["tasks"]] == [task.task_id]
                    break


async def test_nonascii_digits_in_last_event_id_are_ignored_not_500(client):
    task = manager(client).create_task("t")
    manager(client).fail_task(task.task_id, "x")  # terminal: the stream is served whole in-process
    for params, headers in (({"last_event_id": "²"}, {}), ({}, {"Last-Event-ID": "\u00b2".encode("latin-1")})):
        response = await client.get(f"/tasks/{task.task_id}/stream", params=params, headers=headers)
        assert response.status_code == 200, response.text
        assert b"id: 2\nevent: task\n" in response.content
        assert b"event: end\n" in response.content


# -- errors --------------------------------------------------------------------------------------


async def test_unknown_path_is_the_envelope(client):
    response = await client.get("/no/such/path")
    assert_error(response, 404)
    assert response.json() == {"success": False, "error": "not found"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/api/graph/tasks"),
        ("POST", "/api/graph/tasks"),
        ("PUT", "/api/tasks"),
        ("GET", "/api/tasks"),
        ("POST", "/healthz"),
    ],
)
async def test_wrong_method_is_405_envelope(client, method, path):
    response = await client.request(method, path)
    assert_error(response, 405)
    assert "allow" in response.headers


async def test_wrong_method_on_task_paths(client):
    task = await create(client)
    response = await client.delete(f"/api/graph/task/{task['task_id']}")
    assert_error(response, 405)
    assert_error(await client.post(f"/api/tasks/{task['task_id']}", json={"progress": 1}), 405)
    assert (await client.get(f"/api/graph/task/{task['task_id']}")).json()["data"]["version"] == 1


async def test_unexpected_error_is_a_500_envelope_without_traceback(settings, monkeypatch):
    async with client_for(settings, raise_app_exceptions=False) as http:
        secret = "SECRET-INTERNAL-DETAIL /srv/db.py line 42"

        def explode(*args, **kwargs):
            raise RuntimeError(secret)

        task = manager(http).create_task("t")
        monkeypatch.setattr(manager(http), "alist", explode)
        monkeypatch.setattr(manager(http), "aget_task", explode)
        for path in ("/api/graph/tasks", f"/api/graph/task/{task.task_id}"):
            response = await http.get(path)
            assert response.status_code == 500
            assert response.json() == {"success": False, "error": "internal server error"}
            assert "Traceback" not in response.text
            assert "SECRET" not in response.text
            assert "RuntimeError" not in response.text


async def test_store_failure_is_a_500_envelope(settings, monkeypatch):
    async with client_for(settings, raise_app_exceptions=False) as http:
        store = manager(http)._store

        def broken(*args, **kwargs):
            raise OSError("disk I/O error at /var/lib/taskmon/tasks.db")

        monkeypatch.setattr(store, "commit", broken)
        response = await http.post("/api/tasks", json={"task_type": "t"})
        assert response.status_code == 500
        assert response.json() == {"success": False, "error": "internal server error"}
        assert "/var/lib" not in response.text


# -- health, metrics -----------------------------------------------------------------------------


async def test_healthz(client):
    response = await client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    assert body["status"] == "ok"
    assert body["streams"] == 0


async def _metrics(client) -> dict[tuple[str, tuple], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _sum(samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def test_metrics_names_and_values_follow_the_tasks(client):
    first = await _metrics(client)
    for status in ("pending", "processing", "completed", "failed"):
        assert _value(first, "taskmon_tasks", status=status) == 0
    assert _sum(first, "taskmon_subscribers") == 0
    for name in ("taskmon_events_published_total", "taskmon_events_delivered_total", "taskmon_events_coalesced_total"):
        assert _value(first, name) == 0

    a = await create(client)
    b = await create(client)
    await create(client)
    await client.patch(f"/api/tasks/{a['task_id']}", json={"status": "processing"})
    await client.patch(f"/api/tasks/{b['task_id']}", json={"status": "processing"})
    await client.patch(f"/api/tasks/{b['task_id']}", json={"status": "completed"})
    second = await _metrics(client)
    assert _value(second, "taskmon_tasks", status="pending") == 1
    assert _value(second, "taskmon_tasks", status="processing") == 1
    assert _value(second, "taskmon_tasks", status="completed") == 1
    assert _value(second, "taskmon_tasks", status="failed") == 0
    assert _value(second, "taskmon_events_published_total") == 6

    # a finished task's stream is served whole in-process: snapshot + end, counted as delivered
    stream = await client.get(f"/tasks/{b['task_id']}/stream")
    assert stream.status_code == 200
    third = await _metrics(client)
    assert _value(third, "taskmon_events_delivered_total") >= 1
    assert _value(third, "taskmon_events_delivered_total") > _value(second, "taskmon_events_delivered_total")
    assert _sum(third, "taskmon_subscribers") == 0


async def test_metrics_count_open_streams(settings, live_server):
    async with live_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        task = srv.manager.create_task("t")
        async with aconnect_sse(http, "GET", f"/tasks/{task.task_id}/stream") as source:
            # Hold the event iterator: a dropped one is finalised whenever the GC gets to it, and
            # its finaliser closes the response (the server then rightly counts no stream).
            events = source.aiter_sse()
            async for event in events:
                if event.event == "task":
                    break
            text = (await http.get("/metrics")).text
            assert 'taskmon_subscribers{stream="task"} 1.0' in text
            await events.aclose()
        with anyio.fail_after(5):
            while srv.manager.bus.open_streams:
                await anyio.sleep(0.01)
        assert 'taskmon_subscribers{stream="task"} 0.0' in (await http.get("/metrics")).text


# -- CORS ----------------------------------------------------------------------------------------


async def test_cors_header_for_an_allowed_origin_only(settings):
    async with client_for(settings, cors_origins=("https://app.example", "https://other.example")) as http:
        allowed = await http.get("/api/graph/tasks", headers={"Origin": "https://app.example"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        foreign = await http.get("/api/graph/tasks", headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 200
        assert "access-control-allow-origin" not in foreign.headers
        preflight = await http.options(
            "/api/tasks",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"},
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"


async def test_no_cors_header_when_not_configured(client):
    response = await client.get("/api/graph/tasks", headers={"Origin": "https://app.example"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
