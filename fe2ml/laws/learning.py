"""In-run learning: the hybrid law's surrogate is retrained during the FE² run on the records of its own fallbacks.

``material.kind: hybrid`` with ``learn:`` (:class:`LearnOptions`). After every converged load step the ranks pool
the fallback records of the step (the true RVE answers at the points the gate did not trust). When at least
``min_new`` new records exist and ``every`` steps have passed since the last round, the ensemble is refitted on the
initial data (``learn.data``) plus every record gathered so far: member k on rank k % size, warm-started from the
current members (a cold start, without a checkpoint, fits fresh members for ``first_epochs``). Rank 0 writes the new
checkpoint to ``<run>/surrogate/round-K/`` (``checkpoint.pt`` and ``metrics.json`` with the calibration), and every
rank answers with it from the next load step on; the step that triggered the round is not repeated.

A round that cannot be fitted (fewer than 20 records, a loss that is never finite) keeps the current model and says
so in ``run.log``; it never stops the run. The gathered records and the round count travel in the run checkpoint, so
a restarted run refits exactly what the uninterrupted one did.

The pooled records are sorted by F̄ before fitting, so the fit does not depend on which rank owned which point.
The audit's records are never used for learning: the audit stays an independent measurement.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import cast

from mpi4py import MPI

import numpy as np

from fe2ml.errors import ConfigError
from fe2ml.surrogate.config import LearnOptions, parse_learn  # re-exported

__all__ = ["LearnOptions", "Learner", "parse_learn"]

log = logging.getLogger(__name__)

def _empty(d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros((0, d, d)), np.zeros((0, d, d)), np.zeros((0, d, d, d, d))


class Learner:
    """Refits a hybrid law's ensemble during the run (collective :meth:`after_step`).

    Args:
        comm: the macro communicator.
        options: :class:`LearnOptions`.
        law: the :class:`fe2ml.laws.surrogate.HybridLaw` of this rank.
        rounds: the folder of the rounds (round K goes to ``rounds/round-K``; a run's ``surrogate/``).
        fingerprint: the RVE fingerprint (of the initial data and of the new checkpoints).
        rve_desc: the RVE description stored in the checkpoints.
        runlog: the run's ``run.log`` logger.
    """

    def __init__(self, comm, options: LearnOptions, law, rounds: Path, *, fingerprint: str, rve_desc: dict,
                 runlog: logging.Logger):
        self.comm = comm
        self.options = options
        self.law = law
        self.rounds_dir = Path(rounds)
        self.fingerprint = fingerprint
        self.rve_desc = rve_desc
        self.runlog = runlog
        d = law.dim
        self.initial = _empty(d)
        if options.data:
            self.initial = self._read_initial()
        self.gathered = _empty(d)  # every fallback record of the run so far (all ranks, sorted by F̄ per step)
        self.new_since = 0  # records gathered since the last round
        self.last_round_step = -10**9
        self.rounds: list[dict] = []  # one per attempted round: step, records, retrain_s, status
        self.current: str | None = None  # the checkpoint the law answers with (a round's), None: the initial one

    def _read_initial(self):
        # deferred: torch only when a round is fitted (the run config parses learn: without it)
        from fe2ml.data.reader import read_logs

        def read():
            data = read_logs(list(self.options.data), fingerprint=self.fingerprint, converged_only=True,
                             fields=["F", "P", "A"])
            F, P, A = data["F"], data["P"], data["A"]
            ok = (np.isfinite(F).all(axis=(1, 2)) & np.isfinite(P).all(axis=(1, 2))
                  & np.isfinite(A).reshape(len(A), -1).all(axis=1))
            return F[ok], P[ok], A[ok]

        msg, out = None, None
        if self.comm.rank == 0:
            try:
                out = read()
            except Exception as e:  # noqa: BLE001 - reported on every rank as one line
                msg = f"material.learn.data: {e}"
        msg = self.comm.bcast(msg, root=0)
        if msg is not None:
            raise ConfigError(msg)
        return self.comm.bcast(out, root=0)

    def _pool(self) -> int:
        """Gather the fallback records all ranks committed since the last call; returns how many there were."""
        d = self.law.dim
        mine = self.law.new_records
        self.law.new_records = []
        local = tuple(np.concatenate([r[i] for r in mine]) if mine else _empty(d)[i] for i in range(3))
        every = self.comm.allgather(local)
        F, P, A = (np.concatenate([e[i] for e in every]) for i in range(3))
        order = np.lexsort(F.reshape(len(F), d * d).T[::-1])  # by F̄: independent of the partition
        F, P, A = F[order], P[order], A[order]
        G = self.gathered
        self.gathered = (np.concatenate([G[0], F]), np.concatenate([G[1], P]), np.concatenate([G[2], A]))
        self.new_since += len(F)
        return len(F)

    def after_step(self, step: int, *, last: bool = False) -> dict | None:
        """Pool the step's fallback records; refit when due (collective). Returns the round's record or None.

        After the ``last`` step of the run there is no step left to answer, so no round is fitted.
        """
        self._pool()
        o = self.options
        if last or self.new_since < o.min_new or step - self.last_round_step < o.every:
            return None
        return self._round(step)

    def _round(self, step: int) -> dict:
        # deferred: torch only when a round is fitted (the run config parses learn: without it)
        import torch

        # deferred: torch only when a round is fitted (the run config parses learn: without it)
        from fe2ml.surrogate.checkpoint import save_checkpoint
        from fe2ml.surrogate.train import (
            TrainingFailed,
            assemble_checkpoint,
            calibration_summary,
            fit_members,
            model_fibres,
            split_indices,
        )

        o = self.options
        t0 = time.perf_counter()
        k = len([r for r in self.rounds if r["status"] == "ok"]) + 1
        F, P, A = (np.concatenate([a, b]) for a, b in zip(self.initial, self.gathered, strict=True))
        rec: dict = {"round": k, "step": step, "records": int(len(F)), "new": int(self.new_since)}
        self.last_round_step = step
        if len(F) < 20:
            return self._failed(rec, t0, f"only {len(F)} records (need at least 20)")
        ck_now = self.law.ck
        cold = ck_now is None
        margs = ({k_: v for k_, v in ck_now["model"].items() if k_ != "kind"} if not cold else
                 {k_: (tuple(v) if k_ == "hidden" else v) for k_, v in o.model.items() if k_ != "kind"})
        kind = o.model["kind"] if cold else ck_now["model"]["kind"]
        if cold and kind == "potential":
            margs.update(model_fibres(margs, self.rve_desc, "material.learn.model.features", "the run's RVE",
                                      "finite"))
        tr, va, te = split_indices(len(F), {"validation": 0.15, "test": 0.15, "seed": o.seed})
        tcfg = {"epochs": o.first_epochs if cold else o.epochs, "lr": o.lr if cold else o.warm_lr,
                "patience": o.patience, "seed": o.seed}
        torch.set_num_threads(1)
        try:
            fitted = fit_members(self.comm, F, P, A, tr, va, kind=kind, margs=margs, dim=self.law.dim,
                                 kinematics="finite", loss=o.loss, train=tcfg, ensemble=o.members,
                                 start=None if cold else ck_now["members"])
        except TrainingFailed as e:
            return self._failed(rec, t0, str(e))
        ck, msg = None, None
        folder = self.rounds_dir / f"round-{k}"
        if self.comm.rank == 0:
            states = cast(tuple, fitted)[0]  # fit_members returns the members on rank 0
            core, _ = assemble_checkpoint(states, kind, margs, self.law.dim, "finite", F, P, A, tr, va, te)
            ck = {**core, "rve_fingerprint": self.fingerprint, "data_fingerprint": None, "records": int(len(F)),
                  "skipped": 0, "rve": self.rve_desc, "config": json.dumps({"learn_round": k, "step": step}),
                  "resumed_from": self.current, "train_s": time.perf_counter() - t0}
            if not all(np.isfinite(v["stress_rel_l2"]) for v in core["metrics"].values()):
                msg = "the refitted ensemble predicts non-finite stresses"
            else:
                folder.mkdir(parents=True, exist_ok=True)
                save_checkpoint(ck, folder / "checkpoint.pt")
                cal = core["calibration"]
                report = {"round": k, "step": step, "records": int(len(F)), "metrics": core["metrics"],
                          "bounds": core["bounds"], "stress_floor": core["stress_floor"],
                          "calibration": calibration_summary(cal) if cal is not None else None}
                (folder / "metrics.json").write_text(json.dumps(report, indent=1))
        msg = self.comm.bcast(msg, root=0)
        if msg is not None:
            return self._failed(rec, t0, msg)
        ck = self.comm.bcast(ck, root=0)
        self.law.use_checkpoint(ck)
        self.current = str(folder / "checkpoint.pt")
        self.new_since = 0
        rec.update(status="ok", retrain_s=self.comm.allreduce(time.perf_counter() - t0, op=MPI.MAX),
                   test_stress_rel_l2=ck["metrics"].get("test", ck["metrics"]["validation"])["stress_rel_l2"],
                   checkpoint=self.current)
        self.rounds.append(rec)
        line = (f"learning round {k} after step {step}: {rec['records']} records ({rec['new']} new), refitted in "
                f"{rec['retrain_s']:.1f} s, test stress rel. L2 {100 * rec['test_stress_rel_l2']:.2f} %")
        self.runlog.info(line)
        if self.comm.rank == 0:
            log.info("  " + line)
        return rec

    def _failed(self, rec: dict, t0: float, why: str) -> dict:
        rec.update(status="failed", reason=why, retrain_s=self.comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        self.rounds.append(rec)
        line = f"learning round after step {rec['step']} failed, the current model stays: {why}"
        self.runlog.warning(line)
        if self.comm.rank == 0:
            log.warning("  " + line)
        return rec

    # ------------------------------------------------------------------ run checkpoints
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """What a run checkpoint keeps: (meta entries, arrays of the gathered records)."""
        meta = {"new_since": self.new_since, "last_round_step": self.last_round_step, "rounds": self.rounds,
                "current": self.current}
        F, P, A = self.gathered
        return meta, {"learn_F": F, "learn_P": P, "learn_A": A}

    def restore(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Continue from :meth:`state`: the gathered records, the rounds, and the law answers with the last round."""
        # deferred: torch only when a round is fitted (the run config parses learn: without it)
        from fe2ml.surrogate.checkpoint import load_checkpoint

        self.new_since = int(meta["new_since"])
        self.last_round_step = int(meta["last_round_step"])
        self.rounds = list(meta["rounds"])
        self.current = meta["current"]
        self.gathered = (arrays["learn_F"], arrays["learn_P"], arrays["learn_A"])
        if self.current is not None:
            path = Path(self.current)
            if not path.is_file():
                raise ConfigError(f"restart: the learnt checkpoint {path} of the run is missing")
            self.law.use_checkpoint(load_checkpoint(path))

    def summary(self, fallbacks_per_step: list[int]) -> dict:
        """``summary.json``'s ``learning`` entry."""
        ok = [r for r in self.rounds if r["status"] == "ok"]
        return {"rounds": len(ok), "failed_rounds": len(self.rounds) - len(ok),
                "records_per_round": [r["records"] for r in ok],
                "retrain_s_per_round": [r["retrain_s"] for r in ok],
                "round_steps": [r["step"] for r in ok], "fallbacks_per_step": list(fallbacks_per_step),
                "initial_records": int(len(self.initial[0])), "gathered_records": int(len(self.gathered[0])),
                "attempts": self.rounds}
