"""Deals in HubSpot: one deal per linkcrm key, ever, associated with the contact.

HubSpot cannot make a deal create idempotent by itself, so linkcrm's key goes into a unique deal
property (`targets.hubspot.deal_key_property`). Before creating, the deal is looked up in the
identity map and then in HubSpot by that property; a create whose response was lost is found by
the retry, and a racing second create is refused because the unique value is taken (409, or
400 VALIDATION_ERROR "already has that value": HubSpot answers either) and finds the first.
A deal is bound in the identity map only once it is associated with its contact.

The key is event data, so it never travels in a URL path (where `.` or `..` would reach
another resource, and `/` or `?` would change the path): deals are looked up by key through
`batch/read` with `idProperty`, which carries it in the body.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.actions import IdentityKey
from engine.errors import CRMError, RetryableCRMError
from engine.targets.base import IdentityStore, Outcome
from engine.targets.hubspot.api import (
    CRM,
    HubSpotAPI,
    HubSpotObject,
    as_list,
    as_object,
    parse_object,
    record_path,
)
from engine.targets.hubspot.plan import DEAL_TO_CONTACT, DealSpec

BATCH = 100
DEALS = "/crm/v3/objects/deals"

Results = dict[int, Outcome | Exception]


@dataclass(frozen=True)
class DealJob:
    spec: DealSpec
    contact_id: str
    keys: tuple[IdentityKey, ...]  # the contact's identity, forgotten if the id is stale


def association(contact_id: str) -> list[dict[str, object]]:
    return [{"to": {"id": contact_id}, "types": [
        {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": DEAL_TO_CONTACT}]}]


class DealWriter:
    def __init__(self, api: HubSpotAPI, identities: IdentityStore, key_property: str) -> None:
        self.api = api
        self.identities = identities
        self.key_property = key_property

    async def run(self, jobs: Sequence[DealJob]) -> Results:
        """Create each job's deal unless its key already has one. One deal goes the
        single-request way; several are read and created in batches of 100."""
        results: Results = {}
        if len(jobs) == 1:
            try:
                results[jobs[0].spec.index] = await self.create_one(jobs[0])
            except CRMError as error:
                results[jobs[0].spec.index] = error
            return results
        for start in range(0, len(jobs), BATCH):
            chunk = list(jobs[start:start + BATCH])
            try:
                await self._batch(chunk, results)
            except CRMError as error:
                for job in chunk:
                    results.setdefault(job.spec.index, error)
        return results

    async def create_one(self, job: DealJob) -> Outcome:
        spec = job.spec
        existing = await self.find(spec.key)
        if existing is not None:
            return await self._adopt(job, existing.id)
        created = await self.api.create(DEALS, {"properties": spec.properties,
                                                "associations": association(job.contact_id)})
        if created.taken:
            # The key is taken (409, or 400 "already has that value"): a lost response's
            # create, or a racing worker's. Find it by the key, and adopt it.
            deal_id = created.holder
            if deal_id is None:
                found = await self.find(spec.key)
                if found is None and created.status == 409:
                    raise RetryableCRMError(f"{CRM}: deal key conflict but no deal found yet")
                if found is None:
                    # Another unique deal property holds a taken value: not ours to adopt.
                    raise created.refused(DEALS)
                deal_id = found.id
            return await self._adopt(job, deal_id)
        if created.record is None:
            raise RetryableCRMError(f"{CRM}: POST {DEALS} answered {created.status} without "
                                    "an id")
        deal_id = await self.identities.bind_deal(CRM, spec.key, created.record.id)
        return Outcome(deal_id, "deal created and associated with the contact", True)

    async def find(self, key: str) -> HubSpotObject | None:
        """The deal holding `key`, or None. Read through `batch/read`, never a URL path."""
        return (await self.read([key])).get(key)

    async def read(self, keys: Sequence[str]) -> dict[str, HubSpotObject]:
        """The deals holding `keys` (up to 100), by key; a missing one is absent (207)."""
        response = await self.api.call("POST", DEALS + "/batch/read", expect=(200, 207), json={
            "inputs": [{"id": key} for key in keys], "idProperty": self.key_property,
            "properties": [self.key_property], "propertiesWithHistory": []})
        return self._by_key(response.json())

    async def associate(self, job: DealJob, deal_id: str) -> None:
        """Idempotent: associating twice leaves one association."""
        path = record_path("/crm/v4/objects/deals", deal_id) + \
            record_path("/associations/default/contacts", job.contact_id)
        response = await self.api.call("PUT", path, expect=(200, 201, 404))
        if response.status_code == 404:
            # The contact was deleted or merged away in HubSpot: forget the stale id so the
            # retry finds (or makes) the contact again.
            for key in job.keys:
                await self.identities.unbind_identity(CRM, key)
            raise RetryableCRMError(f"{CRM}: PUT {path} -> 404: contact or deal not found")

    async def _adopt(self, job: DealJob, deal_id: str) -> Outcome:
        # Made by an attempt whose answer was lost (or by a racing worker): make sure it is
        # associated before the map says it is done.
        await self.associate(job, deal_id)
        deal_id = await self.identities.bind_deal(CRM, job.spec.key, deal_id)
        return Outcome(deal_id, "deal already existed for this key; associated with the contact")

    async def _batch(self, chunk: list[DealJob], results: Results) -> None:
        found = await self.read([job.spec.key for job in chunk])
        missing: list[DealJob] = []
        for job in chunk:
            record = found.get(job.spec.key)
            if record is None:
                missing.append(job)
                continue
            try:
                results[job.spec.index] = await self._adopt(job, record.id)
            except CRMError as error:
                results[job.spec.index] = error
        if not missing:
            return
        inputs = [{"properties": job.spec.properties, "associations": association(job.contact_id)}
                  for job in missing]
        # A batch create answers 201 (older spec versions) or 200 (newer ones), 207 in part.
        response = await self.api.call("POST", DEALS + "/batch/create", json={"inputs": inputs},
                                       expect=(200, 201, 207, 400, 409))
        status = response.status_code
        created = self._by_key(response.json()) if status in (200, 201, 207) else {}
        for job in missing:
            spec = job.spec
            record = created.get(spec.key)
            try:
                if record is not None:
                    deal_id = await self.identities.bind_deal(CRM, spec.key, record.id)
                    results[spec.index] = Outcome(
                        deal_id, "deal created and associated with the contact", True)
                else:
                    # The batch was refused (a key taken meanwhile, a bad value): each alone,
                    # so a conflict finds its deal and only a bad one fails.
                    results[spec.index] = await self.create_one(job)
            except CRMError as error:
                results[spec.index] = error

    def _by_key(self, body: object) -> dict[str, HubSpotObject]:
        found: dict[str, HubSpotObject] = {}
        for raw in as_list(as_object(body).get("results")):
            record = parse_object(raw)
            key = record.properties.get(self.key_property) if record else None
            if record is not None and key is not None:
                found[key] = record
        return found
