"""Shared fixtures: settings, an in-process client with the lifespan running, and a real uvicorn."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from server.app import TaskmonApp, create_app
from server.cli import Server, uvicorn_config
from server.settings import Settings

IN_CI = bool(os.environ.get("CI"))

# The task object's keys in wire order: MiroFish's Task.to_dict(), then our `version` (PROTOCOL.md).
MIROFISH_KEYS = [
    "task_id",
    "task_type",
    "status",
    "created_at",
    "updated_at",
    "progress",
    "message",
    "progress_detail",
    "result",
    "error",
    "metadata",
]
# v1.1's keys follow `version` (PROTOCOL.md, "Additions being built")
V11_KEYS = ["started_at", "finished_at", "rate", "eta_s", "stale", "cancel_requested", "lease_s"]
TASK_KEYS = [*MIROFISH_KEYS, "version", *V11_KEYS]


class FakeClock:
    """A clock the test moves by hand (``TaskManager(clock=...)``): timing logic without sleeping."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def require_tool(path_or_name: str, why: str) -> str:
    """The tool's path; skips locally when it is missing, fails loudly in CI (CI must run everything)."""
    found = shutil.which(path_or_name)
    if found:
        return found
    message = f"{path_or_name} is not installed ({why})"
    if IN_CI:
        pytest.fail(message + "; .ci/run must install it")
    pytest.skip(message)


def updated(manager: Any, task_id: str, **fields: Any) -> Any:
    """``update_task`` (it returns nothing, as MiroFish's did), then the snapshot it made."""
    manager.update_task(task_id, **fields)
    task = manager.get_task(task_id)
    assert task is not None
    return task


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        store_url="memory://",
        data_dir=tmp_path / "data",
        heartbeat_s=15.0,
        retry_ms=1500,
        cleanup_interval_s=3600,
    )


@asynccontextmanager
async def running(app: TaskmonApp) -> AsyncIterator[TaskmonApp]:
    """The app with its lifespan running (what uvicorn would do), for in-process tests."""
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[TaskmonApp]:
    async with running(create_app(settings)) as started:
        yield started


@pytest.fixture
async def client(app: TaskmonApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        http.app = app  # type: ignore[attr-defined]
        yield http


class LiveServer:
    """A real uvicorn serving ``create_app(settings)`` in a thread, on a fixed free port.

    ``stop()`` then ``start()`` restarts it on the same port with a fresh app (same settings, so a
    sqlite store survives), as a browser would see a server restart."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings if settings.port != 8000 else settings.with_changes(port=free_port())
        self.url = f"http://127.0.0.1:{self.settings.port}"
        self.app: TaskmonApp | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def manager(self) -> Any:
        assert self.app is not None
        return self.app.state.manager

    def _config(self, app: TaskmonApp) -> Any:
        """The uvicorn config to serve ``app`` with (a subclass may wrap the app, e.g. in a proxy)."""
        return uvicorn_config(app, self.settings)

    async def start(self) -> None:
        self.app = create_app(self.settings)
        self._server = Server(self._config(self.app), self.app)
        self._thread = threading.Thread(target=self._server.run, name="live-uvicorn", daemon=True)
        self._thread.start()
        with anyio.fail_after(10):
            while not self._server.started:
                if not self._thread.is_alive():
                    raise RuntimeError("uvicorn exited during start-up")
                await anyio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.request_stop()
        thread = self._thread
        await anyio.to_thread.run_sync(thread.join, 10)
        if thread.is_alive():
            raise RuntimeError("uvicorn did not stop within 10 s")
        self._server = None
        self._thread = None


@pytest.fixture
def live_server() -> Callable[[Settings], Any]:
    @asynccontextmanager
    async def start(settings: Settings) -> AsyncIterator[LiveServer]:
        server = LiveServer(settings)
        await server.start()
        try:
            yield server
        finally:
            await server.stop()

    return start


# -- a real redis-server (the redis:// store's tests) -----------------------------------------------

class RedisServer:
    """``redis-server`` on a free port in a tmp dir (``appendonly``: data survives a restart)."""

    def __init__(self, workdir: Path, appendonly: bool = False, port: int | None = None) -> None:
        self.binary = require_tool("redis-server", "the redis:// store's tests run a real Redis")
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.workdir), "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "always" if self.appendonly else "everysec", "--loglevel", "warning"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.02)  # polling a start-up condition under a deadline
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            if self.process.stderr is not None:
                self.process.stderr.close()
            self.process = None

    def flush(self) -> None:
        import redis

        with redis.Redis.from_url(self.url) as client:
            client.flushdb()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session (or REDIS_URL when given); tests flush it via ``redis_url``."""
    given = os.environ.get("REDIS_URL")
    if given:
        server = RedisServer.__new__(RedisServer)
        server.url = given
        server.port = int(given.rsplit(":", 1)[1].split("/")[0])
        server.process = None
        yield server
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flush()
    return redis_server.url
