"""Surrogate and hybrid constitutive laws for the macro solver (the contract of :mod:`fe2ml.laws.base`).

A trained checkpoint (:mod:`fe2ml.surrogate.checkpoint`) answers every point of a rank in one batch; the hybrid law
sends the points the surrogate cannot be trusted with to this rank's RVE. Its gate (:class:`Thresholds`) is per
point, so a point's answer never depends on which other points share its rank:

- a non-finite prediction always falls back;
- ``spread``: the ensemble spread |std P̄|/(|P̄| + floor) exceeds it (needs 2 or more members);
- ``error``: the calibrated predicted error (factor90 x the point's uncertainty,
  :func:`fe2ml.surrogate.gate.uncertainty`, fitted on held-out data) exceeds it;
- ``distance``: the features leave the training box by more than this fraction of its width;
- ``density``: the nearest training record is farther than this many data-density scales (empty corners of the
  box count as outside).

:class:`Audit` checks the surrogate during a run: at a random, partition-independent sample of the points it
answered, it solves the true RVE and measures the error.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from mpi4py import MPI

import numpy as np

from fe2ml.data.fingerprint import rve_description, rve_fingerprint
from fe2ml.data.log import LogWriter
from fe2ml.errors import SolverError
from fe2ml.laws.base import ConstitutiveLaw, PointFailure
from fe2ml.laws.farm import RVEFarm
from fe2ml.micro.finite import HyperelasticRVE, RVEState
from fe2ml.surrogate.deploy import NumpyEnsemble, check_checkpoint, read_checkpoint, torch_free
from fe2ml.surrogate.gate import (
    AuditOptions,
    Gate,
    Thresholds,
    point_uniform,
    relative_error,
    relative_spread,
    rows_equal,
    stress_magnitude,
)

__all__ = ["Audit", "HybridLaw", "SurrogateLaw", "fallback_writer"]

log = logging.getLogger(__name__)


def fallback_writer(comm, folder, rve: HyperelasticRVE, *, dim: int, family=None) -> LogWriter:
    """This rank's log part for a hybrid law's fallback records (source kind ``hybrid_fallback``).

    ``family``: (parameter box, family fingerprint) of a run with a field of microstructure parameters: the log is then
    parametric, as a parametric campaign's (the family's fingerprint, every record with its parameter vector).
    """
    attrs = {"source_kind": "hybrid_fallback", "source_id": "hybrid", "kinematics": "finite",
             "rve": json.dumps(rve_description(rve))}
    if family is None:
        return LogWriter(folder, f"hybrid{uuid.uuid4().hex[:6]}", comm.rank, fingerprint=rve_fingerprint(rve),
                         attrs=attrs, dim=dim, flush_every=16)
    box, fp = family
    attrs["parameter_box"] = json.dumps(box.as_dict())
    return LogWriter(folder, f"hybrid{uuid.uuid4().hex[:6]}", comm.rank, fingerprint=fp, attrs=attrs, dim=dim,
                     flush_every=16, parameters=list(box.names))


class SurrogateLaw(ConstitutiveLaw):
    """A trained checkpoint as a constitutive law: batched over the points of a rank.

    Args:
        checkpoint: path of ``checkpoint.pt``.
        dim: dimension of the run; kinematics: of the run.
        fingerprint: RVE fingerprint of the run (checked when given).
        device: ``cpu`` (default: the numpy closed form where the model has one), ``auto``, ``cuda`` or ``cuda:k``
            (the batch of a rank is evaluated there, in float64). On the CPU a non-parametric checkpoint is read and
            evaluated without torch (:mod:`fe2ml.surrogate.deploy`); torch is imported where it is needed only.
        tangent_precision: ``single`` (default) or ``double``: the numpy closed form's tangent products in float32 or
            float64 (:func:`fe2ml.surrogate.closed_form.evaluator`). The stress is float64 either way, so a Newton
            iteration converges to the same state; the tangent's float32 rounding (about 1e-7 of its largest entry)
            only steers it. Torch (a parametric checkpoint, a GPU) evaluates in float64.

    Attributes:
        gate: the checkpoint's per-point trust criteria (:class:`fe2ml.surrogate.gate.Gate`).
        last_F, last_P: the points and stresses of the last evaluation (what an :class:`Audit` checks).
        answered: which points of the last evaluation the surrogate answered.

    Raises:
        ConfigError: missing/unreadable checkpoint, or one of another dimension, kinematics or RVE.
    """

    def __init__(self, checkpoint, *, dim: int, kinematics: str = "finite", fingerprint: str | None = None,
                 device: str = "cpu", tangent_precision: str = "single"):
        super().__init__(dim, kinematics)
        self.device = device
        self.tangent_precision = tangent_precision
        if device != "cpu":  # a CUDA device that is not there: refused now
            from fe2ml.surrogate.checkpoint import resolve_device

            resolve_device(device)
        self.ck: dict | None = None
        self.model: Any = None  # NumpyEnsemble or EnsembleModel
        self.gate: Gate | None = None
        self.params: np.ndarray | None = None
        self.last_F = np.zeros((0, dim, dim))
        self.last_P = np.zeros((0, dim, dim))
        self._A: np.ndarray | None = None  # the tangent at last_F, once computed (tangent())
        self._A_buf: np.ndarray | None = None
        self.answered = np.zeros(0, dtype=bool)
        self._revision = 0  # counts the models and parameters the law has answered with (answer_key)
        if checkpoint is not None:
            ck = read_checkpoint(checkpoint)
            if not torch_free(ck, device):  # its members checked against the torch networks
                from fe2ml.surrogate.checkpoint import load_checkpoint

                ck = load_checkpoint(checkpoint)
            check_checkpoint(ck, checkpoint, dim=dim, kinematics=kinematics, fingerprint=fingerprint)
            self.use_checkpoint(ck)

    def use_checkpoint(self, ck: dict) -> None:
        """Answer from now on with the checkpoint dict ``ck`` (a loaded or freshly trained one)."""
        margs = {k: v for k, v in ck["model"].items() if k != "kind"}
        self._revision += 1
        self.ck = ck
        if torch_free(ck, self.device):
            self.model = NumpyEnsemble(ck, tangent=self.tangent_precision)
        else:
            import torch

            from fe2ml.surrogate.checkpoint import EnsembleModel, resolve_device

            torch.set_num_threads(1)  # one thread per rank
            self.model = EnsembleModel.from_states(ck["model"]["kind"], self.dim, self.kinematics, margs,
                                                   ck["members"], device=resolve_device(self.device))
        if getattr(self, "params", None) is not None and self.model.parameters:
            self.model.bind(self.params)
        self.gate = Gate(ck)
        if not self.model.parameters:
            self.model.evaluate_members(np.eye(self.dim)[None])  # set-up (numpy weights), like an RVE's compilation

    def set_parameters(self, p: np.ndarray) -> None:
        """Bind the microstructure parameters of a parametric checkpoint.

        ``p``: (k,) everywhere, or (n, k) per point of this rank, ordered as the points the macro problem evaluates.
        """
        self.params = np.asarray(p, dtype=np.float64)
        self._revision += 1
        if self.model is not None:
            self.model.bind(self.params)

    def answer_key(self) -> object | None:
        """The model and parameters that answer.

        A network has no history; a new checkpoint or new parameters (a learning round) change the key.
        """
        return None if self.model is None else ("surrogate", id(self), self._revision)

    def trained(self) -> tuple[Any, Gate]:
        """The ensemble and its gate.

        Raises:
            SolverError: there is no model yet (a cold start of in-run learning before its first round).
        """
        if self.model is None or self.gate is None:
            raise SolverError("the surrogate has no model yet: a cold start (checkpoint: null) answers with the RVE "
                              "until the first learning round")
        return self.model, self.gate

    def evaluate(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean ensemble prediction; a non-finite prediction is an error (there is no RVE to fall back to)."""
        P, A = self._mean(F, True)
        self._answered_all(F, P)
        return P, A

    def stress(self, F: np.ndarray, *, with_tangent: bool = False) -> np.ndarray:
        """Mean ensemble stress; without ``with_tangent`` the stress only (a third of a stress + tangent)."""
        P, self._A = self._mean(F, with_tangent, out=self._buffer(len(F)) if with_tangent else None)
        self._answered_all(F, P)
        return P

    def _answered_all(self, F: np.ndarray, P: np.ndarray) -> None:
        """Count an evaluation the surrogate answered at every point, and keep it for the audit."""
        self.stats["evaluations"] += len(F)
        self.last_F, self.last_P, self.answered = np.array(F), P, np.ones(len(F), dtype=bool)

    def tangent(self) -> np.ndarray:
        """Mean ensemble tangent at the points of the last :meth:`stress` call (the law's buffer: see the base)."""
        if self._A is None:
            self._A = self._mean(self.last_F, True, out=self._buffer(len(self.last_F)))[1]
        return self._A

    def _buffer(self, n: int) -> np.ndarray:
        """The law's tangent array for n points, reused from call to call.

        A fresh array of 650 B a point (3D) would cost its page faults at every Newton iteration.
        """
        d = self.dim
        if self._A_buf is None or len(self._A_buf) != n:
            self._A_buf = np.empty((n, d, d, d, d))
        return self._A_buf

    def _mean(self, F: np.ndarray, tangent: bool, out: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        t0 = time.perf_counter()
        model, _ = self.trained()
        P, A, _, ok = model.evaluate_gate(F, tangent=tangent, out=out)
        bad = ~ok
        if bad.any():
            k = int(np.argmax(bad))
            raise PointFailure(f"the surrogate predicts a non-finite stress or tangent at F̄ = "
                               f"{np.round(F[k], 6).tolist()} (use material.kind: hybrid to fall back to the RVE)", k)
        dt = time.perf_counter() - t0
        self.stats["time_s"] += dt
        self.stats["surrogate_s"] += dt
        return P, A

    def parameter_derivative(self, F: np.ndarray) -> np.ndarray:
        """∂P̄/∂p (n, d, d, k) at F̄ and the bound parameters (parametric checkpoints)."""
        return self.trained()[0].parameter_derivative(F)

    def surrogate_mask(self) -> np.ndarray | None:
        """Which points of the last evaluation the surrogate answered (the others went to the RVE)."""
        return self.answered

    def features(self, F) -> np.ndarray:
        """The network's unscaled input features of each point, (n, m)."""
        return self.trained()[0].features(F)

    def distance(self, F) -> np.ndarray:
        """Largest relative excursion of each point's features outside the training box (0 inside)."""
        return self.trained()[1].box_distance(self.features(F))

    def density_distance(self, F) -> np.ndarray:
        """Distance of each point to the nearest training record, in data-density scales."""
        return self.trained()[1].density_distance(self.features(F))


class HybridLaw(SurrogateLaw):
    """Surrogate where it can be trusted, true RVE where it cannot (:class:`Thresholds`).

    Fallback records are appended to ``writer`` (a :class:`fe2ml.data.log.LogWriter`) on commit and kept in
    ``new_records`` for in-run learning (:mod:`fe2ml.laws.learning`); ``stats`` counts fallbacks per step and per
    criterion (``fallback_reasons``; a point may meet several). A point sent to the RVE stays with it for the rest of
    the (sub-)step (reason ``held``): the answers can then switch only from surrogate to RVE within a step, so the
    macro Newton iteration is not thrown back and forth by points at the gate's edge (so the evaluations between
    two :meth:`commit`/:meth:`rollback` calls must be of the same points: the iterations of one step). The step's
    first iterate is the last converged state (the same F̄ as the last committed evaluation, or a run's first
    evaluation: its start or restart): its flags answer it but hold nothing, since the gate has not yet seen the
    step's own load; a point is held from the next iterate on. Without a
    checkpoint (a cold start of in-run learning) every point is answered by the RVE (reason ``no_model``) until
    :meth:`use_checkpoint` gives one.

    Args:
        checkpoint: path of the checkpoint, or None (cold start).
        rve: :class:`fe2ml.micro.finite.HyperelasticRVE` of this rank (its fingerprint must match).
        thresholds: the gate.
        writer: optional log writer for the fallback records.
        device, tangent_precision: where the surrogate is evaluated and its tangent's precision (see
            :class:`SurrogateLaw`).
        comm: the macro communicator; with it (and ``balance``) the flagged points of all ranks are spread over the
            ranks at every evaluation (:class:`fe2ml.laws.farm.RVEFarm`). Collective then.
        balance: redistribute the RVE solves (with ``comm``).
        family: this rank's :class:`~fe2ml.micro.family.RVEFamily` (a parametric checkpoint with a field of
            parameters, :meth:`set_parameters` per point): a flagged point is solved on the RVE of its own parameters.

    Raises:
        ConfigError: a threshold the checkpoint cannot evaluate (see :meth:`Thresholds.check`).
    """

    def __init__(self, checkpoint, rve: HyperelasticRVE, *, thresholds: Thresholds | None = None,
                 writer: LogWriter | None = None, device: str = "cpu", comm=None, balance: bool = True,
                 fingerprint: str | None = None, tangent_precision: str = "single", family=None):
        self.rve = rve
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        super().__init__(checkpoint, dim=rve.d, fingerprint=fingerprint or rve_fingerprint(rve), device=device,
                         tangent_precision=tangent_precision)
        self.farm = RVEFarm(rve, comm, balance=balance, family=family)
        self.cost: dict[int, float] = {}  # last solve time of each point that fell back
        self.writer = writer
        self.states: dict[int, RVEState] = {}
        self.trial: dict[int, RVEState] = {}
        self.pending: list = []
        self.new_records: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # committed, not yet learnt from
        self.flags_last = np.zeros(0, dtype=bool)
        self.reasons_last: dict[str, np.ndarray] = {}
        self.stats["fallback_reasons"] = {}
        self._step_fallbacks = 0  # fallbacks of the load step in progress (over its sub-steps)
        self.held = np.zeros(0, dtype=bool)  # points sent to the RVE earlier in this (sub-)step: they stay there
        self._committed_F: np.ndarray | None = None  # the points of the last committed evaluation (a converged state)
        self._fresh = True  # no evaluation yet: the first one (a run's start, a restart) is at a converged state

    def use_checkpoint(self, ck: dict) -> None:
        """Answer with ``ck`` from now on, after checking that it can evaluate the thresholds."""
        self.thresholds.check(Gate(ck))
        super().use_checkpoint(ck)

    def flags(self, F: np.ndarray, Ps: np.ndarray, finite: np.ndarray) -> dict[str, np.ndarray]:
        """Per-criterion flags (n,) of the points F̄.

        ``Ps`` (K, n, d, d): the members' stresses; ``finite`` (n,): whether every member's stress and tangent is
        finite there.
        """
        th, (_, gate) = self.thresholds, self.trained()
        per_point = self.params is not None and self.params.ndim == 2  # a field of parameters: features differ
        x = (np.repeat(self.features(F[:1]), len(F), axis=0) if rows_equal(F) and not per_point
             else self.features(F))
        bad = ~np.isfinite(x).all(axis=1)  # such a point falls back whatever its distances
        x[bad] = 0.0
        reasons = {"nonfinite": ~finite | bad, "box": gate.box_distance(x) > th.distance}
        if th.density is not None:
            reasons["density"] = gate.density_flags(x, th.density)
        if th.spread is not None or th.error is not None:
            with np.errstate(invalid="ignore"):
                spread = relative_spread(Ps, gate.floor)
                if th.spread is not None:
                    reasons["spread"] = spread > th.spread
                if th.error is not None:
                    reasons["error"] = gate.predicted_error(spread, stress_magnitude(Ps, gate.floor),
                                                               th.level) > th.error
        return reasons

    def answer_key(self) -> object | None:
        """The surrogate's key where it answered every point of its last evaluation; None where the RVE answered one.

        A point the gate sends to the RVE stays there for the (sub-)step, and a restarted run, which has no answer to
        keep, gates its first iterate: both runs must see the same decisions. Where the last evaluation flagged no
        point, the gate at that same F̄ flags none either (it is deterministic per point), so a kept answer is the one
        a restarted run computes. Where the RVE answered a point, no answer is kept: the gate decides afresh at the
        step's first iterate, as a restarted run does.
        """
        if len(self.flags_last) != len(self.last_F) or self.flags_last.any():
            return None
        return super().answer_key()

    def evaluate(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Surrogate for all points, RVE for the flagged ones (collective with a communicator)."""
        P, A = self._answer(F, True)
        return P, A

    def stress(self, F: np.ndarray, *, with_tangent: bool = False) -> np.ndarray:
        """As :meth:`evaluate`, without ``with_tangent`` the surrogate's stress only (collective with a communicator).

        The RVE answers' tangents are kept for :meth:`tangent`.
        """
        P, self._A = self._answer(F, with_tangent, out=self._buffer(len(F)) if with_tangent else None)
        return P

    def tangent(self) -> np.ndarray:
        """Ā at the points of the last :meth:`stress` call.

        The surrogate's mean tangent where it answered, the RVE's elsewhere; a point whose surrogate tangent is not
        finite raises, as its stress would have.
        """
        if self._A is not None:
            return self._A
        t0 = time.perf_counter()
        F, flags = self.last_F, self.flags_last
        A = self._buffer(len(F))
        keep = np.where(~flags)[0]
        if len(keep):
            _, Ak, _, ok = self.trained()[0].evaluate_gate(F[keep])
            if not ok.all():
                k = int(keep[np.argmin(ok)])
                raise PointFailure(f"the surrogate predicts a non-finite tangent at F̄ = "
                                   f"{np.round(F[k], 6).tolist()}", k)
            A[keep] = Ak
        A[flags] = self._rve_tangent
        dt = time.perf_counter() - t0
        self.stats["surrogate_s"] += dt
        self.stats["time_s"] += dt
        self._A = A
        return A

    def _answer(self, F: np.ndarray, tangent: bool, out: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        t0 = time.perf_counter()
        n, d = len(F), self.dim
        if self.model is None:
            P, A = np.zeros((n, d, d)), np.zeros((n, d, d, d, d))
            reasons = {"no_model": np.ones(n, dtype=bool)}
        else:
            P, A, Ps, finite = self.model.evaluate_gate(F, tangent=tangent, out=out)
            reasons = self.flags(F, Ps, finite)
        if len(self.held) == n:
            reasons["held"] = self.held.copy()
        flags = np.logical_or.reduce(list(reasons.values()))
        # a (sub-)step's first iterate is the last converged state, at the last load: its decisions answer it, and the
        # points are held from the first iterate at the step's own load on (where the gate sees the step's states)
        at_converged = self._fresh or (self._committed_F is not None and self._committed_F.shape == F.shape
                                       and np.array_equal(self._committed_F, F))
        self._fresh = False
        self.held = np.zeros(0, dtype=bool) if at_converged else flags.copy()
        self.stats["surrogate_s"] += time.perf_counter() - t0
        idx = np.where(flags)[0]
        starts = [self.trial.get(int(k), self.states.get(int(k))) for k in idx]
        cost = np.array([self.cost.get(int(k), self.farm.default_cost(cold=s is None)) for k, s in zip(idx, starts,
                                                                                                    strict=True)])
        prm = self.point_parameters(idx)
        results = self.farm.solve(F[idx], starts, cost, points=idx, params=prm)
        A_rve = np.empty((len(idx), d, d, d, d))
        for j, (k, r) in enumerate(zip(map(int, idx), results, strict=True)):
            if r.error is not None or r.state is None:
                raise PointFailure(r.error or f"point {k}: the RVE solve returned no state", k)
            P[k], A_rve[j] = r.P, r.A
            self.trial[k] = r.state
            self.cost[k] = r.time_s
            self.stats["newton_its"] += r.iterations
            self.stats["max_point_s"] = max(self.stats["max_point_s"], r.time_s)
        if A is not None:
            A[idx] = A_rve
        self._rve_tangent = A_rve
        self.pending = [(F[idx].copy(), P[idx].copy(), A_rve, idx, prm)]
        self.flags_last = flags
        self.reasons_last = reasons
        self.last_F, self.last_P, self.answered = np.array(F), P, ~flags
        self.stats["evaluations"] += n
        self.stats["rve_solves"] += len(idx)
        self.stats["time_s"] += time.perf_counter() - t0
        return P, A

    def point_parameters(self, idx: np.ndarray) -> np.ndarray | None:
        """Microstructure parameters (len(idx), k) of points idx with a field of them and a family, else None.

        None: every point's RVE is ``rve``.
        """
        if self.farm.family is None or self.params is None or self.params.ndim != 2:
            return None
        return self.params[idx]

    def rve_work(self) -> dict | None:
        """The farm's RVE work balance over the ranks."""
        return self.farm.balance_report()

    def commit(self) -> None:
        """Keep the RVE states of this step; log its fallback records; count the fallback points."""
        self._committed_F = self.last_F
        self.states.update(self.trial)
        self.stats["fallbacks"] += int(self.flags_last.sum())
        self._step_fallbacks += int(self.flags_last.sum())
        for key, f in self.reasons_last.items():
            self.stats["fallback_reasons"][key] = self.stats["fallback_reasons"].get(key, 0) + int(f.sum())
        if self.pending and len(self.pending[0][0]):
            F, P, A, idx, prm = self.pending[0]
            self.new_records.append((F, P, A))
            if self.writer is not None:
                self.writer.add(F, P, A, point_id=idx, converged=1, p=prm)
        self.pending = []
        self.held = np.zeros(0, dtype=bool)

    def rollback(self) -> None:
        """Discard the trial states."""
        self.trial = {}
        self.pending = []
        self.held = np.zeros(0, dtype=bool)

    def finish_step(self) -> None:
        """Record the load step's fallbacks (summed over its sub-steps)."""
        self.stats["fallbacks_per_step"].append(self._step_fallbacks)
        self._step_fallbacks = 0

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The committed RVE warm starts of the fallback points and the fallback statistics, as arrays."""
        ids = np.array(sorted(self.states), dtype=np.int64)
        st = [self.states[int(k)] for k in ids]
        d = self.dim
        reasons = sorted(self.stats["fallback_reasons"])
        def flat(key):  # the points' vectors one after the other: with a field of parameters their RVEs may differ
            return np.concatenate([np.ravel(getattr(s, key)) for s in st]) if st else np.zeros(0)

        return {"ids": ids, "F": flat("F").reshape(-1, d, d),
                "z": flat("z"), "z_sizes": np.array([s.z.size for s in st], dtype=np.int64),
                "lam": flat("lam"), "lam_sizes": np.array([s.lam.size for s in st], dtype=np.int64),
                "fallbacks_per_step": np.array(self.stats["fallbacks_per_step"], dtype=np.int64),
                "reason_names": np.array(reasons, dtype=str),
                "reason_counts": np.array([self.stats["fallback_reasons"][k] for k in reasons], dtype=np.int64)}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_arrays` saved (warm starts and statistics)."""
        if "ids" not in arrays:
            return
        n = len(arrays["ids"])

        def split(key):
            v = np.asarray(arrays[key])
            if f"{key}_sizes" not in arrays:  # written before ragged states: one row per point
                return [row.copy() for row in v.reshape(n, -1)]
            return [part.copy() for part in np.split(v, np.cumsum(arrays[f"{key}_sizes"])[:-1])] if n else []

        z, lam = split("z"), split("lam")
        self.states = {int(k): RVEState(F=arrays["F"][j].copy(), z=z[j], lam=lam[j])
                       for j, k in enumerate(arrays["ids"])}
        self.trial = {}
        per_step = [int(v) for v in arrays["fallbacks_per_step"]]
        self.stats["fallbacks_per_step"] = per_step
        self.stats["fallbacks"] = sum(per_step)
        self.stats["fallback_reasons"] = {str(k): int(v) for k, v in zip(arrays["reason_names"],
                                                                        arrays["reason_counts"], strict=True)}

    def log_writers(self) -> list:
        """The fallback log writer, when there is one."""
        return [self.writer] if self.writer is not None else []

    def close(self) -> None:
        """Flush and close the fallback log part; free the RVE family's solvers."""
        if self.writer is not None:
            self.writer.close()
        if self.farm.family is not None:
            self.farm.family.close()


class Audit:
    """Measures a surrogate's error during a run: true RVE solves at a random sample of the points it answered.

    The sample is drawn per point from its coordinates, the seed and the step (:func:`point_uniform`), so it does
    not depend on the partition. The error of a point is |P̄_s − P̄_RVE|/(|P̄_RVE| + floor), the floor of the
    checkpoint. Collective: every rank calls :meth:`check` after every converged step.

    Args:
        comm: the macro communicator.
        rve: this rank's RVE.
        options: :class:`AuditOptions`.
        floor: the stress floor of the errors (default: that of the checkpoint the law answers with at each check).
        writer: a log writer of this rank for the audited records (optional).
        family: this rank's :class:`~fe2ml.micro.family.RVEFamily` where the law's parameters vary per point: each
            audited point is solved on the RVE of its own parameters.
    """

    def __init__(self, comm, rve: HyperelasticRVE, options: AuditOptions, *, floor: float | None = None,
                 writer: LogWriter | None = None, family=None):
        self.comm = comm
        self.rve = rve
        self.family = family
        self.options = options
        self.floor = floor
        self.writer = writer
        self.errors: list[float] = []  # every audited point so far (all ranks)
        self.steps: list[dict] = []
        self.time_s = 0.0

    def check(self, step: int, x: np.ndarray, law: SurrogateLaw) -> dict:
        """Audit the last evaluation of ``law`` (the converged state of load step ``step``) at points x (n, d).

        Returns:
            This step's audit over all ranks: points, mean and max relative error.
        """
        t0 = time.perf_counter()
        sel = np.where(law.answered & (point_uniform(x, self.options.seed, step) < self.options.fraction))[0]
        F = law.last_F[sel]
        P_true = np.zeros_like(F)
        A_true = np.zeros(F.shape + F.shape[1:])
        prm = law.params[sel] if self.family is not None and law.params is not None and law.params.ndim == 2 else None
        for j, k in enumerate(map(int, sel)):
            rve = self.family.rve(prm[j]) if prm is not None and self.family is not None else self.rve
            _, _, _, R = rve.solve(F[j], None, point=k)
            P_true[j], A_true[j] = rve.homogenized(R)
        floor = self.floor if self.floor is not None else (law.gate.floor if law.gate is not None else 0.0)
        err = relative_error(law.last_P[sel], P_true, floor)
        if self.writer is not None and len(sel):
            self.writer.add(F, P_true, A_true, point_id=sel, step=step, converged=1, p=prm)
        self.time_s += time.perf_counter() - t0
        errs = np.concatenate(self.comm.allgather(err))
        self.errors.extend(errs.tolist())
        rec = {"step": step, "points": int(len(errs)), "mean_rel_error": float(errs.mean()) if len(errs) else 0.0,
               "max_rel_error": float(errs.max()) if len(errs) else 0.0}
        self.steps.append(rec)
        return rec

    def state(self) -> dict:
        """The audit's record so far (for run checkpoints)."""
        return {"errors": list(self.errors), "steps": list(self.steps)}

    def restore(self, state: dict) -> None:
        """Continue from a record saved by :meth:`state` (a restarted run)."""
        self.errors = list(state["errors"])
        self.steps = list(state["steps"])

    def summary(self) -> dict:
        """The whole run's audit (collective): points, mean/max error, exceedances of the target and bound95.

        ``bound95`` is the one-sided 95 % (Clopper–Pearson) upper confidence bound on the fraction of the points the
        surrogate answered whose error exceeds the target; ``exceeded`` is true when any audited point did.
        """
        from scipy.special import betaincinv  # the beta distribution's quantile (scipy.stats costs 1 s to import)

        e = np.asarray(self.errors)
        n, k = len(e), int(np.sum(e > self.options.target))
        bound = 1.0 if n == 0 or k == n else float(betaincinv(k + 1, n - k, 0.95))
        t = self.comm.allreduce(self.time_s, op=MPI.MAX)
        return {"fraction": self.options.fraction, "seed": self.options.seed, "target": self.options.target,
                "points": n, "mean_rel_error": float(e.mean()) if n else 0.0,
                "max_rel_error": float(e.max()) if n else 0.0, "exceedances": k, "bound95": bound,
                "exceeded": bool(k > 0), "audit_s": t, "per_step": self.steps}
