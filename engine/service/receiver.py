"""The two intake endpoints: verify, store durably, answer; no CRM call ever happens here.

    receiver = Receiver(storage, settings, metrics)
    Route("/webhooks/tolinku", receiver.webhook, methods=["POST"])
    Route("/v1/identify", receiver.identify, methods=["POST"])

`POST /webhooks/tolinku` takes a Tolinku delivery signed with WEBHOOK_SECRET; `POST
/v1/identify` takes an app's identify call authorized by a key from LINKCRM_API_KEYS. Both
answer only once the event is committed: `{"status": "stored"|"duplicate", "id": N}`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

from jsonschema import Draft202012Validator
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope

from engine.config.resources import validator
from engine.errors import StorageError, UnstorableEventError
from engine.runtime.metrics import Metrics
from engine.runtime.settings import Settings
from engine.service.intake import (
    Head,
    Rejected,
    authorized,
    check_declared_size,
    iso_utc,
    parse_envelope,
    parse_json,
    read_body,
    read_head,
    validate_identify,
)
from engine.service.refusals import refuse
from engine.signing import verify_signature
from engine.storage import Clock, NewEvent, Storage, utc_now
from engine.storage.records import DEDUPE_PREFIX_CHARACTERS

log = logging.getLogger(__name__)

IDENTIFY_EVENT = "app.user_identified"
WEBHOOK_PATH = "/webhooks/tolinku"
IDENTIFY_PATH = "/v1/identify"
_MAX_EVENT_LABELS = 200


class StoredResponse(Response):
    """The 200 JSON answer to a stored event, rendered by hand: it is sent thousands of times
    a second, and Starlette's generic header building cost more than the rest of it."""

    media_type = "application/json"

    def __init__(self, body: bytes) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.raw_headers = [(b"content-length", b"%d" % len(body)),
                            (b"content-type", b"application/json")]


def _signed(head: Head) -> None:
    if not head.signature:
        raise Rejected("bad_signature", 401)


def _anything(head: Head) -> None:
    pass


class Receiver:
    """The webhook and identify endpoints over one open, migrated `storage`."""

    def __init__(
        self, storage: Storage, settings: Settings, metrics: Metrics, clock: Clock = utc_now
    ) -> None:
        self.storage = storage
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.api_keys = [key.encode("utf-8") for key in settings.api_keys]
        self.identify_schema = validator(f"events/{IDENTIFY_EVENT}.json").evolve(
            format_checker=Draft202012Validator.FORMAT_CHECKER
        )
        self._event_labels: set[str] = set()

    async def webhook(self, request: Request) -> Response:
        """`POST /webhooks/tolinku` as a Starlette endpoint."""
        return await self.answer_webhook(request.scope, request.receive)

    async def answer_webhook(self, scope: Scope, receive: Receive) -> Response:
        """`POST /webhooks/tolinku`: the hot path, thousands of deliveries a second. The app
        calls it straight from ASGI, without a Request object (engine/service/app.py)."""
        head = read_head(scope)
        body = await self._read(receive, head, _signed)
        if isinstance(body, Response):
            return body
        try:
            if not verify_signature(body, head.signature, self.settings.webhook_secrets):
                raise Rejected("bad_signature", 401)
            envelope = parse_envelope(body)
        except Rejected as error:
            return refuse(self.metrics, error, close=False)
        event_type = envelope["event"]
        announced = head.event
        if announced is not None and announced != event_type:
            # The signed body is the truth; the header is not signed. Types only, no data.
            log.warning("X-Webhook-Event disagrees with the signed body", extra={
                "event_type": event_type, "header_event_type": announced[:64]})
        return await self._store(NewEvent(
            body=body,
            event_type=event_type,
            event_timestamp=envelope["timestamp"],
            dedupe_key=hashlib.sha256(body).hexdigest(),
            # Fixed by the signed body, as the key is: keys of one moment are stored together.
            dedupe_prefix=envelope["timestamp"][:DEDUPE_PREFIX_CHARACTERS],
            received_at=self.clock(),
            source="tolinku",
            headers=head.kept,
        ))

    async def identify(self, request: Request) -> Response:
        """`POST /v1/identify`: an identify call, stored as an `app.user_identified` event."""
        head = read_head(request.scope)
        if not authorized(head, self.api_keys):
            return refuse(self.metrics, Rejected("unauthorized", 401), close=True)
        body = await self._read(request.receive, head, _anything)
        if isinstance(body, Response):
            return body
        received_at = self.clock()
        try:
            data = parse_json(body)
            envelope = {"event": IDENTIFY_EVENT, "timestamp": iso_utc(received_at), "data": data}
            validate_identify(self.identify_schema, envelope)
        except Rejected as error:
            return refuse(self.metrics, error, close=False)
        return await self._store(NewEvent(
            body=json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode(),
            event_type=IDENTIFY_EVENT,
            event_timestamp=envelope["timestamp"],
            # Over the request body, not the envelope (its timestamp differs per call), and in
            # its own namespace so an identify body can never collide with a Tolinku delivery.
            dedupe_key=hashlib.sha256(b"identify\n" + body).hexdigest(),
            received_at=received_at,
            source="identify",
            headers=head.kept,
        ))

    async def _read(
        self, receive: Receive, head: Head, admit: Callable[[Head], None]
    ) -> bytes | Response:
        """The body, read under the size cap and the deadline once the declared size and
        `admit` pass; otherwise the answer, which closes the connection (the rest of the
        body is never read)."""
        limit = self.settings.max_body_bytes
        try:
            check_declared_size(head, limit)
            admit(head)
            return await read_body(receive, limit, self.settings.request_timeout)
        except Rejected as error:
            return refuse(self.metrics, error, close=True)
        except ClientDisconnect:
            return Response(status_code=400)

    async def _store(self, event: NewEvent) -> Response:
        try:
            result = await self.storage.inbox.store(event)
        except UnstorableEventError as error:
            # It never will be: a 503 would have the sender retry it forever.
            log.info("event refused by the storage", extra={"event_type": event.event_type[:64],
                                                            "error": str(error)})
            return refuse(self.metrics, Rejected("bad_envelope", 400, str(error)), close=False)
        except StorageError as error:
            log.error("event not stored", extra={"event_type": event.event_type,
                                                 "error": str(error)})
            return refuse(self.metrics, Rejected("storage_unavailable", 503,
                                                 "the event could not be stored; retry later"),
                          close=False)
        if result.duplicate:
            self.metrics.duplicates.inc(source=event.source)
        else:
            self.metrics.received.inc(event=self._label(event.event_type), source=event.source)
        if log.isEnabledFor(logging.DEBUG):  # skip building the record at thousands a second
            log.debug("event stored", extra={"event_id": result.id,
                                             "event_type": event.event_type,
                                             "duplicate": result.duplicate})
        status = b"duplicate" if result.duplicate else b"stored"
        return StoredResponse(b'{"status":"%s","id":%d}' % (status, result.id))

    def _label(self, event_type: str) -> str:
        # Event types come from signed bodies, but cap the label set all the same.
        if event_type in self._event_labels:
            return event_type
        if len(self._event_labels) < _MAX_EVENT_LABELS and len(event_type) <= 64:
            self._event_labels.add(event_type)
            return event_type
        return "other"
