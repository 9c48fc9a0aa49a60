"""Safe arithmetic expressions from configs (no ``eval``): Python ``ast`` with a whitelist.

Allowed: numbers, whitelisted names, + − * / ** and unary ±, and the functions exp, log/ln, sqrt,
sin, cos, tanh, abs, min, max, atan2 (the last three with two arguments; atan2(y, x) in radians).
Evaluation takes a backend of functions (numpy for load expressions, UFL for energies).
"""

from __future__ import annotations

import ast

from fe2ml.errors import ConfigError

__all__ = ["compile_expression", "evaluate", "numpy_funcs", "parse_expression"]

FUNCS_1 = {"exp", "log", "ln", "sqrt", "sin", "cos", "tanh", "abs"}
FUNCS_2 = {"min", "max", "atan2"}


def parse_expression(text, names, *, where: str = "expression", error=ConfigError, funcs=None) -> ast.Expression:
    """Parse and check an expression.

    Args:
        text: the expression (a number is accepted too).
        names: allowed variable names.
        where: location for messages.
        error: exception type to raise.
        funcs: allowed function names (default: all of ``FUNCS_1 | FUNCS_2``).

    Returns:
        The checked AST.
    """
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise error(f"{where}: expected a number or an expression string, got {text!r}")
    text = str(text)
    allowed_funcs = (FUNCS_1 | FUNCS_2) if funcs is None else set(funcs)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise error(f"{where}: syntax error at column {e.offset} in {text!r}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Expression | ast.Load | ast.BinOp | ast.UnaryOp):
            continue
        if isinstance(node, ast.operator):
            if not isinstance(node, ast.Add | ast.Sub | ast.Mult | ast.Div | ast.Pow):
                raise error(f"{where}: operator {type(node).__name__} not allowed in {text!r}")
            continue
        if isinstance(node, ast.unaryop):
            if not isinstance(node, ast.USub | ast.UAdd):
                raise error(f"{where}: operator {type(node).__name__} not allowed in {text!r}")
            continue
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise error(f"{where}: constant {node.value!r} not allowed in {text!r}")
            continue
        if isinstance(node, ast.Name):
            if node.id in allowed_funcs:
                continue
            if node.id not in names:
                raise error(f"{where}: unknown name {node.id!r} in {text!r}; allowed: {sorted(names)}, "
                            f"functions {sorted(allowed_funcs)}")
            continue
        if isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in allowed_funcs and not node.keywords
            nargs = 2 if ok and node.func.id in FUNCS_2 else 1
            if not ok or len(node.args) != nargs:
                calls = ", ".join(f"{g}(x, y)" if g in FUNCS_2 else f"{g}(x)" for g in sorted(allowed_funcs))
                raise error(f"{where}: only {calls} calls are allowed in {text!r}")
            continue
        raise error(f"{where}: construct {type(node).__name__} not allowed in {text!r}")
    return tree


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
    import numpy as np

    return {"exp": np.exp, "log": np.log, "ln": np.log, "sqrt": np.sqrt, "sin": np.sin, "cos": np.cos,
            "tanh": np.tanh, "abs": np.abs, "min": np.minimum, "max": np.maximum, "atan2": np.arctan2}


def compile_expression(text, names, *, where: str = "expression", error=ConfigError):
    """Parse and check an expression once; returns a function of keyword arguments ``f(**{name: value})``.

    The values may be numbers or numpy arrays (the numpy backend of :func:`numpy_funcs`).
    """
    tree = parse_expression(text, names, where=where, error=error)
    funcs = numpy_funcs()

    def f(**env):
        return evaluate(tree, env, funcs)

    return f

