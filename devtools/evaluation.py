"""A BFCL-style function-calling evaluation: the case format, loading it, and scoring a model's calls.

A case is a JSON object::

    {"id": "simple_weather_paris",
     "category": "simple",                 # simple | multiple | parallel | irrelevance
     "question": "What's the weather in Paris?",
     "functions": [{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}],
     "expected": [{"name": "get_weather", "arguments": {"city": ["Paris"], "unit": ["", "celsius", "fahrenheit"]}}]}

`expected` lists the calls the question needs (none for ``irrelevance``: the model must not call). As in
BFCL's "possible answers", every argument maps to the list of values accepted for it; ``""`` in the list
means the argument may be omitted. An argument of the schema that `expected` does not list must not be
given (BFCL: "unexpected parameter"), so a case lists every optional argument a model may reasonably add.

`score_case` checks a model's calls the way BFCL's AST checker does: the number of calls, each call's
function name, required arguments present, no unknown or unexpected arguments, and every value among
the acceptable ones. Numbers compare numerically (an integer is accepted for a `number`, not a fraction
for an `integer`), booleans by identity, strings case-insensitively once surrounding whitespace and
trailing punctuation are stripped. Parallel calls are matched in any order.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeswarm.agent.schema import SchemaError, check_schema

CATEGORIES = ("simple", "multiple", "parallel", "irrelevance")
OMITTED = ""  # in an argument's acceptable values: the argument may be left out
_TRAILING_PUNCTUATION = ".,;:!?"


@dataclass(frozen=True)
class CaseScore:
    """Whether the calls were right, and why not (or a short confirmation when they were)."""

    ok: bool
    reason: str


# --- loading and validating cases ------------------------------------------------------------------------


def load_cases(path: str | Path) -> list[dict]:
    """The cases of a JSON file (a list of cases, or {"cases": [...]}), validated; ValueError if malformed."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    if isinstance(data, dict) and "cases" in data:
        data = data["cases"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of cases (or an object with a 'cases' list)")  # noqa: TRY004 - a malformed file
    seen: set[str] = set()
    for index, case in enumerate(data):
        validate_case(case, where=f"{path}: case {index}")
        if case["id"] in seen:
            raise ValueError(f"{path}: case {index}: duplicate id {case['id']!r}")
        seen.add(case["id"])
    return data


def validate_case(case: Any, where: str = "case") -> None:
    """Raises ValueError, naming `where` and the problem, unless `case` is a well-formed case."""
    if not isinstance(case, dict):
        raise ValueError(f"{where}: a case must be an object")  # noqa: TRY004
    missing = [key for key in ("id", "category", "question", "functions", "expected") if key not in case]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    if not isinstance(case["id"], str) or not case["id"]:
        raise ValueError(f"{where}: 'id' must be a non-empty string")
    where = f"{where} ({case['id']})"
    if case["category"] not in CATEGORIES:
        raise ValueError(f"{where}: category {case['category']!r} is not one of {', '.join(CATEGORIES)}")
    if not isinstance(case["question"], str) or not case["question"].strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    schemas = _function_schemas(case["functions"], where)
    expected = case["expected"]
    if not isinstance(expected, list):
        raise ValueError(f"{where}: 'expected' must be a list of calls")  # noqa: TRY004
    for position, call in enumerate(expected):
        _validate_expected_call(call, schemas, f"{where}: expected[{position}]")
    count = len(expected)
    category = case["category"]
    if category == "irrelevance" and count:
        raise ValueError(f"{where}: an irrelevance case expects no call, it lists {count}")
    if category in ("simple", "multiple") and count != 1:
        raise ValueError(f"{where}: a {category} case expects exactly one call, it lists {count}")
    if category == "parallel" and count < 2:
        raise ValueError(f"{where}: a parallel case expects at least two calls, it lists {count}")
    if category == "simple" and len(schemas) != 1:
        raise ValueError(f"{where}: a simple case offers one function, it offers {len(schemas)}")
    if category == "multiple" and len(schemas) < 2:
        raise ValueError(f"{where}: a multiple case offers several functions, it offers {len(schemas)}")


def _function_schemas(functions: Any, where: str) -> dict[str, dict]:
    """{name: parameters schema} of a case's OpenAI-format tools, checked."""
    if not isinstance(functions, list) or not functions:
        raise ValueError(f"{where}: 'functions' must be a non-empty list of tools")
    schemas: dict[str, dict] = {}
    for position, tool in enumerate(functions):
        spot = f"{where}: functions[{position}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ValueError(f'{spot}: expected {{"type": "function", "function": {{...}}}}')
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{spot}: the function needs a name")
        if name in schemas:
            raise ValueError(f"{spot}: function {name!r} is offered twice")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        try:
            check_schema(parameters, f"{name}.parameters")
        except SchemaError as error:
            raise ValueError(f"{spot}: {error}") from error
        if parameters.get("type") != "object":
            raise ValueError(f"{spot}: the parameters of {name!r} must be an object schema")
        schemas[name] = parameters
    return schemas


def _validate_expected_call(call: Any, schemas: dict[str, dict], where: str) -> None:
    if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
        raise ValueError(f'{where}: an expected call is {{"name": ..., "arguments": {{...}}}}')
    name, arguments = call["name"], call["arguments"]
    if name not in schemas:
        raise ValueError(f"{where}: {name!r} is not among the offered functions ({', '.join(schemas)})")
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: 'arguments' must map argument names to lists of acceptable values")  # noqa: TRY004
    properties = schemas[name].get("properties", {})
    for argument, values in arguments.items():
        if argument not in properties:
            raise ValueError(f"{where}: {argument!r} is not a parameter of {name!r}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: {argument!r} must list its acceptable values (a non-empty list)")
    for argument in schemas[name].get("required", []):
        if argument not in arguments:
            raise ValueError(f"{where}: required argument {argument!r} of {name!r} has no acceptable values")
        if OMITTED in arguments[argument]:
            raise ValueError(f"{where}: required argument {argument!r} cannot be omitted (it lists \"\")")


# --- scoring ---------------------------------------------------------------------------------------------


def score_case(case: Mapping[str, Any], decision_calls: Iterable[Any]) -> CaseScore:
    """Scores a model's calls (`ToolCall`s or {"name", "arguments"} dicts) against a case's expected calls."""
    calls = [_as_call(call) for call in decision_calls]
    expected = list(case["expected"])
    schemas = {tool["function"]["name"]: tool["function"].get("parameters") or {} for tool in case["functions"]}
    if not expected:
        if calls:
            return CaseScore(False, f"called {', '.join(name for name, _ in calls)} where no function fits")
        return CaseScore(True, "no call, as expected")
    if not calls:
        return CaseScore(False, "no call made")
    if len(calls) != len(expected):
        return CaseScore(False, f"expected {len(expected)} call(s), got {len(calls)}: {', '.join(name for name, _ in calls)}")
    if case.get("category") != "parallel":  # calls in order (one call for simple and multiple)
        for call, want in zip(calls, expected):
            problem = call_problem(call, want, schemas)
            if problem:
                return CaseScore(False, problem)
        return CaseScore(True, "right call(s)")
    return _score_unordered(calls, expected, schemas)


def _score_unordered(calls: list[tuple[str, dict]], expected: list[dict], schemas: dict[str, dict]) -> CaseScore:
    """Order-free matching: some pairing of calls with expected calls must match every pair."""
    problems = [[call_problem(call, want, schemas) for want in expected] for call in calls]
    best, best_pairing = -1, None
    for pairing in itertools.permutations(range(len(expected))):
        matched = sum(problems[index][target] is None for index, target in enumerate(pairing))
        if matched == len(calls):
            return CaseScore(True, "right calls (any order)")
        if matched > best:
            best, best_pairing = matched, pairing
    assert best_pairing is not None
    index, target = next((index, target) for index, target in enumerate(best_pairing) if problems[index][target])
    return CaseScore(False, f"call {index + 1} of {len(calls)} matches no expected call: {problems[index][target]}")


def call_problem(call: tuple[str, dict], expected: Mapping[str, Any], schemas: Mapping[str, dict]) -> str | None:
    """Why `call` (name, arguments) does not match one expected call, or None when it does."""
    name, arguments = call
    if name != expected["name"]:
        return f"called {name!r} instead of {expected['name']!r}"
    if not isinstance(arguments, dict):
        return f"{name}: arguments are not an object"
    schema = schemas.get(name, {})
    properties = schema.get("properties", {})
    acceptable: dict[str, list] = expected["arguments"]
    for argument in schema.get("required", []):
        if argument not in arguments:
            return f"{name}: required argument {argument!r} missing"
    for argument, value in arguments.items():
        if argument not in properties:
            return f"{name}: unknown argument {argument!r}"
        if argument not in acceptable:
            return f"{name}: unexpected argument {argument!r}={value!r}"
        options = [option for option in acceptable[argument] if not _is_omission(option)]
        if not any(values_match(value, option, properties[argument]) for option in options):
            return f"{name}: {argument}={value!r} is not among {options!r}"
    for argument, options in acceptable.items():
        if argument not in arguments and OMITTED not in options:
            return f"{name}: argument {argument!r} missing"
    return None


def _is_omission(option: Any) -> bool:
    """`""` marks an argument that may be left out (never an acceptable value in itself)."""
    return isinstance(option, str) and option == OMITTED


def values_match(value: Any, option: Any, schema: Mapping[str, Any] | None = None) -> bool:
    """Whether a model's `value` counts as the acceptable `option` (see the module docstring)."""
    if isinstance(option, bool) or isinstance(value, bool):
        return isinstance(option, bool) and isinstance(value, bool) and option is value
    if _is_number(option):
        if not _is_number(value) or not math.isfinite(value):
            return False
        if (schema or {}).get("type") == "integer" and isinstance(value, float) and not value.is_integer():
            return False
        return math.isclose(float(value), float(option), rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(option, str):
        return isinstance(value, str) and normalize_string(value) == normalize_string(option)
    if isinstance(option, list):
        return isinstance(value, list) and len(value) == len(option) and all(map(values_match, value, option))
    if isinstance(option, dict):
        return (
            isinstance(value, dict)
            and value.keys() == option.keys()
            and all(values_match(value[key], option[key]) for key in option)
        )
    return value == option


def normalize_string(text: str) -> str:
    """Lower case, without surrounding whitespace or trailing punctuation."""
    return text.strip().rstrip(_TRAILING_PUNCTUATION).strip().lower()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_call(call: Any) -> tuple[str, dict]:
    """(name, arguments) of a `ToolCall` or of a {"name", "arguments"} dict."""
    if isinstance(call, Mapping):
        return str(call.get("name")), call.get("arguments") or {}
    return str(call.name), call.arguments


# --- reports ---------------------------------------------------------------------------------------------


def accuracy_by_category(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """{"overall" and each category present: {"cases", "correct", "accuracy"}} from per-case results."""
    table: dict[str, dict[str, float]] = {}
    for result in results:
        for key in ("overall", result["category"]):
            row = table.setdefault(key, {"cases": 0, "correct": 0})
            row["cases"] += 1
            row["correct"] += int(bool(result["ok"]))
    for row in table.values():
        row["accuracy"] = row["correct"] / row["cases"] if row["cases"] else 0.0
    order = ["overall", *CATEGORIES]
    return {key: table[key] for key in sorted(table, key=lambda key: order.index(key) if key in order else len(order))}
