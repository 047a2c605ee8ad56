"""Retry policy: exponential backoff with full jitter, honouring the CRM's Retry-After.

Shared by the worker (which reschedules an action durably) and anything that retries in-process.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from engine.errors import RetryableCRMError, StorageError, UnstorableValueError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt n (1-based) waits a random time in [0, min(cap, base * 2**(n-1))], or the
    CRM's Retry-After when it gave one (plus a little jitter so workers do not stampede)."""

    base: float = 0.5
    cap: float = 300.0
    max_attempts: int = 12
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return retry_after + self.rng.uniform(0, min(1.0, self.base))
        return self.rng.uniform(0, min(self.cap, self.base * 2 ** (attempt - 1)))

    def exhausted(self, attempt: int) -> bool:
        return attempt >= self.max_attempts


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run `call` until it stops raising RetryableCRMError or the policy gives up (then the
    last error propagates). PermanentCRMError and anything else propagate at once."""
    attempt = 1
    while True:
        try:
            return await call()
        except RetryableCRMError as error:
            if policy.exhausted(attempt):
                raise
            await sleep(policy.delay(attempt, error.retry_after))
            attempt += 1


def transient(error: object) -> bool:
    """A store that could not commit or read may work again; every other error (a value the
    store refuses, a bug) fails the same way on every attempt."""
    return isinstance(error, StorageError) and not isinstance(error, UnstorableValueError)
