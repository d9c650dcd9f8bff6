"""Which tasks a listing, a count or an all-tasks stream is about: one parsed, validated query.

``TaskQuery.from_params`` turns query-string text into a query (ValueError names the bad parameter);
``matches`` is the reference predicate: the memory store filters with it, the all-tasks stream
decides with it which live changes a client sees, and the sqlite/redis stores push the same
filter down to their indexes (their contract tests compare them against ``matches``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from .models import Task, TaskStatus

__all__ = ["MAX_LIST_LIMIT", "DEFAULT_PAGE", "SORTS", "Page", "TaskQuery", "parse_limit", "parse_status"]

MAX_LIST_LIMIT = 1000
DEFAULT_PAGE = 1000  # a listing without `limit` returns at most this many (then `next_cursor` says more)
MAX_Q = 200
SORTS = ("-created", "created", "-updated", "updated")
_PARAMS = (
    "q",
    "status",
    "task_type",
    "created_after",
    "created_before",
    "updated_after",
    "updated_before",
    "sort",
    "cursor",
    "limit",
)


def parse_status(value: Any) -> TaskStatus:
    if isinstance(value, TaskStatus):
        return value
    try:
        return TaskStatus(value)
    except ValueError:
        allowed = ", ".join(s.value for s in TaskStatus)
        raise ValueError(f"status must be one of: {allowed}") from None


def parse_limit(value: Any) -> int:
    """A listing limit, 1..1000, given as an int or as the text of a query parameter."""
    if isinstance(value, str):
        text = value.strip()
        value = int(text) if text.isascii() and text.isdigit() and len(text) < 6 else None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIST_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")
    return value


def _parse_time(name: str, value: Any) -> datetime:
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00").replace(" ", "+"))
        except ValueError:
            raise ValueError(f"{name} must be an ISO 8601 time with a UTC offset") from None
    if moment.tzinfo is None:
        raise ValueError(f"{name} must be an ISO 8601 time with a UTC offset")
    return moment


def _flatten(value: Any, out: list[str]) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif item is not None and not isinstance(item, bool):
            out.append(str(item))


def search_text(task: Task) -> str:
    """The lower-cased text `q` searches: type, message, error and metadata values (ids match by prefix)."""
    parts = [task.task_type, task.message, task.error or ""]
    _flatten(task.metadata, parts)
    return "\n".join(parts).lower()


def sort_key(task: Task, sort: str) -> tuple[str, str]:
    """The total order of a listing: the sort's time, then the task id (ties across processes)."""
    moment = task.created_at if sort.endswith("created") else task.updated_at
    return (moment.isoformat(timespec="microseconds"), task.task_id)


@dataclass(frozen=True, slots=True)
class Page:
    tasks: list[Task]
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class TaskQuery:
    q: str | None = None
    statuses: frozenset[TaskStatus] | None = None
    task_type: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    updated_after: datetime | None = None
    updated_before: datetime | None = None
    sort: str = "-created"
    after: tuple[str, str] | None = None  # the decoded cursor: (sort time, task id) of the last task sent
    limit: int | None = None

    @property
    def descending(self) -> bool:
        return self.sort.startswith("-")

    @property
    def filtered(self) -> bool:
        """True when anything narrows the set (not counting sort/paging)."""
        return any(
            v is not None
            for v in (
                self.q,
                self.statuses,
                self.task_type,
                self.created_after,
                self.created_before,
                self.updated_after,
                self.updated_before,
            )
        )

    @classmethod
    def from_params(cls, params: Mapping[str, str], *, allowed_extra: tuple[str, ...] = ()) -> TaskQuery:
        """Validate query-string parameters; unknown names and bad values are a ValueError."""
        unknown = sorted(set(params) - set(_PARAMS) - set(allowed_extra))
        if unknown:
            raise ValueError(f"unknown query parameter(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        q = params.get("q")
        if q is not None and q.strip():
            if len(q) > MAX_Q:
                raise ValueError(f"q must be at most {MAX_Q} characters")
            values["q"] = q.strip().lower()
        status = params.get("status")
        if status is not None:
            parts = [part.strip() for part in status.split(",")]
            if not all(parts):
                raise ValueError("status must be one or more of: pending, processing, completed, failed (comma-separated)")
            values["statuses"] = frozenset(parse_status(part) for part in parts)
        task_type = params.get("task_type")
        if task_type is not None:
            values["task_type"] = task_type
        for name in ("created_after", "created_before", "updated_after", "updated_before"):
            raw = params.get(name)
            if raw is not None and raw.strip():
                values[name] = _parse_time(name, raw)
        sort = params.get("sort")
        if sort is not None:
            if sort not in SORTS:
                raise ValueError(f"sort must be one of: {', '.join(SORTS)}")
            values["sort"] = sort
        if params.get("limit") is not None:
            values["limit"] = parse_limit(params["limit"])
        query = cls(**values)
        cursor = params.get("cursor")
        if cursor:
            query = replace(query, after=query.decode_cursor(cursor))
        return query

    # -- cursors: opaque to clients, bound to the sort they were made for -----------------------
    def cursor_for(self, task: Task) -> str:
        raw = json.dumps([self.sort, *sort_key(task, self.sort)], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def decode_cursor(self, cursor: str) -> tuple[str, str]:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            sort, moment, task_id = json.loads(raw)
            if not (isinstance(moment, str) and isinstance(task_id, str)):
                raise ValueError
        except (ValueError, binascii.Error, TypeError, UnicodeDecodeError):
            raise ValueError("cursor is not valid (pass back the next_cursor of a listing)") from None
        if sort != self.sort:
            raise ValueError("cursor was made for another sort order")
        return (moment, task_id)

    # -- the reference predicate ---------------------------------------------------------------
    def matches(self, task: Task) -> bool:
        """Every filter except paging."""
        if self.statuses is not None and task.status not in self.statuses:
            return False
        if self.task_type is not None and task.task_type != self.task_type:
            return False
        if self.created_after is not None and not task.created_at > self.created_after:
            return False
        if self.created_before is not None and not task.created_at < self.created_before:
            return False
        if self.updated_after is not None and not task.updated_at > self.updated_after:
            return False
        if self.updated_before is not None and not task.updated_at < self.updated_before:
            return False
        if self.q is not None and not (task.task_id.startswith(self.q) or self.q in search_text(task)):
            return False
        return True

    def past_cursor(self, task: Task) -> bool:
        """True when the task comes after the cursor in this query's order."""
        if self.after is None:
            return True
        key = sort_key(task, self.sort)
        return key < self.after if self.descending else key > self.after

    def page(self, tasks: list[Task], limit: int) -> Page:
        """Cut a sorted list of matching tasks (at most limit + 1 given) into a page."""
        if len(tasks) > limit:
            return Page(tasks[:limit], self.cursor_for(tasks[limit - 1]))
        return Page(tasks, None)

    def apply(self, tasks: list[Task]) -> Page:
        """The reference listing over a plain list: filter, sort, page (the memory store uses it)."""
        limit = self.limit or DEFAULT_PAGE
        chosen = [t for t in tasks if self.matches(t) and self.past_cursor(t)]
        chosen.sort(key=lambda t: sort_key(t, self.sort), reverse=self.descending)
        return self.page(chosen[: limit + 1], limit)
