"""The task object of PROTOCOL.md: keys, formats, lifecycle table, id checks."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from conftest import MIROFISH_KEYS, TASK_KEYS
from server.models import TRANSITIONS, Task, TaskStatus, is_task_id

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

