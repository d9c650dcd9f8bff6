"""Request bodies: size-capped while they are read, and JSON objects parsed without ever a 500.

One place for every endpoint that takes a body (the producer API and the graph endpoints), so a
limit or a parsing fix holds everywhere at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from .errors import ApiError

__all__ = ["MAX_JSON_BYTES", "limited_stream", "parse_json_object", "read_body", "read_json", "receive_body"]

logger = logging.getLogger(__name__)

MAX_JSON_BYTES = 1024 * 1024


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes")


def _check_content_length(request: Request, limit: int, too_large: ApiError) -> None:
    raw = request.headers.get("content-length")
    if raw is not None:
        _check_length_value(raw, limit, too_large)


def _check_length_value(raw: str, limit: int, too_large: ApiError) -> None:
    if not (raw.isascii() and raw.isdigit()):
        raise ApiError(400, "invalid Content-Length header")
    if int(raw) > limit:
        raise too_large


async def limited_stream(request: Request, limit: int, too_large: ApiError | None = None) -> AsyncIterator[bytes]:
    """The body's chunks; raises ``too_large`` (413) as soon as more than ``limit`` bytes come,
    whether or not a Content-Length announced them."""
    error = too_large or _too_large(limit)
    _check_content_length(request, limit, error)
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise error
            yield chunk
    except ClientDisconnect:
        # Not an error of ours: one debug line, and an answer nobody will read (never a 500).
        logger.debug("client disconnected mid-body", extra={"path": request.url.path, "received": total})
        raise ApiError(400, "the client disconnected before the body was complete") from None


async def read_body(request: Request, limit: int, too_large: ApiError | None = None) -> bytes:
    return b"".join([chunk async for chunk in limited_stream(request, limit, too_large)])


async def read_json(request: Request, limit: int = MAX_JSON_BYTES, too_large: ApiError | None = None) -> dict[str, Any]:
    """The body as a JSON object, or a 400/413 ApiError."""
    return parse_json_object(await read_body(request, limit, too_large))


async def receive_body(receive: Receive, content_length: str | None, limit: int = MAX_JSON_BYTES) -> bytes:
    """The body straight from ASGI ``receive`` (the PATCH fast path, which has no Request), with the
    same rules as ``limited_stream``: a bad Content-Length is a 400, more than ``limit`` bytes a 413
    as soon as they come, a client gone mid-body a 400 nobody reads."""
    error = _too_large(limit)
    if content_length is not None:
        _check_length_value(content_length, limit, error)
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise error
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif message["type"] == "http.disconnect":
            logger.debug("client disconnected mid-body", extra={"received": total})
            raise ApiError(400, "the client disconnected before the body was complete")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A body as a JSON object, or a 400 ApiError (never a 500, whatever the bytes)."""
    if not body.strip():
        raise ApiError(400, "request body is empty; a JSON object is required")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body must be a JSON object") from None
    except RecursionError:  # e.g. 100,000 nested arrays: well within the size limit
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data
