"""`--watch` for `linkcrm test` and `linkcrm validate`: run, then run again on every save.

Polls the files under the watched paths for changed modification times and sizes (and files
added or removed) every `interval` seconds. A rules folder holds a handful of small files, so
a poll costs microseconds, needs no native file-event library and behaves the same on every
OS, in containers and on network mounts, where file events are unreliable. Ctrl-C stops it
(exit 0). Its own lines go to stderr, so `--format json` output stays one document per run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import click

Snapshot = dict[str, tuple[int, int]]

POLL_SECONDS = 0.5


def snapshot(paths: Iterable[str]) -> Snapshot:
    """(mtime in ns, size) of every file under `paths`, hidden files and folders skipped."""
    seen: Snapshot = {}
    for root in paths:
        base = Path(root)
        files = [base] if base.is_file() else sorted(base.rglob("*"))
        for path in files:
            if any(part.startswith(".") for part in path.relative_to(base).parts):
                continue
            try:
                status = path.stat()
            except OSError:
                continue  # removed between listing and stat: the next poll sees it gone
            if path.is_file():
                seen[str(path)] = (status.st_mtime_ns, status.st_size)
    return seen


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """The files added, removed or modified between two snapshots, sorted."""
    return sorted(name for name in before.keys() | after.keys()
                  if before.get(name) != after.get(name))


def watch(paths: Iterable[str], run: Callable[[], object], *, interval: float = POLL_SECONDS,
          max_runs: int | None = None) -> None:
    """Call `run()`, then again after each change under `paths`, until Ctrl-C (or `max_runs`
    runs, for tests). A burst of saves (an editor writing twice) is one run. A run that exits
    (a command's `sys.exit`) does not end the watch: its output is the report."""
    watched = list(paths)
    runs = 0
    try:
        state = snapshot(watched)
        while True:
            try:
                run()
            except SystemExit:
                pass
            runs += 1
            if max_runs is not None and runs >= max_runs:
                return
            click.echo(f"watching {len(state)} file{'s' * (len(state) != 1)} for changes "
                       "(Ctrl-C stops)", err=True)
            while True:
                time.sleep(interval)
                current = snapshot(watched)
                changed = changes(state, current)
                if changed:
                    break
            time.sleep(min(interval, 0.2))  # let the rest of a burst of saves land
            state = snapshot(watched)
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more"
                                               if len(changed) > 3 else "")
            click.echo(f"\n--- {time.strftime('%H:%M:%S')} changed: {shown}", err=True)
    except KeyboardInterrupt:
        click.echo("stopped watching", err=True)
