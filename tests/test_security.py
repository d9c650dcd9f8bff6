"""Issue 11, rows 8-12: what a cross-site page, a rebinding DNS name, a leaked log line, a client
that hangs up mid-body and a hostile task message can do (nothing), against the real app."""

from __future__ import annotations

import json
import logging
import re
import socket

import anyio
import httpx
import pytest
from conftest import running
from test_cli import ROOT, _env, _watch_cmd
from test_limits import taskmon_serve

from server.app import create_app
from server.auth import mint_task_token, verify_task_token
from server.logs import RedactTokens, configure_logging
from server.security import API_CSP, CSP
from server.settings import Settings

pytestmark = pytest.mark.anyio

EVIL = "http://evil.example"
JSON = {"content-type": "application/json"}


def envelope(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert body["success"] is False and isinstance(body["error"], str)
    return str(body["error"])


def _client(app, host: str = "localhost") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{host}")


# ------------------------------------------------------------------ row 8: cross-site requests


async def test_cross_site_posts_are_refused_and_create_nothing(client):
    manager = client.app.state.manager
    # What a page on another site can send without a preflight: text/plain, form, multipart.
    simple = [
        {"content": b'{"task_type": "t"}', "headers": {"content-type": "text/plain"}},
        {"content": b"task_type=t", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        {"files": {"f": ("a.txt", b'{"task_type": "t"}')}},
    ]
    for kwargs in simple:
        headers = {"origin": EVIL, **kwargs.pop("headers", {})}
        assert "Origin" in envelope(await client.post("/api/tasks", headers=headers, **kwargs), 403)
        # Without Origin (curl): still not JSON, so 415.
        envelope(await client.post("/api/tasks", headers={k: v for k, v in headers.items() if k != "origin"}, **kwargs), 415)
    envelope(await client.post("/api/graph/project", files={"files": ("a.txt", b"Alice met Bob.")}, headers={"origin": EVIL}), 403)
    envelope(await client.request("DELETE", "/api/graph/delete/local_" + "0" * 32, headers={"origin": "null"}), 403)
    envelope(await client.post("/api/graph/build", content=b'{"project_id": "x"}', headers={"origin": EVIL, **JSON}), 403)
    assert manager.list_tasks() == []
    # Same origin (the page itself) and no Origin (curl, scripts) with JSON work.
    assert (await client.post("/api/tasks", json={"task_type": "t"}, headers={"origin": "http://localhost"})).status_code == 201
    assert (await client.post("/api/tasks", json={"task_type": "t"})).status_code == 201
    # Multipart stays accepted where uploads are.
    assert (await client.post("/api/graph/project", files={"files": ("a.txt", b"Alice met Bob.")})).status_code == 201


async def test_an_allowed_cors_origin_may_post(settings):
    async with running(create_app(settings.with_changes(cors_origins=("http://ok.example",)))) as app, _client(app) as http:
        response = await http.post("/api/tasks", json={"task_type": "t"}, headers={"origin": "http://ok.example"})
        assert response.status_code == 201
        assert response.headers["access-control-allow-origin"] == "http://ok.example"
        envelope(await http.post("/api/tasks", json={"task_type": "t"}, headers={"origin": EVIL}), 403)


async def test_foreign_host_is_refused_everywhere_including_streams(settings):
    async with running(create_app(settings)) as app:
        task = app.state.manager.create_task("t")
        async with _client(app, "rebound.evil.example") as http:
            for path in ("/", "/healthz", "/api/graph/tasks", f"/tasks/{task.task_id}/stream", "/tasks/stream"):
                assert "host" in envelope(await http.get(path), 400)
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            async with _client(app, host) as http:
                assert (await http.get("/healthz")).status_code == 200, host


@pytest.mark.parametrize(
    ("changes", "host", "status"),
    [
        ({"host": "10.1.2.3"}, "10.1.2.3:8000", 200),  # bound to a specific address: that name too
        ({"host": "0.0.0.0"}, "10.1.2.3", 400),  # a wildcard bind adds nothing
        ({"allowed_hosts": ("tasks.example.org",)}, "tasks.example.org", 200),
        ({"allowed_hosts": ("tasks.example.org",)}, "localhost", 400),  # the list replaces the default
        ({"allowed_hosts": ("*",)}, "anything.example", 200),
    ],
)
async def test_host_allow_list_settings(settings, changes, host, status):
    async with running(create_app(settings.with_changes(**changes))) as app, _client(app, host) as http:
        assert (await http.get("/healthz")).status_code == status


async def test_page_sends_csp_nosniff_and_frame_protection(client):
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-security-policy"] == CSP
    assert "default-src 'self'" in CSP and "frame-ancestors 'none'" in CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert (await client.get("/healthz")).headers["x-content-type-options"] == "nosniff"


async def test_api_answers_carry_the_strict_policy_and_the_page_files_its_own(client):
    # JSON answers (the PATCH fast path included): nothing may load, run or frame them
    created = (await client.post("/api/tasks", json={"task_type": "t"})).json()["data"]
    answers = [
        await client.get("/healthz"),
        await client.get(f"/api/graph/task/{created['task_id']}"),
        await client.patch(f"/api/tasks/{created['task_id']}", json={"status": "processing"}),
        await client.get("/api/graph/task/00000000-0000-0000-0000-000000000000"),  # an error too
    ]
    for response in answers:
        assert response.headers["content-security-policy"] == API_CSP, response.request.url
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
    assert API_CSP == "default-src 'none'; frame-ancestors 'none'"
    page = await client.get("/")
    assert page.headers["content-security-policy"] == CSP
    script = re.search(r'src="([^"]+\.js)"', page.text)
    assert script is not None, "the page loads its script"
    # the page's files keep the page's policy: a script that runs as a (shared) worker is bound by its own
    assert (await client.get("/" + script.group(1).lstrip("/"))).headers["content-security-policy"] == CSP


# ------------------------------------------------------------------ row 12: JSON everywhere


async def test_refused_cors_preflight_is_the_json_envelope(settings):
    async with running(create_app(settings.with_changes(cors_origins=("http://ok.example",)))) as app, _client(app) as http:
        preflight = {"origin": EVIL, "access-control-request-method": "POST"}
        message = envelope(await http.options("/api/tasks", headers=preflight), 400)
        assert "CORS" in message
        allowed = await http.options("/api/tasks", headers={**preflight, "origin": "http://ok.example"})
        assert allowed.status_code == 200


# ------------------------------------------------------------------ row 9: tokens


async def test_api_token_is_header_only_and_task_tokens_grant_one_task(live_server, settings):
    settings = settings.with_changes(api_token="pr0ducer", read_token="r3ader")
    producer = {"authorization": "Bearer pr0ducer"}
    async with live_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        task = srv.manager.create_task("t")
        other = srv.manager.create_task("t")
        url = f"/api/graph/task/{task.task_id}"
        envelope(await http.get(url, params={"access_token": "pr0ducer"}), 401)  # API token: not in a URL
        assert (await http.get(url, headers=producer)).status_code == 200
        assert (await http.get(url, params={"access_token": "r3ader"})).status_code == 200

        envelope(await http.post(f"/api/tasks/{task.task_id}/token"), 401)  # minting needs the producer token
        envelope(await http.post(f"/api/tasks/{task.task_id}/token", json={"ttl_s": 10**9}, headers=producer), 400)
        minted = await http.post(f"/api/tasks/{task.task_id}/token", json={"ttl_s": 60}, headers=producer)
        assert minted.status_code == 200, minted.text
        data = minted.json()["data"]
        assert data["task_id"] == task.task_id and data["expires_at"].endswith("+00:00")
        token = data["token"]

        assert (await http.get(url, params={"access_token": token})).status_code == 200
        assert (await http.get(url, headers={"authorization": f"Bearer {token}"})).status_code == 200
        async with http.stream("GET", f"/tasks/{task.task_id}/stream", params={"access_token": token}) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
        # ... and nothing else: another task, the list, the all-tasks stream, the metrics, writes.
        envelope(await http.get(f"/api/graph/task/{other.task_id}", params={"access_token": token}), 401)
        envelope(await http.get(f"/tasks/{other.task_id}/stream", params={"access_token": token}), 401)
        envelope(await http.get("/api/graph/tasks", params={"access_token": token}), 401)
        envelope(await http.get("/tasks/stream", params={"access_token": token}), 401)
        envelope(await http.get("/metrics", params={"access_token": token}), 401)
        envelope(await http.patch(f"/api/tasks/{task.task_id}", json={"progress": 5}, headers={"authorization": f"Bearer {token}"}), 401)
        tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        envelope(await http.get(url, params={"access_token": tampered}), 401)


def test_task_tokens_expire_and_depend_on_the_secret() -> None:
    settings = Settings(store_url="memory://", read_token="r", secret="s1")
    task_id = "0b6f1a52-8a3e-4e0c-9d7a-2f3c4b5a6d7e"
    token, expires = mint_task_token(settings, task_id, 30, now=lambda: 1_000.0)
    assert expires == 1_030
    assert verify_task_token(settings, token, task_id, now=lambda: 1_029.9)
    assert not verify_task_token(settings, token, task_id, now=lambda: 1_030.0)  # expired
    assert not verify_task_token(settings.with_changes(secret="s2"), token, task_id, now=lambda: 1_000.0)
    forged = token.replace(".1030.", ".9999999999.")
    assert not verify_task_token(settings, forged, task_id, now=lambda: 1_000.0)


async def test_taskmon_serve_access_log_never_shows_query_tokens(tmp_path):
    log = tmp_path / "stderr.log"
    async with taskmon_serve(tmp_path, "--access-log", stderr=log, TASKMON_READ_TOKEN="r3ad-s3cret") as srv:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            response = await http.get("/api/graph/tasks", params={"access_token": "r3ad-s3cret", "status": "failed"})
            assert response.status_code == 200
            await http.get("/api/graph/tasks", params={"token": "other-s3cret"})
        with anyio.fail_after(10):
            while log.read_text().count("/api/graph/tasks?") < 2:
                await anyio.sleep(0.05)
    text = log.read_text()
    assert "s3cret" not in text, text
    assert "access_token=[redacted]" in text and "status=failed" in text and "token=[redacted]" in text


def test_access_log_filter_is_configured() -> None:
    # The filter configure_logging() puts on uvicorn's access logger, on a record as uvicorn makes it.
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    records: list[logging.LogRecord] = []
    collect = logging.Handler()
    collect.emit = records.append  # type: ignore[method-assign]
    config = configure_logging("warning", access_log=True)
    access = logging.getLogger("uvicorn.access")
    try:
        assert config["loggers"]["uvicorn.access"]["filters"] == ["redact_tokens"]
        assert any(isinstance(f, RedactTokens) for f in access.filters)
        root.handlers[:] = [collect]
        access.info(
            '%s - "%s %s HTTP/%s" %d',
            "127.0.0.1:5000", "GET", "/tasks/x/stream?status=running&access_token=s3cr3t&token=t0k", "1.1", 200,
        )
        message = records[-1].getMessage()
        assert "s3cr3t" not in message and "t0k" not in message
        assert "access_token=[redacted]" in message and "status=running" in message
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        access.filters.clear()
        for name in ("server", "uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_new_settings_are_read_and_checked() -> None:
    from server.settings import SettingsError

    settings = Settings.from_env({"TASKMON_ALLOWED_HOSTS": "Tasks.Example.org, *", "TASKMON_MAX_PROJECT_CHARS": "10"})
    assert settings.allowed_hosts == ("tasks.example.org", "*") and settings.max_project_chars == 10
    for var, value in [("TASKMON_MAX_HEADER_BYTES", "10"), ("TASKMON_HEADER_TIMEOUT_S", "inf"),
                       ("TASKMON_MAX_CONNECTIONS", "0"), ("TASKMON_PDF_TIME_BUDGET_S", "0"), ("TASKMON_TASK_TOKEN_TTL_S", "0")]:
        with pytest.raises(SettingsError, match=var):
            Settings.from_env({var: value})


# ------------------------------------------------------------------ row 10: disconnect mid-body


async def test_client_disconnect_mid_body_is_one_debug_line_not_a_500(live_server, settings, caplog):
    caplog.set_level(logging.DEBUG)
    async with live_server(settings) as srv:
        for path in ("/api/tasks", "/api/graph/project"):
            with socket.create_connection(("127.0.0.1", srv.settings.port)) as sock:
                sock.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    "Content-Length: 100000\r\n\r\n{\"task_type\": ".encode()
                )
        with anyio.fail_after(10):
            while len([r for r in caplog.records if r.getMessage() == "client disconnected mid-body"]) < 2:
                await anyio.sleep(0.02)
        async with httpx.AsyncClient(base_url=srv.url) as http:  # and the server is fine
            assert (await http.get("/healthz")).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "disconnect" not in r.getMessage()], [
        (r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING
    ]
    lines = [r for r in caplog.records if r.getMessage() == "client disconnected mid-body"]
    assert [r.levelno for r in lines] == [logging.DEBUG, logging.DEBUG]
    assert not any(r.exc_info for r in caplog.records)
    assert srv.manager.list_tasks() == []


# ------------------------------------------------------------------ row 11: taskmon watch


async def test_watch_prints_markup_and_escapes_as_plain_text(live_server, settings):
    async with live_server(settings) as srv:
        manager = srv.manager
        task = manager.create_task("t")
        manager.update_task(task.task_id, status="processing", progress=50, message="[/bold] done \x1b[2J\x07")
        manager.update_task(
            task.task_id, status="completed", progress=100, message="[/bold] done \x1b[2J",
            result={"note": "[red]x[/red] \x1b]0;pwned\x07 \x9b31m"},
        )
        with anyio.fail_after(30):
            done = await anyio.run_process(_watch_cmd(task.task_id, srv.url), cwd=ROOT, env=_env(), check=False)
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, (stdout, stderr)
    assert "\x1b" not in stdout + stderr and "\x07" not in stdout + stderr and "\x9b" not in stdout + stderr
    last = stdout.strip().splitlines()[-1]
    assert json.loads(last) == {"note": "[red]x[/red] \x1b]0;pwned\x07 \x9b31m"}  # escaped, still the same JSON
    assert "[red]x[/red]" in last
