"""Pipedrive's spent daily token budget fails calls at once instead of hanging the target."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from engine.actions import IdentityKey, SetStage
from engine.errors import RetryableCRMError
from engine.rules.files import load_ruleset
from engine.storage import open_storage
from engine.targets.base import CallContext
from engine.targets.pipedrive.target import PipedriveTarget
from tests.emulators.pipedrive import PipedriveEmulator
from tests.support.crm_stack import PIPEDRIVE_TOKEN, PIPELINE, provision_pipedrive_app
from tests.support.paths import REPO

pytestmark = pytest.mark.anyio
FIELD_MAP = load_ruleset([REPO / "rules"]).field_map



def stage(token: str) -> SetStage:
    return SetStage("r", (IdentityKey("deep_link_token", token),), stage="lead")


async def test_a_spent_budget_fails_every_call_fast_until_it_resets(tmp_path: Path) -> None:
    emulator = PipedriveEmulator(api_token=PIPEDRIVE_TOKEN)
    emulator.add_pipeline(*PIPELINE)
    await provision_pipedrive_app(emulator, FIELD_MAP)
    storage = open_storage(f"sqlite:///{tmp_path / 'linkcrm.db'}")
    await storage.migrate()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as client:
            target = PipedriveTarget(client, api_token=PIPEDRIVE_TOKEN,
                                     base_url="http://pipedrive.test", field_map=FIELD_MAP,
                                     identities=storage.identities, rate_limits=storage.rate_limits)
            await target.start()
            emulator.daily_budget = emulator.tokens_used + 1  # spent: a search costs 20
            with pytest.raises(RetryableCRMError) as first:
                await target.execute(stage("tok_1"), CallContext("k1"))
            sent = sum(emulator.calls.values())
            async with asyncio.timeout(1):  # not paced until midnight: refused at once
                # The retry of the first action, and actions for other people.
                for token, key in (("tok_1", "k1"), ("tok_2", "k2"), ("tok_3", "k3")):
                    with pytest.raises(RetryableCRMError, match="budget is spent") as later:
                        await target.execute(stage(token), CallContext(key))
    finally:
        await storage.close()
    assert first.value.retry_after is not None and first.value.retry_after > 30
    assert later.value.retry_after is not None and later.value.retry_after > 30
    assert sum(emulator.calls.values()) == sent  # nothing more was sent
