"""Soak and churn (issue 11, "Also"; not CI): a real ``taskmon serve --store memory://`` process.

    python -m bench.soak                                   # the full run: 10,000 cycles, 10 minutes
    python -m bench.soak --minutes 1 --cycles 2000         # a short one

1. churn: ``--cycles`` connect/drop cycles (per-task, all-tasks and Last-Event-ID streams, closed
   after the opening or reset mid-stream) leave the server's subscribers, tasks and fds at baseline;
2. steady: ``--streams`` per-task streams, each task updated ``--rate`` times a second, for
   ``--minutes``: the server's RSS is printed every minute (and must stay flat);
3. stalled: ``--stalled`` streams that never read (half all-tasks, half a 256-deep replay) over
   tasks of ~60 KB: RSS per such client must stay under README's documented bound (2 MB).

Exit status 0 when every check held, 1 otherwise. Prints one JSON summary line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.loadgen import proc_cpu_s, proc_rss_bytes
from bench.run import HOST, Server, raise_nofile

KB = 1024
PER_STALLED_CLIENT_BOUND = 2 * 1024 * KB  # README, "Limits and browser protection"


def say(*args: object) -> None:
    print("[soak]", *args, flush=True)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def health(http: httpx.AsyncClient) -> dict:
    return (await http.get("/healthz")).json()


async def tasks_total(http: httpx.AsyncClient) -> int:
    data = (await http.get("/api/tasks/counts")).json()["data"]
    counts = data.get("counts", data) if isinstance(data, dict) else data
    return sum(v for v in counts.values() if isinstance(v, int))


async def wait_for(check, what: str, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    say(f"TIMEOUT waiting for {what}")
    return False


def request(path: str, *headers: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", f"Host: {HOST}", *headers, "", ""]).encode()


# --------------------------------------------------------------------------- 1. churn


async def churn(server: Server, http: httpx.AsyncClient, cycles: int) -> dict:
    task_ids = [(await http.post("/api/tasks", json={"task_type": "churn"})).json()["data"]["task_id"] for _ in range(10)]
    for task_id in task_ids:
        for n in range(5):
            await http.patch(f"/api/tasks/{task_id}", json={"progress": n * 10, "message": f"step {n}"})
    await asyncio.sleep(0.5)
    base = {"streams": (await health(http))["streams"], "tasks": await tasks_total(http), "fds": fds(server.pid)}
    say("churn baseline", base)
    done = 0
    started = time.monotonic()

    async def one(n: int) -> None:
        nonlocal done
        kind = n % 4
        if kind == 0:
            path, headers = "/tasks/stream", ()
        elif kind == 1:
            path, headers = f"/tasks/{task_ids[n % 10]}/stream", ("Last-Event-ID: 1",)
        else:
            path, headers = f"/tasks/{task_ids[n % 10]}/stream", ()
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(request(path, *headers))
        await reader.read(4096)  # the headers and (part of) the opening
        if n % 3 == 0:  # a reset instead of a close
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        done += 1

    sem = asyncio.Semaphore(50)

    async def guarded(n: int) -> None:
        async with sem:
            await one(n)

    await asyncio.gather(*(guarded(n) for n in range(cycles)))
    elapsed = time.monotonic() - started

    async def back() -> bool:
        return (await health(http))["streams"] == base["streams"] and fds(server.pid) <= base["fds"]

    settled = await wait_for(back, "streams and fds back at baseline")
    after = {"streams": (await health(http))["streams"], "tasks": await tasks_total(http), "fds": fds(server.pid)}
    ok = settled and after["tasks"] == base["tasks"]
    say(f"churn: {done} cycles in {elapsed:.1f} s; after", after, "OK" if ok else "FAILED")
    return {"cycles": done, "seconds": round(elapsed, 1), "baseline": base, "after": after, "ok": ok}


# --------------------------------------------------------------------------- 2. steady


class Drain(asyncio.Protocol):
    """A stream reader that only counts bytes."""

    received = 0

    def data_received(self, data: bytes) -> None:
        Drain.received += len(data)


async def steady(server: Server, http: httpx.AsyncClient, streams: int, rate: float, minutes: float) -> dict:
    n_tasks = max(1, streams // 100)
    task_ids = [(await http.post("/api/tasks", json={"task_type": "steady"})).json()["data"]["task_id"] for _ in range(n_tasks)]
    loop = asyncio.get_running_loop()
    transports = []
    for n in range(streams):
        transport, _ = await loop.create_connection(Drain, HOST, server.port)
        transport.write(request(f"/tasks/{task_ids[n % n_tasks]}/stream"))
        transports.append(transport)
    await wait_for(lambda: _streams_at_least(http, streams), f"{streams} open streams")
    say(f"steady: {streams} streams on {n_tasks} tasks, each task updated {rate:g}/s for {minutes:g} min")
    # The producer is its own process: this one is busy reading the streams.
    counter = multiprocessing.get_context("spawn").Value("q", 0)
    producer = multiprocessing.get_context("spawn").Process(
        target=produce, args=(server.url, task_ids, rate, minutes * 60, counter), daemon=True
    )
    cpu0 = proc_cpu_s(server.pid)
    producer.start()
    started = time.monotonic()
    interval = 60.0 if minutes >= 2 else max(5.0, minutes * 60 / 6)
    samples: list[dict] = []

    def sample() -> None:
        samples.append({"t_s": round(time.monotonic() - started), "rss_kb": proc_rss_bytes(server.pid) // KB,
                        "updates": counter.value, "received_mb": round(Drain.received / 1e6, 1)})
        say("steady", samples[-1])

    while producer.is_alive():
        await asyncio.sleep(0.2)
        if time.monotonic() - started >= interval * (len(samples) + 1):
            sample()
    producer.join()
    sample()
    sent = counter.value
    cpu = proc_cpu_s(server.pid) - cpu0
    for transport in transports:
        transport.close()
    await wait_for(lambda: _streams_below(http, 1), "steady streams closed")
    rss = [s["rss_kb"] for s in samples]
    # flat: after the first sample (warm-up), no sample more than 10 % (or 8 MB) above the first
    flat = len(rss) < 2 or max(rss[1:]) <= max(rss[1] * 1.10, rss[1] + 8 * KB)
    per_stream = sent / n_tasks / (minutes * 60)
    say(f"steady: {sent} updates ({per_stream:.1f}/s per stream), server CPU {cpu:.1f} s; RSS", rss,
        "flat" if flat else "GROWING")
    return {"streams": streams, "updates": sent, "updates_per_s_per_stream": round(per_stream, 1), "server_cpu_s": round(cpu, 1), "samples": samples, "ok": flat}


def produce(url: str, task_ids: list[str], rate: float, seconds: float, sent) -> None:  # type: ignore[no-untyped-def]
    """The producer process: every task updated ``rate`` times a second for ``seconds``."""

    async def run() -> None:
        limits = httpx.Limits(max_connections=len(task_ids))
        async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as http:

            async def one(task_id: str) -> None:
                tick, n = 1.0 / rate, 0
                start = time.monotonic()
                while time.monotonic() - start < seconds:
                    n += 1
                    await http.patch(f"/api/tasks/{task_id}", json={"progress": n % 100, "message": f"tick {n}"})
                    with sent.get_lock():
                        sent.value += 1
                    delay = start + n * tick - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)

            await asyncio.gather(*(one(t) for t in task_ids))

    asyncio.run(run())


async def _streams_at_least(http: httpx.AsyncClient, n: int) -> bool:
    return (await health(http))["streams"] >= n


async def _streams_below(http: httpx.AsyncClient, n: int) -> bool:
    return (await health(http))["streams"] < n


# --------------------------------------------------------------------------- 3. stalled


async def stalled(server: Server, http: httpx.AsyncClient, clients: int) -> dict:
    for n in range(100):
        await http.post("/api/tasks", json={"task_type": "big", "metadata": {"blob": str(n % 10) * (60 * KB)}})
    long_task = (await http.post("/api/tasks", json={"task_type": "long"})).json()["data"]["task_id"]
    for n in range(256):
        await http.patch(f"/api/tasks/{long_task}", json={"progress": n % 100, "progress_detail": {"blob": str(n % 10) * (60 * KB)}})
    await asyncio.sleep(1)
    base = proc_rss_bytes(server.pid) // KB
    socks = []
    for n in range(clients):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((HOST, server.port))
        if n % 2:
            sock.sendall(request(f"/tasks/{long_task}/stream", "Last-Event-ID: 0"))
        else:
            sock.sendall(request("/tasks/stream"))
        socks.append(sock)
    await wait_for(lambda: _streams_at_least(http, clients), f"{clients} stalled streams")
    last, rss = -1, proc_rss_bytes(server.pid) // KB
    while abs(rss - last) > 256:  # until the server has written all it will
        await asyncio.sleep(0.5)
        last, rss = rss, proc_rss_bytes(server.pid) // KB
    per_client = (rss - base) * KB / clients
    served = (await http.get("/healthz")).status_code == 200
    for sock in socks:
        sock.close()
    ok = per_client < PER_STALLED_CLIENT_BOUND and served
    say(f"stalled: {clients} non-reading streams: RSS {base} -> {rss} KB, {per_client / KB:.0f} KB per client "
        f"(bound {PER_STALLED_CLIENT_BOUND // KB} KB); /healthz {'answers' if served else 'FAILED'}")
    return {"clients": clients, "rss_before_kb": base, "rss_after_kb": rss, "kb_per_client": round(per_client / KB), "ok": ok}


async def amain(a: argparse.Namespace) -> dict:
    logdir = Path(tempfile.mkdtemp(prefix="taskmon-soak-"))
    server = Server("taskmon", [], logdir)
    out: dict = {}
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            out["churn"] = await churn(server, http, a.cycles)
            out["steady"] = await steady(server, http, a.streams, a.rate, a.minutes)
            out["stalled"] = await stalled(server, http, a.stalled)
    finally:
        server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the steady phase")
    parser.add_argument("--cycles", type=int, default=10_000, help="connect/drop cycles")
    parser.add_argument("--streams", type=int, default=1000, help="streams in the steady phase")
    parser.add_argument("--rate", type=float, default=20.0, help="updates per second per stream's task")
    parser.add_argument("--stalled", type=int, default=300, help="non-reading streams")
    a = parser.parse_args(argv)
    raise_nofile()
    out = asyncio.run(amain(a))
    print(json.dumps(out))
    return 0 if all(part["ok"] for part in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
