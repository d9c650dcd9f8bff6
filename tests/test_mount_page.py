"""The page in a real Chromium when taskmon is not at ``/``: mounted in a host app at /progress, and
behind a prefix-stripping proxy with ``--root-path /progress``. The set-up of tests/test_page.py
(page_helpers); every request the page makes must stay under the prefix.

Needs the page's relative URLs (static/ without leading slashes: ``static/app.js``, ``api/...``,
``tasks/...``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from page_helpers import Pages, Producer, chromium
from playwright.async_api import expect
from starlette.types import ASGIApp, Receive, Scope, Send
from test_mount import PREFIX, host_app, serve

from server.app import TaskmonApp, create_app
from server.settings import Settings

pytestmark = pytest.mark.anyio

WITHIN = 1000  # ms, as tests/test_page.py
LOAD = 5000


def behind_stripping_proxy(app: TaskmonApp) -> ASGIApp:
    """What the app sees behind ``location /progress/ { proxy_pass http://taskmon/; }`` run with
    ``uvicorn --root-path /progress``: root_path set, path still the full one (ASGI spec)."""

    async def proxy(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(PREFIX + "/"):
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"outside the prefix"})
            return
        await app(dict(scope, root_path=PREFIX) if scope["type"] == "http" else scope, receive, send)

    return proxy


@pytest.fixture
async def pages() -> AsyncIterator[Pages]:
    async with chromium() as browser:
        opened = Pages(browser)
        try:
            yield opened
        finally:
            await opened.close()


@pytest.mark.parametrize("how", ["mount", "root_path"])
async def test_the_page_follows_tasks_under_a_prefix(settings: Settings, pages: Pages, how: str) -> None:
    taskmon = create_app(settings)
    app: Any = host_app(taskmon) if how == "mount" else behind_stripping_proxy(taskmon)
    async with serve(app, taskmon) as url, httpx.AsyncClient(base_url=f"{url}{PREFIX}") as http:
        producer = Producer(http)
        task_id = (await producer.create("prefixed"))["task_id"]
        page, watch = await pages.open(f"{url}{PREFIX}/")
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        await page.reload()
        row = page.locator(f'#task-list > li[data-task-id="{task_id}"]')
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
        await expect(row).to_be_visible(timeout=LOAD)
        await producer.patch(task_id, status="processing", progress=25, message="Under a prefix")
        await expect(row.locator(".pct")).to_have_text("25%", timeout=WITHIN)
        await row.locator("a").click()
        await expect(page.locator("#detail-message")).to_have_text("Under a prefix", timeout=LOAD)
        await producer.patch(task_id, progress=60, message="Still under it")
        await expect(page.locator("#detail-progress-label")).to_have_text("60%", timeout=WITHIN)
        await producer.patch(task_id, status="completed", progress=100, message="Done", result={"ok": True})
        await expect(page.locator("#detail-status")).to_have_text("Completed", timeout=WITHIN)
        assert requested, "the page made no request"
        outside = [u for u in requested if not u.startswith(f"{url}{PREFIX}/") and u.startswith("http")]
        assert outside == [], f"the page left the prefix: {outside}"
        # the live stream is opened by the page's shared worker (not a page request): the worker
        # script itself came from under the prefix, and the server holds the one stream it opened
        assert any(u.startswith(f"{url}{PREFIX}/static/") and "worker" in u for u in requested), requested
        # (wait: a stream the worker replaced is forgotten a moment after its client goes)
        with anyio.fail_after(5):
            while taskmon.state.manager.bus.open_streams != 1:
                await anyio.sleep(0.02)
        assert watch.errors == []
