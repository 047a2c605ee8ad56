"""A batch of Pipedrive actions: each person found (or made) once, and written once.

Pipedrive has no batch endpoints, so a batch saves what it can per person: the actions of one
batch that touch a person read it once (the first finds it through the identity map, search or a
create; the others see it as the batch left it) and their changes go out in one PATCH after the
last of them. Every request costs `x-token-cost` tokens from the company's daily budget (a read
1, a write 5): an event's stage after its upsert, and a person's later events, cost nothing more
than the fields they change.

    pending = PendingPeople()
    person = pending.person(keys)            # as this batch left it, or None: find it
    pending.known(keys, person)              # found or created: later actions see it
    pending.change(person, patch, index)     # written by send(), once per person
    failed = await pending.send(api)         # index -> the error of a PATCH that failed
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.actions import IdentityKey
from engine.errors import CRMError
from engine.targets.pipedrive.api import PipedriveAPI, Record


@dataclass
class PendingPeople:
    """The persons one batch has read, by id; the changes it has to write; `index` is the
    item the next change belongs to (its outcome waits for the write)."""

    people: dict[str, Record] = field(default_factory=dict)
    ids: dict[IdentityKey, str] = field(default_factory=dict)
    patches: dict[str, Record] = field(default_factory=dict)
    waiting: dict[str, list[int]] = field(default_factory=dict)
    index: int = 0

    def person(self, keys: Iterable[IdentityKey]) -> Record | None:
        return next((self.people[self.ids[k]] for k in keys if k in self.ids), None)

    def known(self, keys: Iterable[IdentityKey], person: Record) -> Record:
        """The person as this batch knows it (an earlier action may have changed it since
        Pipedrive answered), remembered under `keys`."""
        person_id = str(person["id"])
        kept = self.people.setdefault(person_id, person)
        self.ids.update(dict.fromkeys(keys, person_id))
        return kept

    def change(self, person: Record, patch: Record) -> None:
        """Apply `patch` to the person as the batch sees it and keep it for `send`."""
        person_id = str(person["id"])
        merged = self.patches.setdefault(person_id, {})
        custom = patch.get("custom_fields") or {}
        if custom:
            person["custom_fields"] = {**(person.get("custom_fields") or {}), **custom}
            merged["custom_fields"] = {**merged.get("custom_fields", {}), **custom}
        for name in ("name", "emails"):
            if name in patch:
                person[name] = merged[name] = patch[name]
        self.waiting.setdefault(person_id, []).append(self.index)

    async def send(self, api: PipedriveAPI) -> dict[int, Exception]:
        """One PATCH per changed person; the items whose change a failed PATCH carried."""
        failed: dict[int, Exception] = {}
        for person_id, patch in self.patches.items():
            try:
                await api.patch(f"/persons/{person_id}", patch)
            except CRMError as error:
                failed.update(dict.fromkeys(self.waiting[person_id], error))
        self.patches.clear()
        return failed
