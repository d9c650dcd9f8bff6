"""Task stores behind one seam, chosen by URL scheme.

The seam is "commit this change atomically and tell me when it is stored", not "save this
snapshot". The TaskManager computes a change (validation, transition rules, version + 1, timing) in
Python, once for every backend; a store then commits it with a compare-and-set on the version:

* ``commit(task, expected, body)`` writes the new snapshot and appends it to the task's durable event
  log in one atomic step, if and only if the stored version is still ``expected`` (``None``: the
  task must not exist yet); otherwise it raises ``Conflict`` and the manager re-reads and retries.
  ``body`` is the snapshot's wire JSON, encoded once by the manager and reused by the event, the
  store row and the HTTP response.
* Memory and sqlite serve one process: the manager holds its lock around read-compute-commit, so a
  conflict cannot happen, and it publishes each change to the local bus itself. sqlite commits in
  groups from one writer thread; ``Ack`` tells when a change is durable.
* Redis (``shared = True``) is the truth for several processes: the compare-and-set is one Lua script
  that also appends to the all-tasks stream, and each process's bus is fed by one reader of that
  stream (``feed``), so every process sees the same events in the same order.

Every method without an ``a`` prefix may be called from any thread and may block briefly; the
``a``-prefixed twins are for the event loop and never block it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Protocol

from ..models import Task, TaskStatus
from ..query import Page, TaskQuery

__all__ = ["Ack", "Conflict", "DONE", "StoreUnavailable", "TaskStore", "open_store"]


class Conflict(Exception):
    """The stored version is not the one the change was computed from (or the task already exists)."""


class StoreUnavailable(Exception):
    """The store cannot be reached now (Redis down, a timeout): retry later; nothing was changed."""


class Ack:
    """When a commit is durable: ``wait()`` from a thread, ``await ack.done()`` on the loop.

    This base is already durable (memory, Redis); sqlite hands out one per group commit."""

    __slots__ = ()

    @property
    def durable(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> None:
        return None

    async def done(self) -> None:
        return None


DONE = Ack()

# What a shared store's reader calls on the loop for each event of any process, in the store's order:
# ("task", snapshot, its wire JSON) or ("removed", the last snapshot, None).
FeedCallback = Callable[[str, Task, str | None], None]


class TaskStore(Protocol):
    shared: bool

    # -- any thread -------------------------------------------------------------------------
    def get(self, task_id: str) -> Task | None: ...

    def commit(self, task: Task, expected: int | None, body: str) -> Ack:
        """Atomically: stored version == expected -> write ``task``, append ``body`` to its event log."""

    def remove(self, tasks: Iterable[Task]) -> list[Task]:
        """Delete these snapshots and their logs (retention); returns those that were still there unchanged."""

    def list(self, query: TaskQuery) -> Page: ...

    def counts(self, query: TaskQuery) -> dict[TaskStatus, int]: ...

    def events(self, task_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        """The held snapshots (version, wire JSON) with version > after, oldest first, at most ``limit``."""

    def live(self) -> list[Task]:
        """Every pending or processing task (for the lease, stale and cancel-grace checks)."""

    def terminal_before(self, cutoff: datetime) -> list[Task]: ...

    def close(self) -> None: ...

    def try_lead(self, name: str, ttl_s: float) -> bool:
        """True when this process may run the sweep ``name`` now (one process at a time on a shared store)."""

    def register_owner(self, owner: str) -> None:
        """This process's job pool id (a shared store keeps it alive while the process runs)."""

    # -- the event loop ---------------------------------------------------------------------
    async def aget(self, task_id: str) -> Task | None: ...

    async def acommit(self, task: Task, expected: int | None, body: str) -> None:
        """``commit``, returning once the change is durable."""

    async def alist(self, query: TaskQuery) -> Page: ...

    async def acounts(self, query: TaskQuery) -> dict[TaskStatus, int]: ...

    async def aevents(self, task_id: str, after: int, limit: int) -> list[tuple[int, str]]: ...

    async def alive(self) -> list[Task]: ...

    async def aping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached (``/readyz``)."""

    async def start(self, feed: FeedCallback) -> None:
        """Called once on the loop when the app starts (the shared store starts its reader)."""

    async def aclose(self) -> None: ...


class LocalStore:
    """The async twins for in-process stores: cheap calls inline, anything that may touch disk in a thread."""

    shared = False

    def get(self, task_id: str) -> Task | None:
        raise NotImplementedError

    def commit(self, task: Task, expected: int | None, body: str) -> Ack:
        raise NotImplementedError

    def list(self, query: TaskQuery) -> Page:
        raise NotImplementedError

    def counts(self, query: TaskQuery) -> dict[TaskStatus, int]:
        raise NotImplementedError

    def events(self, task_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def try_lead(self, name: str, ttl_s: float) -> bool:
        return True  # one process per store: it always leads

    def register_owner(self, owner: str) -> None:
        return None

    def cached(self, task_id: str) -> Task | None | bool:
        """The snapshot when it is in memory, else False (a read would touch disk)."""
        return False

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(fn, *args)

    async def aget(self, task_id: str) -> Task | None:
        hit = self.cached(task_id)
        if hit is not False:
            return hit  # type: ignore[return-value]
        return await self._off_loop(self.get, task_id)

    async def acommit(self, task: Task, expected: int | None, body: str) -> None:
        await self.commit(task, expected, body).done()

    async def alist(self, query: TaskQuery) -> Page:
        return await self._off_loop(self.list, query)

    async def acounts(self, query: TaskQuery) -> dict[TaskStatus, int]:
        return await self._off_loop(self.counts, query)

    async def aevents(self, task_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        return await self._off_loop(self.events, task_id, after, limit)

    def live(self) -> list[Task]:
        raise NotImplementedError

    async def alive(self) -> list[Task]:
        return self.live()  # both local stores keep live tasks in memory

    async def aping(self) -> None:
        return None

    async def start(self, feed: FeedCallback) -> None:
        return None

    async def aclose(self) -> None:
        await self._off_loop(self.close)


def open_store(
    url: str, *, history: int = 256, history_bytes: int = 8 * 1024 * 1024, history_total_bytes: int = 1024 * 1024 * 1024
) -> TaskStore:
    """``memory://``, ``sqlite:///relative/or//absolute/path.db``, ``redis://host:port/db``."""
    if url.startswith("memory://"):
        from .memory import MemoryStore

        return MemoryStore(history=history, history_bytes=history_bytes, total_bytes=history_total_bytes)
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:///"), history=history, history_bytes=history_bytes)
    if url.startswith(("redis://", "rediss://", "unix://")):
        try:
            from .redis import RedisStore  # type: ignore[import-not-found]
        except ImportError:
            raise ValueError("the redis:// store is not available in this build") from None
        return RedisStore(url, history=history, history_bytes=history_bytes)  # type: ignore[no-any-return]
    raise ValueError(f"unsupported store URL scheme: {url.split(':', 1)[0]!r}")


