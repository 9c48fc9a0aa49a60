"""Hyperelastic materials per phase: strain energies W(F) written in UFL.

Every material gives ``energy(F)`` for the full 3D deformation gradient F (a 3x3 UFL expression;
plane strain embeds the 2D gradient with F33 = 1, so invariants count the out-of-plane part).
Stress P = ∂W/∂F and the tangent follow by automatic differentiation in UFL.

Invariants (C = FᵀF, J = det F): I1 = tr C, I2 = ½(I1² − tr C²), I3 = J², isochoric
I1b = J^(-2/3) I1, I2b = J^(-4/3) I2, fibre invariants I4 = a·C·a, I6 = b·C·b (and I4b, I6b
with J^(-2/3)).

Materials:

- :class:`NeoHookean` (mu, K): W = mu/2 (I1b − 3) + K/2 (J − 1)²; small-strain limit is isotropic
  elasticity with shear modulus mu and bulk modulus K.
- :class:`HolzapfelGasserOgden` (mu, K, k1, k2, fibres): neo-Hookean ground matrix plus
  Σ_f k1/(2 k2) (exp(k2 (I4f − 1)²) − 1) for fibres in tension (I4f > 1).
- :class:`ExpressionEnergy`: an expression of the invariants and named parameters, parsed safely
  (Python ``ast`` with a whitelist: numbers, parameters, invariants, + − * / **, exp, log, sqrt,
  and the fibre directions ``a``/``b``), e.g. ``mu/2*(J**(-2/3)*I1 - 3) + K/2*(J - 1)**2``.
- :class:`UFLEnergy`: any Python callable ``W(F) -> UFL scalar``.

Nearly incompressible phases (K/mu of 100–1000) should be solved with the mixed formulation of
:class:`fe2ml.micro.finite.HyperelasticRVE` (``formulation="mixed"``: P2 displacement, P0 pressure).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fe2ml.errors import MaterialError
from fe2ml.expr import evaluate, parse_expression

__all__ = [
    "ExpressionEnergy",
    "HolzapfelGasserOgden",
    "NeoHookean",
    "UFLEnergy",
    "fibre_families",
    "invariants",
    "plane_strain_3d",
    "parse_energy",
    "same_fibres",
]


def _num(v, name, key, positive=True):
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise MaterialError(f"{name}: {key} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise MaterialError(f"{name}: {key} must be > 0, got {v}")
    return float(v)


def _unit(a, name):
    a = np.asarray(a, dtype=float)
    if a.shape not in ((2,), (3,)) or not np.all(np.isfinite(a)) or np.linalg.norm(a) == 0:
        raise MaterialError(f"{name}: fibre direction must be a non-zero 2- or 3-vector, got {a.tolist()}")
    if a.shape == (2,):
        a = np.array([a[0], a[1], 0.0])
    return a / np.linalg.norm(a)


def fibre_families(materials) -> list[list[float]]:
    """The distinct fibre directions (unit 3-vectors, a and −a one family) of an RVE's materials, in phase order.

    ``materials``: material objects or their descriptions (dicts with a ``fibres`` entry, as in a checkpoint's
    or log's RVE description); materials without fibres contribute none.
    """
    out: list[np.ndarray] = []
    for m in materials:
        fib = m.get("fibres", ()) if isinstance(m, dict) else getattr(m, "fibres", ())
        for a in fib or ():
            v = _unit(a, "fibres")
            if not any(abs(abs(float(v @ w)) - 1.0) < 1e-9 for w in out):
                out.append(v)
    return [v.tolist() for v in out]


def same_fibres(a, b) -> bool:
    """Whether two lists of fibre families hold the same directions (up to sign and order)."""
    if len(a) != len(b):
        return False
    return all(any(abs(abs(float(np.dot(u, v))) - 1.0) < 1e-8 for v in b) for u in a)


def plane_strain_3d(F):
    """The 3x3 UFL deformation gradient of a 2D one (F33 = 1, plane strain); a 3x3 one is returned as it is."""
    # deferred: configs build materials without UFL; only their energies need it
    import ufl

    if ufl.shape(F) == (3, 3):
        return F
    return ufl.as_matrix([[F[0, 0], F[0, 1], 0], [F[1, 0], F[1, 1], 0], [0, 0, 1]])


def invariants(F, fibres=()):
    """Invariants of a 3x3 deformation gradient (UFL or numpy backend via ``ufl`` functions).

    Args:
        F: 3x3 UFL expression.
        fibres: unit 3-vectors of the fibre families (numbers, or UFL vectors such as a dolfinx ``Constant``).

    Returns:
        dict with I1, I2, I3, J, I1b, I2b and I4, I6 (and I4b, I6b) for the first two fibres.
    """
    # deferred: configs build materials without UFL; only their energies need it
    import ufl

    C = F.T * F
    J = ufl.det(F)
    I1 = ufl.tr(C)
    I2 = 0.5 * (I1**2 - ufl.tr(C * C))
    out = {"I1": I1, "I2": I2, "I3": J**2, "J": J, "I1b": J ** (-2.0 / 3.0) * I1, "I2b": J ** (-4.0 / 3.0) * I2}
    for name, a in zip(("I4", "I6"), fibres, strict=False):
        av = a if isinstance(a, ufl.core.expr.Expr) else ufl.as_vector([float(x) for x in a])
        I = ufl.dot(av, C * av)
        out[name] = I
        out[name + "b"] = J ** (-2.0 / 3.0) * I
    return out


class HyperelasticMaterial:
    """Base of the hyperelastic materials: ``energy(F3)`` returns a UFL scalar."""

    name: str = "hyperelastic"

    def energy(self, F):  # pragma: no cover - interface
        """Strain energy density for the 3x3 UFL deformation gradient ``F``."""
        raise NotImplementedError

    def small_strain_moduli(self) -> tuple[float, float] | None:
        """(shear, bulk) moduli of the small-strain limit for isotropic laws, else None."""
        return None


@dataclass(frozen=True)
class NeoHookean(HyperelasticMaterial):
    """Compressible neo-Hookean: W = mu/2 (J^(-2/3) I1 − 3) + K/2 (J − 1)².

    Args:
        mu: shear modulus > 0.
        K: bulk modulus > 0.
        name: label for messages.
    """

    mu: float
    K: float
    name: str = "neo_hookean"

    def __post_init__(self):
        _num(self.mu, self.name, "mu")
        _num(self.K, self.name, "K")

    @classmethod
    def from_E_nu(cls, E: float, nu: float, name: str = "neo_hookean") -> NeoHookean:
        """Construct from Young's modulus and Poisson's ratio of the small-strain limit."""
        _num(E, name, "E")
        if not -1 < nu < 0.5:
            raise MaterialError(f"{name}: nu must satisfy -1 < nu < 0.5, got {nu}")
        return cls(mu=E / (2 * (1 + nu)), K=E / (3 * (1 - 2 * nu)), name=name)

    def energy(self, F):
        """W(F)."""
        inv = invariants(F)
        return self.mu / 2 * (inv["I1b"] - 3) + self.K / 2 * (inv["J"] - 1) ** 2

    def small_strain_moduli(self):
        """(mu, K)."""
        return self.mu, self.K


@dataclass(frozen=True)
class HolzapfelGasserOgden(HyperelasticMaterial):
    """Fibre-reinforced tissue law (HGO type) with a neo-Hookean ground matrix.

    W = mu/2 (I1b − 3) + K/2 (J − 1)² + Σ_f k1/(2 k2) (exp(k2 ⟨I4f − 1⟩²) − 1), with ⟨x⟩ = max(x, 0)
    (fibres carry load only in tension) and I4f = a_f·C·a_f (the full, not isochoric, fibre
    invariant, which keeps the anisotropic volumetric response physical).

    Args:
        mu: ground shear modulus > 0.
        K: bulk modulus > 0.
        k1: fibre stiffness > 0.
        k2: fibre exponential stiffening > 0.
        fibres: list of fibre directions (2- or 3-vectors, normalised here).
        name: label for messages.
    """

    mu: float
    K: float
    k1: float
    k2: float
    fibres: tuple = field(default=((1.0, 0.0, 0.0),))
    name: str = "hgo"

    def __post_init__(self):
        for k in ("mu", "K", "k1", "k2"):
            _num(getattr(self, k), self.name, k)
        if len(self.fibres) < 1:
            raise MaterialError(f"{self.name}: needs at least one fibre direction")
        object.__setattr__(self, "fibres", tuple(tuple(_unit(a, self.name)) for a in self.fibres))

    def energy(self, F):
        """W(F)."""
        # deferred: configs build materials without UFL; only their energies need it
        import ufl

        inv = invariants(F)
        W = self.mu / 2 * (inv["I1b"] - 3) + self.K / 2 * (inv["J"] - 1) ** 2
        C = F.T * F
        for a in self.fibres:
            av = a if isinstance(a, ufl.core.expr.Expr) else ufl.as_vector(a)
            E4 = ufl.dot(av, C * av) - 1
            E4p = ufl.conditional(ufl.gt(E4, 0), E4, 0)
            W = W + self.k1 / (2 * self.k2) * (ufl.exp(self.k2 * E4p**2) - 1)
        return W

    def small_strain_moduli(self):
        """Fibres carry nothing at F = I (their stiffness starts with E4²): (mu, K)."""
        return self.mu, self.K


_FUNCS = {"exp", "log", "ln", "sqrt"}
# where an expression energy is evaluated up front: the reference state, stretch, compression and shear
_SAMPLE_F = (np.eye(3), np.diag([1.2, 0.95, 0.95]), np.diag([0.85, 1.05, 1.1]),
             np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
_INVARIANTS = {"I1", "I2", "I3", "J", "I1b", "I2b", "I4", "I6", "I4b", "I6b"}


def parse_energy(expr: str, params: dict[str, float], *, n_fibres: int = 0, name: str = "energy") -> ast.Expression:
    """Parse and check an energy expression; returns the AST (evaluated later with a backend).

    Allowed: numbers, parameter names, invariants (I1, I2, I3, J, I1b, I2b; I4/I4b with one
    fibre family, I6/I6b with two), + − * / ** and unary minus, functions exp, log (= ln), sqrt.
    The checks are those of :func:`fe2ml.expr.parse_expression` with this vocabulary.

    Raises:
        MaterialError: syntax error or a disallowed construct, naming it.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise MaterialError(f"{name}: energy must be a non-empty string expression")
    allowed_names = set(params) | {"I1", "I2", "I3", "J", "I1b", "I2b"}
    if n_fibres >= 1:
        allowed_names |= {"I4", "I4b"}
    if n_fibres >= 2:
        allowed_names |= {"I6", "I6b"}
    return parse_expression(expr, allowed_names, where=f"{name}: energy", error=MaterialError, funcs=_FUNCS)


@dataclass(frozen=True)
class ExpressionEnergy(HyperelasticMaterial):
    """Strain energy given as a safe expression of invariants and named parameters.

    Args:
        expr: e.g. ``"mu/2*(J**(-2/3)*I1 - 3) + K/2*(J - 1)**2"``.
        params: parameter name -> value.
        fibres: fibre directions for I4 (first) and I6 (second).
        name: label for messages.
    """

    expr: str
    params: dict = field(default_factory=dict)
    fibres: tuple = ()
    name: str = "expression"

    def __post_init__(self):
        if not isinstance(self.params, dict):
            raise MaterialError(f"{self.name}: params must be a mapping name -> number")
        for k, v in self.params.items():
            if not isinstance(k, str) or not k.isidentifier() or k in _INVARIANTS or k in _FUNCS:
                raise MaterialError(f"{self.name}: parameter name {k!r} is not allowed (identifier, not an "
                                    "invariant or function name)")
            _num(v, self.name, k, positive=False)
        object.__setattr__(self, "fibres", tuple(tuple(_unit(a, self.name)) for a in self.fibres))
        object.__setattr__(self, "_tree", parse_energy(self.expr, self.params, n_fibres=len(self.fibres),
                                                       name=self.name))
        # the energy must vanish in the reference configuration (W(I) = 0) and be finite near it; checked numerically
        W = [self._value(F) for F in _SAMPLE_F]
        if abs(W[0]) > 1e-12 * (1 + max([abs(float(v)) for v in self.params.values()] or [1.0])):
            raise MaterialError(f"{self.name}: energy must vanish at F = I (got W(I) = {W[0]:.6g})")

    def _value(self, F: np.ndarray) -> float:
        """W at a 3x3 deformation gradient F in numpy; an error where it is not a finite number."""
        C = F.T @ F
        J = float(np.linalg.det(F))
        I1, I2 = float(np.trace(C)), float(0.5 * (np.trace(C) ** 2 - np.trace(C @ C)))
        env = {"I1": I1, "I2": I2, "I3": J**2, "J": J, "I1b": J ** (-2 / 3) * I1, "I2b": J ** (-4 / 3) * I2,
               **{k: float(v) for k, v in self.params.items()}}
        for key, a in zip(("I4", "I6"), self.fibres, strict=False):
            env[key] = float(np.asarray(a) @ C @ np.asarray(a))
            env[key + "b"] = J ** (-2 / 3) * env[key]
        at = "F = I" if np.array_equal(F, np.eye(3)) else f"F = {np.round(F, 3).tolist()}"
        try:
            with np.errstate(all="raise"):
                w = evaluate(self._tree, env, {"exp": np.exp, "log": np.log, "ln": np.log, "sqrt": np.sqrt})
        except (FloatingPointError, ZeroDivisionError, OverflowError) as e:
            raise MaterialError(f"{self.name}: energy cannot be evaluated at {at} ({e})") from None
        if isinstance(w, complex) or not np.isfinite(w):
            raise MaterialError(f"{self.name}: energy is not a finite real number at {at} (got {w})")
        return float(w)

    def energy(self, F):
        """W(F) as UFL."""
        # deferred: configs build materials without UFL; only their energies need it
        import ufl

        env = {**invariants(F, self.fibres),
               **{k: v if isinstance(v, ufl.core.expr.Expr) else float(v) for k, v in self.params.items()}}
        return evaluate(self._tree, env, {"exp": ufl.exp, "log": ufl.ln, "ln": ufl.ln, "sqrt": ufl.sqrt})


@dataclass(frozen=True)
class UFLEnergy(HyperelasticMaterial):
    """User-defined energy ``W(F) -> UFL scalar`` written in Python (F is the 3x3 UFL gradient).

    Args:
        fn: the callable.
        name: label for messages.
    """

    fn: Callable
    name: str = "ufl_energy"

    def __post_init__(self):
        if not callable(self.fn):
            raise MaterialError(f"{self.name}: energy must be callable W(F) -> UFL expression")

    def energy(self, F):
        """W(F)."""
        return self.fn(F)
