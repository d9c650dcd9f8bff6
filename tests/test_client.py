"""server/client.py against a real server on a free port: the task block, failures, cancel, no retry of a
4xx, coalescing while the server is down, and a restart mid-job with a sqlite store."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from server.client import AsyncClient, Client, TaskCancelled, TaskmonError, TaskmonUnavailable
from server.models import Task, TaskStatus
from server.retry import RetryPolicy
from server.settings import Settings

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(max_attempts=None, base_delay=0.02, max_delay=0.1, jitter=0.5)


class Counting(httpx.BaseTransport):
    """A real HTTP transport that records (method, path, status or "error") for every attempt."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.seen: list[tuple[str, str, int | str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = self.inner.handle_request(request)
        except httpx.TransportError:
            self.seen.append((request.method, request.url.path, "error"))
            raise
        self.seen.append((request.method, request.url.path, response.status_code))
        return response

    def close(self) -> None:
        self.inner.close()

    def count(self, method: str, outcome: int | str | None = None) -> int:
        return sum(1 for m, _, o in self.seen if m == method and (outcome is None or o == outcome))


class AsyncCounting(httpx.AsyncBaseTransport):
    """The async twin of Counting; with ``cancel`` set it marks PATCH answers ``cancel_requested``
    (a stand-in while the server's cancel endpoint is not there)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[tuple[str, str, int | str]] = []
        self.cancel = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self.inner.handle_async_request(request)
        except httpx.TransportError:
            self.seen.append((request.method, request.url.path, "error"))
            raise
        self.seen.append((request.method, request.url.path, response.status_code))
        if self.cancel and request.method == "PATCH" and response.status_code == 200:
            body = json.loads(await response.aread())
            body["data"]["cancel_requested"] = True
            return httpx.Response(200, json=body, request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()

    def count(self, method: str, outcome: int | str | None = None) -> int:
        return sum(1 for m, _, o in self.seen if m == method and (outcome is None or o == outcome))


async def until(condition: Callable[[], object], timeout: float = 5) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


def stored(srv: Any, task_id: str | None) -> Task:
    assert task_id is not None
    task = srv.manager.get_task(task_id)
    assert task is not None
    return task


@pytest.fixture
def durable(settings: Settings, tmp_path: Path) -> Settings:
    return settings.with_changes(store_url=f"sqlite:///{tmp_path / 'tasks.db'}")


async def test_the_block_processes_then_completes_with_its_result(live_server, settings: Settings) -> None:
    async with live_server(settings) as srv, AsyncClient(srv.url, token="") as client:
        async with client.task("import", metadata={"file": "a.csv"}) as t:
            assert stored(srv, t.id).status is TaskStatus.PROCESSING
            assert stored(srv, t.id).metadata == {"file": "a.csv"}
            await t.progress(40, "batch 4/10", detail={"batch": 4, "total_batches": 10})
            await until(lambda: stored(srv, t.id).progress == 40)
            assert stored(srv, t.id).message == "batch 4/10"
            assert stored(srv, t.id).progress_detail == {"batch": 4, "total_batches": 10}
            t.result = {"rows": 1234}
        done = stored(srv, t.id)
        assert (done.status, done.progress, done.result, done.error) == (TaskStatus.COMPLETED, 100, {"rows": 1234}, None)
        assert t.snapshot is not None and t.snapshot["status"] == "completed"


async def test_sync_block_in_a_thread_completes_with_the_last_update(live_server, settings: Settings) -> None:
    async with live_server(settings) as srv:

        def job() -> str | None:
            with Client(srv.url, token="") as client, client.task("import") as t:
                for step in range(1, 6):
                    t.progress(step * 20 - 5, f"step {step}/5", detail={"step": step})
                t.result = {"ok": True}
            return t.id

        task_id = await anyio.to_thread.run_sync(job)
        done = stored(srv, task_id)
        assert done.status is TaskStatus.COMPLETED and done.result == {"ok": True} and done.progress == 100
        assert done.progress_detail == {"step": 5}  # the newest update reached the server before the end


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_an_exception_fails_the_task_with_its_message_and_propagates(
    live_server, settings: Settings, flavour: str
) -> None:
    async with live_server(settings) as srv:
        ids: list[str | None] = []
        if flavour == "sync":

            def job() -> None:
                with Client(srv.url, token="") as client, client.task("import") as t:
                    ids.append(t.id)
                    t.progress(10, "reading")
                    raise ValueError("bad row 7")

            with pytest.raises(ValueError, match="bad row 7"):
                await anyio.to_thread.run_sync(job)
        else:
            with pytest.raises(ValueError, match="bad row 7"):
                async with AsyncClient(srv.url, token="") as client, client.task("import") as t:
                    ids.append(t.id)
                    await t.progress(10, "reading")
                    raise ValueError("bad row 7")
        failed = stored(srv, ids[0])
        assert failed.status is TaskStatus.FAILED
        assert failed.error == "ValueError: bad row 7"
        assert failed.progress == 10  # the pending update went out with the failure


async def test_a_cancelled_coroutine_still_reports_its_task_failed_interrupted(
    live_server, settings: Settings
) -> None:
    async with live_server(settings) as srv, AsyncClient(srv.url, token="") as client:
        ids: list[str | None] = []

        async def job() -> None:
            async with client.task("import") as t:
                ids.append(t.id)
                await t.progress(5, "started")
                await anyio.sleep_forever()  # until the test cancels it

        async with anyio.create_task_group() as tg:
            tg.start_soon(job)
            await until(lambda: ids and stored(srv, ids[0]).status is TaskStatus.PROCESSING)
            tg.cancel_scope.cancel()
        interrupted = stored(srv, ids[0])  # the report went out although the job was cancelled
        assert (interrupted.status, interrupted.error, interrupted.progress) == (TaskStatus.FAILED, "interrupted", 5)


async def test_a_cancel_request_raises_task_cancelled_and_fails_the_task_cancelled(
    live_server, settings: Settings
) -> None:
    transport = AsyncCounting()
    async with live_server(settings) as srv, AsyncClient(srv.url, token="", transport=transport) as client:
        with pytest.raises(TaskCancelled):
            async with client.task("import") as t:
                await t.progress(10, "batch 1/10")
                await until(lambda: transport.count("PATCH", 200) == 2)  # processing + that update
                answer = await client._http.post(f"/api/tasks/{t.id}/cancel")
                if answer.status_code != 202:  # the server side (PROTOCOL v1.1) is not merged yet
                    transport.cancel = True
                assert not t.cancel_requested
                await t.progress(20, "batch 2/10")  # its answer carries cancel_requested
                await until(lambda: t.cancel_requested)
                await t.progress(30, "batch 3/10")  # raises
                pytest.fail("progress() did not raise TaskCancelled")
        cancelled = stored(srv, t.id)
        assert (cancelled.status, cancelled.error) == (TaskStatus.FAILED, "cancelled")


@pytest.mark.parametrize(
    ("case", "status"),
    [("bad field", 400), ("finished task", 409), ("unknown task", 404)],
)
async def test_a_4xx_is_not_retried_and_carries_the_servers_message(
    live_server, settings: Settings, case: str, status: int
) -> None:
    transport = Counting()
    async with live_server(settings) as srv:

        def call() -> None:
            with Client(srv.url, token="", transport=transport, retry_policy=FAST) as client:
                task_id = client.create_task("import")["task_id"]
                if case == "finished task":
                    client.update_task(task_id, status="failed", error="boom")
                    client.update_task(task_id, status="processing")
                elif case == "unknown task":
                    client.update_task("00000000-0000-4000-8000-000000000000", progress=1)
                else:
                    client.update_task(task_id, progres=1)

        with pytest.raises(TaskmonError) as info:
            await anyio.to_thread.run_sync(call)
    assert info.value.status == status and not isinstance(info.value, TaskmonUnavailable)
    assert transport.count("PATCH", status) == 1 and transport.count("PATCH", "error") == 0
    expected = {400: "unknown field", 409: "finished", 404: ""}[status]
    assert expected in info.value.error and str(info.value).startswith(f"HTTP {status}: ")


async def test_a_refused_progress_update_is_raised_by_the_next_call_not_retried(
    live_server, settings: Settings
) -> None:
    transport = AsyncCounting()
    async with live_server(settings) as srv, AsyncClient(
        srv.url, token="", transport=transport, retry_policy=FAST
    ) as client:
        with pytest.raises(TaskmonError) as info:
            async with client.task("import") as t:
                srv.manager.fail_task(t.id, "no update for 30 s")  # the server ended it behind our back
                await t.progress(10, "batch 1/10")
                await until(lambda: transport.count("PATCH", 409) == 1)
                await t.progress(20, "batch 2/10")
                pytest.fail("progress() did not raise the refusal")
        assert info.value.status == 409
        # processing, the refused update, the refused final update: each sent once
        assert [o for m, _, o in transport.seen if m == "PATCH"] == [200, 409, 409]
        assert stored(srv, t.id).error == "no update for 30 s"


async def test_updates_made_while_the_server_is_down_are_coalesced_to_the_newest(
    live_server, durable: Settings
) -> None:
    transport = Counting()
    async with live_server(durable) as srv:
        client = Client(srv.url, token="", transport=transport, retry_policy=FAST)
        t = client.task("import")
        try:
            await anyio.to_thread.run_sync(t.__enter__)
            await anyio.to_thread.run_sync(lambda: t.progress(10, "step 1/6", {"step": 1}))
            await until(lambda: stored(srv, t.id).progress == 10)
            assert stored(srv, t.id).version == 3  # created, processing, step 1
            await srv.stop()
            errors = transport.count("PATCH", "error")
            with anyio.fail_after(2):  # never waits for the server
                for step in range(2, 7):
                    await anyio.to_thread.run_sync(lambda s=step: t.progress(s * 10, f"step {s}/6", {"step": s}))
            await until(lambda: transport.count("PATCH", "error") >= errors + 2)  # the sender keeps trying
            await srv.start()
            await until(lambda: stored(srv, t.id).progress == 60)
            back = stored(srv, t.id)
            assert (back.message, back.progress_detail) == ("step 6/6", {"step": 6})
            assert back.version == 4  # five updates made while away arrived as one change
            await anyio.to_thread.run_sync(t.__exit__, None, None, None)
        finally:
            await anyio.to_thread.run_sync(client.close)
        done = stored(srv, t.id)
        assert done.status is TaskStatus.COMPLETED and done.version == 5
        assert transport.count("PATCH", 200) == 4  # processing, step 1, steps 2-6 coalesced, completed


async def test_a_restart_mid_job_keeps_the_task_its_progress_and_the_final_update_waits(
    live_server, durable: Settings
) -> None:
    transport = AsyncCounting()
    async with live_server(durable) as srv, AsyncClient(
        srv.url, token="", transport=transport, retry_policy=FAST
    ) as client:

        async def restart_once_the_client_has_failed() -> None:
            failures = transport.count("PATCH", "error")
            await until(lambda: transport.count("PATCH", "error") > failures)
            await srv.start()

        async with anyio.create_task_group() as tg:
            async with client.task("import", metadata={"host": "worker-1"}) as t:
                await t.progress(30, "batch 3/10", detail={"batch": 3})
                await until(lambda: stored(srv, t.id).progress == 30)
                await srv.stop()
                await srv.start()
                survived = stored(srv, t.id)  # a producer's task outlives the server (PROTOCOL: after a restart)
                assert (survived.status, survived.progress, survived.message) == (
                    TaskStatus.PROCESSING, 30, "batch 3/10"
                )
                await t.progress(50, "batch 5/10", detail={"batch": 5})
                await until(lambda: stored(srv, t.id).progress == 50)
                await srv.stop()
                tg.start_soon(restart_once_the_client_has_failed)
                t.result = {"rows": 10}
            # the block's end waited through the outage
        done = stored(srv, t.id)
        assert (done.status, done.result, done.progress_detail) == (TaskStatus.COMPLETED, {"rows": 10}, {"batch": 5})


async def test_token_and_url_from_the_environment(live_server, settings: Settings, monkeypatch) -> None:
    async with live_server(settings.with_changes(api_token="s3cret")) as srv:
        monkeypatch.setenv("TASKMON_URL", srv.url + "/")
        monkeypatch.setenv("TASKMON_API_TOKEN", "s3cret")

        def create() -> dict[str, Any]:
            with Client() as client:
                assert client.base_url == srv.url
                return client.create_task("import")

        assert (await anyio.to_thread.run_sync(create))["status"] == "pending"
        monkeypatch.setenv("TASKMON_API_TOKEN", "wrong")
        with pytest.raises(TaskmonError) as info:
            await anyio.to_thread.run_sync(create)
        assert info.value.status == 401


async def test_an_unreachable_server_gives_up_at_the_deadline() -> None:
    from conftest import free_port

    transport = Counting()
    with anyio.fail_after(10):
        with pytest.raises(TaskmonUnavailable, match="deadline reached"):
            with Client(f"http://127.0.0.1:{free_port()}", token="", retry_deadline=0.3, retry_policy=FAST,
                        transport=transport) as client:
                await anyio.to_thread.run_sync(client.create_task, "import")
    assert transport.count("POST", "error") > 1  # retried, then stopped


def test_taskmon_client_is_the_same_module() -> None:
    import server.client
    import taskmon.client

    assert taskmon.client.Client is server.client.Client
    assert taskmon.client.AsyncClient is server.client.AsyncClient
    assert taskmon.client.TaskCancelled is server.client.TaskCancelled
