"""Localization: from converged macro fields back to what each cell feels.

``fe2ml localize RUN_DIR [--step K] [--points i j ...] [--fields i j ...] [--model CKPT]`` reads the
converged F̄ at every macro quadrature point of load step K (``quadrature.h5`` of the run) and

- exactly: re-solves the run's RVE at each F̄ (points split over MPI ranks, warm-started along each
  rank's chunk) and records the per-cell quantities (principal stretches, J, Green–Lagrange strain,
  Cauchy stress, von Mises stress, volume), or
- learned: evaluates a localization model (``fe2ml train`` with ``model.kind: localization``) for all
  points at negligible cost.

Outputs in ``RUN_DIR/localization_step{K}/`` (``..._learned/`` with ``--model``): ``cells.csv`` (one row
per point and cell), ``points.xdmf`` (quadrature points with the mean/max cell stretch, mean J and max von Mises, for
ParaView), ``map_stretch.png`` (largest cell stretch over the macro domain), ``hist_stretch.png``
(distribution over all cells), ``summary.json`` (where the most stretched cells are) and, for
``--fields``, the full micro fields ``micro_point{i}.xdmf``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np

from fe2ml.data.fingerprint import rve_fingerprint
from fe2ml.errors import ConfigError
from fe2ml.laws.rve import build_rank_rve
from fe2ml.macro.config import load_run_config
from fe2ml.macro.folder import RunFolder
from fe2ml.parallel import collective
from fe2ml.plotting import plot_cell_map

__all__ = ["LocalizationModel", "localize", "read_quadrature"]

log = logging.getLogger(__name__)


def read_quadrature(run_dir: Path, step: int | None):
    """(step, t, x (n,d), F (n,d,d), recorded cells or None) of a run's quadrature.h5."""
    q = RunFolder(run_dir).quadrature
    if not q.is_file():
        raise ConfigError(f"{run_dir}: no quadrature.h5 (not an fe2ml run folder, or a run from before "
                          "localization support)")
    with h5py.File(q, "r") as f:
        n = int(f.attrs.get("steps", 0))
        if n == 0:
            raise ConfigError(f"{run_dir}: the run has no converged step")
        k = n if step is None else step
        if not 1 <= k <= n:
            raise ConfigError(f"--step {step}: the run has converged steps 1..{n}")
        g = f[f"step_{k}"]
        rec = {key[6:]: g[key][:] for key in [f"cells/{c}" for c in g.get("cells", {})]} if "cells" in g else None
        F = g["F_rve"][:] if "F_rve" in g else g["F"][:]  # in the RVE's frame (material.orientation)
        return k, float(g.attrs["t"]), g["x"][:], F, rec


def _rve_config(run_dir: Path):
    """The run's config (the original where it still exists, else the run's copy, paths as seen from the original)."""
    path, base = RunFolder(run_dir).config_to_load(prefer_original=True)
    cfg = load_run_config(path, output=str(run_dir), base=base)
    if cfg.rve is None:
        raise ConfigError(f"{path}: the run has no RVE (material.rve) to localize with")
    return cfg


class LocalizationModel:
    """A trained localization checkpoint: F̄ -> per-cell largest principal stretch and J."""

    def __init__(self, path, *, dim: int, fingerprint: str | None = None):
        # deferred: torch only with a localization model (--model)
        from fe2ml.surrogate.checkpoint import build_localization_model, check_checkpoint, load_checkpoint

        ck = load_checkpoint(path)
        if ck["model"]["kind"] != "localization":
            raise ConfigError(f"{path}: not a localization checkpoint (model kind {ck['model']['kind']})")
        check_checkpoint(ck, path, dim=dim, fingerprint=fingerprint)

        self.ck = ck
        self.model = build_localization_model(ck)
        self.n_cells = ck["n_cells"]

    def predict(self, F) -> dict:
        """{"stretch": (n, c), "J": (n, c)}."""
        return self.model.predict(F)


def localize(comm, run_dir, *, step=None, points=None, fields=(), model=None) -> dict:
    """Localize a finished run (see module docstring). Returns the summary dict on rank 0."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: run folder not found")
    t0 = time.perf_counter()
    k, t, X, F, recorded = read_quadrature(run_dir, step)
    n = len(F)
    sel = np.arange(n) if points is None else np.asarray(points, dtype=np.int64)
    if len(sel) and (sel.min() < 0 or sel.max() >= n):
        raise ConfigError(f"--points: indices must be in 0..{n - 1}")
    bad = [i for i in fields if not 0 <= i < n]
    if bad:
        raise ConfigError(f"--fields: indices {bad} out of range 0..{n - 1}")
    cfg = _rve_config(run_dir)
    out = RunFolder(run_dir).localization(k, learned=model is not None)
    rank = comm.rank
    if rank == 0:
        out.mkdir(exist_ok=True)
    res_local = {}
    if model is not None:
        rve, _ = build_rank_rve(comm, cfg.rve)
        lm = LocalizationModel(model, dim=cfg.dim, fingerprint=rve_fingerprint(rve))
        t1 = time.perf_counter()
        pred = lm.predict(F[sel]) if rank == 0 else None
        t_eval = time.perf_counter() - t1
        data = comm.bcast(pred, root=0)
        stretch, J = data["stretch"], data["J"]
        vm = np.full_like(J, np.nan)
        method = "learned"
        per_point = t_eval / max(len(sel), 1)
    else:
        rve, _ = build_rank_rve(comm, cfg.rve)
        chunks = np.array_split(sel, comm.size)
        mine = chunks[rank]

        def work():
            outl = {}
            prev = None
            for i in mine:
                state, _, _, R = rve.solve(F[i], prev, point=int(i))
                rve.homogenized(R)
                c = rve.cell_quantities()
                outl[int(i)] = {"stretch": c.cell["stretch"][:, 0], "J": c.cell["J"], "von_mises": c.cell["von_mises"],
                                "E": c.cell["E"], "phase_F": c.phase["F"], "phase_volume": c.phase["volume"]}
                prev = state
                if int(i) in fields:
                    rve.write_fields(out / f"micro_point{int(i)}.xdmf", state)
            return outl

        t1 = time.perf_counter()
        res_local = collective(comm, work)
        t_eval = time.perf_counter() - t1
        allres = comm.gather(res_local, root=0)
        times = comm.gather(t_eval, root=0)
        if rank != 0:
            return {}
        merged = {}
        for r in allres:
            merged.update(r)
        stretch = np.array([merged[int(i)]["stretch"] for i in sel])
        J = np.array([merged[int(i)]["J"] for i in sel])
        vm = np.array([merged[int(i)]["von_mises"] for i in sel])
        method = "exact"
        per_point = sum(times) / max(len(sel), 1)
        phaseF = np.array([merged[int(i)]["phase_F"] for i in sel])
        phasev = np.array([merged[int(i)]["phase_volume"] for i in sel])
        np.save(out / "phase_F.npy", phaseF)
        np.save(out / "phase_volume.npy", phasev)
    if rank != 0:
        return {}
    np.save(out / "stretch.npy", stretch)
    np.save(out / "J.npy", J)
    np.save(out / "points.npy", sel)
    xs = X[sel]
    with open(out / "cells.csv", "w", newline="") as fcsv:
        w = csv.writer(fcsv)
        w.writerow(["point", *[f"x{c + 1}" for c in range(xs.shape[1])], "cell", "stretch_max", "J", "von_mises"])
        for a, i in enumerate(sel):
            for c in range(stretch.shape[1]):
                w.writerow([int(i), *[f"{v:.6g}" for v in xs[a]], c, f"{stretch[a, c]:.8g}", f"{J[a, c]:.8g}",
                            f"{vm[a, c]:.6g}"])
    _write_points_xdmf(out / "points.xdmf", xs, {"cell_stretch_max": stretch.max(axis=1),
                                                  "cell_stretch_mean": stretch.mean(axis=1),
                                                  "cell_J_mean": J.mean(axis=1),
                                                  "cell_von_mises_max": np.nanmax(vm, axis=1) if method == "exact"
                                                  else np.zeros(len(sel))})
    plot_cell_map(xs, stretch.max(axis=1), stretch.ravel(), out, label="largest principal cell stretch",
                  title=f"cell stretch at t = {t:.3g} ({method})")
    a, c = np.unravel_index(np.argmax(stretch), stretch.shape)
    summary = {"step": k, "t": t, "method": method, "points": int(len(sel)), "cells_per_point": int(stretch.shape[1]),
               "max_cell_stretch": float(stretch.max()), "at_point": int(sel[a]), "at_x": xs[a].tolist(),
               "cell": int(c), "mean_cell_stretch": float(stretch.mean()), "time_per_point_s": per_point,
               "total_s": time.perf_counter() - t0}
    if recorded is not None and method == "exact":
        rs = recorded["stretch"][sel][:, :, 0]
        summary["max_abs_diff_to_recorded_stretch"] = float(np.abs(rs - stretch).max())
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if log.isEnabledFor(logging.INFO):
        log.info(f"fe2ml localize: {run_dir} step {k} (t = {t:.3g}), {len(sel)} points x {stretch.shape[1]} cells, "
              f"{method}: {per_point * 1e3:.3f} ms per point")
        log.info(f"  most stretched cell: {summary['max_cell_stretch']:.4f} (cell {c}) at x = "
              f"{np.round(xs[a], 4).tolist()}; mean cell stretch {summary['mean_cell_stretch']:.4f}")
        log.info(f"  wrote {out}/cells.csv, points.xdmf, map_stretch.png, hist_stretch.png, summary.json")
    return summary


def _write_points_xdmf(path: Path, x: np.ndarray, fields: dict) -> None:
    """Quadrature points as a Polyvertex XDMF (HDF5 beside it) with point data, for ParaView."""
    h5 = path.with_suffix(".h5")
    n, d = x.shape
    xyz = np.zeros((n, 3))
    xyz[:, :d] = x
    with h5py.File(h5, "w") as f:
        f["geometry"] = xyz
        for k, v in fields.items():
            f[k] = np.asarray(v, dtype=np.float64)
    attrs = "".join(
        f'<Attribute Name="{k}" AttributeType="Scalar" Center="Node"><DataItem Dimensions="{n}" NumberType="Float" '
        f'Precision="8" Format="HDF">{h5.name}:/{k}</DataItem></Attribute>' for k in fields)
    path.write_text(
        '<?xml version="1.0"?><Xdmf Version="3.0"><Domain><Grid Name="points" GridType="Uniform">'
        f'<Topology TopologyType="Polyvertex" NumberOfElements="{n}" NodesPerElement="1"/>'
        f'<Geometry GeometryType="XYZ"><DataItem Dimensions="{n} 3" NumberType="Float" Precision="8" Format="HDF">'
        f'{h5.name}:/geometry</DataItem></Geometry>{attrs}</Grid></Domain></Xdmf>\n')
