"""Representativeness of an RVE: the spread of its homogenized response over random realizations.

``fe2ml homogenize CONFIG --realizations N [--cells n1 n2 ...]``: the RVE of CONFIG (a generated mesh with a
``seed``) is built for seeds 0..N−1, for every number of cells given (the element size is scaled with the cell size,
so that each cell keeps its resolution), and homogenized: C̄ for small strain, P̄ at the last F̄ of the config for
finite strain. Reported per number of cells: the mean, the standard deviation (ddof = 1) and the coefficient of
variation of each component. An RVE is representative where the coefficient of variation is small against the
accuracy wanted; it falls like 1/√(cells) for uncorrelated cells. Realizations are spread over the ranks (each on
``MPI.COMM_SELF``).
"""

from __future__ import annotations

import time

import numpy as np

from fe2ml.errors import ConfigError
from fe2ml.micro.config import HomogenizeConfig, build_rve, load_rve_mesh
from fe2ml.micro.parameters import parse_parameter_box, rve_with

__all__ = ["realizations_report"]


def _components(d: int, finite: bool) -> list[tuple[str, tuple]]:
    if finite:
        return [(f"P{i + 1}{j + 1}", (i, j)) for i in range(d) for j in range(d)]
    if d == 2:
        return [("C1111", (0, 0, 0, 0)), ("C2222", (1, 1, 1, 1)), ("C1122", (0, 0, 1, 1)), ("C1212", (0, 1, 0, 1))]
    return [("C1111", (0, 0, 0, 0)), ("C2222", (1, 1, 1, 1)), ("C3333", (2, 2, 2, 2)), ("C1122", (0, 0, 1, 1)),
            ("C1212", (0, 1, 0, 1)), ("C2323", (1, 2, 1, 2))]


def realizations_report(comm, cfg: HomogenizeConfig, raw: dict, n: int, cells: list[int] | None,
                        progress=None) -> dict | None:
    """Homogenize ``n`` realizations per number of cells; the report on rank 0 (None elsewhere).

    Raises:
        ConfigError: the RVE is not generated with a seed, n < 2, a number of cells < 1.
    """
    where = f"{cfg.path}: --realizations"
    if cfg.generator is None or "seed" not in (raw.get("mesh") or {}):
        raise ConfigError(f"{where}: needs a generated mesh with a seed (mesh: {{generate: cells_2d, seed: 0, ...}})")
    if n < 2:
        raise ConfigError(f"{where}: need at least 2 realizations, got {n}")
    counts = cells or [int(raw["mesh"].get("n_cells", 0)) or None]
    if any(c is not None and c < 1 for c in counts) or (cells and "n_cells" not in raw["mesh"]
                                                         and cfg.generator not in ("cells_2d", "cells_3d")):
        raise ConfigError(f"{where}: --cells needs positive numbers of cells and a generator with n_cells")
    finite = cfg.kinematics == "finite"
    if finite and not cfg.F:
        raise ConfigError(f"{where}: finite strain needs F or load_path in the config (P̄ is compared at the last)")
    names = ["mesh.seed"] + (["mesh.n_cells", "mesh.h"] if cells else [])
    rng = {"mesh.seed": [0, max(n - 1, 1)]}
    if cells:
        if "h" not in raw["mesh"]:
            raise ConfigError(f"{where}: --cells needs mesh.h in the config (it is scaled with the cell size)")
        rng.update({"mesh.n_cells": [0, 1e9], "mesh.h": [0.0, 1e9]})
    box = parse_parameter_box({k: rng[k] for k in names}, raw, "realizations", cfg.path.parent, cfg.path)
    n0 = int(raw["mesh"].get("n_cells", 1))
    h0 = float(raw["mesh"].get("h", 0.0) or 0.0)
    comps = _components(cfg.dim, finite)
    jobs = [(c, s) for c in counts for s in range(n)]
    mine = []
    t0 = time.perf_counter()
    for k, (c, s) in enumerate(jobs):
        if k % comm.size != comm.rank:
            continue
        p = [s] + ([c, h0 * (n0 / c) ** (1.0 / cfg.dim)] if cells else [])
        rc = rve_with(box, p, f"{cfg.path}: realization seed {s}" + (f", {c} cells" if cells else ""), cfg.dim)
        rve = build_rve(rc, load_rve_mesh(rc))
        if finite:
            _, _, _, R = rve.solve(np.asarray(cfg.F[-1], dtype=float), None)
            val, _ = rve.homogenized(R)
        else:
            val = rve.homogenize().C
        mine.append((c, s, [float(val[idx]) for _, idx in comps]))
        if progress is not None:
            progress(len(mine), len(range(comm.rank, len(jobs), comm.size)), time.perf_counter() - t0)
    allv = comm.gather(mine, root=0)
    if comm.rank != 0:
        return None
    flat = [x for part in allv for x in part]
    rows = []
    for c in counts:
        V = np.array([v for cc, _, v in flat if cc == c])
        mean, std = V.mean(0), V.std(0, ddof=1)
        rows.append({"n_cells": c, "realizations": len(V), "mean": dict(zip([a for a, _ in comps], mean.tolist(),
                                                                            strict=True)),
                     "std": dict(zip([a for a, _ in comps], std.tolist(), strict=True)),
                     "cv": dict(zip([a for a, _ in comps], (std / np.maximum(np.abs(mean), 1e-300)).tolist(),
                                    strict=True)),
                     "values": V.tolist()})
    return {"quantity": "P at the last F" if finite else "C", "components": [a for a, _ in comps], "rows": rows,
            "time_s": time.perf_counter() - t0}


def plot_realizations(report: dict, path) -> None:
    """Coefficient of variation of each component against the number of cells (or the values of one size)."""
    from fe2ml.plotting import _plt  # deferred: matplotlib only when a figure is drawn

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    rows = report["rows"]
    if len(rows) > 1 and all(r["n_cells"] for r in rows):
        nc = np.array([r["n_cells"] for r in rows], dtype=float)
        for comp in report["components"]:
            ax.loglog(nc, [max(r["cv"][comp], 1e-16) for r in rows], "o-", label=comp)
        ax.loglog(nc, rows[0]["cv"][report["components"][0]] * np.sqrt(nc[0] / nc), "k:", label="∝ 1/√cells")
        ax.set_xlabel("cells in the RVE")
        ax.set_ylabel("coefficient of variation over realizations")
    else:
        V = np.array(rows[0]["values"])
        ax.boxplot(V / np.maximum(np.abs(V.mean(0)), 1e-300), tick_labels=report["components"])
        ax.set_ylabel("value / mean over realizations")
    ax.set_title(f"representativeness: {report['quantity']} over {rows[0]['realizations']} realizations")
    if len(rows) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
