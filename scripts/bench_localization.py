"""Benchmark localization; prints its figures.

1. learned localization of 10^5 macro points on one core (floor: under 1 s);
2. exact localization time per point against a standalone solve of the same RVE at the same F̄
   (same order of points, warm-started along the list in both; floor 1.2x). Uses the converged state
   of a tissue strip run made here (examples/strip_fe2.yaml, 1 rank).

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_localization.py
"""

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np

import fe2ml  # noqa: F401
from fe2ml.parallel import log_level

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def main():
    import torch

    torch.set_num_threads(1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ck = ROOT / "results" / "localization_tissue" / "checkpoint.pt"
    if not ck.exists():
        for cmd in (["sample", "sample_tissue.yaml"], ["train", "train_localization.yaml"]):
            subprocess.run([str(BIN / "fe2ml"), *cmd], check=True, cwd=ROOT / "examples", env=env,
                           stdout=subprocess.DEVNULL)
    from fe2ml.surrogate.checkpoint import build_localization_model, load_checkpoint

    m = build_localization_model(load_checkpoint(ck))
    F = np.eye(2) + np.random.default_rng(0).uniform(-0.1, 0.1, (100_000, 2, 2))
    m.predict(F[:1000])
    t0 = time.perf_counter()
    m.predict(F)
    t = time.perf_counter() - t0
    print(f"1. learned localization of 100,000 points ({m.n_cells} cells each): {t:.3f} s on one core (floor 1 s)",
          flush=True)
    tmp = Path(tempfile.mkdtemp())
    base = (ROOT / "examples" / "strip_fe2.yaml").read_text().split("\nlog:")[0]
    (ROOT / "examples" / "_bench_loc.yaml").write_text(base)
    try:
        subprocess.run([str(BIN / "fe2ml"), "run", "_bench_loc.yaml", "--output", str(tmp / "run")], check=True,
                       cwd=ROOT / "examples", env=env, stdout=subprocess.DEVNULL)
        from fe2ml.localization import localize, read_quadrature

        with log_level(logging.WARNING):
            s = localize(MPI.COMM_WORLD, tmp / "run")
        _, _, _, Fq, _ = read_quadrature(tmp / "run", None)
        from fe2ml.laws.rve import build_rank_rve
        from fe2ml.localization import _rve_config

        rve, _ = build_rank_rve(MPI.COMM_WORLD, _rve_config(tmp / "run").rve)
        rve.evaluate(Fq[:1], cells=True)  # same warm-up as inside localize (forms compiled at build)
        t0 = time.perf_counter()
        rve.evaluate(Fq, cells=True, warm_start=True)
        ts = (time.perf_counter() - t0) / len(Fq)
        print(f"2. exact localization {s['time_per_point_s'] * 1e3:.2f} ms/point vs standalone RVE evaluation "
              f"{ts * 1e3:.2f} ms/point ({len(Fq)} points): ratio {s['time_per_point_s'] / ts:.3f} (floor 1.2)")
    finally:
        (ROOT / "examples" / "_bench_loc.yaml").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
