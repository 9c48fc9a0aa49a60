"""Sampling campaigns: evaluate an RVE over a design of macro deformations, logged to HDF5.

``mpiexec -n N fe2ml sample CONFIG.yaml``. The design is deterministic (method, size, seed, space,
bounds, paths), so an interrupted campaign resumes: points whose records are already in the log
folder (same campaign id = hash of the design and the RVE fingerprint) are skipped, the rest are
split into contiguous chunks over the ranks (a named load path stays warm-started along its chunk).

Design spaces (d = dimension):

- ``gradient``: every component of F̄ − I in ``bounds`` ([lo, hi] for all, or a d×d list of
  [lo, hi]); with ``symmetric: true`` only the symmetric part (F̄ = U, a pure stretch tensor).
- ``stretch``: principal stretches in ``stretch: [lo, hi]``, principal directions of random
  orientation, plus an optional rigid rotation angle in ``rotation: [lo, hi]`` degrees
  (about z in 2D, about a random axis in 3D). With ``volume: [lo, hi]`` the last principal stretch is
  set so that det F̄ is uniform in [lo, hi]: near-isochoric states of nearly incompressible tissue.

Methods: ``sobol`` (scrambled, scipy.stats.qmc), ``lhs`` (Latin hypercube), or ``none`` (paths only).
Named paths: ``{type: uniaxial | biaxial | shear | pure_shear, max: s, steps: n}``.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fe2ml.config import check_keys, load_yaml, number
from fe2ml.errors import ConfigError
from fe2ml.micro.config import LOAD_PATHS, load_path, load_rve_mesh, parse_rve_ref
from fe2ml.micro.config import build_rve as build_rve_from_config

__all__ = ["SampleConfig", "design_points", "load_sample_config", "run_campaign"]


@dataclass
class SampleConfig:
    """Validated ``fe2ml sample`` configuration."""

    path: Path
    rve: object
    design: dict
    output: Path
    flush_every: int
    cells: bool
    text: str


def _rot2(t):
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _rot3(axis, t):
    a = axis / np.linalg.norm(axis)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def design_points(design: dict, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Macro deformation gradients of a design.

    Args:
        design: validated design mapping.
        dim: 2 or 3.

    Returns:
        (F (n, d, d), path index per point (n,), -1 for the space-filling part).
    """
    from scipy.stats import qmc

    d = dim
    Fs, tags = [], []
    n = design["n"]
    if design["method"] != "none" and n > 0:
        space = design["space"]
        if space == "gradient":
            comps = [(i, j) for i in range(d) for j in range(d) if not design["symmetric"] or i <= j]
        else:
            comps = list(range(d + {2: 1, 3: 3}[d] + 1))  # stretches, orientation angles, rotation
        k = len(comps)
        eng = (qmc.Sobol(k, scramble=True, seed=design["seed"]) if design["method"] == "sobol"
               else qmc.LatinHypercube(k, seed=design["seed"]))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sobol balance warning for n not a power of 2
            U = eng.random(n)
        if space == "gradient":
            b = np.asarray(design["bounds"], dtype=float)
            for u in U:
                H = np.zeros((d, d))
                for c, (i, j) in enumerate(comps):
                    lo, hi = (b if b.ndim == 1 else b[i, j])
                    H[i, j] = lo + (hi - lo) * u[c]
                    if design["symmetric"]:
                        H[j, i] = H[i, j]
                Fs.append(np.eye(d) + H)
        else:
            lo, hi = design["stretch"]
            rlo, rhi = np.radians(design["rotation"])
            vol = design.get("volume")
            for u in U:
                lam = lo + (hi - lo) * u[:d]
                if vol is not None:  # the last principal stretch makes det U = J, J uniform in the volume range
                    lam[-1] = (vol[0] + (vol[1] - vol[0]) * u[d - 1]) / np.prod(lam[:-1])
                if d == 2:
                    Q = _rot2(np.pi * u[2])
                    R = _rot2(rlo + (rhi - rlo) * u[3])
                else:
                    # orientation from 3 uniform numbers (unit quaternion, Shoemake)
                    a, b_, c = u[3:6]
                    q = np.array([np.sqrt(1 - a) * np.sin(2 * np.pi * b_), np.sqrt(1 - a) * np.cos(2 * np.pi * b_),
                                  np.sqrt(a) * np.sin(2 * np.pi * c), np.sqrt(a) * np.cos(2 * np.pi * c)])
                    x, y, z, w = q
                    Q = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                                  [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                                  [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
                    R = _rot3(Q[:, 0] + Q[:, 1] * 0.5 + 1e-3, rlo + (rhi - rlo) * u[6])
                Fs.append(R @ Q @ np.diag(lam) @ Q.T)
        tags += [-1] * n
    for k, p in enumerate(design["paths"]):
        pts = load_path(p["type"], p["max"], p["steps"], d)
        Fs += pts
        tags += [k] * len(pts)
    return np.array(Fs).reshape(-1, d, d), np.array(tags, dtype=np.int32)


def load_sample_config(path, *, output: str | None = None) -> SampleConfig:
    """Load and validate a ``sample`` YAML file (errors name the file and key)."""
    p = Path(path)
    raw = load_yaml(p)
    f = str(p)
    check_keys(raw, ("rve", "design", "output", "flush_every", "cells"), f)
    if "rve" not in raw or "design" not in raw:
        raise ConfigError(f"{f}: missing required key '{'rve' if 'rve' not in raw else 'design'}'")
    rve = parse_rve_ref(raw["rve"], p, f"{f}: rve", p.parent, None)
    ds = raw["design"]
    w = f"{f}: design"
    if not isinstance(ds, dict):
        raise ConfigError(f"{w}: expected a mapping {{method: sobol, n: 256, bounds: [-0.2, 0.2]}}")
    check_keys(ds, ("method", "n", "seed", "space", "bounds", "symmetric", "stretch", "rotation", "volume", "paths"),
                w)
    method = ds.get("method", "sobol")
    if method not in ("sobol", "lhs", "none"):
        raise ConfigError(f"{w}.method: unknown sampling method {method!r}; allowed: sobol, lhs, none")
    n = ds.get("n", 0 if method == "none" else 64)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n > 10_000_000:
        raise ConfigError(f"{w}.n: expected a non-negative integer, got {n!r}")
    seed = ds.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{w}.seed: expected an integer, got {seed!r}")
    space = ds.get("space", "gradient")
    if space not in ("gradient", "stretch"):
        raise ConfigError(f"{w}.space: expected gradient or stretch, got {space!r}")
    d = rve.dim
    bounds = ds.get("bounds", [-0.1, 0.1])
    try:
        b = np.asarray(bounds, dtype=float)
    except (TypeError, ValueError):
        b = np.zeros(0)
    if b.shape not in ((2,), (d, d, 2)) or not np.all(np.isfinite(b)) or np.any(b[..., 0] > b[..., 1]):
        raise ConfigError(f"{w}.bounds: expected [lo, hi] (lo <= hi) or a {d}x{d} list of [lo, hi], got {bounds!r}")
    sym = ds.get("symmetric", False)
    if not isinstance(sym, bool):
        raise ConfigError(f"{w}.symmetric: expected true or false, got {sym!r}")
    st = ds.get("stretch", [0.8, 1.25])
    rot = ds.get("rotation", [0.0, 0.0])
    for key, val in (("stretch", st), ("rotation", rot)):
        if not (isinstance(val, list) and len(val) == 2):
            raise ConfigError(f"{w}.{key}: expected [lo, hi], got {val!r}")
        number(val[0], f"{w}.{key}")
        number(val[1], f"{w}.{key}")
        if float(val[0]) > float(val[1]):
            raise ConfigError(f"{w}.{key}: lo > hi in {val!r}")
    if float(st[0]) <= 0:
        raise ConfigError(f"{w}.stretch: principal stretches must be > 0, got {st!r}")
    vol = ds.get("volume")
    if vol is not None:
        if space != "stretch":
            raise ConfigError(f"{w}.volume: only for space: stretch (it sets the last principal stretch)")
        if not (isinstance(vol, list) and len(vol) == 2):
            raise ConfigError(f"{w}.volume: expected [lo, hi] of det F̄, got {vol!r}")
        vol = [number(vol[0], f"{w}.volume", positive=True), number(vol[1], f"{w}.volume", positive=True)]
        if vol[0] > vol[1]:
            raise ConfigError(f"{w}.volume: lo > hi in {vol!r}")
    paths = []
    for k, pth in enumerate(ds.get("paths", []) or []):
        pw = f"{w}.paths[{k}]"
        if not isinstance(pth, dict):
            raise ConfigError(f"{pw}: expected {{type: uniaxial, max: 0.3, steps: 10}}")
        check_keys(pth, ("type", "max", "steps"), pw)
        if pth.get("type") not in LOAD_PATHS:
            raise ConfigError(f"{pw}.type: expected one of {', '.join(LOAD_PATHS)}, got {pth.get('type')!r}")
        stp = pth.get("steps", 10)
        if not isinstance(stp, int) or isinstance(stp, bool) or stp < 1:
            raise ConfigError(f"{pw}.steps: expected a positive integer, got {stp!r}")
        paths.append({"type": pth["type"], "max": number(pth.get("max", 0.2), f"{pw}.max"), "steps": stp})
    design = {"method": method, "n": n if method != "none" else 0, "seed": seed, "space": space,
              "bounds": b.tolist(), "symmetric": sym, "stretch": [float(x) for x in st],
              "rotation": [float(x) for x in rot], "paths": paths}
    if vol is not None:  # (absent otherwise: campaign ids of designs without it stay the same)
        design["volume"] = vol
    if design["n"] == 0 and not paths:
        raise ConfigError(f"{w}: the design is empty (n = 0 and no paths)")
    F, _ = design_points(design, d)
    det = np.linalg.det(F)
    if np.any(det <= 0):
        k = int(np.argmin(det))
        raise ConfigError(f"{w}: bounds give det F̄ <= 0 at {int(np.sum(det <= 0))} of {len(F)} design points "
                          f"(first: point {k}, det = {det[k]:.3g}); narrow the bounds")
    fl = raw.get("flush_every", 64)
    if not isinstance(fl, int) or isinstance(fl, bool) or fl < 1:
        raise ConfigError(f"{f}: flush_every: expected a positive integer, got {fl!r}")
    cells = raw.get("cells", True)
    if not isinstance(cells, bool):
        raise ConfigError(f"{f}: cells: expected true or false, got {cells!r}")
    out = output if output is not None else raw.get("output", str(Path("rve_data") / p.stem))
    if not isinstance(out, str):
        raise ConfigError(f"{f}: output: expected a folder path, got {out!r}")
    return SampleConfig(path=p, rve=rve, design=design, output=Path(out) if output is not None else p.parent / out,
                        flush_every=fl, cells=cells, text=p.read_text())


def build_rve(rcfg, comm):
    """This rank's RVE object (COMM_SELF) for an RVE config (rank 0 generates the mesh)."""
    return build_rve_from_config(rcfg, load_rve_mesh(rcfg, comm=comm))


def done_point_ids(folder: Path, campaign_id: str) -> set:
    """Design point ids already logged in ``folder`` by campaign ``campaign_id`` (readable parts only)."""
    from fe2ml.data.log import LogError
    from fe2ml.data.reader import _open

    done: set = set()
    if not folder.is_dir():
        return done
    for p in sorted(folder.glob("*.h5")):
        try:
            with _open(p) as f:
                if str(f.attrs.get("source_id", "")) == campaign_id:
                    done.update(int(i) for i in f["point_id"][:])
        except (LogError, OSError, KeyError):
            continue
    return done


def run_campaign(comm, cfg: SampleConfig, *, quiet: bool = False, log_every: float = 2.0, part: int = 0,
                 parts: int = 1) -> dict:
    """Run (or resume) a sampling campaign; every rank writes its own part file.

    Returns:
        dict with the campaign id, number of designed, skipped and new records, and timings (rank 0).
    """
    from fe2ml.data.fingerprint import rve_description, rve_fingerprint
    from fe2ml.data.log import LogWriter, check_folder_writable
    from fe2ml.macro.run import _collective

    t0 = time.perf_counter()
    rank, size = comm.rank, comm.size
    _collective(comm, lambda: check_folder_writable(cfg.output) if rank == 0 else None)
    rve = _collective(comm, lambda: build_rve(cfg.rve, comm))
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
    if not quiet and rank == 0:
        print(f"fe2ml sample: {cfg.path} -> {cfg.output}: campaign {campaign_id}, RVE {fp}, {n} design points, "
              f"{len(done)} already logged, {len(todo)} to do on {size} rank(s)", flush=True)
    attrs = {"source_kind": "campaign", "source_id": campaign_id, "design": json.dumps(cfg.design),
             "config": cfg.text, "rve": json.dumps(rve_description(rve)), "kinematics": cfg.rve.kinematics,
             "run_id": run_id, "n_designed": n}
    n_cells = int(rve.rve_mesh.n_cells) if (finite and cfg.cells) else 0
    n_ph = len(rve.rve_mesh.tags) if (finite and cfg.cells) else 0

    from fe2ml.data.log import check_fingerprint

    _collective(comm, lambda: check_fingerprint(cfg.output, fp) if rank == 0 else None)

    def mk_writer():
        return LogWriter(cfg.output, run_id, rank, fingerprint=fp, attrs=attrs, dim=rve.d, n_cells=n_cells,
                         n_phases=n_ph, flush_every=cfg.flush_every, check_folder=False)

    writer = _collective(comm, mk_writer) if len(todo) else None
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
            if not quiet and rank == 0 and (time.perf_counter() - last > log_every or c + 1 == len(mine)):
                last = time.perf_counter()
                print(f"  rank 0: {c + 1}/{len(mine)} points ({(c + 1) / (last - t0):.1f} points/s per rank)",
                      flush=True)
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
        from fe2ml.errors import Fe2mlError

        if err is not None and not isinstance(err, Fe2mlError):
            raise err
        raise Fe2mlError(f"sampling failed ({first}); records up to the failure are kept in {cfg.output}")
    stats = comm.gather({"eval": t_eval, "log": t_log, "n": len(mine)}, root=0)
    wall = time.perf_counter() - t0
    out = {}
    if rank == 0:
        out = {"campaign_id": campaign_id, "fingerprint": fp, "designed": n, "skipped": len(done), "new": len(todo),
               "wall_s": wall, "eval_s": [s["eval"] for s in stats], "log_s": [s["log"] for s in stats]}
        if not quiet:
            print(f"  done: {len(todo)} new records in {wall:.1f} s ({len(todo) / max(wall, 1e-9):.1f} records/s), "
                  f"log writing {max(out['log_s']):.3f} s of {wall:.1f} s", flush=True)
    return out
