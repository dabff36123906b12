"""Tools that agent runs can call: their specs, the ``@tool`` decorator, a registry, and loading.

A tool is a plain Python function described by a ToolSpec: a name, a description for the
model, a JSON schema of its keyword arguments, whether it is idempotent (safe to run again
after a failure, which the scheduler relies on for retries) and a timeout. ``@tool`` derives
all of that from the function's signature and docstring::

    @tool(idempotent=False)
    def append_note(path: str, note: str) -> None:
        \"\"\"Append a line to a notes file.

        Args:
            path: The notes file.
            note: The line to append.
        \"\"\"

A ToolRegistry publishes the specs in the OpenAI ``tools`` format, validates the arguments
a model produced, and calls the function, turning every failure of the tool itself into a
``ToolResult(ok=False)`` rather than an exception. ``load_tools_file`` collects the
decorated functions of a user's file (``swarm-node join --tools FILE.py``).

Built-in tools that run code (``CODE_TOOLS``: ``python``, in ``agent.sandbox``) are off unless the
node's operator allows them (``builtin_tools(allow=["python"])``, ``swarm-node join --allow-tools python``).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import itertools
import json
import re
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgeswarm.agent import calculator, sandbox
from edgeswarm.agent.schema import SchemaError, check_schema, validate

TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_ATTRIBUTE = "__edgeswarm_tool__"
DEFAULT_TIMEOUT = 30.0
PYTHON_TOOL_TIMEOUT = 10.0


class ToolArgumentError(ValueError):
    """The arguments for a tool call do not match its schema; ``errors`` lists every problem."""

    def __init__(self, tool_name: str, errors: list[str]) -> None:
        super().__init__(f"invalid arguments for tool {tool_name!r}: " + "; ".join(errors))
        self.tool_name = tool_name
        self.errors = errors


class UnknownToolError(LookupError):
    """No tool of that name is registered."""


class ToolLoadError(ValueError):
    """A tools file could not be imported, or defines no tools (a bad `--tools` value: `swarm-node` says so in one line)."""


@dataclass(frozen=True)
class ToolSpec:
    """A callable tool and everything a model and the scheduler need to know about it."""

    name: str
    description: str
    parameters: dict[str, Any]
    idempotent: bool
    function: Callable[..., Any]
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TOOL_NAME_PATTERN.match(self.name):
            raise ValueError(f"tool name {self.name!r} must match {TOOL_NAME_PATTERN.pattern}")
        if not isinstance(self.description, str) or not self.description.strip():
            raise ValueError(f"tool {self.name!r} needs a description")
        check_schema(self.parameters, f"{self.name}.parameters")
        if self.parameters.get("type") != "object":
            raise SchemaError(f"{self.name}.parameters: the top-level schema must have type 'object'")
        if not callable(self.function):
            raise TypeError(f"tool {self.name!r}: function is not callable")
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ValueError(f"tool {self.name!r}: timeout must be a positive number of seconds")

    def openai_schema(self) -> dict[str, Any]:
        """This tool in the OpenAI ``tools`` format."""
        function = {"name": self.name, "description": self.description, "parameters": copy.deepcopy(self.parameters)}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one call: a JSON value when ``ok``, else an error message."""

    ok: bool
    value: Any
    error: str | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-serialisable dict."""
        return {"ok": self.ok, "value": self.value, "error": self.error, "seconds": self.seconds}


# --------------------------------------------------------------------------- the decorator


def tool(
    function: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    idempotent: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> Any:
    """Mark a function as a tool, deriving its ToolSpec from its signature and docstring.

    Usable bare (``@tool``) or with options (``@tool(idempotent=False, name="notes")``). The
    function is returned unchanged apart from an attribute holding the spec (see spec_of).
    Raises TypeError for parameters whose type hints cannot be expressed as JSON.
    """

    def decorate(target: Callable[..., Any]) -> Callable[..., Any]:
        summary, argument_docs = parse_docstring(inspect.getdoc(target) or "")
        parameters = parameters_schema(target, argument_docs)
        spec = ToolSpec(
            name=name or target.__name__,
            description=description or summary,
            parameters=parameters,
            idempotent=idempotent,
            function=_with_none_for_missing_optionals(target, parameters["required"]),
            timeout=timeout,
        )
        setattr(target, TOOL_ATTRIBUTE, spec)
        return target

    return decorate if function is None else decorate(function)


def _with_none_for_missing_optionals(function: Callable[..., Any], required: list[str]) -> Callable[..., Any]:
    """Optional[X] parameters without a default are not required, so pass None when omitted."""
    missing_means_none = [
        parameter.name
        for parameter in inspect.signature(function).parameters.values()
        if parameter.default is parameter.empty and parameter.name not in required
    ]
    if not missing_means_none:
        return function

    @functools.wraps(function)
    def call(**kwargs: Any) -> Any:
        return function(**{name: None for name in missing_means_none} | kwargs)

    return call


def spec_of(function: Any) -> ToolSpec | None:
    """The ToolSpec attached by ``@tool``, or None for anything else."""
    spec = getattr(function, TOOL_ATTRIBUTE, None)
    return spec if isinstance(spec, ToolSpec) else None


def parameters_schema(function: Callable[..., Any], argument_docs: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON schema (type object) of a function's keyword arguments."""
    hints = typing.get_type_hints(function)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for parameter in inspect.signature(function).parameters.values():
        where = f"{function.__qualname__}({parameter.name})"
        if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            raise TypeError(f"{where}: tools take named arguments only, not {parameter.kind.description} ones")
        if parameter.name not in hints:
            raise TypeError(f"{where}: needs a type hint")
        schema, optional = type_schema(hints[parameter.name], where)
        if (argument_docs or {}).get(parameter.name):
            schema["description"] = argument_docs[parameter.name]
        if isinstance(parameter.default, (str, int, float)):  # JSON-friendly defaults are shown to the model
            schema["default"] = parameter.default
        properties[parameter.name] = schema
        if parameter.default is parameter.empty and not optional:
            required.append(parameter.name)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


SIMPLE_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def type_schema(hint: Any, where: str = "parameter") -> tuple[dict[str, Any], bool]:
    """(JSON schema, is-optional) for a type hint; Optional[X] and X | None allow null."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if len(others) != 1 or len(others) == len(args):
            raise TypeError(f"{where}: unions other than Optional[X] are not supported ({hint})")
        return _allow_null(type_schema(others[0], where)[0]), True
    if origin is Literal:
        return _literal_schema(args, where), False
    if origin is list and len(args) == 1:
        return {"type": "array", "items": type_schema(args[0], where)[0]}, False
    if origin is dict and len(args) == 2 and args[0] is str:
        return {"type": "object", "additionalProperties": type_schema(args[1], where)[0]}, False
    if hint in SIMPLE_TYPES:
        return {"type": SIMPLE_TYPES[hint]}, False
    raise TypeError(
        f"{where}: type {hint} cannot be described in JSON (use str, int, float, bool, list[...], dict[str, ...], Literal or Optional)"
    )


def _literal_schema(values: tuple[Any, ...], where: str) -> dict[str, Any]:
    names: list[str] = []
    for value in values:
        if value is not None and type(value) not in SIMPLE_TYPES:
            raise TypeError(f"{where}: Literal values must be str, int, float, bool or None, not {value!r}")
        type_name = "null" if value is None else SIMPLE_TYPES[type(value)]
        if type_name not in names:
            names.append(type_name)
    return {"type": names[0] if len(names) == 1 else names, "enum": list(values)}


def _allow_null(schema: dict[str, Any]) -> dict[str, Any]:
    declared = schema["type"]
    names = declared if isinstance(declared, list) else [declared]
    schema["type"] = names if "null" in names else [*names, "null"]
    if "enum" in schema and None not in schema["enum"]:
        schema["enum"].append(None)
    return schema


ARGS_HEADER = re.compile(r"^(\s*)(Args|Arguments|Parameters):\s*$")
ARG_ENTRY = re.compile(r"^(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def parse_docstring(docstring: str) -> tuple[str, dict[str, str]]:
    """(first paragraph as one line, {argument: description}) from a Google-style docstring."""
    lines = inspect.cleandoc(docstring).splitlines()
    summary_lines = list(itertools.takewhile(lambda line: line.strip(), lines))
    summary = " ".join(line.strip() for line in summary_lines)
    for index, line in enumerate(lines):
        header = ARGS_HEADER.match(line)
        if header:
            return summary, _parse_args_section(lines[index + 1 :], len(header.group(1)))
    return summary, {}


def _parse_args_section(lines: list[str], header_indent: int) -> dict[str, str]:
    docs: dict[str, str] = {}
    entry_indent: int | None = None
    current: str | None = None
    for line in lines:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= header_indent:
            break  # the next section ("Returns:", ...)
        if entry_indent is None:
            entry_indent = indent
        entry = ARG_ENTRY.match(line.strip())
        if indent == entry_indent and entry:
            current = entry.group(1)
            docs[current] = entry.group(2).strip()
        elif current is not None:
            docs[current] = f"{docs[current]} {line.strip()}".strip()
    return docs


# --------------------------------------------------------------------------- the registry


class ToolRegistry:
    """The tools a node or an agent run can call, by name."""

    def __init__(self, specs: Iterable[ToolSpec] = ()) -> None:
        self._tools: dict[str, ToolSpec] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: ToolSpec | Callable[..., Any]) -> ToolSpec:
        """Add a tool (a ToolSpec or a ``@tool`` function); a name already taken is refused."""
        if not isinstance(spec, ToolSpec):
            found = spec_of(spec)
            if found is None:
                raise TypeError(f"{spec!r} is neither a ToolSpec nor a @tool function")
            spec = found
        if spec.name in self._tools:
            raise ValueError(f"a tool named {spec.name!r} is already registered")
        self._tools[spec.name] = spec
        return spec

    def names(self) -> list[str]:
        """Registered tool names, in registration order."""
        return list(self._tools)

    def get(self, name: str) -> ToolSpec:
        """The spec of a tool; UnknownToolError if there is none."""
        try:
            return self._tools[name]
        except KeyError:
            known = ", ".join(self._tools) or "none"
            raise UnknownToolError(f"unknown tool {name!r} (registered: {known})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def openai_schemas(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The tools (all, or those named, in that order) in the OpenAI ``tools`` format."""
        return [self.get(name).openai_schema() for name in (self._tools if names is None else names)]

    def validate_call(self, name: str, arguments: dict[str, Any] | str | bytes | None) -> dict[str, Any]:
        """Parse (dict or JSON text) and check the arguments for a call; return them as a dict."""
        spec = self.get(name)
        parsed = _parse_arguments(name, arguments)
        errors = validate(parsed, spec.parameters)
        if errors:
            raise ToolArgumentError(name, errors)
        return parsed

    def call(self, name: str, arguments: dict[str, Any] | str | bytes | None) -> ToolResult:
        """Validate, then run a tool. Its failures (exceptions, timeouts, non-JSON results) come back as ok=False.

        Raises UnknownToolError or ToolArgumentError when the call itself is wrong.
        """
        spec = self.get(name)
        kwargs = self.validate_call(name, arguments)
        started = time.perf_counter()
        try:
            value = _as_json(_run_with_timeout(spec, kwargs))
        except BaseException as exc:  # a tool must never take the caller down
            if isinstance(exc, KeyboardInterrupt):
                raise
            return ToolResult(ok=False, value=None, error=_describe(exc), seconds=time.perf_counter() - started)
        return ToolResult(ok=True, value=value, error=None, seconds=time.perf_counter() - started)


def _parse_arguments(name: str, arguments: dict[str, Any] | str | bytes | None) -> dict[str, Any]:
    if arguments is None:
        return {}
    if isinstance(arguments, (str, bytes)):
        if not arguments.strip():
            return {}
        try:
            arguments = json.loads(arguments, parse_constant=_refuse_constant)
        except ValueError as exc:
            raise ToolArgumentError(name, [f"arguments: not valid JSON ({exc})"]) from None
    if not isinstance(arguments, dict):
        raise ToolArgumentError(name, [f"arguments: expected an object, got {type(arguments).__name__}"])
    return arguments


def _refuse_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not valid JSON")


def _run_with_timeout(spec: ToolSpec, kwargs: dict[str, Any]) -> Any:
    """Run the tool in a daemon thread; past its timeout, give up on it (it cannot be killed)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = spec.function(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            outcome["error"] = exc

    worker = threading.Thread(target=target, name=f"tool-{spec.name}", daemon=True)
    worker.start()
    worker.join(spec.timeout)
    if worker.is_alive():
        raise TimeoutError(f"tool {spec.name!r} did not finish within {spec.timeout:g} s (it may still be running)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _as_json(value: Any) -> Any:
    """The value as it will travel: plain JSON types (tuples become lists), finite numbers only."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the tool returned a value that is not JSON-serialisable: {exc}") from None


def _describe(exc: BaseException) -> str:
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# --------------------------------------------------------------------------- loading user tools

_module_counter = itertools.count()


def load_tools_file(path: str | Path) -> list[ToolSpec]:
    """Import a user's Python file and return the specs of its ``@tool`` functions, in file order.

    Raises ToolLoadError if the file is missing, fails to import, or defines no tools.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ToolLoadError(f"{path}: no such file")
    module = _import_file(path)
    specs: list[ToolSpec] = []
    for value in vars(module).values():
        spec = spec_of(value)
        if spec is not None and spec not in specs:
            specs.append(spec)
    if not specs:
        raise ToolLoadError(f"{path}: defines no tools (decorate functions with @agent.tools.tool)")
    return specs


def _import_file(path: Path) -> types.ModuleType:
    stem = re.sub(r"\W", "_", path.stem)
    name = f"edgeswarm_user_tools_{stem}_{next(_module_counter)}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ToolLoadError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # so dataclasses, pickling and typing can find it
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise ToolLoadError(f"{path}: failed to import: {_describe(exc)}") from exc
    return module


# --------------------------------------------------------------------------- built-in tools


@tool(name="calculator")
def _calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression exactly and safely, e.g. "2 * (3 + 4) ** 2" or "sqrt(2) * pi".

    Args:
        expression: Numbers, + - * / // % **, parentheses, the constants pi and e, and the functions sqrt, log,
            log10, exp, sin, cos, tan, abs, round, min, max, floor and ceil. At most 1000 characters.
    """
    return calculator.evaluate(expression)


@tool(name="python", idempotent=False, timeout=PYTHON_TOOL_TIMEOUT)
def _python(code: str) -> dict[str, Any]:
    """Run a Python 3 program in an isolated sandbox and return its stdout, stderr, exit code and whether it timed out. The sandbox has no network, no environment variables, a read-only system with an empty working directory, 5 seconds and 256 MB of memory; print what you need to see.

    Args:
        code: The complete program to run.
    """
    result = sandbox.run_python(code)
    return {"stdout": result.stdout, "stderr": result.stderr, "exit_code": result.exit_code, "timed_out": result.timed_out}


CODE_TOOLS: dict[str, Callable[..., Any]] = {"python": _python}  # built-in tools that run code: off unless allowed


def builtin_tools(allow: Iterable[str] = ()) -> list[ToolSpec]:
    """The built-in tools: ``calculator`` always, and the code-running tools named in ``allow`` (``python``).

    Raises what ``check_allowed_tools`` raises.
    """
    return [spec_of(_calculator), *(spec_of(CODE_TOOLS[name]) for name in check_allowed_tools(allow))]


def check_allowed_tools(names: Iterable[str]) -> tuple[str, ...]:
    """The code-running tools an operator allowed (``--allow-tools``), without repeats, once they are checked.

    Raises ValueError for a name that is not a built-in code-running tool, and
    sandbox.SandboxUnavailableError when ``python`` is named but its sandbox cannot run here.
    """
    allowed = tuple(dict.fromkeys(names))
    _refuse_unknown(allowed)
    if "python" in allowed:
        sandbox.check_available()
    return allowed


def parse_allowed_tools(text: str) -> tuple[str, ...]:
    """``--allow-tools python[,...]`` as names; ValueError for an empty list or a name that is not a code-running tool."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise ValueError(f"expected a comma-separated list of tools ({', '.join(CODE_TOOLS)}), got {text!r}")
    _refuse_unknown(names)
    return names


def _refuse_unknown(names: tuple[str, ...]) -> None:
    unknown = [name for name in names if name not in CODE_TOOLS]
    if unknown:
        raise ValueError(
            f"{', '.join(map(repr, unknown))}: not a built-in tool that runs code ({', '.join(CODE_TOOLS)}); "
            "calculator and swarm_status are always on, and --tools FILE.py adds your own"
        )
