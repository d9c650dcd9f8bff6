"""Streams over HTTP/2 (README, "Many streams from one client: HTTP/2"): hypercorn with TLS, a real process.

Over HTTP/1.1 every open stream holds a connection of its own; over HTTP/2 one connection carries
them all. The client here is allowed a single connection: eight streams stay open on it while a
ninth request (the producer's PATCH) goes through and every stream receives the change.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import free_port, require_tool
from httpx_sse import EventSource, aconnect_sse

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
# hypercorn (the server) and h2 (httpx's HTTP/2) are in the `test` extra: missing, this fails loudly.


async def self_signed(tmp: Path) -> tuple[Path, Path]:
    openssl = require_tool("openssl", "makes the test's self-signed certificate")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    await anyio.run_process(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
    )
    return cert, key


@asynccontextmanager
async def hypercorn(tmp: Path) -> AsyncIterator[tuple[str, ssl.SSLContext]]:
    cert, key = await self_signed(tmp)
    port = free_port()
    env = {**os.environ, "TASKMON_STORE": "memory://", "TASKMON_DATA_DIR": str(tmp / "data"), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "hypercorn", "--certfile", str(cert), "--keyfile", str(key),
               "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "1", "server.app:create_app()"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        async with httpx.AsyncClient(verify=trust) as probe:
            with anyio.fail_after(20):
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(f"hypercorn exited: {process.stderr.read().decode() if process.stderr else ''}")
                    try:
                        if (await probe.get(f"{url}/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await anyio.sleep(0.05)
        yield url, trust
    finally:
        process.terminate()
        try:
            await anyio.to_thread.run_sync(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


async def next_task(source: EventSource, events: Any) -> dict[str, Any]:
    """The next `task` event's data (or the tasks of a `snapshot`), skipping nothing else."""
    async for event in events:
        if event.event in ("task", "snapshot"):
            return event.json()
    raise AssertionError("the stream ended")


async def test_streams_share_one_http2_connection(tmp_path: Path) -> None:
    async with hypercorn(tmp_path) as (url, trust), httpx.AsyncClient(
        base_url=url, http2=True, verify=trust, limits=httpx.Limits(max_connections=1), timeout=10
    ) as client:
        created = await client.post("/api/tasks", json={"task_type": "h2_job"})
        assert created.status_code == 201, created.text
        assert created.http_version == "HTTP/2"
        task_id = created.json()["data"]["task_id"]
        async with AsyncExitStack() as streams:
            opened = []
            for path in ["/tasks/stream"] * 4 + [f"/tasks/{task_id}/stream"] * 4:
                source = await streams.enter_async_context(aconnect_sse(client, "GET", path))
                assert source.response.status_code == 200
                assert source.response.http_version == "HTTP/2"
                events = source.aiter_sse()
                opened.append((path, source, events))
            with anyio.fail_after(10):
                for path, source, events in opened:
                    first = await next_task(source, events)
                    version = first["tasks"][0]["version"] if path == "/tasks/stream" else first["version"]
                    assert version == 1
                # Eight streams are open on the one connection the client may use; this request shares it.
                patched = await client.patch(f"/api/tasks/{task_id}", json={"status": "processing", "progress": 40})
                assert patched.status_code == 200, patched.text
                for _path, source, events in opened:
                    update = await next_task(source, events)
                    assert (update["version"], update["progress"]) == (2, 40)
