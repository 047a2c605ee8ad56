"""Why PostgreSQL cannot be reached, in one line that names the database (never its password).

The connection pool retries a failing server in the background and logs every attempt; a
process that cannot connect at all is told once, before the pool opens, with libpq's reason:

    cannot connect to postgresql://app:***@db:5432/nosuchdb: database "nosuchdb" does not exist
"""

from __future__ import annotations

import asyncio

import psycopg

from engine.errors import StorageError


def connect_problem(label: str, error: BaseException) -> str:
    """`cannot connect to LABEL: REASON` from a psycopg connection error: libpq's reason for
    the first address tried, without its `connection to server at ... failed:` framing."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = next((line for line in lines if " failed: " in line), lines[0] if lines else "")
    reason = first.rsplit(" failed: ", 1)[-1].removeprefix("connection failed: ")
    reason = reason.removeprefix("FATAL:").strip() or type(error).__name__
    if "refused" in reason.lower():
        reason += " (is PostgreSQL running and listening there?)"
    return f"cannot connect to {label}: {reason}"


async def check_connection(conninfo: str, label: str, timeout: float) -> None:
    """Open and close one connection; raise StorageError with `connect_problem` when that
    fails or takes longer than `timeout` seconds."""
    try:
        connection = await asyncio.wait_for(psycopg.AsyncConnection.connect(conninfo),
                                            timeout)
    except TimeoutError:
        raise StorageError(f"cannot connect to {label}: no answer within {timeout:g}s (is the "
                           "host reachable and the port right?)") from None
    except psycopg.Error as error:
        raise StorageError(connect_problem(label, error)) from None
    await connection.close()
