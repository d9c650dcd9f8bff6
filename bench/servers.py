"""What each ASGI server costs taskmon (issue 9, for information): saturation and latency at N=1,000.

    python -m bench.servers                      # uvicorn (taskmon serve), hypercorn, granian; 1 run each
    python -m bench.servers --servers granian --runs 2

The same load generator and pinning as bench/run.py (server on one core, bench/loadgen.py on the
other), taskmon started with the README's command for each server (section "Run it under your
server"). The server-side numbers are read from the process that serves the requests: hypercorn and
granian serve from a worker process under a supervisor, so that worker's pid is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import time

from bench.run import HOST, PY, ROOT, free_port, http_get, log, pinning, raise_nofile

SERVERS = ("uvicorn", "hypercorn", "granian")
POINTS = {
    "saturation": ["saturation", "--n", "1000", "--duration", "4", "--inflight", "4"],
    "latency": ["latency", "--n", "1000", "--rate", "20", "--duration", "8"],
}
SHOW = {
    "saturation": [("cpu_us_per_event", "server CPU per delivered event", " us"), ("deliveries_per_s", "deliveries/s", ""),
                   ("events_per_chunk", "events per chunk", "")],
    "latency": [("first_p50_ms", "first-receipt p50", " ms"), ("first_p99_ms", "first-receipt p99", " ms"),
                ("last_p99_ms", "last-receipt p99", " ms"), ("server_cpu_pct", "server CPU", " %")],
}


def command(name: str, port: int) -> list[str]:
    if name == "uvicorn":
        return [PY, "-m", "server", "serve", "--host", HOST, "--port", str(port), "--store", "memory://"]
    if name == "hypercorn":
        return [PY, "-m", "hypercorn", "--bind", f"{HOST}:{port}", "server.app:create_app()"]
    return [PY, "-m", "granian", "--interface", "asgi", "--factory", "--host", HOST, "--port", str(port),
            "--workers-kill-timeout", "2", "--backpressure", "100000", "server.app:create_app"]


def serving_pid(process: subprocess.Popen) -> int:
    """The pid that answers requests: the process itself, or its one worker under a supervisor."""
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            cmdline = f.read()
        if b"resource_tracker" not in cmdline:
            return int(child)
    return process.pid


def one_run(name: str, point: str, spin: list[str], lpin: list[str]) -> dict:
    port = free_port()
    env = {**os.environ, "TASKMON_STORE": "memory://", "TASKMON_MAX_STREAMS": "100000",
           "TASKMON_DATA_DIR": f"/tmp/taskmon-bench-{name}"}
    process = subprocess.Popen(spin + command(name, port), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if http_get(port, "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start")
            time.sleep(0.05)
        cmd = [*lpin, PY, "-m", "bench.loadgen", *POINTS[point], "--url", f"http://{HOST}:{port}",
               "--server-pid", str(serving_pid(process))]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--runs", type=int, default=1)
    a = p.parse_args(argv)
    names = [s for s in a.servers.split(",") if s]
    raise_nofile()
    spin, lpin, pins = pinning()
    log(pins)
    medians: dict[str, dict[str, float | None]] = {name: {} for name in names}
    for name in names:
        for point in POINTS:
            runs = [one_run(name, point, spin, lpin) for _ in range(a.runs)]
            for key, _, _ in SHOW[point]:
                values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
                medians[name][key] = statistics.median(values) if values else None
            log(name, point, {key: medians[name][key] for key, _, _ in SHOW[point]})
    print(f"\n| N=1,000 (median of {a.runs}) | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for point in POINTS:
        for key, label, unit in SHOW[point]:
            cells = [medians[n][key] for n in names]
            print(f"| {point}: {label} | " + " | ".join("-" if v is None else f"{v:,.1f}{unit}" for v in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
