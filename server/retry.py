"""Retries with exponential backoff and jitter for calls to remote services.

Transient failures are retried: HTTP 429 (waiting at least its ``Retry-After``), 408, any 5xx,
connection errors and timeouts. Everything else, in particular 4xx answers such as 400, 401, 403
and 404, fails at once: asking again cannot help. Every retry is announced through ``on_retry``
before the wait, so a job can show it in its task's message and progress_detail.

A call gives up after ``policy.max_attempts`` attempts (None: no limit) or, when a ``deadline`` (seconds
from the first attempt) is given, once it has passed: the last wait is cut short so one final attempt
happens at the deadline. ``call_with_retry`` waits with a blocking sleep, ``acall_with_retry`` (for
coroutines) with an awaitable one; both decide through the same ``plan_retry``.

Errors are classified by duck typing (an int ``status_code`` attribute and a ``headers`` mapping,
as the zep-cloud SDK's ``ApiError`` and ``httpx.HTTPStatusError.response`` carry), so this module
does not depend on any client library except httpx's exception types.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import httpx

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int | None = 5  # first try included; None: until the deadline (or forever)
    base_delay: float = 0.5  # seconds before the first retry (before jitter)
    max_delay: float = 30.0  # cap of the exponential part
    max_retry_after: float = 120.0  # a longer Retry-After is not waited for: the call fails
    jitter: float = 0.5  # fraction of the delay that is randomised (0 = none, 1 = full jitter)

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("delays must not be negative")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def backoff(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        """Delay before retry number ``retry`` (1-based): exponential, capped, jittered."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** (retry - 1)))
        return ceiling * (1 - self.jitter) + ceiling * self.jitter * rng()


@dataclass(frozen=True)
class Transient:
    """Why a failure is worth retrying, and how long the server asked us to wait."""

    reason: str
    retry_after: float | None = None


@dataclass(frozen=True)
class RetryEvent:
    operation: str
    retry: int  # 1 for the first retry
    max_retries: int | None  # None: bounded by a deadline only
    delay: float  # seconds until the next attempt
    reason: str

    def describe(self) -> str:
        delay = f"{self.delay:.1f}" if self.delay >= 10 else f"{self.delay:.2g}"
        of = "" if self.max_retries is None else f"/{self.max_retries}"
        return f"{self.operation}: {self.reason}; retry {self.retry}{of} in {delay} s"


class RetriesExhausted(Exception):
    """A transient failure that persisted through every attempt (the cause is ``__cause__``)."""

    def __init__(self, operation: str, attempts: int, reason: str) -> None:
        super().__init__(f"{operation} failed after {attempts} attempts: {reason}")
        self.operation = operation
        self.attempts = attempts
        self.reason = reason


class RetryAborted(Exception):
    """The caller asked to stop while waiting for a retry (e.g. shutdown or cancellation)."""


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header value (delta-seconds or an HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def _header(headers: object, name: str) -> str | None:
    if isinstance(headers, httpx.Headers):
        return headers.get(name)
    if isinstance(headers, Mapping):
        for key, value in headers.items():
            if isinstance(key, str) and key.lower() == name.lower():
                return str(value)
    return None


def classify(exc: BaseException) -> Transient | None:
    """A Transient when ``exc`` is worth retrying, else None."""
    if isinstance(exc, httpx.HTTPStatusError):
        status, headers = exc.response.status_code, exc.response.headers
    else:
        status, headers = getattr(exc, "status_code", None), getattr(exc, "headers", None)
    if isinstance(status, int) and not isinstance(status, bool):
        if status == 429:
            return Transient("rate limited (HTTP 429)", parse_retry_after(_header(headers, "retry-after")))
        if status == 408 or status >= 500:
            return Transient(f"server error (HTTP {status})", parse_retry_after(_header(headers, "retry-after")))
        return None
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return Transient("timed out")
    if isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError, ConnectionError)):
        return Transient("connection error")
    return None


@dataclass(frozen=True)
class Retrier:
    """A policy plus where retries are reported and how the wait happens, for one job or request."""

    policy: RetryPolicy = RetryPolicy()
    on_retry: Callable[[RetryEvent], None] | None = None
    sleep: Callable[[float], object] = time.sleep
    rng: Callable[[], float] = random.random

    def call(self, operation: str, fn: Callable[[], T]) -> T:
        return call_with_retry(
            fn, operation=operation, policy=self.policy, on_retry=self.on_retry, sleep=self.sleep, rng=self.rng
        )


def plan_retry(
    exc: Exception,
    *,
    operation: str,
    attempt: int,
    policy: RetryPolicy,
    remaining: float | None = None,
    rng: Callable[[], float] = random.random,
) -> RetryEvent | None:
    """The retry after attempt number ``attempt`` failed with ``exc``: None when ``exc`` is not
    transient (the caller re-raises it); RetriesExhausted when attempts, the allowed Retry-After or the
    deadline (``remaining`` seconds left) are used up. Logs the retry and returns its event."""
    transient = classify(exc)
    if transient is None:
        return None
    max_retries = None if policy.max_attempts is None else policy.max_attempts - 1
    if max_retries is not None and attempt > max_retries:
        raise RetriesExhausted(operation, attempt, transient.reason) from exc
    if transient.retry_after is not None and transient.retry_after > policy.max_retry_after:
        raise RetriesExhausted(operation, attempt, f"{transient.reason}, retry after {transient.retry_after:.0f} s") from exc
    if remaining is not None and remaining <= 0:
        raise RetriesExhausted(operation, attempt, f"{transient.reason}, deadline reached") from exc
    delay = policy.backoff(attempt, rng)
    if transient.retry_after is not None:
        delay = max(delay, transient.retry_after)
    if remaining is not None:
        delay = min(delay, remaining)  # one last attempt at the deadline
    logger.info(
        "retrying after a transient failure",
        extra={"operation": operation, "retry": attempt, "delay_s": round(delay, 3), "reason": transient.reason},
    )
    return RetryEvent(operation, attempt, max_retries, delay, transient.reason)


def call_with_retry(
    fn: Callable[[], T],
    *,
    operation: str,
    policy: RetryPolicy,
    on_retry: Callable[[RetryEvent], None] | None = None,
    sleep: Callable[[float], object] = time.sleep,
    rng: Callable[[], float] = random.random,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient failures per ``policy`` (and ``deadline``).

    ``sleep(delay)`` waits between attempts; when it returns a true value (e.g.
    ``threading.Event.wait`` after the event was set) the wait is treated as a request to stop
    and RetryAborted is raised. Non-transient errors propagate unchanged; a transient error on
    the last attempt becomes RetriesExhausted (chained to the original error).
    """
    end = None if deadline is None else clock() + deadline
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            remaining = None if end is None else end - clock()
            event = plan_retry(exc, operation=operation, attempt=attempt, policy=policy, remaining=remaining, rng=rng)
            if event is None:
                raise
            if on_retry is not None:
                on_retry(event)
            if sleep(event.delay):
                raise RetryAborted(operation) from exc
            attempt += 1


async def acall_with_retry(
    fn: Callable[[], Awaitable[T]],
    *,
    operation: str,
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[object]],
    on_retry: Callable[[RetryEvent], None] | None = None,
    rng: Callable[[], float] = random.random,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``call_with_retry`` for a coroutine function; ``sleep`` is awaited (true result: RetryAborted)."""
    end = None if deadline is None else clock() + deadline
    attempt = 1
    while True:
        try:
            return await fn()
        except Exception as exc:
            remaining = None if end is None else end - clock()
            event = plan_retry(exc, operation=operation, attempt=attempt, policy=policy, remaining=remaining, rng=rng)
            if event is None:
                raise
            if on_retry is not None:
                on_retry(event)
            if await sleep(event.delay):
                raise RetryAborted(operation) from exc
            attempt += 1
