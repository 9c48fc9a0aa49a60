"""Microstructure parameters: named entries of an RVE config that a family of RVEs varies.

A parameter is the dotted path of a key of the RVE config (``phases.2.mu``, ``mesh.volume_fraction``,
``mesh.seed``) or ``fibre.angle`` (degrees: every phase with ``fibres`` gets the two families at ±angle in the
x–y plane). A parameter whose base value is an integer (``mesh.seed``, ``mesh.n_cells``) stays an integer (values
are rounded). :func:`rve_with` builds the validated RVE config of one parameter vector; its mesh, when generated, is
cached by its generator parameters, so sets that share them share the mesh file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fe2ml.config import load_yaml
from fe2ml.errors import ConfigError, MaterialError
from fe2ml.micro.config import parse_homogenize

__all__ = ["ParameterBox", "family_fingerprint", "parameter_sets", "parse_parameter_box", "rve_with"]

FIBRE_ANGLE = "fibre.angle"


@dataclass(frozen=True)
class ParameterBox:
    """Named parameters with their ranges, and the base RVE config they modify.

    Attributes:
        names: parameter names, in order (the order of a parameter vector p).
        lo, hi: (k,) bounds; integer: (k,) whether a parameter is integer valued.
        base: the raw RVE mapping; base_path, base_dir: where it came from (relative paths resolve from base_dir).
    """

    names: tuple
    lo: np.ndarray
    hi: np.ndarray
    integer: np.ndarray
    base: dict
    base_path: Path
    base_dir: Path

    def as_dict(self) -> dict:
        """{name: [lo, hi]} (JSON friendly)."""
        return {n: [float(a), float(b)] for n, a, b in zip(self.names, self.lo, self.hi, strict=True)}

    def values(self, p) -> dict:
        """{name: value} of a parameter vector (integers rounded)."""
        return {n: (round(float(v)) if i else float(v)) for n, v, i in zip(self.names, p, self.integer, strict=True)}

    def snap(self, p) -> np.ndarray:
        """The vector p with its integer parameters rounded."""
        p = np.array(p, dtype=float)
        p[..., self.integer] = np.round(p[..., self.integer])
        return p

    def outside(self, p, rtol: float = 1e-9) -> list[str]:
        """Names of the parameters of p (k,) or (n, k) outside the box."""
        p = np.atleast_2d(np.asarray(p, dtype=float))
        tol = rtol * np.maximum(np.abs(self.hi - self.lo), 1e-300)
        bad = np.any((p < self.lo - tol) | (p > self.hi + tol), axis=0)
        return [n for n, b in zip(self.names, bad, strict=True) if b]


def _lookup(raw: dict, keys: list[str], name: str, where: str):
    """(container, key) of a dotted path in the raw config (phase tags may be int or str keys)."""
    node = raw
    for i, k in enumerate(keys):
        if not isinstance(node, dict):
            break
        hit = next((kk for kk in node if str(kk) == k), None)
        if hit is None:
            break
        if i == len(keys) - 1:
            return node, hit
        node = node[hit]
    raise ConfigError(f"{where}: parameter {name!r} does not exist in the RVE config (no key "
                      f"{'.'.join(keys[:i + 1])!r}); give the dotted path of an existing key such as phases.2.mu or "
                      f"mesh.volume_fraction, or {FIBRE_ANGLE}")


def _number(v) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def parse_parameter_box(raw, rve_ref, where: str, base_dir: Path, file: Path) -> ParameterBox:
    """Validate ``parameters: {name: [lo, hi], ...}`` against the RVE config (a mapping or a YAML path).

    Raises:
        ConfigError: not a mapping, an unknown name, a non-numeric base value, a range with lo >= hi.
    """
    if isinstance(rve_ref, str):
        bp = base_dir / rve_ref
        base = load_yaml(bp) if bp.is_file() else {}
        bdir = bp.parent
    else:
        base, bp, bdir = rve_ref, file, base_dir
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: expected a mapping of RVE parameters to ranges, e.g. "
                          "{phases.2.mu: [1.0e3, 8.0e3], mesh.volume_fraction: [0.1, 0.4]}")
    names, lo, hi, integer = [], [], [], []
    for name, rng in raw.items():
        name = str(name)
        w = f"{where}.{name}"
        if name == FIBRE_ANGLE:
            if not any(isinstance(ph, dict) and "fibres" in ph for ph in (base.get("phases") or {}).values()):
                raise ConfigError(f"{w}: the RVE has no phase with fibres (fibre.angle sets the fibres of hgo and "
                                  "energy phases)")
            is_int = False
        else:
            node, key = _lookup(base, name.split("."), name, where)
            v = node[key]
            if _number(v) is None:
                raise ConfigError(f"{w}: the RVE value {v!r} is not a number; only numeric entries can be parameters")
            is_int = isinstance(v, int) and not isinstance(v, bool)
        if not (isinstance(rng, list) and len(rng) == 2 and all(_number(x) is not None for x in rng)):
            raise ConfigError(f"{w}: expected a range [lo, hi] of two numbers, got {rng!r}")
        a, b = (_number(x) for x in rng)
        if a >= b:
            raise ConfigError(f"{w}: range [{a:g}, {b:g}] has lo >= hi; give lo < hi")
        names.append(name)
        lo.append(a)
        hi.append(b)
        integer.append(is_int)
    return ParameterBox(names=tuple(names), lo=np.array(lo), hi=np.array(hi), integer=np.array(integer, dtype=bool),
                        base=base, base_path=bp, base_dir=bdir)


def rve_with(box: ParameterBox, p, where: str, dim: int | None = None):
    """The validated RVE config (:class:`~fe2ml.micro.config.HomogenizeConfig`) of the base with parameters p.

    Raises:
        ConfigError: the modified RVE config is invalid (e.g. a modulus <= 0); the message names the values.
    """
    vals = box.values(p)
    raw = copy.deepcopy(box.base)
    for name, v in vals.items():
        if name == FIBRE_ANGLE:
            t = math.radians(v)
            d = raw.get("dim", dim or 2)
            fam = ([[math.cos(t), math.sin(t)], [math.cos(t), -math.sin(t)]] if d == 2
                   else [[math.cos(t), math.sin(t), 0.0], [math.cos(t), -math.sin(t), 0.0]])
            for ph in raw["phases"].values():
                if isinstance(ph, dict) and "fibres" in ph:
                    ph["fibres"] = fam
            continue
        node, key = _lookup(raw, name.split("."), name, where)
        node[key] = v
    try:
        return parse_homogenize(raw, box.base_path, f"{where} (parameters {vals})", box.base_dir,
                                require_points=False, default_dim=dim)
    except (ConfigError, MaterialError) as e:  # e.g. a modulus <= 0 at these parameters
        raise ConfigError(str(e)) from None


def parameter_sets(box: ParameterBox, m: int, seed: int = 0) -> np.ndarray:
    """M parameter vectors (M, k): a scrambled Sobol design over the box (integer parameters rounded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Sobol balance warning for M not a power of 2
        from scipy.stats import qmc  # lazily: scipy.stats costs about 1 s to import

        u = qmc.Sobol(len(box.names), scramble=True, seed=seed).random(m)
    lo, hi = box.lo.copy(), box.hi.copy()
    # an integer parameter covers lo..hi with equal probability per value
    lo[box.integer] -= 0.5 - 1e-9
    hi[box.integer] += 0.5 - 1e-9
    return box.snap(lo + u * (hi - lo))


def family_fingerprint(box: ParameterBox, dim: int | None = None) -> str:
    """Fingerprint of a family of RVEs: the base config without the parameters' values, and their names.

    The base is normalised (string keys, numbers as floats, dim, kinematics, bc, degree and formulation as the
    validated config resolves them), so that a run's ``material.rve`` and the campaign's ``rve`` match when they
    describe the same family however they are written.
    """
    def norm(o):
        if isinstance(o, dict):
            return {str(k): norm(v) for k, v in o.items()}
        if isinstance(o, list):
            return [norm(v) for v in o]
        if isinstance(o, str | int | float) and not isinstance(o, bool) and _number(o) is not None:
            return float(o)
        return o

    cfg = parse_homogenize(box.base, box.base_path, str(box.base_path), box.base_dir, require_points=False,
                           default_dim=dim)
    raw = norm(box.base)
    raw.update({"dim": float(cfg.dim), "kinematics": cfg.kinematics, "bc": cfg.bc, "degree": float(cfg.degree),
                "formulation": cfg.formulation})
    for k in ("strains", "F", "load_path", "fields", "newton", "solver"):  # how it is solved, not what it is
        raw.pop(k, None)
    for name in box.names:
        if name == FIBRE_ANGLE:
            for ph in raw.get("phases", {}).values():
                if isinstance(ph, dict) and "fibres" in ph:
                    ph["fibres"] = None
            continue
        node, key = _lookup(raw, name.split("."), name, "parameters")
        node[key] = None
    key = json.dumps({"base": raw, "parameters": list(box.names)}, sort_keys=True, default=str)
    return "family-" + hashlib.sha256(key.encode()).hexdigest()[:12]
