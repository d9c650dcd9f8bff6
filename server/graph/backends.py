"""Graph backends behind one interface: Zep (zep-cloud 4.x SDK) and an embedded local extractor.

The build job drives both the same way: create a graph, submit chunks in batches, poll each batch
until it reaches a final status, then count nodes and edges. Both return nodes and edges in the
same shape (see ``_node_dict`` / ``_edge_dict``).

Every remote call goes through a ``Retrier`` (server/retry.py) supplied by the caller, so the job
can show each retry in its task. The Zep client is therefore built with ``max_retries=0``: the SDK's
own retries are silent (and skip timeouts), ours are visible and cover timeouts too. Mutating calls
pass an explicit ``idempotency_key`` that stays the same across our retries, so a retried
``add_items`` whose first attempt did reach Zep is not applied twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from ..models import utcnow
from ..retry import RetriesExhausted, Retrier

if TYPE_CHECKING:
    from zep_cloud.client import Zep

logger = logging.getLogger(__name__)

GRAPH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
FINAL_BATCH_STATUSES = frozenset({"succeeded", "partial", "failed", "canceled", "invalid"})
ZEP_MAX_ITEMS_PER_CALL = 500
ZEP_PAGE_SIZE = 100
DEFAULT_ZEP_BASE_URL = "https://api.getzep.com/api/v4"


class GraphNotFound(LookupError):
    """No graph with that id on this backend."""


class BackendError(Exception):
    """The backend failed in a way worth telling the user; the message is safe to show."""


@dataclass(frozen=True)
class SubmittedBatch:
    batch_id: str
    accepted: int
    rejected: list[dict[str, Any]] = field(default_factory=list)  # [{"index": i, "reason": str}]


@dataclass(frozen=True)
class BatchState:
    status: str
    total: int
    succeeded: int
    failed: int
    processing: int
    stage: str | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_BATCH_STATUSES


class GraphBackend(Protocol):
    kind: str  # "zep" or "local"
    max_batch_items: int  # chunks per submitted batch

    def create_graph(self, name: str, description: str, retrier: Retrier) -> str: ...

    def submit_batch(self, graph_id: str, chunks: Sequence[str], retrier: Retrier) -> SubmittedBatch: ...

    def batch_state(self, batch_id: str, retrier: Retrier) -> BatchState: ...

    def counts(self, graph_id: str, retrier: Retrier) -> tuple[int, int]: ...

    def graph_data(self, graph_id: str, retrier: Retrier) -> dict[str, Any]: ...

    def delete_graph(self, graph_id: str, retrier: Retrier) -> None: ...

    def close(self) -> None: ...


def is_graph_id(value: object) -> bool:
    return isinstance(value, str) and GRAPH_ID_RE.fullmatch(value) is not None


def _graph_payload(graph_id: str, nodes: list[dict[str, Any]], edges: list[dict[str, Any]]) -> dict[str, Any]:
    return {"graph_id": graph_id, "nodes": nodes, "edges": edges, "node_count": len(nodes), "edge_count": len(edges)}


# =========================================================================================== Zep


def zep_base_url(url: str | None) -> str:
    """The SDK's base URL: Zep Cloud by default; a bare ``scheme://host[:port]`` gets the
    ``/api/v4`` prefix the SDK expects, any URL with a path is taken as it is."""
    if not url:
        return DEFAULT_ZEP_BASE_URL
    url = url.rstrip("/")
    if httpx.URL(url).path in ("", "/"):
        return f"{url}/api/v4"
    return url


def _zep_message(exc: Exception) -> str:
    """A short, safe description of a Zep ApiError: status plus Zep's own message (no headers)."""
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    detail = None
    error = getattr(body, "error", None)
    if error is not None:
        detail = getattr(error, "message", None) or getattr(error, "code", None)
    elif isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"].get("message") or body["error"].get("code")
    text = f"HTTP {status}" if status is not None else "no HTTP status"
    if isinstance(detail, str) and detail.strip():
        text += f": {detail.strip()[:200]}"
    return text


class ZepBackend:
    kind = "zep"
    max_batch_items = ZEP_MAX_ITEMS_PER_CALL

    def __init__(self, api_key: str, base_url: str | None = None, *, timeout: float = 30.0) -> None:
        from zep_cloud.client import Zep  # imported here: the local backend never needs the SDK

        self._http = httpx.Client(timeout=timeout, follow_redirects=True)
        # max_retries=0: our Retrier wraps every call so that each retry shows up in the task's
        # message and progress_detail (the SDK's built-in retries would be invisible).
        self._client: Zep = Zep(
            api_key=api_key,
            base_url=zep_base_url(base_url),
            timeout=timeout,
            max_retries=0,
            httpx_client=self._http,
        )

    def close(self) -> None:
        self._http.close()

    # -- error mapping ---------------------------------------------------------------------------
    def _call(self, retrier: Retrier, operation: str, fn: Callable[[], Any], *, not_found: str | None = None) -> Any:
        from zep_cloud.core.api_error import ApiError as ZepApiError
        from zep_cloud.core.parse_error import ParsingError

        try:
            return retrier.call(operation, fn)
        except RetriesExhausted as exc:
            raise BackendError(f"Zep {exc}") from exc
        except ZepApiError as exc:
            status = exc.status_code
            if status == 404 and not_found is not None:
                raise GraphNotFound(not_found) from exc
            if status in (401, 403):
                raise BackendError(f"Zep {operation}: rejected the API key ({_zep_message(exc)})") from exc
            raise BackendError(f"Zep {operation}: request failed ({_zep_message(exc)})") from exc
        except ParsingError as exc:
            raise BackendError(f"Zep {operation}: unexpected response from the server") from exc
        except httpx.HTTPError as exc:  # non-transient transport problems, e.g. a malformed base URL
            raise BackendError(f"Zep {operation}: cannot reach the server ({type(exc).__name__})") from exc

    # -- operations ------------------------------------------------------------------------------
    def create_graph(self, name: str, description: str, retrier: Retrier) -> str:
        key = str(uuid.uuid4())
        graph = self._call(
            retrier, "create graph", lambda: self._client.graph.create(name=name, description=description, idempotency_key=key)
        )
        if not graph.uuid_:
            raise BackendError("Zep create graph: the response carried no graph id")
        return str(graph.uuid_)

    def submit_batch(self, graph_id: str, chunks: Sequence[str], retrier: Retrier) -> SubmittedBatch:
        from zep_cloud.types import BatchItemInput

        create_key = str(uuid.uuid4())
        batch = self._call(
            retrier,
            "create batch",
            lambda: self._client.batch.create(metadata={"graph_uuid": graph_id, "source": "taskmon"}, idempotency_key=create_key),
        )
        batch_id = str(batch.uuid_)
        accepted = 0
        rejected: list[dict[str, Any]] = []
        for offset in range(0, len(chunks), ZEP_MAX_ITEMS_PER_CALL):
            part = chunks[offset : offset + ZEP_MAX_ITEMS_PER_CALL]
            items = [BatchItemInput(type="graph_episode", graph_uuid=graph_id, data=c, data_type="text") for c in part]
            add_key = str(uuid.uuid4())
            response = self._call(
                retrier,
                "add items",
                lambda items=items, add_key=add_key: self._client.batch.add_items(batch_id, items=items, idempotency_key=add_key),
                not_found=batch_id,
            )
            part_rejected = [
                {"index": offset + (r.index or 0), "reason": (r.reason or "rejected")[:200]}
                for r in (response.rejected_items or [])
            ]
            rejected.extend(part_rejected)
            accepted += len(part) - len(part_rejected)
        if accepted:
            process_key = str(uuid.uuid4())
            self._call(
                retrier,
                "process batch",
                lambda: self._client.batch.process(batch_id, idempotency_key=process_key),
                not_found=batch_id,
            )
        return SubmittedBatch(batch_id, accepted, rejected)

    def batch_state(self, batch_id: str, retrier: Retrier) -> BatchState:
        batch = self._call(retrier, "get batch", lambda: self._client.batch.get(batch_id), not_found=batch_id)
        progress = batch.progress
        return BatchState(
            status=str(batch.status or "queued"),
            total=(progress.total_items or 0) if progress else 0,
            succeeded=(progress.succeeded_items or 0) if progress else 0,
            failed=(progress.failed_items or 0) if progress else 0,
            processing=(progress.processing_items or 0) if progress else 0,
            stage=progress.stage if progress else None,
        )

    def _pages(self, retrier: Retrier, operation: str, graph_id: str, lister: Callable[..., Any]) -> Iterator[Any]:
        """Every item of a paged list; each page is fetched (and retried) on its own."""
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            page = self._call(
                retrier,
                operation,
                lambda cursor=cursor: lister(graph_id, page_size=ZEP_PAGE_SIZE, cursor=cursor),
                not_found=graph_id,
            )
            yield from page.items or []
            cursor = page.response.next_cursor
            if not cursor:
                return
            if cursor in seen:
                raise BackendError(f"Zep {operation}: the server repeated a page cursor")
            seen.add(cursor)

    def counts(self, graph_id: str, retrier: Retrier) -> tuple[int, int]:
        nodes = sum(1 for _ in self._pages(retrier, "list nodes", graph_id, self._client.graph.node.list))
        edges = sum(1 for _ in self._pages(retrier, "list edges", graph_id, self._client.graph.edge.list))
        return nodes, edges

    def graph_data(self, graph_id: str, retrier: Retrier) -> dict[str, Any]:
        nodes = [_zep_node(n) for n in self._pages(retrier, "list nodes", graph_id, self._client.graph.node.list)]
        edges = [_zep_edge(e) for e in self._pages(retrier, "list edges", graph_id, self._client.graph.edge.list)]
        return _graph_payload(graph_id, nodes, edges)

    def delete_graph(self, graph_id: str, retrier: Retrier) -> None:
        key = str(uuid.uuid4())
        self._call(retrier, "delete graph", lambda: self._client.graph.delete(graph_id, idempotency_key=key), not_found=graph_id)


def _zep_node(node: Any) -> dict[str, Any]:
    return _node_dict(
        uuid_=node.uuid_,
        name=node.name,
        labels=node.labels,
        summary=node.summary,
        attributes=node.attributes,
        created_at=node.created_at,
        episode_uuids=node.episode_uuids,
    )


def _zep_edge(edge: Any) -> dict[str, Any]:
    return _edge_dict(
        uuid_=edge.uuid_,
        name=edge.name,
        fact=edge.fact,
        source_node_uuid=edge.source_node_uuid,
        target_node_uuid=edge.target_node_uuid,
        source_node_name=edge.source_node_name,
        target_node_name=edge.target_node_name,
        attributes=edge.attributes,
        created_at=edge.created_at,
        valid_at=edge.valid_at,
        invalid_at=edge.invalid_at,
        expired_at=edge.expired_at,
        episode_uuids=edge.episode_uuids,
    )


def _node_dict(*, uuid_: Any, name: Any, labels: Any, summary: Any, attributes: Any, created_at: Any, episode_uuids: Any) -> dict[str, Any]:
    return {
        "uuid": uuid_,
        "name": name or "",
        "labels": list(labels or []),
        "summary": summary or "",
        "attributes": dict(attributes or {}),
        "created_at": created_at,
        "episode_uuids": list(episode_uuids or []),
    }


def _edge_dict(
    *,
    uuid_: Any,
    name: Any,
    fact: Any,
    source_node_uuid: Any,
    target_node_uuid: Any,
    source_node_name: Any,
    target_node_name: Any,
    attributes: Any,
    created_at: Any,
    valid_at: Any = None,
    invalid_at: Any = None,
    expired_at: Any = None,
    episode_uuids: Any = None,
) -> dict[str, Any]:
    return {
        "uuid": uuid_,
        "name": name or "",
        "fact": fact or "",
        "source_node_uuid": source_node_uuid,
        "target_node_uuid": target_node_uuid,
        "source_node_name": source_node_name or "",
        "target_node_name": target_node_name or "",
        "attributes": dict(attributes or {}),
        "created_at": created_at,
        "valid_at": valid_at,
        "invalid_at": invalid_at,
        "expired_at": expired_at,
        "episode_uuids": list(episode_uuids or []),
    }


# ========================================================================================= local

_NAMESPACE = uuid.UUID("6f1c2b8e-4f7a-4a51-9a3e-7c2d9b0f5e11")
_LOCAL_ID_RE = re.compile(r"^local_[0-9a-f]{32}$")
_MAX_UNREAD_BATCHES = 1000
_MAX_OPEN_GRAPHS = 8
_SENTENCE_RE = re.compile(r"[^.!?\n\u3002\uff01\uff1f]+(?:[.!?\u3002\uff01\uff1f]+|$)", re.MULTILINE)
_WORD_RE = re.compile(r"[^\W_][\w'\u2019-]*")
_CONNECTORS = frozenset({"of", "the", "de", "del", "der", "van", "von", "da", "du", "la", "le", "al", "bin", "y", "for"})
_STOPWORDS = frozenset(
    """a an the this that these those it its he she they we i you his her their our my your
    in on at by for from with to of and or but if when while after before as so then there here
    also however yet still although because since during until unless upon into onto over under
    what which who whom whose where why how all any each every some many most much no not one
    mr mrs ms dr prof sir today yesterday tomorrow monday tuesday wednesday thursday friday
    saturday sunday january february march april may june july august september october november
    december chapter section figure table""".split()
)
_ORG_WORDS = frozenset(
    """university institute company corporation corp inc ltd llc group agency bank foundation
    association council ministry department committee laboratory laboratories lab college school
    society party army navy court academy organization organisation union office bureau
    museum hospital church commission federation club team labs systems technologies""".split()
)
_PLACE_WORDS = frozenset(
    """city river mountain mountains lake sea ocean street road avenue county province state
    island islands valley bay park kingdom republic region district village town desert""".split()
)
_PLACE_PREPOSITIONS = frozenset({"in", "at", "from", "near", "to", "into", "across", "around"})
_RELATION_VERBS = frozenset(
    """founded founds co-founded created creates built builds leads led joined joins married marries
    met meets studied studies taught teaches discovered discovers acquired acquires bought buys sold
    sells owns owned visited visits wrote writes published publishes invented invents won wins
    defeated defeats signed signs attended attends lives lived works worked moved moves served
    serves directed directs funded funds partnered merged launched launches manages managed
    hired hires employs employed supports supported opposed opposes replaced replaces succeeded
    succeeds""".split()
)


@dataclass(frozen=True)
class _Mention:
    name: str
    kind: str
    start: int
    end: int


def _token_is_capitalised(token: str) -> bool:
    return token[:1].isupper()


def _classify(tokens: list[str], preceding: str | None) -> str:
    lowered = {t.lower().rstrip(".") for t in tokens}
    if lowered & _ORG_WORDS:
        return "Organization"
    if len(tokens) == 1 and len(tokens[0]) >= 2 and tokens[0].isupper():
        return "Organization"  # an acronym
    if lowered & _PLACE_WORDS or (preceding is not None and preceding.lower() in _PLACE_PREPOSITIONS):
        return "Location"
    capitalised = [t for t in tokens if _token_is_capitalised(t)]
    if 2 <= len(capitalised) <= 3 and len(capitalised) == len(tokens):
        return "Person"
    return "Entity"


def extract_mentions(sentence: str) -> list[_Mention]:
    """Named entities in one sentence: runs of capitalised words (with connectors like "of")."""
    words = [(m.group(), m.start(), m.end()) for m in _WORD_RE.finditer(sentence)]
    mentions: list[_Mention] = []
    i = 0
    while i < len(words):
        word = words[i][0]
        if not _token_is_capitalised(word) or word.lower() in _STOPWORDS:
            i += 1
            continue
        j = i + 1
        last = i
        while j < len(words):
            token = words[j][0]
            if _token_is_capitalised(token) and token.lower() not in _STOPWORDS:
                last = j
                j += 1
            elif token.lower() in _CONNECTORS:
                # "University of Paris", "Bank of the West": up to two connectors, then a capital.
                k = j
                while k < len(words) and k - j < 2 and words[k][0].lower() in _CONNECTORS:
                    k += 1
                if k < len(words) and _token_is_capitalised(words[k][0]) and words[k][0].lower() not in _STOPWORDS:
                    j = k
                else:
                    break
            else:
                break
        tokens = [w for w, _, _ in words[i : last + 1]]
        name = sentence[words[i][1] : words[last][2]]
        name = re.sub(r"['\u2019]s$", "", name)
        preceding = words[i - 1][0] if i > 0 else None
        if len(name) >= 2:
            mentions.append(_Mention(name, _classify(tokens, preceding), words[i][1], words[last][2]))
        i = last + 1
    return mentions


def _relation_name(between: str) -> str:
    for word in _WORD_RE.findall(between.lower()):
        if word in _RELATION_VERBS:
            return word.upper().replace("-", "_")
    return "RELATED_TO"


class LocalBackend:
    """Entities and co-occurrence relations extracted per chunk, one JSON file per graph.

    Deterministic: the same chunks give the same nodes and edges (ids are UUID5 of the graph id
    and the entity name). Nodes and edges have the same keys as the Zep backend's.
    """

    kind = "local"
    max_batch_items = 50

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir).resolve() / "graphs"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._batches: dict[str, BatchState] = {}
        # Graphs being built stay in memory and are written when they have doubled since their
        # last write (and when read back, evicted or closed): a build writes O(final size) bytes
        # in all, not one whole-graph rewrite per batch (which made builds quadratic).
        self._open: dict[str, dict[str, Any]] = {}
        self._saved_episodes: dict[str, int] = {}

    def close(self) -> None:
        with self._lock:
            for graph_id in list(self._open):
                self._evict(graph_id)

    def _evict(self, graph_id: str) -> None:
        graph = self._open.pop(graph_id, None)
        saved = self._saved_episodes.pop(graph_id, None)
        if graph is not None and graph["episodes"] != saved:
            self._save(graph)

    def _loaded(self, graph_id: str) -> dict[str, Any]:
        graph = self._open.get(graph_id)
        if graph is None:
            graph = self._load(graph_id)
            self._open[graph_id] = graph
            self._saved_episodes[graph_id] = graph["episodes"]
            while len(self._open) > _MAX_OPEN_GRAPHS:
                self._evict(next(iter(self._open)))
        return graph

    def _path(self, graph_id: str) -> Path:
        if _LOCAL_ID_RE.fullmatch(graph_id) is None:
            raise GraphNotFound(graph_id)
        return self.root / f"{graph_id}.json"

    def _load(self, graph_id: str) -> dict[str, Any]:
        try:
            graph: dict[str, Any] = json.loads(self._path(graph_id).read_bytes())
        except FileNotFoundError:
            raise GraphNotFound(graph_id) from None
        return graph

    def _save(self, graph: dict[str, Any]) -> None:
        path = self._path(graph["graph_id"])
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(graph, fh, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def create_graph(self, name: str, description: str, retrier: Retrier) -> str:
        graph_id = f"local_{uuid.uuid4().hex}"
        now = utcnow().isoformat()
        with self._lock:
            self._save(
                {"graph_id": graph_id, "name": name, "description": description, "created_at": now, "episodes": 0, "nodes": {}, "edges": {}}
            )
        return graph_id

    def submit_batch(self, graph_id: str, chunks: Sequence[str], retrier: Retrier) -> SubmittedBatch:
        rejected = [{"index": i, "reason": "empty chunk"} for i, c in enumerate(chunks) if not c.strip()]
        with self._lock:
            graph = self._loaded(graph_id)
            for chunk in chunks:
                if chunk.strip():
                    self._ingest(graph, chunk)
            if graph["episodes"] >= 2 * self._saved_episodes[graph_id]:
                self._save(graph)
                self._saved_episodes[graph_id] = graph["episodes"]
            batch_id = f"local-batch-{uuid.uuid4().hex}"
            accepted = len(chunks) - len(rejected)
            status = "succeeded" if not rejected else ("partial" if accepted else "failed")
            self._batches[batch_id] = BatchState(status, len(chunks), accepted, len(rejected), 0, "done")
            while len(self._batches) > _MAX_UNREAD_BATCHES:  # a stopped build never read its state
                del self._batches[next(iter(self._batches))]
        return SubmittedBatch(batch_id, accepted, rejected)

    def _ingest(self, graph: dict[str, Any], chunk: str) -> None:
        graph_id = graph["graph_id"]
        episode = str(uuid.uuid5(_NAMESPACE, f"{graph_id}:episode:{graph['episodes']}"))
        graph["episodes"] += 1
        now = utcnow().isoformat()
        nodes: dict[str, Any] = graph["nodes"]
        edges: dict[str, Any] = graph["edges"]
        for sentence_match in _SENTENCE_RE.finditer(chunk):
            sentence = sentence_match.group()
            mentions = extract_mentions(sentence)
            keys: list[tuple[str, _Mention]] = []
            for mention in mentions:
                key = mention.name.casefold()
                node = nodes.get(key)
                if node is None:
                    node = nodes[key] = {
                        "uuid": str(uuid.uuid5(_NAMESPACE, f"{graph_id}:node:{key}")),
                        "name": mention.name,
                        "kinds": {},
                        "summary": " ".join(sentence.split())[:240],
                        "created_at": now,
                        "episode_uuids": [],
                        "mentions": 0,
                    }
                node["kinds"][mention.kind] = node["kinds"].get(mention.kind, 0) + 1
                node["mentions"] += 1
                if not node["episode_uuids"] or node["episode_uuids"][-1] != episode:  # this episode is the newest
                    node["episode_uuids"].append(episode)
                if all(k != key for k, _ in keys):
                    keys.append((key, mention))
            # Co-occurrence in a sentence: each entity relates to the next two after it.
            for a in range(len(keys)):
                for b in range(a + 1, min(a + 3, len(keys))):
                    (src_key, src), (dst_key, dst) = keys[a], keys[b]
                    name = _relation_name(sentence[src.end : dst.start])
                    src_uuid, dst_uuid = nodes[src_key]["uuid"], nodes[dst_key]["uuid"]
                    edge_key = f"{src_uuid}|{name}|{dst_uuid}"
                    edge = edges.get(edge_key)
                    if edge is None:
                        edge = edges[edge_key] = {
                            "uuid": str(uuid.uuid5(_NAMESPACE, f"{graph_id}:edge:{edge_key}")),
                            "name": name,
                            "fact": " ".join(sentence.split())[:300],
                            "source_node_uuid": src_uuid,
                            "target_node_uuid": dst_uuid,
                            "created_at": now,
                            "episode_uuids": [],
                            "weight": 0,
                        }
                    edge["weight"] += 1
                    if not edge["episode_uuids"] or edge["episode_uuids"][-1] != episode:
                        edge["episode_uuids"].append(episode)

    def batch_state(self, batch_id: str, retrier: Retrier) -> BatchState:
        with self._lock:
            state = self._batches.pop(batch_id, None)
        if state is None:
            raise GraphNotFound(batch_id)
        return state

    def counts(self, graph_id: str, retrier: Retrier) -> tuple[int, int]:
        with self._lock:  # the end of a build: write it out and let it go
            self._evict(graph_id)
            graph = self._load(graph_id)
        return len(graph["nodes"]), len(graph["edges"])

    def graph_data(self, graph_id: str, retrier: Retrier) -> dict[str, Any]:
        with self._lock:
            self._evict(graph_id)
            graph = self._load(graph_id)
        by_uuid = {n["uuid"]: n for n in graph["nodes"].values()}
        nodes = [
            _node_dict(
                uuid_=n["uuid"],
                name=n["name"],
                labels=["Entity", _main_kind(n["kinds"])],
                summary=n["summary"],
                attributes={"mentions": n["mentions"]},
                created_at=n["created_at"],
                episode_uuids=n["episode_uuids"],
            )
            for n in graph["nodes"].values()
        ]
        edges = [
            _edge_dict(
                uuid_=e["uuid"],
                name=e["name"],
                fact=e["fact"],
                source_node_uuid=e["source_node_uuid"],
                target_node_uuid=e["target_node_uuid"],
                source_node_name=by_uuid[e["source_node_uuid"]]["name"],
                target_node_name=by_uuid[e["target_node_uuid"]]["name"],
                attributes={"weight": e["weight"]},
                created_at=e["created_at"],
                episode_uuids=e["episode_uuids"],
            )
            for e in graph["edges"].values()
        ]
        return _graph_payload(graph_id, nodes, edges)

    def delete_graph(self, graph_id: str, retrier: Retrier) -> None:
        path = self._path(graph_id)
        with self._lock:
            self._open.pop(graph_id, None)
            self._saved_episodes.pop(graph_id, None)
            try:
                path.unlink()
            except FileNotFoundError:
                raise GraphNotFound(graph_id) from None


def _main_kind(kinds: dict[str, int]) -> str:
    """The most frequent kind; ties go to a specific kind over "Entity", then alphabetical."""
    if not kinds:
        return "Entity"
    return sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0] == "Entity", kv[0]))[0][0]
