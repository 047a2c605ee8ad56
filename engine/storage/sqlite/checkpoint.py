"""WAL checkpoints on a thread of their own, so no commit waits for one.

SQLite's default checkpoints the WAL inside the commit that takes it past 1,000 pages: that
commit, and every request waiting for the group commit behind it, waits while the pages are
copied into the database file and it is fsynced (tens of milliseconds under load, the receiver's
worst latencies). Here the writer's connection does no checkpoints (`wal_autocheckpoint = 0`)
and a `Checkpointer`, told after each batch that there is something to move, runs a PASSIVE
checkpoint on its own connection at most every `interval` seconds. PASSIVE never blocks the
writer or a reader; frames a reader still needs wait for the next round. Durability is
unchanged: a commit is durable once its WAL frames are fsynced, before any checkpoint.

A checkpoint that fails (a full disk) is logged and tried again at the next round; the WAL only
grows meanwhile. Another process on the same file checkpoints with its own `Checkpointer`.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Checkpointer:
    """    checkpointer = Checkpointer(connect)   # a connection to the same file, opened lazily
    checkpointer.nudge()                       # after a commit: checkpoint soon
    checkpointer.close()                       # a last checkpoint, then the thread stops
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection], interval: float = 1.0
                 ) -> None:
        self._connect = connect
        self._interval = interval
        self._connection: sqlite3.Connection | None = None
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self.rounds = 0  # checkpoints run, failed ones included
        self._thread = threading.Thread(target=self._loop, name="linkcrm-sqlite-checkpoint",
                                        daemon=True)
        self._thread.start()

    def nudge(self) -> None:
        """Something was committed: checkpoint at the next round (cheap; any thread)."""
        self._wanted.set()

    def close(self) -> None:
        """Run one last checkpoint if one is wanted, stop the thread, close the connection."""
        self._stopping.set()
        self._wanted.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            self._checkpoint()
            if self._stopping.wait(self._interval):
                break
        if self._wanted.is_set():
            self._checkpoint()
        if self._connection is not None:
            self._connection.close()

    def _checkpoint(self) -> None:
        try:
            if self._connection is None:
                self._connection = self._connect()
            self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as error:
            log.warning("could not checkpoint the WAL; trying again later",
                        extra={"error": str(error)})
            if self._connection is not None:
                self._connection.close()
                self._connection = None
        finally:
            self.rounds += 1
