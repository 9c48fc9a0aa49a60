#!/usr/bin/env bash
# fe2ml's GPU and many-core figures, as one prepared script for a machine with an NVIDIA GPU and 16 cores.
#
#   bash scripts/device_bench.sh install WHEELS_DIR   # once: a venv over the machine's python (its torch, numpy,
#                                                     # scipy, h5py, mpi4py) plus fe2ml's wheels from WHEELS_DIR
#   bash scripts/device_bench.sh run [OUT_DIR]        # the figures, into OUT_DIR (default results/device)
#
# WHEELS_DIR holds what such a machine may lack (pip download on a machine with package access):
# dolfinx-solver-real, fenics-basix, fenics-ffcx, fenics-ufl, mpich, mpi4py, cffi, pycparser, meshio, h5py 3.16.
# Copy ~/.cache/fenics along to skip the form compilation. h5py is imported before dolfinx writes (fe2ml does so).
#
# Figures (README, section Benchmarks):
#   1. bench_surrogate.py --device cuda: closed-form stress + tangent evaluations/s at 1e4..1e6 points (2D, 3D),
#      training time per epoch at 1e5 and 1e6 records (floors: >= 1e7 evaluations/s at 1e6 points, <= 1 s/epoch);
#   2. bench_scaling.py --ranks 1 2 4 8 16: strong scaling of nested FE²;
#   3. bench_macro_scale.py on 1..16 ranks: macro runs from 1e4 to 1e6 points, analytic, surrogate and hybrid.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-device"
case "${1:-}" in
    install)
        WHEELS="${2:?usage: device_bench.sh install WHEELS_DIR}"
        python3 -m venv --system-site-packages "$VENV"
        # the system python's torch stays visible to the venv
        python3 -c "import site; print(site.getsitepackages()[0])" > "$("$VENV/bin/python" -c \
            "import site; print(site.getsitepackages()[0])")/system-torch.pth"
        "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" --ignore-installed \
            dolfinx-solver-real fenics-basix fenics-ffcx fenics-ufl mpich mpi4py cffi pycparser meshio h5py
        "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT"
        "$VENV/bin/python" -c "import fe2ml, dolfinx, torch; print('fe2ml device venv: dolfinx', \
            dolfinx.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
        ;;
    run)
        OUT="${2:-$ROOT/results/device}"
        mkdir -p "$OUT"
        export OMP_NUM_THREADS=1
        PY="$VENV/bin/python"
        nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
        "$PY" "$ROOT/scripts/bench_surrogate.py" --device cuda --json "$OUT/surrogate_cuda.json" \
            2>&1 | tee "$OUT/surrogate_cuda.log"
        "$PY" "$ROOT/scripts/bench_scaling.py" --ranks 1 2 4 8 16 --out "$OUT/scaling" 2>&1 | tee "$OUT/scaling.log"
        "$PY" "$ROOT/scripts/bench_macro_scale.py" --ranks 1 4 16 --sizes 1e4 1e5 1e6 --max-points-1rank 2e5 \
            --laws analytic surrogate hybrid --dims 3 --out "$OUT/macro_scale" 2>&1 | tee "$OUT/macro_scale.log"
        ;;
    *)
        echo "usage: bash scripts/device_bench.sh install WHEELS_DIR | run [OUT_DIR]" >&2
        exit 2
        ;;
esac
