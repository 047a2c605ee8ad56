"""What to write on a Salesforce Lead or Opportunity, from the field map and current values."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, timedelta
from typing import Any

from engine.actions import JSON, Action, CreateDeal, IdentityKey, SetStage, UpsertContact
from engine.config.fieldmap import CoercionError, Dialect, FieldMap, iso_milliseconds
from engine.errors import PermanentCRMError

CRM = "salesforce"
DIALECT = Dialect(CRM, write_datetime=iso_milliseconds,  # DateTime: ISO 8601 to the ms
                  deal_names=(("title", "Name"), ("stage", "StageName"), ("amount", "Amount")),
                  deal_key_setting="deal_key_field", contact_defaults_setting="lead_defaults")
ContactAction = UpsertContact | SetStage


def is_empty(value: object) -> bool:
    return value is None or value == ""


class LeadMap:
    """The field map seen from a Lead: API names, defaults, Status ranks, and `changes()`.

    `external_id` is the canonical identity field whose Salesforce field is the Lead's
    External ID (upserts go through it).
    """

    def __init__(self, field_map: FieldMap, external_id: str = "deep_link_token") -> None:
        self.field_map = field_map
        self.external_id = external_id
        settings = field_map.targets.get(CRM, {})
        self.defaults: dict[str, JSON] = dict(settings.get("lead_defaults") or {})
        stage_field = field_map.contact_stage_field.get(CRM)
        self.status_field = stage_field.name if stage_field else "Status"
        spec = field_map.fields.get(external_id)
        crm_field = spec.in_crm(CRM) if spec else None
        self.external_field = crm_field.name if crm_field else ""
        self._names: dict[str, str | None] = {}  # crm_name's answers (asked ~15 times an event)

    def crm_name(self, canonical: str) -> str | None:
        """The Lead field for a canonical contact field; None when Salesforce has none."""
        try:
            return self._names[canonical]
        except KeyError:
            pass
        spec = self.field_map.fields.get(canonical)
        crm_field = spec.in_crm(CRM) if spec is not None and spec.object == "contact" else None
        name = self._names[canonical] = crm_field.name if crm_field else None
        return name

    def identity_field(self, key: IdentityKey) -> str:
        name = self.crm_name(key.field)
        if name is None:
            raise PermanentCRMError(f"{CRM}: identity field {key.field!r} has no Salesforce "
                                    "name in the field map; add one or list another key first")
        return name

    def coerce(self, canonical: str, value: JSON) -> JSON:
        try:
            return self.field_map.coerce(DIALECT, canonical, value)
        except CoercionError as error:
            raise PermanentCRMError(f"{CRM}: {error}") from None

    def read_fields(self, actions: Iterable[Action]) -> list[str]:
        """Every Lead field `changes()` compares against: touched fields, Status, defaults."""
        names = ["Id", self.status_field, *self.defaults]
        if self.external_field:
            names.append(self.external_field)
        for action in actions:
            canon = [key.field for key in action.identity]
            if isinstance(action, UpsertContact):
                canon += [*action.set, *action.set_once]
            names += [n for n in map(self.crm_name, canon) if n]
        return list(dict.fromkeys(names))

    def stage_rank(self, status: JSON) -> int:
        """Rank of the Lead's Status in the field map's forward order. Empty is -1; a status
        the map does not list (set by a person, e.g. "Working - Contacted") counts as the
        first stage, so linkcrm neither moves it back nor holds a later stage off."""
        if is_empty(status):
            return -1
        for rank, stage in enumerate(self.field_map.contact_stages):
            if stage.value(CRM) == status:
                return rank
        return 0

    def changes(
        self, actions: Sequence[ContactAction], current: Mapping[str, Any] | None
    ) -> dict[str, JSON]:
        """The fields to write so that `actions`, applied in order to a Lead holding `current`
        (None: no Lead yet), take effect. `set` overwrites, `set_once` fills only empty fields,
        Status only moves forward, identity values fill empty fields, and the Lead defaults
        (LastName, Company, LeadSource) fill only what is empty, so a real name is never
        replaced by "Deep Link". Values already in place are left out: an unchanged Lead gets
        an empty dict and no write."""
        state: dict[str, Any] = dict(current or {})
        body: dict[str, JSON] = {}

        def put(name: str, value: JSON) -> None:
            if state.get(name) != value:
                body[name] = value
                state[name] = value

        for action in actions:
            if isinstance(action, UpsertContact):
                for canonical, value in action.set.items():
                    name = self.crm_name(canonical)
                    if name and not is_empty(value):
                        put(name, self.coerce(canonical, value))
                for canonical, value in action.set_once.items():
                    name = self.crm_name(canonical)
                    if name and not is_empty(value) and is_empty(state.get(name)):
                        put(name, self.coerce(canonical, value))
            else:
                self._stage(action, state, put)
            for key in action.identity:
                name = self.crm_name(key.field)
                if name and is_empty(state.get(name)):
                    put(name, self.coerce(key.field, key.value))
        for name, value in self.defaults.items():
            if is_empty(state.get(name)):
                put(name, value)
        return body

    def _stage(self, action: SetStage, state: Mapping[str, Any],
               put: Callable[[str, JSON], None]) -> None:
        stage = self.field_map.contact_stage(action.stage)
        value = stage.value(CRM) if stage else ""
        if stage is None or not value:
            raise PermanentCRMError(f"{CRM}: stage {action.stage!r} has no Salesforce Lead "
                                    "Status in the field map (contact_stages)")
        if self.field_map.stage_rank(stage.name) > self.stage_rank(state.get(self.status_field)):
            put(self.status_field, value)


def opportunity_body(
    field_map: FieldMap, action: CreateDeal, today: date, leads: LeadMap
) -> dict[str, JSON]:
    """A new Opportunity: Name from the title, StageName from the deal stage map, CloseDate
    `targets.salesforce.close_date_days` after `today`, deal fields, and the deep-link token
    (an Opportunity cannot reference a Lead, so the token is what ties them together)."""
    settings = field_map.targets.get(CRM, {})
    stages = field_map.deal_stages
    stage = field_map.deal_stage(action.stage) if action.stage else \
        (stages[0] if stages else None)
    stage_name = stage.value(CRM) if stage else ""
    if not stage_name:
        raise PermanentCRMError(f"{CRM}: deal stage {action.stage!r} has no Salesforce "
                                "StageName in the field map (deal_stages)")
    close = today + timedelta(days=int(settings.get("close_date_days", 30)))
    body: dict[str, JSON] = {"Name": (action.title or action.key)[:120],
                             "StageName": stage_name, "CloseDate": close.isoformat()}
    if action.amount is not None:
        body["Amount"] = action.amount
    for canonical, value in action.set.items():
        spec = field_map.fields.get(canonical)
        crm_field = spec.in_crm(CRM) if spec and spec.object == "deal" else None
        if crm_field and not is_empty(value):
            body[crm_field.name] = leads.coerce(canonical, value)
    # The Opportunity's token field has the Lead's API name (provision asks for both).
    token = next((k.value for k in action.identity if k.field == leads.external_id), None)
    if token and leads.external_field:
        body[leads.external_field] = token
    return body


def ids_of(body: Any) -> list[str]:
    """Record ids from a 300 Multiple Choices body (a list of record URLs)."""
    items = body if isinstance(body, list) else []
    return [str(item).rstrip("/").rsplit("/", 1)[-1] for item in items]


def duplicates(sobject: str, field: str, ids: Sequence[str]) -> PermanentCRMError:
    """The error for several records holding one External ID value: a person must merge."""
    return PermanentCRMError(
        f"{CRM}: {len(ids)} {sobject} records hold the same {field} ({', '.join(ids)}); "
        f"merge them in Salesforce (and make {field} Unique), then replay")
