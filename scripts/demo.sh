#!/usr/bin/env bash
# fe2ml main job on 2 MPI ranks: homogenize a 2D tissue RVE (random cells in a matrix), its finite-strain
# response with what each cell feels, and an FE² run of a tissue strip under stretch.
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
"$ROOT/.venv/bin/mpiexec" -n 2 "$ROOT/.venv/bin/fe2ml" homogenize examples/rve_tissue_finite.yaml \
    --json "$OUT/rve_tissue_finite.json" --plot "$OUT/rve_tissue_finite.png"
"$ROOT/.venv/bin/mpiexec" -n 2 "$ROOT/.venv/bin/fe2ml" run examples/strip_fe2.yaml --output "$OUT/strip_fe2"
echo "fe2ml demo: outputs in $OUT"
