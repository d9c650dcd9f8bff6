"""Issue 11, rows 2, 4, 5: huge and slow headers, idle-socket floods, expanding PDFs and
quadratic graph builds, each reproduced (bounded, loopback) against the real code."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import anyio
import httpx
import pytest
from conftest import free_port
from graph_helpers import make_pdf, pdf_with_content

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.app import create_app
from server.cli import Server, uvicorn_config
from server.connections import limited_protocol
from server.graph.backends import LocalBackend
from server.graph.text import TextBudget, TextTooLarge, extract_pdf, split_text

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
MAX_CONNECTIONS = 40
MAX_HEADER = 16 * 1024


# ------------------------------------------------------------------ a real `taskmon serve`


class Served:
    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    async def healthz(self) -> int:
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as http:
            return (await http.get("/healthz")).status_code


@asynccontextmanager
async def taskmon_serve(tmp_path: Path, *args: str, stderr: Path | None = None, **env: str) -> AsyncIterator[Served]:
    """A real ``taskmon serve`` process (this worktree's code) on a free loopback port."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMON_", "ZEP_"))}
    environ.update({"PYTHONPATH": str(ROOT), **env})
    cmd = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--store", "memory://", "--data-dir", str(tmp_path / "data"), *args]
    err = stderr.open("wb") if stderr is not None else subprocess.DEVNULL
    try:
        process = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.DEVNULL, stderr=err)
    finally:
        if stderr is not None:
            err.close()  # type: ignore[union-attr]
    served = Served(process, port)
    try:
        with anyio.fail_after(20):
            while True:
                assert process.poll() is None, "taskmon serve exited during start-up"
                with suppress(httpx.TransportError):
                    if await served.healthz() == 200:
                        break
                await anyio.sleep(0.05)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(65536)
    except ConnectionError:
        return b""


LIMIT_ENV = {
    "TASKMON_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "TASKMON_MAX_HEADER_BYTES": str(MAX_HEADER),
    "TASKMON_HEADER_TIMEOUT_S": "1",
}


async def test_huge_headers_are_431_and_cost_no_memory(tmp_path):
    async with taskmon_serve(tmp_path, **LIMIT_ENV) as srv:
        # Just over the limit, then stop sending: the answer is a clear 431 JSON.
        reader, writer = await _open(srv.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * (MAX_HEADER + 1024))
        await writer.drain()
        with anyio.fail_after(10):
            answer = await _read_all(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["success"] is False

        # Malformed HTTP: the JSON envelope too.
        reader, writer = await _open(srv.port)
        writer.write(b"GET /\x00 HTTP/9\r\n\r\n")
        await writer.drain()
        with anyio.fail_after(10):
            answer = await _read_all(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b"content-type: application/json" in answer.lower()
        assert "malformed" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]

        # Five clients each trying to send a 50 MiB unterminated header: cut off early.
        before = srv.rss_kb()
        chunk = b"a" * 65536

        async def flood() -> int:
            reader, writer = await _open(srv.port)
            sent = 0
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
                while sent < 50 * 1024 * 1024:
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)
            except ConnectionError:
                pass
            finally:
                writer.close()
            return sent

        sent: list[int] = []
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(lambda: _collect(sent, flood))
        assert all(n < 50 * 1024 * 1024 for n in sent), sent  # the server hung up long before 50 MiB
        grown_mb = (srv.rss_kb() - before) / 1024
        assert grown_mb < 20, f"RSS grew by {grown_mb:.1f} MB"
        assert await srv.healthz() == 200


async def _collect(out: list[int], fn) -> None:  # type: ignore[no-untyped-def]
    out.append(await fn())


async def test_idle_and_half_sent_connections_are_closed_and_healthz_answers(tmp_path):
    async with taskmon_serve(tmp_path, **LIMIT_ENV) as srv:
        baseline = srv.fds()
        flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for index in range(MAX_CONNECTIONS + 20):  # more than the cap
            reader, writer = await _open(srv.port)
            if index % 2:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # never finished
                await writer.drain()
            flood.append((reader, writer))
        # Under the flood, a real client still gets through (the oldest waiting socket is evicted).
        assert await srv.healthz() == 200
        assert srv.fds() <= baseline + MAX_CONNECTIONS + 5, (srv.fds(), baseline)
        # Every flood socket is closed by the server within the header deadline (1 s here).
        answers: list[bytes] = []
        with anyio.fail_after(15):
            for reader, writer in flood:
                answers.append(await _read_all(reader))
                writer.close()
        assert any(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers
        assert not any(a and not a.startswith((b"HTTP/1.1 408 ", b"HTTP/1.1 503 ")) for a in answers), answers
        with anyio.fail_after(10):
            while srv.fds() > baseline + 2:
                await anyio.sleep(0.05)
        assert await srv.healthz() == 200


async def test_beyond_the_connection_cap_busy_connections_get_a_clear_503(tmp_path):
    async with taskmon_serve(tmp_path, **LIMIT_ENV) as srv:
        streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            for _ in range(MAX_CONNECTIONS):
                reader, writer = await _open(srv.port)
                writer.write(b"GET /tasks/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                await writer.drain()
                with anyio.fail_after(10):
                    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                streams.append((reader, writer))
            reader, writer = await _open(srv.port)
            with anyio.fail_after(10):
                answer = await _read_all(reader)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert "too many open connections" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        finally:
            for _, writer in streams:
                writer.close()
        with anyio.fail_after(10):
            while True:
                with suppress(httpx.TransportError):
                    if await srv.healthz() == 200:
                        break
                await anyio.sleep(0.05)


@asynccontextmanager
async def limited_uvicorn(settings, base) -> AsyncIterator[int]:
    """taskmon on a uvicorn thread speaking its connection protocol built on ``base`` (httptools or
    h11); yields the port once the server is up, and checks the thread is gone after it stops."""
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    config.http = limited_protocol(settings, base)
    server = Server(config, app)
    thread = threading.Thread(target=server.run, name="uvicorn-" + base.__name__, daemon=True)
    thread.start()
    try:
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        yield settings.port
    finally:
        server.request_stop()
        await anyio.to_thread.run_sync(thread.join, 10)
    assert not thread.is_alive()


@pytest.mark.parametrize("base", [HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
async def test_connection_limits_hold_with_either_http_implementation(settings, base):
    settings = settings.with_changes(port=free_port(), max_header_bytes=4096, header_timeout_s=0.5, max_connections=10)

    async def answer(request: bytes) -> bytes:
        reader, writer = await _open(port)
        writer.write(request)
        await writer.drain()
        with anyio.fail_after(10):
            data = await _read_all(reader)
        writer.close()
        return data

    async with limited_uvicorn(settings, base) as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:  # keep-alive still works
            assert [(await http.get("/healthz")).status_code for _ in range(3)] == [200, 200, 200]
        assert (await answer(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 8000)).startswith(b"HTTP/1.1 431 ")
        assert (await answer(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Sl")).startswith(b"HTTP/1.1 408 ")
        assert (await answer(b"\x16\x03\x01 not http\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        idle = [await _open(port) for _ in range(15)]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/healthz")).status_code == 200
        for _, writer in idle:
            writer.close()


class _Recorder:
    """A transport that records what reaches the socket, call by call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def writelines(self, chunks) -> None:
        self.calls.append(("writelines", b"".join(chunks)))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str):
        return ("127.0.0.1", 1) if name == "peername" else None


def test_a_patch_answer_goes_out_in_one_write_and_nothing_is_held_back() -> None:
    from server.connections import _HeadWithBody

    head, body = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", b"{}"
    sink = _Recorder()
    transport = _HeadWithBody(sink)  # type: ignore[arg-type]
    transport.write(head)
    assert sink.calls == []  # held for the body
    transport.write(body)
    assert sink.calls == [("writelines", head + body)]
    transport.write(b"more")  # a later chunk is not held
    assert sink.calls[-1] == ("write", b"more")

    sink = _Recorder()
    transport = _HeadWithBody(sink)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # the client waits for it: never held
    assert sink.calls == [("write", b"HTTP/1.1 100 Continue\r\n\r\n")]
    transport.write(head)
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)  # any other use releases the head
    assert sink.calls[-1] == ("write", head)

    sink = _Recorder()
    transport = _HeadWithBody(sink)  # type: ignore[arg-type]
    transport.write(head)
    transport.close()  # e.g. the app failed after the start message: the head still goes first
    assert sink.calls == [("write", head)] and sink.closed


@pytest.mark.parametrize("base", [HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
async def test_patches_pipelined_or_with_expect_100_are_answered_whole_and_in_order(settings, base):
    settings = settings.with_changes(port=free_port())

    def patch(task_id: str, progress: int, extra: bytes = b"") -> tuple[bytes, bytes]:
        body = json.dumps({"progress": progress}).encode()
        head = (f"PATCH /api/tasks/{task_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n").encode() + extra + b"\r\n"
        return head, body

    async def responses(reader: asyncio.StreamReader, n: int) -> list[tuple[int, dict]]:
        out = []
        with anyio.fail_after(10):
            for _ in range(n):
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                out.append((status, json.loads(await reader.readexactly(length))))
        return out

    async with limited_uvicorn(settings, base) as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            task_id = (await http.post("/api/tasks", json={"task_type": "pipelined"})).json()["data"]["task_id"]
        reader, writer = await _open(port)
        writer.write(b"".join(b"".join(patch(task_id, p)) for p in (10, 20, 30)))  # three in one segment
        await writer.drain()
        answers = await responses(reader, 3)
        assert [status for status, _ in answers] == [200, 200, 200]
        assert [a["data"]["progress"] for _, a in answers] == [10, 20, 30]
        assert [a["data"]["version"] for _, a in answers] == [2, 3, 4]

        head, body = patch(task_id, 40, b"Expect: 100-continue\r\n")
        writer.write(head)
        await writer.drain()
        with anyio.fail_after(10):  # the interim answer comes before the body is sent
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
        writer.write(body)
        await writer.drain()
        [(status, answer)] = await responses(reader, 1)
        assert (status, answer["data"]["progress"], answer["data"]["version"]) == (200, 40, 5)
        writer.close()


# ------------------------------------------------------------------ row 4: expanding PDFs


def expanding_pdf(repeats: int, line: str = "All work and no play makes Jack a dull boy.") -> bytes:
    """A one-page PDF whose Flate-compressed content stream repeats a text line ``repeats`` times:
    a few KB on the wire, ``repeats * len(line)`` characters of text."""
    body = b"".join([b"BT /F1 12 Tf 14 TL 72 720 Td\n", (b"(" + line.encode() + b") Tj T*\n") * repeats, b"ET"])
    return pdf_with_content(body, flate=True)


async def test_expanding_pdf_is_413_and_stops_while_extracting(live_server, settings):
    pdf = expanding_pdf(20_000)  # ~880,000 characters of text
    assert len(pdf) < 20_000
    async with live_server(settings.with_changes(max_project_chars=50_000)) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        response = await http.post("/api/graph/project", files={"files": ("bomb.pdf", pdf, "application/pdf")})
        assert response.status_code == 413, response.text
        body = response.json()
        assert body["success"] is False and "50000 characters" in body["error"]
        # The text cap holds for JSON projects too, and a small PDF still works.
        response = await http.post("/api/graph/project", json={"name": "big", "text": "word " * 20_000})
        assert response.status_code == 413
        ok = await http.post("/api/graph/project", files={"files": ("ok.pdf", make_pdf(["Alice met Bob."]), "application/pdf")})
        assert ok.status_code == 201, ok.text


def test_pdf_extraction_is_cut_off_as_the_text_comes() -> None:
    spent: list[int] = []

    class Counting(TextBudget):
        def spend(self, chars: int) -> None:
            spent.append(chars)
            super().spend(chars)

    with pytest.raises(TextTooLarge, match="10000 characters"):
        extract_pdf(expanding_pdf(20_000), Counting(10_000, 60))
    assert sum(spent) <= 10_000 + 100  # stopped at the first fragment over the cap, not after the page


def test_pdf_time_budget_uses_the_clock() -> None:
    now = [0.0]
    budget = TextBudget(10**9, 5.0, clock=lambda: now[0])
    budget.spend(10)
    now[0] = 5.5
    with pytest.raises(TextTooLarge, match="5 s"):
        budget.spend(1)


# ------------------------------------------------------------------ row 5: linear graph builds


def _story(chars: int) -> str:
    sentence = "Marie Curie met Pierre Curie in Paris and Henri Becquerel in London. "
    return (sentence * (chars // len(sentence) + 1))[:chars]


class CountingBackend(LocalBackend):
    """The local backend, counting the work that used to grow with the graph on every batch:
    bytes of graph JSON written and episode ids compared."""

    written = 0

    def _save(self, graph):  # type: ignore[no-untyped-def]
        super()._save(graph)
        self.written += self._path(graph["graph_id"]).stat().st_size


def _build_work(tmp_path: Path, chars: int) -> tuple[int, int]:
    backend = CountingBackend(tmp_path / f"g{chars}")
    chunks = split_text(_story(chars), 100, 10)  # small chunks: where it was quadratic
    graph_id = backend.create_graph("g", "d", None)  # type: ignore[arg-type]
    for start in range(0, len(chunks), backend.max_batch_items):
        backend.submit_batch(graph_id, chunks[start : start + backend.max_batch_items], None)  # type: ignore[arg-type]
    nodes, _ = backend.counts(graph_id, None)  # type: ignore[arg-type]
    assert nodes > 0
    data = backend.graph_data(graph_id, None)  # type: ignore[arg-type]
    final = backend._path(graph_id).stat().st_size
    assert sum(len(n["episode_uuids"]) for n in data["nodes"]) > 0
    return backend.written, final


def test_graph_build_work_is_linear_in_text_size(tmp_path):
    written_1, final_1 = _build_work(tmp_path, 100_000)
    written_2, final_2 = _build_work(tmp_path, 200_000)
    written_4, final_4 = _build_work(tmp_path, 400_000)
    # Every batch rewrote the whole graph before: 2x the text was ~4x the bytes written.
    assert written_2 / written_1 < 2.6, (written_1, written_2)
    assert written_4 / written_2 < 2.6, (written_2, written_4)
    assert written_4 <= 4 * final_4  # a constant factor of the final graph, whatever its size


def test_episode_ids_are_kept_once_per_chunk(tmp_path):
    backend = LocalBackend(tmp_path)
    graph_id = backend.create_graph("g", "d", None)  # type: ignore[arg-type]
    backend.submit_batch(graph_id, ["Marie Curie met Pierre Curie. Marie Curie smiled.", "Marie Curie left."], None)  # type: ignore[arg-type]
    data = backend.graph_data(graph_id, None)  # type: ignore[arg-type]
    marie = next(n for n in data["nodes"] if n["name"] == "Marie Curie")
    assert len(marie["episode_uuids"]) == 2 == len(set(marie["episode_uuids"]))
