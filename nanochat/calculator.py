"""The engine's calculator tool: when the model writes <|python_start|> expr <|python_end|>, the
engine evaluates `expr` here and injects the result.

    evaluate("1,000 * 3.5")              -> "3500"
    evaluate('"strawberry".count("r")')  -> "3"
    evaluate("__import__('os')")         -> None

Nothing is eval'd: the expression is parsed with `ast` and walked by a tiny interpreter that knows
numbers (+ - * / // % **, unary minus), string literals, `len(...)` and a few string methods. Every
intermediate value is bounded (ints to MAX_INT_BITS, strings to MAX_STR_LEN, checked *before* the
operation that would build it), and so is the expression's length, so each evaluation is cheap by
construction: no signals, no worker process, fine on any thread. The `timeout` is checked between
steps as a last resort.
"""
import ast
import math
import operator
import re
import time

MAX_EXPR_LEN = 1000
MAX_INT_BITS = 10_000  # ~3000 digits (Python refuses to print ints of more than 4300)
MAX_STR_LEN = 10_000
SIGNIFICANT_DIGITS = 12

BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}
STRING_METHODS = {"count", "find", "index", "startswith", "endswith", "lower", "upper", "title", "capitalize",
                  "strip", "lstrip", "rstrip", "replace"}
THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
STRING_LITERAL = re.compile(r"""("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")


class Rejected(Exception):
    pass


def _number(value):
    return type(value) in (int, float)


def _check_size(value):
    if type(value) is int and value.bit_length() > MAX_INT_BITS:
        raise Rejected("integer too large")
    if type(value) is float and not math.isfinite(value):
        raise Rejected("not a finite number")
    if type(value) is str and len(value) > MAX_STR_LEN:
        raise Rejected("string too long")
    return value


def _binary(op, left, right):
    """Refuse the operations whose result would exceed the bounds, before computing them."""
    if _number(left) and _number(right):
        if op is ast.Pow and type(left) is int and type(right) is int and right > 0 and abs(left) > 1:
            if right * left.bit_length() > MAX_INT_BITS + right:  # |left| ** right >= 2 ** ((bits-1) * right)
                raise Rejected("power too large")
        if op is ast.Mult and type(left) is int and type(right) is int:
            if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                raise Rejected("product too large")
        result = BINARY_OPS[op](left, right)
        if not _number(result):  # (-8) ** 0.5 is complex
            raise Rejected("not a real number")
        return result
    if op is ast.Add and type(left) is str and type(right) is str:
        return _check_size(left + right)  # both are bounded: the sum is at most twice the bound
    if op is ast.Mult and {type(left), type(right)} == {str, int}:
        text, times = (left, right) if type(left) is str else (right, left)
        if len(text) * max(times, 0) > MAX_STR_LEN:
            raise Rejected("string too long")
        return text * times
    raise Rejected(f"unsupported operands for {op.__name__}")


def _call_method(text, name, args):
    if any(type(a) not in (str, int) for a in args) or len(args) > 3:
        raise Rejected("bad arguments")
    if name == "replace" and len(args) >= 2 and type(args[0]) is str and type(args[1]) is str:
        old, new = args[0], args[1]
        count = text.count(old)
        if len(args) == 3 and type(args[2]) is int and args[2] >= 0:
            count = min(count, args[2])
        if len(text) + count * (len(new) - len(old)) > MAX_STR_LEN:
            raise Rejected("string too long")
    return getattr(text, name)(*args)


def _eval(node, deadline):
    if time.monotonic() > deadline:
        raise Rejected("out of time")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return _check_size(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
        left, right = _eval(node.left, deadline), _eval(node.right, deadline)
        return _check_size(_binary(type(node.op), left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPS:
        operand = _eval(node.operand, deadline)
        if not _number(operand):
            raise Rejected("unary operator on a non-number")
        return UNARY_OPS[type(node.op)](operand)
    if isinstance(node, ast.Call) and not node.keywords:
        func = node.func
        args = [_eval(arg, deadline) for arg in node.args]  # a Starred argument is rejected here
        if isinstance(func, ast.Name) and func.id == "len" and len(args) == 1 and type(args[0]) is str:
            return len(args[0])
        if isinstance(func, ast.Attribute) and func.attr in STRING_METHODS:
            text = _eval(func.value, deadline)
            if type(text) is str:
                return _check_size(_call_method(text, func.attr, args))
    raise Rejected(f"not allowed: {ast.dump(node)[:80]}")


def _format(value):
    if type(value) is float:
        value = float(f"{value:.{SIGNIFICANT_DIGITS}g}")
        if value.is_integer() and abs(value) < 1e15:
            value = int(value)
    return str(value)


def _strip_thousands_commas(expr):
    """1,000,000 -> 1000000, outside string literals only."""
    parts = STRING_LITERAL.split(expr)  # odd indices are the literals
    return "".join(part if i % 2 else THOUSANDS_COMMA.sub("", part) for i, part in enumerate(parts))


def evaluate(expr: str, timeout: float = 1.0) -> str | None:
    """The result of `expr` as text, or None when it is invalid, not allowed, too big or fails."""
    deadline = time.monotonic() + timeout
    expr = expr.strip()
    if not expr or len(expr) > MAX_EXPR_LEN:
        return None
    try:
        tree = ast.parse(_strip_thousands_commas(expr), mode="eval")
        return _format(_eval(tree.body, deadline))
    except Exception:  # Rejected, SyntaxError, ZeroDivisionError, OverflowError, RecursionError, ...
        return None
