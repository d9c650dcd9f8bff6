"""``taskmon run [--type T] [--url U] -- COMMAND ...``: run any command as a watched task.

- The task is created and set ``processing`` before the command starts (if taskmon cannot be reached
  within the retry deadline, a warning is printed and the command runs unwatched: a monitoring
  outage never stops the job). The command gets ``TASKMON_TASK_ID`` (and ``PYTHONUNBUFFERED=1``
  unless set, so Python scripts' progress lines are not held in a pipe buffer).
- Progress: a stdout line of the form ``::progress N [message]`` (N a number from 0 to 100, e.g.
  ``::progress 40 batch 4/10``) is consumed and reported; every other byte passes through unchanged
  as it arrives, stdout to stdout and stderr to stderr (a partial line is held back only while it
  could still become a progress line).
- Exit 0: ``completed`` with result ``{"exit_code": 0, "duration_s": ...}``. Any other exit: ``failed``
  with the exit code and the last lines of stderr as the error.
- SIGINT (Ctrl+C): the task fails with ``interrupted``. When the terminal delivered it (we are in the
  foreground process group of a terminal), the command got it too; otherwise it is forwarded. SIGTERM
  and SIGHUP are forwarded and fail the task with ``terminated (SIGTERM)`` etc. A second signal kills
  the command. A signal ignored when ``taskmon run`` started (a background job of a script) stays
  ignored, as a shell would leave it. A cancel requested on the server (seen at the next progress
  line) terminates the command (SIGTERM, then SIGKILL after 10 s); the task fails with ``cancelled``.
- The exit code is the command's; a command killed by signal N exits 128 + N, as shells report it
  (130 for SIGINT). A command that cannot be started: 127 (not found) or 126, as shells do.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import BinaryIO

from .client import Client, Task, TaskCancelled, TaskmonError

__all__ = ["PROGRESS_LINE", "ProgressFilter", "run_command"]

PROGRESS_MARK = b"::progress"
PROGRESS_LINE = re.compile(rb"::progress[ \t]+(\d+(?:\.\d+)?)%?(?:[ \t]+(.*?))?[ \t]*\r?\n?")
MAX_HELD = 4096  # a "::progress..." line longer than this is not ours: it passes through
STDERR_TAIL_LINES = 20
STDERR_TAIL_CHARS = 2000
CANCEL_GRACE_S = 10.0

logger = logging.getLogger(__name__)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Sink:
    """Where the command's output goes. When our own reader goes away (a closed pipe), the output is
    dropped from then on, but the command's pipe keeps being drained so the command is never blocked."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.gone = False

    def write(self, data: bytes) -> None:
        if not data or self.gone:
            return
        try:
            self._out.write(data)
            self._out.flush()
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            self.gone = True


class ProgressFilter:
    """Streams a command's stdout to ``out``, taking out ``::progress`` lines (given to ``on_progress``)."""

    def __init__(self, out: BinaryIO, on_progress: Callable[[int, str | None], None]) -> None:
        self._out = _Sink(out)
        self._on_progress = on_progress
        self._held = bytearray()  # the start of the current line, while it may be a progress line
        self._passing = False  # the current line is known not to be one: its bytes go straight out

    def feed(self, data: bytes) -> None:
        out = bytearray()
        pos = 0
        while pos < len(data):
            newline = data.find(b"\n", pos)
            end = len(data) if newline < 0 else newline + 1
            piece, pos = data[pos:end], end
            if self._passing:
                out += piece
                self._passing = newline < 0
                continue
            self._held += piece
            if newline >= 0:
                line = bytes(self._held)
                self._held.clear()
                if not self._take(line, out):
                    out += line
            elif not self._may_be_progress(self._held):
                out += self._held
                self._held.clear()
                self._passing = True
        self._out.write(bytes(out))

    def close(self) -> None:
        """End of stream: a held last line without a newline is still a line."""
        line = bytes(self._held)
        self._held.clear()
        out = bytearray()
        if line and not self._take(line, out):
            out += line
        self._out.write(bytes(out))

    @staticmethod
    def _may_be_progress(held: bytearray) -> bool:
        if len(held) > MAX_HELD:
            return False
        if len(held) < len(PROGRESS_MARK):
            return PROGRESS_MARK.startswith(held)
        return held.startswith(PROGRESS_MARK)

    def _take(self, line: bytes, out: bytearray) -> bool:
        match = PROGRESS_LINE.fullmatch(line)
        if match is None:
            return False
        percent = float(match.group(1))
        if percent > 100:
            return False
        self._out.write(bytes(out))  # what came before goes out first
        out.clear()
        message = (match.group(2) or b"").decode("utf-8", "replace")
        self._on_progress(round(percent), message or None)
        return True


class _StderrTail:
    """Streams stderr through and keeps its last lines for the failure message."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = _Sink(out)
        self._lines: collections.deque[bytes] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._partial = bytearray()

    def feed(self, data: bytes) -> None:
        self._out.write(data)
        self._partial += data
        *complete, rest = bytes(self._partial).split(b"\n")
        self._lines.extend(line[-STDERR_TAIL_CHARS:] for line in complete)
        self._partial = bytearray(rest[-STDERR_TAIL_CHARS * 4 :])

    def text(self) -> str:
        lines = [*self._lines, bytes(self._partial)]
        text = b"\n".join(lines).decode("utf-8", "replace").strip()
        return text[-STDERR_TAIL_CHARS:]


def _pump(fd: int, feed: Callable[[bytes], None], close: Callable[[], None] | None = None) -> None:
    try:
        while chunk := os.read(fd, 65536):
            feed(chunk)
    except Exception:
        logger.exception("reading the command's output failed")
    finally:
        if close is not None:
            close()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _terminal_sends_to_group() -> bool:
    """True when a Ctrl+C on our terminal reaches our whole process group (the command's too)."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


class _Command:
    """The running command, the signals we received, and a server-side cancel."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.signals: list[int] = []
        self.cancelled = False
        self.report_error: TaskmonError | None = None
        self._terminal_group = _terminal_sends_to_group()
        self._stopper: threading.Thread | None = None

    def on_signal(self, number: int, frame: FrameType | None) -> None:
        self.signals.append(number)
        if len(self.signals) > 1:
            self.proc.kill()  # asked twice: stop now
        elif number == signal.SIGINT and self._terminal_group:
            pass  # the terminal sent it to the command as well
        else:
            self.proc.send_signal(number)

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self._stopper = threading.Thread(target=self._stop, name="taskmon-run-cancel", daemon=True)
        self._stopper.start()

    def _stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _progress_reporter(task: Task | None, command: list[_Command]) -> Callable[[int, str | None], None]:
    def report(percent: int, message: str | None) -> None:
        if task is None or not command:
            return
        cmd = command[0]
        if cmd.cancelled or cmd.report_error is not None:
            return
        try:
            task.progress(percent, message)
        except TaskCancelled:
            print("taskmon run: a cancel was requested: stopping the command", file=sys.stderr, flush=True)
            cmd.cancel()
        except TaskmonError as exc:
            cmd.report_error = exc
            print(f"taskmon run: progress no longer reported: {exc}", file=sys.stderr, flush=True)

    return report


def _exit_code(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode


def _start_task(client: Client, task_type: str, command: Sequence[str]) -> Task | None:
    task = client.task(task_type, metadata={"command": " ".join(command)[:1000]})
    try:
        return task.start()
    except TaskmonError as exc:
        print(f"taskmon run: cannot report to {client.base_url} ({exc}); running the command unwatched",
              file=sys.stderr, flush=True)
        return None


def run_command(
    command: Sequence[str],
    *,
    client: Client,
    task_type: str | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """Run ``command`` as a task; returns the exit code to exit with."""
    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr.buffer
    task_type = task_type or os.path.basename(command[0]) or "command"
    task = _start_task(client, task_type, command)

    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if task is not None and task.id is not None:
        env["TASKMON_TASK_ID"] = task.id
    started = time.monotonic()
    try:
        proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        reason = f"cannot start {command[0]}: {exc.strerror or exc}"
        print(f"taskmon run: {reason}", file=sys.stderr, flush=True)
        _finish(task, lambda t: t.fail(reason, message=f"exit code {code}"))
        return code

    holder: list[_Command] = []
    filt = ProgressFilter(out, _progress_reporter(task, holder))
    tail = _StderrTail(err)
    cmd = _Command(proc)
    holder.append(cmd)
    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=_pump, args=(proc.stdout.fileno(), filt.feed, filt.close), name="taskmon-run-stdout",
                         daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr.fileno(), tail.feed), name="taskmon-run-stderr",
                         daemon=True),
    ]
    # a signal ignored when we started (a background job of a script) stays ignored, as shells do
    previous = {
        number: signal.signal(number, cmd.on_signal)
        for number in FORWARDED
        if signal.getsignal(number) is not signal.SIG_IGN
    }
    try:
        for reader in readers:
            reader.start()
        returncode = proc.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    for reader in readers:  # a background child of the command may hold the pipes open: don't wait forever
        reader.join(5)
    proc.stdout.close()
    proc.stderr.close()
    duration = round(time.monotonic() - started, 3)
    code = _exit_code(returncode)
    summary = f"exit code {code} after {duration:g} s"

    if cmd.signals:
        first = cmd.signals[0]
        error = "interrupted" if first == signal.SIGINT else f"terminated ({_signal_name(first)})"
        _finish(task, lambda t: t.fail(error, message=f"{error}; {summary}"))
    elif cmd.cancelled:
        _finish(task, lambda t: t.fail("cancelled", message=f"cancelled; {summary}"))
    elif returncode == 0:
        _finish(task, lambda t: t.complete({"exit_code": 0, "duration_s": duration}, message=summary))
    else:
        cause = f"killed by {_signal_name(-returncode)} (exit code {code})" if returncode < 0 else f"exit code {code}"
        stderr_tail = tail.text()
        error = f"{cause}; last lines of stderr:\n{stderr_tail}" if stderr_tail else cause
        _finish(task, lambda t: t.fail(error, message=summary))
    return code


def _finish(task: Task | None, end: Callable[[Task], object]) -> None:
    if task is None:
        return
    try:
        end(task)
    except TaskmonError as exc:
        print(f"taskmon run: could not report the end of task {task.id}: {exc}", file=sys.stderr, flush=True)
