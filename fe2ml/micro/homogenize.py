"""``fe2ml homogenize``: the effective response of one RVE, spread over the ranks of a communicator.

Small strain: the effective stiffness C̄ (every rank solves the same RVE on ``COMM_SELF`` and checks that the
ranks agree) and σ̄ = C̄ : ε̄ of the given strains. Finite strain: P̄, Ā and the cell-level quantities at each
F̄, the points split over the ranks. Both return a report dict on rank 0 (None elsewhere); the CLI prints it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fe2ml.errors import Fe2mlError
from fe2ml.materials import VOIGT_ORDER
from fe2ml.micro.config import HomogenizeConfig, build_rve
from fe2ml.parallel import collective

__all__ = ["homogenize_finite", "homogenize_linear"]

log = logging.getLogger(__name__)


def homogenize_linear(comm, cfg: HomogenizeConfig, mesh, *, t0: float) -> dict | None:
    """C̄ of a small-strain RVE and the stresses of ``cfg.strains``.

    Args:
        comm: the ranks (strains are split over them; each solves the RVE on ``COMM_SELF``).
        cfg: the homogenize config.
        mesh: its RVE mesh.
        t0: when the command started (for the set-up time).

    Returns:
        On rank 0 the report (C, voigt, volume, phase fractions, ndofs, times, strains and stresses); None elsewhere.

    Raises:
        Fe2mlError: the ranks disagree on C̄.
    """
    rank = comm.rank
    rve = build_rve(cfg, mesh)
    try:
        res = rve.homogenize()
        mine = list(range(rank, len(cfg.strains), comm.size))
        stresses_local = {k: rve.stress(cfg.strains[k]).tolist() for k in mine}
    finally:
        rve.close()
    gathered = comm.gather((stresses_local, res.C), root=0)
    if rank != 0:
        return None
    stresses: dict = {}
    for s, C_r in gathered:
        stresses.update(s)
        if not np.array_equal(C_r, res.C):  # each rank solves the same RVE independently
            raise Fe2mlError("ranks disagree on the effective stiffness (non-deterministic solve)")
    d = cfg.dim
    vol = np.bincount(mesh.phases, weights=mesh.element_volumes())
    return {
        "C": res.C.tolist(), "voigt": res.voigt.tolist(), "voigt_order": [f"{i + 1}{j + 1}" for i, j in VOIGT_ORDER[d]],
        "volume": res.volume, "mesh_volume": res.mesh_volume,
        "phase_fractions": {int(t): float(vol[t] / res.volume) for t in mesh.tags}, "n_cells": mesh.n_cells,
        "ndofs": res.ndofs, "n_elements": len(mesh.cells), "bc": cfg.bc, "degree": cfg.degree,
        "mesh": str(mesh.source), "time_s": res.time_s, "setup_s": time.perf_counter() - t0 - res.time_s,
        "strains": [s.tolist() for s in cfg.strains], "stresses": [stresses[k] for k in range(len(cfg.strains))],
        "ranks": comm.size}


def homogenize_finite(comm, cfg: HomogenizeConfig, mesh, *, t0: float, fields_folder: Path | None = None,
                      progress: Callable[[int, int], None] | None = None) -> dict | None:
    """P̄, Ā and the cell-level quantities of a finite-strain RVE at every F̄ of ``cfg.F``.

    Args:
        comm: the ranks (the points are split over them in contiguous chunks).
        cfg: the homogenize config.
        mesh: its RVE mesh.
        t0: when the command started (for the total time).
        fields_folder: where the full micro fields of ``cfg.fields_points`` go (``fields_point{K}.xdmf``).
        progress: ``progress(k, m)`` after point k of the m points of this rank.

    Returns:
        On rank 0 the report (F, P, A, Newton iterations, substeps, times, cells); None elsewhere.
    """
    rank, size = comm.rank, comm.size
    n = len(cfg.F)
    mine = np.array_split(np.arange(n), size)[rank]
    rve = collective(comm, lambda: build_rve(cfg, mesh))
    info = {"formulation": rve.formulation, "degree": rve.degree, "ndofs": rve.ndofs, "volume": rve.volume}
    log.info(f"  {info['ndofs']} dofs ({info['formulation']} formulation, degree {info['degree']}), {n} points on "
             f"{size} rank(s)")

    def run():
        Fs = np.array([cfg.F[k] for k in mine]).reshape(-1, cfg.dim, cfg.dim)
        if len(Fs) == 0:
            return None
        res = rve.evaluate(Fs, warm_start=True, progress=progress)
        for k in cfg.fields_points:
            if k in mine:
                rve.write_fields(Path(fields_folder or ".") / f"fields_point{k}.xdmf", res.states[list(mine).index(k)])
        return res

    try:
        res = collective(comm, run)
    finally:
        rve.close()
    local = None
    if res is not None:
        local = dict(idx=mine.tolist(), P=res.P, A=res.A, its=res.iterations, steps=res.substeps, t=res.time_s,
                     cells=[c.to_dict() for c in res.cells])
    gathered = comm.gather(local, root=0)
    if rank != 0:
        return None
    d = cfg.dim
    P, A = np.zeros((n, d, d)), np.zeros((n, d, d, d, d))
    its, steps, tp = np.zeros(n, dtype=int), np.zeros(n, dtype=int), np.zeros(n)
    cells: list = [None] * n
    for g in gathered:
        if g is None:
            continue
        for j, k in enumerate(g["idx"]):
            P[k], A[k], its[k], steps[k], tp[k], cells[k] = (g["P"][j], g["A"][j], g["its"][j], g["steps"][j],
                                                            g["t"][j], g["cells"][j])
    return {
        "kinematics": "finite", "dim": d, "bc": cfg.bc, **info, "n_cells": mesh.n_cells, "mesh": str(mesh.source),
        "F": [F.tolist() for F in cfg.F], "P": P.tolist(), "A": A.tolist(), "iterations": its.tolist(),
        "substeps": steps.tolist(), "time_s": tp.tolist(), "cells": cells, "ranks": comm.size,
        "total_s": time.perf_counter() - t0}
