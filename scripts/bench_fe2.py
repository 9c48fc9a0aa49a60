"""Benchmark the FE² macro solver; prints its figures (JSON with --json).

Figures:
  1. time per RVE solve inside FE² against a standalone solve of the same RVE at the same F̄ from the
     same warm-start states (one macro Newton iteration's worth of points);
  2. parallel efficiency T1 / (2 T2) of the tissue strip on a 10x10 (x2 triangles, 200 quadrature
     points) macro mesh, 1 vs 2 ranks, and the max/mean constitutive time over ranks (load balance);
  3. total wall time and its split for the shipped example examples/strip_fe2.yaml on 2 ranks.

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_fe2.py [--json OUT.json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np

import fe2ml  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def inside_vs_standalone():
    from fe2ml.laws.rve import RVELaw
    from fe2ml.macro.loads import DirichletSpec
    from fe2ml.macro.mesh import create_macro_mesh
    from fe2ml.macro.problem import MacroProblem
    from fe2ml.materials import NeoHookean
    from fe2ml.micro.finite import HyperelasticRVE
    from fe2ml.micro.geometry import generate_mesh
    from fe2ml.micro.mesh import read_mesh

    comm = MPI.COMM_SELF
    tmp = tempfile.mkdtemp()
    rm = read_mesh(generate_mesh("cells_2d", dict(n_cells=4, volume_fraction=0.3, seed=1, h=0.06), tmp))
    mats = {1: NeoHookean(mu=10.0, K=30.0), 2: NeoHookean(mu=1.0, K=5.0)}
    calls = []

    class Recorder:
        def record(self, F, P, A, cells, newton_its):
            calls.append((F.copy(), time.perf_counter()))

        def commit(self):
            pass

        def rollback(self):
            pass

    law = RVELaw(HyperelasticRVE(rm, mats), recorder=Recorder())
    bcs = [DirichletSpec("left", (0,), 0.0), DirichletSpec("bottom", (1,), 0.0),
           DirichletSpec("right", (0,), lambda x, t: 0.6 * t)]
    prob = MacroProblem(comm, create_macro_mesh(comm, {"generate": "rectangle", "size": [4.0, 1.0], "n": [8, 2]}),
                        law=law, dirichlet=bcs)
    prob.step(0.5)
    snapshot = list(law.committed)
    # time the first macro iteration of the next step: one law.evaluate over all points
    orig = law.evaluate
    timing = {}

    def timed(F):
        t0 = time.perf_counter()
        out = orig(F)
        if "t" not in timing:
            timing["t"] = time.perf_counter() - t0
            timing["F"] = F.copy()
        return out

    law.evaluate = timed
    prob.step(1.0)
    n = len(timing["F"])
    standalone = HyperelasticRVE(rm, mats)
    standalone.evaluate(timing["F"][:1], cells=False)  # JIT/warm-up outside the timing
    t0 = time.perf_counter()
    standalone.evaluate(timing["F"], states=snapshot, cells=False)
    t_sa = time.perf_counter() - t0
    r = timing["t"] / t_sa
    print(f"1. RVE solve inside FE²: {timing['t'] / n * 1e3:.2f} ms/point; standalone, same F̄ and warm starts: "
          f"{t_sa / n * 1e3:.2f} ms/point; ratio {r:.3f} (floor 1.2)", flush=True)
    return dict(points=n, inside_ms=timing["t"] / n * 1e3, standalone_ms=t_sa / n * 1e3, ratio=r)


STRIP = """\
dim: 2
mesh: {{generate: rectangle, size: [4.0, 1.0], n: [{nx}, {ny}]}}
material:
  kind: rve
  rve:
    mesh: {{generate: cells_2d, n_cells: 4, volume_fraction: 0.3, seed: 1, h: 0.06}}
    phases:
      1: {{material: neo_hookean, mu: 10.0e3, K: 30.0e3}}
      2: {{material: neo_hookean, mu: 1.0e3, K: 5.0e3}}
bcs:
  - {{boundary: left, components: [0], value: 0.0}}
  - {{boundary: bottom, components: [1], value: 0.0}}
  - {{boundary: right, components: [0], value: "0.4*t"}}
steps: 2
"""


def run_cli(cfg, out, ranks):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(BIN / "fe2ml"), "run", str(cfg), "--output", str(out)]
    if ranks > 1:
        cmd = [str(BIN / "mpiexec"), "-n", str(ranks)] + cmd
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    s = json.loads((Path(out) / "summary.json").read_text())
    s["process_s"] = time.perf_counter() - t0
    return s


def parallel_efficiency():
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "strip200.yaml"
    cfg.write_text(STRIP.format(nx=10, ny=10))
    s1 = run_cli(cfg, tmp / "r1", 1)
    s2 = run_cli(cfg, tmp / "r2", 2)
    eff = s1["wall_s"] / (2 * s2["wall_s"])
    print(f"2. {s1['quadrature_points']} quadrature points, 2 steps: 1 rank {s1['wall_s']:.2f} s, 2 ranks "
          f"{s2['wall_s']:.2f} s (solve phase) -> parallel efficiency {100 * eff:.1f} % (floor 90 %); "
          f"constitutive time per rank {np.round(s2['constitutive_time_per_rank_s'], 2).tolist()} s, max/mean "
          f"{s2['load_balance_max_over_mean']:.3f}; whole process incl. start-up {s1['process_s']:.1f} s vs "
          f"{s2['process_s']:.1f} s", flush=True)
    return dict(qp=s1["quadrature_points"], t1=s1["wall_s"], t2=s2["wall_s"], efficiency=eff,
                load_balance=s2["load_balance_max_over_mean"])


def example_split():
    tmp = Path(tempfile.mkdtemp())
    s = run_cli(ROOT / "examples" / "strip_fe2.yaml", tmp / "ex", 2)
    ts = s["time_split_s"]
    print(f"3. examples/strip_fe2.yaml on 2 ranks: process {s['process_s']:.1f} s, solve phase {s['wall_s']:.2f} s = "
          f"RVE {ts['rve_or_constitutive']:.2f} s + macro assembly {ts['macro_assembly']:.3f} s + macro solve "
          f"{ts['macro_solve']:.3f} s + output {ts['output']:.3f} s; {s['rve_solves']} RVE solves, "
          f"{sum(st['newton_iterations'] for st in s['steps'])} macro Newton iterations", flush=True)
    return dict(process_s=s["process_s"], wall_s=s["wall_s"], split=ts, rve_solves=s["rve_solves"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"fe2ml FE² benchmark ({os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    out = {"inside_vs_standalone": inside_vs_standalone(), "parallel": parallel_efficiency(),
           "example": example_split()}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
