"""`linkcrm diff` output: text for a terminal, JSON for machines, Markdown for a PR comment.

Every value that came with an event is escaped for where it goes: control characters for a
terminal (`safe`), and for Markdown every character GitHub would act on (emphasis, tables,
HTML, `@mentions`, `#references`) as an HTML entity, values inside `<code>`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from engine.actions import JSON, CreateDeal
from engine.rules.diff import Change, DiffResult, Example

from .output import safe, safe_json

# GitHub comments hold at most 65,536 characters; the table and examples stop short of that.
MARKDOWN_BUDGET = 60_000

_FIELD_CHANGES = {"changed": "value changes", "added": "now written",
                  "removed": "no longer written"}
_ACTION_CHANGES = {"new-action": "now planned", "dropped-action": "no longer planned",
                   "starts-failing": "starts failing", "stops-failing": "stops failing",
                   "error-changed": "fails differently"}


@dataclass
class Report:
    """A finished diff with what it compared and where the events came from."""

    old: str
    new: str
    compared_as: str  # "canonical" or a target's name
    source: str
    result: DiffResult
    skipped: Counter[str]
    command: str = "linkcrm diff"  # the title (`linkcrm rules shadow-report` reuses this)

    def as_dict(self) -> dict[str, JSON]:
        result = self.result
        return {
            "old": self.old, "new": self.new,
            "compared_as": self.compared_as,
            "source": self.source, "events": result.events,
            "changed_events": result.changed_events,
            "unchanged_events": result.events - result.changed_events - result.uncompared,
            "uncompared_events": result.uncompared,
            "uncompared": list[JSON](result.uncompared_examples),
            "skipped": dict(sorted(self.skipped.items())),
            "changes": [change.as_dict() for change in result.changes],
        }


def describe(change: Change) -> str:
    """What happens, in words: `value changes`, `deal no longer created`, ..."""
    if change.field is not None:
        return _FIELD_CHANGES[change.kind]
    if change.action == CreateDeal.kind and change.kind == "new-action":
        return "deal now created"
    if change.action == CreateDeal.kind and change.kind == "dropped-action":
        return "deal no longer created"
    return _ACTION_CHANGES[change.kind]


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _value(change: Change, value: Any, limit: int = 100) -> str:
    """One side of a change as text (not yet escaped for any output)."""
    if value is None:
        return "(not written)" if change.field is not None else "(not planned)"
    if change.field is None and isinstance(value, dict):
        if set(value) == {"error"}:
            return _short(f"error: {value['error']}", 2 * limit)
        shown = [f"{name}={safe_json(item)}" for name, item in value.items()
                 if name != "identity"]  # the identity is shown with the event
        return _short(", ".join(shown) or "(no fields)", 2 * limit)
    return _short(safe_json(value), limit)


def _context(example: Example) -> str:
    parts = [example.event_type or "(no event type)"]
    if isinstance(example.identity, dict):
        parts.append(", ".join(f"{name}={value}" for name, value in example.identity.items()))
    return f"{example.ref} ({'; '.join(parts)})"


def _where(change: Change) -> str:
    return change.label + (f" {change.field}" if change.field else "")


def _events(count: int) -> str:
    return f"{count:,} event{'s' * (count != 1)}"


def _compared(report: Report) -> str:
    if report.compared_as == "canonical":
        return "canonical fields"
    return f"what {report.compared_as} receives"


def _skipped(report: Report) -> str:
    return ", ".join(f"{count:,} ({reason})" for reason, count in sorted(report.skipped.items()))


def _summary(report: Report) -> str:
    result = report.result
    same = result.events - result.changed_events - result.uncompared
    line = (f"{_events(result.events)} from {report.source}: {result.changed_events:,} plan "
            f"differently, {same:,} the same")
    if result.uncompared:
        first = result.uncompared_examples[0] if result.uncompared_examples else {}
        line += (f", {result.uncompared:,} could not be compared (first: {first.get('event')}: "
                 f"{first.get('error')})")
    if report.skipped:
        line += f"; skipped {_skipped(report)}"
    return line


def render_text(report: Report) -> str:
    lines = [f"{report.command}: OLD {safe(report.old)} -> NEW {safe(report.new)}, comparing "
             f"{_compared(report)}", safe(_summary(report))]
    rule = None
    for change in report.result.changes:
        if change.rule != rule:
            rule = change.rule
            lines += ["", f"rule {safe(rule)}"]
        lines.append(f"  {safe(_where(change))}: {describe(change)} in {_events(change.events)}")
        for example in change.examples:
            lines.append(f"      {safe(_context(example))}: "
                         f"{safe(_value(change, example.before))} -> "
                         f"{safe(_value(change, example.after))}")
    if not report.result.changes:
        lines += ["", "no changes: every event plans the same under both rule sets"]
    return "\n".join(lines)


# What Markdown or GitHub acts on anywhere inside a line (md() output never starts one):
# code, emphasis, links, HTML and entities, tables, strikethrough, math, @mentions, #refs; and
# `_` unless it sits inside a word (`set_once`), where it starts no emphasis.
_MARKDOWN_ACTIVE = re.compile(r"[\\`*\[\]<>#|~&@$]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def md(text: str) -> str:
    """`text` for Markdown: terminal-unsafe characters escaped, then every character Markdown
    or GitHub would act on as an HTML entity (`&#42;`)."""
    return _MARKDOWN_ACTIVE.sub(lambda match: f"&#{ord(match.group())};", safe(text))


def _code(text: str) -> str:
    return f"<code>{md(text)}</code>"


def render_markdown(report: Report) -> str:
    result = report.result
    head = [f"### {md(report.command)}: {_code(report.old)} → {_code(report.new)}", ""]
    if not result.changes:
        head.append(f"**No changes**: {md(_summary(report))}.")
        return "\n".join(head) + "\n"
    note = f"; skipped {_skipped(report)}" if report.skipped else ""
    head += [f"**{result.changed_events:,} of {_events(result.events)} plan differently** "
             f"(events from {md(report.source)}; comparing {md(_compared(report))}"
             f"{md(note)}).", "",
             "| rule | action | field | change | events |", "| --- | --- | --- | --- | ---: |"]
    rows = [f"| {md(c.rule)} | {md(c.label)} | {md(c.field or '')} | {describe(c)} | "
            f"{c.events:,} |" for c in result.changes]
    blocks = [f"**{md(c.rule)} · {md(_where(c))}**: {describe(c)}\n\n" + "\n".join(
        f"- {md(_context(e))}: {_code(_value(c, e.before))} → {_code(_value(c, e.after))}"
        for e in c.examples) for c in result.changes if c.examples]
    out = "\n".join(head)
    shown = 0
    for row in rows:
        if len(out) + len(row) > MARKDOWN_BUDGET // 2:
            break
        out += "\n" + row
        shown += 1
    if shown < len(rows):
        out += (f"\n\n{len(rows) - shown:,} more changes: run `{report.command}` for all of "
                "them.")
    if blocks:
        out += "\n\n<details><summary>Examples</summary>\n"
        kept = 0
        for block in blocks:
            if len(out) + len(block) > MARKDOWN_BUDGET:
                break
            out += "\n" + block + "\n"
            kept += 1
        if kept < len(blocks):
            out += f"\n{len(blocks) - kept:,} more changes with examples not shown.\n"
        out += "\n</details>"
    return out + "\n"
