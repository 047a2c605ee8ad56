"""`linkcrm diff OLD NEW` through the real command line: the recorded story from the database
and from an export file, the three formats, --exit-code, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_cli_export import database, linkcrm
from tests.support.diff_story import RULES, TOKEN, edited_rules, record, recorded_story
from tests.support.postgres import fresh_schema, require_postgres, schema_url
from tests.support.service_process import service_env

STORY_CHANGES = [
    ["install-creates-lead", "upsert_contact", "set_once.first_touch_platform", "changed", 1],
    ["install-creates-lead", "set_stage", None, "starts-failing", 1],
    ["referral-signup-creates-lead", "upsert_contact", "set.deep_link_prefix", "added", 1],
    ["referral-signup-creates-lead", "set_stage", "stage", "changed", 1],
    ["referral-converts", "create_deal", None, "dropped-action", 1],
    ["app-identifies-user", "upsert_contact", "set.name", "removed", 1],
]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return service_env(tmp_path)


@pytest.fixture
def new_rules(tmp_path: Path) -> Path:
    return edited_rules(tmp_path / "new")


def changes(document: dict[str, Any]) -> list[list[Any]]:
    return [[c["rule"], c["action"], c["field"], c["change"], c["events"]]
            for c in document["changes"]]


def story_lines() -> str:
    return "".join(json.dumps(envelope) + "\n" for envelope in recorded_story())


def test_diff_of_the_recorded_story_shows_exactly_the_changed_fields(
        env: dict[str, str], new_rules: Path) -> None:
    ids = record(database(env), recorded_story())
    done = linkcrm("diff", str(RULES), str(new_rules), "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert changes(document) == STORY_CHANGES
    assert (document["events"], document["changed_events"], document["unchanged_events"]) == (
        5, 4, 1)
    assert document["compared_as"] == "canonical" and document["skipped"] == {}
    first = document["changes"][0]["examples"][0]
    assert first == {"event": f"event {ids[1]}", "id": ids[1], "event_type": "install.tracked",
                     "identity": {"deep_link_token": TOKEN}, "before": "ios", "after": "iOS"}
    text = linkcrm("diff", str(RULES), str(new_rules), env=env)
    assert text.returncode == 0
    assert "5 events from " in text.stdout and ": 4 plan differently, 1 the same" in text.stdout
    assert "  create_deal: deal no longer created in 1 event\n" in text.stdout
    assert (f'      event {ids[1]} (install.tracked; deep_link_token={TOKEN}): "ios" -> "iOS"'
            in text.stdout.splitlines())


def test_export_and_diff_read_postgresql_alike(env: dict[str, str], new_rules: Path) -> None:
    require_postgres()
    with fresh_schema() as schema:
        env["LINKCRM_DATABASE_URL"] = schema_url(schema)
        ids = record(env["LINKCRM_DATABASE_URL"], recorded_story())
        exported = linkcrm("events", "export", "--limit", "4", env=env)
        assert exported.returncode == 0, exported.stderr
        lines = [json.loads(line) for line in exported.stdout.splitlines()]
        assert [line["id"] for line in lines] == ids[::-1][:4]
        done = linkcrm("diff", "rules", str(new_rules), "--format", "json", env=env)
        assert done.returncode == 0, done.stderr
        assert changes(json.loads(done.stdout)) == STORY_CHANGES


def test_exit_code_says_whether_anything_changes(env: dict[str, str], new_rules: Path) -> None:
    record(database(env), recorded_story())
    assert linkcrm("diff", "rules", str(new_rules), "--exit-code", env=env).returncode == 1
    assert linkcrm("diff", "rules", str(new_rules), env=env).returncode == 0
    same = linkcrm("diff", "rules", "rules", "--exit-code", env=env)
    assert same.returncode == 0, same.stderr
    assert same.stdout.rstrip().endswith(
        "no changes: every event plans the same under both rule sets")


MARKDOWN = """\
### linkcrm diff: <code>rules</code> → <code>NEW</code>

**4 of 5 events plan differently** (events from standard input; comparing canonical fields).

| rule | action | field | change | events |
| --- | --- | --- | --- | ---: |
| install-creates-lead | upsert_contact | set_once.first_touch_platform | value changes | 1 |
| install-creates-lead | set_stage |  | starts failing | 1 |
| referral-signup-creates-lead | upsert_contact | set.deep_link_prefix | now written | 1 |
| referral-signup-creates-lead | set_stage | stage | value changes | 1 |
| referral-converts | create_deal |  | deal no longer created | 1 |
| app-identifies-user | upsert_contact | set.name | no longer written | 1 |

<details><summary>Examples</summary>

**install-creates-lead · upsert_contact set_once.first_touch_platform**: value changes

- standard input:2 (install.tracked; deep_link_token=ref_sample_sam): <code>"ios"</code> → \
<code>"iOS"</code>

**install-creates-lead · set_stage**: starts failing

- standard input:2 (install.tracked; deep_link_token=ref_sample_sam): <code>stage="lead"</code> \
→ <code>error: rule 'install-creates-lead', action 1 (set_stage), event install.tracked: \
identity is entirely null (deep_link_token: data.missing)</code>

**referral-signup-creates-lead · upsert_contact set.deep_link_prefix**: now written

- standard input:3 (referral.created; deep_link_token=ref_sample_sam): <code>(not written)</code> \
→ <code>"referral"</code>

**referral-signup-creates-lead · set_stage stage**: value changes

- standard input:3 (referral.created; deep_link_token=ref_sample_sam): <code>"lead"</code> → \
<code>"customer"</code>

**referral-converts · create_deal**: deal no longer created

- standard input:4 (referral.completed; deep_link_token=ref_sample_sam): <code>key="referral-\
ref_sample_sam", title="Referral: ref_sample_sam", stage="new", set.referral_code=\
"ref_sample_sam"</code> → <code>(not planned)</code>

**app-identifies-user · upsert_contact set.name**: no longer written

- standard input:5 (app.user_identified; deep_link_token=ref_sample_sam, email=sam.sample&#64;\
example.com): <code>"Sam Sample"</code> → <code>(not written)</code>

</details>
"""


def test_markdown_output_for_a_pull_request_comment(env: dict[str, str], tmp_path: Path) -> None:
    new = edited_rules(tmp_path / "NEW")
    done = linkcrm("diff", "rules", str(new), "--events", "-", "--format", "markdown",
                   env=env, stdin=story_lines())
    assert done.returncode == 0, done.stderr
    assert done.stdout.replace(str(new), "NEW") == MARKDOWN


def test_markdown_escapes_what_github_would_act_on(env: dict[str, str], tmp_path: Path) -> None:
    new = edited_rules(tmp_path / "new", [
        ("deep_link_prefix: data.prefix\n          set_once:\n            first_touch_campaign",
         "deep_link_prefix: \"'x'\"\n          set_once:\n            first_touch_campaign")])
    hostile = "@team *bold* <img src=x> | `code` #12 [link](http://x) $x$ ~~s~~ &amp; _a_"
    event = {"event": "install.tracked", "timestamp": "2026-03-01T00:00:00Z",
             "data": {"token": "t", "prefix": hostile}}
    done = linkcrm("diff", "rules", str(new), "--events", "-", "--format", "markdown",
                   env=env, stdin=json.dumps(event) + "\n")
    assert done.returncode == 0, done.stderr
    example = next(line for line in done.stdout.splitlines() if line.startswith("- "))
    value = example.split("<code>", 1)[1].split("</code>", 1)[0]
    for active in "@*<>|`#[]$~&_":
        assert active not in value.replace("&#", "").replace(";", ""), active
    assert "&#64;team &#42;bold&#42; &#60;img" in value


def test_export_then_diff_from_a_redacted_file_gives_the_same_changes(
        env: dict[str, str], new_rules: Path, tmp_path: Path) -> None:
    record(database(env), recorded_story())
    exported = tmp_path / "events.jsonl"
    done = linkcrm("events", "export", "--redact", "--output", str(exported), env=env)
    assert done.returncode == 0, done.stderr
    text = exported.read_text(encoding="utf-8")
    for personal in ("sam.sample@example.com", '"Sam"', "Sample"):
        assert personal not in text
    from_db = json.loads(linkcrm("diff", "rules", str(new_rules), "--format", "json",
                                 env=env).stdout)
    env["LINKCRM_DATABASE_URL"] = "sqlite:////nonexistent/never.db"  # the file needs no database
    from_file = json.loads(linkcrm("diff", "rules", str(new_rules), "--events", str(exported),
                                   "--format", "json", env=env).stdout)
    assert changes(from_file) == changes(from_db) == STORY_CHANGES
    assert from_file["changed_events"] == from_db["changed_events"] == 4
    name = from_file["changes"][-1]["examples"][0]
    assert name["event"] == f"{exported}:1"  # newest first: the identify call
    assert name["id"] == from_db["changes"][-1]["examples"][0]["id"]
    first, last = name["before"].split(" ")
    assert first.startswith("name-") and last.startswith("name-")
    assert name["identity"]["email"].endswith("@redacted.invalid")
    assert name["identity"]["deep_link_token"] == TOKEN  # tokens are kept: rules key on them


def test_a_limit_reads_fewer_events(env: dict[str, str], new_rules: Path) -> None:
    record(database(env), recorded_story())
    newest = json.loads(linkcrm("diff", "rules", str(new_rules), "--limit", "1", "--format",
                                "json", env=env).stdout)
    assert (newest["events"], changes(newest)) == (1, [STORY_CHANGES[-1]])
    first = json.loads(linkcrm("diff", "rules", str(new_rules), "--events", "-", "--limit", "2",
                               "--format", "json", env=env, stdin=story_lines()).stdout)
    assert (first["events"], changes(first)) == (2, [STORY_CHANGES[0], STORY_CHANGES[1]])


def test_purged_and_unreadable_bodies_are_counted_not_compared(env: dict[str, str],
                                                               new_rules: Path) -> None:
    record(database(env), recorded_story()[:2], bodies=[b"not json"])
    done = linkcrm("diff", "rules", str(new_rules), "--format", "json", env=env)
    document = json.loads(done.stdout)
    assert (document["events"], document["skipped"]) == (2, {"body not JSON": 1})
    assert "; skipped 1 (body not JSON)" in linkcrm("diff", "rules", str(new_rules),
                                                    env=env).stdout


RENAMED = [("    hubspot: first_touch_campaign\n", "    hubspot: utm_first_campaign\n")]


@pytest.mark.parametrize(("lines", "message"), [
    ('{"event": "test"}\n{"event": "test", "data": {}\n', "events.jsonl:2: not JSON: "
     "Expecting ',' delimiter at column 29; each line is one event"),
    ('[{"event": "test"}]\n', "events.jsonl:1: an array, not an object; each line is one "
     "event: a line of `linkcrm events export`"),
    ('\n{"id": 1, "envelope": "install"}\n', 'events.jsonl:2: "envelope" is a string, not an '
     'object {"event", "timestamp", "data"}'),
    ('{"data": {}}\n', 'events.jsonl:1: an object with neither "envelope" nor "event"'),
    ('{"event": "test", "data": {"x": NaN}}\n', "events.jsonl:1: not JSON: NaN is not valid "
     "JSON"),
    ('{"event": "test", "data": "\xff"}\n', "events.jsonl:1: not UTF-8 text (byte 28)"),
])
def test_a_file_that_is_not_json_lines_names_the_line(env: dict[str, str], tmp_path: Path,
                                                      lines: str, message: str) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(lines, encoding="latin-1" if "\xff" in lines else "utf-8")
    done = linkcrm("diff", "rules", "rules", "--events", str(path), env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert f"error: {tmp_path}/{message}" in done.stderr


def test_bad_usage_and_rules_that_do_not_load_exit_2(env: dict[str, str], tmp_path: Path) -> None:
    unknown = linkcrm("diff", "nope", "rules", env=env)
    assert unknown.returncode == 2
    assert "error: OLD: unknown rule set 'nope': there is no rule folder or file" in \
        unknown.stderr
    broken = edited_rules(tmp_path / "broken", [("stage: customer", "stage: custmer")])
    failed = linkcrm("diff", "rules", str(broken), env=env)
    assert failed.returncode == 2
    assert "unknown-stage" in failed.stderr or "custmer" in failed.stderr
    assert f"error: NEW: the rules in {broken} do not load" in failed.stderr
    both = linkcrm("diff", "rules", "rules", "--events", "x", "--since", "1d", env=env)
    assert both.returncode == 2 and "--since reads the database" in both.stderr
    missing = linkcrm("diff", "rules", "rules", "--events", str(tmp_path / "none"), env=env)
    assert missing.returncode == 2
    assert f"{tmp_path}/none: cannot read it: No such file or directory" in missing.stderr
    assert linkcrm("diff", "rules", "rules", "--format", "html", env=env).returncode == 2
    env["LINKCRM_DATABASE_URL"] = f"sqlite:///{tmp_path / 'no.db'}"
    no_db = linkcrm("diff", "rules", "rules", env=env)
    assert no_db.returncode == 2 and "no.db" in no_db.stderr


def test_field_maps_that_cannot_be_compared_say_why(env: dict[str, str], tmp_path: Path) -> None:
    renamed = edited_rules(tmp_path / "renamed", (), [
        ("first_touch_campaign:\n    type: string\n    label: First-touch campaign\n"
         "    hubspot: first_touch_campaign",
         "first_touch_campaign:\n    type: string\n    label: First-touch campaign\n"
         "    hubspot: utm_first_campaign")])
    done = linkcrm("diff", "rules", str(renamed), "--events", "-", env=env,
                   stdin=story_lines())
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: the field maps of OLD and NEW cannot be compared:",
        "  - field 'first_touch_campaign': its hubspot field is 'first_touch_campaign' in OLD,"
        " 'utm_first_campaign' in NEW",
        "  a diff compares canonical fields, so it cannot tell what a changed field or stage "
        "mapping does; compare what one CRM receives with --target hubspot (or salesforce, "
        "pipedrive, local)"]
    hubspot = linkcrm("diff", "rules", str(renamed), "--events", "-", "--target", "hubspot",
                      "--format", "json", env=env, stdin=story_lines())
    assert hubspot.returncode == 0, hubspot.stderr
    assert changes(json.loads(hubspot.stdout)) == [
        ["install-creates-lead", "upsert_contact", "set_once.first_touch_campaign", "removed",
         1],
        ["install-creates-lead", "upsert_contact", "set_once.utm_first_campaign", "added", 1]]
