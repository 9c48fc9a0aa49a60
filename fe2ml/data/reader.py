"""Reading fe2ml logs: arrays, filters, merging, and a lazily opened torch Dataset."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fe2ml.data.schema import LogError, dataset_names, fill_value, open_part

__all__ = ["LogData", "RowBlocks", "StreamedField", "find_parts", "intact_rows", "read_logs"]

log = logging.getLogger(__name__)


def find_parts(paths) -> list[Path]:
    """Part files of the given files and folders (folders: every ``*.h5`` inside), sorted.

    Raises:
        LogError: a path does not exist or a folder holds no part.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            parts = sorted(p.glob("*.h5"))
            if not parts:
                raise LogError(f"{p}: folder holds no .h5 log parts")
            out.extend(parts)
        elif p.is_file():
            out.append(p)
        else:
            raise LogError(f"{p}: no such log file or folder")
    return out


@dataclass
class LogData:
    """Records of one or more parts with the same fingerprint, as arrays.

    Attributes:
        fingerprint: the RVE fingerprint.
        dim: dimension; kinematics: small | finite.
        arrays: field name -> array with leading dimension n (see the schema in :mod:`fe2ml.data.log`).
        source: (n,) source id of every record; parts: the part files; attrs: attributes of each part.
        locations: (n, 2) part index (into ``parts``) and row of every record, when read with ``locate=True``.
    """

    fingerprint: str
    dim: int
    kinematics: str
    arrays: dict
    source: np.ndarray
    parts: list = field(default_factory=list)
    attrs: list = field(default_factory=list)
    locations: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.arrays["F"])

    def __getitem__(self, key):
        return self.arrays[key]

    @property
    def rve(self) -> dict:
        """RVE description of the first part."""
        return json.loads(self.attrs[0].get("rve", "{}")) if self.attrs else {}


def read_logs(paths, *, fingerprint: str | None = None, source: str | None = None, converged_only: bool = False,
              fields=None, locate: bool = False) -> LogData:
    """Read and merge log parts.

    Args:
        paths: files and/or folders.
        fingerprint: keep only parts of this fingerprint (required when several are present).
        source: keep only parts whose ``source_id`` or ``source_kind`` equals this.
        converged_only: drop non-converged (intermediate Newton) records.
        fields: restrict to these fields (default: all of the first part).
        locate: also return where each record lies (``LogData.locations``), to read other fields later.

    Returns:
        :class:`LogData`.

    Raises:
        LogError: unreadable/corrupt parts, schema mismatch, several fingerprints without a filter,
            nothing left after filtering.
    """
    parts = find_parts(paths)
    metas = []
    for p in parts:
        with open_part(p) as f:
            metas.append((p, {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}))
    fps = sorted({str(m["fingerprint"]) for _, m in metas})
    if fingerprint is None:
        if len(fps) > 1:
            raise LogError(f"logs hold several RVE fingerprints {fps}; choose one with fingerprint=")
        fingerprint = fps[0] if fps else ""
    sel = [(p, m) for p, m in metas if str(m["fingerprint"]) == fingerprint]
    if source is not None:
        sel = [(p, m) for p, m in sel if source in (str(m.get("source_id")), str(m.get("source_kind")))]
    if not sel:
        raise LogError(f"no log part matches fingerprint {fingerprint!r}"
                       + (f" and source {source!r}" if source else ""))
    arrays: dict[str, list] = {}
    srcs = []
    locs = []
    names = None
    for ip, (p, m) in enumerate(sel):
        with open_part(p) as f:
            if names is None:
                names = fields or dataset_names(f)
                if fields and "p" in f and "p" not in names:  # a parametric log: the parameters go with F
                    names = [*names, "p"]
            try:
                for k in names:
                    if k not in f:
                        raise LogError(f"{p}: field {k} missing (parts of one fingerprint must share their fields)")
                n, keep = intact_rows(f, p)
                for k in names:
                    arrays.setdefault(k, []).append(f[k][:n][keep])
                rows = np.flatnonzero(keep)
                locs.append(np.stack([np.full(len(rows), ip), rows], axis=1))
            except (OSError, KeyError) as e:
                raise LogError(f"{p}: records cannot be read ({str(e).splitlines()[0]}); the file is corrupt or "
                               "truncated") from None
            srcs.append(np.full(int(keep.sum()), str(m.get("source_id", p.stem)), dtype=object))
    data = {k: np.concatenate(v) for k, v in arrays.items()}
    src = np.concatenate(srcs) if srcs else np.zeros(0, dtype=object)
    loc = np.concatenate(locs).astype(np.int64) if locs else np.zeros((0, 2), dtype=np.int64)
    if converged_only and "converged" in data:
        keep = data["converged"] == 1
        data = {k: v[keep] for k, v in data.items()}
        src = src[keep]
        loc = loc[keep]
    m0 = sel[0][1]
    return LogData(fingerprint=fingerprint, dim=int(m0["dim"]), kinematics=str(m0.get("kinematics", "finite")),
                   arrays=data, source=src, parts=[p for p, _ in sel], attrs=[m for _, m in sel],
                   locations=loc if locate else None)


class _LazyParts:
    """Part files opened on first use in the process that reads them (DataLoader workers fork before that)."""

    parts: list

    def _file(self, k):
        if getattr(self, "_pid", None) != os.getpid():  # a new worker: never reuse handles across a fork
            self._files: dict = {}
            self._pid = os.getpid()
        if k not in self._files:
            self._files[k] = open_part(self.parts[k])
        return self._files[k]

    def close(self) -> None:
        """Close the files this process opened (before a DataLoader forks its workers)."""
        for f in getattr(self, "_files", {}).values():
            f.close()
        self._files = {}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_files", "_pid")}


class StreamedField(_LazyParts):
    """One field of logged records, left in the files and read on demand (``A[idx]`` reads those records).

    Args:
        parts: the part files (``LogData.parts``).
        locations: (n, 2) part index and row of every record (``LogData.locations``).
        name: the field (e.g. ``A``).
        chunk: rows read at a time when gathering scattered records.
    """

    def __init__(self, parts, locations: np.ndarray, name: str, *, chunk: int = 65536):
        self.parts = [str(p) for p in parts]
        self.locations = np.asarray(locations, dtype=np.int64)
        self.name = name
        self.chunk = chunk
        with open_part(self.parts[0]) as f:
            self.row_shape = tuple(f[name].shape[1:])
        self._kept_idx = np.zeros(0, dtype=np.int64)
        self._kept = np.zeros((0, *self.row_shape))

    def __len__(self) -> int:
        return len(self.locations)

    def keep(self, idx) -> None:
        """Read these records once and hold them in memory: later reads of only them are served from there."""
        self._kept_idx = np.unique(np.asarray(idx, dtype=np.int64))
        self._kept = self._read(self._kept_idx)

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        pos = np.minimum(np.searchsorted(self._kept_idx, idx), max(len(self._kept_idx) - 1, 0))
        if len(self._kept_idx) and np.array_equal(self._kept_idx[pos], idx):
            return self._kept[pos]
        return self._read(idx)

    def _read(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.row_shape))
        loc = self.locations[idx]
        for k in np.unique(loc[:, 0]):
            sel = np.flatnonzero(loc[:, 0] == k)
            rows = loc[sel, 1]
            order = np.argsort(rows)
            sel, rows = sel[order], rows[order]
            ds = self._file(int(k))[self.name]
            for lo in range(int(rows[0]), int(rows[-1]) + 1, self.chunk):  # bounded reads, however scattered
                a, b = np.searchsorted(rows, [lo, lo + self.chunk])
                if a < b:
                    slab = ds[lo:min(int(rows[b - 1]) + 1, lo + self.chunk)]
                    out[sel[a:b]] = slab[rows[a:b] - lo]
        return out

    def blocks(self, records, size: int) -> RowBlocks:
        """The given records in blocks of ``size`` consecutive log rows, for a DataLoader."""
        return RowBlocks(self, records, size)


class RowBlocks(_LazyParts):
    """A torch map-style dataset of blocks of records: item b = (record indices, their rows of one field).

    The records are sorted by part and row and cut into blocks of ``size``; a block is read with one contiguous
    read, and its rows with non-finite values are left out. Shuffling the blocks (``DataLoader(shuffle=True)``)
    changes the order of the mini-batches from epoch to epoch, not their members.
    """

    def __init__(self, field_: StreamedField, records, size: int):
        self.parts, self.name = field_.parts, field_.name
        records = np.asarray(records, dtype=np.int64)
        loc = field_.locations[records]
        order = np.lexsort((loc[:, 1], loc[:, 0]))
        records, loc = records[order], loc[order]
        self.blocks = []
        for k in np.unique(loc[:, 0]):
            sel = np.flatnonzero(loc[:, 0] == k)
            for i in range(0, len(sel), size):
                s_ = sel[i:i + size]
                self.blocks.append((int(k), records[s_], loc[s_, 1]))

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, b):
        # deferred: torch only for the streamed training loader
        import torch

        k, recs, rows = self.blocks[b]
        vals = self._file(k)[self.name][int(rows[0]):int(rows[-1]) + 1][rows - rows[0]]
        ok = np.isfinite(vals.reshape(len(vals), -1)).all(axis=1)
        return torch.as_tensor(recs[ok]), torch.as_tensor(vals[ok])


def intact_rows(f, p) -> tuple[int, np.ndarray]:
    """Rows of a part that a complete flush wrote: (extent, mask over it).

    A process killed inside a flush can leave datasets of different lengths (they are resized one by one) and rows
    that were allocated but never written (they hold the fill values). The extent is the smallest over all
    datasets; rows whose F or point_id hold the fill value are dropped, with a warning naming the part.
    """
    datasets = [f[k] for k in dataset_names(f)]
    extents = [ds.shape[0] for ds in datasets]
    n = min(extents) if extents else 0
    keep = np.isfinite(f["F"][:n]).all(axis=(1, 2)) & (f["point_id"][:n] != fill_value(np.int64))
    dropped = (max(extents, default=0) - n) + int((~keep).sum())
    if dropped:
        log.warning("%s: %d torn record row(s) dropped (an interrupted flush); %d intact", p, dropped,
                    int(keep.sum()))
    return n, keep


class RVEDataset(_LazyParts):
    """A torch ``Dataset`` over log parts, opened lazily in each worker process.

    Items are dicts of torch tensors (float64) for ``fields`` (default F, P, A). The index is built
    once from the part sizes; file handles are opened on first access in the process that uses them
    (so a DataLoader with workers forks before any HDF5 handle exists).

    Args:
        paths: files and/or folders.
        fingerprint: RVE fingerprint (required when several are present).
        fields: fields to return.
    """

    def __init__(self, paths, *, fingerprint: str | None = None, fields=("F", "P", "A")):
        meta = read_logs(paths, fingerprint=fingerprint, fields=["point_id"])
        self.parts = meta.parts
        self.fields = list(fields)
        sizes = []
        for p in self.parts:
            with open_part(p) as f:
                n, keep = intact_rows(f, p)
                sizes.append(n if keep.all() else int(np.argmin(keep)))  # the intact leading rows
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._files: dict = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i):
        # deferred: torch only for the streamed training loader
        import torch

        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        f = self._file(k)
        j = i - int(self.offsets[k])
        return {name: torch.as_tensor(np.asarray(f[name][j])) for name in self.fields}
