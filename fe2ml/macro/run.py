"""``fe2ml run``: build the RVE law and the macro problem from a validated config, step the load, write outputs."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from fe2ml.data.fingerprint import rve_fingerprint
from fe2ml.data.recorder import MacroLogger, Recorder
from fe2ml.errors import ConfigError, Fe2mlError
from fe2ml.laws.analytic import AnalyticLaw
from fe2ml.laws.base import ConstitutiveLaw
from fe2ml.laws.rve import build_rank_rve, rve_law
from fe2ml.macro.config import RunConfig
from fe2ml.micro.finite import HyperelasticRVE
from fe2ml.micro.linear import LinearRVE
from fe2ml.parallel import collective

__all__ = ["build_law", "run"]



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
                           cells=cfg.localize or (recorder is not None and recorder.cells))
        from fe2ml.laws.surrogate import HybridLaw, SurrogateLaw, fallback_writer

        s = cfg.surrogate
        if cfg.kind == "surrogate":
            return SurrogateLaw(s["checkpoint"], dim=cfg.dim, kinematics=cfg.kinematics,
                                fingerprint=rve_fingerprint(rve) if rve is not None else None)
        writer = fallback_writer(comm, s["log"], rve, dim=cfg.dim) if s["log"] is not None else None
        return HybridLaw(s["checkpoint"], rve, spread=s["spread"], distance=s["distance"], writer=writer)

    return collective(comm, make)


def _setup_logging(comm, out: Path):
    """Rank-aware logging: rank 0 writes INFO and above to ``run.log``; every rank sends warnings to stderr."""
    import logging

    log = logging.getLogger("fe2ml")
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {comm.rank}] %(levelname)s %(message)s")
    if comm.rank == 0:
        fh = logging.FileHandler(out / "run.log", mode="a")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    sh = logging.StreamHandler()
    sh.setLevel(logging.WARNING)
    sh.setFormatter(fmt)
    log.addHandler(sh)
    log.propagate = False
    return log


def run(comm, cfg, *, quiet: bool = False, restart: bool = False) -> dict:
    """Run a macro problem (FE² or analytic) and write its outputs to ``cfg.output``.

    Args:
        comm: the macro communicator.
        cfg: :class:`fe2ml.macro.config.RunConfig`.
        quiet: no progress output.
        restart: continue from the checkpoint in ``cfg.output`` (same number of ranks).

    Returns:
        The summary dict (rank 0; other ranks get an empty dict).

    Raises:
        Fe2mlError: on every rank, for bad input or a load that cannot be carried (outputs up to
            the last converged step are kept).
    """
    import json

    from fe2ml.macro.mesh import create_macro_mesh
    from fe2ml.macro.problem import MacroProblem, RunWriter, progress_line

    t0 = time.perf_counter()
    out = Path(cfg.output)

    def mkout():
        if comm.rank == 0:
            try:
                out.mkdir(parents=True, exist_ok=True)
                probe = out / ".write_test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise ConfigError(f"output: cannot write to {out} ({e.strerror})") from None
        return None

    collective(comm, mkout)
    log = _setup_logging(comm, out)
    rank0 = comm.rank == 0 and not quiet
    if rank0:
        print(f"fe2ml run: {cfg.path} -> {out} ({cfg.dim}D, {cfg.kinematics} strain, material {cfg.kind}, "
              f"{comm.size} rank(s))", flush=True)
    rve = rve_mesh = None
    if cfg.rve is not None:
        rve, rve_mesh = build_rank_rve(comm, cfg.rve)
        if rank0:
            nd = rve.ndofs if isinstance(rve, HyperelasticRVE) else None
            print(f"  RVE: {len(rve_mesh.cells)} elements, {rve_mesh.n_cells} cells" +
                  (f", {nd} dofs per solve" if nd else " (linear: C̄ once)"), flush=True)
    logger: MacroLogger | None = None
    if cfg.log is not None:
        from fe2ml.data.log import check_fingerprint, check_folder_writable
        from fe2ml.data.recorder import make_macro_logger

        def check():
            if comm.rank == 0:  # before any rank creates its part
                check_folder_writable(cfg.log["folder"])
                check_fingerprint(cfg.log["folder"], rve_fingerprint(rve))

        collective(comm, check)
        run_id = comm.bcast(__import__("uuid").uuid4().hex[:8] if comm.rank == 0 else None, root=0)
        logger = collective(comm, lambda: make_macro_logger(
            comm, rve, cfg.log["folder"], run_id=run_id, config_text=cfg.path.read_text(),
            all_iterations=cfg.log["all_iterations"], cells=cfg.log["cells"]))
        if rank0:
            print(f"  logging RVE evaluations to {cfg.log['folder']} (run {run_id})", flush=True)
    law = build_law(comm, cfg, recorder=logger, rve=rve)
    if rank0 and cfg.kind in ("surrogate", "hybrid"):
        print(f"  {cfg.kind} law from {cfg.surrogate['checkpoint']}", flush=True)

    def tile_loader():  # the RVE that tiled_rve repeats: mesh.rve (direct numerical simulation), else the law's
        from fe2ml.micro.config import load_rve_mesh

        return load_rve_mesh(cfg.mesh_rve, comm=comm) if cfg.mesh_rve is not None else rve_mesh

    mm = collective(comm, lambda: create_macro_mesh(comm, cfg.mesh, where=f"{cfg.path}: mesh", base=cfg.path.parent,
                                                     rve_mesh_loader=tile_loader))

    def mkprob():
        try:
            return MacroProblem(comm, mm, law=law, kinematics=cfg.kinematics,
                                degree=cfg.degree, quadrature_degree=cfg.quadrature_degree, dirichlet=cfg.bcs,
                                tractions=cfg.tractions, pressures=cfg.pressures,
                                orientation=cfg.orientation, newton=cfg.newton)
        except ConfigError as e:
            raise ConfigError(f"{cfg.path}: {e}") from None

    prob = collective(comm, mkprob)
    if logger is not None:
        ids, x = prob.quadrature_point_ids()
        logger.set_points(ids, x)
    if rank0:
        print(f"  macro: {prob.V.dofmap.index_map.size_global * prob.d} dofs, {prob.n_qp_global} quadrature points, "
              f"{cfg.steps} load steps", flush=True)
    start = 0
    if restart:
        meta = collective(comm, lambda: prob.load_checkpoint(out / "checkpoint"))
        start = meta["steps"]
        if rank0:
            print(f"  restarting after step {start} (t = {prob.t:.4g})", flush=True)
        log.info("restart after step %d (t = %.6g)", start, prob.t)
    elif comm.rank == 0 and Path(cfg.path).resolve() != (out / "config.yaml").resolve():
        shutil.copyfile(cfg.path, out / "config.yaml")
    writer = RunWriter(prob, out, config_path=str(Path(cfg.path).resolve()), restart_step=start)
    import os
    import signal

    stop = {"flag": False}

    def on_term(signum, frame):
        stop["flag"] = True

    old = signal.signal(signal.SIGTERM, on_term)
    prob.stop_requested = lambda: stop["flag"]
    fault = os.environ.get("FE2ML_FAULT")  # "rank:step": raise a plain exception there (tests job plumbing)
    status, message = "completed", ""
    try:
        for k in range(start + 1, cfg.steps + 1):
            if logger is not None:
                logger.step = k
            if fault and fault == f"{comm.rank}:{k}":
                raise RuntimeError(f"injected fault on rank {comm.rank} at step {k} (FE2ML_FAULT)")
            rec = prob.step(k / cfg.steps)
            writer.write_step()
            prob.save_checkpoint(out / "checkpoint")
            log.info("step %d/%d t=%.6g Newton its %d cuts %d", k, cfg.steps, prob.t, rec.iterations, rec.cuts)
            if not quiet:
                progress_line(k, cfg.steps, prob.t, rec, comm)
            if k < cfg.steps and comm.allreduce(stop["flag"], op=__import__("mpi4py").MPI.LOR):
                from fe2ml.macro.problem import RunInterrupted

                raise RunInterrupted("SIGTERM received")
    except Fe2mlError as e:
        from fe2ml.macro.problem import RunInterrupted

        if isinstance(e, RunInterrupted):
            status = "terminated"
            message = (f"terminated by SIGTERM; checkpoint at step {len(prob.history)} (t = {prob.t:.6g}); "
                       f"continue with: fe2ml run --restart {out}")
            log.warning(message)
            writer.write_summary(status, message)
            writer.close()
            prob.close()
            raise RunInterrupted(message) from None
        status, message = "failed", str(e)
        log.error(message)
        writer.write_summary(status, message)
        writer.close()
        prob.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
        if logger is not None:
            logger.close()
        law.close()
    writer.write_summary(status, message)
    writer.close()
    summary = {}
    if comm.rank == 0:
        summary = json.loads((out / "summary.json").read_text())
        if not quiet:
            ts = summary["time_split_s"]
            print(f"  done in {time.perf_counter() - t0:.1f} s: constitutive/RVE {ts['rve_or_constitutive']:.2f} s, "
                  f"macro assembly {ts['macro_assembly']:.2f} s, macro solve {ts['macro_solve']:.2f} s; "
                  f"{summary['rve_solves']} RVE solves; load balance max/mean "
                  f"{summary['load_balance_max_over_mean']:.2f}")
            print(f"  outputs: {out}/fields.xdmf, reactions.csv, reactions.png, summary.json")
    prob.close()
    return summary
