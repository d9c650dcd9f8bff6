"""GraphService: the graph feature's object graph (projects, backend, running builds).

Built once by the app's lifespan (``build_graph_service``) and reached by routes through
``request.app.state.graph``. It owns the rule "one build per project at a time": a second build
is refused with the running task's id unless ``force`` is given, in which case the running build
is failed as superseded and asked to stop, and a new one starts.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from typing import Any

from ..jobs import JobRunner
from ..manager import TaskManager
from ..models import Task, TaskNotFoundError, TaskStateError, TaskStatus
from ..retry import Retrier, RetryPolicy
from ..settings import Settings
from .backends import GraphBackend, LocalBackend, ZepBackend
from .build import SUPERSEDED, BuildOptions, BuildSpec, run_build
from .projects import ProjectStatus, ProjectStore

logger = logging.getLogger(__name__)

TASK_TYPE = "graph_build"
INTERRUPTED_BUILD = "interrupted: the server stopped before the graph build finished"


class BuildConflict(Exception):
    """A build is already running for the project."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id


class ShuttingDown(Exception):
    """The server is stopping and takes no new builds."""


@dataclass
class _RunningBuild:
    task_id: str
    stop: threading.Event


def choose_backend(settings: Settings) -> GraphBackend:
    """Zep when ZEP_API_KEY is set (ZEP_BASE_URL optional), else the embedded local backend."""
    if settings.zep_api_key:
        return ZepBackend(settings.zep_api_key, settings.zep_base_url)
    return LocalBackend(settings.data_dir)


class GraphService:
    def __init__(self, settings: Settings, manager: TaskManager, jobs: JobRunner, *, backend: GraphBackend | None = None) -> None:
        self.settings = settings
        self.manager = manager
        self.jobs = jobs
        self.projects = ProjectStore(settings.data_dir)
        self.backend = backend if backend is not None else choose_backend(settings)
        # Tunable after construction (tests shorten them); read at the start of each build.
        self.build_options = BuildOptions()
        self.request_retry_policy = RetryPolicy(max_attempts=3)
        self._lock = threading.Lock()
        self._running: dict[str, _RunningBuild] = {}
        self._reconcile()

    def close(self) -> None:
        with self._lock:
            running = list(self._running.values())
        for build in running:
            build.stop.set()
        self.backend.close()

    def request_retrier(self) -> Retrier:
        """Retries for calls made while answering a request (no task to report them to)."""
        return Retrier(policy=self.request_retry_policy)

    def _reconcile(self) -> None:
        """A project left ``graph_building`` by a dead process follows its (now finished) task."""
        for meta in self.projects.list():
            if meta["status"] != ProjectStatus.GRAPH_BUILDING.value:
                continue
            task_id = meta.get("graph_build_task_id")
            task = self.manager.get_task(task_id) if isinstance(task_id, str) else None
            if task is not None and not task.is_terminal:
                continue  # another process may be running it
            if task is not None and task.status is TaskStatus.COMPLETED and task.result:
                changes: dict[str, Any] = {"status": ProjectStatus.GRAPH_COMPLETED, "graph_id": task.result.get("graph_id")}
            else:
                changes = {"status": ProjectStatus.FAILED, "error": (task.error if task else None) or INTERRUPTED_BUILD}
            self.projects.update(meta["project_id"], only_if_task=task_id, **changes)
            logger.info("project build state reconciled", extra={"project_id": meta["project_id"], "status": changes["status"].value})

    def start_build(self, spec: BuildSpec, *, force: bool = False) -> Task:
        """Create the task and queue the job; BuildConflict when one is running and not ``force``."""
        with self._lock:  # delete_project takes it too: the project cannot vanish meanwhile
            text_length = self.projects.get(spec.project_id)["total_text_length"]  # ProjectNotFound -> 404
            current = self._running.get(spec.project_id)
            if current is not None:
                task = self.manager.get_task(current.task_id)
                if task is not None and not task.is_terminal:
                    if not force:
                        raise BuildConflict(current.task_id)
                    current.stop.set()
                    # A queued build fails itself as superseded when a worker picks it up; a running
                    # one is failed now, so its watchers see it end at once (the job then stops at
                    # its next checkpoint and finds the task already failed).
                    if task.status is TaskStatus.PROCESSING:
                        try:
                            self.manager.fail_task(current.task_id, SUPERSEDED)
                        except (TaskStateError, TaskNotFoundError):
                            logger.info("superseded build had already ended", extra={"task_id": current.task_id})
            task = self.manager.create_task(
                TASK_TYPE,
                metadata={
                    "project_id": spec.project_id,
                    "graph_name": spec.graph_name,
                    "chunk_size": spec.chunk_size,
                    "chunk_overlap": spec.chunk_overlap,
                    "text_length": text_length,
                    "backend": self.backend.kind,
                },
                owned=True,  # run by this process's job pool: failed as interrupted if the process dies
            )
            build = _RunningBuild(task.task_id, threading.Event())
            try:
                self.projects.update(
                    spec.project_id,
                    status=ProjectStatus.GRAPH_BUILDING,
                    graph_build_task_id=task.task_id,
                    chunk_size=spec.chunk_size,
                    chunk_overlap=spec.chunk_overlap,
                    error=None,
                )
            except BaseException:
                self.manager.fail_task(task.task_id, "could not record the build on the project")
                raise
            self._running[spec.project_id] = build
        job = functools.partial(
            run_build,
            spec=spec,
            backend=self.backend,
            projects=self.projects,
            options=self.build_options,
            stop=build.stop,
            on_finish=functools.partial(self._forget, spec.project_id, build),
        )
        try:
            self.jobs.submit(task.task_id, job)
        except RuntimeError as exc:  # the pool refuses new work once shutdown has begun
            self.manager.fail_task(task.task_id, INTERRUPTED_BUILD)
            self.projects.update(spec.project_id, only_if_task=task.task_id, status=ProjectStatus.FAILED, error=INTERRUPTED_BUILD)
            self._forget(spec.project_id, build)
            raise ShuttingDown from exc
        logger.info("graph build queued", extra={"task_id": task.task_id, "project_id": spec.project_id})
        return task

    def _forget(self, project_id: str, build: _RunningBuild) -> None:
        with self._lock:
            if self._running.get(project_id) is build:
                del self._running[project_id]

    def delete_project(self, project_id: str) -> None:
        """Delete a project unless a build is running for it (BuildConflict)."""
        with self._lock:
            running = self._running.get(project_id)
            if running is not None:
                task = self.manager.get_task(running.task_id)
                if task is not None and not task.is_terminal:
                    raise BuildConflict(running.task_id)
            self.projects.delete(project_id)


def build_graph_service(settings: Settings, manager: TaskManager, jobs: JobRunner) -> GraphService:
    return GraphService(settings, manager, jobs)


__all__ = ["BuildConflict", "GraphService", "ShuttingDown", "build_graph_service", "choose_backend"]
