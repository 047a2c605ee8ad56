"""Turn a parsed JMESPath AST into one generated Python function with TreeInterpreter semantics."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import cast

import jmespath.functions
import jmespath.visitor

from engine.rules.jmespath_internals import (
    EXPREF_CLASS_NAME,
    Expref,
    FunctionSpec,
    equals,
    function_table,
    is_comparable,
    is_false,
    not_,
    stock_argument_checks,
)

__all__ = ["SearchFunction", "compile_search", "copy_json", "generate_source"]

SearchFunction = Callable[[object], object]
Node = Mapping[str, object]

_NoneType = type(None)


# The slow path the generated code calls only for values that are not plain JSON types, so
# that odd inputs (OrderedDict, Decimal, objects with a .get) behave as in the visitor.
def _field_slow(value: object, key: str) -> object:
    try:
        return cast(object, value.get(key))  # type: ignore[attr-defined]
    except AttributeError:
        return None


def copy_json(value: object) -> object:
    """Copy a literal container so that no caller can mutate the compiled constant."""
    if type(value) is list:
        return [copy_json(item) for item in value]
    if type(value) is dict:
        return {key: copy_json(item) for key, item in value.items()}
    return value


_RUNTIME: dict[str, object] = {
    "_field_slow": _field_slow,
    "_is_false_slow": is_false,
    "_not_slow": not_,
    "_copy_json": copy_json,
    "_equals": equals,
    "_comparable": is_comparable,
    # Values for which Python's `not v` already is JMESPath falseness (0 is true in JMESPath).
    "_FALSY_TYPES": frozenset({_NoneType, bool, str, list, dict}),
    "_CMP_TYPES": frozenset({int, float, str}),
    "_NoneType": _NoneType,
    EXPREF_CLASS_NAME: Expref,
}

# JMESPath type name -> the exact Python types the fast path accepts without asking
# Functions._type_check (which accepts a superset: it compares class names).
_FAST_TYPES: dict[str, tuple[str, ...]] = {
    "boolean": ("bool",),
    "array": ("list",),
    "object": ("dict",),
    "null": ("_NoneType",),
    "string": ("str",),
    "number": ("int", "float"),
    "expref": (EXPREF_CLASS_NAME,),
}
_COMPARE_OPS = {"lt": "<", "gt": ">", "lte": "<=", "gte": ">="}


class _Body:
    """The lines of one generated function and its temporaries."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.indent = 1
        self.temps = 0
        self.types: dict[str, type] = {}  # temporaries whose exact type is known

    def temp(self) -> str:
        self.temps += 1
        return f"t{self.temps}"

    def add(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)


class _Generator:
    def __init__(self, functions: jmespath.functions.Functions) -> None:
        self.functions = functions
        self.names: dict[str, object] = {}  # every constant and helper the code refers to
        self.strings: dict[str, str] = {}
        self.bodies: list[_Body] = []
        self.exprefs: list[tuple[str, Node, str]] = []
        self.scalars: dict[str, type] = {}  # constant names of literal scalars -> their type
        self.fast_calls = stock_argument_checks(functions)
        self.names["_call"] = functions.call_function
        self.names["_F"] = functions

    # Constants are passed by name, never pasted as repr() into the source.
    def const(self, value: object) -> str:
        if type(value) is str:
            if value not in self.strings:
                self.strings[value] = self._new_name(value)
            return self.strings[value]
        return self._new_name(value)

    def _new_name(self, value: object) -> str:
        name = f"_k{len(self.names)}"
        self.names[name] = value
        return name

    def function(self, node: Node, name: str) -> None:
        body = _Body(name)
        self.bodies.append(body)
        result = self.emit(body, node, "value")
        body.add(f"return {result}")

    def source(self) -> str:
        chunks = []
        for body in reversed(self.bodies):  # expref functions before their users
            chunks.append(f"def {body.name}(value):\n" + "\n".join(body.lines))
        return "\n\n".join(chunks) + "\n"

    def known_type(self, body: _Body, atom: str) -> type | None:
        """The exact type `atom` holds whenever it is evaluated, when the generator knows it."""
        if atom.startswith("_x"):
            return Expref
        return self.scalars.get(atom) or body.types.get(atom)

    def false_test(self, body: _Body, atom: str) -> str:
        known = self.known_type(body, atom)
        if known in (int, float):
            return "False"  # numbers, 0 included, are true in JMESPath
        if known in (_NoneType, bool, str, list, dict):
            return f"not {atom}"
        return f"(not {atom} and (type({atom}) in _FALSY_TYPES or _is_false_slow({atom})))"

    def emit(self, body: _Body, node: Node, cur: str) -> str:
        """Add statements computing `node` against the value in `cur`; return the result atom."""
        kind = node["type"]
        children = cast(Sequence[Node], node["children"])
        add = body.add
        if kind == "field":
            key = self.const(node["value"])
            out = body.temp()
            add(f"{out} = {cur}.get({key}) if type({cur}) is dict else "
                f"(None if {cur} is None else _field_slow({cur}, {key}))")
            return out
        if kind in ("subexpression", "index_expression", "pipe"):
            for child in children:
                cur = self.emit(body, child, cur)
            return cur
        if kind in ("identity", "current"):
            return cur
        if kind == "literal":
            return self.literal(body, node["value"])
        if kind == "index":
            index = node["value"]
            if type(index) is not int:
                raise TypeError(f"index must be an int, got {index!r}")
            out = body.temp()
            add(f"if isinstance({cur}, list):")
            add("    try:")
            add(f"        {out} = {cur}[{index}]")
            add("    except IndexError:")
            add(f"        {out} = None")
            add("else:")
            add(f"    {out} = None")
            return out
        if kind == "slice":
            out = body.temp()
            bounds = slice(*cast(Sequence[int | None], children))
            add(f"{out} = {cur}[{self.const(bounds)}] if isinstance({cur}, list) else None")
            return out
        if kind in ("projection", "filter_projection", "flatten", "value_projection"):
            return self.projection(body, kind, children, cur)
        if kind in ("multi_select_list", "multi_select_dict"):
            out = body.temp()
            add(f"if {cur} is None:")
            add(f"    {out} = None")
            add("else:")
            body.indent += 1
            if kind == "multi_select_list":
                atoms = [self.emit(body, child, cur) for child in children]
                add(f"{out} = [{', '.join(atoms)}]")
            else:
                pairs = []
                for pair in children:
                    value = self.emit(body, cast(Sequence[Node], pair["children"])[0], cur)
                    pairs.append(f"{self.const(pair['value'])}: {value}")
                add(f"{out} = {{{', '.join(pairs)}}}")
            body.indent -= 1
            return out
        if kind in ("or_expression", "and_expression"):
            left = self.emit(body, children[0], cur)
            out = body.temp()
            add(f"if {self.false_test(body, left)}:")
            body.indent += 1
            if kind == "or_expression":
                add(f"{out} = {self.emit(body, children[1], cur)}")
                body.indent -= 1
                add("else:")
                add(f"    {out} = {left}")
            else:
                add(f"{out} = {left}")
                body.indent -= 1
                add("else:")
                body.indent += 1
                add(f"{out} = {self.emit(body, children[1], cur)}")
                body.indent -= 1
            return out
        if kind == "not_expression":
            value = self.emit(body, children[0], cur)
            out = body.temp()
            known = self.known_type(body, value)
            if known in (_NoneType, bool, str, list, dict):
                add(f"{out} = not {value}")
            else:
                add(f"{out} = (not {value}) if type({value}) in _FALSY_TYPES"
                    f" else _not_slow({value})")
            body.types[out] = bool
            return out
        if kind == "comparator":
            return self.comparator(body, cast(str, node["value"]), children, cur)
        if kind == "function_expression":
            return self.call(body, cast(str, node["value"]), children, cur)
        if kind == "expref":
            name = f"_e{len(self.exprefs)}"
            ref = f"_x{len(self.exprefs)}"
            self.exprefs.append((name, children[0], ref))
            self.function(children[0], name)
            return ref
        raise NotImplementedError(f"JMESPath node type {kind!r}")

    def literal(self, body: _Body, value: object) -> str:
        # Scalars, None/True/False included, go by name: `None[0]` in the generated source
        # would draw a SyntaxWarning from compile().
        if type(value) in (list, dict):
            out = body.temp()
            if value:
                body.add(f"{out} = _copy_json({self.const(value)})")
            else:
                body.add(f"{out} = {'[]' if type(value) is list else '{}'}")
            body.types[out] = type(value)
            return out
        name = self.const(value)
        self.scalars[name] = type(value)
        return name

    def projection(self, body: _Body, kind: str, children: Sequence[Node], cur: str) -> str:
        add = body.add
        base = self.emit(body, children[0], cur)
        out = body.temp()
        item = body.temp()
        if kind == "value_projection":
            # The visitor projects over anything with .values(), not only dicts.
            values = body.temp()
            add("try:")
            add(f"    {values} = {base}.values()")
            add("except AttributeError:")
            add(f"    {out} = None")
            add("else:")
        else:
            values = base
            add(f"if not isinstance({base}, list):")
            add(f"    {out} = None")
            add("else:")
        body.indent += 1
        right = children[1] if kind != "flatten" else None
        if right is not None and right["type"] == "identity" and kind != "filter_projection":
            add(f"{out} = [{item} for {item} in {values} if {item} is not None]")
        else:
            add(f"{out} = []")
            add(f"for {item} in {values}:")
            body.indent += 1
            if kind == "flatten":
                add(f"if isinstance({item}, list):")
                add(f"    {out}.extend({item})")
                add("else:")
                add(f"    {out}.append({item})")
            else:
                if kind == "filter_projection":
                    keep = self.emit(body, children[2], item)
                    add(f"if not ({self.false_test(body, keep)}):")
                    body.indent += 1
                assert right is not None
                result = self.emit(body, right, item)
                add(f"if {result} is not None:")
                add(f"    {out}.append({result})")
                if kind == "filter_projection":
                    body.indent -= 1
            body.indent -= 1
        body.indent -= 1
        return out

    def comparator(self, body: _Body, op: str, children: Sequence[Node], cur: str) -> str:
        left = self.emit(body, children[0], cur)
        right = self.emit(body, children[1], cur)
        out = body.temp()
        if op in ("eq", "ne"):
            # == is _equals except that 0/1 never equal false/true; the slow path decides
            # whenever exactly one side is a bool.
            left_type, right_type = self.known_type(body, left), self.known_type(body, right)
            if left_type and right_type and (left_type is bool) is (right_type is bool):
                test = f"{left} == {right}"
            elif left_type or right_type:
                other, known = (right, left_type) if left_type else (left, right_type)
                same = "is" if known is bool else "is not"
                test = (f"({left} == {right} and (type({other}) {same} bool"
                        f" or _equals({left}, {right})))")
            else:
                test = (f"({left} == {right} and ((type({left}) is bool) is (type({right}) is bool)"
                        f" or _equals({left}, {right})))")
            body.add(f"{out} = {test if op == 'eq' else 'not ' + test}")
            body.types[out] = bool
            return out
        tests = []
        for atom in (left, right):
            known = self.known_type(body, atom)
            if known is None:
                tests.append(f"(type({atom}) in _CMP_TYPES or _comparable({atom}))")
            elif known not in (int, float, str):
                tests.append("False")
        comparison = f"{left} {_COMPARE_OPS[op]} {right}"
        body.add(f"{out} = ({comparison}) if {' and '.join(tests)} else None" if tests
                 else f"{out} = {comparison}")
        return out

    def call(self, body: _Body, name: str, children: Sequence[Node], cur: str) -> str:
        args = [self.emit(body, child, cur) for child in children]
        out = body.temp()
        slow = f"_call({self.const(name)}, [{', '.join(args)}])"
        spec = function_table(self.functions).get(name)
        checks = self.argument_checks(body, spec, args) if spec is not None else None
        if checks is None:
            body.add(f"{out} = {slow}")
            return out
        assert spec is not None
        direct = f"{self.const(spec['function'])}(_F{''.join(', ' + a for a in args)})"
        if not checks:
            body.add(f"{out} = {direct}")
        else:
            # The fast check accepts a subset of what _type_check accepts; anything else takes
            # the package's own path, which raises its exact error (or succeeds, for odd types).
            body.add(f"{out} = {direct} if {' and '.join(checks)} else {slow}")
        return out

    def argument_checks(
        self, body: _Body, spec: FunctionSpec, args: Sequence[str]
    ) -> list[str] | None:
        """Inline type tests equivalent to (or stricter than) Functions._validate_arguments;
        None when the call must always go through call_function (arity errors and the like)."""
        if not self.fast_calls:
            return None
        params = spec["signature"]
        variadic = bool(params) and bool(params[-1].get("variadic"))
        if (len(args) < len(params)) if variadic else (len(args) != len(params)):
            return None
        checks = []
        for param, arg in zip(params, args, strict=False):  # only the declared ones are checked
            types = param["types"]
            if not types:
                continue
            test = self.type_test(types, arg, self.known_type(body, arg))
            if test is None:
                return None
            if test != "True":
                checks.append(test)
        return checks

    def type_test(self, types: Sequence[str], arg: str, known: type | None) -> str | None:
        """A Python test that passes only where Functions._type_check_single passes; None
        when the fast path cannot decide (and the call always goes through call_function)."""
        if any(t.split("-", 1)[0] not in _FAST_TYPES for t in types):
            return None
        if any("-" in t for t in types):
            # Arrays with typed elements (array-number, array-string); the package applies the
            # element check to any accepted value, so only lists take the fast path.
            groups = []
            for t in types:
                kind, _, sub = t.partition("-")
                if kind != "array" or sub not in _FAST_TYPES:
                    return None
                allowed = frozenset(cast(type, self.type_object(n)) for n in _FAST_TYPES[sub])
                groups.append(f"{self.const(allowed)}.issuperset(map(type, {arg}))")
            return f"(type({arg}) is list and ({' or '.join(groups)}))"
        names = [n for t in types for n in _FAST_TYPES[t]]
        if known is not None:
            return "True" if known in {self.type_object(n) for n in names} else None
        if len(names) == 1:
            return f"type({arg}) is {names[0]}"
        allowed = frozenset(cast(type, self.type_object(n)) for n in names)
        return f"type({arg}) in {self.const(allowed)}"

    @staticmethod
    def type_object(name: str) -> object:
        return _RUNTIME.get(name) or {"bool": bool, "list": list, "dict": dict, "str": str,
                                      "int": int, "float": float}[name]


def _generate(parsed: Node, functions: jmespath.functions.Functions) -> _Generator:
    generator = _Generator(functions)
    generator.function(parsed, "_search")
    return generator


def generate_source(parsed: Node, functions: jmespath.functions.Functions) -> str:
    """The Python source generated for `parsed` (for reading and debugging)."""
    return _generate(parsed, functions).source()


def compile_search(parsed: Node, functions: jmespath.functions.Functions) -> SearchFunction:
    """Compile `parsed` (from `jmespath.parser.Parser().parse(src).parsed`) once.

    `functions` resolves the calls (a `jmespath.functions.Functions`). An expression nested
    too deeply for Python's compiler falls back to jmespath's own interpreter.
    """
    try:
        generator = _generate(parsed, functions)
        code = compile(generator.source(), "<jmespath>", "exec")
    except (RecursionError, SyntaxError, MemoryError):
        interpreter = jmespath.visitor.TreeInterpreter(
            jmespath.visitor.Options(custom_functions=functions))

        def interpret(value: object) -> object:
            return cast(object, interpreter.visit(parsed, value))

        return interpret
    namespace = dict(_RUNTIME)
    namespace.update(generator.names)
    exec(code, namespace)  # our own generated code: every user-supplied value is in names
    for name, node, ref in generator.exprefs:
        namespace[ref] = Expref(node, cast(SearchFunction, namespace[name]), functions)
    return cast(SearchFunction, namespace["_search"])
