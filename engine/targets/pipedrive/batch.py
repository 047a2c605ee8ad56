"""A batch of Pipedrive actions: each person found (or made) once, and written once.

Pipedrive has no batch endpoints, so a batch saves what it can per person: the actions of one
batch that touch a person read it once (the first finds it through the identity map or search;
the others see it as the batch left it) and their changes go out in one write after the last of
them: a PATCH for a person Pipedrive has, the create itself for one it has not (a new person's
later fields, stage and email ride in its POST). Every request costs `x-token-cost` tokens from
the company's daily budget (a search 20, a write 5): a new person costs its search and its
create, whatever the batch does to it, and a person's later events cost nothing more than the
fields they change.

    pending = PendingPeople()
    person = pending.person(keys)            # as this batch left it, or None: find it
    pending.known(keys, person)              # found: later actions see it
    person = pending.create(keys, body, commit)   # not found: made by send(), id unknown yet
    pending.change(person, patch)            # written by send(), once per person
    outcome = pending.said(person_id, make)  # the outcome of the item `index`, real id at send
    replaced = await pending.create_done(done)    # the creates no later action is on, now
    replaced |= await pending.send(api)      # the rest; index -> its final outcome, or the error

A person to create gets a placeholder id (`new:person:<n>`) until it is posted; an outcome that
names it is settled then with the real id (or the create's error). A deal for such a person
waits too (`deal`): it is created right after its person, with the person's real id.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from engine.actions import IdentityKey
from engine.errors import CRMError
from engine.targets.base import Outcome
from engine.targets.pipedrive.api import PipedriveAPI, Record

PLACEHOLDER = "new:"
Commit = Callable[[Record], Awaitable[str]]  # the record to create -> its id, as bound
MakeOutcome = Callable[[str], Outcome]  # the real id -> the outcome that names it


def placeholder(record_id: str) -> bool:
    """An id `send` has still to make real."""
    return record_id.startswith(PLACEHOLDER)


@dataclass
class _Create:
    """A record found nowhere: `commit` creates it from `record` (as the batch left it, less
    its placeholder id) and binds it; `after` names the create that must go first (a deal's
    person), whose real id `body_id` puts into the record."""

    record: Record
    commit: Commit
    keys: frozenset[IdentityKey] = frozenset()
    after: str | None = None
    body_id: str | None = None


@dataclass
class PendingPeople:
    """The persons one batch has read, by id; the changes and creates it has to write; `index`
    is the item the next change belongs to (its outcome waits for the write)."""

    people: dict[str, Record] = field(default_factory=dict)
    ids: dict[IdentityKey, str] = field(default_factory=dict)
    patches: dict[str, Record] = field(default_factory=dict)
    waiting: dict[str, list[int]] = field(default_factory=dict)
    creates: dict[str, _Create] = field(default_factory=dict)
    deals: dict[str, str] = field(default_factory=dict)  # deal key -> its placeholder
    outcomes: dict[str, list[tuple[int, MakeOutcome]]] = field(default_factory=dict)
    made: dict[str, str | CRMError] = field(default_factory=dict)  # placeholder -> id, error
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

    def create(self, keys: Iterable[IdentityKey], body: Record, commit: Commit) -> Record:
        """A person to create at `send`: its record as later actions see and change it."""
        keys = frozenset(keys)
        person_id = f"{PLACEHOLDER}person:{len(self.made) + len(self.creates)}"
        person = {**body, "id": person_id}
        self.creates[person_id] = _Create(person, commit, keys)
        return self.known(keys, person)

    def deal(self, deal_key: str, person_id: str, body: Record, commit: Commit) -> str:
        """A deal to create at `send`, after its person (`person_id`, a placeholder)."""
        deal_id = f"{PLACEHOLDER}deal:{len(self.made) + len(self.creates)}"
        self.creates[deal_id] = _Create(body, commit, after=person_id, body_id="person_id")
        self.deals[deal_key] = deal_id
        return deal_id

    def change(self, person: Record, patch: Record) -> None:
        """Apply `patch` to the person as the batch sees it and keep it for `send` (a person
        still to create takes it into its create)."""
        person_id = str(person["id"])
        custom = patch.get("custom_fields") or {}
        if custom:
            person["custom_fields"] = {**(person.get("custom_fields") or {}), **custom}
        for name in ("name", "emails"):
            if name in patch:
                person[name] = patch[name]
        if placeholder(person_id):
            return
        merged = self.patches.setdefault(person_id, {})
        if custom:
            merged["custom_fields"] = {**merged.get("custom_fields", {}), **custom}
        for name in ("name", "emails"):
            if name in patch:
                merged[name] = patch[name]
        self.waiting.setdefault(person_id, []).append(self.index)

    def said(self, record_id: str, make: MakeOutcome) -> Outcome:
        """The outcome `make(record_id)`, settled by `send` with the real id when `record_id`
        is still a placeholder (and failed with its create's error). Raises that error when
        the create has failed already."""
        if not placeholder(record_id):
            return make(record_id)
        made = self.made.get(record_id)
        if isinstance(made, CRMError):
            raise made
        if made is not None:
            return make(made)
        self.outcomes.setdefault(record_id, []).append((self.index, make))
        return make(record_id)

    async def create_done(self, done: Callable[[frozenset[IdentityKey]], bool]
                          ) -> dict[int, Outcome | Exception]:
        """Create now each new person whose keys no later action of the batch uses (`done`),
        and its deal: a create sent while the next searches wait for their limit costs no
        time. The items whose outcome that settles, as `send`."""
        ready = {record_id for record_id, create in self.creates.items()
                 if create.after is None and done(create.keys)}
        return await self._create(lambda record_id, create: record_id in ready
                                  or create.after in ready)

    async def send(self, api: PipedriveAPI) -> dict[int, Outcome | Exception]:
        """Every create left (a deal after its person), then one PATCH per changed person; the
        items whose outcome that settles: the real one, or the error of the write that failed."""
        replaced = await self._create(lambda record_id, create: True)
        for person_id, patch in self.patches.items():
            try:
                await api.patch(f"/persons/{person_id}", patch)
            except CRMError as error:
                replaced.update(dict.fromkeys(self.waiting[person_id], error))
        self.patches.clear()
        return replaced

    async def _create(self, chosen: Callable[[str, _Create], bool]
                      ) -> dict[int, Outcome | Exception]:
        replaced: dict[int, Outcome | Exception] = {}
        for record_id, create in [(i, c) for i, c in self.creates.items() if chosen(i, c)]:
            del self.creates[record_id]
            self._forget(record_id)
            first = self.made.get(create.after) if create.after is not None else None
            try:
                if isinstance(first, CRMError):
                    raise first
                if first is not None and create.body_id is not None:
                    create.record[create.body_id] = int(first)
                record = {k: v for k, v in create.record.items() if k != "id"}
                self.made[record_id] = real = await create.commit(record)
            except CRMError as error:
                self.made[record_id] = error
                replaced.update((i, error) for i, _ in self.outcomes.pop(record_id, []))
                continue
            replaced.update((i, make(real)) for i, make in self.outcomes.pop(record_id, []))
        return replaced

    def _forget(self, record_id: str) -> None:
        """A created person is the identity map's now: a later action finds it there."""
        self.people.pop(record_id, None)
        self.ids = {key: known for key, known in self.ids.items() if known != record_id}
