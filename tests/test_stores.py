"""One store contract over memory://, sqlite:/// and redis:// (a real redis-server), plus what only
one store promises: sqlite's restart and one-process lock, redis's races, reader and faults."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import httpx
import pytest
from conftest import free_port, running, updated
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from server.app import create_app
from server.models import Task, TaskStatus
from server.query import TaskQuery
from server.settings import Settings
from server.stores import Conflict, StoreUnavailable, open_store
from server.stores.sqlite import SqliteStore, StoreLocked

BASE = datetime(2026, 11, 27, 12, 0, 0, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent
KINDS = ["memory", "sqlite", "redis"]


def make(n: int, task_type: str = "build", status: TaskStatus = TaskStatus.PENDING, **changes) -> Task:
    """The n-th task: created n seconds after BASE (so creation order == n)."""
    created = BASE + timedelta(seconds=n)
    values = dict(task_id=str(uuid.uuid4()), task_type=task_type, status=status, created_at=created, updated_at=created)
    values.update(changes)
    return Task(**values)


def body_of(task: Task) -> str:
    from server.manager import encode_task

    return encode_task(task)


def put(store, task: Task, expected: int | None = None) -> Task:
    """Commit ``task`` (created when ``expected`` is None) and wait until it is stored."""
    store.commit(task, expected, body_of(task)).wait(10)
    return task


def bump(store, task: Task, **changes) -> Task:
    newer = replace(task, version=task.version + 1, updated_at=task.updated_at + timedelta(seconds=1), **changes)
    return put(store, newer, task.version)


def open_kind(kind: str, tmp_path: Path, redis_url: str | None, history: int = 256, **options):
    if kind == "memory":
        return open_store("memory://", history=history, **options)
    if kind == "sqlite":
        return open_store(f"sqlite:///{tmp_path}/store-{uuid.uuid4().hex[:6]}.db", history=history, **options)
    assert redis_url is not None
    return open_store(redis_url, history=history, **options)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def url_for_redis(kind: str, request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("redis_url") if kind == "redis" else None


@pytest.fixture
def store(kind: str, tmp_path: Path, url_for_redis: str | None) -> Iterator:
    opened = open_kind(kind, tmp_path, url_for_redis)
    yield opened
    opened.close()


def ids(tasks) -> list[str]:
    return [t.task_id for t in tasks]


# -- the contract -----------------------------------------------------------------------------------

def test_open_store_picks_the_class(tmp_path, redis_url):
    stores = [open_store("memory://"), open_store(f"sqlite:///{tmp_path}/x.db"), open_store(redis_url)]
    try:
        assert [type(s).__name__ for s in stores] == ["MemoryStore", "SqliteStore", "RedisStore"]
        assert [s.shared for s in stores] == [False, False, True]
        assert stores[1].path == tmp_path / "x.db"
    finally:
        for s in stores:
            s.close()


@pytest.mark.parametrize("url", ["postgres://x", "file:///x"])
def test_open_store_refuses_what_it_cannot_serve(url):
    with pytest.raises(ValueError):
        open_store(url)


def test_get_missing_is_none(store):
    assert store.get(str(uuid.uuid4())) is None


def test_commit_then_get_returns_an_equal_snapshot_with_its_internal_fields(store):
    task = make(
        1,
        status=TaskStatus.PROCESSING,
        progress=55,
        message="ünïcødé ✓",
        progress_detail={"batch": 3, "nested": {"a": [1, 2.5, None]}},
        metadata={"project_id": "p", "emoji": "🚀"},
        updated_at=BASE + timedelta(hours=1, microseconds=7),
        owner="pool-1",
        samples=((1.5, 10), (2.5, 55)),
        cancel_at=3.25,
    )
    put(store, task)
    got = store.get(task.task_id)
    assert got == task
    assert got.to_dict() == task.to_dict()
    assert (got.owner, got.samples, got.cancel_at) == ("pool-1", ((1.5, 10), (2.5, 55)), 3.25)


def test_commit_is_a_compare_and_set_on_the_version(store):
    task = put(store, make(1))
    with pytest.raises(Conflict):
        put(store, task)  # it exists already
    newer = bump(store, task, status=TaskStatus.PROCESSING, progress=10)
    with pytest.raises(Conflict):
        put(store, replace(newer, version=3, progress=20), 1)  # computed from a version that moved on
    with pytest.raises(Conflict):
        put(store, replace(make(2), version=2), 1)  # does not exist
    assert store.get(task.task_id) == newer
    assert [v for v, _b in store.events(task.task_id, 0, 10)] == [1, 2]


def test_events_page_by_version_and_trim_to_history(kind, tmp_path, url_for_redis):
    store = open_kind(kind, tmp_path, url_for_redis, history=4)
    try:
        task = put(store, make(1))
        for progress in range(1, 10):
            task = bump(store, task, status=TaskStatus.PROCESSING, progress=progress)
        if kind == "sqlite":
            store.flush()
        events = store.events(task.task_id, 0, 100)
        assert [v for v, _b in events] == [7, 8, 9, 10]  # the newest four are held
        assert events[-1][1] == body_of(task)
        assert [v for v, _b in store.events(task.task_id, 7, 2)] == [8, 9]
        assert [v for v, _b in store.events(task.task_id, 8, 100)] == [9, 10]
        assert store.events(task.task_id, 10, 100) == []
        assert store.events(str(uuid.uuid4()), 0, 100) == []
    finally:
        store.close()


def test_events_trim_to_history_bytes_keeping_the_newest(kind, tmp_path, url_for_redis):
    """The per-task history is bounded by bytes too (TASKMON_HISTORY_KB): the oldest go first and
    the newest snapshot stays even when it alone is over the bound."""
    store = open_kind(kind, tmp_path, url_for_redis, history=100, history_bytes=4000)
    try:
        task = put(store, make(1))
        for k in range(1, 12):
            task = bump(store, task, status=TaskStatus.PROCESSING, message="x" * 900 + str(k))
        if kind == "sqlite":
            store.flush()
        events = store.events(task.task_id, 0, 100)
        assert sum(len(b) for _v, b in events) <= 4000
        assert [v for v, _b in events] == list(range(task.version - len(events) + 1, task.version + 1))
        assert len(events) == 3  # each body is about 1.2 kB: a fourth would pass 4000
        assert events[-1][1] == body_of(task)
        huge = bump(store, task, message="y" * 5000)  # alone over the bound: it stays, alone
        if kind == "sqlite":
            store.flush()
        assert store.events(task.task_id, 0, 100) == [(huge.version, body_of(huge))]
        small = bump(store, huge, message="z")  # the huge one goes; the byte total went down with it
        smaller = bump(store, small, message="zz")
        if kind == "sqlite":
            store.flush()
        assert [v for v, _b in store.events(task.task_id, 0, 100)] == [small.version, smaller.version]
    finally:
        store.close()


def test_remove_deletes_only_unchanged_tasks(store, kind):
    a, c = (put(store, make(n, status=TaskStatus.COMPLETED)) for n in (1, 3))
    b = put(store, make(2, status=TaskStatus.PROCESSING))
    b2 = put(store, replace(b, version=2, message="moved on"), 1)  # changed after it was chosen
    removed = store.remove([a, b, c])
    if kind != "sqlite":  # sqlite deletes by version in its writer and reports what it was given
        assert sorted(ids(removed)) == sorted([a.task_id, c.task_id])
    assert store.get(a.task_id) is None
    assert store.get(c.task_id) is None
    assert store.get(b.task_id) == b2
    assert store.events(a.task_id, 0, 10) == []
    assert ids(store.list(TaskQuery()).tasks) == [b.task_id]
    assert store.remove([]) == []


def test_list_newest_first_filters_and_limit(store):
    tasks = [
        make(1, "build"),
        make(2, "other", TaskStatus.PROCESSING),
        make(3, "build", TaskStatus.COMPLETED),
        make(4, "build", TaskStatus.PROCESSING),
        make(5, "other", TaskStatus.FAILED),
    ]
    for task in tasks:
        put(store, task)
    t1, t2, t3, t4, t5 = ids(tasks)
    q = lambda **kw: ids(store.list(TaskQuery(**kw)).tasks)
    assert q() == [t5, t4, t3, t2, t1]
    assert q(task_type="build") == [t4, t3, t1]
    assert q(statuses=frozenset({TaskStatus.PROCESSING})) == [t4, t2]
    assert q(statuses=frozenset({TaskStatus.PROCESSING, TaskStatus.FAILED})) == [t5, t4, t2]
    assert q(task_type="other", statuses=frozenset({TaskStatus.FAILED})) == [t5]
    assert q(task_type="missing") == []
    assert q(limit=3) == [t5, t4, t3]
    assert q(sort="created") == [t1, t2, t3, t4, t5]
    first = store.list(TaskQuery(limit=2))
    assert ids(first.tasks) == [t5, t4] and first.next_cursor
    query = TaskQuery.from_params({"limit": "2", "cursor": first.next_cursor})
    second = store.list(query)
    assert ids(second.tasks) == [t3, t2]
    third = store.list(TaskQuery.from_params({"limit": "2", "cursor": second.next_cursor}))
    assert ids(third.tasks) == [t1] and third.next_cursor is None


def test_equal_creation_times_order_by_task_id(store):
    same = [make(1) for _ in range(5)]
    for task in same:
        put(store, task)
    expected = sorted(ids(same), reverse=True)
    assert ids(store.list(TaskQuery()).tasks) == expected
    page = store.list(TaskQuery(limit=2))
    rest = store.list(TaskQuery.from_params({"cursor": page.next_cursor}))
    assert ids(page.tasks) + ids(rest.tasks) == expected


_STATUSES = list(TaskStatus)
_task_spec = st.tuples(
    st.integers(0, 30),  # created second (ties on purpose)
    st.integers(0, 40),  # updated offset
    st.sampled_from(_STATUSES),
    st.sampled_from(["build", "report", "export"]),
    st.sampled_from(["alpha", "beta gamma", "delta"]),
)
_query_spec = st.fixed_dictionaries(
    {},
    optional={
        "statuses": st.frozensets(st.sampled_from(_STATUSES), min_size=1),
        "task_type": st.sampled_from(["build", "report", "nope"]),
        "created_after": st.integers(0, 30).map(lambda s: BASE + timedelta(seconds=s)),
        "created_before": st.integers(0, 30).map(lambda s: BASE + timedelta(seconds=s)),
        "updated_after": st.integers(0, 70).map(lambda s: BASE + timedelta(seconds=s)),
        "q": st.sampled_from(["gamma", "alp", "zzz"]),
        "sort": st.sampled_from(["-created", "created", "-updated", "updated"]),
        "limit": st.integers(1, 7),
    },
)


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(_task_spec, max_size=14), query=_query_spec)
def test_list_and_counts_match_the_reference(store, kind, specs, query):
    """Every page of every query, followed by cursor, equals ``TaskQuery.apply`` on the same tasks."""
    store.remove(store.list(TaskQuery()).tasks)  # a fresh set per example
    if kind == "sqlite":
        store.flush()
    tasks = []
    for created_s, updated_s, status, task_type, message in specs:
        created = BASE + timedelta(seconds=created_s)
        task = make(0, task_type, status, created_at=created, updated_at=created + timedelta(seconds=updated_s), message=message)
        tasks.append(put(store, task))
    if kind == "sqlite":
        store.flush()
    q = TaskQuery(**query)
    cursor = None
    for _ in range(20):
        page_query = replace(q, after=q.decode_cursor(cursor)) if cursor else q
        got, want = store.list(page_query), page_query.apply(tasks)
        assert ids(got.tasks) == ids(want.tasks)
        assert got.next_cursor == want.next_cursor
        cursor = got.next_cursor
        if cursor is None:
            break
    want_counts = dict.fromkeys(TaskStatus, 0)
    for task in tasks:
        if q.matches(task):
            want_counts[task.status] += 1
    assert store.counts(q) == want_counts


def test_counts_have_every_status(store):
    assert store.counts(TaskQuery()) == dict.fromkeys(TaskStatus, 0)
    for n, status in enumerate([TaskStatus.PENDING, TaskStatus.PENDING, TaskStatus.FAILED]):
        put(store, make(n, status=status))
    assert store.counts(TaskQuery()) == {
        TaskStatus.PENDING: 2,
        TaskStatus.PROCESSING: 0,
        TaskStatus.COMPLETED: 0,
        TaskStatus.FAILED: 1,
    }


def test_live_and_terminal_before(store):
    cutoff = BASE + timedelta(hours=1)
    old_done = put(store, make(1, status=TaskStatus.COMPLETED))
    old_failed = put(store, make(2, status=TaskStatus.FAILED))
    old_live = put(store, make(3, status=TaskStatus.PROCESSING))
    pending = put(store, make(4))
    put(store, make(5, status=TaskStatus.COMPLETED, updated_at=cutoff))
    put(store, make(6, status=TaskStatus.FAILED, updated_at=cutoff + timedelta(microseconds=1)))
    finished = bump(store, pending, status=TaskStatus.FAILED)  # leaves the live set
    assert sorted(ids(store.live())) == sorted([old_live.task_id])
    found = store.terminal_before(cutoff)
    assert sorted(ids(found)) == sorted([old_done.task_id, old_failed.task_id, finished.task_id])
    assert all(isinstance(t, Task) for t in found)
    assert store.terminal_before(BASE) == []


def test_safe_from_many_threads(store):
    tasks = [make(n) for n in range(200)]
    errors: list[BaseException] = []

    def writer(chunk: list[Task]) -> None:
        try:
            for task in chunk:
                put(store, task)
                bump(store, task, status=TaskStatus.PROCESSING)
                assert store.get(task.task_id) is not None
                store.list(TaskQuery(limit=5))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(tasks[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert store.counts(TaskQuery())[TaskStatus.PROCESSING] == 200
    assert ids(store.list(TaskQuery()).tasks) == ids(reversed(tasks))


# -- async twins --------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_async_twins_agree_with_the_sync_methods(store):
    try:
        await _async_twins(store)
    finally:
        await store.aclose()  # the loop's client goes with this test's loop (the fixture closes the rest)


async def _async_twins(store) -> None:
    task = make(1)
    await store.acommit(task, None, body_of(task))
    with pytest.raises(Conflict):
        await store.acommit(task, None, body_of(task))
    newer = replace(task, version=2, status=TaskStatus.PROCESSING)
    await store.acommit(newer, 1, body_of(newer))
    assert await store.aget(task.task_id) == newer == store.get(task.task_id)
    assert await store.aevents(task.task_id, 0, 10) == store.events(task.task_id, 0, 10)
    assert ids((await store.alist(TaskQuery())).tasks) == [task.task_id]
    assert (await store.acounts(TaskQuery()))[TaskStatus.PROCESSING] == 1
    assert ids(await store.alive()) == [task.task_id]
    await store.aping()


# -- sqlite: one process per file, and restarts ---------------------------------------------------

def test_sqlite_file_survives_reopening(tmp_path):
    path = tmp_path / "nested" / "dir" / "tasks.db"  # missing parents are created
    first = SqliteStore(path)
    task = put(first, make(1, status=TaskStatus.COMPLETED, result={"ok": True}))
    live = put(first, make(2, status=TaskStatus.PROCESSING, owner="pool"))
    first.close()
    second = SqliteStore(path)
    try:
        assert second.get(task.task_id) == task
        assert ids(second.live()) == [live.task_id]
        assert ids(second.list(TaskQuery()).tasks) == [live.task_id, task.task_id]
    finally:
        second.close()


def test_sqlite_refuses_a_second_opener_with_a_clear_message(tmp_path):
    first = SqliteStore(tmp_path / "t.db")
    try:
        with pytest.raises(StoreLocked) as refused:
            SqliteStore(tmp_path / "t.db")
        message = str(refused.value)
        assert str(tmp_path / "t.db") in message and "redis://" in message and str(os.getpid()) in message
    finally:
        first.close()
    SqliteStore(tmp_path / "t.db").close()  # free again once the first closed


@pytest.mark.anyio
async def test_sqlite_a_burst_of_changes_keeps_every_held_version_and_catches_every_row_up(tmp_path):
    """Many changes queued at once (written as multi-row INSERTs, history cut by the writer's
    trigger) and rows that only lag (written after their group by the deferred-row UPDATE)."""
    import sqlite3

    path = tmp_path / "t.db"
    store = SqliteStore(path, history=3)
    try:
        tasks = [put(store, make(n, status=TaskStatus.PROCESSING, message="start")) for n in range(100)]
        acks = []
        for round_ in range(5):  # 500 changes committed without waiting: they queue up for the writer
            for k, task in enumerate(tasks):
                newer = replace(task, version=task.version + 1, updated_at=task.updated_at + timedelta(seconds=1),
                                progress=round_ * 10, message=f"round {round_}")
                acks.append(store.commit(newer, task.version, body_of(newer)))
                tasks[k] = newer
        for ack in acks:
            await ack.done()
        for task in tasks:
            assert [v for v, _b in store.events(task.task_id, 0, 100)] == [4, 5, 6]
        rows = sqlite3.connect(path)
        try:
            with anyio.fail_after(10):  # no further change comes: the lagging rows are still written
                while rows.execute("SELECT COUNT(*) FROM tasks WHERE version = 6").fetchone()[0] < 100:
                    await anyio.sleep(0.01)
            assert rows.execute("SELECT COUNT(*), MIN(version) FROM events").fetchone() == (300, 4)
            found = store.list(TaskQuery(q="round 4", limit=200)).tasks
            assert sorted((t.task_id, t.version, t.message) for t in found) == sorted(
                (t.task_id, 6, "round 4") for t in tasks
            )
        finally:
            rows.close()
    finally:
        store.close()


@pytest.mark.anyio
async def test_sqlite_a_listing_shows_a_change_whose_row_still_lags(tmp_path, monkeypatch):
    """A change of progress/message alone is written to the event log at once and to the task's
    row up to ROW_LAG_S later: meanwhile the listing and the search still answer with it."""
    import sqlite3

    from server.stores import sqlite as sqlite_module

    monkeypatch.setattr(sqlite_module, "ROW_LAG_S", 2.0)  # long enough to look while it lags
    path = tmp_path / "t.db"
    store = SqliteStore(path)
    rows = sqlite3.connect(path)
    try:
        task = put(store, make(1, status=TaskStatus.PROCESSING, message="start"))
        newer = replace(task, version=task.version + 1, updated_at=task.updated_at + timedelta(seconds=1),
                        progress=60, message="sixty rows")
        await store.commit(newer, task.version, body_of(newer)).done()  # its event is on disk now
        row_version = rows.execute("SELECT version FROM tasks WHERE task_id = ?", (task.task_id,)).fetchone()[0]
        listed = store.list(TaskQuery()).tasks
        found = store.list(TaskQuery(q="sixty")).tasks
        assert [(t.version, t.message) for t in listed] == [(newer.version, "sixty rows")]
        assert [t.task_id for t in found] == [task.task_id]
        assert row_version == task.version  # (the row did lag while those were read)
        with anyio.fail_after(10):  # and is written once its lag is up; the listing says the same
            while rows.execute("SELECT version FROM tasks WHERE task_id = ?", (task.task_id,)).fetchone()[0] != newer.version:
                await anyio.sleep(0.01)
        assert [(t.version, t.message) for t in store.list(TaskQuery()).tasks] == [(newer.version, "sixty rows")]
        assert store._unflushed == {}  # nothing is laid over the rows any more
    finally:
        rows.close()
        store.close()


def _write_steadily(path: Path, after_each) -> None:
    """3,000 changes of ~4 KiB to one task back to back (a WAL that never started over would reach
    ~90 MiB), calling ``after_each()`` after every one; then the newest is stored and survives a reopen."""
    store = SqliteStore(path)
    try:
        task = put(store, make(1, status=TaskStatus.PROCESSING))
        for n in range(3000):
            task = bump(store, task, progress=n % 100, progress_detail={"pad": "x" * 4000})
            after_each()
        assert [v for v, _b in store.events(task.task_id, task.version - 1, 10)] == [task.version]
    finally:
        store.close()
    reopened = SqliteStore(path)
    try:
        assert reopened.get(task.task_id) == task
    finally:
        reopened.close()


def _wal_starts(path: Path) -> int:
    """The WAL header's checkpoint sequence: + 1 each time the WAL starts over from its beginning."""
    with open(f"{path}-wal", "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


def test_sqlite_wal_starts_over_under_a_steady_stream_of_changes(tmp_path, monkeypatch):
    """Checkpoints run off the writer; under writes that never pause the writer finishes one at
    the cap so the WAL starts over instead of growing with everything written."""
    import server.stores.sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "CHECKPOINT_S", 0.01)
    monkeypatch.setattr(sqlite_store, "_WAL_CAP_FRAMES", 64)  # 256 KiB
    monkeypatch.setattr(sqlite_store, "_RESTART_FRAMES", 10**9)  # only the cap makes it start over
    path = tmp_path / "t.db"
    seen: list[int] = []
    _write_steadily(path, lambda: seen.append(_wal_starts(path)))
    assert seen[-1] - seen[0] >= 3, seen[-1] - seen[0]  # (one that never started over: 0)


def test_sqlite_wal_starts_over_by_the_checkpointers_pre_copy_long_before_the_cap(tmp_path, monkeypatch):
    """The checkpointer copies in rounds until little is left, then the writer copies that little
    between two groups: the WAL starts over at about _RESTART_FRAMES, the cap is never reached."""
    import server.stores.sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "CHECKPOINT_S", 0.01)
    monkeypatch.setattr(sqlite_store, "_RESTART_FRAMES", 64)  # 256 KiB
    monkeypatch.setattr(sqlite_store, "_WAL_CAP_FRAMES", 10**9)  # the backstop never fires
    path = tmp_path / "t.db"
    seen: list[int] = []
    _write_steadily(path, lambda: seen.append(_wal_starts(path)))
    assert seen[-1] - seen[0] >= 3, seen[-1] - seen[0]  # (one that never started over: 0)


def _settings(tmp_path: Path) -> Settings:
    return Settings(store_url=f"sqlite:///{tmp_path}/t.db", data_dir=tmp_path / "data", cleanup_interval_s=3600)


@pytest.mark.anyio
async def test_sqlite_restart_keeps_a_producers_task_alive_and_fails_only_the_job_pools(tmp_path):
    settings = _settings(tmp_path)
    async with running(create_app(settings)) as app:
        manager = app.state.manager
        done = manager.create_task("graph_build", {"project_id": "p1"})
        manager.update_task(done.task_id, status="processing", progress=50)
        manager.complete_task(done.task_id, {"graph_id": "g1"})
        job = manager.create_task("graph_build", owned=True)
        job_before = updated(manager, job.task_id, status="processing", progress=40)
        producer = manager.create_task("import")
        producer_before = updated(manager, producer.task_id, status="processing", progress=30)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as http:
            done_json = (await http.get(f"/api/graph/task/{done.task_id}")).json()

    async with running(create_app(settings)) as app:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as http:
            again = await http.get(f"/api/graph/task/{done.task_id}")
            interrupted = (await http.get(f"/api/graph/task/{job.task_id}")).json()["data"]
            kept = (await http.get(f"/api/graph/task/{producer.task_id}")).json()["data"]
            patched = await http.patch(f"/api/tasks/{producer.task_id}", json={"progress": 60})
    assert again.json() == done_json  # byte-for-byte the same task JSON after the restart
    assert interrupted["status"] == "failed" and "interrupted" in interrupted["error"]
    assert interrupted["version"] == job_before.version + 1
    assert kept == producer_before.to_dict()  # untouched by the restart
    assert patched.status_code == 200, patched.text
    assert patched.json()["data"]["version"] == producer_before.version + 1


@pytest.mark.anyio
async def test_a_second_process_on_the_same_file_refuses_and_changes_nothing(tmp_path):
    settings = _settings(tmp_path)
    async with running(create_app(settings)) as app:
        manager = app.state.manager
        job = manager.create_task("graph_build", owned=True)
        job = updated(manager, job.task_id, status="processing", progress=40)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMON_")}
        done = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "server", "serve", "--port", str(free_port()), "--store", settings.store_url],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False,
            )
        )
        assert done.returncode == 2, done.stderr
        assert "in use by another taskmon process" in done.stderr and "redis://" in done.stderr
        assert "Traceback" not in done.stderr
        assert manager.get_task(job.task_id) == job  # still processing, same version
        assert updated(manager, job.task_id, progress=50).version == job.version + 1


# -- redis only: races, the reader, faults ---------------------------------------------------------

def test_redis_racing_finishers_exactly_one_wins(redis_url):
    """Two stores (as two processes) finish one task at once: one commit wins, the other conflicts."""
    from server.manager import TaskManager
    from server.models import TaskStateError

    managers = [TaskManager(open_store(redis_url)) for _ in range(2)]
    try:
        task = managers[0].create_task("race")
        task = updated(managers[0], task.task_id, status="processing")
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def finish(manager: TaskManager, how: str) -> None:
            barrier.wait()
            try:
                if how == "complete":
                    manager.complete_task(task.task_id, {"by": how})
                else:
                    manager.fail_task(task.task_id, "by fail")
                outcomes.append("ok")
            except TaskStateError:
                outcomes.append("409")

        for _ in range(1):
            threads = [threading.Thread(target=finish, args=(m, how)) for m, how in zip(managers, ["complete", "fail"])]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
        assert sorted(outcomes) == ["409", "ok"]
        final = managers[1].get_task(task.task_id)
        assert final.version == task.version + 1 and final.is_terminal
        assert [v for v, _ in managers[1].store.events(task.task_id, 0, 10)] == [1, 2, 3]
    finally:
        for manager in managers:
            manager.close()


@pytest.mark.anyio
async def test_redis_reader_feeds_every_change_and_each_removal_once(redis_url):
    readers = [open_store(redis_url) for _ in range(2)]
    writer = open_store(redis_url)
    seen: list[list[tuple[str, str, int]]] = [[], []]
    try:
        for store, log in zip(readers, seen):
            await store.start(lambda kind, task, body, log=log: log.append((kind, task.task_id, task.version)))
        task = put(writer, make(1))
        task = bump(writer, task, status=TaskStatus.COMPLETED)
        # both "processes" run retention at once: each removal is announced once
        both = [writer.remove([task]), readers[0].remove([task])]
        assert sorted(len(r) for r in both) == [0, 1]
        want = [("task", task.task_id, 1), ("task", task.task_id, 2), ("removed", task.task_id, 2)]
        with anyio.fail_after(5):
            while any(len(log) < 3 for log in seen):
                await anyio.sleep(0.01)
        assert seen == [want, want]
    finally:
        for store in readers:
            await store.aclose()
        writer.close()


@pytest.mark.anyio
async def test_redis_a_burst_of_concurrent_reads_waits_for_a_connection_instead_of_failing(redis_url):
    # 1,000 streams opening at once each read the snapshot: redis-py's plain pool refused every
    # command past its 100th connection (MaxConnectionsError -> 503); the loop's pool is bounded
    # and callers queue for a free connection
    from server.stores.redis import ASYNC_POOL_SIZE

    store = open_store(redis_url)
    task = put(store, make(1))
    try:
        with anyio.fail_after(5):
            got = await asyncio.gather(*(store.aget(task.task_id) for _ in range(ASYNC_POOL_SIZE * 4)))
        assert [t.version for t in got] == [1] * (ASYNC_POOL_SIZE * 4)
        pool = store._async.connection_pool
        assert len(pool._available_connections) + len(pool._in_use_connections) <= ASYNC_POOL_SIZE
    finally:
        await store.aclose()


def test_redis_sweep_lease_one_holder_at_a_time(redis_url):
    a, b = open_store(redis_url), open_store(redis_url)
    try:
        assert a.try_lead("retention", 5) and a.try_lead("retention", 5)  # taken, then renewed
        assert not b.try_lead("retention", 5)
        assert a.try_lead("other", 5) is True and b.try_lead("other", 5) is False
    finally:
        a.close()
        b.close()


@pytest.mark.anyio
async def test_redis_down_fails_fast_with_store_unavailable():
    store = open_store(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    task = make(1)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.get(task.task_id)
        with pytest.raises(StoreUnavailable):
            store.commit(task, None, body_of(task))
        with pytest.raises(StoreUnavailable):
            await store.aget(task.task_id)
        with pytest.raises(StoreUnavailable):
            await store.acommit(task, None, body_of(task))
        with pytest.raises(StoreUnavailable):
            await store.aping()
        with pytest.raises(StoreUnavailable):
            await store.alist(TaskQuery())
        assert time.monotonic() - started < 2
    finally:
        await store.aclose()


def test_redis_sweep_fails_only_job_pool_tasks_whose_process_stopped_renewing(redis_url):
    import redis as redis_py

    from server.manager import TaskManager
    from server.stores.redis import OWNER_PREFIX

    live_pool, dead_pool, sweeper = (TaskManager(open_store(redis_url)) for _ in range(3))
    try:
        with redis_py.Redis.from_url(redis_url) as client:
            client.set(OWNER_PREFIX + live_pool.owner, "1", px=60_000)  # this pool's process renews
        running = updated(live_pool, live_pool.create_task("job", owned=True).task_id, status="processing")
        orphan = updated(dead_pool, dead_pool.create_task("job", owned=True).task_id, status="processing")
        producer = updated(dead_pool, dead_pool.create_task("import").task_id, status="processing")
        out = sweeper.sweep()
        assert out["interrupted"] == [orphan.task_id]
        assert sweeper.get_task(orphan.task_id).status is TaskStatus.FAILED
        assert "interrupted" in sweeper.get_task(orphan.task_id).error
        assert sweeper.get_task(running.task_id) == running
        assert sweeper.get_task(producer.task_id) == producer
    finally:
        for manager in (live_pool, dead_pool, sweeper):
            manager.close()


def test_redis_a_thread_path_change_after_another_process_changed_the_task_applies_on_top(redis_url):
    from server.manager import TaskManager
    from server.models import TaskCancelled

    a, b = TaskManager(open_store(redis_url)), TaskManager(open_store(redis_url))
    try:
        task = updated(a, a.create_task("job").task_id, status="processing", progress=10)
        b.update_task(task.task_id, message="from b")  # a's last snapshot is now stale
        again = updated(a, task.task_id, progress=20)
        assert again.version == task.version + 2 and again.message == "from b" and again.progress == 20
        b.cancel_task(task.task_id)
        with pytest.raises(TaskCancelled):  # seen through the conflict, not missed from a stale copy
            a.update_task(task.task_id, progress=30)
    finally:
        a.close()
        b.close()


@pytest.mark.anyio
async def test_redis_own_commits_and_the_reader_put_every_version_on_each_bus_once_in_order(redis_url, monkeypatch):
    """Two managers (as two processes) write the same tasks interleaved, through chained PATCHes
    (published at once by their own process) and the thread path (left to the reader): each
    process's bus gets every version of every task exactly once, in order, with a dedupe map kept
    small (bound lowered to 4 here) and empty once every task finished."""
    from server import manager as manager_module
    from server.bus import EventBus
    from server.manager import TaskManager

    monkeypatch.setattr(manager_module, "_PUBLISHED_MAX", 4)
    managers: list[TaskManager] = []
    logs: list[list[tuple[str, int]]] = []
    try:
        for _ in range(2):
            bus = EventBus(queue_size=100_000)
            manager = TaskManager(open_store(redis_url), bus)
            log: list[tuple[str, int]] = []
            bus.hook = lambda event, log=log: log.append((event.task_id, event.version))
            await manager.store.start(manager.on_feed)
            managers.append(manager)
            logs.append(log)
        a, b = managers
        made = [(await (a if k % 2 else b).acreate("dedupe"))[0].task_id for k in range(6)]
        for task_id in made:
            await a.apatch(task_id, {"status": "processing"})

        async def write(manager: TaskManager, task_id: str, who: str) -> None:
            for i in range(8):
                await manager.apatch(task_id, {"progress": i, "message": f"{who}-{i}"})
                if i % 3 == 0:
                    await anyio.to_thread.run_sync(lambda: manager.update_task(task_id, message=f"{who}-thread"))

        async with anyio.create_task_group() as tg:
            for task_id in made:
                for manager, who in ((a, "a"), (b, "b")):
                    for lane in range(2):
                        tg.start_soon(write, manager, task_id, f"{who}{lane}")
        final = {}
        for k, task_id in enumerate(made):
            final[task_id] = (await (a if k % 2 else b).apatch(task_id, {"status": "completed"}))[0].version
        assert all(v == 2 + 2 * 2 * (8 + 3) + 1 for v in final.values())  # every change applied once

        def complete(log: list[tuple[str, int]]) -> bool:
            return all(any(e == (t, v) for e in log) for t, v in final.items())

        with anyio.fail_after(10):
            while not all(complete(log) for log in logs) or any(m._ahead or m._published or m._held for m in managers):
                await anyio.sleep(0.01)
        for log in logs:
            for task_id, last in final.items():
                assert [v for t, v in log if t == task_id] == list(range(1, last + 1))
    finally:
        for manager in managers:
            await manager.store.aclose()
            manager.bus.close()


@contextlib.asynccontextmanager
async def _watched_redis_task(redis_url: str, monkeypatch, hold_s: float):
    """A manager on redis with its reader running, one processing task with a subscriber on the
    local bus, and the bus held saturated (``frequent``: the timing input of the hold, faked)."""
    from server import manager as manager_module
    from server.bus import EventBus
    from server.manager import TaskManager

    monkeypatch.setattr(manager_module, "_HOLD_S", hold_s)
    bus = EventBus(queue_size=1000)
    manager = TaskManager(open_store(redis_url), bus)
    await manager.store.start(manager.on_feed)
    try:
        task, _ = await manager.acreate("hold")
        await manager.apatch(task.task_id, {"status": "processing"})
        subscriber = bus.subscribe(task.task_id)
        with anyio.fail_after(5):  # the reader has echoed both versions: nothing of them is held
            while manager._published.get(task.task_id) != 2 or manager._ahead or manager._held:
                await anyio.sleep(0.01)
        subscriber.take()
        monkeypatch.setattr(EventBus, "frequent", lambda self: True)
        yield manager, task.task_id, subscriber
    finally:
        await manager.store.aclose()
        bus.close()


async def _chain(manager, task_id: str, progress: int) -> int:
    task, _ = await manager.apatch(task_id, {"progress": progress})  # nothing else queued: a chain of one
    return task.version


@pytest.mark.anyio
async def test_redis_saturated_fanout_holds_a_chain_until_the_next_so_both_reach_each_stream_in_one_batch(
    redis_url, monkeypatch
):
    async with _watched_redis_task(redis_url, monkeypatch, hold_s=30) as (manager, task_id, subscriber):
        assert await _chain(manager, task_id, 10) == 3
        with anyio.fail_after(5):  # the reader's echo of the chain is held behind it too
            while not any(item[0] == "feed" for item in manager._held.get(task_id, ())):
                await anyio.sleep(0.01)
        assert subscriber.events == []  # answered, not yet delivered: waiting for the next chain
        assert await _chain(manager, task_id, 20) == 4
        # both chains in one batch, strictly consecutive, each version once
        assert [event.version for event in subscriber.take()] == [3, 4]
        assert not manager._held and manager.holds_timed_out == 0
        with anyio.fail_after(5):  # the reader's echo of the second chain is skipped, not repeated
            while manager._ahead:
                await anyio.sleep(0.01)
        assert subscriber.take() == []


@pytest.mark.anyio
async def test_redis_saturated_hold_ends_by_its_timer_when_no_next_chain_comes(redis_url, monkeypatch):
    async with _watched_redis_task(redis_url, monkeypatch, hold_s=0.05) as (manager, task_id, subscriber):
        assert await _chain(manager, task_id, 10) == 3
        assert subscriber.events == []
        with anyio.fail_after(5):
            while not subscriber.events:
                await anyio.sleep(0.01)
        assert [event.version for event in subscriber.take()] == [3]
        assert manager.holds_timed_out == 1 and not manager._held and not manager._hold_timers


@pytest.mark.anyio
async def test_redis_saturated_hold_is_released_when_the_next_chain_fails(redis_url, monkeypatch):
    async with _watched_redis_task(redis_url, monkeypatch, hold_s=30) as (manager, task_id, subscriber):
        assert await _chain(manager, task_id, 10) == 3
        assert subscriber.events == []

        async def down(*args, **kwargs):
            raise StoreUnavailable("redis: ConnectionError")

        monkeypatch.setattr(manager.store, "acommit_chain", down)
        with pytest.raises(StoreUnavailable):
            await manager.apatch(task_id, {"progress": 50})
        # the held chain went out at once (no wait for the timer), versions still consecutive
        assert [event.version for event in subscriber.take()] == [3]
        assert not manager._held and manager.holds_timed_out == 0


@pytest.mark.anyio
async def test_redis_unsaturated_changes_reach_the_bus_when_their_chain_returns(redis_url, monkeypatch):
    from server.bus import EventBus

    async with _watched_redis_task(redis_url, monkeypatch, hold_s=30) as (manager, task_id, subscriber):
        monkeypatch.undo()  # the real EventBus.frequent: nothing was delivered for a long while
        for progress in (10, 20, 30):
            with anyio.fail_after(5):  # the previous change's flush has run (its end counts as an event)
                while manager.bus._flush_scheduled:
                    await anyio.sleep(0.001)
            manager.bus._last_event = -1e9  # and that came long ago (a task at a steady pace)
            assert not EventBus.frequent(manager.bus)
            version = await _chain(manager, task_id, progress)
            # on the bus by the time the caller has its answer (by the chain or the reader's echo)
            assert [event.version for event in subscriber.take()] == [version]
            assert task_id not in manager._held
        assert manager.holds_timed_out == 0


@pytest.mark.anyio
async def test_redis_saturated_holds_stop_with_the_app(redis_url, monkeypatch):
    """At shutdown the hold timers are cancelled, not left to fire on a closing bus."""
    async with _watched_redis_task(redis_url, monkeypatch, hold_s=30) as (manager, task_id, subscriber):
        assert await _chain(manager, task_id, 10) == 3
        timer = manager._hold_timers[task_id]
        manager.stop_holds()
        assert timer.cancelled()
        assert not manager._held and not manager._hold_timers and manager.holds_timed_out == 0


@pytest.mark.anyio
async def test_sqlite_group_wakes_each_waiter_and_a_cancelled_one_alone():
    """A group commit's waiters each await a future of their own: cancelling one leaves the others
    waiting, the writer's resolve (from its thread) wakes the rest, a late waiter returns at once,
    and a failed group raises in every waiter."""
    from server.stores.sqlite import _Group

    async def registered(group: _Group, n: int) -> None:
        with anyio.fail_after(5):
            while len(group._waiters) < n:
                await asyncio.sleep(0)

    group = _Group()
    first, second = asyncio.ensure_future(group.done()), asyncio.ensure_future(group.done())
    await registered(group, 2)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert not second.done()
    writer = threading.Thread(target=group.resolve)
    writer.start()
    with anyio.fail_after(5):
        await second
    writer.join()
    await group.done()  # resolved already: no wait
    assert group.durable

    failed = _Group()
    waiter = asyncio.ensure_future(failed.done())
    await registered(failed, 1)
    failed.resolve(RuntimeError("disk full"))
    with anyio.fail_after(5), pytest.raises(RuntimeError, match="disk full"):
        await waiter
    with pytest.raises(RuntimeError, match="disk full"):
        await failed.done()


def _versions(store, task: Task) -> list[int]:
    return [version for version, _body in store.events(task.task_id, 0, 1000)]


def test_sqlite_log_is_a_ring_of_history_slots(tmp_path):
    """Each task's log holds its newest ``history`` versions, one row per slot (version % history),
    across many wraps and a reopen."""
    import sqlite3

    path = tmp_path / "t.db"
    store = SqliteStore(path, history=4)
    try:
        task = put(store, make(1, status=TaskStatus.PROCESSING))
        other = put(store, make(2, status=TaskStatus.PROCESSING))
        for _ in range(10):
            task = bump(store, task, progress=task.version)
        other = bump(store, other)
        assert _versions(store, task) == [8, 9, 10, 11]
        assert _versions(store, other) == [1, 2]
        assert store.events(task.task_id, 9, 10)[-1] == (11, body_of(task))  # the newest version's own body
        assert store.events(task.task_id, 8, 2) == store.events(task.task_id, 0, 10)[1:3]  # after, limit
    finally:
        store.close()
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT slot, version FROM events WHERE task_id = ? ORDER BY version", (task.task_id,)).fetchall()
        assert rows == [(v % 4, v) for v in (8, 9, 10, 11)]
    finally:
        db.close()
    store = SqliteStore(path, history=4)
    try:
        task = bump(store, task)
        assert _versions(store, task) == [9, 10, 11, 12]
    finally:
        store.close()


def test_sqlite_log_keyed_by_version_or_another_history_is_rewritten_once(tmp_path):
    """A file whose log was written before the ring (keyed by version), or with another ``history``:
    opened, each task keeps its newest ``history`` versions and later changes go on from there."""
    import sqlite3

    path = tmp_path / "t.db"
    store = SqliteStore(path, history=8)
    try:
        task = put(store, make(1, status=TaskStatus.PROCESSING))
        for _ in range(6):
            task = bump(store, task)  # versions 1..7
    finally:
        store.close()
    db = sqlite3.connect(path)
    try:  # back to the layout before the ring, with the same rows
        rows = db.execute("SELECT task_id, version, body FROM events").fetchall()
        db.executescript(
            "DROP TABLE events; DROP TABLE store_meta;"
            " CREATE TABLE events (task_id TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL,"
            " PRIMARY KEY (task_id, version)) WITHOUT ROWID;"
        )
        db.executemany("INSERT INTO events VALUES (?, ?, ?)", rows)
        db.commit()
    finally:
        db.close()
    store = SqliteStore(path, history=5)
    try:
        assert _versions(store, task) == [3, 4, 5, 6, 7]
        task = bump(store, task)
        assert _versions(store, task) == [4, 5, 6, 7, 8]
        bodies = dict(store.events(task.task_id, 0, 10))
        assert bodies[8] == body_of(task)
    finally:
        store.close()
    store = SqliteStore(path, history=3)  # smaller: the newest three stay
    try:
        assert _versions(store, task) == [6, 7, 8]
        task = bump(store, task)
        assert _versions(store, task) == [7, 8, 9]
    finally:
        store.close()
    store = SqliteStore(path, history=6)  # larger: the log grows back as changes come
    try:
        for _ in range(4):
            task = bump(store, task)
        assert _versions(store, task) == [8, 9, 10, 11, 12, 13]
    finally:
        store.close()
    store = SqliteStore(path, history=6)  # the same again: nothing to rewrite
    try:
        assert _versions(store, task) == [8, 9, 10, 11, 12, 13]
    finally:
        store.close()
    with pytest.raises(ValueError, match="history"):
        SqliteStore(tmp_path / "other.db", history=0)


def test_sqlite_one_insert_with_more_versions_of_a_task_than_slots_keeps_the_newest(tmp_path):
    """A group may carry more changes of one task than it has slots (a small history, a burst):
    within the one INSERT, each slot ends with its newest version."""
    import sqlite3

    from server.stores.sqlite import _EVENTS_SQL

    path = tmp_path / "t.db"
    SqliteStore(path, history=2).close()
    db = sqlite3.connect(path, isolation_level=None)
    try:
        flat: list = []
        for version in range(1, 6):
            flat += ("t", version % 2, version, f"body {version}")
        db.execute(_EVENTS_SQL[5], flat)
        assert db.execute("SELECT slot, version, body FROM events ORDER BY slot").fetchall() == [
            (0, 4, "body 4"), (1, 5, "body 5")]
    finally:
        db.close()
