"""The constitutive contract every law of fe2ml implements, with defaults for its optional parts.

A law maps a batch of macro deformation gradients to the first Piola stress and the consistent tangent:

    evaluate(F̄) -> (P̄, Ā),   F̄ (n, d, d),  P̄ (n, d, d),  Ā = ∂P̄/∂F̄ (n, d, d, d, d),   float64

with d = 2 (plane strain, F33 = 1) or 3; at small strain P̄ = C̄ : sym(F̄ − I) and Ā = C̄. Laws with internal
state (RVE warm starts) keep a trial state per point during a load step: :meth:`ConstitutiveLaw.commit` accepts it
(the step converged), :meth:`ConstitutiveLaw.rollback` returns to the last committed one (the step was cut). The
committed state travels in run checkpoints as plain arrays (:meth:`~ConstitutiveLaw.state_arrays`). ``stats``
accumulates evaluation counts and wall time, with every key present from the start (:func:`new_stats`).

Implementations: :class:`fe2ml.laws.rve.RVELaw` (nested FE²), :class:`fe2ml.laws.rve.LinearRVELaw` (C̄ of a linear
RVE), :class:`fe2ml.laws.surrogate.SurrogateLaw`, :class:`fe2ml.laws.surrogate.HybridLaw` and the single-scale
:class:`fe2ml.laws.analytic.AnalyticLaw`. The analytic law is also of a second kind, a :class:`FormLaw`: the macro
problem integrates its UFL stress exactly instead of interpolating P̄ and Ā at quadrature points.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from fe2ml.errors import SolverError
from fe2ml.micro.quantities import CellQuantities

__all__ = ["KINEMATICS", "ConstitutiveLaw", "FormLaw", "PointFailure", "new_stats"]

KINEMATICS = ("finite", "small")


class PointFailure(SolverError):
    """A constitutive evaluation failed at local point ``index`` (the macro problem names its coordinates)."""

    def __init__(self, msg: str, index: int):
        super().__init__(msg)
        self.index = index


def new_stats() -> dict[str, Any]:
    """The statistics every law keeps, all zero.

    Keys: ``evaluations`` (points evaluated), ``rve_solves``, ``newton_its`` and ``substeps`` (of the RVE solves),
    ``time_s`` (wall time in :meth:`ConstitutiveLaw.evaluate`), ``max_point_s`` (slowest point), ``surrogate_s``
    (time in the network), ``fallbacks`` and ``fallbacks_per_step`` (hybrid points answered by the RVE).
    """
    return {"evaluations": 0, "rve_solves": 0, "newton_its": 0, "substeps": 0, "time_s": 0.0, "max_point_s": 0.0,
            "surrogate_s": 0.0, "fallbacks": 0, "fallbacks_per_step": []}


class ConstitutiveLaw(ABC):
    """A constitutive law at the macro quadrature points of one rank.

    Attributes:
        dim: 2 or 3.
        kinematics: ``finite`` or ``small``.
        stats: evaluation statistics (:func:`new_stats`).
    """

    def __init__(self, dim: int, kinematics: str):
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim!r}")
        if kinematics not in KINEMATICS:
            raise ValueError(f"kinematics must be one of {KINEMATICS}, got {kinematics!r}")
        self.dim = dim
        self.kinematics = kinematics
        self.stats: dict[str, Any] = new_stats()

    @abstractmethod
    def evaluate(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stress and tangent at a batch of points.

        Args:
            F: macro deformation gradients. *Shape:* (n, d, d).

        Returns:
            P̄ *Shape:* (n, d, d) and Ā = ∂P̄/∂F̄ *Shape:* (n, d, d, d, d), float64.

        Raises:
            PointFailure: the evaluation failed at a point (its index is on the error).
        """

    def stress(self, F: np.ndarray, *, with_tangent: bool = False) -> np.ndarray:
        """P̄ at a batch of points; :meth:`tangent` then gives Ā at the same points.

        A macro Newton iteration that converges needs no tangent: laws whose tangent costs extra (a surrogate's
        Hessian) compute it only when :meth:`tangent` is called, or here already with ``with_tangent`` (the caller
        will ask for it). Default: :meth:`evaluate`, its Ā kept for :meth:`tangent`.
        """
        P, self._tangent = self.evaluate(F)
        return P

    def tangent(self) -> np.ndarray:
        """Ā at the points of the last :meth:`stress` call.

        The array may be the law's own and is valid until its next :meth:`stress` call (copy it to keep it).
        Default: the one :meth:`evaluate` gave there.
        """
        return self._tangent

    def answer_key(self) -> object | None:
        """What the law's answer depends on besides F̄, or None.

        Equal keys promise equal P̄ and Ā at equal F̄, whatever was evaluated or committed in between: a caller may
        keep an answer it has (the macro Newton does at a load step's first iterate, the last step's converged
        state). None (default): no such promise, e.g. a law with history or with time dependence.
        """
        return None

    def commit(self) -> None:
        """Accept the trial states of the last evaluation (the load step converged). Default: no state."""
        return None

    def rollback(self) -> None:
        """Return to the last committed states (the load step was rejected). Default: no state."""
        return None

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The committed state as named arrays, for run checkpoints. Default: no state (empty)."""
        return {}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore a committed state saved by :meth:`state_arrays`. Default: nothing to restore."""
        return None

    def cell_quantities(self) -> list[CellQuantities] | None:
        """Cell-level quantities of every point of the last evaluation, or None when the law computes none."""
        return None

    def finish_step(self) -> None:
        """The load step is complete (all its sub-steps committed): close per-step statistics. Default: nothing."""
        return None

    def log_writers(self) -> list:
        """The log writers the law appends to (flushed collectively before every run checkpoint). Default: none."""
        return []

    def rve_work(self) -> dict | None:
        """How the RVE work was spread over the ranks (laws with an RVE farm); None: no RVE solves per point."""
        return None

    def surrogate_mask(self) -> np.ndarray | None:
        """Which points of the last evaluation a surrogate answered (True) or an RVE (False); None: no surrogate."""
        return None

    def close(self) -> None:
        """Flush and release what the law holds open (log parts). Default: nothing."""
        return None


class FormLaw(ABC):
    """A law the macro problem integrates exactly in UFL (single-scale and direct numerical simulation runs).

    Attributes:
        dim: 2 or 3.
        kinematics: ``finite`` (hyperelastic energies) or ``small`` (linear stiffness).
        phases: macro phase tags the law has a material for (``(0,)``: one material everywhere).
    """

    dim: int
    kinematics: str
    phases: tuple[int, ...]

    @abstractmethod
    def energy_form(self, F: Any, tag: int) -> Any:
        """Strain energy density W(F̄) of phase ``tag`` as UFL (finite strain), from the 2D or 3D UFL gradient F."""

    @abstractmethod
    def stress_form(self, F: Any, tag: int) -> Any:
        """First Piola stress of phase ``tag`` as UFL: ∂W/∂F (finite) or C : sym(F − I) (small)."""
