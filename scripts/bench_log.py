"""Benchmark the HDF5 log; prints its figures (JSON with --json).

Figures:
  1. logging overhead: share of a 1,000-point 2D neo-Hookean campaign's wall time spent in the log
     writer (buffering, HDF5 writes, flushes; floor 5 %);
  2. writer memory: RSS after 20,000 and after 200,000 records (with cell quantities) written in batches;
  3. records per second of 2-rank campaigns on a 2D RVE, linear and neo-Hookean (whole command,
     start-up included, and the campaign phase alone).

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_log.py [--json OUT.json] [--n 1000]
"""

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np

import fe2ml  # noqa: F401
from fe2ml.parallel import log_level

BIN = Path(sys.executable).parent

RVE = """\
rve:
  dim: 2
  mesh: {{generate: cells_2d, n_cells: 4, volume_fraction: 0.3, seed: 1, h: 0.08}}
  phases:
    1: {{material: {m1}}}
    2: {{material: {m2}}}
design: {{method: sobol, n: {n}, seed: 0, space: stretch, stretch: [0.85, 1.2], rotation: [-20, 20]}}
flush_every: 64
"""
NH = ("neo_hookean, mu: 10.0, K: 30.0", "neo_hookean, mu: 1.0, K: 5.0")
LIN = ("linear_elastic, E: 27.0, nu: 0.35", "linear_elastic, E: 2.9, nu: 0.4")


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def overhead(n, tmp):
    from fe2ml.data.campaign import run_campaign
    from fe2ml.data.config import load_sample_config

    cfg = tmp / "nh.yaml"
    cfg.write_text(RVE.format(m1=NH[0], m2=NH[1], n=n))
    c = load_sample_config(cfg, output=str(tmp / "ovh"))
    with log_level(logging.WARNING):
        out = run_campaign(MPI.COMM_WORLD, c)
    share = out["log_s"][0] / out["wall_s"]
    print(f"1. {n}-point 2D neo-Hookean campaign, 1 rank: {out['wall_s']:.1f} s, RVE solves {out['eval_s'][0]:.1f} s, "
          f"log writer {out['log_s'][0]:.3f} s = {100 * share:.2f} % (floor 5 %)", flush=True)
    return dict(n=n, wall_s=out["wall_s"], eval_s=out["eval_s"][0], log_s=out["log_s"][0], share=share)


class FakeCells:
    def __init__(self, rng):
        keys = {"volume": (), "F": (3, 3), "E": (3, 3), "stretch": (3,), "J": (), "W": (), "sigma": (3, 3),
                "von_mises": (), "sigma_max": ()}
        self.cell = {k: rng.normal(size=(4, *s)) for k, s in keys.items()}
        self.cell["phase"] = np.ones(4, dtype=int)
        self.phase = {k: rng.normal(size=(2, *s)) for k, s in keys.items()}
        self.peak_E = rng.normal(size=2)
        self.peak_von_mises = rng.normal(size=2)


def memory(tmp):
    from fe2ml.data.log import LogWriter

    rng = np.random.default_rng(0)
    cells = [FakeCells(rng) for _ in range(100)]
    F = np.eye(2) + rng.normal(scale=0.1, size=(100, 2, 2))
    P = rng.normal(size=(100, 2, 2))
    A = rng.normal(size=(100, 2, 2, 2, 2))
    rss = {}
    t0 = time.perf_counter()
    with LogWriter(tmp / "mem", "m", 0, fingerprint="m", attrs={}, dim=2, n_cells=4, n_phases=2,
                   flush_every=1000) as w:
        for k in range(2000):
            w.add(F, P, A, point_id=np.arange(100) + 100 * k, cells=cells)
            if (k + 1) in (200, 2000):
                rss[(k + 1) * 100] = rss_mb()
    dt = time.perf_counter() - t0
    size = (w.path.stat().st_size) / 2**20
    print(f"2. writer memory: RSS {rss[20000]:.1f} MiB after 20,000 records, {rss[200000]:.1f} MiB after 200,000 "
          f"(growth {rss[200000] - rss[20000]:+.1f} MiB); {200000 / dt:.0f} records/s written, file {size:.1f} MiB",
          flush=True)
    return dict(rss_20k=rss[20000], rss_200k=rss[200000], records_per_s=200000 / dt, file_mib=size)


def two_rank(tmp, name, mats, n):
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(RVE.format(m1=mats[0], m2=mats[1], n=n))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), "sample", str(cfg), "--output",
                        str(tmp / f"out_{name}")], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(r.stderr)
    m = re.search(r"(\d+) new records in ([\d.]+) s", r.stdout)
    recs, t = int(m.group(1)), float(m.group(2))
    print(f"3. 2-rank campaign, {name}: {recs} records, {recs / t:.0f} records/s in the campaign phase, "
          f"{recs / wall:.0f} records/s for the whole command ({wall:.1f} s)", flush=True)
    return dict(records=recs, campaign_s=t, command_s=wall, rate=recs / t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    out = {"overhead": overhead(args.n, tmp), "memory": memory(tmp),
           "linear": two_rank(tmp, "linear", LIN, 4096), "neo_hookean": two_rank(tmp, "neo_hookean", NH, 512)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    textwrap.dedent("")


if __name__ == "__main__":
    main()
