"""Strong scaling of a plain FE² run: the same problem on 1, 2, 4, ... ranks.

The problem is the tissue plate with a hole of `examples/plate_hole_fe2.yaml` (HGO matrix with fibres,
softer cells), with a finer macro mesh so that every rank owns many quadrature points. For each rank count
the script prints and writes:
- the whole-run wall time;
- the strong-scaling efficiency T1 / (k Tk);
- the RVE phase time (the slowest rank's constitutive time) and its efficiency;
- the time per RVE solve per rank (the RVE phase time × ranks / solves: constant for ideal scaling);
- the load balance (max over mean of the ranks' constitutive times);
- the time per RVE solve split into assembly, factorization, the solves, the farm's collectives (moving jobs and
  results, and waiting there for the slowest rank of each evaluation) and the rest (mean over the ranks): the phase
  that grows with the rank count is the one that ranks sharing a machine slow down.

Results go to `results/bench_scaling/` as `table.md`, `scaling.json` and `scaling.png`.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_scaling.py --ranks 1 2 [4 8 16] [--h 0.3] [--steps 2]
Run it on an otherwise idle machine with at least as many cores as the largest rank count.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--h", type=float, default=0.3, help="macro mesh size away from the hole")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_scaling"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((ROOT / "examples" / "plate_hole_fe2.yaml").read_text())
    cfg["mesh"]["h"], cfg["mesh"]["h_hole"] = args.h, args.h / 3
    cfg["steps"] = args.steps
    cfg["material"]["rve"]["mesh"]["out_dir"] = str(out / "meshes")
    (out / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows = []
    for k in args.ranks:
        t0 = time.perf_counter()
        r = subprocess.run([str(BIN / "mpiexec"), "-n", str(k), str(BIN / "fe2ml"), "run", str(out / "run.yaml"),
                            "--output", str(out / f"ranks{k}")], capture_output=True, text=True, env=env)
        if r.returncode:
            raise SystemExit(f"bench_scaling: the {k}-rank run failed:\n{r.stderr[-2000:]}")
        s = json.loads((out / f"ranks{k}" / "summary.json").read_text())
        rve_s = s["time_split_s"]["rve_or_constitutive"]
        per_solve = {}  # mean over the ranks of each phase's seconds, per RVE solve per rank
        phases = s.get("rve_phases_per_rank_s") or []
        for ph in ("assemble_s", "factor_s", "solve_s", "exchange_s"):
            per_solve[ph] = sum(p_.get(ph, 0.0) for p_ in phases) / max(s["rve_solves"], 1)
        per_solve["other_s"] = sum(s["constitutive_time_per_rank_s"]) / max(s["rve_solves"], 1) - sum(
            per_solve.values())
        rows.append({"ranks": k, "wall_s": time.perf_counter() - t0, "run_s": s["wall_s"], "rve_s": rve_s,
                     "rve_solves": s["rve_solves"], "per_solve_per_rank_s": rve_s * k / max(s["rve_solves"], 1),
                     "load_balance": s["load_balance_max_over_mean"], "points": s["quadrature_points"],
                     "per_solve_phases_s": per_solve})
        print(f"  {k} rank(s): run {s['wall_s']:.1f} s, RVE phase {rve_s:.1f} s, {s['rve_solves']} RVE solves, "
              f"load balance {s['load_balance_max_over_mean']:.2f}", flush=True)
    base = rows[0]
    for r in rows:
        f = r["ranks"] / base["ranks"]
        r["efficiency"] = base["run_s"] / (f * r["run_s"])
        r["rve_efficiency"] = base["rve_s"] / (f * r["rve_s"])
    lines = ["| ranks | run [s] | efficiency | RVE phase [s] | RVE efficiency | time per RVE solve per rank [ms] "
             "| load balance |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['run_s']:.1f} | {100 * r['efficiency']:.0f} % | {r['rve_s']:.1f} | "
                     f"{100 * r['rve_efficiency']:.0f} % | {1e3 * r['per_solve_per_rank_s']:.1f} | "
                     f"{r['load_balance']:.2f} |")
    lines += ["", "Time per RVE solve by phase (mean over the ranks): growth with the rank count shows where "
              "ranks that share a machine slow each other down.", "",
              "| ranks | assembly [ms] | factorization [ms] | solves [ms] | exchange and waiting [ms] | other [ms] |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        ph = r["per_solve_phases_s"]
        lines.append(f"| {r['ranks']} | {1e3 * ph['assemble_s']:.2f} | {1e3 * ph['factor_s']:.2f} | "
                     f"{1e3 * ph['solve_s']:.2f} | {1e3 * ph['exchange_s']:.2f} | {1e3 * ph['other_s']:.2f} |")
    table = "\n".join(lines)
    print(f"\nplate with a hole, {rows[0]['points']} quadrature points, {args.steps} steps, "
          f"{os.cpu_count()} cores on this machine\n{table}")
    (out / "table.md").write_text(table + "\n")
    (out / "scaling.json").write_text(json.dumps(rows, indent=1))
    sys.path.insert(0, str(ROOT))
    from fe2ml.plotting import plot_lines

    ks = [r["ranks"] for r in rows]
    plot_lines({"whole run": (ks, [r["efficiency"] for r in rows]),
                "RVE phase": (ks, [r["rve_efficiency"] for r in rows])}, out / "scaling.png", xlabel="ranks",
               ylabel="strong-scaling efficiency", title="FE² strong scaling (plate with a hole)", logx=True)
    print(f"wrote {out}/table.md, scaling.json, scaling.png")


if __name__ == "__main__":
    main()
