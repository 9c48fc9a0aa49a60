"""Surrogate validation on a neo-Hookean cells-in-matrix RVE; prints its figures and writes plots.

1. Sobol campaign in the space of principal stretches 0.8..1.2 (rigid rotations ±30°), 2D tissue RVE;
2. train the potential model and the plain F -> P baseline on the same split; held-out relative L2
   errors of stress and tangent for both;
3. unseen load paths inside the bounds (biaxial + shear combinations), RVE truth vs surrogate;
4. points outside the bounds: the hybrid gate's distance flags them, points inside are not flagged;
5. timing: surrogate evaluations per second (batched, 1 thread) against RVE solves per second.

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/validate_surrogate.py [--n 256] [--epochs 3000]
Outputs: results/validate_surrogate/ (logs, checkpoints, report.json, parity plots).
"""

import argparse
import json
import logging
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np

import fe2ml  # noqa: F401
from fe2ml.parallel import log_level

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "validate_surrogate"

SAMPLE = """\
rve:
  dim: 2
  mesh: {{generate: cells_2d, n_cells: 4, volume_fraction: 0.3, seed: 1, h: 0.07}}
  phases:
    1: {{material: neo_hookean, mu: 10.0, K: 30.0}}
    2: {{material: neo_hookean, mu: 1.0, K: 5.0}}
design: {{method: sobol, n: {n}, seed: 0, space: stretch, stretch: [0.8, 1.2], rotation: [-30, 30]}}
output: log
flush_every: 64
"""
TRAIN = """\
data: [log]
model: {model}
loss: {{stress: 1.0, tangent: 0.1}}
split: {{validation: 0.15, test: 0.15, seed: 0}}
train: {{epochs: {epochs}, lr: 0.01, patience: 400, seed: 0}}
ensemble: {ens}
output: {out}
"""


def rel(a, b):
    return float(np.sqrt(np.sum((a - b) ** 2)) / np.sqrt(np.sum(b**2)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3000)
    args = ap.parse_args()
    comm = MPI.COMM_SELF
    OUT.mkdir(parents=True, exist_ok=True)
    from fe2ml.data.campaign import build_rve, run_campaign
    from fe2ml.data.config import load_sample_config
    from fe2ml.laws.surrogate import SurrogateLaw
    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.train import train

    (OUT / "sample.yaml").write_text(SAMPLE.format(n=args.n))
    cfg = load_sample_config(OUT / "sample.yaml")
    print(f"1. campaign of {args.n} points", flush=True)
    with log_level(logging.WARNING):
        run_campaign(comm, cfg)
    res = {}
    models = (("potential", "{kind: potential, hidden: [16, 16]}", 3), ("plain", "{kind: plain, hidden: [16, 16]}", 1))
    for name, model, ens in models:
        (OUT / f"train_{name}.yaml").write_text(TRAIN.format(model=model, epochs=args.epochs, ens=ens, out=name))
        t0 = time.perf_counter()
        with log_level(logging.WARNING):
            r = train(comm, load_train_config(OUT / f"train_{name}.yaml"))
        m = r["metrics"]["test"]
        res[name] = {"test": m, "train_s": time.perf_counter() - t0}
        print(f"2. {name:>9} (ensemble {ens}): held-out stress rel. L2 {100 * m['stress_rel_l2']:.3f} %, tangent "
              f"{100 * m['tangent_rel_l2']:.3f} % ({m['n']} records; trained in {res[name]['train_s']:.0f} s)",
              flush=True)
    rve = build_rve(cfg.rve, comm)
    rng = np.random.default_rng(5)
    Fs = []
    for _ in range(24):
        a, b = rng.uniform(-0.12, 0.12, 2)
        s = rng.uniform(-0.12, 0.12)
        Fs.append(np.array([[1 + a, s], [0.0, 1 + b]]))
    Fs = np.array(Fs)
    t0 = time.perf_counter()
    truth = rve.evaluate(Fs, cells=False)
    t_rve = (time.perf_counter() - t0) / len(Fs)
    for name in ("potential", "plain"):
        law = SurrogateLaw(OUT / name / "checkpoint.pt", dim=2)
        P, A = law.evaluate(Fs)
        eP, eA = rel(P, truth.P), rel(A, truth.A)
        ratio = eP / res[name]["test"]["stress_rel_l2"]
        res[name]["unseen"] = {"stress_rel_l2": eP, "tangent_rel_l2": eA, "ratio_to_heldout": ratio}
        print(f"3. {name:>9}: unseen biaxial+shear paths: stress {100 * eP:.3f} %, tangent {100 * eA:.3f} % "
              f"({ratio:.2f}x the held-out stress error; floor 2x)", flush=True)
    law = SurrogateLaw(OUT / "potential" / "checkpoint.pt", dim=2)
    out_pts = np.array([np.diag([1.45, 1.0]), np.diag([0.65, 1.0]), np.array([[1.0, 0.6], [0.0, 1.0]])])
    d_out = law.distance(out_pts)
    d_in = law.distance(Fs)
    print(f"4. hybrid gate: distance outside the bounds {np.round(d_out, 3).tolist()} (all flagged: "
          f"{bool(np.all(d_out > 0))}); inside points flagged: {int(np.sum(d_in > 0))} of {len(Fs)}", flush=True)
    Fb = np.eye(2) + rng.uniform(-0.1, 0.1, (100000, 2, 2))
    law.evaluate(Fb[:1000])
    t0 = time.perf_counter()
    law.evaluate(Fb)
    rate = len(Fb) / (time.perf_counter() - t0)
    print(f"5. potential surrogate (ensemble of 3): {rate:.0f} stress+tangent evaluations/s on 1 thread; RVE solve "
          f"{t_rve * 1e3:.1f} ms/point -> {rate * t_rve:.0f}x faster per point", flush=True)
    res["gate"] = {"outside_distance": d_out.tolist(), "inside_flagged": int(np.sum(d_in > 0))}
    res["speed"] = {"evals_per_s": rate, "rve_s_per_point": t_rve}
    (OUT / "report.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {OUT}/report.json and the training reports in {OUT}/potential, {OUT}/plain")


if __name__ == "__main__":
    main()
