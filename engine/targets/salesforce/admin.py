"""Salesforce setup: the fields an admin must create (provision) and checks of an org (doctor)."""

from __future__ import annotations

from typing import Any

from engine.config.fieldmap import FieldMap, FieldSpec
from engine.errors import CRMError
from engine.targets.kind import Finding
from engine.targets.salesforce import soql
from engine.targets.salesforce.target import SalesforceTarget

CRM = "salesforce"
# Canonical type -> (what to create in Setup, describe types that can hold it).
TYPES: dict[str, tuple[str, frozenset[str]]] = {
    "string": ("Text(255)", frozenset({"string", "textarea", "email", "phone", "url",
                                       "picklist"})),
    "text": ("Long Text Area(32768)", frozenset({"textarea", "string"})),
    "url": ("URL(255)", frozenset({"url", "string"})),
    "email": ("Email", frozenset({"email", "string"})),
    "date": ("Date", frozenset({"date"})),
    "datetime": ("Date/Time", frozenset({"datetime"})),
    "number": ("Number(16, 2)", frozenset({"double", "currency", "percent", "int"})),
    "integer": ("Number(18, 0)", frozenset({"int", "double"})),
    "boolean": ("Checkbox", frozenset({"boolean"})),
    "enum": ("Picklist", frozenset({"picklist", "string"})),
}
SETUP = "Setup > Object Manager"


def _type_of(spec: FieldSpec) -> str:
    crm_field = spec.in_crm(CRM)
    return (crm_field.type if crm_field and crm_field.type else None) or spec.type


def _mapped(field_map: FieldMap, sobject: str) -> list[tuple[FieldSpec, str]]:
    wanted = "contact" if sobject == "Lead" else "deal"
    return [(spec, crm.name) for spec in field_map.fields.values()
            if spec.object == wanted and (crm := spec.in_crm(CRM)) is not None]


def _settings(field_map: FieldMap) -> dict[str, Any]:
    return dict(field_map.targets.get(CRM, {}))


def _token_field(field_map: FieldMap) -> str:
    spec = field_map.fields.get("deep_link_token")
    crm = spec.in_crm(CRM) if spec else None
    return crm.name if crm else ""


def provision_instructions(field_map: FieldMap) -> str:
    """The exact Salesforce setup the field map needs, as text for an admin: custom fields
    (API name, type, External ID / Unique flags), Lead Status and Lead Source values, and the
    Opportunity fields and stages. Salesforce has no safe REST call for this, so it is printed."""
    token = _token_field(field_map)
    settings = _settings(field_map)
    deal_key = settings.get("deal_key_field", "")
    lines = ["Salesforce setup for linkcrm. Create each custom field in "
             f"{SETUP} > <object> > Fields & Relationships, then give the integration user's "
             "permission set Read and Edit access to it.", "", "Lead fields:"]
    for spec, name in _mapped(field_map, "Lead"):
        lines.append(_field_line(spec.label, name, _type_of(spec), spec,
                                 unique=name == token))
    lines += ["", "Lead Status values (Lead > Fields & Relationships > Lead Status); each must "
              "exist and must NOT be marked Converted (a converted status cannot be set "
              "without converting the Lead, which has no REST endpoint):"]
    lines += [f"  - {stage.value(CRM)}   (stage {stage.name})"
              for stage in field_map.contact_stages if stage.value(CRM)]
    defaults = dict(settings.get("lead_defaults") or {})
    if defaults.get("LeadSource"):
        lines += ["", f"Lead Source picklist value: {defaults['LeadSource']}   (new Leads get it)"]
    lines += ["", "Opportunity fields:"]
    if deal_key:
        lines.append(f"  {'Linkcrm deal key':<28} {deal_key:<32} Text(255)   External ID, "
                     "Unique (case sensitive): one Opportunity per linkcrm deal key, so a "
                     "retried create finds it")
    if token:
        lines.append(f"  {'Deep link token':<28} {token:<32} Text(255)   the Lead's token (an "
                     "Opportunity cannot reference a Lead)")
    for spec, name in _mapped(field_map, "Opportunity"):
        lines.append(_field_line(spec.label, name, _type_of(spec), spec, unique=False))
    lines += ["", "Opportunity Stage values (Opportunity > Fields & Relationships > Stage):"]
    lines += [f"  - {stage.value(CRM)}   (deal stage {stage.name})"
              for stage in field_map.deal_stages if stage.value(CRM)]
    lines += ["", "Then run `linkcrm doctor salesforce` to check the org."]
    return "\n".join(lines) + "\n"


def _field_line(label: str, name: str, kind: str, spec: FieldSpec, *, unique: bool) -> str:
    if not name.endswith("__c"):
        return f"  {label:<28} {name:<32} standard field, nothing to create"
    created = TYPES.get(kind, (kind, frozenset()))[0]
    if kind == "enum" and spec.options:
        created = f"Picklist ({', '.join(spec.options)})"
    flags = "   External ID, Unique (case sensitive)" if unique else ""
    return f"  {label:<28} {name:<32} {created}{flags}"


async def doctor(target: SalesforceTarget) -> list[Finding]:
    """Problems with the org behind `target`, each with its fix; [] when all is well.

    Checks the credentials, that every mapped Lead and Opportunity field exists with a
    compatible type and is writable, that the token and deal-key fields are External IDs, that
    every stage value exists in the Lead Status / Opportunity Stage picklists, and that no
    contact stage maps to a converted Lead Status."""
    try:
        await target.tokens.token()
    except CRMError as error:
        return [Finding(f"credentials: {error}", _credential_fix())]
    field_map = target.field_map
    problems: list[Finding] = []
    try:
        lead = await _describe(target, "Lead")
        opportunity = await _describe(target, "Opportunity")
        converted = await _converted_statuses(target)
    except CRMError as error:
        return [Finding(f"describe failed: {error}", "give the integration user API access "
                        "and Read on Lead, Opportunity and Lead Status")]
    token = _token_field(field_map)
    for spec, name in _mapped(field_map, "Lead"):
        problems += _check_field("Lead", lead, name, _type_of(spec), external=name == token)
    problems += _check_picklist("Lead", lead, target.leads.status_field,
                                [s.value(CRM) for s in field_map.contact_stages if s.value(CRM)])
    for stage in field_map.contact_stages:
        if stage.value(CRM) in converted:
            problems.append(Finding(f"Lead Status '{stage.value(CRM)}' (stage {stage.name}) is "
                                    "a converted status, which cannot be set over REST",
                                    "map the stage to an ordinary status in fields.yaml, or "
                                    "untick Converted"))
    settings = _settings(field_map)
    source = dict(settings.get("lead_defaults") or {}).get("LeadSource")
    if source:
        problems += _check_picklist("Lead", lead, "LeadSource", [str(source)])
    deal_key = settings.get("deal_key_field", "")
    if deal_key:
        problems += _check_field("Opportunity", opportunity, deal_key, "string", external=True)
    if token:
        problems += _check_field("Opportunity", opportunity, token, "string", external=False)
    for spec, name in _mapped(field_map, "Opportunity"):
        problems += _check_field("Opportunity", opportunity, name, _type_of(spec),
                                 external=False)
    problems += _check_picklist("Opportunity", opportunity, "StageName",
                                [s.value(CRM) for s in field_map.deal_stages if s.value(CRM)])
    return problems


def _credential_fix() -> str:
    return ("check SF_INSTANCE_URL (the My Domain URL), SF_CLIENT_ID and SF_CLIENT_SECRET or "
            "the JWT settings, and that the app has a run-as user with API access")


async def _describe(target: SalesforceTarget, sobject: str) -> dict[str, dict[str, Any]]:
    body = await target.api.json("GET", f"/sobjects/{soql.name(sobject)}/describe")
    fields = body.get("fields") if isinstance(body, dict) else None
    return {str(f.get("name")): f for f in fields or [] if isinstance(f, dict)}


async def _converted_statuses(target: SalesforceTarget) -> set[str]:
    rows = await target.api.query(soql.select_all(["MasterLabel", "IsConverted"], "LeadStatus"))
    return {str(row.get("MasterLabel")) for row in rows if row.get("IsConverted") is True}


def _check_field(
    sobject: str, fields: dict[str, dict[str, Any]], name: str, kind: str, *, external: bool
) -> list[Finding]:
    where = f"{SETUP} > {sobject} > Fields & Relationships"
    created = TYPES.get(kind, (kind, frozenset()))
    found = fields.get(name)
    if found is None:
        return [Finding(f"{sobject} field {name} does not exist (or the integration user cannot "
                        f"see it)", f"create it in {where} as {created[0]} (see `linkcrm "
                        "provision salesforce`) and grant the user Edit access")]
    problems = []
    if created[1] and found.get("type") not in created[1]:
        problems.append(Finding(f"{sobject} field {name} is of type {found.get('type')}, which "
                                f"cannot hold a {kind}", f"recreate it as {created[0]}"))
    if not found.get("updateable", True) or not found.get("createable", True):
        problems.append(Finding(f"{sobject} field {name} is read-only for the integration user",
                                "grant Edit access in its permission set"))
    if external and not (found.get("externalId") and found.get("unique")):
        problems.append(Finding(f"{sobject} field {name} is not an External ID marked Unique, "
                                "so upserts on it fail (404) or find several records (300)",
                                f"edit it in {where} and tick External ID and Unique (case "
                                "sensitive)"))
    return problems


def _check_picklist(
    sobject: str, fields: dict[str, dict[str, Any]], name: str, values: list[str]
) -> list[Finding]:
    found = fields.get(name)
    if found is None:
        return [Finding(f"{sobject} field {name} is missing",
                        "check the integration user's access")]
    present = {str(v.get("value")) for v in found.get("picklistValues") or []
               if isinstance(v, dict) and v.get("active", True)}
    return [Finding(f"{sobject} {name} has no active value '{value}'",
                    f"add it in {SETUP} > {sobject} > Fields & Relationships > {name}")
            for value in values if value not in present]
