"""Awaiting many store calls at once instead of one after another.

    record_ids = await at_once(identities.bind_deal(CRM, key, id) for key, id in made)

A target answering a batch binds a record per item in its identity map. Awaited one after
another, each of those writes waits for a commit of its own (SQLite's writer runs one batch at
a time; PostgreSQL, one round trip each): for a 200-record Salesforce batch that was the
larger part of its time. Started together, SQLite's writer commits them in one transaction and
PostgreSQL's pool runs them side by side; at most `MOST` at a time, so a batch never queues
hundreds of calls in front of the receiver's in a pool of ten connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")

MOST = 32


async def at_once(calls: Iterable[Awaitable[T]], most: int = MOST) -> list[T]:
    """Every call's result, in order, with at most `most` of them running at a time. Each
    call runs to its end whatever the others do; then the first error, if any, is raised (as
    awaiting them in turn would have raised it, but without leaving the rest unfinished or
    never awaited)."""
    gate = asyncio.Semaphore(most)

    async def gated(call: Awaitable[T]) -> T:
        async with gate:
            return await call

    results = await asyncio.gather(*(gated(call) for call in calls), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]  # no exceptions left: every one is a T
