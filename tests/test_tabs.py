"""Many tabs of one browser profile share one live connection (issue 14), in a real headless Chromium.

Browsers allow six HTTP/1.1 connections per host; with an EventSource per tab the seventh tab never
loaded. The page's tabs share one `tasks/stream` held by a SharedWorker (static/stream-worker.js).
The server is reached through a logging pass-through (page_helpers.ProxiedServer), so every stream
request the profile makes is counted, whether a page or the worker made it; the server's own count
of open streams is checked too. Pages opened with `?test` log every task version they receive.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from page_helpers import anyio_backend, browser  # noqa: F401  (pytest fixtures, by name)
from page_helpers import (
    TRACK_EVENTSOURCES,
    PageWatch,
    Producer,
    proxied,
    stream_stats,
    wait_open_streams,
)
from playwright.async_api import Browser, BrowserContext, Page, expect

from server.settings import Settings

pytestmark = pytest.mark.anyio

LIVE = 5000  # ms: every tab shows "Live" this soon
WITHIN = 2000  # ms: a change reaches every one of twelve tabs this soon (two cores, twelve renderers)
NO_SHARED_WORKER = "delete window.SharedWorker;"


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """One browser profile: its tabs share storage, locks and shared workers."""
    ctx = await browser.new_context(viewport={"width": 1000, "height": 700}, reduced_motion="reduce")
    await ctx.add_init_script(TRACK_EVENTSOURCES)
    try:
        yield ctx
    finally:
        await ctx.close()


async def open_tab(context: BrowserContext, url: str, watches: list[PageWatch]) -> Page:
    page = await context.new_page()
    watch = PageWatch()
    watch.attach(page)
    watches.append(watch)
    with anyio.fail_after(LIVE / 1000):  # from opening the tab to "Live"
        await page.goto(url)
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LIVE)
    return page


async def versions_seen(page: Page, task_id: str) -> list[int]:
    """The versions of `task_id` this tab received from the stream, in arrival order."""
    return await page.evaluate(
        "(id) => window.__taskmonSeen.filter(e => e.via === 'event' && e.id === id).map(e => e.version)", task_id
    )


async def wait_for_version(page: Page, task_id: str, version: int) -> None:
    await page.wait_for_function(
        "([id, v]) => window.__taskmonSeen.some(e => e.id === id && e.version >= v)", arg=[task_id, version], timeout=LIVE
    )


async def test_twelve_tabs_share_one_stream_and_miss_nothing_when_the_first_closes(
    settings: Settings, context: BrowserContext
) -> None:
    stream_requests: list[str] = []
    context.on(
        "request", lambda request: stream_requests.append(request.url) if urlsplit(request.url).path.endswith("/stream") else None
    )
    async with proxied(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        producer = Producer(http)
        first = (await producer.create("import_csv"))["task_id"]
        second = (await producer.create("resize"))["task_id"]
        urls = [f"{srv.page_url}?test#/"] * 10 + [f"{srv.page_url}?test#/task/{first}", f"{srv.page_url}?test#/task/{second}"]
        watches: list[PageWatch] = []
        # The tab that starts the shared worker first, then eleven more at once: a stream per tab would
        # leave the seventh and later ones waiting for a connection (their HTML never loads).
        tabs = [await open_tab(context, urls[0], watches)]
        opened: list[Page | None] = [None] * 11
        async with anyio.create_task_group() as group:
            for i, url in enumerate(urls[1:]):

                async def one(i: int = i, url: str = url) -> None:
                    opened[i] = await open_tab(context, url, watches)

                group.start_soon(one)
        tabs += [page for page in opened if page is not None]
        assert len(tabs) == 12
        lists, details = tabs[:10], tabs[10:]
        for page in tabs:
            await expect(page.locator("#conn")).to_have_attribute("data-mode", "shared")
            assert (await stream_stats(page))["max"] == 0, "a tab opened an EventSource of its own"
        await wait_open_streams(srv, per_task=0, all_tasks=1)
        assert srv.stream_requests() == ["/tasks/stream"]

        # A change made after all are open reaches every tab.
        a = await producer.patch(first, status="processing", progress=1, message="Reading rows")
        b = await producer.patch(second, status="processing", progress=1, message="Resizing")
        for page in lists:
            await expect(page.locator(f'#task-list > li[data-task-id="{first}"] .pct')).to_have_text("1%", timeout=WITHIN)
            await expect(page.locator(f'#task-list > li[data-task-id="{second}"] .task-message')).to_have_text(
                "Resizing", timeout=WITHIN
            )
        await expect(details[0].locator("#detail-message")).to_have_text("Reading rows", timeout=WITHIN)
        await expect(details[1].locator("#detail-message")).to_have_text("Resizing", timeout=WITHIN)

        # The tab that started the worker is closed while changes are being made.
        halfway = anyio.Event()
        last: dict[str, int] = {}

        async def make_changes() -> None:
            for step in range(2, 41):
                task = await producer.patch(first, progress=step, message=f"Row batch {step}")
                last[first] = task["version"]
                if step % 4 == 0:
                    last[second] = (await producer.patch(second, progress=step, message=f"Image {step}"))["version"]
                if step == 12:
                    halfway.set()

        async def close_first_tab() -> None:
            await halfway.wait()
            await tabs[0].close()

        async with anyio.create_task_group() as group:
            group.start_soon(make_changes)
            group.start_soon(close_first_tab)

        assert srv.manager.bus.coalesced == 0  # so every version was sent: none may be missing below
        for page in tabs[1:]:
            await wait_for_version(page, first, last[first])
            await wait_for_version(page, second, last[second])
            # Every version, in order, none twice: from the first change after opening to the last.
            assert await versions_seen(page, first) == list(range(a["version"], last[first] + 1))
            assert await versions_seen(page, second) == list(range(b["version"], last[second] + 1))
        for page in lists[1:]:
            await expect(page.locator(f'#task-list > li[data-task-id="{first}"] .pct')).to_have_text("40%")
            await expect(page.locator(f'#task-list > li[data-task-id="{second}"] .pct')).to_have_text("40%")
            await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
        await expect(details[0].locator("#detail-message")).to_have_text("Row batch 40")
        await expect(details[0].locator("#detail-version")).to_have_text(str(last[first]))
        await expect(details[1].locator("#detail-message")).to_have_text("Image 40")

        # Still one stream for the whole profile, opened once: closing a tab did not touch it.
        await wait_open_streams(srv, per_task=0, all_tasks=1)
        assert srv.stream_requests() == ["/tasks/stream"]
        assert len(stream_requests) <= 1, stream_requests  # what Playwright sees (pages; worker requests if any)

        # No tab left that needs it: the stream is closed.
        for page in tabs[1:]:
            await page.close()
        await wait_open_streams(srv, per_task=0, all_tasks=0)
        assert [error for watch in watches for error in watch.errors] == []


async def test_a_new_tab_joins_the_open_stream_and_reads_the_current_state(
    settings: Settings, context: BrowserContext
) -> None:
    async with proxied(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        producer = Producer(http)
        watches: list[PageWatch] = []
        task_id = (await producer.create("report"))["task_id"]
        first = await open_tab(context, f"{srv.page_url}#/", watches)
        await producer.patch(task_id, status="processing", progress=30, message="Before the second tab")
        await expect(first.locator(f'li[data-task-id="{task_id}"] .pct')).to_have_text("30%", timeout=WITHIN)
        # The second tab reads the list (GET) once the worker has taken it on, then follows the stream.
        second = await open_tab(context, f"{srv.page_url}#/task/{task_id}", watches)
        await expect(second.locator("#detail-message")).to_have_text("Before the second tab", timeout=WITHIN)
        await producer.patch(task_id, progress=60, message="After it")
        for page in (first, second):
            await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
        await expect(first.locator(f'li[data-task-id="{task_id}"] .pct')).to_have_text("60%", timeout=WITHIN)
        await expect(second.locator("#detail-progress-label")).to_have_text("60%", timeout=WITHIN)
        assert srv.stream_requests() == ["/tasks/stream"]
        assert [error for watch in watches for error in watch.errors] == []


async def test_without_shared_worker_each_tab_opens_its_own_stream(settings: Settings, browser: Browser) -> None:
    context = await browser.new_context(reduced_motion="reduce")
    try:
        await context.add_init_script(TRACK_EVENTSOURCES)
        await context.add_init_script(NO_SHARED_WORKER)
        async with proxied(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
            producer = Producer(http)
            watches: list[PageWatch] = []
            task_id = (await producer.create("fallback"))["task_id"]
            tabs = [
                await open_tab(context, f"{srv.page_url}#/", watches),
                await open_tab(context, f"{srv.page_url}#/task/{task_id}", watches),
            ]
            await producer.patch(task_id, status="processing", progress=45, message="Each on its own")
            await expect(tabs[0].locator(f'li[data-task-id="{task_id}"] .pct')).to_have_text("45%", timeout=WITHIN)
            await expect(tabs[1].locator("#detail-progress-label")).to_have_text("45%", timeout=WITHIN)
            for page in tabs:
                await expect(page.locator("#conn")).to_have_attribute("data-mode", "tab")
                stats = await stream_stats(page)
                assert stats["max"] == 1 and stats["open"] == 1, stats
            await wait_open_streams(srv, per_task=0, all_tasks=2)
            assert srv.stream_requests() == ["/tasks/stream", "/tasks/stream"]
            assert [error for watch in watches for error in watch.errors] == []
    finally:
        await context.close()



async def test_after_a_server_restart_every_tab_reads_again_and_follows_the_new_stream(
    settings: Settings, context: BrowserContext, tmp_path: Path
) -> None:
    durable = settings.with_changes(store_url=f"sqlite:///{tmp_path / 'tasks.db'}", retry_ms=200)
    async with proxied(durable) as srv:
        # a job of the server's own pool (a producer's task would rightly survive the restart)
        manager = srv.app.state.manager
        task_id = manager.create_task("long_job", owned=True).task_id
        manager.update_task(task_id, status="processing", progress=20, message="Halfway")
        watches: list[PageWatch] = []
        tabs = [await open_tab(context, f"{srv.page_url}#/", watches) for _ in range(2)]
        tabs.append(await open_tab(context, f"{srv.page_url}#/task/{task_id}", watches))
        await srv.stop()
        for page in tabs:
            await expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting", timeout=LIVE)
        # The restarted server marks its dead pool's task failed ("interrupted") before any
        # stream is back: no event tells the tabs, only their re-read after the new snapshot does.
        await srv.start()
        for page in tabs:
            await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LIVE)
        for page in tabs[:2]:
            await expect(page.locator(f'li[data-task-id="{task_id}"] .badge')).to_have_text("Failed", timeout=WITHIN)
        await expect(tabs[2].locator("#detail-status")).to_have_text("Failed", timeout=WITHIN)
        async with httpx.AsyncClient(base_url=srv.url) as http:
            fresh = (await Producer(http).create("after_restart"))["task_id"]
            await Producer(http).patch(fresh, status="processing", progress=70, message="Live again")
        for page in tabs[:2]:
            await expect(page.locator(f'li[data-task-id="{fresh}"] .pct')).to_have_text("70%", timeout=WITHIN)
        await wait_open_streams(srv, per_task=0, all_tasks=1)
        # Two stream requests in all: the worker's first, and its one reconnect to the new server.
        assert srv.stream_requests() == ["/tasks/stream", "/tasks/stream"]
        assert [error for watch in watches for error in watch.errors] == []
