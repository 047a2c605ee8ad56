"""Leads read in batches: one SOQL query per part of a batch finds the Leads holding its tokens
(the External ID) and the Leads holding its tokens' other identity keys (an email):
`WHERE Token__c IN (...) OR Email IN (...)`. A new token whose email a Lead already holds (a
Lead made before linkcrm knew the token) is then told apart without a second query.

A part holds at most IN_VALUES tokens and stays within QUERY_BYTES once percent-encoded
(`engine.targets.salesforce.rest`), so long values make smaller parts, not a refused query.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

from engine.actions import IdentityKey
from engine.targets.salesforce import soql
from engine.targets.salesforce.records import LeadMap
from engine.targets.salesforce.rest import IN_VALUES, QUERY_BYTES, SalesforceAPI


@dataclass
class Found:
    """The Leads holding each token (exactly: IN ignores case, the External ID does not) and
    the other keys some Lead holds (emails whatever their case, other fields exactly)."""

    by_token: dict[str, list[dict[str, Any]]]
    held: set[IdentityKey]


class LeadLookup:
    """`find` reads the Leads a batch's tokens and their other keys reach.

        found = await LeadLookup(api, leads).find(tokens, others, fields)
    """

    def __init__(self, api: SalesforceAPI, leads: LeadMap) -> None:
        self.api, self.leads = api, leads

    async def find(self, tokens: Sequence[str], others: Mapping[str, Set[IdentityKey]],
                   fields: Sequence[str]) -> Found:
        """`others[token]`: that token's other identity keys (a key whose field has no Lead
        field is not looked for)."""
        ext = self.leads.external_field
        names = {key.field: name for keys in others.values() for key in keys
                 if (name := self.leads.crm_name(key.field)) is not None}
        columns = list(dict.fromkeys([*fields, ext, *names.values()]))
        found = Found({token: [] for token in tokens}, set())
        for part in self._parts(tokens, others, columns, names):
            keys = [key for token in part for key in others.get(token, ()) if key.field in names]
            rows = await self.api.query(self._query(part, keys, columns, names))
            mine = set(part)  # a row found by its email may hold a token of another part
            for row in rows:
                if row.get(ext) in mine:
                    found.by_token[row[ext]].append(row)
            held = {(field, _fold(field, row.get(name))) for field, name in names.items()
                    for row in rows}
            found.held.update(key for key in keys if (key.field, _fold(key.field, key.value))
                              in held)
        return found

    def _query(self, tokens: Sequence[str], keys: Sequence[IdentityKey], columns: Sequence[str],
               names: Mapping[str, str]) -> str:
        matches: dict[str, dict[str, None]] = {self.leads.external_field: dict.fromkeys(tokens)}
        for key in keys:
            matches.setdefault(names[key.field], {})[key.value] = None
        return soql.select_where_any(columns, "Lead", {f: list(v) for f, v in matches.items()})

    def _parts(self, tokens: Sequence[str], others: Mapping[str, Set[IdentityKey]],
               columns: Sequence[str], names: Mapping[str, str]) -> Iterator[list[str]]:
        fields = [self.leads.external_field, *dict.fromkeys(names.values())]
        frame = soql.select_where_any(columns, "Lead", {name: ["", ""] for name in fields})
        return soql.parts(
            tokens, lambda token: [token, *(k.value for k in others.get(token, ())
                                            if k.field in names)],
            frame, most=IN_VALUES, budget=QUERY_BYTES)


def _fold(field: str, value: Any) -> Any:
    """A value as a Lead's field compares it: SOQL compares emails, like all strings, ignoring
    case, and an email is the same whatever its case; other keys must match exactly."""
    return value.casefold() if field == "email" and isinstance(value, str) else value
