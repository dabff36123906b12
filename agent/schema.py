"""A small, strict JSON-Schema validator for the subset used by OpenAI function definitions.

Supported keywords: ``type`` (object, string, number, integer, boolean, array, null, or a
list of those), ``properties``, ``required``, ``additionalProperties`` (allowed unless
``false``; may also be a schema), ``items``, ``enum``, ``minimum``/``maximum`` and
``minLength``/``maxLength``. ``description``, ``title``, ``default``, ``examples`` and
``$comment`` are accepted and ignored. Any other keyword (``pattern``, ``anyOf``, ``$ref``...)
makes the schema malformed rather than being silently skipped, so a tool never believes
its arguments were checked when they were not.

Types follow JSON, not Python: ``True`` is a boolean and never an integer or a number, and
an integer is a number without a fractional part *in its representation* (``1.0`` is a
number, not an integer), so a tool declaring ``int`` really receives an ``int``.
"""

from __future__ import annotations

import json
import math
from typing import Any

TYPE_NAMES = ("object", "string", "number", "integer", "boolean", "array", "null")
VALIDATION_KEYWORDS = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "enum", "minimum", "maximum", "minLength", "maxLength"}
)
ANNOTATION_KEYWORDS = frozenset({"description", "title", "default", "examples", "$comment"})


class SchemaError(ValueError):
    """The schema itself is malformed or uses an unsupported keyword."""


# --------------------------------------------------------------------------- checking a schema


def check_schema(schema: Any, path: str = "schema") -> None:
    """Raise SchemaError if ``schema`` is not a well-formed schema of the supported subset."""
    if not isinstance(schema, dict):
        raise SchemaError(f"{path}: a schema must be an object, got {json_type(schema)}")
    unknown = sorted(set(schema) - VALIDATION_KEYWORDS - ANNOTATION_KEYWORDS)
    if unknown:
        raise SchemaError(f"{path}: unsupported keyword(s) {', '.join(map(repr, unknown))}")
    if "type" in schema:
        _check_type_keyword(schema["type"], path)
    _check_object_keywords(schema, path)
    if "items" in schema:
        check_schema(schema["items"], f"{path}.items")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise SchemaError(f"{path}.enum: must be a non-empty array")
    for key in ("minimum", "maximum"):
        if key in schema and not _is_number(schema[key]):
            raise SchemaError(f"{path}.{key}: must be a number")
    for key in ("minLength", "maxLength"):
        if key in schema and not (_is_integer(schema[key]) and schema[key] >= 0):
            raise SchemaError(f"{path}.{key}: must be a non-negative integer")


def _check_type_keyword(declared: Any, path: str) -> None:
    names = declared if isinstance(declared, list) else [declared]
    if not names or len(set(map(str, names))) != len(names):
        raise SchemaError(f"{path}.type: a list of types must be non-empty and without repeats")
    for name in names:
        if name not in TYPE_NAMES:
            raise SchemaError(f"{path}.type: unknown type {name!r} (expected one of {', '.join(TYPE_NAMES)})")


def _check_object_keywords(schema: dict, path: str) -> None:
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise SchemaError(f"{path}.properties: must be an object")
    for name, subschema in properties.items():
        check_schema(subschema, _child_path(f"{path}.properties", name))
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        raise SchemaError(f"{path}.required: must be an array of strings")
    if len(set(required)) != len(required):
        raise SchemaError(f"{path}.required: names must not repeat")
    additional = schema.get("additionalProperties", True)
    if not isinstance(additional, bool):
        check_schema(additional, f"{path}.additionalProperties")
    elif additional is False:
        undeclared = [name for name in required if name not in properties]
        if undeclared:
            raise SchemaError(
                f"{path}.required: {undeclared[0]!r} is required but not declared, and additionalProperties is false"
            )


# --------------------------------------------------------------------------- validating a value


def validate(value: Any, schema: dict, *, root: str = "arguments") -> list[str]:
    """Every way ``value`` breaks ``schema``, as ``"<json path>: <problem>"`` lines (empty if valid).

    Raises SchemaError when ``schema`` itself is malformed.
    """
    check_schema(schema)
    errors: list[str] = []
    _validate(value, schema, root, errors)
    return errors


def _validate(value: Any, schema: dict, path: str, errors: list[str]) -> None:
    if "type" in schema and not _matches_type(value, schema["type"]):
        expected = " or ".join(schema["type"]) if isinstance(schema["type"], list) else schema["type"]
        errors.append(f"{path}: expected {expected}, got {describe_type(value)}")
        return  # further checks on a value of the wrong type only add noise
    if "enum" in schema and not any(json_equal(value, option) for option in schema["enum"]):
        errors.append(f"{path}: {_render(value)} is not one of {_render(schema['enum'])}")
    if _is_number(value):
        _validate_number(value, schema, path, errors)
    elif isinstance(value, str):
        _validate_string(value, schema, path, errors)
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            _validate(item, schema["items"], f"{path}[{index}]", errors)
    elif isinstance(value, dict):
        _validate_object(value, schema, path, errors)


def _validate_number(value: float, schema: dict, path: str, errors: list[str]) -> None:
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {_render(value)} is less than the minimum {_render(schema['minimum'])}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: {_render(value)} is greater than the maximum {_render(schema['maximum'])}")


def _validate_string(value: str, schema: dict, path: str, errors: list[str]) -> None:
    if "minLength" in schema and len(value) < schema["minLength"]:
        errors.append(f"{path}: string is shorter than {schema['minLength']} characters")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(f"{path}: string is longer than {schema['maxLength']} characters")


def _validate_object(value: dict, schema: dict, path: str, errors: list[str]) -> None:
    properties = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in value:
            errors.append(f"{path}: missing required property {name!r}")
    additional = schema.get("additionalProperties", True)
    for name, item in value.items():
        item_path = _child_path(path, str(name))
        if name in properties:
            _validate(item, properties[name], item_path, errors)
        elif additional is False:
            errors.append(f"{path}: unexpected property {name!r}")
        elif isinstance(additional, dict):
            _validate(item, additional, item_path, errors)


# --------------------------------------------------------------------------- JSON types


def json_type(value: Any) -> str:
    """The JSON type name of a Python value, or its Python type name if it has none."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def describe_type(value: Any) -> str:
    """json_type, flagging NaN and infinities, which are not JSON numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return "non-finite number"
    return json_type(value)


def json_equal(left: Any, right: Any) -> bool:
    """Equality as JSON sees it: ``True != 1``, but ``1 == 1.0``."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left is right
    if _is_number(left) and _is_number(right):
        return left == right
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(json_equal, left, right))
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(json_equal(left[key], right[key]) for key in left)
    return type(left) is type(right) and left == right


def _matches_type(value: Any, declared: str | list[str]) -> bool:
    names = declared if isinstance(declared, list) else [declared]
    actual = json_type(value)
    if actual == "number" and not math.isfinite(value):
        return False
    return actual in names or (actual == "integer" and "number" in names)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _child_path(path: str, name: str) -> str:
    return f"{path}.{name}" if name.isidentifier() else f"{path}[{json.dumps(name)}]"


def _render(value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
