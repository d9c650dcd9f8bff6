"""``taskmon serve`` and ``taskmon watch TASK_ID``: a thin CLI over the same path as programmatic use."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import httpx
import uvicorn
from httpx_sse import connect_sse

from .app import TaskmonApp, create_app
from .logs import configure_logging
from .settings import Settings, SettingsError

__all__ = ["Server", "main", "uvicorn_config", "worker_app"]

_SHARED_SCHEMES = ("redis://", "rediss://", "unix://")

logger = logging.getLogger(__name__)


class Server(uvicorn.Server):
    """uvicorn's Server, which also ends every open stream the moment an exit is requested.

    uvicorn waits for open responses before it runs the lifespan shutdown, so streams must be told
    to finish from the exit signal itself, or Ctrl+C would wait on them."""

    def __init__(self, config: uvicorn.Config, app: TaskmonApp) -> None:
        super().__init__(config)
        self.taskmon_app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.request_stop()

    def request_stop(self) -> None:
        """Thread-safe: stop accepting, end the streams, shut down."""
        self.should_exit = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.taskmon_app.shutdown_streams)


def uvicorn_config(app: TaskmonApp, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
        lifespan="on",
        log_config=None,  # configure_logging() did it once
        access_log=settings.access_log,
        timeout_graceful_shutdown=3,  # only a reader that stopped reading can hold a stream this long
        server_header=False,
        # taskmon uses no client addresses; leaving uvicorn's proxy-headers wrapper out saves a
        # coroutine frame on every open stream (behind a proxy, access logs show the proxy).
        proxy_headers=False,
    )


def _raise_open_file_limit(wanted: int = 65_536) -> int:
    """Each stream is a socket: lift the soft limit (and, when allowed, the hard one) to ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    for new_hard in (max(hard, wanted), hard):
        new_soft = wanted if new_hard == resource.RLIM_INFINITY else min(wanted, new_hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, new_hard))
            return new_soft
        except (ValueError, OSError):
            continue  # raising the hard limit needs privileges; try within the current one
    logger.warning("could not raise the open-file limit", extra={"soft": soft, "hard": hard})
    return soft


def _serve(args: argparse.Namespace) -> int:
    overrides = {
        "host": args.host,
        "port": args.port,
        "store_url": args.store,
        "data_dir": args.data_dir,
        "log_level": args.log_level,
        "access_log": True if args.access_log else None,
    }
    try:
        settings = Settings.from_env(**overrides)
    except SettingsError as exc:
        print(f"taskmon: configuration error: {exc}", file=sys.stderr)
        return 2
    workers = args.workers or 1
    if workers < 1:
        print("taskmon: --workers must be >= 1", file=sys.stderr)
        return 2
    if workers > 1 and not settings.store_url.startswith(_SHARED_SCHEMES):
        print(
            f"taskmon: --workers {workers} needs a store shared by processes; {settings.store_url} serves one "
            "process: use --store redis://HOST:PORT/DB",
            file=sys.stderr,
        )
        return 2
    refusal = _store_refusal(settings)
    if refusal is not None:
        print(f"taskmon: {refusal}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.access_log)
    if workers > 1:
        return _serve_workers(settings, workers)
    nofile = _raise_open_file_limit()
    app = create_app(settings)
    print(f"taskmon serving on http://{settings.host}:{settings.port} (store {settings.store_url})", file=sys.stderr)
    logger.warning(
        "taskmon serving",
        extra={"host": settings.host, "port": settings.port, "open_file_limit": nofile},
    )
    server = Server(uvicorn_config(app, settings), app)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after a clean shutdown; exit as a shell expects
        return 130
    return 0


def _store_refusal(settings: Settings) -> str | None:
    """A one-line reason this process cannot open its store (sqlite held by another process), or None.

    The lifespan would refuse too, but through uvicorn's start-up traceback; this says it plainly."""
    if not settings.store_url.startswith("sqlite:///"):
        return None
    from .stores.sqlite import SqliteStore, StoreLocked

    try:
        SqliteStore(settings.store_url.removeprefix("sqlite:///")).close()
    except StoreLocked as exc:
        return str(exc)
    return None


def worker_app() -> TaskmonApp:
    """The app factory each ``--workers`` process imports (settings come through TASKMON_* variables)."""
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.access_log)
    _raise_open_file_limit()
    return create_app(settings)


def _serve_workers(settings: Settings, workers: int) -> int:
    """N processes on one port (uvicorn's supervisor); they share the task state through Redis."""
    os.environ.update(
        {
            "TASKMON_HOST": settings.host,
            "TASKMON_PORT": str(settings.port),
            "TASKMON_STORE": settings.store_url,
            "TASKMON_DATA_DIR": str(settings.data_dir),
            "TASKMON_LOG_LEVEL": settings.log_level,
        }
    )
    print(
        f"taskmon serving on http://{settings.host}:{settings.port} with {workers} workers (store {settings.store_url})",
        file=sys.stderr,
    )
    try:
        uvicorn.run(
            "server.cli:worker_app",
            factory=True,
            workers=workers,
            host=settings.host,
            port=settings.port,
            lifespan="on",
            log_config=None,
            access_log=settings.access_log,
            timeout_graceful_shutdown=3,
            server_header=False,
            proxy_headers=False,
        )
    except KeyboardInterrupt:
        return 130
    return 0


def _bar(task: dict[str, Any]) -> str:
    return f"{task['status']:<10} {task['message'][:60]}"


def _watch(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    token = args.token or os.environ.get("TASKMON_READ_TOKEN") or os.environ.get("TASKMON_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base = args.url.rstrip("/")
    url = f"{base}/tasks/{args.task_id}/stream"
    last_id: str | None = None
    final: dict[str, Any] | None = None
    failures = 0
    with (
        httpx.Client(headers=headers, timeout=httpx.Timeout(10, read=None)) as client,
        Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                 TimeElapsedColumn(), transient=False) as progress,
    ):
        bar = progress.add_task("connecting", total=100)
        while final is None:
            request_headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with connect_sse(client, "GET", url, headers=request_headers) as source:
                    response = source.response
                    if response.status_code == 204:  # we already hold the terminal version
                        snapshot = client.get(f"{base}/api/graph/task/{args.task_id}").json()["data"]
                        final = snapshot
                        break
                    if response.status_code != 200:
                        response.read()
                        print(f"taskmon watch: {response.status_code}: {_error_text(response)}", file=sys.stderr)
                        return 2
                    failures = 0
                    for event in source.iter_sse():
                        if event.event == "task":
                            task = json.loads(event.data)
                            last_id = event.id or last_id
                            progress.update(bar, completed=task["progress"], description=_bar(task))
                            if task["status"] in ("completed", "failed"):
                                final = task
                        elif event.event == "end":
                            break
            except httpx.TransportError as exc:
                failures += 1
                if failures > args.retries:
                    print(f"taskmon watch: cannot reach {base}: {exc}", file=sys.stderr)
                    return 2
                progress.update(bar, description=f"reconnecting ({failures}/{args.retries})")
                time.sleep(min(5.0, 0.5 * 2**failures))
    if final["status"] == "failed":
        print(f"failed: {final.get('error') or final.get('message')}", file=sys.stderr)
        return 1
    print(json.dumps(final.get("result"), ensure_ascii=False))
    return 0


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error"))
    except ValueError:
        return response.text[:200]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskmon", description="Real-time task progress service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server (flags override TASKMON_* variables)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--store", help="memory://, sqlite:///PATH or redis://HOST:PORT/DB")
    serve.add_argument("--data-dir")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--workers", type=int, help="processes serving one port (needs --store redis://...)")
    serve.set_defaults(func=_serve)
    watch = commands.add_parser("watch", help="follow a task's progress; exit 0 when completed, 1 when failed")
    watch.add_argument("task_id")
    watch.add_argument("--url", default=os.environ.get("TASKMON_URL", "http://127.0.0.1:8000"))
    watch.add_argument("--token", help="read or API token (default: TASKMON_READ_TOKEN)")
    watch.add_argument("--retries", type=int, default=10, help="reconnect attempts before giving up")
    watch.set_defaults(func=_watch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
