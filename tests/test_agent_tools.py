"""The agent's tool layer: schema validation, @tool, the registry, the calculator, the sandbox, tools files."""

from __future__ import annotations

import json
import math
import threading
import uuid
from pathlib import Path
from typing import Literal, Optional

import pytest

from edgeswarm.agent import sandbox
from edgeswarm.agent.calculator import CalculatorError, evaluate
from edgeswarm.agent.schema import SchemaError, validate
from edgeswarm.agent.tools import (
    CODE_TOOLS,
    ToolArgumentError,
    ToolLoadError,
    ToolRegistry,
    ToolSpec,
    UnknownToolError,
    builtin_tools,
    check_allowed_tools,
    load_tools_file,
    parse_allowed_tools,
    spec_of,
    tool,
)

CUSTOM_TOOLS = Path(__file__).parent / "data" / "custom_tools.py"
PYTHON_SPEC = spec_of(CODE_TOOLS["python"])  # its schema, without checking that its sandbox runs here

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string", "minLength": 1}, "vip": {"type": "boolean"}},
            "required": ["name"],
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 8},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                },
                "required": ["sku", "quantity"],
                "additionalProperties": False,
            },
        },
        "size": {"enum": ["S", "M", "L"]},
        "weight": {"type": "number"},
        "note": {"type": ["string", "null"]},
    },
    "required": ["customer", "items"],
    "additionalProperties": False,
}


# --------------------------------------------------------------------------- schema


def test_a_valid_nested_value_has_no_errors():
    order = {
        "customer": {"name": "Ada", "vip": True, "extra": "allowed: additionalProperties defaults to true"},
        "items": [{"sku": "A1", "quantity": 2}, {"sku": "B2", "quantity": 99}],
        "size": "M",
        "weight": 3,  # an integer is a number
        "note": None,
    }
    assert validate(order, ORDER_SCHEMA) == []


def test_errors_carry_json_paths_and_are_all_reported():
    order = {
        "customer": {"name": "", "vip": "yes"},
        "items": [{"sku": "TOO-LONG-SKU", "quantity": 0}, {"quantity": 1.5, "colour": "red"}, "x"],
        "size": "XL",
        "note": 5,
        "gift": True,
    }
    assert validate(order, ORDER_SCHEMA) == [
        "arguments.customer.name: string is shorter than 1 characters",
        "arguments.customer.vip: expected boolean, got string",
        "arguments.items[0].sku: string is longer than 8 characters",
        "arguments.items[0].quantity: 0 is less than the minimum 1",
        "arguments.items[1]: missing required property 'sku'",
        "arguments.items[1].quantity: expected integer, got number",
        "arguments.items[1]: unexpected property 'colour'",
        "arguments.items[2]: expected object, got string",
        'arguments.size: "XL" is not one of ["S", "M", "L"]',
        "arguments.note: expected string or null, got integer",
        "arguments: unexpected property 'gift'",
    ]


def test_missing_required_and_wrong_top_level_type():
    assert validate({"items": []}, ORDER_SCHEMA) == ["arguments: missing required property 'customer'"]
    assert validate([], ORDER_SCHEMA) == ["arguments: expected object, got array"]


@pytest.mark.parametrize(
    ("value", "schema", "error"),
    [
        (True, {"type": "integer"}, "expected integer, got boolean"),
        (False, {"type": "number"}, "expected number, got boolean"),
        (1, {"type": "boolean"}, "expected boolean, got integer"),
        (1.0, {"type": "integer"}, "expected integer, got number"),
        (float("nan"), {"type": "number"}, "expected number, got non-finite number"),
        (True, {"enum": [1, 2]}, "true is not one of [1, 2]"),
        (1, {"enum": [True]}, "1 is not one of [true]"),
        (100, {"type": "number", "maximum": 10.5}, "100 is greater than the maximum 10.5"),
    ],
)
def test_json_types_are_not_python_types(value, schema, error):
    assert validate(value, schema, root="x") == [f"x: {error}"]


@pytest.mark.parametrize(
    ("value", "schema"),
    [
        (3, {"type": "number"}),
        (2.0, {"enum": [1, 2]}),
        (None, {"type": "null"}),
        ({"a": 1}, {"type": "object", "additionalProperties": {"type": "integer"}}),
    ],
)
def test_json_matches(value, schema):
    assert validate(value, schema) == []


def test_additional_properties_can_be_a_schema():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "integer"}}
    assert validate({"a": "x", "b": 1, "c": "no"}, schema) == ["arguments.c: expected integer, got string"]


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "strng"}, "unknown type 'strng'"),
        ({"type": []}, "non-empty"),
        ({"type": "object", "properties": []}, "properties: must be an object"),
        ({"type": "object", "properties": {"a": {"type": "integr"}}}, "schema.properties.a.type"),
        ({"type": "object", "required": "a"}, "required: must be an array of strings"),
        ({"type": "object", "required": ["a"], "additionalProperties": False}, "'a' is required but not declared"),
        ({"type": "array", "items": [{"type": "string"}]}, "schema.items: a schema must be an object"),
        ({"enum": []}, "enum: must be a non-empty array"),
        ({"minimum": "1"}, "minimum: must be a number"),
        ({"maxLength": -1}, "maxLength: must be a non-negative integer"),
        ({"maxLength": True}, "maxLength: must be a non-negative integer"),
        ({"type": "string", "pattern": "^a"}, "unsupported keyword(s) 'pattern'"),
        ("string", "a schema must be an object"),
    ],
)
def test_malformed_schema_is_refused(schema, message):
    with pytest.raises(SchemaError) as raised:
        validate("x", schema)
    assert message in str(raised.value)


# --------------------------------------------------------------------------- @tool


@tool(name="convert", idempotent=True, timeout=2)
def convert_units(
    value: float,
    unit: Literal["celsius", "fahrenheit"],
    precision: int = 2,
    labels: list[str] | None = None,
    strict: Optional[bool] = None,  # noqa: UP045 - typing.Optional must work too
) -> str:
    """Convert a temperature
    between units.

    Longer explanation that is not part of the description.

    Args:
        value: The temperature to convert.
        unit (str): The unit to convert to.
        precision: Digits after the decimal point,
            at most 10.
        labels: Extra labels.

    Returns:
        The converted temperature.
    """
    return f"{value} {unit} {precision} {labels} {strict}"


def test_decorator_derives_the_schema():
    spec = spec_of(convert_units)
    assert spec.name == "convert" and spec.idempotent and spec.timeout == 2
    assert spec.description == "Convert a temperature between units."
    assert spec.parameters == {
        "type": "object",
        "properties": {
            "value": {"type": "number", "description": "The temperature to convert."},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "The unit to convert to."},
            "precision": {"type": "integer", "description": "Digits after the decimal point, at most 10.", "default": 2},
            "labels": {"type": ["array", "null"], "items": {"type": "string"}, "description": "Extra labels."},
            "strict": {"type": ["boolean", "null"]},
        },
        "required": ["value", "unit"],
        "additionalProperties": False,
    }
    assert convert_units(1.5, "celsius") == "1.5 celsius 2 None None"  # the function itself is unchanged


def test_optional_without_default_is_not_required_and_gets_none():
    @tool
    def greet(name: str | None) -> str:
        """Greet someone."""
        return f"hello {name}"

    assert spec_of(greet).parameters["required"] == []
    assert ToolRegistry([spec_of(greet)]).call("greet", {}).value == "hello None"


def test_openai_format():
    registry = ToolRegistry([spec_of(convert_units), *builtin_tools(), PYTHON_SPEC])
    schemas = registry.openai_schemas()
    assert [entry["function"]["name"] for entry in schemas] == ["convert", "calculator", "python"]
    assert schemas[0] == {
        "type": "function",
        "function": {
            "name": "convert",
            "description": "Convert a temperature between units.",
            "parameters": spec_of(convert_units).parameters,
        },
    }
    assert all(
        set(entry) == {"type", "function"} and set(entry["function"]) == {"name", "description", "parameters"}
        for entry in schemas
    )
    assert [entry["function"]["name"] for entry in registry.openai_schemas(["python"])] == ["python"]
    schemas[0]["function"]["parameters"]["properties"].clear()  # a copy: the spec is untouched
    assert spec_of(convert_units).parameters["properties"]
    json.dumps(schemas)


def test_decorator_refuses_what_json_cannot_describe():
    with pytest.raises(TypeError, match="needs a type hint"):
        tool(lambda x: x)
    with pytest.raises(TypeError, match="named arguments only"):

        @tool
        def variadic(*words: str) -> None:
            """Variadic."""

    with pytest.raises(TypeError, match="cannot be described in JSON"):

        @tool
        def complex_arg(z: complex) -> None:
            """Complex."""

    with pytest.raises(ValueError, match="needs a description"):

        @tool
        def undocumented(x: int) -> None:
            pass

    with pytest.raises(ValueError, match="must match"):

        @tool(name="bad name!")
        def badly_named() -> None:
            """Bad name."""


def test_builtin_tools_idempotency():
    specs = {spec.name: spec for spec in [*builtin_tools(), PYTHON_SPEC]}
    assert specs["calculator"].idempotent is True
    assert specs["python"].idempotent is False


# --------------------------------------------------------------------------- registry


def _registry() -> ToolRegistry:
    return ToolRegistry([spec_of(convert_units), *builtin_tools(), PYTHON_SPEC])


def test_validate_call_parses_json_text():
    registry = _registry()
    assert registry.validate_call("convert", '{"value": 20, "unit": "fahrenheit"}') == {"value": 20, "unit": "fahrenheit"}
    assert registry.validate_call("python", {"code": "print(1)"}) == {"code": "print(1)"}
    with pytest.raises(ToolArgumentError, match="not valid JSON"):
        registry.validate_call("convert", '{"value": 20,')
    with pytest.raises(ToolArgumentError, match="NaN is not valid JSON"):
        registry.validate_call("convert", '{"value": NaN, "unit": "celsius"}')
    with pytest.raises(ToolArgumentError, match="expected an object, got list"):
        registry.validate_call("convert", "[1, 2]")


def test_call_with_invalid_arguments_lists_every_error():
    with pytest.raises(ToolArgumentError) as raised:
        _registry().call("convert", {"value": "hot", "unit": "kelvin", "precision": True, "colour": "red"})
    assert isinstance(raised.value, ValueError)
    assert raised.value.errors == [
        "arguments.value: expected number, got string",
        'arguments.unit: "kelvin" is not one of ["celsius", "fahrenheit"]',
        "arguments.precision: expected integer, got boolean",
        "arguments: unexpected property 'colour'",
    ]
    assert "arguments.value: expected number, got string" in str(raised.value)


def test_unknown_tool_and_duplicate_names():
    registry = _registry()
    with pytest.raises(UnknownToolError, match="unknown tool 'nope'"):
        registry.call("nope", {})
    with pytest.raises(UnknownToolError):
        registry.openai_schemas(["nope"])
    with pytest.raises(ValueError, match="already registered"):
        registry.register(builtin_tools()[0])
    assert registry.names() == ["convert", "calculator", "python"]
    assert registry.get("calculator").name == "calculator" and "python" in registry


def test_call_runs_the_tool_and_returns_json():
    result = _registry().call("calculator", '{"expression": "2 * (3 + 4) ** 2"}')
    assert result.ok and result.value == 98 and result.error is None and result.seconds >= 0
    json.dumps(result.to_dict())


def _spec(function, **overrides) -> ToolSpec:
    fields = {
        "name": function.__name__,
        "description": "test tool",
        "parameters": {"type": "object"},
        "idempotent": True,
        "function": function,
    }
    return ToolSpec(**(fields | overrides))


def test_a_raising_tool_gives_a_failed_result():
    def explode() -> None:
        raise RuntimeError("disk on fire")

    def leave() -> None:
        raise SystemExit(1)

    registry = ToolRegistry([_spec(explode), _spec(leave)])
    result = registry.call("explode", {})
    assert (result.ok, result.value, result.error) == (False, None, "RuntimeError: disk on fire")
    assert registry.call("leave", None).error == "SystemExit: 1"


def test_results_must_be_json():
    registry = ToolRegistry(
        [
            _spec(lambda: {1, 2}, name="a_set"),
            _spec(lambda: float("inf"), name="infinite"),
            _spec(lambda: (1, "two"), name="a_tuple"),
        ]
    )
    assert registry.call("a_set", {}).error.startswith("TypeError: the tool returned a value that is not JSON-serialisable")
    assert not registry.call("infinite", {}).ok
    assert registry.call("a_tuple", {}).value == [1, "two"]


def test_a_tool_past_its_timeout_fails():
    release = threading.Event()
    registry = ToolRegistry([_spec(lambda: release.wait(60), name="slow", timeout=0.2)])
    try:
        result = registry.call("slow", {})  # the tool cannot finish before `release`: the call did not wait for it
    finally:
        release.set()
    assert not result.ok and "did not finish within 0.2 s" in result.error


# --------------------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 ** 3 ** 2", 512),
        ("-2 ** 2", -4),
        ("10 - 4 - 3", 3),
        ("7 / 2", 3.5),
        ("6 / 3", 2),
        ("7 // 2", 3),
        ("-7 % 3", 2),
        ("2 ** -1", 0.5),
        ("0.1 * 3", 0.30000000000000004),
        ("1e3 + 0.5", 1000.5),
        ("2 ** 100", 2**100),
        ("10 ** 30 / 10 ** 10", 10**20),
        ("sqrt(16) + abs(-3)", 7),
        ("round(pi, 2)", 3.14),
        ("round(2.5)", 2),
        ("floor(-2.5) + ceil(2.1)", 0),
        ("max(1, 5, 3) - min(4, 2)", 3),
        ("log(e) + log10(1000)", 4),
        ("exp(0) + sin(0) + cos(0) + tan(0)", 2),
        ("+-+1", -1),
        ("1+" * 400 + "1", 401),
    ],
)
def test_calculator_evaluates(expression, expected):
    result = evaluate(expression)
    assert result == expected and type(result) is type(expected)


def test_calculator_floats_and_functions():
    assert evaluate("sqrt(2) * sqrt(2)") == pytest.approx(2)
    assert evaluate("log(8, 2)") == pytest.approx(3)
    assert evaluate("sin(pi / 6)") == pytest.approx(0.5)
    assert evaluate("2 * pi") == math.tau


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "function '__import__' is not allowed"),
        ("().__class__", "attribute access is not allowed"),
        ("(1).__class__", "attribute access is not allowed"),
        ("open('/etc/passwd')", "function 'open' is not allowed"),
        ("x + 1", "unknown name 'x'"),
        ("'a' * 3", "only numbers are allowed"),
        ("True + 1", "only numbers are allowed"),
        ("[1, 2]", "List expressions are not allowed"),
        ("1 < 2", "Compare expressions are not allowed"),
        ("~1", "operator Invert is not allowed"),
        ("1 << 2", "operator LShift is not allowed"),
        ("lambda: 1", "Lambda expressions are not allowed"),
        ("1 +", "invalid syntax"),
        ("", "expression is empty"),
        ("1/0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("9**9**9", "too large"),
        ("2 ** 10001", "too large"),
        ("(2 ** 9000) * (2 ** 9000)", "too large"),
        ("10.0 ** 400", "too large"),
        ("1e999", "too large"),
        ("exp(1000)", "exp: result is too large"),
        ("(-8) ** 0.5", "complex"),
        ("sqrt(-1)", "sqrt: math domain error"),
        ("sqrt(1, 2)", "sqrt: takes 1 argument, got 2"),
        ("round(5, -10 ** 6)", "round: digits must be an integer"),
        ("max(x=1)", "only plain positional arguments"),
        ("sqrt", "sqrt is a function"),
        ("1+" * 600 + "1", "too long (1201 characters, limit 1000)"),
        ("-" * 500 + "1", "nested too deeply"),
        ("(" * 300 + "1" + ")" * 300, "too many nested parentheses"),
    ],
)
def test_calculator_refuses(expression, message):
    with pytest.raises(CalculatorError) as raised:
        evaluate(expression)
    assert message in str(raised.value)


# --------------------------------------------------------------------------- sandbox (its escapes: test_sandbox_escapes.py)


def _sandbox_problem() -> str:
    try:
        sandbox.check_available()
    except sandbox.SandboxUnavailableError as error:
        return str(error)
    return ""


needs_sandbox = pytest.mark.skipif(bool(_sandbox_problem()), reason=f"bwrap cannot build the sandbox here: {_sandbox_problem()}")


@needs_sandbox
def test_sandbox_prints_and_exits():
    result = sandbox.run_python("import sys\nprint('hello', 6 * 7)\nprint('oops', file=sys.stderr)\nsys.exit(3)")
    assert (result.stdout, result.stderr, result.exit_code, result.timed_out, result.truncated) == (
        "hello 42\n",
        "oops\n",
        3,
        False,
        False,
    )
    crashed = sandbox.run_python("1 / 0")
    assert crashed.exit_code == 1 and "ZeroDivisionError" in crashed.stderr


@needs_sandbox
def test_sandbox_timeout_kills_the_program():
    result = sandbox.run_python("while True:\n    pass", timeout=1.0)
    assert result.timed_out and result.exit_code == -9


@needs_sandbox
def test_sandbox_memory_limit_stops_a_big_allocation():
    result = sandbox.run_python("block = bytearray(1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert result.exit_code != 0 and "MemoryError" in result.stderr and "allocated" not in result.stdout


@needs_sandbox
def test_sandbox_work_directory_is_fresh_and_private():
    name = f"scratch-{uuid.uuid4().hex}.txt"
    code = f"import os, json\nopen({name!r}, 'w').write('x')\nprint(json.dumps([os.getcwd(), os.environ['HOME'], sorted(os.listdir())]))"
    cwd, home, listing = json.loads(sandbox.run_python(code).stdout)
    assert cwd == home == sandbox.WORK_DIR and listing == sorted([sandbox.SCRIPT_NAME, name])
    assert not Path(sandbox.WORK_DIR, name).exists(), "the sandbox wrote into the host's directory"
    again = sandbox.run_python("import os\nprint(sorted(os.listdir()))")
    assert again.stdout == f"{[sandbox.SCRIPT_NAME]}\n", "a run saw the previous run's files"


@needs_sandbox
def test_sandbox_output_flood_is_truncated():
    result = sandbox.run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout=1.0, max_output_bytes=1000)
    assert result.stdout == "x" * 1000 and result.truncated and result.timed_out


@needs_sandbox
def test_python_tool_returns_the_run():
    result = ToolRegistry(builtin_tools(allow=["python"])).call("python", {"code": "print(sum(range(10)))"})
    assert result.ok and result.value == {"stdout": "45\n", "stderr": "", "exit_code": 0, "timed_out": False}


def test_sandbox_without_bwrap_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "TOOL_SEARCH_PATH", str(tmp_path))  # a machine where bwrap is not installed
    sandbox._probe.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailableError, match="bwrap is not installed"):
            sandbox.check_available()
        with pytest.raises(sandbox.SandboxUnavailableError, match="bwrap is not installed"):
            sandbox.run_python("print(1)")
        with pytest.raises(sandbox.SandboxUnavailableError, match="apt-get install bubblewrap"):
            builtin_tools(allow=["python"])
        result = ToolRegistry([PYTHON_SPEC]).call("python", {"code": "print(1)"})
        assert not result.ok and "bwrap is not installed" in result.error
    finally:
        sandbox._probe.cache_clear()


# --------------------------------------------------------------------------- tools that run code are opt-in


def test_code_running_tools_are_off_unless_allowed():
    assert [spec.name for spec in builtin_tools()] == ["calculator"]
    assert CODE_TOOLS == {"python": PYTHON_SPEC.function}
    with pytest.raises(ValueError, match="'calculator': not a built-in tool that runs code"):
        builtin_tools(allow=["calculator"])
    with pytest.raises(ValueError, match="'shell': not a built-in tool that runs code"):
        check_allowed_tools(["shell"])
    assert parse_allowed_tools(" python,python ") == ("python",)
    for bad in ("", ",", "python,shell"):
        with pytest.raises(ValueError):
            parse_allowed_tools(bad)


@needs_sandbox
def test_allowed_python_is_hosted():
    assert [spec.name for spec in builtin_tools(allow=["python"])] == ["calculator", "python"]


def test_a_node_without_allow_tools_neither_offers_nor_runs_python():
    from edgeswarm.agent.capabilities import hosted_tools
    from edgeswarm.node.task_worker import StepError, TaskWorker

    registry = ToolRegistry(builtin_tools())
    assert "python" not in hosted_tools(registry) and "calculator" in hosted_tools(registry)
    worker = TaskWorker("node-a", registry, None, None)
    with pytest.raises(StepError, match="'python' runs code and is off on node node-a: its operator enables it with --allow-tools python"):
        worker.execute("run-1", "tool", {"name": "python", "arguments": {"code": "print(1)"}})
    assert worker.execute("run-1", "tool", {"name": "calculator", "arguments": {"expression": "6 * 7"}}) == 42


@needs_sandbox
def test_a_node_allowing_python_runs_it():
    from edgeswarm.node.task_worker import TaskWorker

    worker = TaskWorker("node-a", ToolRegistry(builtin_tools(allow=["python"])), None, None)
    value = worker.execute("run-1", "tool", {"name": "python", "arguments": {"code": "print(6 * 7)"}})
    assert value == {"stdout": "42\n", "stderr": "", "exit_code": 0, "timed_out": False}


def test_join_takes_allow_tools():
    from edgeswarm.node.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["join"]).allow_tools == ()
    assert parser.parse_args(["join", "--allow-tools", "python"]).allow_tools == ("python",)
    with pytest.raises(SystemExit):
        parser.parse_args(["join", "--allow-tools", "calculator"])


@pytest.mark.parametrize(
    ("settings", "reason"),
    [({"enabled": False}, "--allow-tools needs the agent services"), ({}, "--allow-tools python: bwrap is not installed")],
)
def test_a_node_allowing_python_without_its_sandbox_refuses_to_start(monkeypatch, tmp_path, settings, reason):
    from edgeswarm.node.config import AgentConfig, NodeSettings
    from edgeswarm.node.daemon import SwarmNode

    monkeypatch.setattr(sandbox, "TOOL_SEARCH_PATH", str(tmp_path))  # a machine where bwrap is not installed
    sandbox._probe.cache_clear()
    try:
        with pytest.raises(ValueError, match=reason):
            SwarmNode(NodeSettings(agents=AgentConfig(allow_tools=("python",), **settings)))
    finally:
        sandbox._probe.cache_clear()


# --------------------------------------------------------------------------- tools files


def test_load_tools_file(tmp_path):
    specs = load_tools_file(CUSTOM_TOOLS)
    assert [(spec.name, spec.idempotent) for spec in specs] == [("word_count", True), ("append_note", False)]
    assert specs[0].parameters == {
        "type": "object",
        "properties": {"text": {"type": "string", "description": "The text whose whitespace-separated words are counted."}},
        "required": ["text"],
        "additionalProperties": False,
    }
    registry = ToolRegistry(specs)
    assert registry.call("word_count", {"text": "the quick brown fox"}).value == 4
    notes = tmp_path / "notes.txt"
    assert registry.call("append_note", {"path": str(notes), "note": "first"}).ok
    assert registry.call("append_note", json.dumps({"path": str(notes), "note": "second"})).ok
    assert notes.read_text() == "first\nsecond\n"
    assert [spec.name for spec in load_tools_file(CUSTOM_TOOLS)] == ["word_count", "append_note"]  # loads again


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("def broken(:\n    pass\n", "SyntaxError"),
        ("import no_such_module_for_edgeswarm\n", "ModuleNotFoundError"),
        ("raise RuntimeError('boom')\n", "RuntimeError: boom"),
        ("import sys\nsys.exit(2)\n", "SystemExit"),
        ("from agent.tools import tool\n\n@tool\ndef f(x):\n    '''No hint.'''\n", "needs a type hint"),
        ("def helper(x: int) -> int:\n    return x\n", "defines no tools"),
    ],
)
def test_broken_tools_file_is_refused(tmp_path, source, reason):
    path = tmp_path / "my_tools.py"
    path.write_text(source)
    with pytest.raises(ToolLoadError) as raised:
        load_tools_file(path)
    assert str(path) in str(raised.value) and reason in str(raised.value)


def test_missing_tools_file_is_refused(tmp_path):
    with pytest.raises(ToolLoadError, match="no such file"):
        load_tools_file(tmp_path / "absent.py")
