"""The `local` target (the embedded CRM) and the choice of targets from the environment."""

from __future__ import annotations

import httpx
import pytest

from engine.actions import CreateDeal, IdentityKey, SetStage, UpsertContact
from engine.config.fieldmap import FieldMap, load_field_map
from engine.errors import ConfigError, PermanentCRMError, RetryableCRMError
from engine.storage import Storage
from engine.targets.base import CallContext, Target
from engine.targets.local.target import LocalTarget
from engine.targets.registry import (
    REGISTRY,
    TargetContext,
    TargetKind,
    build_targets,
    select_targets,
)
from engine.worker.loop import Worker, WorkerOptions
from tests.support.paths import REPO
from tests.support.worker_helpers import shipped_rules

ROOT = REPO
TOKEN = (IdentityKey("deep_link_token", "tok_1"),)
BOTH = (IdentityKey("email", "ada@example.com"), IdentityKey("deep_link_token", "tok_1"))

pytestmark = pytest.mark.anyio
BACKENDS = ("sqlite", "postgresql")  # every test that uses a database runs on both



@pytest.fixture(scope="module")
def field_map() -> FieldMap:
    return load_field_map(ROOT / "rules" / "fields.yaml")


@pytest.fixture
def target(storage: Storage, field_map: FieldMap) -> LocalTarget:
    return LocalTarget(storage.local_crm, field_map)


async def test_local_target_satisfies_the_target_protocol(target: LocalTarget) -> None:
    as_target: Target = target  # mypy checks the protocol; this checks the name
    assert as_target.name == "local"


async def test_upsert_writes_set_every_time_and_set_once_only_when_empty(
    target: LocalTarget, storage: Storage
) -> None:
    first = await target.execute(UpsertContact(
        rule="r", identity=TOKEN, set={"deep_link_prefix": "a"},
        set_once={"first_touch_campaign": "spring"}), CallContext("k1"))
    again = await target.execute(UpsertContact(
        rule="r", identity=BOTH, set={"deep_link_prefix": "b", "email": "ada@example.com"},
        set_once={"first_touch_campaign": "autumn", "install_date": None}), CallContext("k2"))
    assert first.created and not again.created and first.record_id == again.record_id
    [contact] = await storage.local_crm.contacts()
    assert contact.fields == {"deep_link_prefix": "b", "first_touch_campaign": "spring",
                              "email": "ada@example.com"}
    assert set(contact.identities) == set(BOTH)


async def test_the_same_key_twice_changes_nothing_more(
    target: LocalTarget, storage: Storage
) -> None:
    action = UpsertContact(rule="r", identity=TOKEN, set={"deep_link_prefix": "a"})
    await target.execute(action, CallContext("k1"))
    before = await storage.local_crm.contacts()
    await target.execute(action, CallContext("k1"))
    after = await storage.local_crm.contacts()
    assert [(c.id, c.fields, c.stage) for c in before] == [(c.id, c.fields, c.stage) for c in after]


async def test_stages_only_move_forward_along_the_field_map_and_keep_history(
    target: LocalTarget, storage: Storage
) -> None:
    await target.execute(SetStage(rule="r", identity=TOKEN, stage="lead"), CallContext("k1", 7))
    await target.execute(SetStage(rule="r", identity=TOKEN, stage="customer"),
                         CallContext("k2", 8))
    back = await target.execute(SetStage(rule="r", identity=TOKEN, stage="lead"),
                                CallContext("k3", 9))
    assert "stays customer" in back.summary
    [contact] = await storage.local_crm.contacts()
    assert contact.stage == "customer"
    assert [(c.from_stage, c.to_stage, c.event_id) for c in contact.stage_history] == [
        (None, "lead", 7), ("lead", "customer", 8)]


async def test_an_unknown_stage_is_a_permanent_error(target: LocalTarget) -> None:
    with pytest.raises(PermanentCRMError, match="unknown stage 'golden'"):
        await target.execute(SetStage(rule="r", identity=TOKEN, stage="golden"), CallContext("k1"))


async def test_one_deal_per_key_ever(target: LocalTarget, storage: Storage) -> None:
    deal = CreateDeal(rule="r", identity=TOKEN, key="referral-tok_1", title="Referral: tok_1",
                      stage="new", amount=12, set={"referral_code": "tok_1"})
    first = await target.execute(deal, CallContext("k1"))
    second = await target.execute(
        CreateDeal(rule="r", identity=TOKEN, key="referral-tok_1", title="Other"),
        CallContext("k2"))
    assert first.created and not second.created and first.record_id == second.record_id
    [stored] = await storage.local_crm.deals()
    assert (stored.title, stored.stage, stored.amount, stored.fields) == (
        "Referral: tok_1", "new", 12.0, {"referral_code": "tok_1"})
    [contact] = await storage.local_crm.contacts()
    assert stored.contact_id == contact.id


async def test_a_storage_that_cannot_commit_is_a_retryable_error(
    target: LocalTarget, storage: Storage
) -> None:
    await storage.close()
    with pytest.raises(RetryableCRMError, match="local: "):
        await target.execute(UpsertContact(rule="r", identity=TOKEN), CallContext("k1"))


# -- choosing targets ---------------------------------------------------------------------------


def test_local_is_the_default_without_crm_credentials() -> None:
    assert select_targets({}) == ["local"]


def test_an_unknown_target_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as caught:
        select_targets({"LINKCRM_TARGETS": "local,hubspt"})
    [problem] = caught.value.problems
    assert problem.code == "unknown-target" and "'hubspt'" in problem.message
    assert "did you mean 'hubspot'" in problem.hint


def test_missing_and_partial_credentials_are_reported_together() -> None:
    with pytest.raises(ConfigError) as caught:
        select_targets({"LINKCRM_TARGETS": "pipedrive,salesforce",
                        "PIPEDRIVE_API_TOKEN": "x", "SF_INSTANCE_URL": "https://a"})
    messages = [p.message for p in caught.value.problems]
    assert messages == ["target 'pipedrive' needs PIPEDRIVE_DOMAIN",
                        "target 'salesforce' needs SF_CLIENT_ID, SF_CLIENT_SECRET"]
    with pytest.raises(ConfigError, match="salesforce credentials are incomplete"):
        select_targets({"SF_CLIENT_ID": "id"})


async def test_credentials_select_crms_through_the_registry(
    storage: Storage, field_map: FieldMap
) -> None:
    built: list[TargetContext] = []

    def fake_hubspot(context: TargetContext) -> Target:
        built.append(context)
        return LocalTarget(context.local_crm, context.field_map)

    registry = {**REGISTRY, "hubspot": TargetKind(("HUBSPOT_ACCESS_TOKEN",), fake_hubspot)}
    async with httpx.AsyncClient() as client:
        only_crm = build_targets({"HUBSPOT_ACCESS_TOKEN": "pat"}, storage, field_map, client,
                                 registry=registry)
        both = build_targets({"HUBSPOT_ACCESS_TOKEN": "pat", "LINKCRM_TARGETS": "local,hubspot"},
                             storage, field_map, client, registry=registry)
    assert len(only_crm) == 1 and len(both) == 2 and both[0].name == "local"
    assert built[0].client is client and built[0].environ["HUBSPOT_ACCESS_TOKEN"] == "pat"
    # A factory gets the stores a target may use, never the storage behind them.
    assert (built[0].identities, built[0].rate_limits, built[0].local_crm) == (
        storage.identities, storage.rate_limits, storage.local_crm)
    assert not hasattr(built[0], "storage")


def test_a_crm_not_wired_in_yet_refuses_with_a_clear_message() -> None:
    registry = {**REGISTRY, "hubspot": TargetKind(("HUBSPOT_ACCESS_TOKEN",), None)}
    with pytest.raises(ConfigError, match="not available in this build"):
        select_targets({"HUBSPOT_ACCESS_TOKEN": "pat"}, registry)


async def test_the_worker_runs_as_many_local_events_at_once_as_the_store_serves_well(
    storage: Storage, field_map: FieldMap
) -> None:
    # SQLite's writes share a group commit, so many events at once fill each commit;
    # PostgreSQL's each hold a pooled connection, so a few. `--concurrency` overrides both.
    target = LocalTarget(storage.local_crm, field_map)
    expected = 256 if type(storage).__name__.startswith("SQLite") else 4
    assert Worker(storage, shipped_rules(), [target]).lanes["local"].size == expected
    chosen = Worker(storage, shipped_rules(), [target], options=WorkerOptions(concurrency=3))
    assert chosen.lanes["local"].size == 3
