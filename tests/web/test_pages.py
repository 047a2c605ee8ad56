"""The delivery log pages through the app, on both backends: access, filters, the trace,
replay, escaping of hostile event data, and the embedded CRM."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from starlette.routing import Mount

from engine.actions import TOUCHED, IdentityKey, identity_digest
from engine.runtime.settings import Settings
from engine.service.app import create_app
from engine.storage import NewEvent, NewOutcome, Storage
from engine.web import UI_PATH, ui_off
from tests.support.web import PASSWORD, csrf_of, login, web_app

pytestmark = pytest.mark.anyio
BACKENDS = ("sqlite", "postgresql")

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def envelope(kind: str = "install.tracked", **data: object) -> bytes:
    return json.dumps({"event": kind, "timestamp": "2026-03-01T12:00:00Z",
                       "data": {"token": "tok_1", "campaign": "spring", **data}}).encode()


async def store(storage: Storage, body: bytes, *, kind: str = "install.tracked",
                minutes: int = 0) -> int:
    result = await storage.inbox.store(NewEvent(
        body=body, event_type=kind, event_timestamp="2026-03-01T12:00:00Z",
        dedupe_key=hashlib.sha256(body).hexdigest(),
        received_at=NOW + timedelta(minutes=minutes), headers={"user-agent": "Tolinku/1.0"}))
    return result.id


async def kill(storage: Storage, event_id: int, error: str) -> None:
    """Make the event a dead letter, as the worker would after its last attempt."""
    for item in await storage.inbox.claim("test-worker", 100, 60):
        if item.id == event_id:
            await storage.inbox.finish(item.id, "test-worker", "dead", error)
        else:
            await storage.inbox.finish(item.id, "test-worker", "processed")


@pytest.fixture
async def client(storage: Storage) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=web_app(storage))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as opened:
        yield opened


@pytest.fixture
async def signed_in(client: httpx.AsyncClient) -> httpx.AsyncClient:
    answer = await login(client, PASSWORD)
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/"
    return client


# -- access -----------------------------------------------------------------------------------


async def test_without_a_password_the_pages_are_off_and_say_how_to_turn_them_on(
        storage: Storage) -> None:
    app = create_app(storage, Settings(webhook_secrets=("whsec_x",)),
                     pages=[Mount(UI_PATH, app=ui_off())])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://127.0.0.1") as client:
        answer = await client.get("/ui/")
        assert answer.status_code == 404
        assert "set LINKCRM_UI_PASSWORD" in answer.text
        assert (await client.get("/healthz")).status_code == 200  # the rest is unaffected


async def test_every_page_needs_a_session(client: httpx.AsyncClient) -> None:
    for path in ("/ui/", "/ui/events?status=dead", "/ui/events/1", "/ui/dead", "/ui/contacts",
                 "/ui/contacts/1", "/ui/deals"):
        answer = await client.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/ui/login?next=%2Fui%2F"), path


async def test_login_sets_an_httponly_strict_cookie(client: httpx.AsyncClient) -> None:
    answer = await login(client, PASSWORD)
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("linkcrm_ui="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui/" in cookie
    assert "Secure" not in cookie  # plain http on loopback; https gets Secure
    assert (await client.get("/ui/events")).status_code == 200


async def test_a_wrong_password_is_refused_and_says_what_to_use(
        client: httpx.AsyncClient) -> None:
    answer = await login(client, "not the password")
    assert answer.status_code == 401
    assert "LINKCRM_UI_PASSWORD" in answer.text
    assert not any(c.startswith("linkcrm_ui=") for c in answer.headers.get_list("set-cookie"))
    assert (await client.get("/ui/events")).status_code == 303


async def test_a_forged_or_tampered_session_is_not_a_session(client: httpx.AsyncClient) -> None:
    await login(client, PASSWORD)
    good = client.cookies["linkcrm_ui"]
    expires, nonce, signature = good.split(".")
    for forged in (f"{int(expires) + 999}.{nonce}.{signature}", f"{expires}.{nonce}x.{signature}",
                   "1.2.3", "garbage", ""):
        client.cookies.set("linkcrm_ui", forged, path="/ui/")
        assert (await client.get("/ui/events")).status_code == 303, forged


async def test_login_without_its_csrf_token_is_refused(client: httpx.AsyncClient) -> None:
    await client.get("/ui/login")
    answer = await client.post("/ui/login", data={"password": PASSWORD})
    assert answer.status_code == 403
    assert "CSRF token is missing or wrong" in answer.text


async def test_login_goes_back_only_to_a_page_of_the_log(client: httpx.AsyncClient) -> None:
    for target, expected in (("/ui/events?status=dead", "/ui/events?status=dead"),
                             ("//evil.example/ui/", "/ui/"), ("https://evil.example/", "/ui/"),
                             ("/ui/\r\nSet-Cookie: x=1", "/ui/")):
        form = await client.get("/ui/login")
        answer = await client.post("/ui/login", data={
            "csrf": csrf_of(form.text), "password": PASSWORD, "next": target})
        assert answer.headers["location"] == expected


async def test_every_page_forbids_script_and_other_origins(signed_in: httpx.AsyncClient,
                                                           storage: Storage) -> None:
    event_id = await store(storage, envelope())
    for path in ("/ui/", "/ui/events", f"/ui/events/{event_id}", "/ui/dead", "/ui/contacts",
                 "/ui/deals", "/ui/login", "/ui/events/999999"):
        answer = await signed_in.get(path)
        policy = answer.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "unsafe-inline" not in policy
        assert "script-src" not in policy  # none at all, by default-src
        assert "frame-ancestors 'none'" in policy and "form-action 'self'" in policy
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert "<script" not in answer.text.lower(), path
        assert "http://" not in answer.text and "https://" not in answer.text, path


async def test_logout_needs_the_token_and_ends_the_session(signed_in: httpx.AsyncClient) -> None:
    page = await signed_in.get("/ui/events")
    assert (await signed_in.post("/ui/logout", data={})).status_code == 403
    answer = await signed_in.post("/ui/logout", data={"csrf": csrf_of(page.text)})
    assert answer.status_code == 303
    assert (await signed_in.get("/ui/events")).status_code == 303


# -- events -----------------------------------------------------------------------------------


async def test_events_filter_by_status_type_time_and_search(signed_in: httpx.AsyncClient,
                                                            storage: Storage) -> None:
    first = await store(storage, envelope(n=1))
    second = await store(storage, envelope("referral.completed", n=2), kind="referral.completed",
                         minutes=5)
    third = await store(storage, envelope(n=3), minutes=10)
    await kill(storage, second, "hubspot: 400 PROPERTY_DOESNT_EXIST")
    await storage.inbox.set_ordering_keys(third, [
        identity_digest(TOUCHED, IdentityKey("email", "ada@example.com"))])

    def ids(html: str) -> list[int]:
        return [int(n) for n in re.findall(r'<td><a href="/ui/events/(\d+)">', html)]

    assert ids((await signed_in.get("/ui/events")).text) == [third, second, first]
    assert ids((await signed_in.get("/ui/events?status=dead")).text) == [second]
    assert ids((await signed_in.get("/ui/events?type=install.tracked")).text) == [third, first]
    window = "/ui/events?from=2026-03-01T12:01&until=2026-03-01T12:09"
    assert ids((await signed_in.get(window)).text) == [second]
    assert ids((await signed_in.get("/ui/events?q=Ada@Example.com")).text) == [third]
    jump = await signed_in.get(f"/ui/events?q={first}")
    assert jump.status_code == 303 and jump.headers["location"] == f"/ui/events/{first}"


async def test_bad_filters_say_what_is_wrong(signed_in: httpx.AsyncClient) -> None:
    answer = await signed_in.get("/ui/events?status=deceased&from=yesterday&before=x1")
    assert answer.status_code == 200
    assert "status &#39;deceased&#39; is not a status: pick one of received, processed" in \
        answer.text
    assert "from &#39;yesterday&#39; is not a time: write it as 2026-03-01T12:30" in answer.text
    assert "is not an event id" in answer.text
    later = await signed_in.get("/ui/events?from=2026-03-02&until=2026-03-01")
    assert "until must be later than from" in later.text


async def test_events_page_by_keyset(signed_in: httpx.AsyncClient, storage: Storage) -> None:
    stored = [await store(storage, envelope(n=n), minutes=n) for n in range(55)]
    page = await signed_in.get("/ui/events?type=install.tracked")
    shown = re.findall(r'<td><a href="/ui/events/(\d+)">', page.text)
    assert len(shown) == 50 and int(shown[0]) == stored[-1]
    older = re.search(r'href="([^"]+)" rel="next"', page.text)
    assert older is not None
    link = older.group(1).replace("&amp;", "&")
    assert "type=install.tracked" in link and f"before={stored[5]}" in link
    rest = await signed_in.get(link)
    assert [int(n) for n in re.findall(r'<td><a href="/ui/events/(\d+)">', rest.text)] == \
        stored[4::-1]
    assert 'rel="next"' not in rest.text


async def test_an_event_shows_its_trace(signed_in: httpx.AsyncClient, storage: Storage) -> None:
    event_id = await store(storage, envelope(platform="iOS"))
    await kill(storage, event_id, "local: an action died")
    await storage.outcomes.record(NewOutcome(
        event_id=event_id, rule="install-creates-lead", action_kind="upsert_contact",
        target="local", idempotency_key="k1", status="ok",
        request_summary={"identity": {"deep_link_token": "tok_1"}},
        response={"record_id": "17", "summary": "created contact 17"}, rules_version="abc123"))
    await storage.outcomes.record(NewOutcome(
        event_id=event_id, rule="install-creates-lead", action_kind="set_stage",
        target="hubspot", idempotency_key="k2", status="dead",
        error="hubspot: property 'first_touch_campaign' does not exist"))
    page = (await signed_in.get(f"/ui/events/{event_id}")).text
    assert "install-creates-lead" in page  # matched
    assert "listens to referral.completed, not install.tracked" in page  # why one was skipped
    assert "verified: X-Webhook-Signature matched" in page
    assert "record_id 17" in page and "abc123" in page
    assert "property &#39;first_touch_campaign&#39; does not exist" in page
    assert "`linkcrm provision hubspot` creates it" in page  # the dead letter's fix hint
    assert "&#34;campaign&#34;: &#34;spring&#34;" in page  # the body, pretty-printed
    assert "Replay this event" in page and "the shipped rules" in page


async def test_an_unknown_event_is_a_404_that_says_so(signed_in: httpx.AsyncClient) -> None:
    answer = await signed_in.get("/ui/events/424242")
    assert answer.status_code == 404
    assert "no event 424242" in answer.text


# -- replay -----------------------------------------------------------------------------------


async def test_replay_of_one_event_needs_the_token_and_requeues_it(
        signed_in: httpx.AsyncClient, storage: Storage) -> None:
    event_id = await store(storage, envelope())
    await kill(storage, event_id, "local: identity was entirely null")
    page = await signed_in.get(f"/ui/events/{event_id}")
    refused = await signed_in.post(f"/ui/events/{event_id}/replay", data={})
    assert refused.status_code == 403
    wrong = await signed_in.post(f"/ui/events/{event_id}/replay", data={"csrf": "0" * 64})
    assert wrong.status_code == 403
    found = await storage.inbox.get(event_id)
    assert found is not None and found.status == "dead"
    answer = await signed_in.post(f"/ui/events/{event_id}/replay",
                                  data={"csrf": csrf_of(page.text)})
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/ui/events/{event_id}?replayed=yes"
    found = await storage.inbox.get(event_id)
    assert found is not None and found.status == "received"
    shown = await signed_in.get(answer.headers["location"])
    assert "Re-queued: the worker applies it again with the shipped rules" in shown.text


async def test_dead_letters_are_grouped_and_replayed_by_group_or_all(
        signed_in: httpx.AsyncClient, storage: Storage) -> None:
    ids = [await store(storage, envelope(n=n), minutes=n) for n in range(4)]
    for item in await storage.inbox.claim("w", 10, 60):
        error = ("local: event 1 identity was entirely null" if item.id in ids[:2]
                 else "hubspot: 400 validation error")
        await storage.inbox.finish(item.id, "w", "dead", error if item.id != ids[3] else
                                   "local: event 99 identity was entirely null")
    page = await signed_in.get("/ui/dead")
    assert page.text.count('<section class="group">') == 2
    assert "event: local: event N identity was entirely null" in page.text
    assert "the event lacks the identity the rule asks for" in page.text
    group = await signed_in.post("/ui/dead/replay", data={
        "csrf": csrf_of(page.text), "event_id": [str(ids[2])]})
    assert group.headers["location"] == "/ui/dead?replayed=1&refused=0"
    assert [e.status for e in [await storage.inbox.get(i) for i in ids] if e] == [
        "dead", "dead", "received", "dead"]
    assert (await signed_in.post("/ui/dead/replay", data={"all": "yes"})).status_code == 403
    every = await signed_in.post("/ui/dead/replay", data={"csrf": csrf_of(page.text),
                                                          "all": "yes"})
    assert every.headers["location"] == "/ui/dead?replayed=3&refused=0"
    assert "No dead letters" in (await signed_in.get("/ui/dead")).text
    bad = await signed_in.post("/ui/dead/replay", data={"csrf": csrf_of(page.text),
                                                        "event_id": "1; DROP TABLE inbox"})
    assert bad.status_code == 400 and "event_id must be an event" in bad.text


# -- hostile event data -----------------------------------------------------------------------

HOSTILE = {
    "script": "<script>alert(1)</script>",
    "attribute": "\"><img src=x onerror=alert(1)>",
    "terminal": "\x1b[31mred\x1b]0;title\x07",
    "nul": "a\x00b",
    "bidi": "abc\u202edcba",
}


async def test_hostile_event_data_is_shown_as_text(signed_in: httpx.AsyncClient,
                                                   storage: Storage) -> None:
    raw = envelope("<script>alert('type')</script>", **HOSTILE).replace(
        b'"bidi"', b'"lone": "\\ud800x", "bidi"')
    event_id = await store(storage, raw, kind="<script>alert('type')</script>")
    await kill(storage, event_id, "<script>alert('error')</script>\x1b[2J")
    for path in (f"/ui/events/{event_id}", "/ui/events", "/ui/dead"):
        page = await signed_in.get(path)
        assert page.status_code == 200, path
        html = page.text
        assert "<script>alert" not in html and "<img src=x" not in html, path
        assert "\x1b" not in html and "\x00" not in html and "\u202e" not in html, path
    html = (await signed_in.get(f"/ui/events/{event_id}")).text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "\\u001b[31mred" in html and "a\\u0000b" in html and "abc\\u202edcba" in html
    assert "\\ud800x" in html  # a lone surrogate, which no UTF-8 page can carry, spelled out
    assert "&lt;script&gt;alert(&#39;error&#39;)&lt;/script&gt;\\x1b[2J" in html


async def test_a_megabyte_string_and_deep_nesting_render(signed_in: httpx.AsyncClient,
                                                         storage: Storage) -> None:
    huge = await store(storage, envelope(blob="x" * 1_000_000))
    deep = await store(storage, b'{"event":"install.tracked","data":' + b"[" * 5000
                       + b"]" * 5000 + b"}", minutes=1)
    big = await signed_in.get(f"/ui/events/{huge}")
    assert big.status_code == 200
    assert "(cut: the body is" in big.text and len(big.text) < 400_000
    nested = await signed_in.get(f"/ui/events/{deep}")
    assert nested.status_code == 200
    assert "the stored body is not a JSON object" in nested.text or "[[[[" in nested.text


# -- the embedded CRM and the overview ----------------------------------------------------------


async def test_contacts_deals_and_the_events_that_touched_a_contact(
        signed_in: httpx.AsyncClient, storage: Storage) -> None:
    key = IdentityKey("deep_link_token", "<b>tok_1</b>")
    event_id = await store(storage, envelope())
    await storage.inbox.set_ordering_keys(event_id, [identity_digest(TOUCHED, key)])
    contact = await storage.local_crm.upsert_contact([key], {"first_touch_campaign": "spring"},
                                                     {})
    await storage.local_crm.set_stage([key], "lead", ["subscriber", "lead"], event_id)
    await storage.local_crm.create_deal([key], "referral-1", "Referral: tok_1", "new", 100.0, {})
    listing = await signed_in.get("/ui/contacts")
    assert f'href="/ui/contacts/{contact.contact_id}"' in listing.text
    assert "&lt;b&gt;tok_1&lt;/b&gt;" in listing.text
    page = (await signed_in.get(f"/ui/contacts/{contact.contact_id}")).text
    assert "first_touch_campaign" in page and "spring" in page
    assert "(none)</td><td>lead" in page
    assert "Referral: tok_1" in page and "referral-1" in page
    assert f'<a href="/ui/events/{event_id}">{event_id}</a></td><td>' in page
    assert "Referral: tok_1" in (await signed_in.get("/ui/deals")).text
    missing = await signed_in.get("/ui/contacts/9999")
    assert missing.status_code == 404 and "no contact 9999" in missing.text


async def test_overview_draws_the_last_day_and_each_targets_state(
        signed_in: httpx.AsyncClient, storage: Storage) -> None:
    # The storage's clock is the real one here: events received just now.
    body = envelope()
    now = datetime.now(UTC)
    result = await storage.inbox.store(NewEvent(
        body=body, event_type="install.tracked", event_timestamp="x",
        dedupe_key=hashlib.sha256(body).hexdigest(), received_at=now))
    await storage.outcomes.record(NewOutcome(
        event_id=result.id, rule="r", action_kind="upsert_contact", target="hubspot",
        idempotency_key="k", status="retrying", error="hubspot: 429 Too Many Requests"))
    page = (await signed_in.get("/ui/")).text
    assert '<rect class="s-received"' in page
    assert "events per minute" in page and "hubspot: actions per minute" in page
    assert re.search(r"<th>hubspot</th><td><span class=\"state t-rate-limited\">", page)
    assert re.search(r"<th>local</th><td><span class=\"state t-idle\">", page)
    assert "Backlog age" in page and "none: no event is waiting" not in page
