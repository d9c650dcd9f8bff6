"""Listing bench (issue 13): filtered ``GET /api/graph/tasks`` latency over many stored tasks.

Two halves:

* ``populate(store_url, n)``: THE one place that writes the bench's tasks, through the store/manager
  Python API (fast: no HTTP, no events). When that API changes, adapt this function only.
* ``python -m bench.listing measure --url ... --path ... --requests N``: a sequential keep-alive
  client (run pinned to the other core by ``bench.run``) that times each GET to its last byte and
  prints p50/p99 and the number of rows of the last answer as JSON.

The data set: task types from ``TASK_TYPES``; 85 % completed, 5 % failed, 10 % processing; a message
and a ``customer`` metadata value ``acme-0000`` .. ``acme-0498`` (so ``q=acme-0042`` matches 1 task in
500); created over the last hour, newest last.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

TASK_TYPES = ("import_csv", "resize_image", "send_email", "build_graph")
QUERY_TERM = "acme-0042"
PLAIN = "status=processing"
WITH_Q = f"status=processing&q={QUERY_TERM}"
QUERIES = {  # label -> path
    "status=processing": "/api/graph/tasks?status=processing&limit=50",
    f"status=processing&q={QUERY_TERM}": f"/api/graph/tasks?status=processing&q={QUERY_TERM}&limit=50",
    # matches 85 % of the tasks whatever start-up does to live ones (issue 8)
    "status=completed": "/api/graph/tasks?status=completed&limit=50",
}


def _status_for(i: int):
    from server.models import TaskStatus

    r = i % 20
    if r < 2:
        return TaskStatus.PROCESSING
    if r == 2:
        return TaskStatus.FAILED
    return TaskStatus.COMPLETED


def populate(store_url: str, n: int) -> dict:
    """Write ``n`` tasks into the store at ``store_url``; returns how many of each status.

    Commits each task through the store seam (``commit(task, None, body)``), the way the manager
    does; the store is closed afterwards (a server opens it next)."""
    from server.manager import encode_task
    from server.models import Task
    from server.stores import open_store

    store = open_store(store_url)
    counts: dict[str, int] = {}
    start = datetime.now(UTC) - timedelta(hours=1)
    step = timedelta(seconds=3600 / max(1, n))
    try:
        for i in range(n):
            status = _status_for(i)
            created = start + i * step
            task_type = TASK_TYPES[i % len(TASK_TYPES)]
            customer = f"acme-{i % 499:04d}"  # 499: prime to the status cycle, so every customer has every status
            task = Task(
                task_id=str(uuid.UUID(int=i + 1, version=4)),
                task_type=task_type,
                status=status,
                created_at=created,
                updated_at=created + timedelta(seconds=5),
                progress=100 if status.value == "completed" else (i * 7) % 100,
                message=f"{task_type.replace('_', ' ')} batch {i % 1000}",
                progress_detail={"step": i % 100},
                result={"rows": i} if status.value == "completed" else None,
                error="worker lost" if status.value == "failed" else None,
                metadata={"customer": customer, "source": f"s3://bucket/{i % 97}"},
                version=3,
            )
            store.commit(task, None, encode_task(task))
            counts[status.value] = counts.get(status.value, 0) + 1
    finally:
        store.close()
    return counts


def measure(url: str, path: str, requests: int, warmup: int = 5, max_seconds: float | None = None) -> dict:
    """``requests`` sequential GETs of ``path`` (after ``warmup``), fewer when ``max_seconds`` runs out
    (at least 20 are made: a slow listing still gets a p50, and its p99 is then close to the max)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    times: list[float] = []
    rows = None
    statuses: dict[int, int] = {}
    body = b""
    stop = time.monotonic() + max_seconds if max_seconds else None
    try:
        for k in range(warmup + requests):
            if stop is not None and k >= warmup + 20 and time.monotonic() > stop:
                break
            t0 = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            dt = (time.perf_counter() - t0) * 1e3
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            if k >= warmup:
                times.append(dt)
    finally:
        conn.close()
    errors = [f"status {s} x{c}" for s, c in statuses.items() if s != 200]
    try:
        data = json.loads(body)
        rows = len(data.get("data", []))
        ids = [t.get("task_id") for t in data.get("data", [])]
    except ValueError:
        ids = []
        errors.append("answer is not JSON")
    times.sort()
    from bench.loadgen import pct

    return {"path": path, "requests": len(times), "p50_ms": pct(times, 50), "p99_ms": pct(times, 99),
            "max_ms": times[-1] if times else None, "rows": rows, "ids": ids,
            "bytes": len(body), "errors": errors}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="listing latency client / data set writer")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--url", required=True)
    m.add_argument("--path", required=True)
    m.add_argument("--requests", type=int, default=200)
    m.add_argument("--max-seconds", type=float, default=None, help="stop early (after >= 20 requests)")
    w = sub.add_parser("populate")
    w.add_argument("--store", required=True)
    w.add_argument("--n", type=int, required=True)
    a = p.parse_args(argv)
    if a.cmd == "populate":
        t0 = time.monotonic()
        counts = populate(a.store, a.n)
        print(json.dumps({"n": a.n, "counts": counts, "seconds": round(time.monotonic() - t0, 2)}), flush=True)
        return 0
    r = measure(a.url, a.path, a.requests, max_seconds=a.max_seconds)
    print(json.dumps(r), flush=True)
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
