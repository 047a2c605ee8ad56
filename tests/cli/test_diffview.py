"""`diff` output rendering: a Markdown comment stays within GitHub's size limit."""

from __future__ import annotations

from collections import Counter

from engine.cli.diffview import MARKDOWN_BUDGET, Report, render_markdown
from engine.rules.diff import Change, DiffResult, Example


def test_a_huge_diff_fits_one_github_comment() -> None:
    long = "x" * 500
    changes = [Change(f"rule-{n}", "upsert_contact", 0, f"set.field_{n}", "changed", 7,
                      [Example(f"event {n}", n, "install.tracked", {"email": long}, long, n)
                       for _ in range(3)]) for n in range(3000)]
    report = Report("old", "new", "canonical", "events.jsonl",
                    DiffResult(9000, 9000, changes), Counter())
    text = render_markdown(report)
    assert len(text) <= MARKDOWN_BUDGET + 200 < 65_536
    assert "| rule-0 | upsert_contact | set.field_0 | value changes | 7 |" in text
    assert "more changes: run `linkcrm diff` for all of them." in text
    assert "more changes with examples not shown." in text
    assert text.endswith("</details>\n")
