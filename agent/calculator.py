"""Safe arithmetic for the ``calculator`` tool, evaluated from the ``ast`` (never ``eval``).

Allowed: int and float literals, ``+ - * / // % **``, unary ``+``/``-``, parentheses, the
constants ``pi`` and ``e``, and the functions sqrt, log, log10, exp, sin, cos, tan, abs,
round, min, max, floor and ceil. Everything else (names, attributes, other calls, strings,
comparisons...) is refused with a CalculatorError that says why.

Denial of service is guarded against: the input is at most MAX_LENGTH characters and
MAX_DEPTH levels of nesting, and powers and products are sized *before* they are computed
so that no integer grows past MAX_INT_BITS bits (``9**9**9`` is refused at once). Floats
that overflow are refused too.

Results are ints when exact: ``7/7`` is ``1``, ``2**100`` is an exact int, and a float
result with an integral value (``sqrt(16)``) comes back as an int when it is below 2**53.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

MAX_LENGTH = 1000
MAX_DEPTH = 100
MAX_INT_BITS = 10_000
MAX_ROUND_DIGITS = 400
EXACT_FLOAT_LIMIT = 2**53

Number = int | float

CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}


class CalculatorError(ValueError):
    """The expression is not allowed or cannot be evaluated."""


def evaluate(expression: str) -> int | float:
    """Evaluate an arithmetic expression safely; raise CalculatorError with the reason if not."""
    if not isinstance(expression, str):
        raise CalculatorError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_LENGTH:
        raise CalculatorError(f"expression is too long ({len(expression)} characters, limit {MAX_LENGTH})")
    if not expression.strip():
        raise CalculatorError("expression is empty")
    tree = _parse(expression)
    return _tidy(_Evaluator().eval(tree.body, 0))


def _parse(expression: str) -> ast.Expression:
    try:
        return ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"invalid syntax: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise CalculatorError(f"cannot parse expression: {exc}") from None


def _tidy(value: Number) -> Number:
    if isinstance(value, float) and value.is_integer() and abs(value) < EXACT_FLOAT_LIMIT:
        return int(value)
    return value


# --------------------------------------------------------------------------- size guards


def _check_size(value: Number) -> Number:
    """Refuse results that are too large to be useful (or to compute further with)."""
    if isinstance(value, complex):
        raise CalculatorError("result is a complex number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is too large (or not a number)")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"result is too large (over {MAX_INT_BITS} bits)")
    return value


def _power(base: Number, exponent: Number) -> Number:
    exact = isinstance(base, int) and isinstance(exponent, int)
    if exact and exponent > 0 and abs(base) > 1 and math.log2(abs(base)) * exponent > MAX_INT_BITS:
        raise CalculatorError(f"result is too large (over {MAX_INT_BITS} bits)")
    return base**exponent


def _multiply(left: Number, right: Number) -> Number:
    if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
        raise CalculatorError(f"result is too large (over {MAX_INT_BITS} bits)")
    return left * right


def _divide(left: Number, right: Number) -> Number:
    if isinstance(left, int) and isinstance(right, int) and right != 0 and left % right == 0:
        return left // right
    return left / right


BINARY_OPERATORS: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: _multiply,
    ast.Div: _divide,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}
UNARY_OPERATORS: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


# --------------------------------------------------------------------------- functions


def _round(value: Number, digits: int | None = None) -> Number:
    if digits is None:
        return round(value)
    if not isinstance(digits, int) or abs(digits) > MAX_ROUND_DIGITS:
        raise CalculatorError(f"round: digits must be an integer between -{MAX_ROUND_DIGITS} and {MAX_ROUND_DIGITS}")
    return round(value, digits)


def _log(value: Number, base: Number | None = None) -> float:
    return math.log(value) if base is None else math.log(value, base)


FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    # name: (function, fewest arguments, most arguments)
    "sqrt": (math.sqrt, 1, 1),
    "log": (_log, 1, 2),
    "log10": (math.log10, 1, 1),
    "exp": (math.exp, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (lambda *values: min(values), 1, 100),
    "max": (lambda *values: max(values), 1, 100),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
}


# --------------------------------------------------------------------------- evaluation


class _Evaluator:
    """Walks an expression tree, allowing only arithmetic nodes."""

    def eval(self, node: ast.AST, depth: int) -> Number:
        if depth > MAX_DEPTH:
            raise CalculatorError(f"expression is nested too deeply (limit {MAX_DEPTH})")
        if isinstance(node, ast.Constant):
            return self._constant(node)
        if isinstance(node, ast.BinOp):
            return self._binary_chain(node, depth)
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPERATORS:
            return _check_size(UNARY_OPERATORS[type(node.op)](self.eval(node.operand, depth + 1)))
        if isinstance(node, ast.Name):
            return self._name(node)
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        raise CalculatorError(_refusal(node))

    def _constant(self, node: ast.Constant) -> Number:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CalculatorError(f"only numbers are allowed, not {value!r}")
        return _check_size(value)

    def _binary_chain(self, node: ast.BinOp, depth: int) -> Number:
        """Evaluate ``a + b - c * ...`` along its left spine iteratively, so long sums stay shallow."""
        chain: list[ast.BinOp] = []
        while isinstance(node, ast.BinOp):
            chain.append(node)
            node = node.left
        value = self.eval(node, depth + 1)
        for binary in reversed(chain):
            value = self._apply(binary.op, value, self.eval(binary.right, depth + 1))
        return value

    def _apply(self, op: ast.operator, left: Number, right: Number) -> Number:
        function = BINARY_OPERATORS.get(type(op))
        if function is None:
            raise CalculatorError(f"operator {type(op).__name__} is not allowed")
        try:
            return _check_size(function(left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result is too large") from None

    def _name(self, node: ast.Name) -> Number:
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        if node.id in FUNCTIONS:
            raise CalculatorError(f"{node.id} is a function: call it, e.g. {node.id}(2)")
        raise CalculatorError(f"unknown name {node.id!r} (allowed constants: {', '.join(CONSTANTS)})")

    def _call(self, node: ast.Call, depth: int) -> Number:
        if not isinstance(node.func, ast.Name):
            raise CalculatorError(_refusal(node.func))
        name = node.func.id
        if name not in FUNCTIONS:
            raise CalculatorError(f"function {name!r} is not allowed (allowed: {', '.join(FUNCTIONS)})")
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
            raise CalculatorError(f"{name}: only plain positional arguments are allowed")
        function, fewest, most = FUNCTIONS[name]
        if not fewest <= len(node.args) <= most:
            raise CalculatorError(f"{name}: takes {_arity(fewest, most)}, got {len(node.args)}")
        args = [self.eval(arg, depth + 1) for arg in node.args]
        try:
            return _check_size(function(*args))
        except (ValueError, TypeError) as exc:
            raise CalculatorError(f"{name}: {exc}") from None
        except ZeroDivisionError:
            raise CalculatorError(f"{name}: division by zero") from None
        except OverflowError:
            raise CalculatorError(f"{name}: result is too large") from None


def _arity(fewest: int, most: int) -> str:
    if fewest == most:
        return f"{fewest} argument{'s' if fewest != 1 else ''}"
    return f"{fewest} to {most} arguments"


def _refusal(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return "attribute access is not allowed"
    if isinstance(node, ast.Constant):
        return f"only numbers are allowed, not {node.value!r}"
    if isinstance(node, (ast.UnaryOp, ast.BinOp)):
        return f"operator {type(node.op).__name__} is not allowed"
    return f"{type(node).__name__} expressions are not allowed; use numbers, arithmetic operators and the listed functions"
