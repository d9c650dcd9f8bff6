"""Browser protection, as pure ASGI: host allow-list, foreign-origin and content-type checks,
security headers, and the JSON envelope for every error answer.

- ``host_refusal``: called first thing in ``TaskmonApp.__call__``, so streams (served ahead of
  the middleware stack) are covered too. A request whose ``Host`` is not allowed is answered 400:
  a DNS-rebinding page reaches the server under the attacker's name, never under ours. Allowed by
  default: ``localhost``, ``127.0.0.1``, ``[::1]`` and TASKMON_HOST when it is a specific address;
  TASKMON_ALLOWED_HOSTS replaces that list (``*`` allows any host).
- ``SecurityMiddleware`` (outermost of the Starlette stack):
  * a mutating request (POST, PUT, PATCH, DELETE) with an ``Origin`` other than the server's own
    (``Origin``'s host:port equal to ``Host``) or one in TASKMON_CORS_ORIGINS is 403;
  * a request body must be JSON (``application/json`` or ``application/*+json``), multipart only
    on the upload endpoint; otherwise 415 (a cross-site form can only send text/plain,
    urlencoded or multipart without a preflight);
  * every answer carries ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``,
    ``Referrer-Policy: no-referrer`` and a Content-Security-Policy: the page's own (``default-src
    'self'``, ``frame-ancestors 'none'``) on the page and its scripts and styles, ``default-src
    'none'; frame-ancestors 'none'`` on every other answer (JSON, events);
  * an error answer that is not JSON (Starlette's CORS preflight refusal is plain text) is
    rewritten to the ``{"success": false, "error": ...}`` envelope.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .settings import Settings

__all__ = [
    "CSP",
    "API_CSP",
    "PAGE_HEADERS",
    "SECURITY_HEADERS",
    "SecurityMiddleware",
    "allowed_hosts",
    "first_headers",
    "host_refusal",
    "request_refusal",
]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# Every answer that is not the page or one of its files (JSON, events): nothing may load or frame it. Short
# as well as strict: the server checks every header value byte by byte on each answer, the PATCH
# that every progress report is included, and the page's policy was most of those bytes.
API_CSP = "default-src 'none'; frame-ancestors 'none'"


def _security_headers(csp: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"content-security-policy", csp.encode()),
        (b"referrer-policy", b"no-referrer"),
    ]


SECURITY_HEADERS = _security_headers(API_CSP)
PAGE_HEADERS = _security_headers(CSP)  # the page and its files: the page's own policy
# (a script's policy applies to it when it runs as a worker, as the page's stream-worker.js does)
_PAGE_MEDIA = frozenset({"text/html", "text/javascript", "application/javascript", "text/css"})
_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
_WILDCARD_BINDS = ("", "0.0.0.0", "::", "[::]")
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MULTIPART_PATHS = frozenset({"/api/graph/project"})


def _envelope(status: int, message: str) -> JSONResponse:
    return JSONResponse({"success": False, "error": message}, status_code=status)


def _host_name(host: str) -> str:
    """``example.org:8000`` -> ``example.org``; ``[::1]:8000`` -> ``[::1]``; lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@functools.lru_cache(maxsize=16)
def allowed_hosts(settings: Settings) -> frozenset[str]:
    if settings.allowed_hosts:
        return frozenset(_host_name(h) if h != "*" else "*" for h in settings.allowed_hosts)
    names = set(_LOOPBACK)
    bound = settings.host.strip().lower()
    if bound not in _WILDCARD_BINDS:
        names.add(f"[{bound}]" if ":" in bound and not bound.startswith("[") else bound)
    return frozenset(names)


_last_allowed: tuple[Settings | None, frozenset[str]] = (None, frozenset())


def host_refusal(settings: Settings, scope: Scope) -> JSONResponse | None:
    """The 400 answer for a request whose Host is not allowed, else None. On every request: the
    allow-list of the last settings seen is kept (hashing the settings for the cache costs more)."""
    global _last_allowed
    seen, allowed = _last_allowed
    if seen is not settings:
        allowed = allowed_hosts(settings)
        _last_allowed = (settings, allowed)
    if "*" in allowed:
        return None
    host = None
    for name, value in scope["headers"]:
        if name == b"host":
            host = value.decode("latin-1")
            break
    if host is None:
        return _envelope(400, "a Host header is required")
    if _host_name(host) in allowed:
        return None
    return _envelope(400, "this host name is not allowed (TASKMON_ALLOWED_HOSTS)")


def _same_origin(origin: str, host: str | None) -> bool:
    if host is None:
        return False
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(netloc) and netloc.lower() == host.strip().lower()


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def _is_json(media: str) -> bool:
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _has_body(headers: Headers | Mapping[str, str]) -> bool:
    length = headers.get("content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return "transfer-encoding" in headers


def first_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request's headers as a plain dict, the first of a repeated name kept (as Starlette's
    ``Headers.get`` does): the PATCH fast path reads five names once instead of scanning five times."""
    out: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1")
        if key not in out:
            out[key] = value.decode("latin-1")
    return out


def request_refusal(
    scope: Scope, headers: Headers | Mapping[str, str], cors_origins: frozenset[str]
) -> JSONResponse | None:
    """The 403/415 answer for a mutating request from a foreign Origin or with a non-JSON body."""
    method = scope["method"]
    if method not in _MUTATING:
        return None
    origin = headers.get("origin")
    if (
        origin is not None
        and not _same_origin(origin, headers.get("host"))
        and origin not in cors_origins
        and "*" not in cors_origins
    ):
        return _envelope(403, "cross-origin request refused (Origin is not allowed; see TASKMON_CORS_ORIGINS)")
    if _has_body(headers):
        media = _media_type(headers.get("content-type", ""))
        path = route_path(scope)
        if not _is_json(media) and not (media == "multipart/form-data" and path in MULTIPART_PATHS):
            if path in MULTIPART_PATHS:
                return _envelope(415, "send multipart/form-data with 'files', or application/json with 'name' and 'text'")
            return _envelope(415, "unsupported content type; send application/json")
    return None


def route_path(scope: Scope) -> str:
    """The path inside taskmon: under a mount or a root path, ``scope["path"]`` still starts with the
    prefix (``root_path``), which is not part of taskmon's own routes."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _content_type(raw: list[tuple[bytes, bytes]]) -> str:
    for name, value in raw:
        if name.lower() == b"content-type":
            return value.decode("latin-1")
    return ""


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, cors_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.cors_origins = frozenset(cors_origins)

    def _refusal(self, scope: Scope, headers: Headers) -> JSONResponse | None:
        return request_refusal(scope, headers, self.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope, Headers(scope=scope))
        if refusal is not None:
            refusal.headers.update({k.decode(): v.decode() for k, v in SECURITY_HEADERS})
            await refusal(scope, receive, send)
            return

        held: Message | None = None  # a non-JSON error's start message, until its body is in
        body = b""

        async def send_wrapper(message: Message) -> None:
            nonlocal held, body
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", ()))
                media = _media_type(_content_type(raw))
                raw.extend(PAGE_HEADERS if media in _PAGE_MEDIA else SECURITY_HEADERS)  # appended raw: no response of ours sets these
                message["headers"] = raw
                if message["status"] >= 400 and not _is_json(media):
                    held = message
                    return
                await send(message)
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            body = (body + message.get("body", b""))[:1024]  # plain-text errors are short
            if message.get("more_body", False):
                return
            text = body.decode("utf-8", "replace").strip()[:200] or "request refused"
            payload = json.dumps({"success": False, "error": text}, ensure_ascii=False).encode()
            headers = MutableHeaders(scope=held)
            headers["content-type"] = "application/json"
            headers["content-length"] = str(len(payload))
            start, held = held, None
            await send(start)
            await send({"type": "http.response.body", "body": payload})

        await self.app(scope, receive, send_wrapper)
