"""The action vocabulary: what a rule asks a CRM to do, as frozen data.

A rule file names actions in YAML (`upsert_contact`, `set_stage`, `create_deal`); the loader
looks the name up in `ACTIONS` and nothing else in linkcrm compares action names as strings.
An action here is *planned*: every expression is already evaluated, so the values are plain JSON.

    >>> UpsertContact(rule="r", identity=(IdentityKey("deep_link_token", "tok"),),
    ...               set={"deep_link_prefix": "promo"}).as_dict()["action"]
    'upsert_contact'
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, TypeAlias

JSON: TypeAlias = None | bool | int | float | str | list["JSON"] | dict[str, "JSON"]

Fields = Mapping[str, JSON]


@dataclass(frozen=True)
class IdentityKey:
    """One way to find a record: a canonical field (`email`, `deep_link_token`) and its value."""

    field: str
    value: str
    # The worker's ordering and batching hash keys hundreds of thousands of times a backlog:
    # hashed once, as the dataclass would hash it.
    _hash: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.field, self.value)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[IdentityKey], tuple[str, str]]:
        return IdentityKey, (self.field, self.value)  # a string's hash differs per process


Identity = tuple[IdentityKey, ...]  # in priority order; never empty once planned


def identity_as_dict(identity: Identity) -> dict[str, JSON]:
    return {key.field: key.value for key in identity}


# The "target" of the identity digests recorded for every event, whatever its targets (no
# target can be named "*"): the delivery log's search by token or email reads them.
TOUCHED = "*"


def identity_digest(target: str, key: IdentityKey) -> str:
    """`target:` and a hash of the key: the worker's ordering key for one identity on one
    target, recorded per event, so the delivery log can find the events that touched a person
    without copying identities (emails) into one more table."""
    material = f"{key.field}\0{key.value}".encode("utf-8", "surrogatepass")
    return f"{target}:" + hashlib.sha256(material).hexdigest()[:32]


@dataclass(frozen=True)
class Action:
    """Base of the planned actions. `kind` is the YAML name; `rule` produced the action."""

    kind: ClassVar[str]
    # Fields that hold canonical field names -> values (checked against the field map).
    field_maps: ClassVar[tuple[str, ...]] = ()

    rule: str
    identity: Identity

    def payload(self) -> dict[str, JSON]:
        """The action's own fields (everything but rule, kind and identity)."""
        raise NotImplementedError

    def as_dict(self) -> dict[str, JSON]:
        return {
            "rule": self.rule,
            "action": self.kind,
            "identity": identity_as_dict(self.identity),
            **self.payload(),
        }


@dataclass(frozen=True)
class UpsertContact(Action):
    """Create the contact if no record matches the identity, then write fields.

    `set` is written every time; `set_once` only while the CRM field is empty (first touch).
    """

    kind: ClassVar[str] = "upsert_contact"
    field_maps: ClassVar[tuple[str, ...]] = ("set", "set_once")

    set: Fields = field(default_factory=dict)
    set_once: Fields = field(default_factory=dict)

    def payload(self) -> dict[str, JSON]:
        return {"set": dict(self.set), "set_once": dict(self.set_once)}


@dataclass(frozen=True)
class SetStage(Action):
    """Move the contact to a stage from the field map; stages only move forward."""

    kind: ClassVar[str] = "set_stage"

    stage: str = ""

    def payload(self) -> dict[str, JSON]:
        return {"stage": self.stage}


@dataclass(frozen=True)
class CreateDeal(Action):
    """Create one deal per `key`, ever, associated with the contact the identity finds."""

    kind: ClassVar[str] = "create_deal"
    field_maps: ClassVar[tuple[str, ...]] = ("set",)

    key: str = ""
    title: str = ""
    stage: str = ""
    amount: int | float | None = None
    set: Fields = field(default_factory=dict)

    def payload(self) -> dict[str, JSON]:
        return {
            "key": self.key,
            "title": self.title,
            "stage": self.stage,
            "amount": self.amount,
            "set": dict(self.set),
        }


ACTIONS: dict[str, type[Action]] = {
    cls.kind: cls for cls in (UpsertContact, SetStage, CreateDeal)
}
