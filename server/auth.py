"""Bearer tokens: TASKMON_API_TOKEN guards changes, TASKMON_READ_TOKEN guards reads and streams,
and per-task read tokens grant one task's snapshot and stream.

Where a token may be given:

- the API token: ``Authorization: Bearer`` only (never a query parameter: URLs end up in logs,
  histories and Referer headers);
- the read token: the header, or ``?access_token=`` (EventSource cannot send headers);
- a task token: the header or ``?access_token=``, for that task's ``GET /api/graph/task/{id}``
  and ``/tasks/{id}/stream`` only.

A task token is ``tm1.<task_id>.<expires, unix seconds>.<HMAC-SHA256, base64url>``, signed with
TASKMON_SECRET, else the read token, else the API token (else a random per-process key, so links
die with the process). Minted by ``POST /api/tasks/{task_id}/token`` (producer token required).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from .bodies import read_json
from .errors import ApiError
from .models import TaskNotFoundError, is_task_id
from .settings import Settings

__all__ = [
    "auth_routes",
    "check_read",
    "check_write",
    "mint_task_token",
    "require_api_token",
    "require_read_token",
    "require_write",
    "verify_task_token",
]

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="taskmon"'}
_PREFIX = "tm1"
_PROCESS_KEY = secrets.token_bytes(32)
Clock = Callable[[], float]


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(given: str | None, expected: str | None) -> bool:
    return given is not None and expected is not None and hmac.compare_digest(given.encode(), expected.encode())


def _key(settings: Settings) -> bytes:
    secret = settings.secret or settings.read_token or settings.api_token
    return secret.encode() if secret else _PROCESS_KEY


def _signature(settings: Settings, task_id: str, expires: int) -> str:
    digest = hmac.new(_key(settings), f"{_PREFIX}.{task_id}.{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def mint_task_token(settings: Settings, task_id: str, ttl_s: int, now: Clock = time.time) -> tuple[str, int]:
    """(token, expires at in unix seconds) granting reads of ``task_id`` for ``ttl_s`` seconds."""
    expires = int(now()) + ttl_s
    return f"{_PREFIX}.{task_id}.{expires}.{_signature(settings, task_id, expires)}", expires


def verify_task_token(settings: Settings, token: str | None, task_id: str | None, now: Clock = time.time) -> bool:
    """True only for an unexpired token signed by this server for exactly ``task_id``."""
    if token is None or task_id is None or not token.startswith(_PREFIX + "."):
        return False
    parts = token.split(".")
    if len(parts) != 4:
        return False
    _, token_task, raw_expires, signature = parts
    if token_task != task_id or not (raw_expires.isascii() and raw_expires.isdigit() and len(raw_expires) < 12):
        return False
    expires = int(raw_expires)
    if not hmac.compare_digest(signature.encode(), _signature(settings, token_task, expires).encode()):
        return False
    return now() < expires


def check_write(settings: Settings, headers: Mapping[str, str]) -> str | None:
    """None when allowed, else the reason."""
    if settings.api_token is None:
        return None
    if _matches(_bearer(headers), settings.api_token):
        return None
    return "a valid API token is required (Authorization: Bearer <token>)"


def check_read(
    settings: Settings, headers: Mapping[str, str], query: Mapping[str, str], task_id: str | None = None
) -> str | None:
    """None when allowed, else the reason (see the module docstring for which token goes where)."""
    if settings.read_token is None:
        return None
    header, in_query = _bearer(headers), query.get("access_token")
    if _matches(header, settings.read_token) or _matches(header, settings.api_token):
        return None
    if _matches(in_query, settings.read_token):
        return None
    if verify_task_token(settings, header, task_id) or verify_task_token(settings, in_query, task_id):
        return None
    return "a valid read token is required (Authorization: Bearer <token> or ?access_token=)"


def require_api_token(request: Request) -> None:
    require_write(request.app.state.settings, request.headers)


def require_write(settings: Settings, headers: Mapping[str, str]) -> None:
    """The 401 ApiError unless ``headers`` carry the API token (or none is configured)."""
    reason = check_write(settings, headers)
    if reason:
        raise ApiError(401, reason, headers=_CHALLENGE)


def require_read_token(request: Request) -> None:
    """For a route with a ``{task_id}`` parameter, a token for that task is enough."""
    task_id = request.path_params.get("task_id")
    reason = check_read(request.app.state.settings, request.headers, request.query_params, task_id)
    if reason:
        raise ApiError(401, reason, headers=_CHALLENGE)


async def task_token(request: Request) -> JSONResponse:
    """``POST /api/tasks/{task_id}/token``, optional body ``{"ttl_s": N}`` (1..TASKMON_TASK_TOKEN_TTL_S)."""
    require_api_token(request)
    settings: Settings = request.app.state.settings
    task_id = request.path_params["task_id"]
    if not is_task_id(task_id) or request.app.state.manager.get_task(task_id) is None:
        raise TaskNotFoundError(task_id)
    ttl = settings.task_token_ttl_s
    if request.headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in request.headers:
        body = await read_json(request)
        unknown = sorted(set(body) - {"ttl_s"})
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(unknown)}; allowed: ttl_s")
        raw = body.get("ttl_s", ttl)
        if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= settings.task_token_ttl_s:
            raise ApiError(400, f"ttl_s must be an integer between 1 and {settings.task_token_ttl_s}")
        ttl = raw
    token, expires = mint_task_token(settings, task_id, ttl)
    expires_at = datetime.fromtimestamp(expires, UTC).isoformat()
    return JSONResponse({"success": True, "data": {"task_id": task_id, "token": token, "expires_at": expires_at}})


def auth_routes() -> list[BaseRoute]:
    return [Route("/api/tasks/{task_id}/token", task_token, methods=["POST"])]
