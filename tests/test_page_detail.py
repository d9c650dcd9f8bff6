"""The detail page's timing, stale badge, whole message log and Cancel button (issue 12), in a real
headless Chromium against a real server (the set-up of tests/test_page.py, page_helpers)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from page_helpers import anyio_backend, browser, pages  # noqa: F401  (pytest fixtures, by name)
from page_helpers import Pages, Producer
from playwright.async_api import Page, expect

from server.settings import Settings

pytestmark = pytest.mark.anyio

WITHIN = 2000
LOAD = 5000


async def log_messages(page: Page) -> list[str]:
    return await page.eval_on_selector_all("#detail-log .log-msg", "spans => spans.map(s => s.textContent)")


async def test_duration_rate_and_eta_of_a_linearly_progressing_task(
    live_server: Any, settings: Settings, pages: Pages, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with live_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        manager = srv.app.state.manager
        # The server's clock, stepped 10 s per change (a fake one: no waiting), ending 50 s ago.
        now = {"t": datetime.now(UTC) - timedelta(seconds=100)}
        monkeypatch.setattr(manager, "_clock", lambda: now["t"])
        task_id = manager.create_task("linear").task_id
        for progress in (0, 10, 20, 30, 40):  # 1 %/s from entering processing
            now["t"] += timedelta(seconds=10)
            manager.update_task(task_id, status="processing", progress=progress, message=f"{progress}% done")
        task = (await http.get(f"/api/graph/task/{task_id}")).json()["data"]
        assert task["rate"] == pytest.approx(1.0) and task["eta_s"] == pytest.approx(60.0), task

        page, watch = await pages.open(f"{srv.url}/#/task/{task_id}")
        await expect(page.locator("#detail-progress-label")).to_have_text("40%", timeout=LOAD)
        await expect(page.locator("#detail-rate")).to_have_text("1.0 %/s")
        await expect(page.locator("#detail-eta")).to_have_text("about 1 min")
        # started 90 s ago (fake server time, real browser time): a running duration, ticking
        await expect(page.locator("#detail-duration")).to_have_text(re.compile(r"^1 min (3\d) s so far$"))
        await expect(page.locator("#detail-last-update")).to_have_text(re.compile(r"^5\d s ago$"))
        await expect(page.locator("#detail-stale")).to_be_hidden()
        first = await page.locator("#detail-duration").text_content()
        await expect(page.locator("#detail-duration")).not_to_have_text(first or "", timeout=WITHIN)  # 1 s tick

        now["t"] += timedelta(seconds=10)
        manager.update_task(task_id, status="completed", progress=100, message="done")
        await expect(page.locator("#detail-status")).to_have_text("Completed", timeout=WITHIN)
        await expect(page.locator("#detail-duration")).to_have_text("50 s")  # started (+10 s) -> finished (+60 s)
        await expect(page.locator("#detail-eta")).to_have_text("—")
        await expect(page.locator("#detail-rate")).to_have_text("—")
        await expect(page.locator("#detail-actions")).to_be_hidden()  # no Cancel on a finished task
        assert watch.errors == []


async def test_the_whole_message_log_shows_after_a_reload_and_grows_live(
    live_server: Any, settings: Settings, pages: Pages
) -> None:
    async with live_server(settings.with_changes(history=1000)) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        producer = Producer(http)
        task_id = (await producer.create("logged"))["task_id"]
        for i in range(1, 23):  # 22 changes before any tab is open
            await producer.patch(task_id, status="processing", progress=i * 4, message=f"Step {i}")
        expected = ["Pending"] + [f"Step {i}" for i in range(1, 23)]

        page, watch = await pages.open(f"{srv.url}/#/task/{task_id}")
        await expect(page.locator("#detail-log .log-msg")).to_have_text(expected, timeout=LOAD)
        await page.reload()
        await expect(page.locator("#detail-log .log-msg")).to_have_text(expected, timeout=LOAD)
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
        await producer.patch(task_id, progress=95, message="Step 23, live")
        await expect(page.locator("#detail-log .log-msg")).to_have_text([*expected, "Step 23, live"], timeout=WITHIN)
        await expect(page.locator("#detail-log .log-entry").last.locator(".log-pct")).to_have_text("95%")

        # A longer log than one read (500 events) is paged through with next_after.
        manager = srv.app.state.manager
        long_id = manager.create_task("long_log").task_id
        manager.update_task(long_id, status="processing", progress=0, message="Step 0")
        for i in range(1, 700):
            manager.update_task(long_id, message=f"Step {i}")
        await page.goto(f"{srv.url}/#/task/{long_id}")
        await expect(page.locator("#detail-log .log-entry")).to_have_count(701, timeout=LOAD)
        messages = await log_messages(page)
        assert messages == ["Pending"] + [f"Step {i}" for i in range(700)]
        assert watch.errors == []


async def test_a_quiet_task_gets_the_stale_badge_and_loses_it_on_its_next_update(
    live_server: Any, settings: Settings, pages: Pages
) -> None:
    quick = settings.with_changes(stale_after_s=0.5, monitor_interval_s=0.1)
    async with live_server(quick) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        producer = Producer(http)
        task_id = (await producer.create("quiet"))["task_id"]
        await producer.patch(task_id, status="processing", progress=10, message="Working")
        page, watch = await pages.open(f"{srv.url}/#/task/{task_id}")
        await expect(page.locator("#detail-progress-label")).to_have_text("10%", timeout=LOAD)
        # `event: stale` on the shared stream (the worker passes it on) shows the badge.
        await expect(page.locator("#detail-stale")).to_be_visible(timeout=LOAD)
        await expect(page.locator("#detail-last-update")).to_have_text(re.compile(r"^no update for \d+ s$"))
        await producer.patch(task_id, progress=20, message="Working again")
        await expect(page.locator("#detail-stale")).to_be_hidden(timeout=WITHIN)
        await expect(page.locator("#detail-progress-label")).to_have_text("20%")
        await expect(page.locator("#detail-stale")).to_be_visible(timeout=LOAD)  # quiet again
        # After a reload the read's `stale` key shows it (the announcement is long past).
        await page.reload()
        await expect(page.locator("#detail-progress-label")).to_have_text("20%", timeout=LOAD)
        await expect(page.locator("#detail-stale")).to_be_visible()
        # The list row says it too.
        await page.goto(f"{srv.url}/#/")
        row = page.locator(f'#task-list > li[data-task-id="{task_id}"]')
        await expect(row.locator(".task-age")).to_have_text(re.compile(r"^no update for \d+ s$"), timeout=LOAD)
        await expect(row).to_have_attribute("data-stale", "true")
        await page.goto(f"{srv.url}/#/task/{task_id}")
        await expect(page.locator("#detail-stale")).to_be_visible(timeout=LOAD)
        # A finished task is never stale.
        await producer.patch(task_id, status="completed", progress=100, message="Done")
        await expect(page.locator("#detail-status")).to_have_text("Completed", timeout=WITHIN)
        await expect(page.locator("#detail-stale")).to_be_hidden()
        assert watch.errors == []


async def test_cancel_button_requests_a_cancel_until_the_task_ends(
    live_server: Any, settings: Settings, pages: Pages
) -> None:
    async with live_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        producer = Producer(http)
        task_id = (await producer.create("cancellable"))["task_id"]
        await producer.patch(task_id, status="processing", progress=30, message="Busy")
        page, watch = await pages.open(f"{srv.url}/#/task/{task_id}")
        await expect(page.locator("#detail-cancel")).to_be_visible(timeout=LOAD)
        await expect(page.locator("#detail-cancel-state")).to_be_hidden()
        await page.click("#detail-cancel")
        await expect(page.locator("#detail-cancel-state")).to_have_text("Cancel requested", timeout=WITHIN)
        await expect(page.locator("#detail-cancel")).to_be_hidden()
        assert (await producer.get(task_id))["cancel_requested"] is True
        # The producer learns it at its next report and ends the task.
        answer = await producer.patch(task_id, progress=35, message="Stopping")
        assert answer["cancel_requested"] is True
        await expect(page.locator("#detail-progress-label")).to_have_text("35%", timeout=WITHIN)
        await expect(page.locator("#detail-cancel-state")).to_be_visible()
        await producer.patch(task_id, status="failed", error="cancelled")
        await expect(page.locator("#detail-status")).to_have_text("Failed", timeout=WITHIN)
        await expect(page.locator("#detail-error-text")).to_have_text("cancelled")
        await expect(page.locator("#detail-cancel-state")).to_be_hidden()
        await expect(page.locator("#detail-actions")).to_be_hidden()
        assert watch.errors == []


async def test_cancel_asks_for_the_producer_token_when_the_server_has_one(
    live_server: Any, settings: Settings, pages: Pages
) -> None:
    token = "producer-secret-42"
    guarded = settings.with_changes(api_token=token)
    headers = {"Authorization": f"Bearer {token}"}
    async with live_server(guarded) as srv, httpx.AsyncClient(base_url=srv.url, headers=headers) as http:
        producer = Producer(http)
        first = (await producer.create("guarded"))["task_id"]
        second = (await producer.create("guarded"))["task_id"]
        for task_id in (first, second):
            await producer.patch(task_id, status="processing", progress=10, message="Busy")
        page, watch = await pages.open(f"{srv.url}/#/task/{first}")  # reads need no token here
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=LOAD)
        await expect(page.locator("#auth")).to_be_hidden()
        await page.click("#detail-cancel")
        await expect(page.locator("#auth")).to_be_visible(timeout=LOAD)
        await expect(page.locator("#auth-reason")).to_contain_text("producer (API) token")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live")  # the stream is not held
        await page.fill("#auth-token", "wrong")
        await page.keyboard.press("Enter")
        await expect(page.locator("#auth-error")).to_have_text("That token was not accepted. Try again.", timeout=LOAD)
        assert (await producer.get(first))["cancel_requested"] is False
        await page.fill("#auth-token", token)
        await page.keyboard.press("Enter")
        await expect(page.locator("#auth")).to_be_hidden(timeout=LOAD)
        await expect(page.locator("#detail-cancel-state")).to_be_visible(timeout=WITHIN)
        assert (await producer.get(first))["cancel_requested"] is True
        stored = await page.evaluate(
            "() => [sessionStorage.getItem('taskmon.producer_token'), sessionStorage.getItem('taskmon.token')]"
        )
        assert stored == [token, None]  # kept for the session, apart from the read token

        # Kept: the next cancel in this tab does not ask again.
        await page.goto(f"{srv.url}/#/task/{second}")
        await page.click("#detail-cancel")
        await expect(page.locator("#detail-cancel-state")).to_be_visible(timeout=WITHIN)
        await expect(page.locator("#auth")).to_be_hidden()
        assert (await producer.get(second))["cancel_requested"] is True
        assert watch.errors == []
