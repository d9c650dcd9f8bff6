"""The producer-path scenarios of ``bench.run`` (issues 10 and 13), side by side in one run.

  producer       PATCH/s at 16 connections, 0 subscribers, ~150-byte body, wrk (1 thread, core 1)
                 against one server core: taskmon memory://, sqlite (default store), redis:// (skipped
                 with a note while the store refuses to start), the naive app's PATCH, a raw ASGI app.
                 Each row says which side was the limit (server CPU or generator CPU).
  flood          1,000 streams x 20 updates/s on one task (the latency scenario), without and with 16
                 wrk connections PATCHing another task flat out: first-receipt p50/p99, ratio (<= 2x).
  patch_latency  PATCH latency at a fixed 2,000 PATCH/s, open loop (bench/openloop.py): p50/p99 (<= 10 ms),
                 memory:// and sqlite, beside the raw ASGI app at the same rate (the machine's floor).
  listing        GET /api/graph/tasks?status=processing&limit=50 (and with q=) over 1k/10k/100k stored
                 tasks (bench/listing.py populates through the store API): p50/p99 and the growth.

Every run starts a fresh server process (pinned to core 0) and a fresh store.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench import listing
from bench.loadgen import proc_cpu_s, system_busy_s
from bench.producer import RedisServer, Wrk, make_tasks, wrk_script
from bench.run import PY, ROOT, BenchError, Server, fmt, log, median, run_loadgen

NAMES = ("producer", "flood", "patch_latency", "listing")
SATURATED_PCT = 85.0


def sizes(quick: bool) -> dict:
    if quick:
        return {"prod_tasks": 100, "prod_duration": 1, "prod_warmup": 0, "connections": 16,
                "flood": (100, 20.0), "flood_duration": 1.0, "flood_stores": ["memory"],
                "pl_rate": 2000.0, "pl_duration": 1.0, "pl_warmup": 0.3, "pl_stores": ["memory"],
                "list_sizes": [500, 2000], "list_requests": 20, "list_seconds": 2, "list_stores": ["sqlite"]}
    return {"prod_tasks": 100, "prod_duration": 5, "prod_warmup": 1, "connections": 16,
            "flood": (1000, 20.0), "flood_duration": 10.0, "flood_stores": ["memory", "sqlite"],
            "pl_rate": 2000.0, "pl_duration": 10.0, "pl_warmup": 1.0, "pl_stores": ["memory", "sqlite", "raw"],
            "list_sizes": [1000, 10_000, 100_000], "list_requests": 200, "list_seconds": 8, "list_stores": ["sqlite", "redis"]}


# targets of the producer table: label -> (server kind, store kind)
PRODUCERS = {
    "taskmon memory://": ("taskmon", "memory"),
    "taskmon sqlite (default store)": ("taskmon", "sqlite"),
    "taskmon redis://": ("taskmon", "redis"),
    "naive app (bench/baseline_naive.py), PATCH": ("baseline", None),
    "raw ASGI app (bench/baseline_raw.py)": ("raw", None),
}


def limit_side(server_pct: float | None, gen_pct: float | None, other_pct: float | None = None) -> str:
    if server_pct is not None and server_pct >= SATURATED_PCT:
        return "server CPU"
    if gen_pct is not None and gen_pct >= SATURATED_PCT:
        return "generator CPU"
    if other_pct is not None and other_pct >= 100 - SATURATED_PCT:
        return f"neither (other processes took {other_pct:.0f} % of a core)"
    return "neither saturated"


def refusal(exc: Exception, logpath: Path | None) -> str:
    """The one line saying why a server refused to start (its ValueError), else the BenchError."""
    text = ""
    if logpath is not None and logpath.exists():
        text = logpath.read_text(errors="replace")
    m = re.findall(r"(?:ValueError|SettingsError|configuration error): ([^\n\"\\]+)", text)
    return m[-1] if m else str(exc)


class Context:
    def __init__(self, pins, logdir: Path, quick: bool) -> None:
        self.spin, self.lpin, _ = pins
        self.logdir = logdir
        self.tmp = Path(tempfile.mkdtemp(prefix="taskmon-bench-"))
        self.quick = quick
        self.s = sizes(quick)
        self.redis: RedisServer | None = None
        self.notes: list[str] = []
        self.skipped: set[str] = set()
        self.seq = 0

    def store_url(self, kind: str) -> str:
        """A fresh store of this kind for one server run."""
        self.seq += 1
        if kind == "memory":
            return "memory://"
        if kind == "sqlite":
            return f"sqlite:///{self.tmp}/tasks-{self.seq}.db"
        if kind == "redis":
            if self.redis is None:
                self.redis = RedisServer(self.logdir)
            if self.redis.url is None:
                raise Skip("redis://: no redis-server binary (or it did not start)")
            self.redis.flush()
            return self.redis.url
        raise ValueError(kind)

    def server(self, kind: str, store_kind: str | None, store_url: str | None = None,
               start_timeout: float = 30.0) -> Server:
        url = store_url or (self.store_url(store_kind) if store_kind else "memory://")
        try:
            return Server(kind, self.spin, self.logdir, store=url, start_timeout=start_timeout)
        except BenchError as exc:
            if store_kind == "redis":
                logs = sorted(self.logdir.glob(f"{kind}-*.log"), key=lambda p: p.stat().st_mtime)
                raise Skip(f"redis://: taskmon refused to start on {url}: "
                           f"{refusal(exc, logs[-1] if logs else None)}") from None
            raise

    def close(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Skip(Exception):
    """This point cannot run here (no redis, store refused): a note, not a failure."""


# --------------------------------------------------------------------------- scenarios


def producer_run(ctx: Context, kind: str, store_kind: str | None) -> dict:
    s = ctx.s
    server = ctx.server(kind, store_kind)
    try:
        ids = make_tasks(server.url, s["prod_tasks"])
        script = wrk_script(ctx.tmp / f"patch-{server.port}.lua", ids)
        if s["prod_warmup"]:
            Wrk(ctx.lpin, server.url, script, s["connections"], s["prod_warmup"]).result()
        c0, b0 = proc_cpu_s(server.pid), system_busy_s()
        w = Wrk(ctx.lpin, server.url, script, s["connections"], s["prod_duration"]).result()
        c1, b1 = proc_cpu_s(server.pid), system_busy_s()
    finally:
        server.stop()
    wall = w["wrk_wall_s"]
    w["server_cpu_pct"] = 100 * (c1 - c0) / wall if wall else None
    w["wrk_cpu_pct"] = 100 * w["wrk_cpu_s"] / wall if wall else None
    # everything else the machine ran meanwhile (other helpers, the kernel's softirq on other tasks)
    w["other_cpu_pct"] = 100 * ((b1 - b0) - (c1 - c0) - w["wrk_cpu_s"]) / wall if wall else None
    w["limit"] = limit_side(w["server_cpu_pct"], w["wrk_cpu_pct"], w["other_cpu_pct"])
    # PATCHes per second of server CPU: the rate one whole core would give; robust when other
    # processes share the server's core (then PATCH/s alone understates it)
    w["per_cpu_s"] = w["rps"] / (w["server_cpu_pct"] / 100) if w.get("rps") and w["server_cpu_pct"] else None
    errors = w.setdefault("errors", [])
    if w.get("non_2xx"):
        errors.append(f"{w['non_2xx']} non-2xx answers")
    if w.get("socket_errors"):
        errors.append(f"{w['socket_errors']} socket errors")
    return w


def flood_run(ctx: Context, store_kind: str) -> dict:
    n, rate = ctx.s["flood"]
    args = {"n": n, "rate": rate, "duration": ctx.s["flood_duration"]}
    server = ctx.server("taskmon", store_kind)
    try:
        off = run_loadgen(ctx.lpin, "latency", server, args, 300)
    finally:
        server.stop()
    server = ctx.server("taskmon", store_kind)
    try:
        ids = make_tasks(server.url, 1, task_type="flood")
        script = wrk_script(ctx.tmp / f"flood-{server.port}.lua", ids)
        wrk = Wrk(ctx.lpin, server.url, script, ctx.s["connections"], 600)
        try:
            on = run_loadgen(ctx.lpin, "latency", server, args, 300)
        finally:
            wrk.stop()
            w = wrk.result(timeout=30)
    finally:
        server.stop()
    out = {"off": off, "on": on, "flood": w, "errors": (off.get("errors") or []) + (on.get("errors") or [])}
    for phase, r in (("off", off), ("on", on)):
        for m in ("first_p50_ms", "first_p99_ms", "last_p99_ms", "server_cpu_pct", "loadgen_cpu_pct"):
            out[f"{m}_{phase}"] = r.get(m)
        if r.get("ready", 0) < n:
            out["errors"].append(f"{phase}: only {r.get('ready')} of {n} streams opened")
    out["flood_rps"] = w.get("rps")
    out["flood_non_2xx"] = w.get("non_2xx")
    if w.get("errors"):
        out["errors"] += w["errors"]
    if w.get("non_2xx"):
        out["errors"].append(f"flood: {w['non_2xx']} non-2xx answers")
    out["p99_ratio"] = (out["first_p99_ms_on"] / out["first_p99_ms_off"]
                        if out["first_p99_ms_on"] and out["first_p99_ms_off"] else None)
    return out


def patch_latency_run(ctx: Context, store_kind: str) -> dict:
    """``raw``: the raw ASGI app at the same rate, the floor this machine sets (its own scheduling
    hiccups reach every server's p99 alike)."""
    s = ctx.s
    server = ctx.server("raw", None) if store_kind == "raw" else ctx.server("taskmon", store_kind)
    try:
        ids = make_tasks(server.url, 100)
        tasks_file = ctx.tmp / f"ids-{server.port}.json"
        tasks_file.write_text(json.dumps(ids))
        cmd = [*ctx.lpin, PY, "-m", "bench.openloop", "--url", server.url, "--tasks-file", str(tasks_file),
               "--rate", str(s["pl_rate"]), "--duration", str(s["pl_duration"]), "--warmup", str(s["pl_warmup"]),
               "--server-pid", str(server.pid)]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise BenchError(f"openloop failed (exit {p.returncode}):\n{p.stderr[-3000:]}") from None


def listing_dataset(ctx: Context, store_kind: str, n: int) -> tuple[str, dict]:
    """Populate once per (store, size); each run gets its own copy (start-up may change the data)."""
    key = f"_listing_{store_kind}_{n}"
    if not hasattr(ctx, key):
        if store_kind == "sqlite":
            url = f"sqlite:///{ctx.tmp}/listing-{n}.db"
        else:
            url = ctx.store_url(store_kind)
        t0 = time.monotonic()
        try:
            counts = listing.populate(url, n)
        except ValueError as exc:
            raise Skip(f"listing on {store_kind}: the store API refused {url}: {exc}") from None
        log(f"listing: {n:,} tasks written to {store_kind} in {time.monotonic() - t0:.1f} s {counts}")
        setattr(ctx, key, (url, counts))
    url, counts = getattr(ctx, key)
    if store_kind == "sqlite":
        src = Path(url.removeprefix("sqlite:///"))
        ctx.seq += 1
        dst = ctx.tmp / f"listing-{n}-run{ctx.seq}.db"
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{src}{suffix}").exists():
                shutil.copyfile(f"{src}{suffix}", f"{dst}{suffix}")
        url = f"sqlite:///{dst}"
    elif store_kind == "redis":
        raise Skip("listing on redis: a run would need a fresh copy of the data set (not written yet)")
    return url, counts


def listing_run(ctx: Context, store_kind: str, n: int) -> dict:
    url, counts = listing_dataset(ctx, store_kind, n)
    server = ctx.server("taskmon", store_kind, store_url=url, start_timeout=120)
    out: dict = {"n": n, "populated": counts, "errors": []}
    try:
        probe = listing.measure(server.url, "/api/graph/tasks?status=processing&limit=1000", 1, warmup=0)
        out["processing_at_start"] = probe["rows"]
        for label, path in listing.QUERIES.items():
            cmd = [*ctx.lpin, PY, "-m", "bench.listing", "measure", "--url", server.url, "--path", path,
                   "--requests", str(ctx.s["list_requests"]), "--max-seconds", str(ctx.s["list_seconds"])]
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
            try:
                r = json.loads(p.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                raise BenchError(f"listing client failed (exit {p.returncode}):\n{p.stderr[-3000:]}") from None
            out[label] = r
            out["errors"] += r.get("errors") or []
    finally:
        server.stop()
    plain, q = out[listing.PLAIN], out[listing.WITH_Q]
    # q= matches 1 task in 500: an answer identical to the unfiltered one means q was not applied
    out["q_ignored"] = plain["rows"] == q["rows"] and plain["ids"] == q["ids"] and (
        bool(plain["ids"]) or out["processing_at_start"] == 0)
    for label in listing.QUERIES:
        out[label].pop("ids", None)  # the JSON keeps the figures, not 50 ids per run
    return out


# --------------------------------------------------------------------------- driver


def plan(wanted: set[str], s: dict) -> list[tuple[str, str, tuple]]:
    points = []
    if "producer" in wanted:
        for label, (kind, store) in PRODUCERS.items():
            points.append(("producer", label, (kind, store)))
    if "flood" in wanted:
        for store in s["flood_stores"]:
            points.append(("flood", store, (store,)))
    if "patch_latency" in wanted:
        for store in s["pl_stores"]:
            points.append(("patch_latency", store, (store,)))
    if "listing" in wanted:
        for store in s["list_stores"]:
            for n in s["list_sizes"]:
                points.append(("listing", f"{store} {n}", (store, n)))
    return points


RUNNERS = {"producer": producer_run, "flood": flood_run, "patch_latency": patch_latency_run,
           "listing": listing_run}


def run(wanted: set[str], pins, logdir: Path, runs: int, quick: bool) -> dict:
    """Every point of the wanted scenarios, ``runs`` times each; medians, notes and problems."""
    ctx = Context(pins, logdir, quick)
    raw: dict = {}
    problems: list[str] = []
    points = plan(wanted, ctx.s)
    try:
        # A scenario's points take turns, run by run (taskmon, the naive app, the raw app, then again):
        # the machine drifts over a minute (other tenants), and each side of a ratio then meets it alike.
        for scenario in dict.fromkeys(point[0] for point in points):
            mine = [(label, args) for kind, label, args in points if kind == scenario]
            for i in range(runs):
                for label, args in mine:
                    key = f"{scenario}: {label}"
                    if any(key.startswith(sk) for sk in ctx.skipped):
                        continue
                    t0 = time.monotonic()
                    try:
                        r = RUNNERS[scenario](ctx, *args)
                    except Skip as exc:
                        ctx.notes.append(str(exc))
                        log(f"SKIPPED {key}: {exc}")
                        # one note per store: the other sizes / runs of a refused store are skipped too
                        ctx.skipped.add(f"{scenario}: {label.split()[0]}" if scenario == "listing" else key)
                        continue
                    except (BenchError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
                        # a server answering the set-up calls wrongly (RuntimeError from make_tasks), a
                        # refused connection, a generator that hangs: a broken point, reported, not a crash
                        problems.append(f"{key}: {type(exc).__name__}: {exc}")
                        log(f"FAILED {key}: {exc}")
                        continue
                    if r.get("errors"):
                        problems.append(f"{key}: errors {r['errors'][:3]}")
                    raw.setdefault(key, []).append(r)
                    log(f"{key} run {i + 1}/{runs}: {summary(scenario, r)} ({time.monotonic() - t0:.1f} s)")
    finally:
        ctx.close()
    med = {key: medians(key.split(":")[0], rs) for key, rs in raw.items()}
    return {"raw": raw, "medians": med, "notes": ctx.notes, "problems": problems, "sizes": ctx.s}


def summary(scenario: str, r: dict) -> str:
    if scenario == "producer":
        return (f"{fmt(r.get('rps'))} PATCH/s, server CPU {fmt(r.get('server_cpu_pct'))} %, "
                f"wrk CPU {fmt(r.get('wrk_cpu_pct'))} %: limit {r.get('limit')}")
    if scenario == "flood":
        return (f"first p99 {fmt(r.get('first_p99_ms_off'))} -> {fmt(r.get('first_p99_ms_on'))} ms "
                f"under {fmt(r.get('flood_rps'))} PATCH/s")
    if scenario == "patch_latency":
        return (f"{fmt(r.get('achieved_per_s'))}/s, p50 {fmt(r.get('p50_ms'))} ms, p99 {fmt(r.get('p99_ms'))} ms, "
                f"server CPU {fmt(r.get('server_cpu_pct'))} %")
    parts = [f"{label}: p50 {fmt(r[label]['p50_ms'])} p99 {fmt(r[label]['p99_ms'])} ms ({r[label]['rows']} rows)"
             for label in listing.QUERIES if label in r]
    return "; ".join(parts)


def medians(scenario: str, results: list[dict]) -> dict:
    def m(get):
        return median([get(r) for r in results])

    if scenario == "producer":
        out = {k: m(lambda r, k=k: r.get(k)) for k in ("rps", "server_cpu_pct", "wrk_cpu_pct",
                                                        "other_cpu_pct", "per_cpu_s", "wrk_latency_avg_ms")}
        out["limit"] = limit_side(out["server_cpu_pct"], out["wrk_cpu_pct"], out["other_cpu_pct"])
        return out
    if scenario == "flood":
        keys = [f"{a}_{p}" for a in ("first_p50_ms", "first_p99_ms", "last_p99_ms", "server_cpu_pct",
                                     "loadgen_cpu_pct") for p in ("off", "on")]
        out = {k: m(lambda r, k=k: r.get(k)) for k in keys + ["flood_rps", "p99_ratio"]}
        return out
    if scenario == "patch_latency":
        return {k: m(lambda r, k=k: r.get(k)) for k in ("achieved_per_s", "p50_ms", "p99_ms", "max_ms",
                                                        "service_p99_ms", "max_queue", "server_cpu_pct",
                                                        "loadgen_cpu_pct")}
    out = {"n": results[0]["n"], "processing_at_start": m(lambda r: r.get("processing_at_start")),
           "populated": results[0]["populated"], "q_ignored": all(r.get("q_ignored") for r in results)}
    for label in listing.QUERIES:
        out[label] = {k: m(lambda r, k=k: (r.get(label) or {}).get(k)) for k in ("p50_ms", "p99_ms", "rows",
                                                                                 "requests")}
    return out


# --------------------------------------------------------------------------- report


def table(header: tuple, rows: list[tuple]) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for i, r in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w)
                                       for j, (c, w) in enumerate(zip(r, widths))) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def report(result: dict, meta: dict) -> tuple[str, list[dict]]:
    """The printed section and the target checks (verdicts) of the producer-path scenarios."""
    med, s = result["medians"], result["sizes"]
    out: list[str] = []
    checks: list[dict] = []

    def check(text: str, rule: str, ok: bool | None) -> None:
        if ok is not None:
            checks.append({"check": text, "rule": rule, "verdict": "PASS" if ok else "MISS"})

    prod = {k.split(": ", 1)[1]: v for k, v in med.items() if k.startswith("producer: ")}
    if prod:
        naive_row = prod.get("naive app (bench/baseline_naive.py), PATCH") or {}
        naive, naive_cpu = naive_row.get("rps"), naive_row.get("per_cpu_s")
        rows = []
        for label in PRODUCERS:
            r = prod.get(label)
            if r is None:
                rows.append((label, "skipped" if any(label.startswith("taskmon redis") and "redis" in n
                                                      for n in result["notes"]) else "-", "", "", "", "", "", "", ""))
                continue
            x = r["rps"] / naive if naive and r.get("rps") else None
            xc = r["per_cpu_s"] / naive_cpu if naive_cpu and r.get("per_cpu_s") else None
            rows.append((label, fmt(r.get("rps"), "/s"), fmt(x, "x") if x else "-",
                         fmt(r.get("per_cpu_s")), fmt(xc, "x") if xc else "-",
                         fmt(r.get("server_cpu_pct"), " %"), fmt(r.get("wrk_cpu_pct"), " %"),
                         fmt(r.get("other_cpu_pct"), " %"), r["limit"]))
        out.append(f"producer path: PATCH/s, {s['connections']} connections, 0 subscribers, ~150-byte update, "
                   f"{s['prod_tasks']} tasks round-robin, wrk -t1 {s['prod_duration']} s ({meta['pinning']}); "
                   f"median of {meta['runs']} run(s)\n")
        out.append(table(("producer", "PATCH/s", "vs naive", "per server CPU-s", "vs naive (CPU-s)", "server CPU", "wrk CPU",
                          "other CPU", "the limit"), rows))
        limits = {r["limit"] for r in prod.values()}
        if "generator CPU" in limits:
            out.append("NOTE: the generator (wrk) was the limit for some rows: those rates are lower bounds.")
        elif limits == {"server CPU"}:
            out.append("The limit: the server's core on every row (wrk was not the limit).")
        else:
            out.append("The limit: wrk was never the limit; rows not marked 'server CPU' left the server's core "
                       "partly idle (\"other CPU\": what the rest of the machine ran meanwhile).")
        for label, short, factor in (("taskmon memory://", "memory://", 1.0),
                                     ("taskmon sqlite (default store)", "sqlite", 0.8)):
            r = prod.get(label)
            if not r or not naive:
                continue
            if r["limit"] == "server CPU" and naive_row["limit"] == "server CPU":
                check(f"producer {short} {fmt(r['rps'])} PATCH/s vs naive {fmt(naive)}",
                      f">= {factor:g} x naive (issue 10)", r["rps"] >= factor * naive)
            elif r.get("per_cpu_s") and naive_cpu:
                check(f"producer {short} {fmt(r['per_cpu_s'])} PATCH per server CPU-s vs naive {fmt(naive_cpu)} "
                      "(a server core was not saturated: compared per CPU-second)",
                      f">= {factor:g} x naive (issue 10)", r["per_cpu_s"] >= factor * naive_cpu)
        out.append("")

    flood = {k.split(": ", 1)[1]: v for k, v in med.items() if k.startswith("flood: ")}
    if flood:
        n, rate = s["flood"]
        rows = []
        for store, r in flood.items():
            ratio = r["first_p99_ms_on"] / r["first_p99_ms_off"] if r.get("first_p99_ms_on") and r.get(
                "first_p99_ms_off") else None
            rows.append((f"taskmon {store}", f"{fmt(r['first_p50_ms_off'])} / {fmt(r['first_p50_ms_on'])} ms",
                         f"{fmt(r['first_p99_ms_off'])} / {fmt(r['first_p99_ms_on'])} ms", fmt(ratio, "x"),
                         f"{fmt(r['last_p99_ms_off'])} / {fmt(r['last_p99_ms_on'])} ms", fmt(r.get("flood_rps"), "/s"),
                         f"{fmt(r['server_cpu_pct_off'])} / {fmt(r['server_cpu_pct_on'])} %"))
            if ratio is not None:
                check(f"flood ({store}): first-receipt p99 {fmt(r['first_p99_ms_on'])} ms with vs "
                      f"{fmt(r['first_p99_ms_off'])} ms without", "<= 2 x (issue 10)", ratio <= 2)
        out.append(f"flood while streaming: {n:,} streams x {rate:g} updates/s on one task, without / with "
                   f"{s['connections']} wrk connections PATCHing another task flat out (fresh server each)\n")
        out.append(table(("store", "first p50 without / with", "first p99 without / with", "p99 ratio",
                          "last p99 without / with", "flood PATCH/s", "server CPU"), rows))
        out.append("")

    pl = {k.split(": ", 1)[1]: v for k, v in med.items() if k.startswith("patch_latency: ")}
    if pl:
        rows = []
        for store, r in pl.items():
            rows.append(("raw ASGI app (the floor)" if store == "raw" else f"taskmon {store}", fmt(r.get("achieved_per_s"), "/s"), fmt(r.get("p50_ms"), " ms"),
                         fmt(r.get("p99_ms"), " ms"), fmt(r.get("max_ms"), " ms"), fmt(r.get("service_p99_ms"), " ms"),
                         fmt(r.get("max_queue")), fmt(r.get("server_cpu_pct"), " %"), fmt(r.get("loadgen_cpu_pct"), " %")))
            if r.get("p99_ms") is not None and store != "raw":
                check(f"PATCH p99 at {s['pl_rate']:,.0f}/s ({store}): {fmt(r['p99_ms'])} ms", "<= 10 ms (issue 10)",
                      r["p99_ms"] <= 10 and (r.get("achieved_per_s") or 0) >= 0.95 * s["pl_rate"])
        out.append(f"PATCH latency, open loop at {s['pl_rate']:,.0f} PATCH/s for {s['pl_duration']:g} s "
                   f"(bench/openloop.py; latency from each PATCH's due time, ~1 ms timer slack included)\n")
        out.append(table(("store", "answered/s", "p50", "p99", "max", "p99 from send", "max queued",
                          "server CPU", "generator CPU"), rows))
        out.append("")

    lst = {k.split(": ", 1)[1]: v for k, v in med.items() if k.startswith("listing: ")}
    if lst:
        rows = []
        by_store: dict[str, list] = {}
        for label, r in lst.items():
            store = label.split()[0]
            by_store.setdefault(store, []).append(r)
            for q in listing.QUERIES:
                rq = r.get(q) or {}
                rows.append((f"{store}, {r['n']:,} tasks", q, fmt(rq.get("p50_ms"), " ms"), fmt(rq.get("p99_ms"), " ms"),
                             fmt(rq.get("rows")), fmt(rq.get("requests")), fmt(r.get("processing_at_start"))))
        out.append("listing: GET /api/graph/tasks ...&limit=50, sequential keep-alive client on core 1 "
                   f"({s['list_requests']} requests per point, or {s['list_seconds']:g} s and >= 20); data written through "
                   "the store API "
                   "(bench/listing.py populate)\n")
        out.append(table(("store, stored tasks", "query", "p50", "p99", "rows", "requests", "processing at start"),
                         rows))
        for store, rs in by_store.items():
            rs.sort(key=lambda r: r["n"])
            lo, hi = rs[0], rs[-1]
            if lo is hi:
                continue
            for q in listing.QUERIES:
                a, b = (lo.get(q) or {}).get("p50_ms"), (hi.get(q) or {}).get("p50_ms")
                if a and b:
                    grow = b / a
                    size_ratio = hi["n"] / lo["n"]
                    out.append(f"  growth {store} {lo['n']:,} -> {hi['n']:,} tasks ({size_ratio:g}x), {q}: "
                               f"p50 {fmt(a)} -> {fmt(b)} ms = {grow:.1f}x")
                    bound = max(2.0, size_ratio ** 0.5)
                    if not (hi.get(q) or {}).get("rows"):
                        out.append(f"    (no verdict for {q}: it matched no task at {hi['n']:,})")
                        continue
                    check(f"listing {store} {q}: p50 x{grow:.1f} from {lo['n']:,} to {hi['n']:,} tasks",
                          f"sub-linear: < {bound:.3g} x, the square root of the size ratio (issue 13)",
                          grow < bound)
            populated = hi["populated"].get("processing", 0)
            if hi.get("processing_at_start") is not None and hi["processing_at_start"] < min(populated, 1000):
                out.append(f"  NOTE: {store}: {populated:,} tasks were written as processing but "
                           f"{hi['processing_at_start']:,} were still processing once the server had started "
                           "(start-up recovery failed the rest: issue 8), so status=processing matches less.")
            if all(r.get("q_ignored") for r in rs):
                out.append(f"  NOTE: {store}: the answer with q= is the answer without it: this server ignores q "
                           "(issue 13 not in yet).")
        out.append("")
    for note in result["notes"]:
        out.append(f"NOTE: {note}")
    return "\n".join(out), checks
