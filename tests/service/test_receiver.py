"""The receiver through Starlette's TestClient: what is answered, and what is (not) stored."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from engine.errors import StorageError
from engine.runtime.settings import Settings
from engine.service.app import create_app
from engine.signing import sign
from engine.storage import InboxEvent, InboxStats, NewEvent, StoreResult
from engine.storage.sqlite.inbox import SQLiteInbox
from engine.storage.sqlite.store import SQLiteStorage

SECRET = "whsec_current"
OLD_SECRET = "whsec_previous"
API_KEY = "key-for-the-app-backend"
SETTINGS = Settings(
    webhook_secrets=(SECRET, OLD_SECRET),
    api_keys=("another-key", API_KEY),
    max_body_bytes=64 * 1024,
    request_timeout=0.5,
)
INSTALL = json.dumps({
    "event": "install.tracked",
    "timestamp": "2026-03-01T10:00:00Z",
    "data": {"token": "tok_1", "campaign": "spring", "platform": "iOS"},
}).encode()


def events(storage: SQLiteStorage) -> list[InboxEvent]:
    return asyncio.run(storage.inbox.list_events(limit=1000))


def post(client: TestClient, body: bytes, signature: bytes | str | None = "sign",
         **headers: Any) -> Any:
    sent = {"content-type": "application/json", "user-agent": "Tolinku/1.0", **headers}
    if signature == "sign":
        signature = sign(body, SECRET)
    if signature is not None:
        sent["x-webhook-signature"] = signature
    return client.post("/webhooks/tolinku", content=body, headers=sent)


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[SQLiteStorage]:
    opened = SQLiteStorage(tmp_path / "linkcrm.db")
    asyncio.run(opened.migrate())
    yield opened
    asyncio.run(opened.close())


@pytest.fixture
def app(storage: SQLiteStorage) -> Starlette:
    return create_app(storage, SETTINGS)


@pytest.fixture
def client(app: Starlette) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


# -- signatures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        sign(INSTALL, "whsec_wrong"),
        sign(INSTALL, SECRET)[:40],
        b"\xc3\xa9\xff" * 22,
        "sha256=" + "0" * 64,
    ],
    ids=["missing", "empty", "wrong", "wrong-length", "non-ascii", "zeros"],
)
def test_bad_signatures_get_401_without_detail_and_store_nothing(
    client: TestClient, storage: SQLiteStorage, signature: bytes | str | None
) -> None:
    response = post(client, INSTALL, signature)
    assert response.status_code == 401
    assert response.content == b""
    assert events(storage) == []


@pytest.mark.parametrize(
    "signature",
    ["sha256=" + sign(INSTALL, SECRET), sign(INSTALL, OLD_SECRET)],
    ids=["sha256-prefix", "rotation-second-secret"],
)
def test_accepted_signature_forms(
    client: TestClient, storage: SQLiteStorage, signature: str
) -> None:
    response = post(client, INSTALL, signature)
    assert response.status_code == 200
    assert response.json()["status"] == "stored"
    assert len(events(storage)) == 1


def test_the_signature_covers_the_exact_bytes(client: TestClient, storage: SQLiteStorage) -> None:
    reformatted = json.dumps(json.loads(INSTALL), indent=2).encode()
    assert post(client, reformatted, sign(INSTALL, SECRET)).status_code == 401
    assert events(storage) == []


# -- the envelope -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason", "fragment"),
    [
        (b'{"event": "install.tracked", ', "bad_json", "not valid JSON"),
        (b"\xff\xfe not utf-8", "bad_json", "not valid JSON"),
        (b'{"event":"x","timestamp":"t","data":{"n":NaN}}', "bad_json", "NaN"),
        (b"[" * 100_000 + b"]" * 100_000, "too_large", "larger than"),
        (b'[{"event": "install.tracked"}]', "bad_envelope", "not an array"),
        (b'{"event": "install.tracked", "timestamp": "2026-03-01T10:00:00Z"}',
         "bad_envelope", '"data" is missing'),
        (b'{"event": 7, "timestamp": "t", "data": []}', "bad_envelope",
         '"event" must be a non-empty string, not a number; "data" must be an object'),
        (b'{"event": "", "timestamp": "t", "data": {}}', "bad_envelope", "not an empty string"),
    ],
)
def test_verified_but_malformed_bodies_get_400_and_store_nothing(
    client: TestClient, storage: SQLiteStorage, body: bytes, reason: str, fragment: str
) -> None:
    response = post(client, body)
    assert response.status_code == (413 if reason == "too_large" else 400)
    assert response.json()["error"] == reason
    assert fragment in response.json()["message"]
    assert events(storage) == []


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b'{"event":"install.tracked\\ud800","timestamp":"2026-03-01T10:00:00Z","data":{}}',
         '"event" holds a lone surrogate (U+D800 at character 16)'),
        (b'{"event":"install.tracked","timestamp":"\\udc002026-03-01","data":{}}',
         '"timestamp" holds a lone surrogate (U+DC00 at character 1)'),
    ],
    ids=["event", "timestamp"],
)
def test_a_lone_surrogate_that_can_never_be_stored_is_a_400_not_a_503(
    client: TestClient, storage: SQLiteStorage, body: bytes, named: str
) -> None:
    """A 503 would have Tolinku retry it forever; and the deliveries around it are stored."""
    response = post(client, body)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_envelope"
    assert named in response.json()["message"]
    assert "retry-after" not in response.headers
    assert events(storage) == []
    assert post(client, INSTALL).status_code == 200


def test_deeply_nested_json_is_a_400_not_a_crash(
    storage: SQLiteStorage,
) -> None:
    roomy = create_app(storage, replace(SETTINGS, max_body_bytes=1024 * 1024))
    body = b"[" * 200_000 + b"]" * 200_000
    with TestClient(roomy) as client:
        response = post(client, body)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_json"


# -- storing ------------------------------------------------------------------------------------


def test_a_valid_delivery_is_stored_with_its_raw_bytes(
    client: TestClient, storage: SQLiteStorage
) -> None:
    response = post(client, INSTALL, **{"x-webhook-event": "install.tracked"})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "stored"
    [stored] = events(storage)
    assert stored.id == body["id"]
    assert stored.body == INSTALL
    assert stored.dedupe_key == hashlib.sha256(INSTALL).hexdigest()
    assert stored.event_type == "install.tracked"
    assert stored.event_timestamp == "2026-03-01T10:00:00Z"
    assert stored.headers["user-agent"] == "Tolinku/1.0"
    assert "x-webhook-signature" not in stored.headers


def test_an_unknown_event_type_is_accepted(client: TestClient, storage: SQLiteStorage) -> None:
    body = b'{"event":"ecommerce.cart_abandoned","timestamp":"2026-03-01T10:00:00Z","data":{}}'
    assert post(client, body).status_code == 200
    assert [e.event_type for e in events(storage)] == ["ecommerce.cart_abandoned"]


def test_a_duplicate_delivery_answers_200_and_stores_nothing_new(
    client: TestClient, storage: SQLiteStorage
) -> None:
    first = post(client, INSTALL).json()
    second = post(client, INSTALL)
    assert second.status_code == 200
    assert second.json() == {"status": "duplicate", "id": first["id"]}
    assert len(events(storage)) == 1


def test_five_concurrent_identical_deliveries_store_one(
    client: TestClient, storage: SQLiteStorage
) -> None:
    with ThreadPoolExecutor(max_workers=5) as pool:
        responses = list(pool.map(lambda _: post(client, INSTALL), range(5)))
    assert [r.status_code for r in responses] == [200] * 5
    assert sorted(r.json()["status"] for r in responses) == ["duplicate"] * 4 + ["stored"]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(events(storage)) == 1


def test_a_disagreeing_event_header_is_logged_not_trusted(
    client: TestClient, storage: SQLiteStorage, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="engine.service.receiver"):
        response = post(client, INSTALL, **{"x-webhook-event": "referral.completed"})
    assert response.status_code == 200
    assert [e.event_type for e in events(storage)] == ["install.tracked"]
    [record] = [r for r in caplog.records if "X-Webhook-Event" in r.getMessage()]
    assert record.__dict__["header_event_type"] == "referral.completed"
    assert "tok_1" not in caplog.text


# -- size and time limits -----------------------------------------------------------------------


def test_oversize_with_content_length_is_413_before_reading(
    client: TestClient, storage: SQLiteStorage
) -> None:
    body = b" " * (SETTINGS.max_body_bytes + 1)
    response = post(client, body)
    assert response.status_code == 413
    assert response.headers["connection"] == "close"
    assert events(storage) == []


def test_oversize_chunked_without_content_length_is_413(
    client: TestClient, storage: SQLiteStorage
) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(200):
            yield b" " * 4096

    response = client.post("/webhooks/tolinku", content=chunks(),
                           headers={"x-webhook-signature": "0" * 64})
    assert response.status_code == 413
    assert events(storage) == []


def test_a_body_arriving_too_slowly_gets_408(storage: SQLiteStorage) -> None:
    app = create_app(storage, replace(SETTINGS, request_timeout=0.3))
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.1)  # one byte every 100 ms, forever
        return {"type": "http.request", "body": b"{", "more_body": True}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/webhooks/tolinku", "raw_path": b"/webhooks/tolinku",
        "query_string": b"", "root_path": "", "server": ("test", 80), "client": None,
        "headers": [(b"x-webhook-signature", b"0" * 64)],
    }

    async def call() -> None:
        await asyncio.wait_for(app(scope, receive, send), timeout=5)

    asyncio.run(call())
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert events(storage) == []


# -- storage failures ---------------------------------------------------------------------------


class _BrokenInbox(SQLiteInbox):
    async def store(self, event: NewEvent) -> StoreResult:
        raise StorageError("the database could not commit: disk I/O error")


class _BrokenStorage(SQLiteStorage):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.inbox = _BrokenInbox(self.database)

    async def ping(self) -> None:
        raise StorageError("the database is not reachable")


def _cannot_grow(connection: sqlite3.Connection) -> None:
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    connection.execute(f"PRAGMA max_page_count = {int(pages)}")


def test_storage_that_cannot_write_gets_503_with_retry_after(tmp_path: Path) -> None:
    setup = SQLiteStorage(tmp_path / "full.db")
    asyncio.run(setup.migrate())
    asyncio.run(setup.close())
    full = SQLiteStorage(tmp_path / "full.db", configure=_cannot_grow)
    body = json.dumps({"event": "install.tracked", "timestamp": "t",
                       "data": {"blob": "x" * 40_000}}).encode()
    try:
        with TestClient(create_app(full, SETTINGS)) as client:
            response = post(client, body)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "30"
            assert response.json()["error"] == "storage_unavailable"
        assert events(full) == []
    finally:
        asyncio.run(full.close())


def test_readyz_is_503_when_storage_is_unreachable(tmp_path: Path) -> None:
    broken = _BrokenStorage(tmp_path / "broken.db")
    try:
        with TestClient(create_app(broken, SETTINGS)) as client:
            assert client.get("/readyz").status_code == 503
            assert post(client, INSTALL).status_code == 503
            assert client.get("/healthz").status_code == 200
    finally:
        asyncio.run(broken.close())


# -- /v1/identify -------------------------------------------------------------------------------


def identify(client: TestClient, body: Any, key: str | None = API_KEY) -> Any:
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/v1/identify", content=content, headers=headers)


@pytest.mark.parametrize("key", [None, "wrong-key", "", API_KEY + "x"])
def test_identify_without_the_right_key_is_401(
    client: TestClient, storage: SQLiteStorage, key: str | None
) -> None:
    response = identify(client, {"token": "tok_1"}, key)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert events(storage) == []


def test_identify_with_basic_auth_is_401(client: TestClient) -> None:
    response = client.post("/v1/identify", json={"token": "t"},
                           headers={"authorization": f"Basic {API_KEY}"})
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"first_name": "Ada"}, "at $: needs at least one of token, email"),
        ({"user_id": "u_1"}, "at $: needs at least one of token, email"),
        ({"token": ""}, "at $.token: must not be empty or blank"),
        ({"token": " \t"}, "at $.token: must not be empty or blank"),
        ({"email": "  "}, "at $.email: must not be empty or blank"),
        ({"email": ""}, "at $.email: must not be empty or blank"),
        ({"token": "", "email": "ada@example.com"}, "at $.token: must not be empty or blank"),
        ({"token": "t", "email": 42}, "at $.email: 42 is not of type 'string'"),
        ({"email": "not-an-email"}, "at $.email: 'not-an-email' is not a 'email'"),
        ([{"token": "t"}], "is not of type 'object'"),
    ],
)
def test_identify_with_an_invalid_body_is_400_with_the_schema_message(
    client: TestClient, storage: SQLiteStorage, body: Any, fragment: str
) -> None:
    response = identify(client, body)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_envelope"
    assert fragment in response.json()["message"]
    assert events(storage) == []


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b'{"token": "tok_\\ud800"}', "at $.token holds a lone surrogate (U+D800 at character 5)"),
        (b'{"token": "t", "first_name": ["A\\udfff"]}', "at $.first_name[0] holds a lone"),
        (b'{"token": "t", "\\ud83d": 1}', "at a key of $ holds a lone surrogate (U+D83D"),
    ],
    ids=["token", "nested-value", "key"],
)
def test_identify_with_a_lone_surrogate_is_400_not_500(
    client: TestClient, storage: SQLiteStorage, body: bytes, named: str
) -> None:
    response = identify(client, body)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_envelope"
    assert named in response.json()["message"]
    assert "not valid Unicode" in response.json()["message"]
    assert events(storage) == []


def test_identify_with_invalid_json_is_400(client: TestClient) -> None:
    response = identify(client, b"{nope")
    assert response.status_code == 400
    assert response.json()["error"] == "bad_json"


def test_identify_stores_an_app_user_identified_envelope(
    client: TestClient, storage: SQLiteStorage
) -> None:
    data = {"token": "tok_1", "email": "ada@example.com", "first_name": "Ada",
            "last_name": "Lovelace", "user_id": "u_1", "plan": "pro"}
    response = identify(client, data)
    assert response.status_code == 200
    assert response.json()["status"] == "stored"
    [stored] = events(storage)
    assert stored.event_type == "app.user_identified"
    assert stored.source == "identify"
    assert stored.body is not None
    envelope = json.loads(stored.body)
    assert envelope["event"] == "app.user_identified"
    assert envelope["data"] == data
    assert envelope["timestamp"].endswith("Z") and envelope["timestamp"] == stored.event_timestamp


def test_identical_identify_bodies_dedupe(client: TestClient, storage: SQLiteStorage) -> None:
    first = identify(client, {"token": "tok_1", "email": "ada@example.com"})
    second = identify(client, {"token": "tok_1", "email": "ada@example.com"})
    assert second.json() == {"status": "duplicate", "id": first.json()["id"]}
    assert len(events(storage)) == 1


def test_identify_is_refused_when_no_keys_are_configured(storage: SQLiteStorage) -> None:
    with TestClient(create_app(storage, replace(SETTINGS, api_keys=()))) as client:
        assert identify(client, {"token": "t"}, "").status_code == 401
        assert identify(client, {"token": "t"}, "anything").status_code == 401


# -- health and metrics -------------------------------------------------------------------------


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {
        "status": "ready",
        "storage": {"sqlite_synchronous": 2, "sqlite_wal": 1},  # 2 = FULL
    }


def test_metrics_count_received_rejected_duplicates_and_inbox(client: TestClient) -> None:
    post(client, INSTALL)
    post(client, INSTALL)
    post(client, INSTALL, "bad")
    post(client, b"[]")
    identify(client, {"token": "t"}, "wrong")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    expected = [
        'linkcrm_events_received_total{event="install.tracked",source="tolinku"} 1',
        'linkcrm_events_duplicate_total{source="tolinku"} 1',
        'linkcrm_requests_rejected_total{reason="bad_signature"} 1',
        'linkcrm_requests_rejected_total{reason="bad_envelope"} 1',
        'linkcrm_requests_rejected_total{reason="unauthorized"} 1',
        'linkcrm_requests_rejected_total{reason="timeout"} 0',
        'linkcrm_inbox_events{status="received"} 1',
        "# TYPE linkcrm_inbox_oldest_pending_age_seconds gauge",
        "# TYPE linkcrm_actions_total counter",
    ]
    for line in expected:
        assert line in text, line


def test_metrics_need_the_bearer_key_when_one_is_set(storage: SQLiteStorage) -> None:
    guarded = create_app(storage, replace(SETTINGS, metrics_keys=("scrape-key", "next-key")))
    with TestClient(guarded) as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "scrape-key"},
                        {"authorization": "Basic scrape-key"}):
            response = client.get("/metrics", headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert "linkcrm_" not in response.text
        for key in ("scrape-key", "next-key"):
            response = client.get("/metrics", headers={"authorization": f"Bearer {key}"})
            assert response.status_code == 200
            assert "linkcrm_requests_rejected_total" in response.text
        assert client.get("/healthz").status_code == 200  # only /metrics is guarded
        assert client.get("/readyz").status_code == 200
    with TestClient(create_app(storage, SETTINGS)) as client:  # no key set: open, as before
        assert client.get("/metrics").status_code == 200


class _CountingStats(SQLiteInbox):
    reads = 0

    async def stats(self) -> InboxStats:
        self.reads += 1
        await asyncio.sleep(0.05)  # a read in flight while the other scrapes arrive
        return await super().stats()


def test_concurrent_scrapes_share_one_inbox_read(tmp_path: Path) -> None:
    """32 scrapers at once cost the database one read, not 64 (two gauges each)."""
    counting = SQLiteStorage(tmp_path / "scraped.db")
    inbox = counting.inbox = _CountingStats(counting.database)
    asyncio.run(counting.migrate())
    try:
        with TestClient(create_app(counting, SETTINGS)) as client:
            post(client, INSTALL)
            with ThreadPoolExecutor(max_workers=32) as pool:
                pages = list(pool.map(lambda _: client.get("/metrics").text, range(32)))
        assert all('linkcrm_inbox_events{status="received"} 1' in page for page in pages)
        assert inbox.reads <= 2, f"{inbox.reads} inbox reads for 32 scrapes"
    finally:
        asyncio.run(counting.close())


class _DiskThatFills:
    """A database that cannot grow while `full` is set (a full disk, a file-size limit)."""

    full = True

    def __call__(self, connection: sqlite3.Connection) -> None:
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        limit = int(pages) if self.full else 1_073_741_823
        connection.execute(f"PRAGMA max_page_count = {limit}")


def test_readyz_is_503_while_writes_fail_and_ready_again_once_they_commit(
    tmp_path: Path
) -> None:
    setup = SQLiteStorage(tmp_path / "filling.db")
    asyncio.run(setup.migrate())
    asyncio.run(setup.close())
    space = _DiskThatFills()
    disk = SQLiteStorage(tmp_path / "filling.db", configure=space)
    big = json.dumps({"event": "install.tracked", "timestamp": "t",
                      "data": {"blob": "x" * 40_000}}).encode()
    try:
        with TestClient(create_app(disk, SETTINGS)) as client:
            assert client.get("/readyz").status_code == 200  # reads work, nothing failed yet
            assert post(client, big).status_code == 503
            for _ in range(2):  # it stays unready: the test write fails too
                response = client.get("/readyz")
                assert response.status_code == 503
                assert response.json() == {"status": "unavailable", "reason": "writes_failing"}
            assert client.get("/healthz").status_code == 200
            space.full = False  # space again
            assert client.get("/readyz").status_code == 200
            assert post(client, big).status_code == 200
        assert len(events(disk)) == 1
    finally:
        asyncio.run(disk.close())


def test_logs_hold_no_bodies_signatures_or_emails(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        post(client, INSTALL)
        post(client, INSTALL, "sha256=deadbeef")
        identify(client, {"email": "ada@example.com", "token": "tok_secret"})
        identify(client, {"email": "broken"})
    logged = caplog.text + " ".join(json.dumps(r.__dict__, default=str) for r in caplog.records)
    for secret in ("tok_1", "deadbeef", sign(INSTALL, SECRET), "ada@example.com",
                   "tok_secret", "broken", API_KEY, SECRET):
        assert secret not in logged
