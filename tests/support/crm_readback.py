"""Each CRM's contacts and deals read back under linkcrm's canonical names, so one expectation
checks all four targets: a contact is `{canonical field: value, "stage": ..., "id": ...}`, a deal
`{"key", "title", "stage", "contact": the contact's id, canonical deal fields}`."""

from __future__ import annotations

from typing import Any

from engine.config.fieldmap import FieldMap, Stage
from engine.storage import Storage
from tests.emulators.hubspot_state import HubSpotState
from tests.emulators.pipedrive import PipedriveEmulator
from tests.emulators.salesforce import SalesforceEmulator

Record = dict[str, Any]
Found = tuple[list[Record], list[Record]]  # (contacts, deals)


def _names(field_map: FieldMap, crm: str, kind: str) -> dict[str, str]:
    """The CRM's name (Pipedrive: label or builtin) -> canonical, for contact or deal fields."""
    names = {}
    for spec in field_map.fields.values():
        crm_field = spec.in_crm(crm)
        if crm_field is not None and spec.object == kind:
            names[crm_field.name] = spec.name
    return names


def _stage(stages: tuple[Stage, ...], crm: str, value: object) -> object:
    return next((s.name for s in stages if s.value(crm) == value), value)


def mapped(field_map: FieldMap, crm: str, values: Record) -> Record:
    """`values` (canonical names) cut down to the fields `crm` receives; local keeps all."""
    if crm == "local":
        return dict(values)
    return {name: value for name, value in values.items()
            if name not in field_map.fields or field_map.fields[name].in_crm(crm) is not None}


def hubspot(state: HubSpotState, field_map: FieldMap) -> Found:
    names = _names(field_map, "hubspot", "contact")
    contacts = []
    for record in state.contacts.records.values():
        contact: Record = {names[k]: v for k, v in record.properties.items() if k in names}
        contact["stage"] = _stage(field_map.contact_stages, "hubspot",
                                  record.properties.get("lifecyclestage"))
        contact["id"] = record.id
        contacts.append(contact)
    deal_names = _names(field_map, "hubspot", "deal")
    key = field_map.targets["hubspot"]["deal_key_property"]
    deals = []
    for record in state.deals.records.values():
        linked = [c for d, c in state.associations if d == record.id]
        deals.append({
            "key": record.properties.get(key), "title": record.properties.get("dealname"),
            "stage": _stage(field_map.deal_stages, "hubspot", record.properties.get("dealstage")),
            "contact": linked[0] if len(linked) == 1 else linked,
            **{deal_names[k]: v for k, v in record.properties.items() if k in deal_names}})
    return contacts, deals


def salesforce(emulator: SalesforceEmulator, field_map: FieldMap) -> Found:
    names = _names(field_map, "salesforce", "contact")
    token = field_map.fields["deep_link_token"].in_crm("salesforce")
    assert token is not None
    contacts = []
    by_token = {}
    for lead in emulator.leads:
        contact: Record = {names[k]: v for k, v in lead.items() if k in names and v is not None}
        contact["stage"] = _stage(field_map.contact_stages, "salesforce", lead.get("Status"))
        contact["id"] = lead["Id"]
        by_token[lead.get(token.name)] = lead["Id"]
        contacts.append(contact)
    deal_names = _names(field_map, "salesforce", "deal")
    key = field_map.targets["salesforce"]["deal_key_field"]
    deals = []
    for opportunity in emulator.opportunities:
        # An Opportunity cannot reference a Lead: it carries the Lead's deep-link token.
        deals.append({
            "key": opportunity.get(key), "title": opportunity.get("Name"),
            "stage": _stage(field_map.deal_stages, "salesforce", opportunity.get("StageName")),
            "contact": by_token.get(opportunity.get(token.name)),
            **{deal_names[k]: v for k, v in opportunity.items()
               if k in deal_names and v is not None}})
    return contacts, deals


def _custom(emulator: PipedriveEmulator, kind: str, record: Record,
            names: dict[str, str]) -> Record:
    values: Record = {}
    for definition in emulator.fields[kind]:
        label = definition["field_name"]
        value = record.get("custom_fields", {}).get(definition["field_code"])
        if not definition["is_custom_field"] or value is None:
            continue
        if definition["options"]:
            value = emulator.option_label(kind, label, value)
        values[names.get(label, label)] = value
    return values


def pipedrive(emulator: PipedriveEmulator, field_map: FieldMap) -> Found:
    names = _names(field_map, "pipedrive", "contact")
    stage_field = field_map.contact_stage_field["pipedrive"].name
    contacts = []
    for person in emulator.persons.values():
        contact = _custom(emulator, "person", person, names)
        contact["stage"] = _stage(field_map.contact_stages, "pipedrive",
                                  contact.pop(stage_field, None))
        contact[names["name"]] = person["name"]
        primary = [e["value"] for e in person.get("emails") or [] if e.get("primary")]
        if primary:
            contact[names["emails"]] = primary[0]
        contact["id"] = person["id"]
        contacts.append(contact)
    deal_names = _names(field_map, "pipedrive", "deal")
    key = field_map.targets["pipedrive"]["deal_key_field"]
    stage_names = {s["id"]: s["name"] for s in emulator.stages}
    deals = []
    for record in emulator.deals.values():
        custom = _custom(emulator, "deal", record, deal_names)
        deals.append({
            "key": custom.pop(key, None), "title": record["title"],
            "stage": _stage(field_map.deal_stages, "pipedrive",
                            stage_names.get(record["stage_id"])),
            "contact": record["person_id"], **custom})
    return contacts, deals


async def local(storage: Storage) -> Found:
    contacts = [{**contact.fields, "stage": contact.stage, "id": contact.id}
                for contact in await storage.local_crm.contacts()]
    deals = [{"key": deal.key, "title": deal.title, "stage": deal.stage,
              "contact": deal.contact_id, **deal.fields}
             for deal in await storage.local_crm.deals()]
    return contacts, deals


def everywhere(storage_found: Found, stack: Any, field_map: FieldMap) -> dict[str, Found]:
    """All four targets' contacts and deals, local's read beforehand from its storage."""
    return {"local": storage_found,
            "hubspot": hubspot(stack.hubspot, field_map),
            "salesforce": salesforce(stack.salesforce, field_map),
            "pipedrive": pipedrive(stack.pipedrive, field_map)}
