"""The ``fe2ml`` command.

Subcommands:
    homogenize CONFIG.yaml [--json OUT.json]   RVE: effective stiffness (small) or P̄, Ā, cells (finite strain)
    run CONFIG.yaml [--output DIR] [--overwrite]  macro problem: FE², surrogate or analytic
    sample CONFIG.yaml [--output DIR]          sampling campaign logged to HDF5
    inspect PATH... [--plot PNG]               summary of HDF5 logs
    train CONFIG.yaml [--resume CKPT]          neural surrogate from logs
    export CKPT OUT.pt [--resave]              TorchScript module of a surrogate (or a safe re-save)
    localize RUN_DIR [--step K] [--model CKPT] cell-level quantities of a finished run
    check CONFIG.yaml                          validate any config up front
    demo [--quick] [--output DIR]              the end-to-end tissue demo
    submit CONFIG.yaml --scheduler slurm|pbs   job script (and sbatch/qsub)

Runs serially or under ``mpiexec -n N``; the CLI is the only place that uses ``COMM_WORLD``.
Errors caused by input print one line ``fe2ml: error: ...`` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

from mpi4py import MPI

import numpy as np

from fe2ml.config import load_yaml
from fe2ml.data.config import load_sample_config
from fe2ml.errors import ConfigError, Fe2mlError
from fe2ml.files import atomic_write
from fe2ml.hpc import check_config, submit, write_job_script
from fe2ml.macro.config import load_run_config
from fe2ml.macro.folder import RunFolder
from fe2ml.materials import VOIGT_ORDER, to_voigt
from fe2ml.micro.config import load_homogenize_config, load_rve_mesh
from fe2ml.parallel import install_console_logging
from fe2ml.surrogate.config import load_train_config

__all__ = ["main"]

log = logging.getLogger("fe2ml.cli")


def _voigt_table(C: np.ndarray) -> str:
    d = C.shape[0]
    labels = [f"{i + 1}{j + 1}" for i, j in VOIGT_ORDER[d]]
    M = to_voigt(C)
    w = 13
    lines = [" " * 6 + "".join(f"{lab:>{w}}" for lab in labels)]
    for lab, row in zip(labels, M, strict=True):
        lines.append(f"{lab:>6}" + "".join(f"{v:>{w}.5g}" for v in row))
    return "\n".join(lines)


def _output_file(out: Path, what: str, comm) -> Path:
    """Check an output file path and create its folder (rank 0); a clear error when it cannot be written."""
    msg = None
    if comm.rank == 0:
        if out.is_dir():
            msg = f"{what}: {out} is a folder; give a file name"
        else:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                msg = f"{what}: cannot create the folder of {out} ({e.strerror}: {e.filename})"
    msg = comm.bcast(msg, root=0)
    if msg:
        raise Fe2mlError(msg)
    return out


def cmd_homogenize(args, comm) -> int:
    """Run ``fe2ml homogenize``: the computation is :mod:`fe2ml.micro.homogenize`; here the report is printed."""
    # deferred: a subcommand imports only its own stage (no dolfinx or torch for check, inspect, submit)
    from fe2ml.micro.homogenize import homogenize_finite, homogenize_linear

    t0 = time.perf_counter()
    cfg = load_homogenize_config(args.config)
    for opt in ("json", "plot", "curve"):
        val = getattr(args, opt)
        if val is not None:
            _output_file(Path(val), f"--{opt}", comm)
    if comm.rank == 0:
        print(f"fe2ml homogenize: {cfg.path} ({cfg.dim}D, bc={cfg.bc}, degree={cfg.degree}, ranks={comm.size})",
              flush=True)
    if args.realizations is not None or args.cells is not None:
        return _homogenize_realizations(args, cfg, comm)
    mesh = load_rve_mesh(cfg, comm=comm)
    t_mesh = time.perf_counter() - t0
    if cfg.kinematics == "finite":
        def progress(k, m):
            if comm.rank == 0:
                print(f"\r  rank 0: point {k}/{m}", end="" if k < m else "\n", flush=True)

        report = homogenize_finite(comm, cfg, mesh, t0=t0, progress=progress,
                                   fields_folder=Path(args.json).parent if args.json else Path("."))
        if report is not None:
            _print_finite(args, cfg, report)
            _write_plots(args, mesh, cfg, report)
        return 0
    report = homogenize_linear(comm, cfg, mesh, t0=t0)
    if report is None:
        return 0
    report["mesh_s"] = t_mesh
    fractions = report["phase_fractions"]
    print(f"  mesh {mesh.source}: {len(mesh.cells)} {mesh.cell_type} elements, {mesh.n_cells} cells, "
          f"phase fractions " + ", ".join(f"{t}: {v:.4f}" for t, v in fractions.items()))
    print(f"  {report['ndofs']} dofs, homogenization {report['time_s'] * 1e3:.1f} ms (setup {report['setup_s']:.2f} s)")
    print(f"Effective stiffness C (Voigt matrix, order {', '.join(report['voigt_order'])}; "
          "σ = C·[ε11, ε22, (ε33,) (2ε23, 2ε13,) 2ε12]):")
    print(_voigt_table(np.array(report["C"])))
    for e, s in zip(report["strains"], report["stresses"], strict=True):
        print(f"  ε̄ = {np.round(e, 6).tolist()}  ->  σ̄ = {np.round(s, 6).tolist()}")
    _write_json_report(args, report, indent=1)
    _write_plots(args, mesh, cfg, None)
    return 0


def _homogenize_realizations(args, cfg, comm) -> int:
    """``fe2ml homogenize --realizations N [--cells ...]``: the spread over random realizations of the RVE."""
    # deferred: a subcommand imports only its own stage (no dolfinx or torch for check, inspect, submit)
    from fe2ml.micro.representative import plot_realizations, realizations_report

    def progress(k, m, dt):
        if comm.rank == 0:
            print(f"\r  rank 0: realization {k}/{m} ({dt:.1f} s)", end="" if k < m else "\n", flush=True)

    report = realizations_report(comm, cfg, load_yaml(args.config), args.realizations or 8, args.cells,
                                 progress=progress)
    if report is None:
        return 0
    print(f"  {report['quantity']} over {report['rows'][0]['realizations']} realizations (mean, std, coefficient of "
          "variation):")
    for r in report["rows"]:
        head = f"  {r['n_cells']} cells: " if r["n_cells"] else "  "
        print(head + ", ".join(f"{c} {r['mean'][c]:.5g} ± {r['std'][c]:.3g} ({100 * r['cv'][c]:.2f} %)"
                               for c in report["components"]))
    _write_json_report(args, report, indent=1)
    png = str(Path(args.json).with_suffix("")) + "_realizations.png" if args.json else "realizations.png"
    plot_realizations(report, png)
    print(f"  wrote {png}")
    return 0


def _write_json_report(args, report: dict, **kw) -> None:
    if args.json is not None:
        atomic_write(args.json, json.dumps(report, **kw))
        print(f"  wrote {args.json}")


def _print_finite(args, cfg, report: dict) -> None:
    """The finite-strain report of ``fe2ml homogenize`` on the console and in --json."""
    its, tp, cells = np.array(report["iterations"]), np.array(report["time_s"]), report["cells"]
    print(f"  {len(cfg.F)} points: {its.sum()} Newton iterations, {tp.mean() * 1e3:.1f} ms per point")
    P = np.array(report["P"])
    for k in range(len(cfg.F)):
        c = cells[k]
        cs = np.array(c["cell"]["stretch"]) if c and c["cell"]["stretch"] else np.zeros((0, 3))
        lam = f", max cell stretch {cs[:, 0].max():.4f}" if len(cs) else ""
        print(f"  F̄[{k}] = {np.round(cfg.F[k], 4).tolist()}  P̄ = {np.round(P[k], 6).tolist()}{lam}")
    _write_json_report(args, report)


def _write_plots(args, mesh, cfg, finite: dict | None) -> None:
    """--curve (finite strain; default next to --json) and --plot of ``fe2ml homogenize``."""
    curve = args.curve or (str(Path(args.json).with_suffix("")) + "_stress.png" if args.json else None)
    if finite is not None and curve:
        from fe2ml.plotting import plot_stress_strain  # deferred: matplotlib only when a figure is asked for

        plot_stress_strain(np.array(cfg.F), np.array(finite["P"]), curve,
                           title=f"{Path(cfg.path).name}: homogenized response")
        print(f"  wrote {curve}")
    if args.plot is not None:
        from fe2ml.plotting import plot_rve  # deferred: matplotlib only when a figure is asked for

        plot_rve(mesh, args.plot)
        print(f"  wrote {args.plot}")


def cmd_run(args, comm) -> int:
    """Run ``fe2ml run``."""
    # deferred: a subcommand imports only its own stage (no dolfinx or torch for check, inspect, submit)
    from fe2ml.macro.run import run

    if args.allow_changed and not args.restart:
        raise ConfigError("--allow-changed: only with --restart")
    if args.overwrite and args.restart:
        raise ConfigError("--overwrite: not with --restart (a restart continues the run in its folder)")
    if args.restart:
        rd = Path(args.config)
        if not rd.is_dir():
            raise ConfigError(f"--restart {rd}: run folder not found")
        path, base = RunFolder(rd).config_to_load(prefer_original=args.allow_changed)
        cfg = load_run_config(path, output=str(rd), base=base)  # relative paths as seen from the original's folder
        run(comm, cfg, restart=True, allow_changed=args.allow_changed)
        return 0
    cfg = load_run_config(args.config, output=args.output)
    if cfg.parameters is not None and cfg.parameters.realizations:  # stochastic FE²: one history per realization
        # deferred: a subcommand imports only its own stage (no dolfinx or torch for check, inspect, submit)
        from fe2ml.macro.realizations import run_realizations

        run_realizations(comm, cfg)
        return 0
    folder = RunFolder(cfg.output)
    msg = folder.claim(cfg.path, overwrite=args.overwrite) if comm.rank == 0 else None
    msg = comm.bcast(msg, root=0)
    if msg is not None:
        raise ConfigError(msg)
    if comm.rank == 0 and folder.outside(cfg.path):
        log.info(f"fe2ml run: the run folder {folder.path.resolve()} lies outside the config's folder "
                 f"{cfg.path.resolve().parent}")
    run(comm, cfg)
    return 0


def cmd_sample(args, comm) -> int:
    """Run ``fe2ml sample``."""
    # deferred: a subcommand imports only its own stage (no dolfinx or torch for check, inspect, submit)
    from fe2ml.data.campaign import run_campaign

    cfg = load_sample_config(args.config, output=args.output)
    if not (args.parts >= 1 and 0 <= args.part < args.parts):
        raise Fe2mlError(f"--part {args.part} --parts {args.parts}: need 0 <= part < parts")
    run_campaign(comm, cfg, part=args.part, parts=args.parts)
    return 0


def cmd_inspect(args, comm) -> int:
    """Run ``fe2ml inspect``: summary of a log (files or folders) and optional plot of the sampled space."""
    # deferred: a subcommand imports only its own stage (no dolfinx or torch for check, inspect, submit)
    from fe2ml.data.reader import find_parts, read_logs

    if comm.rank != 0:
        return 0
    parts = find_parts(args.paths)

    # deferred: a subcommand imports only its own stage (no dolfinx or torch for check, inspect, submit)
    from fe2ml.data.schema import open_part

    fps: dict = {}
    for p in parts:
        with open_part(p) as f:
            fps.setdefault(str(f.attrs.get("fingerprint", "?")), []).append(p)
    fp_list = [args.fingerprint] if args.fingerprint else sorted(fps)
    for fp in fp_list:
        data = read_logs(args.paths, fingerprint=fp)
        F, P = data["F"], data["P"]
        lam = np.sqrt(np.clip(np.linalg.eigvalsh(np.einsum("nki,nkj->nij", F, F)), 0, None))
        J = np.linalg.det(F)
        Pn = np.linalg.norm(P.reshape(len(P), -1), axis=1) if len(P) else np.zeros(0)
        rve = data.rve
        print(f"fingerprint {fp}: {len(data)} records in {len(data.parts)} part(s), {data.dim}D, {data.kinematics} "
              f"strain")
        print(f"  RVE: {rve.get('n_elements', '?')} elements, {rve.get('n_cells', '?')} cells, bc {rve.get('bc')}, "
              f"materials {', '.join(m.get('type', '?') for m in rve.get('materials', {}).values())}")
        srcs, counts = np.unique(data.source.astype(str), return_counts=True)
        kinds = {str(a.get("source_id")): str(a.get("source_kind")) for a in data.attrs}
        for s_, c in zip(srcs, counts, strict=True):
            print(f"  source {s_} ({kinds.get(s_, '?')}): {c} records")
        if len(data):
            print(f"  principal stretches: [{lam.min():.4f}, {lam.max():.4f}]; J: [{J.min():.4f}, {J.max():.4f}]; "
                  f"|P̄|: [{Pn.min():.4g}, {Pn.max():.4g}]")
            if "cells/stretch" in data.arrays:
                cs = data["cells/stretch"][..., 0]
                print(f"  cell-level: {cs.shape[1]} cells per record, max principal cell stretch "
                      f"[{np.nanmin(cs):.4f}, {np.nanmax(cs):.4f}]")
        if args.plot:
            # deferred: a subcommand imports only its own stage (no dolfinx or torch for check, inspect, submit)
            from fe2ml.plotting import plot_strain_space

            out = args.plot if len(fp_list) == 1 else str(Path(args.plot).with_suffix("")) + f"_{fp}.png"
            plot_strain_space(lam, data.source.astype(str), out, title=f"sampled strain space ({fp})")
            print(f"  wrote {out}")
    return 0


def cmd_train(args, comm) -> int:
    """Run ``fe2ml train``."""
    # deferred: a subcommand imports only its own stage (no dolfinx or torch for check, inspect, submit)
    from fe2ml.surrogate.train import train

    cfg = load_train_config(args.config, output=args.output)
    train(comm, cfg, resume=args.resume)
    return 0


def cmd_identify(args, comm) -> int:
    """Run ``fe2ml identify``: microstructure parameters from macro measurements, with a Laplace posterior."""
    # deferred: a subcommand imports only its own stage (no dolfinx or torch for check, inspect, submit)
    from fe2ml.identify import identify, load_identify_config

    cfg = load_identify_config(args.config, output=args.output)
    identify(comm, cfg)
    return 0


def cmd_export(args, comm) -> int:
    """Run ``fe2ml export``: TorchScript module of a checkpoint, or (``--resave``) the checkpoint in the safe format."""
    if comm.rank != 0:
        return 0
    out = _output_file(Path(args.out), "export", comm)
    if args.resave:
        # deferred: a subcommand imports only its own stage (no dolfinx or torch for check, inspect, submit)
        from fe2ml.surrogate.checkpoint import resave_checkpoint

        resave_checkpoint(args.checkpoint, out)
        print(f"fe2ml export: wrote {out} (safe checkpoint format; load it wherever {args.checkpoint} was used)")
        return 0
    # deferred: a subcommand imports only its own stage (no dolfinx or torch for check, inspect, submit)
    from fe2ml.surrogate.export import export_checkpoint

    export_checkpoint(args.checkpoint, out)
    print(f"fe2ml export: wrote {out} (torch.jit.load it; forward(F (n,d,d) float64) -> P, A)")
    return 0


def cmd_localize(args, comm) -> int:
    """Run ``fe2ml localize``."""
    # deferred: a subcommand imports only its own stage (no dolfinx or torch for check, inspect, submit)
    from fe2ml.localization import localize

    localize(comm, args.run_dir, step=args.step, points=args.points, fields=args.fields or (), model=args.model)
    return 0


def cmd_check(args, comm) -> int:
    """Run ``fe2ml check``."""
    kind = check_config(args.config, comm=comm)
    if comm.rank == 0:
        print(f"fe2ml check: {args.config} is a valid {kind} config")
    return 0


def cmd_submit(args, comm) -> int:
    """Run ``fe2ml submit``."""
    if comm.rank != 0:
        return 0

    script = write_job_script(args.config, scheduler=args.scheduler, nodes=args.nodes,
                              ntasks_per_node=args.ntasks_per_node, time=args.time, account=args.account,
                              array=args.array, out=args.script, template=args.template)
    print(f"fe2ml submit: wrote {script}")
    if not args.dry_run:
        print(submit(script, args.scheduler))
    return 0


def cmd_demo(args, comm) -> int:
    """Run ``fe2ml demo``."""
    # deferred: a subcommand imports only its own stage (no dolfinx or torch for check, inspect, submit)
    from fe2ml.demo import run_demo

    run_demo(comm, args.output, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fe2ml`` command."""
    p = argparse.ArgumentParser(prog="fe2ml", description="FE² multiscale homogenization with neural surrogates")
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("homogenize", help="effective stiffness of an RVE from a YAML config")
    h.add_argument("config", help="YAML config (keys: dim, mesh, phases, bc, degree, strains, tol)")
    h.add_argument("--json", default=None, help="write the result (C, voigt, volume, ndofs, time_s, ...) here")
    h.add_argument("--plot", default=None, help="draw the RVE (phases and numbered cells) to this PNG")
    h.add_argument("--realizations", type=int, default=None,
                   help="representativeness: homogenize seeds 0..N-1 and report the spread (mean, std, CV)")
    h.add_argument("--cells", type=int, nargs="+", default=None,
                   help="with --realizations: repeat for these numbers of cells (h scaled with the cell size)")
    h.add_argument("--curve", default=None,
                   help="finite strain: PNG of the homogenized stress-strain curve (default: next to --json)")
    h.set_defaults(func=cmd_homogenize)
    r = sub.add_parser("run", help="macro problem (FE² with RVEs, or analytic materials) from a YAML config")
    r.add_argument("config", help="YAML config (keys: dim, mesh, material, bcs, tractions, steps, ...); with "
                   "--restart: the run folder")
    r.add_argument("--restart", action="store_true", help="continue the run in folder CONFIG from its checkpoint")
    r.add_argument("--allow-changed", action="store_true",
                   help="with --restart: continue although the config, RVE or checkpoint changed (noted in run.log)")
    r.add_argument("--output", default=None, help="run folder (overrides the config's output)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in the run folder (without it, an existing run is refused)")
    r.set_defaults(func=cmd_run)
    sm = sub.add_parser("sample", help="sampling campaign: RVE over a design of F̄, logged to HDF5 (resumable)")
    sm.add_argument("config", help="YAML config (keys: rve, design, output, flush_every, cells)")
    sm.add_argument("--output", default=None, help="log folder (overrides the config's output)")
    sm.add_argument("--part", type=int, default=0, help="job-array task index (evaluate ids = part mod parts)")
    sm.add_argument("--parts", type=int, default=1, help="number of job-array tasks")
    sm.set_defaults(func=cmd_sample)
    ins = sub.add_parser("inspect", help="summary of HDF5 logs (files or folders)")
    ins.add_argument("paths", nargs="+", help="log files or folders")
    ins.add_argument("--fingerprint", default=None, help="only this RVE fingerprint")
    ins.add_argument("--plot", default=None, help="PNG of the sampled principal stretches")
    ins.set_defaults(func=cmd_inspect)
    tr = sub.add_parser("train", help="train a neural surrogate on HDF5 logs")
    tr.add_argument("config", help="YAML config (keys: data, model, loss, split, train, ensemble, output)")
    tr.add_argument("--resume", default=None, help="refine this checkpoint on the config's data")
    tr.add_argument("--output", default=None, help="output folder (overrides the config's output)")
    tr.set_defaults(func=cmd_train)
    idf = sub.add_parser("identify", help="microstructure parameters from measured reaction curves, with uncertainty")
    idf.add_argument("config", help="YAML config (keys: run, unknowns, data, noise, check, max_iterations, output)")
    idf.add_argument("--output", default=None, help="output folder (overrides the config)")
    idf.set_defaults(func=cmd_identify)
    ex = sub.add_parser("export", help="TorchScript module of a potential surrogate checkpoint")
    ex.add_argument("checkpoint")
    ex.add_argument("out")
    ex.add_argument("--resave", action="store_true",
                    help="write CHECKPOINT in the safe format instead (a trusted checkpoint of an earlier fe2ml: this "
                    "is the only command that unpickles objects from a file)")
    ex.set_defaults(func=cmd_export)
    lo = sub.add_parser("localize", help="cell-level quantities at the converged macro state of a run")
    lo.add_argument("run_dir")
    lo.add_argument("--step", type=int, default=None, help="load step (default: the last converged)")
    lo.add_argument("--points", type=int, nargs="+", default=None, help="quadrature point indices (default: all)")
    lo.add_argument("--fields", type=int, nargs="+", default=None, help="write full micro fields of these points")
    lo.add_argument("--model", default=None, help="learned localization checkpoint (instead of RVE re-solves)")
    lo.set_defaults(func=cmd_localize)
    dm = sub.add_parser("demo", help="the end-to-end tissue demo (RVE -> campaign -> surrogate -> FE² -> cells)")
    dm.add_argument("--output", default="results/demo", help="output folder (default results/demo)")
    dm.add_argument("--quick", action="store_true", help="the same loop, tiny")
    dm.set_defaults(func=cmd_demo)
    ck = sub.add_parser("check", help="validate a config (run, sample, train or homogenize) before any work")
    ck.add_argument("config")
    ck.set_defaults(func=cmd_check)
    sb = sub.add_parser("submit", help="write (and submit) a slurm or pbs job script for a config")
    sb.add_argument("config")
    sb.add_argument("--scheduler", required=True, choices=["slurm", "pbs"])
    sb.add_argument("--nodes", type=int, default=1)
    sb.add_argument("--ntasks-per-node", type=int, default=1)
    sb.add_argument("--time", required=True, help="wall time HH:MM:SS")
    sb.add_argument("--account", default=None)
    sb.add_argument("--array", type=int, default=None, help="split a sampling campaign into K array tasks")
    sb.add_argument("--template", default=None, help="your own job script template (same placeholders)")
    sb.add_argument("--script", default=None, help="where to write the job script (default: next to the config)")
    sb.add_argument("--dry-run", action="store_true", help="only write the script")
    sb.set_defaults(func=cmd_submit)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fe2ml`` command; returns the exit status."""
    args = build_parser().parse_args(argv)

    comm = MPI.COMM_WORLD
    install_console_logging(comm)  # rank 0's progress on stdout, every rank's warnings on stderr
    err = None
    code = 1
    try:
        code = args.func(args, comm)
    except Fe2mlError as e:
        err = str(e)
    except KeyboardInterrupt:
        err = "interrupted"
    except Exception:  # a bug: never leave the other ranks waiting in a collective

        traceback.print_exc()
        sys.stderr.flush()
        if comm.size > 1:
            time.sleep(0.5)  # let the launcher forward the message before it tears the job down
            comm.Abort(1)
        return 1
    # agree collectively on failure so that no rank is left waiting
    errs = comm.allgather(err)
    first = next((e for e in errs if e is not None), None)
    if first is not None:
        if comm.rank == 0:
            print(f"fe2ml: {'stopped' if first.startswith('terminated by SIGTERM') else 'error'}: {first}",
                  file=sys.stderr, flush=True)
        return 143 if first.startswith("terminated by SIGTERM") else 2
    return code


if __name__ == "__main__":
    sys.exit(main())
