"""A job thread's progress reports (issue 10): ``update_task`` checks a report and queues it; the
reporter applies it later, in order. What must hold: every read sees it at once, nothing overtakes
it, what was checked is what is applied, a bad value raises in the caller as before, and nothing
accepted is lost at shutdown."""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from conftest import FakeClock, running
from server import manager as manager_module
from server.app import create_app
from server.bus import EventBus
from server.manager import TaskManager
from server.models import TaskCancelled, TaskStateError, TaskStatus
from server.settings import Settings
from server.stores import open_store
from server.stores.memory import MemoryStore

pytestmark = pytest.mark.anyio


def _store(kind: str, tmp_path: Path):
    return MemoryStore() if kind == "memory" else open_store(f"sqlite:///{tmp_path}/tasks.db")


def _processing(manager: TaskManager) -> str:
    task_id = manager.create_task("job").task_id
    manager.update_task(task_id, status="processing")
    return task_id


class _HeldReporter:
    """The reporter kept from running (its turn waits for ``go``), so a test sees reports queued."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.go = threading.Event()
        self.turns = 0
        original = TaskManager._hand_reports

        def held(manager: TaskManager) -> None:
            self.turns += 1
            for _ in range(6000):  # until told, or until the manager stops its reporter (30 s at most)
                if self.go.wait(0.005) or manager._reporter is None:
                    break
            original(manager)

        monkeypatch.setattr(TaskManager, "_hand_reports", held)


@contextmanager
def _held(monkeypatch: pytest.MonkeyPatch, store: Any = None, **options: Any) -> Iterator[tuple[TaskManager, _HeldReporter]]:
    """A manager (with a bus: inside a running loop) whose reporter is held until the block ends."""
    held = _HeldReporter(monkeypatch)
    manager = TaskManager(store if store is not None else MemoryStore(), EventBus(), **options)
    try:
        yield manager, held
    finally:
        held.go.set()
        manager.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_report_is_queued_and_every_read_sees_it_at_once(kind, tmp_path, monkeypatch):
    store = _store(kind, tmp_path)
    with _held(monkeypatch, store) as (manager, held):
        task_id = _processing(manager)
        manager.update_task(task_id, progress=40, message="m", progress_detail={"done": 4})
        assert len(manager._reports) == 1  # queued: the reporter has not run
        assert store.get(task_id).version == 2  # (the store itself has not got it yet)
        task = manager.get_task(task_id)  # a read applies it first
        assert (task.version, task.progress, task.message, task.progress_detail) == (3, 40, "m", {"done": 4})
        assert not manager._reports
        manager.update_task(task_id, progress=41)
        assert (await manager.aget_task(task_id)).progress == 41  # the loop's reads too
        manager.update_task(task_id, progress=42)
        assert [t.progress for t in manager.list_tasks()] == [42]
        manager.update_task(task_id, progress=43)
        assert [v for v, _ in await manager.aevents(task_id, 3, 10)] == [4, 5, 6]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_no_change_overtakes_a_queued_report(kind, tmp_path, monkeypatch):
    with _held(monkeypatch, _store(kind, tmp_path)) as (manager, held):
        task_id = _processing(manager)
        manager.update_task(task_id, progress=10, message="a")
        manager.update_task(task_id, progress=20, message="b")
        done = manager.complete_task(task_id, {"ok": True})  # applies both reports before itself
        assert done.version == 5
        bodies = [json.loads(b) for _, b in manager.store.events(task_id, 2, 10)]
        assert [(b["version"], b["progress"], b["message"]) for b in bodies] == [
            (3, 10, "a"), (4, 20, "b"), (5, 100, "Task completed")
        ]
        with pytest.raises(TaskStateError):
            manager.update_task(task_id, progress=30)  # finished: refused in the caller
        assert manager.get_task(task_id).version == 5


async def test_the_reporter_publishes_without_any_read(monkeypatch):
    # nothing reads the task after the report: the reporter alone brings it to the stream
    manager = TaskManager(MemoryStore(), EventBus())
    try:
        task_id = _processing(manager)
        async with manager.subscribe(task_id) as sub:
            assert [e.version for e in sub.take_initial()] == [2]
            await anyio.to_thread.run_sync(lambda: manager.update_task(task_id, progress=7, message="from a job"))
            with anyio.fail_after(5):
                while not (events := sub.subscriber.take()):
                    await sub.subscriber.wait()
            body = json.loads(events[0].body)
            assert (events[0].version, body["progress"], body["message"]) == (3, 7, "from a job")
    finally:
        manager.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_with_no_loop_the_reporter_thread_applies_the_reports(kind, tmp_path):
    store = _store(kind, tmp_path)
    manager = TaskManager(store, None)  # a producer-only manager: no bus, no loop
    try:
        task_id = _processing(manager)
        manager.update_task(task_id, progress=55)
        deadline = threading.Event()
        for _ in range(500):  # the store itself (no read through the manager) gets it
            if store.get(task_id).version == 3:
                break
            deadline.wait(0.01)
        assert store.get(task_id).progress == 55
        assert manager._reporter is not None and manager._reporter.is_alive()
    finally:
        manager.close()
    assert manager._reporter is None


async def test_what_was_checked_is_what_is_applied_when_the_caller_reuses_its_dict(monkeypatch):
    with _held(monkeypatch) as (manager, held):
        task_id = _processing(manager)
        detail = {"batch": 1, "of": 10}
        manager.update_task(task_id, progress_detail=detail)
        detail["batch"] = 2
        detail["bad"] = object()  # would not even encode
        assert manager.get_task(task_id).progress_detail == {"batch": 1, "of": 10}


class _Level(enum.IntEnum):
    HALF = 50


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


@pytest.mark.parametrize(
    ("fields", "applied"),
    [
        ({"progress": _Level.HALF}, {"progress": 50}),  # an int subclass: the general path takes it
        # a report's detail is what the wire says it is (JSON's keys are strings)
        ({"progress_detail": {1: "a", "b": [1, 2]}}, {"progress_detail": {"1": "a", "b": [1, 2]}}),
        ({"progress_detail": {"x": "y" * 20_000}}, {"progress_detail": {"x": "y" * 20_000}}),  # long: general path
        ({"progress_detail": _nested(40)}, {"progress_detail": _nested(40)}),  # nested, within the limit
        ({"status": TaskStatus.PROCESSING, "progress": 5}, {"progress": 5}),
    ],
)
async def test_values_the_quick_checks_do_not_take_get_the_general_answer(fields, applied):
    manager = TaskManager(MemoryStore(), EventBus())
    try:
        task_id = _processing(manager)
        manager.update_task(task_id, **fields)
        task = manager.get_task(task_id)
        assert task.version == 3
        assert {name: getattr(task, name) for name in applied} == applied
    finally:
        manager.close()


@pytest.mark.parametrize(
    "fields",
    [
        {"progress": True},
        {"progress": 101},
        {"progress": 1.5},
        {"message": 3},
        {"message": "m" * 10_001},
        {"progress_detail": [1]},
        {"progress_detail": {"x": float("nan")}},
        {"progress_detail": {"x": object()}},
        {"progress_detail": _nested(65)},
        {"progress_detail": {"x": "y" * 70_000}},
        {},
    ],
)
async def test_a_bad_report_raises_in_the_caller_and_changes_nothing(fields):
    manager = TaskManager(MemoryStore(), EventBus())
    try:
        task_id = _processing(manager)
        with pytest.raises(ValueError):
            manager.update_task(task_id, **fields)
        assert manager.get_task(task_id).version == 2 and not manager._reports
    finally:
        manager.close()


async def test_a_report_on_a_task_with_a_cancel_requested_raises_task_cancelled(monkeypatch):
    manager = TaskManager(MemoryStore(), EventBus())
    try:
        task_id = _processing(manager)
        manager.cancel_task(task_id)
        with pytest.raises(TaskCancelled):
            manager.update_task(task_id, progress=10)
        assert manager.get_task(task_id).version == 3
    finally:
        manager.close()


async def test_a_report_on_a_pending_task_is_applied_before_the_call_returns(monkeypatch):
    with _held(monkeypatch) as (manager, held):
        task = manager.create_task("queued")
        manager.update_task(task.task_id, progress=3, message="waiting")  # pending: the general path
        assert not manager._reports and held.turns == 0
        assert manager.store.get(task.task_id).message == "waiting"


async def test_a_report_keeps_the_time_it_was_made(monkeypatch):
    clock = FakeClock()
    with _held(monkeypatch, clock=clock) as (manager, held):
        task_id = _processing(manager)
        clock.advance(5)
        made = clock.now
        manager.update_task(task_id, progress=10)
        clock.advance(30)  # applied later: the change still says when it was made
        assert manager.get_task(task_id).updated_at == made


async def test_a_job_flooding_reports_applies_them_itself_past_the_bound(monkeypatch):
    monkeypatch.setattr(manager_module, "_REPORTS_MAX", 16)
    with _held(monkeypatch) as (manager, held):
        task_id = _processing(manager)
        most = 0
        for i in range(100):
            manager.update_task(task_id, progress=i % 100)
            most = max(most, len(manager._reports))
        assert most == 16  # never more queued than the bound: the 17th applied them in the caller
        assert manager.get_task(task_id).version == 2 + 100


async def test_stopping_applies_what_is_queued_and_later_reports_still_apply(monkeypatch):
    held = _HeldReporter(monkeypatch)
    store = MemoryStore()
    manager = TaskManager(store, EventBus())
    task_id = _processing(manager)
    manager.update_task(task_id, progress=10)
    thread = manager._reporter
    manager.stop_reports()
    held.go.set()
    assert store.get(task_id).progress == 10  # applied by the stop, not by a read
    thread.join(5)
    assert not thread.is_alive()
    manager.update_task(task_id, progress=20)  # after the stop: applied in the caller
    assert store.get(task_id).progress == 20


async def test_the_app_applies_the_last_reports_before_its_store_closes(tmp_path, monkeypatch):
    held = _HeldReporter(monkeypatch)
    db = tmp_path / "tasks.db"
    app = create_app(Settings(store_url=f"sqlite:///{db}", data_dir=tmp_path))
    async with running(app):
        manager = app.state.manager
        task_id = _processing(manager)
        await anyio.to_thread.run_sync(lambda: manager.update_task(task_id, progress=77, message="last words"))
        assert manager._reports  # still queued as the server stops
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
            answer = await http.get(f"/api/graph/task/{task_id}")
            assert answer.status_code == 200, answer.text
            assert answer.json()["data"]["progress"] == 77
        manager.update_task(task_id, progress=78, message="really last")
    held.go.set()
    store = open_store(f"sqlite:///{db}")
    try:
        task = store.get(task_id)
        assert (task.progress, task.message) == (78, "really last")
    finally:
        store.close()
