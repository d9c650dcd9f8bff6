"""Publish cost from a job thread: how long ``update_task`` takes with N stream subscribers.

This needs the server in-process, so this script *is* the server process: it builds the app
(taskmon: ``server.app.create_app(Settings(store_url="memory://"))``; baseline:
``bench.baseline_naive.create_app()``), runs uvicorn (uvloop + httptools) on the main thread,
and from a separate "job" thread times ``update_task`` calls with ``time.perf_counter_ns``.
The N subscribers are real SSE streams held by ``bench.loadgen hold`` in a subprocess
(pinned to core 1 when ``--pin-loadgen 1``). Updates are spaced so that each fan-out has
finished before the next call (the loop is idle): what is timed is the call itself, not the
GIL held by a busy loop.

    python -m bench.publish_cost --impl taskmon --subs 10000 --port 8790

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

PY = sys.executable


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))]


def build(impl: str, subs: int):
    """(app, create(), update()) for the implementation under test: ``update()`` gives the callable a
    job reports with, ``(task_id, **fields)``; the job looks it up once, as a real job holds its manager."""
    if impl == "taskmon":
        from server.app import create_app
        from server.settings import Settings

        app = create_app(Settings(store_url="memory://", max_streams=max(10_000, subs + 100)))

        def create() -> str:
            manager = app.state.manager
            task = manager.create_task("bench")
            manager.update_task(task.task_id, status="processing")
            return task.task_id

        def update() -> Callable[..., Any]:  # what a job holds: the manager's method (after start-up)
            return app.state.manager.update_task

        return app, create, update
    from bench.baseline_naive import create_app

    app = create_app()

    def create() -> str:
        hub = app.state.hub
        task = hub.create_task("bench")
        hub.update_task(task["task_id"], status="processing")
        return task["task_id"]

    def update() -> Callable[..., Any]:
        return app.state.hub.update_task

    return app, create, update


def floor_handoff():
    """The least any ``update_task`` with the same guarantees can do in the job thread: the checks
    that must raise in the caller (types and ranges, the detail encoded for its size and nesting,
    the task's state and a pending cancel, under a lock), then an append to a queue and one wake-up
    of another thread (it would do the rest: plan, encode, commit, publish), with the same cheap
    primitives as taskmon's report path (a bare lock released, a SCHED_BATCH waker). No clock is
    read, no snapshot is looked up or built. Timed in the same thread at the same spacing as
    ``update_task``, it is this machine's floor for the call (after a pause every line of Python
    here runs several times slower than warm)."""
    import collections

    from server.bus import yield_on_wake
    from server.manager import MAX_DEPTH, MAX_TEXT
    from server.wire import encode_chunks

    lock, queue, wake = threading.Lock(), collections.deque(), threading.Lock()
    wake.acquire()
    state = {"bench": ("processing", False)}

    def waker() -> None:
        yield_on_wake()
        while True:
            wake.acquire()
            with lock:
                queue.clear()

    threading.Thread(target=waker, name="floor-waker", daemon=True).start()

    def handoff(task_id: str, progress=None, message=None, progress_detail=None) -> None:
        if progress is not None and (type(progress) is not int or not 0 <= progress <= 100):
            raise ValueError("progress")
        if message is not None and (type(message) is not str or len(message) > MAX_TEXT):
            raise ValueError("message")
        if progress_detail is not None:
            if type(progress_detail) is not dict:
                raise ValueError("progress_detail")
            encoded = "".join(encode_chunks(progress_detail, 0))
            if len(encoded) > 16 * 1024 or encoded.count("{") + encoded.count("[") > MAX_DEPTH:
                raise ValueError("progress_detail is too large or too deep")
        with lock:
            status, cancel = state[task_id]
            if status != "processing":
                raise RuntimeError("not processing")
            if cancel:
                raise RuntimeError("cancelled")
            queue.append((task_id, progress, message, progress_detail))
            if len(queue) == 1:
                try:
                    wake.release()
                except RuntimeError:
                    pass

    return handoff


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="update_task latency from a job thread")
    p.add_argument("--impl", choices=["taskmon", "baseline"], default="taskmon")
    p.add_argument("--subs", type=int, default=0)
    p.add_argument("--updates", type=int, default=25)
    p.add_argument("--interval", type=float, default=None,
                   help="seconds between updates (default: enough for the fan-out to finish)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pin-loadgen", default=None, help="CPU list for the stream holder (taskset -c)")
    a = p.parse_args(argv)

    import uvicorn

    app, create, update = build(a.impl, a.subs)
    config = uvicorn.Config(app, host="127.0.0.1", port=a.port, loop="uvloop", http="httptools",
                            lifespan="on", log_level="warning", access_log=False, backlog=4096,
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    # ~75 us of fan-out per subscriber is the slowest implementation measured on 2 cores
    interval = a.interval if a.interval is not None else max(0.1, a.subs * 75e-6)
    result: dict = {"impl": a.impl, "subs": a.subs, "updates": a.updates, "interval_s": interval}

    def job() -> None:
        holder = None
        try:
            deadline = time.monotonic() + 30
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.02)
            if not server.started:
                raise RuntimeError("server did not start")
            task_id = create()
            if a.subs:
                cmd = [PY, "-m", "bench.loadgen", "hold", "--url", f"http://127.0.0.1:{a.port}",
                       "--task-id", task_id, "--n", str(a.subs)]
                if a.pin_loadgen:
                    cmd = ["taskset", "-c", a.pin_loadgen, *cmd]
                holder = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True)
                line = holder.stdout.readline()  # "READY <n>" (the holder has its own timeout)
                if not line.startswith("READY"):
                    raise RuntimeError(f"stream holder failed: {line!r}")
                result["ready"] = int(line.split()[1])
                time.sleep(1.0)
            pad = "x" * 40
            report = update()
            lat_us: list[float] = []
            cpu_us: list[float] = []
            for i in range(a.updates):
                fields = {"progress": i % 100, "message": "bench update",
                          "progress_detail": {"t": time.perf_counter_ns(), "pad": pad}}
                c0 = time.thread_time_ns()
                t0 = time.perf_counter_ns()
                report(task_id, **fields)
                lat_us.append((time.perf_counter_ns() - t0) / 1e3)
                cpu_us.append((time.thread_time_ns() - c0) / 1e3)
                time.sleep(interval)
            floor, floor_us = floor_handoff(), []
            for i in range(a.updates):
                fields = {"progress": i % 100, "message": "bench update",
                          "progress_detail": {"t": time.perf_counter_ns(), "pad": pad}}
                t0 = time.perf_counter_ns()
                floor("bench", **fields)
                floor_us.append((time.perf_counter_ns() - t0) / 1e3)
                time.sleep(interval)
            result["floor_p50_us"] = statistics.median(floor_us)
            result.update({
                # wall time of the call, and the CPU time the job thread itself spent in it
                # (the difference is waiting: for the GIL, or for locks)
                "cpu_p50_us": statistics.median(cpu_us),
                "p50_us": statistics.median(lat_us), "p99_us": _pct(lat_us, 99),
                "mean_us": statistics.fmean(lat_us), "max_us": max(lat_us), "samples_us": lat_us,
            })
            if holder is not None:
                time.sleep(0.5)
                out, _ = holder.communicate("", timeout=60)
                held = json.loads(out.strip().splitlines()[-1])
                result["holder"] = {k: held.get(k) for k in ("ready", "events", "errors")}
                holder = None
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if holder is not None:
                holder.kill()
                holder.wait()
            server.should_exit = True

    thread = threading.Thread(target=job, name="bench-job", daemon=True)
    thread.start()
    server.run()
    thread.join(timeout=10)
    print(json.dumps(result), flush=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
