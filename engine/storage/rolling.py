"""A rolling window of requests kept as rows, shared by the backends' `take_slots`.

A bucket's requests are rows named `bucket#0000`, `bucket#0001`, ... each holding the time
one request went: at most `limit` of them matter, the most recent. A request may go when fewer
than `limit` of them are under `window` seconds old, in each window it counts against; it then
stamps the oldest row of each (or a new one, while there are fewer than `limit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime


def slot_range(bucket: str) -> tuple[str, str]:
    """The bucket's rows are the names from the first (inclusive) to the second (exclusive):
    '$' follows '#'."""
    return f"{bucket}#", f"{bucket}$"


def by_window(windows: Sequence[tuple[str, int, float]],
              rows: Sequence[tuple[str, datetime]]) -> list[list[tuple[str, datetime]]]:
    """The rows read for several windows at once, split by window (bucket names hold no '#',
    `checks.window_slots`, so a row's name tells its bucket)."""
    return [[row for row in rows if row[0].startswith(f"{bucket}#")]
            for bucket, _, _ in windows]


def decide_all(windows: Sequence[tuple[str, int, float]],
               rows: Sequence[Sequence[tuple[str, datetime]]], now: datetime
               ) -> tuple[float, list[str]]:
    """(0, the rows to stamp with `now`, one per window) when a request has room in every
    window, else (the longest wait, [])."""
    decided = [decide(bucket, found, limit, window, now)
               for (bucket, limit, window), found in zip(windows, rows, strict=True)]
    wait = max(wait for wait, _ in decided)
    if wait > 0:
        return wait, []
    return 0.0, [stamp for _, stamp in decided if stamp is not None]


def decide(bucket: str, rows: Sequence[tuple[str, datetime]], limit: int, window: float,
           now: datetime) -> tuple[float, str | None]:
    """(0, the row to stamp with `now`) when a request may go now, else (seconds to wait,
    None)."""
    newest_first = sorted(rows, key=lambda row: row[1], reverse=True)
    if len(newest_first) >= limit:
        wait = window - (now - newest_first[limit - 1][1]).total_seconds()
        if wait > 0:
            return wait, None
    if len(newest_first) < limit:
        taken = {name for name, _ in rows}
        free = next(k for k in range(limit + len(taken))
                    if f"{bucket}#{k:04d}" not in taken)
        return 0.0, f"{bucket}#{free:04d}"
    return 0.0, newest_first[-1][0]
