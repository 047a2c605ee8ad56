"""`linkcrm events export`: recorded events as JSON Lines, optionally redacted."""

from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import suppress
from datetime import timedelta
from pathlib import Path
from typing import IO

import click

from engine.storage import Storage, utc_now

from .eventlines import UnexportableError, export_line, inbox_events, parse_body
from .output import fail
from .params import LIMIT, duration
from .redaction import Redactor
from .runtime import database_label, iso, load_settings, with_storage


def _skipped(skipped: Counter[str]) -> str:
    return "; ".join(f"skipped {count:,} ({reason})" for reason, count in sorted(skipped.items()))


@click.command("export")
@click.option("--since", default="7d", show_default=True, callback=duration, metavar="AGE",
              help="Only events received this recently: 30d, 12h, 90m, 2w.")
@click.option("--limit", type=LIMIT, help="At most this many events (the newest).")
@click.option("--redact", is_flag=True,
              help="Replace emails, names and free text with stable placeholders.")
@click.option("--redact-key", envvar="LINKCRM_REDACT_KEY", show_envvar=True, metavar="KEY",
              help="Make placeholders repeatable across exports (default: a random key per "
                   "export). Needs --redact.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write to FILE (replaced only once complete; its folder is made if "
                   "missing); default: standard output.")
def export_events(since: timedelta, limit: int | None, redact: bool, redact_key: str | None,
                  output: str | None) -> None:
    """Write recorded events as JSON Lines, newest first, one event a line:
    {"id", "received_at", "source", "envelope"}, the envelope as received.

    With --redact, emails, names and free text become stable placeholders (the same value,
    the same placeholder) while event types, timestamps, tokens, ids, campaigns and platforms
    stay, so the file can live in a rules repository and feed `linkcrm diff --events` in CI.
    README "What a rule change does" lists exactly what is replaced. Events whose body was
    purged are skipped and counted. The count goes to standard error.

    \b
    Example:
      linkcrm events export --since 7d --redact --output events.jsonl
    """
    if redact_key is not None and not redact:
        raise click.UsageError("--redact-key needs --redact")
    if redact_key is not None and not redact_key.strip():
        raise click.BadParameter("must not be empty", param_hint="--redact-key")
    settings = load_settings()
    cutoff = utc_now() - since
    redactor = Redactor(redact_key) if redact else None
    skipped: Counter[str] = Counter()
    partial = Path(f"{output}.partial-{os.getpid()}") if output else None
    try:
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
        sink: IO[bytes] = partial.open("wb") if partial else sys.stdout.buffer
    except OSError as error:
        fail(f"cannot write {output}: {error.strerror}", 2)

    async def work(storage: Storage) -> int:
        written = 0
        async for event in inbox_events(storage, cutoff, limit):
            envelope, problem = parse_body(event)
            if problem is not None:
                skipped[problem] += 1
                continue
            if redactor is not None:
                envelope = redactor.envelope(envelope)
            try:
                line = export_line(event, envelope)
            except UnexportableError as error:
                skipped[str(error)] += 1
                continue
            sink.write(line.encode("utf-8") + b"\n")
            written += 1
        return written

    done = False
    try:
        written = with_storage(settings, work)
        sink.flush()
        if partial is not None and output is not None:
            sink.close()
            os.replace(partial, output)
        done = True
    except OSError as error:
        fail(f"cannot write {output or 'standard output'}: {error.strerror}")
    finally:
        if partial is not None and not done:
            sink.close()
            with suppress(OSError):
                partial.unlink()
    where = output or "standard output"
    note = f"; {_skipped(skipped)}" if skipped else ""
    click.echo(f"exported {written:,} event(s) received since {iso(cutoff)} from "
               f"{database_label(settings.database_url)} to {where}"
               f"{' (redacted)' if redact else ''}{note}", err=True)
