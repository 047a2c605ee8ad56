"""Whether two rule sets' field maps let their plans be compared, and if not, why.

A diff compares plans in canonical field names. That says what changes only when a canonical
name means the same in both field maps: the same type (values are coerced by type), the same
field in every CRM, the same CRM value for every stage. `incomparable(old, new)` lists, for the
fields and stages either side's rules use, every way the two maps disagree; fields and stages
neither side uses, and fields one map declares and the other does not, never matter. With
`canonical=False` (a diff of what one CRM receives, where names and values are already the
CRM's) only the stage order still matters: whether a stage change moves a contact depends on
the contact's current stage, which a diff of plans cannot see.

    incomparable(old, new)
    # ["field 'first_touch_campaign': its hubspot field is 'first_touch_campaign' in OLD,
    #   'ft_campaign' in NEW"]
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.actions import CreateDeal
from engine.config.fieldmap import CRMS, CRMField, FieldMap, FieldSpec, Stage
from engine.rules.model import RuleSet


def _uses(ruleset: RuleSet) -> tuple[set[str], set[str], set[str]]:
    """The canonical fields, contact stages and deal stages `ruleset`'s rules name."""
    fields: set[str] = set()
    contact: set[str] = set()
    deal: set[str] = set()
    for rule in ruleset.rules:
        for template in rule.actions:
            fields.update(name for name, _ in template.identity)
            for _, templates in template.fields:
                fields.update(name for name, _ in templates)
            if template.stage is not None:
                (deal if template.kind is CreateDeal else contact).add(template.stage)
    return fields, contact, deal


def _crm_field(crm_field: CRMField | None) -> str:
    if crm_field is None:
        return "not mapped"
    kinds = {"name": "", "label": "label ", "builtin": "built-in "}
    typed = f" (as {crm_field.type})" if crm_field.type else ""
    return f"{kinds[crm_field.kind]}{crm_field.name!r}{typed}"


def _field_differences(name: str, old: FieldSpec, new: FieldSpec) -> list[str]:
    found = []
    for what, before, after in (("type", old.type, new.type), ("object", old.object, new.object),
                                ("options", list(old.options), list(new.options)),
                                ("identity", old.identity, new.identity)):
        if before != after:
            found.append(f"field {name!r}: its {what} is {before!r} in OLD, {after!r} in NEW")
    for crm in CRMS:
        before_field, after_field = old.crm.get(crm), new.crm.get(crm)
        if before_field != after_field:
            found.append(f"field {name!r}: its {crm} field is {_crm_field(before_field)} in "
                         f"OLD, {_crm_field(after_field)} in NEW")
    return found


def _stage_differences(what: str, names: set[str], old: tuple[Stage, ...],
                       new: tuple[Stage, ...]) -> list[str]:
    before = {stage.name: stage for stage in old}
    after = {stage.name: stage for stage in new}
    found = []
    for name in sorted(names & before.keys() & after.keys()):
        for crm in CRMS:
            was, now = before[name].values.get(crm), after[name].values.get(crm)
            if was != now:
                found.append(f"{what} {name!r}: its {crm} value is {was!r} in OLD, {now!r} "
                             "in NEW")
    return found


def _per_crm(what: str, old: Mapping[str, CRMField], new: Mapping[str, CRMField]) -> list[str]:
    return [f"{what}: the {crm} field is {_crm_field(old.get(crm))} in OLD, "
            f"{_crm_field(new.get(crm))} in NEW"
            for crm in CRMS if old.get(crm) != new.get(crm)]


def _order(old: FieldMap, new: FieldMap) -> list[str]:
    common = {s.name for s in old.contact_stages} & {s.name for s in new.contact_stages}
    before = [s.name for s in old.contact_stages if s.name in common]
    after = [s.name for s in new.contact_stages if s.name in common]
    if before == after:
        return []
    return [f"the contact stages are in another forward order: {', '.join(before)} in OLD, "
            f"{', '.join(after)} in NEW (whether a stage change moves a contact then depends "
            "on its current stage, which a diff of plans cannot see)"]


def incomparable(old: RuleSet, new: RuleSet, *, canonical: bool = True) -> list[str]:
    """Why the plans of `old` and `new` cannot be compared, one reason each; [] if they can."""
    old_map, new_map = old.field_map, new.field_map
    reasons = _order(old_map, new_map)
    if not canonical:
        return reasons
    old_fields, old_contact, old_deal = _uses(old)
    new_fields, new_contact, new_deal = _uses(new)
    for name in sorted((old_fields | new_fields) & old_map.fields.keys() & new_map.fields.keys()):
        reasons += _field_differences(name, old_map.fields[name], new_map.fields[name])
    contact, deal = old_contact | new_contact, old_deal | new_deal
    reasons += _stage_differences("contact stage", contact, old_map.contact_stages,
                                  new_map.contact_stages)
    reasons += _stage_differences("deal stage", deal, old_map.deal_stages, new_map.deal_stages)
    if contact:
        reasons += _per_crm("the contact stage field", old_map.contact_stage_field,
                            new_map.contact_stage_field)
    if deal:
        reasons += _per_crm("the deal pipeline", old_map.deal_pipeline, new_map.deal_pipeline)
    return reasons
