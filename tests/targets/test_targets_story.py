"""The shipped rules' story through `linkcrm serve` into all four targets at once: the same end
state in the embedded CRM, HubSpot, Salesforce and Pipedrive (emulated on loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.rules.files import load_ruleset
from engine.storage import open_storage
from tests.support import crm_readback
from tests.support.crm_stack import running
from tests.support.service_process import ROOT, cli, service_env, start_server, wait_for

pytestmark = pytest.mark.anyio
FIELD_MAP = load_ruleset([ROOT / "rules"]).field_map
TOKEN = "ref_sample_sam"  # `linkcrm send-samples`: install, sign-up, conversion, identify
CONTACT = {
    "deep_link_token": TOKEN, "deep_link_prefix": "invite",
    "first_touch_campaign": "spring-referrals", "first_touch_platform": "ios",
    "install_date": "2026-03-01", "referral_source": "tok_alice", "referral_date": "2026-03-01",
    "conversion_date": "2026-03-20", "app_user_id": "user_42",
    "email": "sam.sample@example.com", "first_name": "Sam", "last_name": "Sample",
    "name": "Sam Sample", "stage": "customer",
}
DEAL = {"key": f"referral-{TOKEN}", "title": f"Referral: {TOKEN}", "stage": "new",
        "referral_code": TOKEN}



async def test_the_story_reaches_all_four_targets_with_the_same_end_state(
        tmp_path: Path) -> None:
    # Salesforce signs in with the JWT bearer flow here (client credentials elsewhere).
    async with running(FIELD_MAP, key_dir=tmp_path) as stack:
        env = service_env(tmp_path, **stack.environ())
        server = start_server(env)
        try:
            sent = cli("send-samples", "--url", server.url, env=env)
            assert sent.returncode == 0, sent.stderr
            wait_for(lambda: server.metric("linkcrm_inbox_events", status="processed") == 4,
                     timeout=30, what="four processed events")
        finally:
            assert server.stop() in (0, -15), server.log.read_text()
        storage = open_storage(env["LINKCRM_DATABASE_URL"])
        try:
            found = crm_readback.everywhere(await crm_readback.local(storage), stack,
                                            FIELD_MAP)
            outcomes = [o for e in await storage.inbox.list_events() for o in
                        await storage.outcomes.of_event(e.id)]
        finally:
            await storage.close()
        assert stack.salesforce.schema_violations == []
    assert sorted({o.target for o in outcomes}) == ["hubspot", "local", "pipedrive",
                                                    "salesforce"]
    assert {o.status for o in outcomes} == {"ok"}
    for target, (contacts, deals) in found.items():
        assert len(contacts) == 1, f"{target}: {contacts}"
        contact = dict(contacts[0])
        contact_id = contact.pop("id")
        assert contact == crm_readback.mapped(FIELD_MAP, target, CONTACT), target
        assert deals == [{**crm_readback.mapped(FIELD_MAP, target, DEAL),
                          "contact": contact_id}], target
