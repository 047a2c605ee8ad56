"""The Salesforce emulator reads the records holding a value through an index: `find` and SOQL
`=` / IN / OR queries must answer what a scan of every record answers (the same records, in
table order, strings compared as before) however the records change."""

from __future__ import annotations

import random
from typing import Any

from starlette.testclient import TestClient

from tests.emulators.salesforce import SalesforceEmulator
from tests.emulators.salesforce_model import Org, SFError
from tests.emulators.salesforce_soql import parse

EMAILS = ["ada@example.com", "ADA@Example.com", "bob@example.com"]
TOKENS = ["tok_a", "TOK_A", "tok_b", "tok_c"]  # the External ID: case sensitive, unique
NAMES = ["Ada", "ada", "Bob"]
FIELDS = {"Email": EMAILS, "Deep_Link_Token__c": TOKENS, "FirstName": NAMES}
QUERIES = [  # what the target sends, then WHERE clauses that must be scanned
    "SELECT Id FROM Lead WHERE Deep_Link_Token__c IN ('tok_a', 'tok_b') OR Email = "
    "'ADA@example.COM'",
    "SELECT Id FROM Lead WHERE email IN ('bob@example.com', 'nobody@example.com') LIMIT 2",
    "SELECT Id, FirstName FROM Lead WHERE FirstName = 'ADA' OR FirstName = 'bob' OR "
    "Deep_Link_Token__c IN ('TOK_A', 'tok_c') ORDER BY FirstName DESC",
    "SELECT Id FROM Lead WHERE Email != 'ada@example.com'",
    "SELECT Id FROM Lead WHERE Email = NULL",
    "SELECT Id FROM Lead WHERE Deep_Link_Token__c NOT IN ('tok_a')",
    "SELECT Id FROM Lead WHERE (Email = 'bob@example.com') OR FirstName LIKE 'a%'",
    "SELECT Id FROM Lead WHERE Email = 'ada@example.com' AND FirstName = 'Ada'",
    "SELECT Id FROM Lead",
]


def scan_find(org: Org, name: str, value: Any) -> list[str]:
    """`Org.find` as a scan: every Lead, compared."""
    sensitive = org.fields("Lead")[name].case_sensitive

    def fold(v: Any) -> Any:
        return v if sensitive or not isinstance(v, str) else v.casefold()

    return [r["Id"] for r in org.records["Lead"].values() if fold(r.get(name)) == fold(value)]


def scan_select(org: Org, text: str) -> list[str]:
    """What a query answers when every record is tested (ORDER BY as the emulator sorts)."""
    query = parse(text, org.objects)
    selected = [r for r in org.rows(query.sobject) if query.where is None or query.where(r)]
    for name, descending in reversed(query.order):
        selected.sort(key=lambda r: (r.get(name) is None, str(r.get(name))), reverse=descending)
    return [r["Id"] for r in selected[: query.limit]]


def scan_holding(org: Org, name: str, value: Any) -> list[str]:
    """`Org.holding` as a scan: the Leads holding `value`, strings compared as SOQL does."""
    def fold(v: Any) -> Any:
        return v.casefold() if isinstance(v, str) else v

    return [r["Id"] for r in org.records["Lead"].values() if fold(r.get(name)) == fold(value)]


def assert_lookups_scan(emulator: SalesforceEmulator) -> None:
    org = emulator.org
    for name, values in FIELDS.items():
        probes: list[Any] = [*values, "nobody", None]  # None: the Leads without one
        for value in probes:
            found = [r["Id"] for r in org.find("Lead", name, value)]
            assert found == scan_find(org, name, value), (name, value)
            held = [r["Id"] for r in org.holding("Lead", {name: [value]})]
            assert held == scan_holding(org, name, value), (name, value)
    for text in QUERIES:
        assert [r["Id"] for r in emulator.select(text)[1]] == scan_select(org, text), text


def change(org: Org, rng: random.Random, ids: list[str]) -> None:
    """One write: a create, a seed (uniqueness bypassed, fields absent), or an update that
    sets, changes or empties (None) a looked-up field."""
    roll = rng.random()
    try:
        if not ids or roll < 0.25:
            values = {name: rng.choice(pool) for name, pool in FIELDS.items()
                      if rng.random() < 0.7}
            ids.append(org.save("Lead", None, {"LastName": "L", "Company": "C", **values}))
        elif roll < 0.3:
            ids.append(org.seed("Lead", LastName="L", Company="C",
                                Deep_Link_Token__c=rng.choice(TOKENS)))
        else:
            name = rng.choice(list(FIELDS))
            value = rng.choice([*FIELDS[name], None])
            org.save("Lead", rng.choice(ids), {name: value})
    except SFError as error:  # a token another Lead holds: refused, nothing stored
        assert error.code == "DUPLICATE_VALUE"


def test_lookups_follow_creates_updates_and_emptied_fields() -> None:
    emulator = SalesforceEmulator()
    rng = random.Random(11)
    ids: list[str] = []
    for step in range(400):
        change(emulator.org, rng, ids)
        if step >= 40:  # the indexes are built once there are records, then kept
            assert_lookups_scan(emulator)
    assert emulator.counters["updated Lead"] > 100


def test_lookups_follow_a_rollback_and_a_replaced_table() -> None:
    emulator = SalesforceEmulator()
    org, rng = emulator.org, random.Random(5)
    ids: list[str] = []
    for _ in range(60):
        change(org, rng, ids)
    assert_lookups_scan(emulator)
    # A Collections rollback puts back a copy of the table as it was: the records written
    # since (created ones too) are gone.
    snapshot = {k: dict(v) for k, v in org.records["Lead"].items()}
    for _ in range(30):
        change(org, rng, ids)
    org.records["Lead"] = snapshot
    ids[:] = list(snapshot)
    assert_lookups_scan(emulator)
    for _ in range(30):
        change(org, rng, ids)
        assert_lookups_scan(emulator)
    emulator.records = {"Lead": {}, "Opportunity": {}}  # how a test starts afresh
    assert_lookups_scan(emulator)
    assert org.find("Lead", "Email", EMAILS[0]) == []


def test_an_all_or_none_upsert_rolled_back_leaves_no_trace_in_lookups() -> None:
    emulator = SalesforceEmulator()
    upsert = "/services/data/v60.0/composite/sobjects/Lead/Deep_Link_Token__c"
    with TestClient(emulator.app()) as client:
        token = client.post("/services/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": emulator.client_id,
            "client_secret": emulator.client_secret}).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}

        def lead(key: str, **values: Any) -> dict[str, Any]:
            return {"attributes": {"type": "Lead"}, "Deep_Link_Token__c": key,
                    "LastName": "L", "Company": "C", **values}

        kept = client.patch(upsert, headers=headers, json={"allOrNone": True, "records": [
            lead("tok_a", Email="ada@example.com"), lead("tok_b")]})
        assert [r["created"] for r in kept.json()] == [True, True]
        assert_lookups_scan(emulator)
        undone = client.patch(upsert, headers=headers, json={"allOrNone": True, "records": [
            lead("tok_a", Email="bob@example.com"), lead("tok_c", Email="ada@example.com"),
            lead("tok_d", Email="not an email")]})
        assert [r["success"] for r in undone.json()] == [False, False, False]
        assert_lookups_scan(emulator)
        assert [r["Deep_Link_Token__c"] for r in emulator.find("Lead", "Email",
                                                               "ADA@example.com")] == ["tok_a"]
        assert emulator.find("Lead", "Deep_Link_Token__c", "tok_c") == []
        query = client.get("/services/data/v60.0/query/", headers=headers, params={
            "q": "SELECT Deep_Link_Token__c FROM Lead WHERE Email IN ('bob@example.com', "
                 "'ADA@EXAMPLE.COM') OR Deep_Link_Token__c = 'TOK_B'"})
        assert [r["Deep_Link_Token__c"] for r in query.json()["records"]] == ["tok_a", "tok_b"]
