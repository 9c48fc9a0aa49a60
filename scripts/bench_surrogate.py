"""Benchmark the surrogate; prints its figures (JSON with --json).

Figures:
  1. stress + tangent evaluations per second per core (2D potential model, float64, batched, 1 thread);
  2. the tissue-strip example: constitutive time of the surrogate run vs the FE² run (same mesh, steps,
     1 rank) and the whole-run ratio (needs results/surrogate_tissue/checkpoint.pt: made here when missing
     by fe2ml sample examples/sample_tissue.yaml and fe2ml train examples/train_tissue.yaml);
  3. training time per epoch and peak memory for 10^4 and 10^5 records (synthetic neo-Hookean data,
     stress + tangent loss, 5 epochs each).

With ``--device DEV`` (cpu, cuda, cuda:K) it measures the device path instead:
  4. stress + tangent evaluations per second on DEV for d = 2 and 3 at 10^4, 10^5 and 10^6 points (potential model,
     hidden [64, 64], float64, the closed-form tangent in torch);
  5. training time per full-batch epoch on DEV at 10^5 and 10^6 records (stress + tangent loss, float64).
``--sizes`` and ``--records`` shrink these for a quick run.

With ``--stream N`` it measures streamed training instead:
  6. a 3D log of N records (an HDF5 part of synthetic data), mini-batches of 4096, stress + tangent loss, one
     thread: time per epoch and peak memory (each in its own process) with the records in memory
     (``batch_size``) and with the tangents streamed from the log (``stream``) by 0 and 2 worker processes.

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_surrogate.py [--json OUT.json] [--device cuda]
       [--stream 200000]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import fe2ml  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def evals_per_s():
    import torch

    from fe2ml.surrogate.models import PotentialModel

    torch.set_num_threads(1)
    m = PotentialModel(2, hidden=(16, 16))
    F = np.eye(2) + np.random.default_rng(0).uniform(-0.1, 0.1, (200000, 2, 2))
    m.evaluate(F[:2000])
    t0 = time.perf_counter()
    m.evaluate(F)
    r = len(F) / (time.perf_counter() - t0)
    print(f"1. {r:.0f} stress+tangent evaluations/s on one core (2D, hidden [16, 16], batches of 1024; floor 1e5)",
          flush=True)
    return r


def run(cfg, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN / "fe2ml"), "run", str(cfg), "--output", str(out)], capture_output=True, text=True,
                       env=env, cwd=ROOT / "examples")
    if r.returncode:
        raise SystemExit(r.stderr)
    s = json.loads((Path(out) / "summary.json").read_text())
    s["process_s"] = time.perf_counter() - t0
    return s


def strip_speedup():
    ck = ROOT / "results" / "surrogate_tissue" / "checkpoint.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not ck.exists():
        for cmd in (["sample", "sample_tissue.yaml"], ["train", "train_tissue.yaml"]):
            subprocess.run([str(BIN / "fe2ml"), *cmd], check=True, cwd=ROOT / "examples", env=env,
                           stdout=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp())
    base = (ROOT / "examples" / "strip_fe2.yaml").read_text().split("\nlog:")[0]
    (tmp / "fe2.yaml").write_text(base)
    fe2 = run(tmp / "fe2.yaml", tmp / "fe2")
    sur = run(ROOT / "examples" / "strip_surrogate.yaml", tmp / "sur")
    # time spent inside the constitutive law (RVE solves / network evaluations); the macro-side work at the
    # quadrature points (F̄ evaluation, array copies), the same for both, is in the whole-run figures
    cf, cs = fe2["law_s"], sur["law_s"]
    import csv

    a = list(csv.reader(open(tmp / "fe2" / "reactions.csv")))
    b = list(csv.reader(open(tmp / "sur" / "reactions.csv")))
    i = a[0].index("right_R1")
    dev = max(abs(float(x[i]) - float(y[i])) / abs(float(x[i])) for x, y in zip(a[1:], b[1:], strict=True))
    print(f"2. tissue strip, 1 rank: time in the constitutive law FE² {cf:.2f} s vs surrogate {cs:.4f} s = "
          f"{cf / cs:.0f}x; "
          f"whole solve phase {fe2['wall_s']:.2f} s vs {sur['wall_s']:.2f} s = {fe2['wall_s'] / sur['wall_s']:.1f}x; "
          f"whole command {fe2['process_s']:.1f} s vs {sur['process_s']:.1f} s; reaction curve deviation "
          f"{100 * dev:.2f} % (floor 1 %)", flush=True)
    return dict(constitutive_fe2_s=cf, constitutive_sur_s=cs, ratio=cf / cs, wall_ratio=fe2["wall_s"] / sur["wall_s"],
                reaction_dev=dev)


def training_cost():
    import torch

    from fe2ml.surrogate.models import PotentialModel
    from fe2ml.surrogate.train import _fit_member

    torch.set_num_threads(1)
    out = {}
    rng = np.random.default_rng(0)
    for n in (10_000, 100_000):
        F = np.eye(2) + rng.uniform(-0.15, 0.15, (n, 2, 2))
        ref = PotentialModel(2, hidden=(8,))
        P, A = ref.evaluate(F)
        m = PotentialModel(2, hidden=(16, 16))
        idx = np.arange(n)
        t0 = time.perf_counter()
        _fit_member(m, F, P, A, idx[: int(0.85 * n)], idx[int(0.85 * n):], {"stress": 1.0, "tangent": 0.1},
                    {"epochs": 5, "lr": 0.01, "patience": 100}, 0)
        per = (time.perf_counter() - t0) / 5
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out[n] = {"s_per_epoch": per, "peak_rss_mib": rss}
        print(f"3. training on {n} records: {per:.2f} s per full-batch epoch (stress + tangent loss), peak RSS "
              f"{rss:.0f} MiB", flush=True)
    return out


def device_figures(device: str, sizes, records) -> dict:
    """Evaluations/s and training time per epoch on a torch device (figures 4 and 5)."""
    import torch

    from fe2ml.surrogate.checkpoint import resolve_device
    from fe2ml.surrogate.closed_form import evaluator
    from fe2ml.surrogate.models import PotentialModel
    from fe2ml.surrogate.train import _fit_member

    dev = resolve_device(device, "--device")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out = {"device": str(dev), "name": name, "evals_per_s": {}, "training_s_per_epoch": {}}
    rng = np.random.default_rng(0)
    for d in (2, 3):
        m = PotentialModel(d, hidden=(64, 64)).to(dev)
        f = evaluator(m, "torch")
        for n in sizes:
            F = torch.as_tensor(np.eye(d) + rng.uniform(-0.1, 0.1, (n, d, d)), device=dev)
            f(F[: min(n, 1000)])  # warm-up (kernels, allocator)
            sync()
            t0 = time.perf_counter()
            for i in range(0, n, 65536):  # the chunk of SurrogateLaw's device path: bounded memory at any n
                P, A = f(F[i:i + 65536])
            sync()
            r = n / (time.perf_counter() - t0)
            out["evals_per_s"][f"d{d}_n{n}"] = r
            print(f"4. {name}: {r:.3g} stress+tangent evaluations/s (d = {d}, {n} points, float64, closed form)",
                  flush=True)
    for n in records:
        F = np.eye(2) + rng.uniform(-0.15, 0.15, (n, 2, 2))
        P, A = PotentialModel(2, hidden=(8,)).evaluate(F)
        m = PotentialModel(2, hidden=(16, 16))
        idx = np.arange(n)
        epochs = 3
        t0 = time.perf_counter()
        _fit_member(m, F, P, A, idx[: int(0.85 * n)], idx[int(0.85 * n):], {"stress": 1.0, "tangent": 0.1},
                    {"epochs": epochs, "lr": 0.01, "patience": 100}, 0, device=dev)
        sync()
        per = (time.perf_counter() - t0) / epochs
        out["training_s_per_epoch"][n] = per
        print(f"5. {name}: {per:.3f} s per full-batch training epoch at {n} records (stress + tangent loss)",
              flush=True)
    return out


def stream_one(mode: str, folder: str, epochs: int = 1) -> dict:
    """One streamed-training measurement in this process (figure 6): ``memory``, ``stream0`` or ``stream2``."""
    import torch

    from fe2ml.data.reader import StreamedField, read_logs
    from fe2ml.surrogate.models import PotentialModel
    from fe2ml.surrogate.train import _fit_member

    torch.set_num_threads(1)
    stream = mode != "memory"
    data = read_logs(folder, fields=["F", "P"] if stream else ["F", "P", "A"], locate=stream)
    F, P = data["F"], data["P"]
    A = StreamedField(data.parts, data.locations, "A") if stream else data["A"]
    n = len(F)
    idx = np.random.default_rng(0).permutation(n)
    m = PotentialModel(3, hidden=(16, 16))
    m.p_scale.fill_(float(np.sqrt(np.mean(P ** 2))))
    t0 = time.perf_counter()
    _fit_member(m, F, P, A, idx[: int(0.85 * n)], idx[int(0.85 * n):], {"stress": 1.0, "tangent": 0.1},
                {"epochs": epochs, "lr": 0.01, "patience": 100, "batch_size": 4096,
                 "workers": 2 if mode == "stream2" else 0}, 0)
    return {"mode": mode, "records": n, "s_per_epoch": (time.perf_counter() - t0) / epochs,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def stream_figures(n: int) -> dict:
    """Figure 6: streamed against in-memory mini-batch training on a 3D log of n records."""
    from fe2ml.data.log import LogWriter
    from fe2ml.surrogate.models import PotentialModel

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        ref = PotentialModel(3, hidden=(8,))
        with LogWriter(tmp, "bench", 0, fingerprint="bench", attrs={"kinematics": "finite", "rve": "{}"},
                       dim=3) as w:
            for i in range(0, n, 50_000):
                k = min(50_000, n - i)
                F = np.eye(3) + rng.uniform(-0.1, 0.1, (k, 3, 3))
                P, A = ref.evaluate(F)
                w.add(F, P, A, point_id=np.arange(i, i + k))
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.h5")) / 2**20
        print(f"6. a 3D log of {n} records ({size:.0f} MiB)", flush=True)
        for mode in ("memory", "stream0", "stream2"):
            r = subprocess.run([sys.executable, __file__, "--stream-one", mode, tmp], capture_output=True, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
            if r.returncode:
                raise SystemExit(f"bench_surrogate: streamed training ({mode}) failed:\n{r.stderr[-2000:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            out[mode] = res
            label = {"memory": "records in memory", "stream0": "tangents streamed, 0 workers",
                     "stream2": "tangents streamed, 2 workers"}[mode]
            print(f"6. {label}: {res['s_per_epoch']:.2f} s per epoch (mini-batches of 4096), peak RSS "
                  f"{res['peak_rss_mib']:.0f} MiB", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default=None, help="measure figures 4 and 5 on this torch device instead")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--records", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--stream", type=int, default=None, metavar="N", help="measure streamed training on N records")
    ap.add_argument("--stream-one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stream_one:
        print(json.dumps(stream_one(*args.stream_one)))
        return
    if args.stream is not None:
        out = {"stream": stream_figures(args.stream)}
    elif args.device is not None:
        from fe2ml.errors import Fe2mlError

        try:
            out = device_figures(args.device, args.sizes, args.records)
        except Fe2mlError as e:
            raise SystemExit(f"bench_surrogate: {e}") from None
    else:
        out = {"evals_per_s": evals_per_s(), "strip": strip_speedup(), "training": training_cost()}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
