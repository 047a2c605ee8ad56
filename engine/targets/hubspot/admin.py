"""`linkcrm provision hubspot` and `linkcrm doctor hubspot`: the properties the field map needs.

    report = await provision(client, token, field_map)   # lines: what was created or found
    findings = await doctor(client, token, field_map)    # each a problem and its fix

Provisioning is idempotent: the property group and every mapped contact and deal property are
created unless they exist (a 409 from a concurrent run counts as existing). The deep-link token
and the deal key properties are created unique (hasUniqueValue, which HubSpot never lets you
change later), because upserts and one-deal-per-key depend on it.
"""

from __future__ import annotations

import httpx

from engine.config.fieldmap import FieldMap, FieldSpec
from engine.errors import CRMError, RetryableCRMError
from engine.targets.hubspot.api import DEFAULT_BASE_URL, HubSpotAPI, as_list, as_object, without_fix
from engine.targets.hubspot.plan import CRM, Translator
from engine.targets.hubspot.target import unique_properties
from engine.targets.kind import Finding

OBJECTS = {"contact": "contacts", "deal": "deals"}
# canonical type -> (HubSpot type, fieldType); the types a property may have and still work
PROPERTY_TYPES = {
    "string": ("string", "text"), "text": ("string", "textarea"), "url": ("string", "text"),
    "email": ("string", "text"), "number": ("number", "number"),
    "integer": ("number", "number"), "date": ("date", "date"),
    "datetime": ("datetime", "date"), "enum": ("enumeration", "select"),
    "boolean": ("bool", "booleancheckbox"),
}
COMPATIBLE = {"string": {"string", "phone_number"}, "number": {"number"},
              "date": {"date", "datetime"}, "datetime": {"datetime"},
              "enumeration": {"enumeration"}, "bool": {"bool", "enumeration"}}
PROVISION = "run `linkcrm provision hubspot`"
SCOPES = "the crm.objects.contacts/deals and crm.schemas read and write scopes"


def wanted_properties(field_map: FieldMap) -> dict[str, dict[str, dict[str, object]]]:
    """object -> property name -> the PropertyCreate body linkcrm needs (mapped fields plus the
    deal key)."""
    unique = unique_properties(field_map)
    group = _group(field_map)["name"]
    wanted: dict[str, dict[str, dict[str, object]]] = {"contacts": {}, "deals": {}}
    for spec in field_map.fields.values():
        crm_field = spec.in_crm(CRM)
        if crm_field is None:
            continue
        kind = crm_field.type or spec.type
        wanted[OBJECTS[spec.object]][crm_field.name] = _create_body(
            crm_field.name, spec.label or spec.name, kind, str(group),
            unique=crm_field.name in unique and crm_field.name != "email", spec=spec)
    key = Translator(field_map, unique).deal_key_property
    wanted["deals"][key] = _create_body(key, "linkcrm deal key", "string", str(group),
                                        unique=True, spec=None)
    return wanted


def _group(field_map: FieldMap) -> dict[str, object]:
    raw = as_object(field_map.targets.get(CRM, {}).get("property_group"))
    return {"name": str(raw.get("name", "deep_link_attribution")),
            "label": str(raw.get("label", "Deep Link Attribution"))}


def _create_body(name: str, label: str, kind: str, group: str, *, unique: bool,
                 spec: FieldSpec | None) -> dict[str, object]:
    hs_type, field_type = PROPERTY_TYPES.get(kind, ("string", "text"))
    body: dict[str, object] = {"name": name, "label": label, "type": hs_type,
                               "fieldType": field_type, "groupName": group,
                               "description": "Written by linkcrm from Tolinku deep-link events."}
    if unique:
        body["hasUniqueValue"] = True
    # HubSpot's OptionInput requires label, value and hidden (displayOrder is optional).
    if hs_type == "enumeration" and spec is not None:
        body["options"] = [{"label": o, "value": o, "displayOrder": i, "hidden": False}
                           for i, o in enumerate(spec.options)]
    if hs_type == "bool":
        body["options"] = [{"label": "Yes", "value": "true", "displayOrder": 0, "hidden": False},
                           {"label": "No", "value": "false", "displayOrder": 1, "hidden": False}]
    return body


async def _existing(api: HubSpotAPI, object_: str) -> dict[str, dict[str, object]]:
    response = await api.call("GET", f"/crm/v3/properties/{object_}")
    return {str(as_object(p).get("name")): as_object(p)
            for p in as_list(as_object(response.json()).get("results"))}


async def provision(client: httpx.AsyncClient, token: str, field_map: FieldMap, *,
                    base_url: str = DEFAULT_BASE_URL) -> list[str]:
    """Create the property group and every property the field map needs; returns one line per
    group or property: created, or already there. Raises CRMError (bad token, bad request)."""
    api = HubSpotAPI(client, token, base_url=base_url)
    group = _group(field_map)
    report = []
    for object_, properties in wanted_properties(field_map).items():
        response = await api.call("POST", f"/crm/v3/properties/{object_}/groups",
                                  json=group, expect=(201, 409))
        state = "created" if response.status_code == 201 else "already exists"
        report.append(f"{object_} property group {group['name']}: {state}")
        existing = await _existing(api, object_)
        for name, body in properties.items():
            if name in existing:
                report.append(f"{object_} property {name}: already exists")
                continue
            response = await api.call("POST", f"/crm/v3/properties/{object_}", json=body,
                                      expect=(201, 409))
            unique = " (unique)" if body.get("hasUniqueValue") else ""
            state = "created" if response.status_code == 201 else "already exists"
            report.append(f"{object_} property {name}{unique}: {state}")
    return report


async def doctor(client: httpx.AsyncClient, token: str, field_map: FieldMap, *,
                 base_url: str = DEFAULT_BASE_URL) -> list[Finding]:
    """Check what linkcrm relies on; returns problems (empty: all good), each with its fix."""
    api = HubSpotAPI(client, token, base_url=base_url)
    try:
        existing = {object_: await _existing(api, object_) for object_ in OBJECTS.values()}
    except CRMError as error:
        return [_access_problem(api, error)]
    problems = []
    for object_, properties in wanted_properties(field_map).items():
        for name, body in properties.items():
            problems.extend(_check(object_, name, body, existing[object_].get(name)))
    problems.extend(_stage_problems(field_map, existing["contacts"]))
    try:
        problems.extend(await _deal_stage_problems(api, field_map))
    except CRMError as error:
        problems.append(Finding(f"cannot read deal pipelines: {without_fix(error)}",
                                "give the private app the crm.objects.deals.read scope"))
    return problems


def _check(object_: str, name: str, body: dict[str, object],
           found: dict[str, object] | None) -> list[Finding]:
    if found is None:
        return [Finding(f"{object_} property {name!r} does not exist", PROVISION)]
    problems = []
    want, have = str(body["type"]), str(found.get("type"))
    if have not in COMPATIBLE.get(want, {want}):
        problems.append(Finding(f"{object_} property {name!r} has type {have}, linkcrm writes "
                                f"{want}", f"point the field map at a {want} property, or "
                                f"re-create {name!r} as {want}"))
    if body.get("hasUniqueValue") and found.get("hasUniqueValue") is not True:
        problems.append(Finding(f"{object_} property {name!r} is not unique, so upserts and "
                                "one deal per key cannot rely on it", "hasUniqueValue cannot "
                                "be changed later: create a new property with hasUniqueValue, "
                                "point the field map (or targets.hubspot.deal_key_property) at "
                                "it"))
    have_options = {str(as_object(o).get("value")) for o in as_list(found.get("options"))}
    for option in as_list(body.get("options")):
        value = str(as_object(option).get("value"))
        if have == "enumeration" and value not in have_options:
            problems.append(Finding(f"{object_} property {name!r} has no option {value!r}",
                                    "add it in HubSpot (Settings > Properties)"))
    return problems


def _stage_problems(field_map: FieldMap, contacts: dict[str, dict[str, object]]
                    ) -> list[Finding]:
    stage_field = field_map.contact_stage_field.get(CRM)
    name = stage_field.name if stage_field else "lifecyclestage"
    found = contacts.get(name)
    if found is None:
        return [Finding(f"contacts property {name!r} (the stage field) does not exist",
                        f"{PROVISION} or name an existing property in contact_stage_field")]
    options = {str(as_object(o).get("value")) for o in as_list(found.get("options"))}
    return [Finding(f"contact stage {stage.name!r} maps to {stage.value(CRM)!r}, which {name} "
                    f"does not offer ({', '.join(sorted(options))})", "add the stage in "
                    "HubSpot or change its hubspot value in the field map")
            for stage in field_map.contact_stages
            if stage.value(CRM) and stage.value(CRM) not in options]


async def _deal_stage_problems(api: HubSpotAPI, field_map: FieldMap) -> list[Finding]:
    pipeline = field_map.deal_pipeline.get(CRM)
    wanted = pipeline.name if pipeline else "default"
    response = await api.call("GET", "/crm/v3/pipelines/deals")
    pipelines = {str(as_object(p).get("id")): as_object(p)
                 for p in as_list(as_object(response.json()).get("results"))}
    found = pipelines.get(wanted)
    if found is None:
        return [Finding(f"deal pipeline {wanted!r} does not exist (pipelines: "
                        f"{', '.join(sorted(pipelines))})",
                        "set deal_pipeline.hubspot to one of them")]
    stages = {str(as_object(s).get("id")) for s in as_list(found.get("stages"))}
    return [Finding(f"deal stage {stage.name!r} maps to {stage.value(CRM)!r}, not a stage of "
                    f"pipeline {wanted!r} ({', '.join(sorted(stages))})",
                    "change its hubspot value in the field map")
            for stage in field_map.deal_stages
            if stage.value(CRM) and stage.value(CRM) not in stages]


def _access_problem(api: HubSpotAPI, error: CRMError) -> Finding:
    """Why the first read failed, blaming what did fail (the network, HubSpot, the token or
    its scopes), with one fix."""
    status, where, said = api.last_status, api.base_url, without_fix(error)
    problem = "cannot read HubSpot properties"
    if status is None:
        return Finding(f"{problem}: HubSpot at {where} is unreachable ({said})",
                       "check the network connection (and any proxy or firewall) and "
                       "HUBSPOT_BASE_URL, then run `linkcrm doctor hubspot` again")
    if isinstance(error, RetryableCRMError):
        return Finding(f"{problem}: HubSpot at {where} is not answering normally ({said})",
                       "wait a few minutes, then run `linkcrm doctor hubspot` again")
    if status == 401:
        return Finding(f"{problem}: HubSpot refused the token ({said})", "set "
                       f"HUBSPOT_ACCESS_TOKEN to a private-app token of this account with "
                       f"{SCOPES}")
    if status == 403:
        return Finding(f"{problem}: the token lacks a scope ({said})",
                       f"give the private app {SCOPES}")
    return Finding(f"{problem} at {where} ({said})", "check HUBSPOT_BASE_URL, and that "
                   f"HUBSPOT_ACCESS_TOKEN is a private-app token with {SCOPES}")
