"""`linkcrm test --update`: rewrite the expectations of failing cases from what the rules did.

Only the lines of a failing case's `expect:` (or `expect_state:`) and `expect_errors:` values
are replaced; every other byte of the file (comments, blank lines, flow mappings wrapped by
hand, quoting) stays as it was. Comments after the replaced value are kept; comments inside it
go with the old value. A `match: subset` case is left alone (the full output would change what
it checks), as is a case written on one line in flow style (`- {name: ..., expect: [...]}`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.config.yamlsource import YamlDocument, YamlError, load_yaml
from engine.rules.ruletests import CaseResult

_WIDTH = 100  # a value that fits in as many columns is written on one line, in flow style


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
    last = _value_end(document, lines, ("cases", result.index, name))
    new = _emit(name, _like(result.actual, case[name]), indent)
    edits = [_Edit(key.line, last, _with_comments(new, lines[key.line - 1:last]))]
    errors = list(result.actual_errors)
    if "expect_errors" in case:
        where = ("cases", result.index, "expect_errors")
        mark = document.key_marks[where]
        end = _value_end(document, lines, where)
        new = _emit("expect_errors", errors, indent) if errors else []
        edits.append(_Edit(mark.line, end, _with_comments(new, lines[mark.line - 1:end])))
    elif errors:
        after = edits[0].last
        edits.append(_Edit(after + 1, after, _emit("expect_errors", errors, indent)))
    return edits


def _value_end(document: YamlDocument, lines: list[str], path: tuple[str | int, ...]) -> int:
    """The last line of the value at `path`: the line before the next key or item at the
    key's column or left of it, blank and comment lines before that not counted."""
    key = document.key_marks[path]
    following = [mark.line for table in (document.key_marks, document.marks)
                 for mark in table.values() if mark.line > key.line and mark.column <= key.column]
    last = min(following, default=len(lines) + 1) - 1
    while last > key.line and (not lines[last - 1].strip()
                               or lines[last - 1].lstrip().startswith("#")):
        last -= 1
    return last


def _like(new: Any, old: Any) -> Any:
    """`new` with the keys the old expectation had first, in its order (recursively)."""
    if isinstance(new, dict) and isinstance(old, dict):
        keys = [k for k in old if k in new] + [k for k in new if k not in old]
        return {k: _like(new[k], old.get(k)) for k in keys}
    if isinstance(new, list) and isinstance(old, list):
        return [_like(item, old[n] if n < len(old) else None) for n, item in enumerate(new)]
    return new


_KEYED = re.compile(r"^(\s*(?:- )?)([^\s:#\-\[{][^:#]*):(?:\s|$)")
_TRAILING = re.compile(r"\s+(#.*)$")


def _with_comments(new: list[str], old: list[str]) -> list[str]:
    """`new` lines with the comments of `old`: a comment line before a `key:` and a comment
    after it go with the same key at the same indentation, in order of appearance."""
    kept: dict[tuple[str, str], list[tuple[list[str], str, int]]] = {}
    above: list[str] = []
    for line in old:
        if line.lstrip().startswith("#"):
            above.append(line)
            continue
        keyed = _KEYED.match(line)
        if keyed is None:
            continue
        trailing = _TRAILING.search(line)
        comment = trailing.group(1) if trailing and _parses(line[:trailing.start()]) else ""
        column = trailing.start(1) if trailing else 0
        kept.setdefault((keyed.group(1), keyed.group(2)), []).append((above, comment, column))
        above = []
    result = []
    for line in new:
        keyed = _KEYED.match(line)
        waiting = kept.get((keyed.group(1), keyed.group(2))) if keyed else None
        if not waiting:
            result.append(line)
            continue
        lines_above, comment, column = waiting.pop(0)
        result.extend(lines_above)
        code = line.rstrip()
        result.append(f"{code.ljust(max(column, len(code) + 2))}{comment}\n" if comment
                      else line)
    return result


def _parses(text: str) -> bool:
    """Whether `text` (a line cut before a `#`) is still YAML: the `#` began a comment."""
    try:
        yaml.safe_load(text.replace("- ", "  ", 1) if text.lstrip().startswith("- ") else text)
    except yaml.YAMLError:
        return False
    return True


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.@/+-]*( [A-Za-z0-9_.@/+-]+)*")


def _scalar(value: Any) -> str:
    """A YAML scalar: plain when it reads back as the same string, else JSON (a valid YAML
    double-quoted string, number, true/false or null)."""
    if isinstance(value, str) and _PLAIN.fullmatch(value) and yaml.safe_load(value) == value:
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _flow(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_scalar(str(k))}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return _scalar(value)


def _emit(key: str, value: Any, indent: str, top: bool = True) -> list[str]:
    """`key: value` as YAML at `indent`: on one line in flow style when it fits in
    _WIDTH columns (always for an empty value), else as a block; a list of mappings and the
    top mapping (`expect_state`) always as a block."""
    line = f"{indent}{_scalar(key)}: {_flow(value)}\n"
    as_block = ((top and isinstance(value, dict))
                or (isinstance(value, list) and any(isinstance(v, dict) for v in value))
                or len(line) > _WIDTH)
    if value in ([], {}) or not isinstance(value, dict | list) or not as_block:
        return [line]
    lines = [f"{indent}{_scalar(key)}:\n"]
    inner = indent + "  "
    if isinstance(value, dict):
        for name, item in value.items():
            lines.extend(_emit(str(name), item, inner, top=False))
        return lines
    for item in value:
        if isinstance(item, dict) and item:
            block: list[str] = []
            for name, sub in item.items():
                block.extend(_emit(str(name), sub, inner + "  ", top=False))
            block[0] = inner + "- " + block[0][len(inner) + 2:]
            lines.extend(block)
        else:
            lines.append(f"{inner}- {_flow(item)}\n")
    return lines
