"""A bounded pool for long jobs (TASKMON_JOB_WORKERS threads); queued jobs stay ``pending``.

The runner owns each job's task lifecycle: ``processing`` when a worker starts it, ``completed``
with the dict the job returns, ``failed`` with a clear message otherwise. Nothing is left running.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from .manager import TaskManager
from .manager import CANCELLED
from .models import TaskCancelled, TaskNotFoundError, TaskStateError

__all__ = ["JobContext", "JobFailed", "JobRunner"]

logger = logging.getLogger(__name__)

INTERRUPTED = "interrupted: the server shut down before this job finished"


class JobFailed(Exception):
    """A job's clean failure; the message becomes the task's ``error`` as it is."""


class JobContext:
    def __init__(self, task_id: str, manager: TaskManager, cancelled: threading.Event) -> None:
        self.task_id = task_id
        self.manager = manager
        self.cancelled = cancelled

    def report(
        self,
        progress: int | None = None,
        message: str | None = None,
        progress_detail: dict[str, Any] | None = None,
    ) -> None:
        """Progress for the watchers; raises JobFailed when the server is shutting down and
        TaskCancelled when a cancel was requested (the runner then fails the task "cancelled")."""
        if self.cancelled.is_set():
            raise JobFailed(INTERRUPTED)
        self.manager.update_task(self.task_id, progress=progress, message=message, progress_detail=progress_detail)


Job = Callable[[JobContext], dict[str, Any]]


class JobRunner:
    def __init__(self, manager: TaskManager, workers: int) -> None:
        self._manager = manager
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="taskmon-job")
        self._cancelled = threading.Event()
        self._futures: set[Future[None]] = set()
        self._lock = threading.Lock()

    def submit(self, task_id: str, fn: Job) -> None:
        future = self._pool.submit(self._run, task_id, fn)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Future[None]) -> None:
        with self._lock:
            self._futures.discard(future)

    def _run(self, task_id: str, fn: Job) -> None:
        ctx = JobContext(task_id, self._manager, self._cancelled)
        try:
            if self._cancelled.is_set():
                raise JobFailed(INTERRUPTED)
            try:
                self._manager.update_task(task_id, status="processing", message="Started")
            except (TaskNotFoundError, TaskStateError) as exc:
                # ended (or removed) while it waited in the queue, e.g. by a producer PATCH: nothing to run
                logger.info("queued job skipped", extra={"task_id": task_id, "reason": str(exc)})
                return
            result = fn(ctx)
        except JobFailed as exc:
            self._finish(task_id, error=str(exc))
        except TaskCancelled:
            logger.info("job cancelled", extra={"task_id": task_id})
            self._finish(task_id, error=CANCELLED)
        except Exception:
            logger.exception("job crashed", extra={"task_id": task_id})
            self._finish(task_id, error="internal error while running the job")
        else:
            self._finish(task_id, result=result)

    def _finish(self, task_id: str, *, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        try:
            if error is None:
                self._manager.complete_task(task_id, result)
            else:
                self._manager.fail_task(task_id, error)
        except (TaskNotFoundError, TaskStateError) as exc:
            # Someone else finished or removed the task first (e.g. a producer PATCH): theirs stands.
            logger.info("job outcome not recorded", extra={"task_id": task_id, "reason": str(exc)})

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Ask every job to stop: queued ones fail at once as interrupted, running ones at their next
        ``ctx.report``. Waits up to ``timeout`` seconds; returns True when all have finished."""
        self._cancelled.set()
        self._pool.shutdown(wait=False)
        with self._lock:
            pending = list(self._futures)
        _done, not_done = wait(pending, timeout=timeout)
        if not_done:
            logger.warning("jobs still running at shutdown", extra={"count": len(not_done)})
        return not not_done
