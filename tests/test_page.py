"""The live page (static/), driven in a real headless Chromium against a real server.

Every wait is a condition with a deadline (Playwright's expect / wait_for_function); "within 1 s of
each update" is the 1000 ms timeout on the expectation that follows each producer call.
"""

from __future__ import annotations

import re
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from page_helpers import anyio_backend, browser, pages  # noqa: F401  (pytest fixtures, by name)
from page_helpers import ARTIFACTS, Pages, Producer, proxied, stream_stats, wait_open_streams
from playwright.async_api import Page, expect

from server.settings import Settings

pytestmark = pytest.mark.anyio

WITHIN = 1000  # ms: the page must show an update this soon after the producer call returns
LOAD = 5000  # ms: first page load, stream (re)connects
XSS = "<img src=x onerror=alert(1)>"


def row(page: Page, task_id: str) -> Any:
    return page.locator(f'#task-list > li[data-task-id="{task_id}"]')


async def detail_pairs(page: Page) -> dict[str, str]:
    """progress_detail as the page shows it: {label: text}."""
    return await page.eval_on_selector_all(
        "#detail-progress-detail > div",
        "divs => Object.fromEntries(divs.map(d => [d.querySelector('dt').textContent, d.querySelector('dd').textContent]))",
    )


async def assert_one_shared_stream(page: Page, srv: Any) -> None:
    """The page opened no EventSource of its own: the profile's one stream is the shared worker's."""
    await expect(page.locator("#conn")).to_have_attribute("data-mode", "shared")
    stats = await stream_stats(page)
    assert stats["max"] == 0, f"the page opened EventSources itself: {stats['urls']}"
    await wait_open_streams(srv, per_task=0, all_tasks=1)


async def test_detail_view_follows_producer_updates_within_a_second(
    live_server: Any, settings: Settings, pages: Pages
) -> None:
    async with live_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        producer = Producer(http)
        task_id = (await producer.create("graph_build"))["task_id"]
        page, watch = await pages.open(f"{srv.url}/#/task/{task_id}")
        await expect(page.locator("#detail-status")).to_have_text("Pending", timeout=LOAD)
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
        await expect(page.locator("#detail-metadata")).to_be_hidden()  # the task has none
        # One stream for the whole profile (the shared worker's all-tasks stream), none of the page's own.
        await assert_one_shared_stream(page, srv)

        steps: list[dict[str, Any]] = [
            {"status": "processing", "progress": 5, "message": "Chunking the text"},
            {
                "progress": 35,
                "message": "Adding batch 3 of 10",
                "progress_detail": {"phase": "adding_episodes", "batch": 3, "total_batches": 10},
            },
            {
                "progress": 60,
                "message": "Zep is busy, retrying batch 6",
                "progress_detail": {"phase": "adding_episodes", "batch": 6, "total_batches": 10, "retries": 2},
            },
            {"status": "completed", "progress": 100, "message": "Graph ready", "result": {"graph_name": "demo", "took_s": 1.5}},
        ]
        for step in steps:
            await producer.patch(task_id, **step)
            await expect(page.locator("#detail-progress-label")).to_have_text(f"{step['progress']}%", timeout=WITHIN)
            await expect(page.locator("#detail-message")).to_have_text(step["message"], timeout=WITHIN)
            if step["progress"] == 35:
                assert await detail_pairs(page) == {"Phase": "Adding episodes", "Batch": "3 of 10"}
            if step["progress"] == 60:
                assert await detail_pairs(page) == {"Phase": "Adding episodes", "Batch": "6 of 10", "Retries": "2"}

        await expect(page.locator("#detail-status")).to_have_text("Completed", timeout=WITHIN)
        await expect(page.locator("#detail-result")).to_be_visible()
        await expect(page.locator("#detail-result-kv")).to_contain_text("Graph name")
        await expect(page.locator("#detail-result-kv")).to_contain_text("demo")
        await expect(page.locator("#detail-error-box")).to_be_hidden()
        # The running log: the first snapshot and every update, in order.
        await expect(page.locator("#detail-log .log-msg")).to_have_text(
            ["Pending", "Chunking the text", "Adding batch 3 of 10", "Zep is busy, retrying batch 6", "Graph ready"]
        )
        # The task is over; the page stays live on the same shared stream.
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
        await assert_one_shared_stream(page, srv)
        assert watch.errors == []


async def test_task_list_updates_live_and_filters_reopen_the_stream(
    live_server: Any, settings: Settings, pages: Pages
) -> None:
    async with live_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        producer = Producer(http)
        page, watch = await pages.open(f"{srv.url}/")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
        await expect(page.locator("#list-empty")).to_be_visible(timeout=LOAD)

        ingest = (await producer.create("ingest"))["task_id"]
        await expect(row(page, ingest)).to_be_visible(timeout=WITHIN)
        await expect(row(page, ingest).locator(".badge")).to_have_text("Pending", timeout=WITHIN)
        await producer.patch(ingest, status="processing", progress=40, message="Reading files")
        await expect(row(page, ingest).locator(".pct")).to_have_text("40%", timeout=WITHIN)
        await expect(row(page, ingest).locator(".task-message")).to_have_text("Reading files", timeout=WITHIN)
        await expect(row(page, ingest).locator(".badge")).to_have_text("Processing", timeout=WITHIN)

        report = (await producer.create("report"))["task_id"]
        await expect(page.locator("#task-list > li")).to_have_count(2, timeout=WITHIN)
        await expect(page.locator("#task-list > li").first).to_have_attribute("data-task-id", report)  # newest first
        await expect(page.locator("#list-count")).to_have_text("2 tasks")

        # Status filter (applied to a fresh read and to the shared stream's events): tasks move in and out live.
        await page.click('#status-tabs [data-status="processing"]')
        await expect(page.locator("#task-list > li")).to_have_count(1, timeout=LOAD)
        await expect(row(page, ingest)).to_be_visible()
        await assert_one_shared_stream(page, srv)
        await producer.patch(ingest, status="completed", progress=100, message="All read")
        await expect(row(page, ingest)).to_have_count(0, timeout=WITHIN)
        await expect(page.locator("#list-empty")).to_have_text("No tasks match these filters.", timeout=WITHIN)
        await producer.patch(report, status="processing", progress=10, message="Writing")
        await expect(row(page, report).locator(".pct")).to_have_text("10%", timeout=WITHIN)

        # Type filter (typed, debounced), and the filters live in the address for a reload.
        await page.click('#status-tabs [data-status=""]')
        await page.fill("#filter-type", "ingest")
        await expect(page.locator("#task-list > li")).to_have_count(1, timeout=LOAD)
        await expect(row(page, ingest).locator(".badge")).to_have_text("Completed")
        assert page.url.endswith("#/?task_type=ingest")

        # Keyboard: Tab from the filter reaches the task, Enter opens its detail.
        await page.keyboard.press("Tab")
        await expect(row(page, ingest).locator("a")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(page).to_have_url(re.compile(rf"#/task/{ingest}$"))
        await expect(page.locator("#detail-status")).to_have_text("Completed", timeout=LOAD)
        await expect(page.locator("#detail-title")).to_be_focused()
        await page.go_back()
        await expect(row(page, ingest)).to_be_visible(timeout=LOAD)

        # A task that does not exist (or was removed) says so, and the page stays live on the list.
        await page.goto(f"{srv.url}/#/task/{uuid.uuid4()}")
        await expect(page.locator("#detail-error")).to_contain_text("There is no task with this id", timeout=LOAD)
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
        await assert_one_shared_stream(page, srv)
        assert watch.errors == []


async def test_task_text_is_shown_as_text_never_as_html(live_server: Any, settings: Settings, pages: Pages) -> None:
    async with live_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        producer = Producer(http)
        task_id = (await producer.create("<b>bold</b>", metadata={"<u>owner</u>": XSS, "rows": 1200}))["task_id"]
        await producer.patch(
            task_id,
            status="processing",
            message=XSS,
            progress_detail={"phase": XSS, "<i>key</i>": "<script>alert(2)</script>"},
        )
        page, watch = await pages.open(f"{srv.url}/")
        await expect(row(page, task_id).locator(".task-message")).to_have_text(XSS, timeout=LOAD)
        await expect(row(page, task_id).locator(".task-type")).to_have_text("<b>bold</b>")

        await expect(row(page, task_id).locator(".task-age")).to_have_text(re.compile(r"^updated (just now|\d+ s ago)$"))
        await row(page, task_id).locator("a").click()
        await expect(page.locator("#detail-message")).to_have_text(XSS, timeout=LOAD)
        await expect(page.locator("#detail-type")).to_have_text("<b>bold</b>")
        # Metadata, as the producer wrote it, shown as text.
        await expect(page.locator("#detail-metadata")).to_be_visible()
        metadata = await page.eval_on_selector_all(
            "#detail-metadata-kv > div", "divs => divs.map(d => [d.querySelector('dt').textContent, d.querySelector('dd').textContent])"
        )
        assert metadata == [["<u>owner</u>", XSS], ["rows", "1,200"]]
        pairs = await detail_pairs(page)
        assert pairs["Phase"] == XSS
        assert pairs["<i>key</i>"] == "<script>alert(2)</script>"
        await producer.patch(task_id, status="failed", error=f"boom {XSS}")
        await expect(page.locator("#detail-error-text")).to_have_text(f"boom {XSS}", timeout=WITHIN)
        await expect(page.locator("#detail-log")).to_contain_text(XSS)

        injected = await page.locator("main img, main script, main b, main i, main u").count()
        assert injected == 0, "task text was parsed as HTML"
        # The dialog watcher works (so the empty list below means something): a real alert is seen.
        await page.evaluate("() => alert('probe')")
        assert watch.dialogs == ["alert: probe"]
        assert watch.errors == []


async def test_a_build_started_from_the_page_completes_and_shows_the_graph(
    live_server: Any, settings: Settings, pages: Pages
) -> None:
    text = (
        "Ada Lovelace worked with Charles Babbage on the Analytical Engine in London. "
        "Babbage designed the Difference Engine. Lovelace wrote notes on the Analytical Engine. "
        "Mary Somerville introduced Lovelace to Babbage. Somerville lived in London and in Florence. "
    ) * 4
    async with live_server(settings.with_changes(job_workers=1)) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        producer = Producer(http)
        # The local graph backend finishes in milliseconds. Hold the only job worker so the build
        # waits as `pending` until the page is watching it, then let it run and follow it live.
        release = threading.Event()
        blocker = srv.manager.create_task("blocker")
        srv.app.state.jobs.submit(blocker.task_id, lambda ctx: {"released": release.wait(30)})
        try:
            page, watch = await pages.open(f"{srv.url}/#/new")
            await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
            await page.fill("#build-name", "Page test project")
            await page.fill("#build-text", text)
            await page.fill("#build-chunk-size", "300")
            await page.fill("#build-chunk-overlap", "30")
            await page.click("#build-submit")

            await expect(page).to_have_url(re.compile(r"#/task/[0-9a-f-]{36}$"), timeout=LOAD)
            task_id = page.url.rsplit("/", 1)[-1]
            await expect(page.locator("#detail-status")).to_have_text("Pending", timeout=LOAD)
            await expect(page.locator("#detail-type")).to_have_text("graph_build")
            await assert_one_shared_stream(page, srv)
        finally:
            release.set()
        await expect(page.locator("#detail-status")).to_have_text("Completed", timeout=30_000)
        task = await producer.get(task_id)
        result = task["result"]
        assert result["node_count"] > 0, result
        counts = page.locator("#graph-counts")
        await expect(counts.locator('[data-count="nodes"] .count-value')).to_have_text(f"{result['node_count']:,}", timeout=LOAD)
        await expect(counts.locator('[data-count="edges"] .count-value')).to_have_text(f"{result['edge_count']:,}")
        await expect(counts.locator('[data-count="chunks"] .count-value')).to_have_text(f"{result['chunk_count']:,}")
        await expect(page.locator("#graph-figure svg circle")).to_have_count(min(result["node_count"], 120), timeout=LOAD)
        # Followed live: the pending snapshot, then updates from the stream, ending with the result.
        log = page.locator("#detail-log .log-entry")
        assert await log.count() >= 2
        await expect(log.first).to_have_class(re.compile(r"\blog-pending\b"))
        await expect(log.last).to_have_class(re.compile(r"\blog-completed\b"))

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "graph-build-detail.png"), full_page=True)
        await assert_one_shared_stream(page, srv)
        assert watch.errors == []


async def test_a_build_from_an_uploaded_file(live_server: Any, settings: Settings, pages: Pages) -> None:
    notes = b"# Notes\n\nGrace Hopper wrote the first compiler at Remington Rand. Hopper worked with Howard Aiken.\n"
    async with live_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        producer = Producer(http)
        page, watch = await pages.open(f"{srv.url}/#/new")
        await page.set_input_files("#build-files", files=[{"name": "notes.md", "mimeType": "text/markdown", "buffer": notes}])
        # The form checks its numbers before sending anything.
        await page.fill("#build-chunk-size", "100")
        await page.fill("#build-chunk-overlap", "100")
        await page.click("#build-submit")
        await expect(page.locator("#build-error")).to_have_text("Chunk overlap must be smaller than the chunk size.")
        await expect(page.locator("#build-chunk-overlap")).to_be_focused()
        assert (await http.get("/api/graph/project/list")).json()["data"] == []

        await page.fill("#build-chunk-overlap", "10")
        await page.click("#build-submit")
        await expect(page).to_have_url(re.compile(r"#/task/[0-9a-f-]{36}$"), timeout=LOAD)
        await expect(page.locator("#detail-status")).to_have_text("Completed", timeout=30_000)
        result = (await producer.get(page.url.rsplit("/", 1)[-1]))["result"]
        await expect(page.locator('#graph-counts [data-count="nodes"] .count-value')).to_have_text(
            f"{result['node_count']:,}", timeout=LOAD
        )
        projects = (await http.get("/api/graph/project/list")).json()["data"]
        assert [p["name"] for p in projects] == ["My project"]
        assert watch.errors == []


async def test_server_restart_shows_reconnecting_then_live_with_the_latest_state(
    live_server: Any, settings: Settings, pages: Pages, tmp_path: Path
) -> None:
    durable = settings.with_changes(store_url=f"sqlite:///{tmp_path / 'tasks.db'}", retry_ms=200)
    async with live_server(durable) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            producer = Producer(http)
            before = (await producer.create("long_job"))["task_id"]
            page, watch = await pages.open(f"{srv.url}/")
            await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
            await producer.patch(before, status="processing", progress=30, message="Halfway there")
            await expect(row(page, before).locator(".pct")).to_have_text("30%", timeout=WITHIN)

        await srv.stop()
        await expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting", timeout=LOAD)
        await expect(page.locator("#conn")).to_contain_text("Reconnecting")

        await srv.start()
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
        await expect(page.locator("#conn")).to_contain_text("Live")
        async with httpx.AsyncClient(base_url=srv.url) as http:
            producer = Producer(http)
            # The page shows the task as the restarted server holds it now.
            latest = await producer.get(before)
            await expect(row(page, before).locator(".badge")).to_have_text(latest["status"].capitalize(), timeout=WITHIN)
            await expect(row(page, before).locator(".task-message")).to_have_text(
                latest["error"] if latest["status"] == "failed" else latest["message"], timeout=WITHIN
            )
            after = (await producer.create("long_job"))["task_id"]
            await producer.patch(after, status="processing", progress=55, message="Fresh start")
            await expect(row(page, after).locator(".pct")).to_have_text("55%", timeout=WITHIN)

        # The same while watching one task: the shared stream reconnects by itself and the detail
        # reads the task again (a new snapshot = a new epoch), showing what the restarted server holds.
        await row(page, after).locator("a").click()
        await expect(page.locator("#detail-status")).to_have_text("Processing", timeout=LOAD)
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
        await srv.stop()
        await expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting", timeout=LOAD)
        await srv.start()
        async with httpx.AsyncClient(base_url=srv.url) as http:
            latest = await Producer(http).get(after)
        await expect(page.locator("#detail-status")).to_have_text(latest["status"].capitalize(), timeout=LOAD)
        await expect(page.locator("#detail-progress-label")).to_have_text(f"{latest['progress']}%")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
        await assert_one_shared_stream(page, srv)
        assert watch.errors == []


async def test_read_token_is_asked_once_and_kept_for_the_session(
    live_server: Any, settings: Settings, pages: Pages
) -> None:
    token = "read-secret-123"
    async with live_server(settings.with_changes(read_token=token)) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        producer = Producer(http)  # producer calls need the API token, which is not set here
        task_id = (await producer.create("guarded"))["task_id"]
        page, watch = await pages.open(f"{srv.url}/")
        await expect(page.locator("#auth")).to_be_visible(timeout=LOAD)
        await expect(page.locator("#auth-token")).to_be_focused()
        await expect(page.locator("#conn")).to_have_attribute("data-state", "token")

        await page.fill("#auth-token", "wrong")
        await page.keyboard.press("Enter")
        await expect(page.locator("#auth-error")).to_have_text("That token was not accepted. Try again.", timeout=LOAD)
        await page.fill("#auth-token", token)
        await page.keyboard.press("Enter")
        await expect(page.locator("#auth")).to_be_hidden(timeout=LOAD)
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
        await expect(row(page, task_id)).to_be_visible(timeout=LOAD)
        await assert_one_shared_stream(page, srv)  # only a stream with the token is let in
        assert await page.evaluate("() => sessionStorage.getItem('taskmon.token')") == token

        # Detail: the snapshot read carries the header, the shared stream the query parameter.
        await row(page, task_id).locator("a").click()
        await expect(page.locator("#detail-status")).to_have_text("Pending", timeout=LOAD)
        await producer.patch(task_id, status="processing", progress=20, message="Guarded work")
        await expect(page.locator("#detail-progress-label")).to_have_text("20%", timeout=WITHIN)

        # Kept for the session: a reload does not ask again.
        await page.reload()
        await expect(page.locator("#detail-progress-label")).to_have_text("20%", timeout=LOAD)
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
        await expect(page.locator("#auth")).to_be_hidden()
        await assert_one_shared_stream(page, srv)
        assert watch.errors == []


@pytest.mark.parametrize("color_scheme", ["light", "dark"])
async def test_views_fit_a_360px_phone(
    live_server: Any, settings: Settings, pages: Pages, color_scheme: str
) -> None:
    async with live_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        producer = Producer(http)
        long_word = "x" * 120
        task_id = (await producer.create(f"type_{long_word}", metadata={f"key_{long_word}": long_word}))["task_id"]
        await producer.patch(
            task_id, status="processing", progress=50, message=f"A long message {long_word}",
            progress_detail={"phase": long_word, "batch": 1, "total_batches": 2},
        )
        page, watch = await pages.open(f"{srv.url}/", width=360, height=740, color_scheme=color_scheme)
        overflow = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        for fragment, ready in [("#/", f'li[data-task-id="{task_id}"]'), (f"#/task/{task_id}", "#detail:not([hidden])"), ("#/new", "#build-form")]:
            await page.goto(f"{srv.url}/{fragment}")
            await page.locator(ready).wait_for(state="visible", timeout=LOAD)
            assert await page.evaluate(overflow) <= 0, f"{fragment} scrolls sideways at 360 px"
        assert watch.errors == []


async def test_the_page_works_under_a_path_prefix(settings: Settings, pages: Pages) -> None:
    """Mounted at /progress/ behind a proxy: every URL the page uses resolves against its own address."""
    async with proxied(settings, "/progress") as srv, httpx.AsyncClient(base_url=f"{srv.url}/progress") as http:
        producer = Producer(http)
        task_id = (await producer.create("prefixed"))["task_id"]
        page, watch = await pages.open(srv.page_url)
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
        await expect(row(page, task_id)).to_be_visible(timeout=LOAD)
        await expect(page.locator(".brand a")).to_have_css("text-decoration-line", "none")  # the stylesheet loaded
        await producer.patch(task_id, status="processing", progress=25, message="Under a prefix")
        await expect(row(page, task_id).locator(".pct")).to_have_text("25%", timeout=WITHIN)
        await row(page, task_id).locator("a").click()
        await expect(page.locator("#detail-message")).to_have_text("Under a prefix", timeout=LOAD)
        await producer.patch(task_id, progress=50, message="Still under it")
        await expect(page.locator("#detail-progress-label")).to_have_text("50%", timeout=WITHIN)
        assert srv.stream_requests() == ["/tasks/stream"]
        await assert_one_shared_stream(page, srv)
        assert watch.errors == []
