"""Find the JSON Schemas shipped with linkcrm and build their validators once.

In a source checkout (or an editable install) the schemas live in the repository's `schemas/`;
a wheel carries a copy under `engine/_data/schemas`.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

_PACKAGE = Path(__file__).resolve().parent.parent  # the engine package


def data_dir(name: str) -> Path:
    """The shipped `schemas` or `rules` folder."""
    for candidate in (_PACKAGE.parent / name, _PACKAGE / "_data" / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"linkcrm's {name}/ folder is missing from this installation")


def schema_path(name: str) -> Path:
    return data_dir("schemas") / name


@cache
def _registry() -> Registry[Any]:
    resources = []
    for path in sorted(data_dir("schemas").rglob("*.json")):
        contents = json.loads(path.read_text(encoding="utf-8"))
        resources.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources)


@cache
def load_schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(schema_path(name).read_text(encoding="utf-8"))
    return loaded


@cache
def validator(name: str) -> Draft202012Validator:
    """A validator for `schemas/<name>`, resolving `$ref`s between the shipped schemas."""
    return Draft202012Validator(load_schema(name), registry=_registry())


@cache
def event_schemas() -> dict[str, dict[str, Any]]:
    """Event type -> its schema, from `schemas/events/*.json` (the envelope excluded)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((data_dir("schemas") / "events").glob("*.json")):
        if path.stem == "envelope":
            continue
        found[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    return found
