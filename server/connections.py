"""Connection limits under ``taskmon serve``: uvicorn's HTTP protocol with what it lacks.

uvicorn 0.54 (read in ``uvicorn/protocols/http/{httptools,h11}_impl.py``):

- ``timeout_keep_alive`` is armed only once a response is complete, and any received byte
  cancels it: a connection that never finishes its first request headers has no timeout at all.
- ``limit_concurrency`` is checked when a request's headers are complete (the request is then
  answered 503); connections still sending headers, or idle, are never refused and hold a
  descriptor each.
- httptools has no header size limit; ``h11_max_incomplete_event_size`` bounds h11 only (and
  answers a plain-text 400).

So ``limited_protocol(settings)`` returns a subclass of uvicorn's protocol (httptools when
installed, else h11) that adds, per connection:

- a header deadline (TASKMON_HEADER_TIMEOUT_S) from the connection's start, and again after each
  response, until the next request's headers are complete: idle and half-sent connections are
  closed (408 when something was sent), however slowly the bytes trickle in;
- a header size limit (TASKMON_MAX_HEADER_BYTES): 431 and close;
- a cap on open connections per process (TASKMON_MAX_CONNECTIONS, and never within 128 of the
  open-file limit): a new connection beyond it
  first evicts the oldest connection still waiting for its headers (so an idle-socket flood
  cannot lock out ``/healthz``), and is refused with a 503 only when every connection is busy.

Refusals, and uvicorn's answer to malformed HTTP, are the JSON envelope with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .settings import Settings

__all__ = ["limited_protocol"]

logger = logging.getLogger(__name__)

_SPARE_FDS = 128  # store, logs, job threads' files, the listening socket...
_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def _refusal(status: int, message: str) -> bytes:
    body = json.dumps({"success": False, "error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    return head + body


class _HeadWithBody:
    """The transport uvicorn's request cycle writes a PATCH's answer to: the status line and headers
    (its first write) are held and go out with the body (the next write) in one ``writelines``, one
    syscall instead of two on the producer path. Anything else -- a ``100 Continue``, a close, a
    second body chunk -- lets the held head go first, so order and content never change."""

    __slots__ = ("_head", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.writelines((head, data))
        elif data[:9] == b"HTTP/1.1 " and data[9:12] != b"100":
            self._head = data
        else:
            self._transport.write(data)

    def _release(self) -> None:
        head, self._head = self._head, None
        if head is not None:
            self._transport.write(head)

    def close(self) -> None:
        self._release()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        self._release()  # any other use of the transport sees everything written so far
        return getattr(self._transport, name)


def limited_protocol(settings: Settings, base: Any = AutoHTTPProtocol) -> type[asyncio.Protocol]:
    """``base``: uvicorn's HttpToolsProtocol or H11Protocol (default: what ``http="auto"`` picks)."""
    max_header = settings.max_header_bytes
    header_timeout = settings.header_timeout_s
    # Never more than the descriptors allow (taskmon serve raises the soft limit before this is
    # built): past the fd limit accept() fails and nobody, /healthz included, gets an answer.
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    max_connections = settings.max_connections
    if soft != resource.RLIM_INFINITY:
        max_connections = max(1, min(max_connections, soft - _SPARE_FDS))
    # Connections waiting for request headers, oldest wait first (shared by this server's
    # connections). One sweep timer serves them all, not a timer per request: a connection starts
    # waiting again after every response, so per-connection timers cost two timer operations on
    # every request of the producer path.
    waiting: OrderedDict[int, Any] = OrderedDict()
    tick = min(1.0, header_timeout / 4)
    sweeper: list[asyncio.TimerHandle | None] = [None]

    def sweep(loop: asyncio.AbstractEventLoop) -> None:
        sweeper[0] = None
        cutoff = loop.time() - header_timeout
        while waiting:
            oldest = next(iter(waiting.values()))
            if oldest._since > cutoff:
                break
            oldest._on_deadline()  # leaves `waiting`
        if waiting:
            sweeper[0] = loop.call_later(tick, sweep, loop)

    class LimitedHTTPProtocol(base):  # type: ignore[misc, valid-type]
        _header_bytes = 0
        _since = 0.0
        _refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                victim = next(iter(waiting.values()), None)
                if victim is None:
                    self._refuse(503, "too many open connections; retry later")
                    return
                victim._refuse(503, "the server is at its connection limit; idle connection closed", quiet=True)
            self._await_headers()

        def _await_headers(self) -> None:
            self._header_bytes = 0
            self._since = self.loop.time()
            waiting.pop(id(self), None)
            waiting[id(self)] = self  # to the end: the newest wait
            if sweeper[0] is None:
                sweeper[0] = self.loop.call_later(tick, sweep, self.loop)

        def _headers_done(self) -> None:
            waiting.pop(id(self), None)

        def _on_deadline(self) -> None:
            if self._header_bytes:
                self._refuse(408, f"request headers not received within {header_timeout:g} s")
            else:
                self._refuse(0, "")  # idle: just close

        def _refuse(self, status: int, message: str, *, quiet: bool = False) -> None:
            self._refused = True
            self._headers_done()
            if not self.transport.is_closing():
                if status:
                    self.transport.write(_refusal(status, message))
                self.transport.close()
            if status and not quiet:
                logger.info("connection refused", extra={"status": status, "reason": message})

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if id(self) not in waiting:
                super().data_received(data)  # a body, or a request while a response is running
                return
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:  # the headers were complete: a request cycle started
                self._headers_done()
                return
            if self.transport.is_closing():
                return
            self._header_bytes += len(data)
            if self._header_bytes > max_header:
                self._refuse(431, f"request headers are larger than {max_header} bytes")

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not None and self.scope.get("method") == "PATCH" and cycle.transport is self.transport:
                cycle.transport = _HeadWithBody(self.transport)

        def send_400_response(self, msg: str) -> None:
            """Malformed HTTP: the JSON envelope too, not uvicorn's plain text."""
            self._refuse(400, f"malformed HTTP request ({msg.rstrip('.')})", quiet=True)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not getattr(self, "pipeline", None):  # h11 has none
                self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_done()
            super().connection_lost(exc)

    return LimitedHTTPProtocol
