"""The embedded local backend (extraction, persistence) and the filesystem project store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.graph.backends import GraphNotFound, LocalBackend, extract_mentions
from server.graph.projects import ProjectNotFound, ProjectStatus, ProjectStore, SourceFile
from server.graph.service import GraphService
from server.retry import Retrier
from server.settings import Settings

RETRIER = Retrier()

STORY = [
    "Marie Curie worked with Pierre Curie at the University of Paris. They studied radioactivity.",
    "In 1903 Marie Curie won the Nobel Prize with Henri Becquerel. NASA later named a crater after her.",
    "Pierre Curie was born in Paris. The University of Paris hired Marie Curie in 1906.",
]


# ----------------------------------------------------------------------------------- extraction


def test_mentions_are_named_entities_with_kinds() -> None:
    found = [(m.name, m.kind) for m in extract_mentions("The University of Paris hired Marie Curie in Warsaw, not NASA.")]
    assert found == [
        ("University of Paris", "Organization"),
        ("Marie Curie", "Person"),
        ("Warsaw", "Location"),
        ("NASA", "Organization"),
    ]


def test_sentence_starting_stopwords_and_possessives_are_not_entities() -> None:
    assert [m.name for m in extract_mentions("However, Curie's lab was in the Bank of the West building.")] == [
        "Curie",
        "Bank of the West",
    ]
    assert extract_mentions("nothing capitalised here at all") == []


# ----------------------------------------------------------------------------------- backend


def test_local_graph_has_entities_and_relations(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    graph_id = backend.create_graph("curie", "test", RETRIER)
    submitted = backend.submit_batch(graph_id, STORY, RETRIER)
    assert submitted.accepted == 3 and submitted.rejected == []
    state = backend.batch_state(submitted.batch_id, RETRIER)
    assert state.final and state.status == "succeeded" and state.succeeded == 3

    data = backend.graph_data(graph_id, RETRIER)
    names = {n["name"]: n for n in data["nodes"]}
    assert {"Marie Curie", "Pierre Curie", "University of Paris", "Henri Becquerel", "NASA", "Paris"} <= set(names)
    assert names["Marie Curie"]["labels"] == ["Entity", "Person"]
    assert names["University of Paris"]["labels"] == ["Entity", "Organization"]
    assert names["Marie Curie"]["attributes"]["mentions"] == 3
    assert len(names["Marie Curie"]["episode_uuids"]) == 3  # mentioned in every chunk

    triples = {(e["source_node_name"], e["name"], e["target_node_name"]) for e in data["edges"]}
    assert ("Marie Curie", "WORKED", "Pierre Curie") in triples
    assert ("University of Paris", "HIRED", "Marie Curie") in triples
    assert ("Marie Curie", "WON", "Nobel Prize") in triples
    assert (data["node_count"], data["edge_count"]) == (len(data["nodes"]), len(data["edges"]))
    assert backend.counts(graph_id, RETRIER) == (data["node_count"], data["edge_count"])
    # Same keys as the Zep backend's nodes and edges.
    assert set(data["nodes"][0]) == {"uuid", "name", "labels", "summary", "attributes", "created_at", "episode_uuids"}
    assert {"uuid", "name", "fact", "source_node_uuid", "target_node_uuid", "valid_at", "episode_uuids"} <= set(data["edges"][0])
    node_ids = {n["uuid"] for n in data["nodes"]}
    assert all(e["source_node_uuid"] in node_ids and e["target_node_uuid"] in node_ids for e in data["edges"])


def test_extraction_is_deterministic(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    shapes = []
    for _ in range(2):
        graph_id = backend.create_graph("g", "", RETRIER)
        backend.submit_batch(graph_id, STORY, RETRIER)
        data = backend.graph_data(graph_id, RETRIER)
        shapes.append(
            (
                sorted((n["name"], tuple(n["labels"]), n["attributes"]["mentions"]) for n in data["nodes"]),
                sorted((e["source_node_name"], e["name"], e["target_node_name"], e["attributes"]["weight"]) for e in data["edges"]),
            )
        )
    assert shapes[0] == shapes[1]


def test_graph_persists_across_backend_instances_and_batches(tmp_path: Path) -> None:
    first = LocalBackend(tmp_path)
    graph_id = first.create_graph("g", "", RETRIER)
    first.submit_batch(graph_id, STORY[:1], RETRIER)
    first.submit_batch(graph_id, STORY[1:], RETRIER)
    again = LocalBackend(tmp_path)
    assert again.graph_data(graph_id, RETRIER) == first.graph_data(graph_id, RETRIER)
    assert (tmp_path / "graphs" / f"{graph_id}.json").is_file()


def test_delete_and_unknown_or_malformed_ids(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    graph_id = backend.create_graph("g", "", RETRIER)
    backend.delete_graph(graph_id, RETRIER)
    for bad in (graph_id, "local_" + "0" * 32, "../../etc/passwd", "local_XYZ", ""):
        with pytest.raises(GraphNotFound):
            backend.graph_data(bad, RETRIER)
        with pytest.raises(GraphNotFound):
            backend.delete_graph(bad, RETRIER)
    assert list((tmp_path / "graphs").iterdir()) == []


def test_empty_chunks_are_rejected_not_ingested(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    graph_id = backend.create_graph("g", "", RETRIER)
    submitted = backend.submit_batch(graph_id, ["Alice Smith met Bob Jones.", "   "], RETRIER)
    assert submitted.accepted == 1
    assert submitted.rejected == [{"index": 1, "reason": "empty chunk"}]
    assert backend.batch_state(submitted.batch_id, RETRIER).status == "partial"


# ----------------------------------------------------------------------------------- projects


def test_project_files_are_stored_under_generated_names(tmp_path: Path) -> None:
    store = ProjectStore(tmp_path)
    files = [
        SourceFile("notes.txt", ".txt", b"first", "first"),
        SourceFile("notes.txt", ".txt", b"second", "second"),  # same name: both kept
    ]
    meta = store.create("My project", "first\n\nsecond", files)
    project_dir = tmp_path / "projects" / meta["project_id"]
    stored = sorted(p.name for p in (project_dir / "files").iterdir())
    assert stored == ["upload-001.txt", "upload-002.txt"]
    assert [(project_dir / "files" / n).read_bytes() for n in stored] == [b"first", b"second"]
    assert store.text(meta["project_id"]) == "first\n\nsecond"
    public = store.public(meta)
    assert [f["filename"] for f in public["files"]] == ["notes.txt", "notes.txt"]
    assert all("stored_as" not in f for f in public["files"])
    assert public["text_preview"] == "first\n\nsecond"
    assert meta["status"] == "created" and meta["total_text_length"] == len("first\n\nsecond")


def test_malformed_project_ids_never_reach_the_filesystem(tmp_path: Path) -> None:
    store = ProjectStore(tmp_path)
    (tmp_path / "secret.json").write_text("{}")
    for bad in ("../secret", "..", "proj_../../x", "proj_ABCDEF123456", "proj_0123456789ab/..", "", "proj_0123456789abc"):
        with pytest.raises(ProjectNotFound):
            store.get(bad)
        with pytest.raises(ProjectNotFound):
            store.delete(bad)
    assert (tmp_path / "secret.json").exists()


def test_failed_creation_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ProjectStore(tmp_path)

    def broken(self: Path, *args: object, **kwargs: object) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError):
        store.create("p", "text", [SourceFile("a.txt", ".txt", b"text", "text")])
    assert list((tmp_path / "projects").iterdir()) == []


def test_update_only_for_the_current_build(tmp_path: Path) -> None:
    store = ProjectStore(tmp_path)
    project_id = store.create("p", "text")["project_id"]
    store.update(project_id, status=ProjectStatus.GRAPH_BUILDING, graph_build_task_id="new-task")
    assert store.update(project_id, only_if_task="old-task", status=ProjectStatus.FAILED) is None
    assert store.get(project_id)["status"] == "graph_building"
    updated = store.update(project_id, only_if_task="new-task", status=ProjectStatus.GRAPH_COMPLETED)
    assert updated is not None and store.get(project_id)["status"] == "graph_completed"


def test_list_is_newest_first_and_skips_foreign_entries(tmp_path: Path) -> None:
    store = ProjectStore(tmp_path)
    ids = [store.create(f"p{i}", "text")["project_id"] for i in range(3)]
    (tmp_path / "projects" / ".staging-leftover").mkdir()
    (tmp_path / "projects" / "not-a-project").mkdir()
    assert [p["project_id"] for p in store.list()] == list(reversed(ids))
    store.delete(ids[0])
    assert [p["project_id"] for p in store.list()] == [ids[2], ids[1]]
    with pytest.raises(ProjectNotFound):
        store.get(ids[0])


@pytest.mark.anyio
async def test_a_build_left_running_by_a_dead_process_is_marked_failed(tmp_path: Path) -> None:
    from server.app import create_app

    settings = Settings(store_url="memory://", data_dir=tmp_path / "data")
    store = ProjectStore(settings.data_dir)
    project_id = store.create("p", "text")["project_id"]
    store.update(project_id, status=ProjectStatus.GRAPH_BUILDING, graph_build_task_id="0b7d6c8e-8d55-4a55-9a10-1d6e1f6f2a01")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        service: GraphService = app.state.graph
        meta = service.projects.get(project_id)
    assert meta["status"] == "failed"
    assert meta["error"].startswith("interrupted")
    assert json.loads((settings.data_dir / "projects" / project_id / "project.json").read_text())["status"] == "failed"
