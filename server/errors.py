"""One JSON error envelope for every 4xx/5xx: ``{"success": false, "error": "..."}``.

Starlette's own 404/405, our ApiError, the manager's domain errors and anything unexpected all
end here. A 500 says "internal server error" and nothing more; the traceback goes to the log.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .models import TaskNotFoundError, TaskStateError
from .stores import StoreUnavailable

__all__ = ["ApiError", "error_response", "exception_handlers"]

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """Raise from a route to answer ``status`` with the envelope; ``extra`` keys are added to it."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.extra = extra


def error_response(status: int, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"success": False, "error": message, **extra}, status_code=status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, headers=exc.headers, **exc.extra)


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, "task not found")


async def _conflict(request: Request, exc: Exception) -> Response:
    return error_response(409, str(exc))


async def _unavailable(request: Request, exc: Exception) -> Response:
    logger.warning("store unavailable", extra={"path": request.url.path, "reason": str(exc)})
    return error_response(503, "the task store is not reachable; retry later", headers={"Retry-After": "1"})


_HTTP_MESSAGES = {404: "not found", 405: "method not allowed"}


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = _HTTP_MESSAGES.get(exc.status_code) or str(exc.detail)
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, message, headers=headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    logger.error(
        "unhandled error", exc_info=exc, extra={"path": request.url.path, "method": request.method}
    )
    return error_response(500, "internal server error")


exception_handlers: dict[Any, Any] = {
    ApiError: _api_error,
    TaskNotFoundError: _not_found,
    TaskStateError: _conflict,
    StoreUnavailable: _unavailable,
    HTTPException: _http_exception,
    Exception: _server_error,
}
