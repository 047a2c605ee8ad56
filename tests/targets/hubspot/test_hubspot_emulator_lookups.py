"""The HubSpot emulator finds a record by a property through an index: it must find what a scan
of its records finds (the first holder, in creation order) however values change."""

from __future__ import annotations

import random

from tests.emulators.hubspot_state import HubSpotState, ObjectType, RollingLimit


def scan(object_type: ObjectType, name: str, value: str) -> str | None:
    found = next((r for r in object_type.records.values() if r.properties.get(name) == value),
                 None)
    return None if found is None else found.id


def test_lookups_follow_creates_changes_and_clears() -> None:
    state = HubSpotState("token", RollingLimit(1000, 10.0), RollingLimit(1000, 1.0))
    contacts = state.contacts
    rng = random.Random(7)
    values = ["", "a", "b", "c"]
    records = []
    for step in range(400):
        if not records or rng.random() < 0.3:
            records.append(state.create(contacts, {"company": rng.choice(values[1:])}))
        else:  # shared values, changed and cleared; the index is built midway
            state.update(contacts, rng.choice(records), {"company": rng.choice(values)})
        if step == 50:
            contacts.find("company", "a")
        for value in values[1:]:
            found = contacts.find("company", value)
            assert (None if found is None else found.id) == scan(contacts, "company", value)
    assert contacts.find("company", "") is None
