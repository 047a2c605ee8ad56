"""Every number a command takes is range-checked: a value out of range is a usage error (exit
2) naming the option and the range, never a traceback."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.cli.params import FiniteFloatRange

HUGE = str(2**70)


def _parameters() -> list[tuple[str, click.Parameter]]:
    found = []
    pending: list[tuple[str, click.Command]] = [("linkcrm", main)]
    while pending:
        path, command = pending.pop()
        found += [(f"{path} {param.name}", param) for param in command.params]
        if isinstance(command, click.Group):
            pending += [(f"{path} {name}", sub) for name, sub in command.commands.items()]
    return found


def test_every_numeric_parameter_has_both_bounds() -> None:
    numeric = [(where, param) for where, param in _parameters()
               if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType))]
    assert len(numeric) >= 10
    for where, param in numeric:
        assert isinstance(param.type, (click.IntRange, click.FloatRange)), where
        assert param.type.min is not None and param.type.max is not None, where
        if isinstance(param.type, click.FloatRange):
            assert isinstance(param.type, FiniteFloatRange), where  # nan is refused too


@pytest.mark.parametrize("args", [
    ["bench", "--seconds", "0"], ["bench", "--seconds", "nan"], ["bench", "--seconds", "inf"],
    ["bench", "--seconds", "-1"], ["bench", "--events", "0"], ["bench", "--events", HUGE],
    ["events", "show", "0"], ["events", "show", HUGE], ["replay", HUGE],
    ["events", "list", "--limit", "0"], ["events", "list", "--limit", HUGE],
    ["crm", "contacts", "--limit", HUGE], ["crm", "deals", "--limit", "-3"],
    ["purge", "--older-than", "99999999999w"], ["purge", "--older-than", f"{HUGE}d"],
    ["send-samples", "--wait", "nan"], ["send-samples", "--wait", "-1"],
    ["send-samples", "--url", "localhost:8000"], ["send-samples", "--url", "http://h:99999"],
    ["send-samples", "--token", " "],
    ["serve", "--port", "65536"], ["serve", "--concurrency", "0"],
    ["worker", "--concurrency", HUGE],
    ["diff", "a", "b", "--limit", "0"], ["diff", "a", "b", "--examples", "101"],
    ["diff", "a", "b", "--since", "5y"], ["events", "export", "--limit", HUGE],
    ["events", "export", "--since", "99999999999w"],
])
def test_out_of_range_values_are_usage_errors(args: list[str]) -> None:
    result = CliRunner().invoke(main, args, env={"WEBHOOK_SECRET": "whsec_x"})
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # no traceback
    assert "Invalid value for" in result.output, result.output
