"""Constitutive laws at macro quadrature points, all behind one contract.

A law maps a batch of macro deformation gradients F̄ (n, d, d) to the first Piola stress P̄ (n, d, d)
and the consistent tangent Ā = ∂P̄/∂F̄ (n, d, d, d, d), float64. Laws with internal state (warm
starts) keep a trial state per point during a load step and expose ``commit()`` (step converged)
and ``rollback()`` (step rejected). ``stats`` accumulates evaluation counts and wall time.

- :class:`RVELaw`: nested FE², one :class:`~fe2ml.micro.finite.HyperelasticRVE` per rank (COMM_SELF)
  reused for every point of the rank.
- :class:`LinearRVELaw`: small strain, P̄ = C̄ : sym(F̄ − I), Ā = C̄ from a :class:`~fe2ml.micro.linear.LinearRVE`.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from fe2ml.errors import Fe2mlError, SolverError

__all__ = ["ConstitutiveLaw", "LinearRVELaw", "PointFailure", "RVELaw"]


class PointFailure(SolverError):
    """A constitutive evaluation failed at local point ``index``."""

    def __init__(self, msg: str, index: int):
        super().__init__(msg)
        self.index = index


class ConstitutiveLaw(Protocol):
    """The constitutive contract used by :class:`fe2ml.macro.problem.MacroProblem`."""

    dim: int
    kinematics: str
    stats: dict

    def evaluate(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """F̄ (n, d, d) -> (P̄ (n, d, d), Ā (n, d, d, d, d))."""
        ...

    def commit(self) -> None:
        """Accept the trial states of the last evaluation (converged load step)."""
        ...

    def rollback(self) -> None:
        """Return to the last committed states (rejected load step)."""
        ...


class LinearRVELaw:
    """Small-strain law from a linear RVE: C̄ computed once.

    Args:
        rve: a :class:`fe2ml.micro.linear.LinearRVE`.
    """

    kinematics = "small"

    def __init__(self, rve, *, recorder=None):
        t0 = time.perf_counter()
        self.rve = rve
        self.recorder = recorder
        self.C = rve.homogenize().C
        self.dim = rve.d
        self.stats = {"evaluations": 0, "rve_solves": 1, "time_s": time.perf_counter() - t0, "max_point_s": 0.0}

    def evaluate(self, F):
        """P̄ = C̄ : sym(F̄ − I), Ā = C̄ for every point."""
        t0 = time.perf_counter()
        H = F - np.eye(self.dim)
        eps = 0.5 * (H + H.transpose(0, 2, 1))
        P = np.einsum("ijkl,nkl->nij", self.C, eps)
        A = np.broadcast_to(self.C, (len(F),) + self.C.shape).copy()
        self.stats["evaluations"] += len(F)
        self.stats["time_s"] += time.perf_counter() - t0
        if self.recorder is not None:
            self.recorder(F, P, A, None)
        return P, A

    def commit(self):
        """No state (forwards to the recorder)."""
        if hasattr(self.recorder, "commit"):
            self.recorder.commit()

    def rollback(self):
        """No state (forwards to the recorder)."""
        if hasattr(self.recorder, "rollback"):
            self.recorder.rollback()


class RVELaw:
    """Nested FE² law: every point is a finite-strain RVE solve on this rank's RVE.

    Args:
        rve: a :class:`fe2ml.micro.finite.HyperelasticRVE` (built once on COMM_SELF).
        warm_start: start each RVE solve from the point's last state (trial state within a load
            step, committed state at the start of a step) instead of F̄ = I.
        recorder: optional callable ``recorder(F, P, A, cells)`` called with every evaluated batch.
        cells: compute cell-level quantities for every solve (passed to ``recorder``).
    """

    kinematics = "finite"

    def __init__(self, rve, *, warm_start: bool = True, recorder=None, cells: bool = False):
        self.rve = rve
        self.dim = rve.d
        self.warm_start = warm_start
        self.recorder = recorder
        self.cells = cells
        self.committed: list | None = None
        self.trial: list | None = None
        self.last_cells: list | None = None
        self.stats = {"evaluations": 0, "rve_solves": 0, "time_s": 0.0, "newton_its": 0, "substeps": 0,
                      "max_point_s": 0.0}

    def evaluate(self, F):
        """Solve the RVE at every F̄[k]; raises :class:`PointFailure` naming the first failing point."""
        n = len(F)
        d = self.dim
        if self.committed is None or len(self.committed) != n:
            self.committed = [None] * n
            self.trial = [None] * n
        P = np.zeros((n, d, d))
        A = np.zeros((n, d, d, d, d))
        cells = [] if self.cells else None
        its_pt = np.zeros(n, dtype=np.int32)
        t_all = time.perf_counter()
        for k in range(n):
            t0 = time.perf_counter()
            start = None
            if self.warm_start:
                start = self.trial[k] if self.trial[k] is not None else self.committed[k]
            try:
                state, its, steps, R = self.rve.solve(F[k], start, point=k)
                P[k], A[k] = self.rve.homogenized(R)
            except Fe2mlError as e:
                raise PointFailure(str(e), k) from None
            if self.cells:
                cells.append(self.rve.cell_quantities())
            self.trial[k] = state if self.warm_start else None
            its_pt[k] = its
            self.stats["newton_its"] += its
            self.stats["substeps"] += steps
            self.stats["max_point_s"] = max(self.stats["max_point_s"], time.perf_counter() - t0)
        self.stats["evaluations"] += n
        self.stats["rve_solves"] += n
        self.stats["time_s"] += time.perf_counter() - t_all
        self.last_cells = cells
        if self.recorder is not None:
            try:
                self.recorder(F, P, A, cells, its_pt)
            except TypeError:
                self.recorder(F, P, A, cells)
        return P, A

    def state_arrays(self) -> dict:
        """Committed warm-start states as arrays (for run checkpoints)."""
        c = self.committed or []
        have = np.array([s is not None for s in c], dtype=bool)
        z = [s.z for s in c if s is not None]
        return {"have": have, "F": np.array([s.F for s in c if s is not None]).reshape(-1, self.dim, self.dim),
                "z": np.array(z).reshape(len(z), -1), "lam": np.array([s.lam for s in c if s is not None])
                .reshape(len(z), -1)}

    def load_state_arrays(self, a: dict) -> None:
        """Restore committed states saved by :meth:`state_arrays`."""
        from fe2ml.micro.finite import RVEState

        it = iter(range(len(a["z"])))
        self.committed = []
        for h in a["have"]:
            if h:
                j = next(it)
                self.committed.append(RVEState(F=a["F"][j].copy(), z=a["z"][j].copy(), lam=a["lam"][j].copy()))
            else:
                self.committed.append(None)
        self.trial = list(self.committed)

    def commit(self):
        """Accept the trial states."""
        if self.trial is not None:
            self.committed = list(self.trial)
        if hasattr(self.recorder, "commit"):
            self.recorder.commit()

    def rollback(self):
        """Discard the trial states."""
        if self.committed is not None:
            self.trial = list(self.committed)
        if hasattr(self.recorder, "rollback"):
            self.recorder.rollback()
