"""The diff's per-event step (`Comparer`) and its counting (`Tally`) on their own: what shadow
mode stores per live event, read back and summed up exactly as `Differ` sums a diff."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.rules.diff import Comparer, Differ, EventDiff, FoundChange, Recorded, Tally
from engine.rules.files import load_ruleset
from engine.worker.plan import action_problem
from tests.support.diff_story import RULES, edited_rules, recorded_story

SHIPPED = load_ruleset([RULES])


def test_stored_per_event_differences_sum_up_to_the_same_result_as_the_diff(
    tmp_path: Path
) -> None:
    new = load_ruleset([edited_rules(tmp_path / "new")])
    story = recorded_story()
    differ = Differ(SHIPPED, new, screen=action_problem)
    comparer = Comparer(SHIPPED, new, screen=action_problem)
    tally = Tally(order=(new, SHIPPED))
    for number, envelope in enumerate(story, 1):
        event = Recorded(f"event {number}", envelope, number)
        differ.add(event)
        diff = comparer.compare(envelope)
        # Through JSON, as storage keeps it.
        stored = json.loads(json.dumps([change.as_json() for change in diff.changes]))
        tally.add(event, EventDiff(diff.event_type,
                                   tuple(FoundChange.from_json(item) for item in stored)))
    expected, got = differ.result(), tally.result()
    assert (got.events, got.changed_events) == (expected.events, expected.changed_events) == (
        5, 4)
    assert [c.as_dict() for c in got.changes] == [c.as_dict() for c in expected.changes]


def test_an_unchanged_event_has_no_changes_and_same_counts_by_number() -> None:
    [click, *_] = recorded_story()
    diff = Comparer(SHIPPED, SHIPPED).compare(click)
    assert (diff.event_type, diff.changes, diff.changed) == ("link.clicked", (), False)
    tally = Tally()
    tally.add_same(3)
    tally.add_uncompared(Recorded("event 9", None, 9), "RecursionError: " + "x" * 400)
    result = tally.result()
    assert (result.events, result.changed_events, result.uncompared) == (4, 0, 1)
    assert result.uncompared_examples == [
        {"event": "event 9", "id": 9, "error": ("RecursionError: " + "x" * 400)[:300]}]


@pytest.mark.parametrize("value", [
    None, [], "changed", {"rule": "r", "action": "a", "ordinal": "0", "field": None,
                          "change": "changed"},
    {"rule": "r", "action": "a", "ordinal": 0, "field": None, "change": "renamed"},
])
def test_a_stored_change_that_is_not_one_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="plan change"):
        FoundChange.from_json(value)
