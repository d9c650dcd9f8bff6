"""Bearer tokens: TASKMON_API_TOKEN guards changes, TASKMON_READ_TOKEN guards reads and streams."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from .errors import ApiError
from .settings import Settings

__all__ = ["check_read", "check_write", "require_api_token", "require_read_token"]

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="taskmon"'}


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(given: str | None, expected: str | None) -> bool:
    return given is not None and expected is not None and hmac.compare_digest(given.encode(), expected.encode())


def check_write(settings: Settings, headers: Mapping[str, str]) -> str | None:
    """None when allowed, else the reason."""
    if settings.api_token is None:
        return None
    if _matches(_bearer(headers), settings.api_token):
        return None
    return "a valid API token is required (Authorization: Bearer <token>)"


def check_read(settings: Settings, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """None when allowed. The read token, or the API token, in the header or ``access_token`` query."""
    if settings.read_token is None:
        return None
    given = [_bearer(headers), query.get("access_token")]
    if any(_matches(token, settings.read_token) or _matches(token, settings.api_token) for token in given):
        return None
    return "a valid read token is required (Authorization: Bearer <token> or ?access_token=)"


def require_api_token(request) -> None:  # type: ignore[no-untyped-def]
    reason = check_write(request.app.state.settings, request.headers)
    if reason:
        raise ApiError(401, reason, headers=_CHALLENGE)


def require_read_token(request) -> None:  # type: ignore[no-untyped-def]
    reason = check_read(request.app.state.settings, request.headers, request.query_params)
    if reason:
        raise ApiError(401, reason, headers=_CHALLENGE)
