"""The redis:// store's capacity figures (issue 8), side by side with memory:// in one run.

    python -m bench.redis_scaleout            # about 1.5 minutes
    python -m bench.redis_scaleout --quick    # tiny sizes: proves the script works
    python -m bench.redis_scaleout --only fanout --rounds 3   # the fan-out pair only, median of 3

It starts its own ``redis-server`` (appendonly yes, appendfsync everysec: the settings the README
asks for) in a temporary directory, and taskmon servers as the README starts them. Servers are
pinned to CPU 0 and the load generator to CPU 1 (``bench.run.pinning``); redis-server is not pinned.

* fan-out: N streams on one task, memory:// vs redis://: server CPU microseconds per delivered
  event and the ratio (target <= 1.2), at RATE/s (one event per write, bench.loadgen ``latency``)
  and at saturation (PATCHes closed-loop, bench.loadgen ``saturation``: here the figure also
  depends on how many events one write carries, which the PATCH pipeline decides).
* producer: PATCH/s with 16 in flight and one stream (memory:// vs redis://).
* cross-process latency: N streams on process B, PATCHes at RATE/s through process A (both on
  redis://), publish-to-first-receipt p50/p99, beside the single-process memory:// figure.
* commits: what one Redis takes: several producer processes commit through ``TaskManager.open``
  as fast as they can; redis-server CPU per commit gives commits/s per Redis core.

Output: a table on stdout and the raw results in bench/results/redis-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.run import (
    PY,
    RESULTS,
    ROOT,
    BenchError,
    free_port,
    http_get,
    pinning,
    run_loadgen,
)

HOST = "127.0.0.1"


class Proc:
    def __init__(self, cmd: list[str], env: dict[str, str], ready, logpath: Path) -> None:
        self.logfile = open(logpath, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.logfile, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 30
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{cmd[:4]} did not start; see {logpath}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logfile.close()


def _healthy(port: int) -> bool:
    try:
        return http_get(port, "/readyz")[0] == 200
    except OSError:
        return False


class Taskmon(Proc):
    def __init__(self, store: str, prefix: list[str], logdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMON_")}
        env["TASKMON_MAX_STREAMS"] = "100000"
        env["TASKMON_DATA_DIR"] = str(logdir / f"data-{self.port}")
        cmd = [*prefix, PY, "-m", "server", "serve", "--host", HOST, "--port", str(self.port), "--store", store]
        super().__init__(cmd, env, lambda: _healthy(self.port), logdir / f"taskmon-{self.port}.log")


class RedisServer(Proc):
    def __init__(self, prefix: list[str], workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        cmd = [*prefix, binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--dir", str(workdir),
               "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"]

        def ready() -> bool:
            import redis

            try:
                with redis.Redis(port=self.port, socket_connect_timeout=0.2) as client:
                    return bool(client.ping())
            except redis.ConnectionError:
                return False

        super().__init__(cmd, dict(os.environ), ready, workdir / "redis.log")

    def flush(self) -> None:
        import redis

        with redis.Redis(port=self.port) as client:
            client.flushall()


def cpu_s(pid: int) -> float:
    from bench.loadgen import proc_cpu_s

    return proc_cpu_s(pid)


# -- the cross-process latency load generator (run as a subprocess pinned like bench.loadgen) -------

async def _cross(a: argparse.Namespace) -> dict:
    from urllib.parse import urlsplit

    from bench.loadgen import LoadGen, Producer, scenario_latency

    lg = LoadGen(a.stream_url, a.server_pid)
    produce = urlsplit(a.produce_url)
    lg.producer = Producer(produce.hostname or HOST, produce.port or 80)  # PATCHes go to the other process
    try:
        return await scenario_latency(lg, a)
    finally:
        lg.close()


def _cross_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--stream-url", required=True)
    p.add_argument("--produce-url", required=True)
    p.add_argument("--server-pid", type=int)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args(argv)
    a.stall = 0
    from bench.loadgen import raise_nofile

    raise_nofile()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(_cross(a))))
    return 0


# -- commits one Redis takes ---------------------------------------------------------------------

def _commit_worker(url: str, seconds: float, threads: int) -> None:
    import threading

    from server.manager import TaskManager

    manager = TaskManager.open(url)
    counts = [0] * threads

    def run(k: int) -> None:
        task = manager.create_task("bench")
        manager.update_task(task.task_id, status="processing")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            manager.update_task(task.task_id, progress=counts[k] % 100, message="bench update")
            counts[k] += 1

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    manager.close()
    print(sum(counts))


def commits(redis: RedisServer, prefix: list[str], seconds: float, procs: int) -> dict:
    code = "import sys; from bench.redis_scaleout import _commit_worker as w; w(sys.argv[1], float(sys.argv[2]), 4)"
    c0, t0 = cpu_s(redis.pid), time.monotonic()
    runs = [subprocess.Popen([*prefix, PY, "-c", code, redis.url, str(seconds)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            for _ in range(procs)]
    total = sum(int(r.communicate(timeout=seconds + 60)[0].strip().splitlines()[-1]) for r in runs)
    c1, t1 = cpu_s(redis.pid), time.monotonic()
    us = 1e6 * (c1 - c0) / total if total else None
    return {"producers": procs, "threads_each": 4, "commits": total, "wall_s": round(t1 - t0, 2),
            "commits_per_s": round(total / (t1 - t0)), "redis_cpu_pct": round(100 * (c1 - c0) / (t1 - t0), 1),
            "redis_cpu_us_per_commit": round(us, 1) if us else None,
            "commits_per_redis_core_s": round(1e6 / us) if us else None}


# -- the run -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_cross"]:
        return _cross_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--only", choices=["fanout"], help="fanout: only the fan-out figures (memory and redis, about 40 s a round)")
    p.add_argument("--rounds", type=int, default=1, help="fan-out pairs to run (the median round is shown)")
    a = p.parse_args(argv)
    n = 100 if a.quick else a.n
    dur = 1.5 if a.quick else 4.0
    server_prefix, gen_prefix, how = pinning()
    results: dict = {"pinning": how, "n": n, "rate": a.rate}
    with tempfile.TemporaryDirectory(prefix="taskmon-redis-bench-") as tmp:
        logdir = Path(tmp)
        redis = RedisServer([], logdir)  # unpinned: beside a saturated load generator its round trips would wait
        try:
            # the fan-out pair, memory then redis, --rounds times (a shared machine is noisy: the
            # table shows the median round; every round's ratio is printed beside it)
            for _round in range(a.rounds):
                for store in ("memory://", redis.url):
                    name = "memory" if store == "memory://" else "redis"
                    srv = Taskmon(store, server_prefix, logdir)
                    try:
                        results.setdefault(f"rounds_fanout_{name}", []).append(run_loadgen(
                            gen_prefix, "saturation", srv, {"n": n, "duration": dur, "warmup": 0.5}, 300))
                        results.setdefault(f"rounds_latency_{name}", []).append(run_loadgen(
                            gen_prefix, "latency", srv, {"n": n, "rate": a.rate, "duration": dur * 2, "warmup": 1}, 300))
                    finally:
                        srv.stop()
            for kind in ("fanout", "latency"):
                for name in ("memory", "redis"):
                    runs = results[f"rounds_{kind}_{name}"]
                    results[f"{kind}_{name}"] = sorted(runs, key=lambda x: x.get("cpu_us_per_event") or 0)[len(runs) // 2]
            for store in () if a.only == "fanout" else ("memory://", redis.url):
                name = "memory" if store == "memory://" else "redis"
                srv = Taskmon(store, server_prefix, logdir)
                try:
                    results[f"producer_{name}"] = run_loadgen(
                        gen_prefix, "saturation", srv, {"n": 1, "duration": dur, "warmup": 0.5, "inflight": 16}, 300)
                finally:
                    srv.stop()
            if a.only == "fanout":
                return _done(results)
            a_srv, b_srv = Taskmon(redis.url, server_prefix, logdir), Taskmon(redis.url, server_prefix, logdir)
            try:
                cmd = [*gen_prefix, PY, "-m", "bench.redis_scaleout", "_cross", "--stream-url", b_srv.url,
                       "--produce-url", a_srv.url, "--server-pid", str(b_srv.pid), "--n", str(n),
                       "--rate", str(a.rate), "--duration", str(dur * 2)]
                done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
                try:
                    results["latency_cross"] = json.loads(done.stdout.strip().splitlines()[-1])
                except (IndexError, ValueError):
                    raise BenchError(f"cross-process load generator failed:\n{done.stderr[-3000:]}") from None
            finally:
                a_srv.stop()
                b_srv.stop()
            redis.flush()
            results["commits"] = commits(redis, server_prefix, dur, 2)
        finally:
            redis.stop()
    return _done(results)


def _done(results: dict) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"redis-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2))
    _table(results)
    print(f"raw: {out.relative_to(ROOT)}")
    return 0


def _table(r: dict) -> None:
    def f(v, nd=1):
        return "-" if v is None else f"{v:,.{nd}f}"

    fm, fr = r["fanout_memory"], r["fanout_redis"]
    lm, lr = r["latency_memory"], r["latency_redis"]

    def ratio(x, y):
        return f(y / x, 2) if x and y else "-"

    def verdict(x, y):
        return "" if not (x and y) else (" (target <= 1.2: met)" if y / x <= 1.2 else " (target <= 1.2: MISSED)")

    rate_m, rate_r = lm.get("cpu_us_per_event"), lr.get("cpu_us_per_event")
    sat_m, sat_r = fm.get("cpu_us_per_event"), fr.get("cpu_us_per_event")
    rows = [
        ("", "memory://", "redis://", "redis/memory"),
        (f"fan-out N={r['n']} at {r['rate']:g}/s: server CPU us/delivered event", f(rate_m, 2),
         f(rate_r, 2), ratio(rate_m, rate_r) + verdict(rate_m, rate_r)),
        (f"fan-out N={r['n']} saturated: server CPU us/delivered event", f(sat_m, 2),
         f(sat_r, 2), ratio(sat_m, sat_r) + verdict(sat_m, sat_r)),
        ("  PATCHes published (saturated)", f(fm.get("published"), 0), f(fr.get("published"), 0), ""),
        ("  events per write (saturated)", f(fm.get("events_per_chunk"), 2), f(fr.get("events_per_chunk"), 2), ""),
        ("  deliveries/s (saturated)", f(fm.get("deliveries_per_s"), 0), f(fr.get("deliveries_per_s"), 0), ""),
        ("  server CPU % (saturated)", f(fm.get("server_cpu_pct"), 0), f(fr.get("server_cpu_pct"), 0), ""),
    ]
    if len(r.get("rounds_fanout_redis", ())) > 1:
        for kind, label in (("latency", f"at {r['rate']:g}/s"), ("fanout", "saturated")):
            pairs = zip(r[f"rounds_{kind}_memory"], r[f"rounds_{kind}_redis"], strict=True)
            each = ", ".join(ratio(m.get("cpu_us_per_event"), x.get("cpu_us_per_event")) for m, x in pairs)
            rows.append((f"  every round's redis/memory {label}", "", "", each))
    if "latency_cross" not in r:  # --only fanout
        _print_rows(r, rows)
        return
    pm, pr = r["producer_memory"], r["producer_redis"]
    lc = r["latency_cross"]
    c = r["commits"]
    rows += [
        ("producer: PATCH/s, 16 in flight, 1 stream", f(pm["published"] / pm["wall_s"], 0), f(pr["published"] / pr["wall_s"], 0), ""),
        (f"latency N={r['n']} x {r['rate']:g}/s: first receipt p50 ms", f(lm.get("first_p50_ms"), 2),
         f"{f(lr.get('first_p50_ms'), 2)} / A->B {f(lc.get('first_p50_ms'), 2)}", ""),
        ("latency: first receipt p99 ms", f(lm.get("first_p99_ms"), 2),
         f"{f(lr.get('first_p99_ms'), 2)} / A->B {f(lc.get('first_p99_ms'), 2)}", ""),
        ("latency: last receipt p99 ms", f(lm.get("last_p99_ms"), 2),
         f"{f(lr.get('last_p99_ms'), 2)} / A->B {f(lc.get('last_p99_ms'), 2)}", ""),
        ("commits one Redis took (2 procs x 4 threads)", "", f"{c['commits_per_s']:,}/s at {c['redis_cpu_pct']}% redis CPU", ""),
        ("redis CPU per commit (us) -> commits/s per Redis core", "", f"{c['redis_cpu_us_per_commit']} -> {c['commits_per_redis_core_s']:,}", ""),
    ]
    _print_rows(r, rows)


def _print_rows(r: dict, rows: list) -> None:
    print(f"\n{r['pinning']}")
    for row in rows:
        print(f"{row[0]:<56} {row[1]:>12} {row[2]:>36} {row[3]}")


if __name__ == "__main__":
    sys.exit(main())
