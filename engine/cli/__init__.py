"""The `linkcrm` command: one click group, its commands grouped by job in sibling modules."""

from __future__ import annotations

import click

from engine import __version__
from engine.cli.admin import doctor_command, provision_command
from engine.cli.diff import diff
from engine.cli.evaluate import eval_command
from engine.cli.export import export_events
from engine.cli.ops import crm, events, purge, replay
from engine.cli.releases import rules_group
from engine.cli.rules import bench, explain, validate
from engine.cli.ruletesting import test
from engine.cli.samples import send_samples
from engine.cli.schema import schema_command
from engine.cli.service import migrate, serve, worker


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="linkcrm")
def main() -> None:
    """linkcrm: Tolinku deep-link webhooks into your CRM, mapped by YAML rules.

    \b
    Check and try rules before any webhook arrives:
      linkcrm validate rules/
      linkcrm test rules/
      linkcrm explain event.json --target hubspot
      linkcrm eval "lower(data.platform)" event.json
      linkcrm schema rules/
      linkcrm diff main-rules/ rules/ --since 7d

    \b
    Ship rules to every running serve and worker:
      linkcrm rules publish rules/
      linkcrm rules list
      linkcrm rules activate VERSION
      linkcrm rules publish --shadow rules/ && linkcrm rules shadow-report

    \b
    Run the service and look at what it did:
      linkcrm serve
      linkcrm send-samples && linkcrm crm contacts
      linkcrm events list --status dead

    \b
    Set up and check a CRM target:
      linkcrm provision hubspot
      linkcrm doctor hubspot
    """


for command in (validate, test, explain, eval_command, schema_command, diff, bench,
                rules_group):
    main.add_command(command)
for command in (serve, worker, migrate):
    main.add_command(command)
events.add_command(export_events)
for command in (events, replay, crm, purge):
    main.add_command(command)
main.add_command(send_samples)
for command in (provision_command, doctor_command):
    main.add_command(command)
