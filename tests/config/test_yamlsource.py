"""YAML 1.2 semantics and the line/column marks that error messages rely on."""

from __future__ import annotations

import math

import pytest

from engine.config.yamlsource import YamlError, load_yaml
from engine.errors import Location


def test_yaml_1_1_booleans_and_timestamps_stay_strings() -> None:
    text = "on: install.tracked\nyes: no\nNo: off\nwhen: 2026-03-01\nts: 2026-03-01T12:00:00Z\n"
    data = load_yaml(text, "f.yaml").data
    assert data == {"on": "install.tracked", "yes": "no", "No": "off",
                    "when": "2026-03-01", "ts": "2026-03-01T12:00:00Z"}


def test_core_schema_scalars() -> None:
    text = "a: true\nb: False\nc: ~\nd:\ne: 42\nf: -1.5e3\ng: 0x1F\nh: 0o17\ni: .inf\nj: null\n"
    data = load_yaml(text, "f.yaml").data
    assert data["a"] is True and data["b"] is False
    assert data["c"] is None and data["d"] is None and data["j"] is None
    assert data["e"] == 42 and type(data["e"]) is int
    assert data["f"] == -1500.0 and type(data["f"]) is float
    assert data["g"] == 31 and data["h"] == 15
    assert math.isinf(data["i"])


def test_numbers_with_leading_zeros_and_quoted_values_stay_strings() -> None:
    data = load_yaml("zip: 01234\nq: '42'\nd: \"true\"\n", "f.yaml").data
    assert data == {"zip": "01234", "q": "42", "d": "true"}


def test_marks_point_at_values_and_keys() -> None:
    document = load_yaml("rules:\n  - name: x\n    on: install.tracked\n", "f.yaml")
    assert document.location(("rules", 0, "on")) == Location("f.yaml", 3, 9)
    assert document.location(("rules", 0, "on"), key=True) == Location("f.yaml", 3, 5)
    # A path below a scalar falls back to its nearest ancestor.
    assert document.location(("rules", 0, "name", "deeper")) == Location("f.yaml", 2, 11)


@pytest.mark.parametrize(
    ("text", "offset", "expected"),
    [
        ("k: data.token ==\n", 14, (1, 18)),  # plain: column + offset
        ("k: 'data.token'\n", 5, (1, 10)),  # single quote: one more
        ('k: "data.token"\n', 0, (1, 5)),
        ("k: |\n  join('-',\n     ['a', data.x])\n", 13, (3, 6)),  # block: later line
        ("k: >-\n  a ||\n  b\n", 5, (3, 3)),
        ("a:\n  k: |\n    x ||\n      y\nb: 1\n", 7, (4, 7)),  # a shallower key follows
    ],
)
def test_expression_offsets_map_to_file_positions(
    text: str, offset: int, expected: tuple[int, int]
) -> None:
    document = load_yaml(text, "f.yaml")
    path = ("a", "k") if text.startswith("a:") else ("k",)
    assert document.expression_location(path, offset) == Location("f.yaml", *expected)


def test_duplicate_keys_are_errors_with_the_second_location() -> None:
    with pytest.raises(YamlError) as caught:
        load_yaml("a: 1\nb:\n  c: 1\n  c: 2\n", "f.yaml")
    assert caught.value.location == Location("f.yaml", 4, 3)
    assert caught.value.message == "duplicate key 'c'"


def test_malformed_yaml_reports_line_and_column() -> None:
    with pytest.raises(YamlError) as caught:
        load_yaml("a:\n  b: 1\n   c: 2\n", "f.yaml")
    assert caught.value.location.line == 3
    assert "mapping values are not allowed here" in caught.value.message


def test_python_tags_are_refused() -> None:
    with pytest.raises(YamlError, match="unsupported YAML tag"):
        load_yaml("a: !!python/name:os.system x\n", "f.yaml")


def test_empty_document_is_none() -> None:
    assert load_yaml("# only a comment\n", "f.yaml").data is None


@pytest.mark.parametrize("text", [
    "a: &loop [1, *loop]\n",
    "a: &loop {b: *loop}\n",
    "rules: &r\n  - actions: *r\n",
])
def test_a_recursive_alias_is_a_located_error_not_a_recursion_error(text: str) -> None:
    with pytest.raises(YamlError) as raised:
        load_yaml(text, "r.yaml")
    assert "refers to a collection that contains it" in raised.value.message
    assert raised.value.location.line >= 1


def test_aliases_that_repeat_an_earlier_value_still_work() -> None:
    document = load_yaml("a: &x [1]\nb: *x\nc: [*x, *x]\n", "r.yaml")
    assert document.data == {"a": [1], "b": [1], "c": [[1], [1]]}


@pytest.mark.parametrize("text", ["[" * 3000 + "]" * 3000,
                                  "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 1500))])
def test_runaway_nesting_is_a_yaml_error(text: str) -> None:
    with pytest.raises(YamlError) as raised:
        load_yaml(text, "r.yaml")
    assert raised.value.message == "the YAML is nested too deeply to read"


@pytest.mark.parametrize(("text", "line"), [("a:\n\tb: 1\n", 2), ("a:\n  b: 1\n\tc: 2\n", 3)])
def test_a_tab_says_yaml_does_not_allow_tabs(text: str, line: int) -> None:
    with pytest.raises(YamlError) as raised:
        load_yaml(text, "r.yaml")
    assert raised.value.message.startswith("YAML does not allow tabs")
    assert raised.value.location.line == line and raised.value.hint.startswith("indent with")
