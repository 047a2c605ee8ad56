"""The Pipedrive target (API v2): persons and deals found before they are made, never made twice.

Pipedrive has no upsert and its search index lags writes, so search-then-create races itself.
linkcrm's identity map (shared by every worker through the database) guards each creation:

1. **Mapped**: the identity map knows the record id for one of the action's identity keys:
   GET it. Deletes are soft: a record deleted in Pipedrive answers 404 or `is_deleted: true`
   for 30 days; either way it is gone (never updated): unbind and carry on below (a deal
   mapping, which is never unbound, is followed by the one for its replacement).
2. **Claim**: otherwise bind a *claim* for the first identity key under a separate claim key
   (`claim:<field>` / `<generation>:<value>`, deals `claim:<generation>:<deal key>`).
   `bind_identity`/`bind_deal` return the winner atomically, so one execution holds the claim;
   the others poll the identity map until the holder binds the real record (then they PATCH it)
   and give up with RetryableCRMError after `claim_wait`.
3. **Find, then create**: the holder searches (`exact_match=true`, which ignores case, so every
   hit is read back and its field compared exactly: 'tok_A' never matches 'tok_a', nor a person
   whose *other* field holds the value, and a deleted one is skipped), creates only when nothing
   matches, and binds the record.

A claim records its owner (a hash of the action's idempotency key) and its start time. A retry
of the same action (its response was lost after Pipedrive committed the create) recognises its
own claim; because the search index may not show the record yet, it also lists the records
updated since the claim (`GET /persons?updated_since=`, which reads without index lag) before
creating. Before that, a create whose answer timed out is waited out (Pipedrive may commit
it as late as the timeout again, and neither search nor the list would show it yet), however
soon the action comes back (`claims.Unanswered`). A claim older than `claim_timeout` belongs
to a crashed worker: the next generation is claimed (again atomically: one winner) and
recovers the same way. A holder that finishes marks its generation done, so a record deleted
in Pipedrive later is re-created at the next generation without waiting or listing. In one
process, actions on the same identity are also serialised by a lock, so set_once and
forward-only stage reads cannot interleave; across processes the worker applies one
identity's events in order.

Requests are paced to the per-token burst limit and the Search API limit through shared
`Pacer`s, and 429s honour Retry-After (see `engine.targets.pipedrive.api`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from engine.actions import JSON, Action, CreateDeal, Fields, IdentityKey, SetStage, UpsertContact
from engine.config.fieldmap import CoercionError, FieldMap
from engine.errors import CRMError, PermanentCRMError, RetryableCRMError
from engine.targets.base import CallContext, IdentityStore, Outcome, RateLimitStore
from engine.targets.pacing import Sleep, window_pacer
from engine.targets.pipedrive.api import PipedriveAPI, Record, base_url_for
from engine.targets.pipedrive.batch import PendingPeople, placeholder
from engine.targets.pipedrive.claims import Claim, Claims, KeyedLocks, Slots, Unanswered
from engine.targets.pipedrive.fields import DIALECT, Account, fetch_catalog, resolve, to_wire

TARGET = "pipedrive"
Key = tuple[IdentityKey, str]  # an identity key and where it lives: "emails" or a field key


@dataclass
class _Write:
    """Person fields in Pipedrive's terms: builtin name and email, custom fields by key."""

    name: str | None = None
    email: str | None = None
    custom: dict[str, JSON] = field(default_factory=dict)


class PipedriveTarget:
    """`Target` for Pipedrive API v2 (`x-api-token`), base URL
    `https://{PIPEDRIVE_DOMAIN}.pipedrive.com` unless `base_url` overrides it.

        target = PipedriveTarget(client, api_token=token, domain="acme", field_map=field_map,
                                 identities=storage, rate_limits=storage)
        await target.start()          # resolve labels to keys; fails naming what is missing
        outcome = await target.execute(action, CallContext(idempotency_key))

    `burst_limit`/`search_limit` per `*_window` seconds are the token's limits (Pipedrive:
    20-120 requests and 10 searches per 2 s by plan).
    """

    name = TARGET
    batch_records = 10  # persons per batch: each is several paced requests, not one input

    def __init__(self, client: httpx.AsyncClient, *, api_token: str, field_map: FieldMap,
                 identities: IdentityStore, rate_limits: RateLimitStore,
                 domain: str | None = None, base_url: str | None = None,
                 burst_limit: int = 20, burst_window: float = 2.0, search_limit: int = 10,
                 search_window: float = 2.0, claim_timeout: float = 120.0,
                 claim_wait: float = 5.0, sleep: Sleep = asyncio.sleep,
                 clock: Callable[[], float] = time.time) -> None:
        bucket = "pipedrive:" + hashlib.sha256(api_token.encode()).hexdigest()[:12]
        self._api = PipedriveAPI(
            client, api_token=api_token, base_url=base_url_for(domain, base_url), sleep=sleep,
            burst=window_pacer(rate_limits, bucket + ":burst", burst_limit, burst_window, sleep),
            search=window_pacer(rate_limits, bucket + ":search", search_limit, search_window,
                                sleep))
        self._field_map, self._ids = field_map, identities
        self._claims = Claims(claim_timeout, claim_wait, sleep, clock)
        self._account: Account | None = None
        self._start_lock = asyncio.Lock()
        self._locks = KeyedLocks()
        self._unanswered = Unanswered(clock)

    async def start(self) -> Account:
        """Resolve field labels to keys, options and pipeline/stage names to ids (once).
        Raises PipedriveSetupError naming every missing label and the command that fixes it."""
        async with self._start_lock:
            if self._account is None:
                self._account = resolve(self._field_map, await fetch_catalog(self._api))
            return self._account

    async def aclose(self) -> None:
        """Nothing to release: the injected client belongs to the caller."""

    async def execute(self, action: Action, context: CallContext,
                      pending: PendingPeople | None = None) -> Outcome:
        account = self._account or await self.start()
        try:
            if isinstance(action, CreateDeal):
                return await self._deal(account, action, context.idempotency_key, pending)
            if isinstance(action, UpsertContact | SetStage):
                return await self._contact(account, action, context.idempotency_key, pending)
        except CoercionError as error:
            raise PermanentCRMError(f"{TARGET}: {error}") from None
        raise PermanentCRMError(f"{TARGET}: cannot apply {type(action).__name__}")

    async def execute_many(self, items: Sequence[tuple[Action, CallContext]]
                           ) -> list[Outcome | Exception]:
        """Apply actions person by person (those that share an identity key in their order),
        each person read once and written once for the whole batch
        (`engine.targets.pipedrive.batch`): a new person is created, with its deal, as soon as
        no later action is on it, while the next person's search waits for the Search API
        limit; a PATCH goes at the batch's end. An action after one of its identity that must
        be retried is not applied: it gets that error too."""
        pending = PendingPeople()
        results: dict[int, Outcome | Exception] = {}
        blocked: dict[IdentityKey, Exception] = {}
        order = by_person([action.identity for action, _ in items])
        last = {key: turn for turn, index in enumerate(order) for key in items[index][0].identity}
        for turn, index in enumerate(order):
            action, context = items[index]
            earlier = next((blocked[k] for k in action.identity if k in blocked), None)
            if earlier is not None:
                results[index] = earlier
                continue
            pending.index = index
            try:
                results[index] = await self.execute(action, context, pending)
            except CRMError as error:
                results[index] = error
                if isinstance(error, RetryableCRMError):
                    blocked.update(dict.fromkeys(action.identity, error))
            results.update(await pending.create_done(functools.partial(_unused_after, last, turn)))
        results.update(await pending.send(self._api))
        return [results[index] for index in range(len(items))]

    # -- contacts --------------------------------------------------------------------------------

    async def _contact(self, account: Account, action: UpsertContact | SetStage,
                       idempotency_key: str, pending: PendingPeople | None = None,
                       settle: bool = True) -> Outcome:
        """Find or create the person and write the action's changes; in a batch (`pending`)
        the changes wait for its end. `settle=False`: the outcome is not this action's (a
        deal's person), so the batch's end does not settle it."""
        keys = self._keys(account, action.identity)
        sets = self._write(account, action.set if isinstance(action, UpsertContact) else {})
        once = self._write(account, action.set_once if isinstance(action, UpsertContact) else {})
        ident = self._identity_write(account, keys)
        stage = action.stage if isinstance(action, SetStage) else None

        def create_body() -> Record:
            custom = {**ident.custom, **once.custom, **sets.custom}
            if stage is not None:
                custom.update(self._stage_value(account, {}, stage) or {})
            email = sets.email or once.email or ident.email
            body: Record = {"name": sets.name or once.name or email or keys[0][0].value}
            if email:
                body["emails"] = [{"value": email, "primary": True}]
            if custom:
                body["custom_fields"] = custom
            return body

        async with self._locks.hold(f"person:{keys[0][0].field}:{keys[0][0].value}"):
            known = pending.person(k for k, _ in keys) if pending is not None else None
            person, created = (known, False) if known is not None else \
                await self._person(keys, idempotency_key, create_body, pending)
            if pending is not None:
                person = pending.known((k for k, _ in keys), person)
            person_id = str(person["id"])
            said = pending if settle else None
            if created:
                return _said(said, person_id,
                             lambda i: Outcome(i, f"created person {i}", created=True))
            patch = self._patch(account, person, sets, once, ident, stage)
            if not patch:
                return _said(said, person_id,
                             lambda i: Outcome(i, f"person {i} already up to date"))
            if pending is not None:
                pending.change(person, patch)  # written once, after the batch's last action
            else:
                await self._api.patch(f"/persons/{person_id}", patch)
        changed = ", ".join(sorted(patch))
        return _said(said, person_id, lambda i: Outcome(i, f"updated person {i} ({changed})"))

    def _keys(self, account: Account, identity: tuple[IdentityKey, ...]) -> list[Key]:
        keys: list[Key] = []
        for key in identity:
            if account.builtin.get(key.field) == "emails":
                keys.append((key, "emails"))
            elif key.field in account.person:
                keys.append((key, account.person[key.field].key))
        if not keys:
            names = ", ".join(k.field for k in identity)
            raise PermanentCRMError(f"{TARGET}: no identity field ({names}) is mapped to a "
                                    "Pipedrive person field in fields.yaml")
        return keys

    def _write(self, account: Account, values: Fields) -> _Write:
        write = _Write()
        for name, value in values.items():
            spec = self._field_map.fields.get(name)
            if value is None or value == "" or spec is None or spec.in_crm(TARGET) is None:
                continue  # null leaves a field untouched; an unmapped field is not for Pipedrive
            coerced = self._field_map.coerce(DIALECT, name, value)
            builtin = account.builtin.get(name)
            if builtin == "name":
                write.name = str(coerced)
            elif builtin == "emails":
                write.email = str(coerced)
            elif name in account.person:
                write.custom[account.person[name].key] = to_wire(account.person[name], name,
                                                                 coerced)
            else:
                raise PermanentCRMError(f"{TARGET}: {name!r} is not a person field")
        return write

    def _identity_write(self, account: Account, keys: list[Key]) -> _Write:
        write = _Write()
        for key, where in keys:
            value = self._field_map.coerce(DIALECT, key.field, key.value)
            if where == "emails":
                write.email = write.email or str(value)
            else:
                write.custom[where] = to_wire(account.person[key.field], key.field, value)
        return write

    def _stage_value(self, account: Account, current: dict[str, JSON], stage: str
                     ) -> dict[str, JSON] | None:
        """{stage field key: option id} when `stage` is further along than the current one."""
        target = self._field_map.contact_stage(stage)
        if account.stage_field is None or target is None or not target.value(TARGET):
            raise PermanentCRMError(f"{TARGET}: stage {stage!r} has no Pipedrive value in "
                                    "fields.yaml (contact_stage_field, contact_stages)")
        wanted = to_wire(account.stage_field, "stage", target.value(TARGET))
        now = current.get(account.stage_field.key)
        if isinstance(now, dict):  # {id, label} when option labels were asked for
            now = now.get("id")
        if now is None or now == "":
            return {account.stage_field.key: wanted}
        ranks = {s.value(TARGET): i for i, s in enumerate(self._field_map.contact_stages)}
        label = account.stage_field.option_label(now)
        if label not in ranks:
            return None  # a value set outside the field map (by a person): leave it alone
        forward = ranks[target.value(TARGET)] > ranks[label]
        return {account.stage_field.key: wanted} if forward else None

    def _patch(self, account: Account, person: Record, sets: _Write, once: _Write,
               ident: _Write, stage: str | None) -> Record:
        current: dict[str, JSON] = person.get("custom_fields") or {}
        custom: dict[str, JSON] = {}
        for key, value in {**ident.custom, **once.custom}.items():
            if current.get(key) in (None, ""):
                custom[key] = value
        custom.update({k: v for k, v in sets.custom.items() if current.get(k) != v})
        if stage is not None:
            custom.update(self._stage_value(account, current, stage) or {})
        patch: Record = {"custom_fields": custom} if custom else {}
        if sets.name and sets.name != person.get("name"):
            patch["name"] = sets.name
        emails = _emails(person, sets.email, replace=True) \
            or _emails(person, once.email or ident.email, replace=False)
        if emails:
            patch["emails"] = emails
        return patch

    # -- finding or creating a person ------------------------------------------------------------

    async def _person(self, keys: list[Key], idempotency_key: str,
                      create_body: Callable[[], Record], pending: PendingPeople | None = None
                      ) -> tuple[Record, bool]:
        """The person, found or created, and whether it is new. In a batch (`pending`) a new
        person is created by `pending.send`, with every later change of the batch in it."""
        first = keys[0][0]

        def slot(name: str) -> IdentityKey:
            return IdentityKey(f"claim:{first.field}", f"{name}:{first.value}")

        found = await self._mapped_person(keys)
        if found is not None:
            return found, False
        slots = Slots(lambda n: self._ids.lookup_identity(TARGET, [slot(n)]),
                      lambda n, v: self._ids.bind_identity(TARGET, slot(n), v))
        claim = await self._claims.claim("person", idempotency_key, slots,
                                         lambda: self._mapped_person(keys))
        if not isinstance(claim, Claim):
            return claim, False
        unanswered = f"person:{first.field}:{first.value}"
        self._unanswered.check(unanswered, "person")
        person = await self._search_person(keys)
        if person is None and claim.recover_since is not None:
            person = await self._api.recent(
                "/persons", claim.recover_since, [w for _, w in keys if w != "emails"],
                lambda p: any(_holds(p, key=k, where=w) for k, w in keys))
        if person is None and pending is not None:
            async def commit(record: Record) -> str:
                made = (await self._unanswered.send(
                    unanswered, lambda: self._api.post("/persons", record)))["data"]
                return await self._bind_person(keys, str(made["id"]), claim, slots)

            return pending.create((k for k, _ in keys), create_body(), commit), True
        created = person is None
        if person is None:
            body = create_body()
            person = (await self._unanswered.send(
                unanswered, lambda: self._api.post("/persons", body)))["data"]
        record_id = str(person["id"])
        winner = await self._bind_person(keys, record_id, claim, slots)
        if winner != record_id:  # only after a stale claim was taken over: use the first one
            return await self._api.record("/persons", winner) or person, False
        return person, created

    async def _bind_person(self, keys: list[Key], record_id: str, claim: Claim, slots: Slots
                           ) -> str:
        """Map the person's keys to `record_id` and finish the claim; the id that won."""
        winner = await self._ids.bind_identity(TARGET, keys[0][0], record_id)
        for key, _ in keys[1:]:
            await self._ids.bind_identity(TARGET, key, winner)  # a key bound elsewhere stays
        await claim.finish(slots)
        return winner

    async def _mapped_person(self, keys: list[Key]) -> Record | None:
        record_id = await self._ids.lookup_identity(TARGET, [k for k, _ in keys])
        if record_id is None:
            return None
        person = await self._api.record("/persons", record_id)
        if person is None:  # deleted or merged away in Pipedrive: forget the mapping
            for key, _ in keys:  # where another worker has not mapped the key anew meanwhile
                await self._ids.unbind_identity(TARGET, key, record_id)
        return person

    async def _search_person(self, keys: list[Key]) -> Record | None:
        for key, where in keys:
            fields = "email" if where == "emails" else "custom_fields"
            found = await self._api.find("/persons", key.value, fields,
                                         functools.partial(_holds, key=key, where=where))
            if found is not None:
                return found
        return None

    # -- deals -----------------------------------------------------------------------------------

    async def _deal(self, account: Account, action: CreateDeal, idempotency_key: str,
                    pending: PendingPeople | None = None) -> Outcome:
        if account.deal_key is None:
            raise PermanentCRMError(f"{TARGET}: no deal key field (targets.pipedrive.deal_key_"
                                    "field in fields.yaml)")
        deal_key, key_field = action.key, account.deal_key.key
        if pending is not None and (waiting := pending.deals.get(deal_key)) is not None:
            return pending.said(waiting, lambda i: Outcome(i, f"deal {i} already exists for "
                                                              "this key"))
        existing, slot = await self._mapped_deal(deal_key)
        if existing is not None:
            return Outcome(existing, f"deal {existing} already exists for this key")
        body = self._deal_body(account, action)
        # The person first (its id goes into the deal); this action's outcome is the deal's.
        contact = await self._contact(account, UpsertContact(action.rule, action.identity),
                                      idempotency_key, pending, settle=False)
        person_id = contact.record_id
        assert person_id is not None
        if not placeholder(person_id):
            body["person_id"] = int(person_id)
        deal_id, created = await self._find_or_create_deal(
            deal_key, key_field, slot, body, person_id, idempotency_key, pending)
        if placeholder(deal_id):  # made at the batch's end, after its new person
            return _said(pending, deal_id, lambda made: Outcome(
                made, f"created deal {made} for person {body.get('person_id', person_id)}",
                created=True))
        what = "created deal" if created else "found existing deal"
        # A person the batch has still to make settles this outcome at its end, or fails it.
        return _said(pending, person_id, lambda person: Outcome(
            deal_id, f"{what} {deal_id} for person {person}", created=created))

    async def _find_or_create_deal(self, deal_key: str, key_field: str, slot: str, body: Record,
                                   person_id: str, idempotency_key: str,
                                   pending: PendingPeople | None) -> tuple[str, bool]:
        """The deal's id and whether it is new: found, created, or, for a person the batch
        has still to make, a placeholder that `pending.send` creates after the person."""
        async with self._locks.hold(f"deal:{deal_key}"):
            slots = Slots(lambda n: self._ids.lookup_deal(TARGET, f"claim:{n}:{slot}"),
                          lambda n, v: self._ids.bind_deal(TARGET, f"claim:{n}:{slot}", v))
            claim = await self._claims.claim("deal", idempotency_key, slots,
                                             lambda: self._ids.lookup_deal(TARGET, slot))
            if not isinstance(claim, Claim):
                return claim, False  # another execution made it meanwhile
            self._unanswered.check(f"deal:{deal_key}", "deal")

            def holds(deal: Record) -> bool:
                return (deal.get("custom_fields") or {}).get(key_field) == deal_key

            deal = await self._api.find("/deals", deal_key, "custom_fields", holds)
            if deal is None and claim.recover_since is not None:
                deal = await self._api.recent("/deals", claim.recover_since, [key_field], holds)
            if deal is None and pending is not None and placeholder(person_id):
                async def commit(record: Record) -> str:  # once its new person is made
                    made = (await self._unanswered.send(
                        f"deal:{deal_key}", lambda: self._api.post("/deals", record)))["data"]
                    return await self._bind_deal(slot, str(made["id"]), claim, slots)

                return pending.deal(deal_key, person_id, body, commit), True
            created = deal is None
            if deal is None:
                deal = (await self._unanswered.send(
                    f"deal:{deal_key}", lambda: self._api.post("/deals", body)))["data"]
            return await self._bind_deal(slot, str(deal["id"]), claim, slots), created

    async def _bind_deal(self, slot: str, record_id: str, claim: Claim, slots: Slots) -> str:
        winner = await self._ids.bind_deal(TARGET, slot, record_id)
        await claim.finish(slots)
        return winner

    async def _mapped_deal(self, deal_key: str) -> tuple[str | None, str]:
        """The live deal the identity map holds for `deal_key`, and the map key to bind a new
        one under. A deal deleted in Pipedrive is gone; since a mapping is never rewritten, the
        deal that replaces deal N is mapped under `replaced:N:<deal key>`."""
        slot = deal_key
        while (deal_id := await self._ids.lookup_deal(TARGET, slot)) is not None:
            if await self._api.record("/deals", deal_id) is not None:
                return deal_id, slot
            slot = f"replaced:{deal_id}:{deal_key}"
        return None, slot

    def _deal_body(self, account: Account, action: CreateDeal) -> Record:
        assert account.deal_key is not None
        custom: dict[str, JSON] = {account.deal_key.key: action.key}
        for name, value in action.set.items():
            spec = self._field_map.fields.get(name)
            if value is None or value == "" or spec is None or spec.in_crm(TARGET) is None:
                continue
            if name not in account.deal:
                raise PermanentCRMError(f"{TARGET}: {name!r} is not a deal field")
            custom[account.deal[name].key] = to_wire(
                account.deal[name], name, self._field_map.coerce(DIALECT, name, value))
        body: Record = {"title": action.title or action.key, "custom_fields": custom}
        if account.pipeline_id is not None:
            body["pipeline_id"] = account.pipeline_id
        if action.stage:
            if action.stage not in account.deal_stages:
                raise PermanentCRMError(f"{TARGET}: deal stage {action.stage!r} has no "
                                        "Pipedrive stage in fields.yaml")
            body["stage_id"] = account.deal_stages[action.stage]
        if action.amount is not None:
            body["value"] = action.amount
        return body


def by_person(identities: Sequence[tuple[IdentityKey, ...]]) -> list[int]:
    """The items' indices grouped by person: items that share an identity key (directly or
    through others) keep their order, and each group comes where its first item was."""
    parent: dict[IdentityKey, IdentityKey] = {}

    def root(key: IdentityKey) -> IdentityKey:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for keys in identities:
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
    groups: dict[object, list[int]] = {}
    for index, keys in enumerate(identities):
        groups.setdefault(root(keys[0]) if keys else index, []).append(index)
    return [index for group in groups.values() for index in group]


def _unused_after(last: dict[IdentityKey, int], turn: int, keys: frozenset[IdentityKey]
                  ) -> bool:
    """No item the batch takes after its `turn` (its place in `by_person` order) has any of
    `keys` (`last`: each key's last turn)."""
    return all(last.get(key, -1) <= turn for key in keys)


def _said(pending: PendingPeople | None, record_id: str,
          make: Callable[[str], Outcome]) -> Outcome:
    """`make(record_id)`; in a batch, settled again with the real id once it is known."""
    return make(record_id) if pending is None else pending.said(record_id, make)


def _holds(person: Record, *, key: IdentityKey, where: str) -> bool:
    if where == "emails":
        wanted = key.value.strip().casefold()
        return any(str(e.get("value", "")).casefold() == wanted
                   for e in person.get("emails") or [])
    return (person.get("custom_fields") or {}).get(where) == key.value


def _emails(person: Record, email: str | None, *, replace: bool) -> list[Record] | None:
    """The new email list with `email` primary; None when nothing changes."""
    existing = person.get("emails") or []
    if not email or any(str(e.get("value", "")).casefold() == email.casefold()
                        for e in existing):
        return None
    if existing and not replace:
        return None  # set_once: the person already has an email
    kept = [{"value": e["value"], "primary": False,
             **({"label": e["label"]} if isinstance(e.get("label"), str) else {})}
            for e in existing]
    return [{"value": email, "primary": True}, *kept]
