"""Later events of an identity queued right behind the earlier ones on a batching target.

On a target with batch endpoints (a `Batcher`), a later event of an identity need not wait for
the earlier event's answer before its calls are queued: the Batcher sends an identity's calls
in the order they were queued, and the target applies a batch's items in order. So when every
earlier unfinished event of its identities is applied by this worker right now, an event
*follows* them: it queues its calls once theirs are queued (`Link.queued`), and the batch that
carries them all writes each record once.

What it got back counts only if every event it followed came through that same pass: their
outcomes recorded, each action ok or dead, none retried (`Link.clean`). Otherwise the earlier
event will be applied again after this one was, so this one's answers are dropped unrecorded and
its part is deferred: it is applied again after the earlier event, which keeps the identity's
order in the CRM (every action is idempotent). A follower records its outcomes only after
those it followed recorded theirs, so a crash never leaves a later event's success on record
above an earlier event's unfinished action.

    chains = Chains()
    link = chains.open("hubspot", event_id)          # before the part checks its order
    leaders = chains.leaders("hubspot", earlier)     # None unless all are in progress here
    ...
    chains.close("hubspot", link)                    # when the part ends, however it ends
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from engine.actions import IdentityKey


def _future() -> asyncio.Future[bool]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class Link:
    """One event's part on one batching target while the worker applies it. `queued` is True
    once its calls are queued (False: it queued nothing in one go), `clean` True once its
    outcomes are recorded and every action of it, and of every link before it, ended ok or
    dead on that one pass."""

    event_id: int
    keys: frozenset[IdentityKey] = frozenset()
    unqueued: Counter[IdentityKey] = field(default_factory=Counter)  # its target's, shared
    queued: asyncio.Future[bool] = field(default_factory=_future)
    clean: asyncio.Future[bool] = field(default_factory=_future)

    def settle(self, *, queued: bool | None = None, clean: bool | None = None) -> None:
        if queued is not None and not self.queued.done():
            self.queued.set_result(queued)
            self.unqueued.subtract(self.keys)
        if clean is not None and not self.clean.done():
            self.clean.set_result(clean)


async def all_queued(leaders: Iterable[Link]) -> bool:
    return all([await link.queued for link in leaders])


async def all_clean(leaders: Iterable[Link]) -> bool:
    return all([await link.clean for link in leaders])


class Chains:
    """The parts in progress on each batching target, by event id, and the identities whose
    calls are still to come (`coming`: a part in progress has not queued its calls yet)."""

    def __init__(self) -> None:
        self._links: dict[str, dict[int, Link]] = {}
        self._unqueued: dict[str, Counter[IdentityKey]] = {}

    def open(self, target: str, event_id: int, keys: Iterable[IdentityKey] = ()) -> Link:
        unqueued = self._unqueued_on(target)
        link = Link(event_id, frozenset(keys), unqueued)
        unqueued.update(link.keys)
        self._links.setdefault(target, {})[event_id] = link
        return link

    def coming(self, target: str) -> Callable[[IdentityKey], bool]:
        """Whether calls on an identity are still to come on `target` (for `Batcher`)."""
        unqueued = self._unqueued_on(target)
        return lambda key: unqueued[key] > 0

    def _unqueued_on(self, target: str) -> Counter[IdentityKey]:
        # Not setdefault(target, Counter()): that builds a Counter on every call (per event).
        unqueued = self._unqueued.get(target)
        if unqueued is None:
            unqueued = self._unqueued[target] = Counter()
        return unqueued

    def close(self, target: str, link: Link) -> None:
        link.settle(queued=False, clean=False)
        links = self._links.get(target, {})
        if links.get(link.event_id) is link:
            del links[link.event_id]

    def leaders(self, target: str, event_ids: Iterable[int]) -> tuple[Link, ...] | None:
        """The links of `event_ids` on `target`, or None when one of them is not in progress
        in this worker (another worker holds it, or it waits for a claim)."""
        links = self._links.get(target)
        if links is None:
            return None
        found = []
        for event_id in event_ids:
            link = links.get(event_id)
            if link is None:
                return None
            found.append(link)
        return tuple(found)
