"""A recorded story and a rule change for the `diff` tests: what the change does, exactly.

The story is the sample one (install -> referral sign-up -> conversion), the identify call and
a click no rule takes. `edited_rules` copies the shipped rules and makes the change below; each
edit must match the shipped rule file exactly once, so a change to the shipped rules shows up
here instead of silently weakening the tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.cli.samples import identify_body, story
from engine.storage import NewEvent, open_storage
from tests.support.paths import REPO

TOKEN = "ref_sample_sam"
RULES = REPO / "rules"


def recorded_story() -> list[dict[str, Any]]:
    identify = {"event": "app.user_identified", "timestamp": "2026-03-20T09:00:00Z",
                "data": identify_body(TOKEN)}
    click = {"event": "link.clicked", "timestamp": "2026-03-01T12:29:00Z",
             "data": {"token": TOKEN, "campaign": "spring-referrals"}}
    return [click, *story(TOKEN), identify]


# (old text, new text) in rules/attribution.yaml
EDITS: list[tuple[str, str]] = [
    # install: the platform is no longer lower-cased
    ("first_touch_platform: lower(data.platform || data.device_type)\n"
     "            install_date: to_date(timestamp)",
     "first_touch_platform: data.platform || data.device_type\n"
     "            install_date: to_date(timestamp)"),
    # install: the stage's identity reads a field the event does not have
    ("      - set_stage:\n          identity: {deep_link_token: data.token}\n"
     "          stage: lead",
     "      - set_stage:\n          identity: {deep_link_token: data.missing}\n"
     "          stage: lead"),
    # sign-up: one field more, and the stage is customer
    ("          set:\n            deep_link_token: data.token || data.referral_code\n"
     "          set_once:\n            referral_source: data.referrer_token || data.referrer_id\n"
     "            referral_date",
     "          set:\n            deep_link_token: data.token || data.referral_code\n"
     "            deep_link_prefix: \"'referral'\"\n"
     "          set_once:\n            referral_source: data.referrer_token || data.referrer_id\n"
     "            referral_date"),
    ("          stage: lead\n\n  - name: referral-converts",
     "          stage: customer\n\n  - name: referral-converts"),
    # conversion: no deal any more
    ("      - create_deal:\n"
     "          identity: {deep_link_token: data.token || data.referral_code}\n"
     "          key: join('-', ['referral', data.token || data.referral_code])\n"
     "          title: join(' ', ['Referral:', data.token || data.referral_code])\n"
     "          stage: new\n"
     "          set:\n"
     "            referral_code: data.referral_code || data.token\n", ""),
    # identify: the full name is no longer written
    ("            name: join(' ', [data.first_name, data.last_name][?@])\n", ""),
]


def edited_rules(target: Path, edits: Sequence[tuple[str, str]] = EDITS,
                 fields: Sequence[tuple[str, str]] = ()) -> Path:
    """A copy of the shipped rules at `target` with `edits` made to attribution.yaml and
    `fields` to fields.yaml (each old text must occur exactly once)."""
    shutil.copytree(RULES, target)
    for name, changes in (("attribution.yaml", edits), ("fields.yaml", fields)):
        path = target / name
        text = path.read_text(encoding="utf-8")
        for old, new in changes:
            assert text.count(old) == 1, f"{name}: {old!r} occurs {text.count(old)} times"
            text = text.replace(old, new)
        path.write_text(text, encoding="utf-8")
    return target


def record(database: Path | str, envelopes: Sequence[Any], *,
           bodies: Sequence[bytes] = (), received_at: datetime | None = None) -> list[int]:
    """Store `envelopes` (and raw `bodies`) as the receiver would, in a SQLite file or the
    database a URL names; their ids in order."""
    at = received_at or datetime.now(UTC)
    url = database if isinstance(database, str) else f"sqlite:///{database}"

    async def run() -> list[int]:
        storage = open_storage(url)
        await storage.migrate()
        ids = []
        try:
            raw = [json.dumps(e, separators=(",", ":")).encode() for e in envelopes]
            for body in [*raw, *bodies]:
                try:
                    kind = str(json.loads(body)["event"])
                except (ValueError, KeyError, TypeError, RecursionError):
                    kind = "test"
                ids.append((await storage.inbox.store(NewEvent(
                    body=body, event_type=kind, event_timestamp="2026-03-01T00:00:00Z",
                    dedupe_key=hashlib.sha256(body).hexdigest(), received_at=at))).id)
        finally:
            await storage.close()
        return ids

    return asyncio.run(run())
