"""Several real ``taskmon serve`` processes on one real Redis: streams across processes, failover
with Last-Event-ID, racing finishers, and a Redis outage mid-stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from conftest import RedisServer, free_port
from httpx_sse import aconnect_sse

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


class Proc:
    """``python -m server serve --store redis://...`` as a real process (cwd: this tree)."""

    def __init__(self, store_url: str, tmp_path: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMON_", "ZEP_"))}
        clean.update({"TASKMON_DATA_DIR": str(tmp_path / f"data-{self.port}"), "TASKMON_HEARTBEAT_S": "0.5", **env})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--port", str(self.port), "--store", store_url],
            cwd=ROOT,
            env=clean,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    async def ready(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=1) as http:
            with anyio.fail_after(20):
                while True:
                    if self.process.poll() is not None:
                        raise RuntimeError(f"server exited: {self.process.stderr.read().decode()[-2000:]}")
                    try:
                        if (await http.get("/readyz")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass  # not listening yet
                    await anyio.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(15)
        finally:
            if self.process.stderr is not None:
                self.process.stderr.close()


@asynccontextmanager
async def servers(store_url: str, tmp_path: Path, n: int = 2) -> AsyncIterator[list[Proc]]:
    procs = [Proc(store_url, tmp_path) for _ in range(n)]
    try:
        for proc in procs:
            await proc.ready()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
def shared_url(redis_server: RedisServer) -> str:
    """DB 1 of the session's redis-server: these tests never flush under running servers."""
    return redis_server.url.rsplit("/", 1)[0] + "/1"


async def create(http: httpx.AsyncClient, base: str, **body) -> dict:
    response = await http.post(f"{base}/api/tasks", json={"task_type": "scale", **body})
    assert response.status_code == 201, response.text
    return response.json()["data"]


async def patch(http: httpx.AsyncClient, base: str, task_id: str, **body) -> httpx.Response:
    return await http.patch(f"{base}/api/tasks/{task_id}", json=body)


async def follow(http: httpx.AsyncClient, url: str, out: list, opened: anyio.Event, last_id: str | None = None) -> None:
    """Collect (event, id, data) of one SSE stream until it ends."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    async with aconnect_sse(http, "GET", url, headers=headers) as source:
        assert source.response.status_code == 200
        opened.set()
        async for event in source.aiter_sse():
            out.append((event.event, event.id, json.loads(event.data) if event.data else None))
            if event.event == "end":
                return


async def until(predicate, timeout: float = 10, what: str = "condition") -> None:
    try:
        with anyio.fail_after(timeout):
            while not predicate():
                await anyio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def versions(events: list) -> list[int]:
    return [data["version"] for kind, _id, data in events if kind == "task"]


async def test_a_change_through_a_is_streamed_by_b_and_bs_all_tasks_stream_sees_as_tasks(shared_url, tmp_path):
    async with servers(shared_url, tmp_path) as (a, b), httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
        everything: list = []
        all_open = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_follow_all, http, f"{b.url}/tasks/stream", everything, all_open)
            await all_open.wait()
            task = await create(http, a.url, metadata={"via": "a"})
            task_id = task["task_id"]
            await until(lambda: any(d and d.get("task_id") == task_id for k, _i, d in everything if k == "task"),
                        what="B's all-tasks stream to show the task created through A")

            events: list = []
            opened = anyio.Event()
            tg.start_soon(follow, http, f"{b.url}/tasks/{task_id}/stream", events, opened)
            await opened.wait()
            assert (await patch(http, a.url, task_id, status="processing", progress=1)).status_code == 200
            for progress in range(10, 100, 10):
                assert (await patch(http, a.url, task_id, progress=progress)).status_code == 200
            assert (await patch(http, a.url, task_id, status="completed", result={"ok": 1})).status_code == 200
            await until(lambda: events and events[-1][0] == "end", what="B's stream to end")
            tg.cancel_scope.cancel()
    seen = versions(events)
    assert seen == sorted(set(seen)) and seen[-1] == 12  # strictly increasing, up to the terminal one
    assert [i for k, i, _d in events if k == "task"] == [str(v) for v in seen]  # SSE ids are versions
    assert events[-1][0] == "end" and events[-1][2] == {"task_id": task_id, "status": "completed"}


async def _follow_all(http: httpx.AsyncClient, url: str, out: list, opened: anyio.Event) -> None:
    async with aconnect_sse(http, "GET", url) as source:
        assert source.response.status_code == 200
        opened.set()
        async for event in source.aiter_sse():
            out.append((event.event, event.id, json.loads(event.data) if event.data else None))


async def test_a_client_of_a_killed_process_resumes_on_another_with_exactly_the_missed_events(shared_url, tmp_path):
    async with servers(shared_url, tmp_path) as (a, b), httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
        task_id = (await create(http, a.url))["task_id"]
        await patch(http, a.url, task_id, status="processing", progress=5)
        first: list = []
        opened = anyio.Event()
        broken = anyio.Event()

        async def follow_b() -> None:
            try:
                await follow(http, f"{b.url}/tasks/{task_id}/stream", first, opened)
            except (httpx.TransportError, httpx_sse_errors()):
                broken.set()  # B died under the stream, as it should

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow_b)
            await opened.wait()
            for progress in (10, 20):
                assert (await patch(http, a.url, task_id, progress=progress)).status_code == 200
            await until(lambda: versions(first)[-1:] == [4], what="B's stream to reach version 4")
            b.stop(signal.SIGKILL)
            with anyio.fail_after(10):
                await broken.wait()
        for progress in (30, 40, 50):  # while the client is away
            assert (await patch(http, a.url, task_id, progress=progress)).status_code == 200
        last_id = first[-1][1]
        assert last_id == "4"
        resumed: list = []
        opened = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow, http, f"{a.url}/tasks/{task_id}/stream", resumed, opened, last_id)
            await opened.wait()
            assert (await patch(http, a.url, task_id, status="completed")).status_code == 200
    assert versions(first) == [2, 3, 4]
    assert versions(resumed) == [5, 6, 7, 8]  # exactly the missed ones, then the terminal one
    assert resumed[-1][0] == "end"


def httpx_sse_errors() -> type[BaseException]:
    from httpx_sse import SSEError

    return SSEError


async def test_racing_terminal_patches_through_two_processes_exactly_one_wins(shared_url, tmp_path):
    async with servers(shared_url, tmp_path) as (a, b), httpx.AsyncClient(timeout=10) as http:
        for _ in range(5):
            task_id = (await create(http, a.url))["task_id"]
            before = (await patch(http, a.url, task_id, status="processing")).json()["data"]["version"]
            results: dict[str, httpx.Response] = {}

            async def finish(name: str, base: str, body: dict, task_id: str = task_id, results: dict = results) -> None:
                results[name] = await patch(http, base, task_id, **body)

            async with anyio.create_task_group() as tg:
                tg.start_soon(finish, "a", a.url, {"status": "completed"})
                tg.start_soon(finish, "b", b.url, {"status": "failed", "error": "lost the race"})
            codes = sorted(r.status_code for r in results.values())
            assert codes == [200, 409], {k: r.text for k, r in results.items()}
            winner = next(r for r in results.values() if r.status_code == 200).json()["data"]
            final = (await http.get(f"{b.url}/api/graph/task/{task_id}")).json()["data"]
            assert final == winner and final["version"] == before + 1


async def test_redis_restart_mid_stream_fails_fast_then_resumes_with_no_gap_or_duplicate(tmp_path):
    redis = RedisServer(tmp_path / "redis", appendonly=True)
    redis.start()
    try:
        async with servers(redis.url, tmp_path, n=1) as (a,), httpx.AsyncClient(timeout=httpx.Timeout(5, read=None)) as http:
            task_id = (await create(http, a.url))["task_id"]
            await patch(http, a.url, task_id, status="processing", progress=1)
            events: list = []
            opened = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow, http, f"{a.url}/tasks/{task_id}/stream", events, opened)
                await opened.wait()
                assert (await patch(http, a.url, task_id, progress=10)).status_code == 200
                await until(lambda: versions(events)[-1:] == [3], what="the stream to show version 3")

                await anyio.to_thread.run_sync(redis.stop)
                for call in (
                    lambda: patch(http, a.url, task_id, progress=20),
                    lambda: http.get(f"{a.url}/api/graph/task/{task_id}"),
                    lambda: http.post(f"{a.url}/api/tasks", json={"task_type": "x"}),
                    lambda: http.get(f"{a.url}/readyz"),
                ):
                    started = time.monotonic()
                    response = await call()
                    assert time.monotonic() - started < 2
                    assert response.status_code == 503, response.text
                    assert response.json()["success"] is False
                assert (await http.get(f"{a.url}/healthz")).status_code == 200
                assert events[-1][0] != "end"  # the stream is still open

                await anyio.to_thread.run_sync(redis.start)
                await until_ready(http, a.url)
                for progress in (20, 30):
                    assert (await patch(http, a.url, task_id, progress=progress)).status_code == 200
                assert (await patch(http, a.url, task_id, status="completed")).status_code == 200
                await until(lambda: events and events[-1][0] == "end", what="the stream to end")
            assert versions(events) == [2, 3, 4, 5, 6]
    finally:
        redis.stop()


async def until_ready(http: httpx.AsyncClient, base: str) -> None:
    with anyio.fail_after(15):
        while (await http.get(f"{base}/readyz")).status_code != 200:
            await anyio.sleep(0.05)


def test_serve_workers_refused_on_embedded_stores(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMON_")}
    for store in ("memory://", f"sqlite:///{tmp_path}/t.db"):
        done = subprocess.run(
            [sys.executable, "-m", "server", "serve", "--workers", "2", "--store", store],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False,
        )
        assert done.returncode == 2
        assert "redis://" in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


async def test_serve_workers_on_redis_shares_one_port(shared_url, tmp_path):
    """Two worker processes behind one port: tasks made through either are seen by both; each worker
    speaks taskmon's connection protocol (431 JSON for an oversize header) and the whole group stops
    as promptly as one process does, open streams included."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMON_")}
    env.update({"TASKMON_DATA_DIR": str(tmp_path / "data"), "TASKMON_MAX_HEADER_BYTES": "4096"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--workers", "2", "--port", str(port), "--store", shared_url,
         "--access-log"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5, read=None)) as http:
            with anyio.fail_after(30):
                while True:
                    try:
                        if (await http.get(f"{base}/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.05)
            assert len(_children(proc.pid)) >= 2  # uvicorn's supervisor runs two workers
            made = [(await create(http, base))["task_id"] for _ in range(6)]
            for task_id in made:  # new connections: spread over the workers
                async with httpx.AsyncClient(timeout=5) as fresh:
                    assert (await fresh.get(f"{base}/api/graph/task/{task_id}")).status_code == 200
            for _ in range(4):  # new connections: whichever worker takes one refuses the header
                answer = await _raw(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 8192)
                assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
                assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["success"] is False

            ended: list[str] = []
            opened = [anyio.Event() for _ in made]
            async with anyio.create_task_group() as tg:
                for task_id, event in zip(made, opened):
                    tg.start_soon(_follow_to_close, http, f"{base}/tasks/{task_id}/stream", event, ended)
                for event in opened:
                    await event.wait()
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                with anyio.fail_after(10):
                    await anyio.to_thread.run_sync(proc.wait)
                elapsed = time.monotonic() - started
            assert len(ended) == len(made)  # every stream was ended by its worker, none cut
            assert elapsed < 2.5, f"--workers exit took {elapsed:.2f} s"
            logged = proc.stderr.read().decode()
            assert "Traceback" not in logged
            assert f"/api/graph/task/{made[0]}" in logged  # --access-log reached the workers
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        proc.stderr.close()


async def _raw(port: int, request: bytes) -> bytes:
    """One request on a fresh connection; everything the server sends until it closes."""
    out = b""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        with anyio.fail_after(10):
            try:
                while True:
                    out += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    return out


async def _follow_to_close(http: httpx.AsyncClient, url: str, opened: anyio.Event, ended: list[str]) -> None:
    """Read a task's stream until the server ends it; record how it ended."""
    async with aconnect_sse(http, "GET", url) as source:
        assert source.response.status_code == 200
        opened.set()
        async for _event in source.aiter_sse():
            pass
    ended.append(url)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in _cmdline(entry):
                found.append(int(entry.name))  # a worker (not multiprocessing's resource tracker)
    return found


def _cmdline(entry: Path) -> bytes:
    try:
        return (entry / "cmdline").read_bytes()
    except OSError:
        return b""


async def test_concurrent_patches_through_two_processes_lose_nothing(shared_url, tmp_path):
    """100 PATCHes at once through A and 100 through B on one task: every one accepted exactly once
    (the final version counts them), B's stream sees strictly increasing versions to the end."""
    async with servers(shared_url, tmp_path) as (a, b), httpx.AsyncClient(
        timeout=httpx.Timeout(20, read=None), limits=httpx.Limits(max_connections=300)
    ) as http:
        task_id = (await create(http, a.url))["task_id"]
        before = (await patch(http, a.url, task_id, status="processing")).json()["data"]["version"]
        events: list = []
        opened = anyio.Event()
        codes: list[int] = []

        async def one(base: str, i: int) -> None:
            codes.append((await patch(http, base, task_id, progress=i % 100, message=f"{base[-5:]}-{i}")).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow, http, f"{b.url}/tasks/{task_id}/stream", events, opened)
            await opened.wait()
            async with anyio.create_task_group() as producers:
                for i in range(100):
                    producers.start_soon(one, a.url, i)
                    producers.start_soon(one, b.url, i)
            assert codes == [200] * 200
            done = await patch(http, a.url, task_id, status="completed")
            assert done.json()["data"]["version"] == before + 201
            await until(lambda: events and events[-1][0] == "end", what="B's stream to end")
    seen = versions(events)
    assert all(x < y for x, y in zip(seen, seen[1:])) and seen[-1] == before + 201


_POOL = """
import sys
from server.stores import redis as store_module
store_module.OWNER_TTL_MS, store_module.OWNER_RENEW_S = 1000, 0.1  # a quick heartbeat for the test
from server.manager import TaskManager
manager = TaskManager.open(sys.argv[1])
task = manager.create_task("pool job", owned=True)
manager.update_task(task.task_id, status="processing")
print(task.task_id, flush=True)
sys.stdin.readline()  # "finish"
manager.complete_task(task.task_id, {"by": "pool"})
print("done", flush=True)
sys.stdin.readline()
manager.close()
"""


async def test_a_producer_only_process_job_pool_heartbeats_so_a_server_starting_leaves_its_tasks(shared_url, tmp_path):
    """``TaskManager.open(redis://)`` in a process of its own runs a job-pool task (owned) past its
    heartbeat's TTL: a server starting then (which fails tasks of dead pools) leaves it running, and
    the job finishes it. Once that process closed its manager, its heartbeat key is gone."""
    import redis as redis_py

    from server.stores.redis import OWNER_PREFIX

    pool = subprocess.Popen(
        [sys.executable, "-c", _POOL, shared_url], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        with anyio.fail_after(20):
            task_id = (await anyio.to_thread.run_sync(pool.stdout.readline)).strip()
        assert task_id, "the pool process did not start its job"
        client = redis_py.Redis.from_url(shared_url, decode_responses=True)
        owner = json.loads(client.hget(f"taskmon:{{t:{task_id}}}:task", "internal"))["owner"]
        key = OWNER_PREFIX + owner
        started = time.monotonic()
        with anyio.fail_after(10):  # three TTLs: only renewals keep the key
            while time.monotonic() - started < 3.0:
                assert client.exists(key), "the job pool's heartbeat lapsed"
                await anyio.sleep(0.05)
        async with servers(shared_url, tmp_path, n=1) as (a,), httpx.AsyncClient(timeout=5) as http:
            task = (await http.get(f"{a.url}/api/graph/task/{task_id}")).json()["data"]
            assert task["status"] == "processing", task  # not "interrupted" by the server's start
            pool.stdin.write("finish\n")
            pool.stdin.flush()
            with anyio.fail_after(10):
                assert (await anyio.to_thread.run_sync(pool.stdout.readline)).strip() == "done"
            task = (await http.get(f"{a.url}/api/graph/task/{task_id}")).json()["data"]
            assert task["status"] == "completed" and task["result"] == {"by": "pool"}
        pool.stdin.write("close\n")
        pool.stdin.flush()
        with anyio.fail_after(10):
            await anyio.to_thread.run_sync(pool.wait)
        assert pool.returncode == 0
        assert not client.exists(key)  # a clean close drops the heartbeat
        client.close()
    finally:
        if pool.poll() is None:
            pool.kill()
            pool.wait()
        pool.stdin.close()
        pool.stdout.close()
