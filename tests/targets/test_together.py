"""at_once: store calls started together, each run to its end, the first error raised after."""

from __future__ import annotations

import asyncio

import pytest

from engine.errors import StorageError
from engine.targets.together import at_once

pytestmark = pytest.mark.anyio


async def test_results_come_in_call_order_whatever_order_they_finish_in() -> None:
    async def after(delay: float, value: int) -> int:
        await asyncio.sleep(delay)
        return value

    assert await at_once([after(0.03, 1), after(0.0, 2), after(0.01, 3)]) == [1, 2, 3]


async def test_the_calls_run_side_by_side() -> None:
    running, peak = 0, 0

    async def call() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1

    await at_once(call() for _ in range(5))
    assert peak == 5


async def test_no_more_than_most_run_at_a_time() -> None:
    running, peak = 0, 0

    async def call() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001)
        running -= 1

    await at_once((call() for _ in range(100)), most=8)
    assert peak == 8


async def test_every_call_finishes_before_the_first_error_is_raised() -> None:
    finished: list[str] = []

    async def fails(name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        finished.append(name)
        raise StorageError(f"{name} failed")

    async def works() -> None:
        await asyncio.sleep(0.03)
        finished.append("slow")

    with pytest.raises(StorageError, match="first failed"):
        await at_once([works(), fails("first", 0.0), fails("second", 0.01)])
    assert sorted(finished) == ["first", "second", "slow"]


async def test_nothing_to_do_is_an_empty_list() -> None:
    assert await at_once([]) == []
