"""TaskManager: versions, lifecycle, validation, listing, retention, recovery, subscriptions, threads."""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.bus import EventBus
from server.manager import INTERRUPTED, TaskManager, _replace, _ts
from server.models import Task, TaskNotFoundError, TaskStateError, TaskStatus, utcnow
from server.stores.memory import MemoryStore

from conftest import FakeClock, updated

pytestmark = pytest.mark.anyio

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}\+00:00$")


@pytest.fixture
async def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def manager(store: MemoryStore, clock: FakeClock) -> TaskManager:
    # the bus binds to the running loop, so it is built inside an async fixture
    return TaskManager(store, EventBus(queue_size=64), clock=clock)


def stored(manager: TaskManager, task_id: str) -> dict:
    task = manager.get_task(task_id)
    assert task is not None
    return task.to_dict()


# -- creation ----------------------------------------------------------------------------------


async def test_create_task_shape(manager):
    task = manager.create_task("graph_build", {"project_id": "p1"})
    data = task.to_dict()
    assert data["task_type"] == "graph_build"
    assert data["status"] == "pending"
    assert data["progress"] == 0
    assert data["message"] == ""
    assert data["progress_detail"] == {}
    assert data["result"] is None
    assert data["error"] is None
    assert data["metadata"] == {"project_id": "p1"}
    assert data["version"] == 1
    assert data["created_at"] == data["updated_at"]
    assert ISO_UTC.match(data["created_at"]), data["created_at"]
    parsed = uuid.UUID(task.task_id)
    assert parsed.version == 4 and str(parsed) == task.task_id
    assert stored(manager, task.task_id) == data


async def test_create_task_ids_are_unique(manager):
    ids = {manager.create_task("t").task_id for _ in range(200)}
    assert len(ids) == 200


async def test_create_copies_metadata(manager):
    metadata = {"a": 1}
    task = manager.create_task("t", metadata)
    metadata["a"] = 2
    assert manager.get_task(task.task_id).metadata == {"a": 1}


@pytest.mark.parametrize(
    ("task_type", "metadata"),
    [
        ("", None),
        ("   ", None),
        (None, None),
        (5, None),
        ("x" * 201, None),
        ("t", []),
        ("t", "meta"),
        ("t", {"not_json": object()}),
        ("t", {"nan": float("nan")}),
    ],
)
async def test_create_task_bad_values_raise_value_error_and_create_nothing(manager, task_type, metadata):
    with pytest.raises(ValueError):
        manager.create_task(task_type, metadata)
    assert manager.list_tasks() == []
    assert manager.bus.changes_seen == 0


# -- versions and lifecycle ----------------------------------------------------------------------


async def test_version_increases_by_one_per_change_and_updated_at_moves(manager):
    task = manager.create_task("t")
    seen = [task]
    seen.append(updated(manager, task.task_id, status="processing"))
    seen.append(updated(manager, task.task_id, progress=10, message="ten"))
    seen.append(updated(manager, task.task_id, progress_detail={"batch": 1, "total_batches": 10}))
    seen.append(updated(manager, task.task_id, progress=10))  # same value: still a change
    seen.append(manager.complete_task(task.task_id, {"nodes": 3}))
    assert [t.version for t in seen] == [1, 2, 3, 4, 5, 6]
    assert all(a.updated_at <= b.updated_at for a, b in zip(seen, seen[1:]))
    assert all(t.created_at == task.created_at for t in seen)
    final = stored(manager, task.task_id)
    assert final == seen[-1].to_dict()
    assert final["progress_detail"] == {"batch": 1, "total_batches": 10}
    assert final["message"] == "Task completed"


async def test_update_leaves_unspecified_fields(manager):
    task = manager.create_task("t")
    manager.update_task(task.task_id, status="processing", message="working", progress=30)
    after = updated(manager, task.task_id, progress=40)
    assert after.message == "working"
    assert after.status is TaskStatus.PROCESSING


async def test_complete_task_sets_progress_100_and_result(manager):
    task = manager.create_task("t")
    manager.update_task(task.task_id, status="processing", progress=37)
    done = manager.complete_task(task.task_id, {"graph_id": "g1"})
    assert done.status is TaskStatus.COMPLETED
    assert done.progress == 100
    assert done.result == {"graph_id": "g1"}
    assert done.error is None


async def test_status_completed_via_update_also_sets_progress_100(manager):
    task = manager.create_task("t")
    manager.update_task(task.task_id, status="processing", progress=5)
    done = updated(manager, task.task_id, status="completed")
    assert done.progress == 100


async def test_fail_task_from_processing(manager):
    task = manager.create_task("t")
    manager.update_task(task.task_id, status="processing", progress=60)
    failed = manager.fail_task(task.task_id, "zep unreachable")
    assert failed.status is TaskStatus.FAILED
    assert failed.error == "zep unreachable"
    assert failed.progress == 60  # a failure keeps how far it got
    assert failed.version == 3


async def test_pending_may_fail_directly(manager):
    task = manager.create_task("t")
    failed = manager.fail_task(task.task_id, "refused")
    assert failed.status is TaskStatus.FAILED and failed.version == 2


async def test_pending_to_completed_is_refused_and_changes_nothing(manager):
    task = manager.create_task("t")
    before = stored(manager, task.task_id)
    with pytest.raises(TaskStateError):
        manager.complete_task(task.task_id, {"x": 1})
    with pytest.raises(TaskStateError):
        manager.update_task(task.task_id, status="completed")
    assert stored(manager, task.task_id) == before


async def test_processing_back_to_pending_is_refused(manager):
    task = manager.create_task("t")
    manager.update_task(task.task_id, status="processing")
    before = stored(manager, task.task_id)
    with pytest.raises(TaskStateError):
        manager.update_task(task.task_id, status="pending")
    assert stored(manager, task.task_id) == before


@pytest.mark.parametrize("finish", ["complete", "fail"])
@pytest.mark.parametrize(
    "attempt",
    [
        lambda m, i: m.update_task(i, progress=50),
        lambda m, i: m.update_task(i, message="again"),
        lambda m, i: m.update_task(i, status="processing"),
        lambda m, i: m.update_task(i, status="pending"),
        lambda m, i: m.update_task(i, status="completed"),
        lambda m, i: m.update_task(i, status="failed"),
        lambda m, i: m.update_task(i, progress_detail={"x": 1}),
        lambda m, i: m.complete_task(i, {"again": True}),
        lambda m, i: m.fail_task(i, "again"),
        lambda m, i: m.patch_task(i, {"error": None}),
        lambda m, i: m.patch_task(i, {"result": None}),
    ],
)
async def test_terminal_task_refuses_every_change(manager, finish, attempt):
    task = manager.create_task("t")
    manager.update_task(task.task_id, status="processing")
    if finish == "complete":
        manager.complete_task(task.task_id, {"ok": True})
    else:
        manager.fail_task(task.task_id, "bad")
    before = stored(manager, task.task_id)
    published = manager.bus.changes_seen
    with pytest.raises(TaskStateError):
        attempt(manager, task.task_id)
    assert stored(manager, task.task_id) == before
    assert manager.bus.changes_seen == published  # nothing announced either


@pytest.mark.parametrize(
    "changes",
    [
        {"progress": 101},
        {"progress": -1},
        {"progress": 50.5},
        {"progress": "50"},
        {"progress": True},
        {"status": "done"},
        {"status": "PENDING"},
        {"message": 5},
        {"message": "x" * 10_001},
        {"error": 5},
        {"progress_detail": [1, 2]},
        {"progress_detail": {"bad": object()}},
        {"progress_detail": {"inf": float("inf")}},
        {"result": "done"},
        {"result": {"bad": {1, 2}}},
    ],
)
async def test_bad_values_raise_value_error_and_change_nothing(manager, changes):
    task = manager.create_task("t")
    manager.update_task(task.task_id, status="processing", progress=10)
    before = stored(manager, task.task_id)
    published = manager.bus.changes_seen
    with pytest.raises(ValueError):
        manager.update_task(task.task_id, **changes)
    with pytest.raises(ValueError):
        manager.patch_task(task.task_id, changes)
    assert stored(manager, task.task_id) == before
    assert manager.bus.changes_seen == published


async def test_a_bad_value_next_to_good_ones_changes_nothing(manager):
    task = manager.create_task("t")
    before = stored(manager, task.task_id)
    with pytest.raises(ValueError):
        manager.update_task(task.task_id, status="processing", message="ok", progress=1000)
    assert stored(manager, task.task_id) == before


async def test_update_with_nothing_is_a_value_error(manager):
    task = manager.create_task("t")
    with pytest.raises(ValueError):
        manager.update_task(task.task_id)
    with pytest.raises(ValueError):
        manager.patch_task(task.task_id, {})
    with pytest.raises(ValueError):
        manager.patch_task(task.task_id, {"version": 9})
    assert manager.get_task(task.task_id).version == 1


async def test_patch_null_clears_result_and_error(manager):
    task = manager.create_task("t")
    manager.patch_task(task.task_id, {"error": "transient"})
    cleared = manager.patch_task(task.task_id, {"error": None})
    assert cleared.error is None and cleared.version == 3


async def test_unknown_task_raises_not_found(manager):
    missing = str(uuid.uuid4())
    for call in (
        lambda: manager.update_task(missing, progress=1),
        lambda: manager.complete_task(missing),
        lambda: manager.fail_task(missing, "x"),
        lambda: manager.patch_task(missing, {"progress": 1}),
        lambda: manager.patch_task(missing, {"progress": 1000}),  # 404 before the body
    ):
        with pytest.raises(TaskNotFoundError):
            call()
    assert manager.get_task(missing) is None
    assert manager.list_tasks() == []


async def test_state_is_checked_after_the_body(manager):
    task = manager.create_task("t")
    manager.fail_task(task.task_id, "x")
    with pytest.raises(ValueError):  # bad body on a terminal task: the body wins (400 before 409)
        manager.patch_task(task.task_id, {"progress": 500})


# -- listing -------------------------------------------------------------------------------------


async def test_list_tasks_newest_first_with_filters_and_limit(manager):
    a = manager.create_task("build")
    b = manager.create_task("other")
    c = manager.create_task("build")
    d = manager.create_task("build")
    manager.update_task(a.task_id, status="processing")  # updating an old task does not reorder
    manager.update_task(c.task_id, status="processing")
    manager.fail_task(d.task_id, "x")
    ids = lambda tasks: [t.task_id for t in tasks]  # noqa: E731
    assert ids(manager.list_tasks()) == [d.task_id, c.task_id, b.task_id, a.task_id]
    assert ids(manager.list_tasks(task_type="build")) == [d.task_id, c.task_id, a.task_id]
    assert ids(manager.list_tasks(status="processing")) == [c.task_id, a.task_id]
    assert ids(manager.list_tasks(status=TaskStatus.FAILED)) == [d.task_id]
    assert ids(manager.list_tasks(task_type="build", status="pending")) == []
    assert ids(manager.list_tasks(task_type="other", status="pending")) == [b.task_id]
    assert ids(manager.list_tasks(limit=2)) == [d.task_id, c.task_id]
    assert ids(manager.list_tasks(task_type="build", status="processing", limit=1)) == [c.task_id]
    assert ids(manager.list_tasks(task_type="nope")) == []
    # the listing returns current snapshots
    assert manager.list_tasks(limit=4)[3].status is TaskStatus.PROCESSING


@pytest.mark.parametrize("limit", [0, -1, 1001, True])
async def test_list_tasks_bad_limit(manager, limit):
    with pytest.raises(ValueError):
        manager.list_tasks(limit=limit)


async def test_list_tasks_bad_status(manager):
    with pytest.raises(ValueError):
        manager.list_tasks(status="done")


async def test_count_by_status(manager):
    a = manager.create_task("t")
    manager.create_task("t")
    manager.update_task(a.task_id, status="processing")
    counts = manager.count_by_status()
    assert counts == {
        TaskStatus.PENDING: 1,
        TaskStatus.PROCESSING: 1,
        TaskStatus.COMPLETED: 0,
        TaskStatus.FAILED: 0,
    }


# -- retention and recovery ----------------------------------------------------------------------


async def test_cleanup_removes_only_old_terminal_tasks_and_announces_each(manager, clock):
    old_done = manager.create_task("t")
    manager.update_task(old_done.task_id, status="processing")
    manager.complete_task(old_done.task_id)
    old_failed = manager.create_task("t")
    manager.fail_task(old_failed.task_id, "x")
    old_running = manager.create_task("t")
    manager.update_task(old_running.task_id, status="processing")
    old_pending = manager.create_task("t")
    clock.advance(1.5 * 3600)
    fresh_done = manager.create_task("t")
    manager.update_task(fresh_done.task_id, status="processing")
    manager.complete_task(fresh_done.task_id)
    clock.advance(0.5 * 3600)

    listener = manager.bus.subscribe(None)
    removed = manager.cleanup_old_tasks(1.0)
    assert sorted(removed) == sorted([old_done.task_id, old_failed.task_id])
    assert manager.get_task(old_done.task_id) is None
    assert manager.get_task(old_failed.task_id) is None
    remaining = {t.task_id for t in manager.list_tasks()}
    assert remaining == {old_running.task_id, old_pending.task_id, fresh_done.task_id}

    events = listener.take()
    assert sorted(e.task_id for e in events) == sorted(removed)
    assert {e.kind for e in events} == {"removed"}
    for event in events:
        assert event.frame_all == (b'event: removed\ndata: {"task_id":"%s"}\n\n' % event.task_id.encode())
    manager.bus.unsubscribe(listener)

    # a second pass finds nothing more; a fractional retention reaches the half-hour-old one
    assert manager.cleanup_old_tasks(1.0) == []
    assert manager.cleanup_old_tasks(0.25) == [fresh_done.task_id]


@pytest.mark.parametrize("hours", [1e9, 1e12])
async def test_cleanup_with_a_huge_retention_removes_nothing_and_does_not_raise(manager, clock, hours):
    # TASKMON_RETENTION_HOURS=1e9 is a valid "keep (almost) forever"; the cutoff would be before year 1
    task = manager.create_task("t")
    manager.fail_task(task.task_id, "x")
    clock.advance(24 * 365 * 100 * 3600)
    assert manager.cleanup_old_tasks(hours) == []
    assert manager.get_task(task.task_id) is not None


async def test_removed_task_event_log_is_dropped(manager, store, clock):
    task = manager.create_task("t")
    manager.fail_task(task.task_id, "x")
    assert [v for v, _ in store.events(task.task_id, 0, 10)] == [1, 2]
    clock.advance(48 * 3600)
    manager.cleanup_old_tasks(24)
    assert store.events(task.task_id, 0, 10) == []


async def test_recover_interrupted_fails_only_a_dead_job_pools_live_tasks(store, clock):
    # The job pool of a process that died (another manager on the same store) left two live tasks;
    # a producer's task from the same time keeps going, and so does a finished one.
    dead = TaskManager(store, None, clock=clock)
    pending = dead.create_task("t", owned=True)
    running = dead.create_task("t", owned=True)
    dead.update_task(running.task_id, status="processing", progress=40)
    done = dead.create_task("t", owned=True)
    dead.update_task(done.task_id, status="processing")
    dead.complete_task(done.task_id, {"ok": 1})
    producer = dead.create_task("t")
    dead.update_task(producer.task_id, status="processing", progress=10)
    manager = TaskManager(store, EventBus(queue_size=64), clock=clock)
    done_before = stored(manager, done.task_id)
    producer_before = stored(manager, producer.task_id)

    recovered = manager.recover_interrupted()
    assert sorted(t.task_id for t in recovered) == sorted([pending.task_id, running.task_id])
    for task_id, version in ((pending.task_id, 2), (running.task_id, 3)):
        after = manager.get_task(task_id)
        assert after.status is TaskStatus.FAILED
        assert after.error == INTERRUPTED
        assert after.version == version
    assert manager.get_task(running.task_id).progress == 40
    assert stored(manager, done.task_id) == done_before
    assert stored(manager, producer.task_id) == producer_before
    assert updated(manager, producer.task_id, progress=20).version == producer_before["version"] + 1
    assert manager.recover_interrupted() == []
    # the new process's own pool is never "dead" to itself
    mine = manager.create_task("t", owned=True)
    assert manager.recover_interrupted() == []
    assert manager.get_task(mine.task_id).status is TaskStatus.PENDING


# -- subscriptions -------------------------------------------------------------------------------


async def test_subscribe_yields_increasing_versions_to_terminal(manager):
    task = manager.create_task("t")
    manager.update_task(task.task_id, status="processing")
    seen: list[Task] = []

    async def produce() -> None:
        for step in range(1, 20):
            manager.update_task(task.task_id, progress=step * 5)
            await anyio.sleep(0)
        manager.complete_task(task.task_id, {"done": True})

    with anyio.fail_after(5):
        async with manager.subscribe(task.task_id) as sub, anyio.create_task_group() as tg:
            tg.start_soon(produce)
            async for snapshot in sub:
                seen.append(snapshot)
    versions = [t.version for t in seen]
    assert versions[0] == 2  # the current snapshot first
    assert all(a < b for a, b in zip(versions, versions[1:]))
    assert seen[-1].status is TaskStatus.COMPLETED
    assert seen[-1] == manager.get_task(task.task_id)
    assert seen[-1].version == 22
    assert manager.bus.open_streams == 0  # the subscription left nothing behind


async def test_subscribe_after_version_replays_the_rest(manager):
    task = manager.create_task("t")
    manager.update_task(task.task_id, status="processing")
    manager.update_task(task.task_id, progress=50)
    manager.complete_task(task.task_id)
    with anyio.fail_after(5):
        async with manager.subscribe(task.task_id, after=2) as sub:
            versions = [t.version async for t in sub]
    assert versions == [3, 4]


async def test_subscribe_unknown_task(manager):
    with pytest.raises(TaskNotFoundError):
        async with manager.subscribe(str(uuid.uuid4())):
            pass  # pragma: no cover
    assert manager.bus.open_streams == 0


async def test_subscribe_to_a_terminal_task_yields_just_the_snapshot(manager):
    task = manager.create_task("t")
    failed = manager.fail_task(task.task_id, "x")
    with anyio.fail_after(5):
        async with manager.subscribe(task.task_id) as sub:
            seen = [t async for t in sub]
    assert seen == [failed]


# -- threads -------------------------------------------------------------------------------------


async def test_streams_opened_while_a_thread_reports_see_every_change_to_the_end(manager):
    """A change nobody is subscribed to builds no event (``bus.unheard``); a stream that opens at the
    same moment must still end at the task's terminal version: it registers before it reads."""
    for round_ in range(30):
        task = manager.create_task("t")
        go = threading.Barrier(2)

        def job(task_id: str = task.task_id) -> None:
            go.wait()
            for i in range(40):
                manager.update_task(task_id, status="processing", progress=i)
            manager.complete_task(task_id, {"round": round_})

        thread = threading.Thread(target=job)
        thread.start()
        go.wait()
        with anyio.fail_after(10):
            async with manager.subscribe(task.task_id) as sub:
                versions = [t.version async for t in sub]
        await anyio.to_thread.run_sync(thread.join, 10)
        final = manager.get_task(task.task_id)
        assert final.status is TaskStatus.COMPLETED
        assert versions[-1] == final.version == 42
        assert all(a < b for a, b in zip(versions, versions[1:]))
    assert manager.bus.unheard > 0  # some of those changes happened with nobody subscribed
    assert manager.bus.open_streams == 0


async def test_eight_threads_by_a_thousand_updates_lose_and_double_nothing(clock):
    # a log that keeps every version: each accepted report is found in it, in its thread's order
    manager = TaskManager(MemoryStore(history=10_000), EventBus(queue_size=64), clock=clock)
    task = manager.create_task("t")
    manager.update_task(task.task_id, status="processing")
    accepted: list[list[str]] = [[] for _ in range(8)]
    refused = [0] * 8
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        start.wait()
        for i in range(1000):
            try:
                if n == 0 and i == 900:
                    manager.complete_task(task.task_id, {"by": n})
                    accepted[n].append("Task completed")
                else:
                    manager.update_task(task.task_id, progress=i % 100, message=f"{n}:{i}")
                    accepted[n].append(f"{n}:{i}")
            except TaskStateError:
                refused[n] += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        await anyio.to_thread.run_sync(thread.join, 30)
    assert not any(t.is_alive() for t in threads)

    final = manager.get_task(task.task_id)
    assert final.status is TaskStatus.COMPLETED
    assert sum(map(len, accepted)) + sum(refused) == 8000
    # every accepted change got its own version: exactly 3..final (1 created, 2 was `processing`)
    assert final.version == 2 + sum(map(len, accepted))
    history = manager.store.events(task.task_id, 2, 10_000)
    assert [v for v, _ in history] == list(range(3, final.version + 1))
    messages = [json.loads(body)["message"] for _, body in history]
    # each thread's accepted changes are all there, once, in the order it made them
    for n in range(8):
        assert [m for m in messages if m.split(":")[0] == str(n) or (n == 0 and m == "Task completed")] == accepted[n]
    assert messages[-1] == "Task completed"  # the completion was the last change
    # the events reached the bus in version order (drained on this loop)
    with anyio.fail_after(5):
        while manager.bus.changes_seen < final.version:
            await anyio.sleep(0.01)
    stamps = [json.loads(body)["updated_at"] for _, body in history]
    assert stamps == sorted(set(stamps))  # every change moved updated_at, in version order


async def test_updated_at_moves_on_every_change_even_within_one_clock_tick(manager, clock):
    # PROTOCOL.md: every accepted change moves `updated_at`. A coarse clock (or two changes in the same
    # microsecond) must not leave two versions with one timestamp; a clock stepping back must not rewind it.
    frozen = clock.now
    task = manager.create_task("t")
    stamps = [task.updated_at]
    stamps.append(updated(manager, task.task_id, status="processing").updated_at)
    stamps.append(updated(manager, task.task_id, progress=1).updated_at)
    clock.advance(-30)
    stamps.append(updated(manager, task.task_id, progress=2).updated_at)
    stamps.append(manager.complete_task(task.task_id).updated_at)
    assert all(a < b for a, b in zip(stamps, stamps[1:])), stamps
    assert manager.get_task(task.task_id).created_at == frozen
    wire = [s.isoformat(timespec="microseconds") for s in stamps]
    assert len(set(wire)) == len(wire)  # distinct on the wire too


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


@pytest.mark.parametrize("field", ["metadata", "progress_detail", "result"])
async def test_nesting_is_capped_so_every_stored_snapshot_stays_servable(manager, field):
    from server.manager import MAX_DEPTH

    assert 32 <= MAX_DEPTH <= 1000
    task = manager.create_task("t")
    manager.update_task(task.task_id, status="processing")
    if field == "metadata":
        assert manager.create_task("t", _nested(MAX_DEPTH)).metadata == _nested(MAX_DEPTH)
        with pytest.raises(ValueError, match="metadata"):
            manager.create_task("t", _nested(MAX_DEPTH + 1))
        with pytest.raises(ValueError, match="metadata"):
            manager.create_task("t", {"a": _nested(MAX_DEPTH)})  # one level more, via a wrapper
        return
    before = stored(manager, task.task_id)
    with pytest.raises(ValueError, match=field):
        manager.patch_task(task.task_id, {field: _nested(MAX_DEPTH + 1)})
    with pytest.raises(ValueError, match=field):
        manager.patch_task(task.task_id, {field: {"list": [[_nested(MAX_DEPTH - 2)]]}})
    assert stored(manager, task.task_id) == before
    assert manager.patch_task(task.task_id, {field: _nested(MAX_DEPTH)}).version == 3


@settings(max_examples=1000, deadline=None)
@given(moment=st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1),
                           timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))])))
def test_ts_is_the_timestamp_rounded_to_the_microsecond(moment):
    # (up to 2106: past 2**32 s a double's timestamp() no longer holds every microsecond, and _ts
    # is then the closer of the two)
    assert _ts(moment) == round(moment.timestamp(), 6)


def test_replace_is_dataclasses_replace():
    task = Task(task_id=str(uuid.uuid4()), task_type="t", status=TaskStatus.PENDING, created_at=utcnow(), updated_at=utcnow())
    moved = _replace(task, {"progress": 7, "message": "m"}, version=2, status=TaskStatus.PROCESSING)
    assert moved == replace(task, progress=7, message="m", version=2, status=TaskStatus.PROCESSING)
    assert (moved.owner, moved.samples, moved.cancel_at) == (task.owner, task.samples, task.cancel_at)
    assert type(moved) is Task and task.progress == 0  # a new snapshot; the old one is unchanged
    with pytest.raises(TypeError):
        _replace(task, {"no_such_field": 1})
