"""Where a surrogate can be trusted: the per-point criteria of a checkpoint, the hybrid's thresholds, the audit sample.

Torch-free, so that a run's config can be checked without loading the networks.

- :func:`relative_spread`, :func:`relative_error`: per-point quantities relative to |P̄| + floor, where the floor
  (``STRESS_FLOOR`` x the RMS of |P̄| over the training records) is a fixed property of the checkpoint: a point's
  value never depends on the other points of its rank;
- :class:`Gate`: the checkpoint's training box, data density (KD-tree of the training records) and calibration;
- :class:`Thresholds`: when a hybrid law sends a point to the RVE;
- :class:`AuditOptions` and :func:`point_uniform`: the run-time audit's partition-independent sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from fe2ml.errors import ConfigError

__all__ = ["MAGNITUDE_BINS", "MIN_PER_BIN", "STRESS_FLOOR", "AuditOptions", "Gate", "Thresholds", "point_factors",
           "point_uniform", "relative_error", "relative_spread", "rows_equal", "stress_magnitude", "uncertainty"]

STRESS_FLOOR = 0.05  # per-point relative quantities are taken relative to |P̄| + STRESS_FLOOR * RMS |P̄|train


LEVELS = (0.9, 0.95)  # the split-conformal levels a calibration holds (factor90, factor95)
MAGNITUDE_BINS = 3  # Mondrian calibration: bins of the predicted stress magnitude (quantiles of the calibration set)
MIN_PER_BIN = 40  # fewer calibration points per bin: one bin


def rows_equal(a: np.ndarray) -> bool:
    """Whether the n ≥ 2 rows of ``a`` (n, ...) are all equal (not-a-number never is).

    E.g. F̄ = I at every point of an undeformed body: one row's evaluation then serves every point. The first 64
    rows decide most cases.
    """
    a = np.asarray(a)
    if len(a) < 2:
        return False
    first = a[:1]
    return bool((a[:64] == first).all() and (a == first).all())


def stress_magnitude(Ps: np.ndarray, floor: float) -> np.ndarray:
    """|mean over members of P̄|_F / floor, Ps (K, n, d, d) -> (n,): what the calibration's bins are of."""
    Ps = np.asarray(Ps)
    mean = Ps.reshape(*Ps.shape[:2], int(np.prod(Ps.shape[2:]))).mean(axis=0)
    return np.sqrt(np.einsum("nm,nm->n", mean, mean)) / floor


def point_factors(calibration: dict, magnitude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The 90 % and 95 % factors (error / spread) at each point: its magnitude bin's, or the global ones.

    Without bins in the calibration (one bin, or a checkpoint written before them) or without magnitudes, every
    point gets the global factors.
    """
    bins = calibration.get("bins")
    if bins is None or magnitude is None:
        n = 1 if magnitude is None else len(magnitude)
        return np.full(n, float(calibration["factor90"])), np.full(n, float(calibration["factor95"]))
    which = np.searchsorted(np.asarray(bins["magnitude_edges"]), np.asarray(magnitude))
    return np.asarray(bins["factor90"])[which], np.asarray(bins["factor95"])[which]


def uncertainty(spread: np.ndarray, magnitude: np.ndarray | None, offset: float) -> np.ndarray:
    """A point's calibrated uncertainty: its relative spread plus the ensemble's typical absolute error relative to it.

    u = spread + offset / (magnitude + 1), with ``magnitude`` = |mean P̄| / floor (:func:`stress_magnitude`) and
    ``offset`` the calibration's median absolute training error in units of the floor (0: the spread alone, as in
    checkpoints written before the offset).
    """
    spread = np.asarray(spread, dtype=np.float64)
    if not offset:
        return spread
    if magnitude is None:
        raise ValueError("uncertainty: a calibration with an offset needs the points' stress magnitudes")
    return spread + offset / (np.asarray(magnitude, dtype=np.float64) + 1.0)


def relative_spread(Ps: np.ndarray, floor: float) -> np.ndarray:
    """Per-point ensemble spread: |std over members of P̄|_F / (|mean P̄|_F + floor); Ps (K, n, d, d) -> (n,)."""
    Ps = np.asarray(Ps)
    K, n = Ps.shape[:2]
    flat = Ps.reshape(K, n, int(np.prod(Ps.shape[2:])))
    mean = flat.mean(axis=0)
    dev = flat - mean
    return np.sqrt(np.einsum("knm,knm->n", dev, dev) / K) / (np.sqrt(np.einsum("nm,nm->n", mean, mean)) + floor)


def relative_error(P: np.ndarray, P_true: np.ndarray, floor: float) -> np.ndarray:
    """Per-point error |P̄ − P̄_true|_F / (|P̄_true|_F + floor); (n, d, d) -> (n,)."""
    P, P_true = np.asarray(P), np.asarray(P_true)
    axes = tuple(range(1, P.ndim))
    return np.sqrt(np.sum((P - P_true) ** 2, axis=axes)) / (np.sqrt(np.sum(P_true**2, axis=axes)) + floor)


class Gate:
    """The per-point criteria of a checkpoint that tell where its surrogate can be trusted.

    Args:
        ck: the checkpoint dict.

    Attributes:
        members: ensemble size.
        floor: the stress floor of per-point relative quantities.
        calibration: the calibration dict, or None (one member).
    """

    def __init__(self, ck: dict):
        self.members = len(ck["members"])
        self.floor = float(ck["stress_floor"])
        self.calibration = ck.get("calibration")
        self.lo = np.asarray(ck["bounds"]["feature_min"])
        self.hi = np.asarray(ck["bounds"]["feature_max"])
        self.x_scale = np.asarray(ck["density"]["x_scale"])
        self.tree = cKDTree(np.asarray(ck["density"]["points"], dtype=np.float64))
        self.density_scale = float(ck["density"]["scale"])
        self._anchors: tuple[np.ndarray, np.ndarray] | None = None  # (scaled features, distance) of the last queries

    def box_distance(self, x: np.ndarray) -> np.ndarray:
        """Largest relative excursion of features x (n, m) outside the training box (0 inside)."""
        w = np.maximum(self.hi - self.lo, 1e-12)
        return np.max(np.maximum(0.0, np.maximum(self.lo - x, x - self.hi)) / w, axis=1)

    def density_distance(self, x: np.ndarray, *, bound: float | None = None) -> np.ndarray:
        """Distance of features x (n, m) to the nearest training record, in units of the data-density scale.

        With ``bound`` (in the same units) the search stops there: points farther away get inf (faster).
        """
        upper = np.inf if bound is None else bound * self.density_scale
        d, _ = self.tree.query(x / self.x_scale, k=1, distance_upper_bound=upper)
        return np.asarray(d) / self.density_scale

    def density_flags(self, x: np.ndarray, threshold: float) -> np.ndarray:
        """Whether each point's density distance exceeds ``threshold`` (the hybrid's density criterion), (n,) bool.

        Exact, and cheap across the Newton iterations of a run: every point keeps an anchor, the scaled features and
        the distance of its last tree query. By the triangle inequality its distance now is at most the anchor's
        plus how far it has moved from it; where that bound is within the threshold the point is not flagged without
        a query. Only the others are queried (and re-anchored). Any points may be passed: a new set of points of
        another size, or points far from their anchors, are simply queried.
        """
        xs = np.asarray(x, dtype=np.float64) / self.x_scale
        n = len(xs)
        scale = self.density_scale
        if self._anchors is not None and self._anchors[0].shape == xs.shape:
            xa, da = self._anchors
            query = ~(da + np.sqrt(np.sum((xs - xa) ** 2, axis=1)) / scale <= threshold)
        elif rows_equal(xs):  # one query serves every point
            d1, _ = self.tree.query(xs[:1], k=1, distance_upper_bound=threshold * scale)
            d1 = np.asarray(d1) / scale
            self._anchors = (xs.copy(), np.full(n, d1[0]))
            return np.full(n, not d1[0] <= threshold)
        else:
            xa, da = xs.copy(), np.full(n, np.inf)
            query = np.ones(n, dtype=bool)
        out = np.zeros(n, dtype=bool)
        idx = np.flatnonzero(query)
        if len(idx):
            d, _ = self.tree.query(xs[idx], k=1, distance_upper_bound=threshold * scale)
            d = np.asarray(d) / scale
            out[idx] = ~(d <= threshold)
            xa[idx], da[idx] = xs[idx], d
        self._anchors = (xa, da)
        return out

    def predicted_error(self, spread: np.ndarray, magnitude: np.ndarray | None = None,
                        level: float = 0.9) -> np.ndarray:
        """The calibrated error bound: the ``level`` quantile of error/u on the validation split times u.

        u is the point's :func:`uncertainty` (its spread plus the calibration's offset relative to its stress; needs
        ``magnitude``, :func:`stress_magnitude` of the points, where the calibration has an offset). ``level``: 0.9 or
        0.95 (the calibration's factor90 or factor95). With ``magnitude`` the quantile of each point's magnitude bin
        (Mondrian split-conformal: the level holds within each bin, small stresses included).
        """
        if self.calibration is None:
            raise ConfigError("this checkpoint has no calibration (train an ensemble of 2 or more members)")
        if level not in LEVELS:
            raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
        f90, f95 = point_factors(self.calibration, magnitude)
        return (f90 if level == 0.9 else f95) * uncertainty(spread, magnitude, self.calibration.get("offset", 0.0))


@dataclass(frozen=True)
class Thresholds:
    """When a hybrid law sends a point to the RVE (None: the criterion is off).

    Attributes:
        spread: per-point relative ensemble spread (needs 2 or more members).
        error: calibrated predicted error, factor × uncertainty at the conformal ``level`` (needs a calibrated
            checkpoint; :meth:`Gate.predicted_error`).
        distance: relative excursion outside the training box.
        density: distance to the nearest training record in data-density scales.
        level: the split-conformal level of ``error``'s bound: 0.9 (factor90) or 0.95 (factor95).
    """

    spread: float | None = None
    error: float | None = None
    distance: float = 0.0
    density: float = 2.0
    level: float = 0.9

    def check(self, gate: Gate, where: str = "threshold") -> None:
        """Refuse criteria the checkpoint cannot evaluate (one member, no calibration) and negative values."""
        for key in ("spread", "error", "distance", "density"):
            v = getattr(self, key)
            if v is not None and not v >= 0:
                raise ConfigError(f"{where}.{key}: expected a number >= 0, got {v!r}")
        if self.level not in LEVELS:
            raise ConfigError(f"{where}.level: expected 0.9 or 0.95 (the calibrated levels), got {self.level!r}")
        for key in ("spread", "error"):
            if getattr(self, key) is not None and gate.members < 2:
                raise ConfigError(f"{where}.{key}: needs an ensemble of 2 or more members; the checkpoint has "
                                  f"{gate.members} (train with ensemble: 2, or leave {key} out)")
        if self.error is not None and gate.calibration is None:
            raise ConfigError(f"{where}.error: the checkpoint has no calibration (retrain it with ensemble >= 2)")


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def point_uniform(x: np.ndarray, seed: int, step: int) -> np.ndarray:
    """A number in [0, 1) per point from its coordinates (n, d), a seed and a step: the same on any partition."""
    q = np.round(np.asarray(x, dtype=np.float64) * 1e8).astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(np.full(len(q), np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(step), dtype=np.uint64))
        for j in range(q.shape[1]):
            h = _mix(h ^ q[:, j])
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


@dataclass(frozen=True)
class AuditOptions:
    """``material.audit``: the fraction of surrogate-answered points re-solved with the RVE every load step.

    Attributes:
        fraction: in (0, 1].
        seed: of the (partition-independent) sample.
        target: the error a point should stay below (the hybrid's ``threshold.error`` when given).
    """

    fraction: float
    seed: int = 0
    target: float = 0.01
