"""``fe2ml run``: build the law and the macro problem from a validated config, step the load, write outputs.

Three stages: :func:`build` (collective set-up), :func:`loop` (load steps, checkpoints, SIGTERM) and :func:`finish`
(summary, closing). :func:`run` chains them and turns failures into a written summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpi4py import MPI

import numpy as np

from fe2ml.data.fingerprint import rve_description, rve_fingerprint
from fe2ml.data.log import check_fingerprint, check_folder_writable, truncate_part
from fe2ml.data.recorder import MacroLogger, Recorder, make_macro_logger
from fe2ml.errors import ConfigError, Fe2mlError
from fe2ml.files import atomic_write
from fe2ml.laws.analytic import AnalyticLaw
from fe2ml.laws.base import ConstitutiveLaw
from fe2ml.laws.learning import Learner
from fe2ml.laws.rve import build_rank_rve, rve_law
from fe2ml.macro.config import RunConfig, check_boundaries
from fe2ml.macro.folder import RunFolder
from fe2ml.macro.mesh import create_macro_mesh
from fe2ml.macro.output import RunWriter, progress_line
from fe2ml.macro.problem import MacroProblem, RunInterrupted
from fe2ml.micro.config import load_rve_mesh
from fe2ml.micro.finite import HyperelasticRVE
from fe2ml.micro.linear import LinearRVE
from fe2ml.parallel import collective

if TYPE_CHECKING:
    from fe2ml.laws.learning import Learner
    from fe2ml.laws.surrogate import Audit

__all__ = ["Run", "build", "build_law", "finish", "loop", "macro_problem", "run"]

log = logging.getLogger(__name__)



def identity(cfg: RunConfig, rve) -> dict:
    """What a run is: its config (path and SHA-256 of the text), its RVE fingerprint, its surrogate checkpoint."""
    ck = cfg.surrogate.checkpoint if cfg.surrogate is not None else None
    return {"config": str(Path(cfg.path).resolve()), "config_sha256": _sha256(Path(cfg.path).read_bytes()),
            "rve_fingerprint": rve_fingerprint(rve) if rve is not None else None,
            "checkpoint": str(ck) if ck is not None else None,
            "checkpoint_sha256": _sha256(Path(ck).read_bytes()) if ck is not None else None}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_json(path: Path, obj) -> None:
    """Write JSON atomically (a kill leaves the old or the new file)."""
    atomic_write(path, json.dumps(obj, indent=1))


def _check_identity(comm, out: Path, now: dict, allow_changed: bool, runlog: logging.Logger) -> None:
    """Refuse a restart whose config, RVE or surrogate checkpoint differ from the run's (rank 0 reads, all raise)."""
    msg = None
    if comm.rank == 0:
        p = RunFolder(out).identity
        if p.is_file():
            then = json.loads(p.read_text())
            what = {"config_sha256": f"the config {then['config']}", "rve_fingerprint": "the RVE (fingerprint "
                    f"{then['rve_fingerprint']} -> {now['rve_fingerprint']})",
                    "checkpoint_sha256": f"the surrogate checkpoint {then['checkpoint']}"}
            changed = [text for key, text in what.items() if then.get(key) != now.get(key)]
            orig = Path(then["config"])
            if orig.is_file() and _sha256(orig.read_bytes()) != then["config_sha256"] and not any(
                    t.startswith("the config") for t in changed):
                changed.insert(0, f"the config {orig}")
            if changed and not allow_changed:
                msg = (f"--restart {out}: {', '.join(changed)} changed since the run started; restore it, or give "
                       "--allow-changed to continue with the change (recorded in run.log)")
            elif changed:
                runlog.warning("restart with changes (--allow-changed): %s", ", ".join(changed))
                _write_json(p, now)
    msg = comm.bcast(msg, root=0)
    if msg is not None:
        raise ConfigError(msg)


def _repair_logs(comm, out: Path, counts: dict, runlog: logging.Logger) -> dict[str, int]:
    """Drop the records that killed attempts of this run flushed after the checkpoint the restart continues from.

    Every log part this run (or an earlier attempt of it) created is listed in ``out/log_parts.json``; each keeps
    the count the checkpoint recorded for it, 0 when the checkpoint predates it (rank 0). Returns the kept counts of
    all these parts, which every later checkpoint of the run carries on.
    """
    kept: dict[str, int] = {}
    if comm.rank == 0:
        listed = RunFolder(out).log_parts
        parts = set(json.loads(listed.read_text())) if listed.is_file() else set()
        for path in sorted(parts | set(counts)):
            kept[path] = int(counts.get(path, 0))
            if Path(path).is_file():
                dropped = truncate_part(path, kept[path])
                if dropped:
                    runlog.info("restart: dropped %d record(s) of steps after the checkpoint from %s", dropped, path)
    return comm.bcast(kept, root=0)


def _register_log_parts(comm, out: Path, paths: list[str]) -> None:
    """Add this attempt's log parts (all ranks) to ``out/log_parts.json`` (collective)."""
    every = [p for ps in comm.allgather(paths) for p in ps]
    if comm.rank == 0 and every:
        listed = RunFolder(out).log_parts
        known = json.loads(listed.read_text()) if listed.is_file() else []
        _write_json(listed, sorted(set(known) | set(every)))
    comm.barrier()


def build_law(comm, cfg: RunConfig, *, recorder: Recorder | None = None,
              rve: LinearRVE | HyperelasticRVE | None = None) -> ConstitutiveLaw | AnalyticLaw:
    """This rank's constitutive law for a run config (collective).

    Args:
        comm: the macro communicator.
        cfg: the validated run config.
        recorder: recorder of the RVE evaluations (``material.kind: rve``).
        rve: this rank's RVE (:func:`fe2ml.laws.rve.build_rank_rve`) for kinds rve and hybrid, and for surrogate
            when the config gives one (its fingerprint is checked against the checkpoint's).
    """
    def make() -> ConstitutiveLaw | AnalyticLaw:
        if cfg.kind == "analytic":
            return AnalyticLaw(cfg.analytic, dim=cfg.dim)
        if cfg.kind == "rve":
            return rve_law(rve, warm_start=cfg.warm_start, recorder=recorder,
                           cells=cfg.localize or (recorder is not None and recorder.cells), comm=comm,
                           balance=cfg.balance)
        # deferred: torch only for surrogate and hybrid runs
        from fe2ml.laws.surrogate import HybridLaw, SurrogateLaw, fallback_writer

        s = cfg.surrogate
        family = cfg.parameters.family if cfg.parameters is not None else None  # a parametric checkpoint's RVEs
        rves = rve_family(cfg) if cfg.kind == "hybrid" else None  # a field of parameters: each fallback on its RVE
        if cfg.kind == "surrogate":
            law = SurrogateLaw(s.checkpoint, dim=cfg.dim, kinematics=cfg.kinematics,
                               fingerprint=family or (rve_fingerprint(rve) if rve is not None else None),
                               device=s.device, tangent_precision=s.tangent_precision)
        else:
            writer = (fallback_writer(comm, s.log, rve, dim=cfg.dim, family=None if rves is None else
                                      (cfg.parameters.rve_box, family)) if s.log is not None else None)
            law = HybridLaw(s.checkpoint, rve, thresholds=s.thresholds, writer=writer, device=s.device,
                            comm=comm, balance=cfg.balance, fingerprint=family, tangent_precision=s.tangent_precision,
                            family=rves)
        if cfg.parameters is not None and cfg.parameters.constant is not None:
            law.set_parameters(cfg.parameters.constant)
        return law

    return collective(comm, make)


def rve_family(cfg: RunConfig):
    """This rank's :class:`~fe2ml.micro.family.RVEFamily` for a run with a field of parameters and a base RVE.

    It solves a hybrid's fallbacks and an audit's points; None for other runs.
    """
    prm = cfg.parameters
    if prm is None or prm.constant is not None or prm.rve_box is None or cfg.kind == "analytic":
        return None
    # deferred: dolfinx forms only for runs that solve RVEs
    from fe2ml.micro.family import RVEFamily

    return RVEFamily(prm.rve_box, cfg.dim, where=f"{cfg.path}: material.rve")


def check_parameter_field(comm, cfg: RunConfig, p: np.ndarray) -> None:
    """Check the RVE config over the range a field of parameters takes at the macro points of all ranks (collective).

    See :meth:`~fe2ml.macro.config.RunParameters.check_field`.
    """
    every = [a for a in comm.allgather(np.array([p.min(axis=0), p.max(axis=0)]) if len(p) else None)
             if a is not None]
    cfg.parameters.check_field(np.concatenate(every) if every else p, f"{cfg.path}: material.parameters", cfg.dim)


def macro_problem(comm, cfg: RunConfig, law) -> MacroProblem:
    """The macro mesh and problem of a run config with a given law (collective).

    For the drivers that solve load histories themselves: identification and realizations.
    """
    mm = collective(comm, lambda: create_macro_mesh(comm, cfg.mesh, where=f"{cfg.path}: mesh"))
    return collective(comm, lambda: MacroProblem(
        comm, mm, law=law, kinematics=cfg.kinematics, degree=cfg.degree, quadrature_degree=cfg.quadrature_degree,
        dirichlet=cfg.bcs, tractions=cfg.tractions, pressures=cfg.pressures, orientation=cfg.orientation,
        newton=cfg.newton, solver=cfg.solver))


class _RunLogHandler(logging.FileHandler):
    """The ``run.log`` handler of a run (replaced by the next run in the same process)."""


def _run_log(comm, out: Path) -> logging.Logger:
    """The run's record in ``out/run.log`` (rank 0, appended across restarts): steps, restarts, failures."""
    runlog = logging.getLogger("fe2ml.runlog")
    for h in [h for h in runlog.handlers if isinstance(h, _RunLogHandler)]:
        runlog.removeHandler(h)
        h.close()
    if comm.rank == 0:
        fh = _RunLogHandler(RunFolder(out).run_log, mode="a")
        fh.setFormatter(logging.Formatter(f"%(asctime)s [rank {comm.rank}] %(levelname)s %(message)s"))
        runlog.addHandler(fh)
    runlog.setLevel(logging.INFO)
    runlog.propagate = False  # the console shows progress lines, not this record
    return runlog


@dataclass
class Run:
    """A macro run ready to step: its problem, law, outputs and where it starts."""

    comm: Any
    cfg: RunConfig
    out: Path
    prob: MacroProblem
    law: ConstitutiveLaw | AnalyticLaw
    writer: RunWriter
    logger: MacroLogger | None
    runlog: logging.Logger
    start: int
    audit: Audit | None = None
    learner: Learner | None = None
    log_counts: dict[str, int] = field(default_factory=dict)  # parts of earlier attempts: their kept records

    def extra(self) -> dict:
        """Entries of summary.json beyond the law's statistics (collective): the audit, the learning rounds."""
        out = {"audit": self.audit.summary()} if self.audit is not None else {}
        if self.learner is not None:
            per_step = self.comm.allreduce(np.asarray(self.law.stats["fallbacks_per_step"], dtype=np.int64))
            out["learning"] = self.learner.summary([int(v) for v in per_step])
        return out

    def flush_logs(self) -> dict[str, int]:
        """Flush every log writer of the run (collective); returns {part file: records written} over all ranks.

        Called before every checkpoint: the records of the checkpointed steps are on disk, and the counts let a
        restart drop what a killed run flushed after its last checkpoint.
        """
        counts = {}
        for w in _log_writers(self.logger, self.law):
            w.flush()
            counts[str(w.path)] = w.n_written
        merged: dict[str, int] = dict(self.log_counts)
        for c in self.comm.allgather(counts):
            merged.update(c)
        return merged

    def close(self) -> None:
        """Close the outputs, the logs and the problem (collective)."""
        self.writer.close()
        if self.logger is not None:
            self.logger.close()
        self.law.close()
        self.prob.close()


def _log_writers(logger: MacroLogger | None, law) -> list:
    """The log writers of a run: the recorder's and the law's (hybrid fallbacks)."""
    return ([logger.writer] if logger is not None else []) + law.log_writers()


def _prepare_output(comm, out: Path) -> None:
    def mkout():
        if comm.rank == 0:
            try:
                out.mkdir(parents=True, exist_ok=True)
                probe = out / ".write_test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise ConfigError(f"output: cannot write to {out} ({e.strerror})") from None

    collective(comm, mkout)


def _recorder(comm, cfg: RunConfig, rve, say) -> MacroLogger | None:
    """This rank's recorder of the RVE evaluations (``log:``), after checking the folder on rank 0."""
    if cfg.log is None:
        return None

    def check():
        if comm.rank == 0:  # before any rank creates its part
            check_folder_writable(cfg.log.folder)
            check_fingerprint(cfg.log.folder, rve_fingerprint(rve))

    collective(comm, check)
    run_id = comm.bcast(uuid.uuid4().hex[:8] if comm.rank == 0 else None, root=0)
    logger = collective(comm, lambda: make_macro_logger(
        comm, rve, cfg.log.folder, run_id=run_id, config_text=cfg.path.read_text(),
        all_iterations=cfg.log.all_iterations, cells=cfg.log.cells))
    say(f"  logging RVE evaluations to {cfg.log.folder} (run {run_id})")
    return logger


def build(comm, cfg: RunConfig, *, restart: bool = False, allow_changed: bool = False) -> Run:
    """Everything a run needs, built collectively: output folder, RVE, recorder, law, macro mesh and problem.

    With ``restart`` the problem continues from the checkpoint in ``cfg.output`` (same number of ranks), after
    checking that the config, the RVE and the surrogate checkpoint are those the run started with (refused unless
    ``allow_changed``; then the change is recorded in run.log).
    """
    out = Path(cfg.output)
    folder = RunFolder(out)
    _prepare_output(comm, out)
    runlog = _run_log(comm, out)

    say = log.info

    say(f"fe2ml run: {cfg.path} -> {out} ({cfg.dim}D, {cfg.kinematics} strain, material {cfg.kind}, "
        f"{comm.size} rank(s))")
    rve = rve_mesh = None
    if cfg.rve is not None:
        rve, rve_mesh = build_rank_rve(comm, cfg.rve)
        nd = rve.ndofs if isinstance(rve, HyperelasticRVE) else None
        say(f"  RVE: {len(rve_mesh.cells)} elements, {rve_mesh.n_cells} cells" +
            (f", {nd} dofs per solve" if nd else " (linear: C̄ once)"))
    logger = _recorder(comm, cfg, rve, say)
    law = build_law(comm, cfg, recorder=logger, rve=rve)
    if cfg.kind in ("surrogate", "hybrid"):
        say(f"  {cfg.kind} law from {cfg.surrogate.checkpoint}")

    def tile_loader():  # the RVE that tiled_rve repeats: mesh.rve (direct numerical simulation), else the law's
        return load_rve_mesh(cfg.mesh_rve, comm=comm) if cfg.mesh_rve is not None else rve_mesh

    mm = collective(comm, lambda: create_macro_mesh(comm, cfg.mesh, where=f"{cfg.path}: mesh",
                                                    rve_mesh_loader=tile_loader))
    collective(comm, lambda: check_boundaries(cfg, list(mm.boundaries)))
    collective(comm, lambda: cfg.check_expressions(mm.lo, mm.hi))  # at the corners of the mesh itself

    def mkprob():
        try:
            return MacroProblem(comm, mm, law=law, kinematics=cfg.kinematics, degree=cfg.degree,
                                quadrature_degree=cfg.quadrature_degree, dirichlet=cfg.bcs, tractions=cfg.tractions,
                                pressures=cfg.pressures, orientation=cfg.orientation, newton=cfg.newton,
                                solver=cfg.solver)
        except ConfigError as e:
            raise ConfigError(f"{cfg.path}: {e}") from None

    prob = collective(comm, mkprob)
    if cfg.parameters is not None and cfg.parameters.constant is None:  # a field of parameters: one vector per point
        pq = collective(comm, lambda: cfg.parameters.values(prob.quadrature_points()))
        if cfg.parameters.rve_box is not None and (cfg.kind == "hybrid" or cfg.surrogate.audit is not None):
            collective(comm, lambda: check_parameter_field(comm, cfg, pq))
        collective(comm, lambda: law.set_parameters(pq))
    if logger is not None:
        logger.set_points(*prob.quadrature_point_ids())
    say(f"  macro: {prob.V.dofmap.index_map.size_global * prob.d} dofs, {prob.n_qp_global} quadrature points, "
        f"{cfg.steps} load steps")
    start = 0
    meta: dict = {}
    log_counts: dict[str, int] = {}
    ident = identity(cfg, rve)
    if restart:
        collective(comm, lambda: _check_identity(comm, out, ident, allow_changed, runlog))
        meta = collective(comm, lambda: prob.load_checkpoint(folder.checkpoint))
        start = meta["steps"]
        log_counts = collective(comm, lambda: _repair_logs(comm, out, meta.get("logs", {}), runlog))
        say(f"  restarting after step {start} (t = {prob.t:.4g})")
        runlog.info("restart after step %d (t = %.6g)", start, prob.t)
    elif comm.rank == 0:
        if Path(cfg.path).resolve() != folder.config_copy.resolve():
            atomic_write(folder.config_copy, Path(cfg.path).read_bytes())
        _write_json(folder.identity, ident)
    _register_log_parts(comm, out, [str(w.path) for w in _log_writers(logger, law)])
    writer = RunWriter(prob, out, config_path=str(Path(cfg.path).resolve()), restart_step=start)
    audit = None
    if cfg.surrogate is not None and cfg.surrogate.audit is not None:
        # deferred: torch only for surrogate and hybrid runs
        from fe2ml.laws.surrogate import Audit, HybridLaw, SurrogateLaw

        if not isinstance(law, SurrogateLaw) or not isinstance(rve, HyperelasticRVE):
            raise ConfigError(f"{cfg.path}: material.audit needs a surrogate or hybrid law and a finite-strain RVE")
        audit = Audit(comm, rve, cfg.surrogate.audit, writer=law.writer if isinstance(law, HybridLaw) else None,
                      family=law.farm.family if isinstance(law, HybridLaw) else rve_family(cfg))
        if "audit" in meta:  # a restart continues the audit's record
            audit.restore(meta["audit"])
        say(f"  audit: the RVE re-solves {100 * audit.options.fraction:.3g} % of the surrogate's points every step "
            f"(target error {audit.options.target:g})")
    learner = None
    if cfg.surrogate is not None and cfg.surrogate.learn is not None:
        lo = cfg.surrogate.learn
        learner = collective(comm, lambda: Learner(comm, lo, law, folder.surrogate_rounds,
                                                   fingerprint=rve_fingerprint(rve), rve_desc=rve_description(rve),
                                                   runlog=runlog))
        if "learning" in meta:  # a restart continues with the gathered records and the last round's model
            collective(comm, lambda: learner.restore(meta["learning"], meta["arrays"]))
        say(f"  learning: refit {lo.members} member(s) every >= {lo.every} step(s) once {lo.min_new} new fallback "
            f"records exist ({len(learner.initial[0])} initial records"
            + (", cold start: the RVEs answer until the first round)" if law.model is None else ")"))
    return Run(comm=comm, cfg=cfg, out=out, prob=prob, law=law, writer=writer, logger=logger, runlog=runlog,
               start=start, audit=audit, learner=learner, log_counts=log_counts)


def loop(r: Run) -> None:
    """Step the load from the start step to the last, writing outputs and a checkpoint after every step.

    SIGTERM is caught: the run stops after the step in progress converges, with its checkpoint written.

    Raises:
        RunInterrupted: SIGTERM was received.
        Fe2mlError: a load step could not be carried.
    """
    comm, cfg, prob = r.comm, r.cfg, r.prob
    stop = {"flag": False}

    def on_term(signum, frame):
        stop["flag"] = True

    old = signal.signal(signal.SIGTERM, on_term)
    prob.stop_requested = lambda: stop["flag"]
    fault = os.environ.get("FE2ML_FAULT")  # "rank:step": raise a plain exception there (tests job plumbing)
    try:
        for k in range(r.start + 1, cfg.steps + 1):
            if r.logger is not None:
                r.logger.step = k
            if fault and fault == f"{comm.rank}:{k}":
                raise RuntimeError(f"injected fault on rank {comm.rank} at step {k} (FE2ML_FAULT)")
            rec = prob.step(k / cfg.steps)
            for why in rec.cut_reasons:
                r.runlog.warning("step %d: step cut, %s", k, why)
            if r.audit is not None:
                a = r.audit.check(k, prob.quadrature_points(), r.law)
                r.runlog.info("audit step %d: %d points, mean rel. error %.3g, max %.3g", k, a["points"],
                              a["mean_rel_error"], a["max_rel_error"])
            r.writer.write_step()
            if r.learner is not None:  # after the audit: the audit measures the model that answered the step
                r.learner.after_step(k, last=k == cfg.steps)
            extra: dict = {"logs": r.flush_logs()}
            arrays: dict = {}
            if r.audit is not None:
                extra["audit"] = r.audit.state()
            if r.learner is not None:
                extra["learning"], arrays = r.learner.state()
            prob.save_checkpoint(RunFolder(r.out).checkpoint, meta_extra=extra, arrays_extra=arrays)
            r.runlog.info("step %d/%d t=%.6g Newton its %d cuts %d", k, cfg.steps, prob.t, rec.iterations, rec.cuts)
            if log.isEnabledFor(logging.INFO):
                progress_line(k, cfg.steps, prob.t, rec, comm)
            if k < cfg.steps and comm.allreduce(stop["flag"], op=MPI.LOR):
                raise RunInterrupted("SIGTERM received")
    finally:
        signal.signal(signal.SIGTERM, old)


def finish(r: Run, t0: float) -> dict:
    """Write the final summary, close everything and report (collective); returns the summary on rank 0."""
    extra = r.extra()
    if extra.get("audit", {}).get("exceeded"):
        a = extra["audit"]
        msg = (f"audit: {a['exceedances']} of {a['points']} audited points exceed the target error {a['target']:g} "
               f"(max {a['max_rel_error']:.3g}; 95 % bound on the fraction of points above it: {a['bound95']:.3g})")
        if r.comm.rank == 0:
            log.warning(msg)
        r.runlog.warning(msg)
    r.writer.write_summary("completed", "", extra=extra)
    r.close()
    summary = {}
    if r.comm.rank == 0:
        summary = RunFolder(r.out).read_summary()
        if log.isEnabledFor(logging.INFO):
            ts = summary["time_split_s"]
            log.info(f"  done in {time.perf_counter() - t0:.1f} s: constitutive/RVE {ts['rve_or_constitutive']:.2f} s, "
                  f"macro assembly {ts['macro_assembly']:.2f} s, macro solve {ts['macro_solve']:.2f} s; "
                  f"{summary['rve_solves']} RVE solves; load balance max/mean "
                  f"{summary['load_balance_max_over_mean']:.2f}")
            log.info(f"  outputs: {r.out}/fields.xdmf, reactions.csv, reactions.png, summary.json")
    return summary


def run(comm, cfg: RunConfig, *, restart: bool = False, allow_changed: bool = False) -> dict:
    """Run a macro problem (FE², surrogate, hybrid or analytic) and write its outputs to ``cfg.output``.

    :func:`build` → :func:`loop` → :func:`finish`.

    Args:
        comm: the macro communicator.
        cfg: :class:`fe2ml.macro.config.RunConfig`.
        restart: continue from the checkpoint in ``cfg.output`` (same number of ranks).
        allow_changed: with ``restart``, accept a config, RVE or checkpoint that changed (recorded in run.log).

    Returns:
        The summary dict (rank 0; other ranks get an empty dict).

    Raises:
        Fe2mlError: on every rank, for bad input or a load that cannot be carried (outputs up to
            the last converged step are kept).
    """
    if cfg.parameters is not None and cfg.parameters.realizations:
        raise ConfigError(f"{cfg.path}: material.realizations: run it with fe2ml.macro.realizations.run_realizations "
                          "(what fe2ml run does for it); a run over realizations has no restart")
    t0 = time.perf_counter()
    r = build(comm, cfg, restart=restart, allow_changed=allow_changed)
    try:
        loop(r)
    except RunInterrupted:
        message = (f"terminated by SIGTERM; checkpoint at step {len(r.prob.history)} (t = {r.prob.t:.6g}); "
                   f"continue with: fe2ml run --restart {r.out}")
        r.runlog.warning(message)
        log.warning(message)
        r.writer.write_summary("terminated", message)
        r.close()
        raise RunInterrupted(message) from None
    except Fe2mlError as e:
        r.runlog.error(str(e))
        r.writer.write_summary("failed", str(e))
        r.close()
        raise
    except BaseException:
        if r.logger is not None:  # a crash: keep the records logged so far
            r.logger.close()
        r.law.close()
        raise
    return finish(r, t0)
