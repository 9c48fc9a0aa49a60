"""The expression evaluator of configs: values against numpy, and its bounds on hostile input.

The property test feeds seeded random strings built from a hostile vocabulary (huge literals, deep nesting,
long sums, function names as values, operators and constructs outside the whitelist, names that do not exist,
non-finite constant parts) and asserts that every one either evaluates to finite values or raises one
ConfigError line naming its key: never another exception.
"""

import ast

import numpy as np
import pytest

from fe2ml.errors import ConfigError
from fe2ml.expr import MAX_CHARS, MAX_DEPTH, MAX_DIGITS, MAX_NODES, check_samples, compile_expression, parse_expression

NAMES = {"x", "y", "z", "t"}


@pytest.mark.parametrize("text,expected", [
    ("1 + 2*t - t**2/4", lambda t, x: 1 + 2 * t - t**2 / 4),
    ("exp(-t)*sin(3*x) + atan2(t, 1 + x)", lambda t, x: np.exp(-t) * np.sin(3 * x) + np.arctan2(t, 1 + x)),
    ("min(t, 0.5) + max(x, 0.25) - abs(-x) + sqrt(1 + t) + ln(2 + x) - log(2 + x) + tanh(x) + cos(t)",
     lambda t, x: np.minimum(t, 0.5) + np.maximum(x, 0.25) - x + np.sqrt(1 + t) + np.tanh(x) + np.cos(t)),
    ("-(-t)", lambda t, x: t), ("2**-1 * t", lambda t, x: 0.5 * t), (3, lambda t, x: 3.0 + 0 * x)])
def test_expressions_evaluate_as_numpy_does(text, expected):
    f = compile_expression(text, NAMES, where="c.yaml: bcs[0].value")
    x = np.linspace(0.0, 1.0, 7)
    for t in (0.0, 0.3, 1.0):
        assert np.allclose(f(x=x, y=x, z=x, t=t), expected(t, x), rtol=1e-14, atol=1e-15)


BAD = {  # text -> part of the one-line message
    "10**10**10": "exponent 1e+10 out of bounds",
    "1" * 4000: "4000 characters",
    "1" * (MAX_DIGITS + 1): "number literal of",
    "-" * 100000 + "1": "100001 characters",
    "+".join(["t"] * 200000): "characters",
    "-" * (MAX_CHARS - 2) + "t": "syntax nodes",
    "-(" * 60 + "t" + ")" * 60: "nested too deeply",
    "(" * 300 + "t" + ")" * 300: "nested too deeply",
    "+".join(["t"] * 400): f"at most {MAX_NODES}",
    "exp": "exp is a function, used as a value",
    "t*exp": "exp is a function, used as a value",
    "t(2)": "only",
    "1e308*10": "not finite",
    "1/0": "divides by zero",
    "log(0) + t": "outside the domain",
    "(-8)**0.5": "not a real number",
    "t**1000": "exponent 1000 out of bounds",
    "exp(1000)": "overflows",
    "t % 2": "operator Mod not allowed",
    "t // 2": "operator FloorDiv not allowed",
    "not t": "operator Not not allowed",
    "t.real": "construct Attribute not allowed",
    "__import__('os')": "calls are allowed",
    "__builtins__ + t": "unknown name '__builtins__'",
    "'a'": "constant 'a' not allowed",
    "[t]": "construct List not allowed",
    "lambda: 1": "construct Lambda not allowed",
    "t if t else 1": "construct IfExp not allowed",
    "t +": "syntax error",
    "q * t": "unknown name 'q'",
    "True": "constant 'True' not allowed",
    "sqrt(t, t)": "only",
    "min(t)": "only",
    "exp(x=t)": "only",
}


@pytest.mark.parametrize("text", sorted(BAD, key=lambda s: (len(s), s)))
def test_hostile_expressions_are_one_line_errors_naming_the_key(text):
    with pytest.raises(ConfigError) as e:
        f = compile_expression(text, NAMES, where="c.yaml: tractions[0].value")
        check_samples(f, [{"t": 0.5, "x": 0.0, "y": 0.0, "z": 0.0}])
    msg = str(e.value)
    assert msg.startswith("c.yaml: tractions[0].value: ") and "\n" not in msg and len(msg) < 400, msg
    assert BAD[text] in msg, msg


def test_values_that_fail_only_at_some_points_are_found_by_sampling():
    f = compile_expression("log(t - 0.5)", NAMES, where="c.yaml: pressures[0].value")
    f(t=0.75)
    with pytest.raises(ConfigError, match=r"c.yaml: pressures\[0\].value: 'log\(t - 0.5\)' fails at t = 0.25"):
        check_samples(f, [{"t": t} for t in (0.75, 1.0, 0.25)])
    g = compile_expression("1/(x - 1)", NAMES, where="k")
    with pytest.raises(ConfigError, match=r"k: '1/\(x - 1\)' fails at x in \[0, 1\]"):
        g(x=np.array([0.0, 1.0]))  # a numpy warning elsewhere, an error naming the key here
    h = compile_expression("exp(200*t)", NAMES, where="k")
    h(t=1.0)
    with pytest.raises(ConfigError, match="fails at t = 5"):
        h(t=5.0)  # overflow of a non-constant part at run time


def test_limits_are_at_the_stated_bounds():
    assert isinstance(parse_expression("1" * MAX_DIGITS, NAMES), ast.Expression)
    nested = "t"
    for _ in range(MAX_DEPTH // 2 - 2):
        nested = f"-({nested})"
    parse_expression(nested, NAMES)  # just inside the depth bound
    parse_expression("2**100 * t", NAMES)
    with pytest.raises(ConfigError, match="out of bounds"):
        parse_expression("2**100.5 * t", NAMES)


VOCAB = ["t", "x", "exp", "log", "sqrt", "min", "max", "atan2", "q", "__class__", "pi", "1", "0", "2.5", "1e308",
         "1e-308", "9" * 60, "10", "+", "-", "*", "/", "**", "%", "//", "@", "&", "|", "^", "~", "<", "==", "(", ")",
         "(", ")", ",", ".", "[", "]", "{", "}", ":", "'s'", "lambda", "if", "else", "not", "and", " ", "\n", "\t",
         "é", "\\", ";", "=", "#", "e", "j", "_", "0x1f", "1_000", "nan", "inf"]


def _hostile(rng) -> str:
    kind = rng.integers(6)
    if kind == 0:  # token soup
        return "".join(rng.choice(VOCAB, size=rng.integers(1, 40)))
    if kind == 1:  # deep nesting of a random unary or call
        wrap = rng.choice(["-({})", "exp({})", "({})", "+{}", "sqrt({})", "min({}, t)"])
        s = "t"
        for _ in range(int(rng.integers(1, 400))):
            s = wrap.format(s)
        return s
    if kind == 2:  # long flat sums and products
        return rng.choice(["+", "*", "-", "/", "**"]).join(["t"] * int(rng.integers(2, 3000)))
    if kind == 3:  # large or odd numbers in arithmetic
        a = rng.choice(["10", "1e300", "9" * int(rng.integers(1, 80)), "0", "-1", "1e-320", "2"])
        b = rng.choice(["10", "t", "1e10", "0.5", "-3", "400", "x"])
        return f"{a}{rng.choice(['**', '*', '/', '+'])}{b}{rng.choice(['**', '*', '/', '-'])}{a}"
    if kind == 4:  # random bytes as text
        return "".join(chr(int(c)) for c in rng.integers(1, 0x2FF, size=rng.integers(1, 30)))
    return "".join(rng.choice(["exp(", "log(", "t", "x", ")", "**", "*", "-", "1", "1000", ","],
                              size=rng.integers(1, 60)))


def test_no_input_string_produces_anything_but_a_config_error():
    rng = np.random.default_rng(2026)
    counts = {"evaluated": 0, "refused": 0}
    n = 2000
    x = np.linspace(0.0, 2.0, 5)
    for _ in range(n):
        text = _hostile(rng)
        try:
            f = compile_expression(text, NAMES, where="c.yaml: bcs[0].value")
            check_samples(f, [{"x": x, "y": x, "z": x, "t": t} for t in (0.0, 0.5, 1.0)])
            counts["evaluated"] += 1
        except ConfigError as e:
            assert str(e).startswith("c.yaml: bcs[0].value: ") and "\n" not in str(e), repr(text)[:200]
            counts["refused"] += 1
    print(f"\n{n} generated hostile expressions: {counts['refused']} refused with one line, "
          f"{counts['evaluated']} evaluated to finite values, 0 other exceptions")
    assert counts["refused"] + counts["evaluated"] == n and counts["refused"] > n // 2
