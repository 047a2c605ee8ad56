"""The Salesforce target: Leads upserted by External ID, deals as Opportunities by a deal key."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from engine.actions import JSON, Action, CreateDeal, IdentityKey, SetStage, UpsertContact
from engine.config.fieldmap import FieldMap
from engine.errors import CRMError, PermanentCRMError, RetryableCRMError
from engine.targets.base import CallContext, IdentityStore, Outcome, RateLimitStore
from engine.targets.http import body_of, path_segment, raise_for_status
from engine.targets.pacing import Pacer
from engine.targets.salesforce import soql
from engine.targets.salesforce.auth import (
    DEFAULT_API_VERSION,
    Credentials,
    SalesforceSettings,
    TokenSource,
)
from engine.targets.salesforce.deals import Opportunities
from engine.targets.salesforce.external import ExternalIds
from engine.targets.salesforce.lookup import LeadLookup
from engine.targets.salesforce.records import (
    ContactAction,
    LeadMap,
    duplicates,
    opportunity_body,
)
from engine.targets.salesforce.rest import (
    BATCH,
    CRM,
    TRANSIENT_CODES,
    SalesforceAPI,
    describe_errors,
    error_entries,
)
from engine.targets.together import at_once

RECORD_ID = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")
# Outcome | Exception, as HubSpot's execute_many answers (list is invariant: keep them equal).
Result = Outcome | Exception


def _utc_today() -> date:
    return datetime.now(UTC).date()


class SalesforceTarget:
    """Salesforce as a linkcrm target (see `engine.targets.base.Target`).

    Contacts are Leads. A Lead is read before it is written (set_once, forward-only Status and
    the LastName/Company/LeadSource defaults depend on what it holds) through the External ID
    (`GET /sobjects/Lead/<field>/<value>`), and written by upsert on that External ID, so a
    retried create finds the Lead instead of making a second one; a value that is not plain
    (`.`, `..`, `/`, `%`, non-ASCII) never goes into a URL path but into a SOQL query and an
    sObject Collections body (`engine.targets.salesforce.external`). Identity keys that are not the
    External ID (email) go through linkcrm's identity map, then a SOQL query whose values pass
    through `engine.targets.salesforce.soql`. Deals are Opportunities upserted by the deal-key
    External ID (`targets.salesforce.deal_key_field`) after a read, so an existing Opportunity
    is never rewritten; they carry the deep-link token, since an Opportunity cannot reference a
    Lead.

        target = SalesforceTarget(client, instance_url="https://acme.my.salesforce.com",
                                  credentials=ClientCredentials(client_id, secret),
                                  field_map=field_map, identities=store, rate_limits=store)
        outcome = await target.execute(action, CallContext(idempotency_key))
    """

    name = "salesforce"
    batch_records = BATCH  # Leads per batch: one Collections upsert

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        instance_url: str,
        credentials: Credentials,
        field_map: FieldMap,
        identities: IdentityStore,
        rate_limits: RateLimitStore,
        api_version: str = DEFAULT_API_VERSION,
        token_url: str = "",
        today: Callable[[], date] = _utc_today,
        requests_per_second: float = 25.0,
        usage_reserve: float = 0.1,
        usage_window: float = 86_400.0,
        limit_backoff: float = 300.0,
        external_id: str = "deep_link_token",
    ) -> None:
        instance_url = instance_url.rstrip("/")
        self.tokens = TokenSource(client, token_url or f"{instance_url}/services/oauth2/token",
                                  credentials)
        pacer = Pacer(rate_limits, f"salesforce:{urlsplit(instance_url).netloc}",
                      capacity=requests_per_second, window=1.0)
        self.api = SalesforceAPI(client, instance_url, api_version, self.tokens, pacer,
                                 usage_reserve=usage_reserve, usage_window=usage_window,
                                 limit_backoff=limit_backoff)
        self.field_map = field_map
        self.leads = LeadMap(field_map, external_id)
        self.external = ExternalIds(self.api)
        self.lookup = LeadLookup(self.api, self.leads)
        self.identities = identities
        self.today = today
        settings = field_map.targets.get(CRM, {})
        self.deal_key_field: str = settings.get("deal_key_field", "")
        self.opportunities = Opportunities(self.api, identities, field_map, self.leads,
                                           self.deal_key_field, lambda: self.today())

    @classmethod
    def from_settings(
        cls,
        client: httpx.AsyncClient,
        settings: SalesforceSettings,
        field_map: FieldMap,
        identities: IdentityStore,
        rate_limits: RateLimitStore,
        **options: Any,
    ) -> SalesforceTarget:
        return cls(client, instance_url=settings.instance_url, credentials=settings.credentials,
                   field_map=field_map, identities=identities, rate_limits=rate_limits,
                   api_version=settings.api_version,
                   token_url=settings.resolved_token_url(), **options)

    async def start(self) -> None:
        """Get a token, so wrong credentials stop `linkcrm serve` at start-up (the token
        endpoint raises CredentialsRefused) rather than dead-letter the first action."""
        await self.tokens.token()

    async def aclose(self) -> None:
        """Nothing to release: the client belongs to the caller."""

    async def execute(self, action: Action, context: CallContext) -> Outcome:
        # The idempotency key is not needed here: External IDs make every write idempotent.
        if isinstance(action, UpsertContact | SetStage):
            return await self._contact(action)
        if isinstance(action, CreateDeal):
            return await self._deal(action)
        raise PermanentCRMError(f"{CRM}: action {action.kind!r} is not supported")

    async def execute_many(self, items: Sequence[tuple[Action, CallContext]]) -> list[Result]:
        """Apply queued actions, one result per item in order (an Outcome or the CRMError that
        item would have raised). Contact actions keyed first by the External ID are read with
        one SOQL query per 200 Leads, which also finds the Leads holding their other keys
        (`engine.targets.salesforce.lookup`), and written with sObject Collections upserts of
        up to 200 Leads, several actions on one Lead folded into one write; deals the same way
        as Opportunities (`engine.targets.salesforce.deals`), after the Leads; the rest run
        one by one."""
        results: list[Result | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        singles: list[int] = []
        deals: list[int] = []
        for index, (action, _) in enumerate(items):
            first = action.identity[0] if action.identity else None
            if isinstance(action, UpsertContact | SetStage) and first is not None \
                    and first.field == self.leads.external_id and self.leads.external_field:
                groups.setdefault(first.value, []).append(index)
            elif isinstance(action, CreateDeal) and self.deal_key_field and action.key:
                deals.append(index)
            else:
                singles.append(index)
        tokens = list(groups)
        for start in range(0, len(tokens), BATCH):
            chunk = {token: groups[token] for token in tokens[start:start + BATCH]}
            try:
                singles += await self._upsert_batch(chunk, items, results)
            except PermanentCRMError:
                # One action's unknown field must not fail its neighbours: each item alone
                # finds its own answer (every write is idempotent, so repeats are harmless).
                singles += [i for indices in chunk.values() for i in indices
                            if results[i] is None]
            except CRMError as error:
                for index in (i for indices in chunk.values() for i in indices):
                    results[index] = results[index] or error
        blocked: dict[IdentityKey, RetryableCRMError] = {}
        for index, result in enumerate(results):
            if isinstance(result, RetryableCRMError):
                blocked.update(dict.fromkeys(items[index][0].identity, result))
        ready: list[tuple[int, CreateDeal]] = []
        for index in deals:
            deal = items[index][0]
            assert isinstance(deal, CreateDeal)
            earlier = next((blocked[k] for k in deal.identity if k in blocked), None)
            if earlier is not None:  # after an earlier action of its identity, as below
                results[index] = earlier
            else:
                ready.append((index, deal))
        for index, outcome in (await self.opportunities.run(ready)).items():
            results[index] = outcome
        for index in sorted(singles):
            action = items[index][0]
            # A later action on an identity whose earlier action must be retried waits too,
            # so a retry never applies one person's events out of order.
            earlier = next((blocked[k] for k in action.identity if k in blocked), None)
            try:
                if earlier is not None:
                    raise earlier
                results[index] = await self.execute(*items[index])
            except CRMError as error:
                results[index] = error
                if isinstance(error, RetryableCRMError):
                    blocked.update(dict.fromkeys(action.identity, error))
        done = [result for result in results if result is not None]
        assert len(done) == len(items), "every queued item gets exactly one result"
        return done

    # -- Leads -------------------------------------------------------------------------------

    async def _contact(self, action: ContactAction) -> Outcome:
        fields = self.leads.read_fields([action])
        record = None
        for key in action.identity:
            record = await self._find(key, fields)
            if record is not None:
                break
        body = self.leads.changes([action], record)
        return await self._write(action.identity, record, body)

    async def _find(self, key: IdentityKey, fields: list[str]) -> dict[str, Any] | None:
        name = self.leads.identity_field(key)
        if key.field == self.leads.external_id:
            return await self.external.get("Lead", name, key.value, fields)
        params = {"fields": ",".join(fields)}
        known = await self.identities.lookup_identity(CRM, [key])
        if known and RECORD_ID.fullmatch(known):
            response = await self.api.request("GET", f"/sobjects/Lead/{path_segment(known)}",
                                              params=params)
            if response.status_code == 200:
                return dict(body_of(response))
            if response.status_code != 404:
                raise_for_status(CRM, response, describe_errors(error_entries(body_of(response))))
        if known:  # deleted or merged away (or never a Salesforce id): find it again
            await self.identities.unbind_identity(CRM, key)
        records = await self.api.query(soql.select_where(fields, "Lead", name, [key.value],
                                                         limit=10))
        # SOQL `=` ignores case; emails do too, other keys must match exactly.
        wanted = key.value.casefold() if key.field == "email" else key.value
        matches = [r for r in records if (str(r.get(name, "")).casefold()
                                          if key.field == "email" else r.get(name)) == wanted]
        if len(matches) > 1:
            raise duplicates("Lead", name, [str(r.get("Id")) for r in matches])
        return matches[0] if matches else None

    async def _write(
        self, identity: Sequence[IdentityKey], record: dict[str, Any] | None,
        body: dict[str, JSON],
    ) -> Outcome:
        ext_name = self.leads.external_field
        ext_key = next((k for k in identity if k.field == self.leads.external_id), None)
        created = False
        if record is not None and not body:
            record_id, summary = str(record["Id"]), "lead unchanged"
        elif ext_key is not None and ext_name and (
                record is None or record.get(ext_name) == ext_key.value):
            payload = {k: v for k, v in body.items() if k != ext_name}
            record_id, created = await self.external.upsert("Lead", ext_name, ext_key.value,
                                                            payload, record)
            summary = "lead created" if created else "lead updated"
        elif record is not None:
            record_id, summary = str(record["Id"]), "lead updated"
            await self.api.json("PATCH", f"/sobjects/Lead/{path_segment(record_id)}", json=body)
        else:
            answer = await self.api.json("POST", "/sobjects/Lead/", json=body)
            if not isinstance(answer, dict) or not answer.get("id"):
                raise PermanentCRMError(f"{CRM}: Lead create answered without an id")
            record_id, created, summary = str(answer["id"]), True, "lead created"
        await self._bind_all([(list(identity), record_id)])
        return Outcome(record_id, summary, created)

    async def _bind_all(self, bindings: Sequence[tuple[list[IdentityKey], str]]) -> None:
        """Bind each key (that Leads hold) of each (identity, Lead id) in one write; then
        each key that names another Lead is rebound, in order: Salesforce is the authority
        (a stale mapping: a merged Lead), and a key two Leads hold (one email) ends up mapped
        to the later one, as when they were bound one by one."""
        pairs = [(key, record_id) for identity, record_id in bindings for key in identity
                 if self.leads.crm_name(key.field) is not None]
        if not pairs:
            return
        winners = await self.identities.bind_identities(CRM, pairs)
        for (key, record_id), winner in zip(pairs, winners, strict=True):
            if winner != record_id:
                await self.identities.rebind_identity(CRM, key, record_id)

    async def _upsert_batch(
        self, chunk: dict[str, list[int]], items: Sequence[tuple[Action, CallContext]],
        results: list[Result | None],
    ) -> list[int]:
        """Fill `results` for the chunk's items; returns the items left to the single path
        (a new token whose action names other keys an existing Lead may hold)."""
        actions: dict[str, list[ContactAction]] = {
            token: [item for item in (items[i][0] for i in indices)
                    if isinstance(item, UpsertContact | SetStage)]
            for token, indices in chunk.items()}
        ext = self.leads.external_field
        fields = self.leads.read_fields(a for group in actions.values() for a in group)
        # A token's other keys (an email): a Lead made before linkcrm knew the token may hold
        # one. The query that reads the tokens' Leads looks for those keys too (OR).
        others = {token: {k for a in actions[token] for k in a.identity
                          if k.field != self.leads.external_id} for token in chunk}
        found_leads = await self.lookup.find(list(chunk), others, fields)
        current = found_leads.by_token
        records: list[dict[str, JSON]] = []
        written: list[str] = []
        deferred: list[int] = []
        # A new token with such a key a Lead holds goes the single path, which finds that Lead.
        new = {token: others[token] for token in chunk if not current[token]}
        held = await self._held(set().union(*new.values()), found_leads.held)
        unchanged: list[tuple[list[IdentityKey], str]] = []
        for token, indices in chunk.items():
            found = current[token]
            try:
                if len(found) > 1:
                    raise duplicates("Lead", ext, [str(r.get("Id")) for r in found])
                if not found and new.get(token, set()) & held:
                    deferred += indices
                    continue
                record = found[0] if found else None
                body = self.leads.changes(actions[token], record)
            except PermanentCRMError as error:
                for index in indices:
                    results[index] = error
                continue
            if record is not None and not body:
                unchanged.append((self._identity(actions[token]), str(record["Id"])))
                for index in indices:
                    results[index] = Outcome(str(record["Id"]), "lead unchanged")
                continue
            records.append({"attributes": {"type": "Lead"}, ext: token,
                            **{k: v for k, v in body.items() if k != ext}})
            written.append(token)
        await self._bind_all(unchanged)
        if records:
            answer = await self.api.json("PATCH", f"/composite/sobjects/Lead/{ext}",
                                         json={"allOrNone": False, "records": records})
            if not isinstance(answer, list) or len(answer) != len(records):
                raise PermanentCRMError(f"{CRM}: unexpected collections answer: {answer!r:.200}")
            written_ids = [self._batch_result(token, result, actions[token], chunk[token],
                                              results)
                           for token, result in zip(written, answer, strict=True)]
            await self._bind_all([(self._identity(actions[token]), record_id)
                                  for token, record_id in zip(written, written_ids, strict=True)
                                  if record_id is not None])
        return deferred

    async def _held(self, keys: set[IdentityKey], found: set[IdentityKey]) -> set[IdentityKey]:
        """The keys a Lead holds: `found` by the batch's query, else mapped in the identity
        map (a key without a Lead field counts too: the single path says what is wrong)."""
        held = {key for key in keys if key in found or self.leads.crm_name(key.field) is None}
        asked = [key for key in keys if key not in held]
        mapped = await at_once(self.identities.lookup_identity(CRM, [key]) for key in asked)
        return held | {key for key, record_id in zip(asked, mapped, strict=True)
                       if record_id is not None}

    def _batch_result(
        self, token: str, result: Any, actions: list[ContactAction], indices: list[int],
        results: list[Result | None],
    ) -> str | None:
        """Fill `results` for one token's items from its Collections answer; returns the Lead's
        id to bind its keys to, or None when the write failed."""
        if isinstance(result, dict) and result.get("success"):
            record_id, created = str(result["id"]), bool(result.get("created"))
            for n, index in enumerate(indices):
                first = created and n == 0
                results[index] = Outcome(record_id, "lead created" if first else "lead updated",
                                         first)
            return record_id
        errors = error_entries(result.get("errors") if isinstance(result, dict) else None)
        codes = {str(e.get("statusCode")) for e in errors}
        message = f"{CRM}: Lead {self.leads.external_field}={token}: {describe_errors(errors)}"
        error: CRMError = RetryableCRMError(message) if codes & TRANSIENT_CODES \
            else PermanentCRMError(message)
        for index in indices:
            results[index] = error
        return None

    @staticmethod
    def _identity(actions: Iterable[Action]) -> list[IdentityKey]:
        return list(dict.fromkeys(key for action in actions for key in action.identity))

    # -- Opportunities -----------------------------------------------------------------------

    async def _deal(self, action: CreateDeal) -> Outcome:
        field = self.deal_key_field
        if not field:
            raise PermanentCRMError(f"{CRM}: the field map has no targets.salesforce."
                                    "deal_key_field (the Opportunity External ID for deal keys)")
        known = await self.identities.lookup_deal(CRM, action.key)
        if known:
            return Outcome(known, "opportunity exists")
        # Read first: an upsert on an existing Opportunity would rewrite its stage and date.
        found = await self.external.get("Opportunity", field, action.key, ["Id"])
        if found is not None:
            record_id = await self.identities.bind_deal(CRM, action.key, str(found["Id"]))
            return Outcome(record_id, "opportunity exists")
        body = opportunity_body(self.field_map, action, self.today(), self.leads)
        record_id, created = await self.external.upsert("Opportunity", field, action.key, body,
                                                        None)
        await self.identities.bind_deal(CRM, action.key, record_id)
        return Outcome(record_id, "opportunity created" if created else "opportunity exists",
                       created)
