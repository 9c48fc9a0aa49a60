"""Stochastic FE²: the macro problem once per RVE realization, through one parametric surrogate.

``material.realizations: all | [seeds]`` with a checkpoint trained on a campaign over ``mesh.seed`` (each seed a
random RVE of the same statistics). Every realization is a full load history with the seed's context; the outputs
are the spread the microstructure's randomness gives the macro response:

- ``realizations.csv``: per load step, the mean and standard deviation (over realizations, ddof = 1) of every
  reaction and boundary mean displacement of ``reactions.csv``;
- ``realizations.png``: the reaction curves of every realization, their mean and the ±2 std band;
- ``realizations.h5``: per quadrature point of the last step, x, the mean and the standard deviation of P̄, and the
  reaction rows of every realization;
- ``summary.json``.

There is no restart: a stopped run is run again.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np

from fe2ml.macro.config import RunConfig

__all__ = ["run_realizations"]

log = logging.getLogger(__name__)


def run_realizations(comm, cfg: RunConfig) -> dict:
    """Run every realization of ``cfg.parameters.realizations``; rank 0 writes the outputs and returns the summary."""
    # deferred: dolfinx only when a run is made (the module is imported by macro.run, which these import)
    from fe2ml.macro.run import _prepare_output, build_law, macro_problem

    t0 = time.perf_counter()
    out = Path(cfg.output)
    _prepare_output(comm, out)
    pr = cfg.parameters
    law = build_law(comm, cfg)
    prob = macro_problem(comm, cfg, law)
    X = prob.quadrature_points()
    base = pr.values(X)
    j = pr.names.index("mesh.seed")
    steps = np.arange(1, cfg.steps + 1) / cfg.steps
    header, rows_all, P_all = None, [], []
    for r, seed in enumerate(pr.realizations):
        p = base.copy()
        p[:, j] = seed
        law.set_parameters(p)
        prob.reset()
        rows = []
        for t in steps:
            prob.step(float(t))
            R, U = prob.reactions(), prob.mean_displacements()
            cols, vals = [], []
            for name in prob.report_boundaries:
                if name in R:
                    cols += [f"{name}_R{c + 1}" for c in range(prob.d)]
                    vals += list(R[name])
                cols += [f"{name}_u{c + 1}_mean" for c in range(prob.d)]
                vals += list(U[name])
            header = cols
            rows.append(vals)
        rows_all.append(rows)
        P_all.append(prob.stress_qp())
        if comm.rank == 0:
            log.info(f"  realization {r + 1}/{len(pr.realizations)} (seed {int(seed)}) done "
                     f"({time.perf_counter() - t0:.1f} s)")
    Y = np.array(rows_all)                        # (R, T, C)
    Pr = np.array(P_all)                          # (R, n_local, d, d)
    Pm, Ps = Pr.mean(0), Pr.std(0, ddof=1)
    gx = comm.gather(X, root=0)
    gm = comm.gather(Pm, root=0)
    gs = comm.gather(Ps, root=0)
    summary: dict = {}
    if comm.rank == 0:
        mean, std = Y.mean(0), Y.std(0, ddof=1)
        with open(out / "realizations.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["t", *[f"{c}_{s}" for c in header for s in ("mean", "std")]])
            for k, t in enumerate(steps):
                w.writerow([t, *[v for c in range(len(header)) for v in (mean[k, c], std[k, c])]])
        with h5py.File(out / "realizations.h5", "w") as fh:
            fh["x"] = np.concatenate(gx)
            fh["P_mean"] = np.concatenate(gm)
            fh["P_std"] = np.concatenate(gs)
            fh["reactions"] = Y
            fh["seeds"] = np.array(pr.realizations)
            fh["t"] = steps
            fh.attrs["columns"] = json.dumps(header)
        main = next((c for c in header if "_R" in c), header[0])
        _plot(out / "realizations.png", steps, Y[:, :, header.index(main)], main)
        summary = {"status": "completed", "config": str(cfg.path), "realizations": [int(s) for s in pr.realizations],
                   "columns": header, "final_mean": dict(zip(header, mean[-1].tolist(), strict=True)),
                   "final_std": dict(zip(header, std[-1].tolist(), strict=True)),
                   "P_std_over_mean_rms": float(np.sqrt(np.mean(np.concatenate(gs) ** 2))
                                                / max(np.sqrt(np.mean(np.concatenate(gm) ** 2)), 1e-300)),
                   "wall_s": time.perf_counter() - t0, "ranks": comm.size}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info(f"  {main} at t = 1: {mean[-1, header.index(main)]:.6g} ± {std[-1, header.index(main)]:.3g} "
                 f"(std over {len(pr.realizations)} realizations); wrote {out}/realizations.csv, realizations.png, "
                 "realizations.h5, summary.json")
    law.close()
    prob.close()
    return summary


def _plot(path, t, Y, name) -> None:
    from fe2ml.plotting import _plt  # deferred: matplotlib only when a figure is drawn

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    tt = np.concatenate([[0.0], t])
    for y in Y:
        ax.plot(tt, np.concatenate([[0.0], y]), color="0.7", lw=0.8)
    m, s = Y.mean(0), Y.std(0, ddof=1)
    ax.fill_between(tt, np.concatenate([[0.0], m - 2 * s]), np.concatenate([[0.0], m + 2 * s]), alpha=0.3,
                    label="mean ± 2 std")
    ax.plot(tt, np.concatenate([[0.0], m]), "k-", label=f"mean of {len(Y)} realizations")
    ax.set_xlabel("load parameter t")
    ax.set_ylabel(name)
    ax.set_title("stochastic FE²: the spread of RVE realizations")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
