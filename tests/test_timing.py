"""PROTOCOL v1.1 timing on the TaskManager with a fake clock: started/finished, rate and ETA, stale
(computed on reads, announced on the streams, recovered by the next change) and the lease, plus the
same keys over HTTP (legacy keys untouched, every response carries the v1.1 keys)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import httpx
import pytest
from conftest import MIROFISH_KEYS, TASK_KEYS, V11_KEYS, FakeClock, running, updated

from server.app import create_app
from server.bus import EventBus
from server.manager import MAX_LEASE_S, TaskManager
from server.models import RATE_WINDOW, TaskStateError, TaskStatus
from server.settings import Settings
from server.stores.memory import MemoryStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def manager(clock: FakeClock) -> TaskManager:
    bus = EventBus(queue_size=64)
    manager = TaskManager(MemoryStore(), bus, clock=clock, stale_after_s=300.0, cancel_grace_s=60.0)
    bus.hook = manager.recover_stale  # as the app's lifespan wires it
    return manager


def _dt(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


# ------------------------------------------------------------------------------ started / finished


async def test_started_and_finished_are_set_once_and_never_move(manager, clock):
    task = manager.create_task("import")
    assert task.started_at is None and task.finished_at is None
    clock.advance(7)
    started = updated(manager, task.task_id, status="processing", message="go")
    assert started.started_at == clock.now and started.finished_at is None
    for step in range(1, 6):
        clock.advance(3)
        later = updated(manager, task.task_id, progress=step * 10, status="processing")
        assert later.started_at == started.started_at  # staying in processing does not restart it
        assert later.finished_at is None
    clock.advance(4)
    done = manager.complete_task(task.task_id, {"rows": 3})
    assert done.started_at == started.started_at
    assert done.finished_at == clock.now == done.updated_at
    clock.advance(100)
    with pytest.raises(TaskStateError):
        manager.update_task(task.task_id, progress=5)
    again = manager.get_task(task.task_id)
    assert again is not None and again.finished_at == done.finished_at and again.started_at == started.started_at
    wire = again.to_dict()
    assert _dt(wire["started_at"]) == started.started_at and _dt(wire["finished_at"]) == done.finished_at


async def test_a_task_failed_while_pending_finishes_without_starting(manager, clock):
    task = manager.create_task("import")
    clock.advance(2)
    failed = manager.fail_task(task.task_id, "no input")
    assert failed.started_at is None and failed.finished_at == clock.now
    assert failed.rate is None and failed.eta_s is None


# ------------------------------------------------------------------------------ rate and ETA


def _run_linear(manager: TaskManager, clock: FakeClock, speed: float, every_s: float, updates: int) -> tuple[str, float]:
    """A task that progresses at ``speed`` points per second, reporting every ``every_s`` seconds
    (integer progress, so each report is rounded down as a real producer's would be)."""
    task = manager.create_task("linear")
    clock.advance(30)  # queued for a while: that time must not count in its pace
    manager.update_task(task.task_id, status="processing")
    elapsed = 0.0
    for _ in range(updates):
        clock.advance(every_s)
        elapsed += every_s
        manager.update_task(task.task_id, progress=int(speed * elapsed), message=f"{elapsed:.0f} s in")
    return task.task_id, elapsed


@pytest.mark.parametrize(("speed", "every_s"), [(0.7, 3.0), (2.0, 1.5), (0.05, 60.0)])
async def test_eta_of_a_linear_task_is_within_20_percent(manager, clock, speed, every_s):
    task_id, elapsed = _run_linear(manager, clock, speed, every_s, updates=5)
    task = manager.get_task(task_id)
    assert task is not None and task.rate is not None and task.eta_s is not None
    truth = 100 / speed - elapsed  # seconds still to go at the true pace
    assert abs(task.eta_s - truth) <= 0.2 * truth, (task.eta_s, truth)
    assert abs(task.rate - speed) <= 0.2 * speed
    wire = task.to_dict()
    assert wire["rate"] == task.rate and wire["eta_s"] == task.eta_s


async def test_eta_follows_a_change_of_pace(manager, clock):
    task_id, _ = _run_linear(manager, clock, 2.0, 1.0, updates=10)  # 20 points in 10 s
    progress = 20
    for _ in range(RATE_WINDOW):  # then slows to 0.5 points per second
        clock.advance(2)
        progress += 1
        manager.update_task(task_id, progress=progress)
    task = manager.get_task(task_id)
    assert task is not None and task.eta_s is not None
    truth = (100 - progress) / 0.5
    assert abs(task.eta_s - truth) <= 0.2 * truth, (task.eta_s, truth)


async def test_rate_and_eta_are_null_for_a_task_that_does_not_move(manager, clock):
    task = manager.create_task("stuck")
    created = task.to_dict()
    assert created["rate"] is None and created["eta_s"] is None  # too little data
    manager.update_task(task.task_id, status="processing")
    for step in range(RATE_WINDOW + 3):
        clock.advance(5)
        now = updated(manager, task.task_id, message=f"still working ({step})")
        assert now.rate is None and now.eta_s is None


async def test_rate_falls_to_null_once_progress_stops_for_a_whole_window(manager, clock):
    task_id, _ = _run_linear(manager, clock, 1.0, 2.0, updates=4)
    moving = manager.get_task(task_id)
    assert moving is not None and moving.rate is not None
    for _ in range(RATE_WINDOW):
        clock.advance(2)
        still = updated(manager, task_id, message="waiting on the backend")
    assert still.rate is None and still.eta_s is None


async def test_eta_is_null_once_finished(manager, clock):
    task_id, _ = _run_linear(manager, clock, 1.0, 2.0, updates=5)
    live = manager.get_task(task_id)
    assert live is not None and live.eta_s is not None
    clock.advance(2)
    done = manager.complete_task(task_id, {})
    assert done.eta_s is None and done.to_dict()["eta_s"] is None
    task_id, _ = _run_linear(manager, clock, 1.0, 2.0, updates=5)
    failed = manager.fail_task(task_id, "boom")
    assert failed.eta_s is None


# ------------------------------------------------------------------------------ stale


def _kinds(subscriber) -> list[tuple[str, dict]]:
    return [(e.kind, json.loads(e.body)) for e in subscriber.take()]


async def test_a_quiet_task_becomes_stale_and_recovers_on_its_next_update(manager, clock):
    bus = manager.bus
    task = manager.create_task("quiet")
    manager.update_task(task.task_id, status="processing", progress=10)
    one = bus.subscribe(task.task_id)
    every = bus.subscribe(None)

    clock.advance(300)  # exactly the threshold: not yet
    assert manager.mark_stale(manager.store.live()) == []
    assert manager.wire(manager.get_task(task.task_id))["stale"] is False
    assert one.take() == [] and every.take() == []

    clock.advance(1)
    assert manager.mark_stale(manager.store.live()) == [task.task_id]
    snapshot = manager.get_task(task.task_id)
    assert manager.wire(snapshot)["stale"] is True  # what the snapshot GETs and stream openings send
    assert snapshot.version == 2  # computed, not a change
    expected = ("stale", {"task_id": task.task_id, "stale": True})
    assert _kinds(one) == [expected] and _kinds(every) == [expected]

    clock.advance(600)  # announced once, not at every monitor tick
    assert manager.mark_stale(manager.store.live()) == []
    assert one.take() == [] and every.take() == []

    changed = updated(manager, task.task_id, progress=20)
    recovered = ("stale", {"task_id": task.task_id, "stale": False})
    for subscriber in (one, every):
        events = _kinds(subscriber)
        assert [k for k, _ in events] == ["stale", "task"]
        assert events[0] == recovered  # the recovery comes first, then the change itself
        assert events[1][1]["version"] == changed.version and events[1][1]["stale"] is False
    assert manager.wire(manager.get_task(task.task_id))["stale"] is False

    clock.advance(301)  # and it can become stale again
    assert manager.mark_stale(manager.store.live()) == [task.task_id]


async def test_finished_tasks_are_never_stale_and_a_stale_task_that_ends_recovers(manager, clock):
    bus = manager.bus
    done = manager.create_task("done")
    manager.fail_task(done.task_id, "over")
    live = manager.create_task("live")
    every = bus.subscribe(None)
    clock.advance(10_000)
    assert manager.mark_stale(manager.store.live()) == [live.task_id]
    assert manager.wire(manager.get_task(done.task_id))["stale"] is False
    every.take()
    manager.fail_task(live.task_id, "gave up")
    assert [k for k, _ in _kinds(every)] == ["stale", "task"]
    assert manager.wire(manager.get_task(live.task_id))["stale"] is False


# ------------------------------------------------------------------------------ lease


async def test_a_task_with_no_update_for_its_lease_is_failed_by_the_sweep(manager, clock):
    task = manager.create_task("leased", lease_s=30)
    assert task.lease_s == 30.0 and task.to_dict()["lease_s"] == 30.0
    other = manager.create_task("unleased")
    clock.advance(29)
    manager.update_task(task.task_id, status="processing", progress=5)  # an update renews it
    clock.advance(29)
    assert manager.sweep() == {"lease": [], "cancel": [], "interrupted": []}
    clock.advance(2)
    assert manager.sweep() == {"lease": [task.task_id], "cancel": [], "interrupted": []}
    failed = manager.get_task(task.task_id)
    assert failed is not None and failed.status is TaskStatus.FAILED
    assert failed.error == "no update for 30 s"
    assert failed.finished_at == clock.now
    clock.advance(7 * 24 * 3600)  # without a lease a task is never failed for being quiet
    assert manager.sweep() == {"lease": [], "cancel": [], "interrupted": []}
    assert manager.get_task(other.task_id).status is TaskStatus.PENDING


async def test_fractional_lease_message(manager, clock):
    task = manager.create_task("leased", lease_s=2.5)
    clock.advance(3)
    manager.sweep()
    assert manager.get_task(task.task_id).error == "no update for 2.5 s"


async def test_the_server_default_lease_applies_when_none_is_given(clock):
    manager = TaskManager(MemoryStore(), None, clock=clock, default_lease_s=60.0)
    default = manager.create_task("producer")
    own = manager.create_task("explicit", lease_s=5)
    job = manager.create_task("graph_build", owned=True)  # our own pool's job may wait queued
    assert default.lease_s == 60.0 and own.lease_s == 5.0 and job.lease_s is None
    clock.advance(61)
    assert sorted(manager.sweep()["lease"]) == sorted([default.task_id, own.task_id])
    assert manager.get_task(default.task_id).error == "no update for 60 s"
    assert manager.get_task(job.task_id).status is TaskStatus.PENDING


async def test_leases_are_off_by_default(clock):
    assert Settings().lease_s is None
    assert Settings.from_env({"TASKMON_LEASE_S": "90"}).lease_s == 90.0
    manager = TaskManager(MemoryStore(), None, clock=clock)
    task = manager.create_task("producer")
    assert task.lease_s is None
    clock.advance(30 * 24 * 3600)
    assert manager.sweep() == {"lease": [], "cancel": [], "interrupted": []}


@pytest.mark.parametrize("lease_s", [0, -1, 0.0, MAX_LEASE_S + 1, "30", True, [30], {"s": 30}])
async def test_bad_lease_on_post_is_400_and_creates_nothing(client, lease_s):
    response = await client.post("/api/tasks", json={"task_type": "x", "lease_s": lease_s})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["success"] is False and "lease_s" in body["error"]
    assert (await client.get("/api/graph/tasks")).json()["count"] == 0


@pytest.mark.parametrize(("lease_s", "stored"), [(1, 1.0), (0.5, 0.5), (MAX_LEASE_S, MAX_LEASE_S), (None, None)])
async def test_good_lease_on_post(client, lease_s, stored):
    response = await client.post("/api/tasks", json={"task_type": "x", "lease_s": lease_s})
    assert response.status_code == 201, response.text
    assert response.json()["data"]["lease_s"] == stored


@asynccontextmanager
async def _client(settings: Settings, **changes) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.with_changes(**changes))
    async with running(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as http:
        yield http


async def test_the_configured_default_lease_applies_over_http(settings):
    async with _client(settings, lease_s=120.0) as http:
        default = (await http.post("/api/tasks", json={"task_type": "x"})).json()["data"]
        given = (await http.post("/api/tasks", json={"task_type": "x", "lease_s": 10})).json()["data"]
    assert default["lease_s"] == 120.0 and given["lease_s"] == 10.0


# ------------------------------------------------------------------------------ the wire, over HTTP


async def test_every_response_carries_the_v11_keys_after_the_legacy_ones(client):
    created = await client.post("/api/tasks", json={"task_type": "import", "metadata": {"k": 1}})
    assert created.status_code == 201
    data = created.json()["data"]
    assert list(data) == TASK_KEYS
    assert list(data)[:11] == MIROFISH_KEYS and list(data)[11] == "version" and list(data)[12:] == V11_KEYS
    assert {k: data[k] for k in V11_KEYS} == {
        "started_at": None,
        "finished_at": None,
        "rate": None,
        "eta_s": None,
        "stale": False,
        "cancel_requested": False,
        "lease_s": None,
    }
    task_id = data["task_id"]
    patched = (await client.patch(f"/api/tasks/{task_id}", json={"status": "processing"})).json()["data"]
    assert list(patched) == TASK_KEYS and patched["started_at"] is not None
    # legacy keys keep their types and meaning
    assert patched["status"] == "processing" and patched["progress"] == 0 and patched["metadata"] == {"k": 1}
    moved = (await client.patch(f"/api/tasks/{task_id}", json={"progress": 40})).json()["data"]
    assert moved["started_at"] == patched["started_at"]
    got = (await client.get(f"/api/graph/task/{task_id}")).json()["data"]
    assert list(got) == TASK_KEYS and got == moved
    listed = (await client.get("/api/graph/tasks")).json()["data"]
    assert [list(t) for t in listed] == [TASK_KEYS]
    done = (await client.patch(f"/api/tasks/{task_id}", json={"status": "completed", "result": {}})).json()["data"]
    assert done["finished_at"] == done["updated_at"] and done["eta_s"] is None and done["started_at"] == patched["started_at"]
    assert done["progress"] == 100


async def test_a_replay_to_a_stale_task_ends_with_stale_true(manager, clock):
    task = manager.create_task("quiet")
    manager.update_task(task.task_id, status="processing")
    manager.update_task(task.task_id, progress=10)
    clock.advance(301)
    manager.mark_stale(manager.store.live())
    async with manager.subscribe(task.task_id, after=1) as replay:
        events = [(e.kind, e.version, json.loads(e.body)) for e in replay.take_initial()]
    assert [(k, v) for k, v, _ in events] == [("task", 2), ("task", 3), ("stale", 0)]
    assert events[-1][2] == {"task_id": task.task_id, "stale": True}  # the logged snapshots say false
    async with manager.subscribe(task.task_id) as fresh:
        [snapshot] = fresh.take_initial()
    assert snapshot.task["stale"] is True
    seen = []
    async with manager.subscribe(task.task_id, after=1) as python_consumer:  # Python consumers get tasks only
        async for snapshot_task in python_consumer:
            seen.append(snapshot_task.version)
            if snapshot_task.version == 3:
                manager.complete_task(task.task_id, {})
    assert seen == [2, 3, 4]


async def test_an_update_that_lands_while_the_sweep_decides_renews_the_lease(manager, clock, monkeypatch):
    task = manager.create_task("leased", lease_s=30)
    clock.advance(31)
    judged = manager.store.live()  # the sweep's view: quiet for 31 s
    manager.update_task(task.task_id, status="processing")  # ... and the producer reports just then
    monkeypatch.setattr(manager.store, "live", lambda: judged)
    assert manager.sweep() == {"lease": [], "cancel": [], "interrupted": []}
    assert manager.get_task(task.task_id).status is TaskStatus.PROCESSING
