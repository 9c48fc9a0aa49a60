"""Run outputs: fields for ParaView, reaction curves, quadrature data for localization, the summary, progress.

:class:`RunWriter` appends the converged state after every load step (rank 0 writes the text files, so a crash
leaves every converged step on disk); :func:`progress_line` is the progress bar of ``fe2ml run``.
"""

from __future__ import annotations

import csv
import json
import logging
import resource
import time
from pathlib import Path

from mpi4py import MPI

import dolfinx
import h5py
import numpy as np

from fe2ml.files import atomic_write
from fe2ml.macro.folder import RunFolder
from fe2ml.macro.problem import MacroProblem
from fe2ml.plotting import plot_reactions

__all__ = ["RunWriter", "progress_line"]

log = logging.getLogger(__name__)


class RunWriter:
    """Writes a run's outputs after every converged step (rank 0 writes text files).

    Files in ``out``: ``fields.xdmf`` (u, F̄ and P̄ cell averages per step), ``reactions.csv``,
    ``summary.json`` (rewritten after every step, so a crash leaves the last converged step),
    ``reactions.png`` at the end.
    """

    def __init__(self, problem: MacroProblem, out: Path, *, config_path: str = "", restart_step: int = 0):
        self.p = problem
        self.out = Path(out)
        self.folder = RunFolder(self.out)
        self.comm = problem.comm
        self.rank0 = self.comm.rank == 0
        d = problem.d
        msh = problem.msh
        name = "fields.xdmf" if restart_step == 0 else f"fields_from_step{restart_step + 1}.xdmf"
        self.xdmf = dolfinx.io.XDMFFile(self.comm, str(self.out / name), "w")
        self.xdmf.write_mesh(msh)
        self.V1 = dolfinx.fem.functionspace(msh, ("Lagrange", 1, (d,)))
        self.u1 = dolfinx.fem.Function(self.V1, name="u")
        T = dolfinx.fem.functionspace(msh, ("DG", 0, (d, d)))
        self.Fc = dolfinx.fem.Function(T, name="F")
        self.Pc = dolfinx.fem.Function(T, name="P")
        self._tdofs = T.dofmap.list[: problem.n_owned, 0]
        self.rows: list = []
        self.config_path = config_path
        self.t_start = time.perf_counter()
        self.csv_header = ["t"]
        for name in problem.report_boundaries:
            if name in problem.reaction_dofs:
                self.csv_header += [f"{name}_R{c + 1}" for c in range(d)]
            self.csv_header += [f"{name}_u{c + 1}_mean" for c in range(d)]
        if self.rank0 and restart_step == 0:
            with open(self.folder.reactions, "w", newline="") as f:
                csv.writer(f).writerow(self.csv_header)
            self.folder.quadrature.unlink(missing_ok=True)
        elif self.rank0:  # keep the rows and quadrature data of the checkpointed steps only
            with open(self.folder.reactions, newline="") as f:
                rows = list(csv.reader(f))
            self.rows = [[float(v) for v in r] for r in rows[1:restart_step + 1]]
            with open(self.folder.reactions, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(self.csv_header)
                for r in rows[1:restart_step + 1]:
                    w.writerow(r)
            if self.folder.quadrature.exists():
                with h5py.File(self.folder.quadrature, "a") as f:
                    for g in [g for g in f if int(g.split("_")[1]) > restart_step]:
                        del f[g]
                    f.attrs["steps"] = restart_step

    def write_step(self, status="running", message=""):
        """Append the current (converged) state to all outputs (collective)."""
        t0 = time.perf_counter()
        p = self.p
        d = p.d
        self.u1.interpolate(p.u)
        Fc, Pc = p.cell_averages()
        self.Fc.x.array.reshape(-1, d * d)[self._tdofs] = Fc.reshape(-1, d * d)
        self.Pc.x.array.reshape(-1, d * d)[self._tdofs] = Pc.reshape(-1, d * d)
        self.Fc.x.scatter_forward()
        self.Pc.x.scatter_forward()
        for f in (self.u1, self.Fc, self.Pc):
            self.xdmf.write_function(f, p.t)
        self._write_quadrature()
        R = p.reactions()
        U = p.mean_displacements()
        row = [p.t]
        for name in p.report_boundaries:
            if name in p.reaction_dofs:
                row += R[name].tolist()
            row += U[name].tolist()
        self.rows.append(row)
        if self.rank0:
            with open(self.folder.reactions, "a", newline="") as f:
                csv.writer(f).writerow([f"{v:.12e}" for v in row])
        p.timers["output_s"] += time.perf_counter() - t0
        self.write_summary(status, message)

    def _write_quadrature(self):
        """Append F̄, P̄ (and cell quantities, when the law computes them) of this step to ``quadrature.h5``.

        With a surrogate law, ``surrogate`` marks the points the surrogate answered (1) or the RVE (0).

        Gathered to rank 0, ordered by coordinates (rank independent): the input of ``fe2ml localize``.
        """
        p = self.p
        ids, x = p.quadrature_point_ids()
        F = p._F_qp()
        P = p.stress_qp()
        mask = p.law.surrogate_mask() if p.form_law is None else None
        Frve = p.rve_frame(F) if p.Q is not None else None
        cells = p.law.cell_quantities() if p.form_law is None else None
        cq = None
        if cells:
            keys = ("stretch", "J", "E", "sigma", "von_mises", "volume")
            cq = {k: np.array([c.cell[k] for c in cells]) for k in keys}
            cq["phase_F"] = np.array([c.phase["F"] for c in cells])
            cq["phase_volume"] = np.array([c.phase["volume"] for c in cells])
        parts = self.comm.gather((ids, x, F, cq, Frve, P, mask), root=0)
        if not self.rank0:
            return
        ids = np.concatenate([q[0] for q in parts])
        order = np.lexsort(np.concatenate([q[1] for q in parts]).T[::-1])  # by coordinates: rank-independent
        k = len(p.history)
        with h5py.File(self.folder.quadrature, "a") as f:
            g = f.create_group(f"step_{k}")
            g.attrs["t"] = p.t
            g["x"] = np.concatenate([q[1] for q in parts])[order]
            g["F"] = np.concatenate([q[2] for q in parts])[order]
            g["point_id"] = ids[order]
            g["P"] = np.concatenate([q[5] for q in parts])[order]
            if all(q[6] is not None for q in parts):
                g["surrogate"] = np.concatenate([q[6] for q in parts]).astype(np.int8)[order]
            if parts[0][4] is not None:  # the F̄ the RVEs saw (material.orientation)
                g["F_rve"] = np.concatenate([q[4] for q in parts])[order]
            if all(q[3] is not None for q in parts):
                for key in parts[0][3]:
                    g[f"cells/{key}"] = np.concatenate([q[3][key] for q in parts])[order]
            f.attrs["steps"] = k

    def write_summary(self, status, message="", *, extra: dict | None = None):
        """Rewrite summary.json (collective: gathers law timings); ``extra`` (rank 0) adds top-level entries."""
        p = self.p
        stats = dict(p.law.stats)
        all_stats = self.comm.gather(stats, root=0)
        timers = self.comm.gather(dict(p.timers), root=0)
        # peak resident memory of each rank so far (ru_maxrss is in KiB on Linux)
        rss = self.comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, root=0)
        krylov = self.comm.allreduce(p.krylov_iterations, op=MPI.MAX)
        if not self.rank0:
            return
        cons = [t["constitutive_s"] for t in timers]
        summary = {
            "status": status,
            "message": message,
            "config": self.config_path,
            "t": p.t,
            "ranks": self.comm.size,
            "quadrature_points": p.n_qp_global,
            "dofs": p.V.dofmap.index_map.size_global * p.V.dofmap.index_map_bs,
            "wall_s": time.perf_counter() - self.t_start,
            "time_split_s": {
                "rve_or_constitutive": float(np.max(cons)),
                "macro_assembly": float(np.max([t["assembly_s"] for t in timers])),
                "macro_solve": float(np.max([t["solve_s"] for t in timers])),
                "output": float(np.max([t["output_s"] for t in timers])),
            },
            "constitutive_time_per_rank_s": cons,
            "law_s": float(max(st.get("time_s", 0.0) for st in all_stats)) if all_stats else 0.0,
            "load_balance_max_over_mean": float(np.max(cons) / np.mean(cons)) if np.mean(cons) > 0 else 1.0,
            "rve_solves": int(sum(s.get("rve_solves", 0) for s in all_stats)),
            "surrogate_s": float(max(s.get("surrogate_s", 0.0) for s in all_stats)) if all_stats else 0.0,
            "fallbacks": int(sum(s.get("fallbacks", 0) for s in all_stats)),
            "fallback_reasons": {key: int(sum(s.get("fallback_reasons", {}).get(key, 0) for s in all_stats))
                                 for key in sorted({k for s in all_stats for k in s.get("fallback_reasons", {})})},
            "fallbacks_per_step": [int(sum(v)) for v in zip(*[s.get("fallbacks_per_step", []) for s in all_stats],
                                                             strict=False)],
            "rve_newton_iterations": int(sum(s.get("newton_its", 0) for s in all_stats)),
            "steps": [{"t": h.t, "newton_iterations": h.iterations, "cuts": h.cuts, "residuals": h.residuals,
                       "cut_reasons": h.cut_reasons} for h in p.history],
            "macro_solver": p.solver_kind,
            "krylov_iterations": krylov,
            "peak_rss_gib_per_rank": rss,
            "peak_rss_gib_total": float(np.sum(rss)),
        }
        if any("rve_phases" in s for s in all_stats):  # nested FE²: each rank's RVE seconds by phase
            summary["rve_phases_per_rank_s"] = [s.get("rve_phases", {}) for s in all_stats]
        work = p.law.rve_work() if hasattr(p.law, "rve_work") else None
        if work is not None:
            summary["rve_work"] = work
        summary.update(extra or {})
        atomic_write(self.folder.summary, json.dumps(summary, indent=1))

    def close(self):
        """Close the XDMF file and draw the reaction curve (collective)."""
        self.xdmf.close()
        if self.rank0 and self.rows:
            plot_reactions(self.csv_header, np.array(self.rows), self.out / "reactions.png")


def progress_line(k, n, t, rec, comm, width=24):
    """Progress bar on rank 0."""
    if comm.rank != 0:
        return
    done = int(width * k / n)
    r = rec.residuals[-1][-1] if rec.residuals and rec.residuals[-1] else float("nan")
    cut = f", {rec.cuts} cut(s)" if rec.cuts else ""
    log.info(f"  [{'#' * done}{'.' * (width - done)}] step {k}/{n} t={t:.3f} Newton its {rec.iterations} "
          f"|r|={r:.2e}{cut}")
