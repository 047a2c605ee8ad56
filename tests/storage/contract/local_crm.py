"""The local CRM part of the storage contract: contacts, stages, deals, kept values."""

from __future__ import annotations

import asyncio

import pytest

from engine.actions import IdentityKey
from engine.errors import UnstorableValueError
from engine.storage import Storage, records
from tests.storage.contract.support import EMAIL, STAGES, TOKEN, event


class LocalCRMContract:
    """The embedded CRM behind the `local` target."""

    async def test_upsert_set_once_keeps_the_first_value(self, storage: Storage) -> None:
        created = await storage.local_crm.upsert_contact(
            [TOKEN], {"deep_link_prefix": "invite"},
            {"first_touch_campaign": "spring", "first_touch_platform": ""})
        assert created.created is True
        again = await storage.local_crm.upsert_contact(
            [TOKEN], {"deep_link_prefix": "promo", "company": None},
            {"first_touch_campaign": "summer", "first_touch_platform": "iOS"})
        assert (again.contact_id, again.created) == (created.contact_id, False)
        [contact] = await storage.local_crm.contacts()
        assert dict(contact.fields) == {
            "deep_link_prefix": "promo", "first_touch_campaign": "spring",
            "first_touch_platform": "iOS"}

    async def test_upsert_matches_by_priority_and_attaches_new_keys(
        self, storage: Storage
    ) -> None:
        stub = await storage.local_crm.upsert_contact([TOKEN], {}, {})
        enriched = await storage.local_crm.upsert_contact(
            [EMAIL, TOKEN], {"first_name": "Ada"}, {})
        assert enriched.contact_id == stub.contact_id
        by_email = await storage.local_crm.upsert_contact([EMAIL], {"last_name": "L"}, {})
        assert by_email.contact_id == stub.contact_id
        [contact] = await storage.local_crm.contacts()
        assert set(contact.identities) == {TOKEN, EMAIL}
        assert dict(contact.fields) == {"first_name": "Ada", "last_name": "L"}

    async def test_concurrent_upserts_of_one_identity_make_one_contact(
        self, storage: Storage
    ) -> None:
        results = await asyncio.gather(
            *(storage.local_crm.upsert_contact([TOKEN], {"n": n}, {}) for n in range(10)))
        assert sum(r.created for r in results) == 1
        assert len(await storage.local_crm.contacts()) == 1

    async def test_stages_only_move_forward_with_history(self, storage: Storage) -> None:
        lead = await storage.local_crm.set_stage([TOKEN], "lead", STAGES, event_id=None)
        assert (lead.from_stage, lead.to_stage, lead.changed) == (None, "lead", True)
        back = await storage.local_crm.set_stage([TOKEN], "subscriber", STAGES)
        assert (back.to_stage, back.changed) == ("lead", False)
        same = await storage.local_crm.set_stage([TOKEN], "lead", STAGES)
        assert same.changed is False
        event_id = (await storage.inbox.store(event(1))).id
        done = await storage.local_crm.set_stage([TOKEN], "customer", STAGES, event_id=event_id)
        assert (done.from_stage, done.to_stage, done.changed) == ("lead", "customer", True)
        [contact] = await storage.local_crm.contacts()
        assert contact.stage == "customer"
        assert [(h.from_stage, h.to_stage, h.event_id) for h in contact.stage_history] == [
            (None, "lead", None), ("lead", "customer", event_id)]
        with pytest.raises(ValueError, match="unknown stage"):
            await storage.local_crm.set_stage([TOKEN], "won", STAGES)

    async def test_one_deal_per_key_ever(self, storage: Storage) -> None:
        first = await storage.local_crm.create_deal(
            [TOKEN], "referral-tok_1", "Referral: tok_1", "new", 49.0, {"source": "referral"})
        assert first.created is True and first.contact_id is not None
        again = await storage.local_crm.create_deal(
            [TOKEN], "referral-tok_1", "Another title", "won", 99.0, {})
        assert (again.deal_id, again.created) == (first.deal_id, False)
        racing = await asyncio.gather(*(storage.local_crm.create_deal(
            [TOKEN], "referral-tok_2", "t", None, None, {}) for _ in range(8)))
        assert sum(r.created for r in racing) == 1
        deals = await storage.local_crm.deals()
        assert [(d.key, d.title, d.stage, d.amount) for d in deals] == [
            ("referral-tok_1", "Referral: tok_1", "new", 49.0),
            ("referral-tok_2", "t", None, None)]
        assert deals[0].contact_id == first.contact_id
        assert dict(deals[0].fields) == {"source": "referral"}

    async def test_contact_actions_need_an_identity(self, storage: Storage) -> None:
        with pytest.raises(ValueError):
            await storage.local_crm.upsert_contact([], {"a": 1}, {})
        with pytest.raises(ValueError, match="at least one identity key"):
            await storage.local_crm.set_stage([], "lead", STAGES)
        with pytest.raises(ValueError, match="a deal needs a non-empty key"):
            await storage.local_crm.create_deal([TOKEN], "", "t", None, None, {})
        assert await storage.local_crm.contacts() == [] and await storage.local_crm.deals() == []

    # -- values: kept exactly or refused, the same on every backend --------------------------

    async def test_data_is_kept_exactly_or_refused_the_same_way(self, storage: Storage) -> None:
        crm = storage.local_crm
        deep: object = "bottom"
        for _ in range(63):  # 64 levels with the fields object itself: the most allowed
            deep = [deep]
        kept = {"nul": "a\x00b", "big": 10 ** 400, "mb": "z" * 1024 * 1024, "emoji": "\U0001f600",
                "deep": deep, "tiny": 5e-324, "huge": 1.7e308}
        await crm.upsert_contact([TOKEN], kept, {})
        nested: object = 1
        for _ in range(100):
            nested = {"x": nested}
        refusals = [
            crm.upsert_contact([IdentityKey("email", "ada\x00@example.com")], {}, {}),
            crm.upsert_contact([IdentityKey("deep_link_token", "x\ud800")], {}, {}),
            crm.upsert_contact([IdentityKey("deep_link_token", "t" * 513)], {}, {}),
            crm.upsert_contact([EMAIL], {"n": float("inf")}, {}),
            crm.upsert_contact([EMAIL], {}, {"n": float("nan")}),
            crm.upsert_contact([EMAIL], {"s": ["ok", "\udfff"]}, {}),
            crm.upsert_contact([EMAIL], {"s": {"\ud800": 1}}, {}),
            crm.upsert_contact([EMAIL], {"s": nested}, {}),
            crm.set_stage([EMAIL], "lead\x00", STAGES),
            crm.create_deal([EMAIL], "d\x00", "t", None, None, {}),
            crm.create_deal([EMAIL], "d1", "title\x00", None, None, {}),
            crm.create_deal([EMAIL], "d1", "t", None, float("inf"), {}),
            crm.create_deal([EMAIL], "d1", "t", None, 10 ** 400, {}),
            crm.create_deal([EMAIL], "d1", "t", None, None, {"f": float("-inf")}),
        ]
        for refused in refusals:
            with pytest.raises(UnstorableValueError, match="no store can keep it as it is"):
                await refused
        [contact] = await crm.contacts()
        assert contact.identities == (TOKEN,) and dict(contact.fields) == kept
        assert await crm.deals() == []

    async def test_apply_all_applies_in_order_and_fails_only_the_bad_op(
        self, storage: Storage
    ) -> None:
        event_id = (await storage.inbox.store(event(1))).id
        results = await storage.local_crm.apply_all([
            records.UpsertContactOp([TOKEN], {"first_name": "Ada"}, {}),
            records.SetStageOp([TOKEN], "lead", STAGES, event_id),
            records.SetStageOp([TOKEN], "no-such-stage", STAGES, event_id),
            records.UpsertContactOp([IdentityKey("email", "x\ud800")], {}, {}),
            records.CreateDealOp([TOKEN, EMAIL], "deal-1", "First deal", "won", 12.5, {}),
            records.SetStageOp([EMAIL], "customer", STAGES, event_id),
        ])
        contact, stage, unknown, unstorable, deal, later = results
        assert isinstance(contact, records.ContactResult) and contact.created
        assert stage == records.StageResult(contact.contact_id, None, "lead", changed=True)
        assert isinstance(unknown, ValueError) and "no-such-stage" in str(unknown)
        assert isinstance(unstorable, UnstorableValueError)
        assert isinstance(deal, records.DealResult)
        assert deal == records.DealResult(deal.deal_id, contact.contact_id, created=True)
        # The deal attached the email to the contact, so the last op found it by email.
        assert later == records.StageResult(contact.contact_id, "lead", "customer", True)
        [kept] = await storage.local_crm.contacts()
        assert (kept.stage, dict(kept.fields)) == ("customer", {"first_name": "Ada"})
        assert [(c.from_stage, c.to_stage, c.event_id) for c in kept.stage_history] == [
            (None, "lead", event_id), ("lead", "customer", event_id)]
        # The same ops again change nothing: each is idempotent, as its own call is.
        again = await storage.local_crm.apply_all([
            records.UpsertContactOp([TOKEN], {"first_name": "Ada"}, {}),
            records.CreateDealOp([TOKEN], "deal-1", "First deal", "won", 12.5, {})])
        assert again == [records.ContactResult(contact.contact_id, created=False),
                         records.DealResult(deal.deal_id, contact.contact_id, created=False)]
        assert len(await storage.local_crm.deals()) == 1
        assert await storage.local_crm.apply_all([]) == []
