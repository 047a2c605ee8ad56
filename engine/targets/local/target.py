"""The `local` target: linkcrm's embedded CRM, the reference implementation of `Target`."""

from __future__ import annotations

from engine.actions import Action, CreateDeal, SetStage, UpsertContact
from engine.config.fieldmap import FieldMap
from engine.errors import (
    PermanentCRMError,
    RetryableCRMError,
    StorageError,
    UnstorableValueError,
)
from engine.storage import LocalCRMStore
from engine.targets.base import CallContext, Outcome


class LocalTarget:
    """Applies planned actions to the contacts, stage history and deals kept in the storage.

    Every operation is idempotent by construction, so a retry with the same key (or without
    one) converges on the same state: `upsert_contact` writes the same values again and
    `set_once` only fills empty fields, stages only move forward along the field map's order,
    and `create_deal` makes one deal per deal key, ever.

        target = LocalTarget(storage.local_crm, ruleset.field_map)
        outcome = await target.execute(action, CallContext(key, event_id=event.id))

    A stage change records the inbox event that moved the contact (`context.event_id`). A stage
    the field map does not know, or a value no store can keep (UnstorableValueError), is a
    PermanentCRMError (a fix is needed); a storage that cannot commit is a RetryableCRMError.
    """

    name = "local"

    def __init__(self, store: LocalCRMStore, field_map: FieldMap) -> None:
        self.store = store
        # Events at once without `--concurrency`: as many as the store serves well (SQLite's
        # writes share a group commit, PostgreSQL's each hold a pooled connection).
        self.concurrency = store.concurrency
        self.stages = tuple(stage.name for stage in field_map.contact_stages)

    async def execute(self, action: Action, context: CallContext) -> Outcome:
        try:
            return await self._apply(action, context)
        except UnstorableValueError as error:
            raise PermanentCRMError(f"local: {action.kind} failed: {error}") from None
        except StorageError as error:
            raise RetryableCRMError(f"local: {error}") from None
        except (ValueError, OverflowError) as error:
            raise PermanentCRMError(f"local: {action.kind} failed: {error}") from None

    async def _apply(self, action: Action, context: CallContext) -> Outcome:
        if isinstance(action, UpsertContact):
            contact = await self.store.upsert_contact(
                action.identity, action.set, action.set_once
            )
            verb = "created" if contact.created else "updated"
            return Outcome(str(contact.contact_id), f"contact {contact.contact_id} {verb}",
                           created=contact.created)
        if isinstance(action, SetStage):
            stage = await self.store.set_stage(
                action.identity, action.stage, self.stages, context.event_id
            )
            summary = (
                f"contact {stage.contact_id} moved {stage.from_stage or '(none)'} -> "
                f"{stage.to_stage}" if stage.changed
                else f"contact {stage.contact_id} stays {stage.to_stage} "
                     f"(stages only move forward)"
            )
            return Outcome(str(stage.contact_id), summary)
        if isinstance(action, CreateDeal):
            amount = None if action.amount is None else float(action.amount)
            deal = await self.store.create_deal(
                action.identity, action.key, action.title, action.stage or None, amount,
                action.set,
            )
            verb = "created" if deal.created else "already exists (one deal per key)"
            return Outcome(str(deal.deal_id), f"deal {deal.deal_id} {verb}", created=deal.created)
        raise PermanentCRMError(f"local: {action.kind} is not supported")

    async def aclose(self) -> None:
        """Nothing to release: the storage belongs to the caller."""
