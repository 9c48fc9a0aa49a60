#!/usr/bin/env bash
# fe2ml test suite: serially, then under `mpiexec -n 2`. Bootstraps .venv on first use.
# Extra arguments go to pytest (e.g. -k laminate).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
export OMP_NUM_THREADS=1
cd "$ROOT"
echo "== fe2ml lint: ruff"
"$ROOT/.venv/bin/ruff" check fe2ml tests scripts
echo "== fe2ml types: mypy (the contract, laws, RVE solvers and configs; files listed in pyproject.toml)"
"$ROOT/.venv/bin/mypy"
echo "== fe2ml tests: mpiexec -n 2 (rank 0 shown; other ranks' output shown if they fail)"
LOGDIR="$(mktemp -d)"
set +e
"$ROOT/.venv/bin/mpiexec" -n 2 bash -c '
    if [ "${PMI_RANK:-0}" = "0" ]; then
        exec "$0" -m pytest -q -p no:cacheprovider "${@}"
    else
        exec "$0" -m pytest -q -p no:cacheprovider "${@}" > "'"$LOGDIR"'/rank${PMI_RANK}.log" 2>&1
    fi' "$ROOT/.venv/bin/python" "$@"
MPI_RC=$?
set -e
if [[ $MPI_RC -ne 0 ]]; then
    for f in "$LOGDIR"/rank*.log; do [[ -f "$f" ]] && { echo "-- $f"; tail -50 "$f"; }; done
    echo "fe2ml tests: FAILED under mpiexec -n 2 (exit $MPI_RC)"
    exit "$MPI_RC"
fi
rm -rf "$LOGDIR"
echo "== fe2ml tests: serial"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
