"""Contact writes for HubSpot: batched reads, batch upserts by a unique property, conflict recovery.

For each chunk of up to 100 contact groups sharing a custom unique `idProperty` (the deep-link
token): one batch read (only when `set_once`, a stage or an attached identity needs HubSpot's
current values), then one batch upsert of the groups that have something to write. Every input
writes its id property too, so each result names its input even when HubSpot echoes only the
properties written; an existing contact's result is also recognised by its record id.

Contacts located by `email` are never batch-upserted (HubSpot refuses partial upserts by email):
they are batch-read by email, then updated by record id or created one by one.

A rejected batch (400, or 409 "Contact already exists") is split so only the culprit fails. A
unique value already held by another contact (409, or 400 VALIDATION_ERROR "already has that
value": HubSpot answers either) means that contact is the person: it is found (by the id a 409
names, else by reading the unique value) and updated instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from engine.actions import IdentityKey
from engine.errors import CRMError, PermanentCRMError, RetryableCRMError
from engine.targets.base import IdentityStore, Outcome
from engine.targets.hubspot.api import (
    CRM,
    HubSpotAPI,
    HubSpotObject,
    as_list,
    as_object,
    error_for,
    existing_id,
    hubspot_message,
    parse_object,
    record_path,
    unique_conflict,
)
from engine.targets.hubspot.plan import ContactGroup, Locator

BATCH = 100  # inputs per batch call: the batch size HubSpot gives for CRM objects
CONTACTS = "/crm/v3/objects/contacts"

Results = dict[int, Outcome | Exception]


@dataclass
class _Read:
    found: bool  # the contact exists
    known: bool  # its values were read
    current: HubSpotObject | None = None


@dataclass
class _Run:
    """What one `run` learns; per call, so concurrent calls never share it."""

    results: Results = field(default_factory=dict)
    ids: dict[Locator, str] = field(default_factory=dict)
    failures: dict[Locator, Exception] = field(default_factory=dict)

    def fail(self, group: ContactGroup, error: Exception) -> None:
        self.failures[group.locator] = error
        for change in group.changes:
            self.results[change.index] = error


class ContactWriter:
    """`unique` names the contact properties HubSpot keeps unique (email, the token, ...): the
    ones whose taken value can point at the contact that already holds it."""

    def __init__(self, api: HubSpotAPI, identities: IdentityStore,
                 unique: Iterable[str] = ("email",)) -> None:
        self.api = api
        self.identities = identities
        self.unique = frozenset(unique)

    async def run(self, groups: Sequence[ContactGroup]
                  ) -> tuple[Results, dict[Locator, str], dict[Locator, Exception]]:
        """Apply every group. Returns each action's outcome or error by item index, the
        HubSpot id of each contact written or found, and the error of each that failed."""
        run = _Run()
        by_property: dict[str, list[ContactGroup]] = {}
        by_email: list[ContactGroup] = []
        for group in groups:
            if group.locator.unique and group.locator.property == "email":
                by_email.append(group)
            elif group.locator.unique:
                by_property.setdefault(group.locator.property, []).append(group)
            else:
                try:
                    await self.by_record_id(group, run)
                except CRMError as error:
                    run.fail(group, error)
        for start in range(0, len(by_email), BATCH):
            await self._by_email(by_email[start:start + BATCH], run)
        for prop, members in by_property.items():
            for start in range(0, len(members), BATCH):
                chunk = members[start:start + BATCH]
                try:
                    reads = await self.read(prop, [g for g in chunk if g.needs_read()])
                    await self._write(prop, chunk, reads, run)
                except CRMError as error:
                    for group in chunk:
                        if group.locator not in run.ids and group.locator not in run.failures:
                            run.fail(group, error)
        return run.results, run.ids, run.failures

    async def read(self, prop: str, groups: Sequence[ContactGroup]) -> dict[Locator, _Read]:
        """One batch read by `idProperty` for the groups that need HubSpot's values."""
        if not groups:
            return {}
        names = sorted({name for group in groups for name in group.read_properties()})
        found = await self.batch_read([g.locator.value for g in groups], names, prop)
        return {g.locator: _Read(_key(prop, g.locator.value) in found, True,
                                 found.get(_key(prop, g.locator.value))) for g in groups}

    async def batch_read(self, values: Sequence[str], properties: Sequence[str],
                         id_property: str | None) -> dict[str, HubSpotObject]:
        """Objects found, keyed by the (normalised) `id_property` value or by record id. A
        missing one is simply absent (HubSpot answers 207 with OBJECT_NOT_FOUND)."""
        body: dict[str, object] = {"inputs": [{"id": v} for v in values],
                                   "properties": list(properties), "propertiesWithHistory": []}
        if id_property:
            body["idProperty"] = id_property
        response = await self.api.call("POST", CONTACTS + "/batch/read", json=body,
                                       expect=(200, 207))
        data = as_object(response.json())
        for error in as_list(data.get("errors")):
            if as_object(error).get("category") != "OBJECT_NOT_FOUND":
                raise PermanentCRMError(f"{CRM}: batch read -> {response.status_code}: "
                                        f"{hubspot_message(error)}")
        found: dict[str, HubSpotObject] = {}
        for raw in as_list(data.get("results")):
            record = parse_object(raw)
            value = (record.properties.get(id_property) if id_property else record.id
                     ) if record else None
            if record is not None and value is not None:
                found[_key(id_property or "", value)] = record
        return found

    async def _by_email(self, chunk: list[ContactGroup], run: _Run) -> None:
        """Contacts located by email: one batch read by email, then each found contact is
        updated by its record id and each missing one created (never a batch upsert by email,
        which HubSpot refuses as a partial upsert)."""
        try:
            reads = await self.read("email", chunk)
        except CRMError as error:
            for group in chunk:
                run.fail(group, error)
            return
        for group in chunk:
            current = reads[group.locator].current
            try:
                if current is not None:
                    await self.update_existing(group, current.id, run, locator_taken=False,
                                               current=current)
                else:
                    await self.create(group, run)
            except CRMError as error:
                run.fail(group, error)

    async def _write(self, prop: str, chunk: list[ContactGroup], reads: dict[Locator, _Read],
                     run: _Run) -> None:
        inputs: list[dict[str, object]] = []
        pending: dict[str, tuple[ContactGroup, list[str]]] = {}
        by_id: dict[str, str] = {}  # record id of a contact read -> its pending key
        for group in chunk:
            read = reads.get(group.locator, _Read(found=False, known=False))
            planned = group.plan(read.current.properties if read.current else None,
                                 known=read.known)
            if read.current is not None and not planned.properties:
                await self._finish(group, read.current.id, planned.summaries, False, run)
                continue
            key = _key(prop, group.locator.value)
            # The id property is written in every input (the value it already holds), so the
            # result names its input even when HubSpot echoes only the properties written.
            inputs.append({"id": group.locator.value, "idProperty": prop, "properties": {
                **planned.properties, prop: group.locator.value}})
            pending[key] = (group, planned.summaries)
            if read.current is not None:
                by_id[read.current.id] = key
        if not inputs:
            return
        response = await self.api.call("POST", CONTACTS + "/batch/upsert",
                                       json={"inputs": inputs}, expect=(200, 207, 400, 409))
        body = response.json()
        if response.status_code in (400, 409):
            await self._rejected(prop, [group for group, _ in pending.values()], reads,
                                 response.status_code, body, run)
            return
        data = as_object(body)
        records = [r for r in map(parse_object, as_list(data.get("results"))) if r is not None]
        errors = as_list(data.get("errors"))
        for record in records:
            value = record.properties.get(prop)
            match = _key(prop, value) if value else by_id.get(record.id)
            if match is None and len(pending) == 1 and len(records) == 1 and not errors:
                match = next(iter(pending))  # one input, one result: it is that input's
            entry = pending.pop(match, None) if match is not None else None
            if entry is not None:
                await self._finish(entry[0], record.id, entry[1], record.new, run)
        _fail_unanswered(prop, pending, errors, run)

    async def _rejected(self, prop: str, groups: list[ContactGroup],
                        reads: dict[Locator, _Read], status: int, body: object,
                        run: _Run) -> None:
        if len(groups) > 1:
            # One bad input fails the whole batch: retry each alone so only it fails.
            for group in groups:
                try:
                    await self._write(prop, [group], reads, run)
                except CRMError as error:
                    run.fail(group, error)
            return
        group = groups[0]
        read = reads.get(group.locator, _Read(found=False, known=False))
        found = None
        if unique_conflict(status, body):
            # Another contact holds a unique value this one writes: that contact is this person.
            planned = group.plan(read.current.properties if read.current else None,
                                 known=read.known)
            found = existing_id(body) or await self._holder(group, planned.properties, skip=prop)
        if found is None:
            run.fail(group, PermanentCRMError(
                f"{CRM}: POST {CONTACTS}/batch/upsert -> {status}: {hubspot_message(body)}"))
            return
        await self.update_existing(group, found, run, locator_taken=read.found)

    async def update_existing(self, group: ContactGroup, record_id: str, run: _Run, *,
                              locator_taken: bool, current: HubSpotObject | None = None) -> None:
        """Update the contact HubSpot names (a conflict's holder, the identity map's, search's,
        a read by email's) instead of creating one: read it first (unless `current` is that
        read), for set_once and the stage."""
        if current is None:
            found = await self.batch_read([record_id], group.read_properties(), None)
            current = found.get(record_id)
        if current is None:
            # Deleted or merged away since it was named: forget it and find again on retry.
            for key in group.keys:
                await self.identities.unbind_identity(CRM, key)
            raise RetryableCRMError(f"{CRM}: contact {record_id} was not found")
        planned = group.plan(current.properties, known=True)
        properties = dict(planned.properties)
        prop, value = group.locator.property, group.locator.value
        if locator_taken:
            properties.pop(prop, None)
        elif group.locator.unique and not current.properties.get(prop):
            properties[prop] = value  # attach the key this contact was looked for by
        while properties:
            response = await self.api.call("PATCH", record_path(CONTACTS, record_id),
                                           json={"properties": properties},
                                           expect=(200, 400, 409))
            status = response.status_code
            if status == 200:
                break
            if not unique_conflict(status, response.json()):
                raise error_for(response)
            if not group.locator.unique or properties.pop(prop, None) is None:
                run.fail(group, PermanentCRMError(
                    f"{CRM}: PATCH {CONTACTS}/{record_id} -> {status}: "
                    f"{hubspot_message(response.json())}; two HubSpot contacts hold this "
                    "person's identities: merge them in HubSpot, then replay"))
                return
            # The locator's value is held by another contact and is unique: it cannot move.
            locator_taken = True
        keys = [k for k in group.keys if not (locator_taken and k == group.primary)]
        await self._finish(group, record_id, planned.summaries, False, run, keys)

    async def by_record_id(self, group: ContactGroup, run: _Run) -> None:
        """A contact found by a property HubSpot does not keep unique: the identity map, else
        search, else create. The map is what keeps two events from creating two contacts
        (search lags writes); a 409 on create means the email exists: update that contact."""
        record_id = await self.identities.lookup_identity(CRM, group.keys)
        if record_id is None:
            record_id = await self._search(group)
        if record_id is not None:
            await self.update_existing(group, record_id, run, locator_taken=False)
            return
        await self.create(group, run)

    async def create(self, group: ContactGroup, run: _Run) -> None:
        """Create the group's contact; when a unique value it writes is taken (409, or 400
        "already has that value"), the contact holding it is this person: update that one."""
        planned = group.plan(None, known=True)
        created = await self.api.create(CONTACTS, {"properties": planned.properties,
                                                   "associations": []})
        if created.taken:
            found = created.holder or await self._holder(group, planned.properties)
            if found is None:
                raise created.refused(CONTACTS)
            await self.update_existing(group, found, run, locator_taken=False)
            return
        if created.record is None:
            raise RetryableCRMError(f"{CRM}: POST {CONTACTS} answered {created.status} "
                                    "without an id")
        await self._finish(group, created.record.id, planned.summaries, True, run)

    async def _holder(self, group: ContactGroup, properties: Mapping[str, str],
                      skip: str | None = None) -> str | None:
        """The contact that holds one of the unique values in `properties` (other than
        `skip`, the upsert's own id property), read by that value; None if none does."""
        for name in sorted(n for n in properties if n in self.unique and n != skip):
            value = properties[name]
            found = await self.batch_read([value], group.read_properties(), name)
            holder = found.get(_key(name, value))
            if holder is not None:
                return holder.id
        return None

    async def _search(self, group: ContactGroup) -> str | None:
        response = await self.api.call("POST", CONTACTS + "/search", search=True, json={
            "filterGroups": [{"filters": [{"propertyName": group.locator.property,
                                           "operator": "EQ", "value": group.locator.value}]}],
            "properties": [group.locator.property], "sorts": [], "limit": 10})
        found = [parse_object(raw) for raw in as_list(as_object(response.json()).get("results"))]
        # Oldest first: the contact earlier events made, if search already indexed two.
        ids = sorted((r.id for r in found if r is not None), key=lambda v: (len(v), v))
        return ids[0] if ids else None

    async def _finish(self, group: ContactGroup, record_id: str, summaries: list[str],
                      created: bool, run: _Run, keys: list[IdentityKey] | None = None) -> None:
        run.ids[group.locator] = record_id
        for key in group.keys if keys is None else keys:
            winner = await self.identities.bind_identity(CRM, key, record_id)
            if winner != record_id and key == group.primary and group.locator.unique:
                # HubSpot's unique property is the truth: the map held a merged-away record.
                await self.identities.rebind_identity(CRM, key, record_id)
        for position, (change, summary) in enumerate(zip(group.changes, summaries,
                                                         strict=True)):
            run.results[change.index] = Outcome(record_id, summary, created and position == 0)


def _fail_unanswered(prop: str, pending: dict[str, tuple[ContactGroup, list[str]]],
                     errors: list[object], run: _Run) -> None:
    """207: an error names its input in `context.ids` when HubSpot says which; an input with
    no result gets every unattributed error message."""
    loose: list[str] = []
    for raw in errors:
        error = as_object(raw)
        context = as_object(error.get("context"))
        named = [str(v) for v in as_list(context.get("ids")) + as_list(context.get("id"))]
        hits = [_key(prop, v) for v in named if _key(prop, v) in pending]
        for key in hits:
            group, _ = pending.pop(key)
            run.fail(group, PermanentCRMError(f"{CRM}: batch upsert: {hubspot_message(error)}"))
        if not hits:
            loose.append(hubspot_message(error))
    for group, _ in pending.values():
        run.fail(group, PermanentCRMError(f"{CRM}: batch upsert: " + "; ".join(loose)) if loose
                 else RetryableCRMError(f"{CRM}: batch upsert returned no result for an input"))


def _key(prop: str, value: str) -> str:
    # HubSpot matches email case-insensitively; other unique values exactly.
    return value.lower() if prop == "email" else value
