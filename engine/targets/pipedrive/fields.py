"""Pipedrive's per-account names: field labels to 40-character keys and option ids, pipeline and
stage names to ids, each problem found with its fix."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from engine.actions import JSON
from engine.config.fieldmap import CoercionError, Dialect, FieldMap
from engine.targets.kind import Finding, NotSetUp
from engine.targets.pipedrive.api import PipedriveAPI, Record

# Custom fields are named by their label (their keys are per-account hashes); v2 takes dates
# as YYYY-MM-DD and date-times (kept as text) as RFC 3339.
DIALECT = Dialect("pipedrive", bare="label",
                  deal_names=(("title", "title"), ("stage", "stage_id (by stage name)"),
                              ("amount", "value")),
                  deal_key_setting="deal_key_field")
Entity = Literal["person", "deal"]
# Only these custom field types are searched by /persons/search and /deals/search.
SEARCHABLE = frozenset({"address", "varchar", "text", "varchar_auto", "double", "monetary",
                        "phone"})
TEXT = frozenset({"varchar", "varchar_auto", "text"})
# Pipedrive field types a canonical type can be written to (Pipedrive has no date-time field:
# date-times travel as RFC 3339 text).
COMPATIBLE: dict[str, frozenset[str]] = {
    "number": frozenset({"double"}), "integer": frozenset({"double"}),
    "date": TEXT | {"date"}, "enum": TEXT | {"enum"},
}
CREATE_AS = {"number": "double", "integer": "double", "date": "date", "enum": "enum"}
BUILTINS = {"name": "name", "emails": "emails"}
PROVISION = "run `linkcrm provision pipedrive` to create it"


class PipedriveSetupError(NotSetUp):
    """The account does not match the field map (a missing field, option or stage)."""

    def __init__(self, findings: list[Finding]) -> None:
        super().__init__("pipedrive", findings)


@dataclass(frozen=True)
class PDField:
    """A custom field of this account: its 40-character key, type and options (label -> id)."""

    key: str
    label: str
    type: str
    options: Mapping[str, int] = field(default_factory=dict)

    def option_label(self, option_id: object) -> str | None:
        return next((label for label, id_ in self.options.items() if id_ == option_id), None)


@dataclass(frozen=True)
class Need:
    """A custom field the field map needs in Pipedrive."""

    entity: Entity
    label: str
    allowed: frozenset[str]
    create_as: str
    options: tuple[str, ...] = ()
    searchable: bool = False


@dataclass(frozen=True)
class Catalog:
    """What the account holds: field definitions per entity, pipelines and stages."""

    fields: dict[Entity, list[Record]]
    pipelines: list[Record]
    stages: list[Record]


@dataclass(frozen=True)
class Account:
    """The field map resolved against one account; built once at start-up."""

    person: dict[str, PDField]  # canonical field -> custom person field
    deal: dict[str, PDField]  # canonical field -> custom deal field
    builtin: dict[str, str]  # canonical field -> Pipedrive's own person field
    stage_field: PDField | None
    deal_key: PDField | None
    pipeline_id: int | None
    deal_stages: dict[str, int]  # canonical deal stage -> stage id


async def fetch_catalog(api: PipedriveAPI) -> Catalog:
    person = await api.get_all("/personFields")
    deal = await api.get_all("/dealFields")
    return Catalog({"person": person, "deal": deal}, await api.get_all("/pipelines"),
                   await api.get_all("/stages"))


def needs(field_map: FieldMap) -> list[Need]:
    """Every custom field the field map names for Pipedrive, once per entity and label."""
    found: dict[tuple[Entity, str], Need] = {}
    for spec in field_map.fields.values():
        crm_field = spec.in_crm("pipedrive")
        if crm_field is None or DIALECT.kind(crm_field) != "label":
            continue
        kind = crm_field.type or spec.type
        entity: Entity = "deal" if spec.object == "deal" else "person"
        allowed = COMPATIBLE.get(kind, TEXT)
        if spec.identity:
            allowed = allowed & SEARCHABLE
        create_as = CREATE_AS.get(kind, "varchar")
        if create_as == "enum" and not spec.options:
            create_as = "varchar"  # Pipedrive option fields need their options up front
        found.setdefault((entity, crm_field.name), Need(
            entity, crm_field.name, allowed, create_as,
            spec.options if create_as == "enum" else (), spec.identity))
    stage_field = field_map.contact_stage_field.get("pipedrive")
    if stage_field is not None:
        options = tuple(s.value("pipedrive") for s in field_map.contact_stages
                        if s.value("pipedrive"))
        found[("person", stage_field.name)] = Need("person", stage_field.name,
                                                   frozenset({"enum"}), "enum", options)
    deal_key = field_map.targets.get("pipedrive", {}).get("deal_key_field")
    if isinstance(deal_key, str):
        found[("deal", deal_key)] = Need("deal", deal_key, TEXT, "varchar", searchable=True)
    return list(found.values())


def by_label(catalog: Catalog, entity: Entity) -> dict[str, list[Record]]:
    labels: dict[str, list[Record]] = {}
    for definition in catalog.fields[entity]:
        if definition.get("is_custom_field"):
            labels.setdefault(str(definition["field_name"]).strip(), []).append(definition)
    return labels


def _pd_field(definition: Record) -> PDField:
    options = {str(o["label"]): int(o["id"]) for o in definition.get("options") or []}
    return PDField(str(definition["field_code"]), str(definition["field_name"]),
                   str(definition["field_type"]), options)


def check(field_map: FieldMap, catalog: Catalog) -> tuple[Account, list[Finding]]:
    """Resolve the field map against the account; every problem comes back with its fix."""
    problems: list[Finding] = []
    resolved: dict[tuple[Entity, str], PDField] = {}
    for need in needs(field_map):
        labels = by_label(catalog, need.entity)
        matches = labels.get(need.label, [])
        what = f"{need.entity} field {need.label!r}"
        if not matches:
            close = difflib.get_close_matches(need.label, list(labels), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(Finding(f"{what} does not exist in Pipedrive{hint}", PROVISION))
            continue
        if len(matches) > 1:
            problems.append(Finding(f"{len(matches)} {need.entity} fields are labelled "
                                         f"{need.label!r}", "rename all but one in Pipedrive"))
            continue
        pd_field = _pd_field(matches[0])
        if pd_field.type not in need.allowed:
            searchable = " (searchable, since linkcrm finds records by it)" \
                if need.searchable else ""
            problems.append(Finding(
                f"{what} has type {pd_field.type}; linkcrm needs one of "
                f"{', '.join(sorted(need.allowed))}{searchable}",
                "change the field's type in Pipedrive, or delete it and run "
                "`linkcrm provision pipedrive`"))
            continue
        if pd_field.type == "enum":
            missing = [o for o in need.options if o not in pd_field.options]
            if missing:
                problems.append(Finding(
                    f"{what} lacks the option(s) {', '.join(map(repr, missing))}",
                    "run `linkcrm provision pipedrive` to add them"))
        resolved[(need.entity, need.label)] = pd_field
    account = _account(field_map, catalog, resolved, problems)
    return account, problems


def _account(field_map: FieldMap, catalog: Catalog, resolved: dict[tuple[Entity, str], PDField],
             problems: list[Finding]) -> Account:
    person: dict[str, PDField] = {}
    deal: dict[str, PDField] = {}
    builtin: dict[str, str] = {}
    for spec in field_map.fields.values():
        crm_field = spec.in_crm("pipedrive")
        if crm_field is None:
            continue
        if DIALECT.kind(crm_field) == "builtin":
            if crm_field.name in BUILTINS and spec.object == "contact":
                builtin[spec.name] = BUILTINS[crm_field.name]
            else:
                problems.append(Finding(
                    f"field {spec.name!r} maps to Pipedrive's own {crm_field.name!r}, which "
                    "linkcrm does not write", "map it to a custom field label in fields.yaml "
                    f"(linkcrm writes the builtins {', '.join(BUILTINS)} on persons)"))
            continue
        entity: Entity = "deal" if spec.object == "deal" else "person"
        found = resolved.get((entity, crm_field.name))
        if found is not None:
            (deal if entity == "deal" else person)[spec.name] = found
    stage_name = field_map.contact_stage_field.get("pipedrive")
    key_label = field_map.targets.get("pipedrive", {}).get("deal_key_field")
    if not isinstance(key_label, str):
        problems.append(Finding("fields.yaml names no deal key field for Pipedrive",
                                     "set targets.pipedrive.deal_key_field to a field label"))
    pipeline_id, deal_stages = _pipeline(field_map, catalog, problems)
    return Account(
        person, deal, builtin,
        resolved.get(("person", stage_name.name)) if stage_name else None,
        resolved.get(("deal", key_label)) if isinstance(key_label, str) else None,
        pipeline_id, deal_stages)


def _pipeline(field_map: FieldMap, catalog: Catalog, problems: list[Finding]
              ) -> tuple[int | None, dict[str, int]]:
    wanted = field_map.deal_pipeline.get("pipedrive")
    live = [p for p in catalog.pipelines if not p.get("is_deleted")]
    stage_names = [s.value("pipedrive") for s in field_map.deal_stages if s.value("pipedrive")]
    fix = (f"run `linkcrm provision pipedrive` to create the pipeline "
           f"{wanted.name if wanted else '(any)'!r} with the stages "
           f"{', '.join(map(repr, stage_names))} (or create them in Pipedrive: Settings > "
           "Pipelines), or change deal_pipeline/deal_stages for pipedrive in fields.yaml")
    if wanted is None:
        pipeline = live[0] if live else None
    else:
        pipeline = next((p for p in live if p.get("name") == wanted.name), None)
    if pipeline is None:
        problems.append(Finding(f"pipeline {wanted.name if wanted else ''!r} does not "
                                     "exist in Pipedrive", fix))
        return None, {}
    pipeline_id = int(pipeline["id"])
    stages = {str(s["name"]): int(s["id"]) for s in catalog.stages
              if s.get("pipeline_id") == pipeline_id and not s.get("is_deleted")}
    deal_stages: dict[str, int] = {}
    for stage in field_map.deal_stages:
        name = stage.value("pipedrive")
        if name and name in stages:
            deal_stages[stage.name] = stages[name]
        elif name:
            problems.append(Finding(
                f"pipeline {pipeline['name']!r} has no stage {name!r}", fix))
    return pipeline_id, deal_stages


def resolve(field_map: FieldMap, catalog: Catalog) -> Account:
    """The resolved account, or PipedriveSetupError naming every problem and its fix."""
    account, problems = check(field_map, catalog)
    if problems:
        raise PipedriveSetupError(problems)
    return account


def to_wire(pd_field: PDField, name: str, value: JSON) -> JSON:
    """A coerced canonical value as this Pipedrive field type takes it (v2 does not coerce:
    text stays text, numbers are numbers, options are option ids)."""
    if pd_field.type in ("enum", "set"):
        text = str(value)
        option = pd_field.options.get(text)
        if option is None:
            folded = [i for label, i in pd_field.options.items() if label.casefold() ==
                      text.casefold()]
            option = folded[0] if len(folded) == 1 else None
        if option is None:
            raise CoercionError(f"{name}: {text!r} is not an option of the Pipedrive field "
                                f"{pd_field.label!r}; run `linkcrm provision pipedrive`")
        return option if pd_field.type == "enum" else [option]
    if pd_field.type == "double":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CoercionError(f"{name}: expected a number for the Pipedrive field "
                                f"{pd_field.label!r}")
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)
