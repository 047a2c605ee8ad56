"""The delivery log in a real browser: headless Chromium (Debian's `chromium`, driven by
Playwright for Python through `executable_path`; nothing is downloaded) against a real
`linkcrm serve` that has received the sample story.

It logs in, sees the story's events and contact, reads an event's trace, replays a dead
letter and sees it processed, sends an XSS payload that must show as text, sends a replay
without the CSRF token, and takes a screenshot of every page into tests/output/browser/.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from engine.storage import NewEvent, open_storage
from tests.support.paths import TESTS
from tests.support.service_process import (
    Server,
    cli,
    service_env,
    signed,
    start_server,
    wait_for,
)

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "browser-test-password"
SHOTS = TESTS / "output" / "browser"
XSS = "<script>alert('xss')</script><img src=x onerror=alert(2)>\x1b[31m"


def _seed_dead_letter(database: Path) -> None:
    """One event that died (its CRM was down), to replay from the page: its body is a valid
    install, so the replay succeeds."""
    body = json.dumps({"event": "install.tracked", "timestamp": "2026-02-28T09:00:00Z",
                       "data": {"token": "tok_dead_letter", "campaign": "winter",
                                "platform": "android"}}).encode()

    async def seed() -> None:
        storage = open_storage(f"sqlite:///{database}")
        await storage.migrate()
        stored = await storage.inbox.store(NewEvent(
            body=body, event_type="install.tracked", event_timestamp="2026-02-28T09:00:00Z",
            dedupe_key="dead-letter-1", received_at=datetime.now(UTC)))
        for item in await storage.inbox.claim("seed", 10, 60):
            await storage.inbox.finish(item.id, "seed", "dead",
                                       "local: the CRM was unreachable after 8 attempts")
        assert stored.id == 1
        await storage.close()

    # In a thread of its own: Playwright's sync API runs an event loop on this one.
    worker = threading.Thread(target=lambda: asyncio.run(seed()))
    worker.start()
    worker.join()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("browser")
    env = service_env(folder, LINKCRM_UI_PASSWORD=PASSWORD)
    _seed_dead_letter(folder / "linkcrm.db")
    running = start_server(env)
    try:
        sent = cli("send-samples", "--url", running.url, env=env)
        assert sent.returncode == 0, sent.stderr
        body, headers = signed({"event": "install.tracked", "timestamp": "2026-03-01T00:00:00Z",
                                "data": {"token": XSS, "campaign": XSS}})
        assert httpx.post(f"{running.url}/webhooks/tolinku", content=body, headers=headers,
                          timeout=10).status_code == 200
        wait_for(lambda: "processed" in cli("events", "list", env=env).stdout
                 and cli("events", "list", "--status", "received", env=env).stdout.startswith(
                     "no events"), what="the worker to process the story")
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: install Debian's Chromium with `apt-get install -y chromium` "
        "(.ci/run does)")
    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    SHOTS.mkdir(parents=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    dialogs: list[str] = []
    opened.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    errors: list[str] = []
    opened.on("console", lambda message: errors.append(message.text)
              if message.type == "error" else None)
    yield opened
    context.close()
    assert dialogs == [], f"a script ran: {dialogs}"
    # The only console errors allowed: CSP refusals, which prove the policy holds, and the
    # 401 that answers a wrong password on purpose.
    assert all("Content Security Policy" in text or "status of 401" in text
               for text in errors), errors


def shot(page: Page, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def log_in(page: Page, *, screenshot: bool = False) -> None:
    page.goto("/ui/")
    expect(page).to_have_url("/ui/login?next=%2Fui%2F")
    if screenshot:
        shot(page, "01-login")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Overview")


def test_log_in_and_see_the_sample_story(page: Page, server: Server) -> None:
    page.goto("/ui/events")
    page.fill("input[name=password]", "wrong password, twelve+")
    page.click("button[type=submit]")
    expect(page.locator(".problem")).to_contain_text("that is not the password")
    log_in(page, screenshot=True)
    expect(page.locator("figure.chart").first).to_be_visible()
    expect(page.locator(".states")).to_contain_text("local")
    shot(page, "02-overview")
    page.click("nav >> text=Events")
    rows = page.locator("table.events tbody tr")
    expect(rows.filter(has_text="referral.completed")).to_have_count(1)
    expect(rows.filter(has_text="referral.created")).to_have_count(1)
    expect(rows.filter(has_text="install.tracked")).to_have_count(3)  # story, XSS, dead letter
    shot(page, "03-events")
    page.fill("input[name=q]", "ref_sample_sam")
    page.click("form.filters button")
    found = page.locator("table.events tbody tr")
    expect(found).to_have_count(4)  # the story's three webhooks and its identify call
    expect(found.filter(has_text="app.user_identified")).to_have_count(1)
    shot(page, "04-events-search")
    page.click("nav >> text=Contacts")
    expect(page.locator("table.list")).to_contain_text("ref_sample_sam")
    shot(page, "05-contacts")
    page.click("table.list >> text=ref_sample_sam")
    expect(page.locator("h1")).to_contain_text("stage: customer")
    expect(page.locator("body")).to_contain_text("Referral: ref_sample_sam")
    shot(page, "06-contact")
    page.click("nav >> text=Deals")
    expect(page.locator("table.list")).to_contain_text("referral-ref_sample_sam")
    shot(page, "07-deals")


def test_open_an_event_and_read_its_trace(page: Page) -> None:
    log_in(page)
    page.goto("/ui/events?type=referral.completed")
    page.click("table.events tbody tr >> nth=0 >> td.type a")
    expect(page.locator("h1")).to_contain_text("referral.completed")
    expect(page.locator("ul.matched")).to_contain_text("referral-converts")
    expect(page.locator("body")).to_contain_text(
        "listens to install.tracked, not referral.completed")
    expect(page.locator("body")).to_contain_text("verified: X-Webhook-Signature matched")
    expect(page.locator("section.target")).to_contain_text("create_deal")
    expect(page.locator("pre.body")).to_contain_text('"milestone": "first_purchase"')
    shot(page, "08-event-trace")


def test_replay_a_dead_letter_and_see_it_processed(page: Page, server: Server) -> None:
    log_in(page)
    page.click("nav >> text=Dead letters")
    group = page.locator("section.group", has_text="the CRM was unreachable")
    expect(group).to_have_count(1)
    expect(page.locator("body")).to_contain_text("Replay uses rules version")
    shot(page, "09-dead-letters")
    group.locator("button", has_text="Replay this group").click()
    expect(page.locator(".done")).to_contain_text("Re-queued 1 event(s)")
    for _ in range(100):
        page.goto("/ui/events/1")
        if page.locator("h1 .status").inner_text() == "processed":
            break
        page.wait_for_timeout(200)
    expect(page.locator("h1 .status")).to_have_text("processed")
    expect(page.locator("section.target")).to_contain_text("upsert_contact")
    shot(page, "10-replayed-event")


def test_an_xss_payload_shows_as_text(page: Page) -> None:
    log_in(page)
    page.goto("/ui/contacts")
    cell = page.locator("table.list td", has_text="<script>alert('xss')</script>").first
    expect(cell).to_be_visible()
    expect(cell).to_contain_text("\\x1b[3")  # the terminal escape, spelled out (and cut)
    assert page.locator("main script").count() == 0
    assert page.locator("main img").count() == 0
    shot(page, "11-xss-as-text")
    cell.locator("a").click()
    expect(page.locator("body")).to_contain_text("<img src=x onerror=alert(2)>\\x1b[31m")
    page.click("table.list >> nth=-1 >> a")  # the event that touched the contact
    expect(page.locator("pre.body")).to_contain_text("<script>alert('xss')</script>")
    shot(page, "12-xss-event")


def test_a_post_without_the_csrf_token_is_refused(page: Page, server: Server) -> None:
    log_in(page)
    answer = page.request.post("/ui/dead/replay", form={"all": "yes"})
    assert answer.status == 403
    assert "CSRF token is missing or wrong" in answer.text()
    forged = page.request.post("/ui/events/1/replay", form={"csrf": "f" * 64})
    assert forged.status == 403
    page.goto("/ui/")
    headers = page.request.get("/ui/").headers
    assert headers["content-security-policy"].startswith("default-src 'none'")
    shot(page, "13-after-refused-post")
