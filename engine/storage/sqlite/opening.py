"""Opening a SQLite file: create it only when asked, and say which file when it cannot be.

`linkcrm serve` and `linkcrm migrate` create the database; every other command opens an
existing one (SQLite's `mode=rw`), so a command run in the wrong folder says so instead of
leaving an empty `linkcrm.db` behind.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from engine.errors import StorageError

CREATE_IT = "run `linkcrm migrate` or `linkcrm serve` first, or point LINKCRM_DATABASE_URL at it"


def where(path: str) -> str:
    """`path` for messages; a relative one with the folder it is relative to."""
    return path if os.path.isabs(path) else f"{path} (in {os.getcwd()})"


def check_path(path: str, *, create: bool) -> None:
    """Raise StorageError naming `path` when it cannot be the database file: missing (unless
    `create`), a folder, or in a folder that does not exist."""
    file = Path(path)
    if file.is_dir():
        raise StorageError(f"the SQLite database {where(path)} is a folder, not a file; "
                           "fix LINKCRM_DATABASE_URL (e.g. sqlite:///linkcrm.db)")
    if file.exists():
        return
    if not create:
        raise StorageError(f"no database at {where(path)}; {CREATE_IT}")
    folder = file.parent
    if not folder.is_dir():
        raise StorageError(f"cannot create the SQLite database {where(path)}: the folder "
                           f"{folder} does not exist; create it (mkdir -p {folder}) or fix "
                           "LINKCRM_DATABASE_URL")


def connect(path: str, *, create: bool, timeout: float) -> sqlite3.Connection:
    """A connection to `path`; without `create`, a file that vanished is an error, not a new
    empty database. Transactions are explicit (BEGIN IMMEDIATE ... COMMIT)."""
    target = Path(path).absolute().as_uri() + ("?mode=rwc" if create else "?mode=rw")
    try:
        return sqlite3.connect(target, uri=True, timeout=timeout, isolation_level=None,
                               check_same_thread=False)
    except sqlite3.OperationalError as error:
        if not create and not Path(path).exists():
            raise sqlite3.OperationalError(f"no database at {where(path)}; {CREATE_IT}") \
                from None
        raise sqlite3.OperationalError(f"cannot open the SQLite database {where(path)}: "
                                       f"{error}") from None
