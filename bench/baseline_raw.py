"""The floor of the producer path (issue 10): a raw ASGI app that parses a PATCH, encodes once, answers.

No framework, no validation beyond "a JSON object", no store, no events: what one Python process on
uvicorn (uvloop + httptools, as taskmon and the naive app run) can answer at best. The producer
scenario of ``bench.run`` prints it beside taskmon and the naive app so that "PATCH/s" has a ceiling.

Routes (the subset of PROTOCOL.md the producer bench uses): ``POST /api/tasks`` (201),
``PATCH /api/tasks/{id}`` (200, the new snapshot), ``GET /healthz``.

Run:  python -m bench.baseline_raw --host 127.0.0.1 --port 8767
"""

from __future__ import annotations

import argparse
import json
import uuid
from datetime import datetime, timezone

_JSON = [(b"content-type", b"application/json")]
_PREFIX = "/api/tasks/"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class RawApp:
    def __init__(self) -> None:
        self.tasks: dict[str, dict] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if method == "PATCH" and path.startswith(_PREFIX):
            status, payload = self.patch(path[len(_PREFIX):], body)
        elif method == "POST" and path == "/api/tasks":
            status, payload = self.create(body)
        elif method == "GET" and path == "/healthz":
            status, payload = 200, b'{"success":true,"status":"ok"}'
        else:
            status, payload = 404, b'{"success":false,"error":"not found"}'
        await send({"type": "http.response.start", "status": status,
                    "headers": _JSON + [(b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    def create(self, body: bytes) -> tuple[int, bytes]:
        try:
            fields = json.loads(body)
        except ValueError:
            return 400, b'{"success":false,"error":"invalid JSON"}'
        if not isinstance(fields, dict) or not isinstance(fields.get("task_type"), str):
            return 400, b'{"success":false,"error":"task_type is required"}'
        now = _now()
        task = {"task_id": str(uuid.uuid4()), "task_type": fields["task_type"], "status": "pending",
                "created_at": now, "updated_at": now, "progress": 0, "message": "", "progress_detail": {},
                "result": None, "error": None, "metadata": fields.get("metadata") or {}, "version": 1}
        self.tasks[task["task_id"]] = task
        return 201, b'{"success":true,"data":' + json.dumps(task, separators=(",", ":")).encode() + b"}"

    def patch(self, task_id: str, body: bytes) -> tuple[int, bytes]:
        current = self.tasks.get(task_id)
        if current is None:
            return 404, b'{"success":false,"error":"task not found"}'
        try:
            fields = json.loads(body)
        except ValueError:
            return 400, b'{"success":false,"error":"invalid JSON"}'
        if not isinstance(fields, dict) or not fields:
            return 400, b'{"success":false,"error":"give a JSON object"}'
        task = {**current, **fields, "updated_at": _now(), "version": current["version"] + 1}
        self.tasks[task_id] = task
        return 200, b'{"success":true,"data":' + json.dumps(task, separators=(",", ":")).encode() + b"}"


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8767)
    args = parser.parse_args(argv)
    uvicorn.run(RawApp(), host=args.host, port=args.port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, backlog=4096, lifespan="on")


if __name__ == "__main__":
    main()
