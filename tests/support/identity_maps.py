"""Identity maps that watch what a target asks of them: which calls, and in what order."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from engine.actions import IdentityKey
from engine.storage import IdentityMap


class Recording:
    """Passes every call to `inner` and notes its name in `calls`."""

    def __init__(self, inner: IdentityMap) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return await method(*args, **kwargs)

        return call


class InFlight(Recording):
    """Also counts how many calls are in flight at once: `peak` is the most there were."""

    def __init__(self, inner: IdentityMap) -> None:
        super().__init__(inner)
        self.running = self.peak = 0

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        call = super().__getattr__(name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                return await call(*args, **kwargs)
            finally:
                self.running -= 1

        return counted


class KeyOverlaps(Recording):
    """Also counts, in `overlaps`, the binds that started on an identity key while another
    call was still binding that key."""

    def __init__(self, inner: IdentityMap) -> None:
        super().__init__(inner)
        self.overlaps = 0
        self._busy: dict[IdentityKey, int] = {}

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        call = super().__getattr__(name)
        if name not in ("bind_identity", "rebind_identity"):
            return call

        async def watched(target: str, key: IdentityKey, *rest: Any) -> Any:
            self.overlaps += self._busy.get(key, 0) > 0
            self._busy[key] = self._busy.get(key, 0) + 1
            try:
                return await call(target, key, *rest)
            finally:
                self._busy[key] -= 1

        return watched


class AnotherWorkerRebinds(Recording):
    """Right after the first call that names `key` alone, another worker maps it to
    `record_id` (in `target`): the moment a target forgetting a stale mapping of that key
    would act on what it read a moment ago."""

    def __init__(self, inner: IdentityMap, target: str, key: IdentityKey,
                 record_id: str) -> None:
        super().__init__(inner)
        self.armed = False
        self._target, self._key, self._record_id = target, key, record_id

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = super().__getattr__(name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = await method(*args, **kwargs)
            if self.armed and self._names_only_the_key(args):
                self.armed = False
                await self.inner.rebind_identity(self._target, self._key, self._record_id)
            return result

        return call

    def _names_only_the_key(self, args: Sequence[Any]) -> bool:
        named = args[1] if len(args) > 1 else None
        return named == self._key or named == [self._key]
