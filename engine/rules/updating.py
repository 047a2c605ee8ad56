"""`linkcrm test --update`: rewrite the expectations of failing cases from what the rules did.

Only the lines of a failing case's `expect:` (or `expect_state:`) and `expect_errors:` values
are replaced; every other byte of the file (comments, blank lines, flow mappings wrapped by
hand, quoting) stays as it was. Comments after the replaced value are kept; comments inside it
go with the old value. A `match: subset` case is left alone (the full output would change what
it checks), as is a case written on one line in flow style (`- {name: ..., expect: [...]}`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.config.yamlsource import YamlDocument, YamlError, load_yaml
from engine.rules.ruletests import CaseResult

_WIDTH = 10**6  # one flow mapping per line: re-wrapping is left to the author


@dataclass(frozen=True)
class Updated:
    """What --update did with one failing case: `updated`, or the reason it did not."""

    result: CaseResult
    updated: bool
    reason: str = ""


@dataclass(frozen=True)
class _Edit:
    first: int  # 1-based, inclusive
    last: int  # inclusive; last < first inserts before `first`
    lines: list[str]


def update_file(path: Path, results: Sequence[CaseResult]) -> list[Updated]:
    """Rewrite the failing cases of `results` (all from `path`) in place."""
    text = path.read_text(encoding="utf-8")
    try:
        document = load_yaml(text, str(path))
    except YamlError as error:
        return [Updated(r, False, f"the file does not parse: {error.message}") for r in results]
    lines = text.splitlines(keepends=True)
    done: list[Updated] = []
    edits: list[_Edit] = []
    for result in results:
        reason = _refusal(document, result)
        if reason:
            done.append(Updated(result, False, reason))
            continue
        edits.extend(_case_edits(document, lines, result))
        done.append(Updated(result, True))
    for edit in sorted(edits, key=lambda e: e.first, reverse=True):
        lines[edit.first - 1:edit.last] = edit.lines
    if edits:
        path.write_text("".join(lines), encoding="utf-8")
    return done


def _refusal(document: YamlDocument, result: CaseResult) -> str:
    if result.passed:
        return "it passes"
    if result.index < 0 or result.actual is None:
        return "the case did not run: " + (result.error.splitlines() or ["?"])[0]
    case = document.data["cases"][result.index]
    if case.get("match") == "subset":
        return "match: subset (writing the whole output would change what it checks)"
    name = "expect_state" if "events" in case else "expect"
    keys = [k for k in case if ("cases", result.index, k) in document.key_marks]
    rows = {document.key_marks[("cases", result.index, k)].line for k in keys}
    if len(rows) != len(keys) or name not in case:
        return "the case is written on one line; write it as a block mapping to update it"
    return ""


def _case_edits(document: YamlDocument, lines: list[str], result: CaseResult) -> list[_Edit]:
    case: dict[str, Any] = document.data["cases"][result.index]
    name = "expect_state" if "events" in case else "expect"
    key = document.key_marks[("cases", result.index, name)]
    indent = " " * (key.column - 1)
    edits = [_Edit(key.line, _value_end(document, lines, ("cases", result.index, name)),
                   _emit(name, result.actual, indent))]
    errors = list(result.actual_errors)
    if "expect_errors" in case:
        where = ("cases", result.index, "expect_errors")
        mark = document.key_marks[where]
        edits.append(_Edit(mark.line, _value_end(document, lines, where),
                           _emit("expect_errors", errors, indent) if errors else []))
    elif errors:
        after = edits[0].last
        edits.append(_Edit(after + 1, after, _emit("expect_errors", errors, indent)))
    return edits


def _value_end(document: YamlDocument, lines: list[str], path: tuple[str | int, ...]) -> int:
    """The last line of the value at `path`, not counting blank or comment lines after it."""
    mark = document.marks[path]
    last = mark.end_line if mark.end_column > 1 else mark.end_line - 1
    start = document.key_marks[path].line
    while last > start and (not lines[last - 1].strip()
                            or lines[last - 1].lstrip().startswith("#")):
        last -= 1
    return last


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=_WIDTH,
                          sort_keys=False, allow_unicode=True).strip().removesuffix("\n...")


def _simple(value: Any) -> bool:
    if isinstance(value, dict):
        return all(not isinstance(v, dict | list) for v in value.values())
    if isinstance(value, list):
        return all(not isinstance(v, dict | list) for v in value)
    return True


def _emit(key: str, value: Any, indent: str) -> list[str]:
    """`key: value` as block YAML at `indent`; mappings and lists of plain values in flow
    style on one line each."""
    if _simple(value) or value in ([], {}):
        return [f"{indent}{key}: {_flow(value)}\n"]
    lines = [f"{indent}{key}:\n"]
    inner = indent + "  "
    if isinstance(value, dict):
        for name, item in value.items():
            lines.extend(_emit(str(name), item, inner))
        return lines
    for item in value:
        if isinstance(item, dict) and item:
            block: list[str] = []
            for name, sub in item.items():
                block.extend(_emit(str(name), sub, inner + "  "))
            block[0] = inner + "- " + block[0][len(inner) + 2:]
            lines.extend(block)
        else:
            lines.append(f"{inner}- {_flow(item)}\n")
    return lines
