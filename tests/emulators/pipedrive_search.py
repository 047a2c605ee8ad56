"""The Pipedrive emulator's search: an index that lags writes, exact and partial matching.

A mixin of `PipedriveEmulator`, which owns the state it declares. `exact_match` ignores case,
terms need 2 characters (1 with `exact_match`), only the searchable custom field types are
indexed, and a write reaches the index `search_lag` seconds later (what makes
search-then-create race). Deleted records drop out of the results unless `deleted_in_search`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from tests.emulators.pipedrive_setup import ApiError

SEARCHABLE = frozenset({"address", "varchar", "text", "varchar_auto", "double", "monetary",
                        "phone"})
PERSON_SEARCH_FIELDS = {"custom_fields", "email", "notes", "phone", "name"}
DEAL_SEARCH_FIELDS = {"custom_fields", "notes", "title"}


class SearchIndex:
    """`GET /persons/search` and `GET /deals/search` over a lagging index."""

    persons: dict[int, dict[str, Any]]
    deals: dict[int, dict[str, Any]]
    stages: list[dict[str, Any]]
    search_lag: float
    deleted_in_search: bool
    clock: Callable[[], float]
    _index: dict[tuple[str, int], dict[str, Any]]
    _pending: list[tuple[float, str, int, dict[str, Any]]]
    _custom_defs: Callable[[str], dict[str, dict[str, Any]]]
    _page: Callable[[Request, list[Any]], tuple[Any, Any]]
    _bool_param: Callable[[str | None, str], bool]

    def _touch(self, kind: str, record: dict[str, Any]) -> None:
        record["update_time"] = self.clock()
        defs = self._custom_defs(kind)
        custom = [str(v) for k, v in record["custom_fields"].items()
                  if v is not None and defs[k]["field_type"] in SEARCHABLE
                  and not isinstance(v, dict)]
        snapshot = {"custom_fields": custom, "notes": []}
        if kind == "person":
            snapshot |= {"name": [record["name"]], "email": [e["value"] for e in record["emails"]],
                         "phone": [p["value"] for p in record["phones"]]}
        else:
            snapshot |= {"title": [record["title"]]}
        self._pending.append((record["update_time"] + self.search_lag, kind, record["id"],
                              snapshot))

    def _find(self, request: Request, kind: str) -> tuple[Any, Any]:
        params = request.query_params
        exact = self._bool_param(params.get("exact_match"), "exact_match")
        term = params.get("term", "").strip()
        if len(term) < (1 if exact else 2):
            raise ApiError(400, "Search term must be at least 2 characters long "
                                "(1 with exact_match)")
        allowed = PERSON_SEARCH_FIELDS if kind == "person" else DEAL_SEARCH_FIELDS
        fields = params.get("fields", ",".join(sorted(allowed))).split(",")
        if not set(fields) <= allowed:
            raise ApiError(400, f"Parameter 'fields' must be among {', '.join(sorted(allowed))}")
        now = self.clock()
        for due in [p for p in self._pending if p[0] <= now]:
            self._pending.remove(due)
            _, entity, entity_id, snapshot = due
            if entity_id in (self.persons if entity == "person" else self.deals):
                self._index[(entity, entity_id)] = snapshot
        records = self.persons if kind == "person" else self.deals
        needle = term.casefold()
        items = []
        for (entity, entity_id), snapshot in sorted(self._index.items()):
            if entity != kind or (records[entity_id]["is_deleted"]
                                  and not self.deleted_in_search):
                continue
            matched = {f: [v for v in snapshot[f] if (v.casefold() == needle if exact
                                                      else needle in v.casefold())]
                       for f in fields}
            if any(matched.values()):
                items.append(self._hit(kind, entity_id, snapshot, matched.get("custom_fields", [])))
        page, additional = self._page(request, items)
        return {"items": page}, additional

    def _hit(self, kind: str, entity_id: int, snapshot: dict[str, Any], custom: list[str]
             ) -> dict[str, Any]:
        base = {"id": entity_id, "type": kind, "visible_to": 3, "owner": {"id": 1},
                "organization": None, "custom_fields": custom, "notes": []}
        if kind == "person":
            item = {**base, "name": snapshot["name"][0], "emails": snapshot["email"],
                    "phones": snapshot["phone"]}
        else:
            deal = self.deals[entity_id]
            stage = next(s for s in self.stages if s["id"] == deal["stage_id"])
            person = self.persons.get(deal["person_id"] or 0)
            item = {**base, "title": snapshot["title"][0], "value": deal["value"],
                    "currency": deal["currency"], "status": deal["status"], "is_archived": False,
                    "stage": {"id": stage["id"], "name": stage["name"]},
                    "person": {"id": person["id"], "name": person["name"]} if person else None}
        return {"result_score": 1.0, "item": item}
