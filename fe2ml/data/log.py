"""HDF5 log of RVE evaluations: one record per evaluated point, append-only and crash-safe.

Layout: a log is a folder (``rve_data/<name>/``) of part files ``part-<run>-r<rank>.h5``; every
process of every run writes its own part (no parallel HDF5 needed, no coordination between ranks),
and readers merge the parts of a folder. A part is written in SWMR mode: after each flush the file
on disk is consistent, so a process killed at any moment leaves a file that opens and holds every
record up to its last flush. Parts are never reopened for writing (a resumed run writes new parts).

Schema (``SCHEMA_VERSION`` = 1), per record (n = records, d = dimension, c = cells, p = phases)::

    F (n,d,d)  P (n,d,d)  A (n,d,d,d,d)       float64: macro F̄, homogenized P̄, tangent Ā = ∂P̄/∂F̄
    point_id (n,)  int64                       design point index (campaign) or macro quadrature point id
    step (n,)  int32                           campaign: path index or -1; macro run: load step
    iteration (n,)  int32                      macro Newton iteration (-1: not recorded)
    converged (n,)  int8                       1 for converged states
    x (n,3)  float64                           macro quadrature point coordinates (nan for campaigns)
    rank (n,)  int32                           MPI rank that computed the record
    newton_its (n,) int32                      RVE Newton iterations
    cells/<key>  (n,c,...)                     per-cell quantities (volume, F, E, stretch, J, W, sigma,
                                               von_mises, sigma_max, phase), see CellQuantities
    phases/<key> (n,p,...)                     per-phase quantities, peak_E and peak_von_mises (n,p)
    p (n,k)  float64                           parametric campaigns only: the record's microstructure parameters

File attributes: schema_version, fingerprint, rve (JSON description: mesh hash, materials, BCs,
discretisation), dim, kinematics, source_kind (campaign | macro_run), source_id, design (JSON, campaigns),
config (YAML text), fe2ml_version, versions (JSON), created (ISO 8601), rank, n_cells, phase_tags; parametric
campaigns add parameters (JSON list of the k names) and parameter_box (JSON {name: [lo, hi]}), and their fingerprint
is that of the family (the base RVE config and the parameter names), the RVE of each record being the base with p.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np

from fe2ml.data.schema import (
    BASE_FIELDS,
    SCHEMA_VERSION,
    LogError,
    dataset_names,
    fill_value,
    open_part,
    part_files,
    versions,
)
from fe2ml.errors import ConfigError
from fe2ml.files import atomic_target
from fe2ml.parallel import fault_point

__all__ = [
    "SCHEMA_VERSION",
    "LogError",
    "LogWriter",
    "check_fingerprint",
    "check_folder_writable",
    "folder_fingerprints",
    "truncate_part",
    "versions",
]

def folder_fingerprints(folder: Path) -> dict[str, str]:
    """Fingerprint of every readable part in a folder: {file name: fingerprint}."""
    out = {}
    for p in part_files(Path(folder)):
        try:
            with open_part(p) as f:
                out[p.name] = str(f.attrs.get("fingerprint", ""))
        except LogError:
            out[p.name] = "<unreadable>"
    return out


def check_fingerprint(folder, fingerprint: str) -> None:
    """Refuse a folder whose readable parts hold another RVE fingerprint (unreadable parts are ignored)."""
    others = {n: fp for n, fp in folder_fingerprints(Path(folder)).items()
              if fp not in (fingerprint, "<unreadable>")}
    if others:
        name, fp = next(iter(others.items()))
        raise LogError(f"{folder}: holds records of another RVE (part {name} has fingerprint {fp}, this RVE has "
                       f"{fingerprint}); use another folder")


class LogWriter:
    """Append-only writer of one part file (one process).

    Args:
        folder: log folder (created if needed).
        run_id: identifier of this run (part files are ``part-<run_id>-r<rank>.h5``).
        rank: MPI rank of this process.
        fingerprint: RVE fingerprint; the folder must not hold parts of another fingerprint.
        attrs: file attributes (dim, kinematics, rve description, source, config, ...).
        n_cells: number of biological cells (0: no cell quantities), n_phases: number of phases.
        flush_every: records buffered before a flush.
        flush_seconds: a record added this long after the last flush flushes the buffer at once (there is no
            background timer: the run flushes every writer before each checkpoint, the campaign at its end).

    Raises:
        LogError: the folder holds records of another fingerprint, or cannot be written.
    """

    _flushes = 0  # flushes of this process (all writers), for the chaos tests' fault point

    def __init__(self, folder, run_id: str, rank: int, *, fingerprint: str, attrs: dict, dim: int,
                 n_cells: int = 0, n_phases: int = 0, flush_every: int = 64, flush_seconds: float = 30.0,
                 check_folder: bool = True, parameters: list[str] | None = None):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LogError(f"{self.folder}: cannot create the log folder ({e.strerror})") from None
        if check_folder:
            check_fingerprint(self.folder, fingerprint)
        if not os.access(self.folder, os.W_OK):
            raise LogError(f"{self.folder}: log folder is not writable")
        self.path = self.folder / f"part-{run_id}-r{rank:04d}.h5"
        if self.path.exists():
            raise LogError(f"{self.path}: exists already; parts are never overwritten")
        self.d = dim
        self.nc = n_cells
        self.np_ = n_phases
        self.flush_every = int(flush_every)
        self.flush_seconds = float(flush_seconds)
        self._buf: list = []
        self._n_buf = 0
        self._last_flush = time.monotonic()
        self.n_written = 0
        # created under a hidden name and renamed once its header is on disk: a process killed while creating the
        # part leaves no truncated ``*.h5`` that readers would have to refuse
        self._creating = self.folder / f".{self.path.name}.creating"
        try:
            self.f = h5py.File(self._creating, "w", libver="latest", rdcc_nbytes=256 * 1024)
        except OSError as e:
            raise LogError(f"{self.path}: cannot create ({e})") from None
        fault_point("create")
        f = self.f
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["fingerprint"] = fingerprint
        f.attrs["rank"] = rank
        f.attrs["created"] = datetime.now(UTC).isoformat()
        f.attrs["fe2ml_version"] = versions().get("fe2ml", "unknown")
        f.attrs["versions"] = json.dumps(versions())
        f.attrs["dim"] = dim
        f.attrs["n_cells"] = n_cells
        for k, v in attrs.items():
            f.attrs[k] = v if isinstance(v, str | int | float | np.ndarray | list) else json.dumps(v)
        d = dim
        self._shapes = {"F": ((d, d), np.float64), "P": ((d, d), np.float64), "A": ((d, d, d, d), np.float64),
                        **BASE_FIELDS}
        self.parameters = list(parameters or [])
        if self.parameters:  # a parametric campaign: every record's microstructure parameter vector
            f.attrs["parameters"] = json.dumps(self.parameters)
            self._shapes["p"] = ((len(self.parameters),), np.float64)
        if n_cells or n_phases:
            cq = {"volume": (), "F": (3, 3), "E": (3, 3), "stretch": (3,), "J": (), "W": (), "sigma": (3, 3),
                  "von_mises": (), "sigma_max": ()}
            for k, s in cq.items():
                if n_cells:
                    self._shapes[f"cells/{k}"] = ((n_cells, *s), np.float64)
                self._shapes[f"phases/{k}"] = ((n_phases, *s), np.float64)
            if n_cells:
                self._shapes["cells/phase"] = ((n_cells,), np.int32)
            self._shapes["phases/peak_E"] = ((n_phases,), np.float64)
            self._shapes["phases/peak_von_mises"] = ((n_phases,), np.float64)
        self._ds = {}
        for name, (shape, dt) in self._shapes.items():
            per = int(np.prod(shape)) if shape else 1
            chunk = max(1, min(4096, 65536 // max(per, 1)))
            comp = {"compression": "gzip", "compression_opts": 1, "shuffle": True} if per >= 16 else {}
            self._ds[name] = f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dt,
                                              chunks=(chunk, *shape), fillvalue=fill_value(dt), **comp)
        f.swmr_mode = True
        f.flush()
        os.replace(self._creating, self.path)

    def add(self, F, P, A, *, point_id, step=-1, iteration=-1, converged=1, x=None, rank=0, newton_its=0,
            cells=None, p=None) -> None:
        """Buffer a batch of records (arrays with leading dimension n) and flush when due.

        Args:
            F: macro deformation gradients (n, d, d).
            P: homogenized stresses (n, d, d).
            A: tangents (n, d, d, d, d).
            point_id: (n,) ints.
            step: load step or path index (scalar or (n,)).
            iteration: Newton iteration (scalar or (n,)).
            converged: 1 for converged states (scalar or (n,)).
            x: (n, 3) or (n, d) coordinates (nan if None).
            rank: MPI rank (scalar or (n,)).
            newton_its: RVE Newton iterations (scalar or (n,)).
            cells: list of n :class:`~fe2ml.micro.finite.CellQuantities` (or None).
            p: the microstructure parameters ((k,) or (n, k)) of a parametric log (required there).
        """
        F = np.asarray(F, dtype=np.float64)
        n = len(F)
        if n == 0:
            return
        d = self.d
        if F.shape != (n, d, d):
            raise LogError(f"{self.path}: F has shape {F.shape[1:]}, the log expects ({d}, {d})")
        # cheap here; arrays are assembled in bulk at flush time
        if self.parameters:
            if p is None or np.shape(p)[-1:] != (len(self.parameters),):
                raise LogError(f"{self.path}: every record of a parametric log needs its {len(self.parameters)} "
                               f"parameter value(s) ({', '.join(self.parameters)})")
            p = np.broadcast_to(np.asarray(p, dtype=np.float64), (n, len(self.parameters)))
        self._buf.append((n, F, P, A, point_id, step, iteration, converged, x, rank, newton_its, cells, p))
        self._n_buf += n
        if self._n_buf >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def _assemble(self) -> dict:
        """Turn the buffered batches into one array per field."""
        buf = self._buf
        out = {}
        out["F"] = np.concatenate([b[1] for b in buf])
        for k, i in (("P", 2), ("A", 3)):
            out[k] = np.concatenate([np.asarray(b[i], dtype=np.float64).reshape(b[0], *self._shapes[k][0])
                                     for b in buf])
        for k, i in (("point_id", 4), ("step", 5), ("iteration", 6), ("converged", 7), ("rank", 9),
                     ("newton_its", 10)):
            dt = BASE_FIELDS[k][1]
            out[k] = np.concatenate([np.broadcast_to(np.asarray(b[i], dtype=dt), (b[0],)) for b in buf])
        xs = []
        for b in buf:
            xx = np.full((b[0], 3), np.nan)
            if b[8] is not None:
                x = np.asarray(b[8], dtype=np.float64).reshape(b[0], -1)
                xx[:, : x.shape[1]] = x
            xs.append(xx)
        out["x"] = np.concatenate(xs)
        if self.parameters:
            out["p"] = np.concatenate([b[12] for b in buf])
        cell_keys = [k for k in self._shapes if k.startswith(("cells/", "phases/"))]
        if cell_keys:
            allc = [c for b in buf for c in (b[11] if b[11] is not None else [None] * b[0])]
            for key in cell_keys:
                shape, dt = self._shapes[key]
                fill = np.nan if dt == np.float64 else -1
                if key.startswith("cells/"):
                    vals = [c.cell[key[6:]] if c is not None else np.full(shape, fill) for c in allc]
                elif key in ("phases/peak_E", "phases/peak_von_mises"):
                    vals = [getattr(c, key[7:]) if c is not None else np.full(shape, fill) for c in allc]
                else:
                    vals = [c.phase[key[7:]] if c is not None else np.full(shape, fill) for c in allc]
                arr = np.asarray(vals, dtype=dt)
                if arr.shape[1:] != shape:
                    raise LogError(f"{self.path}: record field {key} has shape {arr.shape[1:]}, the log expects "
                                   f"{shape}")
                out[key] = arr
        n = len(out["F"])
        for key, (shape, _) in self._shapes.items():
            if out[key].shape != (n, *shape):
                raise LogError(f"{self.path}: record field {key} has shape {out[key].shape[1:]}, the log expects "
                               f"{shape}")
        return out

    def flush(self) -> None:
        """Write the buffered records and make them durable (SWMR flush)."""
        if not self._buf:
            return
        try:
            rec = self._assemble()
        except Exception:
            self._buf.clear()
            self._n_buf = 0
            raise
        n_new = len(rec["F"])
        n0 = self.n_written
        LogWriter._flushes += 1
        try:
            for i, (key, ds) in enumerate(self._ds.items()):
                ds.resize(n0 + n_new, axis=0)
                ds[n0:] = rec[key]
                if i == len(self._ds) // 2 and os.environ.get("FE2ML_KILL", "").startswith("flush:"):
                    self.f.flush()  # chaos tests: make the half-written flush visible, then maybe die
                    fault_point(f"flush:{LogWriter._flushes}")
            self.f.flush()
        except OSError as e:
            self._buf.clear()
            self._n_buf = 0
            # readers see the dataset extents of the last successful flush; shrink back to them
            try:
                for ds in self._ds.values():
                    ds.resize(n0, axis=0)
            except OSError:
                pass
            raise LogError(f"{self.path}: writing records failed ({e}); the {n0} records of earlier flushes are "
                           "intact") from None
        self.n_written += n_new
        self._buf.clear()
        self._n_buf = 0
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and close the part file."""
        if getattr(self, "f", None) is not None:
            try:
                self.flush()
            finally:
                self.f.close()
                self.f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def truncate_part(path, n: int) -> int:
    """Keep the first ``n`` records of a closed part; returns the number of records dropped.

    A restarted run drops what its dead writer flushed after the checkpoint it restarts from. The part is
    rewritten to a temporary file and renamed over the old one, so a kill during the repair leaves the old part
    intact.
    """
    path = Path(path)
    with atomic_target(path) as tmp:  # renamed over the part after both files are closed
        with open_part(path) as src:
            names = dataset_names(src)
            extent = min(src[k].shape[0] for k in names) if names else 0
            if extent <= n:
                return 0
            with h5py.File(tmp, "w", libver="latest") as dst:
                for k, v in src.attrs.items():
                    dst.attrs[k] = v
                for k in names:
                    ds = src[k]
                    dst.create_dataset(k, data=ds[:n], maxshape=(None, *ds.shape[1:]), chunks=ds.chunks,
                                       fillvalue=fill_value(ds.dtype))
    return extent - n


def check_folder_writable(folder) -> None:
    """Raise ConfigError if a log folder cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{folder}: log folder is not writable ({e.strerror})") from None
