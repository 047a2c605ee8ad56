"""`GET /healthz` (the process answers) and `GET /readyz` (it can take events now).

    health = Health(storage, supervisor)
    Route("/healthz", health.healthz, methods=["GET"])
    Route("/readyz", health.readyz, methods=["GET"])

/readyz answers 503 with a `reason` while a background task waits to restart after a crash
(`task_down`), while the storage cannot be reached (`storage_unreachable`) or while writes to
it fail (`writes_failing`); otherwise 200 with the storage's durability settings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.errors import StorageError
from engine.runtime.supervisor import Supervisor
from engine.storage import Storage

log = logging.getLogger(__name__)

T = TypeVar("T")

STORAGE_TIMEOUT_SECONDS = 5


def _unavailable(reason: str, **detail: object) -> Response:
    return JSONResponse({"status": "unavailable", "reason": reason, **detail}, status_code=503)


class Health:
    """Readiness: the supervisor's background tasks, then the storage."""

    def __init__(self, storage: Storage, supervisor: Supervisor) -> None:
        self.storage = storage
        self.supervisor = supervisor

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if not self.supervisor.ready:
            log.warning("not ready", extra={"error": "a background task crashed",
                                            "down": sorted(self.supervisor.down)})
            return _unavailable("task_down", down=dict(self.supervisor.down))
        try:
            await self._timed(self.storage.ping())
            durability = await self._timed(self.storage.durability())
        except (StorageError, TimeoutError) as error:
            log.warning("not ready", extra={"error": str(error) or "storage ping timed out"})
            return _unavailable("storage_unreachable")
        try:
            # Free while writes commit; after a failed commit, a test write decides.
            await self._timed(self.storage.check_writable())
        except (StorageError, TimeoutError) as error:
            log.warning("not ready: writes fail", extra={
                "error": str(error) or "the test write timed out"})
            return _unavailable("writes_failing")
        return JSONResponse({"status": "ready", "storage": dict(durability)})

    @staticmethod
    async def _timed(call: Awaitable[T]) -> T:
        return await asyncio.wait_for(call, timeout=STORAGE_TIMEOUT_SECONDS)
