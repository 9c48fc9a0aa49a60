"""Recording the quadrature-point evaluations of an FE² run into the HDF5 log.

A :class:`Recorder` is given to a law at construction; the law reports every evaluated batch with
:meth:`Recorder.record` and forwards its ``commit``/``rollback``. :class:`MacroLogger` is the recorder that writes
converged (optionally all) evaluations of each load step to this rank's log part.
"""

from __future__ import annotations

import json
from typing import Protocol

import numpy as np

from fe2ml.data.fingerprint import rve_description, rve_fingerprint
from fe2ml.data.log import LogWriter
from fe2ml.micro.finite import HyperelasticRVE
from fe2ml.micro.linear import LinearRVE
from fe2ml.micro.quantities import CellQuantities

__all__ = ["MacroLogger", "Recorder", "make_macro_logger"]


class Recorder(Protocol):
    """What a law reports its evaluations to."""

    def record(self, F: np.ndarray, P: np.ndarray, A: np.ndarray, cells: list[CellQuantities] | None,
               newton_its: np.ndarray | None) -> None:
        """One evaluated batch: F̄, P̄ (n, d, d), Ā (n, d, d, d, d), cell quantities and RVE Newton its (or None)."""
        ...

    def commit(self) -> None:
        """The load step converged."""
        ...

    def rollback(self) -> None:
        """The load step was rejected."""
        ...


class MacroLogger:
    """Recorder of an RVE law (:mod:`fe2ml.laws.rve`): converged (optionally all) evaluations per load step.

    The law calls the logger with every evaluated batch; :meth:`commit` (load step converged) writes
    the last batch with ``converged = 1`` and, with ``all_iterations``, the earlier Newton iterates
    with ``converged = 0``; :meth:`rollback` (rejected step) keeps those iterates only with
    ``all_iterations``.

    Args:
        writer: :class:`fe2ml.data.log.LogWriter` of this rank.
        rank: MPI rank.
        all_iterations: also log non-converged Newton iterates.
    """

    def __init__(self, writer: LogWriter, rank: int, *, all_iterations: bool = False, cells: bool = False):
        self.writer = writer
        self.cells = cells  # the log holds cell quantities: the law must compute them
        self.rank = rank
        self.all_iterations = all_iterations
        self.pending: list = []
        self.last = None  # the last converged batch written
        self.step = 0
        self.point_ids: np.ndarray | None = None
        self.x: np.ndarray | None = None

    def set_points(self, point_ids: np.ndarray, x: np.ndarray) -> None:
        """Global ids and coordinates of this rank's quadrature points."""
        self.point_ids = np.asarray(point_ids, dtype=np.int64)
        self.x = np.asarray(x, dtype=np.float64)

    def record(self, F, P, A, cells, newton_its) -> None:
        """Called by the law with every evaluated batch."""
        self.pending.append((np.array(F), np.array(P), np.array(A), cells, newton_its))

    def _write(self, item, iteration, converged):
        F, P, A, cells, its = item
        n = len(F)
        ids = self.point_ids if self.point_ids is not None and len(self.point_ids) == n else np.arange(n)
        x = self.x if self.x is not None and len(self.x) == n else None
        self.writer.add(F, P, A, point_id=ids, step=self.step, iteration=iteration, converged=converged, x=x,
                        rank=self.rank, newton_its=0 if its is None else its, cells=cells)

    def commit(self):
        """The load step converged: write its converged batch (and iterates if requested).

        A step that converged at its first iterate without an evaluation (the last step's converged state, whose
        answer the law kept) has the last converged batch as its own.
        """
        if not self.pending:
            if self.last is not None:
                self._write(self.last, 0, 1)
            return
        if self.all_iterations:
            for k, item in enumerate(self.pending[:-1]):
                self._write(item, k, 0)
        self._write(self.pending[-1], len(self.pending) - 1, 1)
        self.last = self.pending[-1]
        self.pending.clear()

    def rollback(self):
        """The load step was rejected."""
        if self.all_iterations:
            for k, item in enumerate(self.pending):
                self._write(item, k, 0)
        self.pending.clear()

    def close(self):
        """Flush and close the part file."""
        self.writer.close()


def make_macro_logger(comm, rve: LinearRVE | HyperelasticRVE, folder, *, run_id: str, config_text: str,
                      all_iterations: bool = False, cells: bool = True) -> MacroLogger:
    """Create this rank's recorder for an FE² run (give it to the law at construction).

    The caller checks the folder's fingerprint on rank 0 first (:func:`fe2ml.data.log.check_fingerprint`).
    ``cells`` asks for cell quantities; they exist for finite-strain RVEs only (``MacroLogger.cells`` says whether
    the law must compute them).
    """
    fp = rve_fingerprint(rve)
    finite = isinstance(rve, HyperelasticRVE)
    nc = int(rve.rve_mesh.n_cells) if (finite and cells) else 0
    nph = len(rve.rve_mesh.tags) if (finite and cells) else 0
    attrs = {"source_kind": "macro_run", "source_id": run_id, "config": config_text,
             "rve": json.dumps(rve_description(rve)), "kinematics": "finite" if finite else "small", "run_id": run_id}
    writer = LogWriter(folder, run_id, comm.rank, fingerprint=fp, attrs=attrs, dim=rve.d, n_cells=nc, n_phases=nph,
                       check_folder=False)
    return MacroLogger(writer, comm.rank, all_iterations=all_iterations, cells=bool(nc or nph))
