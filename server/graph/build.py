"""The graph build job: project text -> chunks -> backend batches -> node/edge counts.

It runs in a JobRunner worker thread and reports every phase through ``ctx.report`` with a
``progress_detail`` that always carries the whole picture (phase, batch i/n, items succeeded /
failed / rejected, retries so far and the most recent ones), so a reader that only sees the
latest snapshot (coalesced stream, poller, terminal task) still sees everything that mattered.

Progress: 0-5 reading, 5 chunking, 10 graph created, 10-90 batches, 90-99 reading the graph back;
the runner sets 100 when it completes the task with the returned result.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..jobs import INTERRUPTED, JobContext, JobFailed
from ..manager import CANCELLED
from ..models import TaskCancelled, TaskNotFoundError, TaskStateError, utcnow
from ..retry import Retrier, RetryAborted, RetryEvent, RetryPolicy
from .backends import BackendError, BatchState, GraphBackend, GraphNotFound
from .projects import ProjectNotFound, ProjectStatus, ProjectStore
from .text import split_text

logger = logging.getLogger(__name__)

SUPERSEDED = "superseded by a forced rebuild of the same project"
RETRY_LOG_SIZE = 10
_WAIT_SLICE_S = 0.25  # how often a long wait looks at the server-wide shutdown flag


@dataclass(frozen=True)
class BuildSpec:
    project_id: str
    graph_name: str
    chunk_size: int
    chunk_overlap: int


@dataclass(frozen=True)
class BuildOptions:
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    poll_interval: float = 1.0  # between batch status polls
    batch_timeout_s: float = 1800.0  # a batch not final by then fails the build


class _Stopped(Exception):
    """The build was asked to stop (server shutdown or a forced rebuild)."""


class _Build:
    def __init__(
        self,
        ctx: JobContext,
        spec: BuildSpec,
        backend: GraphBackend,
        projects: ProjectStore,
        options: BuildOptions,
        stop: threading.Event,
    ) -> None:
        self.ctx = ctx
        self.spec = spec
        self.backend = backend
        self.projects = projects
        self.options = options
        self.stop = stop
        self.detail: dict[str, Any] = {"phase": "starting", "backend": backend.kind, "retries": 0}
        self.retrier = Retrier(policy=options.retry_policy, on_retry=self._on_retry, sleep=self._wait)

    # -- plumbing ------------------------------------------------------------------------------
    def _stopping(self) -> bool:
        return self.stop.is_set() or self.ctx.cancelled.is_set()

    def _wait(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True (stop now) as soon as a stop is requested."""
        deadline = seconds
        while deadline > 0:
            if self._stopping():
                return True
            step = min(deadline, _WAIT_SLICE_S)
            if self.stop.wait(step):
                return True
            deadline -= step
        return self._stopping()

    def report(self, progress: int | None, message: str, **detail: Any) -> None:
        if self._stopping():
            raise _Stopped
        self.detail.update(detail)
        try:
            self.ctx.report(progress=progress, message=message, progress_detail=dict(self.detail))
        except (TaskStateError, TaskNotFoundError) as exc:
            # The task was ended elsewhere (a forced rebuild failed it, or a producer PATCH did).
            raise _Stopped from exc

    def _on_retry(self, event: RetryEvent) -> None:
        entry = {
            "operation": event.operation,
            "retry": event.retry,
            "max_retries": event.max_retries,
            "delay_s": round(event.delay, 3),
            "reason": event.reason,
            "at": utcnow().isoformat(),
        }
        log = [*self.detail.get("retry_log", []), entry][-RETRY_LOG_SIZE:]
        self.report(
            None,
            f"Retrying {event.describe()}",
            retries=self.detail["retries"] + 1,
            last_retry=entry,
            retry_log=log,
        )

    def record(self, **changes: Any) -> None:
        """Update the project only while this build is still its current one."""
        self.projects.update(self.spec.project_id, only_if_task=self.ctx.task_id, **changes)

    # -- the job -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        spec = self.spec
        self.report(1, "Reading project text", phase="reading")
        text = self.projects.text(spec.project_id)

        self.report(5, "Splitting text into chunks", phase="chunking")
        chunks = split_text(text, spec.chunk_size, spec.chunk_overlap)
        if not chunks:
            raise JobFailed("the project's text is empty")
        batch_size = self.backend.max_batch_items
        batches = [chunks[i : i + batch_size] for i in range(0, len(chunks), batch_size)]
        self.report(
            5,
            f"Split {len(text)} characters into {len(chunks)} chunks ({len(batches)} batches)",
            chunk_count=len(chunks),
            total_batches=len(batches),
            batch=0,
            items_total=len(chunks),
            items_succeeded=0,
            items_failed=0,
            items_rejected=0,
        )

        self.report(8, f"Creating graph {spec.graph_name!r}", phase="creating_graph")
        graph_id = self.backend.create_graph(spec.graph_name, f"taskmon project {spec.project_id}", self.retrier)
        self.record(graph_id=graph_id)
        self.report(10, "Graph created", graph_id=graph_id)

        warnings: list[str] = []
        offset = 0
        for number, batch in enumerate(batches, start=1):
            self._run_batch(graph_id, number, len(batches), batch, offset, warnings)
            offset += len(batch)

        succeeded = self.detail["items_succeeded"]
        if succeeded == 0:
            raise JobFailed(f"the graph backend accepted none of the {len(chunks)} chunks")

        self.report(90, "Reading the graph back", phase="reading_graph")
        node_count, edge_count = self.backend.counts(graph_id, self.retrier)
        self.report(99, f"Graph has {node_count} nodes and {edge_count} edges", phase="finishing", node_count=node_count, edge_count=edge_count)

        result = {
            "project_id": spec.project_id,
            "graph_id": graph_id,
            "node_count": node_count,
            "edge_count": edge_count,
            "chunk_count": len(chunks),
            "backend": self.backend.kind,
            "items_succeeded": succeeded,
            "items_failed": self.detail["items_failed"],
            "items_rejected": self.detail["items_rejected"],
            "retries": self.detail["retries"],
            "partial": succeeded < len(chunks),
            "warnings": warnings,
        }
        self.record(status=ProjectStatus.GRAPH_COMPLETED, graph_id=graph_id, node_count=node_count, edge_count=edge_count, error=None)
        return result

    def _run_batch(self, graph_id: str, number: int, total: int, batch: list[str], offset: int, warnings: list[str]) -> None:
        def progress(fraction: float) -> int:
            return 10 + int(80 * ((number - 1) + fraction) / total)

        base_succeeded = self.detail["items_succeeded"]
        base_failed = self.detail["items_failed"]
        self.report(progress(0), f"Sending batch {number}/{total} ({len(batch)} chunks)", phase="adding", batch=number, batch_items=len(batch))
        submitted = self.backend.submit_batch(graph_id, batch, self.retrier)
        rejected = [{"index": offset + r["index"], "reason": r["reason"]} for r in submitted.rejected]
        if rejected:
            warnings.append(f"batch {number}/{total}: {len(rejected)} chunk(s) rejected, e.g. chunk {rejected[0]['index']}: {rejected[0]['reason']}")
            base_failed += len(rejected)
            self.report(
                None,
                f"Batch {number}/{total}: {len(rejected)} of {len(batch)} chunks rejected",
                items_failed=base_failed,
                items_rejected=self.detail["items_rejected"] + len(rejected),
                rejected_sample=rejected[:5],
            )
        if submitted.accepted == 0:
            return

        waited = 0.0
        last: BatchState | None = None
        while True:
            state = self.backend.batch_state(submitted.batch_id, self.retrier)
            if state != last:
                done = state.succeeded + state.failed
                fraction = done / state.total if state.total else 0.0
                self.report(
                    progress(fraction),
                    f"Batch {number}/{total}: {state.status}, {state.succeeded} of {submitted.accepted} chunks processed"
                    + (f", {state.failed} failed" if state.failed else ""),
                    phase="processing",
                    batch_status=state.status,
                    items_succeeded=base_succeeded + state.succeeded,
                    items_failed=base_failed + state.failed,
                    items_processing=state.processing,
                )
                last = state
            if state.final:
                break
            if waited >= self.options.batch_timeout_s:
                raise JobFailed(f"batch {number}/{total} did not finish within {self.options.batch_timeout_s:.0f} s")
            if self._wait(self.options.poll_interval):
                raise _Stopped
            waited += self.options.poll_interval

        if state.status == "partial":
            warnings.append(f"batch {number}/{total}: {state.failed} of {state.total} chunks failed in processing")
        elif state.status != "succeeded":
            raise JobFailed(
                f"batch {number}/{total} ended {state.status}: {state.failed} of {state.total or submitted.accepted} chunks failed"
            )


def run_build(
    ctx: JobContext,
    *,
    spec: BuildSpec,
    backend: GraphBackend,
    projects: ProjectStore,
    options: BuildOptions,
    stop: threading.Event,
    on_finish: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """The job function (bind the keywords with functools.partial and submit it to the JobRunner)."""
    build = _Build(ctx, spec, backend, projects, options, stop)
    try:
        result = build.run()
    except (_Stopped, RetryAborted) as exc:
        reason = INTERRUPTED if ctx.cancelled.is_set() else _ended_by(ctx)
        _mark_failed(build, reason)
        raise JobFailed(reason) from exc
    except JobFailed as exc:
        _mark_failed(build, str(exc))
        raise
    except BackendError as exc:
        _mark_failed(build, str(exc))
        raise JobFailed(str(exc)) from exc
    except GraphNotFound as exc:
        _mark_failed(build, "the graph disappeared from the backend during the build")
        raise JobFailed("the graph disappeared from the backend during the build") from exc
    except ProjectNotFound as exc:
        raise JobFailed("the project was deleted during the build") from exc
    except TaskCancelled:
        _mark_failed(build, CANCELLED)
        raise
    except Exception:
        _mark_failed(build, "internal error while building the graph")
        raise
    finally:
        on_finish()
    logger.info("graph built", extra={"task_id": ctx.task_id, "project_id": spec.project_id, "graph_id": result["graph_id"]})
    return result


def _ended_by(ctx: JobContext) -> str:
    """Why the task was ended elsewhere: the cancel grace ran out (the server failed it "cancelled"),
    else a forced rebuild superseded it."""
    task = ctx.manager.get_task(ctx.task_id)
    return CANCELLED if task is not None and task.error == CANCELLED else SUPERSEDED


def _mark_failed(build: _Build, error: str) -> None:
    try:
        build.record(status=ProjectStatus.FAILED, error=error)
    except ProjectNotFound:
        logger.info("project gone before its build ended", extra={"project_id": build.spec.project_id})
