"""One store contract, run over memory:// and sqlite:///, plus the sqlite restart through the app."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.models import Task, TaskStatus
from server.settings import Settings
from server.stores import open_store
from server.stores.sqlite import SqliteStore

from conftest import running

BASE = datetime(2026, 11, 27, 12, 0, 0, 0, tzinfo=UTC)


def make(n: int, task_type: str = "build", status: TaskStatus = TaskStatus.PENDING, **changes) -> Task:
    """The n-th task: created n seconds after BASE (so creation order == n)."""
    created = BASE + timedelta(seconds=n)
    values = dict(
        task_id=str(uuid.uuid4()),
        task_type=task_type,
        status=status,
        created_at=created,
        updated_at=created,
    )
    values.update(changes)
    return Task(**values)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/store.db"
    opened = open_store(url)
    yield opened
    opened.close()


def test_open_store_picks_the_class(tmp_path):
    memory = open_store("memory://")
    sqlite = open_store(f"sqlite:///{tmp_path}/x.db")
    try:
        assert type(memory).__name__ == "MemoryStore"
        assert isinstance(sqlite, SqliteStore)
        assert sqlite.path == tmp_path / "x.db"
    finally:
        memory.close()
        sqlite.close()


@pytest.mark.parametrize("url", ["postgres://x", "redis://localhost:6379/0", "file:///x"])
def test_open_store_refuses_what_it_cannot_serve(url):
    with pytest.raises(ValueError):
        open_store(url)


def test_get_missing_is_none(store):
    assert store.get(str(uuid.uuid4())) is None


def test_save_then_get_returns_an_equal_snapshot(store):
    task = make(
        1,
        status=TaskStatus.FAILED,
        progress=55,
        message="ünïcødé ✓",
        progress_detail={"batch": 3, "total_batches": 10, "nested": {"a": [1, 2.5, None]}},
        result=None,
        error="boom",
        metadata={"project_id": "p", "emoji": "🚀"},
        version=9,
        updated_at=BASE + timedelta(hours=1, microseconds=7),
    )
    store.save(task)
    got = store.get(task.task_id)
    assert got == task
    assert got.to_dict() == task.to_dict()


def test_save_replaces_the_snapshot(store):
    task = make(1)
    store.save(task)
    newer = replace(task, status=TaskStatus.PROCESSING, progress=10, version=2, updated_at=task.updated_at + timedelta(seconds=1))
    store.save(newer)
    assert store.get(task.task_id) == newer
    assert store.list() == [newer]
    assert store.count_by_status()[TaskStatus.PENDING] == 0
    assert store.count_by_status()[TaskStatus.PROCESSING] == 1


def test_a_replaced_snapshot_keeps_its_place_in_the_list(store):
    a, b, c = make(1), make(2), make(3)
    for task in (a, b, c):
        store.save(task)
    store.save(replace(a, progress=5, version=2, updated_at=BASE + timedelta(hours=1)))
    assert [t.task_id for t in store.list()] == [c.task_id, b.task_id, a.task_id]


def test_delete(store):
    a, b, c = make(1), make(2), make(3)
    for task in (a, b, c):
        store.save(task)
    store.delete([a.task_id, c.task_id, str(uuid.uuid4())])  # a missing id is no error
    assert store.get(a.task_id) is None
    assert store.get(c.task_id) is None
    assert store.get(b.task_id) == b
    assert store.list() == [b]
    store.delete([])
    assert store.list() == [b]


def test_list_newest_first_filters_and_limit(store):
    tasks = [
        make(1, "build"),
        make(2, "other", TaskStatus.PROCESSING),
        make(3, "build", TaskStatus.COMPLETED),
        make(4, "build", TaskStatus.PROCESSING),
        make(5, "other", TaskStatus.FAILED),
    ]
    for task in tasks:
        store.save(task)
    ids = lambda found: [t.task_id for t in found]  # noqa: E731
    t1, t2, t3, t4, t5 = (t.task_id for t in tasks)
    assert store.list() == list(reversed(tasks))
    assert ids(store.list(task_type="build")) == [t4, t3, t1]
    assert ids(store.list(status=TaskStatus.PROCESSING)) == [t4, t2]
    assert ids(store.list(task_type="other", status=TaskStatus.FAILED)) == [t5]
    assert ids(store.list(task_type="build", status=TaskStatus.FAILED)) == []
    assert ids(store.list(task_type="missing")) == []
    assert ids(store.list(limit=1)) == [t5]
    assert ids(store.list(limit=3)) == [t5, t4, t3]
    assert ids(store.list(limit=100)) == [t5, t4, t3, t2, t1]
    assert ids(store.list(task_type="build", limit=2)) == [t4, t3]
    assert ids(store.list(status=TaskStatus.PROCESSING, limit=1)) == [t4]


def test_list_same_creation_time_falls_back_to_creation_order(store):
    same = [make(1) for _ in range(5)]
    for task in same:
        store.save(task)
    assert [t.task_id for t in store.list()] == [t.task_id for t in reversed(same)]


def test_list_orders_by_creation_time_not_by_save_order(store):
    older, newer, newest = make(1), make(2), make(3)
    for task in (newer, newest, older):  # saved out of creation order
        store.save(task)
    assert [t.task_id for t in store.list()] == [newest.task_id, newer.task_id, older.task_id]
    assert [t.task_id for t in store.list(limit=2)] == [newest.task_id, newer.task_id]


def test_terminal_before(store):
    cutoff = BASE + timedelta(hours=1)
    old_done = make(1, status=TaskStatus.COMPLETED)
    old_failed = make(2, status=TaskStatus.FAILED)
    old_live = make(3, status=TaskStatus.PROCESSING)
    old_pending = make(4)
    at_cutoff = make(5, status=TaskStatus.COMPLETED, updated_at=cutoff)
    new_done = make(6, status=TaskStatus.FAILED, updated_at=cutoff + timedelta(microseconds=1))
    for task in (old_done, old_failed, old_live, old_pending, at_cutoff, new_done):
        store.save(task)
    found = store.terminal_before(cutoff)
    assert sorted(t.task_id for t in found) == sorted([old_done.task_id, old_failed.task_id])
    assert all(isinstance(t, Task) for t in found)
    assert store.terminal_before(BASE) == []


def test_count_by_status_has_every_status(store):
    assert store.count_by_status() == dict.fromkeys(TaskStatus, 0)
    for n, status in enumerate([TaskStatus.PENDING, TaskStatus.PENDING, TaskStatus.FAILED]):
        store.save(make(n, status=status))
    assert store.count_by_status() == {
        TaskStatus.PENDING: 2,
        TaskStatus.PROCESSING: 0,
        TaskStatus.COMPLETED: 0,
        TaskStatus.FAILED: 1,
    }


def test_safe_from_many_threads(store):
    tasks = [make(n) for n in range(400)]
    errors: list[BaseException] = []

    def writer(chunk: list[Task]) -> None:
        try:
            for task in chunk:
                store.save(task)
                store.save(replace(task, version=2, status=TaskStatus.PROCESSING))
                assert store.get(task.task_id) is not None
                store.list(limit=5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(tasks[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert store.count_by_status()[TaskStatus.PROCESSING] == 400
    assert [t.task_id for t in store.list()] == [t.task_id for t in reversed(tasks)]


def test_sqlite_file_survives_reopening(tmp_path):
    path = tmp_path / "nested" / "dir" / "tasks.db"  # missing parents are created
    first = SqliteStore(path)
    task = make(1, status=TaskStatus.COMPLETED, result={"ok": True}, version=4)
    first.save(task)
    first.close()
    second = SqliteStore(path)
    try:
        assert second.get(task.task_id) == task
        assert second.list() == [task]
    finally:
        second.close()


# -- restart through the app ---------------------------------------------------------------------

@pytest.mark.anyio
async def test_sqlite_restart_keeps_finished_tasks_and_fails_interrupted_ones(tmp_path):
    settings = Settings(store_url=f"sqlite:///{tmp_path}/t.db", data_dir=tmp_path / "data", cleanup_interval_s=3600)

    async with running(create_app(settings)) as app:
        manager = app.state.manager
        done = manager.create_task("graph_build", {"project_id": "p1"})
        manager.update_task(done.task_id, status="processing", progress=50)
        manager.complete_task(done.task_id, {"graph_id": "g1", "nodes": 3})
        live = manager.create_task("graph_build")
        live_before = manager.update_task(live.task_id, status="processing", progress=40, message="halfway")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as http:
            done_json = (await http.get(f"/api/graph/task/{done.task_id}")).json()
    assert done_json["data"]["status"] == "completed"

    async with running(create_app(settings)) as app:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as http:
            again = await http.get(f"/api/graph/task/{done.task_id}")
            interrupted = await http.get(f"/api/graph/task/{live.task_id}")
            listing = await http.get("/api/graph/tasks")
    assert again.status_code == 200
    assert again.json() == done_json  # byte-for-byte the same task JSON after the restart
    assert interrupted.status_code == 200
    data = interrupted.json()["data"]
    assert data["status"] == "failed"
    assert "interrupted" in data["error"]
    assert data["version"] == live_before.version + 1
    assert data["progress"] == 40
    assert data["created_at"] == live_before.to_dict()["created_at"]
    assert data["updated_at"] > live_before.to_dict()["updated_at"]
    assert [t["task_id"] for t in listing.json()["data"]] == [live.task_id, done.task_id]

    # a third start finds nothing left to recover: the failed task stays exactly as it was
    async with running(create_app(settings)) as app:
        assert app.state.manager.get_task(live.task_id).to_dict() == data
