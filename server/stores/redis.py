"""The shared store: Redis (>= 7, or Valkey) as the one truth for several taskmon processes.

Layout (every key prefix is defined once, below). Per task, hash-tagged ``{t:<id>}`` so that a task's
keys always live in one Cluster slot:

* ``taskmon:{t:<id>}:task`` -- a hash: ``body`` (the wire JSON the manager encoded), ``internal``
  (owner / samples / cancel_at), ``v``, ``status``, ``type``, ``created``, ``updated`` (epoch µs),
  ``lb`` (the log's bytes).
* ``taskmon:{t:<id>}:log`` -- a Redis Stream of the task's snapshots whose entry ids are
  ``<version>-0`` (as Centrifugo's history streams use the publication offset as the id), trimmed
  exactly to ``history`` entries and ``history_bytes`` of bodies (the newest entry always stays; the
  hash's ``lb`` keeps the running byte total): "events after V" is ``XRANGE log (V-0 +``.

Shared (not per task):

* ``taskmon:events`` -- the all-tasks stream (kind ``task`` or ``removed``), trimmed approximately to
  ``EVENTS_MAXLEN``. Each process runs ONE reader of it (``XREAD BLOCK``) that hands every event,
  its own included, to the local bus once: fan-out to browsers stays in-process.
* indexes: ZSETs by created and by updated (score = epoch µs; equal scores order by member, i.e. by
  task id, which is the listing's tie-break), a ZSET per status (scored by created), a ZSET per task
  type (scored by created), and a ZSET of finished tasks by updated (retention).
* ``taskmon:owner:<owner>`` -- a job pool's heartbeat (TTL), ``taskmon:lead:<name>`` -- a sweep lease.

One change is ONE Lua script (``_COMMIT``): compare the stored version with the expected one, write
the hash, append to the task's log and to the all-tasks stream, move the indexes. Two processes
racing to finish a task: one script runs first, the other sees a version that moved and returns the
conflict marker; the manager recomputes from the terminal snapshot and answers 409.

Cluster caveat: the scripts touch the task's keys and the shared keys (events stream, indexes) in
one call. That is fine on one Redis (or Sentinel); on Cluster the shared keys would have to move to
the task's slot (per-slot event streams read by each process) -- the task keys are ready for it.

Every call has a short socket timeout and no automatic retry (a retried commit could be applied
twice); redis-py's connection and timeout errors become ``StoreUnavailable`` at this boundary, so
the routes answer 503 JSON within about a second when Redis is down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..models import Task, TaskStatus
from ..query import DEFAULT_PAGE, Page, TaskQuery
from . import DONE, Ack, Conflict, FeedCallback, StoreUnavailable

__all__ = ["RedisStore", "log_key", "task_key"]

logger = logging.getLogger(__name__)

# -- the key layout, in one place --------------------------------------------------------------------
PREFIX = "taskmon:"
EVENTS = PREFIX + "events"
BY_CREATED = PREFIX + "idx:created"
BY_UPDATED = PREFIX + "idx:updated"
FINISHED = PREFIX + "idx:finished"  # terminal tasks by updated (retention)
STATUS_PREFIX = PREFIX + "idx:status:"
TYPE_PREFIX = PREFIX + "idx:type:"
OWNER_PREFIX = PREFIX + "owner:"
LEAD_PREFIX = PREFIX + "lead:"
STATUS_KEYS = [STATUS_PREFIX + s.value for s in TaskStatus]  # pending, processing, completed, failed

EVENTS_MAXLEN = 100_000  # all-tasks stream entries kept (approximately): a reader may fall this far behind
OWNER_TTL_MS = 15_000  # a job pool counts as dead this long after its process stopped renewing
OWNER_RENEW_S = 5.0
READ_BLOCK_MS = 2_000  # the reader's XREAD BLOCK; its socket timeout is longer
READ_COUNT = 1_000
SCAN_PAGE = 500  # index entries read per step of a filtered listing or count
LIST_SCAN_MAX = 20_000  # index entries a listing examines at most; then it returns a cursor to go on
TIMEOUT_S = 1.0
# The loop's client: connections at most, shared by every coroutine of the process. A burst of
# callers beyond that waits (up to the timeout) for a connection to come free instead of failing:
# redis-py's plain pool refuses the 101st concurrent command at once (MaxConnectionsError), which
# turned 900 of 1,000 streams opening together into 503s.
ASYNC_POOL_SIZE = 64


def task_key(task_id: str) -> str:
    return f"{PREFIX}{{t:{task_id}}}:task"


def log_key(task_id: str) -> str:
    return f"{PREFIX}{{t:{task_id}}}:log"


def _us(moment: datetime) -> int:
    """Epoch microseconds (exact in a ZSET score: < 2**53 until the year 2255)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# One change, or a chain of consecutive changes to one task (v+1, v+2, ...) committed at once.
# KEYS: task, log, events, by_created, by_updated, finished, status x4 (pending, processing,
#       completed, failed), type
# ARGV: expected version ('' = must not exist), n, history, events maxlen, task id, type,
#       created_us, internal (of the last), history bytes, then n x (version, body, status, updated_us)
# Returns {1, last events-stream id} or {0, stored version or ''} (the conflict marker).
# The log is bounded by count (history) and by bytes (history bytes: the task hash's ``lb`` keeps the
# bodies' running total): the oldest entries go while either is exceeded; the newest always stays.
_COMMIT = """
local cur = redis.call('HGET', KEYS[1], 'v')
if ARGV[1] == '' then
  if cur then return {0, cur} end
elseif cur ~= ARGV[1] then
  return {0, cur or ''}
end
local old = nil
local total = 0
if cur then
  local h = redis.call('HMGET', KEYS[1], 'status', 'lb')
  old = h[1]
  if h[2] then
    total = tonumber(h[2])
  else  -- a log written before the byte bound: count it once
    for _, e in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do total = total + #e[2][2] end
  end
else
  redis.call('DEL', KEYS[2])
end
local n = tonumber(ARGV[2])
local id
for i = 0, n - 1 do
  local b = 10 + i * 4
  redis.call('XADD', KEYS[2], ARGV[b] .. '-0', 'body', ARGV[b + 1])
  total = total + #ARGV[b + 1]
  id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'k', 'task', 'id', ARGV[5],
    'v', ARGV[b], 'body', ARGV[b + 1])
end
local len = redis.call('XLEN', KEYS[2])
local maxn, maxb = tonumber(ARGV[3]), tonumber(ARGV[9])
while len > 1 and (len > maxn or total > maxb) do
  local want = math.max(len - maxn, 1)
  if total > maxb then want = want + 15 end  -- how many the bytes need is not known: read a few
  local rows = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', math.min(len, want))
  local keep = nil
  for _, e in ipairs(rows) do
    if len <= 1 or (len <= maxn and total <= maxb) then keep = e[1] break end
    total = total - #e[2][2]
    len = len - 1
  end
  if keep then
    redis.call('XTRIM', KEYS[2], 'MINID', keep)
  else
    redis.call('XTRIM', KEYS[2], 'MAXLEN', len)
  end
end
local last = 10 + (n - 1) * 4
local status = ARGV[last + 2]
redis.call('HSET', KEYS[1], 'body', ARGV[last + 1], 'internal', ARGV[8], 'v', ARGV[last], 'status', status,
  'type', ARGV[6], 'created', ARGV[7], 'updated', ARGV[last + 3], 'lb', total)
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[5])
redis.call('ZADD', KEYS[5], ARGV[last + 3], ARGV[5])
local slot = {pending = 7, processing = 8, completed = 9, failed = 10}
if old ~= status then
  if old then redis.call('ZREM', KEYS[slot[old]], ARGV[5]) end
  redis.call('ZADD', KEYS[slot[status]], ARGV[7], ARGV[5])
end
if status == 'completed' or status == 'failed' then
  redis.call('ZADD', KEYS[6], ARGV[last + 3], ARGV[5])
end
if not cur then redis.call('ZADD', KEYS[11], ARGV[7], ARGV[5]) end
return {1, id}
"""

# KEYS: task, log, events, by_created, by_updated, finished, status x4, type
# ARGV: version the caller saw, events maxlen, task id
# Deletes only an unchanged task; announces it once on the all-tasks stream. Returns 1 or 0.
_REMOVE = """
local h = redis.call('HMGET', KEYS[1], 'v', 'body', 'status', 'type')
if h[1] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[4], ARGV[3])
redis.call('ZREM', KEYS[5], ARGV[3])
redis.call('ZREM', KEYS[6], ARGV[3])
for i = 7, 10 do redis.call('ZREM', KEYS[i], ARGV[3]) end
redis.call('ZREM', KEYS[11], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'k', 'removed', 'id', ARGV[3], 'v', h[1], 'body', h[2])
return 1
"""

# KEYS: lead key. ARGV: token, ttl ms. The lease is taken when free or renewed by its holder.
_LEAD = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

T = TypeVar("T")


@contextmanager
def _guard() -> Iterator[None]:
    """redis-py's connection/timeout errors are the store being unavailable (HTTP 503)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise StoreUnavailable(f"redis: {type(exc).__name__}") from None
    except OutOfMemoryError:  # maxmemory reached under noeviction: writes refused, nothing lost
        raise StoreUnavailable("redis: out of memory (maxmemory)") from None


def _internal(task: Task) -> str:
    return json.dumps(
        {"owner": task.owner, "samples": [list(s) for s in task.samples], "cancel_at": task.cancel_at},
        separators=(",", ":"),
    )


def _task(body: str, internal: str | None) -> Task:
    data = json.loads(body)
    if internal:
        data.update(json.loads(internal))
    return Task.from_dict(data)


def _keys(task: Task | str, task_type: str) -> list[str]:
    task_id = task if isinstance(task, str) else task.task_id
    return [
        task_key(task_id),
        log_key(task_id),
        EVENTS,
        BY_CREATED,
        BY_UPDATED,
        FINISHED,
        *STATUS_KEYS,
        TYPE_PREFIX + task_type,
    ]


def _commit_args(chain: list[tuple[Task, str]], expected: int | None, history: int, history_bytes: int) -> list[Any]:
    first, last = chain[0][0], chain[-1][0]
    args: list[Any] = [
        "" if expected is None else str(expected),
        len(chain),
        history,
        EVENTS_MAXLEN,
        first.task_id,
        first.task_type,
        _us(first.created_at),
        _internal(last),
        history_bytes,
    ]
    for task, body in chain:
        args += [str(task.version), body, task.status.value, _us(task.updated_at)]
    return args


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class RedisStore:
    """``RedisStore("redis://host:6379/0", history=256, history_bytes=8 MiB)``; ``shared = True`` (see the module doc)."""

    shared = True

    def __init__(
        self, url: str, history: int = 256, history_bytes: int = 8 * 1024 * 1024, *, timeout_s: float = TIMEOUT_S
    ) -> None:
        self.url = url
        self._history = history
        self._history_bytes = history_bytes  # per task, the log's bodies (UTF-8 bytes); the newest stays
        self._timeout = timeout_s
        # job threads and other processes' producers: a plain client with its own (thread-safe) pool
        self._sync = redis.Redis.from_url(url, decode_responses=True, **self._options())
        self._commit_sync = self._sync.register_script(_COMMIT)
        self._remove_sync = self._sync.register_script(_REMOVE)
        self._lead_sync = self._sync.register_script(_LEAD)
        self._async: aredis.Redis | None = None  # made on the loop at first use (bound to that loop)
        self._reader_client: aredis.Redis | None = None
        self._feed: FeedCallback | None = None
        self._owner: str | None = None
        self._heartbeat: threading.Thread | None = None  # keep_owner_alive (no loop of ours)
        self._heartbeat_stop = threading.Event()
        self._token = os.urandom(8).hex()  # this process's identity for sweep leases
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_id: str | None = None
        self.connected = True  # the reader's view (``/readyz`` asks with a PING)
        # aclose sets this as well as cancelling: redis-py's read timeout can swallow a cancel that
        # lands as it fires (asyncio.timeout), so the loops also stop on the flag
        self._stopping = False

    def _options(self, socket_timeout: float | None = None, *, asynchronous: bool = False) -> dict[str, Any]:
        retry = AsyncRetry(NoBackoff(), 0) if asynchronous else Retry(NoBackoff(), 0)
        return {
            "socket_timeout": socket_timeout or self._timeout,
            "socket_connect_timeout": self._timeout,
            "retry": retry,  # never resend: a commit must not be applied twice
            "health_check_interval": 0,
        }

    def _aclient(self) -> aredis.Redis:
        if self._async is None:
            pool = aredis.BlockingConnectionPool.from_url(
                self.url, decode_responses=True, max_connections=ASYNC_POOL_SIZE, timeout=self._timeout,
                **self._options(asynchronous=True),
            )
            self._async = aredis.Redis(connection_pool=pool)
            self._commit_async = self._async.register_script(_COMMIT)
            self._lead_async = self._async.register_script(_LEAD)
        return self._async

    # -- any thread ------------------------------------------------------------------------------
    def get(self, task_id: str) -> Task | None:
        with _guard():
            body, internal = self._sync.hmget(task_key(task_id), ("body", "internal"))
        return None if body is None else _task(body, internal)

    def commit(self, task: Task, expected: int | None, body: str) -> Ack:
        with _guard():
            ok, _ = self._commit_sync(keys=_keys(task, task.task_type), args=_commit_args([(task, body)], expected, self._history, self._history_bytes))
        if not ok:
            raise Conflict(task.task_id)
        return DONE

    def remove(self, tasks: Iterable[Task]) -> list[Task]:
        chosen = list(tasks)
        if not chosen:
            return []
        with _guard():
            pipe = self._sync.pipeline(transaction=False)
            for task in chosen:
                self._remove_sync(
                    keys=_keys(task, task.task_type), args=[str(task.version), EVENTS_MAXLEN, task.task_id], client=pipe
                )
            results = pipe.execute()
        return [task for task, ok in zip(chosen, results, strict=True) if ok]

    def _fetch(self, ids: list[str]) -> list[Task | None]:
        if not ids:
            return []
        pipe = self._sync.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(task_key(task_id), ("body", "internal"))
        return [None if body is None else _task(body, internal) for body, internal in pipe.execute()]

    def _index_for(self, query: TaskQuery) -> tuple[str, bool]:
        """The index to walk for a listing, and whether its score is the creation time."""
        if query.sort.endswith("updated"):
            return BY_UPDATED, False
        if query.task_type is not None:
            return TYPE_PREFIX + query.task_type, True
        if query.statuses is not None and len(query.statuses) == 1:
            (status,) = query.statuses
            return STATUS_PREFIX + status.value, True
        return BY_CREATED, True

    def _walk(self, key: str, lo: str, hi: str, descending: bool, budget: int) -> Iterator[tuple[str, int]]:
        """(member, score) of a ZSET in (score, member) order between ``lo`` and ``hi``, page by page.

        Keyset paging: each page starts at the last score seen (inclusive) and skips the members
        already seen at that score, so equal scores never loop and nothing is read twice."""
        bound = hi if descending else lo
        skip = 0
        seen = 0
        while seen < budget:
            if descending:
                rows = self._sync.zrange(key, bound, lo, desc=True, byscore=True, offset=skip, num=SCAN_PAGE, withscores=True)
            else:
                rows = self._sync.zrange(key, bound, hi, byscore=True, offset=skip, num=SCAN_PAGE, withscores=True)
            if not rows:
                return
            last = int(rows[-1][1])
            ties = sum(1 for _m, s in rows if int(s) == last)
            skip = skip + ties if str(last) == bound else ties
            bound = str(last)
            for member, score in rows:
                yield member, int(score)
            seen += len(rows)
            if len(rows) < SCAN_PAGE:
                return

    @staticmethod
    def _range(query: TaskQuery, by_created: bool) -> tuple[str, str]:
        lo, hi = "-inf", "+inf"
        after, before = (
            (query.created_after, query.created_before) if by_created else (query.updated_after, query.updated_before)
        )
        if after is not None:
            lo = f"({_us(after)}"
        if before is not None:
            hi = f"({_us(before)}"
        if query.after is not None:  # the cursor: inclusive here, the exact key is checked per task
            moment = str(_us(datetime.fromisoformat(query.after[0])))
            if query.descending:
                hi = moment if hi == "+inf" or int(hi.lstrip("(")) > int(moment) else hi
            else:
                lo = moment if lo == "-inf" or int(lo.lstrip("(")) < int(moment) else lo
        return lo, hi

    def list(self, query: TaskQuery) -> Page:
        """Walk the best index in order and filter each task with ``query.matches`` (Redis has no
        full-text search: a ``q`` or a second filter costs one HMGET per examined task, pipelined
        by SCAN_PAGE). At most LIST_SCAN_MAX entries are examined per call; past that the page is
        returned short with a cursor that continues the walk."""
        limit = query.limit or DEFAULT_PAGE
        key, by_created = self._index_for(query)
        lo, hi = self._range(query, by_created)
        out: list[Task] = []
        last: Task | None = None
        seen: set[str] = set()
        examined = 0
        exhausted = False
        with _guard():
            walked = self._walk(key, lo, hi, query.descending, LIST_SCAN_MAX)
            while len(out) <= limit:
                batch = [member for member, _s in _take(walked, SCAN_PAGE)]
                if not batch:
                    exhausted = examined < LIST_SCAN_MAX
                    break
                examined += len(batch)
                for task in self._fetch(batch):
                    if task is None or task.task_id in seen:
                        continue  # removed, or moved along the index, while we walked it
                    seen.add(task.task_id)
                    last = task
                    if query.matches(task) and query.past_cursor(task):
                        out.append(task)
                        if len(out) > limit:
                            break
        page = query.page(out, limit)
        if page.next_cursor is None and not exhausted and len(out) <= limit and last is not None:
            return Page(out, query.cursor_for(last))  # the scan budget ran out: go on from here
        return page

    def counts(self, query: TaskQuery) -> dict[TaskStatus, int]:
        """Unfiltered: ZCARD per status (O(1)). A created range alone: ZCOUNT. Anything else walks
        the status indexes and filters each task (one HMGET per task, pipelined): O(matching status)."""
        counts = dict.fromkeys(TaskStatus, 0)
        statuses = list(query.statuses) if query.statuses is not None else list(TaskStatus)
        simple = query.q is None and query.task_type is None and query.updated_after is None and query.updated_before is None
        lo, hi = self._range(TaskQuery(created_after=query.created_after, created_before=query.created_before), True)
        with _guard():
            if simple:
                pipe = self._sync.pipeline(transaction=False)
                for status in statuses:
                    if lo == "-inf" and hi == "+inf":
                        pipe.zcard(STATUS_PREFIX + status.value)
                    else:
                        pipe.zcount(STATUS_PREFIX + status.value, lo, hi)
                for status, n in zip(statuses, pipe.execute(), strict=True):
                    counts[status] = int(n)
                return counts
            for status in statuses:
                walked = self._walk(STATUS_PREFIX + status.value, lo, hi, False, 1 << 62)
                while True:
                    batch = [member for member, _s in _take(walked, SCAN_PAGE)]
                    if not batch:
                        break
                    for task in self._fetch(batch):
                        if task is not None and query.matches(task):
                            counts[task.status] += 1
        return counts

    def events(self, task_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        with _guard():
            rows = self._sync.xrange(log_key(task_id), f"({after}-0", "+", count=limit)
        return [(int(entry_id.partition("-")[0]), fields["body"]) for entry_id, fields in rows]

    def live(self) -> list[Task]:
        with _guard():
            pipe = self._sync.pipeline(transaction=False)
            pipe.zrange(STATUS_PREFIX + TaskStatus.PENDING.value, 0, -1)
            pipe.zrange(STATUS_PREFIX + TaskStatus.PROCESSING.value, 0, -1)
            pending, processing = pipe.execute()
            tasks = self._fetch([*pending, *processing])
        return [t for t in tasks if t is not None and not t.is_terminal]

    def terminal_before(self, cutoff: datetime) -> list[Task]:
        with _guard():
            ids = self._sync.zrange(FINISHED, "-inf", f"({_us(cutoff)}", byscore=True, offset=0, num=10_000)
            tasks = self._fetch(ids)
        return [t for t in tasks if t is not None and t.is_terminal and t.updated_at < cutoff]

    # -- several processes ---------------------------------------------------------------------
    def register_owner(self, owner: str) -> None:
        """This process's job pool id: ``start()`` sets its heartbeat key and keeps renewing it."""
        self._owner = owner

    def keep_owner_alive(self, owner: str) -> None:
        """A process with no event loop of ours (``TaskManager.open``): set the job pool's heartbeat
        now and renew it from a daemon thread until ``close()``, as a serving process does from its
        loop, so a process starting elsewhere does not fail this pool's tasks as interrupted."""
        self._owner = owner
        with _guard():
            self._sync.set(OWNER_PREFIX + owner, "1", px=OWNER_TTL_MS)
        self._heartbeat_stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._renew_owner_sync, name="taskmon-redis-owner", daemon=True)
        self._heartbeat.start()

    def _renew_owner_sync(self) -> None:
        assert self._owner is not None
        key = OWNER_PREFIX + self._owner
        while not self._heartbeat_stop.wait(OWNER_RENEW_S):
            try:
                self._sync.set(key, "1", px=OWNER_TTL_MS)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                logger.warning("could not renew the job pool's heartbeat in redis")
            except RedisError:
                logger.exception("renewing the job pool's heartbeat failed")

    def owner_alive(self, owner: str) -> bool:
        with _guard():
            return bool(self._sync.exists(OWNER_PREFIX + owner))

    def try_lead(self, name: str, ttl_s: float) -> bool:
        """A lease for one process's sweep at a time: True when this process holds it (taken or renewed)."""
        with _guard():
            return bool(self._lead_sync(keys=[LEAD_PREFIX + name], args=[self._token, int(ttl_s * 1000)]))

    def close(self) -> None:
        if self._heartbeat is not None:  # keep_owner_alive's thread: stop it, then drop the key
            self._heartbeat_stop.set()
            self._heartbeat.join(self._timeout * 2 + 1)
            self._heartbeat = None
            try:  # a clean stop: another process may fail this pool's tasks at once
                self._sync.delete(OWNER_PREFIX + (self._owner or ""))
            except (RedisError, OSError):
                logger.warning("could not drop the job pool's heartbeat key")
        self._sync.close()

    # -- the event loop --------------------------------------------------------------------------
    async def aget(self, task_id: str) -> Task | None:
        with _guard():
            body, internal = await self._aclient().hmget(task_key(task_id), ("body", "internal"))
        return None if body is None else _task(body, internal)

    async def acommit(self, task: Task, expected: int | None, body: str) -> None:
        await self.acommit_chain([(task, body)], expected)

    async def acommit_chain(self, chain: list[tuple[Task, str]], expected: int | None) -> None:
        """Consecutive changes of one task (versions expected+1, +2, ...) in one script: all or none.

        The manager gathers the changes that arrive for a task while its previous commit is in
        flight into one chain, so a burst costs one round trip and reaches every process's reader
        as one batch (one write per stream, as on the in-process stores)."""
        self._aclient()
        task = chain[0][0]
        with _guard():
            ok, _ = await self._commit_async(
                keys=_keys(task, task.task_type), args=_commit_args(chain, expected, self._history, self._history_bytes)
            )
        if not ok:
            raise Conflict(task.task_id)

    async def alist(self, query: TaskQuery) -> Page:
        return await _in_thread(self.list, query)

    async def acounts(self, query: TaskQuery) -> dict[TaskStatus, int]:
        return await _in_thread(self.counts, query)

    async def aevents(self, task_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        with _guard():
            rows = await self._aclient().xrange(log_key(task_id), f"({after}-0", "+", count=limit)
        return [(int(entry_id.partition("-")[0]), fields["body"]) for entry_id, fields in rows]

    async def alive(self) -> list[Task]:
        return await _in_thread(self.live)

    async def aping(self) -> None:
        with _guard():
            await self._aclient().ping()

    async def start(self, feed: FeedCallback) -> None:
        """Note where the all-tasks stream ends now, then read it from there in one owned task."""
        self._feed = feed
        client = self._aclient()
        with _guard():
            self._last_id = await self._stream_end(client)
            if self._owner is not None:
                await client.set(OWNER_PREFIX + self._owner, "1", px=OWNER_TTL_MS)
        self._spawn(self._read_loop(), "taskmon-redis-reader")
        if self._owner is not None:
            self._spawn(self._renew_owner(), "taskmon-redis-owner")

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _stream_end(client: aredis.Redis) -> str:
        rows = await client.xrevrange(EVENTS, "+", "-", count=1)
        return rows[0][0] if rows else "0-0"

    async def _read_loop(self) -> None:
        """XREAD BLOCK from the last id seen; after an outage go on from there (no gap, no repeat)."""
        client = aredis.Redis.from_url(
            self.url, decode_responses=True, **self._options(socket_timeout=READ_BLOCK_MS / 1000 + 3, asynchronous=True)
        )
        self._reader_client = client
        delay = 0.1
        down = False
        try:
            while not self._stopping:
                try:
                    if down:
                        await self._after_outage(client)
                        down = False
                        delay = 0.1
                    reply = await client.xread({EVENTS: self._last_id or "0-0"}, count=READ_COUNT, block=READ_BLOCK_MS)
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    if self._stopping:
                        return
                    if not down:
                        logger.warning("redis unreachable: the event reader retries", extra={"reason": type(exc).__name__})
                    down = True
                    self.connected = False
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 2.0)
                    continue
                except RedisError:
                    logger.exception("redis event reader failed; retrying")
                    down = True
                    await asyncio.sleep(1.0)
                    continue
                self.connected = True
                for _stream, entries in reply or ():
                    for entry_id, fields in entries:
                        self._last_id = entry_id
                        self._deliver(fields)
        finally:
            await client.aclose()

    def _deliver(self, fields: dict[str, str]) -> None:
        assert self._feed is not None
        try:
            body = fields["body"]
            task = _task(body, None)
            if fields.get("k") == "removed":
                self._feed("removed", task, None)
            else:
                self._feed("task", task, body)
        except Exception:
            logger.exception("an event from redis could not be delivered", extra={"fields": sorted(fields)})

    async def _after_outage(self, client: aredis.Redis) -> None:
        """Back after an outage: check the stream still holds everything after our last id."""
        info = await client.xinfo_stream(EVENTS) if await client.exists(EVENTS) else None
        last = _stream_id(self._last_id or "0-0")
        if info is None and last == (0, 0):
            return  # nothing was ever written: nothing to miss
        if info is None or _stream_id(info["last-generated-id"]) < last:
            # Redis came back without its data (no appendonly?): read the new stream from its start
            logger.warning("the redis events stream was reset (is appendonly on?); reading it from the start")
            self._last_id = "0-0"
            await self._resync(client)
            return
        deleted = info.get("max-deleted-entry-id")
        if deleted is not None and _stream_id(deleted) > last:
            logger.warning("events were trimmed from the redis stream while this process was away; resyncing snapshots")
            await self._resync(client, since_ms=last[0])

    async def _resync(self, client: aredis.Redis, since_ms: int = 0) -> None:
        """Feed the current snapshot of every task changed since ``since_ms`` (a few seconds of
        clock skew allowed): streams catch up to the newest version (the layer drops older ones)."""
        lo = max(0, since_ms - 5_000) * 1000
        ids = await client.zrange(BY_UPDATED, lo, "+inf", byscore=True)
        for start in range(0, len(ids), SCAN_PAGE):
            pipe = client.pipeline(transaction=False)
            for task_id in ids[start : start + SCAN_PAGE]:
                pipe.hget(task_key(task_id), "body")
            for body in await pipe.execute():
                if body is not None:
                    self._deliver({"k": "task", "body": body})

    async def _renew_owner(self) -> None:
        assert self._owner is not None
        key = OWNER_PREFIX + self._owner
        while not self._stopping:
            await asyncio.sleep(OWNER_RENEW_S)
            try:
                await self._aclient().set(key, "1", px=OWNER_TTL_MS)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                logger.warning("could not renew the job pool's heartbeat in redis")
            except RedisError:
                logger.exception("renewing the job pool's heartbeat failed")

    async def aclose(self) -> None:
        self._stopping = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=1.0)
            if pending and self._reader_client is not None:
                await self._reader_client.connection_pool.disconnect()  # breaks a read that kept going
                _done, pending = await asyncio.wait(pending, timeout=READ_BLOCK_MS / 1000 + 1)
            for task in tasks:
                if not task.done():
                    logger.error("a redis store task did not stop", extra={"task": task.get_name()})
                elif not task.cancelled() and task.exception() is not None:
                    logger.error("a redis store task failed", exc_info=task.exception())
        if self._owner is not None and self._async is not None:
            try:  # a clean stop: another process may fail this pool's tasks at once
                await self._async.delete(OWNER_PREFIX + self._owner)
            except (RedisError, OSError):
                logger.warning("could not drop the job pool's heartbeat key")
        if self._async is not None:
            await self._async.aclose(close_connection_pool=True)
        await _in_thread(self.close)


def _take(iterator: Iterator[T], n: int) -> list[T]:
    out: list[T] = []
    for item in iterator:
        out.append(item)
        if len(out) >= n:
            break
    return out


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    import anyio.to_thread

    return await anyio.to_thread.run_sync(fn, *args)
