"""The 3D FE² example, end to end: a tissue block whose fibres turn through its thickness, hybrid against FE².

Runs the example configs ``examples/block3d_*.yaml`` (copied to the output folder) on ``--ranks`` ranks:

1. ``fe2ml sample block3d_sample.yaml``: the 3D RVE campaign;
2. ``fe2ml train block3d_train.yaml``: a 2-member potential ensemble;
3. ``fe2ml run block3d_fe2.yaml``: nested FE², the reference;
4. ``fe2ml run block3d_hybrid.yaml``: the hybrid (surrogate where its calibrated predicted error is below 5 %, the
   RVE elsewhere, refitted during the run);
5. ``fe2ml localize`` of both runs: the cells of every quadrature point, by exact RVE re-solves.

It prints and writes (``report.json``, ``block3d.png``) the hybrid's error against FE²: the local P̄ at every
quadrature point of the last step, the reaction curve, and the largest cell stretch of every point; the wall time
of each command; the fallbacks. ParaView: ``results/block3d_*/fields.xdmf`` (displacement, stress) and
``localization_step3/points.xdmf`` (cell stretch at the quadrature points).

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python scripts/example_block3d.py [--ranks 2] [--quick] [--out DIR]
``--quick`` is the CI size (coarser RVE and macro mesh, fewer samples and epochs, 2 steps).
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICK = {"rve.mesh.h": 0.35, "material.rve.mesh.h": 0.35, "mesh.n": [2, 2, 1], "design.n": 48, "steps": 2,
         "model.hidden": [16, 16], "train.epochs": 300, "material.learn.epochs": 50}


def _shrink(cfg: dict) -> dict:
    for dotted, v in QUICK.items():
        *path, last = dotted.split(".")
        node = cfg
        for k in path:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and last in node:
            node[last] = v
    return cfg


def _cmd(args, cwd, ranks) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"[block3d] fe2ml {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN / "mpiexec"), "-n", str(ranks), str(BIN / "fe2ml"), *args], cwd=cwd, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"example_block3d: fe2ml {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    dt = time.perf_counter() - t0
    print(f"[block3d]   {dt:.1f} s", flush=True)
    return dt


def _last(run: Path):
    import h5py

    with h5py.File(run / "quadrature.h5", "r") as f:
        g = f[f"step_{int(f.attrs['steps'])}"]
        return g["x"][()], g["P"][()], (g["surrogate"][()] if "surrogate" in g else None)


def _cells(path: Path) -> dict:
    with open(path) as f:
        return {(int(r["point"]), int(r["cell"])): float(r["stretch_max"]) for r in csv.DictReader(f)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="CI size")
    ap.add_argument("--out", default=str(ROOT / "results" / "example_block3d"))
    args = ap.parse_args()
    work = Path(args.out)
    if work.exists():
        shutil.rmtree(work)
    (work / "examples").mkdir(parents=True)
    for p in sorted((ROOT / "examples").glob("block3d_*.yaml")):
        cfg = yaml.safe_load(p.read_text())
        (work / "examples" / p.name).write_text(yaml.safe_dump(_shrink(cfg) if args.quick else cfg, sort_keys=False))
    n = args.ranks
    wall = {}
    wall["campaign"] = _cmd(["sample", "examples/block3d_sample.yaml"], work, n)
    wall["train"] = _cmd(["train", "examples/block3d_train.yaml"], work, n)
    wall["fe2"] = _cmd(["run", "examples/block3d_fe2.yaml"], work, n)
    wall["hybrid"] = _cmd(["run", "examples/block3d_hybrid.yaml"], work, n)
    res = work / "results"
    steps = len(json.loads((res / "block3d_fe2" / "summary.json").read_text())["steps"])
    for run in ("block3d_fe2", "block3d_hybrid"):
        wall[f"localize_{run}"] = _cmd(["localize", f"results/{run}"], work, n)

    x, P_ref, _ = _last(res / "block3d_fe2")
    x2, P, by_sur = _last(res / "block3d_hybrid")
    assert np.allclose(x, x2)  # the same points in the same order
    s_fe2 = json.loads((res / "block3d_fe2" / "summary.json").read_text())
    s_hyb = json.loads((res / "block3d_hybrid" / "summary.json").read_text())
    with open(res / "block3d_fe2" / "reactions.csv") as f:
        R_ref = np.array([float(r["right_R1"]) for r in csv.DictReader(f)])
    with open(res / "block3d_hybrid" / "reactions.csv") as f:
        R = np.array([float(r["right_R1"]) for r in csv.DictReader(f)])
    c_ref = _cells(res / "block3d_fe2" / f"localization_step{steps}" / "cells.csv")
    c_hyb = _cells(res / "block3d_hybrid" / f"localization_step{steps}" / "cells.csv")
    keys = sorted(c_ref)
    lam_ref, lam = np.array([c_ref[k] for k in keys]), np.array([c_hyb[k] for k in keys])
    npt = len(P_ref)
    e_pt = np.sqrt(np.sum((P - P_ref).reshape(npt, -1) ** 2, 1)) / np.sqrt(np.sum(P_ref.reshape(npt, -1) ** 2, 1))
    rep = {
        "quick": args.quick, "ranks": n, "points": int(npt), "steps": steps, "wall_s": wall,
        "P_rel_l2": float(np.sqrt(np.sum((P - P_ref) ** 2) / np.sum(P_ref**2))),
        "P_max_point": float(e_pt.max()),
        "reaction": float(np.max(np.abs(R - R_ref)) / np.max(np.abs(R_ref))),
        "cell_stretch_rel_l2_of_lambda_minus_1": float(np.linalg.norm(lam - lam_ref) / np.linalg.norm(lam_ref - 1)),
        "field_heterogeneity": float(np.std(P_ref[:, 0, 0]) / abs(np.mean(P_ref[:, 0, 0]))),
        "surrogate_points_last_step": int(by_sur.sum()) if by_sur is not None else 0,
        "fallbacks_per_step": s_hyb["fallbacks_per_step"], "rve_solves": {"fe2": s_fe2["rve_solves"],
                                                                           "hybrid": s_hyb["rve_solves"]},
        "learning_rounds": s_hyb.get("learning", {}).get("rounds", 0),
        "constitutive_s": {"fe2": s_fe2["time_split_s"]["rve_or_constitutive"],
                           "hybrid": s_hyb["time_split_s"]["rve_or_constitutive"]},
    }
    (work / "report.json").write_text(json.dumps(rep, indent=1))
    _figure(work, x, e_pt, by_sur, R_ref, R, keys, lam_ref, lam)
    print(f"\n3D tissue block, fibres turning through the thickness: {npt} quadrature points, {steps} steps, "
          f"{n} ranks (std/mean of P̄11 over the points {rep['field_heterogeneity']:.2f})")
    print(f"  hybrid vs FE²: local P̄ relative L2 {100 * rep['P_rel_l2']:.3f} % (worst point "
          f"{100 * rep['P_max_point']:.3f} %), reaction {100 * rep['reaction']:.3f} %, largest cell stretch λ−1 "
          f"{100 * rep['cell_stretch_rel_l2_of_lambda_minus_1']:.3f} % (relative L2 over {len(keys)} cells)")
    print(f"  hybrid: {rep['surrogate_points_last_step']} of {npt} points answered by the surrogate at the last step; "
          f"fallbacks per step {rep['fallbacks_per_step']}; {rep['learning_rounds']} learning round(s); RVE solves "
          f"{rep['rve_solves']['hybrid']} vs {rep['rve_solves']['fe2']} (FE²)")
    print("  wall [s]: " + ", ".join(f"{k} {v:.1f}" for k, v in wall.items()))
    print(f"  wrote {work}/report.json, block3d.png; ParaView: {res}/block3d_*/fields.xdmf and "
          f"localization_step{steps}/points.xdmf")


def _figure(work, x, e_pt, by_sur, R_ref, R, keys, lam_ref, lam):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    steps = np.arange(1, len(R_ref) + 1)
    axes[0].plot(steps, R_ref, "o-", label="FE²")
    axes[0].plot(steps, R, "x--", label="hybrid")
    axes[0].set_xlabel("load step")
    axes[0].set_ylabel("reaction R1 on the right face")
    axes[0].legend()
    axes[0].set_title("reaction", fontsize=10)
    angle = -60 + 240 * x[:, 2]
    sur = by_sur.astype(bool) if by_sur is not None else np.zeros(len(x), bool)
    axes[1].scatter(angle[sur], 100 * e_pt[sur], s=14, label="surrogate answered")
    axes[1].scatter(angle[~sur], 100 * e_pt[~sur], s=14, marker="x", label="RVE answered")
    axes[1].set_xlabel("fibre angle at the point [°]")
    axes[1].set_ylabel("|ΔP̄| / |P̄| against FE² [%]")
    axes[1].legend(fontsize=8)
    axes[1].set_title("local stress error, last step", fontsize=10)
    pts = np.array([k[0] for k in keys])
    axes[2].scatter(angle[pts], lam_ref, s=12, label="FE²")
    axes[2].scatter(angle[pts], lam, s=12, marker="x", label="hybrid (exact localization)")
    axes[2].set_xlabel("fibre angle at the point [°]")
    axes[2].set_ylabel("largest principal stretch of a cell")
    axes[2].legend(fontsize=8)
    axes[2].set_title("what the cells feel", fontsize=10)
    fig.tight_layout()
    fig.savefig(work / "block3d.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
