"""Sampling campaigns: evaluate an RVE over a design of macro deformations, logged to HDF5.

``mpiexec -n N fe2ml sample CONFIG.yaml``. The design is deterministic (method, size, seed, space,
bounds, paths: :mod:`fe2ml.data.design`), so an interrupted campaign resumes: points whose records are already
in the log folder (same campaign id = hash of the design and the RVE fingerprint) are skipped, the rest are
split into contiguous chunks over the ranks (a named load path stays warm-started along its chunk).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from pathlib import Path

import numpy as np

from fe2ml.data.config import SampleConfig
from fe2ml.data.design import design_points
from fe2ml.data.fingerprint import rve_description, rve_fingerprint
from fe2ml.data.log import LogWriter, check_fingerprint, check_folder_writable
from fe2ml.data.reader import intact_rows
from fe2ml.data.schema import LogError, open_part
from fe2ml.errors import Fe2mlError
from fe2ml.micro.config import build_rve as build_rve_from_config
from fe2ml.micro.config import load_rve_mesh
from fe2ml.micro.parameters import family_fingerprint, parameter_sets, rve_with
from fe2ml.parallel import collective

__all__ = ["build_rve", "done_point_ids", "run_campaign"]

log = logging.getLogger(__name__)


def build_rve(rcfg, comm):
    """This rank's RVE object (COMM_SELF) for an RVE config (rank 0 generates the mesh)."""
    return build_rve_from_config(rcfg, load_rve_mesh(rcfg, comm=comm))


def done_point_ids(folder: Path, campaign_id: str) -> set:
    """Design point ids already logged in ``folder`` by campaign ``campaign_id`` (readable parts only)."""
    done: set = set()
    if not folder.is_dir():
        return done
    for p in sorted(folder.glob("*.h5")):
        try:
            with open_part(p) as f:
                if str(f.attrs.get("source_id", "")) == campaign_id:
                    n, keep = intact_rows(f, p)  # the records a reader sees: a torn flush's rows are not done
                    done.update(int(i) for i in f["point_id"][:n][keep])
        except (LogError, OSError, KeyError):
            continue
    return done


def run_campaign(comm, cfg: SampleConfig, *, log_every: float = 2.0, part: int = 0,
                 parts: int = 1) -> dict:
    """Run (or resume) a sampling campaign; every rank writes its own part file.

    A parametric campaign (``parameters:``) runs its parameter sets one after the other, each on all ranks, into
    the same folder (fingerprint of the family; every record carries its parameter vector ``p``).

    Returns:
        dict with the campaign id, number of designed, skipped and new records, and timings (rank 0).
    """
    if cfg.parameters is None:
        F, path_idx = design_points(cfg.design, cfg.rve.dim)
        return _run_set(comm, cfg, cfg.rve, F, path_idx, np.arange(len(F)), log_every=log_every, part=part,
                        parts=parts)
    box = cfg.parameters
    m = cfg.parameter_sets
    sets = parameter_sets(box, m, cfg.design["seed"])
    F, path_idx = design_points(cfg.design, cfg.rve.dim)
    free = np.flatnonzero(path_idx < 0)
    fam = family_fingerprint(box, cfg.rve.dim)
    total: dict = {}
    for k, pv in enumerate(sets):
        if cfg.parameter_points == "shared":  # a paired design: every set at every point
            mine = np.arange(len(F))
        else:
            mine = np.sort(np.concatenate([free[k::m], np.flatnonzero(path_idx >= 0)]))
        rcfg = rve_with(box, pv, f"{cfg.path}: parameter set {k}", cfg.rve.dim)
        if comm.rank == 0:
            log.info(f"fe2ml sample: parameter set {k + 1}/{m}: {box.values(pv)}")
        out = _run_set(comm, cfg, rcfg, F, path_idx, mine, log_every=log_every, part=part, parts=parts,
                       param=(k, pv, box, fam))
        if comm.rank == 0:
            for key in ("designed", "skipped", "new", "wall_s"):
                total[key] = total.get(key, 0) + out[key]
            total.setdefault("campaign_ids", []).append(out["campaign_id"])
            total["fingerprint"] = fam
    if comm.rank == 0:
        total["campaign_id"] = total["campaign_ids"][0]
        total["parameter_sets"] = sets.tolist()
    return total


def _run_set(comm, cfg: SampleConfig, rcfg, F_all, path_all, points, *, log_every: float, part: int, parts: int,
             param=None) -> dict:
    """One RVE's share of a campaign: the design points ``points`` (indices into F_all) of the RVE ``rcfg``.

    ``param``: (set index, parameter vector, box, family fingerprint) of a parametric campaign, else None.
    """
    t0 = time.perf_counter()
    rank, size = comm.rank, comm.size
    collective(comm, lambda: check_folder_writable(cfg.output) if rank == 0 else None)
    rve = collective(comm, lambda: build_rve(rcfg, comm))
    fp = rve_fingerprint(rve)
    ident = {"design": cfg.design, "fingerprint": fp}
    if param is not None:
        ident["parameter_set"] = [int(param[0]), [float(v) for v in param[1]]]
    campaign_id = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    # a parametric set's point ids are unique in the folder: set * n_design + design index
    offset = int(param[0]) * len(F_all) if param is not None else 0
    F = np.zeros_like(F_all)
    F[points] = F_all[points]
    path_idx = path_all
    n = len(points)
    folder_fp = fp if param is None else param[3]
    done = done_point_ids(cfg.output, campaign_id) if rank == 0 else None
    done = comm.bcast(done, root=0)
    n_done = sum(1 for i in points if i + offset in done)
    todo = np.array([i for i in points if i + offset not in done and i % parts == part], dtype=np.int64)
    mine = np.array_split(todo, size)[rank]
    finite = rcfg.kinematics == "finite"
    run_id = comm.bcast(uuid.uuid4().hex[:8] + (f"p{part}" if parts > 1 else "") +
                        (f"s{int(param[0])}" if param is not None else "") if rank == 0 else None, root=0)
    if rank == 0:
        log.info(f"fe2ml sample: {cfg.path} -> {cfg.output}: campaign {campaign_id}, RVE {fp}, {n} design points, "
                 f"{n_done} already logged, {len(todo)} to do on "
                 f"{size} rank(s)")
    attrs = {"source_kind": "campaign", "source_id": campaign_id, "design": json.dumps(cfg.design),
             "config": cfg.text, "rve": json.dumps(rve_description(rve)), "kinematics": rcfg.kinematics,
             "run_id": run_id, "n_designed": n}
    pvec = None
    if param is not None:
        pvec = np.asarray(param[1], dtype=float)
        attrs.update({"parameter_box": json.dumps(param[2].as_dict()), "parameter_set": int(param[0]),
                      "rve_fingerprint": fp})
    n_cells = int(rve.rve_mesh.n_cells) if (finite and cfg.cells) else 0
    n_ph = len(rve.rve_mesh.tags) if (finite and cfg.cells) else 0

    collective(comm, lambda: check_fingerprint(cfg.output, folder_fp) if rank == 0 else None)

    def mk_writer():
        return LogWriter(cfg.output, run_id, rank, fingerprint=folder_fp, attrs=attrs, dim=rve.d, n_cells=n_cells,
                         n_phases=n_ph, flush_every=cfg.flush_every, check_folder=False,
                         parameters=list(param[2].names) if param is not None else None)

    writer = collective(comm, mk_writer) if len(todo) else None
    t_eval = 0.0
    t_log = 0.0
    last = time.perf_counter()
    err = None
    try:
        if not finite and len(mine):
            res = rve.homogenize()
            t1 = time.perf_counter()
            H = F[mine] - np.eye(rve.d)
            eps = 0.5 * (H + H.transpose(0, 2, 1))
            P = np.einsum("ijkl,nkl->nij", res.C, eps)
            A = np.broadcast_to(res.C, (len(mine),) + res.C.shape)
            t_eval += time.perf_counter() - t1
            t1 = time.perf_counter()
            writer.add(F[mine], P, A, point_id=mine + offset, step=path_idx[mine], rank=rank, p=pvec)
            t_log += time.perf_counter() - t1
        prev = None
        for c, i in enumerate(mine if finite else []):
            t1 = time.perf_counter()
            start = prev[1] if (prev is not None and path_idx[i] >= 0 and path_idx[prev[0]] == path_idx[i]
                                and prev[0] == i - 1) else None
            state, its, _, R = rve.solve(F[i], start, point=int(i))
            P, A = rve.homogenized(R)
            cq = [rve.cell_quantities()] if n_cells or n_ph else None
            prev = (i, state)
            t2 = time.perf_counter()
            writer.add(F[i][None], P[None], A[None], point_id=[i + offset], step=path_idx[i], rank=rank,
                       newton_its=its, cells=cq, p=pvec)
            t3 = time.perf_counter()
            t_eval += t2 - t1
            t_log += t3 - t2
            if rank == 0 and (time.perf_counter() - last > log_every or c + 1 == len(mine)):
                last = time.perf_counter()
                log.info(f"  rank 0: {c + 1}/{len(mine)} points ({(c + 1) / (last - t0):.1f} points/s per rank)")
    except Exception as e:  # noqa: BLE001 - collected and re-raised collectively below
        err = e
    finally:
        if writer is not None:
            t1 = time.perf_counter()
            writer.close()
            t_log += time.perf_counter() - t1
    errs = comm.allgather(None if err is None else f"{type(err).__name__}: {err}")
    first = next((e for e in errs if e is not None), None)
    if first is not None:
        if err is not None and not isinstance(err, Fe2mlError):
            raise err
        raise Fe2mlError(f"sampling failed ({first}); records up to the failure are kept in {cfg.output}")
    stats = comm.gather({"eval": t_eval, "log": t_log, "n": len(mine)}, root=0)
    wall = time.perf_counter() - t0
    out = {}
    if rank == 0:
        out = {"campaign_id": campaign_id, "fingerprint": fp, "designed": n, "skipped": n_done, "new": len(todo),
               "wall_s": wall, "eval_s": [s["eval"] for s in stats], "log_s": [s["log"] for s in stats]}
        if log.isEnabledFor(logging.INFO):
            log.info(f"  done: {len(todo)} new records in {wall:.1f} s ({len(todo) / max(wall, 1e-9):.1f} records/s), "
                  f"log writing {max(out['log_s']):.3f} s of {wall:.1f} s")
    return out
