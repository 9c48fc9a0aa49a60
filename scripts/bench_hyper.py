"""Benchmark the finite-strain RVE; prints its figures (JSON with --json).

Figures:
  * Newton iterations and time per finite-strain solve (20 % uniaxial stretch, from F̄ = I) for a 2D
    RVE (~5k dofs) and a 3D RVE (~20k dofs), with the homogenized tangent;
  * ratio of that time to (Newton iterations + 1) x the bare PETSc assemble(K) + PᵀKP + factor +
    solve of the same system (the +1 is the factorization at the converged state that the
    consistent tangent needs);
  * batched evaluation of 200 points on one rank: time per point for the first and last 20 points,
    and for n = 20 vs n = 200 (no per-point setup).

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_hyper.py [--json OUT.json] [--n-batch 200]
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

# isort: off
import fe2ml  # noqa: F401  (the pip wheel's dolfinx_solver must load before petsc4py)
from petsc4py import PETSc
import dolfinx.fem.petsc
# isort: on
from fe2ml.materials import NeoHookean
from fe2ml.micro.finite import HyperelasticRVE
from fe2ml.micro.geometry import generate_mesh
from fe2ml.micro.mesh import read_mesh


def bare_iteration(rve, reps=5):
    """assemble K + PᵀKP + MUMPS factor + one solve, on the RVE's compiled Jacobian form."""
    K = dolfinx.fem.petsc.assemble_matrix(rve.Kt_form)
    K.assemble()
    Kr = K.PtAP(rve.T)
    ksp = PETSc.KSP().create(PETSc.COMM_SELF)
    ksp.setType("preonly")
    ksp.getPC().setType("cholesky")
    ksp.getPC().setFactorSolverType("mumps")
    b, x = Kr.createVecs()
    b.set(1.0)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        K.zeroEntries()
        dolfinx.fem.petsc.assemble_matrix(K, rve.Kt_form)
        K.assemble()
        K.PtAP(rve.T, result=Kr)
        Kr.setOption(PETSc.Mat.Option.SYMMETRIC, True)
        ksp.setOperators(Kr)
        ksp.setUp()
        ksp.solve(b, x)
        ts.append(time.perf_counter() - t0)
    ksp.destroy()
    return float(np.min(ts))


def case(name, gen, params, mats, tmp, dim):
    mesh = read_mesh(generate_mesh(gen, params, tmp))
    rve = HyperelasticRVE(mesh, mats, formulation="displacement")
    F = np.eye(dim)
    F[0, 0] = 1.2
    rve.evaluate(F, cells=False)  # warm-up
    ts, its = [], None
    for _ in range(3):
        res = rve.evaluate(F, cells=False)
        ts.append(res.time_s[0])
        its = int(res.iterations[0])
    t = min(ts)
    tb = bare_iteration(rve)
    ratio = t / ((its + 1) * tb)
    print(f"{name}: {rve.ndofs:6d} dofs | {its} Newton iterations | {t * 1e3:8.1f} ms per solve incl. tangent | "
          f"bare iteration {tb * 1e3:7.1f} ms | ratio to (its+1) x bare {ratio:4.2f} (floor 1.5)", flush=True)
    return rve, dict(case=name, ndofs=rve.ndofs, newton_iterations=its, time_per_solve_s=t, bare_iteration_s=tb,
                     ratio=ratio)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--n-batch", type=int, default=200)
    args = ap.parse_args()
    mats = {1: NeoHookean(mu=10.0, K=30.0), 2: NeoHookean(mu=1.0, K=5.0)}
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}", "cases": []}
    print(f"fe2ml finite-strain RVE benchmark on {out['machine']} (1 rank)")
    with tempfile.TemporaryDirectory() as tmp:
        rve2, r = case("2D", "cells_2d", dict(n_cells=8, volume_fraction=0.3, aspect=1.4, seed=1, h=0.023), mats,
                       tmp, 2)
        out["cases"].append(r)
        _, r = case("3D", "cells_3d", dict(n_cells=4, volume_fraction=0.2, seed=1, h=0.058), mats, tmp, 3)
        out["cases"].append(r)
        rng = np.random.default_rng(0)
        n = args.n_batch
        Fs = np.eye(2) + rng.uniform(-0.1, 0.1, (n, 2, 2))
        t0 = time.perf_counter()
        res = rve2.evaluate(Fs[:20], cells=True)
        t20 = (time.perf_counter() - t0) / 20
        t0 = time.perf_counter()

        def prog(k, m):
            if k % 50 == 0:
                print(f"  batch: {k}/{m} points", flush=True)

        res = rve2.evaluate(Fs, cells=True, progress=prog)
        tn = (time.perf_counter() - t0) / n
        first, last = res.time_s[:20].mean(), res.time_s[-20:].mean()
        its_f, its_l = res.iterations[:20].mean(), res.iterations[-20:].mean()
        print(f"  batch of {n} (2D, random |F̄-I| <= 0.1, cell quantities on): {tn * 1e3:.1f} ms/point; n=20: "
              f"{t20 * 1e3:.1f} ms/point; first 20: {first * 1e3:.1f} ms ({its_f:.1f} its), last 20: "
              f"{last * 1e3:.1f} ms ({its_l:.1f} its)")
        out["batch"] = dict(n=n, per_point_s=tn, per_point_n20_s=t20, first20_s=first, last20_s=last)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
