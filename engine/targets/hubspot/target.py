"""The HubSpot target (CRM v3, private-app bearer token), batching what the API lets it batch.

    target = HubSpotTarget(client, token, field_map, storage.identities,
                           storage.rate_limits)
    outcome = await target.execute(action, CallContext(idempotency_key))
    outcomes = await target.execute_many([(action, context), ...])   # a queue drains in batches

Contacts are upserted by the first identity key HubSpot keeps unique (`deep_link_token` or
another hasUniqueValue property) through batch upsert with `idProperty`; a contact known only by
`email` is batch-read by email, then updated by id or created (HubSpot refuses partial upserts
by email). `set_once` and the forward-only lifecycle stage read the contact first (batch read).
Deals carry linkcrm's key in a unique deal property so a retried create finds the deal instead
of making a second one. Every request is paced below HubSpot's rolling ten-second limit, shared
by all workers through the `RateLimitStore`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence

import httpx

from engine.actions import Action, CreateDeal, SetStage, UpsertContact
from engine.config.fieldmap import FieldMap
from engine.errors import PermanentCRMError, RetryableCRMError
from engine.targets.base import CallContext, IdentityStore, Outcome, RateLimitStore
from engine.targets.hubspot.api import (
    CRM,
    DEFAULT_BASE_URL,
    SEARCH_PER_SECOND,
    HubSpotAPI,
    Sleep,
)
from engine.targets.hubspot.contacts import ContactWriter
from engine.targets.hubspot.deals import DealJob, DealWriter
from engine.targets.hubspot.plan import ContactGroup, DealSpec, Locator, Translator, group_contacts
from engine.targets.pacing import window_pacer

__all__ = ["DEFAULT_BASE_URL", "HubSpotTarget", "unique_properties"]


def unique_properties(field_map: FieldMap) -> frozenset[str]:
    """Contact properties HubSpot keeps unique: `email`, the deep-link token's property
    (provisioned with hasUniqueValue) and any listed in `targets.hubspot.unique_properties`."""
    names = {"email"}
    token = field_map.fields.get("deep_link_token")
    crm_field = token.in_crm(CRM) if token else None
    if crm_field:
        names.add(crm_field.name)
    extra = field_map.targets.get(CRM, {}).get("unique_properties", [])
    names.update(str(name) for name in extra if isinstance(extra, list))
    return frozenset(names)


class HubSpotTarget:
    """A `Target` for one HubSpot account. The client is the caller's (set its timeout);
    `requests_per_window` is the account's limit per `window_seconds` (100 on Free/Starter,
    190 on Professional/Enterprise): the answers' rate-limit headers correct it if wrong."""

    name = "hubspot"

    def __init__(self, client: httpx.AsyncClient, token: str, field_map: FieldMap,
                 identities: IdentityStore, rate_limits: RateLimitStore, *,
                 base_url: str = DEFAULT_BASE_URL, requests_per_window: int = 100,
                 window_seconds: float = 10.0, search_per_second: float = SEARCH_PER_SECOND,
                 unique: Iterable[str] | None = None, sleep: Sleep = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # Buckets are per private app (its limit is), named by a digest, never the token.
        bucket = "hubspot:" + hashlib.sha256(token.encode()).hexdigest()[:12]
        self.pacer = window_pacer(rate_limits, bucket, requests_per_window, window_seconds,
                                  sleep, clock)
        self.search_pacer = window_pacer(rate_limits, bucket + ":search", search_per_second,
                                         1.0, sleep, clock)
        self.api = HubSpotAPI(client, token, base_url=base_url, pacer=self.pacer,
                              search_pacer=self.search_pacer, window_seconds=window_seconds,
                              sleep=sleep)
        self.api.limit = requests_per_window
        self.identities = identities
        self.translator = Translator(field_map, unique or unique_properties(field_map))
        self.contacts = ContactWriter(self.api, identities, self.translator.unique)
        self.deals = DealWriter(self.api, identities, self.translator.deal_key_property)

    async def execute(self, action: Action, context: CallContext) -> Outcome:
        """Apply one action; idempotent (unique properties and the deal key make a retry find
        what a lost response made). Raises RetryableCRMError or PermanentCRMError."""
        result = (await self.execute_many([(action, context)]))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def execute_many(self, items: Sequence[tuple[Action, CallContext]]
                           ) -> list[Outcome | Exception]:
        """Apply actions in order, batched: contact actions merge per contact into batch reads
        and upserts of up to 100, deals into batch reads and creates. Each item gets its own
        Outcome or its own error (RetryableCRMError/PermanentCRMError), never another's."""
        results: dict[int, Outcome | Exception] = {}
        contact_items: list[tuple[int, Action]] = []
        deal_items: list[tuple[int, CreateDeal]] = []
        for index, (action, _context) in enumerate(items):
            if isinstance(action, CreateDeal):
                deal_items.append((index, action))
            elif isinstance(action, UpsertContact | SetStage):
                contact_items.append((index, action))
            else:
                results[index] = PermanentCRMError(f"{CRM}: {action.kind} is not supported")
        groups, failed = group_contacts(self.translator, contact_items)
        results.update(failed)
        done, ids, _ = await self.contacts.run(groups)
        results.update(done)
        if deal_items:
            results.update(await self._deals(deal_items, ids))
        missing = RetryableCRMError(f"{CRM}: no outcome for this action")
        return [results.get(index, missing) for index in range(len(items))]

    async def _deals(self, items: list[tuple[int, CreateDeal]],
                     ids: dict[Locator, str]) -> dict[int, Outcome | Exception]:
        results: dict[int, Outcome | Exception] = {}
        first: dict[str, int] = {}  # deal key -> the item that creates it
        same: list[tuple[int, int]] = []
        pending: list[tuple[DealSpec, Locator, ContactGroup]] = []
        for index, action in items:
            try:
                spec = self.translator.deal(index, action)
                locator, primary = self.translator.locator(action)
            except PermanentCRMError as error:
                results[index] = error
                continue
            if spec.key in first:
                same.append((index, first[spec.key]))
                continue
            first[spec.key] = index
            deal_id = await self.identities.lookup_deal(CRM, spec.key)
            if deal_id is not None:
                results[index] = Outcome(deal_id, "deal already exists for this key")
                continue
            group = ContactGroup(locator, self.translator.stage_property,
                                 self.translator.stage_values, primary=primary,
                                 keys=[key for key, _ in self.translator.identity(action)])
            pending.append((spec, locator, group))
        # The deal's contact: made or found above, in the identity map, or created as a stub.
        stubs: dict[Locator, ContactGroup] = {}
        for _spec, locator, group in pending:
            if locator not in ids:
                known = await self.identities.lookup_identity(CRM, group.keys)
                if known is not None:
                    ids[locator] = known
                else:
                    stubs.setdefault(locator, group)
        failures: dict[Locator, Exception] = {}
        if stubs:
            _, made, failures = await self.contacts.run(list(stubs.values()))
            ids.update(made)
        jobs = []
        for spec, locator, group in pending:
            if locator in ids:
                jobs.append(DealJob(spec, ids[locator], tuple(group.keys)))
            else:
                results[spec.index] = failures.get(locator) or RetryableCRMError(
                    f"{CRM}: the deal's contact could not be found or created")
        results.update(await self.deals.run(jobs))
        for index, source in same:
            results[index] = results.get(source) or RetryableCRMError(
                f"{CRM}: no outcome for this deal")
        return results

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the caller."""
