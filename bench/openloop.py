"""Open-loop PATCH generator (issue 10: "PATCH latency p99 at 2,000 PATCH/s"): wrk2 is not in Debian.

The k-th PATCH is due at ``t0 + k / rate`` whatever the earlier ones did (no coordinated omission):
it goes out on an idle keep-alive connection of a fixed pool, or waits in a queue until one is idle.
Latency is measured from the *due* time to the last byte of the response (``intended``: what a
producer calling at that rate sees, including queueing and the generator's timer slack of up to
~1 ms, the event loop's timer resolution) and from the moment the request was written (``service``).
Every response must be a 200. Run pinned to the other core (``bench.run`` does).

    python -m bench.openloop --url http://127.0.0.1:8000 --tasks-file ids.json --rate 2000 --duration 10

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from urllib.parse import urlsplit

from bench.loadgen import pct, proc_cpu_s, self_cpu_s
from bench.producer import update_body

perf = time.perf_counter


class Conn(asyncio.Protocol):
    def __init__(self, gen: "OpenLoop") -> None:
        self.gen = gen
        self.transport = None
        self.buf = b""
        self.need = -1        # body bytes still expected after the head, -1 while reading the head
        self.status = 0
        self.due = 0.0
        self.sent = 0.0
        self.busy = False
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, request: bytes, due: float) -> None:
        self.busy = True
        self.due = due
        self.sent = perf()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buf[:end]
                self.buf = self.buf[end + 4:]
                self.status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                self.need = length
            if len(self.buf) < self.need:
                return
            self.buf = self.buf[self.need:]
            self.need = -1
            self.busy = False
            self.gen.done(self, perf())

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        # An idle keep-alive connection the server closed (its idle/header deadline: the generator
        # reuses the most recent connections, so the others can sit idle that long) is replaced.
        if self in self.gen.idle:
            self.gen.idle.remove(self)
        self.gen.replace_connection()
        if self.busy:
            self.gen.errors.append(f"connection lost with a request in flight: {exc}")
            self.busy = False
            self.gen.outstanding -= 1


class OpenLoop:
    def __init__(self, host: str, port: int, task_ids: list[str]) -> None:
        self.host, self.port = host, port
        hosthdr = f"{host}:{port}"
        self.requests = []
        for i, task_id in enumerate(task_ids * (100 // len(task_ids) + 1)):
            if i >= 100:
                break
            body = update_body(i % 100)
            self.requests.append((f"PATCH /api/tasks/{task_id} HTTP/1.1\r\nHost: {hosthdr}\r\n"
                                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                                 + body)
        self.k = 0
        self.idle: list[Conn] = []
        self.queue: collections.deque[float] = collections.deque()
        self.intended: list[float] = []
        self.service: list[float] = []
        self.record = False
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self.outstanding = 0
        self.max_queue = 0
        self.all_done: asyncio.Event | None = None
        self._reconnects: set[asyncio.Task[None]] = set()

    async def connect(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(n):
            _, conn = await loop.create_connection(lambda: Conn(self), self.host, self.port)
            self.idle.append(conn)

    def replace_connection(self) -> None:
        loop = asyncio.get_running_loop()

        async def reconnect() -> None:
            try:
                _, conn = await loop.create_connection(lambda: Conn(self), self.host, self.port)
            except OSError as exc:
                self.errors.append(f"reconnect failed: {exc}")
                return
            if self.queue:
                self.k += 1
                conn.send(self.requests[self.k % len(self.requests)], self.queue.popleft())
            else:
                self.idle.append(conn)

        self._reconnects.add(task := loop.create_task(reconnect()))
        task.add_done_callback(self._reconnects.discard)

    def issue(self, due: float) -> None:
        self.outstanding += 1
        if self.idle:
            conn = self.idle.pop()
            self.k += 1
            conn.send(self.requests[self.k % len(self.requests)], due)
        else:
            self.queue.append(due)
            self.max_queue = max(self.max_queue, len(self.queue))

    def done(self, conn: Conn, now: float) -> None:
        self.outstanding -= 1
        self.statuses[conn.status] = self.statuses.get(conn.status, 0) + 1
        if conn.status != 200 and len(self.errors) < 20:
            self.errors.append(f"status {conn.status}")
        if self.record:
            self.intended.append((now - conn.due) * 1e3)
            self.service.append((now - conn.sent) * 1e3)
        if self.queue:
            self.k += 1
            conn.send(self.requests[self.k % len(self.requests)], self.queue.popleft())
        else:
            self.idle.append(conn)
        if self.outstanding == 0 and self.all_done is not None:
            self.all_done.set()

    async def run(self, rate: float, seconds: float) -> None:
        """Issue at `rate` for `seconds`, then wait for every answer."""
        interval = 1.0 / rate
        count = int(rate * seconds)
        t0 = perf()
        k = 0
        while k < count:
            now = perf()
            while k < count and t0 + k * interval <= now:
                self.issue(t0 + k * interval)
                k += 1
            if k < count:
                # at least 1 ms: the loop's timer resolution (a shorter sleep would spin the core)
                await asyncio.sleep(max(0.001, t0 + k * interval - perf()))
        self.all_done = asyncio.Event()
        if self.outstanding:
            await asyncio.wait_for(self.all_done.wait(), 30)
        self.all_done = None


async def amain(a) -> dict:
    u = urlsplit(a.url)
    if u.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit("the benchmark only ever talks to 127.0.0.1")
    with open(a.tasks_file) as f:
        task_ids = json.load(f)
    gen = OpenLoop(u.hostname, u.port, task_ids)
    await gen.connect(a.connections)
    if a.warmup:
        await gen.run(a.rate, a.warmup)
    gen.record = True
    c0 = proc_cpu_s(a.server_pid) if a.server_pid else 0.0
    s0, t0 = self_cpu_s(), time.monotonic()
    await gen.run(a.rate, a.duration)
    wall = time.monotonic() - t0
    c1 = proc_cpu_s(a.server_pid) if a.server_pid else 0.0
    s1 = self_cpu_s()
    n = len(gen.intended)
    return {
        "rate": a.rate, "duration_s": a.duration, "connections": a.connections, "answered": n,
        "achieved_per_s": n / wall if wall else None, "window_s": round(wall, 3),
        "p50_ms": pct(gen.intended, 50), "p99_ms": pct(gen.intended, 99), "max_ms": max(gen.intended, default=None),
        "service_p50_ms": pct(gen.service, 50), "service_p99_ms": pct(gen.service, 99),
        "max_queue": gen.max_queue,
        "server_cpu_pct": 100 * (c1 - c0) / wall if a.server_pid else None,
        "loadgen_cpu_pct": 100 * (s1 - s0) / wall,
        "statuses": {str(k): v for k, v in gen.statuses.items()}, "errors": gen.errors,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="open-loop PATCH generator")
    p.add_argument("--url", required=True)
    p.add_argument("--tasks-file", required=True, help="JSON list of task ids (processing) to PATCH")
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--server-pid", type=int)
    a = p.parse_args(argv)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(amain(a))
    print(json.dumps(result), flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
