"""Pure HubSpot planning: actions grouped per contact, and the property writes each group needs.

No I/O here. A `Translator` turns canonical field names, values and stages into HubSpot's (via
the field map); a `ContactGroup` gathers every action aimed at one contact and, given what
HubSpot holds (or nothing, for a new contact), says which properties to write: `set` values that
differ, `set_once` values only into empty properties, and a lifecycle stage only when it moves
forward. Merging a batch's actions per contact this way is what lets one batch upsert carry
them all (HubSpot rejects a batch that names the same record twice).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time

from engine.actions import JSON, Action, CreateDeal, IdentityKey, SetStage, UpsertContact
from engine.config.fieldmap import CoercionError, Dialect, FieldMap, iso_milliseconds
from engine.errors import PermanentCRMError

CRM = "hubspot"


def _midnight_epoch_ms(day: date) -> JSON:
    """HubSpot date properties take midnight UTC as epoch milliseconds."""
    return str(int(datetime.combine(day, time(), UTC).timestamp()) * 1000)


# Property values travel as strings ({"properties": {name: "string"}}); date-times as ISO 8601.
DIALECT = Dialect(CRM, write_date=_midnight_epoch_ms, write_datetime=iso_milliseconds,
                  text=True, deal_names=(("title", "dealname"), ("stage", "dealstage"),
                                         ("amount", "amount")),
                  deal_key_setting="deal_key_property")
# HubSpot's own lifecycle order, used when the current stage is not one the field map names.
LIFECYCLE_ORDER = ("subscriber", "lead", "marketingqualifiedlead", "salesqualifiedlead",
                   "opportunity", "customer", "evangelist", "other")
DEAL_TO_CONTACT = 3  # HubSpot-defined association type id, deal -> contact

Current = Mapping[str, str | None]


@dataclass(frozen=True)
class Locator:
    """How HubSpot finds the contact: a property and its value. A `unique` one (email or a
    hasUniqueValue property) is an `idProperty` for batch read and upsert; any other is found
    through the identity map or search."""

    property: str
    value: str
    unique: bool = True


@dataclass
class ContactChange:
    """One action's share of a contact write, in HubSpot names and string values."""

    index: int
    action: Action
    set: dict[str, str] = field(default_factory=dict)
    set_once: dict[str, str] = field(default_factory=dict)
    stage: str | None = None


@dataclass
class Planned:
    """The properties to write for a group (empty: nothing to send) and one summary per
    change, in the group's order. Summaries name properties and stages, never values."""

    properties: dict[str, str]
    summaries: list[str]


@dataclass
class ContactGroup:
    locator: Locator
    stage_property: str
    stage_values: tuple[str, ...]
    changes: list[ContactChange] = field(default_factory=list)
    keys: list[IdentityKey] = field(default_factory=list)
    primary: IdentityKey | None = None  # the key the locator came from
    attach: dict[str, str] = field(default_factory=dict)  # other identity keys, set_once

    def needs_read(self) -> bool:
        """Whether a write depends on what HubSpot holds (set_once, stages, attached keys)."""
        covered = {name for change in self.changes for name in change.set}
        return any(change.set_once or change.stage for change in self.changes) or any(
            name not in covered for name in self.attach
        )

    def read_properties(self) -> list[str]:
        names = {self.locator.property, self.stage_property, *self.attach}
        for change in self.changes:
            names.update(change.set, change.set_once)
        return sorted(names)

    def plan(self, current: Current | None, *, known: bool) -> Planned:
        """Properties to write given `current` (None: no such contact). With `known` False
        nothing was read, so every `set` value is written and nothing else is decided."""
        state: dict[str, str | None] = dict(current or {})
        out: dict[str, str] = {}
        summaries: list[str] = []
        new = known and current is None
        for name, value in self.attach.items():
            if known and not state.get(name):
                out[name] = state[name] = value
        for position, change in enumerate(self.changes):
            touched: list[str] = []
            for name, value in change.set.items():
                if not known or not same_value(state.get(name), value):
                    out[name] = state[name] = value
                    touched.append(name)
            for name, value in change.set_once.items():
                if known and not state.get(name):
                    out[name] = state[name] = value
                    touched.append(name)
            if change.stage is not None:
                was = state.get(self.stage_property)
                if not known or is_forward(was, change.stage, self.stage_values):
                    out[self.stage_property] = state[self.stage_property] = change.stage
                    summaries.append(f"lifecycle stage {was or '(none)'} -> {change.stage}")
                else:
                    summaries.append(f"lifecycle stage stays {was} "
                                     f"(never moves back to {change.stage})")
            elif new and position == 0:
                summaries.append("contact created")
            elif touched:
                summaries.append("contact updated: " + ", ".join(sorted(touched)))
            else:
                summaries.append("contact already up to date")
        if current is None or not known:
            out.setdefault(self.locator.property, self.locator.value)
        return Planned(out, summaries)


def is_forward(current: str | None, new: str, field_map_order: tuple[str, ...]) -> bool:
    """Whether moving from `current` to `new` goes forward. The field map's order decides when
    it names both; otherwise HubSpot's default order; an unknown custom stage is written and
    HubSpot's own forward-only rule decides."""
    if not current:
        return True
    if current == new:
        return False
    for order in (field_map_order, LIFECYCLE_ORDER):
        if current in order and new in order:
            return order.index(new) > order.index(current)
    return True


def same_value(current: str | None, new: str) -> bool:
    """Equal as HubSpot stores them: dates come back as YYYY-MM-DD where we send epoch ms."""
    if current is None:
        return False
    if current == new:
        return True
    first, second = _instant(current), _instant(new)
    return first is not None and first == second


def _instant(text: str) -> datetime | None:
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, tz=UTC)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class DealSpec:
    index: int
    action: CreateDeal
    key: str
    properties: dict[str, str]


class Translator:
    """Canonical names, values and stages to HubSpot's, through the field map."""

    def __init__(self, field_map: FieldMap, unique_properties: Iterable[str]) -> None:
        self.field_map = field_map
        self.unique = frozenset(unique_properties)
        stage_field = field_map.contact_stage_field.get(CRM)
        self.stage_property = stage_field.name if stage_field else "lifecyclestage"
        self.stage_values = tuple(s.value(CRM) for s in field_map.contact_stages if s.value(CRM))
        settings = field_map.targets.get(CRM, {})
        self.deal_key_property = str(settings.get("deal_key_property", "linkcrm_deal_key"))
        pipeline = field_map.deal_pipeline.get(CRM)
        self.pipeline = pipeline.name if pipeline else "default"

    def property_of(self, name: str, object_: str = "contact") -> str | None:
        """The HubSpot property of a canonical field, or None when HubSpot is not mapped."""
        spec = self.field_map.fields.get(name)
        if spec is None:
            raise PermanentCRMError(f"{CRM}: field {name!r} is not in the field map "
                                    f"({self.field_map.file or 'fields.yaml'})")
        if spec.object != object_:
            raise PermanentCRMError(f"{CRM}: field {name!r} belongs to the {spec.object}, "
                                    f"not the {object_}")
        crm_field = spec.in_crm(CRM)
        return crm_field.name if crm_field else None

    def values(self, fields: Mapping[str, JSON], object_: str = "contact") -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in fields.items():
            if value is None or value == "":
                continue  # linkcrm never clears a CRM value by accident
            prop = self.property_of(name, object_)
            if prop is None:
                continue  # the field map does not send this field to HubSpot
            try:
                coerced = self.field_map.coerce(DIALECT, name, value)
            except CoercionError as error:
                raise PermanentCRMError(f"{CRM}: {error}") from None
            out[prop] = str(coerced)
        return out

    def identity(self, action: Action) -> list[tuple[IdentityKey, str]]:
        """Identity keys HubSpot knows, in priority order, with their HubSpot property."""
        found = []
        for key in action.identity:
            spec = self.field_map.fields.get(key.field)
            crm_field = spec.in_crm(CRM) if spec else None
            if crm_field and key.value:
                found.append((key, crm_field.name))
        if not found:
            raise PermanentCRMError(f"{CRM}: rule {action.rule!r}: no identity key of this "
                                    "action maps to a HubSpot property in the field map")
        return found

    def locator(self, action: Action) -> tuple[Locator, IdentityKey]:
        """The first identity key whose property is unique in HubSpot (`idProperty`), else
        the first key HubSpot knows at all."""
        keys = self.identity(action)
        for key, prop in keys:
            if prop in self.unique:
                value = key.value.strip().lower() if prop == "email" else key.value
                return Locator(prop, value), key
        key, prop = keys[0]
        return Locator(prop, key.value, unique=False), key

    def change(self, index: int, action: Action) -> ContactChange:
        if isinstance(action, UpsertContact):
            return ContactChange(index, action, self.values(action.set),
                                 self.values(action.set_once))
        if isinstance(action, SetStage):
            stage = self.field_map.contact_stage(action.stage)
            value = stage.value(CRM) if stage else ""
            if not value:
                raise PermanentCRMError(f"{CRM}: rule {action.rule!r}: stage {action.stage!r} "
                                        "has no HubSpot value in the field map")
            return ContactChange(index, action, stage=value)
        raise PermanentCRMError(f"{CRM}: {action.kind} is not a contact action")

    def deal(self, index: int, action: CreateDeal) -> DealSpec:
        if not action.key:
            raise PermanentCRMError(f"{CRM}: rule {action.rule!r}: create_deal has an empty key")
        properties = self.values(action.set, "deal")
        properties.update({"dealname": action.title or action.key, "pipeline": self.pipeline,
                           self.deal_key_property: action.key})
        if action.stage:
            stage = self.field_map.deal_stage(action.stage)
            value = stage.value(CRM) if stage else ""
            if not value:
                raise PermanentCRMError(f"{CRM}: rule {action.rule!r}: deal stage "
                                        f"{action.stage!r} has no HubSpot value in the field map")
            properties["dealstage"] = value
        if action.amount is not None:
            properties["amount"] = str(action.amount)
        return DealSpec(index, action, action.key, properties)


def group_contacts(translator: Translator,
                   items: Iterable[tuple[int, Action]]) -> tuple[list[ContactGroup],
                                                                 dict[int, Exception]]:
    """Group contact actions by the contact they locate, keeping their order; actions that
    cannot be translated fail alone."""
    groups: dict[Locator, ContactGroup] = {}
    failed: dict[int, Exception] = {}
    for index, action in items:
        try:
            locator, primary = translator.locator(action)
            change = translator.change(index, action)
            identity = translator.identity(action)
        except PermanentCRMError as error:
            failed[index] = error
            continue
        group = groups.get(locator)
        if group is None:
            group = groups[locator] = ContactGroup(locator, translator.stage_property,
                                                   translator.stage_values, primary=primary)
        group.changes.append(change)
        for key, prop in identity:
            if key not in group.keys:
                group.keys.append(key)
            if prop != locator.property:
                group.attach.setdefault(prop, key.value)
    return list(groups.values()), failed
