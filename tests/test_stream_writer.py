"""The stream writer (server/streams.py ``_Stream``) with fake ``send`` callables.

The shape of starlette's tests/test_responses.py: the app is called directly with a fake
``receive``/``send``, the lifespan running. Each fake records, per message, which asyncio task was
running when the message was *completed*: ``None`` means the bus's flush wrote it by driving the
send by hand (the direct-write fast path); the stream's own task means the stream's coroutine
awaited it (the fallback, and the slow-reader path once a driven send blocks).

Run on asyncio's own loop and on uvloop (what uvicorn uses): the fast path relies on the coroutine
protocol of both loops' futures (a suspended send yields the future it waits on, and resumes once
that future is done), and these tests fail if that ever changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import anyio
import pytest
import uvicorn

from conftest import running
from server.app import TaskmonApp, create_app
from server.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[pytest.param({}, id="asyncio"), pytest.param({"use_uvloop": True}, id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return "asyncio", request.param


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[TaskmonApp]:
    async with running(create_app(settings)) as started:
        yield started


class Recorder:
    """What a fake send saw: messages, and the task that was current when each one completed."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.completed_in: list[asyncio.Task[Any] | None] = []

    def record(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self.completed_in.append(asyncio.current_task())

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """(event name, data) of every complete SSE event written so far."""
        found = []
        for block in self.body.decode().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if "data" in fields:
                found.append((fields.get("event", "message"), json.loads(fields["data"])))
        return found

    def versions(self) -> list[int]:
        return [data["version"] for name, data in self.events() if name == "task"]

    @property
    def closed(self) -> bool:
        last = self.messages[-1] if self.messages else {}
        return last.get("type") == "http.response.body" and not last.get("more_body", False)


class Client:
    """The ASGI conversation for one stream request: ``app(scope, receive, send)`` as a task."""

    def __init__(self, app: TaskmonApp, send: Callable[[dict[str, Any]], Any], path: str) -> None:
        self.app = app
        self.send = send
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"localhost")],
            "client": ("127.0.0.1", 1),
            "server": ("taskmon.test", 80),
        }
        self.gone = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self.app(self.scope, self.receive, self.send))
        return self.task


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await asyncio.sleep(0)


def manager(app: TaskmonApp) -> Any:
    return app.state.manager


async def test_a_send_that_completes_at_once_is_driven_from_the_flush(app: TaskmonApp) -> None:
    seen = Recorder()

    async def send(message: dict[str, Any]) -> None:
        seen.record(message)

    task_id = manager(app).create_task("demo").task_id
    client = Client(app, send, f"/tasks/{task_id}/stream")
    stream_task = client.start()
    await until(lambda: seen.versions() == [1])
    for progress in (10, 20):
        manager(app).update_task(task_id, status="processing", progress=progress)
        await until(lambda: seen.versions()[-1:] == [1 + progress // 10])
    manager(app).complete_task(task_id, {"ok": True})
    with anyio.fail_after(5):
        await stream_task
    assert seen.versions() == [1, 2, 3, 4]
    assert seen.events()[-1] == ("end", {"task_id": task_id, "status": "completed"})
    assert seen.closed
    # start + opening chunk from the stream's task; every live chunk written by the flush itself
    live = [i for i, m in enumerate(seen.messages) if m.get("more_body") and i > 1]
    assert live and all(seen.completed_in[i] is None for i in live), seen.completed_in
    assert manager(app).bus.open_streams == 0


async def test_a_send_that_suspends_hands_over_to_the_stream_and_coalesces(app: TaskmonApp) -> None:
    """The slow reader: the first live send blocks; later events wait, then go as one chunk."""
    seen = Recorder()
    gate = asyncio.Event()
    started: list[bytes] = []
    started_in: list[asyncio.Task[Any] | None] = []

    async def send(message: dict[str, Any]) -> None:
        started.append(message.get("body", b""))
        started_in.append(asyncio.current_task())
        if len(started) == 3:  # the first live chunk (after start and the opening chunk)
            await gate.wait()  # an asyncio future, as uvicorn's flow control waits on one
        seen.record(message)

    task_id = manager(app).create_task("demo").task_id
    client = Client(app, send, f"/tasks/{task_id}/stream")
    stream_task = client.start()
    await until(lambda: seen.versions() == [1])
    manager(app).update_task(task_id, status="processing", progress=1)
    await until(lambda: len(started) == 3)  # the driven send is blocked on the gate
    bus = manager(app).bus
    for progress in range(2, 6):
        manager(app).update_task(task_id, progress=progress)
        await until(lambda: not bus.ready)  # the flush ran and offered the stream its events ...
    assert len(started) == 3, "a delivery started while a send was blocked"  # ... which it kept
    assert seen.versions() == [1]
    gate.set()
    await until(lambda: seen.versions()[-1:] == [6])
    # the blocked send was started by the flush and finished by the stream's own task (the
    # slow-reader path), which then wrote the rest itself ...
    assert started_in[2] is None
    assert seen.completed_in[2] is stream_task
    # ... and what gathered meanwhile went out as one chunk, in order
    assert seen.versions() == [1, 2, 3, 4, 5, 6]
    assert len(started) == 4
    client.gone.set()
    with anyio.fail_after(5):
        await stream_task
    assert seen.closed
    assert manager(app).bus.open_streams == 0


class EmptyAwaitable:
    """Like granian's PyEmptyAwaitable: awaitable, done at once, and not a coroutine."""

    def __await__(self) -> Generator[Any, None, None]:
        return iter(())


async def test_a_send_returning_a_non_coroutine_awaitable_is_awaited(app: TaskmonApp) -> None:
    seen = Recorder()
    stream_tasks: list[asyncio.Task[Any] | None] = []

    def send(message: dict[str, Any]) -> EmptyAwaitable:
        seen.record(message)
        stream_tasks.append(asyncio.current_task())  # called from the stream's task, never the flush
        return EmptyAwaitable()

    task_id = manager(app).create_task("demo").task_id
    client = Client(app, send, f"/tasks/{task_id}/stream")
    stream_task = client.start()
    await until(lambda: seen.versions() == [1])
    manager(app).update_task(task_id, status="processing", progress=50)
    await until(lambda: seen.versions() == [1, 2])
    manager(app).fail_task(task_id, "boom")
    with anyio.fail_after(5):
        await stream_task
    assert seen.versions() == [1, 2, 3]
    assert seen.events()[-1] == ("end", {"task_id": task_id, "status": "failed"})
    assert seen.closed
    assert manager(app).bus.open_streams == 0


async def test_a_send_returning_a_non_coroutine_awaitable_serves_the_all_tasks_stream(app: TaskmonApp) -> None:
    seen = Recorder()

    def send(message: dict[str, Any]) -> EmptyAwaitable:
        seen.record(message)
        return EmptyAwaitable()

    client = Client(app, send, "/tasks/stream")
    stream_task = client.start()
    await until(lambda: [name for name, _ in seen.events()] == ["snapshot"])
    task_id = manager(app).create_task("demo").task_id
    await until(lambda: len(seen.events()) == 2)
    assert seen.events()[1] == ("task", json.loads(json.dumps(manager(app).get_task(task_id).to_dict())))
    client.gone.set()
    with anyio.fail_after(5):
        await stream_task
    assert seen.closed
    assert manager(app).bus.open_streams == 0


@pytest.mark.parametrize("error", [OSError, RuntimeError])
@pytest.mark.parametrize("returns", ["coroutine", "awaitable"])
async def test_a_send_that_raises_ends_the_stream(
    app: TaskmonApp, caplog: pytest.LogCaptureFixture, error: type[Exception], returns: str
) -> None:
    """A failing live write ends the stream and frees its subscription; only a non-OSError is an error log."""
    calls: list[dict[str, Any]] = []

    def fail_on_live_chunk(message: dict[str, Any]) -> None:
        calls.append(message)
        if len(calls) == 3:
            raise error("the client is gone")

    async def coroutine_send(message: dict[str, Any]) -> None:
        fail_on_live_chunk(message)

    def awaitable_send(message: dict[str, Any]) -> EmptyAwaitable:
        fail_on_live_chunk(message)
        return EmptyAwaitable()

    task_id = manager(app).create_task("demo").task_id
    client = Client(app, coroutine_send if returns == "coroutine" else awaitable_send, f"/tasks/{task_id}/stream")
    caplog.set_level(logging.DEBUG, logger="server.streams")
    stream_task = client.start()
    await until(lambda: len(calls) == 2)
    manager(app).update_task(task_id, status="processing", progress=1)
    with anyio.fail_after(5):
        await stream_task  # never raises to the server
    assert len(calls) == 3  # nothing written after the failure
    assert manager(app).bus.open_streams == 0
    records = [r for r in caplog.records if r.name == "server.streams"]
    if error is OSError:
        assert [r.levelno for r in records] == [logging.DEBUG]
    else:
        assert [r.levelno for r in records] == [logging.ERROR]
        assert records[0].exc_info is not None
    # the bus carries on for everyone else
    manager(app).update_task(task_id, progress=2)


async def open_stream(app: TaskmonApp) -> tuple[Recorder, asyncio.Task[None]]:
    seen = Recorder()

    async def send(message: dict[str, Any]) -> None:
        seen.record(message)

    task_id = manager(app).create_task("demo").task_id
    stream_task = Client(app, send, f"/tasks/{task_id}/stream").start()
    await until(lambda: seen.versions() == [1])
    return seen, stream_task


async def test_the_lifespan_shutdown_ends_open_streams(settings: Settings) -> None:
    """What a server that sends the lifespan shutdown before it drains gets: every stream ends."""
    app = create_app(settings)
    async with running(app):
        seen, stream_task = await open_stream(app)
        assert not stream_task.done()
    with anyio.fail_after(5):
        await stream_task
    assert seen.closed


async def test_request_shutdown_from_another_thread_ends_open_streams(app: TaskmonApp) -> None:
    seen, stream_task = await open_stream(app)
    await anyio.to_thread.run_sync(app.request_shutdown)
    with anyio.fail_after(5):
        await stream_task
    assert seen.closed
    assert manager(app).bus.open_streams == 0


async def test_uvicorns_exit_flag_ends_open_streams(settings: Settings) -> None:
    """uvicorn sets Server.should_exit on SIGTERM and only then waits for connections: the app finds
    that Server from the SIGTERM handler (as sse-starlette does) and ends its streams itself."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app))
    previous = signal.signal(signal.SIGTERM, server.handle_exit)  # what uvicorn's capture_signals does
    try:
        async with running(app):
            seen, stream_task = await open_stream(app)
            server.should_exit = True  # what uvicorn's handle_exit does
            with anyio.fail_after(2):
                await stream_task
            assert seen.closed
    finally:
        signal.signal(signal.SIGTERM, previous)
