"""The Zep path: the real zep-cloud SDK against a fake Zep v4 server, unit-level and end to end
over HTTP (the task events a browser sees on /tasks/{id}/stream)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_zep import API_KEY, FakeZep, running_fake_zep
from graph_helpers import assert_well_ordered, follow_stream

from server.graph.backends import BackendError, GraphNotFound, ZepBackend, zep_base_url
from server.graph.build import BuildOptions
from server.graph.service import GraphService
from server.retry import Retrier, RetryEvent, RetryPolicy
from server.settings import Settings

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05)
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar"]


def _story(paragraphs: int, marker: dict[int, str] | None = None) -> str:
    """``paragraphs`` paragraphs of 60-90 characters, so one chunk each with chunk_size=100;
    ``marker`` puts REJECT/FAIL words into chosen paragraphs."""
    marker = marker or {}
    out = []
    for i in range(paragraphs):
        a, b = NAMES[i % len(NAMES)], NAMES[(i + 1) % len(NAMES)]
        out.append(f"{a} met {b} in Paris and they talked about work for a long while. {marker.get(i, '')}".strip())
    return "\n\n".join(out)


@pytest.fixture
def fake_zep() -> Iterator[FakeZep]:
    with running_fake_zep() as fake:
        yield fake


# ------------------------------------------------------------------------------ backend (unit)


def _backend(fake: FakeZep, *, key: str = API_KEY, timeout: float = 5.0) -> ZepBackend:
    return ZepBackend(key, fake.base_url, timeout=timeout)


def test_base_url_gets_the_api_prefix_only_when_bare() -> None:
    assert zep_base_url(None) == "https://api.getzep.com/api/v4"
    assert zep_base_url("http://zep.internal:8000/") == "http://zep.internal:8000/api/v4"
    assert zep_base_url("https://proxy.example/zep/api/v4") == "https://proxy.example/zep/api/v4"


def test_a_bare_base_url_reaches_the_server(fake_zep: FakeZep) -> None:
    backend = ZepBackend(API_KEY, fake_zep.url)
    graph_id = backend.create_graph("g", "d", Retrier(policy=FAST))
    assert graph_id in fake_zep.graphs
    backend.close()


def test_pages_are_followed_to_count_nodes_and_edges(fake_zep: FakeZep) -> None:
    fake_zep.page_size_cap = 2
    backend = _backend(fake_zep)
    retrier = Retrier(policy=FAST)
    graph_id = backend.create_graph("g", "d", retrier)
    submitted = backend.submit_batch(graph_id, [_story(6)], retrier)
    states = [backend.batch_state(submitted.batch_id, retrier).status for _ in range(2)]
    assert states == ["processing", "succeeded"]  # the fake advances one step per GET
    nodes, edges = backend.counts(graph_id, retrier)
    assert (nodes, edges) == (len(fake_zep.nodes[graph_id]), len(fake_zep.edges[graph_id])) == (8, 7)
    assert fake_zep.count("POST", "/nodes/list$") == 4  # 8 nodes in pages of 2
    data = backend.graph_data(graph_id, retrier)
    assert sorted(n["name"] for n in data["nodes"]) == sorted([*NAMES[:7], "Paris"])
    assert {e["name"] for e in data["edges"]} == {"MENTIONED_WITH"}
    backend.close()


def test_a_timed_out_add_items_is_retried_with_the_same_idempotency_key(fake_zep: FakeZep) -> None:
    backend = _backend(fake_zep, timeout=1.0)
    events: list[RetryEvent] = []
    retrier = Retrier(policy=FAST, on_retry=events.append)
    graph_id = backend.create_graph("g", "d", retrier)
    fake_zep.fail("POST", r"/items$", hold=True)  # Zep stores the items but answers too late
    submitted = backend.submit_batch(graph_id, ["Alice met Bob.", "Carol met Dave."], retrier)
    assert [e.reason for e in events] == ["timed out"]
    assert fake_zep.count("POST", r"/items$") == 2
    assert submitted.accepted == 2
    assert len(fake_zep.items_of(graph_id)) == 2  # not 4: the retry was recognised as the same call
    backend.close()


def test_401_is_not_retried(fake_zep: FakeZep) -> None:
    backend = _backend(fake_zep, key="wrong-key")
    events: list[RetryEvent] = []
    with pytest.raises(BackendError) as info:
        backend.create_graph("g", "d", Retrier(policy=FAST, on_retry=events.append))
    assert str(info.value) == "Zep create graph: rejected the API key (HTTP 401: invalid API key)"
    assert "wrong-key" not in str(info.value)
    assert events == [] and fake_zep.count("POST", r"/graphs$") == 1
    backend.close()


def test_persistent_5xx_gives_a_clear_error(fake_zep: FakeZep) -> None:
    backend = _backend(fake_zep)
    fake_zep.fail("POST", r"/graphs$", status=503, times=10)
    with pytest.raises(BackendError, match=r"^Zep create graph failed after 4 attempts: server error \(HTTP 503\)$"):
        backend.create_graph("g", "d", Retrier(policy=FAST))
    assert fake_zep.count("POST", r"/graphs$") == 4
    backend.close()


def test_unknown_graph_is_not_found(fake_zep: FakeZep) -> None:
    backend = _backend(fake_zep)
    retrier = Retrier(policy=FAST)
    with pytest.raises(GraphNotFound):
        backend.graph_data("3f1e7d0a-0000-4000-8000-000000000000", retrier)
    graph_id = backend.create_graph("g", "d", retrier)
    backend.delete_graph(graph_id, retrier)
    assert graph_id not in fake_zep.graphs
    with pytest.raises(GraphNotFound):
        backend.delete_graph(graph_id, retrier)
    backend.close()


def test_unreachable_zep_is_reported_after_retries() -> None:
    with running_fake_zep() as fake:
        url = fake.base_url
    backend = ZepBackend(API_KEY, url, timeout=1.0)  # nothing listens there any more
    events: list[RetryEvent] = []
    with pytest.raises(BackendError, match="failed after 4 attempts: connection error"):
        backend.create_graph("g", "d", Retrier(policy=FAST, on_retry=events.append))
    assert [e.reason for e in events] == ["connection error"] * 3
    backend.close()


# ------------------------------------------------------------------------------ end to end


@asynccontextmanager
async def _taskmon(
    live_server: Callable[[Settings], Any], tmp_path: Path, fake: FakeZep, *, key: str = API_KEY, timeout: float = 10.0
) -> AsyncIterator[Any]:
    settings = Settings(store_url="memory://", data_dir=tmp_path / "data", zep_api_key=key, zep_base_url=fake.base_url)
    async with live_server(settings) as srv:
        service: GraphService = srv.app.state.graph
        assert service.backend.kind == "zep"
        service.backend.close()
        service.backend = ZepBackend(key, fake.base_url, timeout=timeout)
        service.build_options = BuildOptions(retry_policy=FAST, poll_interval=0.01)
        service.request_retry_policy = FAST
        yield srv


async def _start_build(http: httpx.AsyncClient, text: str) -> tuple[str, str]:
    response = await http.post("/api/graph/project", json={"name": "story", "text": text})
    assert response.status_code == 201, response.text
    project_id = response.json()["data"]["project_id"]
    response = await http.post("/api/graph/build", json={"project_id": project_id, "chunk_size": 100, "chunk_overlap": 0})
    assert response.status_code == 202, response.text
    return project_id, response.json()["data"]["task_id"]


def _phases(snapshots: list[dict[str, Any]]) -> list[str]:
    phases: list[str] = []
    for s in snapshots:
        phase = s["progress_detail"].get("phase")
        if phase and (not phases or phases[-1] != phase):
            phases.append(phase)
    return phases


async def test_clean_build_streams_every_phase(live_server: Any, tmp_path: Path, fake_zep: FakeZep) -> None:
    fake_zep.page_size_cap = 3
    async with _taskmon(live_server, tmp_path, fake_zep) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        project_id, task_id = await _start_build(http, _story(8))
        snapshots, end = await follow_stream(srv.url, task_id)

        assert end == {"task_id": task_id, "status": "completed"}
        assert_well_ordered(snapshots)
        assert snapshots[0]["status"] == "pending" and snapshots[0]["version"] == 1
        assert snapshots[0]["metadata"] == {
            "project_id": project_id,
            "graph_name": "story",
            "chunk_size": 100,
            "chunk_overlap": 0,
            "text_length": len(_story(8)),
            "backend": "zep",
        }
        assert _phases(snapshots) == ["reading", "chunking", "creating_graph", "adding", "processing", "reading_graph", "finishing"]
        processing = [s for s in snapshots if s["progress_detail"].get("phase") == "processing"]
        assert [s["progress_detail"]["batch_status"] for s in processing] == ["processing", "succeeded"]
        assert processing[-1]["progress_detail"]["items_succeeded"] == 8
        assert processing[-1]["progress_detail"]["batch"] == 1 and processing[-1]["progress_detail"]["total_batches"] == 1

        final = snapshots[-1]
        graph_id = final["result"]["graph_id"]
        assert final["progress"] == 100
        assert final["result"] == {
            "project_id": project_id,
            "graph_id": graph_id,
            "node_count": len(fake_zep.nodes[graph_id]),
            "edge_count": len(fake_zep.edges[graph_id]),
            "chunk_count": 8,
            "backend": "zep",
            "items_succeeded": 8,
            "items_failed": 0,
            "items_rejected": 0,
            "retries": 0,
            "partial": False,
            "warnings": [],
        }
        assert len(fake_zep.items_of(graph_id)) == 8
        assert not any(s["message"].startswith("Retrying") for s in snapshots)

        data = (await http.get(f"/api/graph/data/{graph_id}")).json()["data"]
        assert (data["node_count"], data["edge_count"]) == (final["result"]["node_count"], final["result"]["edge_count"])
        assert {n["uuid"] for n in data["nodes"]} == {n["uuid"] for n in fake_zep.nodes[graph_id].values()}

        project = (await http.get(f"/api/graph/project/{project_id}")).json()["data"]
        assert project["status"] == "graph_completed" and project["graph_id"] == graph_id

        response = await http.delete(f"/api/graph/delete/{graph_id}")
        assert response.status_code == 200 and graph_id not in fake_zep.graphs
        response = await http.get(f"/api/graph/data/{graph_id}")
        assert response.status_code == 404 and response.json() == {"success": False, "error": "graph not found"}


async def test_build_recovers_from_transient_errors_and_shows_each_retry(live_server: Any, tmp_path: Path, fake_zep: FakeZep) -> None:
    fake_zep.fail("POST", r"/batches$", status=429, retry_after="1")
    fake_zep.fail("POST", r"/items$", hold=True)  # times out once (client timeout 1 s)
    fake_zep.fail("GET", r"/batches/", status=503)
    async with _taskmon(live_server, tmp_path, fake_zep, timeout=1.0) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        _, task_id = await _start_build(http, _story(5))
        snapshots, end = await follow_stream(srv.url, task_id)

    assert end["status"] == "completed"
    assert_well_ordered(snapshots)
    retry_messages = [s["message"] for s in snapshots if s["message"].startswith("Retrying")]
    assert retry_messages == [
        "Retrying create batch: rate limited (HTTP 429); retry 1/3 in 1 s",
        "Retrying add items: timed out; retry 1/3 in " + retry_messages[1].rsplit(" in ", 1)[1],
        "Retrying get batch: server error (HTTP 503); retry 1/3 in " + retry_messages[2].rsplit(" in ", 1)[1],
    ]
    counts = [s["progress_detail"]["retries"] for s in snapshots if s["message"].startswith("Retrying")]
    assert counts == [1, 2, 3]
    final = snapshots[-1]
    assert final["result"]["retries"] == 3
    assert [r["reason"] for r in final["progress_detail"]["retry_log"]] == [
        "rate limited (HTTP 429)",
        "timed out",
        "server error (HTTP 503)",
    ]
    assert final["progress_detail"]["retry_log"][0]["delay_s"] >= 1.0  # Retry-After honoured
    graph_id = final["result"]["graph_id"]
    assert len(fake_zep.items_of(graph_id)) == 5  # the timed-out add_items was not applied twice
    assert final["result"]["items_succeeded"] == 5


async def test_build_fails_on_401_without_retrying(live_server: Any, tmp_path: Path, fake_zep: FakeZep) -> None:
    async with _taskmon(live_server, tmp_path, fake_zep, key="not-the-key") as srv, httpx.AsyncClient(base_url=srv.url) as http:
        project_id, task_id = await _start_build(http, _story(3))
        snapshots, end = await follow_stream(srv.url, task_id)
        project = (await http.get(f"/api/graph/project/{project_id}")).json()["data"]

    assert end == {"task_id": task_id, "status": "failed"}
    assert_well_ordered(snapshots)
    final = snapshots[-1]
    assert final["error"] == "Zep create graph: rejected the API key (HTTP 401: invalid API key)"
    assert "not-the-key" not in str(final) and "Traceback" not in str(final)
    assert not any(s["message"].startswith("Retrying") for s in snapshots)
    assert final["progress_detail"]["retries"] == 0
    assert fake_zep.count("POST", r"/graphs$") == 1
    assert project["status"] == "failed" and project["error"] == final["error"]


async def test_partial_batch_and_rejected_items_are_reported(live_server: Any, tmp_path: Path, fake_zep: FakeZep) -> None:
    text = _story(6, {1: "REJECT", 3: "FAIL", 4: "FAIL"})
    async with _taskmon(live_server, tmp_path, fake_zep) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        _, task_id = await _start_build(http, text)
        snapshots, end = await follow_stream(srv.url, task_id)

    assert end["status"] == "completed"
    messages = [s["message"] for s in snapshots]
    assert "Batch 1/1: 1 of 6 chunks rejected" in messages
    assert "Batch 1/1: partial, 3 of 5 chunks processed, 2 failed" in messages
    result = snapshots[-1]["result"]
    assert result["partial"] is True
    assert (result["items_succeeded"], result["items_failed"], result["items_rejected"]) == (3, 3, 1)
    assert result["warnings"] == [
        "batch 1/1: 1 chunk(s) rejected, e.g. chunk 1: content policy violation",
        "batch 1/1: 2 of 5 chunks failed in processing",
    ]
    assert snapshots[-1]["progress_detail"]["rejected_sample"] == [{"index": 1, "reason": "content policy violation"}]


@pytest.mark.parametrize(
    ("word", "error"),
    [
        ("FAIL", "batch 1/1 ended failed: 3 of 3 chunks failed"),
        ("REJECT", "the graph backend accepted none of the 3 chunks"),
    ],
)
async def test_nothing_ingested_fails_the_build(live_server: Any, tmp_path: Path, fake_zep: FakeZep, word: str, error: str) -> None:
    text = _story(3, {0: word, 1: word, 2: word})
    async with _taskmon(live_server, tmp_path, fake_zep) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        project_id, task_id = await _start_build(http, text)
        snapshots, end = await follow_stream(srv.url, task_id)
        project = (await http.get(f"/api/graph/project/{project_id}")).json()["data"]

    assert end["status"] == "failed"
    assert snapshots[-1]["error"] == error
    assert project["status"] == "failed" and project["error"] == error


async def test_zep_outage_during_graph_read_is_a_502(live_server: Any, tmp_path: Path, fake_zep: FakeZep) -> None:
    async with _taskmon(live_server, tmp_path, fake_zep) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        _, task_id = await _start_build(http, _story(2))
        snapshots, _ = await follow_stream(srv.url, task_id)
        graph_id = snapshots[-1]["result"]["graph_id"]
        fake_zep.fail("POST", r"/nodes/list$", status=500, times=10)
        response = await http.get(f"/api/graph/data/{graph_id}")
    assert response.status_code == 502
    assert response.json() == {"success": False, "error": "Zep list nodes failed after 4 attempts: server error (HTTP 500)"}
