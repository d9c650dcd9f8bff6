"""Load generator for the taskmon benchmarks (issue 5).

One asyncio process (uvloop when installed) that holds thousands of SSE streams over
loopback with plain ``asyncio.Protocol`` objects -- no HTTP library per stream:

* HTTP/1.1 ``GET /tasks/{id}/stream`` written by hand, the response head parsed, the
  chunked body de-chunked incrementally;
* a strict, incremental SSE parser (WHATWG "Server-sent events": CR, LF and CRLF line
  ends, split anywhere, comments, ``data``/``event``/``id``/``retry`` fields, dispatch on
  the blank line, ``id`` persisted across events);
* versions checked per stream (``id:`` strictly increasing, equal to the JSON ``version``
  wherever the data is decoded);
* the producer API (``POST /api/tasks``, ``PATCH /api/tasks/{id}``) spoken over a small
  pool of keep-alive connections. Each PATCH carries the publisher's
  ``time.perf_counter_ns()`` in ``progress_detail.t``, padded so the event's ``data``
  is ~300 bytes; a receiver stamps ``perf_counter_ns()`` when the bytes arrive.

Server CPU (utime+stime from ``/proc/<pid>/stat``) and RSS (``VmRSS``) are sampled here,
at the exact edges of each measurement window (``--server-pid``).

Usually driven by ``python -m bench.run``; standalone:

    python -m bench.loadgen saturation --url http://127.0.0.1:8765 --server-pid PID --n 1000
    python -m bench.loadgen latency --url ... --n 1000 --rate 20 --duration 10 [--stall 1]
    python -m bench.loadgen idle --url ... --n 5000
    python -m bench.loadgen hold --url ... --task-id ID --n 10000   (READY on stdout; stdin EOF ends)

The result is one JSON object on stdout (last line); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

perf_ns = time.perf_counter_ns
CLK_TCK = os.sysconf("SC_CLK_TCK")
EVENT_TARGET_BYTES = 300


def log(*args) -> None:
    print("[loadgen]", *args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu_s(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    return sum(proc_cpu_split(pid))


def proc_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def system_busy_s() -> float:
    """CPU seconds used by everything on the machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / CLK_TCK


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


# --------------------------------------------------------------------------- parsing


class ProtocolViolation(Exception):
    pass


_CANONICAL = re.compile(rb"id: ([0-9]+)\nevent: ([a-z]+)\ndata: ([^\n]*)").fullmatch
_BLANK = [b""]


class SSEParser:
    """Incremental SSE parser following the WHATWG event-stream interpretation.

    ``feed(bytes)`` may be called with any split of the stream. Calls
    ``on_event(event_type: bytes, data: bytes, last_event_id: bytes)`` on dispatch and
    ``on_comment(line: bytes)`` for comment lines.
    """

    __slots__ = ("_buf", "_cr", "_data", "_event", "last_id", "retry", "_started",
                 "on_event", "on_comment")

    def __init__(self, on_event, on_comment=None) -> None:
        self._buf = b""
        self._cr = False          # a trailing CR held back: it may be half of a CRLF
        self._data: list[bytes] = []
        self._event = b""
        self.last_id = b""
        self.retry: int | None = None
        self._started = False
        self.on_event = on_event
        self.on_comment = on_comment

    def feed(self, data: bytes) -> None:
        if not self._started:
            data = self._buf + data
            self._buf = b""
            if len(data) < 3 and b"\xef\xbb\xbf".startswith(data):
                self._buf = data
                return
            if data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            self._started = True
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if b"\r" in data:
            if data[-1] == 13:
                data = data[:-1]
                self._cr = True
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not self._buf and not self._data and not self._event and data[-2:] == b"\n\n":
            # Fast path, same result as the general one: whole events, no state carried over.
            # A block of exactly `id: <digits>` / `event: <name>` / one `data:` line is
            # dispatched at once; anything else goes through the line-by-line algorithm.
            for block in data[:-2].split(b"\n\n"):
                m = _CANONICAL(block)
                if m is not None:
                    self.last_id = m[1]
                    self.on_event(m[2], m[3], m[1])
                else:
                    self._lines(block.split(b"\n"))
                    self._lines(_BLANK)
            return
        nl = data.rfind(b"\n")
        if nl < 0:
            self._buf += data
            return
        if self._buf:
            lines = (self._buf + data[:nl]).split(b"\n")
        else:
            lines = data[:nl].split(b"\n")
        self._buf = data[nl + 1:]
        self._lines(lines)

    def _lines(self, lines: list[bytes]) -> None:
        for line in lines:
            if not line:
                if self._data:
                    data_ = b"\n".join(self._data)
                    event = self._event or b"message"
                    self._data = []
                    self._event = b""
                    self.on_event(event, data_, self.last_id)
                else:
                    self._event = b""
                continue
            if line[0] == 58:  # ':'
                if self.on_comment is not None:
                    self.on_comment(line)
                continue
            i = line.find(b":")
            if i < 0:
                field, value = line, b""
            else:
                field = line[:i]
                value = line[i + 1:]
                if value[:1] == b" ":
                    value = value[1:]
            if field == b"data":
                self._data.append(value)
            elif field == b"event":
                self._event = value
            elif field == b"id":
                if b"\0" not in value:
                    self.last_id = value
            elif field == b"retry":
                if value.isdigit():
                    self.retry = int(value)
            # any other field is ignored, as the spec says

    def end(self) -> None:
        """End of stream: a pending incomplete event is discarded (spec)."""
        self._buf = b""
        self._data = []
        self._event = b""


class Dechunker:
    """Incremental decoder of HTTP/1.1 chunked transfer coding."""

    __slots__ = ("_buf", "_remaining", "_need_crlf", "done", "chunks")

    def __init__(self) -> None:
        self.chunks = 0   # chunks received: one per server send, whatever TCP did to them
        self._buf = b""
        self._remaining = 0
        self._need_crlf = False
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if not self._buf and not self._remaining and not self._need_crlf and not self.done:
            # Fast path: exactly one whole chunk (how a server's one send usually arrives)
            i = data.find(b"\r\n", 0, 10)
            if i > 0 and data[-2:] == b"\r\n":
                try:
                    size = int(data[:i], 16)
                except ValueError:
                    size = -1
                if size > 0 and len(data) == i + 4 + size:
                    self.chunks += 1
                    return data[i + 2:-2]
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        out = []
        while pos < n and not self.done:
            if self._remaining:
                take = min(self._remaining, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._need_crlf = True
                continue
            if self._need_crlf:
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ProtocolViolation("chunk not followed by CRLF")
                pos += 2
                self._need_crlf = False
                continue
            i = buf.find(b"\r\n", pos)
            if i < 0:
                if n - pos > 1024:
                    raise ProtocolViolation("chunk size line too long")
                break
            try:
                size = int(buf[pos:i].split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolViolation(f"bad chunk size {buf[pos:i][:40]!r}") from None
            pos = i + 2
            self.chunks += 1
            if size == 0:
                self.done = True
            self._remaining = size
        self._buf = buf[pos:] if not self.done else b""
        return out[0] if len(out) == 1 else b"".join(out)


# --------------------------------------------------------------------------- streams


class Stats:
    """Counters shared by every stream of one load generator."""

    def __init__(self) -> None:
        self.events = 0          # dispatched `task` events, all streams
        self.pings = 0
        self.ready = 0           # streams that received their first `task` event
        self.closed = 0
        self.ended = 0           # streams that received `event: end`
        self.errors: list[str] = []
        self.statuses: dict[int, int] = {}
        self.coalesced = 0       # versions skipped by the server for a stream


class StreamConn(asyncio.Protocol):
    """One SSE stream. mode "count": versions from ``id:`` only; mode "latency": every
    event's JSON is decoded and (version, receipt ns) is recorded."""

    def __init__(self, stats: Stats, request: bytes, record: bool, stall: bool = False) -> None:
        self.stats = stats
        self.request = request
        self.received = 0
        self.record = record
        self.stall = stall
        self.transport = None
        self.head = b""
        self.status = 0
        self.body_started = False
        self.dechunk: Dechunker | None = None
        self.sse = SSEParser(self._on_event, self._on_comment)
        self.version = 0
        self.events = 0
        self.now = 0
        self.recv: list[tuple] = []   # (version, receipt ns, data) when record
        self.open = False
        self.ended = False
        self.headed = asyncio.get_running_loop().create_future()  # response head parsed, or lost

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.open = True
        transport.write(self.request)
        if self.stall:
            transport.pause_reading()  # opened the stream, never reads (again in open_streams)

    def data_received(self, data: bytes) -> None:
        self.now = perf_ns()
        self.received += len(data)
        try:
            if self.body_started:
                if self.dechunk is not None:
                    data = self.dechunk.feed(data)
                self.sse.feed(data)
            else:
                self._head(data)
        except ProtocolViolation as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug in the server's output, never hide it
            self._fail(f"{type(exc).__name__}: {exc}")

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        if self.open:
            self.open = False
            self.stats.closed += 1
        self.sse.end()
        if not self.headed.done():
            self.headed.set_result(False)

    # internals
    def _fail(self, msg: str) -> None:
        if len(self.stats.errors) < 50:
            self.stats.errors.append(msg)
        if self.transport is not None:
            self.transport.close()

    def _head(self, data: bytes) -> None:
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > 65536:
                raise ProtocolViolation("response head too long")
            return
        head, rest = self.head[:end], self.head[end + 4:]
        self.head = b""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolViolation(f"bad status line {lines[0][:80]!r}")
        self.status = int(parts[1])
        self.stats.statuses[self.status] = self.stats.statuses.get(self.status, 0) + 1
        if not self.headed.done():
            self.headed.set_result(True)
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip().lower()
        if self.status != 200:
            self.transport.close()
            return
        if not headers.get(b"content-type", b"").startswith(b"text/event-stream"):
            raise ProtocolViolation(f"content-type {headers.get(b'content-type')!r}")
        if headers.get(b"content-encoding", b"identity") != b"identity":
            raise ProtocolViolation("compressed stream")
        if headers.get(b"transfer-encoding") == b"chunked":
            self.dechunk = Dechunker()
        self.body_started = True
        if rest:
            self.data_received(rest)

    def _on_comment(self, line: bytes) -> None:
        self.stats.pings += 1

    def _on_event(self, event: bytes, data: bytes, last_id: bytes) -> None:
        if event == b"task":
            v = int(last_id)
            if v <= self.version:
                raise ProtocolViolation(f"version {v} after {self.version}")
            if self.version and v > self.version + 1:
                self.stats.coalesced += v - self.version - 1
            if not self.version and not self.stall:
                self.stats.ready += 1
            self.version = v
            self.events += 1
            self.stats.events += 1
            if self.record:
                # JSON is decoded after the measurement (receipt_latencies), so that a burst
                # of 1,000 receipts is stamped without the decoding cost in between.
                self.recv.append((v, self.now, data))
        elif event == b"end":
            json.loads(data)
            self.ended = True
            self.stats.ended += 1
        elif event == b"message":
            raise ProtocolViolation(f"unexpected untyped event {data[:80]!r}")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


# --------------------------------------------------------------------------- producer


class HttpConn:
    def __init__(self, reader, writer) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self, method: str, path: str, host: str, body: dict | None = None):
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
        self.writer.write(head.encode() + payload)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        if b"content-length" in headers:
            data = await self.reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            data = b"".join(parts)
        else:
            data = await self.reader.read()
        if headers.get(b"connection", b"").lower() == b"close":
            self.writer.close()
            self.writer = None
        return status, data


class Producer:
    """Keep-alive connections to the producer API; opens more when all are busy."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.hosthdr = f"{host}:{port}"
        self.idle: list[HttpConn] = []
        self.all: list[HttpConn] = []

    async def _connect(self) -> HttpConn:
        r, w = await asyncio.open_connection(self.host, self.port)
        conn = HttpConn(r, w)
        self.all.append(conn)
        return conn

    async def call(self, method: str, path: str, body: dict | None = None):
        conn = self.idle.pop() if self.idle else None
        if conn is None:
            conn = await self._connect()
            status, data = await conn.request(method, path, self.hosthdr, body)
        else:
            try:
                status, data = await conn.request(method, path, self.hosthdr, body)
            except (asyncio.IncompleteReadError, ConnectionError):
                # the server closed an idle keep-alive connection (uvicorn: after 5 s)
                conn.writer.close()
                conn = await self._connect()
                status, data = await conn.request(method, path, self.hosthdr, body)
        if conn.writer is not None:
            self.idle.append(conn)
        try:
            obj = json.loads(data) if data else None
        except ValueError:
            obj = None
        return status, obj

    async def create_task(self, task_type: str = "bench") -> dict:
        status, obj = await self.call("POST", "/api/tasks", {"task_type": task_type})
        if status != 201:
            raise RuntimeError(f"POST /api/tasks -> {status} {obj}")
        return obj.get("data", obj)

    async def patch(self, task_id: str, body: dict) -> dict:
        status, obj = await self.call("PATCH", f"/api/tasks/{task_id}", body)
        if status != 200:
            raise RuntimeError(f"PATCH -> {status} {obj}")
        return obj.get("data", obj) if isinstance(obj, dict) else obj

    def close(self) -> None:
        for c in self.all:
            if c.writer is not None:
                c.writer.close()


def pad_for(task: dict) -> int:
    """Pad length that makes the event's data ~EVENT_TARGET_BYTES (compact JSON)."""
    probe = dict(task, status="processing", progress=50, message="bench update",
                 progress_detail={"t": perf_ns(), "pad": ""}, version=task["version"] + 1000)
    return max(0, EVENT_TARGET_BYTES - len(json.dumps(probe, separators=(",", ":"))))


# --------------------------------------------------------------------------- generator


class LoadGen:
    def __init__(self, url: str, server_pid: int | None) -> None:
        u = urlsplit(url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        if self.host not in ("127.0.0.1", "localhost"):
            raise SystemExit("the benchmark only ever talks to 127.0.0.1")
        self.server_pid = server_pid
        self.stats = Stats()
        self.streams: list[StreamConn] = []
        self.producer = Producer(self.host, self.port)
        self.loop = asyncio.get_running_loop()
        self.pad = 0
        self.seq = 0

    # server probes
    def cpu(self) -> float:
        return proc_cpu_s(self.server_pid) if self.server_pid else 0.0

    def sys_cpu(self) -> float:
        return proc_cpu_split(self.server_pid)[1] if self.server_pid else 0.0

    def rss(self) -> int:
        return proc_rss_bytes(self.server_pid) if self.server_pid else 0

    # streams
    async def open_streams(self, task_ids: list[str], n: int, record: bool, stall: int = 0,
                           timeout: float = 120.0, concurrency: int = 256,
                           head_timeout: float = 30.0) -> dict:
        t0 = time.monotonic()
        sem = asyncio.Semaphore(concurrency)
        before_ready = self.stats.ready
        new: list[StreamConn] = []

        async def one(i: int, stalled: bool) -> None:
            tid = task_ids[i % len(task_ids)]
            req = (f"GET /tasks/{tid}/stream HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                   f"Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n").encode()
            async with sem:
                conn = StreamConn(self.stats, req, record, stall=stalled)
                new.append(conn)
                try:
                    if stalled:
                        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                        sock.setblocking(False)
                        await self.loop.sock_connect(sock, (self.host, self.port))
                        await self.loop.create_connection(lambda: conn, sock=sock)
                        # uvloop starts reading after connection_made: stop it here, for good
                        conn.transport.pause_reading()
                    else:
                        await self.loop.create_connection(lambda: conn, self.host, self.port)
                        # Hold the slot until the response head: at most `concurrency` requests
                        # wait for the server at once (a connect completes in the kernel long
                        # before the server accepts, so a connect-only limit can overflow the
                        # listen backlog when the server is slow).
                        try:
                            await asyncio.wait_for(asyncio.shield(conn.headed), head_timeout)
                        except asyncio.TimeoutError:
                            if len(self.stats.errors) < 50:
                                self.stats.errors.append(f"no response head in {head_timeout:g} s")
                except OSError as exc:
                    if len(self.stats.errors) < 50:
                        self.stats.errors.append(f"connect: {exc}")

        await asyncio.gather(*(one(i, i < stall) for i in range(n + stall)))
        want = before_ready + n
        deadline = time.monotonic() + timeout
        while self.stats.ready < want and time.monotonic() < deadline:
            if self.stats.errors and sum(1 for c in new if not c.open) + self.stats.ready >= want + stall:
                break
            await asyncio.sleep(0.02)
        self.streams.extend(new)
        ready = self.stats.ready - before_ready
        return {"requested": n, "ready": ready, "stalled": stall,
                "open_s": round(time.monotonic() - t0, 3)}

    def chunks(self) -> int:
        return sum(c.dechunk.chunks for c in self.streams if c.dechunk is not None)

    def active(self) -> list[StreamConn]:
        return [c for c in self.streams if not c.stall and c.open]

    async def wait_version(self, version: int, timeout: float) -> bool:
        """Wait until every open, reading stream has seen `version`."""
        deadline = time.monotonic() + timeout
        streams = self.active()
        while time.monotonic() < deadline:
            streams = [c for c in streams if c.version < version and c.open]
            if not streams:
                return True
            await asyncio.sleep(0.005)
        return False

    # producing
    def body(self) -> dict:
        self.seq += 1
        return {"progress": self.seq % 100, "message": "bench update",
                "progress_detail": {"t": perf_ns(), "pad": "x" * self.pad}}

    async def new_task(self) -> dict:
        task = await self.producer.create_task("bench")
        task = await self.producer.patch(task["task_id"], {"status": "processing"})
        self.pad = pad_for(task)
        return task

    async def publish_back_to_back(self, task_id: str, seconds: float, inflight: int = 4) -> tuple[int, int]:
        """Closed loop with `inflight` PATCHes outstanding: the server always has work."""
        count, last = 0, 0
        end = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal count, last
            while time.monotonic() < end:
                task = await self.producer.patch(task_id, self.body())
                last = max(last, task["version"])
                count += 1

        await asyncio.gather(*(worker() for _ in range(inflight)))
        return count, last

    async def publish_at_rate(self, task_id: str, rate: float, seconds: float) -> list[tuple[int, int]]:
        """Open loop: the k-th publish starts at t0 + k/rate whatever earlier ones do."""
        published: list[tuple[int, int]] = []   # (version, t_ns)
        pending = set()

        async def one() -> None:
            body = self.body()
            task = await self.producer.patch(task_id, body)
            published.append((task["version"], body["progress_detail"]["t"]))

        count = int(rate * seconds)
        t0 = time.monotonic()
        for k in range(count):
            delay = t0 + k / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.ensure_future(one())
            pending.add(t)
            t.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
        published.sort()
        return published

    def close(self) -> None:
        for c in self.streams:
            c.close()
        self.producer.close()


# --------------------------------------------------------------------------- scenarios


async def scenario_idle(lg: LoadGen, a) -> dict:
    tasks = [(await lg.new_task())["task_id"] for _ in range(a.tasks)]
    warm = await lg.open_streams(tasks, 10, record=False)
    await asyncio.sleep(0.5)
    rss0 = lg.rss()
    opened = await lg.open_streams(tasks, a.n, record=False, timeout=a.timeout)
    await asyncio.sleep(a.settle)
    rss1 = lg.rss()
    still_open = sum(1 for c in lg.streams if c.open)
    ready = opened["ready"]
    return {
        "n": a.n, "ready": ready, "still_open": still_open - warm["ready"], "open_s": opened["open_s"],
        "rss_before": rss0, "rss_after": rss1,
        "rss_per_stream": (rss1 - rss0) / ready if ready else None,
    }


async def scenario_saturation(lg: LoadGen, a) -> dict:
    task = await lg.new_task()
    tid = task["task_id"]
    opened = await lg.open_streams([tid], a.n, record=False, timeout=a.timeout)
    # warm-up: hot code paths, grown buffers
    _, last = await lg.publish_back_to_back(tid, a.warmup)
    await lg.wait_version(last, 15)
    await asyncio.sleep(0.2)
    ev0, c0, s0, t0 = lg.stats.events, lg.cpu(), self_cpu_s(), time.monotonic()
    coal0, ch0, b0, k0 = lg.stats.coalesced, lg.chunks(), system_busy_s(), lg.sys_cpu()
    published, last = await lg.publish_back_to_back(tid, a.duration, a.inflight)
    drained = await lg.wait_version(last, 15)
    ev1, c1, s1, t1 = lg.stats.events, lg.cpu(), self_cpu_s(), time.monotonic()
    chunks, b1, k1 = lg.chunks() - ch0, system_busy_s(), lg.sys_cpu()
    delivered = ev1 - ev0
    wall = t1 - t0
    readers = len(lg.active())
    return {
        "n": a.n, "ready": opened["ready"], "published": published, "delivered": delivered,
        "wall_s": round(wall, 3), "drained": drained,
        "deliveries_per_s": delivered / wall if wall else None,
        "server_cpu_s": c1 - c0, "server_cpu_pct": 100 * (c1 - c0) / wall,
        "cpu_us_per_event": 1e6 * (c1 - c0) / delivered if delivered else None,
        "sys_us_per_event": 1e6 * (k1 - k0) / delivered if delivered else None,
        "loadgen_cpu_pct": 100 * (s1 - s0) / wall,
        "other_cpu_pct": 100 * ((b1 - b0) - (c1 - c0) - (s1 - s0)) / wall,
        "coalesced_fraction": (1 - delivered / (published * readers)) if published and readers else None,
        "versions_skipped": lg.stats.coalesced - coal0,
        "events_per_chunk": delivered / chunks if chunks else None,
    }


def receipt_latencies(streams: list[StreamConn], published: list[tuple[int, int]]):
    """Per published version v: the first and the last moment a stream had v or newer."""
    if not published:
        return [], [], []
    versions = [v for v, _ in published]
    first = {v: None for v in versions}
    last = {v: None for v in versions}
    got = {v: 0 for v in versions}
    every: list[float] = []
    tpub = dict(published)
    for c in streams:
        recv = c.recv
        for k, (v, t, data) in enumerate(recv):
            obj = json.loads(data)
            if obj["version"] != v:
                raise ProtocolViolation(f"id {v} but data version {obj['version']}")
            recv[k] = (v, t, obj["progress_detail"].get("t"))
        j = 0
        for v in versions:
            while j < len(recv) and recv[j][0] < v:
                j += 1
            if j == len(recv):
                break
            t = recv[j][1]
            if recv[j][0] == v and recv[j][2] is not None:
                every.append((t - recv[j][2]) / 1e6)   # the publisher's stamp, parsed from data
            got[v] += 1
            if first[v] is None or t < first[v]:
                first[v] = t
            if last[v] is None or t > last[v]:
                last[v] = t
    n = len(streams)
    firsts = [(first[v] - tpub[v]) / 1e6 for v in versions if first[v] is not None]
    lasts = [(last[v] - tpub[v]) / 1e6 for v in versions if last[v] is not None and got[v] == n]
    return firsts, lasts, every


async def scenario_latency(lg: LoadGen, a) -> dict:
    task = await lg.new_task()
    tid = task["task_id"]
    opened = await lg.open_streams([tid], a.n - a.stall, record=True, stall=a.stall,
                                   timeout=a.timeout)
    out: dict = {"n": a.n, "ready": opened["ready"], "stalled": a.stall, "rate": a.rate,
                 "duration_s": a.duration}
    rss_start = lg.rss()
    if a.stall:
        # Fill the stalled socket's buffers: a burst big enough to reach the server's
        # own buffering (small SO_RCVBUF on the stalled client).
        published, last = await lg.publish_back_to_back(tid, a.prime)
        out["prime_published"] = published
        await lg.wait_version(last, 15)
        out["stalled_socket_after_prime"] = socket_queues(lg)
    # warm-up at the measured rate, not recorded
    await lg.publish_at_rate(tid, a.rate, a.warmup)
    await asyncio.sleep(0.3)
    rss0 = lg.rss()
    ev0, c0, s0, t0 = lg.stats.events, lg.cpu(), self_cpu_s(), time.monotonic()
    b0, k0 = system_busy_s(), lg.sys_cpu()
    published = await lg.publish_at_rate(tid, a.rate, a.duration)
    drained = await lg.wait_version(published[-1][0], 30) if published else False
    ev1, c1, s1, t1 = lg.stats.events, lg.cpu(), self_cpu_s(), time.monotonic()
    b1, k1 = system_busy_s(), lg.sys_cpu()
    rss1 = lg.rss()
    readers = lg.active()
    firsts, lasts, every = receipt_latencies(readers, published)
    out.update({
        "published": len(published), "readers": len(readers), "drained": drained,
        "updates_fully_delivered": len(lasts),
        "first_p50_ms": pct(firsts, 50), "first_p99_ms": pct(firsts, 99), "first_max_ms": max(firsts, default=None),
        "last_p50_ms": pct(lasts, 50), "last_p99_ms": pct(lasts, 99), "last_max_ms": max(lasts, default=None),
        "all_p50_ms": pct(every, 50), "all_p99_ms": pct(every, 99),
        "server_cpu_pct": 100 * (c1 - c0) / (t1 - t0), "loadgen_cpu_pct": 100 * (s1 - s0) / (t1 - t0),
        "other_cpu_pct": 100 * ((b1 - b0) - (c1 - c0) - (s1 - s0)) / (t1 - t0),
        "window_s": round(t1 - t0, 3), "delivered": ev1 - ev0, "server_cpu_s": c1 - c0,
        "cpu_us_per_event": 1e6 * (c1 - c0) / (ev1 - ev0) if ev1 > ev0 else None,
        "sys_us_per_event": 1e6 * (k1 - k0) / (ev1 - ev0) if ev1 > ev0 else None,
        "rss_start": rss_start, "rss_before": rss0, "rss_after": rss1,
    })
    if a.stall:
        out["stalled_socket_end"] = socket_queues(lg)
        out["stalled_still_open"] = sum(1 for c in lg.streams if c.stall and c.open)
        out["stalled_bytes_read"] = sum(c.received for c in lg.streams if c.stall)
    return out


def socket_queues(lg: LoadGen) -> list[dict]:
    """Recv-Q of the stalled client sockets and Send-Q of the server's end (ss -tn)."""
    ports = set()
    for c in lg.streams:
        if c.stall and c.transport is not None:
            sock = c.transport.get_extra_info("sockname")
            if sock:
                ports.add(sock[1])
    out = []
    try:
        text = subprocess.run(["ss", "-tnH", "state", "established"], capture_output=True,
                              text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        rq, sq, local, peer = int(parts[0]), int(parts[1]), parts[2], parts[3]
        lport, pport = int(local.rsplit(":", 1)[1]), int(peer.rsplit(":", 1)[1])
        if lport in ports and pport == lg.port:
            out.append({"side": "client", "recv_q": rq, "send_q": sq})
        elif pport in ports and lport == lg.port:
            out.append({"side": "server", "recv_q": rq, "send_q": sq})
    return out


async def scenario_hold(lg: LoadGen, a) -> dict:
    """Open N streams on an existing task, say READY, hold until stdin closes."""
    opened = await lg.open_streams([a.task_id], a.n, record=False, timeout=a.timeout)
    print(f"READY {opened['ready']}", flush=True)
    await lg.loop.run_in_executor(None, sys.stdin.read)
    await asyncio.sleep(0.2)
    return {"n": a.n, "ready": opened["ready"], "events": lg.stats.events}


SCENARIOS = {"idle": scenario_idle, "saturation": scenario_saturation,
             "latency": scenario_latency, "hold": scenario_hold}


async def amain(a) -> dict:
    lg = LoadGen(a.url, a.server_pid)
    t0 = time.monotonic()
    try:
        result = await SCENARIOS[a.scenario](lg, a)
    finally:
        lg.close()
        await asyncio.sleep(0.05)
    st = lg.stats
    result.update({
        "scenario": a.scenario, "elapsed_s": round(time.monotonic() - t0, 3),
        "errors": st.errors, "statuses": {str(k): v for k, v in st.statuses.items()},
        "events_total": st.events, "pings": st.pings,
    })
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="taskmon SSE load generator")
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--url", required=True)
    p.add_argument("--server-pid", type=int)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--tasks", type=int, default=10, help="idle: streams spread over this many tasks")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--inflight", type=int, default=4, help="saturation: PATCHes outstanding")
    p.add_argument("--stall", type=int, default=0, help="latency: this many streams never read")
    p.add_argument("--prime", type=float, default=2.0, help="stall: burst before measuring")
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--task-id")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    soft, hard = raise_nofile()
    log(f"RLIMIT_NOFILE {soft}/{hard}")
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
