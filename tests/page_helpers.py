"""Helpers for the browser tests of the live page (tests/test_page.py, tests/test_tabs.py).

Debian's Chromium driven by Playwright's Python package; the producer API called with httpx.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import LiveServer, require_tool
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Dialog, Page, async_playwright



CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

# Counts the EventSource objects a page opens itself (none while the shared worker holds the stream;
# one in the per-tab fallback) and their URLs. Installed before any page script runs; workers are
# not instrumented (count their requests with ProxiedServer or the server's open streams).
TRACK_EVENTSOURCES = """
(() => {
  const Native = window.EventSource;
  const stats = { open: 0, max: 0, urls: [] };
  window.__streams = stats;
  window.EventSource = class extends Native {
    constructor(url, init) {
      super(url, init);
      this.__closed = false;
      stats.open += 1;
      stats.max = Math.max(stats.max, stats.open);
      stats.urls.push(String(url));
    }
    close() {
      if (!this.__closed) { this.__closed = true; stats.open -= 1; }
      super.close();
    }
  };
})();
"""


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Debian's Chromium; skipped when missing on a developer machine, a failure in CI."""
    require_tool(str(CHROMIUM), "the page tests drive it; apt-get install chromium")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


# Fixtures for the page test modules, imported by name (``from page_helpers import browser, pages``):
# module-wide, so one Chromium serves every test of a module (each test gets fresh pages).
@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def browser(anyio_backend: str) -> AsyncIterator[Browser]:
    async with chromium() as running:
        yield running


@pytest.fixture
async def pages(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Pages]:
    """Fresh pages on the module's browser; a module may set ``PAGE_INIT_SCRIPTS`` for every page."""
    opened = Pages(browser, init_scripts=list(getattr(request.module, "PAGE_INIT_SCRIPTS", ())))
    try:
        yield opened
    finally:
        await opened.close()


@dataclass
class PageWatch:
    """What a page did that a test wants to assert on afterwards."""

    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("dialog", self._on_dialog)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("console", self._on_console)

    async def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    def _on_console(self, message: ConsoleMessage) -> None:
        # "Failed to load resource" lines are the browser reporting expected 4xx/refused connections.
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.errors.append(f"console: {message.text}")


class Pages:
    """Opens pages in fresh browser contexts (own storage, own EventSources) and closes them all."""

    def __init__(self, browser: Browser, init_scripts: list[str] | None = None) -> None:
        self.browser = browser
        self.init_scripts = list(init_scripts or [])  # run in every page before its own scripts
        self._contexts: list[BrowserContext] = []

    async def open(
        self, url: str, *, width: int = 1280, height: int = 900, color_scheme: str = "light"
    ) -> tuple[Page, PageWatch]:
        context = await self.browser.new_context(
            viewport={"width": width, "height": height}, color_scheme=color_scheme, reduced_motion="reduce"
        )
        self._contexts.append(context)
        await context.add_init_script(TRACK_EVENTSOURCES)
        for script in self.init_scripts:
            await context.add_init_script(script)
        page = await context.new_page()
        watch = PageWatch()
        watch.attach(page)
        await page.goto(url)
        return page, watch

    async def close(self) -> None:
        for context in self._contexts:
            await context.close()
        self._contexts.clear()


async def stream_stats(page: Page) -> dict[str, Any]:
    return await page.evaluate("() => ({...window.__streams, urls: [...window.__streams.urls]})")


class Producer:
    """The producer API, as a job in another process would call it."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def create(self, task_type: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"task_type": task_type}
        if metadata is not None:
            body["metadata"] = metadata
        response = await self.client.post("/api/tasks", json=body)
        assert response.status_code == 201, response.text
        return response.json()["data"]

    async def patch(self, task_id: str, **changes: Any) -> dict[str, Any]:
        response = await self.client.patch(f"/api/tasks/{task_id}", json=changes)
        assert response.status_code == 200, response.text
        return response.json()["data"]

    async def get(self, task_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/api/graph/task/{task_id}")
        assert response.status_code == 200, response.text
        return response.json()["data"]


def behind_prefix(app: Any, prefix: str, log: list[str]) -> Any:
    """ASGI: what a reverse proxy does with ``location /progress/ { proxy_pass http://taskmon/; }``.

    Requests under ``prefix`` reach ``app`` with the prefix cut off; anything else is a plain 404, so
    a page URL that ignores the prefix (a leading slash) fails to load. Every request that reaches
    the app is logged as ``path?query`` (the browser's connections, whatever opened them: a page or a
    worker)."""
    raw_prefix = prefix.encode()

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)  # lifespan
            return
        path = scope["path"]
        if not path.startswith(prefix + "/"):
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"outside the mount"})
            return
        raw = scope.get("raw_path") or path.encode()
        inner = dict(scope, path=path[len(prefix) :], raw_path=raw[len(raw_prefix) :])
        query = scope.get("query_string", b"").decode("latin-1")
        log.append(f"{inner['path']}?{query}" if query else inner["path"])
        await app(inner, receive, send)

    return proxy


class ProxiedServer(LiveServer):
    """The live server behind ``behind_prefix``: the page lives at ``{url}{prefix}/``."""

    def __init__(self, settings: Any, prefix: str = "") -> None:
        super().__init__(settings)
        self.prefix = prefix
        self.requests: list[str] = []

    @property
    def page_url(self) -> str:
        return f"{self.url}{self.prefix}/"

    def stream_requests(self) -> list[str]:
        """Every stream request so far (any client), as ``path?query``."""
        return [r for r in self.requests if r.split("?", 1)[0].endswith("/stream")]

    def _config(self, app: Any) -> Any:
        config = super()._config(app)
        config.app = behind_prefix(app, self.prefix, self.requests)
        return config


@asynccontextmanager
async def proxied(settings: Any, prefix: str = "") -> AsyncIterator[ProxiedServer]:
    srv = ProxiedServer(settings, prefix)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def wait_open_streams(srv: LiveServer, per_task: int, all_tasks: int, timeout: float = 5) -> None:
    """Until the server holds exactly this many open streams (a closed one goes a moment later)."""
    bus = srv.manager.bus
    try:
        with anyio.fail_after(timeout):
            while bus.count() != (per_task, all_tasks):
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"open streams (per task, all tasks): {bus.count()}, wanted {(per_task, all_tasks)}") from None
