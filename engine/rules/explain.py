"""What an action plan means for one CRM: each field under that CRM's name, value coerced.

Nothing here contacts a CRM. What a target calls a field and how it writes a value is its
`Dialect` (declared by the target's package, passed in by the caller); custom fields named by
label (Pipedrive's: their 40-character keys are resolved from the account at start-up) are
shown as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.actions import JSON, Action, CreateDeal, UpsertContact
from engine.config.fieldmap import CoercionError, CRMField, Dialect, FieldMap


@dataclass
class TargetView:
    """One action as `target` would receive it."""

    target: str
    identity: dict[str, JSON] = field(default_factory=dict)
    fields: dict[str, dict[str, JSON]] = field(default_factory=dict)  # set / set_once
    scalars: dict[str, JSON] = field(default_factory=dict)  # key, title, amount
    stage: dict[str, JSON] | None = None
    defaults: dict[str, JSON] = field(default_factory=dict)  # sent when a record is created
    unmapped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, JSON]:
        result: dict[str, JSON] = {"target": self.target, "identity": dict(self.identity)}
        result.update(self.scalars)
        result.update({name: dict(values) for name, values in self.fields.items()})
        if self.stage is not None:
            result["stage"] = dict(self.stage)
        if self.defaults:
            result["defaults"] = dict(self.defaults)
        result["unmapped"] = list(self.unmapped)
        result["errors"] = list(self.errors)
        return result


def crm_name(crm_field: CRMField, dialect: Dialect) -> str:
    if dialect.kind(crm_field) == "label":
        return f"{crm_field.name} (custom field, by label)"
    return crm_field.name


def target_view(action: Action, field_map: FieldMap, dialect: Dialect) -> TargetView:
    """`action` as `dialect`'s target would receive it."""
    target = dialect.target
    view = TargetView(target)
    for key in action.identity:
        spec = field_map.fields[key.field]
        mapped = spec.in_crm(target)
        if mapped is None:
            view.unmapped.append(key.field)
            continue
        view.identity[crm_name(mapped, dialect)] = key.value
    for map_name in action.field_maps:
        values: dict[str, JSON] = getattr(action, map_name)
        shown: dict[str, JSON] = {}
        for name, value in values.items():
            mapped = field_map.fields[name].in_crm(target)
            if mapped is None:
                view.unmapped.append(name)
                continue
            try:
                shown[crm_name(mapped, dialect)] = field_map.coerce(dialect, name, value)
            except CoercionError as error:
                view.errors.append(str(error))
        view.fields[map_name] = shown
    settings = field_map.targets.get(target, {})
    names = dict(dialect.deal_names)
    key_name = settings.get(dialect.deal_key_setting) if dialect.deal_key_setting else None
    if isinstance(key_name, str) and key_name:
        names["key"] = key_name
    for name, value in action.payload().items():
        if name not in action.field_maps and name != "stage" and value is not None:
            view.scalars[names.get(name, name)] = value
    defaults = settings.get(dialect.contact_defaults_setting) if (
        dialect.contact_defaults_setting and isinstance(action, UpsertContact)) else None
    if isinstance(defaults, dict):
        view.defaults = dict(defaults)
    stage_name = getattr(action, "stage", None)
    if isinstance(stage_name, str):
        deal = isinstance(action, CreateDeal)
        stage = field_map.deal_stage(stage_name) if deal else field_map.contact_stage(stage_name)
        value = stage.value(target) if stage else ""
        where = names.get("stage", "deal stage") if deal else _stage_field(field_map, dialect)
        view.stage = {"field": where, "value": value or None}
        if not value:
            view.errors.append(f"stage {stage_name!r} has no {target} value in the field map")
    return view


def _stage_field(field_map: FieldMap, dialect: Dialect) -> str:
    mapped = field_map.contact_stage_field.get(dialect.target)
    return crm_name(mapped, dialect) if mapped else "stage"
