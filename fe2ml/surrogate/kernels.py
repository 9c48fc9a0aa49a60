"""Compiled point kernels of the closed form: the invariant networks' chain rule (``invariants.c``).

The invariant features and the tangent's chain rule are many products of 3 x 3 arrays per point, which numpy
runs as many small passes over a chunk; in C they are one pass. The source is built on first use with the C
compiler that compiles the macro problem's forms (the first of ``$CC``, Python's and ``cc`` that builds it) into
``$XDG_CACHE_HOME/fe2ml`` (``~/.cache/fe2ml``), once per source and compiler: ranks that build at the same time
each write their own file and move it into place. Where nothing can be built (no compiler, a read-only cache), or
with ``FE2ML_KERNELS=0``, the closed form runs in numpy: the same numbers to round-off, more slowly.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["InvariantKernel", "invariant_kernel"]

SOURCE = Path(__file__).with_name("invariants.c")
FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared"]

_loaded: dict = {}


def _compilers() -> list[list[str]]:
    """The compilers to try, in order: ``$CC``, Python's own (which may name one this machine lacks), ``cc``."""
    out = []
    for cc in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc"):
        if cc and shlex.split(cc) not in out:
            out.append(shlex.split(cc))
    return out


def _cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "fe2ml"


def _build(cc: list[str]) -> ctypes.CDLL:
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(cc + FLAGS).encode(), platform.machine().encode()]))
    lib = _cache() / f"invariants-{key.hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            subprocess.run([*cc, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, timeout=120)
            if os.path.getsize(tmp) == 0:
                raise OSError(f"{cc[0]} wrote nothing")
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(lib))


class InvariantKernel:
    """The compiled features and chain rule of an invariant network with fibre directions ``fibres`` (K, 3)."""

    def __init__(self, lib: ctypes.CDLL, fibres: np.ndarray):
        self.a = np.ascontiguousarray(fibres, dtype=np.float64).reshape(-1, 3)
        self.K = len(self.a)
        self.r = 3 + 3 * self.K
        self._features, self._tangent = lib.fe2ml_invariant_features, lib.fe2ml_invariant_tangent
        p = ctypes.c_void_p
        self._features.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_int, p, p, p, p]
        self._tangent.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_int, p, p, p, p, p, p]
        self._features.restype = self._tangent.restype = None

    @staticmethod
    def _f64(x) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float64)

    def features(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(F as a C-contiguous float64 array, y (n, r), dy (n, r, 9)) at F (n, d, d)."""
        F = self._f64(F)
        n, d = F.shape[0], F.shape[1]
        y, dy = np.empty((n, self.r)), np.empty((n, self.r, 9))
        self._features(n, d, self.K, F.ctypes.data, self.a.ctypes.data, y.ctypes.data, dy.ctypes.data)
        return F, y, dy

    def tangent(self, F: np.ndarray, Wy, H, out=None) -> tuple[np.ndarray, np.ndarray]:
        """P (n, d, d) and A (n, d, d, d, d) from the feature-space gradient Wy (n, r) and Hessian H (n, r, r).

        ``F`` as :meth:`features` returned it; A into ``out`` where that is a C-contiguous float64 array.
        """
        n, d = F.shape[0], F.shape[1]
        Wy, H = self._f64(Wy), self._f64(H)
        if Wy.shape != (n, self.r) or H.shape != (n, self.r, self.r):
            raise ValueError(f"feature derivatives of shape {Wy.shape}, {H.shape}; expected ({n}, {self.r}) and "
                             f"({n}, {self.r}, {self.r})")
        P = np.empty((n, d, d))
        usable = (out is not None and out.shape == (n, d, d, d, d) and out.dtype == np.float64
                  and out.flags.c_contiguous)
        A = out if usable else np.empty((n, d, d, d, d))
        self._tangent(n, d, self.K, F.ctypes.data, self.a.ctypes.data, Wy.ctypes.data, H.ctypes.data,
                      P.ctypes.data, A.ctypes.data)
        return P, A


def _library() -> ctypes.CDLL | None:
    if "lib" not in _loaded:
        lib = None
        if os.environ.get("FE2ML_KERNELS", "1") != "0":
            for cc in _compilers():
                try:
                    lib = _build(cc)
                    break
                except (OSError, subprocess.SubprocessError):
                    continue
        _loaded["lib"] = lib
    return _loaded["lib"]


def invariant_kernel(fibres) -> InvariantKernel | None:
    """The compiled kernel for these fibre directions, or None where it cannot be built (numpy then)."""
    lib = _library()
    a = np.asarray(fibres, dtype=np.float64).reshape(-1, 3)
    if lib is None or len(a) > lib.fe2ml_max_families():
        return None
    return InvariantKernel(lib, a)

