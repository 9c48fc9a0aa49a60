"""Run every benchmark script and write their figures, with the machine's description, to
results/benchmarks.md and results/benchmarks.json.

Each benchmark prints one line per figure (a ratio or a rate with its conditions); this runner keeps
those lines verbatim, per script, plus each script's wall time.

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_all.py [--only NAME ...]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["bench_rve", "bench_hyper", "bench_fe2", "bench_log", "bench_surrogate", "bench_localization"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")) / 2**20
    except (OSError, StopIteration):
        mem = float("nan")
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {sys.version.split()[0]}, {platform.system()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=None, choices=SCRIPTS)
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = {"machine": machine(), "date": datetime.now(UTC).isoformat(), "benchmarks": {}}
    for name in args.only or SCRIPTS:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py")], capture_output=True, text=True,
                           env=env, cwd=ROOT)
        lines = [ln for ln in r.stdout.splitlines() if ln.strip() and "memory check" not in ln
                 and not ln.startswith("  batch:")]
        for ln in lines:
            print("  " + ln, flush=True)
        out["benchmarks"][name] = {"figures": lines, "wall_s": time.perf_counter() - t0, "returncode": r.returncode,
                                   "stderr_tail": r.stderr[-2000:] if r.returncode else ""}
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "benchmarks.json").write_text(json.dumps(out, indent=1))
    md = [f"# fe2ml benchmarks\n\nMachine: {out['machine']}  \nDate: {out['date']}\n"]
    for name, b in out["benchmarks"].items():
        md.append(f"## {name} ({b['wall_s']:.0f} s{', FAILED' if b['returncode'] else ''})\n")
        md.extend(f"- {ln.strip()}" for ln in b["figures"])
        md.append("")
    (ROOT / "results" / "benchmarks.md").write_text("\n".join(md) + "\n")
    print(f"wrote {ROOT}/results/benchmarks.md and benchmarks.json")
    return 1 if any(b["returncode"] for b in out["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
