"""Stochastic FE² verified against direct RVE solves over the realizations of a random tissue RVE.

The RVE: three random cells (30 % area, 20 times softer than the matrix) in a periodic matrix, 2D finite strain;
its realizations are the generator's seeds 0..15 (``mesh.seed`` as the campaign's parameter: one parameter set per
seed). A parametric surrogate learns every realization (the seed enters one-hot: ``levels``).

1. Per macro F̄ (uniaxial, biaxial, simple shear), the mean and the variance over the 16 realizations of every
   component of P̄, from the surrogate and from the RVE solved directly for every seed: the relative error of the
   mean, and of the variance summed over the components.
2. The macro strip (stretched by 20 %) with ``material.realizations: all`` against the same strip run as nested FE²
   once per realization: the mean and the standard deviation of the reaction at every load step.

Printed with the floor (variance within 10 % of the reference); written to ``results/verify_stochastic/``
(``report.json``, ``variance.png`` and the run's ``realizations.png``).

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python scripts/verify_stochastic.py [--quick] [--check] [--out DIR]
`--quick` is the CI size (8 realizations, coarse meshes, short training); the floor applies to the full size.
"""

import argparse
import csv
import json
import logging
import time
from pathlib import Path

from mpi4py import MPI

import h5py  # noqa: F401  (before dolfinx writes files)
import numpy as np

import fe2ml  # noqa: F401
from fe2ml.parallel import log_level

ROOT = Path(__file__).resolve().parents[1]
FLOOR = 0.10
SIZES = {
    "full": {"seeds": 16, "rve_h": 0.05, "n": 192, "epochs": 10000, "hidden": [32, 32], "steps": 3},
    "quick": {"seeds": 8, "rve_h": 0.1, "n": 32, "epochs": 1000, "hidden": [16, 16], "steps": 2},
}
RVE = """\
  dim: 2
  kinematics: finite
  mesh: {{generate: cells_2d, n_cells: 3, volume_fraction: 0.3, seed: 0, h: {rve_h}}}
  phases:
    1: {{material: neo_hookean, mu: 10.0, K: 30.0}}
    2: {{material: neo_hookean, mu: 0.5, K: 10.0}}
"""
POINTS = {"uniaxial": [[1.2, 0.0], [0.0, 0.9]], "biaxial": [[1.12, 0.0], [0.0, 1.1]],
          "shear": [[1.0, 0.25], [0.0, 1.0]]}


def _configs(work: Path, s: dict) -> None:
    rve = RVE.format(**s)
    (work / "sample.yaml").write_text(
        f"rve:\n{rve}parameters:\n  mesh.seed: [0, {s['seeds'] - 1}]\nparameter_sets: {s['seeds']}\n"
        "parameter_points: shared\n"
        f"design: {{method: sobol, n: {s['n']}, seed: 0, space: stretch, stretch: [0.85, 1.3], rotation: [-45, 45],"
        " paths: [{type: uniaxial, max: 0.25, steps: 5}, {type: shear, max: 0.3, steps: 5}]}\noutput: log\n")
    (work / "train.yaml").write_text(
        f"data: [log]\nmodel: {{kind: potential, hidden: {s['hidden']}, features: general}}\n"
        "loss: {stress: 1.0, tangent: 0.1}\nsplit: {validation: 0.15, test: 0.05, seed: 0}\n"
        f"train: {{epochs: {s['epochs']}, lr: 0.005, patience: 3000, seed: 0}}\nensemble: 1\noutput: surrogate\n")
    nested = "".join("  " + line + "\n" for line in rve.splitlines())
    head = "dim: 2\nmesh: {generate: rectangle, size: [4.0, 1.0], n: [4, 1]}\n"
    tail = ("bcs:\n  - {boundary: left, components: [0], value: 0.0}\n"
            "  - {boundary: bottom, components: [1], value: 0.0}\n"
            f"  - {{boundary: right, components: [0], value: \"0.8*t\"}}\nsteps: {s['steps']}\n")
    (work / "stochastic.yaml").write_text(head + "material:\n  kind: surrogate\n  checkpoint: surrogate/checkpoint.pt\n"
                                          "  realizations: all\n  rve:\n" + nested + tail + "output: stochastic\n")
    for k in range(s["seeds"]):
        (work / f"fe2_{k}.yaml").write_text(head + "material:\n  kind: rve\n  rve:\n"
                                            + nested.replace("seed: 0", f"seed: {k}") + tail + f"output: fe2_{k}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI size (the floor applies to the full size)")
    ap.add_argument("--out", default=str(ROOT / "results" / "verify_stochastic"))
    ap.add_argument("--check", action="store_true", help="exit with status 1 when the floor is not met")
    args = ap.parse_args()
    from fe2ml.data.campaign import run_campaign
    from fe2ml.data.config import load_sample_config
    from fe2ml.macro.config import load_run_config
    from fe2ml.macro.realizations import run_realizations
    from fe2ml.macro.run import run
    from fe2ml.micro.config import build_rve, load_rve_mesh
    from fe2ml.micro.parameters import rve_with
    from fe2ml.parallel import install_console_logging
    from fe2ml.surrogate.checkpoint import EnsembleModel, load_checkpoint
    from fe2ml.surrogate.config import load_train_config
    from fe2ml.surrogate.models import with_parameters
    from fe2ml.surrogate.train import train

    comm = MPI.COMM_WORLD
    install_console_logging(comm, level=logging.WARNING)
    size = "quick" if args.quick else "full"
    s = SIZES[size]
    work = Path(args.out)
    if comm.rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        _configs(work, s)
    comm.barrier()
    t0 = time.perf_counter()

    def say(msg):
        if comm.rank == 0:
            print(f"[verify] {msg} ({time.perf_counter() - t0:.0f} s)", flush=True)

    say(f"{size}: campaign over {s['seeds']} realizations")
    with log_level(logging.WARNING):
        cfg = load_sample_config(work / "sample.yaml")
        run_campaign(comm, cfg)
    if not (work / "surrogate" / "checkpoint.pt").is_file():
        say("training")
        with log_level(logging.WARNING):
            train(comm, load_train_config(work / "train.yaml"))
    comm.barrier()
    seeds = np.arange(s["seeds"])
    F = np.array(list(POINTS.values()), dtype=float)
    # the reference: every realization's RVE at every point, solved directly (realizations spread over the ranks)
    say("direct RVE solves of every realization")
    mine = {}
    for k in seeds[comm.rank::comm.size]:
        rc = rve_with(cfg.parameters, [k], f"seed {k}", 2)
        rve = build_rve(rc, load_rve_mesh(rc))
        mine[int(k)] = np.array(rve.evaluate(F, warm_start=False).P)
    ref = {k: v for part in comm.allgather(mine) for k, v in part.items()}
    P_ref = np.array([ref[int(k)] for k in seeds])  # (R, points, 2, 2)
    res: dict = {}
    if comm.rank == 0:
        ck = load_checkpoint(work / "surrogate" / "checkpoint.pt")
        margs = {k: v for k, v in ck["model"].items() if k != "kind"}
        ens = EnsembleModel.from_states(ck["model"]["kind"], 2, "finite", margs, ck["members"])
        P_sur = np.array([ens.evaluate(with_parameters(F, [k]))[0] for k in seeds])
        res["test_stress_rel_l2"] = ck["metrics"]["test"]["stress_rel_l2"]
        res["points"] = {}
        for i, name in enumerate(POINTS):
            vr, vs = P_ref[:, i].var(0, ddof=1), P_sur[:, i].var(0, ddof=1)
            mr, ms = P_ref[:, i].mean(0), P_sur[:, i].mean(0)
            res["points"][name] = {
                "F": F[i].tolist(), "mean_rel_error": float(np.linalg.norm(ms - mr) / np.linalg.norm(mr)),
                "variance_rel_error": float(abs(vs.sum() - vr.sum()) / vr.sum()),
                "std_over_mean_ref": float(np.sqrt(vr.sum()) / np.linalg.norm(mr)),
                "var_ref": vr.tolist(), "var_sur": vs.tolist()}
        _plot(work / "variance.png", P_ref, P_sur)
    say("stochastic strip with the surrogate")
    with log_level(logging.WARNING):
        run_realizations(comm, load_run_config(work / "stochastic.yaml"))
    say(f"the strip as nested FE², once per realization ({len(seeds)} runs)")
    R = []
    for k in seeds:
        if not (work / f"fe2_{k}" / "summary.json").is_file():
            with log_level(logging.WARNING):
                run(comm, load_run_config(work / f"fe2_{k}.yaml"))
        with open(work / f"fe2_{k}" / "reactions.csv") as f:
            R.append([float(r["right_R1"]) for r in csv.DictReader(f)])
    R = np.array(R)
    failed = []
    if comm.rank == 0:
        with open(work / "stochastic" / "realizations.csv") as f:
            rows = list(csv.DictReader(f))
        m_s = np.array([float(r["right_R1_mean"]) for r in rows])
        s_s = np.array([float(r["right_R1_std"]) for r in rows])
        m_r, s_r = R.mean(0), R.std(0, ddof=1)
        res["strip"] = {"mean_rel_error": float(np.max(np.abs(m_s - m_r) / np.abs(m_r))),
                        "variance_rel_error": float(np.max(np.abs(s_s**2 - s_r**2) / s_r**2)),
                        "reaction_std_over_mean_ref": float(s_r[-1] / abs(m_r[-1])),
                        "mean_sur": m_s.tolist(), "std_sur": s_s.tolist(), "mean_fe2": m_r.tolist(),
                        "std_fe2": s_r.tolist()}
        res["variance_rel_error_worst"] = max(max(p["variance_rel_error"] for p in res["points"].values()),
                                              res["strip"]["variance_rel_error"])
        res.update({"size": size, "realizations": int(len(seeds)), "wall_s": time.perf_counter() - t0})
        (work / "report.json").write_text(json.dumps(res, indent=1))
        print(f"\nfe2ml verify_stochastic ({size}; {len(seeds)} realizations; surrogate test error "
              f"{100 * res['test_stress_rel_l2']:.2f} %)")
        for name, p in res["points"].items():
            print(f"  {name:>9s}: spread of P̄ (std/|mean|) {100 * p['std_over_mean_ref']:.2f} %, mean error "
                  f"{100 * p['mean_rel_error']:.2f} %, variance error {100 * p['variance_rel_error']:.1f} %")
        st = res["strip"]
        print(f"  strip reaction: spread {100 * st['reaction_std_over_mean_ref']:.2f} %, mean error "
              f"{100 * st['mean_rel_error']:.2f} %, variance error {100 * st['variance_rel_error']:.1f} %")
        ok = res["variance_rel_error_worst"] <= FLOOR
        if not ok:
            failed.append("variance")
        print(f"  worst variance error {100 * res['variance_rel_error_worst']:.1f} %   floor <= {100 * FLOOR:.0f} %  "
              f"{'ok' if ok else 'MISSED'}")
        print(f"  wrote {work}/report.json, variance.png, stochastic/realizations.png ({res['wall_s']:.0f} s)")
    failed = comm.bcast(failed, root=0)
    if args.check and failed:
        if comm.rank == 0:
            print("check: floor not met: variance")
        raise SystemExit(1)


def _plot(path, P_ref, P_sur):
    from fe2ml.plotting import _plt

    plt = _plt()
    fig, axs = plt.subplots(1, len(POINTS), figsize=(4.5 * len(POINTS), 3.8), squeeze=False)
    for i, name in enumerate(POINTS):
        ax = axs[0, i]
        a, b = P_ref[:, i].reshape(len(P_ref), -1), P_sur[:, i].reshape(len(P_sur), -1)
        for c, lab in enumerate(["P11", "P12", "P21", "P22"]):
            ax.plot(a[:, c], b[:, c], "o", ms=4, label=lab)
        lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
        ax.plot([lo, hi], [lo, hi], "k:")
        ax.set_xlabel("RVE (each realization)")
        ax.set_ylabel("surrogate")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.suptitle("P̄ of every realization: surrogate against the RVE")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
