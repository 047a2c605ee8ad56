"""`values.json_problem` at its edges: the exact-type fast path answers as the general one."""

from __future__ import annotations

from collections import OrderedDict

import pytest

from engine.storage.values import MAX_DEPTH, json_problem


def nested(levels: int, leaf: object) -> object:
    value = leaf
    for level in range(levels):
        value = {"a": value} if level % 2 else [value]
    return value


@pytest.mark.parametrize("leaf", ["text", "\u00e9t\u00e9", 1, None, True, 1.5, {}, []])
def test_a_value_nested_to_the_limit_is_kept_and_one_level_more_is_not(leaf: object) -> None:
    assert json_problem(nested(MAX_DEPTH, leaf)) is None
    found = json_problem(nested(MAX_DEPTH + 1, leaf))
    assert found is not None
    assert found[1] == f"nests deeper than {MAX_DEPTH} levels"


def test_a_lone_surrogate_is_found_where_it_is() -> None:
    assert json_problem({"ok": "plain", "name": {"first": "x\ud800"}}) == (
        ".name.first", "holds a lone surrogate (\\ud800) at character 2, which is not "
                       "Unicode text")
    assert json_problem(["a", ["b", "\udfff"]]) == (
        "[1][1]", "holds a lone surrogate (\\udfff) at character 1, which is not Unicode text")


def test_keys_are_checked_after_the_ascii_ones_before_them() -> None:
    assert json_problem({"a": 1, "b\ud800": 2}) == (
        "", "has a key that holds a lone surrogate (\\ud800) at character 2, which is not "
            "Unicode text")
    assert json_problem({"a": 1, 5: 2}) == ("", "has a key of type int")
    assert json_problem({"caf\u00e9": "au lait"}) is None


def test_numbers_text_and_subclasses() -> None:
    assert json_problem(float("inf")) == (
        "", "is not a finite number (inf); JSON cannot carry it (1e400 overflows)")
    assert json_problem({"n": float("nan")})[0] == ".n"  # type: ignore[index]
    assert json_problem(10 ** 500) is None  # an exact integer: stored as its digits
    assert json_problem("a\x00b") is None  # a NUL inside a value is kept (as \u0000)
    assert json_problem(OrderedDict([("k", "\ud800")])) is not None
    assert json_problem({"set": {1, 2}}) == (".set", "is a set, not a JSON value")
