"""RVE laws: nested FE² (a finite-strain RVE solve per point) and the small-strain law of a linear RVE's C̄.

Each rank builds one RVE on ``MPI.COMM_SELF`` (:func:`build_rank_rve`) and reuses it for every point it owns; the law
keeps one warm-start state per point. Evaluations are reported to an optional recorder
(:class:`fe2ml.data.recorder.Recorder`) given at construction.
"""

from __future__ import annotations

import time

import numpy as np

from fe2ml.data.recorder import Recorder
from fe2ml.laws.base import ConstitutiveLaw, PointFailure
from fe2ml.laws.farm import RVEFarm
from fe2ml.micro.config import HomogenizeConfig, build_rve, load_rve_mesh
from fe2ml.micro.finite import HyperelasticRVE, RVEState
from fe2ml.micro.linear import LinearRVE
from fe2ml.micro.mesh import RVEMesh
from fe2ml.micro.quantities import CellQuantities
from fe2ml.parallel import collective

__all__ = ["LinearRVELaw", "RVELaw", "build_rank_rve", "rve_law"]


def build_rank_rve(comm, rcfg: HomogenizeConfig) -> tuple[LinearRVE | HyperelasticRVE, RVEMesh]:
    """This rank's RVE solver (on ``MPI.COMM_SELF``) for an RVE config; rank 0 generates the mesh (collective).

    Returns:
        (rve, rve_mesh)
    """
    mesh = collective(comm, lambda: load_rve_mesh(rcfg, comm=comm))
    return collective(comm, lambda: build_rve(rcfg, mesh)), mesh


def rve_law(rve: LinearRVE | HyperelasticRVE, *, warm_start: bool = True, recorder: Recorder | None = None,
            cells: bool = False, comm=None, balance: bool = True) -> ConstitutiveLaw:
    """The law of an RVE solver: :class:`RVELaw` for a finite-strain RVE, :class:`LinearRVELaw` for a linear one."""
    if isinstance(rve, HyperelasticRVE):
        return RVELaw(rve, warm_start=warm_start, recorder=recorder, cells=cells, comm=comm, balance=balance)
    return LinearRVELaw(rve, recorder=recorder)


class LinearRVELaw(ConstitutiveLaw):
    """Small-strain law from a linear RVE: C̄ computed once, P̄ = C̄ : sym(F̄ − I), Ā = C̄.

    Args:
        rve: a :class:`fe2ml.micro.linear.LinearRVE`.
        recorder: optional recorder of every evaluated batch.
    """

    def __init__(self, rve: LinearRVE, *, recorder: Recorder | None = None):
        super().__init__(rve.d, "small")
        t0 = time.perf_counter()
        self.rve = rve
        self.recorder = recorder
        self.C = rve.homogenize().C
        self.stats["rve_solves"] = 1
        self.stats["time_s"] = time.perf_counter() - t0

    def evaluate(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P̄ = C̄ : sym(F̄ − I), Ā = C̄ for every point."""
        t0 = time.perf_counter()
        H = F - np.eye(self.dim)
        eps = 0.5 * (H + H.transpose(0, 2, 1))
        P = np.einsum("ijkl,nkl->nij", self.C, eps)
        A = np.broadcast_to(self.C, (len(F),) + self.C.shape).copy()
        self.stats["evaluations"] += len(F)
        self.stats["time_s"] += time.perf_counter() - t0
        if self.recorder is not None:
            self.recorder.record(F, P, A, None, None)
        return P, A

    def commit(self) -> None:
        """No state of its own; the recorder writes the step."""
        if self.recorder is not None:
            self.recorder.commit()

    def rollback(self) -> None:
        """No state of its own; the recorder drops the step."""
        if self.recorder is not None:
            self.recorder.rollback()


class RVELaw(ConstitutiveLaw):
    """Nested FE² law: every point is a finite-strain RVE solve on this rank's RVE.

    Args:
        rve: a :class:`fe2ml.micro.finite.HyperelasticRVE` (built once on COMM_SELF).
        warm_start: start each RVE solve from the point's last state (trial state within a load
            step, committed state at the start of a step) instead of F̄ = I.
        recorder: optional recorder of every evaluated batch (with cell quantities when ``cells``).
        cells: compute cell-level quantities for every solve.
        comm: the macro communicator; with it (and ``balance``) every evaluation spreads the solves over the ranks by
            the last measured solve time of each point (:class:`fe2ml.laws.farm.RVEFarm`). Collective then.
        balance: redistribute the solves (with ``comm``).
    """

    def __init__(self, rve: HyperelasticRVE, *, warm_start: bool = True, recorder: Recorder | None = None,
                 cells: bool = False, comm=None, balance: bool = True):
        super().__init__(rve.d, "finite")
        self.rve = rve
        self.farm = RVEFarm(rve, comm, balance=balance)
        self.cost = np.zeros(0)  # last solve time of each point (the farm's cost estimate)
        self.warm_start = warm_start
        self.recorder = recorder
        self.cells = cells
        self.committed: list[RVEState | None] = []
        self.trial: list[RVEState | None] = []
        self.last_cells: list[CellQuantities] | None = None

    def evaluate(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Solve the RVE at every F̄[k]; raises :class:`PointFailure` naming the first failing point."""
        n = len(F)
        d = self.dim
        if len(self.committed) != n:
            self.committed = [None] * n
            self.trial = [None] * n
        P = np.zeros((n, d, d))
        A = np.zeros((n, d, d, d, d))
        if len(self.cost) != n:
            self.cost = np.full(n, self.farm.default_cost(cold=True))
        its_pt = np.zeros(n, dtype=np.int32)
        t_all = time.perf_counter()
        starts: list[RVEState | None] = [None] * n
        if self.warm_start:
            starts = [self.trial[k] if self.trial[k] is not None else self.committed[k] for k in range(n)]
        results = self.farm.solve(F, starts, self.cost, cells=self.cells)
        failed = next((k for k, r in enumerate(results) if r.error is not None), None)
        if failed is not None:
            raise PointFailure(str(results[failed].error), failed)
        for k, r in enumerate(results):
            P[k], A[k] = r.P, r.A
            self.trial[k] = r.state if self.warm_start else None
            its_pt[k] = r.iterations
            self.cost[k] = r.time_s
            self.stats["newton_its"] += r.iterations
            self.stats["substeps"] += r.substeps
            self.stats["max_point_s"] = max(self.stats["max_point_s"], r.time_s)
        cells = [r.cells for r in results if r.cells is not None] if self.cells else None
        self.stats["evaluations"] += n
        self.stats["rve_solves"] += n
        self.stats["time_s"] += time.perf_counter() - t_all
        # this rank's RVE time by phase (assembly, factorization or preconditioner, solves, the farm's collectives
        # with the waiting for other ranks in them), over the run
        self.stats["rve_phases"] = {**{k: self.rve.stats[k] for k in ("assemble_s", "factor_s", "solve_s")},
                                    "exchange_s": self.farm.exchange_s}
        self.last_cells = cells
        if self.recorder is not None:
            self.recorder.record(F, P, A, cells, its_pt)
        return P, A

    def answer_key(self) -> object | None:
        """The law's key: a hyperelastic RVE has no history, so its answer at a converged F̄ holds.

        A new solve there would start from the converged state itself (its warm start), find its residual within
        the tolerance at once, and give the same P̄ and Ā; the macro Newton then skips that round of solves at a
        step's first iterate. None where the log keeps every Newton iterate (``all_iterations``: each must be there).
        """
        if self.recorder is not None and getattr(self.recorder, "all_iterations", False):
            return None
        return ("rve", id(self))

    def rve_work(self) -> dict | None:
        """The farm's RVE work balance over the ranks (:meth:`fe2ml.laws.farm.RVEFarm.balance_report`)."""
        return self.farm.balance_report()

    def cell_quantities(self) -> list[CellQuantities] | None:
        """Cell quantities of the last evaluation (with ``cells=True``)."""
        return self.last_cells

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Committed warm-start states as arrays (for run checkpoints)."""
        c = self.committed
        have = np.array([s is not None for s in c], dtype=bool)
        states = [s for s in c if s is not None]  # none without warm starts

        def stack(key, width):
            return np.array([getattr(s, key) for s in states]).reshape(len(states), width) if states else \
                np.zeros((0, width))

        return {"have": have, "F": stack("F", self.dim**2).reshape(-1, self.dim, self.dim),
                "z": stack("z", states[0].z.size if states else 0),
                "lam": stack("lam", states[0].lam.size if states else 0)}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore committed states saved by :meth:`state_arrays`."""
        if "have" not in arrays:
            return
        it = iter(range(len(arrays["z"])))
        self.committed = []
        for h in arrays["have"]:
            if h:
                j = next(it)
                self.committed.append(RVEState(F=arrays["F"][j].copy(), z=arrays["z"][j].copy(),
                                               lam=arrays["lam"][j].copy()))
            else:
                self.committed.append(None)
        self.trial = list(self.committed)

    def commit(self) -> None:
        """Accept the trial states; the recorder writes the step."""
        self.committed = list(self.trial)
        if self.recorder is not None:
            self.recorder.commit()

    def rollback(self) -> None:
        """Discard the trial states; the recorder drops the step."""
        self.trial = list(self.committed)
        if self.recorder is not None:
            self.recorder.rollback()
