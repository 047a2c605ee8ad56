"""Which rule set a command means: `resolve_ruleset(ref)` for `diff OLD NEW`.

Today a ref is a rule folder or file. Published versions and `active` plug in here, before the
path lookup, so every command that takes a ref gets them at once.
"""

from __future__ import annotations

from pathlib import Path

from engine.rules.files import load_ruleset
from engine.rules.model import RuleSet


class UnknownRuleSetError(LookupError):
    """A ref that names no rule set; the message says what a ref may be."""


def resolve_ruleset(ref: str) -> RuleSet:
    """The rule set `ref` names: a rule folder (rule files, their tests, fields.yaml) or a rule
    file. Raises UnknownRuleSetError for a ref that names none, and ConfigError (with every
    problem) for rules that do not load."""
    path = Path(ref)
    if not ref.strip() or not path.exists():
        raise UnknownRuleSetError(
            f"unknown rule set {ref!r}: there is no rule folder or file by that name; give "
            "the folder that holds the rule files and fields.yaml (e.g. rules/)")
    return load_ruleset([path])
