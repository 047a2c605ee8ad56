"""Permanent CRM errors become dead letters carrying the CRM's own message and the rule; after
the cause is fixed, `linkcrm replay` (the real command) delivers them, redoing nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.rules.files import load_ruleset
from engine.runtime.metrics import Metrics
from engine.runtime.settings import Settings
from engine.storage import Storage, open_storage
from engine.worker.assembly import open_worker
from tests.support.crm_stack import running
from tests.support.service_process import ROOT, cli, cli_json, service_env
from tests.support.worker_helpers import store

pytestmark = pytest.mark.anyio
RULES = load_ruleset([ROOT / "rules"])
CLOSED = "Campaign 'spring' is closed: new Leads need an approved campaign"



def spring_is_closed(sobject: str, record: Mapping[str, Any]) -> str | None:
    """A Salesforce validation rule an admin added."""
    if sobject == "Lead" and record.get("Deep_Link_Campaign__c") == "spring":
        return CLOSED
    return None


async def work(storage: Storage, env: dict[str, str]) -> None:
    """What `linkcrm worker` does, until nothing is left to do."""
    async with open_worker(storage, RULES, Settings.from_env(env), env,
                           metrics=Metrics()) as worker:
        await worker.run_until_idle()


async def test_permanent_errors_are_dead_lettered_then_replayed_after_the_fix(
        tmp_path: Path) -> None:
    async with running(RULES.field_map) as stack:
        # HubSpot lacks a property the field map names; Salesforce refuses the Lead.
        del stack.hubspot.contacts.properties["first_touch_campaign"]
        stack.salesforce.org.validation_rules.append(spring_is_closed)
        env = service_env(tmp_path, **stack.environ())
        storage = open_storage(env["LINKCRM_DATABASE_URL"])
        await storage.migrate()
        try:
            event_id = await store(storage, "install.tracked", token="tok_dead",
                                   campaign="spring", platform="ios", prefix="invite")
            await work(storage, env)

            [dead] = cli_json("events", "list", "--status", "dead", env=env)
            assert dead["id"] == event_id
            shown = cli_json("events", "show", str(event_id), env=env)
            by_target: dict[str, list[dict[str, Any]]] = {}
            for outcome in shown["outcomes"]:
                by_target.setdefault(outcome["target"], []).append(outcome)
            [hubspot] = [o for o in by_target["hubspot"] if o["status"] == "dead"]
            assert (hubspot["rule"], hubspot["action"], hubspot["attempts"]) == (
                "install-creates-lead", "upsert_contact", 1)
            # HubSpot's own words, which quote the property.
            assert "VALIDATION_ERROR: Property values were not valid" in hubspot["error"]
            assert 'Property \\"first_touch_campaign\\" does not exist' in hubspot["error"]
            [salesforce] = [o for o in by_target["salesforce"] if o["status"] == "dead"]
            assert salesforce["rule"] == "install-creates-lead"
            assert f"FIELD_CUSTOM_VALIDATION_EXCEPTION: {CLOSED}" in salesforce["error"]
            # The other targets, and the rule's other action, were not held back.
            assert {o["status"] for t in ("local", "pipedrive") for o in by_target[t]} == {"ok"}
            assert [o["status"] for o in by_target["hubspot"]].count("ok") == 1
            for line in ("hubspot: rule 'install-creates-lead', upsert_contact #0: ",
                         "salesforce: rule 'install-creates-lead', upsert_contact #0: "):
                assert line in shown["last_error"]
            listed = cli("events", "list", "--status", "dead", env=env).stdout
            assert "dead" in listed and "rule 'install-creates-lead'" in listed

            recorded = await storage.outcomes.of_event(event_id)
            before = {(o.target, o.action_kind): o for o in recorded
                      if o.status == "ok"}

            # The fixes: provision the property; the admin relaxes the validation rule.
            fixed = cli("provision", "hubspot", env=env)
            assert "contacts property first_touch_campaign: created" in fixed.stdout, fixed
            stack.salesforce.org.validation_rules.remove(spring_is_closed)
            replayed = cli_json("replay", "--all-dead", env=env)
            assert (replayed["requeued"], replayed["refused"], replayed["pinned"]) == (
                [event_id], [], False)
            await work(storage, env)

            event = await storage.inbox.get(event_id)
            assert event is not None and event.status == "processed"
            outcomes = await storage.outcomes.of_event(event_id)
        finally:
            await storage.close()
        [contact] = stack.hubspot.contacts.records.values()
        assert contact.properties["first_touch_campaign"] == "spring"
        [lead] = stack.salesforce.leads
        assert lead["Deep_Link_Campaign__c"] == "spring"
        assert lead["Status"] == "Open - Not Contacted"
    # Replay redid only the dead actions: the successes stand as they were.
    assert {(o.target, o.action_kind, o.status) for o in outcomes} == {
        (target, kind, "ok") for target in ("local", "hubspot", "salesforce", "pipedrive")
        for kind in ("upsert_contact", "set_stage")}
    assert len(before) == 6
    assert all(before[(o.target, o.action_kind)] == o for o in outcomes
               if (o.target, o.action_kind) in before)
