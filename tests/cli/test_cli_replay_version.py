"""`linkcrm replay --rules-version`: events pinned to a published rule version, the version
said, and every refusal made before anything is re-queued."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from engine.storage import InboxEvent, open_storage
from tests.support.diff_story import RULES, record, recorded_story
from tests.support.service_process import cli, service_env


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    environ = service_env(tmp_path)
    assert cli("migrate", env=environ).returncode == 0
    return environ


def copy(folder: Path, name: str, old: str, new: str) -> Path:
    shutil.copytree(RULES, folder)
    path = folder / name
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    for test in folder.glob("*_test.yaml"):  # they expect the old plans
        test.unlink()
    return folder


def publish(env: dict[str, str], folder: Path, *options: str) -> str:
    done = cli("rules", "publish", str(folder), *options, "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    version: str = json.loads(done.stdout)["version"]
    return version


def stored(env: dict[str, str], event_id: int) -> InboxEvent:
    async def read() -> InboxEvent:
        storage = open_storage(env["LINKCRM_DATABASE_URL"])
        try:
            event = await storage.inbox.get(event_id)
        finally:
            await storage.close()
        assert event is not None
        return event

    return asyncio.run(read())


def test_replay_pins_events_to_a_version_and_says_which(env: dict[str, str],
                                                        tmp_path: Path) -> None:
    [first, *_] = record(env["LINKCRM_DATABASE_URL"], recorded_story())
    unpublished = cli("replay", str(first), env=env)
    assert unpublished.returncode == 0, unpublished.stderr
    assert unpublished.stdout.strip() == (
        f"requeued 1 event(s): {first}; the worker applies them with the rules the worker "
        "loaded (no rule version is published)")
    no_active = cli("replay", str(first), "--rules-version", "active", env=env)
    assert no_active.returncode == 1
    assert "no rule version is active" in no_active.stderr

    active = publish(env, RULES)
    candidate = publish(env, copy(tmp_path / "stage", "attribution.yaml", "stage: lead",
                                  "stage: customer"), "--shadow")
    remapped = publish(env, copy(tmp_path / "fields", "fields.yaml",
                                 "hubspot: lifecyclestage", "hubspot: hs_lead_status"),
                       "--shadow")

    plain = cli("replay", str(first), env=env)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == (f"requeued 1 event(s): {first}; the worker applies them "
                                    f"with rules version {active} (active)")
    assert stored(env, first).rules_version is None

    pinned = cli("replay", str(first), "--rules-version", candidate[:7], env=env)
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.strip() == (
        f"requeued 1 event(s): {first}; the worker applies them with rules version "
        f"{candidate} (pinned; the active version is {active})")
    assert stored(env, first).rules_version == candidate
    shown = cli("events", "show", str(first), env=env)
    assert f"  replayed with rules {candidate} (`replay --rules-version`)" \
        in shown.stdout.splitlines()
    as_json = json.loads(cli("replay", "--all-dead", str(first), "--rules-version", "active",
                             "--format", "json", env=env).stdout)
    assert as_json == {"requeued": [first], "refused": [], "rules_version": active,
                       "pinned": True}
    assert stored(env, first).rules_version == active

    # Refusals change nothing: the pin and the status stay as they were.
    before = stored(env, first)
    other_map = cli("replay", str(first), "--rules-version", remapped, env=env)
    assert other_map.returncode == 1
    assert (f"rule version {remapped} maps fields unlike the active version {active}"
            in other_map.stderr)
    assert f"Activate it instead (`linkcrm rules activate {remapped}`), then replay" \
        in other_map.stderr
    assert "Nothing was re-queued" in other_map.stderr
    unknown = cli("replay", str(first), "--rules-version", "feedfacecafe", env=env)
    assert unknown.returncode == 1
    assert "unknown rule version 'feedfacecafe'; `linkcrm rules list` shows the published " \
        "ones. Nothing was re-queued" in unknown.stderr
    assert stored(env, first) == before
