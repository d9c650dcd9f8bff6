"""`taskmon run -- COMMAND` as a real subprocess against a real server: progress lines, pass-through,
exit codes, the failure's stderr tail, and SIGINT."""

from __future__ import annotations

import io
import os
import signal
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from hypothesis import given
from hypothesis import strategies as st

from server.models import Task, TaskStatus
from server.run import ProgressFilter
from server.settings import Settings

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMON_", "ZEP_", "PYTHONUNBUFFERED"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run_cmd(url: str, task_type: str, script: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server", "run", "--url", url, "--type", task_type, *extra, "--",
            sys.executable, str(script)]


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


async def until(condition: Callable[[], object], timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


async def read_until(proc: Process, marker: bytes, got: bytearray) -> None:
    """Read the command's stdout (through taskmon run) until ``marker`` has arrived."""
    assert proc.stdout is not None
    with anyio.fail_after(10):
        while marker not in got:
            got += await proc.stdout.receive()


async def finish(proc: Process, got: bytearray) -> tuple[int, bytes]:
    assert proc.stdout is not None and proc.stderr is not None
    err = bytearray()

    async def drain(stream: anyio.abc.ByteReceiveStream, into: bytearray) -> None:
        async for chunk in stream:
            into += chunk

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, proc.stdout, got)
            tg.start_soon(drain, proc.stderr, err)
        code = await proc.wait()
    return code, bytes(err)


def only_task(srv, task_type: str) -> Task:
    tasks = srv.manager.list_tasks(task_type=task_type)
    assert len(tasks) == 1, tasks
    return tasks[0]


async def test_progress_lines_are_reported_other_output_streams_through_and_exit_0_completes(
    live_server, settings: Settings, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    script = _script(tmp_path, "job.py", f"""
        import os, sys, time
        print("hello world")
        print("::progress 40 batch 4/10")
        sys.stdout.write("partial ")
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        print("line")
        print("::progress 90.4")
        print("a warning", file=sys.stderr)
    """)
    async with live_server(settings) as srv:
        got = bytearray()
        async with await anyio.open_process(_run_cmd(srv.url, "ok-job", script), cwd=ROOT, env=_env()) as proc:
            await read_until(proc, b"partial ", got)  # streamed as printed, even half a line
            assert bytes(got) == b"hello world\npartial "
            await until(lambda: srv.manager.list_tasks(task_type="ok-job")
                        and only_task(srv, "ok-job").progress == 40)
            running = only_task(srv, "ok-job")
            assert (running.status, running.message) == (TaskStatus.PROCESSING, "batch 4/10")
            go.touch()
            code, err = await finish(proc, got)
        assert code == 0
        assert bytes(got) == b"hello world\npartial line\n"  # progress lines consumed, the rest unchanged
        assert err == b"a warning\n"
        done = only_task(srv, "ok-job")
        assert done.status is TaskStatus.COMPLETED and done.progress == 100
        assert done.result is not None and set(done.result) == {"exit_code", "duration_s"}
        assert done.result["exit_code"] == 0 and done.result["duration_s"] >= 0
        assert done.message.startswith("exit code 0 after ")
        assert done.metadata["command"].endswith("job.py")


async def test_a_nonzero_exit_fails_with_the_code_and_the_last_stderr_lines(
    live_server, settings: Settings, tmp_path: Path
) -> None:
    script = _script(tmp_path, "bad.py", """
        import sys
        print("::progress 30 loading")
        print("some output")
        for i in range(30):
            print(f"err line {i}", file=sys.stderr)
        sys.exit(3)
    """)
    async with live_server(settings) as srv:
        got = bytearray()
        async with await anyio.open_process(_run_cmd(srv.url, "bad-job", script), cwd=ROOT, env=_env()) as proc:
            code, err = await finish(proc, got)
        assert code == 3
        assert bytes(got) == b"some output\n"
        assert err == b"".join(f"err line {i}\n".encode() for i in range(30))  # all of stderr passes through
        failed = only_task(srv, "bad-job")
        assert failed.status is TaskStatus.FAILED and failed.progress == 30
        assert failed.message.startswith("exit code 3 after ")
        assert failed.error is not None
        head, tail = failed.error.split("\n", 1)
        assert head == "exit code 3; last lines of stderr:"
        assert tail.splitlines() == [f"err line {i}" for i in range(10, 30)]


async def test_sigint_fails_the_task_interrupted_stops_the_command_and_exits_130(
    live_server, settings: Settings, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    script = _script(tmp_path, "slow.py", f"""
        import os, time
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        print("::progress 10 started")
        print("ready")
        while True:
            time.sleep(0.05)
    """)
    async with live_server(settings) as srv:
        got = bytearray()
        async with await anyio.open_process(_run_cmd(srv.url, "slow-job", script), cwd=ROOT, env=_env()) as proc:
            await read_until(proc, b"ready\n", got)
            await until(lambda: srv.manager.list_tasks(task_type="slow-job")
                        and only_task(srv, "slow-job").progress == 10)
            proc.send_signal(signal.SIGINT)
            code, err = await finish(proc, got)
        assert code == 130
        assert bytes(got) == b"ready\n"
        assert b"KeyboardInterrupt" in err  # the command got the signal (its own stderr, passed through)
        child = int(pid_file.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)  # and is gone
        failed = only_task(srv, "slow-job")
        assert (failed.status, failed.error, failed.progress) == (TaskStatus.FAILED, "interrupted", 10)
        assert failed.message.startswith("interrupted; exit code 130")


async def test_an_unreachable_server_still_runs_the_command_with_its_exit_code(tmp_path: Path) -> None:
    from conftest import free_port

    script = _script(tmp_path, "plain.py", """
        import sys
        print("::progress 50 half")
        print("work")
        sys.exit(4)
    """)
    url = f"http://127.0.0.1:{free_port()}"
    with anyio.fail_after(15):
        result = await anyio.run_process(_run_cmd(url, "x", script, "--retry-deadline", "0.2"), cwd=ROOT,
                                         env=_env(), check=False)
    assert result.returncode == 4
    assert result.stdout == b"work\n"
    assert b"running the command unwatched" in result.stderr


LINES = [b"plain text\n", b"::progress 40 batch 4/10\n", b"::progressive rock\n", b"::progress 101 no\n",
         b"::prog\n", b"\xff\xfe bytes\r\n", b"::progress 7\r\n", b"no newline at the end"]


@given(st.lists(st.sampled_from(LINES), max_size=8), st.lists(st.integers(min_value=1, max_value=7), max_size=30))
def test_the_filter_gives_the_same_result_however_the_output_is_split(lines: list[bytes], cuts: list[int]) -> None:
    data = b"".join(line for line in lines if not line.startswith(b"no newline")) + b"tail"
    out = io.BytesIO()
    seen: list[tuple[int, str | None]] = []
    filt = ProgressFilter(out, lambda percent, message: seen.append((percent, message)))
    pos = 0
    for cut in cuts:
        filt.feed(data[pos:pos + cut])
        pos += cut
    filt.feed(data[pos:])
    filt.close()
    expected = b"".join(line for line in data.splitlines(keepends=True)
                        if not (line.startswith(b"::progress 40") or line.startswith(b"::progress 7")))
    assert out.getvalue() == expected
    ours = [line for line in data.splitlines(keepends=True) if line.startswith((b"::progress 40", b"::progress 7"))]
    assert seen == [(40, "batch 4/10") if line.startswith(b"::progress 40") else (7, None) for line in ours]
