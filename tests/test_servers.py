"""taskmon under every common ASGI server, each a real subprocess on a free port (README, "Run it
under your server / inside your app", one command per row).

Per server: a per-task stream delivers the snapshot, the changes made through the producer API and
``end``; the all-tasks stream delivers its snapshot and a new task; then SIGTERM with 20 open streams
ends the process within 5 s. The servers boot in parallel (one module fixture starts them all), so
each case costs its own checks plus its server's shutdown.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from conftest import free_port

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
STREAMS = 20
EXIT_WITHIN = 5.0


def command(name: str, port: int) -> list[str]:
    """The command line the README gives for ``name``, on ``port``."""
    host = "127.0.0.1"
    return {
        "taskmon serve": [PY, "-m", "server", "serve", "--host", host, "--port", str(port)],
        "uvicorn": [PY, "-m", "uvicorn", "--factory", "server.app:create_app", "--host", host, "--port", str(port)],
        "gunicorn": [
            PY, "-m", "gunicorn", "-k", "uvicorn_worker.UvicornWorker", "--bind", f"{host}:{port}",
            "server.app:create_app()",
        ],
        # hypercorn gives an app no word before it drains: its --graceful-timeout (default 3 s) bounds the wait
        "hypercorn": [PY, "-m", "hypercorn", "--bind", f"{host}:{port}", "server.app:create_app()"],
        # neither does granian: --workers-kill-timeout bounds it (default: wait forever)
        "granian": [
            PY, "-m", "granian", "--interface", "asgi", "--factory", "--host", host, "--port", str(port),
            "--workers-kill-timeout", "2", "server.app:create_app",
        ],
    }[name]


SERVERS = ["taskmon serve", "uvicorn", "gunicorn", "hypercorn", "granian"]
# uvicorn (CLI, taskmon serve, gunicorn's worker) lets the app end its streams cleanly on SIGTERM;
# hypercorn and granian cut them when their timeout runs out.
CLEAN_END = {"taskmon serve", "uvicorn", "gunicorn"}


@dataclass
class Booted:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Booted]]:
    """Every server of the matrix, started at once (they boot in parallel)."""
    tmp = tmp_path_factory.mktemp("servers")
    booted: dict[str, Booted] = {}
    for name in SERVERS:
        port = free_port()
        slug = name.replace(" ", "-")
        env = {
            **os.environ,
            "TASKMON_STORE": "memory://",
            "TASKMON_DATA_DIR": str(tmp / slug),
            "PYTHONPATH": str(ROOT),
        }
        log = tmp / f"{slug}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command(name, port), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        booted[name] = Booted(name, process, f"http://127.0.0.1:{port}", port, log)
    try:
        yield booted
    finally:
        for server in booted.values():
            if server.process.poll() is None:
                server.process.kill()
            server.process.wait()


async def wait_healthy(server: Booted, http: httpx.AsyncClient, streams: int | None = None) -> None:
    try:
        with anyio.fail_after(30):
            while True:
                if server.process.poll() is not None:
                    raise AssertionError(f"{server.name} exited with {server.process.returncode}:\n{server.output()[-3000:]}")
                try:
                    health = (await http.get("/healthz")).json()
                    if health["status"] == "ok" and (streams is None or health["streams"] == streams):
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{server.name}: not ready (streams={streams}):\n{server.output()[-3000:]}") from None


async def create(http: httpx.AsyncClient) -> str:
    response = await http.post("/api/tasks", json={"task_type": "matrix"})
    assert response.status_code == 201, response.text
    return response.json()["data"]["task_id"]


async def follow_task(http: httpx.AsyncClient) -> None:
    """Snapshot, two changes made through the producer API while streaming, then ``end``."""
    task_id = await create(http)
    changes = [{"status": "processing", "progress": 40}, {"status": "completed", "result": {"n": 1}}]
    seen: list[tuple[str, Any]] = []
    with anyio.fail_after(10):
        async with aconnect_sse(http, "GET", f"/tasks/{task_id}/stream") as source:
            assert source.response.status_code == 200
            assert source.response.headers["content-type"].startswith("text/event-stream")
            async for event in source.aiter_sse():
                if not event.data:
                    continue  # the opening retry: block
                data = json.loads(event.data)
                seen.append((event.event, data.get("version", data.get("status"))))
                if event.event == "task" and changes:
                    response = await http.patch(f"/api/tasks/{task_id}", json=changes.pop(0))
                    assert response.status_code == 200, response.text
                if event.event == "end":
                    break
    assert seen == [("task", 1), ("task", 2), ("task", 3), ("end", "completed")]


async def follow_all(http: httpx.AsyncClient) -> None:
    with anyio.fail_after(10):
        async with aconnect_sse(http, "GET", "/tasks/stream") as source:
            events = source.aiter_sse()
            first = await anext(events)
            while not first.data:
                first = await anext(events)
            assert first.event == "snapshot"
            task_id = await create(http)
            async for event in events:
                if event.event == "task" and json.loads(event.data)["task_id"] == task_id:
                    break


async def open_raw_streams(port: int, task_id: str) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    streams = []
    for index in range(STREAMS):
        path = f"/tasks/{task_id}/stream" if index % 2 else "/tasks/stream"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        streams.append((reader, writer))
    return streams


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while chunk := await reader.read(65536):
        data += chunk
    return data


@pytest.mark.parametrize("name", SERVERS)
async def test_streams_follow_tasks_and_sigterm_exits_promptly(servers: dict[str, Booted], name: str) -> None:
    server = servers[name]
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(5)) as http:
        await wait_healthy(server, http)
        await follow_task(http)
        await follow_all(http)
        await wait_healthy(server, http, streams=0)

        live = await create(http)
        streams = await open_raw_streams(server.port, live)
        try:
            await wait_healthy(server, http, streams=STREAMS)
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            try:
                with anyio.fail_after(EXIT_WITHIN):
                    endings = await asyncio.gather(*(read_to_eof(reader) for reader, _ in streams))
                    while server.process.poll() is None:
                        await anyio.sleep(0.05)
            except TimeoutError:
                raise AssertionError(
                    f"{name} still running {EXIT_WITHIN} s after SIGTERM:\n{server.output()[-3000:]}"
                ) from None
            elapsed = time.monotonic() - started
        finally:
            for _, writer in streams:
                writer.close()
    output = server.output()
    assert server.process.returncode in (0, -signal.SIGTERM), output[-3000:]
    assert all(ending.startswith(b"HTTP/1.1 200") for ending in endings), [e[:40] for e in endings]
    if name in CLEAN_END:
        assert all(ending.endswith(b"0\r\n\r\n") for ending in endings), f"{name}: a stream was cut, not ended"
        assert "Traceback" not in output, output[-3000:]
    assert "stream failed" not in output, output[-3000:]
    assert elapsed < EXIT_WITHIN
