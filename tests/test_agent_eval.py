"""The function-calling evaluation's case file and scorer (agent/evaluation.py); no model is loaded."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest

from edgeswarm.agent.constrained import ToolCall
from devtools.evaluation import (
    CATEGORIES,
    OMITTED,
    accuracy_by_category,
    load_cases,
    normalize_string,
    score_case,
    values_match,
)
from edgeswarm.agent.schema import validate

CASES_FILE = Path(__file__).resolve().parent.parent / "scripts" / "agent_eval_cases.json"


def _tool(name: str, properties: dict, required: list[str]) -> dict:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": name, "parameters": parameters}}


WEATHER = _tool("get_weather", {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"])
ALARM = _tool("set_alarm", {"hour": {"type": "integer"}, "minute": {"type": "integer"}}, ["hour", "minute"])
AREA = _tool("circle_area", {"radius": {"type": "number"}}, ["radius"])
LIGHT = _tool("set_light", {"room": {"type": "string"}, "on": {"type": "boolean"}}, ["room", "on"])


def _case(category: str, functions: list[dict], expected: list[tuple[str, dict]], question: str = "q?") -> dict:
    return {
        "id": f"test_{category}",
        "category": category,
        "question": question,
        "functions": functions,
        "expected": [{"name": name, "arguments": arguments} for name, arguments in expected],
    }


SIMPLE = _case("simple", [WEATHER], [("get_weather", {"city": ["Paris", "Paris, France"], "unit": ["", "celsius"]})])
MULTIPLE = _case("multiple", [WEATHER, ALARM, AREA], [("set_alarm", {"hour": [7], "minute": [30]})])
PARALLEL = _case(
    "parallel",
    [WEATHER, LIGHT],
    [
        ("get_weather", {"city": ["Paris"], "unit": [OMITTED]}),
        ("get_weather", {"city": ["Rome"], "unit": [OMITTED]}),
        ("set_light", {"room": ["kitchen"], "on": [True]}),
    ],
)
IRRELEVANT = _case("irrelevance", [WEATHER, ALARM], [])


def call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


def representative_arguments(expected: dict) -> dict:
    """The first acceptable value of every argument (arguments that may only be omitted are left out)."""
    return {
        argument: next(value for value in values if value != OMITTED)
        for argument, values in expected["arguments"].items()
        if values != [OMITTED]
    }


# --- the case file ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return load_cases(CASES_FILE)


def test_case_file_loads_with_enough_cases_of_every_category(cases):
    counts = Counter(case["category"] for case in cases)
    assert len(cases) >= 60
    assert all(counts[category] >= 15 for category in CATEGORIES), counts


def test_case_ids_are_unique(cases):
    assert len({case["id"] for case in cases}) == len(cases)


def test_categories_have_their_shape(cases):
    for case in cases:
        functions, expected = case["functions"], case["expected"]
        if case["category"] == "simple":
            assert len(functions) == 1 and len(expected) == 1, case["id"]
        elif case["category"] == "multiple":
            assert 2 <= len(functions) <= 4 and len(expected) == 1, case["id"]
        elif case["category"] == "parallel":
            assert 2 <= len(expected) <= 3, case["id"]
        else:
            assert functions and expected == [], case["id"]


def test_expected_calls_name_offered_functions_and_fit_their_schemas(cases):
    for case in cases:
        schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in case["functions"]}
        for expected in case["expected"]:
            assert expected["name"] in schemas, case["id"]
            schema = schemas[expected["name"]]
            for argument, values in expected["arguments"].items():
                assert argument in schema["properties"], (case["id"], argument)
                for value in values:  # every acceptable value, not only the first, fits the schema
                    if value != OMITTED:
                        assert validate(value, schema["properties"][argument], root=argument) == [], (case["id"], argument, value)
            assert validate(representative_arguments(expected), schema) == [], (case["id"], expected)


def test_expected_calls_list_every_parameter(cases):
    """So that no reasonable optional argument is scored as unexpected by accident."""
    for case in cases:
        schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in case["functions"]}
        for expected in case["expected"]:
            assert set(expected["arguments"]) == set(schemas[expected["name"]]["properties"]), case["id"]


def test_case_schemas_use_only_constructs_the_decoder_follows(cases):
    allowed_types = {"string", "integer", "number", "boolean"}
    for case in cases:
        for tool in case["functions"]:
            parameters = tool["function"]["parameters"]
            assert parameters["type"] == "object"
            for prop in parameters["properties"].values():
                assert prop["type"] in allowed_types, (case["id"], prop)
                assert set(prop) <= {"type", "description", "enum"}, (case["id"], prop)


def test_every_right_answer_scores_ok(cases):
    for case in cases:
        calls = [call(expected["name"], **representative_arguments(expected)) for expected in case["expected"]]
        assert score_case(case, calls).ok, case["id"]


# --- malformed files -------------------------------------------------------------------------------------


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda case: case.pop("question"), "missing question"),
        (lambda case: case.update(category="chat"), "category 'chat'"),
        (lambda case: case["expected"][0].update(name="get_time"), "not among the offered functions"),
        (lambda case: case["expected"][0]["arguments"].pop("city"), "required argument 'city'"),
        (lambda case: case["expected"][0]["arguments"].update(country=["France"]), "not a parameter"),
        (lambda case: case["expected"][0]["arguments"].update(city="Paris"), "acceptable values"),
        (lambda case: case["expected"][0]["arguments"].update(city=["", "Paris"]), "cannot be omitted"),
        (lambda case: case.update(expected=[]), "exactly one call"),
        (lambda case: case["functions"].append(ALARM), "offers one function"),
        (lambda case: case["functions"][0]["function"]["parameters"].update(pattern="x"), "unsupported keyword"),
    ],
)
def test_malformed_cases_are_refused_clearly(tmp_path, change, message):
    case = copy.deepcopy(SIMPLE)
    change(case)
    with pytest.raises(ValueError, match=message):
        load_cases(_write(tmp_path, [case]))


def test_duplicate_ids_and_bad_json_are_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate id"):
        load_cases(_write(tmp_path, [SIMPLE, SIMPLE]))
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_cases(path)
    with pytest.raises(ValueError, match="irrelevance case expects no call"):
        load_cases(_write(tmp_path, {"cases": [{**IRRELEVANT, "expected": MULTIPLE["expected"]}]}))


# --- scoring ---------------------------------------------------------------------------------------------


def test_right_calls_are_accepted():
    assert score_case(SIMPLE, [call("get_weather", city="Paris")]).ok
    assert score_case(SIMPLE, [call("get_weather", city="Paris, France", unit="celsius")]).ok
    assert score_case(MULTIPLE, [ToolCall("set_alarm", {"hour": 7, "minute": 30})]).ok
    assert score_case(IRRELEVANT, []).ok


def test_wrong_function_name_is_rejected():
    score = score_case(MULTIPLE, [call("get_weather", city="7:30")])
    assert not score.ok and "instead of 'set_alarm'" in score.reason


def test_missing_required_argument_is_rejected():
    score = score_case(MULTIPLE, [call("set_alarm", hour=7)])
    assert not score.ok and "required argument 'minute' missing" in score.reason


def test_wrong_values_are_rejected():
    assert not score_case(MULTIPLE, [call("set_alarm", hour=7, minute=45)]).ok
    assert not score_case(SIMPLE, [call("get_weather", city="Lyon")]).ok
    assert not score_case(SIMPLE, [call("get_weather", city="Paris", unit="fahrenheit")]).ok
    assert not score_case(MULTIPLE, [call("set_alarm", hour="7", minute=30)]).ok  # a string is not a number


def test_unknown_and_unexpected_arguments_are_rejected():
    score = score_case(MULTIPLE, [call("set_alarm", hour=7, minute=30, second=0)])
    assert not score.ok and "unknown argument 'second'" in score.reason
    no_unit = _case("simple", [WEATHER], [("get_weather", {"city": ["Paris"]})])
    score = score_case(no_unit, [call("get_weather", city="Paris", unit="celsius")])
    assert not score.ok and "unexpected argument 'unit'" in score.reason


def test_optional_argument_must_be_given_unless_it_may_be_omitted():
    must_give_unit = _case("simple", [WEATHER], [("get_weather", {"city": ["Tokyo"], "unit": ["fahrenheit"]})])
    assert not score_case(must_give_unit, [call("get_weather", city="Tokyo")]).ok
    assert score_case(must_give_unit, [call("get_weather", city="Tokyo", unit="fahrenheit")]).ok


def test_extra_call_and_missing_call_are_rejected():
    score = score_case(SIMPLE, [call("get_weather", city="Paris"), call("get_weather", city="Paris")])
    assert not score.ok and "expected 1 call(s), got 2" in score.reason
    score = score_case(SIMPLE, [])
    assert not score.ok and score.reason == "no call made"


def test_a_call_on_an_irrelevance_case_is_rejected():
    score = score_case(IRRELEVANT, [call("get_weather", city="Paris")])
    assert not score.ok and "get_weather" in score.reason


def test_parallel_calls_match_in_any_order():
    calls = [call("set_light", room="Kitchen", on=True), call("get_weather", city="rome"), call("get_weather", city="Paris")]
    assert score_case(PARALLEL, calls).ok
    assert score_case(PARALLEL, calls[::-1]).ok


def test_parallel_calls_must_each_match_a_different_expected_call():
    twice_paris = [call("get_weather", city="Paris"), call("get_weather", city="Paris"), call("set_light", room="kitchen", on=True)]
    score = score_case(PARALLEL, twice_paris)
    assert not score.ok and "matches no expected call" in score.reason
    assert not score_case(PARALLEL, twice_paris[1:]).ok  # too few calls
    wrong_value = [call("get_weather", city="Rome"), call("get_weather", city="Paris"), call("set_light", room="kitchen", on=False)]
    assert not score_case(PARALLEL, wrong_value).ok


def test_numbers_compare_numerically():
    assert score_case(_case("simple", [AREA], [("circle_area", {"radius": [4.0]})]), [call("circle_area", radius=4)]).ok
    assert score_case(_case("simple", [AREA], [("circle_area", {"radius": [4]})]), [call("circle_area", radius=4.0)]).ok
    assert not score_case(_case("simple", [AREA], [("circle_area", {"radius": [4]})]), [call("circle_area", radius=4.5)]).ok
    assert not values_match(7.5, 7, {"type": "integer"})
    assert not values_match(True, 1) and not values_match(1, True)


def test_strings_ignore_case_whitespace_and_trailing_punctuation():
    assert normalize_string("  Paris. ") == "paris"
    assert values_match("PARIS!", "Paris") and values_match(" paris ", "Paris")
    assert not values_match("Par is", "Paris") and not values_match("Paris", 1)


def test_booleans_compare_strictly():
    case = _case("simple", [LIGHT], [("set_light", {"room": ["kitchen"], "on": [True]})])
    assert score_case(case, [call("set_light", room="kitchen", on=True)]).ok
    assert not score_case(case, [call("set_light", room="kitchen", on=False)]).ok
    assert not score_case(case, [call("set_light", room="kitchen", on="true")]).ok


def test_accuracy_by_category():
    table = accuracy_by_category(
        [{"category": "simple", "ok": True}, {"category": "simple", "ok": False}, {"category": "irrelevance", "ok": True}]
    )
    assert list(table) == ["overall", "simple", "irrelevance"]
    assert table["overall"]["accuracy"] == pytest.approx(2 / 3) and table["simple"]["correct"] == 1
