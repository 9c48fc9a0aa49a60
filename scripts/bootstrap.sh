#!/usr/bin/env bash
# Create .venv with Python >= 3.12 and install fe2ml's pip route (dolfinx-solver-real, torch, ...).
# Usage: bash scripts/bootstrap.sh [--force]
# Idempotent: does nothing when .venv already holds a working install (unless --force).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.fe2ml-bootstrap-ok"
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

if [[ -f "$STAMP" && $FORCE -eq 0 ]]; then
    exit 0
fi

find_python() {
    local cands=()
    [[ -n "${FE2ML_PYTHON:-}" ]] && cands+=("$FE2ML_PYTHON")
    cands+=(python3.13 python3.12 python3)
    if command -v pyenv >/dev/null 2>&1; then
        local root; root="$(pyenv root)"
        for v in "$root"/versions/3.1[2-9]*; do
            [[ -d "$v" ]] && cands+=("$v/bin/python3")
        done
    fi
    for p in "${cands[@]}"; do
        local exe
        exe="$(command -v "$p" 2>/dev/null || true)"
        [[ -z "$exe" && -x "$p" ]] && exe="$p"
        [[ -z "$exe" ]] && continue
        if "$exe" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
            echo "$exe"; return 0
        fi
    done
    return 1
}

PY="$(find_python)" || {
    echo "fe2ml bootstrap: no Python >= 3.12 found (tried \$FE2ML_PYTHON, python3.13, python3.12, python3, pyenv versions). Install one or set FE2ML_PYTHON=/path/to/python3.12." >&2
    exit 1
}
echo "fe2ml bootstrap: using $PY ($("$PY" --version 2>&1))"

rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "fe2ml bootstrap: installing dolfinx-solver-real, torch and friends (a few minutes)"
"$VENV/bin/python" -m pip install -q "dolfinx-solver-real==0.11.0.post0" "torch==2.14.1"
"$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
# gmsh's PyPI wheel links against a few X/GL libraries; install them on Debian/Ubuntu when missing.
if ! "$VENV/bin/python" -c "import gmsh" >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]]; then
        echo "fe2ml bootstrap: installing system libraries that gmsh needs"
        apt-get update -qq >/dev/null || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libglu1-mesa libxrender1 libxcursor1 \
            libxft2 libxinerama1 libgomp1 >/dev/null || true
    else
        echo "fe2ml bootstrap: 'import gmsh' fails; install libGLU, libXrender, libXcursor, libXft, libXinerama" >&2
    fi
fi
"$VENV/bin/python" - <<'PY'
import fe2ml  # noqa: F401  (imports dolfinx_solver first)
import dolfinx, petsc4py, mpi4py, h5py, gmsh, meshio, yaml  # noqa: F401
print(f"fe2ml bootstrap: dolfinx {dolfinx.__version__} ok")
PY
touch "$STAMP"
echo "fe2ml bootstrap: done ($VENV)"
