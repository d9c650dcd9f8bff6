"""taskmon benchmark driver (issue 5): taskmon vs the typical app, same load, same run.

How to run (from the repository root, with the project's venv):

    make bench                                   # = python -m bench.run (about 15 minutes)
    python -m bench.run --quick                  # tiny sizes, one run each: proves the suite works
    python -m bench.run --big                    # adds the ~20,000-stream idle run
    python -m bench.run --only saturation,latency --servers taskmon
    python -m bench.run --runs 3                 # more repetitions (the median is reported)
    python -m bench.run --strict                 # also exit non-zero when a target of issue 5 is missed
    python -m bench.run --only saturation --profile   # py-spy the saturation runs (pip install py-spy)
    python -m bench.run --only producer,flood,patch_latency,listing   # the producer path only

Each server is started the way the README starts it (taskmon: ``python -m server serve --host
127.0.0.1 --port PORT --store memory://``; the baseline: ``python -m bench.baseline_naive``), in a
fresh process for every run of every scenario, pinned with ``taskset -c 0``; the load generator
(``bench/loadgen.py``) runs pinned to core 1 (no pinning when taskset or a second core is missing;
the JSON says which). RLIMIT_NOFILE is raised to the hard limit here and inherited by both. The
servers take turns run by run (taskmon run 1, baseline run 1, taskmon run 2...), so that the
machine's drift over a minute falls on both sides of a ratio alike.
Server CPU is utime+stime from /proc/<pid>/stat and RSS is VmRSS from /proc/<pid>/status, both read
by the load generator at the edges of each measurement window.

Scenarios (``--only`` takes these names, comma-separated):
  idle        RSS per open stream at N=1,000 and 5,000 (``--big``: as close to 20,000 as the
              open-file hard limit allows)
  saturation  N=100 and 1,000 streams on one task, the producer API driven closed-loop with
              4 PATCHes in flight: deliveries/s and server CPU microseconds per delivered event
  latency     N=1,000 at 20 updates/s (and at 5/s, a rate the baseline sustains on 2 cores):
              publish-to-first-receipt and publish-to-last-receipt p50/p99, server CPU %
  stall       as latency (20/s) with one of the 1,000 streams never read (small receive buffer,
              a 2 s burst first to fill every buffer on the way): the others' latency and RSS
  publish     update_task latency from a job thread with 0 and 10,000 subscribers, beside the floor:
              a bare hand-off with the same checks timed in the same thread at the same spacing
              (in-process, bench/publish_cost.py, memory store; target p50 <= 100 us, issue 10)

The producer path (issues 10 and 13; bench/producer_suite.py), side by side in the same run:
  producer       PATCH/s at 16 connections, 0 subscribers, ~150-byte update, Debian's wrk (-t1, on
                 core 1) with a Lua script PATCHing 100 pre-created tasks (progress 0..99, never
                 terminal): taskmon memory://, taskmon sqlite (default store), taskmon redis:// on a
                 redis-server of its own (skipped with a note while taskmon refuses redis://), the
                 naive app's PATCH (bench/baseline_naive.py) and a raw ASGI app
                 (bench/baseline_raw.py). Each row says which side was the limit (server or wrk CPU).
  flood          1,000 streams x 20 updates/s on one task (the latency scenario) without and with 16
                 wrk connections PATCHing another task flat out: first-receipt p50/p99 and the ratio
                 (target <= 2x); memory:// and sqlite.
  patch_latency  PATCH latency p50/p99 at a fixed 2,000 PATCH/s, open loop (bench/openloop.py, on
                 core 1; target p99 <= 10 ms); memory:// and sqlite, beside the raw ASGI app (the floor).
  listing        GET /api/graph/tasks?status=processing&limit=50, and with q=, over 1,000 / 10,000 /
                 100,000 tasks written through the store API (bench/listing.py populate), served by
                 ``python -m server serve --store sqlite:///...`` (redis:// when it exists): p50/p99
                 and the growth from the smallest to the largest size (plus status=completed,
                 which matches whatever start-up recovery does to live tasks, issue 8).
  Every producer row also gives PATCHes per second of server CPU (PATCH/s divided by the share
  of core 0 the server got), the figure to compare when other processes share the machine (the
  "other CPU" column). --quick: wrk 1 s, flood at 100 streams, 1 s at 2,000/s, listing over
  500 / 2,000 tasks. The redis rows start a redis-server of their own (--save "" --appendonly no).

Reading the numbers: CPU per delivered event depends on how many events one send carries. Under
saturation a taskmon stream sends everything pending as one chunk ("events per chunk" in the table)
while the baseline sends one event per send but skips a task switch when its queue already holds
the next item (so its figure varies from run to run with how PATCHes interleave with the fan-out;
see the per-run values in the JSON). The latency rows' "server CPU per delivered event" is the
one-event-per-wake cost. The big idle run is capped by the open-file *hard* limit (minus 64 for the
server's other descriptors): raising it needs privileges (``ulimit -Hn``, systemd LimitNOFILE=).

Output: a table (taskmon, baseline, taskmon/baseline, the issue's target) on stdout, and every
raw run plus the medians in bench/results/bench-<UTC time>.json. The exit status is non-zero when
a scenario breaks (a server does not start, a stream is refused or violates the wire, nothing is
delivered, a run does not drain); ``--strict`` adds the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
HOST = "127.0.0.1"


def log(*args) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------- environment


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def pinning() -> tuple[list[str], list[str], str]:
    """(server prefix, load generator prefix, description)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return [], [], f"not pinned: only CPU(s) {cpus} available"
    if shutil.which("taskset") is None:
        return [], [], "not pinned: taskset not found"
    s, c = str(cpus[0]), str(cpus[1])
    if subprocess.run(["taskset", "-c", s, "true"], capture_output=True).returncode != 0:
        return [], [], "not pinned: taskset does not work here"
    return ["taskset", "-c", s], ["taskset", "-c", c], f"server on CPU {s}, load generator on CPU {c}"


def machine() -> dict:
    info = {"python": platform.python_version(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["mem_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    versions = {}
    for mod in ("starlette", "sse_starlette", "uvicorn", "uvloop", "httptools", "anyio"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except ImportError:
            versions[mod] = None
    info["versions"] = versions
    return info


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[-1]


# --------------------------------------------------------------------------- servers


SERVERS = ("taskmon", "baseline")


def server_cmd(name: str, port: int, store: str = "memory://") -> tuple[list[str], dict]:
    """taskmon (on ``store``), ``baseline`` (the naive app) or ``raw`` (bench/baseline_raw.py)."""
    env = dict(os.environ)
    env.pop("PYTHONASYNCIODEBUG", None)
    if name == "taskmon":
        # as the README starts it; only the stream cap is lifted so the big runs fit
        env["TASKMON_MAX_STREAMS"] = "100000"
        return [PY, "-m", "server", "serve", "--host", HOST, "--port", str(port),
                "--store", store], env
    if name == "raw":
        return [PY, "-m", "bench.baseline_raw", "--host", HOST, "--port", str(port)], env
    return [PY, "-m", "bench.baseline_naive", "--host", HOST, "--port", str(port)], env


class Server:
    def __init__(self, name: str, prefix: list[str], logdir: Path, store: str = "memory://",
                 start_timeout: float = 30.0) -> None:
        self.name = name
        self.port = free_port()
        cmd, env = server_cmd(name, self.port, store)
        self.logpath = logdir / f"{name}-{self.port}.log"
        self.logfile = open(self.logpath, "wb")
        self.proc = subprocess.Popen(prefix + cmd, cwd=ROOT, env=env, stdout=self.logfile,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid  # taskset execs: same pid
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                self.logfile.close()
                raise BenchError(f"{name} exited with {self.proc.returncode} at start; see {self.logpath}")
            try:
                status, _ = http_get(self.port, "/healthz")
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{name} did not answer /healthz in {start_timeout:g} s; see {self.logpath}")
            time.sleep(0.05)
        self.url = f"http://{HOST}:{self.port}"

    def stop(self) -> None:
        if self.logfile.closed:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logfile.close()


def run_loadgen(prefix: list[str], scenario: str, server: Server, args: dict, timeout: float) -> dict:
    cmd = [*prefix, PY, "-m", "bench.loadgen", scenario, "--url", server.url,
           "--server-pid", str(server.pid)]
    for k, v in args.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"load generator timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
    lines = p.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise BenchError(f"load generator failed (exit {p.returncode}):\n{p.stderr[-3000:]}") from None
    if p.returncode != 0 and not result.get("errors"):
        result.setdefault("errors", []).append(f"loadgen exit {p.returncode}")
    return result


# --------------------------------------------------------------------------- scenarios


def sizes(a) -> dict:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    big_n = min(20_000, hard - 64)   # the server needs a few descriptors besides its sockets
    if a.quick:
        return {
            "idle": [100], "saturation": [100], "sat_duration": 1.0,
            "latency": [(100, 20.0)], "lat_duration": 1.5,
            "stall": (100, 20.0), "stall_prime": 0.5, "publish": [0, 100], "pub_updates": 5,
        }
    return {
        "idle": [1000, 5000] + ([big_n] if a.big else []), "saturation": [100, 1000],
        "sat_duration": 4.0, "latency": [(1000, 20.0), (1000, 5.0)], "lat_duration": 10.0,
        "stall": (1000, 20.0), "stall_prime": 2.0, "publish": [0, 10_000], "pub_updates": 25,
    }


def check(name: str, r: dict) -> list[str]:
    """What makes a run broken (as opposed to slow)."""
    problems = []
    if r.get("errors"):
        problems.append(f"{name}: errors {r['errors'][:3]}")
    want = r.get("n", 0) - r.get("stalled", 0)
    if "ready" in r and r["ready"] < want:
        problems.append(f"{name}: only {r['ready']} of {want} streams opened (statuses {r.get('statuses')})")
    if "delivered" in r and not r["delivered"]:
        problems.append(f"{name}: no events delivered")
    if "published" in r and not r["published"]:
        problems.append(f"{name}: nothing published")
    if r.get("drained") is False:
        problems.append(f"{name}: streams did not receive the last update in time (drain timeout)")
    return problems


def summarize_profile(raw: Path, top: int = 25) -> dict:
    """Top frames of a py-spy ``--format raw`` (collapsed stacks) file, by self and inclusive share."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    def best(d):
        return [(round(100 * v / total, 1), k) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return {"samples": total, "self": best(own), "inclusive": best(incl)} if total else {"samples": 0}


def start_profiler(pid: int, lpin: list[str], delay: float, duration: float, out: Path):
    pyspy = shutil.which("py-spy") or str(Path(PY).with_name("py-spy"))
    if not Path(pyspy).exists():
        log("--profile: py-spy not found (pip install py-spy); not profiling")
        return None
    cmd = f"sleep {delay}; exec {' '.join(lpin)} {pyspy} record --pid {pid} --duration {max(1, round(duration))} " \
          f"--rate 250 --nonblocking --format raw -o {out}"
    return subprocess.Popen(["sh", "-c", cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def one_run(server_name: str, scenario: str, params: dict, pins, logdir: Path, profile: Path | None = None) -> dict:
    spin, lpin, _ = pins
    if scenario == "publish":
        port = free_port()
        cmd = [*spin, PY, "-m", "bench.publish_cost", "--impl", server_name, "--subs",
               str(params["subs"]), "--port", str(port), "--updates", str(params["updates"])]
        if lpin:
            cmd += ["--pin-loadgen", lpin[-1]]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        try:
            r = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise BenchError(f"publish_cost failed (exit {p.returncode}):\n{p.stderr[-3000:]}") from None
        if "error" in r:
            r["errors"] = [r["error"]]
        r.setdefault("errors", []).extend((r.get("holder") or {}).get("errors") or [])
        return r
    server = Server(server_name, spin, logdir)
    try:
        if scenario == "idle":
            return run_loadgen(lpin, "idle", server, {"n": params["n"], "timeout": 120}, 300)
        if scenario == "saturation":
            prof = None
            if profile is not None:
                # the streams open and warm up first; sample the middle of the measured window
                prof = start_profiler(server.pid, lpin, 2.0 + params["n"] / 2000, params["duration"] * 0.6, profile)
            r = run_loadgen(lpin, "saturation", server,
                            {"n": params["n"], "duration": params["duration"], "inflight": 4}, 300)
            if prof is not None:
                prof.wait(timeout=60)
                if profile.exists():
                    r["profile"] = {"raw": str(profile), **summarize_profile(profile)}
            return r
        if scenario in ("latency", "stall"):
            args = {"n": params["n"], "rate": params["rate"], "duration": params["duration"]}
            if scenario == "stall":
                args.update({"stall": 1, "prime": params["prime"]})
            return run_loadgen(lpin, "latency", server, args, 300)
        raise ValueError(scenario)
    finally:
        if server.proc.poll() is not None and server.proc.returncode not in (0, -2):
            log(f"{server_name} died (exit {server.proc.returncode}); see {server.logpath}")
        server.stop()


def plan(a) -> list[tuple[str, str, dict]]:
    """(key, scenario, params) for every measurement point."""
    s = sizes(a)
    points = []
    for n in s["idle"]:
        points.append((f"idle-{n}", "idle", {"n": n}))
    for n in s["saturation"]:
        points.append((f"saturation-{n}", "saturation", {"n": n, "duration": s["sat_duration"]}))
    for n, rate in s["latency"]:
        points.append((f"latency-{n}x{rate:g}", "latency", {"n": n, "rate": rate, "duration": s["lat_duration"]}))
    n, rate = s["stall"]
    points.append((f"stall-{n}x{rate:g}", "stall",
                   {"n": n, "rate": rate, "duration": s["lat_duration"], "prime": s["stall_prime"]}))
    for subs in s["publish"]:
        points.append((f"publish-{subs}", "publish", {"subs": subs, "updates": s["pub_updates"]}))
    if a.only:
        from bench.producer_suite import NAMES

        wanted = set(a.only.split(","))
        unknown = wanted - {sc for _, sc, _ in points} - set(NAMES)
        if unknown:
            raise SystemExit(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(ALL_SCENARIOS)}")
        points = [p for p in points if p[1] in wanted]
    return points


ALL_SCENARIOS = ("idle", "saturation", "latency", "stall", "publish",
                 "producer", "flood", "patch_latency", "listing")


def suite_wanted(a) -> set[str]:
    """The producer-path scenarios (bench/producer_suite.py) this invocation runs."""
    from bench.producer_suite import NAMES

    return set(NAMES) if not a.only else set(a.only.split(",")) & set(NAMES)


METRICS = {  # what is summarised (median over runs) per scenario
    "idle": ["rss_per_stream", "ready", "open_s"],
    "saturation": ["cpu_us_per_event", "deliveries_per_s", "server_cpu_pct", "loadgen_cpu_pct", "sys_us_per_event",
                   "events_per_chunk", "coalesced_fraction", "other_cpu_pct"],
    "latency": ["first_p50_ms", "first_p99_ms", "last_p50_ms", "last_p99_ms", "all_p50_ms", "all_p99_ms",
                "server_cpu_pct", "loadgen_cpu_pct", "cpu_us_per_event", "sys_us_per_event", "other_cpu_pct"],
    "stall": ["first_p50_ms", "first_p99_ms", "last_p50_ms", "last_p99_ms", "server_cpu_pct", "cpu_us_per_event",
              "rss_growth", "rss_growth_window", "stalled_server_send_q", "stalled_client_recv_q", "stalled_still_open", "other_cpu_pct"],
    "publish": ["p50_us", "p99_us", "cpu_p50_us", "mean_us", "max_us", "floor_p50_us"],
}


def derive(scenario: str, r: dict) -> dict:
    if scenario == "stall":
        r["rss_growth"] = r["rss_after"] - r["rss_start"]            # prime burst + measured window
        r["rss_growth_window"] = r["rss_after"] - r["rss_before"]    # the measured 20/s window only
        sq = [q for q in r.get("stalled_socket_end", []) if q["side"] == "server"]
        cq = [q for q in r.get("stalled_socket_end", []) if q["side"] == "client"]
        r["stalled_server_send_q"] = sq[0]["send_q"] if sq else None
        r["stalled_client_recv_q"] = cq[0]["recv_q"] if cq else None
    return r


def median(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------- report


def fmt(v, unit="") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            s = f"{v:,.0f}"
        elif abs(v) >= 100:
            s = f"{v:.0f}"
        elif abs(v) >= 10:
            s = f"{v:.1f}"
        else:
            s = f"{v:.2f}"
    else:
        s = f"{v:,}"
    return s + unit


def ratio(t, b):
    if isinstance(t, (int, float)) and isinstance(b, (int, float)) and b:
        return t / b
    return None


def build_rows(med: dict, big_key: str | None) -> list[dict]:
    """The table: (label, taskmon, baseline, ratio, target, verdict)."""
    rows = []

    def get(server, key, metric):
        return (med.get(server, {}).get(key) or {}).get(metric)

    def row(label, key, metric, scale=1.0, unit="", target=None, limit=None, better="lower"):
        t, b = get("taskmon", key, metric), get("baseline", key, metric)
        t = t * scale if t is not None else None
        b = b * scale if b is not None else None
        r = ratio(t, b)
        verdict = ""
        if limit is not None and r is not None:
            verdict = "PASS" if r <= limit else "MISS"
        rows.append({"metric": label, "taskmon": t, "baseline": b, "ratio": r, "unit": unit,
                     "target": target or "", "verdict": verdict})

    for key in sorted((k for k in med.get("taskmon", {}) | med.get("baseline", {}) if k.startswith("idle-")),
                      key=lambda k: int(k.split("-")[1])):
        n = key.split("-")[1]
        row(f"idle RSS per stream, N={n}", key, "rss_per_stream", 1 / 1024, " KB", "<= 1/3", 1 / 3)
    for key in ("saturation-100", "saturation-1000"):
        if any(key in med.get(s, {}) for s in SERVERS):
            n = key.split("-")[1]
            lim = (1 / 6) if n == "1000" else None
            row(f"saturation N={n}: server CPU per delivered event", key, "cpu_us_per_event", unit=" us",
                target="<= 1/6" if lim else "", limit=lim)
            row(f"saturation N={n}:   of which in the kernel", key, "sys_us_per_event", unit=" us")
            row(f"saturation N={n}: deliveries/s", key, "deliveries_per_s", unit="/s")
            row(f"saturation N={n}: events per chunk (batching)", key, "events_per_chunk")
            row(f"saturation N={n}: server CPU", key, "server_cpu_pct", unit=" %")
    for key in sorted(k for k in med.get("taskmon", {}) | med.get("baseline", {}) if k.startswith("latency-")):
        label = key.split("-", 1)[1].replace("x", " x ") + "/s"
        main = key == "latency-1000x20"  # the target point
        row(f"latency {label}: first-receipt p50", key, "first_p50_ms", unit=" ms")
        row(f"latency {label}: first-receipt p99", key, "first_p99_ms", unit=" ms",
            target="<= 1/4" if main else "", limit=(1 / 4) if main else None)
        row(f"latency {label}: last-receipt p50", key, "last_p50_ms", unit=" ms")
        row(f"latency {label}: last-receipt p99", key, "last_p99_ms", unit=" ms")
        row(f"latency {label}: server CPU", key, "server_cpu_pct", unit=" %")
        row(f"latency {label}: server CPU per delivered event", key, "cpu_us_per_event", unit=" us")
    for key in sorted(k for k in med.get("taskmon", {}) | med.get("baseline", {}) if k.startswith("stall-")):
        label = key.split("-", 1)[1].replace("x", " x ") + "/s"
        row(f"1 stalled of {label}: first-receipt p50", key, "first_p50_ms", unit=" ms")
        row(f"1 stalled of {label}: first-receipt p99", key, "first_p99_ms", unit=" ms")
        row(f"1 stalled of {label}: last-receipt p99", key, "last_p99_ms", unit=" ms")
        row(f"1 stalled of {label}: server RSS growth (burst + window)", key, "rss_growth", 1 / 1024, " KB")
        row(f"1 stalled of {label}: server RSS growth (window)", key, "rss_growth_window", 1 / 1024, " KB")
        row(f"1 stalled of {label}: bytes queued in server socket", key, "stalled_server_send_q", unit=" B")
    for key in sorted((k for k in med.get("taskmon", {}) | med.get("baseline", {}) if k.startswith("publish-")),
                      key=lambda k: int(k.split("-")[1])):
        subs = key.split("-")[1]
        row(f"update_task from a thread, {subs} subscribers: p50", key, "p50_us", unit=" us")
        row(f"update_task from a thread, {subs} subscribers: p99", key, "p99_us", unit=" us")
        row(f"update_task from a thread, {subs} subscribers: thread CPU p50", key, "cpu_p50_us", unit=" us")
        row(f"  the floor: a bare hand-off with the same checks, same thread and spacing: p50", key,
            "floor_p50_us", unit=" us")
    # self-relative checks (taskmon against itself)
    checks = []
    tm = med.get("taskmon", {})
    lat = tm.get("latency-1000x20") or {}
    st = tm.get("stall-1000x20") or {}
    if lat and st:
        for m in ("first_p50_ms", "first_p99_ms", "last_p99_ms"):
            a, b = lat.get(m), st.get(m)
            if a is not None and b is not None:
                ok = b <= a * 1.5 + 2.0
                checks.append({"check": f"taskmon stalled reader: {m} {fmt(b)} vs {fmt(a)} without",
                               "rule": "<= 1.5 x + 2 ms", "verdict": "PASS" if ok else "MISS"})
    p0, p10 = (tm.get("publish-0") or {}).get("p50_us"), (tm.get("publish-10000") or {}).get("p50_us")
    if p0 and p10:
        checks.append({"check": f"taskmon update_task p50: {fmt(p10)} us with 10,000 subscribers vs {fmt(p0)} us with 0",
                       "rule": "O(1): <= 2 x", "verdict": "PASS" if p10 <= 2 * p0 else "MISS"})
    for key in sorted((k for k in tm if k.startswith("publish-")), key=lambda k: int(k.split("-")[1])):
        p50 = tm[key].get("p50_us")
        if p50 is not None:
            subs = int(key.split("-")[1])
            checks.append({"check": f"taskmon update_task from a job thread, {subs:,} subscribers, memory://: "
                                    f"p50 {fmt(p50)} us", "rule": "<= 100 us (issue 10)",
                           "verdict": "PASS" if p50 <= 100 else "MISS"})
    if big_key and big_key in tm:
        n = int(big_key.split("-")[1])
        ready = tm[big_key].get("ready")
        checks.append({"check": f"taskmon holds {fmt(ready)} of {n:,} streams in one process",
                       "rule": "all open", "verdict": "PASS" if ready == n else "MISS"})
    return rows, checks


def print_table(rows, checks, meta) -> None:
    out = sys.stdout
    print(f"\ntaskmon vs baseline -- {meta['machine'].get('cpu_model', '?')}, {meta['machine']['cpus']} CPUs, "
          f"{meta['pinning']}; median of {meta['runs']} run(s); ratio = taskmon / baseline\n", file=out)
    header = ("metric", "taskmon", "baseline", "ratio", "target", "")
    table = [header]
    for r in rows:
        table.append((r["metric"], fmt(r["taskmon"], r["unit"]), fmt(r["baseline"], r["unit"]),
                      fmt(r["ratio"]), r["target"], r["verdict"]))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))) + " |",
              file=out)
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    if checks:
        print("", file=out)
        for c in checks:
            print(f"  [{c['verdict']}] {c['check']} ({c['rule']})", file=out)
    print("", file=out)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one run: proves the suite runs")
    p.add_argument("--big", action="store_true", help="add the ~20,000-stream idle run")
    p.add_argument("--only", help="comma-separated: " + ", ".join(ALL_SCENARIOS) + " (default: all)")
    p.add_argument("--servers", default="taskmon,baseline",
                   help="servers of the idle..publish scenarios (the producer-path ones run their own set)")
    p.add_argument("--runs", type=int, default=None, help="runs per scenario (default 2; --quick 1)")
    p.add_argument("--strict", action="store_true", help="exit non-zero when a target is missed")
    p.add_argument("--profile", action="store_true",
                   help="py-spy each saturation run (needs py-spy; raw stacks + top frames in the JSON)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/bench-<time>.json)")
    a = p.parse_args(argv)
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    if set(servers) - set(SERVERS):
        raise SystemExit(f"--servers takes {', '.join(SERVERS)}")
    runs = a.runs or (1 if a.quick else 2)

    soft, hard = raise_nofile()
    log(f"RLIMIT_NOFILE raised to {soft} (hard limit {hard}); children inherit it")
    pins = pinning()
    log(pins[2])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    logdir = RESULTS / f"logs-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    points = plan(a)
    big_key = f"idle-{sizes(a)['idle'][-1]}" if a.big and not a.quick else None

    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        log(f"WARNING: load average {load1:.2f} before starting: other work on the machine adds noise")
    meta = {"started": stamp, "loadavg_at_start": os.getloadavg(), "machine": machine(), "pinning": pins[2], "runs": runs,
            "nofile": [soft, hard], "mode": "quick" if a.quick else ("big" if a.big else "default"),
            "servers": servers, "argv": sys.argv[1:]}
    raw: dict = {s: {} for s in servers}
    med: dict = {s: {} for s in servers}
    problems: list[str] = []
    t_start = time.monotonic()
    for key, scenario, params in points:
        # taskmon and the baseline take turns, run by run: the machine drifts over a minute (other
        # tenants), and both sides of each ratio then meet it alike
        results: dict[str, list] = {server: [] for server in servers}
        for i in range(runs):
            for server in servers:
                t0 = time.monotonic()
                prof = (logdir / f"profile-{server}-{key}-run{i + 1}.raw") if a.profile and scenario == "saturation" else None
                try:
                    r = derive(scenario, one_run(server, scenario, params, pins, logdir, prof))
                except BenchError as exc:
                    problems.append(f"{server} {key}: {exc}")
                    log(f"FAILED {server} {key}: {exc}")
                    continue
                bad = check(f"{server} {key}", r)
                problems += bad
                results[server].append(r)
                summary = ", ".join(f"{m}={fmt(r.get(m))}" for m in METRICS[scenario][:4])
                if (r.get("other_cpu_pct") or 0) > 10:
                    summary += f", NOISE: other processes used {r['other_cpu_pct']:.0f} % of a core"
                log(f"{server:8} {key:18} run {i + 1}/{runs}: {summary} ({time.monotonic() - t0:.1f} s)"
                    + (f" PROBLEM {bad}" if bad else ""))
        for server in servers:
            mine = results[server]
            raw[server][key] = mine
            if mine:
                med[server][key] = {m: median([r.get(m) for r in mine]) for m in METRICS[scenario]}
                med[server][key]["ready"] = min(r.get("ready", 0) or 0 for r in mine) \
                    if "ready" in mine[0] else None
    suite = None
    wanted = suite_wanted(a)
    if wanted:
        from bench import producer_suite

        suite = producer_suite.run(wanted, pins, logdir, runs, a.quick)
        problems += suite["problems"]
    rows, checks = build_rows(med, big_key)
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    if rows or checks:
        print_table(rows, checks, meta)
    if suite is not None:
        text, suite_checks = producer_suite.report(suite, meta)
        print(text)
        for c in suite_checks:
            print(f"  [{c['verdict']}] {c['check']} ({c['rule']})")
        print()
        checks += suite_checks
    if a.profile:
        for server in servers:
            for key, results in raw[server].items():
                for r in results[:1]:
                    prof = r.get("profile")
                    if prof and prof.get("samples"):
                        print(f"py-spy, {server} {key} ({prof['samples']} samples), top frames by own time:")
                        for share, frame in prof["self"][:12]:
                            print(f"  {share:5.1f}%  {frame}")
                        print()
    out = a.out or RESULTS / f"bench-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "table": rows, "checks": checks, "medians": med,
                               "runs": raw, "producer_suite": suite, "problems": problems}, indent=1))
    log(f"wrote {out} ({meta['elapsed_s']} s); server logs in {logdir}")
    if problems:
        log("PROBLEMS:")
        for prob in problems:
            log("  " + prob)
        return 1
    if a.strict and any(r["verdict"] == "MISS" for r in rows) | any(c["verdict"] == "MISS" for c in checks):
        log("some targets were missed (--strict)")
        return 2
    return 0


if __name__ == "__main__":
    # Run as bench.run, not __main__: bench.producer_suite imports this module, and one copy of it
    # means one BenchError class and one Server class.
    from bench.run import main as _main

    sys.exit(_main())
