"""Which rule set a command means: `resolve_ruleset(ref)` for `diff OLD NEW`.

A ref is a rule folder or file when a path by that name exists; otherwise it names a published
rule-set version: its id or a unique prefix of it (as `linkcrm rules activate` takes), or the
word `active`. Versions are read from the database and rebuilt from their stored files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.rules.files import load_ruleset
from engine.rules.model import RuleSet
from engine.rules.versions import load_version
from engine.storage import RuleVersion, RuleVersions

ACTIVE = "active"


class UnknownRuleSetError(LookupError):
    """A ref that names no rule set; the message says what a ref may be."""


def is_path(ref: str) -> bool:
    """Whether `ref` names a rule folder or file (a path that exists) rather than a version."""
    return bool(ref.strip()) and Path(ref).exists()


async def find_version(versions: RuleVersions, ref: str, *, folders: bool = True) -> RuleVersion:
    """The published version `ref` names: `active`, a version id, or a unique prefix of one.
    Raises UnknownRuleSetError (saying what to give instead) for none or several; `folders`
    says whether the command also takes a rule folder, which the advice then mentions."""
    wanted = ref.strip().lower()
    if wanted == ACTIVE:
        active = await versions.active()
        if active is None:
            raise UnknownRuleSetError(
                "no rule version is active: nothing is published in this database yet; "
                "publish one with `linkcrm rules publish rules/`"
                + (", or give a rule folder" if folders else ""))
        return active
    matches = [v.version for v in await versions.list_versions()
               if wanted and v.version.startswith(wanted)]
    if len(matches) > 1:
        raise UnknownRuleSetError(
            f"{ref!r} is the start of {len(matches)} rule versions ({', '.join(matches)}); "
            "give more of it")
    found = await versions.get(matches[0]) if matches else None
    if found is not None:
        return found
    if folders:
        raise UnknownRuleSetError(
            f"unknown rule set {ref!r}: there is no rule folder or file by that name, and no "
            "published rule version starts with it; give a rule folder (e.g. rules/), a "
            "version `linkcrm rules list` shows, or `active`")
    raise UnknownRuleSetError(f"unknown rule version {ref!r}; `linkcrm rules list` shows "
                              "the published ones")


def resolve_ruleset(ref: str,
                    stored: Callable[[str], RuleVersion] | None = None) -> RuleSet:
    """The rule set `ref` names: a rule folder (rule files, their tests, fields.yaml) or a rule
    file when that path exists; otherwise the published version `stored(ref)` finds (None:
    versions are not looked up). Raises UnknownRuleSetError for a ref that names none,
    ConfigError (with every problem) for rules that do not load, RuleFilesError for a stored
    version whose files are damaged."""
    if is_path(ref):
        return load_ruleset([Path(ref)])
    if stored is None:
        raise UnknownRuleSetError(
            f"unknown rule set {ref!r}: there is no rule folder or file by that name; give "
            "the folder that holds the rule files and fields.yaml (e.g. rules/)")
    version = stored(ref)
    return load_version(version.files, version.version)


async def find_published(versions: RuleVersions, ref: str) -> RuleVersion:
    """`find_version` for commands that take only versions (`replay --rules-version`,
    `rules shadow-report`)."""
    return await find_version(versions, ref, folders=False)
