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

    Returns:
        dict with the campaign id, number of designed, skipped and new records, and timings (rank 0).
    """
    t0 = time.perf_counter()
    rank, size = comm.rank, comm.size
    collective(comm, lambda: check_folder_writable(cfg.output) if rank == 0 else None)
    rve = collective(comm, lambda: build_rve(cfg.rve, comm))
    fp = rve_fingerprint(rve)
    campaign_id = hashlib.sha256(json.dumps({"design": cfg.design, "fingerprint": fp},
                                            sort_keys=True).encode()).hexdigest()[:12]
    F, path_idx = design_points(cfg.design, rve.d)
    n = len(F)
    done = done_point_ids(cfg.output, campaign_id) if rank == 0 else None
    done = comm.bcast(done, root=0)
    todo = np.array([i for i in range(n) if i not in done and i % parts == part], dtype=np.int64)
    mine = np.array_split(todo, size)[rank]
    finite = cfg.rve.kinematics == "finite"
    run_id = comm.bcast(uuid.uuid4().hex[:8] + (f"p{part}" if parts > 1 else "") if rank == 0 else None, root=0)
    if rank == 0:
        log.info(f"fe2ml sample: {cfg.path} -> {cfg.output}: campaign {campaign_id}, RVE {fp}, {n} design points, "
              f"{len(done)} already logged, {len(todo)} to do on {size} rank(s)")
    attrs = {"source_kind": "campaign", "source_id": campaign_id, "design": json.dumps(cfg.design),
             "config": cfg.text, "rve": json.dumps(rve_description(rve)), "kinematics": cfg.rve.kinematics,
             "run_id": run_id, "n_designed": n}
    n_cells = int(rve.rve_mesh.n_cells) if (finite and cfg.cells) else 0
    n_ph = len(rve.rve_mesh.tags) if (finite and cfg.cells) else 0

    collective(comm, lambda: check_fingerprint(cfg.output, fp) if rank == 0 else None)

    def mk_writer():
        return LogWriter(cfg.output, run_id, rank, fingerprint=fp, attrs=attrs, dim=rve.d, n_cells=n_cells,
                         n_phases=n_ph, flush_every=cfg.flush_every, check_folder=False)

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
            writer.add(F[mine], P, A, point_id=mine, step=path_idx[mine], rank=rank)
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
            writer.add(F[i][None], P[None], A[None], point_id=[i], step=path_idx[i], rank=rank, newton_its=its,
                       cells=cq)
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
        out = {"campaign_id": campaign_id, "fingerprint": fp, "designed": n, "skipped": len(done), "new": len(todo),
               "wall_s": wall, "eval_s": [s["eval"] for s in stats], "log_s": [s["log"] for s in stats]}
        if log.isEnabledFor(logging.INFO):
            log.info(f"  done: {len(todo)} new records in {wall:.1f} s ({len(todo) / max(wall, 1e-9):.1f} records/s), "
                  f"log writing {max(out['log_s']):.3f} s of {wall:.1f} s")
    return out
