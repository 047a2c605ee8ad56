"""The endpoints of the delivery log: each reads the storage, renders one template.

Replays call the same storage methods as `linkcrm replay`: `inbox.requeue(id)` for events
named by id (one, or a group of dead letters), `inbox.requeue_dead()` for all of them.
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from engine.actions import TOUCHED, identity_digest
from engine.rules.model import RuleSet
from engine.storage import EVENT_STATUSES, Clock, DeadLetter, EventFilter, Storage

from . import overview
from .access import COOKIE, CSRF_FIELD, SESSION_SECONDS, Access
from .activerules import ActiveRules
from .filters import PAGE_SIZE, parse_filters
from .render import Pages
from .trace import build_trace, fix_hint

LOGIN_COOKIE = "linkcrm_ui_login"
DEAD_LETTERS_READ = 1000
CONTACTS_SHOWN = 1000
OUTCOMES_READ = 20_000
FAILED_LOGIN_DELAY = 0.5
_NUMBERS = re.compile(r"\d+")

FORM_BYTES = 256 * 1024
FORM_FIELDS = 2000
Form = dict[str, list[str]]


def _one(form: Form, name: str) -> str:
    values = form.get(name, [])
    return values[0] if len(values) == 1 else ""


def _safe_next(target: str | None) -> str:
    """Only a path of these pages: never another site (`//evil`, `https://...`)."""
    if target and target.startswith("/ui/") and not target.startswith("//") \
            and "\\" not in target and "\n" not in target and "\r" not in target:
        return target
    return "/ui/"


def _group_key(letter: DeadLetter) -> str:
    first = (letter.error or "(no error recorded)").split("\n", 1)[0]
    return f"{letter.target or 'event'}: {_NUMBERS.sub('N', first)[:200]}"


class Handlers:
    def __init__(self, storage: Storage, ruleset: RuleSet | None, rules_label: str,
                 targets: tuple[str, ...], access: Access, pages: Pages, clock: Clock) -> None:
        self.storage = storage
        self.rules = ActiveRules(storage.rule_versions, ruleset, rules_label)
        self.targets = targets
        self.access = access
        self.pages = pages
        self.clock = clock
        self.identity_fields = tuple(sorted(
            name for name, spec in ruleset.field_map.fields.items() if spec.identity
        )) if ruleset is not None else ("deep_link_token", "email")

    # -- sessions ---------------------------------------------------------------------------

    def _nonce(self, request: Request) -> str | None:
        return self.access.session(request.cookies.get(COOKIE))

    def _page(self, request: Request, name: str, nonce: str, status: int = 200,
              **context: Any) -> Response:
        return self.pages.render(name, status, csrf=self.access.csrf_token(nonce),
                                 csrf_field=CSRF_FIELD, path=request.url.path, **context)

    def _to_login(self, request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/ui/login?" + urlencode({"next": target}), status_code=303)

    async def _form(self, request: Request, nonce: str | None) -> Form:
        """The POSTed form (URL-encoded, at most FORM_BYTES), after its CSRF token is checked
        (403 otherwise)."""
        form: Form = {}
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind == "application/x-www-form-urlencoded":  # else no form, so no token: 403
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > FORM_BYTES:
                    raise HTTPException(413, f"the form is larger than {FORM_BYTES} bytes")
            try:
                form = parse_qs(body.decode("utf-8"), max_num_fields=FORM_FIELDS)
            except (UnicodeDecodeError, ValueError):
                raise HTTPException(400, "the form is not URL-encoded UTF-8 text") from None
        tokens = form.get(CSRF_FIELD, [])
        if nonce is None or len(tokens) != 1 or not self.access.csrf_matches(nonce, tokens[0]):
            raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the "
                                     "page and send the form again")
        return form

    async def login_form(self, request: Request) -> Response:
        nonce = self.access.new_session().split(".")[1]
        response = self.pages.render(
            "login.html", csrf=self.access.csrf_token(nonce), csrf_field=CSRF_FIELD,
            next=_safe_next(request.query_params.get("next")), problem=None, path="")
        self._cookie(request, response, LOGIN_COOKIE, nonce, 600)
        return response

    async def login(self, request: Request) -> Response:
        form = await self._form(request, request.cookies.get(LOGIN_COOKIE))
        password = _one(form, "password")
        target = _safe_next(_one(form, "next"))
        if not password or not self.access.password_matches(password):
            await asyncio.sleep(FAILED_LOGIN_DELAY)  # guessing costs time
            nonce = self.access.new_session().split(".")[1]
            response: Response = self.pages.render(
                "login.html", 401, csrf=self.access.csrf_token(nonce), csrf_field=CSRF_FIELD,
                next=target, path="",
                problem="that is not the password: use the value of LINKCRM_UI_PASSWORD "
                        "that `linkcrm serve` was started with")
            self._cookie(request, response, LOGIN_COOKIE, nonce, 600)
            return response
        response = RedirectResponse(target, status_code=303)
        self._cookie(request, response, COOKIE, self.access.new_session(), SESSION_SECONDS)
        response.delete_cookie(LOGIN_COOKIE, path="/ui/", httponly=True, samesite="strict")
        return response

    async def logout(self, request: Request) -> Response:
        await self._form(request, self._nonce(request))
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/ui/", httponly=True, samesite="strict")
        return response

    @staticmethod
    def _cookie(request: Request, response: Response, name: str, value: str,
                seconds: int) -> None:
        response.set_cookie(name, value, max_age=seconds, path="/ui/", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")

    async def problem(self, request: Request, error: Exception) -> Response:
        """An error page (404, 403 for a missing CSRF token, ...) that says what is wrong."""
        status = getattr(error, "status_code", 500)
        detail = getattr(error, "detail", "") or "no such page"
        if status == 404 and detail == "Not Found":
            detail = "no such page: the overview links to every page"
        return self.pages.render("error.html", status, status=status, detail=detail,
                                 csrf="", csrf_field=CSRF_FIELD, path="", signed_in=False)

    # -- pages -------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        nonce = self._nonce(request)
        if nonce is None:
            return self._to_login(request)
        now = self.clock()
        start = (now - overview.WINDOW).replace(second=0, microsecond=0) + timedelta(minutes=1)
        events = await self.storage.inbox.activity(start)
        outcomes = await self.storage.outcomes.activity(start, OUTCOMES_READ)
        retries = await self.storage.outcomes.recent_retries(now - overview.RECENT)
        stats = await self.storage.inbox.stats()
        targets = sorted({*self.targets, *(c.target for c in outcomes if c.target)})
        target_charts = [overview.chart(f"{target}: actions per minute",
                                        [c for c in outcomes if c.target == target],
                                        overview.OUTCOME_SERIES, start) for target in targets]
        return self._page(
            request, "overview.html", nonce, start=start, now=now,
            events_chart=overview.chart("events per minute", events, overview.EVENT_SERIES,
                                        start),
            target_charts=target_charts,
            states=overview.target_states(self.targets, outcomes, retries, now),
            backlog=overview.backlog_age(stats.oldest_pending_received_at, now),
            by_status=stats.by_status, outcomes_read=f"{OUTCOMES_READ:,}")

    async def events(self, request: Request) -> Response:
        nonce = self._nonce(request)
        if nonce is None:
            return self._to_login(request)
        query = parse_filters(request.query_params, identity_fields=self.identity_fields)
        if query.event_id is not None:
            return RedirectResponse(f"/ui/events/{query.event_id}", status_code=303)
        found = await self.storage.inbox.browse(query.where, limit=PAGE_SIZE + 1,
                                                before_id=query.before)
        more = len(found) > PAGE_SIZE
        found = found[:PAGE_SIZE]
        kept = {k: v for k, v in query.form.items() if v}
        next_page = "/ui/events?" + urlencode({**kept, "before": found[-1].id}) \
            if more and found else None
        first_page = "/ui/events?" + urlencode(kept) if query.before is not None else None
        return self._page(request, "events.html", nonce, events=found, form=query.form,
                          problems=query.problems, statuses=EVENT_STATUSES,
                          next_page=next_page, first_page=first_page)

    async def event(self, request: Request) -> Response:
        nonce = self._nonce(request)
        if nonce is None:
            return self._to_login(request)
        event_id = int(request.path_params["event_id"])
        found = await self.storage.inbox.get(event_id)
        if found is None:
            raise HTTPException(404, f"no event {event_id}: the events page lists them")
        outcomes = await self.storage.outcomes.of_event(event_id)
        ruleset, rules_label = await self.rules.current()
        trace = build_trace(found, outcomes, ruleset, rules_label)
        return self._page(request, "event.html", nonce, trace=trace, event=found,
                          rules_label=rules_label,
                          replayed=request.query_params.get("replayed"))

    async def replay_event(self, request: Request) -> Response:
        nonce = self._nonce(request)
        if nonce is None:
            return self._to_login(request)
        await self._form(request, nonce)
        event_id = int(request.path_params["event_id"])
        done = await self.storage.inbox.requeue(event_id)
        return RedirectResponse(f"/ui/events/{event_id}?replayed={'yes' if done else 'no'}",
                                status_code=303)

    async def dead(self, request: Request) -> Response:
        nonce = self._nonce(request)
        if nonce is None:
            return self._to_login(request)
        letters = await self.storage.inbox.dead_letters(DEAD_LETTERS_READ)
        groups: dict[str, dict[str, Any]] = {}
        for letter in letters:
            group = groups.setdefault(_group_key(letter), {
                "key": _group_key(letter), "letters": [], "event_ids": [],
                "error": letter.error, "hint": fix_hint(letter.error, letter.target)})
            group["letters"].append(letter)
            if letter.event_id not in group["event_ids"]:
                group["event_ids"].append(letter.event_id)
        ordered = sorted(groups.values(), key=lambda g: -len(g["letters"]))
        _, rules_label = await self.rules.current()
        return self._page(request, "dead.html", nonce, groups=ordered, count=len(letters),
                          capped=len(letters) >= DEAD_LETTERS_READ,
                          rules_label=rules_label,
                          replayed=request.query_params.get("replayed"),
                          refused=request.query_params.get("refused"))

    async def replay_dead(self, request: Request) -> Response:
        nonce = self._nonce(request)
        if nonce is None:
            return self._to_login(request)
        form = await self._form(request, nonce)
        done: set[int] = set()
        refused: list[int] = []
        if _one(form, "all") == "yes":
            done.update(await self.storage.inbox.requeue_dead())
        else:
            for raw in form.get("event_id", []):
                if not raw.isdigit() or len(raw) > 18:
                    raise HTTPException(400, "event_id must be an event's number")
                event_id = int(raw)
                (done.add(event_id) if await self.storage.inbox.requeue(event_id)
                 else refused.append(event_id))
        return RedirectResponse(
            "/ui/dead?" + urlencode({"replayed": len(done), "refused": len(refused)}),
            status_code=303)

    async def contacts(self, request: Request) -> Response:
        nonce = self._nonce(request)
        if nonce is None:
            return self._to_login(request)
        found = await self.storage.local_crm.contacts(CONTACTS_SHOWN)
        return self._page(request, "contacts.html", nonce, contacts=found,
                          capped=len(found) >= CONTACTS_SHOWN)

    async def contact(self, request: Request) -> Response:
        nonce = self._nonce(request)
        if nonce is None:
            return self._to_login(request)
        contact_id = int(request.path_params["contact_id"])
        # Ids ascend from 1, so the contact is among the first `contact_id` ones.
        found = [c for c in await self.storage.local_crm.contacts(contact_id)
                 if c.id == contact_id] if 0 < contact_id < 10**9 else []
        if not found:
            raise HTTPException(404, f"no contact {contact_id}: the contacts page lists them")
        contact = found[0]
        deals = [d for d in await self.storage.local_crm.deals() if d.contact_id == contact_id]
        touched = tuple(sorted({identity_digest(TOUCHED, k) for k in contact.identities}))
        events = await self.storage.inbox.browse(EventFilter(touched=touched), limit=PAGE_SIZE)
        return self._page(request, "contact.html", nonce, contact=contact, deals=deals,
                          events=events)

    async def deals(self, request: Request) -> Response:
        nonce = self._nonce(request)
        if nonce is None:
            return self._to_login(request)
        found = await self.storage.local_crm.deals(CONTACTS_SHOWN)
        return self._page(request, "deals.html", nonce, deals=found,
                          capped=len(found) >= CONTACTS_SHOWN)
