"""`provision` instructions and `doctor` checks for Salesforce, against the emulator's org."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
import pytest

from engine.config.fieldmap import load_field_map
from engine.storage import Storage
from engine.targets.salesforce.admin import doctor, provision_instructions
from engine.targets.salesforce.auth import ClientCredentials
from engine.targets.salesforce.target import SalesforceTarget
from tests.emulators.salesforce import SalesforceEmulator
from tests.emulators.salesforce_model import DEFAULT_LEAD_STATUSES, Org
from tests.support.paths import REPO

pytestmark = pytest.mark.anyio
FIELD_MAP = load_field_map(REPO / "rules" / "fields.yaml")
Checker = Callable[..., Awaitable[list[str]]]


@pytest.fixture
def check(storage: Storage) -> Checker:
    async def run(emulator: SalesforceEmulator, secret: str = "") -> list[str]:
        transport = httpx.ASGITransport(app=emulator.app())
        async with httpx.AsyncClient(transport=transport) as client:
            target = SalesforceTarget(
                client, instance_url="http://sf.test", field_map=FIELD_MAP,
                identities=storage.identities, rate_limits=storage.rate_limits,
                credentials=ClientCredentials(
                    emulator.client_id, secret or emulator.client_secret))
            return [str(finding) for finding in await doctor(target)]

    return run


def test_provision_names_every_field_with_its_type_and_flags() -> None:
    text = provision_instructions(FIELD_MAP)
    lines = text.splitlines()

    def line(name: str, after: str = "") -> str:
        start = lines.index(after) if after else 0
        return next(entry for entry in lines[start:] if f" {name} " in f"{entry} ")

    assert "Text(255)" in line("Deep_Link_Token__c") and \
        "External ID, Unique (case sensitive)" in line("Deep_Link_Token__c")
    assert line("Install_Date__c").endswith("Date")
    assert line("Last_Deep_Link_Claimed_At__c").endswith("Date/Time")
    assert line("Deep_Link_Platform__c").endswith("Picklist (ios, android, web)")
    assert "External ID" not in line("Deep_Link_Prefix__c")
    assert line("Email").endswith("standard field, nothing to create")
    assert "External ID, Unique" in line("Linkcrm_Deal_Key__c")
    assert "Deep_Link_Token__c" in line("Deep_Link_Token__c", "Opportunity fields:")
    assert "  - Deep Link Customer   (stage customer)" in lines
    assert "  - Prospecting   (deal stage new)" in lines
    assert "Lead Source picklist value: Deep Link   (new Leads get it)" in lines
    assert "must NOT be marked Converted" in text


async def test_a_well_set_up_org_has_no_problems(check: Checker) -> None:
    assert await check(SalesforceEmulator()) == []


async def test_wrong_credentials_are_the_one_problem(check: Checker) -> None:
    (problem,) = await check(SalesforceEmulator(), "wrong")
    assert problem.startswith("credentials: ") and "invalid_client" in problem
    assert "fix: check SF_INSTANCE_URL" in problem and "wrong" not in problem.split("fix:")[0]


@pytest.mark.parametrize(("breakage", "expected"), [
    ("not_external", "Lead field Deep_Link_Token__c is not an External ID marked Unique"),
    ("missing", "Lead field Referral_Date__c does not exist"),
    ("wrong_type", "Lead field Install_Date__c is of type string, which cannot hold a date"),
    ("read_only", "Lead field Deep_Link_Prefix__c is read-only"),
    ("no_status", "Lead Status has no active value 'Deep Link Customer'"),
    ("converted", "Lead Status 'Deep Link Customer' (stage customer) is a converted status"),
    ("deal_key", "Opportunity field Linkcrm_Deal_Key__c is not an External ID"),
    ("no_stage", "Opportunity StageName has no active value 'Prospecting'"),
])
async def test_each_problem_names_what_is_wrong_and_the_fix(
        check: Checker, breakage: str, expected: str) -> None:
    statuses = tuple((value, value == "Deep Link Customer" or converted)
                     for value, converted in DEFAULT_LEAD_STATUSES) \
        if breakage == "converted" else DEFAULT_LEAD_STATUSES
    if breakage == "no_status":
        statuses = tuple(s for s in statuses if s[0] != "Deep Link Customer")
    emulator = SalesforceEmulator(org=Org(lead_statuses=statuses))
    lead, opportunity = emulator.org.objects["Lead"], emulator.org.objects["Opportunity"]
    if breakage == "not_external":
        lead["Deep_Link_Token__c"].external_id = False
    elif breakage == "missing":
        del lead["Referral_Date__c"]
    elif breakage == "wrong_type":
        lead["Install_Date__c"].type = "string"
    elif breakage == "read_only":
        lead["Deep_Link_Prefix__c"].updateable = False
    elif breakage == "deal_key":
        opportunity["Linkcrm_Deal_Key__c"].unique = False
    elif breakage == "no_stage":
        opportunity["StageName"].picklist = ("Qualification", "Closed Won")
    problems = await check(emulator)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected) and "; fix: " in problems[0]
