#!/usr/bin/env bash
# fe2ml main job: homogenize a 2D tissue RVE (random cells in a matrix) on 2 MPI ranks.
# Bootstraps .venv on first use. Outputs go to results/demo/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
export OMP_NUM_THREADS=1
OUT="$ROOT/results/demo"
mkdir -p "$OUT"
cd "$ROOT"
"$ROOT/.venv/bin/mpiexec" -n 2 "$ROOT/.venv/bin/fe2ml" homogenize examples/rve_cells_2d.yaml \
    --json "$OUT/rve_cells_2d.json" --plot "$OUT/rve_cells_2d.png"
echo "fe2ml demo: outputs in $OUT"
