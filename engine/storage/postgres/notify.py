"""LISTEN/NOTIFY wake-ups: an idle worker hears about a new event instead of polling for it.

Senders coalesce: at most one NOTIFY per process is in flight, and every event stored while it
is sent is covered by one more. PostgreSQL serialises the commits of notifying transactions on
one lock, so a NOTIFY inside each receiver's INSERT would make every store wait for the others'
fsyncs; a separate NOTIFY that skips the WAL flush keeps stores concurrent. A lost notification
costs one poll interval, never an event: workers still claim on a timer.

Each subject sends on a connection of its own, outside the pool, set once to skip the WAL flush:
a notification is then one statement, not a pooled checkout and a four-statement transaction
(that was a tenth of a busy receiver's event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

# Seconds between one process's notifications on a subject while pokes keep coming.
SPACING = 0.02

# One channel per schema and subject, so two linkcrm installations sharing a database do not
# wake each other. Computed by the server on both sides; names stay under the 63-byte
# identifier limit. `channel_name("rules")` is what a rule publish or activate notifies.
def channel_name(subject: str) -> str:
    """The SQL expression for this schema's channel of `subject` (a fixed word, not data)."""
    assert subject.isidentifier(), subject
    return f"'linkcrm_{subject}_' || left(md5(COALESCE(current_schema(), '')), 16)"


class Wakeups:
    """Sends (`poke`) and receives (`wait`) "new work may be due" signals for one storage.

        wakeups.poke()                      # after a commit that made an event claimable
        woken = await wakeups.wait(0.5)     # True when poked (here or by another process)
    """

    def __init__(self, conninfo: str, subject: str = "inbox") -> None:
        self._channel = "SELECT " + channel_name(subject)
        self._subject = subject
        self._conninfo = conninfo
        self._signal = asyncio.Event()
        self._pending = False
        self._sender: asyncio.Task[None] | None = None
        self._sending: tuple[psycopg.AsyncConnection[Any], str] | None = None  # and its channel
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

    # -- sending --------------------------------------------------------------------------------

    def poke(self) -> None:
        """Wake this process's waiters now and the other processes' through NOTIFY."""
        if self._closed:
            return
        self._signal.set()
        self._pending = True
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name="linkcrm-pg-notify")

    async def _send(self) -> None:
        while self._pending and not self._closed:
            self._pending = False
            if not await self._notify():
                return
            # Pokes meanwhile ride on the next one: a busy receiver sends a few dozen a second,
            # not one per batch, and an idle worker still hears the first at once.
            await asyncio.sleep(SPACING)

    async def _notify(self) -> bool:
        """One NOTIFY. A kept connection that went stale while idle (a server restart, a
        proxy's idle timeout) is replaced once; when a fresh one fails too, the workers' next
        poll finds the event (nothing is lost) and the next poke connects again."""
        for fresh in (self._sending is None, True):
            try:
                connection, channel = self._sending or await self._connect_sender()
                await connection.execute("SELECT pg_notify(%s, '')", (channel,))
                return True
            except (psycopg.Error, OSError) as error:
                await self._close_sender()
                if fresh:
                    log.debug("NOTIFY failed", extra={"error": str(error)})
        return False

    async def _connect_sender(self) -> tuple[psycopg.AsyncConnection[Any], str]:
        connection = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        try:
            await connection.execute("SET synchronous_commit = off")
            row = await (await connection.execute(self._channel)).fetchone()
            assert row is not None
        except BaseException:
            await connection.close()
            raise
        self._sending = (connection, str(row[0]))
        return self._sending

    async def _close_sender(self) -> None:
        if self._sending is not None:
            connection, self._sending = self._sending[0], None
            with contextlib.suppress(psycopg.Error, OSError):
                await connection.close()

    # -- receiving ------------------------------------------------------------------------------

    async def wait(self, timeout: float) -> bool:
        """Wait until poked or `timeout` seconds pass. The signal stays set until a waiter
        takes it, so a poke that lands between a caller's empty claim and its wait is not
        missed."""
        if self._listener is None and not self._closed:
            self._listener = asyncio.create_task(self._listen(),
                                                 name=f"linkcrm-pg-listen-{self._subject}")
        if not self._signal.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(timeout, 0.0)):
                    await self._signal.wait()
        woken = self._signal.is_set()
        self._signal.clear()
        return woken

    async def _listen(self) -> None:
        """Keep one LISTEN connection (outside the pool) for as long as the storage is open,
        reconnecting with backoff; a reconnect wakes the waiters, since notifications sent
        while it was down are gone."""
        delay = 0.5
        while not self._closed:
            try:
                connection = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True)
                async with connection:
                    row = await (await connection.execute(self._channel)).fetchone()
                    assert row is not None
                    await connection.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(str(row[0]))))
                    self._signal.set()
                    delay = 0.5
                    async for _ in connection.notifies():
                        self._signal.set()
            except (psycopg.Error, OSError) as error:
                log.warning("LISTEN connection lost; polling until it is back",
                            extra={"error": str(error), "retry_in": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    # -- lifecycle ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Finish a NOTIFY in flight (briefly) and stop listening; idempotent."""
        self._closed = True
        tasks = [task for task in (self._sender, self._listener) if task is not None]
        if self._sender is not None and not self._sender.done():
            await asyncio.wait({self._sender}, timeout=2.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_sender()
