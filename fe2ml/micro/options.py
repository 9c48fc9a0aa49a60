"""Options of the RVE solvers that configs validate: boundary conditions and the linear solver (no PETSc here)."""

from __future__ import annotations

from dataclasses import dataclass

from fe2ml.config import check_keys, number
from fe2ml.errors import ConfigError

__all__ = ["AUTO_ITERATIVE_DOFS", "BCS", "SolverOptions", "parse_solver"]

BCS = ("periodic", "affine", "traction")

AUTO_ITERATIVE_DOFS = 60_000  # ``solver: auto`` is iterative from this many displacement dofs on


@dataclass(frozen=True)
class SolverOptions:
    """The linear solver of an RVE's reduced system.

    Attributes:
        type: ``direct`` (MUMPS Cholesky/LDLᵀ, one factorization reused for the Newton step and the d² tangent
            right-hand sides), ``iterative`` (conjugate gradients preconditioned by PETSc's algebraic multigrid
            GAMG with the nodal blocks and the rigid-body near-nullspace; for the mixed formulation MINRES with the
            field split of :func:`mixed_fieldsplit`; the preconditioner is reused for the tangent's right-hand
            sides), or ``auto`` (iterative from ``AUTO_ITERATIVE_DOFS`` displacement dofs on, direct below).
        rtol: relative residual tolerance of the iterative solver. C̄ and Ā are computed from the condensed
            energy, so their error is quadratic in it; the Newton iterations converge to the Newton tolerance
            whatever it is.
        max_it: its iteration limit.
    """

    type: str = "auto"
    rtol: float = 1e-5
    max_it: int = 1000

    def __post_init__(self) -> None:
        if self.type not in ("auto", "direct", "iterative"):
            raise ConfigError(f"solver.type: expected auto, direct or iterative, got {self.type!r}")
        if not 0 < self.rtol < 1 or self.max_it < 1:
            raise ConfigError(f"solver: rtol in (0, 1) and max_it >= 1 expected, got {self}")


def parse_solver[S: SolverOptions](raw, f: str, cls: type[S]) -> S:
    """``solver: {type, rtol, max_it}`` of a config as ``cls`` (an RVE's or the macro problem's options).

    Args:
        raw: the mapping, or None for ``cls``'s defaults.
        f: the config file, for messages (``f: solver.KEY: ...``).
        cls: :class:`SolverOptions` or a subclass with its own defaults.
    """
    sv = raw or {}
    if not isinstance(sv, dict):
        raise ConfigError(f"{f}: solver: expected a mapping {{type: auto | direct | iterative, rtol, max_it}}")
    check_keys(sv, ("type", "rtol", "max_it"), f"{f}: solver")
    default = cls()
    mi = sv.get("max_it", default.max_it)
    if not isinstance(mi, int) or isinstance(mi, bool):
        raise ConfigError(f"{f}: solver.max_it: expected an integer >= 1, got {mi!r}")
    try:  # the options check the type name and the ranges
        return cls(type=sv.get("type", default.type), rtol=number(sv.get("rtol", default.rtol), f"{f}: solver.rtol"),
                   max_it=mi)
    except ConfigError as e:
        raise ConfigError(f"{f}: {e}") from None
