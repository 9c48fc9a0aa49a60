"""Surrogate and hybrid constitutive laws for the macro solver (the contract of :mod:`fe2ml.laws.base`).

A trained checkpoint (:mod:`fe2ml.surrogate.checkpoint`) answers every point of a rank in one batch; the hybrid law
sends the points where the ensemble is unsure, or that leave the training box, to this rank's RVE.
"""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import torch

from fe2ml.data.fingerprint import rve_description, rve_fingerprint
from fe2ml.data.log import LogWriter
from fe2ml.laws.base import ConstitutiveLaw
from fe2ml.micro.finite import HyperelasticRVE, RVEState
from fe2ml.surrogate.checkpoint import EnsembleModel, check_checkpoint, load_checkpoint

__all__ = ["HybridLaw", "SurrogateLaw", "fallback_writer"]


def fallback_writer(comm, folder, rve: HyperelasticRVE, *, dim: int) -> LogWriter:
    """This rank's log part for a hybrid law's fallback records (source kind ``hybrid_fallback``)."""
    return LogWriter(folder, f"hybrid{uuid.uuid4().hex[:6]}", comm.rank, fingerprint=rve_fingerprint(rve),
                     attrs={"source_kind": "hybrid_fallback", "source_id": "hybrid", "kinematics": "finite",
                            "rve": json.dumps(rve_description(rve))}, dim=dim, flush_every=16)


class SurrogateLaw(ConstitutiveLaw):
    """A trained checkpoint as a constitutive law: batched over the points of a rank.

    Args:
        checkpoint: path of ``checkpoint.pt``.
        dim: dimension of the run; kinematics: of the run.
        fingerprint: RVE fingerprint of the run (checked when given).

    Raises:
        ConfigError: missing/unreadable checkpoint, or one of another dimension, kinematics or RVE.
    """

    def __init__(self, checkpoint, *, dim: int, kinematics: str = "finite", fingerprint: str | None = None):
        super().__init__(dim, kinematics)
        torch.set_num_threads(1)  # one thread per rank
        ck = load_checkpoint(checkpoint)
        check_checkpoint(ck, checkpoint, dim=dim, kinematics=kinematics, fingerprint=fingerprint)
        margs = {k: v for k, v in ck["model"].items() if k != "kind"}
        self.ck = ck
        self.model = EnsembleModel.from_states(ck["model"]["kind"], dim, kinematics, margs, ck["members"])
        self.bounds = ck["bounds"]
        self.model.evaluate_members(np.eye(dim)[None])  # set-up (numpy weights), like an RVE's form compilation

    def evaluate(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean ensemble prediction."""
        t0 = time.perf_counter()
        fast = self.model.fast_evaluator()
        if fast is not None and len(F) <= 1024:
            P, A = fast(F)  # one member, one chunk: no ensemble bookkeeping
        else:
            P, A = self.model.evaluate(F)
        dt = time.perf_counter() - t0
        self.stats["evaluations"] += len(F)
        self.stats["time_s"] += dt
        self.stats["surrogate_s"] += dt
        return P, A

    def distance(self, F) -> np.ndarray:
        """Largest relative excursion of each point's features outside the training box (0 inside)."""
        x = self.model.members[0].features_of(torch.as_tensor(np.asarray(F, dtype=np.float64))).detach().numpy()
        lo, hi = np.array(self.bounds["feature_min"]), np.array(self.bounds["feature_max"])
        w = np.maximum(hi - lo, 1e-12)
        return np.max(np.maximum(0.0, np.maximum(lo - x, x - hi)) / w, axis=1)


class HybridLaw(SurrogateLaw):
    """Surrogate where it is sure, true RVE where it is not.

    A point falls back to the RVE when the ensemble spread (std of P over members, relative to the
    RMS of the mean prediction) exceeds ``spread`` or its features leave the training box by more
    than ``distance`` (relative to the box width). Fallback records are appended to ``writer``
    (a :class:`fe2ml.data.log.LogWriter`) on commit.

    Args:
        checkpoint: path of the checkpoint.
        rve: :class:`fe2ml.micro.finite.HyperelasticRVE` of this rank (its fingerprint must match).
        spread: spread threshold; distance: out-of-bounds threshold.
        writer: optional log writer for the fallback records.
    """

    def __init__(self, checkpoint, rve: HyperelasticRVE, *, spread: float = 0.02, distance: float = 0.0,
                 writer: LogWriter | None = None):
        super().__init__(checkpoint, dim=rve.d, fingerprint=rve_fingerprint(rve))
        self.rve = rve
        self.spread_tol = spread
        self.distance_tol = distance
        self.writer = writer
        self.states: dict[int, RVEState] = {}
        self.trial: dict[int, RVEState] = {}
        self.pending: list = []
        self.flags_last = np.zeros(0, dtype=bool)

    def evaluate(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Surrogate for all points, RVE for the flagged ones."""
        t0 = time.perf_counter()
        Ps, As = self.model.evaluate_members(F)
        Ps, As = np.array(Ps), np.array(As)
        P, A = Ps.mean(0), As.mean(0)
        scale = max(float(np.sqrt(np.mean(P**2))), 1e-300)
        spread = Ps.std(0).reshape(len(F), -1).max(axis=1) / scale if len(Ps) > 1 else np.zeros(len(F))
        flags = (spread > self.spread_tol) | (self.distance(F) > self.distance_tol)
        self.stats["surrogate_s"] += time.perf_counter() - t0
        idx = np.where(flags)[0]
        for k in map(int, idx):
            t1 = time.perf_counter()
            start = self.trial.get(k, self.states.get(k))
            state, its, _, R = self.rve.solve(F[k], start, point=k)
            P[k], A[k] = self.rve.homogenized(R)
            self.trial[k] = state
            self.stats["max_point_s"] = max(self.stats["max_point_s"], time.perf_counter() - t1)
        self.pending = [(F[idx].copy(), P[idx].copy(), A[idx].copy(), idx)]
        self.flags_last = flags
        self.stats["evaluations"] += len(F)
        self.stats["rve_solves"] += len(idx)
        self.stats["time_s"] += time.perf_counter() - t0
        return P, A

    def commit(self) -> None:
        """Keep the RVE states of this step; log its fallback records; count the fallback points."""
        self.states.update(self.trial)
        self.stats["fallbacks"] += int(self.flags_last.sum())
        self.stats["fallbacks_per_step"].append(int(self.flags_last.sum()))
        if self.writer is not None and self.pending and len(self.pending[0][0]):
            F, P, A, idx = self.pending[0]
            self.writer.add(F, P, A, point_id=idx, converged=1)
        self.pending = []

    def rollback(self) -> None:
        """Discard the trial states."""
        self.trial = {}
        self.pending = []

    def close(self) -> None:
        """Flush and close the fallback log part."""
        if self.writer is not None:
            self.writer.close()
