"""Report progress to taskmon from Python code: ``Client`` (threads) and ``AsyncClient`` (asyncio).

    from server.client import Client          # also: from taskmon.client import Client

    with Client() as client, client.task("import", metadata={"file": "a.csv"}) as t:
        for batch in range(10):
            t.progress(batch * 10, f"batch {batch + 1}/10", detail={"batch": batch + 1})
            ...
        t.result = {"rows": 1234}

Semantics of ``client.task(...)`` used as a context manager:

- Entering creates the task (``POST /api/tasks``; ``lease_s=`` is passed on, PROTOCOL v1.1) and moves
  it to ``processing``; both wait for the server (retried up to ``retry_deadline``).
- ``t.progress(percent, message, detail=...)`` never blocks on the network: the update is handed to a
  background sender (one thread, or one asyncio task, per Task) and the call returns at once. While
  the server is slow or away, updates pile up and are *coalesced*: the sender always sends the newest
  value of every field (a PATCH only carries the fields it names, so the server ends up exactly where
  the updates, applied one by one, would have left it). It retries until the server answers, without a
  deadline: a monitoring outage never stops the job.
- A 4xx answer is not retried: the next ``progress()`` raises ``TaskmonError`` (status, server message).
- When a PATCH answer carries ``cancel_requested: true`` (PROTOCOL v1.1; a missing key means false),
  the next ``progress()`` raises ``TaskCancelled``. Since progress is sent in the background, the cancel
  is noticed one ``progress()`` call after the server has answered it.
- The block returning normally completes the task with ``t.result`` (``{}`` when unset); calling
  ``t.complete(result)`` or ``t.fail(error)`` inside the block ends it early and explicitly. An
  exception fails it with ``"<Type>: <message>"`` (never a traceback) and propagates; ``TaskCancelled``
  fails it with ``"cancelled"``, KeyboardInterrupt (or asyncio cancellation) with ``"interrupted"``.
- The final update is reliable: it waits for the sender (whose latest pending update is merged into it)
  and is retried up to ``retry_deadline``; when it cannot be delivered a normal exit raises
  ``TaskmonUnavailable``, and an exiting exception is logged and left to propagate.

Requests retry with exponential backoff and jitter (``server.retry``) on connection errors, timeouts,
408, 429 and 5xx. A ``POST`` retried after a lost answer may create a second task: a lost answer is
indistinguishable from a lost request. A final update retried after a lost answer that meets a 409 is
checked against the task: when the task already ended that way, the 409 is the echo of our own update.

Configuration: ``url`` (default ``TASKMON_URL``, else ``http://127.0.0.1:8000``), ``token`` (default
``TASKMON_API_TOKEN``; sent as ``Authorization: Bearer``), ``timeout`` (seconds or ``httpx.Timeout``,
per request), ``retry_deadline`` (seconds a blocking call keeps retrying). One httpx connection pool
per client, shared by its tasks: make one client and keep it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import TracebackType
from typing import Any, Self

import anyio
import httpx

from .manager import MAX_TEXT
from .models import TaskCancelled
from .retry import RetriesExhausted, RetryAborted, RetryEvent, RetryPolicy, acall_with_retry, call_with_retry

__all__ = ["AsyncClient", "AsyncTask", "Client", "Task", "TaskCancelled", "TaskmonError", "TaskmonUnavailable"]

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
# Waits double from 0.2 s up to 5 s: a restarted server is found again within a few seconds.
DEFAULT_POLICY = RetryPolicy(max_attempts=None, base_delay=0.2, max_delay=5.0, jitter=0.5)


class TaskmonError(Exception):
    """taskmon refused a request (``status`` is the HTTP status, ``error`` the server's message)."""

    def __init__(self, error: str, *, status: int | None = None) -> None:
        super().__init__(f"HTTP {status}: {error}" if status is not None else error)
        self.status = status
        self.error = error


class TaskmonUnavailable(TaskmonError):
    """taskmon could not be reached (or kept failing with 5xx) until the retry deadline passed."""


def _decode(response: httpx.Response) -> dict[str, Any]:
    """The task object of a producer API answer; raises what the retry policy classifies."""
    status = response.status_code
    if status in (408, 429) or status >= 500:
        raise httpx.HTTPStatusError(f"HTTP {status}", request=response.request, response=response)
    try:
        body = response.json()
    except ValueError:
        body = None
    if status >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        raise TaskmonError(str(error) if error else response.reason_phrase or "request refused", status=status)
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        raise TaskmonError("unexpected answer (no task object)", status=status)
    return body["data"]


def describe_exception(exc: BaseException) -> str:
    """What a failed task's ``error`` says about ``exc``: its type and message, never a traceback."""
    if isinstance(exc, TaskCancelled):
        return "cancelled"
    if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
        return "interrupted"
    text = str(exc).strip()
    name = type(exc).__name__
    return (f"{name}: {text}" if text else name)[:MAX_TEXT]


def _progress_fields(percent: float, message: str | None, detail: dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
        raise ValueError("progress must be a number from 0 to 100")
    fields: dict[str, Any] = {"progress": round(percent)}
    if message is not None:
        if not isinstance(message, str):
            raise TypeError("message must be a string")
        fields["message"] = message[:MAX_TEXT]
    if detail is not None:
        if not isinstance(detail, dict):
            raise TypeError("detail must be a dict")
        fields["progress_detail"] = detail
    return fields


def _new_task_body(task_type: str, metadata: dict[str, Any] | None, lease_s: float | None) -> dict[str, Any]:
    body: dict[str, Any] = {"task_type": task_type}
    if metadata is not None:
        body["metadata"] = metadata
    if lease_s is not None:  # PROTOCOL v1.1: the server fails the task after lease_s without an update
        body["lease_s"] = lease_s
    return body


def _completed(result: dict[str, Any] | None, message: str) -> dict[str, Any]:
    if result is not None and not isinstance(result, dict):
        raise TypeError("result must be a dict")
    return {"status": "completed", "progress": 100, "message": message, "result": result or {}}


def _failed(error: str, message: str) -> dict[str, Any]:
    return {"status": "failed", "message": message, "error": str(error)[:MAX_TEXT]}


class _Config:
    def __init__(
        self,
        url: str | None,
        token: str | None,
        timeout: float | httpx.Timeout,
        retry_deadline: float,
        retry_policy: RetryPolicy | None,
    ) -> None:
        self.base_url = (url or os.environ.get("TASKMON_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("TASKMON_API_TOKEN")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        if retry_deadline < 0:
            raise ValueError("retry_deadline must not be negative")
        self.retry_deadline = float(retry_deadline)
        self.policy = retry_policy or DEFAULT_POLICY
        # the background sender retries until stopped: a newer update always supersedes an older one
        self.sender_policy = replace(self.policy, max_attempts=None)


class _TaskState:
    """What a Task knows, shared between the job and its sender (guarded by ``lock`` in threads)."""

    def __init__(self, task_type: str, metadata: dict[str, Any] | None, lease_s: float | None) -> None:
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError("metadata must be a dict")
        self.task_type = task_type
        self.metadata = dict(metadata or {})
        self.lease_s = lease_s
        self.id: str | None = None
        self.snapshot: dict[str, Any] | None = None  # the newest task object the server answered
        self.result: dict[str, Any] | None = None
        self.pending: dict[str, Any] | None = None  # coalesced updates not yet accepted by the server
        self.failure: TaskmonError | None = None  # a refused update, raised by the next progress()
        self.cancel_requested = False
        self.finished = False

    def seen(self, snapshot: dict[str, Any]) -> None:
        if self.snapshot is None or snapshot.get("version", 0) >= self.snapshot.get("version", 0):
            self.snapshot = snapshot
        if snapshot.get("cancel_requested") is True:
            self.cancel_requested = True

    def merge(self, fields: dict[str, Any]) -> None:
        self.pending = {**(self.pending or {}), **fields}

    def put_back(self, update: dict[str, Any]) -> None:
        """An update that was not delivered goes back under anything newer."""
        self.pending = {**update, **(self.pending or {})}

    def check_live(self) -> None:
        if self.id is None:
            raise TaskmonError("the task is not started: use it as a context manager (or call start())")
        if self.finished:
            raise TaskmonError(f"task {self.id} is already finished")
        if self.failure is not None:
            raise self.failure
        if self.cancel_requested:
            raise TaskCancelled(f"a cancel was requested for task {self.id}")


# -- sync ----------------------------------------------------------------------------------------


class Client:
    """The producer API over one pooled ``httpx.Client``. Thread-safe; close it (or use ``with``)."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout = 10.0,
        retry_deadline: float = 60.0,
        retry_policy: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = _Config(url, token, timeout, retry_deadline, retry_policy)
        self._http = httpx.Client(
            base_url=self.config.base_url, headers=self.config.headers, timeout=timeout, transport=transport
        )

    @property
    def base_url(self) -> str:
        return self.config.base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return _decode(self._http.request(method, path, json=body))

    def _call(
        self,
        operation: str,
        fn: Callable[[], dict[str, Any]],
        on_retry: Callable[[RetryEvent], None] | None = None,
    ) -> dict[str, Any]:
        try:
            return call_with_retry(
                fn, operation=operation, policy=self.config.policy, deadline=self.config.retry_deadline,
                on_retry=on_retry,
            )
        except RetriesExhausted as exc:
            raise TaskmonUnavailable(f"{self.base_url}: {exc}") from exc

    def create_task(
        self, task_type: str, metadata: dict[str, Any] | None = None, *, lease_s: float | None = None
    ) -> dict[str, Any]:
        body = _new_task_body(task_type, metadata, lease_s)
        return self._call("create task", lambda: self._request("POST", "/api/tasks", body))

    def update_task(self, task_id: str, **changes: Any) -> dict[str, Any]:
        """``PATCH /api/tasks/{id}`` with ``changes`` (status, progress, message, progress_detail, result, error)."""
        return self._call("update task", lambda: self._request("PATCH", f"/api/tasks/{task_id}", changes))

    def get_task(self, task_id: str) -> dict[str, Any]:
        return self._call("get task", lambda: self._request("GET", f"/api/graph/task/{task_id}"))

    def finish_task(self, task_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """A final update (status completed/failed), retried; a 409 after a retry that finds the task
        already ended that way is our own earlier attempt, whose answer was lost."""
        retries: list[RetryEvent] = []
        try:
            return self._call(
                "finish task", lambda: self._request("PATCH", f"/api/tasks/{task_id}", changes), retries.append
            )
        except TaskmonError as exc:
            if exc.status != 409 or not retries:
                raise
            try:
                task = self.get_task(task_id)
            except TaskmonError:
                raise exc from None
            if task.get("status") != changes.get("status"):
                raise
            return task

    def task(self, task_type: str, metadata: dict[str, Any] | None = None, *, lease_s: float | None = None) -> Task:
        """A Task to use as ``with client.task(...) as t:`` (see the module documentation)."""
        return Task(self, task_type, metadata, lease_s=lease_s)


class Task:
    """One task reported from a thread. ``with`` starts it and ends it; see the module documentation."""

    def __init__(
        self, client: Client, task_type: str, metadata: dict[str, Any] | None = None, *, lease_s: float | None = None
    ) -> None:
        self._client = client
        self._state = _TaskState(task_type, metadata, lease_s)
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None

    # what the job reads and sets
    @property
    def id(self) -> str | None:
        return self._state.id

    @property
    def snapshot(self) -> dict[str, Any] | None:
        """The newest task object the server answered (progress sent in the background lags behind)."""
        with self._lock:
            return self._state.snapshot

    @property
    def cancel_requested(self) -> bool:
        with self._lock:
            return self._state.cancel_requested

    @property
    def result(self) -> dict[str, Any] | None:
        return self._state.result

    @result.setter
    def result(self, value: dict[str, Any] | None) -> None:
        if value is not None and not isinstance(value, dict):
            raise TypeError("result must be a dict")
        self._state.result = value

    def start(self) -> Self:
        if self._state.id is not None:
            raise TaskmonError(f"task {self._state.id} is already started")
        state = self._state
        created = self._client.create_task(state.task_type, state.metadata, lease_s=state.lease_s)
        with self._lock:
            self._state.id = created["task_id"]
            self._state.seen(created)
        processing = self._client.update_task(created["task_id"], status="processing")
        with self._lock:
            self._state.seen(processing)
        return self

    def __enter__(self) -> Self:
        return self.start()

    def progress(self, percent: float, message: str | None = None, detail: dict[str, Any] | None = None) -> None:
        """Queue an update and return at once; raises TaskCancelled / TaskmonError (see module doc)."""
        fields = _progress_fields(percent, message, detail)
        with self._lock:
            self._state.check_live()
            self._state.merge(fields)
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send_loop, name=f"taskmon-sender-{self._state.id}", daemon=True
                )
                self._sender.start()
            self._lock.notify()

    def complete(self, result: dict[str, Any] | None = None, message: str = "Task completed") -> dict[str, Any]:
        return self._finish(_completed(result if result is not None else self._state.result, message))

    def fail(self, error: str, message: str = "Task failed") -> dict[str, Any]:
        return self._finish(_failed(error, message))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state.finished or self._state.id is None:
            self._stop_sender()
            return
        if exc is None:
            self.complete()
            return
        try:
            self.fail(describe_exception(exc))
        except TaskmonError as report_error:  # the job's exception matters more: it propagates
            logger.warning(
                "could not report the task's failure",
                extra={"task_id": self._state.id, "error": str(report_error)},
            )

    def _finish(self, fields: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._state.id is None:
                raise TaskmonError("the task is not started")
            if self._state.finished:
                raise TaskmonError(f"task {self._state.id} is already finished")
            self._state.finished = True
        self._stop_sender()
        with self._lock:
            leftover, self._state.pending = self._state.pending, None
        task = self._client.finish_task(self._state.id, {**(leftover or {}), **fields})
        with self._lock:
            self._state.seen(task)
        return task

    def _stop_sender(self) -> None:
        with self._lock:
            self._stop.set()
            self._lock.notify_all()
            sender = self._sender
        if sender is not None:
            sender.join()

    def _send_loop(self) -> None:
        state, lock = self._state, self._lock
        while True:
            with lock:
                while state.pending is None and not self._stop.is_set():
                    lock.wait()
                if self._stop.is_set():
                    return
                update, state.pending = state.pending, None
            box = [update]

            def attempt() -> dict[str, Any]:
                with lock:  # every attempt carries the newest value of every field
                    if state.pending is not None:
                        box[0], state.pending = {**box[0], **state.pending}, None
                return self._client._request("PATCH", f"/api/tasks/{state.id}", box[0])

            try:
                task = call_with_retry(
                    attempt, operation="progress", policy=self._client.config.sender_policy, sleep=self._stop.wait
                )
            except RetryAborted:
                with lock:
                    state.put_back(box[0])
                return
            except RetriesExhausted as exc:  # only a Retry-After longer than the policy allows
                logger.warning("progress update postponed", extra={"task_id": state.id, "reason": str(exc)})
                with lock:
                    state.put_back(box[0])
                if self._stop.wait(self._client.config.policy.max_delay):
                    return
                continue
            except TaskmonError as exc:
                logger.warning("progress update refused", extra={"task_id": state.id, "error": str(exc)})
                with lock:
                    state.failure = exc
                continue
            except Exception as exc:
                logger.exception("progress sender failed", extra={"task_id": state.id})
                with lock:
                    state.failure = TaskmonError(f"progress update failed: {describe_exception(exc)}")
                continue
            with lock:
                state.seen(task)


# -- async ---------------------------------------------------------------------------------------


async def _no_abort(delay: float) -> bool:
    await anyio.sleep(delay)
    return False


class AsyncClient:
    """The producer API over one pooled ``httpx.AsyncClient`` (asyncio); ``async with`` or ``aclose()``."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout = 10.0,
        retry_deadline: float = 60.0,
        retry_policy: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = _Config(url, token, timeout, retry_deadline, retry_policy)
        self._http = httpx.AsyncClient(
            base_url=self.config.base_url, headers=self.config.headers, timeout=timeout, transport=transport
        )

    @property
    def base_url(self) -> str:
        return self.config.base_url

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return _decode(await self._http.request(method, path, json=body))

    async def _call(
        self,
        operation: str,
        fn: Callable[[], Awaitable[dict[str, Any]]],
        on_retry: Callable[[RetryEvent], None] | None = None,
    ) -> dict[str, Any]:
        try:
            return await acall_with_retry(
                fn, operation=operation, policy=self.config.policy, deadline=self.config.retry_deadline,
                sleep=_no_abort, on_retry=on_retry,
            )
        except RetriesExhausted as exc:
            raise TaskmonUnavailable(f"{self.base_url}: {exc}") from exc

    async def create_task(
        self, task_type: str, metadata: dict[str, Any] | None = None, *, lease_s: float | None = None
    ) -> dict[str, Any]:
        body = _new_task_body(task_type, metadata, lease_s)
        return await self._call("create task", lambda: self._request("POST", "/api/tasks", body))

    async def update_task(self, task_id: str, **changes: Any) -> dict[str, Any]:
        return await self._call("update task", lambda: self._request("PATCH", f"/api/tasks/{task_id}", changes))

    async def get_task(self, task_id: str) -> dict[str, Any]:
        return await self._call("get task", lambda: self._request("GET", f"/api/graph/task/{task_id}"))

    async def finish_task(self, task_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """As ``Client.finish_task``."""
        retries: list[RetryEvent] = []
        try:
            return await self._call(
                "finish task", lambda: self._request("PATCH", f"/api/tasks/{task_id}", changes), retries.append
            )
        except TaskmonError as exc:
            if exc.status != 409 or not retries:
                raise
            try:
                task = await self.get_task(task_id)
            except TaskmonError:
                raise exc from None
            if task.get("status") != changes.get("status"):
                raise
            return task

    def task(
        self, task_type: str, metadata: dict[str, Any] | None = None, *, lease_s: float | None = None
    ) -> AsyncTask:
        """An AsyncTask to use as ``async with client.task(...) as t:``."""
        return AsyncTask(self, task_type, metadata, lease_s=lease_s)


class AsyncTask:
    """One task reported from asyncio code; ``await t.progress(...)`` queues without waiting."""

    def __init__(
        self,
        client: AsyncClient,
        task_type: str,
        metadata: dict[str, Any] | None = None,
        *,
        lease_s: float | None = None,
    ) -> None:
        self._client = client
        self._state = _TaskState(task_type, metadata, lease_s)
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    @property
    def id(self) -> str | None:
        return self._state.id

    @property
    def snapshot(self) -> dict[str, Any] | None:
        return self._state.snapshot

    @property
    def cancel_requested(self) -> bool:
        return self._state.cancel_requested

    @property
    def result(self) -> dict[str, Any] | None:
        return self._state.result

    @result.setter
    def result(self, value: dict[str, Any] | None) -> None:
        if value is not None and not isinstance(value, dict):
            raise TypeError("result must be a dict")
        self._state.result = value

    async def start(self) -> Self:
        if self._state.id is not None:
            raise TaskmonError(f"task {self._state.id} is already started")
        created = await self._client.create_task(
            self._state.task_type, self._state.metadata, lease_s=self._state.lease_s
        )
        self._state.id = created["task_id"]
        self._state.seen(created)
        self._state.seen(await self._client.update_task(created["task_id"], status="processing"))
        return self

    async def __aenter__(self) -> Self:
        return await self.start()

    async def progress(self, percent: float, message: str | None = None, detail: dict[str, Any] | None = None) -> None:
        """Queue an update and return at once; raises TaskCancelled / TaskmonError (see module doc)."""
        fields = _progress_fields(percent, message, detail)
        self._state.check_live()
        self._state.merge(fields)
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_loop(), name=f"taskmon-sender-{self._state.id}")
        self._wake.set()

    async def complete(self, result: dict[str, Any] | None = None, message: str = "Task completed") -> dict[str, Any]:
        return await self._finish(_completed(result if result is not None else self._state.result, message))

    async def fail(self, error: str, message: str = "Task failed") -> dict[str, Any]:
        return await self._finish(_failed(error, message))

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state.finished or self._state.id is None:
            await self._stop_sender()
            return
        if exc is None:
            await self.complete()
            return
        # a cancelled job still reports (shielded, bounded by the retry deadline)
        with anyio.move_on_after(self._client.config.retry_deadline + 5, shield=True):
            try:
                await self.fail(describe_exception(exc))
            except TaskmonError as report_error:
                logger.warning(
                    "could not report the task's failure",
                    extra={"task_id": self._state.id, "error": str(report_error)},
                )

    async def _finish(self, fields: dict[str, Any]) -> dict[str, Any]:
        if self._state.id is None:
            raise TaskmonError("the task is not started")
        if self._state.finished:
            raise TaskmonError(f"task {self._state.id} is already finished")
        self._state.finished = True
        await self._stop_sender()
        leftover, self._state.pending = self._state.pending, None
        task = await self._client.finish_task(self._state.id, {**(leftover or {}), **fields})
        self._state.seen(task)
        return task

    async def _stop_sender(self) -> None:
        sender, self._sender = self._sender, None
        if sender is None:
            return
        sender.cancel()
        try:
            await sender
        except asyncio.CancelledError:
            if not sender.cancelled():  # we were cancelled ourselves, not just the sender
                raise

    async def _send_loop(self) -> None:
        state = self._state
        update: dict[str, Any] | None = None

        async def attempt() -> dict[str, Any]:
            nonlocal update
            assert update is not None
            if state.pending is not None:  # every attempt carries the newest value of every field
                update, state.pending = {**update, **state.pending}, None
            return await self._client._request("PATCH", f"/api/tasks/{state.id}", update)

        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if state.pending is None:
                    continue
                update, state.pending = state.pending, None
                try:
                    task = await acall_with_retry(
                        attempt, operation="progress", policy=self._client.config.sender_policy, sleep=_no_abort
                    )
                except RetriesExhausted as exc:  # only a Retry-After longer than the policy allows
                    logger.warning("progress update postponed", extra={"task_id": state.id, "reason": str(exc)})
                    state.put_back(update)
                    update = None
                    await anyio.sleep(self._client.config.policy.max_delay)
                    self._wake.set()
                    continue
                except TaskmonError as exc:
                    logger.warning("progress update refused", extra={"task_id": state.id, "error": str(exc)})
                    state.failure = exc
                    update = None
                    continue
                except Exception as exc:
                    logger.exception("progress sender failed", extra={"task_id": state.id})
                    state.failure = TaskmonError(f"progress update failed: {describe_exception(exc)}")
                    update = None
                    continue
                update = None
                state.seen(task)
        finally:
            if update is not None:  # cancelled mid-send: the final update carries it
                state.put_back(update)
