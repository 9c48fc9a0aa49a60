#!/usr/bin/env bash
# fe2ml main job on 2 MPI ranks: the end-to-end tissue demo (RVE -> sampling campaign -> neural surrogate ->
# macro runs with the surrogate and with nested RVEs -> what each cell feels -> figures). --quick: tiny.
# Bootstraps .venv on first use. Outputs go to results/demo/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
export OMP_NUM_THREADS=1
OUT="$ROOT/results/demo"
cd "$ROOT"
"$ROOT/.venv/bin/mpiexec" -n 2 "$ROOT/.venv/bin/fe2ml" demo --output "$OUT" "$@"
