"""The identity map part of the storage contract: identities, deal keys, rebind."""

from __future__ import annotations

import asyncio

import pytest

from engine.actions import IdentityKey
from engine.errors import UnstorableValueError
from engine.storage import Storage
from tests.storage.contract.support import EMAIL, TOKEN


class IdentityMapContract:
    """Which CRM record a person or deal is: the first bind wins; a rebind replaces it."""

    async def test_identity_map_first_binding_wins_and_priority_order(
        self, storage: Storage
    ) -> None:
        assert await storage.identities.lookup_identity("hubspot", [EMAIL, TOKEN]) is None
        assert await storage.identities.bind_identity("hubspot", TOKEN, "101") == "101"
        assert await storage.identities.bind_identity("hubspot", TOKEN, "202") == "101"
        assert await storage.identities.bind_identity("hubspot", EMAIL, "303") == "303"
        assert await storage.identities.lookup_identity("hubspot", [EMAIL, TOKEN]) == "303"
        assert await storage.identities.lookup_identity("hubspot", [TOKEN, EMAIL]) == "101"
        assert await storage.identities.lookup_identity("salesforce", [TOKEN]) is None
        await storage.identities.unbind_identity("hubspot", TOKEN)
        assert await storage.identities.lookup_identity("hubspot", [TOKEN]) is None

    async def test_concurrent_binds_agree_on_one_record(self, storage: Storage) -> None:
        winners = await asyncio.gather(
            *(storage.identities.bind_identity("pipedrive", TOKEN, str(n)) for n in range(10)))
        assert len(set(winners)) == 1
        assert await storage.identities.lookup_identity("pipedrive", [TOKEN]) == winners[0]

    async def test_rebind_replaces_a_mapping_and_later_binds_read_it(
        self, storage: Storage
    ) -> None:
        identities = storage.identities
        await identities.rebind_identity("hubspot", TOKEN, "101")  # unmapped: it maps it
        assert await identities.lookup_identity("hubspot", [TOKEN]) == "101"
        await identities.rebind_identity("hubspot", TOKEN, "202")  # the CRM says: now 202
        assert await identities.lookup_identity("hubspot", [TOKEN]) == "202"
        assert await identities.bind_identity("hubspot", TOKEN, "303") == "202"
        await identities.rebind_identity("hubspot", TOKEN, "202")  # the same again: no change
        assert await identities.lookup_identity("hubspot", [TOKEN]) == "202"
        assert await identities.lookup_identity("salesforce", [TOKEN]) is None

    async def test_a_key_being_rebound_is_never_seen_unmapped(self, storage: Storage) -> None:
        """One write, not an unbind and a bind: a worker reading the key while another
        rebinds it finds the old record or the new one, never none (which would make it
        create the person again)."""
        identities = storage.identities
        await identities.bind_identity("salesforce", EMAIL, "old")

        async def read() -> list[str | None]:
            return [await identities.lookup_identity("salesforce", [EMAIL]) for _ in range(40)]

        async def rebind() -> None:
            for n in range(40):
                await identities.rebind_identity("salesforce", EMAIL, f"lead-{n}")

        seen, _ = await asyncio.gather(read(), rebind())
        assert None not in seen
        assert await identities.lookup_identity("salesforce", [EMAIL]) == "lead-39"

    async def test_an_unbind_naming_the_record_keeps_a_newer_mapping(
        self, storage: Storage
    ) -> None:
        identities = storage.identities
        await identities.bind_identity("pipedrive", TOKEN, "7")
        await identities.unbind_identity("pipedrive", TOKEN, "6")  # not what it names now
        assert await identities.lookup_identity("pipedrive", [TOKEN]) == "7"
        await identities.unbind_identity("pipedrive", TOKEN, "7")
        assert await identities.lookup_identity("pipedrive", [TOKEN]) is None
        await identities.unbind_identity("pipedrive", TOKEN, "7")  # already gone: nothing
        assert await identities.lookup_identity("pipedrive", [TOKEN]) is None

    async def test_deal_keys_first_binding_wins(self, storage: Storage) -> None:
        assert await storage.identities.lookup_deal("hubspot", "referral-tok_1") is None
        assert await storage.identities.bind_deal("hubspot", "referral-tok_1", "d1") == "d1"
        assert await storage.identities.bind_deal("hubspot", "referral-tok_1", "d2") == "d1"
        assert await storage.identities.lookup_deal("hubspot", "referral-tok_1") == "d1"
        assert await storage.identities.lookup_deal("pipedrive", "referral-tok_1") is None

    async def test_many_binds_in_one_write_keep_the_first_and_answer_each_winner(
        self, storage: Storage
    ) -> None:
        identities = storage.identities
        await identities.bind_identity("salesforce", TOKEN, "101")
        other = IdentityKey("deep_link_token", "tok_other \u00e9\U0001f600")
        winners = await identities.bind_identities("salesforce", [
            (TOKEN, "202"), (EMAIL, "303"), (EMAIL, "404"), (other, "505")])
        assert winners == ["101", "303", "303", "505"]  # mapped already; first of two; new
        assert await identities.lookup_identity("salesforce", [EMAIL]) == "303"
        assert await identities.lookup_identity("salesforce", [other]) == "505"
        assert await identities.lookup_identity("hubspot", [EMAIL]) is None
        assert await identities.bind_identities("salesforce", []) == []
        fresh = IdentityKey("email", "fresh@example.com")
        with pytest.raises(UnstorableValueError, match="NUL"):  # checked before any write
            await identities.bind_identities("salesforce", [
                (fresh, "606"), (IdentityKey("email", "ada\x00"), "707")])
        assert await identities.lookup_identity("salesforce", [fresh]) is None

    async def test_many_deal_binds_in_one_write_keep_the_first(self, storage: Storage) -> None:
        identities = storage.identities
        assert await identities.bind_deal("salesforce", "referral-a", "d1") == "d1"
        assert await identities.bind_deals("salesforce", [
            ("referral-a", "d2"), ("referral-b", "d3"), ("referral-b", "d4")]) == \
            ["d1", "d3", "d3"]
        assert await identities.lookup_deal("salesforce", "referral-b") == "d3"
        assert await identities.bind_deals("salesforce", []) == []
        with pytest.raises(UnstorableValueError):
            await identities.bind_deals("salesforce", [("referral-c", "d5"), ("k\x00", "d6")])
        assert await identities.lookup_deal("salesforce", "referral-c") is None

    async def test_keys_and_ids_are_kept_exactly_or_refused_the_same_way(
        self, storage: Storage
    ) -> None:
        identities = storage.identities
        refusals = [
            identities.bind_identity("hubspot", IdentityKey("email", "a\x00b"), "101"),
            identities.bind_identity("hubspot", EMAIL, "10\x001"),
            identities.rebind_identity("hubspot", EMAIL, "10\x001"),
            identities.rebind_identity("hubspot", IdentityKey("email", "a\ud800"), "101"),
            identities.unbind_identity("hubspot", EMAIL, "k" * 600),
            identities.lookup_identity("hubspot", [IdentityKey("deep_link_token", "\ud800")]),
            identities.bind_deal("hubspot", "k" * 600, "201"),
            identities.lookup_deal("hubspot", "k\x00"),
        ]
        for refused in refusals:
            with pytest.raises(UnstorableValueError, match="no store can keep it as it is"):
                await refused
        assert await identities.lookup_identity("hubspot", [EMAIL]) is None
        with pytest.raises(UnstorableValueError) as raised:
            await identities.bind_identity("hubspot", IdentityKey("email", "ada\x00"), "101")
        assert str(raised.value) == (
            "identity email holds a NUL character (\\x00) at character 4, which a key cannot "
            "hold: no store can keep it as it is; fix the value at its source, or map another "
            "field")
