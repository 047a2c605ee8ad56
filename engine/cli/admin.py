"""CRM set-up commands: `provision TARGET` and `doctor TARGET`."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click
import httpx

from engine import __version__
from engine.config.fieldmap import FieldMap
from engine.errors import ConfigError, CRMError
from engine.targets.registry import Finding, Provisioned, admin_targets, doctor, provision

from .output import FORMAT_OPTION, emit_json, fail
from .runtime import load_rules, load_settings, show_problems

T = TypeVar("T")
TARGET = click.argument("target", type=click.Choice(admin_targets()))
READY = "credentials work, every mapped field exists with a compatible type, stage values exist"


def _run(target: str, work: Callable[[FieldMap, httpx.AsyncClient], Awaitable[T]]) -> T:
    """Load the field map, run `work` with a client; credentials problems exit 2, a CRM that
    refuses a change exits 1."""
    field_map = load_rules(load_settings()).field_map

    async def run() -> T:
        headers = {"user-agent": f"linkcrm/{__version__}"}
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0),
                                     headers=headers) as client:
            return await work(field_map, client)

    try:
        return asyncio.run(run())
    except ConfigError as error:
        show_problems(error.problems)
        fail(f"set the {target} variables above", 2)
    except CRMError as error:
        fail(f"{error}; `linkcrm doctor {target}` lists what is wrong")


def _findings_json(findings: list[Finding]) -> list[dict[str, str]]:
    return [{"problem": f.problem, "fix": f.fix} for f in findings]


def _show(findings: list[Finding]) -> None:
    for finding in findings:
        click.echo(f"  - {finding.problem}")
        if finding.fix:
            click.echo(f"    fix: {finding.fix}")


@click.command("provision")
@TARGET
@FORMAT_OPTION
def provision_command(target: str, output_format: str) -> None:
    """Create in TARGET's CRM what the field map needs.

    \b
    hubspot     the property group and every mapped contact and deal property; the
                deep-link token and the deal key unique (hasUniqueValue). Idempotent.
    pipedrive   the person and deal custom fields (by their labels) and their options,
                the deal pipeline and its stages (by their names). Idempotent.
    salesforce  prints the exact fields, External ID flags and picklist values to create
                in Setup (the API has no safe way to create them).

    Then checks the CRM as `doctor` does and lists what only a person can fix (a field of
    the wrong type, a duplicate label) with how; exit 1 while anything is left. Reads the
    credentials from the environment (HUBSPOT_ACCESS_TOKEN; PIPEDRIVE_API_TOKEN and
    PIPEDRIVE_DOMAIN; base URLs from HUBSPOT_BASE_URL, PIPEDRIVE_BASE_URL) and the field map
    from LINKCRM_RULES.

    \b
    Examples:
      linkcrm provision hubspot
      linkcrm provision salesforce > salesforce-setup.txt
    """
    done: Provisioned = _run(target, lambda fm, client: provision(target, os.environ, fm,
                                                                  client))
    if output_format == "json":
        emit_json({"target": target, "changes": done.changes,
                   "remaining": _findings_json(done.remaining),
                   "instructions": done.instructions.splitlines()})
    elif done.instructions:
        click.echo(done.instructions, nl=False)
    else:
        for line in done.changes or ["nothing to create: everything the field map needs exists"]:
            click.echo(f"{target}: {line}")
        if done.remaining:
            click.echo(f"{target}: still to do by hand:")
            _show(done.remaining)
        else:
            click.echo(f"{target}: ready ({READY})")
    sys.exit(1 if done.remaining else 0)


@click.command("doctor")
@TARGET
@FORMAT_OPTION
def doctor_command(target: str, output_format: str) -> None:
    """Check that TARGET's CRM is ready for the field map: the credentials work, every
    mapped field exists with a compatible type (HubSpot's deep-link token and deal key
    unique; Salesforce's token and deal key External IDs), and every stage value exists.

    Each problem comes with its fix. Exit 0 when ready, 1 when anything needs fixing, 2 when
    the credentials are not set. Sends only reads.

    \b
    Examples:
      linkcrm doctor salesforce
      linkcrm doctor hubspot --format json
    """
    findings: list[Finding] = _run(target, lambda fm, client: doctor(target, os.environ, fm,
                                                                     client))
    if output_format == "json":
        emit_json({"target": target, "ok": not findings, "problems": _findings_json(findings)})
    elif findings:
        click.echo(f"{target}: {len(findings)} problem{'s' if len(findings) != 1 else ''}")
        _show(findings)
    else:
        click.echo(f"{target}: ready ({READY})")
    sys.exit(1 if findings else 0)
