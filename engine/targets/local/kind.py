"""The `local` kind: linkcrm's embedded CRM in its own database, enabled without credentials."""

from __future__ import annotations

from engine.config.fieldmap import CANONICAL
from engine.targets.base import Target
from engine.targets.kind import TargetContext, TargetKind
from engine.targets.local.target import LocalTarget


def build(context: TargetContext) -> Target:
    return LocalTarget(context.local_crm, context.field_map)


KIND = TargetKind((), build, dialect=CANONICAL)
