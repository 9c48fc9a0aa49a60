"""Direct (MUMPS) against iterative (Krylov + algebraic multigrid) RVE solves on 3D cells-in-matrix RVEs, one core.

The RVE is `cells_3d` (4 cells, volume fraction 0.2, stiff cells in a softer matrix). Every measurement runs in its
own process, so that its peak memory (resident set) is its own:

1. the 17,814-dof RVE (h = 0.058): a linear homogenization (assembly, factorization or preconditioner, the 6 unit
   strains' solves, C̄) and a finite-strain evaluation (Newton from F̄ = I to a 20 % stretch with shear, then P̄ and
   Ā from the 9 tangent right-hand sides), with each solver: time, the speed-up of the iterative solver (floor 2×),
   and the difference of C̄, P̄ and Ā;
2. the same RVE at h = 0.0295, 102,813 dofs: the iterative linear homogenization (floor 10 s), its C̄ against
   MUMPS' (floor 1e-6), and the iterative finite-strain evaluation (floor 60 s); peak memory of each (floor 2 GiB);
3. the Krylov warm start: a load path of 6 points on the 17,814-dof RVE (each point started from the last), with
   the tangent's solves started from the last point's fluctuation sensitivities and the first Newton increment
   predicted from them, against zero initial guesses: Krylov iterations and time;
4. the mixed u–p formulation (K/μ = 500, P2–P0) on a coarser RVE (h = 0.1, 44,483 dofs): direct against the
   field-split MINRES solver, one finite-strain evaluation.

Written to ``results/bench_rve_solver/``: ``report.json``, ``table.md`` and ``solver.png`` (time per case and
solver). ``--check`` exits 1 when a floor is not met; ``--quick`` runs small RVEs only, without (4) (no floors).

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_rve_solver.py [--quick] [--check] [--no-mixed]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
F3 = np.array([[1.2, 0.03, 0.0], [0.0, 0.93, 0.02], [0.01, 0.0, 0.95]])


def mesh(h: float):
    from mpi4py import MPI

    from fe2ml.micro.geometry import generate_mesh
    from fe2ml.micro.mesh import read_mesh

    out = ROOT / "results" / "bench_rve_solver" / "meshes"
    out.mkdir(parents=True, exist_ok=True)
    return read_mesh(generate_mesh("cells_3d", dict(n_cells=4, volume_fraction=0.2, seed=1, h=h), str(out),
                                   comm=MPI.COMM_SELF))


def one(task: str, kind: str, h: float) -> dict:
    """One measurement in this process: ``linear``, ``finite``, ``path``, ``path-cold`` or ``mixed``."""
    import fe2ml  # noqa: F401
    from fe2ml.materials import LinearElastic, NeoHookean
    from fe2ml.micro.finite import HyperelasticRVE
    from fe2ml.micro.linear import LinearRVE
    from fe2ml.micro.reduction import SolverOptions

    m = mesh(h)
    opts = SolverOptions(type=kind)
    out: dict = {"task": task, "solver": kind, "h": h}
    if task == "linear":
        rve = LinearRVE(m, {1: LinearElastic(E=1.0, nu=0.3), 2: LinearElastic(E=10.0, nu=0.45)}, solver=opts)
        t0 = time.perf_counter()
        res = rve.homogenize()
        out.update(seconds=time.perf_counter() - t0, dofs=rve.ndofs, C=res.voigt.tolist())
    elif task == "mixed":
        mats = {1: NeoHookean(mu=1.0, K=500.0), 2: NeoHookean(mu=10.0, K=5000.0)}
        rve = HyperelasticRVE(m, mats, formulation="mixed", solver=opts)
        t0 = time.perf_counter()
        res = rve.evaluate(F3, cells=False)
        out.update(seconds=time.perf_counter() - t0, dofs=rve.n_reduced, P=res.P[0].tolist(), A=res.A[0].tolist(),
                   newton=int(res.iterations[0]), krylov_its=rve.stats["krylov_its"])
    else:
        mats = {1: NeoHookean(mu=1.0, K=3.0), 2: NeoHookean(mu=10.0, K=30.0)}
        rve = HyperelasticRVE(m, mats, formulation="displacement", solver=opts)
        if task == "path-cold":  # zero initial guesses: forget the sensitivities after every tangent
            base = rve.homogenized

            def cold(R):
                out_ = base(R)
                rve._X_sens = None
                return out_

            rve.homogenized = cold  # type: ignore[method-assign]
        Fs = F3[None] if task == "finite" else np.eye(3) + np.linspace(1 / 6, 1, 6)[:, None, None] * (F3 - np.eye(3))
        t0 = time.perf_counter()
        res = rve.evaluate(Fs, cells=False, warm_start=True)
        out.update(seconds=time.perf_counter() - t0, dofs=rve.ndofs, P=res.P[-1].tolist(), A=res.A[-1].tolist(),
                   newton=int(res.iterations.sum()), krylov_its=rve.stats["krylov_its"])
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run(task: str, kind: str, h: float) -> dict:
    print(f"  {task:>9} {kind:>9} h = {h} ...", end="", flush=True)
    r = subprocess.run([sys.executable, __file__, "--one", task, kind, str(h)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode:
        raise SystemExit(f"bench_rve_solver: {task} {kind} h={h} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f" {res['dofs']} dofs, {res['seconds']:.2f} s, peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
    return res


def rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small RVEs only, a smoke run (no floors)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a floor is not met")
    ap.add_argument("--no-mixed", action="store_true", help="leave out the mixed-formulation case (4)")
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], float(args.one[2]))))
        return
    small, large, hmix = (0.15, 0.1, 0.3) if args.quick else (0.058, 0.0295, 0.1)
    out_dir = ROOT / "results" / "bench_rve_solver"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"fe2ml RVE solvers, one core ({os.cpu_count()} on this machine){' (quick)' if args.quick else ''}")
    R = {}
    for task in ("linear", "finite"):
        for kind in ("direct", "iterative"):
            R[f"{task}-{kind}"] = run(task, kind, small)
    R["large-linear-iterative"] = run("linear", "iterative", large)
    R["large-linear-direct"] = run("linear", "direct", large)
    R["large-finite-iterative"] = run("finite", "iterative", large)
    R["path-warm"] = run("path", "iterative", small)
    R["path-cold"] = run("path-cold", "iterative", small)
    if not (args.no_mixed or args.quick):
        for kind in ("direct", "iterative"):
            R[f"mixed-{kind}"] = run("mixed", kind, hmix)

    lin_speed = R["linear-direct"]["seconds"] / R["linear-iterative"]["seconds"]
    fin_speed = R["finite-direct"]["seconds"] / R["finite-iterative"]["seconds"]
    c_small = rel(R["linear-iterative"]["C"], R["linear-direct"]["C"])
    c_large = rel(R["large-linear-iterative"]["C"], R["large-linear-direct"]["C"])
    p_small = rel(R["finite-iterative"]["P"], R["finite-direct"]["P"])
    a_small = rel(R["finite-iterative"]["A"], R["finite-direct"]["A"])
    mem = max(R["large-linear-iterative"]["peak_rss_mib"], R["large-finite-iterative"]["peak_rss_mib"]) / 1024
    nd_s, nd_l = R["linear-direct"]["dofs"], R["large-linear-iterative"]["dofs"]
    rows = [
        ("linear homogenization", nd_s, R["linear-direct"]["seconds"], R["linear-iterative"]["seconds"],
         f"{lin_speed:.2f}×", f"C̄ {c_small:.1e}"),
        ("finite-strain evaluation (Newton + Ā)", nd_s, R["finite-direct"]["seconds"],
         R["finite-iterative"]["seconds"], f"{fin_speed:.2f}×", f"P̄ {p_small:.1e}, Ā {a_small:.1e}"),
        ("linear homogenization", nd_l, R["large-linear-direct"]["seconds"], R["large-linear-iterative"]["seconds"],
         f"{R['large-linear-direct']['seconds'] / R['large-linear-iterative']['seconds']:.2f}×",
         f"C̄ {c_large:.1e}"),
        ("finite-strain evaluation (Newton + Ā)", nd_l, None, R["large-finite-iterative"]["seconds"], "", ""),
    ]
    if "mixed-direct" in R:
        md, mi = R["mixed-direct"], R["mixed-iterative"]
        rows.append(("mixed u–p (K/μ = 500), finite strain", md["dofs"], md["seconds"], mi["seconds"],
                     f"{md['seconds'] / mi['seconds']:.2f}×",
                     f"P̄ {rel(mi['P'], md['P']):.1e}, Ā {rel(mi['A'], md['A']):.1e}"))
    lines = ["| case | dofs | direct (MUMPS) | iterative | speed-up | iterative − direct (max, relative) |",
             "|---|---|---|---|---|---|"]
    for name, nd, td, ti, sp, diff in rows:
        lines.append(f"| {name} | {nd:,} | {'' if td is None else f'{td:.2f} s'} | {ti:.2f} s | {sp} | {diff} |")
    pw, pc = R["path-warm"], R["path-cold"]
    lines += ["", f"| load path, 6 points, {pw['dofs']:,} dofs | Newton iterations | Krylov iterations | time |",
              "|---|---|---|---|",
              f"| Krylov warm start | {pw['newton']} | {pw['krylov_its']} | {pw['seconds']:.2f} s |",
              f"| zero initial guesses | {pc['newton']} | {pc['krylov_its']} | {pc['seconds']:.2f} s |"]
    lines += ["", f"Peak memory of the {nd_l:,}-dof iterative solves (whole process): {mem:.2f} GiB; MUMPS' linear "
              f"homogenization of it: {R['large-linear-direct']['peak_rss_mib'] / 1024:.2f} GiB."]
    table = "\n".join(lines)
    print("\n" + table)
    floors = {
        f"iterative linear homogenization at {nd_l:,} dofs <= 10 s": R["large-linear-iterative"]["seconds"] <= 10,
        f"iterative finite-strain evaluation at {nd_l:,} dofs <= 60 s": R["large-finite-iterative"]["seconds"] <= 60,
        f"C̄ iterative vs direct at {nd_l:,} dofs <= 1e-6": c_large <= 1e-6,
        "peak memory of the large iterative solves <= 2 GiB": mem <= 2.0,
        f"iterative >= 2x faster than MUMPS at {nd_s:,} dofs (linear and finite strain)":
            lin_speed >= 2 and fin_speed >= 2,
        "large RVE has >= 100k dofs": nd_l >= 100_000,
    }
    print("\nfloors" + (" (not applied to --quick)" if args.quick else "") + ":")
    for k, ok in floors.items():
        print(f"  {'met' if ok else 'NOT MET'}: {k}")
    (out_dir / "table.md").write_text(table + "\n")
    (out_dir / "report.json").write_text(json.dumps({"runs": R, "floors": floors}, indent=1))
    from fe2ml.plotting import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    labels = [f"{n.split(' (')[0]}\n{nd:,} dofs" for n, nd, *_ in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r[2] or 0.0 for r in rows], 0.4, label="direct (MUMPS)")
    ax.bar(x + 0.2, [r[3] for r in rows], 0.4, label="iterative")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("seconds, one core")
    ax.set_yscale("log")
    ax.set_title("RVE solvers (3D, 4 cells); no bar: not run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "solver.png", dpi=120)
    print(f"wrote {out_dir}/table.md, report.json, solver.png")
    if args.check and not args.quick and not all(floors.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
