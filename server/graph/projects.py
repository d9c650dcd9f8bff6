"""Projects on the filesystem: ``<data_dir>/projects/<project_id>/``.

Layout of one project directory (every name in it is chosen here, never taken from a client)::

    project.json        metadata (status, files, graph id, build task id, ...)
    text.txt            the extracted text, UTF-8
    files/upload-001.pdf, files/upload-002.txt, ...   the uploaded originals

A project id is validated against ``PROJECT_ID_RE`` before any path is built from it. A new
project is assembled in a hidden staging directory and renamed into place, so a failed upload
leaves nothing behind. Metadata writes are atomic (temp file + ``os.replace``) and serialised
per store with a lock, so job threads and request handlers can update a project concurrently.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ..models import utcnow

logger = logging.getLogger(__name__)

PROJECT_ID_RE = re.compile(r"^proj_[0-9a-f]{12}$")
MAX_NAME_LENGTH = 200
TEXT_PREVIEW_CHARS = 500


class ProjectStatus(str, Enum):
    CREATED = "created"
    GRAPH_BUILDING = "graph_building"
    GRAPH_COMPLETED = "graph_completed"
    FAILED = "failed"


class ProjectNotFound(LookupError):
    """No project with that id (unknown or malformed)."""


@dataclass(frozen=True)
class SourceFile:
    """One uploaded file, already decoded: ``filename`` is for display only."""

    filename: str
    suffix: str
    data: bytes
    text: str


def is_project_id(value: object) -> bool:
    return isinstance(value, str) and PROJECT_ID_RE.fullmatch(value) is not None


def clean_name(value: object, *, field: str = "name") -> str:
    """A display name: a non-empty string without control characters, at most 200 characters."""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string")
    value = value.strip()
    if not value:
        raise ValueError(f"{field} must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{field} must be at most {MAX_NAME_LENGTH} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise ValueError(f"{field} must not contain control characters")
    return value


def _remove_tree(path: Path) -> None:
    def _log(function: object, failed: str, exc_info: object) -> None:
        logger.warning("could not remove a project file", extra={"path_name": Path(failed).name})

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=_log)
    else:
        shutil.rmtree(path, onerror=_log)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ProjectStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir).resolve() / "projects"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    # -- paths ---------------------------------------------------------------------------------
    def _dir(self, project_id: str) -> Path:
        if not is_project_id(project_id):
            raise ProjectNotFound(project_id)
        return self.root / project_id

    # -- create --------------------------------------------------------------------------------
    def create(self, name: str, text: str, files: Sequence[SourceFile] = ()) -> dict[str, Any]:
        """Write a new project (text plus originals) and return its metadata."""
        name = clean_name(name)
        project_id = f"proj_{uuid.uuid4().hex[:12]}"
        now = utcnow().isoformat()
        file_meta = [
            {
                "filename": f.filename,
                "stored_as": f"upload-{i:03d}{f.suffix}",
                "size": len(f.data),
                "text_length": len(f.text),
            }
            for i, f in enumerate(files, start=1)
        ]
        meta: dict[str, Any] = {
            "project_id": project_id,
            "name": name,
            "status": ProjectStatus.CREATED.value,
            "created_at": now,
            "updated_at": now,
            "files": file_meta,
            "total_text_length": len(text),
            "graph_id": None,
            "graph_build_task_id": None,
            "chunk_size": None,
            "chunk_overlap": None,
            "error": None,
        }
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))
        try:
            (staging / "files").mkdir()
            for f, fm in zip(files, file_meta, strict=True):
                (staging / "files" / fm["stored_as"]).write_bytes(f.data)
            (staging / "text.txt").write_text(text, encoding="utf-8")
            (staging / "project.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
            os.rename(staging, self.root / project_id)
        except BaseException:
            _remove_tree(staging)
            raise
        logger.info("project created", extra={"project_id": project_id, "files": len(files), "chars": len(text)})
        return meta

    # -- read ----------------------------------------------------------------------------------
    def get(self, project_id: str) -> dict[str, Any]:
        path = self._dir(project_id) / "project.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ProjectNotFound(project_id) from None
        meta: dict[str, Any] = json.loads(data)
        return meta

    def text(self, project_id: str) -> str:
        try:
            return (self._dir(project_id) / "text.txt").read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ProjectNotFound(project_id) from None

    def list(self) -> list[dict[str, Any]]:
        """Every project, newest first."""
        projects = []
        for entry in self.root.iterdir():
            if not is_project_id(entry.name):
                continue  # staging directories and anything foreign
            try:
                projects.append(self.get(entry.name))
            except ProjectNotFound:
                continue  # deleted meanwhile
        projects.sort(key=lambda p: p["created_at"], reverse=True)
        return projects

    def public(self, meta: dict[str, Any], *, preview: bool = True) -> dict[str, Any]:
        """The project as clients see it: metadata (without storage names), with ``preview`` the
        start of its text."""
        out = {**meta, "files": [{k: v for k, v in f.items() if k != "stored_as"} for f in meta["files"]]}
        if not preview:
            return out
        try:
            with (self._dir(meta["project_id"]) / "text.txt").open(encoding="utf-8") as fh:
                out["text_preview"] = fh.read(TEXT_PREVIEW_CHARS)
        except (ProjectNotFound, FileNotFoundError):
            out["text_preview"] = ""  # deleted meanwhile
        return out

    # -- change --------------------------------------------------------------------------------
    def update(self, project_id: str, *, only_if_task: str | None = None, **changes: Any) -> dict[str, Any] | None:
        """Apply ``changes`` to the metadata. With ``only_if_task``, apply them only while that task
        is still the project's current build (a superseded build must not overwrite a newer one);
        returns None when skipped."""
        with self._lock:
            meta = self.get(project_id)
            if only_if_task is not None and meta.get("graph_build_task_id") != only_if_task:
                return None
            if "status" in changes and isinstance(changes["status"], ProjectStatus):
                changes["status"] = changes["status"].value
            meta.update(changes, updated_at=utcnow().isoformat())
            _write_atomic(self._dir(project_id) / "project.json", json.dumps(meta, ensure_ascii=False).encode())
            return meta

    def delete(self, project_id: str) -> None:
        path = self._dir(project_id)
        with self._lock:
            if not (path / "project.json").is_file():
                raise ProjectNotFound(project_id)
            # Rename first so a concurrent reader sees it gone at once, then remove.
            doomed = self.root / f".deleted-{uuid.uuid4().hex}"
            os.rename(path, doomed)
        _remove_tree(doomed)
        logger.info("project deleted", extra={"project_id": project_id})
