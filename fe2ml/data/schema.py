"""The HDF5 log's schema: version, per-record fields, the error type, and the one way to open a part for reading.

Both the writer (:mod:`fe2ml.data.log`) and the reader (:mod:`fe2ml.data.reader`) build on this module, so neither
imports the other. The layout and the field list are documented in :mod:`fe2ml.data.log`.
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import h5py
import numpy as np

from fe2ml.errors import Fe2mlError

__all__ = ["BASE_FIELDS", "SCHEMA_VERSION", "LogError", "dataset_names", "fill_value", "open_part", "part_files",
           "versions"]

SCHEMA_VERSION = 1
BASE_FIELDS = {
    "point_id": ((), np.int64),
    "step": ((), np.int32),
    "iteration": ((), np.int32),
    "converged": ((), np.int8),
    "x": ((3,), np.float64),
    "rank": ((), np.int32),
    "newton_its": ((), np.int32),
}


def dataset_names(f) -> list[str]:
    """Paths of every dataset in an open HDF5 file (``F``, ``cells/stretch``, ...), in visiting order."""
    out: list[str] = []
    f.visititems(lambda name, obj: out.append(name) if isinstance(obj, h5py.Dataset) else None)
    return out


def fill_value(dtype) -> float | int:
    """The fill value of a dataset of this dtype: NaN for floats, the smallest integer for ints.

    Datasets are created with it, so rows a torn flush allocated but never wrote are recognisable.
    """
    dtype = np.dtype(dtype)
    return float("nan") if dtype.kind == "f" else int(np.iinfo(dtype).min)


class LogError(Fe2mlError):
    """A log file is unreadable, of another schema, or incompatible with the data being written."""


def versions() -> dict:
    """Versions of fe2ml and its main dependencies."""
    out = {}
    for pkg in ("fe2ml", "fenics-dolfinx", "dolfinx-solver-real", "petsc4py", "mpi4py", "numpy", "h5py", "torch",
                "gmsh"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def part_files(folder: Path) -> list[Path]:
    """The ``*.h5`` part files of a log folder, sorted (none when the folder does not exist)."""
    return sorted(folder.glob("*.h5")) if folder.is_dir() else []


def open_part(path):
    """Open a log part for reading (SWMR when it is still being written); checks the schema.

    Raises:
        LogError: not readable HDF5, not an fe2ml log, or another schema version.
    """
    try:
        # plain read first: fails fast on damaged files (an SWMR reader retries checksums for a long time)
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        if "already open for" not in str(e) and "write" not in str(e).lower():
            raise LogError(f"{path}: not a readable HDF5 log ({str(e).splitlines()[0]}); the file is corrupt or "
                           "truncated") from None
        try:  # a part still being written, or left by a killed writer: SWMR read
            f = h5py.File(path, "r", swmr=True, locking=False)
        except OSError as e2:
            raise LogError(f"{path}: not a readable HDF5 log ({str(e2).splitlines()[0]}); the file is corrupt or "
                           "truncated") from None
    ver = f.attrs.get("schema_version")
    if ver is None or "fingerprint" not in f.attrs:
        f.close()
        raise LogError(f"{path}: not an fe2ml log (no schema_version/fingerprint attributes)")
    if int(ver) != SCHEMA_VERSION:
        f.close()
        raise LogError(f"{path}: schema version {int(ver)} is not supported (this fe2ml reads version "
                       f"{SCHEMA_VERSION})")
    return f
