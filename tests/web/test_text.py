"""Event data as page text: invisible and unencodable characters spelled out, long values cut."""

from __future__ import annotations

import json

from markupsafe import Markup

from engine.web.text import BODY_SHOWN, MAX_SHOWN, pretty_body, visible


def test_control_characters_surrogates_and_overrides_are_spelled_out() -> None:
    assert visible("\x1b[31mred\x07") == "\\x1b[31mred\\x07"
    assert visible("a\x00b\x7f\x85") == "a\\x00b\\x7f\\x85"
    assert visible("x\ud800y\udfff") == "x\\ud800y\\udfff"
    assert visible("abc\u202edcba\u2066\ufeff\u200b") == "abc\\u202edcba\\u2066\\ufeff\\u200b"
    assert visible("line one\n\tline two") == "line one\n\tline two"
    assert visible("café 日本 🙂") == "café 日本 🙂"
    visible("x\ud800").encode("utf-8")  # always encodable


def test_values_that_are_not_text() -> None:
    assert visible(None) == "" and visible(42) == "42"
    already = Markup("<b>escaped by a macro</b>")
    assert visible(already) is already


def test_a_long_value_is_cut_with_a_note() -> None:
    shown = visible("y" * (MAX_SHOWN + 10))
    assert shown.startswith("y" * 100) and shown.endswith(
        f"(cut: {MAX_SHOWN + 10:,} characters in all)")


def test_the_body_is_pretty_printed_or_shown_as_it_came() -> None:
    text, envelope = pretty_body(b'{"event":"test","data":{"a":[1,2]}}')
    assert envelope == {"event": "test", "data": {"a": [1, 2]}}
    assert text == json.dumps(envelope, indent=2)
    assert pretty_body(b"not json \xff") == ("not json \ufffd", None)
    assert pretty_body(None)[0].startswith("(purged")
    deep, parsed = pretty_body(b"[" * 300_000 + b"]" * 300_000)
    assert parsed is None and deep.startswith("[" * BODY_SHOWN)
    assert deep.endswith("(cut: the body is 600,000 bytes)")
    big, _ = pretty_body(json.dumps({"blob": "z" * 1_000_000}).encode())
    assert len(big) < BODY_SHOWN + 100 and big.endswith("bytes)")
