"""`linkcrm provision` and `linkcrm doctor` through the real command against the emulators, and
`serve`/`worker` refusing to start while a CRM is not set up for the field map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import pytest

from engine.cli import main
from engine.cli.admin import READY
from engine.rules.files import load_ruleset
from tests.support.crm_stack import PIPELINE, running
from tests.support.service_process import ROOT, cli, cli_json, free_port, service_env, start_server

pytestmark = pytest.mark.anyio
FIELD_MAP = load_ruleset([ROOT / "rules"]).field_map



def test_provision_and_doctor_have_help_with_an_example() -> None:
    for name in ("provision", "doctor"):
        command = main.commands[name]
        assert isinstance(command, click.Command) and command.help is not None
        assert "Example" in command.help, name
    done = cli("doctor", "--help", env={})
    assert done.returncode == 0 and "linkcrm doctor salesforce" in done.stdout
    unknown = cli("doctor", "hubsopt", env={})
    assert unknown.returncode == 2 and "'hubsopt' is not one of" in unknown.stderr


async def test_hubspot_doctor_finds_what_provision_creates(tmp_path: Path) -> None:
    async with running(FIELD_MAP, provision=False) as stack:
        env = service_env(tmp_path, **stack.environ("hubspot"))
        sick = cli("doctor", "hubspot", env=env)
        assert sick.returncode == 1, sick.stderr
        assert "contacts property 'deep_link_token' does not exist" in sick.stdout
        assert "    fix: run `linkcrm provision hubspot`" in sick.stdout
        report = json.loads(cli("doctor", "hubspot", "--format", "json", env=env).stdout)
        assert report["target"] == "hubspot" and report["ok"] is False
        assert {"problem": "deals property 'linkcrm_deal_key' does not exist",
                "fix": "run `linkcrm provision hubspot`"} in report["problems"]

        made = cli("provision", "hubspot", env=env)
        assert made.returncode == 0, made.stdout + made.stderr
        assert "hubspot: contacts property deep_link_token (unique): created" in made.stdout
        assert "hubspot: deals property linkcrm_deal_key (unique): created" in made.stdout
        assert made.stdout.endswith("hubspot: ready (credentials work, every mapped field "
                                    "exists with a compatible type, stage values exist)\n")
        assert stack.hubspot.contacts.properties["deep_link_token"].hasUniqueValue
        again = cli_json("provision", "hubspot", env=env)
        assert again["remaining"] == [] and again["changes"]
        assert all(line.endswith("already exists") for line in again["changes"])
        assert cli("doctor", "hubspot", env=env).returncode == 0

        # A property of the wrong type, then a token HubSpot refuses.
        stack.hubspot.define_property("contacts", "install_date", "number")
        wrong = cli_json_failing("doctor", "hubspot", env=env)
        assert [p["problem"] for p in wrong["problems"]] == [
            "contacts property 'install_date' has type number, linkcrm writes date"]
        refused = cli("doctor", "hubspot", env={**env, "HUBSPOT_ACCESS_TOKEN": "pat-wrong"})
        assert refused.returncode == 1 and "cannot read HubSpot properties" in refused.stdout
        assert "fix: set HUBSPOT_ACCESS_TOKEN" in refused.stdout
    unset = cli("provision", "hubspot", env=service_env(tmp_path))
    assert unset.returncode == 2 and "HUBSPOT_ACCESS_TOKEN is not set" in unset.stderr


def cli_json_failing(*args: str, env: dict[str, str]) -> Any:
    done = cli(*args, "--format", "json", env=env)
    assert done.returncode == 1, done.stderr
    return json.loads(done.stdout)


async def test_pipedrive_provision_creates_fields_pipeline_and_stages(
        tmp_path: Path) -> None:
    async with running(FIELD_MAP, provision=False, pipeline=False) as stack:
        env = service_env(tmp_path, **stack.environ("pipedrive"))
        sick = cli_json_failing("doctor", "pipedrive", env=env)
        assert {"problem": "pipeline 'Deep Link Referrals' does not exist in Pipedrive",
                "fix": "run `linkcrm provision pipedrive` to create the pipeline 'Deep Link "
                       "Referrals' with the stages 'Qualified', 'Won' (or create them in "
                       "Pipedrive: Settings > Pipelines), or change deal_pipeline/deal_stages "
                       "for pipedrive in fields.yaml"} in sick["problems"]
        made = cli("provision", "pipedrive", env=env)
        assert made.returncode == 0, made.stdout + made.stderr
        assert "pipedrive: created person field 'Deep link token' (varchar)" in made.stdout
        assert "pipedrive: created deal field 'linkcrm deal key' (varchar)" in made.stdout
        assert "pipedrive: created pipeline 'Deep Link Referrals'\n" \
               "pipedrive: created stage(s) 'Qualified', 'Won' in pipeline 'Deep Link " \
               "Referrals'\n" in made.stdout
        assert stack.pipedrive.stage_names(PIPELINE[0]) == PIPELINE[1]
        assert cli("doctor", "pipedrive", env=env).returncode == 0
        again = cli("provision", "pipedrive", env=env)
        assert again.returncode == 0
        assert again.stdout == (
            "pipedrive: pipeline 'Deep Link Referrals': already exists\n"
            "pipedrive: stage(s) 'Qualified', 'Won' of pipeline 'Deep Link Referrals': "
            "already exist\n"
            f"pipedrive: ready ({READY})\n")
        assert len(stack.pipedrive.pipelines) == 2  # the account's own, and this one
        refused = cli_json_failing("doctor", "pipedrive",
                                   env={**env, "PIPEDRIVE_API_TOKEN": "wrong"})
        [problem] = refused["problems"]
        assert "the API token was refused" in problem["problem"]


async def test_salesforce_provision_prints_the_setup_and_doctor_checks_the_org(
        tmp_path: Path) -> None:
    printed = cli("provision", "salesforce", env=service_env(tmp_path))
    assert printed.returncode == 0, printed.stderr
    token_line = next(line for line in printed.stdout.splitlines()
                      if "Deep_Link_Token__c" in line)
    assert "External ID, Unique (case sensitive)" in token_line
    async with running(FIELD_MAP, key_dir=tmp_path) as stack:  # JWT bearer credentials
        env = service_env(tmp_path, **stack.environ("salesforce"))
        healthy = cli("doctor", "salesforce", env=env)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert healthy.stdout.startswith("salesforce: ready")
        stack.salesforce.org.objects["Lead"]["Deep_Link_Token__c"].external_id = False
        sick = cli_json_failing("doctor", "salesforce", env=env)
        [problem] = sick["problems"]
        assert problem["problem"].startswith("Lead field Deep_Link_Token__c is not an External "
                                             "ID marked Unique")
        assert "tick External ID and Unique" in problem["fix"]
        other = {**env, "SF_USERNAME": "someone@else.example"}
        refused = cli("doctor", "salesforce", env=other)
        assert refused.returncode == 1 and "credentials: " in refused.stdout


async def test_serve_and_worker_refuse_to_start_until_pipedrive_is_provisioned(
        tmp_path: Path) -> None:
    async with running(FIELD_MAP, provision=False) as stack:
        env = service_env(tmp_path, **stack.environ("local", "pipedrive"))
        assert cli("migrate", env=env).returncode == 0
        for command in (["worker"], ["serve", "--port", str(free_port())]):
            refused = cli(*command, env=env, timeout=30)
            assert refused.returncode == 1, (command, refused.stderr)
            assert "pipedrive: target-not-set-up: person field 'Deep link token' does not " \
                   "exist in Pipedrive" in refused.stderr
            assert "hint: run `linkcrm provision pipedrive` to create it" in refused.stderr
        assert cli("provision", "pipedrive", env=env).returncode == 0
        server = start_server(env)  # now it starts, and answers /readyz
        assert server.stop() in (0, -15)


async def test_serve_refuses_wrong_crm_credentials_but_starts_through_an_outage(
        tmp_path: Path) -> None:
    """Every enabled CRM's credentials are checked before the port is bound: a wrong HubSpot
    token or Salesforce secret stops `serve` (exit 1) with the fix; a CRM that cannot be
    reached is said to be unreachable, not blamed on the credentials, and serve starts."""
    async with running(FIELD_MAP) as stack:
        env = service_env(tmp_path, **stack.environ("local", "hubspot", "salesforce"))
        assert cli("migrate", env=env).returncode == 0
        wrong = {"HUBSPOT_ACCESS_TOKEN": "pat-na1-wrong", "SF_CLIENT_SECRET": "wrong-secret"}
        for name, variable in (("hubspot", "HUBSPOT_ACCESS_TOKEN"),
                               ("salesforce", "SF_CLIENT_SECRET")):
            refused = cli("serve", "--port", str(free_port()),
                          env={**env, variable: wrong[variable]}, timeout=30)
            assert refused.returncode == 1, refused.stderr
            lines = refused.stderr.splitlines()
            assert lines[-1] == f"error: {name} refused the credentials: fix them as said " \
                                "above, then start again"
            problem = next(line for line in lines if line.startswith(f"{name}: "))
            assert problem.startswith(f"{name}: credentials-refused: ")
            assert variable in problem and wrong[variable] not in refused.stderr
        down = {**env, "SF_INSTANCE_URL": f"http://127.0.0.1:{free_port()}",
                "HUBSPOT_BASE_URL": f"http://127.0.0.1:{free_port()}"}
        server = start_server(down)
        try:
            log = server.log.read_text()
        finally:
            assert server.stop() in (0, -15)
    for name in ("hubspot", "salesforce"):
        assert f"{name} cannot be reached at start-up, so its credentials are not checked " \
               "yet" in log
    assert "refused the credentials" not in log
