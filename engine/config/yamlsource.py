"""YAML 1.2 loading that keeps where every key and value came from.

PyYAML resolves plain scalars with YAML 1.1 rules (`on`, `yes`, `no` become booleans, `2026-03-01`
a date, `0123` the octal 83). Rule files must read as written, so this module composes the node
tree with a resolver that follows the YAML 1.2 core schema (and keeps numbers with leading zeros
as strings, like zip codes), then builds plain Python values itself while recording each node's
line and column. Duplicate keys are an error, as YAML 1.2 says they are.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from engine.errors import Location

Path = tuple[str | int, ...]

_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|(?:0|[1-9][0-9]*)(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)

_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


class Core12Resolver(BaseResolver):
    """Implicit tags per the YAML 1.2 core schema; everything else is a string."""

    yaml_implicit_resolvers: dict[Any, Any] = {}


for _tag, _regexp, _first in (
    (_NULL_TAG, _NULL, ["~", "n", "N", ""]),
    (_BOOL_TAG, _BOOL, list("tTfF")),
    (_INT_TAG, _INT, list("-+0123456789")),
    (_FLOAT_TAG, _FLOAT, list("-+.0123456789")),
):
    Core12Resolver.add_implicit_resolver(_tag, _regexp, _first)


class _Composer12(Reader, Scanner, Parser, Composer, Core12Resolver):
    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        Core12Resolver.__init__(self)


@dataclass(frozen=True)
class Mark:
    """1-based line and column of a node, plus what an expression's offset needs."""

    line: int
    column: int
    style: str | None = None  # None (plain), "'", '"', "|", ">"
    end_line: int = 0
    end_column: int = 0


@dataclass
class YamlDocument:
    """The loaded value and the mark of every value (`marks`) and mapping key (`key_marks`)."""

    file: str
    text: str
    data: Any
    marks: dict[Path, Mark] = field(default_factory=dict)
    key_marks: dict[Path, Mark] = field(default_factory=dict)

    def location(self, path: Path, *, key: bool = False) -> Location:
        """The location of the value (or, with `key`, the key) at `path`, or its nearest parent."""
        table = self.key_marks if key else self.marks
        probe = tuple(path)
        while probe:
            mark = table.get(probe) or self.marks.get(probe)
            if mark:
                return Location(self.file, mark.line, mark.column)
            probe = probe[:-1]
        root = self.marks.get(())
        return Location(self.file, root.line if root else 1, root.column if root else 1)

    def expression_location(self, path: Path, offset: int) -> Location:
        """Where character `offset` of the string scalar at `path` sits in the file."""
        mark = self.marks.get(tuple(path))
        if mark is None:
            return self.location(path)
        if mark.style in ("|", ">"):
            return self._block_location(mark, offset)
        quote = 1 if mark.style in ("'", '"') else 0
        return Location(self.file, mark.line, mark.column + quote + offset)

    def _block_location(self, mark: Mark, offset: int) -> Location:
        lines = self.text.splitlines()
        first = mark.line  # the header line holds the indicator; content starts below it
        # A block scalar ends where the next line starts (column 1): that line is not content.
        last = mark.end_line - 1 if mark.end_column == 1 else mark.end_line
        value_lines = lines[first : max(last, first + 1)]
        contents = [raw for raw in value_lines if raw.strip()]
        indent = min((len(raw) - len(raw.lstrip()) for raw in contents), default=0)
        remaining = offset
        for index, raw in enumerate(value_lines):
            content = raw[indent:]
            if remaining <= len(content):
                return Location(self.file, first + 1 + index, indent + 1 + remaining)
            remaining -= len(content) + 1
        return Location(self.file, mark.line, mark.column)


class YamlError(Exception):
    """The text is not valid YAML (or breaks a rule YAML 1.2 keeps, like duplicate keys)."""

    def __init__(self, location: Location, message: str, hint: str = "") -> None:
        super().__init__(f"{location}: {message}")
        self.location = location
        self.message = message
        self.hint = hint


def load_yaml(text: str, file: str) -> YamlDocument:
    """Parse one YAML document with YAML 1.2 core semantics; raise `YamlError` with a location."""
    composer = _Composer12(text)
    try:
        node = composer.get_single_node()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = error.problem or "malformed YAML"
        context = f" ({error.context})" if error.context else ""
        if "'\\t'" in problem or " tab " in problem:
            raise YamlError(Location(file, line, column),
                            "YAML does not allow tabs for indentation (found a tab here)",
                            "indent with spaces; most editors convert tabs to spaces on "
                            "request") from None
        raise YamlError(
            Location(file, line, column),
            f"{problem}{context}",
            "check the indentation and that every ':' in a value sits inside quotes",
        ) from None
    except yaml.YAMLError as error:
        raise YamlError(Location(file, 1, 1), str(error)) from None
    except RecursionError:
        raise _too_deep(file) from None
    document = YamlDocument(file=file, text=text, data=None)
    if node is not None:
        try:
            document.data = _build(node, (), document)
        except RecursionError:
            raise _too_deep(file) from None
    return document


def _too_deep(file: str) -> YamlError:
    return YamlError(Location(file, 1, 1), "the YAML is nested too deeply to read",
                     "rule files, rule tests and field maps are a few levels deep; "
                     "look for runaway brackets or indentation")


def _mark(node: Node) -> Mark:
    style = node.style if isinstance(node, ScalarNode) else None
    start, end = node.start_mark, node.end_mark
    return Mark(start.line + 1, start.column + 1, style, end.line + 1, end.column + 1)


def _build(node: Node, path: Path, document: YamlDocument,
           open_nodes: frozenset[int] = frozenset()) -> Any:
    document.marks[path] = _mark(node)
    if isinstance(node, MappingNode | SequenceNode):
        if id(node) in open_nodes:
            raise YamlError(
                Location(document.file, *_line_col(node)),
                "a YAML alias (*name) refers to a collection that contains it, which would "
                "repeat forever",
                "an alias can only repeat an anchor (&name) defined before and outside it; "
                "write the value out instead",
            )
        open_nodes = open_nodes | {id(node)}
    if isinstance(node, MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise YamlError(
                    Location(document.file, *_line_col(key_node)), "a mapping key must be a scalar"
                )
            key = str(key_node.value)
            if key in result:
                raise YamlError(
                    Location(document.file, *_line_col(key_node)),
                    f"duplicate key {key!r}",
                    "each key may appear once in a mapping; remove or rename one of them",
                )
            document.key_marks[(*path, key)] = _mark(key_node)
            result[key] = _build(value_node, (*path, key), document, open_nodes)
        return result
    if isinstance(node, SequenceNode):
        return [_build(item, (*path, i), document, open_nodes)
                for i, item in enumerate(node.value)]
    assert isinstance(node, ScalarNode)
    return _scalar(node, document)


def _line_col(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _scalar(node: ScalarNode, document: YamlDocument) -> Any:
    tag, value = node.tag, node.value
    if tag == _STR_TAG or node.style is not None:
        return value
    if tag == _NULL_TAG:
        return None
    if tag == _BOOL_TAG:
        return value.lower() == "true"
    if tag == _INT_TAG:
        if value.startswith("0o"):
            return int(value[2:], 8)
        if value.startswith("0x"):
            return int(value[2:], 16)
        return int(value)
    if tag == _FLOAT_TAG:
        lowered = value.lower()
        if lowered.endswith("inf"):
            return -math.inf if lowered.startswith("-") else math.inf
        if lowered.endswith("nan"):
            return math.nan
        return float(value)
    raise YamlError(
        Location(document.file, *_line_col(node)),
        f"unsupported YAML tag {tag!r}",
        "rule files use plain YAML values only; remove the tag",
    )
