"""Issue 11, "Also": a hypothesis state machine of TaskManager against a simple model.

Tasks are created, updated, cancelled, completed and failed (from the test thread and from several
producer threads at once, each owning its tasks so the outcome is deterministic); per-task and
all-tasks subscribers join and leave. Each example runs on its own event loop: publishes from the
loop's thread fan out synchronously, those from producer threads are waited for (the bus's
``published`` count) before the subscribers are drained. Invariants: every stored task equals the
model; per subscriber and task, versions strictly increase and nothing follows a terminal snapshot;
every subscriber's last event of a task equals the stored task."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from conftest import FakeClock, updated
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from server.bus import EventBus, Subscriber
from server.manager import TaskManager, TaskSubscription
from server.models import TRANSITIONS, TaskCancelled, TaskStateError, TaskStatus
from server.stores.memory import MemoryStore

QUEUE = 4  # a small subscriber buffer, so bursts coalesce


@dataclass
class Model:
    status: TaskStatus = TaskStatus.PENDING
    version: int = 1
    progress: int = 0
    message: str = ""
    cancel_requested: bool = False


@dataclass
class Watcher:
    subscriber: Subscriber
    subscription: TaskSubscription | None  # None: an all-tasks subscriber
    last: dict[str, dict[str, Any]] = field(default_factory=dict)  # task id -> last snapshot received


def _expect(model: Model, target: TaskStatus, cancel_check: bool) -> type[Exception] | None:
    """The error the manager must raise for a change to ``target`` (None: it succeeds)."""
    if cancel_check and model.cancel_requested and not target.is_terminal:
        return TaskCancelled
    if model.status.is_terminal or target not in TRANSITIONS[model.status]:
        return TaskStateError
    return None


class ManagerMachine(RuleBasedStateMachine):
    tasks = Bundle("tasks")
    watchers = Bundle("watchers")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()

        async def build() -> TaskManager:
            return TaskManager(MemoryStore(), EventBus(queue_size=QUEUE), clock=FakeClock())

        self.manager = self.loop.run_until_complete(build())
        self.model: dict[str, Model] = {}
        self.open: list[Watcher] = []
        self.published = 0  # changes made: the bus must have fanned out as many

    def teardown(self) -> None:
        for watcher in self.open:
            self.manager.bus.unsubscribe(watcher.subscriber)
        self.manager.bus.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    # -- helpers -------------------------------------------------------------------------------
    def _apply(self, task_id: str, change: dict[str, Any], target: TaskStatus, call: Any, cancel_check: bool) -> None:
        model = self.model[task_id]
        error = _expect(model, target, cancel_check)
        try:
            task = call()
        except (TaskStateError, TaskCancelled) as exc:
            assert error is not None and isinstance(exc, error), (exc, error)
        else:
            assert error is None, f"expected {error}"
            model.status = target
            model.version += 1
            model.progress = change.get("progress", 100 if target is TaskStatus.COMPLETED else model.progress)
            model.message = change.get("message", model.message)
            model.cancel_requested = (model.cancel_requested or change.get("cancel", False)) and not target.is_terminal
            assert task.version == model.version
            self.published += 1
        self._drain()

    def _drain(self) -> None:
        bus = self.manager.bus

        async def settle() -> None:
            with anyio.fail_after(10):
                while bus.changes_seen < self.published:
                    await anyio.lowlevel.checkpoint()

        self.loop.run_until_complete(settle())
        assert bus.changes_seen == self.published
        for watcher in self.open:
            assert not watcher.subscriber.overflowed  # drained every step: never that far behind
            events = watcher.subscriber.take()
            if watcher.subscription is not None:
                events = watcher.subscription.fresh(events)
            self._record(watcher, events)

    def _record(self, watcher: Watcher, events: list[Any]) -> None:
        for event in events:
            if event.kind != "task":
                continue
            previous = watcher.last.get(event.task_id)
            if previous is not None:
                assert event.version > previous["version"], "versions strictly increase per subscriber"
                assert not TaskStatus(previous["status"]).is_terminal, "terminal is final"
            watcher.last[event.task_id] = event.task

    # -- rules ---------------------------------------------------------------------------------
    @rule(target=tasks, task_type=st.sampled_from(["build", "import"]))
    def create(self, task_type: str) -> str:
        task = self.manager.create_task(task_type, {"n": len(self.model)})
        self.model[task.task_id] = Model()
        self.published += 1
        self._drain()
        return task.task_id

    @rule(
        task_id=tasks,
        progress=st.integers(0, 100),
        message=st.text(max_size=5),
        status=st.sampled_from([None, TaskStatus.PROCESSING, TaskStatus.PENDING, TaskStatus.COMPLETED]),
    )
    def update(self, task_id: str, progress: int, message: str, status: TaskStatus | None) -> None:
        target = status or self.model[task_id].status
        change = {"progress": progress, "message": message}
        call = lambda: updated(self.manager, task_id, status=status, progress=progress, message=message)
        self._apply(task_id, change, target, call, cancel_check=not target.is_terminal)

    @rule(task_id=tasks)
    def complete(self, task_id: str) -> None:
        call = lambda: self.manager.complete_task(task_id, {"ok": True})
        self._apply(task_id, {"message": "Task completed"}, TaskStatus.COMPLETED, call, cancel_check=False)

    @rule(task_id=tasks, error=st.sampled_from(["boom", "cancelled"]))
    def fail(self, task_id: str, error: str) -> None:
        call = lambda: self.manager.fail_task(task_id, error)
        self._apply(task_id, {"message": "Task failed"}, TaskStatus.FAILED, call, cancel_check=False)

    @rule(task_id=tasks)
    def cancel(self, task_id: str) -> None:
        target = self.model[task_id].status
        call = lambda: self.manager.cancel_task(task_id)
        self._apply(task_id, {"cancel": True}, target, call, cancel_check=False)

    @rule(task_ids=st.lists(tasks, unique=True, max_size=4), steps=st.integers(1, 12), finish=st.booleans())
    def producers(self, task_ids: list[str], steps: int, finish: bool) -> None:
        """One thread per live, uncancelled task: ``steps`` progress reports, then maybe completion."""
        mine = [t for t in task_ids if not self.model[t].status.is_terminal and not self.model[t].cancel_requested]
        failures: list[BaseException] = []

        def produce(task_id: str) -> None:
            try:
                for step in range(1, steps + 1):
                    self.manager.update_task(task_id, status=TaskStatus.PROCESSING, progress=step, message=f"s{step}")
                if finish:
                    self.manager.complete_task(task_id)
            except Exception as exc:  # handed to the test thread, which fails on it
                failures.append(exc)

        threads = [threading.Thread(target=produce, args=(t,)) for t in mine]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive()
        assert not failures, failures
        for task_id in mine:
            model = self.model[task_id]
            model.status = TaskStatus.COMPLETED if finish else TaskStatus.PROCESSING
            model.version += steps + finish
            model.progress = 100 if finish else steps
            model.message = "Task completed" if finish else f"s{steps}"
            self.published += steps + finish
        self._drain()

    @rule(target=watchers, task_id=tasks)
    def join_task(self, task_id: str) -> Watcher:
        subscription = self.loop.run_until_complete(self.manager.open_subscription(task_id))
        watcher = Watcher(subscription.subscriber, subscription)
        self._record(watcher, subscription.take_initial())
        self.open.append(watcher)
        self._drain()
        return watcher

    @rule(target=watchers)
    def join_all(self) -> Watcher:
        watcher = Watcher(self.manager.bus.subscribe(None), None)
        self.open.append(watcher)
        return watcher

    @rule(watcher=consumes(watchers))
    def leave(self, watcher: Watcher) -> None:
        self.manager.bus.unsubscribe(watcher.subscriber)
        self.open.remove(watcher)
        assert watcher.subscriber not in set(self.manager.bus.subscribers())

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def stored_tasks_equal_the_model(self) -> None:
        for task_id, model in self.model.items():
            task = self.manager.get_task(task_id)
            assert task is not None
            assert (task.status, task.version, task.progress, task.message, task.cancel_requested) == (
                model.status,
                model.version,
                model.progress,
                model.message,
                model.cancel_requested,
            )

    @invariant()
    def every_subscribers_last_event_is_the_stored_task(self) -> None:
        for watcher in self.open:
            if watcher.subscription is not None:  # it opened with a snapshot: it always has one
                assert set(watcher.last) == {watcher.subscription.task_id}
            for task_id, last in watcher.last.items():
                task = self.manager.get_task(task_id)
                assert task is not None
                assert last == self.manager.wire(task)

    @invariant()
    def subscribers_are_exactly_the_open_watchers(self) -> None:
        assert self.manager.bus.open_streams == len(self.open)


ManagerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestManagerMachine = ManagerMachine.TestCase
