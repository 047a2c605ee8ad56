"""The `local` target: linkcrm's embedded CRM, the reference implementation of `Target`."""

from __future__ import annotations

from collections.abc import Sequence

from engine.actions import Action, CreateDeal, SetStage, UpsertContact
from engine.config.fieldmap import FieldMap
from engine.errors import (
    PermanentCRMError,
    RetryableCRMError,
    StorageError,
    UnstorableValueError,
)
from engine.storage import LocalCRMStore, records
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
        # A claim's events may share one `execute_all` (SQLite: one writer job for them all).
        self.claims_at_once = store.one_write
        self.stages = tuple(stage.name for stage in field_map.contact_stages)

    async def execute(self, action: Action, context: CallContext) -> Outcome:
        (result,) = await self.execute_all([(action, context)])
        if isinstance(result, Exception):
            raise result
        return result

    async def execute_all(self, items: Sequence[tuple[Action, CallContext]]
                          ) -> list[Outcome | Exception]:
        """All of an event's actions in one write of the store (`LocalCRMStore.apply_all`)."""
        ops: list[records.LocalOp | Exception] = []
        for action, context in items:
            try:
                ops.append(self._op(action, context))
            except PermanentCRMError as error:
                ops.append(error)
            except (ValueError, OverflowError) as error:
                ops.append(_refused(action, error))
        try:
            done = iter(await self.store.apply_all(
                [op for op in ops if not isinstance(op, Exception)]))
        except UnstorableValueError as error:
            raise PermanentCRMError(f"local: {error}") from None
        except StorageError as error:
            raise RetryableCRMError(f"local: {error}") from None
        results: list[Outcome | Exception] = []
        for (action, _), op in zip(items, ops, strict=True):
            result = op if isinstance(op, Exception) else next(done)
            if isinstance(result, PermanentCRMError):
                results.append(result)
            elif isinstance(result, Exception):
                results.append(_refused(action, result))
            else:
                results.append(self._outcome(result))
        return results

    def _op(self, action: Action, context: CallContext) -> records.LocalOp:
        if isinstance(action, UpsertContact):
            return records.UpsertContactOp(action.identity, action.set, action.set_once)
        if isinstance(action, SetStage):
            return records.SetStageOp(action.identity, action.stage, self.stages,
                                      context.event_id)
        if isinstance(action, CreateDeal):
            amount = None if action.amount is None else float(action.amount)
            return records.CreateDealOp(action.identity, action.key, action.title,
                                        action.stage or None, amount, action.set)
        raise PermanentCRMError(f"local: {action.kind} is not supported")

    @staticmethod
    def _outcome(result: records.LocalResult) -> Outcome:
        if isinstance(result, records.ContactResult):
            verb = "created" if result.created else "updated"
            return Outcome(str(result.contact_id), f"contact {result.contact_id} {verb}",
                           created=result.created)
        if isinstance(result, records.StageResult):
            summary = (
                f"contact {result.contact_id} moved {result.from_stage or '(none)'} -> "
                f"{result.to_stage}" if result.changed
                else f"contact {result.contact_id} stays {result.to_stage} "
                     f"(stages only move forward)"
            )
            return Outcome(str(result.contact_id), summary)
        verb = "created" if result.created else "already exists (one deal per key)"
        return Outcome(str(result.deal_id), f"deal {result.deal_id} {verb}",
                       created=result.created)

    async def aclose(self) -> None:
        """Nothing to release: the storage belongs to the caller."""


def _refused(action: Action, error: Exception) -> PermanentCRMError:
    """A value the store cannot keep, or one the field map does not allow (a stage it does
    not know): a fix is needed, retrying cannot help."""
    return PermanentCRMError(f"local: {action.kind} failed: {error}")
