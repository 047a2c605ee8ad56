"""Run the JMESPath compliance suite (a directory of *.json) through engine.rules.expressions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jmespath
import jmespath.exceptions

from engine.rules.expressions import ExpressionError, compile_expression
from engine.rules.functions import FUNCTIONS

# Suite error name -> (our compile-time codes, run-time exception classes) that count as it.
_ERRORS: dict[str, tuple[frozenset[str], tuple[type[BaseException], ...]]] = {
    "syntax": (frozenset({"expression-syntax"}),
               (jmespath.exceptions.ParseError, jmespath.exceptions.LexerError)),
    "invalid-type": (frozenset({"argument-type"}), (jmespath.exceptions.JMESPathTypeError,)),
    "unknown-function": (frozenset({"unknown-function"}),
                         (jmespath.exceptions.UnknownFunctionError,)),
    "invalid-arity": (frozenset({"wrong-argument-count"}), (jmespath.exceptions.ArityError,)),
    # The spec only says "an error" here (jmespath itself raises ValueError for [::0]).
    "invalid-value": (frozenset({"expression-syntax"}), (ValueError,)),
}


def run_case(given: object, case: dict[str, object]) -> str | None:
    """None when the case passes, else what went wrong."""
    source = str(case["expression"])
    if "error" in case:
        codes, classes = _ERRORS[str(case["error"])]
        try:
            compile_expression(source).search(given)
        except ExpressionError as exc:
            return None if exc.code in codes else f"raised {exc.code}: {exc.message}"
        except classes:
            return None
        except Exception as exc:  # reported, not raised: one bad case must not hide others
            return f"raised {type(exc).__name__}: {exc}"
        return f"expected a {case['error']} error, got a result"
    try:
        actual = compile_expression(source).search(given)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"
    if "bench" in case:  # no expected value: agree with the package's interpreter
        options = jmespath.Options(custom_functions=FUNCTIONS)
        expected = jmespath.search(source, given, options=options)
    else:
        expected = case["result"]
    if json.dumps(actual, sort_keys=True) != json.dumps(expected, sort_keys=True):
        return f"expected {json.dumps(expected)}, got {json.dumps(actual)}"
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/rules/check_jmespath_compliance.py DIR", file=sys.stderr)
        return 2
    passed, failures, benched = 0, [], 0
    for path in sorted(Path(argv[0]).glob("*.json")):
        for group in json.loads(path.read_text(encoding="utf-8")):
            for case in group["cases"]:
                problem = run_case(group["given"], case)
                if problem is not None:
                    failures.append(f"{path.name}: {case['expression']!r}: {problem}")
                elif "bench" in case:
                    benched += 1
                else:
                    passed += 1
    print(f"{passed} passed, {len(failures)} failed")
    print(f"({benched} benchmark cases, which carry no expected result, agreed with jmespath)")
    for failure in failures:
        print(f"  FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
