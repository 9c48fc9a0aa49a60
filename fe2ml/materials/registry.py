"""Phase materials from YAML: the registry of material names, their keys, and the builder.

``MATERIALS[name]`` lists the required and optional keys of each material; :func:`build_material` turns one
``{material: NAME, ...parameters}`` mapping into a material object, with errors that name the config location.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fe2ml.config import check_keys, number
from fe2ml.errors import ConfigError, MaterialError
from fe2ml.materials.hyperelastic import ExpressionEnergy, HolzapfelGasserOgden, HyperelasticMaterial, NeoHookean
from fe2ml.materials.linear import AnisotropicLinearElastic, LinearElastic, LinearMaterial, TransverselyIsotropic

__all__ = ["HYPERELASTIC", "MATERIALS", "build_material"]

MATERIALS = {
    "linear_elastic": {"required": ("E", "nu"), "optional": ()},
    "anisotropic": {"required": ("C",), "optional": ()},
    "transversely_isotropic": {"required": ("E_L", "E_T", "nu_LT", "nu_TT", "G_LT"), "optional": ("direction",)},
    # hyperelastic (finite strain)
    "neo_hookean": {"required": (), "optional": ("mu", "K", "E", "nu")},
    "hgo": {"required": ("mu", "K", "k1", "k2", "fibres"), "optional": ()},
    "energy": {"required": ("W",), "optional": ("params", "fibres")},
}
HYPERELASTIC = ("neo_hookean", "hgo", "energy")

def build_material(spec: Any, where: str) -> LinearMaterial | HyperelasticMaterial:
    """Create a material from its config mapping ``{material: NAME, ...parameters}``.

    Args:
        spec: the mapping.
        where: location for error messages (``file: phases.2``).

    Returns:
        A material object with ``stiffness(d)``.
    """
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping like {{material: linear_elastic, E: 1.0, nu: 0.3}}, "
                          f"got {spec!r}")
    name = spec.get("material")
    if name not in MATERIALS:
        raise ConfigError(f"{where}.material: unknown material {name!r}; allowed: {', '.join(MATERIALS)}")
    req, opt = MATERIALS[name]["required"], MATERIALS[name]["optional"]
    check_keys(spec, ("material", *req, *opt), where)
    miss = [k for k in req if k not in spec]
    if miss:
        raise ConfigError(f"{where}: material {name} needs key(s) {', '.join(miss)}")
    try:
        if name == "linear_elastic":
            return LinearElastic(E=number(spec["E"], f"{where}.E"), nu=number(spec["nu"], f"{where}.nu"),
                                 name=where)
        if name == "anisotropic":
            try:
                C = np.asarray([[number(x, f"{where}.C") for x in row] for row in spec["C"]], dtype=float)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.C: expected a 6x6 list of numbers (Voigt, order 11,22,33,23,13,12)") \
                    from None
            if C.shape != (6, 6):
                raise ConfigError(f"{where}.C: expected a 6x6 Voigt matrix (order 11,22,33,23,13,12), "
                                  f"got shape {C.shape}")
            return AnisotropicLinearElastic(C=C, name=where)
        if name == "neo_hookean":
            keys = {k for k in ("mu", "K", "E", "nu") if k in spec}
            if keys == {"mu", "K"}:
                return NeoHookean(mu=number(spec["mu"], f"{where}.mu"), K=number(spec["K"], f"{where}.K"),
                                  name=where)
            if keys == {"E", "nu"}:
                return NeoHookean.from_E_nu(number(spec["E"], f"{where}.E"), number(spec["nu"], f"{where}.nu"),
                                            name=where)
            raise ConfigError(f"{where}: neo_hookean needs either (mu, K) or (E, nu), got {sorted(keys)}")
        if name == "hgo":
            fib = spec["fibres"]
            if not isinstance(fib, list) or not fib:
                raise ConfigError(f"{where}.fibres: expected a list of direction vectors, got {fib!r}")
            return HolzapfelGasserOgden(**{k: number(spec[k], f"{where}.{k}") for k in ("mu", "K", "k1", "k2")},
                                        fibres=tuple(tuple(number(x, f"{where}.fibres") for x in a)
                                                     if isinstance(a, list) else a for a in fib), name=where)
        if name == "energy":
            params = spec.get("params", {}) or {}
            if not isinstance(params, dict):
                raise ConfigError(f"{where}.params: expected a mapping name -> number, got {params!r}")
            params = {str(k): number(v, f"{where}.params.{k}") for k, v in params.items()}
            fib = spec.get("fibres", []) or []
            if not isinstance(fib, list):
                raise ConfigError(f"{where}.fibres: expected a list of direction vectors, got {fib!r}")
            if not isinstance(spec["W"], str):
                raise ConfigError(f"{where}.W: expected an expression string, got {spec['W']!r}")
            return ExpressionEnergy(expr=spec["W"], params=params, fibres=tuple(tuple(a) for a in fib), name=where)
        kw = {k: number(spec[k], f"{where}.{k}") for k in req}
        if "direction" in spec:
            kw["direction"] = spec["direction"]
        return TransverselyIsotropic(**kw, name=where)
    except MaterialError as e:
        raise MaterialError(str(e)) from None
