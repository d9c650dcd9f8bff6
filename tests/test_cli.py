"""`taskmon watch TASK_ID --url URL` as a real subprocess against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from conftest import free_port

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMON_", "ZEP_"))}
    env.update({"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "120", "PYTHONUNBUFFERED": "1"})
    return env


def _watch_cmd(task_id: str, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server", "watch", task_id, "--url", url, *extra]


class Watcher:
    """`taskmon watch` running in the background of the test; ``result`` once it has exited."""

    def __init__(self) -> None:
        self.result: subprocess.CompletedProcess[bytes] | None = None

    async def run(self, cmd: list[str]) -> None:
        self.result = await anyio.run_process(cmd, cwd=ROOT, env=_env(), check=False)

    @property
    def stdout(self) -> str:
        assert self.result is not None
        return self.result.stdout.decode()

    @property
    def stderr(self) -> str:
        assert self.result is not None
        return self.result.stderr.decode()


async def _in_thread(fn: Callable[[], None]) -> None:
    """Drive the task from a background thread, as a job would, and wait for it to finish."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test
            errors.append(exc)

    thread = threading.Thread(target=target, name="producer")
    thread.start()
    await anyio.to_thread.run_sync(thread.join, 10)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


async def _watch_while(srv, task_id: str, drive: Callable[[], None], *extra: str) -> Watcher:
    """Start the watcher, wait until its stream is open on the server, then drive the task."""
    watcher = Watcher()
    bus = srv.app.state.manager.bus
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run, _watch_cmd(task_id, srv.url, *extra))
            while bus.open_streams < 1:
                assert watcher.result is None, f"watch exited early: {watcher.result}"
                await anyio.sleep(0.01)
            await _in_thread(drive)
        while bus.open_streams:  # the watcher's stream ended and is forgotten
            await anyio.sleep(0.01)
    return watcher


async def test_watch_exits_0_and_prints_the_result_when_completed(live_server, settings):
    async with live_server(settings) as srv:
        manager = srv.manager
        task = manager.create_task("graph_build")
        result = {"graph_id": "g-1", "node_count": 12, "name": "ünï"}

        def drive() -> None:
            manager.update_task(task.task_id, status="processing", message="starting")
            for step in range(1, 10):
                manager.update_task(task.task_id, progress=step * 10, message=f"batch {step}/10")
            manager.complete_task(task.task_id, result)

        watcher = await _watch_while(srv, task.task_id, drive)
    assert watcher.result.returncode == 0, (watcher.stdout, watcher.stderr)
    lines = [line for line in watcher.stdout.splitlines() if line.strip()]
    assert json.loads(lines[-1]) == result


async def test_watch_exits_1_when_the_task_fails(live_server, settings):
    async with live_server(settings) as srv:
        manager = srv.manager
        task = manager.create_task("graph_build")

        def drive() -> None:
            manager.update_task(task.task_id, status="processing", progress=30)
            manager.fail_task(task.task_id, "zep rejected the batch")

        watcher = await _watch_while(srv, task.task_id, drive)
    assert watcher.result.returncode == 1, (watcher.stdout, watcher.stderr)
    assert "zep rejected the batch" in watcher.stderr


async def test_watch_a_task_that_already_finished(live_server, settings):
    async with live_server(settings) as srv:
        task = srv.manager.create_task("t")
        srv.manager.update_task(task.task_id, status="processing")
        srv.manager.complete_task(task.task_id, {"ok": True})
        with anyio.fail_after(30):
            done = await anyio.run_process(_watch_cmd(task.task_id, srv.url), cwd=ROOT, env=_env(), check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.decode().strip().splitlines()[-1]) == {"ok": True}


@pytest.mark.parametrize("task_id", [str(uuid.uuid4()), "not-a-task"])
async def test_watch_unknown_task_fails_with_a_clear_message(live_server, settings, task_id):
    async with live_server(settings) as srv:
        with anyio.fail_after(30):
            done = await anyio.run_process(_watch_cmd(task_id, srv.url), cwd=ROOT, env=_env(), check=False)
    stderr = done.stderr.decode()
    assert done.returncode not in (0, 1), (done.returncode, stderr)  # neither "completed" nor "failed"
    assert "404" in stderr and "task not found" in stderr
    assert "Traceback" not in stderr


async def test_watch_uses_the_read_token(live_server, settings):
    async with live_server(settings.with_changes(read_token="r3ad")) as srv:
        task = srv.manager.create_task("t")
        srv.manager.fail_task(task.task_id, "boom")
        with anyio.fail_after(30):
            refused = await anyio.run_process(_watch_cmd(task.task_id, srv.url), cwd=ROOT, env=_env(), check=False)
            allowed = await anyio.run_process(
                _watch_cmd(task.task_id, srv.url, "--token", "r3ad"), cwd=ROOT, env=_env(), check=False
            )
    assert refused.returncode == 2 and "401" in refused.stderr.decode()
    assert allowed.returncode == 1 and "boom" in allowed.stderr.decode()


async def test_watch_unreachable_server_gives_up(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with anyio.fail_after(30):
        done = await anyio.run_process(
            _watch_cmd(str(uuid.uuid4()), url, "--retries", "0"), cwd=ROOT, env=_env(), check=False
        )
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "cannot reach" in stderr and url in stderr
