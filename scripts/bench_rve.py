"""Benchmark the small-strain RVE engine; prints its figures (and writes JSON with --json).

Figures:
  * overhead ratio: one full homogenization (assembly, P^T K P, factorisation, all unit load cases,
    averaging) over the bare PETSc assemble + P^T K P + factor + solves of the same system, side by side;
  * homogenizations per second per core for a 2D RVE (~5k dofs) and a 3D RVE (~20k dofs);
  * memory (RSS) over 1000 consecutive homogenizations and 1000 fluctuation fields for random strains.

Usage: .venv/bin/python scripts/bench_rve.py [--json OUT.json] [--n-mem 1000]
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
from mpi4py import MPI
from petsc4py import PETSc
import dolfinx.fem.petsc
# isort: on
from fe2ml.materials import LinearElastic
from fe2ml.micro.geometry import generate_mesh
from fe2ml.micro.linear import LinearRVE
from fe2ml.micro.mesh import read_mesh


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bare(rve, reps):
    """Bare PETSc: assemble K, PtAP, MUMPS Cholesky, m solves (forms and P prebuilt)."""
    times = []
    K = dolfinx.fem.petsc.assemble_matrix(rve.a_form)
    K.assemble()
    Kr = None
    m = rve.U.shape[1]
    b = None
    ksp = PETSc.KSP().create(PETSc.COMM_SELF)  # created once, as a hand-written code would
    ksp.setType("preonly")
    ksp.getPC().setType("cholesky")
    ksp.getPC().setFactorSolverType("mumps")
    for _ in range(reps):
        t0 = time.perf_counter()
        K.zeroEntries()
        dolfinx.fem.petsc.assemble_matrix(K, rve.a_form)
        K.assemble()
        Kr = K.PtAP(rve.T) if Kr is None else K.PtAP(rve.T, result=Kr)
        Kr.setOption(PETSc.Mat.Option.SPD, True)
        ksp.setOperators(Kr)
        ksp.setUp()
        if b is None:
            b, x = Kr.createVecs()
        for a in range(m):
            b.array[:] = a + 1.0
            ksp.solve(b, x)
        times.append(time.perf_counter() - t0)
    ksp.destroy()
    return float(np.median(times))


def fe2ml_time(rve, reps):
    times = []
    for _ in range(reps):
        times.append(rve.homogenize().time_s)
    return float(np.median(times))


def case(name, gen, params, mats, reps, tmp):
    t0 = time.perf_counter()
    mesh = read_mesh(generate_mesh(gen, params, tmp))
    rve = LinearRVE(mesh, mats)
    setup = time.perf_counter() - t0
    rve.homogenize()  # warm-up (symbolic PtAP, MUMPS analysis)
    bare(rve, 1)
    # interleave to share machine noise
    tb, tf = [], []
    for _ in range(3):
        tb.append(bare(rve, reps))
        tf.append(fe2ml_time(rve, reps))
    tb, tf = min(tb), min(tf)
    r = dict(case=name, ndofs=rve.ndofs, setup_s=setup, bare_s=tb, fe2ml_s=tf, ratio=tf / tb,
             homogenizations_per_s_per_core=1.0 / tf)
    print(f"{name:>4}: {rve.ndofs:6d} dofs | setup (mesh + forms) {setup:6.2f} s | bare PETSc {tb * 1e3:7.1f} ms | "
          f"fe2ml homogenize {tf * 1e3:7.1f} ms | ratio {tf / tb:4.2f} (floor 1.5) | "
          f"{1 / tf:6.1f} homogenizations/s/core", flush=True)
    return rve, r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--n-mem", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    assert MPI.COMM_WORLD.size == 1, "run serially: figures are per core"
    mats = {1: LinearElastic(E=10.0, nu=0.45), 2: LinearElastic(E=1.0, nu=0.3)}
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"Python {sys.version.split()[0]}, dolfinx {dolfinx.__version__}", "cases": []}
    print(f"fe2ml RVE benchmark on {out['machine']} (1 rank, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    with tempfile.TemporaryDirectory() as tmp:
        rve2, r = case("2D", "cells_2d", dict(n_cells=8, volume_fraction=0.3, aspect=1.4, seed=1, h=0.023), mats,
                       args.reps, tmp)
        out["cases"].append(r)
        _, r = case("3D", "cells_3d", dict(n_cells=4, volume_fraction=0.2, seed=1, h=0.058), mats, args.reps,
                    tmp)
        out["cases"].append(r)
        # memory over repeated homogenizations / fluctuation fields with different strains
        rng = np.random.default_rng(0)
        n = args.n_mem
        rss = []
        t0 = time.perf_counter()
        for k in range(n):
            rve2.homogenize()
            H = rng.uniform(-0.01, 0.01, (2, 2))
            w, u = rve2.fluctuation(H)
            del w, u
            if k in (n // 10 - 1, n - 1):
                rss.append(rss_mb())
            if (k + 1) % max(n // 10, 1) == 0:
                print(f"  memory check: {k + 1}/{n} homogenizations, RSS {rss_mb():.1f} MiB", flush=True)
        grow = rss[-1] - rss[0]
        print(f"  RSS after {n // 10}: {rss[0]:.1f} MiB, after {n}: {rss[-1]:.1f} MiB, growth {grow:+.1f} MiB "
              f"({(time.perf_counter() - t0) / n * 1e3:.1f} ms per homogenization + fluctuation)")
        out["memory"] = dict(n=n, rss_first_mb=rss[0], rss_last_mb=rss[-1], growth_mb=grow)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
