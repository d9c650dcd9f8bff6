"""server/retry.py: which failures are retried, how long we wait, and that every retry is reported."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from zep_cloud.core.api_error import ApiError as ZepApiError
from zep_cloud.errors import BadRequestError, UnauthorizedError

from server.retry import (
    RetriesExhausted,
    RetryAborted,
    RetryEvent,
    RetryPolicy,
    acall_with_retry,
    call_with_retry,
    classify,
    parse_retry_after,
)


class _Flaky:
    """Raises the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def _run(fn: Any, policy: RetryPolicy | None = None, rng: float = 0.5) -> tuple[Any, list[RetryEvent], list[float]]:
    events: list[RetryEvent] = []
    waits: list[float] = []
    result = call_with_retry(
        fn,
        operation="add items",
        policy=policy or RetryPolicy(max_attempts=5, base_delay=1.0, max_delay=8.0, jitter=0.5),
        on_retry=events.append,
        sleep=waits.append,
        rng=lambda: rng,
    )
    return result, events, waits


def _zep(status: int, headers: dict[str, str] | None = None) -> ZepApiError:
    return ZepApiError(status_code=status, headers=headers or {}, body={"error": {"message": "x"}})


def test_transient_errors_are_retried_and_each_retry_reported() -> None:
    request = httpx.Request("POST", "http://zep.test/api/v4/batches")
    fn = _Flaky(_zep(503), httpx.ConnectError("refused", request=request), httpx.ReadTimeout("slow", request=request))
    result, events, waits = _run(fn)
    assert result == "ok" and fn.calls == 4
    assert [e.reason for e in events] == ["server error (HTTP 503)", "connection error", "timed out"]
    assert [e.retry for e in events] == [1, 2, 3]
    assert all(e.max_retries == 4 and e.operation == "add items" for e in events)
    # Exponential (1, 2, 4 s ceilings) with half of each randomised; rng=0.5 -> 75 % of the ceiling.
    assert waits == pytest.approx([0.75, 1.5, 3.0])
    assert [e.delay for e in events] == waits
    assert events[0].describe() == "add items: server error (HTTP 503); retry 1/4 in 0.75 s"


def test_jitter_stays_within_its_band() -> None:
    policy = RetryPolicy(base_delay=2.0, max_delay=100.0, jitter=0.5)
    assert policy.backoff(3, rng=lambda: 0.0) == pytest.approx(4.0)  # 8 s ceiling, lowest
    assert policy.backoff(3, rng=lambda: 0.999999) == pytest.approx(8.0, rel=1e-5)
    assert RetryPolicy(base_delay=2.0, max_delay=5.0, jitter=0).backoff(10) == 5.0  # capped


def test_429_waits_at_least_retry_after() -> None:
    fn = _Flaky(_zep(429, {"retry-after": "7"}), _zep(429, {"Retry-After": "0"}))
    _, events, waits = _run(fn)
    assert waits == pytest.approx([7.0, 1.5])  # the server's 7 s beats our 0.75; then backoff
    assert events[0].reason == "rate limited (HTTP 429)"


def test_retry_after_as_http_date() -> None:
    now = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == pytest.approx(30)
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_a_retry_after_longer_than_allowed_fails_instead_of_hanging() -> None:
    fn = _Flaky(_zep(429, {"Retry-After": "3600"}))
    with pytest.raises(RetriesExhausted, match="retry after 3600 s"):
        _run(fn, RetryPolicy(max_retry_after=60))
    assert fn.calls == 1


@pytest.mark.parametrize(
    "error",
    [
        UnauthorizedError(body=None, headers={}),
        BadRequestError(body=None, headers={}),
        _zep(403),
        _zep(404),
        _zep(409),
        ValueError("a bug, not a network problem"),
        httpx.UnsupportedProtocol("ftp://"),
    ],
)
def test_permanent_errors_are_not_retried(error: Exception) -> None:
    fn = _Flaky(error)
    with pytest.raises(type(error)):
        _run(fn)
    assert fn.calls == 1


def test_giving_up_after_max_attempts() -> None:
    fn = _Flaky(*[_zep(502) for _ in range(10)])
    with pytest.raises(RetriesExhausted) as info:
        _run(fn, RetryPolicy(max_attempts=3, base_delay=0.01))
    assert fn.calls == 3
    assert str(info.value) == "add items failed after 3 attempts: server error (HTTP 502)"
    assert isinstance(info.value.__cause__, ZepApiError)


def test_a_sleep_that_reports_a_stop_aborts() -> None:
    fn = _Flaky(_zep(503), _zep(503))
    with pytest.raises(RetryAborted):
        call_with_retry(fn, operation="get batch", policy=RetryPolicy(), sleep=lambda _: True)
    assert fn.calls == 1


def test_classify_httpx_status_errors() -> None:
    request = httpx.Request("GET", "http://x")
    busy = httpx.HTTPStatusError("busy", request=request, response=httpx.Response(429, headers={"Retry-After": "2"}, request=request))
    assert classify(busy) is not None and classify(busy).retry_after == 2.0  # type: ignore[union-attr]
    gone = httpx.HTTPStatusError("gone", request=request, response=httpx.Response(410, request=request))
    assert classify(gone) is None
    assert classify(_zep(408)) is not None


@pytest.mark.parametrize("kwargs", [{"max_attempts": 0}, {"base_delay": -1}, {"jitter": 1.5}])
def test_policy_is_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


class _Clock:
    """A fake monotonic clock that the fake sleep moves forward."""

    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []

    def sleep(self, delay: float) -> None:
        self.waits.append(delay)
        self.now += delay


def test_a_deadline_bounds_unlimited_attempts_with_a_last_attempt_at_the_deadline() -> None:
    clock = _Clock()
    fn = _Flaky(*[_zep(503) for _ in range(100)])
    policy = RetryPolicy(max_attempts=None, base_delay=1.0, max_delay=4.0, jitter=0)
    with pytest.raises(RetriesExhausted, match="deadline reached"):
        call_with_retry(fn, operation="finish task", policy=policy, sleep=clock.sleep, clock=lambda: clock.now,
                        deadline=10.0)
    assert clock.waits == [1.0, 2.0, 4.0, 3.0]  # the last wait is cut to end at the deadline
    assert fn.calls == 5


def test_without_a_limit_the_event_has_no_maximum() -> None:
    events: list[RetryEvent] = []
    clock = _Clock()
    fn = _Flaky(_zep(503), _zep(502))
    policy = RetryPolicy(max_attempts=None, base_delay=0.5, jitter=0)
    assert call_with_retry(fn, operation="progress", policy=policy, on_retry=events.append, sleep=clock.sleep) == "ok"
    assert [e.max_retries for e in events] == [None, None]
    assert events[1].describe() == "progress: server error (HTTP 502); retry 2 in 1 s"


@pytest.mark.anyio
async def test_the_async_variant_follows_the_same_plan() -> None:
    waits: list[float] = []
    calls = 0

    async def fn() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise httpx.ConnectError("refused")
        return "ok"

    async def sleep(delay: float) -> bool:
        waits.append(delay)
        return False

    policy = RetryPolicy(base_delay=1.0, jitter=0)
    assert await acall_with_retry(fn, operation="create task", policy=policy, sleep=sleep) == "ok"
    assert waits == [1.0, 2.0]

    async def stop(delay: float) -> bool:
        return True

    calls = 0
    with pytest.raises(RetryAborted):
        await acall_with_retry(fn, operation="create task", policy=policy, sleep=stop)
    assert calls == 1
