"""Ctrl+C / SIGTERM with 1,000 open streams: the real process exits promptly and every stream ends."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
import urllib.request
from pathlib import Path

import pytest

import anyio
from conftest import free_port

STREAMS = 1000


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


def _post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=2) as response:
        return json.loads(response.read())


async def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        with anyio.fail_after(timeout):
            while True:
                try:
                    if await anyio.to_thread.run_sync(predicate):
                        return
                except OSError:
                    pass  # not listening yet
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def _open_streams(port: int, task_id: str) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    streams = []
    request = f"GET /tasks/{task_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    for index in range(STREAMS):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request if index % 2 else b"GET /tasks/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        streams.append((reader, writer))
    return streams


async def _all_closed(streams) -> int:
    """Read every stream to EOF; returns how many ended with the chunked terminator."""
    async def drain(reader: asyncio.StreamReader) -> bool:
        data = await reader.read()
        while chunk := await reader.read(65536):
            data += chunk
        return data.endswith(b"0\r\n\r\n")

    results = await asyncio.gather(*(drain(reader) for reader, _ in streams))
    return sum(results)


pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_exit_with_open_streams_is_prompt(tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port()
    env = {**os.environ, "TASKMON_STORE": "memory://", "TASKMON_DATA_DIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    streams = []
    try:
        await _wait_until(lambda: _get_json(f"{base}/healthz")["status"] == "ok", 15, "the server to start")
        task_id = _post_json(f"{base}/api/tasks", {"task_type": "demo"})["data"]["task_id"]
        streams = await _open_streams(port, task_id)
        await _wait_until(lambda: _get_json(f"{base}/healthz")["streams"] == STREAMS, 20, "the streams to open")
        started = time.monotonic()
        process.send_signal(sig)
        with anyio.fail_after(5):
            ended = await _all_closed(streams)
            await anyio.to_thread.run_sync(process.wait)
        elapsed = time.monotonic() - started
        assert ended == STREAMS, f"only {ended} of {STREAMS} streams ended cleanly"
        stderr = process.stderr.read().decode()
        # after a clean shutdown: SIGTERM is re-raised by uvicorn, Ctrl+C exits 130 as shells expect
        assert process.returncode in (0, -sig, 128 + sig), stderr[-2000:]
        assert "Traceback" not in stderr, stderr[-2000:]
        assert elapsed < 3.0, f"exit took {elapsed:.2f} s"
    finally:
        for _, writer in streams:
            writer.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
