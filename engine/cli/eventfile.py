"""Reading one event (or any JSON/YAML document) from a file or standard input, for `explain`
and `eval`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from engine.config.yamlsource import YamlError, load_yaml

from .output import fail

ENVELOPE = '{"event": "install.tracked", "timestamp": "...", "data": {...}}'


def read_document(source: str) -> Any:
    """The JSON (or YAML) document in file `source` (`-`: standard input). Exits 2 when it
    cannot be read, 1 when it is empty or neither JSON nor YAML."""
    name = "standard input" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as error:
        fail(f"cannot read {source}: {error.strerror}", 2)
    except UnicodeDecodeError:
        fail(f"{name} is not UTF-8 text")
    if not text.strip():
        fail(f"{name} is empty; it should hold one event, {ENVELOPE}")
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return load_yaml(text, name).data
    except YamlError as error:
        fail(f"{name} is neither JSON nor YAML: {error}")
    except RecursionError:
        fail(f"{name} is nested too deeply")


def read_event(source: str) -> dict[str, Any]:
    """`read_document`, which must be an event envelope: an object with a text `event`.
    Exits 1 with the reason otherwise."""
    document = read_document(source)
    name = "standard input" if source == "-" else source
    if not isinstance(document, dict):
        kind = {list: "an array", str: "text", bool: "a boolean", type(None): "null"}.get(
            type(document), "a number")
        fail(f"{name} holds {kind}, not an event; an event is an object {ENVELOPE}")
    if "envelope" in document and isinstance(document["envelope"], dict):
        fail(f"{name} is a line of `linkcrm events export`; pass its \"envelope\" object "
             "(or use `linkcrm diff --events` for export files)")
    if not isinstance(document.get("event"), str) or not document["event"]:
        found = "has no \"event\"" if "event" not in document else (
            "has an \"event\" that is not text")
        fail(f"{name} {found}; an event is an object {ENVELOPE}")
    return document
