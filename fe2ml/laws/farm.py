"""The RVE farm: the RVE solves of one Newton iteration, spread over the ranks by their expected cost.

The points a rank must solve with its RVE (all its points in nested FE², the flagged ones in a hybrid run) are owned
by the rank of their macro cell. When they cluster in space, or when some points cost more than others, a static
partition leaves most ranks waiting for one. :class:`RVEFarm` redistributes them at every evaluation (collective):

1. every rank announces the expected cost of each of its jobs (the last measured solve time of the point, else the
   mean so far) with one ``allgather``;
2. every rank computes the same assignment (:func:`assign`): each rank keeps its own jobs up to the mean work per
   rank, the surplus goes, largest first, to the least loaded rank;
3. one ``alltoall`` sends F̄ and the warm-start state of each moved job, the receiver solves it on its own copy of the
   RVE (every rank holds the same RVE; a job with microstructure parameters, in a hybrid run with a field of them,
   travels with them and is solved on the receiver's RVE of those parameters), and a second ``alltoall`` returns P̄,
   Ā, the new state, the iteration counts, the solve time and the cell quantities.

An RVE solve depends only on F̄ and its start state, so the answers do not depend on which rank solved them, nor on
the number of ranks. A failed solve travels back as a message; the owner raises it after the exchange, so a failure
never leaves a rank waiting in a collective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fe2ml.errors import Fe2mlError
from fe2ml.micro.finite import HyperelasticRVE, RVEState
from fe2ml.micro.quantities import CellQuantities

__all__ = ["RVEFarm", "SolveResult", "assign"]


@dataclass
class SolveResult:
    """The outcome of one RVE solve (``error`` set when it failed; the other fields are then empty)."""

    P: np.ndarray | None
    A: np.ndarray | None
    state: RVEState | None
    iterations: int
    substeps: int
    time_s: float
    cells: CellQuantities | None
    error: str | None = None


def assign(weights: list[np.ndarray]) -> list[np.ndarray]:
    """The rank that solves each job, from the expected cost of every rank's jobs (deterministic).

    Each rank keeps its own jobs, in order, while its load stays within the mean load per rank; the others are
    handed out largest first (ties: lowest owner rank, lowest index) to the rank with the least load so far (ties:
    lowest rank).

    Args:
        weights: per rank, the expected cost of each of its jobs (>= 0).

    Returns:
        Per rank, the destination rank of each of its jobs.
    """
    size = len(weights)
    total = float(sum(np.sum(w) for w in weights))
    target = total / size if size else 0.0
    load = np.zeros(size)
    dest = [np.full(len(w), -1, dtype=np.int64) for w in weights]
    pool = []
    for r, w in enumerate(weights):
        for k, wk in enumerate(np.asarray(w, dtype=np.float64)):
            if load[r] + wk <= target * (1 + 1e-12):
                dest[r][k] = r
                load[r] += wk
            else:
                pool.append((-wk, r, k))
    for negw, r, k in sorted(pool):
        to = int(np.argmin(load))
        dest[r][k] = to
        load[to] -= negw
    return dest


class RVEFarm:
    """Solves the RVE jobs of all ranks, balanced over the ranks (collective :meth:`solve`).

    Args:
        rve: this rank's finite-strain RVE (the same RVE on every rank).
        comm: the macro communicator; None (or one rank, or ``balance=False``): every rank solves its own jobs.
        balance: redistribute the jobs by expected cost.
        family: this rank's :class:`~fe2ml.micro.family.RVEFamily`, for jobs that carry their microstructure
            parameters (a hybrid run with a field of parameters): such a job is solved on the family's RVE of its
            parameters, on whichever rank.

    Attributes:
        work: accumulated RVE work of the run over all evaluations, summed over evaluations of the max and the mean
            over ranks, both of the jobs each rank owns (``owned_*``: what a static partition would cost) and of the
            jobs each rank solved (``solved_*``). :meth:`balance_report` turns them into max/mean ratios.
    """

    def __init__(self, rve: HyperelasticRVE, comm=None, *, balance: bool = True, family=None):
        self.rve = rve
        self.family = family
        self.comm = comm
        self.balance = bool(balance and comm is not None and comm.size > 1)
        self.work = {"owned_max": 0.0, "owned_mean": 0.0, "solved_max": 0.0, "solved_mean": 0.0}
        size = comm.size if comm is not None else 1
        self.owned_per_rank = np.zeros(size)  # RVE seconds of the jobs each rank owned, over the run
        self.solved_per_rank = np.zeros(size)  # RVE seconds each rank solved
        self.moved = 0  # jobs this rank owned that another rank solved
        self.exchange_s = 0.0  # seconds in the collectives (moving jobs and results, waiting for the other ranks)
        self._mean_t = {True: 0.0, False: 0.0}  # mean solve time so far, from F̄ = I (True) and warm-started
        self._n_t = {True: 0, False: 0}

    def default_cost(self, cold: bool = False) -> float:
        """The expected cost of a job with no measured time: this rank's mean solve time so far, of its kind.

        ``cold``: solves from F̄ = I (they substep from the identity), else warm-started ones; the other kind's mean
        when this kind has none yet, and 1 before any solve.
        """
        for kind in (cold, not cold):
            if self._n_t[kind]:
                return self._mean_t[kind]
        return 1.0

    def _solve_one(self, F: np.ndarray, start: RVEState | None, point: int, cells: bool,
                   p: np.ndarray | None = None) -> SolveResult:
        t0 = time.perf_counter()
        try:
            rve = self.rve if p is None else self.family.rve(p)
            state, its, steps, R = rve.solve(F, start, point=point)
            P, A = rve.homogenized(R)
            cq = rve.cell_quantities() if cells else None
        except Fe2mlError as e:
            return SolveResult(None, None, None, 0, 0, time.perf_counter() - t0, None, error=str(e))
        dt = time.perf_counter() - t0
        cold = start is None
        self._n_t[cold] += 1
        self._mean_t[cold] += (dt - self._mean_t[cold]) / self._n_t[cold]
        return SolveResult(P, A, state, int(its), int(steps), dt, cq)

    def solve(self, F: np.ndarray, starts: list[RVEState | None], cost: np.ndarray | None = None, *,
              cells: bool = False, points: np.ndarray | None = None,
              params: np.ndarray | None = None) -> list[SolveResult]:
        """Solve the RVE at every F̄[k] of this rank from ``starts[k]`` (collective when balancing).

        Args:
            F: this rank's jobs, (n, d, d) (n may be 0).
            starts: warm-start state of each job (None: from F̄ = I).
            cost: expected cost of each job (default: :meth:`default_cost` of its kind of start).
            cells: also return the cell quantities of each solve.
            points: the owner's index of each job, for messages (default 0..n-1).
            params: the microstructure parameters of each job (n, k), solved on the family's RVE of those parameters
                (default: every job on ``rve``).

        Returns:
            One :class:`SolveResult` per job, in order.
        """
        n = len(F)
        pid = np.arange(n) if points is None else np.asarray(points)
        if cost is None:
            cost = np.array([self.default_cost(cold=s is None) for s in starts])
        cost = np.asarray(cost, dtype=np.float64)
        if params is not None and self.family is None:
            raise ValueError("RVEFarm.solve: jobs with parameters need a farm with an RVE family")
        pk = [None] * n if params is None else [np.asarray(params[k], dtype=np.float64) for k in range(n)]
        if not self.balance:
            own = [self._solve_one(F[k], starts[k], int(pid[k]), cells, pk[k]) for k in range(n)]
            solved = sum(r.time_s for r in own)
            self._account(solved, solved)
            return own
        comm = self.comm
        t0 = time.perf_counter()
        dest = assign(comm.allgather(cost))[comm.rank]
        send: list[list] = [[] for _ in range(comm.size)]
        for k in range(n):
            send[int(dest[k])].append((k, F[k], starts[k], int(pid[k]), pk[k]))
        self.moved += int(np.sum(dest != comm.rank))
        recv = comm.alltoall(send)
        self.exchange_s += time.perf_counter() - t0
        back = [[(k, self._solve_one(Fk, s, q, cells, pv)) for k, Fk, s, q, pv in jobs] for jobs in recv]
        solved = sum(res.time_s for jobs in back for _, res in jobs)
        t0 = time.perf_counter()
        got = comm.alltoall(back)
        self.exchange_s += time.perf_counter() - t0
        by_index = {k: res for jobs in got for k, res in jobs}  # every job comes back once
        results = [by_index[k] for k in range(n)]
        self._account(sum(r.time_s for r in results), solved)
        return results

    def _account(self, owned: float, solved: float) -> None:
        if self.comm is None or self.comm.size == 1:
            pairs = np.array([[owned, solved]])
        else:
            t0 = time.perf_counter()
            pairs = np.array(self.comm.allgather((owned, solved)))
            self.exchange_s += time.perf_counter() - t0
        self.owned_per_rank += pairs[:, 0]
        self.solved_per_rank += pairs[:, 1]
        self.work["owned_max"] += float(pairs[:, 0].max())
        self.work["owned_mean"] += float(pairs[:, 0].mean())
        self.work["solved_max"] += float(pairs[:, 1].max())
        self.work["solved_mean"] += float(pairs[:, 1].mean())

    def balance_report(self) -> dict:
        """RVE work max/mean over ranks, summed over evaluations, and each rank's total RVE seconds.

        ``unbalanced``: each rank its own points (what a static partition costs); ``balanced``: as solved.
        """
        w = self.work

        def ratio(mx, mean):
            return float(mx / mean) if mean > 0 else 1.0

        return {"balanced": self.balance, "unbalanced_max_over_mean": ratio(w["owned_max"], w["owned_mean"]),
                "balanced_max_over_mean": ratio(w["solved_max"], w["solved_mean"]),
                "owned_per_rank_s": self.owned_per_rank.tolist(), "solved_per_rank_s": self.solved_per_rank.tolist()}
