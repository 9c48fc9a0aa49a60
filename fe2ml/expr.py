"""Safe arithmetic expressions from configs (no ``eval``): Python ``ast`` with a whitelist and bounds.

Allowed: numbers, whitelisted names, + − * / ** and unary ±, and the functions exp, log/ln, sqrt,
sin, cos, tanh, abs, min, max, atan2 (the last three with two arguments; atan2(y, x) in radians).
Evaluation takes a backend of functions (numpy for load expressions, UFL for energies).

An expression from a file is untrusted input. Before anything is evaluated, :func:`parse_expression` bounds
its length (:data:`MAX_CHARS`), the digits of each number (:data:`MAX_DIGITS`), the number of AST nodes
(:data:`MAX_NODES`), the nesting depth (:data:`MAX_DEPTH`) and every constant exponent (:data:`MAX_EXPONENT`),
refuses a function name used as a value (``t*exp``), and folds every constant sub-expression in floating point:
one that overflows, divides by zero or leaves the real numbers (``10**10**10``, ``1/0``, ``log(-1)``) is an error.
The numpy evaluator of :func:`compile_expression` turns floating-point warnings into errors and refuses non-finite
values; :func:`check_samples` evaluates an expression at sample points up front. Every error is one line naming
where the expression came from.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from fe2ml.errors import ConfigError

__all__ = ["MAX_CHARS", "MAX_DEPTH", "MAX_DIGITS", "MAX_EXPONENT", "MAX_NODES", "check_samples",
           "compile_expression", "evaluate", "numpy_funcs", "parse_expression"]

FUNCS_1 = {"exp", "log", "ln", "sqrt", "sin", "cos", "tanh", "abs"}
FUNCS_2 = {"min", "max", "atan2"}

MAX_CHARS = 2000  # characters of one expression
MAX_DIGITS = 40  # characters of one number literal (digits, point, exponent)
MAX_NODES = 500  # nodes of the syntax tree
MAX_DEPTH = 50  # nesting depth of the syntax tree
MAX_EXPONENT = 100.0  # |b| of a constant exponent in a ** b

_MATH = {"exp": math.exp, "log": math.log, "ln": math.log, "sqrt": math.sqrt, "sin": math.sin, "cos": math.cos,
         "tanh": math.tanh, "abs": abs, "min": min, "max": max, "atan2": math.atan2}


def _show(text: str) -> str:
    """The expression as quoted in messages (long ones shortened, so that an error stays one readable line)."""
    return repr(text) if len(text) <= 80 else f"{text[:60]!r}... ({len(text)} characters)"


def _number_literals(text: str) -> Iterable[str]:
    """The number literals of ``text`` (runs of digits, points, underscores and exponents), found without parsing."""
    k, n = 0, len(text)
    while k < n:
        c = text[k]
        if c.isdigit() or (c == "." and k + 1 < n and text[k + 1].isdigit()):
            j = k
            while j < n and (text[j].isalnum() or text[j] in "._" or (text[j] in "+-" and text[j - 1] in "eE")):
                j += 1
            yield text[k:j]
            k = j
        elif c.isalpha() or c == "_":  # a name: skip it whole (its digits are not a number)
            while k < n and (text[k].isalnum() or text[k] == "_"):
                k += 1
        else:
            k += 1


def _depth(tree: ast.AST) -> int:
    """Nesting depth of a syntax tree (iterative: no recursion limit is reached on hostile input)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in ast.iter_child_nodes(node))
    return deepest


def parse_expression(text, names, *, where: str = "expression", error=ConfigError, funcs=None) -> ast.Expression:
    """Parse, bound and check an expression; constant sub-expressions are folded and must stay finite.

    Args:
        text: the expression (a number is accepted too).
        names: allowed variable names.
        where: location for messages (``FILE: KEY``).
        error: exception type to raise.
        funcs: allowed function names (default: all of ``FUNCS_1 | FUNCS_2``).

    Returns:
        The checked AST.

    Raises:
        error: one line naming ``where`` and what is wrong, for any input.
    """
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise error(f"{where}: expected a number or an expression string, got {str(text)[:80]!r}")
    if isinstance(text, float) and not math.isfinite(text):
        raise error(f"{where}: expected a finite number, got {text!r}")
    if isinstance(text, int) and abs(text) >= 10**MAX_DIGITS:
        raise error(f"{where}: number with more than {MAX_DIGITS} digits")
    text = str(text)
    shown = _show(text)
    if len(text) > MAX_CHARS:
        raise error(f"{where}: expression of {len(text)} characters (at most {MAX_CHARS}): {shown}")
    for lit in _number_literals(text):
        if len(lit) > MAX_DIGITS:
            raise error(f"{where}: number literal of {len(lit)} characters (at most {MAX_DIGITS}) in {shown}")
    allowed_funcs = (FUNCS_1 | FUNCS_2) if funcs is None else set(funcs)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        if "too many nested" in str(e.msg):
            raise error(f"{where}: expression nested too deeply (at most {MAX_DEPTH} levels): {shown}") from None
        raise error(f"{where}: syntax error at column {e.offset} in {shown}") from None
    except (RecursionError, MemoryError, ValueError):  # the parser's own limits on hostile nesting
        raise error(f"{where}: expression nested too deeply (at most {MAX_DEPTH} levels): {shown}") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise error(f"{where}: expression of {len(nodes)} syntax nodes (at most {MAX_NODES}): {shown}")
    if _depth(tree) > MAX_DEPTH:
        raise error(f"{where}: expression nested too deeply (at most {MAX_DEPTH} levels): {shown}")
    called = {id(n.func) for n in nodes if isinstance(n, ast.Call)}
    for node in nodes:
        _check_node(node, names, allowed_funcs, called, where, shown, error)
    _fold(tree.body, where, shown, error)
    return tree


def _check_node(node, names, allowed_funcs, called, where, shown, error) -> None:
    """One node of the whitelist."""
    if isinstance(node, ast.Expression | ast.Load | ast.BinOp | ast.UnaryOp):
        return
    if isinstance(node, ast.operator):
        if not isinstance(node, ast.Add | ast.Sub | ast.Mult | ast.Div | ast.Pow):
            raise error(f"{where}: operator {type(node).__name__} not allowed in {shown} (allowed: + - * / **)")
        return
    if isinstance(node, ast.unaryop):
        if not isinstance(node, ast.USub | ast.UAdd):
            raise error(f"{where}: operator {type(node).__name__} not allowed in {shown} (allowed: unary + and -)")
        return
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise error(f"{where}: constant {str(node.value)[:40]!r} not allowed in {shown} (numbers only)")
        return
    if isinstance(node, ast.Name):
        if node.id in allowed_funcs:
            if id(node) not in called:
                raise error(f"{where}: {node.id} is a function, used as a value in {shown}; call it, as "
                            f"{node.id}(x)")
            return
        if node.id not in names:
            raise error(f"{where}: unknown name {node.id[:40]!r} in {shown}; allowed: {sorted(names)}, "
                        f"functions {sorted(allowed_funcs)}")
        if id(node) in called:
            raise error(f"{where}: {node.id} is a variable, called as a function in {shown}")
        return
    if isinstance(node, ast.Call):
        ok = isinstance(node.func, ast.Name) and node.func.id in allowed_funcs and not node.keywords
        nargs = 2 if ok and node.func.id in FUNCS_2 else 1
        if not ok or len(node.args) != nargs or any(isinstance(a, ast.Starred) for a in node.args):
            calls = ", ".join(f"{g}(x, y)" if g in FUNCS_2 else f"{g}(x)" for g in sorted(allowed_funcs))
            raise error(f"{where}: only {calls} calls are allowed in {shown}")
        return
    raise error(f"{where}: construct {type(node).__name__} not allowed in {shown}")


def _fold(node, where, shown, error) -> float | None:
    """The value of a constant sub-expression (None where it holds a variable); refuses exponents out of bounds.

    Every constant sub-expression is computed in floating point; one that overflows, divides by zero, leaves the
    domain of its function or becomes complex is an error (it would be the same at every point of the run).
    """
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return None
    if isinstance(node, ast.UnaryOp):
        v = _fold(node.operand, where, shown, error)
        return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
    if isinstance(node, ast.BinOp):
        a, b = _fold(node.left, where, shown, error), _fold(node.right, where, shown, error)
        if isinstance(node.op, ast.Pow) and b is not None and abs(b) > MAX_EXPONENT:
            raise error(f"{where}: exponent {b:.6g} out of bounds (|exponent| <= {MAX_EXPONENT:g}) in {shown}")
        if a is None or b is None:
            return None
        return _const(lambda: _BINOPS[type(node.op)](a, b), where, shown, error)
    if isinstance(node, ast.Call):
        args = [_fold(a, where, shown, error) for a in node.args]
        if any(a is None for a in args):
            return None
        return _const(lambda: _MATH[node.func.id](*args), where, shown, error)
    return None


_BINOPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a**b}


def _const(op: Callable[[], float], where, shown, error) -> float:
    try:
        v = op()
    except OverflowError:
        raise error(f"{where}: a constant part of {shown} overflows") from None
    except ZeroDivisionError:
        raise error(f"{where}: a constant part of {shown} divides by zero") from None
    except ValueError:
        raise error(f"{where}: a constant part of {shown} is outside the domain of its function") from None
    if isinstance(v, complex):
        raise error(f"{where}: a constant part of {shown} is not a real number (a negative base to a fractional "
                    "power)")
    if not math.isfinite(v):
        raise error(f"{where}: a constant part of {shown} is not finite")
    return float(v)


def evaluate(node, env: dict, funcs: dict):
    """Evaluate a checked AST with variables ``env`` and function backend ``funcs``."""
    if isinstance(node, ast.Expression):
        return evaluate(node.body, env, funcs)
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.UnaryOp):
        v = evaluate(node.operand, env, funcs)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = evaluate(node.left, env, funcs), evaluate(node.right, env, funcs)
        op = node.op
        if isinstance(op, ast.Add):
            return a + b
        if isinstance(op, ast.Sub):
            return a - b
        if isinstance(op, ast.Mult):
            return a * b
        if isinstance(op, ast.Div):
            return a / b
        return a**b
    if isinstance(node, ast.Call):
        return funcs[node.func.id](*[evaluate(a, env, funcs) for a in node.args])
    raise ConfigError(f"unsupported expression node {type(node).__name__}")


def numpy_funcs():
    """Function backend for numpy arrays."""
    return {"exp": np.exp, "log": np.log, "ln": np.log, "sqrt": np.sqrt, "sin": np.sin, "cos": np.cos,
            "tanh": np.tanh, "abs": np.abs, "min": np.minimum, "max": np.maximum, "atan2": np.arctan2}


def compile_expression(text, names, *, where: str = "expression", error=ConfigError):
    """Parse and check an expression once; returns a function of keyword arguments ``f(**{name: value})``.

    The values may be numbers or numpy arrays (the numpy backend of :func:`numpy_funcs`). The function raises
    ``error`` (one line naming ``where``, the expression and the point) where a value is not finite or numpy
    meets a floating-point problem (overflow, division by zero, an invalid operation), instead of a warning.
    """
    tree = parse_expression(text, names, where=where, error=error)
    funcs = numpy_funcs()
    shown = _show(str(text))
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} & set(names)

    def f(**env):
        try:
            with np.errstate(all="raise"):
                v = evaluate(tree, env, funcs)
        except (FloatingPointError, OverflowError, ZeroDivisionError) as e:
            raise error(f"{where}: {shown} fails at {_point(env, used)} ({e})") from None
        if not np.all(np.isfinite(v)):
            raise error(f"{where}: {shown} is not finite at {_point(env, used)}")
        return v

    return f


def _point(env: Mapping, used: set) -> str:
    """Where an evaluation failed, for a message: the variables used, scalars as they are, arrays by their range."""
    parts = []
    for k, v in env.items():
        if k not in used:
            continue
        a = np.asarray(v)
        if a.ndim == 0:
            parts.append(f"{k} = {float(a):.6g}")
        elif a.size:
            parts.append(f"{k} in [{float(a.min()):.6g}, {float(a.max()):.6g}]")
    return ", ".join(parts) or "no variables"


def check_samples(f: Callable, samples: Iterable[Mapping]) -> None:
    """Evaluate a compiled expression at sample points (each a mapping name -> value); its errors propagate.

    Args:
        f: from :func:`compile_expression` (it refuses non-finite values and floating-point problems).
        samples: keyword arguments of ``f``, e.g. ``{"t": 0.0}, {"t": 1.0}``.
    """
    for env in samples:
        f(**env)
