"""Salesforce records by External ID: read and upserted by URL when the value is plain, by a
SOQL query and an sObject Collections upsert (the value in the query string and the body)
otherwise, so no value ever changes which resource a request reaches."""

from __future__ import annotations

import re
from typing import Any

from engine.actions import JSON
from engine.errors import PermanentCRMError, RetryableCRMError
from engine.targets.http import body_of, path_segment, raise_for_status
from engine.targets.salesforce import soql
from engine.targets.salesforce.records import duplicates, ids_of
from engine.targets.salesforce.rest import (
    CRM,
    TRANSIENT_CODES,
    SalesforceAPI,
    describe_errors,
    error_entries,
)

# External ID values that travel in a URL path as they are. Any other value (a dot segment,
# `/`, `%`, `?`, a dot that Salesforce may read as a format extension such as `.inc`,
# non-ASCII) goes in the query string or the body: its meaning never depends on how a server
# decodes and resolves paths.
PLAIN_VALUE = re.compile(r"[A-Za-z0-9_-]{1,255}")


def in_path(value: str) -> bool:
    """Whether `value` may travel as a URL path segment (see PLAIN_VALUE)."""
    return PLAIN_VALUE.fullmatch(value) is not None


class ExternalIds:
    """Read and upsert records of any sObject by one of its External ID fields.

        external = ExternalIds(api)
        record = await external.get("Lead", "Deep_Link_Token__c", "..", ["Id", "Status"])
        record_id, created = await external.upsert("Lead", "Deep_Link_Token__c", "..",
                                                   {"LastName": "Lee"}, record)
    """

    def __init__(self, api: SalesforceAPI) -> None:
        self.api = api

    async def get(
        self, sobject: str, field: str, value: str, fields: list[str]
    ) -> dict[str, Any] | None:
        """The record whose External ID `field` holds `value`: by its URL when the value is
        plain (see PLAIN_VALUE), else by a SOQL query; several records are a PermanentCRMError."""
        if not in_path(value):
            records = await self.api.query(soql.select_where([*fields, field], sobject, field,
                                                             [value], limit=10))
            # SOQL `=` ignores case; the External ID is marked case sensitive.
            matches = [r for r in records if r.get(field) == value]
            if len(matches) > 1:
                raise duplicates(sobject, field, [str(r.get("Id")) for r in matches])
            return matches[0] if matches else None
        response = await self.api.request(
            "GET", f"/sobjects/{sobject}/{field}/{path_segment(value)}",
            params={"fields": ",".join(fields)})
        if response.status_code == 200:
            return dict(body_of(response))
        if response.status_code == 404:
            return None
        if response.status_code == 300:
            raise duplicates(sobject, field, ids_of(body_of(response)))
        raise_for_status(CRM, response, describe_errors(error_entries(body_of(response))))
        raise AssertionError("unreachable")  # pragma: no cover

    async def upsert(
        self, sobject: str, field: str, value: str, payload: dict[str, JSON],
        record: dict[str, Any] | None,
    ) -> tuple[str, bool]:
        """PATCH by External ID; (record id, created). 204 is what API versions before 46.0
        answer to an update. A value that is not plain goes in the body instead."""
        if not in_path(value):
            return await self._upsert_in_body(sobject, field, value, payload)
        path = f"/sobjects/{sobject}/{field}/{path_segment(value)}"
        response = await self.api.request("PATCH", path, json=payload)
        status = response.status_code
        if status in (200, 201):
            answer = body_of(response)
            return str(answer["id"]), bool(answer.get("created", status == 201))
        if status == 204:
            found = record or await self.get(sobject, field, value, ["Id"])
            return (str(found["Id"]) if found else ""), False
        if status == 300:
            raise duplicates(sobject, field, ids_of(body_of(response)))
        message = describe_errors(error_entries(body_of(response)))
        if status == 404:
            raise PermanentCRMError(
                f"{CRM}: PATCH {path} -> 404: {message}: {field} is not an External ID field "
                f"on {sobject} (or does not exist); create it as `linkcrm provision salesforce` "
                "prints, or run `linkcrm doctor salesforce`")
        raise_for_status(CRM, response, message)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _upsert_in_body(
        self, sobject: str, field: str, value: str, payload: dict[str, JSON]
    ) -> tuple[str, bool]:
        """Upsert one record through sObject Collections (`PATCH /composite/sobjects/<object>/
        <field>`), the External ID value in the body rather than the URL; (id, created)."""
        record = {"attributes": {"type": sobject}, **payload, field: value}
        answer = await self.api.json(
            "PATCH", f"/composite/sobjects/{soql.name(sobject)}/{soql.name(field)}",
            json={"allOrNone": False, "records": [record]})
        result = answer[0] if isinstance(answer, list) and len(answer) == 1 else None
        if not isinstance(result, dict):
            raise PermanentCRMError(f"{CRM}: unexpected collections answer: {answer!r:.200}")
        if result.get("success") and result.get("id"):
            return str(result["id"]), bool(result.get("created"))
        errors = error_entries(result.get("errors"))
        codes = {str(e.get("statusCode")) for e in errors}
        message = f"{CRM}: {sobject} upsert by {field}: {describe_errors(errors)}"
        if codes & TRANSIENT_CODES:
            raise RetryableCRMError(message)
        if "DUPLICATE_EXTERNAL_ID" in codes:
            message += (f"; merge them in Salesforce (and make {field} Unique), then replay")
        raise PermanentCRMError(message)
