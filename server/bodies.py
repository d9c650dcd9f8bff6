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

from .errors import ApiError

__all__ = ["MAX_JSON_BYTES", "limited_stream", "read_body", "read_json"]

logger = logging.getLogger(__name__)

MAX_JSON_BYTES = 1024 * 1024


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes")


def _check_content_length(request: Request, limit: int, too_large: ApiError) -> None:
    raw = request.headers.get("content-length")
    if raw is None:
        return
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
    body = await read_body(request, limit, too_large)
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
