"""Awaiting many store calls at once instead of one after another.

    record_ids = await at_once(identities.bind_deal(CRM, key, id) for key, id in made)

A target answering a batch binds a record per item in its identity map. Awaited one after
another, each of those writes waits for a commit of its own (SQLite's writer runs one batch at
a time; PostgreSQL, one round trip each): for a 200-record Salesforce batch that was the
larger part of its time. Started together, SQLite's writer commits them in one transaction and
PostgreSQL's pool runs them side by side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def at_once(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Every call's result, in order. Each call runs to its end whatever the others do; then
    the first error, if any, is raised (as awaiting them in turn would have raised it, but
    without leaving the rest unfinished or unawaited)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]  # no exceptions left: every one is a T
