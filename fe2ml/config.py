"""YAML helpers shared by every stage's config: loading, key and number checks, Newton settings.

Each stage owns the schema of its own config (``micro/config.py``: homogenize and RVE keys; ``data/config.py``:
sampling campaigns; ``surrogate/config.py``: training; ``macro/config.py``: runs). They validate up front with
these helpers: errors name the file, the key (dotted path) and what was expected, and are raised as
:class:`fe2ml.errors.ConfigError` before any expensive work starts. Relative paths in a config are relative to
the config file's folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import yaml

from fe2ml.errors import ConfigError

__all__ = ["NewtonOptions", "check_keys", "load_yaml", "number", "parse_newton", "require_dim_mesh"]


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping, with a clear error for a missing file or malformed YAML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        with open(p) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read config ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _type_name(v) -> str:
    return type(v).__name__


def number(v: object, where: str, *, positive: bool = False) -> float:
    """A finite number from YAML (``7.0e9`` read as a string by YAML 1.1 is accepted); ``where`` names the key."""
    if isinstance(v, str):  # YAML 1.1 reads 7.0e9 (no sign in the exponent) as a string
        try:
            v = float(v)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {v!r} (str)") from None
    if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
        raise ConfigError(f"{where}: expected a number, got {v!r} ({_type_name(v)})")
    if positive and v <= 0:
        raise ConfigError(f"{where}: expected a positive number, got {v!r}")
    return float(v)


def flag(v: object, where: str) -> bool:
    """A true/false config value; a clear error for anything else (``yes``, 1, a string)."""
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: expected true or false, got {v!r}")
    return v


def check_keys(d: dict, allowed, where: str) -> None:
    """Refuse keys of ``d`` that are not in ``allowed``, listing what is allowed."""
    unknown = sorted(str(k) for k in d if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")


def require_dim_mesh(raw: dict, required, f: str) -> tuple[int, dict]:
    """Check the required keys, ``dim`` (2 or 3) and that ``mesh`` is a mapping; returns (dim, mesh)."""
    for k in required:
        if k not in raw:
            raise ConfigError(f"{f}: missing required key '{k}'")
    dim = raw["dim"]
    if dim not in (2, 3) or isinstance(dim, bool):
        raise ConfigError(f"{f}: dim: expected 2 or 3, got {dim!r}")
    mesh = raw["mesh"]
    if not isinstance(mesh, dict):
        raise ConfigError(f"{f}: mesh: expected a mapping {{file: PATH}} or {{generate: NAME, ...}}, got {mesh!r}")
    return dim, mesh


@dataclass(frozen=True)
class NewtonOptions:
    """Newton and load-stepping settings, of the RVE and of the macro problem alike.

    Attributes:
        rtol: relative tolerance on the residual norm (w.r.t. the step's first residual).
        atol: absolute tolerance (the RVE measures it relative to the residual of a unit affine strain).
        max_it: Newton iterations per (sub)step.
        max_cuts: how many times a step may be halved before giving up.
        divergence: a residual this many times the step's first residual counts as divergence (RVE).
    """

    rtol: float = 1e-10
    atol: float = 1e-12
    max_it: int = 25
    max_cuts: int = 8
    divergence: float = 1e8

    def __post_init__(self) -> None:
        if not (0 < self.rtol < 1 and 0 < self.atol < 1 and self.max_it >= 1 and self.max_cuts >= 0):
            raise ConfigError(f"newton options out of range: {self}")


MACRO_NEWTON = NewtonOptions(rtol=1e-9, atol=1e-12, max_it=20, max_cuts=6)


def parse_newton(newton: object, f: str, *, defaults: NewtonOptions | None = None) -> NewtonOptions:
    """Validate a ``newton: {rtol, atol, max_it, max_cuts}`` mapping (None: the defaults).

    Args:
        newton: the mapping or None.
        f: file name for messages.
        defaults: the settings of the keys not given (RVE defaults when None).
    """
    base = defaults if defaults is not None else NewtonOptions()
    if newton is None:
        return base
    if not isinstance(newton, dict):
        raise ConfigError(f"{f}: newton: expected a mapping, got {newton!r}")
    check_keys(newton, ("rtol", "atol", "max_it", "max_cuts"), f"{f}: newton")
    kw = {fl.name: getattr(base, fl.name) for fl in fields(base)}
    for k in ("rtol", "atol"):
        if k in newton:
            kw[k] = number(newton[k], f"{f}: newton.{k}", positive=True)
    for k in ("max_it", "max_cuts"):
        if k in newton:
            if not isinstance(newton[k], int) or isinstance(newton[k], bool) or newton[k] < 0:
                raise ConfigError(f"{f}: newton.{k}: expected a non-negative integer, got {newton[k]!r}")
            kw[k] = newton[k]
    return NewtonOptions(**kw)
