"""FE² against direct numerical simulation (DNS) of the resolved microstructure.

A strip [0, 2] x [0, 1] clamped at x = 0 and stretched 10 % at x = 2 (both ends held in y) is made of
a periodic tissue: soft nearly-circular cells (neo-Hookean, mu = 0.2) in a neo-Hookean matrix
(mu = 1). The DNS tiles the RVE 2N x N times with scale eps = 1/N and resolves every cell with the
per-phase laws (analytic path); FE² solves the strip on a coarse macro mesh with an RVE at every
quadrature point. Printed: right-end reaction force and mean vertical displacement of the top edge
(lateral contraction) for each eps, with their relative differences to FE²; the same table goes to
results/verify_dns/table.md and .json, the plot to results/verify_dns/dns_vs_fe2.png.

Usage: OMP_NUM_THREADS=1 .venv/bin/mpiexec -n 2 .venv/bin/python scripts/verify_dns.py [--tiles 1 2 4 8] [--check]

``--check`` exits with status 1 unless both differences decrease as eps decreases and the finest eps is within
``--bound-R`` (reaction, default 0.5 %) and ``--bound-uy`` (lateral contraction, default 1.5 %) of FE²; the test
suite runs a small version of it (tests/test_verify_scripts.py).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from mpi4py import MPI

import fe2ml  # noqa: F401
from fe2ml.laws.analytic import AnalyticLaw
from fe2ml.laws.rve import RVELaw
from fe2ml.macro.loads import DirichletSpec
from fe2ml.macro.mesh import create_macro_mesh
from fe2ml.macro.problem import MacroProblem
from fe2ml.materials import NeoHookean
from fe2ml.micro.finite import HyperelasticRVE
from fe2ml.micro.geometry import generate_mesh
from fe2ml.micro.mesh import read_mesh

ROOT = Path(__file__).resolve().parents[1]
MATS = {1: NeoHookean(mu=1.0, K=3.0), 2: NeoHookean(mu=0.2, K=0.6)}
BCS = [DirichletSpec("left", (0, 1), 0.0), DirichletSpec("right", (0,), lambda x, t: 0.2 * t),
       DirichletSpec("right", (1,), 0.0)]
STEPS = 4


def solve(prob, label, comm):
    t0 = time.perf_counter()
    for k in range(1, STEPS + 1):
        rec = prob.step(k / STEPS)
        if comm.rank == 0:
            print(f"    {label}: step {k}/{STEPS}, {rec.iterations} Newton its", flush=True)
    R = prob.reactions()["right"][0]
    uy = prob.mean_displacements()["top"][1]
    return R, uy, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--macro", type=int, nargs=2, default=[8, 4], help="FE² macro mesh (nx ny)")
    ap.add_argument("--degree", type=int, default=2, help="FE² macro displacement degree")
    ap.add_argument("--out", default=str(ROOT / "results" / "verify_dns"))
    ap.add_argument("--check", action="store_true", help="assert the floors (exit status 1 when one fails)")
    ap.add_argument("--bound-R", type=float, default=0.005)
    ap.add_argument("--bound-uy", type=float, default=0.015)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    out = Path(args.out)
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    tmp = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None, root=0)
    rm = read_mesh(generate_mesh("centred_cell", dict(dim=2, volume_fraction=0.25, h=0.06), tmp, comm=comm))
    if comm.rank == 0:
        print(f"RVE: {len(rm.cells)} elements; FE² macro mesh {args.macro[0]}x{args.macro[1]} (x2 triangles), "
              f"degree {args.degree}")
    # FE²
    law = RVELaw(HyperelasticRVE(rm, MATS))
    spec = {"generate": "rectangle", "size": [2.0, 1.0], "n": list(args.macro)}
    prob = MacroProblem(comm, create_macro_mesh(comm, spec), law=law, dirichlet=BCS, degree=args.degree)
    import dolfinx

    def add_top(p):
        p._umean_forms["top"] = [dolfinx.fem.form(p.u[c] * p.bnd.ds(p.bnd.ids["top"])) for c in range(2)]

    add_top(prob)
    R_fe2, uy_fe2, t_fe2 = solve(prob, "FE²", comm)
    rows = []
    for N in args.tiles:
        mm = create_macro_mesh(comm, {"generate": "tiled_rve", "n": [2 * N, N], "eps": 1.0 / N},
                               rve_mesh_loader=lambda: rm)
        dns = MacroProblem(comm, mm, law=AnalyticLaw(MATS, dim=2), dirichlet=BCS)
        add_top(dns)
        ndofs = dns.V.dofmap.index_map.size_global * 2
        R, uy, t = solve(dns, f"DNS eps=1/{N} ({ndofs} dofs)", comm)
        rows.append(dict(N=N, eps=1.0 / N, dns_dofs=ndofs, R_dns=R, R_fe2=R_fe2, rel_R=abs(R - R_fe2) / abs(R),
                         uy_dns=uy, uy_fe2=uy_fe2, rel_uy=abs(uy - uy_fe2) / abs(uy), dns_s=t))
        dns.close()
    if comm.rank == 0:
        lines = ["| eps | DNS dofs | R DNS | R FE² | rel. diff R | mean u_y top DNS | FE² | rel. diff u_y |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| 1/{r['N']} | {r['dns_dofs']} | {r['R_dns']:.5f} | {r['R_fe2']:.5f} | "
                         f"{100 * r['rel_R']:.2f} % "
                         f"| {r['uy_dns']:.6f} | {r['uy_fe2']:.6f} | {100 * r['rel_uy']:.2f} % |")
        table = "\n".join(lines)
        print(table)
        print(f"FE²: {t_fe2:.1f} s, {law.stats['rve_solves']} RVE solves on rank 0; ranks: {comm.size}")
        (out / "table.md").write_text(table + "\n")
        (out / "table.json").write_text(json.dumps({"rows": rows, "fe2_s": t_fe2, "ranks": comm.size}, indent=1))
        from fe2ml.plotting import plot_lines

        eps = [r["eps"] for r in rows]
        plot_lines({"reaction force": (eps, [r["rel_R"] for r in rows]),
                    "mean top displacement": (eps, [r["rel_uy"] for r in rows])}, out / "dns_vs_fe2.png",
                   xlabel="eps (RVE size / strip height)", ylabel="relative difference DNS vs FE²",
                   title="FE² vs direct numerical simulation", logx=True, logy=True)
        print(f"wrote {out}/table.md, table.json, dns_vs_fe2.png")
        if args.check:
            fails = []
            for key, bound in (("rel_R", args.bound_R), ("rel_uy", args.bound_uy)):
                vals = [r[key] for r in rows]
                if any(b >= a for a, b in zip(vals, vals[1:], strict=False)):
                    fails.append(f"{key} does not decrease with eps: {vals}")
                if vals[-1] > bound:
                    fails.append(f"{key} at the finest eps is {100 * vals[-1]:.3f} % > {100 * bound:g} %")
            print("check: " + ("; ".join(fails) if fails else "ok (differences decrease with eps, finest within "
                                                             "the bounds)"), flush=True)
            ok = not fails
        else:
            ok = True
    else:
        ok = True
    if not comm.allreduce(ok, op=MPI.LAND):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
