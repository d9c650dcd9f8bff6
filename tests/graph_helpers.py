"""Helpers shared by the graph tests: a real minimal PDF, and following a task's SSE stream."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import anyio
import httpx
from httpx_sse import aconnect_sse


def make_pdf(lines: list[str]) -> bytes:
    """A small valid PDF (one page, Helvetica) whose text is ``lines``, one per line."""

    def escape(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
    for line in lines:
        ops.append(f"({escape(line)}) Tj T*")
    ops.append("ET")
    return pdf_with_content("\n".join(ops).encode("latin-1"))


def pdf_with_content(stream: bytes, *, flate: bool = False) -> bytes:
    """A one-page PDF (Helvetica as /F1) around a content stream (zlib-compressed when ``flate``)."""
    if flate:
        stream = zlib.compress(stream, 9)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d%s >>\nstream\n" % (len(stream), b" /Filter /FlateDecode" if flate else b"") + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


async def follow_stream(base_url: str, task_id: str, *, timeout: float = 15.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every task snapshot of ``task_id`` from version 1 (Last-Event-ID: 0 replays the history),
    until the ``end`` event; returns (snapshots, end data)."""
    snapshots: list[dict[str, Any]] = []
    with anyio.fail_after(timeout):
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as http:
            async with aconnect_sse(http, "GET", f"/tasks/{task_id}/stream", headers={"Last-Event-ID": "0"}) as source:
                assert source.response.status_code == 200
                async for event in source.aiter_sse():
                    if event.event == "task":
                        snapshots.append(json.loads(event.data))
                    elif event.event == "end":
                        return snapshots, json.loads(event.data)
    raise AssertionError("the stream closed without an end event")


def assert_well_ordered(snapshots: list[dict[str, Any]]) -> None:
    """Versions strictly increase, progress never goes back, exactly one terminal snapshot, last."""
    versions = [s["version"] for s in snapshots]
    assert versions == sorted(set(versions)), versions
    progress = [s["progress"] for s in snapshots]
    assert progress == sorted(progress), progress
    terminal = [s for s in snapshots if s["status"] in ("completed", "failed")]
    assert len(terminal) == 1 and terminal[0] is snapshots[-1]


def files_outside(root: Path, data_dir: Path) -> list[Path]:
    """Files under ``root`` that are not under ``data_dir`` (what an upload must never create)."""
    data_dir = data_dir.resolve()
    return [p for p in root.resolve().rglob("*") if p.is_file() and data_dir not in p.parents]
