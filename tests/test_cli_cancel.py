"""`taskmon cancel ID` as a real subprocess against a real server, and the elapsed/ETA field of
`taskmon watch`."""

from __future__ import annotations

import os
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from conftest import free_port

from server.cli import _timing

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMON_", "ZEP_"))}
    env.update({"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "160", "PYTHONUNBUFFERED": "1"})
    return env


async def _taskmon(*args: str, env: dict[str, str] | None = None):
    with anyio.fail_after(30):
        return await anyio.run_process(
            [sys.executable, "-m", "server", *args], cwd=ROOT, env=env or _env(), check=False
        )


async def test_cancel_a_live_task_exits_0(live_server, settings):
    async with live_server(settings) as srv:
        task = srv.manager.create_task("import")
        srv.manager.update_task(task.task_id, status="processing")
        done = await _taskmon("cancel", task.task_id, "--url", srv.url)
        assert done.returncode == 0, done.stderr
        assert "cancel requested" in done.stderr.decode()
        assert srv.manager.get_task(task.task_id).cancel_requested is True


async def test_cancel_a_finished_task_exits_1(live_server, settings):
    async with live_server(settings) as srv:
        task = srv.manager.create_task("import")
        srv.manager.fail_task(task.task_id, "boom")
        done = await _taskmon("cancel", task.task_id, "--url", srv.url)
        assert done.returncode == 1
        assert "409" in done.stderr.decode() and "Traceback" not in done.stderr.decode()


@pytest.mark.parametrize("task_id", [str(uuid.uuid4()), "not-an-id"])
async def test_cancel_an_unknown_task_exits_2(live_server, settings, task_id):
    async with live_server(settings) as srv:
        done = await _taskmon("cancel", task_id, "--url", srv.url)
        assert done.returncode == 2
        assert "404" in done.stderr.decode() and "task not found" in done.stderr.decode()


async def test_cancel_uses_the_api_token(live_server, settings):
    async with live_server(settings.with_changes(api_token="s3cret")) as srv:
        task = srv.manager.create_task("import")
        refused = await _taskmon("cancel", task.task_id, "--url", srv.url)
        assert refused.returncode == 2 and "401" in refused.stderr.decode()
        assert srv.manager.get_task(task.task_id).cancel_requested is False
        by_flag = await _taskmon("cancel", task.task_id, "--url", srv.url, "--token", "s3cret")
        assert by_flag.returncode == 0, by_flag.stderr
        by_env = await _taskmon("cancel", task.task_id, "--url", srv.url, env={**_env(), "TASKMON_API_TOKEN": "s3cret"})
        assert by_env.returncode == 0, by_env.stderr


async def test_cancel_unreachable_server_exits_2():
    done = await _taskmon("cancel", str(uuid.uuid4()), "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 2 and "cannot reach" in done.stderr.decode()


# ------------------------------------------------------------------------------ watch: elapsed and ETA


def test_timing_field_shows_elapsed_since_start_and_the_eta():
    start = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    now = start + timedelta(minutes=2, seconds=5)
    pending = {"started_at": None, "finished_at": None, "eta_s": None}
    assert _timing(pending, now) == "elapsed -:-- eta -:--"
    running = {"started_at": start.isoformat(), "finished_at": None, "eta_s": 95.4}
    assert _timing(running, now) == "elapsed 2:05 eta 1:35"
    long = {"started_at": start.isoformat(), "finished_at": None, "eta_s": 3 * 3600 + 61}
    assert _timing(long, start + timedelta(hours=1, seconds=1)) == "elapsed 1:00:01 eta 3:01:01"
    finished = {"started_at": start.isoformat(), "finished_at": (start + timedelta(seconds=42)).isoformat(), "eta_s": None}
    assert _timing(finished, now + timedelta(days=1)) == "elapsed 0:42 eta -:--"  # stops at the end


async def test_watch_shows_the_tasks_elapsed_time(live_server, settings):
    async with live_server(settings) as srv:
        manager = srv.manager
        task = manager.create_task("import")
        manager.update_task(task.task_id, status="processing")
        manager.update_task(task.task_id, progress=50)
        manager.complete_task(task.task_id, {"ok": True})
        done = await _taskmon("watch", task.task_id, "--url", srv.url)
    assert done.returncode == 0, done.stderr
    output = done.stdout.decode()
    assert "elapsed 0:00 eta -:--" in output, output
