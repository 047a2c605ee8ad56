"""Salesforce deals in batches: Opportunities read by one SOQL query per 200 deal keys (fewer when
long keys would take the query URL past QUERY_BYTES) and made by one sObject Collections upsert
per 200, on the deal-key External ID.

An Opportunity that exists is never rewritten (its stage and close date are the sales team's
now): existing keys are read first and only the missing ones are upserted, so a retried create
finds the Opportunity its lost answer made instead of making a second one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date
from typing import Any

from engine.actions import JSON, CreateDeal
from engine.config.fieldmap import FieldMap
from engine.errors import CRMError, PermanentCRMError, RetryableCRMError
from engine.targets.base import IdentityStore, Outcome
from engine.targets.salesforce import soql
from engine.targets.salesforce.records import LeadMap, opportunity_body
from engine.targets.salesforce.rest import (
    BATCH,
    CRM,
    IN_VALUES,
    QUERY_BYTES,
    TRANSIENT_CODES,
    SalesforceAPI,
    describe_errors,
    error_entries,
)
from engine.targets.together import at_once

Result = Outcome | Exception


class Opportunities:
    """`run` applies a batch's create_deal actions, one result per item."""

    def __init__(self, api: SalesforceAPI, identities: IdentityStore, field_map: FieldMap,
                 leads: LeadMap, key_field: str, today: Callable[[], date]) -> None:
        self.api, self.identities, self.field_map = api, identities, field_map
        self.leads, self.key_field, self.today = leads, key_field, today

    async def run(self, deals: Sequence[tuple[int, CreateDeal]]) -> dict[int, Result]:
        results: dict[int, Result] = {}
        first: dict[str, int] = {}  # deal key -> the item that makes it
        same: list[tuple[int, int]] = []
        for index, action in deals:
            if action.key in first:
                same.append((index, first[action.key]))
                continue
            first[action.key] = index
        known = await at_once(self.identities.lookup_deal(CRM, key) for key in first)
        for index, record_id in zip(first.values(), known, strict=True):
            if record_id:
                results[index] = Outcome(record_id, "opportunity exists")
        missing = [(i, a) for i, a in deals if i not in results and first[a.key] == i]
        new: list[tuple[int, CreateDeal, dict[str, JSON]]] = []
        frame = soql.select_where(["Id", self.key_field], "Opportunity", self.key_field, ["", ""])
        for chunk in soql.parts(missing, lambda item: [item[1].key], frame, most=IN_VALUES,
                                budget=QUERY_BYTES):
            try:
                new += await self._read(chunk, results)
            except CRMError as error:
                for index, _ in chunk:
                    results.setdefault(index, error)
        for start in range(0, len(new), BATCH):
            part = new[start:start + BATCH]
            try:
                await self._write(part, results)
            except CRMError as error:
                for index, _, _ in part:
                    results.setdefault(index, error)
        for index, source in same:
            results[index] = results[source]
        return results

    async def _read(self, chunk: Sequence[tuple[int, CreateDeal]], results: dict[int, Result]
                    ) -> list[tuple[int, CreateDeal, dict[str, JSON]]]:
        """Answer the chunk's deals whose Opportunity exists; returns the records to make."""
        field = self.key_field
        found: dict[str, list[dict[str, Any]]] = {}
        query = soql.select_where(["Id", field], "Opportunity", field, [a.key for _, a in chunk])
        for row in await self.api.query(query):
            found.setdefault(str(row.get(field)), []).append(row)  # IN ignores case: exact
        new: list[tuple[int, CreateDeal, dict[str, JSON]]] = []
        existing: list[tuple[int, CreateDeal, str]] = []
        for index, action in chunk:
            rows = found.get(action.key, [])
            if len(rows) > 1:
                results[index] = PermanentCRMError(
                    f"{CRM}: {len(rows)} Opportunity records hold the same {field}; merge them "
                    f"in Salesforce (and make {field} Unique), then replay")
            elif rows:
                existing.append((index, action, str(rows[0]["Id"])))
            else:
                try:
                    body = opportunity_body(self.field_map, action, self.today(), self.leads)
                except PermanentCRMError as error:
                    results[index] = error
                    continue
                new.append((index, action, {"attributes": {"type": "Opportunity"},
                                            **{k: v for k, v in body.items() if k != field},
                                            field: action.key}))
        bound = await self.identities.bind_deals(CRM, [(action.key, record_id)
                                                       for _, action, record_id in existing]) \
            if existing else []
        for (index, _, _), record_id in zip(existing, bound, strict=True):
            results[index] = Outcome(record_id, "opportunity exists")
        return new

    async def _write(self, part: Sequence[tuple[int, CreateDeal, dict[str, JSON]]],
                     results: dict[int, Result]) -> None:
        """One Collections upsert of up to 200 new Opportunities (read missing just before)."""
        answer = await self.api.json(
            "PATCH", f"/composite/sobjects/Opportunity/{soql.name(self.key_field)}",
            json={"allOrNone": False, "records": [record for _, _, record in part]})
        if not isinstance(answer, list) or len(answer) != len(part):
            raise PermanentCRMError(f"{CRM}: unexpected collections answer: {answer!r:.200}")
        made = [(index, action, result) for (index, action, _), result
                in zip(part, answer, strict=True) if _made(result)]
        bound = await self.identities.bind_deals(CRM, [(action.key, str(result["id"]))
                                                       for _, action, result in made])
        for (index, _, result), record_id in zip(made, bound, strict=True):
            created = bool(result.get("created"))
            results[index] = Outcome(record_id, "opportunity created" if created
                                     else "opportunity exists", created)
        for (index, action, _), result in zip(part, answer, strict=True):
            if not _made(result):
                results[index] = self._refused(action, result)

    def _refused(self, action: CreateDeal, result: Any) -> Result:
        """The error for an Opportunity the Collections upsert did not make."""
        errors = error_entries(result.get("errors") if isinstance(result, dict) else None)
        message = f"{CRM}: Opportunity {self.key_field}={action.key}: {describe_errors(errors)}"
        if {str(e.get("statusCode")) for e in errors} & TRANSIENT_CODES:
            return RetryableCRMError(message)
        return PermanentCRMError(message)


def _made(result: Any) -> bool:
    """Whether a Collections upsert result says the record was made (or found) with an id."""
    return isinstance(result, dict) and bool(result.get("success")) and bool(result.get("id"))
