"""The task object of PROTOCOL.md: keys, formats, lifecycle table, id checks."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import MIROFISH_KEYS, TASK_KEYS
from server.models import TRANSITIONS, Task, TaskStatus, _iso, is_task_id
from server.wire import encode_json

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}\+00:00$")


def make_task(**changes) -> Task:
    moment = datetime(2026, 11, 27, 18, 51, 17, 123456, tzinfo=UTC)
    values = dict(
        task_id=str(uuid.uuid4()),
        task_type="graph_build",
        status=TaskStatus.PENDING,
        created_at=moment,
        updated_at=moment,
    )
    values.update(changes)
    return Task(**values)


def test_to_dict_has_the_eleven_mirofish_keys_in_order_then_version():
    data = make_task().to_dict()
    assert list(data)[:12] == [*MIROFISH_KEYS, "version"] and list(data) == TASK_KEYS


def test_to_dict_values_and_defaults():
    task = make_task()
    data = task.to_dict()
    assert data == {
        "task_id": task.task_id,
        "task_type": "graph_build",
        "status": "pending",
        "created_at": "2026-11-27T18:51:17.123456+00:00",
        "updated_at": "2026-11-27T18:51:17.123456+00:00",
        "progress": 0,
        "message": "",
        "progress_detail": {},
        "result": None,
        "error": None,
        "metadata": {},
        "version": 1,
        "started_at": None,
        "finished_at": None,
        "rate": None,
        "eta_s": None,
        "stale": False,
        "cancel_requested": False,
        "lease_s": None,
    }
    # the wire form is plain JSON: the status is a string, not an enum repr
    assert json.loads(json.dumps(data)) == data


def test_timestamps_always_carry_microseconds_and_utc_offset():
    # a whole second still prints six fractional digits (fixed-width, sortable, parseable)
    whole = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    data = make_task(created_at=whole, updated_at=whole).to_dict()
    assert data["created_at"] == "2026-01-02T03:04:05.000000+00:00"
    assert ISO_UTC.match(data["updated_at"])


@settings(max_examples=500, deadline=None)
@given(moment=st.datetimes(timezones=st.sampled_from([UTC, timezone.utc, timezone(timedelta(0)), timezone(timedelta(hours=-3))])))
def test_iso_is_isoformat_with_microseconds(moment):
    # _iso looks the text up to the second up for UTC moments: it must agree with isoformat everywhere
    # (years below 1000, whole seconds, zones that are UTC by offset only)
    assert _iso(moment) == moment.isoformat(timespec="microseconds")
    assert _iso(moment) == moment.isoformat(timespec="microseconds")  # the second call reads the cache


def test_from_dict_round_trips_the_wire_form():
    task = make_task(
        status=TaskStatus.FAILED,
        progress=42,
        message="half",
        progress_detail={"batch": 3, "total_batches": 10},
        error="boom",
        metadata={"project_id": "p1", "ünï": "cødé"},
        version=7,
    )
    again = Task.from_dict(json.loads(json.dumps(task.to_dict())))
    assert again == task
    assert again.created_at.utcoffset() == timedelta(0)


def test_task_is_immutable():
    task = make_task()
    with pytest.raises(AttributeError):
        task.progress = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        (TaskStatus.PENDING, False),
        (TaskStatus.PROCESSING, False),
        (TaskStatus.COMPLETED, True),
        (TaskStatus.FAILED, True),
    ],
)
def test_terminal_statuses(status, terminal):
    assert status.is_terminal is terminal
    assert make_task(status=status).is_terminal is terminal


def test_transition_table_is_the_protocol_lifecycle():
    P, R, C, F = TaskStatus.PENDING, TaskStatus.PROCESSING, TaskStatus.COMPLETED, TaskStatus.FAILED
    assert TRANSITIONS[P] == {P, R, F}  # pending -> completed is not a transition
    assert TRANSITIONS[R] == {R, C, F}  # never back to pending
    assert TRANSITIONS[C] == set()
    assert TRANSITIONS[F] == set()


def test_status_values_are_the_wire_strings():
    assert [s.value for s in TaskStatus] == ["pending", "processing", "completed", "failed"]


@pytest.mark.parametrize(
    "value",
    [
        str(uuid.uuid4()),
        "00000000-0000-4000-8000-000000000000",
    ],
)
def test_is_task_id_accepts_canonical_uuids(value):
    assert is_task_id(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "nope",
        "../etc",
        "../../../../etc/passwd",
        str(uuid.uuid4()).upper(),
        str(uuid.uuid4()).replace("-", ""),
        "{" + str(uuid.uuid4()) + "}",
        "urn:uuid:" + str(uuid.uuid4()),
        " " + str(uuid.uuid4())[1:],
        str(uuid.uuid4())[:-1] + "g",
        str(uuid.uuid4()) + "\n",
    ],
)
def test_is_task_id_refuses_everything_else(value):
    assert not is_task_id(value)



# -- the snapshot's wire JSON, built from its parts -------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_objects = st.dictionaries(st.text(max_size=8), _json_values, max_size=5)
_moments = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(2300, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]),
)
_floats = st.none() | st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(
    task_id=st.text(), task_type=st.text(), status=st.sampled_from(list(TaskStatus)), created=_moments,
    updated=_moments, progress=st.integers(0, 100), message=st.text(), detail=_objects,
    result=st.none() | _objects, error=st.none() | st.text(), metadata=_objects, version=st.integers(1, 2**40),
    started=st.none() | _moments, finished=st.none() | _moments, rate=_floats, eta=_floats,
    cancel=st.booleans(), lease=_floats, stale=st.booleans(),
)
def test_to_json_is_exactly_the_encoded_wire_dict(
    task_id, task_type, status, created, updated, progress, message, detail, result, error, metadata, version,
    started, finished, rate, eta, cancel, lease, stale,
) -> None:
    task = Task(
        task_id=task_id, task_type=task_type, status=status, created_at=created, updated_at=updated,
        progress=progress, message=message, progress_detail=detail, result=result, error=error, metadata=metadata,
        version=version, started_at=started, finished_at=finished, rate=rate, eta_s=eta, cancel_requested=cancel,
        lease_s=lease,
    )
    body = task.to_json(stale=stale)
    assert body == encode_json(task.to_dict(stale=stale))
    assert json.loads(body) == json.loads(json.dumps(task.to_dict(stale=stale)))


def test_to_json_refuses_what_the_encoder_refuses() -> None:
    now = datetime.now(UTC)
    for bad in ({"x": float("nan")}, {"x": object()}):
        task = Task(task_id="t", task_type="x", status=TaskStatus.PENDING, created_at=now, updated_at=now,
                    progress_detail=bad)
        with pytest.raises((ValueError, TypeError)):
            task.to_json()
