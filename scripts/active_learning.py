"""Active learning loop: hybrid FE² runs fall back to the RVE outside the training data, their records
are logged, the surrogate is refined with ``fe2ml train --resume`` on them, and the fall-back fraction
drops run after run.

Round 0 trains on a narrow campaign (principal stretches 0.97..1.06); the tissue strip is then pulled
12 %, beyond it. Each round: hybrid run (fallback records -> results/active_learning/fallback/),
retrain from the previous checkpoint on campaign + fallback records.

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/active_learning.py [--rounds 3]
Prints the fall-back fraction per round and writes results/active_learning/fallbacks.png.
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
           "  checkpoint: {ck}/checkpoint.pt\n  threshold: {{spread: 0.05, distance: 0.02}}\n  log: fallback\n  rve:\n"
           + "\n".join("  " + ln for ln in RVE.replace("{", "{{").replace("}", "}}").splitlines()) + "\n"
           "bcs:\n  - {{boundary: left, components: [0], value: 0.0}}\n  - {{boundary: bottom, components: [1], "
           "value: 0.0}}\n  - {{boundary: right, components: [0], value: \"0.48*t\"}}\nsteps: 4\noutput: {out}\n")
    print("campaign (narrow) ...", flush=True)
    sh("sample", "sample.yaml")
    (OUT / "train0.yaml").write_text(train.format(data="campaign", epochs=1500, out="ck0"))
    sh("train", "train0.yaml")
    fractions = []
    for k in range(args.rounds + 1):
        (OUT / f"run{k}.yaml").write_text(run.format(ck=f"ck{k}", out=f"run{k}"))
        sh("run", f"run{k}.yaml")
        s = json.loads((OUT / f"run{k}" / "summary.json").read_text())
        evals = sum(len(st["residuals"][0]) if st["residuals"] else 0 for st in s["steps"]) * s["quadrature_points"]
        frac = s["fallbacks"] / max(s["quadrature_points"] * len(s["steps"]), 1)
        fractions.append(frac)
        print(f"round {k}: {s['fallbacks']} fall-backs ({100 * frac:.1f} % of converged point evaluations; "
              f"{s['rve_solves']} RVE solves of {evals} point evaluations)", flush=True)
        if k == args.rounds:
            break
        (OUT / f"train{k + 1}.yaml").write_text(train.format(data="campaign, fallback", epochs=800, out=f"ck{k + 1}"))
        sh("train", f"train{k + 1}.yaml", "--resume", f"ck{k}/checkpoint.pt")
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from fe2ml.plotting import plot_lines

    plot_lines({"fall-back fraction": (np.arange(len(fractions)), fractions)}, OUT / "fallbacks.png",
               xlabel="active learning round", ylabel="fraction of points solved by the RVE",
               title="hybrid FE²: the surrogate learns where it was unsure")
    (OUT / "fallbacks.json").write_text(json.dumps(fractions))
    print(f"fall-back fractions {[round(f, 3) for f in fractions]}; wrote {OUT}/fallbacks.png")


if __name__ == "__main__":
    main()
