"""The embedded CRM a scenario rule test replays into: the real `local` target on a scratch
SQLite database, so the merge rules are the embedded CRM's own (set vs set_once, stages only
forward, one deal per key), never a copy of them.

    replayed = replay_into_local_crm([plan1.actions, plan2.actions], ruleset.field_map)

The scratch database lives in a temporary folder removed afterwards; each call starts empty
(a copy of an empty database migrated once per process; `migrate()` on the copy only checks).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from engine.actions import JSON, Action, IdentityKey
from engine.config.fieldmap import FieldMap
from engine.errors import PermanentCRMError, RetryableCRMError
from engine.rules.scenarios import ContactState, CRMState, DealState, Replayed
from engine.storage import LocalContact, LocalCRMStore, open_storage
from engine.targets.base import CallContext
from engine.targets.local.target import LocalTarget

# One migrated empty database per process, copied for each scenario: a copy costs a few
# milliseconds where creating the schema costs tens.
_TEMPLATE: list[tempfile.TemporaryDirectory[str]] = []


def replay_into_local_crm(batches: Sequence[Sequence[Action]], field_map: FieldMap) -> Replayed:
    """Apply each event's actions, in order, to a fresh embedded CRM; its final state."""
    template = _template()
    with tempfile.TemporaryDirectory(prefix="linkcrm-scenario-") as folder:
        path = Path(folder) / "scenario.db"
        shutil.copyfile(template, path)
        return asyncio.run(_replay("sqlite:///" + str(path), batches, field_map))


def _template() -> Path:
    if not _TEMPLATE:
        folder = tempfile.TemporaryDirectory(prefix="linkcrm-scenario-template-")
        path = Path(folder.name) / "empty.db"
        asyncio.run(_create("sqlite:///" + str(path)))
        _TEMPLATE.append(folder)
    return Path(_TEMPLATE[0].name) / "empty.db"


async def _create(url: str) -> None:
    async with open_storage(url) as storage:
        await storage.migrate()


async def _replay(url: str, batches: Sequence[Sequence[Action]],
                  field_map: FieldMap) -> Replayed:
    errors: list[str] = []
    async with open_storage(url) as storage:
        await storage.migrate()
        target = LocalTarget(storage.local_crm, field_map)
        for number, actions in enumerate(batches, 1):
            for index, action in enumerate(actions, 1):
                context = CallContext(f"scenario-{number}-{index}", event_id=number,
                                      rule=action.rule)
                try:
                    await target.execute(action, context)
                except (PermanentCRMError, RetryableCRMError) as error:
                    errors.append(f"event {number}: {action.kind} (rule {action.rule}): {error}")
        return Replayed(await _state(storage.local_crm), tuple(errors))


async def _state(store: LocalCRMStore) -> CRMState:
    contacts = await store.contacts()
    identities = {contact.id: _identity(contact.identities) for contact in contacts}
    return CRMState(
        tuple(_contact(contact, identities[contact.id]) for contact in contacts),
        tuple(DealState(deal.key, deal.title, deal.stage, deal.amount,
                        None if deal.contact_id is None else identities.get(deal.contact_id),
                        dict(deal.fields))
              for deal in await store.deals()),
    )


def _contact(contact: LocalContact, identity: dict[str, JSON]) -> ContactState:
    return ContactState(identity, dict(contact.fields), contact.stage,
                        tuple(change.to_stage for change in contact.stage_history))


def _identity(keys: Sequence[IdentityKey]) -> dict[str, JSON]:
    """field -> value; a field holding several values (two emails) -> the list of them."""
    identity: dict[str, JSON] = {}
    for key in keys:
        have = identity.get(key.field)
        if have is None:
            identity[key.field] = key.value
        elif isinstance(have, list):
            have.append(key.value)
        else:
            identity[key.field] = [have, key.value]
    return identity
