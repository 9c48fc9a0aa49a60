"""Direct (MUMPS) against iterative (CG + GAMG) RVE solves on a 3D cells-in-matrix RVE.

One finite-strain evaluation (Newton to convergence, then P̄ and Ā from 9 tangent right-hand sides) of a 3D
`centred_cell` RVE at mesh size `--h`, with each solver. The time of the set-up (forms, reduction) and of the
evaluation, and P̄11 for both solvers (equal within the iterative tolerance), are printed.

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_rve_solver.py [--h 0.04]
"""

import argparse
import tempfile
import time

from mpi4py import MPI

import numpy as np

import fe2ml  # noqa: F401
from fe2ml.materials import NeoHookean
from fe2ml.micro.finite import HyperelasticRVE
from fe2ml.micro.geometry import generate_mesh
from fe2ml.micro.mesh import read_mesh
from fe2ml.micro.reduction import SolverOptions


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--h", type=float, default=0.04)
    args = ap.parse_args()
    m = read_mesh(generate_mesh("centred_cell", dict(dim=3, volume_fraction=0.15, h=args.h), tempfile.mkdtemp(),
                                comm=MPI.COMM_SELF))
    mats = {1: NeoHookean(mu=1.0, K=3.0), 2: NeoHookean(mu=6.0, K=15.0)}
    F = np.array([[1.1, 0.04, 0.0], [0.0, 0.96, 0.05], [0.02, 0.0, 1.03]])
    for kind in ("iterative", "direct"):
        t0 = time.perf_counter()
        rve = HyperelasticRVE(m, mats, solver=SolverOptions(type=kind))
        t1 = time.perf_counter()
        res = rve.evaluate(F, cells=False)
        t2 = time.perf_counter()
        print(f"{kind:>9}: {rve.ndofs} dofs, set-up {t1 - t0:.2f} s, one finite-strain evaluation {t2 - t1:.2f} s, "
              f"P̄11 = {res.P[0][0, 0]:.10f}", flush=True)


if __name__ == "__main__":
    main()
