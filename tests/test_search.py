"""Search, filters, sort and paging pushed down to each store, checked against the reference
(``TaskQuery.apply`` / ``matches``) over the same tasks, made by a real TaskManager on a fake clock.

Every store runs the same suite: add a backend to ``STORE_URLS`` (one line) and it is covered.
"""

from __future__ import annotations

import random
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeClock, updated
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from server.manager import TaskManager
from server.models import Task, TaskStatus
from server.query import DEFAULT_PAGE, SORTS, TaskQuery
from server.stores import open_store
from server.stores import sqlite as sqlite_store
from server.stores.sqlite import SqliteStore

# backend name -> store URL in a scratch directory (a "redis" entry joins here once that store exists)
STORE_URLS: dict[str, Callable[[Path], str]] = {
    "memory": lambda tmp: "memory://",
    "sqlite": lambda tmp: f"sqlite:///{tmp}/search.db",
}

BASE = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
TYPES = ["import_csv", "Resize-Image", "send email", "ÜBER_task"]
MESSAGES = ["", "Loading rows", "step 5/10", "100% done", "Ünïcode ✓"]
METADATA: list[dict[str, Any]] = [
    {},
    {"customer": "acme-0042"},
    {"path": "/tmp/x_y%z", "n": 7},
    {"nested": {"k": ["Deep", 3, None, True]}},
    {"customer": "ACME-0007", "note": "Über"},
]
TEXTS = ["acme", "ACME-00", "acme-0042", "ac", "a", "import", "_csv", "x_y%", "%", "deep", "5/1", "über",
         "ü", "zzz", "DONE", "3", "resize-image", "send e", "boom: disk", "true", "none", "ows"]


# "sqlite-scan": sqlite with every trigram counted as common, so q >= 3 takes the index-ordered
# scan that large stores use for frequent words (small test data would always take the candidates)
VARIANTS = [*sorted(STORE_URLS), "sqlite-scan"]


@contextmanager
def opened(kind: str) -> Iterator[Any]:
    rare = sqlite_store._RARE
    if kind == "sqlite-scan":
        kind, sqlite_store._RARE = "sqlite", 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = open_store(STORE_URLS[kind](Path(tmp)))
            try:
                yield store
            finally:
                store.close()
    finally:
        sqlite_store._RARE = rare


def settle(store: Any) -> None:
    """Everything committed so far is where queries read it (sqlite writes in a thread)."""
    flush = getattr(store, "flush", None)
    if flush is not None:
        flush()


def walk(list_page: Callable[[TaskQuery], Any], query: TaskQuery, between: Callable[[], None] | None = None) -> list[Task]:
    """Every page of a listing, following next_cursor (``between`` runs after each page)."""
    out: list[Task] = []
    current = query
    for _ in range(10_000):
        page = list_page(current)
        out.extend(page.tasks)
        if page.next_cursor is None:
            return out
        assert len(page.tasks) == (query.limit or DEFAULT_PAGE)
        if between is not None:
            between()
        current = replace(query, after=query.decode_cursor(page.next_cursor))
    raise AssertionError("paging did not end")


# -- a generated history: tasks created and changed by the manager on a fake clock -------------

task_plans = st.lists(
    st.tuples(
        st.integers(0, len(TYPES) - 1),
        st.integers(0, len(METADATA) - 1),
        st.integers(0, 5),  # where it ends: pending, processing, completed, failed, failed from pending, processing+msg
        st.integers(0, len(MESSAGES) - 1),
        st.integers(0, 90),  # seconds before it is created
    ),
    min_size=1,
    max_size=14,
)


def build(manager: TaskManager, clock: FakeClock, plans: list[tuple[int, int, int, int, int]], order: random.Random) -> dict[str, Task]:
    latest: dict[str, Task] = {}
    steps: list[tuple[str, int, int]] = []
    for type_i, meta_i, end, msg_i, wait in plans:
        clock.advance(wait)
        task = manager.create_task(TYPES[type_i], METADATA[meta_i])
        latest[task.task_id] = task
        steps.append((task.task_id, end, msg_i))
    order.shuffle(steps)  # changes in another order than creation: updated order differs from created
    for task_id, end, msg_i in steps:
        clock.advance(order.randint(0, 40))
        task = latest[task_id]
        if end in (1, 2, 3, 5):
            task = updated(manager, task_id, status="processing", progress=10, message=MESSAGES[msg_i] or None)
        if end == 2:
            task = manager.complete_task(task_id, {"rows": 1})
        elif end in (3, 4):
            task = manager.fail_task(task_id, "Boom: disk full")
        elif end == 5:
            task = updated(manager, task_id, progress=50, message="half way")
        latest[task_id] = task
    return latest


@st.composite
def queries(draw: st.DrawFn, ids: list[str]) -> TaskQuery:
    q = draw(st.none() | st.sampled_from(TEXTS) | st.sampled_from(ids).flatmap(lambda i: st.integers(1, 36).map(lambda n: i[:n])))
    statuses = draw(st.none() | st.frozensets(st.sampled_from(list(TaskStatus)), min_size=1))
    task_type = draw(st.none() | st.sampled_from([*TYPES, "import"]))
    bounds = st.none() | st.integers(-10, 1500).map(lambda s: BASE + timedelta(seconds=s))
    values = {name: draw(bounds) for name in ("created_after", "created_before", "updated_after", "updated_before")}
    if draw(st.booleans()):
        values = {k: None for k in values}  # most queries have no time range
    return TaskQuery(
        q=q.strip().lower() if q and q.strip() else None,
        statuses=statuses,
        task_type=task_type,
        sort=draw(st.sampled_from(SORTS)),
        limit=draw(st.none() | st.integers(1, 6)),
        **values,
    )


@pytest.mark.parametrize("kind", VARIANTS)
@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans=task_plans, seed=st.integers(0, 2**16), data=st.data())
def test_every_filter_and_sort_matches_the_reference(kind, plans, seed, data):
    with opened(kind) as store:
        clock = FakeClock(BASE)
        manager = TaskManager(store, None, clock=clock)
        latest = build(manager, clock, plans, random.Random(seed))
        settle(store)
        everything = list(latest.values())
        for _ in range(6):
            query = data.draw(queries(sorted(latest)))
            expected = walk(lambda q: q.apply(everything), query)
            got = walk(store.list, query)
            assert [t.task_id for t in got] == [t.task_id for t in expected], query
            assert got == expected  # the latest snapshot of each
            counts = dict.fromkeys(TaskStatus, 0)
            for task in everything:
                if query.matches(task):
                    counts[task.status] += 1
            assert store.counts(query) == counts, query


def _store_and_manager(kind: str, tmp_path: Path) -> tuple[Any, TaskManager, FakeClock]:
    store = open_store(STORE_URLS[kind](tmp_path))
    clock = FakeClock(BASE)
    return store, TaskManager(store, None, clock=clock), clock


@pytest.fixture(params=sorted(STORE_URLS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, TaskManager, FakeClock]]:
    store, manager, clock = _store_and_manager(request.param, tmp_path)
    yield store, manager, clock
    store.close()


def _populate(manager: TaskManager, clock: FakeClock, n: int) -> list[Task]:
    tasks = []
    for i in range(n):
        clock.advance(1)
        task = manager.create_task(TYPES[i % 2], {"i": i})
        if i % 3:
            task = updated(manager, task.task_id, status="processing", progress=i % 100)
        tasks.append(task)
    return tasks


@pytest.mark.parametrize("sort", ["-created", "created"])
def test_paging_by_creation_visits_each_matching_task_once_while_tasks_change(backend, sort):
    """Created order never moves: every task that matches all along is visited exactly once, tasks
    created meanwhile come at most once (ascending: every one of them, they sort last)."""
    store, manager, clock = backend
    start = _populate(manager, clock, 40)
    query = TaskQuery(statuses=frozenset({TaskStatus.PROCESSING}), sort=sort, limit=4)
    rng = random.Random(7)
    created: list[Task] = []

    def meanwhile() -> None:
        for task in rng.sample([t for t in start if t.status is TaskStatus.PROCESSING], 3):
            clock.advance(1)
            manager.update_task(task.task_id, progress=rng.randint(0, 99), message=f"now {rng.random()}")
        clock.advance(1)
        new = manager.create_task("import_csv")
        created.append(updated(manager, new.task_id, status="processing"))

    seen = [t.task_id for t in walk(store.list, query, meanwhile)]
    assert len(seen) == len(set(seen)), "a task came twice"
    matching = {t.task_id for t in start if t.status is TaskStatus.PROCESSING}
    assert matching <= set(seen)
    if sort == "created":
        assert {t.task_id for t in created} <= set(seen)
    assert set(seen) <= matching | {t.task_id for t in created}


@pytest.mark.parametrize("sort", ["-updated", "updated"])
def test_paging_by_update_visits_each_unchanged_task_once(backend, sort):
    """Documented guarantee for updated sorts: a task not changed while paging is visited exactly
    once; a changed one moves (descending: to pages already read; ascending: it may come again)."""
    store, manager, clock = backend
    start = _populate(manager, clock, 30)
    query = TaskQuery(sort=sort, limit=4)
    rng = random.Random(3)
    changed: set[str] = set()

    def meanwhile() -> None:
        live = [t for t in start if t.status is TaskStatus.PROCESSING and t.task_id not in changed]
        for task in rng.sample(live, min(2, len(live))):
            clock.advance(1)
            manager.update_task(task.task_id, progress=99)
            changed.add(task.task_id)

    seen = [t.task_id for t in walk(store.list, query, meanwhile)]
    unchanged = [t.task_id for t in start if t.task_id not in changed]
    assert changed, "the test changed nothing"
    for task_id in unchanged:
        assert seen.count(task_id) == 1
    if sort == "-updated":
        assert len(seen) == len(set(seen))


def test_a_listing_without_limit_is_one_page_of_the_default_size(backend):
    store, manager, _clock = backend
    for _ in range(DEFAULT_PAGE + 3):
        manager.create_task("bulk")
    settle(store)
    page = store.list(TaskQuery())
    assert len(page.tasks) == DEFAULT_PAGE and page.next_cursor is not None
    rest = store.list(TaskQuery(after=TaskQuery().decode_cursor(page.next_cursor)))
    assert len(rest.tasks) == 3 and rest.next_cursor is None


# -- sqlite specifics: the search index, its upgrade, and the plans -------------------------------


def _sqlite(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "s.db")


def test_sqlite_search_index_and_counts_follow_updates_and_removal(tmp_path):
    store = _sqlite(tmp_path)
    try:
        clock = FakeClock(BASE)
        manager = TaskManager(store, None, clock=clock)
        task = manager.create_task("import_csv", {"customer": "Globex"})
        manager.update_task(task.task_id, status="processing", message="Reading Sheet Seven")
        settle(store)
        assert [t.task_id for t in store.list(TaskQuery(q="sheet seven")).tasks] == [task.task_id]
        manager.update_task(task.task_id, message="writing")
        done = manager.complete_task(task.task_id)
        settle(store)
        assert store.list(TaskQuery(q="sheet seven")).tasks == []  # the old text left the index
        assert [t.task_id for t in store.list(TaskQuery(q="globex")).tasks] == [task.task_id]
        assert store.counts(TaskQuery())[TaskStatus.COMPLETED] == 1
        store.remove([done])
        assert store.list(TaskQuery(q="globex")).tasks == []
        assert store.counts(TaskQuery()) == dict.fromkeys(TaskStatus, 0)
        db = sqlite3.connect(tmp_path / "s.db")
        db.execute("INSERT INTO tasks_fts (tasks_fts, rank) VALUES ('integrity-check', 1)")  # raises when out of step
        db.close()
    finally:
        store.close()


def test_sqlite_file_without_search_index_or_counts_is_upgraded_at_open(tmp_path):
    store = _sqlite(tmp_path)
    manager = TaskManager(store, None, clock=FakeClock(BASE))
    old = [manager.create_task("import_csv", {"customer": f"Initech-{i}"}) for i in range(5)]
    for task in old:
        manager.update_task(task.task_id, status="processing")
        manager.complete_task(task.task_id)
    store.close()
    db = sqlite3.connect(tmp_path / "s.db")  # back to the layout before search existed
    db.executescript(
        "DROP TRIGGER tasks_fts_insert; DROP TRIGGER tasks_fts_update; DROP TRIGGER tasks_fts_delete;"
        " DROP TABLE tasks_fts; DROP INDEX tasks_by_sid; ALTER TABLE tasks DROP COLUMN sid;"
        " DROP TRIGGER task_counts_insert; DROP TRIGGER task_counts_update; DROP TRIGGER task_counts_delete;"
        " DROP TABLE task_counts;"
    )
    db.close()

    store = _sqlite(tmp_path)
    try:
        assert [t.task_id for t in store.list(TaskQuery(q="initech-3")).tasks] == [old[3].task_id]
        new = TaskManager(store, None, clock=FakeClock(BASE + timedelta(hours=1))).create_task("x", {"customer": "Initech-9"})
        settle(store)
        found = [t.task_id for t in store.list(TaskQuery(q="initech", sort="created")).tasks]
        assert found == [t.task_id for t in old] + [new.task_id]
        sids = sqlite3.connect(tmp_path / "s.db").execute("SELECT COUNT(DISTINCT sid), COUNT(*) FROM tasks").fetchone()
        assert sids == (6, 6)
        assert store.counts(TaskQuery()) == {TaskStatus.PENDING: 1, TaskStatus.PROCESSING: 0, TaskStatus.COMPLETED: 5, TaskStatus.FAILED: 0}
        assert store.counts(TaskQuery(task_type="import_csv"))[TaskStatus.COMPLETED] == 5
    finally:
        store.close()


PLANNED = [
    TaskQuery(limit=50),
    TaskQuery(sort="-updated", limit=50),
    TaskQuery(statuses=frozenset({TaskStatus.PROCESSING}), limit=50),
    TaskQuery(statuses=frozenset({TaskStatus.PROCESSING, TaskStatus.FAILED}), sort="updated", limit=50),
    TaskQuery(task_type="import_csv", limit=50),
    TaskQuery(task_type="import_csv", statuses=frozenset({TaskStatus.COMPLETED}), sort="-updated", limit=50),
    TaskQuery(created_after=BASE, limit=50),
    TaskQuery(q="customer-0042", statuses=frozenset({TaskStatus.PROCESSING}), limit=50),
]


@pytest.mark.parametrize("query", PLANNED, ids=lambda q: repr(q)[:80])
def test_sqlite_listing_reads_an_index_in_order_never_the_whole_table(tmp_path, query):
    """Structural proof that a filtered page costs its own size (the bench measures the time): every
    statement of a listing and of its next page walks an index in order, none scans the table or
    sorts it (a q query sorts its few candidates only)."""
    store = _sqlite(tmp_path)
    try:
        manager = TaskManager(store, None, clock=FakeClock(BASE))
        for i in range(300):
            task = manager.create_task(["import_csv", "send_email"][i % 2], {"customer": f"customer-{i:04d}"})
            if i % 3 != 2:
                manager.update_task(task.task_id, status="processing")
            if i % 3 == 1:
                manager.complete_task(task.task_id)
        settle(store)
        statements: list[str] = []
        db = store._reader()
        db.set_trace_callback(statements.append)
        page = store.list(query)
        assert page.tasks
        if page.next_cursor:
            store.list(replace(query, after=query.decode_cursor(page.next_cursor)))
        db.set_trace_callback(None)
        listing = [s for s in statements if "SELECT body" in s or "SELECT t.body" in s]
        assert listing
        for sql in listing:
            plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql).fetchall())
            # an index walked in order stops at LIMIT; a table scan or a sort would read every row
            assert not re.search(r"SCAN (tasks|t)\b(?! USING (COVERING )?INDEX)", plan), plan
            if query.q is None:
                assert "TEMP B-TREE" not in plan, plan
            else:
                assert "tasks_fts" in plan and "SEARCH t USING INDEX tasks_by_sid" in plan, plan
    finally:
        store.close()
