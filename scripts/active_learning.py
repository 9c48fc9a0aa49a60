"""Active learning loop: hybrid FE² runs fall back to the RVE where the surrogate cannot be trusted, their records
are logged, the surrogate is refined with ``fe2ml train --resume`` on them; how accurate is it round by round?

Round 0 trains on a narrow campaign (principal stretches 0.97..1.06); the tissue strip is then pulled
12 %, beyond it. Each round k: hybrid run with ck{k} (``threshold: {error: 0.01, distance: 0.02}``; fallback records
-> results/active_learning/fallback{k}/), then ck{k+1} = ck{k} retrained on the campaign and every fallback so far.

The fall-back fraction alone says nothing about accuracy (the retrained surrogate's data contain the states of the
next, identical run), so each round also reports ck{k}'s error against true RVE solves:
- at round k's fallback points, which ck{k} never saw;
- along an independent load path (pure shear and uniaxial strain to 12 %, solved once with the RVE), which no
  surrogate ever sees.

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/active_learning.py [--rounds 3]
Prints a table per round and writes results/active_learning/fallbacks.png, errors.png and rounds.json.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "active_learning"
BIN = Path(sys.executable).parent
RVE = """\
  dim: 2
  mesh: {generate: cells_2d, n_cells: 4, volume_fraction: 0.3, seed: 1, h: 0.08}
  phases:
    1: {material: neo_hookean, mu: 10.0, K: 30.0}
    2: {material: neo_hookean, mu: 1.0, K: 5.0}
"""


def sh(*args):
    r = subprocess.run([str(BIN / "fe2ml"), *map(str, args)], capture_output=True, text=True, cwd=OUT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode:
        raise SystemExit(r.stderr)
    return r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    (OUT / "sample.yaml").write_text("rve:\n" + RVE + "design: {method: sobol, n: 64, seed: 0, space: stretch, "
                                     "stretch: [0.97, 1.06], rotation: [-10, 10]}\noutput: campaign\n")
    train = ("data: [{data}]\nmodel: {{kind: potential, hidden: [16, 16]}}\nloss: {{stress: 1.0, tangent: 0.1}}\n"
             "train: {{epochs: {epochs}, lr: 0.01, patience: 300, seed: 0}}\nensemble: 2\noutput: {out}\n")
    run = ("dim: 2\nmesh: {{generate: rectangle, size: [4.0, 1.0], n: [8, 2]}}\nmaterial:\n  kind: hybrid\n"
           "  checkpoint: {ck}/checkpoint.pt\n  threshold: {{error: 0.01, distance: 0.02}}\n  log: {log}\n  rve:\n"
           + "\n".join("  " + ln for ln in RVE.replace("{", "{{").replace("}", "}}").splitlines()) + "\n"
           "bcs:\n  - {{boundary: left, components: [0], value: 0.0}}\n  - {{boundary: bottom, components: [1], "
           "value: 0.0}}\n  - {{boundary: right, components: [0], value: \"0.48*t\"}}\nsteps: 4\noutput: {out}\n")
    print("campaign (narrow) ...", flush=True)
    sh("sample", "sample.yaml")
    (OUT / "train0.yaml").write_text(train.format(data="campaign", epochs=1500, out="ck0"))
    sh("train", "train0.yaml")
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from mpi4py import MPI

    import fe2ml  # noqa: F401
    from fe2ml.data.config import load_sample_config
    from fe2ml.data.reader import read_logs
    from fe2ml.laws.rve import build_rank_rve
    from fe2ml.laws.surrogate import SurrogateLaw
    from fe2ml.micro.config import load_path
    from fe2ml.plotting import plot_lines
    from fe2ml.surrogate.gate import relative_error

    rve, _ = build_rank_rve(MPI.COMM_SELF, load_sample_config(OUT / "sample.yaml").rve)
    F_path = np.array(load_path("pure_shear", 0.12, 6, 2) + load_path("uniaxial", 0.12, 6, 2))
    P_path = rve.evaluate(F_path, cells=False, warm_start=True).P  # the independent truth, solved once
    rounds = []
    for k in range(args.rounds + 1):
        (OUT / f"run{k}.yaml").write_text(run.format(ck=f"ck{k}", out=f"run{k}", log=f"fallback{k}"))
        sh("run", f"run{k}.yaml")
        s = json.loads((OUT / f"run{k}" / "summary.json").read_text())
        frac = s["fallbacks"] / max(s["quadrature_points"] * len(s["steps"]), 1)
        law = SurrogateLaw(OUT / f"ck{k}" / "checkpoint.pt", dim=2)
        rec = {"round": k, "fallbacks": s["fallbacks"], "fallback_fraction": frac}
        if s["fallbacks"]:
            fb = read_logs([OUT / f"fallback{k}"])
            e = relative_error(law.evaluate(fb["F"])[0], fb["P"], law.gate.floor)
            rec |= {"error_at_fallbacks_mean": float(e.mean()), "error_at_fallbacks_max": float(e.max())}
        e = relative_error(law.evaluate(F_path)[0], P_path, law.gate.floor)
        rec |= {"error_on_path_mean": float(e.mean()), "error_on_path_max": float(e.max())}
        rounds.append(rec)
        at_fb = (f"error at its fallback points mean {100 * rec['error_at_fallbacks_mean']:.2f} %, max "
                 f"{100 * rec['error_at_fallbacks_max']:.2f} %; " if s["fallbacks"] else "")
        print(f"round {k}: {s['fallbacks']} fall-backs ({100 * frac:.1f} % of converged point evaluations); "
              f"ck{k}: {at_fb}error on the independent path mean {100 * rec['error_on_path_mean']:.2f} %, max "
              f"{100 * rec['error_on_path_max']:.2f} %", flush=True)
        if k == args.rounds:
            break
        data = ", ".join(["campaign"] + [f"fallback{j}" for j in range(k + 1) if (OUT / f"fallback{j}").is_dir()])
        (OUT / f"train{k + 1}.yaml").write_text(train.format(data=data, epochs=800, out=f"ck{k + 1}"))
        sh("train", f"train{k + 1}.yaml", "--resume", f"ck{k}/checkpoint.pt")
    ks = np.arange(len(rounds))
    plot_lines({"fall-back fraction": (ks, [r["fallback_fraction"] for r in rounds])}, OUT / "fallbacks.png",
               xlabel="active learning round", ylabel="fraction of points solved by the RVE",
               title="hybrid FE²: points the gate sent to the RVE")
    curves = {"independent path, max": (ks, [r["error_on_path_max"] for r in rounds]),
              "independent path, mean": (ks, [r["error_on_path_mean"] for r in rounds])}
    with_fb = [r for r in rounds if "error_at_fallbacks_max" in r]
    if with_fb:
        curves["at the round's fallback points, max"] = ([r["round"] for r in with_fb],
                                                         [r["error_at_fallbacks_max"] for r in with_fb])
    plot_lines(curves, OUT / "errors.png", xlabel="active learning round", ylabel="relative error of P̄ (vs RVE)",
               title="surrogate error against true RVE solves", logy=True)
    (OUT / "rounds.json").write_text(json.dumps(rounds, indent=1))
    print(f"wrote {OUT}/rounds.json, fallbacks.png, errors.png")


if __name__ == "__main__":
    main()
