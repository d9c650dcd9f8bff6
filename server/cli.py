"""``taskmon serve``, ``taskmon watch TASK_ID`` and ``taskmon run -- COMMAND``: a thin CLI over the same
path as programmatic use."""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import uvicorn
from httpx_sse import connect_sse

from .app import TaskmonApp, create_app
from .connections import limited_protocol
from .logs import configure_logging
from .settings import Settings, SettingsError

__all__ = ["Server", "main", "uvicorn_config", "worker_app"]

_SHARED_SCHEMES = ("redis://", "rediss://", "unix://")

logger = logging.getLogger(__name__)


class Server(uvicorn.Server):
    """uvicorn's Server plus a thread-safe ``request_stop`` (the tests run it in a thread).

    Ending the streams on exit is the app's business (server/app.py): it notices uvicorn's exit
    flag as it would under ``uvicorn --factory``."""

    def __init__(self, config: uvicorn.Config, app: TaskmonApp) -> None:
        super().__init__(config)
        self.taskmon_app = app

    def request_stop(self) -> None:
        """Thread-safe: stop accepting, end the streams, shut down."""
        self.should_exit = True  # uvicorn's main loop polls it
        self.taskmon_app.request_shutdown()


def uvicorn_config(app: TaskmonApp, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(app, **_uvicorn_options(settings))


def _uvicorn_options(settings: Settings, http: Any = None) -> dict[str, Any]:
    """uvicorn's options for ``taskmon serve``, one process or ``--workers`` (``http``: the
    protocol by import string, for worker processes that build it themselves)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "loop": "auto",  # uvloop when installed
        # httptools when installed (else h11), plus header size/time limits and a connection cap
        # that uvicorn lacks (server/connections.py); README, "Limits and browser protection".
        "http": http or limited_protocol(settings),
        # h11's own header bound, a read chunk above ours so that ours answers first (431)
        "h11_max_incomplete_event_size": settings.max_header_bytes + 256 * 1024,
        "timeout_keep_alive": max(1, round(settings.keepalive_s)),  # idle after a response
        # uvicorn answers 503 to requests beyond this many connections or running requests; ours
        # (connections.py) refuses earlier, at accept; this is the backstop for running tasks.
        "limit_concurrency": settings.max_connections + 64,
        "lifespan": "on",
        "log_config": None,  # configure_logging() did it once
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": 3,  # only a reader that stopped reading can hold a stream this long
        "server_header": False,
        # taskmon uses no client addresses; leaving uvicorn's proxy-headers wrapper out saves a
        # coroutine frame on every open stream (behind a proxy, access logs show the proxy).
        "proxy_headers": False,
    }


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


def _plain(text: object) -> str:
    """Text safe for a terminal: control and format characters (ESC, CSI, BEL, bidi overrides,
    newlines...) become ``\\u00XX`` escapes; everything else stays as it is."""
    return "".join(
        f"\\u{ord(ch):04x}" if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in str(text)
    )


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
            "TASKMON_ACCESS_LOG": "1" if settings.access_log else "0",
        }
    )
    print(
        f"taskmon serving on http://{settings.host}:{settings.port} with {workers} workers (store {settings.store_url})",
        file=sys.stderr,
    )
    try:
        # each worker imports the app factory and taskmon's connection protocol by name (the
        # supervisor's config is pickled into spawned processes; a protocol class built here is not)
        uvicorn.run(
            "server.cli:worker_app",
            factory=True,
            workers=workers,
            **_uvicorn_options(settings, http="server.cli:worker_protocol"),
        )
    except KeyboardInterrupt:
        return 130
    return 0


_worker_protocol: type | None = None


def __getattr__(name: str) -> Any:
    """``server.cli:worker_protocol``: the connection protocol of a ``--workers`` process (header
    limit and deadline, connection cap), built once in that process from its TASKMON_* settings
    after the open-file limit is raised (the connection cap depends on it)."""
    global _worker_protocol
    if name != "worker_protocol":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _worker_protocol is None:
        _raise_open_file_limit()
        _worker_protocol = limited_protocol(Settings.from_env())
    return _worker_protocol


def _bar(task: dict[str, Any]) -> str:
    """The bar's description, printed as plain text (the column has markup off, see ``_watch``)."""
    return _plain(f"{task['status']:<10} {str(task['message'])[:60]}")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _timing(task: dict[str, Any], now: datetime | None = None) -> str:
    """The task's own elapsed time (since it started processing) and the server's ETA."""
    started = task.get("started_at")
    if started is None:
        elapsed = "-:--"
    else:
        end = task.get("finished_at")
        stop = datetime.fromisoformat(end) if end else (now or datetime.now(UTC))
        elapsed = _clock(max(0.0, (stop - datetime.fromisoformat(started)).total_seconds()))
    eta = task.get("eta_s")
    return f"elapsed {elapsed} eta {'-:--' if eta is None else _clock(eta)}"


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
        Progress(TextColumn("{task.description}", markup=False), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                 TimeElapsedColumn(), TextColumn("{task.fields[timing]}", markup=False), transient=False) as progress,
    ):
        bar = progress.add_task("connecting", total=100, timing="")
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
                        print(f"taskmon watch: {response.status_code}: {_plain(_error_text(response))}", file=sys.stderr)
                        return 2
                    failures = 0
                    for event in source.iter_sse():
                        if event.event == "task":
                            task = json.loads(event.data)
                            last_id = event.id or last_id
                            progress.update(bar, completed=task["progress"], description=_bar(task), timing=_timing(task))
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
        print(f"failed: {_plain(final.get('error') or final.get('message'))}", file=sys.stderr)
        return 1
    print(_plain(json.dumps(final.get("result"), ensure_ascii=False)))  # still valid JSON
    return 0


def _cancel(args: argparse.Namespace) -> int:
    """Ask the server to cancel a task: 0 accepted, 1 the task already finished (409), 2 otherwise."""
    token = args.token or os.environ.get("TASKMON_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{args.url.rstrip('/')}/api/tasks/{args.task_id}/cancel"
    try:
        response = httpx.post(url, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        print(f"taskmon cancel: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    if response.status_code == 202:
        print(f"cancel requested for {args.task_id}; the task ends failed \"cancelled\" at its next report", file=sys.stderr)
        return 0
    print(f"taskmon cancel: {response.status_code}: {_error_text(response)}", file=sys.stderr)
    return 1 if response.status_code == 409 else 2


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error"))
    except ValueError:
        return response.text[:200]


def _run(args: argparse.Namespace) -> int:
    from .client import Client
    from .run import run_command

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("taskmon run: give the command after --, e.g. taskmon run -- ./import.sh", file=sys.stderr)
        return 2
    configure_logging("error")  # the command's terminal: taskmon run speaks only when it must
    try:
        with Client(args.url, args.token, retry_deadline=args.retry_deadline) as client:
            return run_command(command, client=client, task_type=args.task_type)
    except KeyboardInterrupt:  # while reaching taskmon before the command started, or after it ended
        print("taskmon run: interrupted", file=sys.stderr)
        return 130


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
    cancel = commands.add_parser(
        "cancel", help="ask for a task to be cancelled; exit 0 when accepted, 1 when it already finished, 2 otherwise"
    )
    cancel.add_argument("task_id")
    cancel.add_argument("--url", default=os.environ.get("TASKMON_URL", "http://127.0.0.1:8000"))
    cancel.add_argument("--token", help="producer API token (default: TASKMON_API_TOKEN)")
    cancel.set_defaults(func=_cancel)
    run = commands.add_parser(
        "run",
        help="run COMMAND as a task; its stdout lines '::progress N message' report progress",
        description="Run COMMAND as a task: processing while it runs, completed when it exits 0, failed "
        "otherwise (with the exit code and the last lines of stderr). A stdout line '::progress 40 batch 4/10' "
        "sets progress 40 and that message; all other output passes through. Exits with the command's code.",
    )
    run.add_argument("--type", dest="task_type", help="task_type (default: the command's name)")
    run.add_argument("--url", help="taskmon base URL (default: TASKMON_URL, else http://127.0.0.1:8000)")
    run.add_argument("--token", help="producer API token (default: TASKMON_API_TOKEN)")
    run.add_argument("--retry-deadline", type=float, default=60.0,
                     help="seconds to keep retrying when taskmon is unreachable (default 60)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    run.set_defaults(func=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
